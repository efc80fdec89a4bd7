"""qemu-img: the only module that runs it.

Every call names its formats (``-f``, ``-F``, ``-O``): letting qemu-img probe a format
is how a raw image posing as qcow2 reads host files. ``info`` runs under resource
limits and with ``--force-share``, so a hostile header cannot exhaust the host and a
running guest's disk can be inspected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from minidriver.exception import ProcessExecutionError
from minidriver.process import Completed, ResourceLimits, run

# Nova's QEMU_IMG_LIMITS defaults: 30 s of CPU, 1 GiB of address space. qemu-img 7.2
# needs a little more address space here, hence 2 GiB ([libvirt] images_*_limit).
DEFAULT_LIMITS = ResourceLimits(cpu_time=30, address_space=2 * 1024**3)


@dataclass(frozen=True)
class QemuImgInfo:
    """What ``qemu-img info`` says of one file."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    dirty: bool = False


class QemuImgError(ProcessExecutionError):
    """qemu-img refused or failed."""


def _qemu_img(
    args: list[str | os.PathLike[str]], limits: ResourceLimits | None = None
) -> Completed:
    try:
        return run(["qemu-img", *args], limits=limits)
    except ProcessExecutionError as exc:
        raise QemuImgError(
            exc.message,
            cmd=exc.cmd,
            exit_code=exc.exit_code,
            stdout=exc.stdout,
            stderr=exc.stderr,
            hint=exc.hint,
        ) from exc


def info(
    path: str | os.PathLike[str], fmt: str, limits: ResourceLimits | None = DEFAULT_LIMITS
) -> QemuImgInfo:
    """``qemu-img info`` of ``path`` read as ``fmt`` (never probed)."""
    out = _qemu_img(
        ["info", "--force-share", "--output=json", "-f", fmt, os.fspath(path)], limits
    ).stdout
    data = json.loads(out)
    specific = data.get("format-specific", {}).get("data", {})
    return QemuImgInfo(
        filename=data["filename"],
        format=data["format"],
        virtual_size=int(data["virtual-size"]),
        actual_size=int(data.get("actual-size", 0)),
        backing_file=data.get("backing-filename"),
        backing_format=data.get("backing-filename-format"),
        data_file=specific.get("data-file"),
        dirty=bool(data.get("dirty-flag", False)),
    )


def create(path: Path, fmt: str, size: int, *, preallocation: str | None = None) -> list[str]:
    """A new empty image; returns the command line (``explain`` shows it)."""
    args: list[str | os.PathLike[str]] = ["create", "-f", fmt]
    if preallocation:
        args += ["-o", f"preallocation={preallocation}"]
    args += [path, str(size)]
    return _qemu_img(args).cmd


def create_cow_image(
    backing_file: Path, backing_fmt: str, path: Path, size: int | None
) -> list[str]:
    """A qcow2 overlay of ``backing_file`` (Nova's ``create_cow_image``)."""
    args: list[str | os.PathLike[str]] = [
        "create",
        "-f",
        "qcow2",
        "-F",
        backing_fmt,
        "-b",
        backing_file,
        path,
    ]
    if size is not None:
        args.append(str(size))
    return _qemu_img(args).cmd


def convert(
    source: Path, source_fmt: str, dest: Path, dest_fmt: str, *, compress: bool = False
) -> list[str]:
    """Nova's ``convert_image``: ``-t none`` would need O_DIRECT; the page cache is fine."""
    args: list[str | os.PathLike[str]] = ["convert", "-f", source_fmt, "-O", dest_fmt]
    if compress:
        args.append("-c")
    args += [source, dest]
    return _qemu_img(args).cmd


def resize(path: Path, fmt: str, size: int) -> list[str]:
    return _qemu_img(["resize", "-f", fmt, path, str(size)]).cmd


# Glance's disk_format names and the driver name qemu-img knows each by. Formats not
# listed here (qed, ploop, ...) are never handed to qemu-img.
QEMU_FORMATS = {
    "raw": "raw",
    "qcow2": "qcow2",
    "vmdk": "vmdk",
    "vhd": "vpc",
    "vhdx": "vhdx",
    "vdi": "vdi",
    "iso": "raw",
}


def qemu_format(disk_format: str) -> str:
    try:
        return QEMU_FORMATS[disk_format]
    except KeyError:
        raise QemuImgError(
            f"disk_format {disk_format!r} is not supported for disks",
            cmd=[],
            hint=f"supported: {', '.join(QEMU_FORMATS)}",
        ) from None
