"""A full ``_base`` while a spawn fetches or converts its image.

``_base`` is a real, small filesystem (a size-limited tmpfs under /var/tmp; the test
runs as root), filled at the worst moment by another writer, as a second spawn or a
download would. Each time the spawn fails with one clear error, leaves no ``.part``,
``.converted`` or half-written base, and the next spawn, once space is freed,
succeeds. Nothing is mocked but the moment the filler is written: qemu-img really
runs out of space.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_DRIVER_NODE, tmpfs
from pytest_mock import MockerFixture

from minidriver import process
from minidriver.config import Config, load_config
from minidriver.driver import LibvirtDriver, SpawnError, base_filename
from minidriver.images import fetch, qemu_img
from minidriver.objects import Instance

MiB = 1024**2
BASE_FS_SIZE = 48 * MiB
VIRTUAL = 16 * MiB
DATA = 12 * MiB  # random, so neither the qcow2 nor the raw base compresses or is sparse


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 of 16 MiB virtual holding 12 MiB of random data."""
    tmp = tmp_path_factory.mktemp("source")
    raw = tmp / "source.raw"
    with open(raw, "wb") as fh:
        fh.write(os.urandom(DATA))
        fh.truncate(VIRTUAL)
    path = tmp / "source.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path],
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture
def drv(tmp_path: Path) -> Iterator[LibvirtDriver]:
    """A driver on libvirt's test driver whose ``_base`` is a 48 MiB tmpfs."""
    node = tmp_path / "testdriver.xml"
    node.write_text(TEST_DRIVER_NODE)
    state = Path(tempfile.mkdtemp(prefix="mdfaults-", dir="/var/tmp"))
    try:
        conf: Config = load_config(None, state_dir=state, environ={}).with_libvirt(
            connection_uri=f"test://{node}", virt_type="qemu"
        )
        with tmpfs(conf.base_dir, BASE_FS_SIZE):
            driver = LibvirtDriver(conf)
            try:
                yield driver
            finally:
                driver.host.close()
                driver.db.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def image_id(drv: LibvirtDriver, source: Path) -> str:
    return drv.images.add(source, name="data", disk_format="qcow2").id


def fill(directory: Path, leave: int) -> Path:
    """Another writer takes all of ``directory``'s free space but ``leave`` bytes."""
    filler = directory / "filler"
    size = fetch.free_bytes(directory) - leave
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return filler


def base_dir_files(drv: LibvirtDriver) -> list[str]:
    return sorted(p.name for p in drv.conf.base_dir.iterdir())


def assert_left_nothing(drv: LibvirtDriver, err: SpawnError) -> None:
    assert err.step == "create_image"
    # Only the other writer's file: no .part, no .converted, no base.
    assert base_dir_files(drv) == ["filler"]
    assert [
        p.name for p in drv.conf.instances_path.iterdir() if p.name not in ("_base", "locks")
    ] == []
    assert list(drv.conf.locks_dir.iterdir()) == []
    assert drv.db.list_instances() == []
    assert drv.host.get_connection().listAllDomains() == []


def assert_spawned_after_freeing(drv: LibvirtDriver, filler: Path, image_id: str) -> Instance:
    filler.unlink()
    inst = drv.spawn("again", "data", "m1.tiny")
    assert inst.cache_hit is False
    assert drv.get_info(inst.uuid).state == "running"
    base = drv.conf.base_dir / base_filename(image_id)
    assert base_dir_files(drv) == [base.name]
    info = qemu_img.info(base, "raw")
    assert info.virtual_size == VIRTUAL
    return inst


def test_disk_fills_during_conversion(
    drv: LibvirtDriver, image_id: str, mocker: MockerFixture
) -> None:
    real_convert = qemu_img.convert
    fillers: list[Path] = []

    def convert_while_another_writer_fills(*args: Any, **kwargs: Any) -> list[str]:
        # The checks before the conversion passed; then the space went elsewhere.
        fillers.append(fill(drv.conf.base_dir, leave=2 * MiB))
        return real_convert(*args, **kwargs)

    convert = mocker.patch.object(
        qemu_img, "convert", side_effect=convert_while_another_writer_fills
    )

    with pytest.raises(SpawnError) as err:
        drv.spawn("victim", "data", "m1.tiny")

    assert convert.call_count == 1
    cause = err.value.cause
    assert isinstance(cause, fetch.InsufficientSpace)
    assert str(cause).startswith(
        f"converting image data ({image_id}) to raw ran out of space in {drv.conf.base_dir}"
    )
    # qemu-img really ran out: its own words are kept underneath.
    assert isinstance(cause.__cause__, qemu_img.QemuImgError)
    assert "No space left on device" in cause.__cause__.stderr
    assert err.value.hint is not None
    assert_left_nothing(drv, err.value)

    mocker.stopall()
    assert_spawned_after_freeing(drv, fillers[0], image_id)


def test_disk_fills_during_download(drv: LibvirtDriver, image_id: str) -> None:
    fillers: list[Path] = []

    def progress(done: int, total: int) -> None:
        if not fillers:  # after the first MiB is written
            fillers.append(fill(drv.conf.base_dir, leave=256 * 1024))

    with pytest.raises(SpawnError) as err:
        drv.spawn("victim", "data", "m1.tiny", progress=progress)

    cause = err.value.cause
    assert isinstance(cause, fetch.InsufficientSpace)
    assert str(cause).startswith(
        f"fetching image data ({image_id}) ran out of space in {drv.conf.base_dir}"
    )
    assert isinstance(cause.__cause__, OSError)
    assert_left_nothing(drv, err.value)

    assert_spawned_after_freeing(drv, fillers[0], image_id)


def test_too_little_space_is_refused_before_writing(
    drv: LibvirtDriver, image_id: str, source: Path, mocker: MockerFixture
) -> None:
    filler = fill(drv.conf.base_dir, leave=8 * MiB)
    available = fetch.free_bytes(drv.conf.base_dir)
    spy = mocker.patch("minidriver.images.qemu_img.run", wraps=process.run)

    with pytest.raises(SpawnError) as err:
        drv.spawn("victim", "data", "m1.tiny")

    needed = source.stat().st_size + VIRTUAL  # the download and the raw it becomes
    assert str(err.value.cause) == (
        f"fetching image data ({image_id}) needs {needed} bytes free in"
        f" {drv.conf.base_dir}, {available} available"
    )
    assert spy.call_count == 0
    assert_left_nothing(drv, err.value)

    mocker.stopall()
    assert_spawned_after_freeing(drv, filler, image_id)
