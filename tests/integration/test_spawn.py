"""spawn() end to end: the test guest under QEMU, through the _base image cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from minidriver.driver import LibvirtDriver
from minidriver.guestimages.testimage import IMAGE_PROPERTIES as LINUX
from minidriver.images import qemu_img
from minidriver.objects import GiB, MiB

pytestmark = pytest.mark.integration


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def guest_lines(instance_dir: Path) -> list[str]:
    text = (instance_dir / "console.log").read_text(errors="replace")
    return [line for line in text.splitlines() if line.startswith("minidriver-guest:")]


def test_spawn_t1_nano_then_warm_spawn_then_destroy(
    driver: LibvirtDriver, test_image: Path, wait_console: Callable[..., Any]
) -> None:
    # An image of its own (a new id, so a new base): cold whatever ran before.
    test_image_id = driver.images.add(
        test_image, name="cold", disk_format="qcow2", properties=LINUX
    ).id
    conf = driver.conf
    base = conf.base_dir / sha1(test_image_id)
    first = driver.spawn(name="vm-cold", image=test_image_id, flavor="t1.nano")
    instance_dir = Path(first.instance_dir)
    assert first.name.startswith("instance-")
    assert driver.get_info(first.uuid).state == "running"
    wait_console(instance_dir / "console.log", r"^minidriver-guest: ready")
    lines = guest_lines(instance_dir)
    for expected in (
        "minidriver-guest: disk vda 1073741824 root",
        "minidriver-guest: disk vdb 1073741824 ext4",
        "minidriver-guest: disk vdc 67108864 swap",
        "minidriver-guest: boot-count 1",
    ):
        assert expected in lines, lines

    root = qemu_img.info(instance_dir / "disk", "qcow2")
    assert root.virtual_size == GiB
    assert root.backing_file == os.fspath(base)
    assert root.backing_format == "raw"
    assert qemu_img.info(base, "raw").format == "raw"
    local = qemu_img.info(instance_dir / "disk.local", "qcow2")
    assert local.backing_file is not None
    assert Path(local.backing_file).name.startswith("ephemeral_1_")
    swap = qemu_img.info(instance_dir / "disk.swap", "qcow2")
    assert swap.backing_file == os.fspath(conf.base_dir / "swap_64")
    assert swap.virtual_size == 64 * MiB
    disk_info = json.loads((instance_dir / "disk.info").read_text())
    assert disk_info == {
        os.fspath(instance_dir / n): "qcow2" for n in ("disk", "disk.local", "disk.swap")
    }
    assert (instance_dir / "libvirt.xml").is_file()
    assert first.cache_hit is False
    assert first.timings["fetch"] > 0
    assert first.timings["convert"] > 0

    base_inode = base.stat().st_ino
    second = driver.spawn(name="vm-warm", image=test_image_id, flavor="t1.nano")
    assert second.cache_hit is True
    assert second.timings["fetch"] == 0
    assert second.timings["convert"] == 0
    assert base.stat().st_ino == base_inode
    wait_console(Path(second.instance_dir) / "console.log", r"^minidriver-guest: ready")

    cached = sorted(p.name for p in conf.base_dir.iterdir())
    for inst in (first, second):
        driver.destroy(inst.uuid)
        assert not Path(inst.instance_dir).exists()
        assert driver.host.find_domain(inst.name) is None
    assert sorted(p.name for p in conf.base_dir.iterdir()) == cached
    assert base.stat().st_ino == base_inode
    assert driver.db.list_instances() == []
    assert list(conf.locks_dir.iterdir()) == []


def test_resized_base_copies_chain_boots(
    driver: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> None:
    conf = driver.conf.with_libvirt(resized_base_copies=True)
    old_chain = LibvirtDriver(conf, host=driver.host)
    inst = old_chain.spawn(name="vm-resized", image=test_image_id, flavor="t1.nano")
    try:
        resized = conf.base_dir / f"{sha1(test_image_id)}_1"
        assert qemu_img.info(resized, "raw").virtual_size == GiB
        root = qemu_img.info(Path(inst.instance_dir) / "disk", "qcow2")
        assert root.backing_file == os.fspath(resized)
        wait_console(Path(inst.instance_dir) / "console.log", r"^minidriver-guest: ready")
        assert "minidriver-guest: disk vda 1073741824 root" in guest_lines(Path(inst.instance_dir))
    finally:
        old_chain.destroy(inst.uuid)
    assert resized.exists()


@pytest.mark.parametrize("drive_format", ["iso9660", "vfat"])
def test_config_drive_reaches_the_guest(
    driver: LibvirtDriver,
    test_image_id: str,
    wait_console: Callable[..., Any],
    drive_format: str,
) -> None:
    conf = driver.conf
    conf = dataclasses.replace(
        conf, default=dataclasses.replace(conf.default, config_drive_format=drive_format)
    )
    drv = LibvirtDriver(conf, host=driver.host)
    inst = drv.spawn(
        name="probe",
        image=test_image_id,
        flavor="t1.nano",
        config_drive=True,
        hostname="probe-1",
        meta={"role": "test"},
    )
    try:
        wait_console(
            Path(inst.instance_dir) / "console.log",
            rf"^minidriver-guest: config-drive uuid={inst.uuid} hostname=probe-1",
        )
        if drive_format == "vfat":
            # a vfat drive is a virtio disk the guest names by its kind
            lines = guest_lines(Path(inst.instance_dir))
            assert "minidriver-guest: disk vdd 67108864 vfat" in lines, lines
    finally:
        drv.destroy(inst.uuid)


@pytest.mark.parametrize(
    ("force_raw_images", "preallocate_images"), [(True, "none"), (False, "space")]
)
def test_flat_disks_boot_with_ephemeral_and_swap_made_in_place(
    driver: LibvirtDriver,
    test_image_id: str,
    wait_console: Callable[..., Any],
    force_raw_images: bool,
    preallocate_images: str,
) -> None:
    """use_cow_images = false: Nova's Flat. The root a full copy (the qcow2 base as it
    is without force_raw_images), ephemeral and swap made in the instance dir."""
    conf = driver.conf
    conf = dataclasses.replace(
        conf,
        default=dataclasses.replace(
            conf.default,
            use_cow_images=False,
            force_raw_images=force_raw_images,
            preallocate_images=preallocate_images,
        ),
    )
    # An image of its own: its base in the format this case asks for.
    image_id = driver.images.add(
        driver.images.get(test_image_id).path, name="flat", disk_format="qcow2", properties=LINUX
    ).id
    drv = LibvirtDriver(conf, host=driver.host)
    bases_before = {p.name for p in conf.base_dir.glob("*")}
    inst = drv.spawn(name="vm-flat", image=image_id, flavor="t1.nano")
    try:
        instance_dir = Path(inst.instance_dir)
        # Generous: TCG on a machine shared by several test runs.
        wait_console(instance_dir / "console.log", r"^minidriver-guest: ready", timeout=300)
        lines = guest_lines(instance_dir)
        for expected in (
            "minidriver-guest: disk vda 1073741824 root",
            "minidriver-guest: disk vdb 1073741824 ext4",
            "minidriver-guest: disk vdc 67108864 swap",
        ):
            assert expected in lines, lines
        root_format = "raw" if force_raw_images else "qcow2"
        root = qemu_img.info(instance_dir / "disk", root_format)
        assert (root.format, root.backing_file, root.virtual_size) == (root_format, None, GiB)
        for name in ("disk.local", "disk.swap"):
            assert qemu_img.info(instance_dir / name, "raw").backing_file is None
        # Only the image's base is new in _base: no ephemeral_ or swap_ base.
        assert {p.name for p in conf.base_dir.glob("*")} - bases_before == {sha1(image_id)}
        if preallocate_images == "space":
            assert (instance_dir / "disk.local").stat().st_blocks * 512 >= GiB
        disk_info = json.loads((instance_dir / "disk.info").read_text())
        assert disk_info[os.fspath(instance_dir / "disk")] == root_format
    finally:
        drv.destroy(inst.uuid)
