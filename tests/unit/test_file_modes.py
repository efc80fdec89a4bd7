"""What an instance exposes to other users of the host: nothing of its data.

The modes are read with ``os.stat``, as ``ls -l`` shows them to a user. The umask is
cleared for each test: a private file must be private because we made it so, not
because the umask happened to be strict.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from minidriver.driver import LibvirtDriver

GROUP_OTHER = 0o077
# A directory QEMU must enter under a daemon may be x for others, never r or w.
GROUP_OTHER_READ_WRITE = 0o066


@pytest.fixture(autouse=True)
def no_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def image_id(drv: LibvirtDriver, tmp_path: Path) -> str:
    source = tmp_path / "source.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", source, "64M"], check=True)
    return drv.images.add(source, name="src", disk_format="qcow2").id


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def exposed(paths: list[Path], bits: int) -> dict[str, str]:
    """Each path that others may read (or write), with its mode as ls shows it."""
    return {str(p): stat.filemode(os.stat(p).st_mode) for p in paths if mode(p) & bits}


def test_an_instance_its_cache_and_its_image_are_private(drv: LibvirtDriver, image_id: str) -> None:
    inst = drv.spawn(
        "secret", "src", "t1.nano", config_drive=True, user_data=b"#!/bin/sh\necho password\n"
    )
    instance_dir = Path(inst.instance_dir)
    files = sorted(instance_dir.iterdir())
    base_dir = drv.conf.base_dir
    store_file = drv.images.get(image_id).path

    assert {p.name for p in files} >= {"disk", "disk.config", "console.log", "disk.swap"}
    assert exposed(files, GROUP_OTHER) == {}
    assert exposed(sorted(base_dir.iterdir()), GROUP_OTHER) == {}
    assert exposed([store_file], GROUP_OTHER) == {}
    assert exposed([instance_dir, base_dir], GROUP_OTHER_READ_WRITE) == {}
    assert exposed([drv.conf.images_path], GROUP_OTHER) == {}
    # The daemon's QEMU (another user) must still reach the disks: by name, not listing.
    assert mode(instance_dir) & stat.S_IXOTH
    assert mode(base_dir) & stat.S_IXOTH


def test_a_snapshot_is_private_in_the_store(drv: LibvirtDriver, image_id: str) -> None:
    inst = drv.spawn("vm", "src", "t1.nano")
    drv.power_off(inst.uuid, force=True)
    snap = drv.snapshot(inst.uuid, "snap")
    assert exposed([snap.path], GROUP_OTHER) == {}
    assert list((drv.conf.instances_path / "snapshots").iterdir()) == []


@pytest.mark.parametrize("images_type", ["raw", "default"])
def test_flat_copies_and_resized_bases_are_private(
    drv: LibvirtDriver, image_id: str, images_type: str
) -> None:
    """The other ways a disk or a base is made: cp of the base (raw), and the seeds'
    resized base copy."""
    conf = drv.conf.with_libvirt(images_type=images_type, resized_base_copies=True)
    other = LibvirtDriver(conf, host=drv.host)
    try:
        inst = other.spawn("vm", "src", "t1.nano")
        files = sorted(Path(inst.instance_dir).iterdir())
        files += sorted(other.conf.base_dir.iterdir())
        assert exposed(files, GROUP_OTHER) == {}
    finally:
        other.db.close()
