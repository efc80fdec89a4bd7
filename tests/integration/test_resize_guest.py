"""Resize of the test guest under QEMU to a flavor of the test's own config: the guest
reports the new disk sizes; a revert brings back the old disks as they were; a
confirm removes them."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from boots import wait_ready

from minidriver import resize
from minidriver.config import Config, load_config
from minidriver.driver import LibvirtDriver
from minidriver.host import Host

pytestmark = pytest.mark.integration

FLAVOR = (
    "[flavor:t1.grown]\nvcpus = 1\nmemory_mb = 128\nroot_gb = 2\nephemeral_gb = 2\nswap = 128\n"
)
NANO_DISKS = [
    "minidriver-guest: disk vda 1073741824 root",
    "minidriver-guest: disk vdb 1073741824 ext4",
    "minidriver-guest: disk vdc 67108864 swap",
]
GROWN_DISKS = [
    "minidriver-guest: disk vda 2147483648 root",
    "minidriver-guest: disk vdb 2147483648 ext4",
    "minidriver-guest: disk vdc 134217728 swap",
]


@pytest.fixture
def grown(host_config: Config, libvirt_host: Host) -> Iterator[LibvirtDriver]:
    """The session's state dir and connection, with the test's flavor from its config."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minidriver.conf"
        path.write_text(FLAVOR)
        conf = load_config(path, state_dir=host_config.state_path, environ={}).with_libvirt(
            connection_uri=host_config.libvirt.connection_uri
        )
        drv = LibvirtDriver(conf, host=libvirt_host)
        yield drv
        drv.db.close()


def disks(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("minidriver-guest: disk ")]


def test_resize_revert_and_confirm(
    grown: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> None:
    inst = grown.spawn(name="resized", image=test_image_id, flavor="t1.nano")
    instance_dir = Path(inst.instance_dir)
    old_dir = Path(f"{instance_dir}_resize")
    try:
        first = wait_ready(wait_console, instance_dir, 1)
        assert disks(first) == NANO_DISKS
        assert "minidriver-guest: boot-count 1" in first

        resize.resize(grown, inst.uuid, "t1.grown")
        assert grown.db.get_instance(inst.uuid).vm_state == "resized"
        resized = wait_ready(wait_console, instance_dir, 2)
        assert disks(resized) == GROWN_DISKS
        assert "minidriver-guest: boot-count 2" in resized

        resize.revert_resize(grown, inst.uuid)
        record = grown.db.get_instance(inst.uuid)
        assert (record.vm_state, record.flavor) == ("active", "t1.nano")
        assert not old_dir.exists()
        reverted = wait_ready(wait_console, instance_dir, 2)  # the old dir's log: 1 before
        assert disks(reverted) == NANO_DISKS
        assert "minidriver-guest: boot-count 2" in reverted  # as before the resize, plus one

        resize.resize(grown, inst.uuid, "t1.grown")
        wait_ready(wait_console, instance_dir, 3)
        assert old_dir.is_dir()
        resize.confirm_resize(grown, inst.uuid)
        record = grown.db.get_instance(inst.uuid)
        assert (record.vm_state, record.flavor) == ("active", "t1.grown")
        assert not old_dir.exists()
        assert grown.get_info(inst.uuid).state == "running"
    finally:
        grown.destroy(inst.uuid)
    assert not old_dir.exists() and not instance_dir.exists()
