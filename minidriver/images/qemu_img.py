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


def _run(cmd: list[str]) -> list[str]:
    _qemu_img(list(cmd[1:]))
    return cmd


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


# Each operation has a ``*_cmd`` that builds its command line and a runner that runs
# exactly that line: ``explain`` shows the lines a boot would run without running them.


def create_cmd(path: Path, fmt: str, size: int) -> list[str]:
    return ["qemu-img", "create", "-f", fmt, os.fspath(path), str(size)]


def create(path: Path, fmt: str, size: int) -> list[str]:
    """A new empty image; returns the command line that made it."""
    return _run(create_cmd(path, fmt, size))


def create_cow_image_cmd(
    backing_file: Path, backing_fmt: str, path: Path, size: int | None
) -> list[str]:
    cmd = ["qemu-img", "create", "-f", "qcow2", "-F", backing_fmt, "-b", os.fspath(backing_file)]
    cmd.append(os.fspath(path))
    if size is not None:
        cmd.append(str(size))
    return cmd


def create_cow_image(
    backing_file: Path, backing_fmt: str, path: Path, size: int | None
) -> list[str]:
    """A qcow2 overlay of ``backing_file`` (Nova's ``create_cow_image``)."""
    return _run(create_cow_image_cmd(backing_file, backing_fmt, path, size))


def convert_cmd(
    source: Path, source_fmt: str, dest: Path, dest_fmt: str, *, compress: bool = False
) -> list[str]:
    cmd = ["qemu-img", "convert", "-f", source_fmt, "-O", dest_fmt]
    if compress:
        cmd.append("-c")
    return [*cmd, os.fspath(source), os.fspath(dest)]


def convert(
    source: Path, source_fmt: str, dest: Path, dest_fmt: str, *, compress: bool = False
) -> list[str]:
    """Nova's ``convert_image``."""
    return _run(convert_cmd(source, source_fmt, dest, dest_fmt, compress=compress))


def resize_cmd(path: Path, fmt: str, size: int) -> list[str]:
    return ["qemu-img", "resize", "-f", fmt, os.fspath(path), str(size)]


def resize(path: Path, fmt: str, size: int) -> list[str]:
    return _run(resize_cmd(path, fmt, size))


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
