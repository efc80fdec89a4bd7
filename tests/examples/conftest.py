"""The examples run in the project's own pytest process, beside tests/conftest.py.

There the integration tests hold one session Host, and on the embedded driver a
process can open only one root: the plugin's own session driver (on a state dir of its
own, so a second root) would fail, or make the project's fail, whichever came second.
So here the plugin runs on the project's driver: one state dir, one Host. A project
without such a driver of its own needs no conftest at all.
"""

from __future__ import annotations

import pytest

from minidriver.driver import LibvirtDriver


@pytest.fixture(scope="session")
def minidriver_driver(driver: LibvirtDriver) -> LibvirtDriver:
    return driver
