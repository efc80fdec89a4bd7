"""Snapshots (nova image-create) of the running and the stopped test guest: a boot from
the snapshot continues the guest's boot counter."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from minidriver.driver import LibvirtDriver

pytestmark = pytest.mark.integration

READY = r"^minidriver-guest: ready"


def console_log(inst: Any) -> Path:
    return Path(inst.instance_dir) / "console.log"


@pytest.mark.parametrize("images_type", ["qcow2", "raw"])
@pytest.mark.parametrize("mode", ["live", "cold"])
def test_snapshot_boots_with_the_next_boot_count(
    driver: LibvirtDriver,
    test_image_id: str,
    wait_console: Callable[..., Any],
    images_type: str,
    mode: str,
) -> None:
    drv = LibvirtDriver(driver.conf.with_libvirt(images_type=images_type), host=driver.host)
    inst = drv.spawn(name=f"src-{mode}", image=test_image_id, flavor="t1.nano")
    made = []
    try:
        wait_console(console_log(inst), r"^minidriver-guest: boot-count 1")
        wait_console(console_log(inst), READY)
        if mode == "cold":
            drv.power_off(inst.uuid)
            assert drv.get_info(inst.uuid).state == "shutoff"
        image = drv.snapshot(inst.uuid, f"snap-{mode}-{images_type}")
        assert image.properties["instance_uuid"] == inst.uuid
        assert image.properties["base_image_ref"] == test_image_id
        assert image.disk_format == "qcow2"
        if mode == "live":
            # The guest ran on through the copy: still running, and it keeps counting.
            assert drv.get_info(inst.uuid).state == "running"
            drv.reboot(inst.uuid, hard=True)
            wait_console(console_log(inst), r"^minidriver-guest: boot-count 2")
        child = drv.spawn(name=f"child-{mode}", image=image.id, flavor="t1.nano")
        made.append(child.uuid)
        wait_console(console_log(child), r"^minidriver-guest: boot-count 2")
        wait_console(console_log(child), READY)
    finally:
        for uuid in [inst.uuid, *made]:
            drv.destroy(uuid)
    assert list((drv.conf.instances_path / "snapshots").iterdir()) == []


def test_live_snapshot_under_a_path_with_markup(
    driver: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> None:
    """instances_path is the user's to choose: its ``<``, ``&`` and quotes reach the
    block copy's XML as text, not markup."""
    conf = driver.conf
    odd = conf.state_path / "a<b&c'd\"e"
    odd.mkdir(mode=0o755)
    conf = dataclasses.replace(
        conf, default=dataclasses.replace(conf.default, instances_path=os.fspath(odd))
    )
    drv = LibvirtDriver(conf, host=driver.host)
    inst = drv.spawn(name="odd", image=test_image_id, flavor="t1.nano")
    made = []
    try:
        wait_console(console_log(inst), READY)
        image = drv.snapshot(inst.uuid, "snap-odd")
        assert drv.get_info(inst.uuid).state == "running"
        child = drv.spawn(name="odd-child", image=image.id, flavor="t1.nano")
        made.append(child.uuid)
        wait_console(console_log(child), r"^minidriver-guest: boot-count 2")
    finally:
        for uuid in [inst.uuid, *made]:
            drv.destroy(uuid)
    assert list((odd / "snapshots").iterdir()) == []
