"""A user's test with the minidriver pytest plugin: a real VM as a fixture.

Installing minidriver enables the plugin (its ``pytest11`` entry point): the fixtures
need no import. The VM is destroyed when the test ends, whatever its outcome.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from minidriver.pytest_plugin import (
    MinidriverTemplate,
    MinidriverTemplateFactory,
    MinidriverVMFactory,
)

pytestmark = pytest.mark.integration


def test_guest_boots_and_sees_its_root_disk(
    minidriver_vm: MinidriverVMFactory, minidriver_test_image: Path
) -> None:
    vm = minidriver_vm(image=minidriver_test_image, flavor="t1.nano")
    vm.wait_for_console(r"^minidriver-guest: ready", timeout=120)
    assert "minidriver-guest: disk vda 1073741824 root" in vm.console_text()
    assert vm.info().state == "running"


@pytest.fixture(scope="session")
def ready_guest(
    minidriver_template: MinidriverTemplateFactory, minidriver_test_image: Path
) -> MinidriverTemplate:
    """The test guest booted once and saved when ready: every test below clones it."""
    return minidriver_template(image=minidriver_test_image, wait_for=r"^minidriver-guest: ready")


@pytest.mark.parametrize("n", [1, 2])
def test_clones_start_ready_with_their_own_disks(
    minidriver_vm: MinidriverVMFactory, ready_guest: MinidriverTemplate, n: int
) -> None:
    vm = minidriver_vm(template=ready_guest)
    assert vm.info().state == "running"  # ready now: restored, not booting
    assert "minidriver-guest: up" not in vm.console_text()  # no boot lines
    vm.driver.reboot(vm.uuid, hard=True)  # a boot of its own disk: the counter goes on
    vm.wait_for_console(r"^minidriver-guest: boot-count 2", timeout=120)
