"""Tooling for test suites that boot real VMs: the pytest plugin (:mod:`.plugin`).

Uses only the driver's public API (see the README's map and the import contract).
"""
