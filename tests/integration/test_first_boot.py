"""First real boot: the test guest under QEMU (TCG here), through a qcow2 overlay.

The guest's console lines are a contract (minidriver/guestimages/data/testimage-init.sh); this
test checks each of them against what the domain really gave it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from minidriver import guest
from minidriver.host import Host
from minidriver.images import qemu_img
from minidriver.objects import DeviceType, Flavor, MiB
from minidriver.process import run

pytestmark = pytest.mark.integration

GUEST_ROOT_SIZE = 1024 * MiB


def _scratch_disks(instance_dir: Path, image: Path) -> list[tuple[str, str, int, str]]:
    """Make one disk of every kind the guest tells apart: (file, format, size, kind)."""
    disks = [("disk", "qcow2", GUEST_ROOT_SIZE, "root")]
    qemu_img.create_cow_image(image, "qcow2", instance_dir / "disk", GUEST_ROOT_SIZE)
    ext4 = instance_dir / "disk.ext4"
    qemu_img.create(ext4, "raw", 48 * MiB)
    run(["mkfs.ext4", "-q", "-F", ext4])
    disks.append((ext4.name, "raw", 48 * MiB, "ext4"))
    swap = instance_dir / "disk.swap"
    qemu_img.create(swap, "raw", 32 * MiB)
    run(["mkswap", swap])
    disks.append((swap.name, "raw", 32 * MiB, "swap"))
    vfat = instance_dir / "disk.vfat"
    qemu_img.create(vfat, "raw", 24 * MiB)
    run(["mkfs.vfat", vfat])
    disks.append((vfat.name, "raw", 24 * MiB, "vfat"))
    blank = instance_dir / "disk.blank"
    qemu_img.create(blank, "qcow2", 16 * MiB)
    disks.append((blank.name, "qcow2", 16 * MiB, "blank"))
    return disks


def _config_drive(instance_dir: Path, instance_uuid: str) -> Path:
    tree = instance_dir / "cd"
    latest = tree / "openstack" / "latest"
    latest.mkdir(parents=True)
    meta = {"uuid": instance_uuid, "hostname": "probe-1", "name": "first-boot"}
    (latest / "meta_data.json").write_text(json.dumps(meta))
    iso = instance_dir / "disk.config"
    run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "config-2", "-R", "-J", "-o", iso, tree])
    return iso


def _qemu_processes_of(domain_uuid: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if domain_uuid.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def _wait_state(dom: Any, state: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while dom.state()[0] != state:
        if time.monotonic() > deadline:
            pytest.fail(f"domain state {dom.state()} did not become {state} in {timeout} s")
        time.sleep(0.2)


def test_first_boot(
    test_image: Path,
    libvirt_host: Host,
    session_id: str,
    wait_console: Callable[..., Any],
) -> None:
    image_mtime = os.stat(test_image).st_mtime_ns
    instance_uuid = str(uuid.uuid4())
    instance_dir = libvirt_host.conf.instances_path / instance_uuid
    instance_dir.mkdir(parents=True)
    instance_dir.chmod(0o755)
    disks = _scratch_disks(instance_dir, test_image)
    _config_drive(instance_dir, instance_uuid)

    letters = iter("abcdefgh")
    guest_disks = [
        guest.GuestDisk(
            source_path=os.fspath(instance_dir / name),
            driver_type=fmt,
            device=DeviceType.DISK,
            target_dev="vd" + next(letters),
            target_bus="virtio",
            cache="writeback",
        )
        for name, fmt, _size, _kind in disks
    ]
    guest_disks.append(
        guest.GuestDisk(
            source_path=os.fspath(instance_dir / "disk.config"),
            driver_type="raw",
            device=DeviceType.CDROM,
            target_dev="hdd",
            target_bus="ide",
            cache="writeback",
            readonly=True,
        )
    )
    flavor = Flavor("first-boot", vcpus=1, memory_mb=128, root_gb=1)
    config = guest.GuestConfig(
        virt_type=libvirt_host.virt_type.virt_type,
        name=f"mdtest-{instance_uuid[:8]}",
        uuid=instance_uuid,
        memory_kib=flavor.memory_mb * 1024,
        vcpus=1,
        arch="x86_64",
        machine_type="pc",
        cpu_mode=None,
        disks=tuple(guest_disks),
        console_log=os.fspath(instance_dir / "console.log"),
        metadata=guest.GuestMetadata(
            display_name="first boot",
            instance_uuid=instance_uuid,
            state_id=session_id,
            created_at="",
            flavor=flavor,
            image_id="test-image",
        ),
    )
    dom = libvirt_host.define(guest.to_xml(config))
    try:
        libvirt_host.launch(dom)
        log = instance_dir / "console.log"
        wait_console(log, r"^minidriver-guest: ready", timeout=120)
        text = log.read_text(errors="replace")
        assert "minidriver-guest: up" in text
        for (_name, _fmt, size, kind), gd in zip(disks, guest_disks, strict=False):
            assert f"minidriver-guest: disk {gd.target_dev} {size} {kind}" in text, text
        assert "minidriver-guest: boot-count 1\n" in text.replace("\r", "")
        assert f"minidriver-guest: config-drive uuid={instance_uuid} hostname=probe-1" in text

        # The ACPI power button powers the guest off by itself; the next boot counts 2.
        dom.shutdown()
        _wait_state(dom, libvirt.VIR_DOMAIN_SHUTOFF, timeout=60)
        libvirt_host.launch(dom)
        wait_console(log, r"^minidriver-guest: boot-count 2", timeout=120)
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    names = [d.name() for d in libvirt_host.get_connection().listAllDomains()]
    assert config.name not in names
    assert _qemu_processes_of(instance_uuid) == []
    assert os.stat(test_image).st_mtime_ns == image_mtime, "the cached image was written"
