"""A warm spawn's disk work: the cached base re-checked once, its verdict remembered,
the three disks made side by side.

A base that passed its re-check is not inspected again while it is the same file
(``fetch.TrustedBases``); ``qemu-img info`` still reads it on every use; any change
to it, even with its mtime put back, has it inspected again. The root, ephemeral and
swap disks are made at once, each under its base's lock; a failure of one leaves
nothing of the instance once all have ended.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pytest_mock import MockerFixture

from minidriver import imagebackend, process
from minidriver.config import Config, load_config
from minidriver.driver import LibvirtDriver, SpawnError
from minidriver.images import inspect

MiB = 1024 * 1024


@pytest.fixture
def drv(
    tmp_path: Path, node_file: Path, make_driver: Callable[[Config], LibvirtDriver]
) -> LibvirtDriver:
    state = tmp_path / "state"
    state.mkdir()
    config_file = state / "minidriver.conf"
    config_file.write_text("")
    conf = load_config(config_file, state_dir=state, environ={}).with_libvirt(
        connection_uri=f"test://{node_file}", virt_type="qemu"
    )
    return make_driver(conf)


def qemu_img(*args: str | os.PathLike[str]) -> None:
    subprocess.run(["qemu-img", *[os.fspath(a) for a in args]], check=True, capture_output=True)


def data_qcow2(tmp: Path) -> Path:
    """A qcow2 of 64 MiB with 4 MiB of data at 1 MiB."""
    raw = tmp / "data.raw"
    with open(raw, "wb") as fh:
        fh.seek(MiB)
        fh.write(b"\xab" * (4 * MiB))
        fh.truncate(64 * MiB)
    path = tmp / "data.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
    return path


def base_of(drv: LibvirtDriver, image_id: str) -> Path:
    return drv.conf.base_dir / hashlib.sha1(image_id.encode()).hexdigest()


def checked_base(drv: LibvirtDriver, tmp_path: Path) -> Path:
    """The base of image ``data``, fetched and checked by one spawn, then re-checked
    by a second, which kept the verdict."""
    image = drv.images.add(data_qcow2(tmp_path), name="data", disk_format="qcow2")
    drv.spawn("cold", "data", "m1.tiny")
    drv.spawn("warm", "data", "m1.tiny")
    return base_of(drv, image.id)


def qemu_img_subcommands(spy: object) -> list[str]:
    return [os.fspath(call.args[0][1]) for call in spy.call_args_list]  # type: ignore[attr-defined]


def test_a_base_that_passed_its_recheck_is_not_inspected_again_until_it_changes(
    drv: LibvirtDriver, tmp_path: Path, mocker: MockerFixture
) -> None:
    base = checked_base(drv, tmp_path)
    head_check = mocker.patch.object(inspect, "check_image_head", wraps=inspect.check_image_head)
    spy = mocker.patch("minidriver.images.qemu_img.run", wraps=process.run)

    trusted = drv.spawn("trusted", "data", "m1.tiny")

    assert trusted.cache_hit is True
    assert head_check.call_count == 0
    # qemu-img info of the base still runs, once, guarded; then the overlay.
    assert qemu_img_subcommands(spy) == ["info", "create"]
    assert spy.call_args_list[0].kwargs["limits"] is not None
    assert os.fspath(base) in spy.call_args_list[0].args[0]

    # A qcow2 header naming /etc/shadow written over the raw base, its mtime put back
    # as it was: the ctime still tells.
    shadow = tmp_path / "shadow.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", "-u", shadow, "16M")
    before = base.stat()
    with open(base, "r+b") as fh:
        fh.write(shadow.read_bytes()[:512])
    os.utime(base, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert base.stat().st_mtime_ns == before.st_mtime_ns

    with pytest.raises(SpawnError, match=f"cached base {base} failed its re-check"):
        drv.spawn("tampered", "data", "m1.tiny")
    assert head_check.call_count == 1
    # The verdict on the old file is gone: the next spawn inspects it again too.
    with pytest.raises(SpawnError, match="failed its re-check"):
        drv.spawn("tampered-again", "data", "m1.tiny")
    assert head_check.call_count == 2
    assert [i.display_name for i in drv.db.list_instances()] == ["cold", "warm", "trusted"]


def test_the_same_bytes_written_again_are_inspected_again(
    drv: LibvirtDriver, tmp_path: Path, mocker: MockerFixture
) -> None:
    base = checked_base(drv, tmp_path)
    content = base.read_bytes()
    with open(base, "r+b") as fh:  # a write that changes nothing but the file's times
        head = fh.read(512)
        fh.seek(0)
        fh.write(head)
    assert base.read_bytes() == content
    head_check = mocker.patch.object(inspect, "check_image_head", wraps=inspect.check_image_head)

    drv.spawn("rewritten", "data", "m1.tiny")
    drv.spawn("trusted", "data", "m1.tiny")

    assert head_check.call_count == 1  # inspected once, then trusted again


def test_a_verdict_is_for_the_format_it_was_checked_as(
    drv: LibvirtDriver, tmp_path: Path, mocker: MockerFixture
) -> None:
    """A record is no verdict on the base read as another format (a changed record)."""
    record = drv.conf.trusted_bases_path / checked_base(drv, tmp_path).name
    assert record.stat().st_mode & 0o777 == 0o600
    record.write_text(record.read_text().replace('"checked_as": "raw"', '"checked_as": "iso"'))
    head_check = mocker.patch.object(inspect, "check_image_head", wraps=inspect.check_image_head)

    drv.spawn("again", "data", "m1.tiny")

    assert head_check.call_count == 1


def test_ephemeral_and_swap_bases_are_sized_without_qemu_img(
    drv: LibvirtDriver, mocker: MockerFixture, tmp_path: Path
) -> None:
    """Raw bases minidriver made itself: their size is their file's, as qemu-img says."""
    drv.images.add(data_qcow2(tmp_path), name="data", disk_format="qcow2")
    drv.spawn("cold", "data", "t1.nano")
    drv.spawn("warm", "data", "t1.nano")
    spy = mocker.patch("minidriver.images.qemu_img.run", wraps=process.run)

    inst = drv.spawn("third", "data", "t1.nano")

    # One info (the root's base), three overlays: no info of disk.local's or disk.swap's.
    assert qemu_img_subcommands(spy) == ["info", "create", "create", "create"]
    disks = drv.get_disks(inst.uuid)
    for name, size in (("disk.local", inst.flavor.ephemeral_gb * 1024**3), ("disk.swap", 64 * MiB)):
        backing = disks[name].backing_file
        assert backing is not None
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", "raw", backing],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert disks[name].backing_virtual_size == json.loads(info)["virtual-size"] == size


def test_the_three_disks_are_made_at_once(
    drv: LibvirtDriver, tmp_path: Path, mocker: MockerFixture
) -> None:
    drv.images.add(data_qcow2(tmp_path), name="data", disk_format="qcow2")
    drv.spawn("cold", "data", "t1.nano")
    # Each overlay's qemu-img waits until all three have started: one after another,
    # the first would wait in vain and the barrier break.
    barrier = threading.Barrier(3, timeout=10)

    def run(cmd: list[str], *args: Any, **kwargs: Any) -> process.Completed:
        if cmd[1] == "create":
            barrier.wait()
        return process.run(cmd, *args, **kwargs)

    mocker.patch("minidriver.images.qemu_img.run", side_effect=run)

    inst = drv.spawn("warm", "data", "t1.nano")

    assert not barrier.broken
    assert sorted(drv.get_disks(inst.uuid)) == ["disk", "disk.local", "disk.swap"]
    assert inst.timings["ephemeral"] > 0 and inst.timings["swap"] > 0


def test_a_disk_that_fails_beside_the_others_leaves_nothing_of_the_instance(
    drv: LibvirtDriver, tmp_path: Path, mocker: MockerFixture
) -> None:
    drv.images.add(data_qcow2(tmp_path), name="data", disk_format="qcow2")
    real = imagebackend.mkswap_cmd
    mocker.patch.object(imagebackend, "mkswap_cmd", lambda target: ["false", *real(target)[1:]])

    with pytest.raises(SpawnError, match="create_image") as err:
        drv.spawn("broken", "data", "t1.nano")

    assert "false" in str(err.value.cause)
    assert drv.db.list_instances() == []
    assert sorted(p.name for p in drv.conf.instances_path.iterdir()) == ["_base", "locks"]
    # The root and ephemeral bases made beside it stay cached; no half-made swap base.
    assert sorted(p.name for p in drv.conf.base_dir.iterdir()) == sorted(
        [base_of(drv, drv.images.get("data").id).name, imagebackend.ephemeral_filename(1, "vfat")]
    )
    assert list(drv.conf.locks_dir.iterdir()) == []
