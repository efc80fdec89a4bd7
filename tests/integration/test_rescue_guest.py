"""Rescue and unrescue of the test guest under QEMU: the rescue guest boots from the
test image and sees the instance's root as its second disk; unrescue boots the root."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from boots import wait_ready

from minidriver import rescue
from minidriver.driver import LibvirtDriver

pytestmark = pytest.mark.integration


def test_the_rescue_guest_sees_the_root_second_and_unrescue_boots_it(
    driver: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> None:
    inst = driver.spawn(name="rescued", image=test_image_id, flavor="t1.nano")
    instance_dir = Path(inst.instance_dir)
    try:
        assert "minidriver-guest: boot-count 1" in wait_ready(wait_console, instance_dir, 1)

        rescue.rescue(driver, inst.uuid, test_image_id)
        assert driver.db.get_instance(inst.uuid).vm_state == "rescued"
        rescued = wait_ready(wait_console, instance_dir, 2)
        # Its own disk (the rescue image at the flavor's 1 GB) first, the root second.
        assert "minidriver-guest: disk vda 1073741824 root" in rescued
        assert "minidriver-guest: disk vdb 1073741824 root" in rescued
        assert "minidriver-guest: boot-count 1" in rescued  # counted on the rescue disk

        rescue.unrescue(driver, inst.uuid)
        assert driver.db.get_instance(inst.uuid).vm_state == "active"
        after = wait_ready(wait_console, instance_dir, 3)
        assert "minidriver-guest: boot-count 2" in after  # the original root, once more
        assert "minidriver-guest: disk vdb 1073741824 ext4" in after  # its own disks again
        assert sorted(p.name for p in instance_dir.glob("*rescue*")) == []
    finally:
        driver.destroy(inst.uuid)
