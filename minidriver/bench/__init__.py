"""Benchmarks and the load test: where spawn's time goes, against the floor and a peer.

Tooling for developers and CI, not part of the driver; uses only the driver's public API.
``python -m minidriver.bench`` is ``scripts/bench``.
"""
