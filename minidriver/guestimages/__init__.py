"""Builders of the guests minidriver's tests boot: the tiny test guest and the Debian cloud guest.

Tooling for developers and CI, not part of the driver; uses only the driver's public API.
"""
