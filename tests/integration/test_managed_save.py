"""suspend/resume of the test guest under QEMU: libvirt's managed save keeps the
guest's memory, so the resumed guest goes on where it was, with no new boot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from minidriver.driver import LibvirtDriver

pytestmark = pytest.mark.integration


def guest_lines(instance_dir: Path) -> list[str]:
    text = (instance_dir / "console.log").read_text(errors="replace")
    return [line.rstrip("\r") for line in text.splitlines() if line.startswith("minidriver-guest:")]


def test_suspend_then_resume_goes_on_without_a_new_boot(
    driver: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> None:
    inst = driver.spawn(name="sleeper", image=test_image_id, flavor="t1.nano")
    log = Path(inst.instance_dir) / "console.log"
    try:
        wait_console(log, r"^minidriver-guest: ready")
        before = guest_lines(Path(inst.instance_dir))
        assert before.count("minidriver-guest: up") == 1

        driver.suspend(inst.uuid)
        record = driver.db.get_instance(inst.uuid)
        assert (driver.get_info(inst.uuid).state, record.vm_state) == ("shutoff", "suspended")
        domain = driver.host.find_domain(inst.name)
        assert domain is not None and domain.hasManagedSaveImage(0) == 1

        driver.power_on(inst.uuid)  # a start resumes: the saved memory is not discarded
        assert driver.get_info(inst.uuid).state == "running"
        assert driver.db.get_instance(inst.uuid).vm_state == "active"
        # The guest answers its power button: alive where it was, not booting again.
        assert driver.power_off(inst.uuid, timeout=60) is True
        after = guest_lines(Path(inst.instance_dir))
        assert after[: len(before)] == before
        assert after[len(before) :] == ["minidriver-guest: power-button, powering off"]
        assert [line for line in after if "boot-count" in line] == [
            "minidriver-guest: boot-count 1"
        ]
    finally:
        driver.destroy(inst.uuid)


def test_delete_of_a_suspended_guest_removes_its_saved_memory(
    driver: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> None:
    inst = driver.spawn(name="sleeper2", image=test_image_id, flavor="t1.nano")
    wait_console(Path(inst.instance_dir) / "console.log", r"^minidriver-guest: ready")
    driver.suspend(inst.uuid)
    domain = driver.host.find_domain(inst.name)
    assert domain is not None and domain.hasManagedSaveImage(0) == 1
    driver.destroy(inst.uuid)
    assert driver.host.find_domain(inst.name) is None
    assert not Path(inst.instance_dir).exists()


def test_a_hard_reboot_of_a_suspended_guest_boots_it_afresh(
    driver: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> None:
    """As Nova's hard reboot: the saved memory is discarded, the guest boots again
    (a start would restore it instead)."""
    inst = driver.spawn(name="sleeper3", image=test_image_id, flavor="t1.nano")
    log = Path(inst.instance_dir) / "console.log"
    try:
        wait_console(log, r"^minidriver-guest: ready")
        driver.suspend(inst.uuid)
        driver.reboot(inst.uuid, hard=True)
        wait_console(log, r"^minidriver-guest: boot-count 2")
        assert guest_lines(Path(inst.instance_dir)).count("minidriver-guest: up") == 2
        domain = driver.host.find_domain(inst.name)
        assert domain is not None and domain.hasManagedSaveImage(0) == 0
        assert driver.db.get_instance(inst.uuid).vm_state == "active"
    finally:
        driver.destroy(inst.uuid)
