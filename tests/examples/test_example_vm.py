"""A user's test with the minidriver pytest plugin: a real VM as a fixture.

Installing minidriver enables the plugin (its ``pytest11`` entry point): the fixtures
need no import. The VM is destroyed when the test ends, whatever its outcome.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from minidriver.pytest_plugin import MinidriverVMFactory

pytestmark = pytest.mark.integration


def test_guest_boots_and_sees_its_root_disk(
    minidriver_vm: MinidriverVMFactory, minidriver_test_image: Path
) -> None:
    vm = minidriver_vm(image=minidriver_test_image, flavor="t1.nano")
    vm.wait_for_console(r"^minidriver-guest: ready", timeout=120)
    assert "minidriver-guest: disk vda 1073741824 root" in vm.console_text()
    assert vm.info().state == "running"
