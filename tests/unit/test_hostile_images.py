"""Hostile and broken images, each built for real, refused before they can do harm.

Every image here is made with qemu-img, qemu-io, xorriso or struct writes, then
given to both entry points: ``ImageService.add`` (the store's one pass: hash, inspect,
copy) and ``LibvirtDriver.spawn`` on libvirt's test driver. A spawn can only meet an
image the add checks never saw, so the spawn tests register the file with a record
written straight into the state database (as an older minidriver, or a hand-replaced
store file with its record, would leave it).

A spy wraps (never replaces) the ``run`` that ``minidriver.images.qemu_img`` calls:
each refusal shows that qemu-img ran only ``info``, under limits and with its format
pinned, or not at all; and nothing is left in ``_base`` or the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import pytest
from conftest import tmpfs
from pytest_mock import MockerFixture

from minidriver import process
from minidriver.config import Config, load_config
from minidriver.db import Database, utc_now
from minidriver.driver import LibvirtDriver, SpawnError
from minidriver.exception import ImageUnacceptable
from minidriver.imagebackend import FlavorDiskSmallerThanImage
from minidriver.images import fetch, inspect
from minidriver.images.download import DownloadError
from minidriver.images.qemu_img import QemuImgLimitExceeded
from minidriver.images.store import ImageService, ImageStatus
from minidriver.steps import StepTimer

KiB = 1024
MiB = 1024**2
GiB = 1024**3
PiB = 1024**5
SIZE = 16 * MiB


# -- building images ------------------------------------------------------------


def qemu_img(*args: str | Path, cwd: Path | None = None) -> None:
    """qemu-img straight from subprocess: the module under test is never used to build."""
    argv = ["qemu-img", *(os.fspath(arg) for arg in args)]
    subprocess.run(argv, check=True, capture_output=True, cwd=cwd)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def plain_qcow2(tmp: Path, name: str = "plain.qcow2", size: int = SIZE) -> Path:
    path = tmp / name
    qemu_img("create", "-q", "-f", "qcow2", path, str(size))
    return path


def plain_raw(tmp: Path, name: str = "plain.raw") -> Path:
    path = tmp / name
    path.write_bytes(b"\x00" * 512 + os.urandom(64 * KiB))
    return path


def backing_file_to_shadow(tmp: Path) -> Path:
    # -u: qemu-img does not open the backing file to make the overlay.
    path = tmp / "shadow.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", "-u", path, "16M")
    return path


def data_file_to_passwd(tmp: Path) -> Path:
    # qemu-img would create (truncate) the data file it is given, so the image is made
    # with a harmless name of the same length, then the name is rewritten in place.
    path = tmp / "datafile.qcow2"
    decoy = "ddddddd.raw"
    assert len(decoy) == len("/etc/passwd")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={decoy}", path.name, "16M", cwd=tmp)
    data = path.read_bytes()
    patch(path, data.index(decoy.encode()), b"/etc/passwd")
    return path


def flat_vmdk_to_passwd(tmp: Path) -> Path:
    """A VMDK descriptor file whose one extent is /etc/passwd, read as the disk."""
    path = tmp / "flat.vmdk"
    path.write_text(
        "# Disk DescriptorFile\n"
        "version=1\n"
        "CID=fffffffe\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        "\n"
        'RW 2048 FLAT "/etc/passwd" 0\n'
    )
    return path


def sparse_vmdk_with_descriptor(tmp: Path, name: str, descriptor: str) -> Path:
    """A real monolithicSparse VMDK whose embedded descriptor is replaced."""
    path = tmp / name
    qemu_img("create", "-q", "-f", "vmdk", path, "16M")
    with open(path, "rb") as fh:
        header = fh.read(512)
    desc_sector, desc_sectors = struct.unpack_from("<QQ", header, 28)
    text = descriptor.encode()
    assert len(text) < desc_sectors * 512
    patch(path, desc_sector * 512, text.ljust(desc_sectors * 512, b"\x00"))
    return path


VMDK_DESCRIPTOR = """# Disk DescriptorFile
version=1
CID=12345678
parentCID=ffffffff
createType="monolithicSparse"

{extent}

ddb.virtualHWVersion = "4"
"""


def vmdk_extent_to_shadow(tmp: Path) -> Path:
    return sparse_vmdk_with_descriptor(
        tmp, "extent.vmdk", VMDK_DESCRIPTOR.format(extent='RW 32768 SPARSE "/etc/shadow"')
    )


def vmdk_bad_descriptor(tmp: Path) -> Path:
    return sparse_vmdk_with_descriptor(
        tmp,
        "baddesc.vmdk",
        VMDK_DESCRIPTOR.format(extent='RW 32768 SPARSE "baddesc.vmdk"\nrun this: rm -rf /'),
    )


def iso_with_qcow2_header(tmp: Path) -> Path:
    """An ISO 9660 image that is also a qcow2: one header hiding another."""
    content = tmp / "iso-content"
    content.mkdir()
    (content / "README").write_text("hello\n")
    path = tmp / "polyglot.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", path, content], check=True)
    qcow2 = plain_qcow2(tmp, "header.qcow2")
    patch(path, 0, qcow2.read_bytes()[:512])  # the ISO's system area is free to use
    return path


def qed(tmp: Path) -> Path:
    path = tmp / "disk.qed"
    qemu_img("create", "-q", "-f", "qed", path, "16M")
    return path


def unknown_incompatible_feature(tmp: Path) -> Path:
    path = plain_qcow2(tmp, "feature.qcow2")
    # incompatible_features (big-endian u64 at 72): bit 40 means nothing to QEMU 7.2.
    patch(path, 72, struct.pack(">Q", 1 << 40))
    return path


def truncated_header(tmp: Path) -> Path:
    path = tmp / "truncated.qcow2"
    path.write_bytes(plain_qcow2(tmp).read_bytes()[:40])
    return path


def partition_entry(boot: int, ostype: int, chs: bytes, lba: int, sectors: int) -> bytes:
    return struct.pack("<B3sB3sII", boot, chs, ostype, b"\xff\xff\xff", lba, sectors)


def mbr_disk(tmp: Path, name: str, *entries: bytes) -> Path:
    path = tmp / name
    sector = bytearray(512)
    for i, entry in enumerate(entries):
        sector[446 + 16 * i : 462 + 16 * i] = entry
    sector[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(sector) + bytes(SIZE - 512))
    return path


def gpt_with_extra_partition(tmp: Path) -> Path:
    # A protective MBR must hold one 0xEE partition and nothing else: a second entry
    # makes the disk mean different things to different readers.
    return mbr_disk(
        tmp,
        "gpt-extra.img",
        partition_entry(0x00, 0xEE, b"\x00\x02\x00", 1, SIZE // 512 - 1),
        partition_entry(0x00, 0x83, b"\x20\x21\x00", 2048, 1024),
    )


def mbr_with_bad_boot_flag(tmp: Path) -> Path:
    return mbr_disk(tmp, "mbr-boot.img", partition_entry(0x42, 0x83, b"\x20\x21\x00", 2048, 2048))


@dataclass(frozen=True)
class Hostile:
    build: Callable[[Path], Path]
    declared: str
    refusal: str  # a regex the message matches
    # Harmless as what it really is: only the declaration that does not match is
    # refused (``auto`` takes the content for what it is).
    mismatch_only: bool = False


HOSTILE = {
    "backing-file-to-etc-shadow": Hostile(backing_file_to_shadow, "qcow2", "backing file"),
    "data-file-to-etc-passwd": Hostile(data_file_to_passwd, "qcow2", "external data file"),
    "qcow2-declared-raw": Hostile(plain_qcow2, "raw", r"declared raw, detected qcow2", True),
    "raw-declared-qcow2": Hostile(plain_raw, "qcow2", r"declared qcow2, detected raw", True),
    "flat-vmdk-to-etc-passwd": Hostile(flat_vmdk_to_passwd, "vmdk", "Unsupported subformat"),
    "vmdk-extent-to-etc-shadow": Hostile(vmdk_extent_to_shadow, "vmdk", "Invalid extent"),
    "vmdk-bad-descriptor": Hostile(vmdk_bad_descriptor, "vmdk", "Invalid VMDK descriptor"),
    "iso-qcow2-polyglot": Hostile(iso_with_qcow2_header, "iso", "Multiple formats detected"),
    "qed": Hostile(qed, "qed", "format is not allowed"),
    "unknown-incompatible-feature": Hostile(
        unknown_incompatible_feature, "qcow2", "incompatible feature bits"
    ),
    "truncated-header": Hostile(
        truncated_header, "qcow2", r"declared qcow2, detected raw", mismatch_only=True
    ),
    "gpt-extra-partition": Hostile(gpt_with_extra_partition, "raw", "invalid extra partitions"),
    "mbr-bad-boot-flag": Hostile(mbr_with_bad_boot_flag, "raw", "invalid boot flag"),
}


# -- the spy on qemu-img ------------------------------------------------------------


@dataclass(frozen=True)
class QemuImgSpy:
    """Wraps ``minidriver.images.qemu_img.run``: every qemu-img goes through it."""

    mock: MagicMock

    @property
    def subcommands(self) -> list[str]:
        return [os.fspath(call.args[0][1]) for call in self.mock.call_args_list]

    def assert_only_guarded_info(self) -> None:
        """qemu-img ran nothing but ``info``, each under limits, its format pinned."""
        assert set(self.subcommands) <= {"info"}, self.subcommands
        for call in self.mock.call_args_list:
            args = [os.fspath(a) for a in call.args[0]]
            assert "--force-share" in args
            assert args[args.index("-f") + 1] in ("raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi")
            assert call.kwargs["limits"] is not None


def spy_qemu_img(mocker: MockerFixture) -> QemuImgSpy:
    return QemuImgSpy(mocker.patch("minidriver.images.qemu_img.run", wraps=process.run))


# -- state ----------------------------------------------------------------------------


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


def make_conf(state: Path, node_file: Path, config_text: str = "") -> Config:
    state.mkdir(parents=True, exist_ok=True)
    config_file = state / "minidriver.conf"
    config_file.write_text(config_text)
    return load_config(config_file, state_dir=state, environ={}).with_libvirt(
        connection_uri=f"test://{node_file}", virt_type="qemu"
    )


@pytest.fixture
def drv(
    tmp_path: Path, node_file: Path, make_driver: Callable[[Config], LibvirtDriver]
) -> LibvirtDriver:
    return make_driver(make_conf(tmp_path / "state", node_file))


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ImageService]:
    with Database(tmp_path / "store" / "minidriver.db") as db:
        yield ImageService(db, tmp_path / "store" / "images")


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    path = tmp_path / "hostile"
    path.mkdir()
    return path


def assert_store_empty(service: ImageService) -> None:
    assert service.list() == []
    assert files_under(service.images_path) == []


def forge(drv: LibvirtDriver, path: Path, disk_format: str, name: str = "forged") -> str:
    """Put ``path`` in the store as an active image that no check has seen.

    Its record has the right size and hashes (it is what the store holds) but no
    virtual size, as an image from before the checks would have.
    """
    image_id = str(uuid.uuid4())
    stored = drv.conf.images_path / image_id
    stored.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, stored)
    data = stored.read_bytes()
    now = utc_now()
    with drv.db.transaction() as conn:
        conn.execute(
            "INSERT INTO images (id, name, disk_format, container_format, size, virtual_size,"
            " checksum, os_hash_algo, os_hash_value, status, created_at, updated_at,"
            " locations) VALUES (?, ?, ?, 'bare', ?, NULL, ?, 'sha512', ?, 'active', ?, ?, ?)",
            (
                image_id,
                name,
                disk_format,
                len(data),
                hashlib.md5(data).hexdigest(),
                hashlib.sha512(data).hexdigest(),
                now,
                now,
                json.dumps([{"url": stored.as_uri(), "metadata": {}}]),
            ),
        )
    return image_id


def store_files(drv: LibvirtDriver) -> list[str]:
    return sorted(p.name for p in files_under(drv.conf.images_path))


def assert_spawn_refused(drv: LibvirtDriver, err: SpawnError, store_before: list[str]) -> None:
    """The spawn failed making the root disk and left nothing: no base, no stray
    ``.part``/``.converted``, no instance, no new store file."""
    assert err.step == "create_image"
    assert files_under(drv.conf.base_dir) == []
    instances = drv.conf.instances_path
    assert [p.name for p in instances.iterdir() if p.name not in ("_base", "locks")] == []
    assert files_under(drv.conf.locks_dir) == []
    assert drv.db.list_instances() == []
    assert drv.host.get_connection().listAllDomains() == []
    assert store_files(drv) == store_before


# -- 1: format inspection: refused at add, and at spawn, before qemu-img ----------------


@pytest.mark.parametrize("case", HOSTILE.values(), ids=HOSTILE.keys())
def test_add_refuses(
    case: Hostile, service: ImageService, images_dir: Path, mocker: MockerFixture
) -> None:
    path = case.build(images_dir)
    spy = spy_qemu_img(mocker)
    with pytest.raises(ImageUnacceptable, match=case.refusal):
        service.add(path, name="hostile", disk_format=case.declared)
    assert_store_empty(service)
    if not case.mismatch_only:
        # auto is no way around it: whatever the content is taken for, it is refused.
        with pytest.raises(ImageUnacceptable, match="is refused"):
            service.add(path, name="hostile", disk_format="auto")
        assert_store_empty(service)
    assert spy.subcommands == []


@pytest.mark.parametrize("case", HOSTILE.values(), ids=HOSTILE.keys())
def test_spawn_refuses(
    case: Hostile, drv: LibvirtDriver, images_dir: Path, mocker: MockerFixture
) -> None:
    image_id = forge(drv, case.build(images_dir), case.declared)
    store_before = store_files(drv)
    spy = spy_qemu_img(mocker)

    with pytest.raises(SpawnError, match=case.refusal) as err:
        drv.spawn("victim", image_id, "t1.nano")

    assert isinstance(err.value.cause, ImageUnacceptable)
    assert str(err.value.cause).startswith(f"image forged ({image_id}) is refused: ")
    # The inspector refused it before qemu-img ever saw the file.
    assert spy.subcommands == []
    assert_spawn_refused(drv, err.value, store_before)


# -- 2: qemu-img info under resource limits -------------------------------------------


def test_qemu_img_info_over_its_limits_is_a_clear_error(
    tmp_path: Path,
    node_file: Path,
    make_driver: Callable[[Config], LibvirtDriver],
    mocker: MockerFixture,
) -> None:
    # 32 MiB of address space: qemu-img 7.2 cannot even open a qcow2 in it.
    limit = 32 * MiB
    conf = make_conf(
        tmp_path / "state", node_file, f"[libvirt]\nimages_address_space_limit = {limit}\n"
    )
    drv = make_driver(conf)
    image = drv.images.add(plain_qcow2(tmp_path), name="plain", disk_format="qcow2")
    spy = spy_qemu_img(mocker)

    with pytest.raises(SpawnError) as err:
        drv.spawn("victim", image.id, "t1.nano")

    cause = err.value.cause
    assert isinstance(cause, QemuImgLimitExceeded)
    assert cause.message.startswith(
        f"qemu-img info exceeded its resource limits (cpu 30 s, address space {limit} bytes)"
    )
    assert cause.hint is not None
    assert "images_address_space_limit" in cause.hint
    assert spy.subcommands == ["info"]
    spy.assert_only_guarded_info()
    assert spy.mock.call_args.kwargs["limits"].address_space == limit
    assert_spawn_refused(drv, err.value, store_files(drv))


# -- 3: sizes: the flavor, the ceiling and the free space, before any conversion ---------


@pytest.fixture(scope="module")
def petabyte_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 PiB virtual; 16 MiB of L1 table on disk."""
    path = tmp_path_factory.mktemp("petabyte") / "petabyte.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, str(PiB))
    return path


NO_ROOT_FLAVOR = "[flavor:noroot]\nvcpus = 1\nmemory_mb = 64\nroot_gb = 0\n"


def test_petabyte_image_is_refused_by_the_flavor(
    drv: LibvirtDriver, petabyte_qcow2: Path, mocker: MockerFixture
) -> None:
    image = drv.images.add(petabyte_qcow2, name="huge", disk_format="qcow2")
    assert image.virtual_size == PiB
    spy = spy_qemu_img(mocker)
    with pytest.raises(FlavorDiskSmallerThanImage, match=f"{PiB} bytes virtual"):
        drv.spawn("victim", "huge", "t1.nano")
    assert spy.subcommands == []
    assert files_under(drv.conf.instances_path) == []
    assert drv.db.list_instances() == []


def test_petabyte_image_is_refused_by_the_ceiling(
    tmp_path: Path,
    node_file: Path,
    make_driver: Callable[[Config], LibvirtDriver],
    petabyte_qcow2: Path,
    mocker: MockerFixture,
) -> None:
    conf = make_conf(
        tmp_path / "state",
        node_file,
        f"[libvirt]\nimages_max_virtual_size = {10 * GiB}\n\n{NO_ROOT_FLAVOR}",
    )
    drv = make_driver(conf)
    spy = spy_qemu_img(mocker)
    # The record knows the virtual size: refused before anything is written.
    drv.images.add(petabyte_qcow2, name="huge", disk_format="qcow2")
    with pytest.raises(ImageUnacceptable, match="over images_max_virtual_size"):
        drv.spawn("victim", "huge", "noroot")
    assert spy.subcommands == []
    assert files_under(drv.conf.instances_path) == []

    # A record without it: qemu-img info (guarded) tells, and conversion never starts.
    forged = forge(drv, petabyte_qcow2, "qcow2")
    store_before = store_files(drv)
    with pytest.raises(SpawnError, match="over images_max_virtual_size") as err:
        drv.spawn("victim", forged, "noroot")
    assert spy.subcommands == ["info"]
    spy.assert_only_guarded_info()
    assert_spawn_refused(drv, err.value, store_before)


def test_petabyte_image_without_ceiling_is_refused_by_free_space(
    tmp_path: Path,
    node_file: Path,
    make_driver: Callable[[Config], LibvirtDriver],
    petabyte_qcow2: Path,
    mocker: MockerFixture,
) -> None:
    drv = make_driver(make_conf(tmp_path / "state", node_file, NO_ROOT_FLAVOR))
    forged = forge(drv, petabyte_qcow2, "qcow2")
    store_before = store_files(drv)
    spy = spy_qemu_img(mocker)
    with pytest.raises(SpawnError) as err:
        drv.spawn("victim", forged, "noroot")
    assert isinstance(err.value.cause, fetch.InsufficientSpace)
    assert f"needs {PiB} bytes free in {drv.conf.base_dir}, " in str(err.value)
    assert spy.subcommands == ["info"]
    spy.assert_only_guarded_info()
    assert_spawn_refused(drv, err.value, store_before)


@pytest.fixture
def small_base_state() -> Iterator[Callable[[int], Path]]:
    """``make(size)``: a state dir under /var/tmp whose ``instances/_base`` is a tmpfs
    of ``size`` bytes."""
    with contextlib.ExitStack() as stack:

        def make(size: int) -> Path:
            state = Path(tempfile.mkdtemp(prefix="mdhostile-", dir="/var/tmp"))
            stack.callback(shutil.rmtree, state, ignore_errors=True)
            stack.enter_context(tmpfs(state / "instances" / "_base", size))
            return state

        yield make


def compression_bomb(tmp: Path, virtual: int) -> Path:
    """A qcow2 whose every cluster is compressed 0xab: a few hundred KiB that convert to
    ``virtual`` bytes of real (non-zero, so not sparse) raw data."""
    path = tmp / "bomb.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, str(virtual))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -c -P 0xab 0 {virtual}", path],
        check=True,
        capture_output=True,
    )
    return path


def test_compression_bomb_larger_than_free_space(
    tmp_path: Path,
    node_file: Path,
    make_driver: Callable[[Config], LibvirtDriver],
    small_base_state: Callable[[int], Path],
    mocker: MockerFixture,
) -> None:
    virtual = 128 * MiB
    bomb = compression_bomb(tmp_path, virtual)
    assert bomb.stat().st_size < MiB
    drv = make_driver(make_conf(small_base_state(32 * MiB), node_file))
    image = drv.images.add(bomb, name="bomb", disk_format="qcow2")
    assert image.virtual_size == virtual
    spy = spy_qemu_img(mocker)

    # The record's virtual size: refused before the download.
    with pytest.raises(SpawnError, match=r"needs \d+ bytes free in .*_base, \d+ available") as err:
        drv.spawn("victim", "bomb", "m1.tiny")
    assert isinstance(err.value.cause, fetch.InsufficientSpace)
    assert spy.subcommands == []
    assert_spawn_refused(drv, err.value, store_files(drv))

    # A record without it: after the guarded info, before the conversion.
    forged = forge(drv, bomb, "qcow2")
    store_before = store_files(drv)
    with pytest.raises(SpawnError) as err:
        drv.spawn("victim", forged, "m1.tiny")
    assert isinstance(err.value.cause, fetch.InsufficientSpace)
    assert f"to raw needs {virtual} bytes free in {drv.conf.base_dir}, " in str(err.value)
    assert spy.subcommands == ["info"]
    spy.assert_only_guarded_info()
    assert_spawn_refused(drv, err.value, store_before)


# -- 4: checksums: the store's record against what is read -----------------------------


def test_corrupted_store_file_is_refused_at_spawn(
    drv: LibvirtDriver, tmp_path: Path, mocker: MockerFixture
) -> None:
    image = drv.images.add(plain_qcow2(tmp_path), name="plain", disk_format="qcow2")
    with open(image.path, "r+b") as fh:  # one bit flipped, size unchanged
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)[0]
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last ^ 1]))
    store_before = store_files(drv)
    spy = spy_qemu_img(mocker)

    with pytest.raises(SpawnError, match="sha512 of the data read does not match") as err:
        drv.spawn("victim", "plain", "t1.nano")

    assert isinstance(err.value.cause, ImageUnacceptable)
    assert err.value.hint is not None
    assert spy.subcommands == []
    assert_spawn_refused(drv, err.value, store_before)


def test_truncated_store_file_is_refused_at_spawn(
    drv: LibvirtDriver, tmp_path: Path, mocker: MockerFixture
) -> None:
    image = drv.images.add(plain_qcow2(tmp_path), name="plain", disk_format="qcow2")
    os.truncate(image.path, image.size // 2)
    store_before = store_files(drv)
    spy = spy_qemu_img(mocker)

    with pytest.raises(
        SpawnError, match=f"store's file is {image.size // 2} bytes, its record says {image.size}"
    ) as err:
        drv.spawn("victim", "plain", "t1.nano")

    assert spy.subcommands == []
    assert_spawn_refused(drv, err.value, store_before)


def test_checksum_mismatch_at_add(service: ImageService, tmp_path: Path) -> None:
    path = plain_qcow2(tmp_path)
    with pytest.raises(ImageUnacceptable, match="sha256 checksum is"):
        service.add(path, name="plain", checksum="sha256:" + "0" * 64)
    assert_store_empty(service)


# -- 5: URLs: only whole http(s) bodies reach the store ----------------------------------


class ImageServer(http.server.ThreadingHTTPServer):
    payload: bytes
    cap: int

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _body(self, data: bytes, length: int | None) -> None:
        self.send_response(200)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        # The client hangs up once it has seen enough: not the server's error.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for start in range(0, len(data), 64 * KiB):
                self.wfile.write(data[start : start + 64 * KiB])

    def do_GET(self) -> None:
        payload = self.server.payload
        routes: dict[str, Callable[[], None]] = {
            "/image.qcow2": lambda: self._body(payload, len(payload)),
            "/to-image": lambda: self._redirect("/image.qcow2"),
            "/to-file": lambda: self._redirect("file:///etc/passwd"),
            "/to-ftp": lambda: self._redirect("ftp://127.0.0.1/image.qcow2"),
            # Content-Length promises the whole image; half of it comes.
            "/truncated": lambda: self._body(payload[: len(payload) // 2], len(payload)),
            "/error": lambda: self.send_error(500, "injected"),
            "/too-big": lambda: self._body(bytes(self.server.cap + 1), self.server.cap + 1),
            # No Content-Length: only counting the bytes can stop it.
            "/too-big-unannounced": lambda: self._body(bytes(2 * self.server.cap), None),
        }
        routes[self.path]()


@pytest.fixture
def image_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ImageServer]:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    server = ImageServer(("127.0.0.1", 0), Handler)
    server.payload = plain_qcow2(tmp_path, "served.qcow2").read_bytes()
    server.cap = MiB
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def capped_service(tmp_path: Path) -> Iterator[ImageService]:
    with Database(tmp_path / "capped" / "minidriver.db") as db:
        yield ImageService(db, tmp_path / "capped" / "images", size_cap=MiB)


def test_url_the_server_works(image_server: ImageServer, capped_service: ImageService) -> None:
    # The refusals below are the URLs' doing, not a broken server: this one is taken,
    # through an http redirect.
    image = capped_service.add(f"{image_server.base_url}/to-image", name="good")
    assert image.status == ImageStatus.ACTIVE
    assert image.disk_format == "qcow2"
    assert image.path.read_bytes() == image_server.payload


@pytest.mark.parametrize(
    ("path", "refusal"),
    [
        ("/to-file", r"redirects to file:///etc/passwd: refused"),
        ("/to-ftp", r"redirects to ftp://127\.0\.0\.1/image\.qcow2: refused"),
        ("/truncated", r"truncated: got \d+ of \d+ bytes"),
        ("/error", "the server answered 500"),
        ("/too-big", r"1048577 bytes is larger than image_size_cap \(1048576 bytes\)"),
        ("/too-big-unannounced", r"larger than image_size_cap \(1048576 bytes\)"),
    ],
    ids=["redirect-to-file", "redirect-to-ftp", "truncated", "500", "over-cap", "over-cap-stream"],
)
def test_url_refusals_leave_nothing(
    image_server: ImageServer,
    capped_service: ImageService,
    path: str,
    refusal: str,
    mocker: MockerFixture,
) -> None:
    spy = spy_qemu_img(mocker)
    with pytest.raises(DownloadError, match=refusal):
        capped_service.add(f"{image_server.base_url}{path}", name="remote")
    assert_store_empty(capped_service)
    assert spy.subcommands == []


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/image.qcow2", "file:///etc/passwd"])
def test_non_http_url_is_refused_before_any_request(capped_service: ImageService, url: str) -> None:
    with pytest.raises(DownloadError, match="only http and https URLs are accepted"):
        capped_service.add(url, name="remote")
    assert_store_empty(capped_service)


# -- kernels and ramdisks: size and hash only, never qemu-img ---------------------------


def kernel_file(tmp: Path, name: str) -> Path:
    """Looks like a disk with a broken partition table, as a vmlinuz does to oslo.utils."""
    path = tmp / name
    sector = bytearray(512)
    sector[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(sector) + os.urandom(300 * KiB))
    return path


@pytest.mark.parametrize("kind", ["aki", "ari"])
def test_kernels_are_fetched_without_qemu_img(
    service: ImageService, tmp_path: Path, kind: str, mocker: MockerFixture
) -> None:
    source = kernel_file(tmp_path, f"vmlinuz.{kind}")
    image = service.add(source, name=kind, disk_format=kind, container_format=kind)
    base_dir = tmp_path / "_base"
    base_dir.mkdir()
    spy = spy_qemu_img(mocker)

    made = fetch.fetch_to_raw(image, base_dir / "k", force_raw=True, timer=StepTimer())

    assert made == kind
    assert (base_dir / "k").read_bytes() == source.read_bytes()
    assert sorted(p.name for p in base_dir.iterdir()) == ["k"]
    assert spy.subcommands == []

    # Hashed all the same: a changed kernel is refused.
    patch(image.path, 1000, b"\x00\x01\x02\x03")
    with pytest.raises(ImageUnacceptable, match="does not match the store's record"):
        fetch.fetch_to_raw(image, base_dir / "k2", force_raw=True, timer=StepTimer())
    assert sorted(p.name for p in base_dir.iterdir()) == ["k"]
    assert spy.subcommands == []


def test_kernel_is_no_root_disk(drv: LibvirtDriver, tmp_path: Path, mocker: MockerFixture) -> None:
    drv.images.add(kernel_file(tmp_path, "vmlinuz"), name="k", disk_format="aki")
    spy = spy_qemu_img(mocker)
    with pytest.raises(ImageUnacceptable, match="not a disk"):
        drv.spawn("victim", "k", "t1.nano")
    assert spy.subcommands == []
    assert files_under(drv.conf.instances_path) == []


# -- the cached base, checked again before each overlay -----------------------------------


def data_qcow2(tmp: Path, name: str = "data.qcow2", head: bytes = b"") -> Path:
    """A qcow2 of 64 MiB: ``head`` at offset 0, 4 MiB of 0xab at 1 MiB."""
    raw = tmp / f"{name}.raw"
    with open(raw, "wb") as fh:
        fh.write(head)
        fh.seek(MiB)
        fh.write(b"\xab" * (4 * MiB))
        fh.truncate(64 * MiB)
    path = tmp / name
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
    return path


def base_of(drv: LibvirtDriver, image_id: str) -> Path:
    return drv.conf.base_dir / hashlib.sha1(image_id.encode()).hexdigest()


def test_tampered_cached_base_is_refused(
    drv: LibvirtDriver, tmp_path: Path, mocker: MockerFixture
) -> None:
    image = drv.images.add(data_qcow2(tmp_path), name="data", disk_format="qcow2")
    first = drv.spawn("first", "data", "m1.tiny")
    drv.destroy(first.uuid)
    base = base_of(drv, image.id)
    # The raw base now starts with a qcow2 header naming /etc/shadow as its backing
    # file: anything that probed it would read the host's file.
    patch(base, 0, backing_file_to_shadow(tmp_path).read_bytes()[:512])
    tampered = base.read_bytes()[:MiB]
    spy = spy_qemu_img(mocker)
    full_check = mocker.patch.object(inspect, "check_image", wraps=inspect.check_image)

    with pytest.raises(SpawnError, match=f"cached base {base} failed its re-check") as err:
        drv.spawn("second", "data", "m1.tiny")

    assert "backing file" in str(err.value)
    assert err.value.hint is not None
    assert str(base) in err.value.hint
    # The first MiB told: no full read of the base, no qemu-img.
    assert full_check.call_count == 0
    assert spy.subcommands == []
    # The shared cache is not this spawn's to delete: left as it was, for the admin.
    assert base.read_bytes()[:MiB] == tampered
    assert drv.db.list_instances() == []
    assert [p.name for p in drv.conf.instances_path.iterdir()] == ["_base", "locks"]


def test_partitioned_raw_base_passes_its_recheck(
    drv: LibvirtDriver, tmp_path: Path, mocker: MockerFixture
) -> None:
    mbr = mbr_disk(tmp_path, "mbr.raw", partition_entry(0x00, 0x83, b"\x20\x21\x00", 2048, 2048))
    head = mbr.read_bytes()[:512]
    image = drv.images.add(data_qcow2(tmp_path, "mbr.qcow2", head=head), name="mbr")
    drv.spawn("first", "mbr", "m1.tiny")
    base = base_of(drv, image.id)
    assert inspect.check_image(base, "raw").format == "raw"  # detected gpt: raw to Glance
    full_check = mocker.patch.object(inspect, "check_image", wraps=inspect.check_image)
    head_check = mocker.patch.object(inspect, "check_image_head", wraps=inspect.check_image_head)
    spy = spy_qemu_img(mocker)

    second = drv.spawn("second", "mbr", "m1.tiny")

    assert second.cache_hit is True
    assert head_check.call_count == 1
    assert full_check.call_count == 0
    assert spy.subcommands[0] == "info"  # the re-check's, guarded
    assert spy.mock.call_args_list[0].kwargs["limits"] is not None

    # A partition table that goes bad in the cache is caught the same way.
    patch(base, 446, b"\x42")  # boot flag of the first entry
    with pytest.raises(SpawnError, match="invalid boot flag"):
        drv.spawn("third", "mbr", "m1.tiny")


def test_cached_qcow2_base_is_rechecked_too(
    tmp_path: Path,
    node_file: Path,
    make_driver: Callable[[Config], LibvirtDriver],
    mocker: MockerFixture,
) -> None:
    drv = make_driver(
        make_conf(tmp_path / "state", node_file, "[DEFAULT]\nforce_raw_images = false\n")
    )
    image = drv.images.add(data_qcow2(tmp_path), name="data", disk_format="qcow2")
    drv.spawn("first", "data", "m1.tiny")
    base = base_of(drv, image.id)
    # An unknown incompatible feature bit set in the cached qcow2 base.
    patch(base, 72, struct.pack(">Q", 1 << 40))
    spy = spy_qemu_img(mocker)
    with pytest.raises(SpawnError, match="incompatible feature bits"):
        drv.spawn("second", "data", "m1.tiny")
    assert spy.subcommands == []


def test_recheck_reads_a_fixed_head_whatever_the_base_holds(
    tmp_path: Path, mocker: MockerFixture
) -> None:
    # A sparse 1 GiB raw base starting with a VMDK header that puts its footer at the
    # end: the full check would read the whole file looking for that footer.
    base = tmp_path / "base"
    with open(base, "wb") as fh:
        fh.write(struct.pack("<4sIIQQQQIQQ", b"KDMV", 1, 0, 2048, 128, 1, 20, 512, 0, 2**64 - 1))
        fh.truncate(GiB)
    reads: list[int] = []
    real_open = open

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_open(file, mode, *args, **kwargs)
        if os.fspath(file) == os.fspath(base):
            real_read = fh.read

            def read(size: int = -1) -> Any:
                reads.append(size)
                return real_read(size)

            fh.read = read  # type: ignore[method-assign]
        return fh

    mocker.patch("builtins.open", side_effect=counting_open)
    full_check = mocker.patch.object(inspect, "check_image", wraps=inspect.check_image)
    spy = spy_qemu_img(mocker)

    with pytest.raises(ImageUnacceptable, match=r"failed its re-check: .*detected vmdk"):
        fetch.recheck_base(base, "raw")

    assert reads == [inspect.HEAD_BYTES]
    assert full_check.call_count == 0
    assert spy.subcommands == []
