"""Format safety on real images, made with qemu-img (and xorriso, mkfs.vfat)."""

from __future__ import annotations

import io
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from minidriver.exception import ImageNotFound, ImageUnacceptable
from minidriver.images import qemu_img
from minidriver.images.inspect import (
    DetectedImage,
    InspectingReader,
    check_image,
    detect_format,
)
from minidriver.process import run

MiB = 1024**2
SIZE = 16 * MiB

# (Glance disk_format, qemu-img's name for it)
FORMATS = [
    ("raw", "raw"),
    ("qcow2", "qcow2"),
    ("vmdk", "vmdk"),
    ("vhdx", "vhdx"),
    ("vdi", "vdi"),
    ("vhd", "vpc"),
]


def make(tmp_path: Path, qemu_fmt: str, name: str | None = None) -> Path:
    path = tmp_path / (name or f"disk.{qemu_fmt}")
    qemu_img.create(path, qemu_fmt, SIZE)
    return path


def partition_entry(ostype: int, start_chs: bytes, start_lba: int, sectors: int) -> bytes:
    return struct.pack("<B3sB3sII", 0x00, start_chs, ostype, b"\xff\xff\xff", start_lba, sectors)


def partitioned_raw(tmp_path: Path, name: str, entry: bytes | None) -> Path:
    """A raw disk whose first sector is an MBR holding ``entry`` (or no partition)."""
    path = make(tmp_path, "raw", name)
    sector = bytearray(512)
    if entry is not None:
        sector[446:462] = entry
    sector[510:512] = b"\x55\xaa"
    with open(path, "r+b") as fh:
        fh.write(sector)
    return path


def mbr_disk(tmp_path: Path) -> Path:
    return partitioned_raw(
        tmp_path, "mbr.img", partition_entry(0x83, b"\x20\x21\x00", 2048, SIZE // 512 - 2048)
    )


def gpt_disk(tmp_path: Path) -> Path:
    # The protective MBR of a GPT disk: one 0xEE partition from LBA 1 on.
    return partitioned_raw(
        tmp_path, "gpt.img", partition_entry(0xEE, b"\x00\x02\x00", 1, SIZE // 512 - 1)
    )


def stream(path: Path, declared: str, chunk: int = MiB) -> DetectedImage:
    with open(path, "rb") as src:
        reader = InspectingReader(src, declared, label=path.name)
        copied = io.BytesIO()
        while data := reader.read(chunk):
            copied.write(data)
        assert reader.bytes_read == path.stat().st_size
        assert copied.getvalue() == path.read_bytes()
        return reader.check()


@pytest.mark.parametrize(("glance_fmt", "qemu_fmt"), FORMATS)
def test_every_format_qemu_img_makes_passes_as_itself(
    tmp_path: Path, glance_fmt: str, qemu_fmt: str
) -> None:
    path = make(tmp_path, qemu_fmt)
    virtual_size = qemu_img.info(path, qemu_fmt).virtual_size
    expected = DetectedImage(format=glance_fmt, virtual_size=virtual_size)
    assert check_image(path, glance_fmt) == expected
    assert check_image(path, "auto") == expected
    assert detect_format(path) == glance_fmt
    assert stream(path, glance_fmt) == expected
    # Chunks smaller than the headers: regions captured across reads.
    assert stream(path, glance_fmt, chunk=1000) == expected


def test_vmdk_stream_optimized_passes(tmp_path: Path) -> None:
    path = tmp_path / "so.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", path, "16M"])
    assert check_image(path, "vmdk") == DetectedImage("vmdk", SIZE)


def test_qcow2_with_a_backing_file_is_refused(tmp_path: Path) -> None:
    base = make(tmp_path, "qcow2", "base.qcow2")
    overlay = tmp_path / "x.qcow2"
    qemu_img.create_cow_image(base, "qcow2", overlay, None)
    checks: list[Callable[[Path, str], DetectedImage]] = [check_image, stream]
    for check in checks:
        with pytest.raises(ImageUnacceptable) as err:
            check(overlay, "qcow2")
        message = str(err.value)
        assert message.startswith("image x.qcow2 is refused: ")
        assert "backing file" in message
        assert "(declared qcow2, detected qcow2)" in message
        assert "\n" not in message
        assert err.value.hint is not None
    # auto does not escape the check
    with pytest.raises(ImageUnacceptable, match="backing file"):
        check_image(overlay, "auto")


def test_qcow2_with_an_external_data_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "df.qcow2"
    data_file = f"data_file={tmp_path / 'df.raw'}"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", data_file, path, "16M"])
    with pytest.raises(ImageUnacceptable, match="external data file"):
        check_image(path, "qcow2")


@pytest.mark.parametrize(
    ("qemu_fmt", "declared", "detected"),
    [
        ("raw", "qcow2", "raw"),
        ("qcow2", "raw", "qcow2"),
        ("vmdk", "qcow2", "vmdk"),
        ("qcow2", "vmdk", "qcow2"),
        ("vpc", "vhdx", "vhd"),
        ("qcow2", "ami", "qcow2"),
    ],
)
def test_content_that_is_not_the_declared_format_is_refused(
    tmp_path: Path, qemu_fmt: str, declared: str, detected: str
) -> None:
    path = make(tmp_path, qemu_fmt)
    expected = (
        rf"^image {path.name} is refused: its content does not match the declared disk "
        rf"format \(declared {declared}, detected {detected}\)$"
    )
    with pytest.raises(ImageUnacceptable, match=expected):
        check_image(path, declared)
    with pytest.raises(ImageUnacceptable, match=expected):
        stream(path, declared)


@pytest.mark.parametrize("disk", [mbr_disk, gpt_disk], ids=["mbr", "gpt"])
def test_partitioned_raw_disk_passes_as_raw(tmp_path: Path, disk: Callable[[Path], Path]) -> None:
    path = disk(tmp_path)
    expected = DetectedImage(format="raw", virtual_size=SIZE)
    assert check_image(path, "raw") == expected
    assert check_image(path, "ami") == expected
    assert stream(path, "raw") == expected
    assert detect_format(path) == "raw"
    with pytest.raises(ImageUnacceptable, match="detected gpt"):
        check_image(path, "qcow2")


def test_broken_partition_table_is_refused_unless_a_kernel(tmp_path: Path) -> None:
    # What oslo.utils 10.2 makes of Debian's cloud vmlinuz: an MBR signature and no
    # partition.
    path = partitioned_raw(tmp_path, "vmlinuz", None)
    with pytest.raises(ImageUnacceptable, match="no partitions") as err:
        check_image(path, "raw")
    assert "(declared raw, detected gpt)" in str(err.value)
    assert err.value.hint is not None
    assert "aki" in err.value.hint
    for kernel_fmt in ("aki", "ari"):
        assert check_image(path, kernel_fmt) == DetectedImage(kernel_fmt, SIZE)
        assert stream(path, kernel_fmt) == DetectedImage(kernel_fmt, SIZE)


def test_fat_filesystem_is_raw(tmp_path: Path) -> None:
    # dosfstools (setup-host) puts mkfs.vfat in /usr/sbin, which a user's PATH may lack.
    mkfs = shutil.which("mkfs.vfat", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    path = make(tmp_path, "raw", "fat.img")
    run([mkfs or "mkfs.vfat", path])
    assert check_image(path, "raw") == DetectedImage("raw", SIZE)


def test_iso_passes_as_iso(tmp_path: Path) -> None:
    content = tmp_path / "content"
    content.mkdir()
    (content / "meta_data.json").write_text("{}")
    path = tmp_path / "disk.config"
    # xorriso's mkisofs emulation (setup-host installs xorriso; genisoimage is not needed).
    mkisofs = ["xorriso", "-as", "mkisofs", "-quiet"]
    run([*mkisofs, "-o", path, "-V", "config-2", "-r", "-J", content])
    detected = check_image(path, "iso")
    assert detected.format == "iso"
    assert detected.virtual_size == path.stat().st_size
    assert stream(path, "iso") == detected
    with pytest.raises(ImageUnacceptable, match="detected iso"):
        check_image(path, "raw")


def test_qed_is_detected_and_refused(tmp_path: Path) -> None:
    path = make(tmp_path, "qed")
    assert detect_format(path) == "qed"
    with pytest.raises(ImageUnacceptable, match="format is not allowed"):
        check_image(path, "auto")


def test_unknown_declared_format_and_missing_file(tmp_path: Path) -> None:
    path = make(tmp_path, "raw")
    with pytest.raises(ImageUnacceptable, match="'ploop' is not one minidriver can check"):
        check_image(path, "ploop")
    with pytest.raises(ImageUnacceptable):
        InspectingReader(io.BytesIO(b""), "QCOW2", label="x")
    with pytest.raises(ImageNotFound, match="does not exist"):
        check_image(tmp_path / "nope", "raw")
    with pytest.raises(ImageNotFound):
        detect_format(tmp_path / "nope")


def test_empty_file_is_raw_of_size_zero(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.touch()
    assert check_image(path, "raw") == DetectedImage("raw", 0)
    assert stream(path, "raw") == DetectedImage("raw", 0)
