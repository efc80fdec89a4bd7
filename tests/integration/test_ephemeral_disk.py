"""The ephemeral disk's filesystem as Nova picks it, seen from inside the test guest:
vfat without ``os_type``, ext4 with ``os_type=linux``, each on its own _base file."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from minidriver.driver import LibvirtDriver
from minidriver.images import qemu_img

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("properties", "base", "kind"),
    [
        ({}, "ephemeral_1_0706d66", "vfat"),
        ({"os_type": "linux"}, "ephemeral_1_40d1d2c", "ext4"),
    ],
    ids=["no-os-type", "os-type-linux"],
)
def test_the_guest_sees_the_filesystem_nova_would_make(
    driver: LibvirtDriver,
    test_image: Path,
    wait_console: Callable[..., Any],
    properties: dict[str, str],
    base: str,
    kind: str,
) -> None:
    image = driver.images.add(
        test_image,
        name=f"eph-{kind}-{uuid.uuid4().hex[:8]}",
        disk_format="qcow2",
        properties=properties,
    )
    inst = driver.spawn(name=f"eph-{kind}", image=image.id, flavor="t1.nano")
    try:
        instance_dir = Path(inst.instance_dir)
        local = qemu_img.info(instance_dir / "disk.local", "qcow2")
        assert local.backing_file == str(driver.conf.base_dir / base)
        wait_console(instance_dir / "console.log", r"^minidriver-guest: ready", timeout=300)
        console = (instance_dir / "console.log").read_text(errors="replace")
        assert f"minidriver-guest: disk vdb 1073741824 {kind}" in console.splitlines()
    finally:
        driver.destroy(inst.uuid)
        driver.images.delete(image.id)
