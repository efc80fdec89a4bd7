"""fetch_to_raw of a big image in the file store: converted from the store's file, no copy.

The store's file goes straight to ``<base>.converted`` while a thread hashes it; the
base is published only when both the conversion and the hash passed. Every check of
the copying path still holds first (size, format inspector, guarded ``qemu-img
info``, ceiling, free space), and a wrong hash, a full disk or an interrupt leaves no
``.converted`` and no base. Real files, real qemu-img, a real store and SQLite; a
spy wraps (never replaces) the ``run`` that ``minidriver.images.qemu_img`` calls.
Small files and data read through ``open_data`` (rbd) keep the checked copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import tmpfs
from pytest_mock import MockerFixture

from minidriver import process
from minidriver.config import Config
from minidriver.db import Database, utc_now
from minidriver.driver import LibvirtDriver, SpawnError, base_filename
from minidriver.exception import ImageUnacceptable
from minidriver.images import fetch, qemu_img
from minidriver.images.store import Image, ImageService, ImageStatus, Location
from minidriver.steps import Step, StepTimer

MiB = 1024**2
VIRTUAL = 24 * MiB
DATA = 8 * MiB


def make_qcow2(path: Path, data: int = DATA, virtual: int = VIRTUAL) -> Path:
    """A qcow2 holding ``data`` bytes of random data (neither compressed nor sparse)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as fh:
        fh.write(os.urandom(data))
        fh.truncate(virtual)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path],
        check=True,
        capture_output=True,
    )
    raw.unlink()
    return path


def same_disk(qcow2: Path, raw: Path) -> bool:
    """qemu-img compare, straight from subprocess: the module under test is not used."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", qcow2, raw], check=False
    )
    return proc.returncode == 0


@dataclasses.dataclass(frozen=True)
class Spy:
    run: Any
    convert: Any
    download: Any

    @property
    def subcommands(self) -> list[str]:
        return [os.fspath(call.args[0][1]) for call in self.run.call_args_list]

    def convert_source(self) -> Path:
        [call] = self.convert.call_args_list
        return Path(call.args[0])


@pytest.fixture
def spy(mocker: MockerFixture) -> Spy:
    return Spy(
        mocker.patch("minidriver.images.qemu_img.run", wraps=process.run),
        mocker.patch.object(qemu_img, "convert", wraps=qemu_img.convert),
        mocker.patch.object(fetch, "download", wraps=fetch.download),
    )


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ImageService]:
    with Database(tmp_path / "store" / "minidriver.db") as db:
        yield ImageService(db, tmp_path / "store" / "images")


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    path = tmp_path / "_base"
    path.mkdir()
    return path


@pytest.fixture
def image(service: ImageService, tmp_path: Path) -> Image:
    return service.add(make_qcow2(tmp_path / "data.qcow2"), name="data", disk_format="qcow2")


def hash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hash ")]


def flip_last_byte(path: Path) -> None:
    """One bit of the last data cluster: the size stays, qemu-img still reads it."""
    with open(path, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)[0]
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last ^ 1]))


def test_a_big_store_file_is_converted_straight_into_the_base(
    image: Image, base_dir: Path, spy: Spy
) -> None:
    timer = StepTimer()
    seen: list[tuple[int, int]] = []

    made = fetch.fetch_to_raw(
        image,
        base_dir / "b",
        force_raw=True,
        timer=timer,
        copy_below=0,
        progress=lambda done, total: seen.append((done, total)),
    )

    assert made == "raw"
    assert spy.download.call_count == 0  # no .part: nothing was copied
    assert spy.convert_source() == image.path  # read in the store
    assert spy.subcommands == ["info", "convert"]  # the guarded info first, as ever
    assert same_disk(image.path, base_dir / "b")
    assert sorted(p.name for p in base_dir.iterdir()) == ["b"]
    assert timer.seconds[Step.FETCH] > 0
    assert timer.seconds[Step.CONVERT] > 0
    assert seen[-1] == (image.size, image.size)  # the hash read it all
    assert hash_threads() == []


def test_the_threshold_keeps_the_checked_copy_for_small_files(
    image: Image, base_dir: Path, spy: Spy
) -> None:
    assert image.size < fetch.COPY_BELOW
    fetch.fetch_to_raw(image, base_dir / "b", force_raw=True, timer=StepTimer())
    assert spy.download.call_count == 1
    assert spy.convert_source() == base_dir / "b.part"
    assert same_disk(image.path, base_dir / "b")
    assert sorted(p.name for p in base_dir.iterdir()) == ["b"]


def test_data_outside_the_file_store_is_copied_whatever_its_size(image: Image) -> None:
    rbd: Location = {"url": "rbd://fsid/images/x/snap", "metadata": {}}
    in_rbd = dataclasses.replace(image, locations=(rbd,))
    assert fetch.store_file(in_rbd) is None
    assert fetch.store_file(dataclasses.replace(image, locations=())) is None
    assert fetch.store_file(image) == image.path


def test_a_changed_store_file_is_converted_but_never_published(
    image: Image, base_dir: Path, spy: Spy
) -> None:
    flip_last_byte(image.path)
    with pytest.raises(ImageUnacceptable, match="sha512 of the data read does not match") as err:
        fetch.fetch_to_raw(image, base_dir / "b", force_raw=True, timer=StepTimer(), copy_below=0)
    assert err.value.hint is not None
    assert spy.subcommands == ["info", "convert"]  # the hash ran beside the conversion
    assert list(base_dir.iterdir()) == []  # its .converted removed, no base
    assert hash_threads() == []


def test_a_store_file_of_the_wrong_size_never_reaches_qemu_img(
    image: Image, base_dir: Path, spy: Spy
) -> None:
    os.truncate(image.path, image.size - 512)
    with pytest.raises(ImageUnacceptable, match=f"store's file is {image.size - 512} bytes"):
        fetch.fetch_to_raw(image, base_dir / "b", force_raw=True, timer=StepTimer(), copy_below=0)
    assert spy.subcommands == []
    assert list(base_dir.iterdir()) == []
    assert hash_threads() == []


def forge(service: ImageService, path: Path, disk_format: str) -> Image:
    """``path`` in the store as an active image no check has seen (right size and
    hash, no virtual size), as one from before the checks would be."""
    image_id = str(uuid.uuid4())
    stored = service.images_path / image_id
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_bytes(path.read_bytes())
    data = stored.read_bytes()
    now = utc_now()
    with service.db.transaction() as conn:
        conn.execute(
            "INSERT INTO images (id, name, disk_format, container_format, size, min_disk,"
            " min_ram, checksum, os_hash_algo, os_hash_value, status, created_at, updated_at,"
            " properties, locations) VALUES (?, 'forged', ?, 'bare', ?, 0, 0, ?, 'sha512', ?,"
            " ?, ?, ?, '{}', ?)",
            (
                image_id,
                disk_format,
                len(data),
                hashlib.md5(data, usedforsecurity=False).hexdigest(),
                hashlib.sha512(data).hexdigest(),
                ImageStatus.ACTIVE,
                now,
                now,
                f'[{{"url": "{stored.as_uri()}", "metadata": {{}}}}]',
            ),
        )
    return service.get(image_id)


def test_a_hostile_store_file_is_refused_before_qemu_img_converts_it(
    service: ImageService, tmp_path: Path, base_dir: Path, spy: Spy
) -> None:
    hostile = tmp_path / "shadow.qcow2"
    # -u: qemu-img does not open the backing file to make the overlay.
    backing = ["-F", "raw", "-b", "/etc/shadow", "-u"]
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *backing, hostile, "16M"],
        check=True,
        capture_output=True,
    )
    image = forge(service, hostile, "qcow2")
    with pytest.raises(ImageUnacceptable, match="backing file"):
        fetch.fetch_to_raw(image, base_dir / "b", force_raw=True, timer=StepTimer(), copy_below=0)
    assert spy.subcommands == []  # the inspector refused it: qemu-img never saw it
    assert list(base_dir.iterdir()) == []
    assert hash_threads() == []


def test_a_declared_format_that_is_not_the_content_is_refused(
    service: ImageService, tmp_path: Path, base_dir: Path, spy: Spy
) -> None:
    image = forge(service, make_qcow2(tmp_path / "q.qcow2"), "vmdk")
    with pytest.raises(ImageUnacceptable, match="declared vmdk, detected qcow2"):
        fetch.fetch_to_raw(image, base_dir / "b", force_raw=True, timer=StepTimer(), copy_below=0)
    assert spy.subcommands == []
    assert list(base_dir.iterdir()) == []


def test_the_ceiling_refuses_before_the_conversion(image: Image, base_dir: Path, spy: Spy) -> None:
    unknown = dataclasses.replace(image, virtual_size=None)  # qemu-img info has to tell
    with pytest.raises(ImageUnacceptable, match="over images_max_virtual_size"):
        fetch.fetch_to_raw(
            unknown,
            base_dir / "b",
            force_raw=True,
            timer=StepTimer(),
            copy_below=0,
            max_virtual_size=VIRTUAL - 1,
        )
    assert spy.subcommands == ["info"]
    [call] = spy.run.call_args_list
    assert call.kwargs["limits"] is not None
    assert list(base_dir.iterdir()) == []


def test_a_full_base_during_the_conversion_leaves_nothing(
    image: Image, tmp_path: Path, mocker: MockerFixture
) -> None:
    real_convert = qemu_img.convert
    base_dir = tmp_path / "small"

    def convert_while_another_writer_fills(*args: Any, **kwargs: Any) -> list[str]:
        filler = base_dir / "filler"
        with open(filler, "wb") as fh:
            os.posix_fallocate(fh.fileno(), 0, fetch.free_bytes(base_dir) - MiB)
        return real_convert(*args, **kwargs)

    with tmpfs(base_dir, 2 * VIRTUAL):
        mocker.patch.object(qemu_img, "convert", side_effect=convert_while_another_writer_fills)
        with pytest.raises(fetch.InsufficientSpace, match="to raw ran out of space") as err:
            fetch.fetch_to_raw(
                image, base_dir / "b", force_raw=True, timer=StepTimer(), copy_below=0
            )
        assert isinstance(err.value.__cause__, qemu_img.QemuImgError)
        assert sorted(p.name for p in base_dir.iterdir()) == ["filler"]
        assert hash_threads() == []

        (base_dir / "filler").unlink()
        mocker.stopall()
        fetch.fetch_to_raw(image, base_dir / "b", force_raw=True, timer=StepTimer(), copy_below=0)
        assert same_disk(image.path, base_dir / "b")


def test_an_interrupt_during_the_conversion_stops_the_hash_and_leaves_nothing(
    image: Image, base_dir: Path, mocker: MockerFixture
) -> None:
    def interrupted(source: Path, source_fmt: str, dest: Path, dest_fmt: str) -> list[str]:
        dest.write_bytes(b"\0" * MiB)  # half a conversion
        raise KeyboardInterrupt

    mocker.patch.object(qemu_img, "convert", side_effect=interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch_to_raw(image, base_dir / "b", force_raw=True, timer=StepTimer(), copy_below=0)
    assert list(base_dir.iterdir()) == []
    assert hash_threads() == []


def test_spawn_of_an_image_over_the_threshold_takes_no_copy(
    conf: Config, make_driver: Any, tmp_path: Path, spy: Spy
) -> None:
    drv: LibvirtDriver = make_driver(conf)
    big = make_qcow2(tmp_path / "big.qcow2", data=fetch.COPY_BELOW + MiB, virtual=64 * MiB)
    image = drv.images.add(big, name="big", disk_format="qcow2")
    assert image.size >= fetch.COPY_BELOW

    inst = drv.spawn("big", "big", "m1.tiny")

    assert inst.cache_hit is False
    assert inst.timings["fetch"] > 0
    assert inst.timings["convert"] > 0
    assert spy.download.call_count == 0
    assert spy.convert_source() == image.path
    base = drv.conf.base_dir / base_filename(image.id)
    assert sorted(p.name for p in drv.conf.base_dir.iterdir()) == [base.name]
    assert same_disk(big, base)
    assert drv.get_info(inst.uuid).state == "running"


def test_spawn_of_a_changed_big_image_fails_and_leaves_no_base(
    conf: Config, make_driver: Any, tmp_path: Path
) -> None:
    drv: LibvirtDriver = make_driver(conf)
    big = make_qcow2(tmp_path / "big.qcow2", data=fetch.COPY_BELOW + MiB, virtual=64 * MiB)
    image = drv.images.add(big, name="big", disk_format="qcow2")
    flip_last_byte(image.path)

    with pytest.raises(SpawnError, match="sha512 of the data read does not match") as err:
        drv.spawn("big", "big", "m1.tiny")

    assert err.value.step == "create_image"
    assert list(drv.conf.base_dir.iterdir()) == []
    assert drv.db.list_instances() == []
