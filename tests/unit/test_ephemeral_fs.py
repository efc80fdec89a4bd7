"""The ephemeral disk's filesystem and its _base name, as Nova picks them: by
``default_ephemeral_format``, else the image's ``os_type`` (linux: ext4), else vfat;
the name ``ephemeral_<GB>_<md5 of the filesystem, 7 hex>``."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from minidriver import imagebackend
from minidriver.config import Config
from minidriver.driver import LibvirtDriver
from minidriver.imagebackend import (
    create_ephemeral,
    ephemeral_filename,
    get_ephemeral_fs,
)


def nova_file_extension(fs_type: str) -> str:
    """What Nova's get_file_extension_for_os_type makes of a filesystem with no mkfs
    command configured: the first 7 hex digits of its name's md5."""
    return hashlib.md5(fs_type.encode("utf-8"), usedforsecurity=False).hexdigest()[:7]


@pytest.mark.parametrize(
    ("os_type", "default_format", "fs", "name"),
    [
        ("", "", "vfat", "ephemeral_1_0706d66"),
        ("linux", "", "ext4", "ephemeral_1_40d1d2c"),
        ("freebsd", "", "vfat", "ephemeral_1_0706d66"),
        ("windows", "", "ntfs", f"ephemeral_1_{nova_file_extension('ntfs')}"),
        ("", "ext3", "ext3", f"ephemeral_1_{nova_file_extension('ext3')}"),
        ("linux", "xfs", "xfs", f"ephemeral_1_{nova_file_extension('xfs')}"),
    ],
)
def test_the_filesystem_and_its_base_name(
    os_type: str, default_format: str, fs: str, name: str
) -> None:
    assert get_ephemeral_fs(os_type, default_format) == fs
    assert ephemeral_filename(1, fs) == name
    assert name == f"ephemeral_1_{nova_file_extension(fs)}"


def fs_magic(path: Path) -> str:
    """The filesystem on a raw file, by its magic bytes (as the test guest reads them)."""
    data = path.read_bytes()[:4096]
    if data[1080:1082] == b"\x53\xef":
        return "ext4"
    if data[82:87] == b"FAT32" or data[54:57] == b"FAT":
        return "vfat"
    return "unknown"


def fat_label(path: Path) -> str:
    data = path.read_bytes()[:512]
    return data[71:82].decode().strip() if data[82:87] == b"FAT32" else data[43:54].decode().strip()


@pytest.mark.parametrize("fs", ["vfat", "ext4"])
def test_mkfs_makes_that_filesystem_with_nova_s_options(fs: str, tmp_path: Path) -> None:
    target = tmp_path / ephemeral_filename(1, fs)
    assert create_ephemeral(target, 1, fs, imagebackend.EPHEMERAL_LABEL) == "raw"
    assert fs_magic(target) == fs
    assert target.stat().st_size == 1024**3
    if fs == "vfat":
        assert fat_label(target) == "ephemeral0"  # mkfs.fat's -n, not -L
    assert imagebackend.mkfs_cmd(fs, "x", target)[:3] == ["mkfs", "-t", fs]


@pytest.fixture
def image_with(drv: LibvirtDriver, empty_qcow2: Path) -> Callable[..., str]:
    def add(name: str, **properties: str) -> str:
        return drv.images.add(empty_qcow2, name=name, disk_format="qcow2", properties=properties).id

    return add


def test_an_image_without_os_type_gets_nova_s_vfat(
    drv: LibvirtDriver, image_with: Callable[..., str]
) -> None:
    inst = drv.spawn("no-os-type", image_with("plain"), "t1.nano")
    base = drv.conf.base_dir / "ephemeral_1_0706d66"
    assert fs_magic(base) == "vfat"
    assert drv.get_disks(inst.uuid)["disk.local"].backing_file == str(base)


def test_an_os_type_linux_image_gets_ext4(
    drv: LibvirtDriver, image_with: Callable[..., str]
) -> None:
    inst = drv.spawn("linux", image_with("linux", os_type="linux"), "t1.nano")
    base = drv.conf.base_dir / "ephemeral_1_40d1d2c"
    assert fs_magic(base) == "ext4"
    assert drv.get_disks(inst.uuid)["disk.local"].backing_file == str(base)
    # Both kinds stay in the cache side by side, never one in the other's place.
    drv.spawn("plain", image_with("plain"), "t1.nano")
    assert sorted(p.name for p in drv.conf.base_dir.glob("ephemeral_*")) == [
        "ephemeral_1_0706d66",
        "ephemeral_1_40d1d2c",
    ]


def test_default_ephemeral_format_wins_over_os_type(
    conf: Config, make_driver: Callable[[Config], LibvirtDriver], empty_qcow2: Path
) -> None:
    conf = dataclasses.replace(
        conf, default=dataclasses.replace(conf.default, default_ephemeral_format="ext4")
    )
    drv = make_driver(conf)
    image = drv.images.add(empty_qcow2, name="plain", disk_format="qcow2")
    drv.spawn("formatted", image.id, "t1.nano")
    base = drv.conf.base_dir / "ephemeral_1_40d1d2c"
    assert fs_magic(base) == "ext4"
