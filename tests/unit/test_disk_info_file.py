"""``disk.info`` on real files: written whole or not at all, read without a crash."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from conftest import tmpfs

from minidriver.disk_info_file import read_disk_info, write_disk_info
from minidriver.exception import MinidriverError


def test_written_once_as_json_path_to_format(tmp_path: Path) -> None:
    paths = {"disk": "rbd:vms/u_disk"}
    write_disk_info(tmp_path, {"disk": "raw", "disk.local": "qcow2"}, paths)

    recorded = json.loads((tmp_path / "disk.info").read_text())
    assert recorded == {"rbd:vms/u_disk": "raw", os.fspath(tmp_path / "disk.local"): "qcow2"}
    assert read_disk_info(tmp_path) == recorded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.info"]
    write_disk_info(tmp_path, {"disk": "raw", "disk.local": "qcow2"}, paths)  # the same
    with pytest.raises(MinidriverError, match="records"):
        write_disk_info(tmp_path, {"disk": "qcow2"})  # never silently changed


def test_a_full_disk_leaves_no_disk_info_at_all(tmp_path: Path) -> None:
    """Where the write fails half-way there is no disk.info, rather than a torn one
    that every later reader would have to survive."""
    with tmpfs(tmp_path / "small", 64 * 1024) as small:
        instance_dir = small / "instance"
        instance_dir.mkdir()
        fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError) as full:
                while True:
                    os.write(fd, bytes(4096))
            assert full.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        with pytest.raises(OSError) as err:
            write_disk_info(instance_dir, {"disk": "qcow2", "disk.local": "qcow2"})

        assert err.value.errno == errno.ENOSPC
        assert list(instance_dir.iterdir()) == []
        assert read_disk_info(instance_dir) is None


@pytest.mark.parametrize(
    "text", ['{"/i/disk": "qco', "", "not json", '["/i/disk"]', '{"/i/disk": 2}']
)
def test_one_that_cannot_be_read_is_none_not_a_crash(tmp_path: Path, text: str) -> None:
    (tmp_path / "disk.info").write_text(text)
    assert read_disk_info(tmp_path) is None


def test_none_when_there_is_none(tmp_path: Path) -> None:
    assert read_disk_info(tmp_path) is None
