"""The local image service, on real files, a real state database and real images."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from minidriver.db import Database
from minidriver.exception import (
    AmbiguousReference,
    ImageNotFound,
    ImageUnacceptable,
)
from minidriver.images import qemu_img
from minidriver.images.store import (
    CHUNK_SIZE,
    ImageService,
    ImageStatus,
    ImageStoreError,
)
from minidriver.objects import ImageMeta

MiB = 1024**2


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def db(state: Path) -> Iterator[Database]:
    with Database(state / "minidriver.db") as database:
        yield database


@pytest.fixture
def service(db: Database, state: Path) -> ImageService:
    return ImageService(db, state / "images")


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """A raw disk with data in it, 2.5 MiB: three chunks, the last one short."""
    path = tmp_path / "src" / "disk.raw"
    path.parent.mkdir()
    data = bytearray(os.urandom(CHUNK_SIZE * 5 // 2))
    data[:512] = bytes(512)  # no accidental header
    path.write_bytes(data)
    return path


@pytest.fixture
def qcow2(raw: Path) -> Path:
    path = raw.with_name("disk.qcow2")
    qemu_img.convert(raw, "raw", path, "qcow2")
    return path


def hashes(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    return {algo: hashlib.new(algo, data).hexdigest() for algo in ("md5", "sha256", "sha512")}


def assert_nothing_left(service: ImageService) -> None:
    assert service.list() == []
    assert not service.images_path.exists() or list(service.images_path.iterdir()) == []


def test_add_qcow2_auto(service: ImageService, qcow2: Path) -> None:
    image = service.add(qcow2, name="cirros", properties={"hw_disk_bus": "scsi"})

    expected = hashes(qcow2)
    assert image.status == ImageStatus.ACTIVE
    assert image.disk_format == "qcow2"
    assert image.container_format == "bare"
    assert image.size == qcow2.stat().st_size
    assert image.virtual_size == qemu_img.info(qcow2, "qcow2").virtual_size
    assert image.checksum == expected["md5"]
    assert image.os_hash_algo == "sha512"
    assert image.os_hash_value == expected["sha512"]
    assert image.properties == {"hw_disk_bus": "scsi"}
    assert image.path == service.images_path / image.id
    assert image.locations == ({"url": image.path.as_uri(), "metadata": {}},)
    assert image.path.read_bytes() == qcow2.read_bytes()
    assert [p.name for p in service.images_path.iterdir()] == [image.id]
    assert qemu_img.info(image.path, "qcow2").format == "qcow2"

    assert service.get(image.id) == image
    assert service.get(image.id[:8]) == image
    assert service.get("cirros") == image
    assert service.list() == [image]
    with service.open("cirros") as fh:
        assert fh.read() == qcow2.read_bytes()


def test_glance_views(service: ImageService, raw: Path) -> None:
    image = service.add(raw, name="r", disk_format="raw", min_disk=1, min_ram=64)
    assert image.virtual_size == raw.stat().st_size
    assert image.to_image_meta() == ImageMeta(
        id=image.id,
        name="r",
        disk_format="raw",
        container_format="bare",
        size=raw.stat().st_size,
        virtual_size=raw.stat().st_size,
        min_disk=1,
        min_ram=64,
        properties={},
    )
    as_json = json.loads(json.dumps(image.to_dict()))
    assert as_json["id"] == image.id
    assert as_json["status"] == "active"
    assert as_json["checksum"] == hashes(raw)["md5"]
    assert as_json["os_hash_algo"] == "sha512"
    assert as_json["locations"][0]["url"].startswith("file:///")
    assert set(as_json) >= {"disk_format", "container_format", "size", "virtual_size"}
    assert as_json["created_at"].endswith("Z")


def test_a_second_process_sees_the_image(service: ImageService, state: Path, raw: Path) -> None:
    image = service.add(raw, name="shared", disk_format="raw")
    with Database(state / "minidriver.db") as other_db:
        assert ImageService(other_db, state / "images").get("shared") == image


def test_progress_and_the_saving_record(service: ImageService, raw: Path) -> None:
    total = raw.stat().st_size
    seen: list[tuple[int, int]] = []

    def progress(done: int, size: int) -> None:
        seen.append((done, size))
        # Mid-copy, the image is visible as saving, with its .part and no location.
        (saving,) = service.list()
        assert saving.status == ImageStatus.SAVING
        assert saving.locations == ()
        assert [p.name for p in service.images_path.iterdir()] == [f"{saving.id}.part"]
        with pytest.raises(ImageUnacceptable, match="saving, not active"):
            service.open(saving.id)
        with pytest.raises(ImageNotFound, match="no file"):
            _ = saving.path

    service.add(raw, name="r", disk_format="raw", progress=progress)
    assert seen == [(CHUNK_SIZE, total), (2 * CHUNK_SIZE, total), (total, total)]


@pytest.mark.parametrize("algo", ["md5", "sha256", "sha512"])
def test_matching_checksum_is_accepted(service: ImageService, qcow2: Path, algo: str) -> None:
    checksum = f"{algo}:{hashes(qcow2)[algo].upper()}"
    assert service.add(qcow2, name="c", checksum=checksum).checksum == hashes(qcow2)["md5"]


@pytest.mark.parametrize("algo", ["md5", "sha256", "sha512"])
def test_checksum_mismatch_leaves_nothing(service: ImageService, qcow2: Path, algo: str) -> None:
    wrong = hashlib.new(algo, b"something else").hexdigest()
    with pytest.raises(ImageUnacceptable, match=f"{algo} checksum is {hashes(qcow2)[algo]}"):
        service.add(qcow2, name="c", checksum=f"{algo}:{wrong}")
    assert_nothing_left(service)


@pytest.mark.parametrize("checksum", ["abc", "md5:xyz", "crc32:0000", "md5:" + "0" * 31])
def test_malformed_checksum_is_refused_before_copying(
    service: ImageService, qcow2: Path, checksum: str
) -> None:
    with pytest.raises(ImageUnacceptable, match="is not ALGO:HEX"):
        service.add(qcow2, name="c", checksum=checksum)
    assert_nothing_left(service)


def test_qcow2_with_a_backing_file_is_refused(
    service: ImageService, qcow2: Path, tmp_path: Path
) -> None:
    overlay = tmp_path / "overlay.qcow2"
    qemu_img.create_cow_image(qcow2, "qcow2", overlay, None)
    for disk_format in ("qcow2", "auto"):
        with pytest.raises(ImageUnacceptable, match="backing file"):
            service.add(overlay, name="evil", disk_format=disk_format)
        assert_nothing_left(service)


@pytest.mark.parametrize(
    ("source", "declared", "detected"), [("raw", "qcow2", "raw"), ("qcow2", "raw", "qcow2")]
)
def test_declared_format_must_match(
    service: ImageService,
    request: pytest.FixtureRequest,
    source: str,
    declared: str,
    detected: str,
) -> None:
    path: Path = request.getfixturevalue(source)
    with pytest.raises(ImageUnacceptable, match=f"declared {declared}, detected {detected}"):
        service.add(path, name="x", disk_format=declared)
    assert_nothing_left(service)


def test_missing_source(service: ImageService, tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound, match="does not exist"):
        service.add(tmp_path / "nope.qcow2", name="x")
    assert_nothing_left(service)


def test_disk_full_mid_copy_leaves_nothing(
    service: ImageService, raw: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    writes = 0

    def write(fd: int, data: bytes) -> int:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(ImageStoreError, match="No space left on device") as err:
        service.add(raw, name="big", disk_format="raw")
    monkeypatch.undo()
    assert err.value.hint is not None
    assert str(service.images_path) in err.value.hint
    assert_nothing_left(service)


def test_interrupt_mid_copy_leaves_nothing(service: ImageService, raw: Path) -> None:
    def progress(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        service.add(raw, name="r", disk_format="raw", progress=progress)
    assert_nothing_left(service)


def test_deleted_while_being_added(service: ImageService, state: Path, raw: Path) -> None:
    def progress(done: int, total: int) -> None:
        if done == CHUNK_SIZE:
            # Another process deletes the saving image.
            with Database(state / "minidriver.db") as other_db:
                other = ImageService(other_db, state / "images")
                other.delete(other.list()[0].id)

    with pytest.raises(ImageNotFound, match="deleted while it was being added"):
        service.add(raw, name="r", disk_format="raw", progress=progress)
    assert_nothing_left(service)


def test_bad_arguments_are_refused(service: ImageService, raw: Path) -> None:
    with pytest.raises(ImageUnacceptable, match="'ploop'"):
        service.add(raw, name="x", disk_format="ploop")
    with pytest.raises(ImageUnacceptable, match="container format 'ova'") as err:
        service.add(raw, name="x", disk_format="raw", container_format="ova")
    assert err.value.hint
    with pytest.raises(ImageUnacceptable, match="negative"):
        service.add(raw, name="x", disk_format="raw", min_ram=-1)
    assert_nothing_left(service)


def test_kernel_is_stored_without_inspection(service: ImageService, tmp_path: Path) -> None:
    # Looks like a disk with a broken partition table, as a vmlinuz does to oslo.utils.
    kernel = tmp_path / "vmlinuz"
    sector = bytearray(512)
    sector[510:512] = struct.pack("<H", 0xAA55)
    kernel.write_bytes(bytes(sector) + os.urandom(4096))
    with pytest.raises(ImageUnacceptable, match="no partitions"):
        service.add(kernel, name="k")
    image = service.add(kernel, name="k", disk_format="aki", container_format="aki")
    assert (image.disk_format, image.container_format) == ("aki", "aki")
    assert image.virtual_size == kernel.stat().st_size


def test_duplicate_names_and_references(service: ImageService, raw: Path, qcow2: Path) -> None:
    first = service.add(raw, name="debian", disk_format="raw")
    second = service.add(qcow2, name="debian")
    assert [i.id for i in service.list()] == [first.id, second.id]
    with pytest.raises(AmbiguousReference) as err:
        service.get("debian")
    assert first.id in str(err.value)
    assert second.id in str(err.value)
    assert service.get(second.id) == second
    with pytest.raises(ImageNotFound, match="'ubuntu'") as not_found:
        service.get("ubuntu")
    assert not_found.value.hint
    with pytest.raises(ImageNotFound):
        service.get("")


def test_delete(service: ImageService, raw: Path, qcow2: Path) -> None:
    keep = service.add(raw, name="keep", disk_format="raw")
    gone = service.add(qcow2, name="gone")
    service.delete("gone")
    assert service.list() == [keep]
    assert not gone.path.exists()
    assert keep.path.exists()
    with pytest.raises(ImageNotFound):
        service.delete(gone.id)
    with pytest.raises(ImageNotFound):
        service.open(gone.id)


def test_missing_file_of_an_active_image(service: ImageService, raw: Path) -> None:
    image = service.add(raw, name="r", disk_format="raw")
    image.path.unlink()
    with pytest.raises(ImageNotFound, match="is missing") as err:
        service.open(image.id)
    assert err.value.hint
