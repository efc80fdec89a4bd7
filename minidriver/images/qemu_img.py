"""qemu-img, the only module that runs it (nova/virt/images.py, nova/privsep/qemu.py).

Every call names its formats (``-f``, ``-F``, ``-O``): letting qemu-img probe a format
is how a raw image posing as qcow2 reads host files. ``info`` runs under resource
limits and with ``--force-share``, so a hostile header cannot exhaust the host and a
running guest's disk can be inspected.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from minidriver.exception import MinidriverError, ProcessExecutionError
from minidriver.fileutils import PRIVATE_UMASK
from minidriver.process import Completed, ResourceLimits, run

# Nova's QEMU_IMG_LIMITS defaults (nova/privsep/qemu.py): 30 s of CPU, 2 GiB of address
# space ([libvirt] images_cpu_time_limit, images_address_space_limit, in bytes here).
DEFAULT_LIMITS = ResourceLimits(cpu_time=30, address_space=2 * 1024**3)

# How qemu-img 7.2 fails when its address space runs out, besides a signal: the
# dynamic loader cannot map a library (exit 127), or qemu-img reports an allocation
# it could not make (exit 1). LC_ALL=C (process.run) keeps these words stable.
_OUT_OF_MEMORY = (
    "failed to map segment",
    "Could not allocate",
    "Failed to allocate",
    os.strerror(errno.ENOMEM),
)
# The signals a limit kills with: SIGXCPU then SIGKILL for CPU time; for address space
# an abort on a failed allocation, or a segfault on a stack that cannot grow.
_LIMIT_SIGNALS = frozenset({signal.SIGXCPU, signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV})


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


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _qemu_img(
    args: list[str | os.PathLike[str]], limits: ResourceLimits | None = None
) -> Completed:
    try:
        # Every file qemu-img makes holds guest data: private (see fileutils).
        return run(["qemu-img", *args], limits=limits, umask=PRIVATE_UMASK)
    except ProcessExecutionError as exc:
        message = exc.message
        if exc.exit_code is not None:
            # Named after qemu-img and its subcommand, not after prlimit in front of it.
            if exc.exit_code < 0:
                detail = f"killed by signal {_signal_name(-exc.exit_code)}"
            else:
                lines = exc.stderr.strip().splitlines()
                detail = lines[-1] if lines else f"exit {exc.exit_code}"
            message = f"qemu-img {os.fspath(args[0])} failed: {detail}"
        raise QemuImgError(
            message,
            cmd=exc.cmd,
            exit_code=exc.exit_code,
            stdout=exc.stdout,
            stderr=exc.stderr,
            hint=exc.hint,
        ) from exc


def _run(cmd: list[str]) -> list[str]:
    _qemu_img(list(cmd[1:]))
    return cmd


class QemuImgLimitExceeded(QemuImgError):
    """qemu-img was stopped by its resource limits (a hostile or broken header)."""


def resource_limits(cpu_time: int, address_space: int) -> ResourceLimits:
    """``[libvirt] images_cpu_time_limit`` and ``images_address_space_limit`` as
    limits for ``info``; 0 lifts that limit."""
    if cpu_time < 0 or address_space < 0:
        raise MinidriverError(
            "images_cpu_time_limit and images_address_space_limit must not be negative",
            hint="give seconds and bytes, or 0 for no limit",
        )
    return ResourceLimits(cpu_time=cpu_time or None, address_space=address_space or None)


def describe_limits(limits: ResourceLimits) -> str:
    cpu = f"{limits.cpu_time} s" if limits.cpu_time is not None else "unlimited"
    memory = f"{limits.address_space} bytes" if limits.address_space is not None else "unlimited"
    return f"cpu {cpu}, address space {memory}"


def _exceeded(exc: QemuImgError, limits: ResourceLimits) -> bool:
    if exc.exit_code is None:
        return False
    if -exc.exit_code in _LIMIT_SIGNALS:
        return True
    return limits.address_space is not None and any(s in exc.stderr for s in _OUT_OF_MEMORY)


def info(
    path: str | os.PathLike[str], fmt: str, limits: ResourceLimits | None = DEFAULT_LIMITS
) -> QemuImgInfo:
    """``qemu-img info`` of ``path`` read as ``fmt`` (never probed).

    Raises :class:`QemuImgLimitExceeded` when ``limits`` stopped qemu-img, and
    :class:`QemuImgError` when it failed or printed no usable JSON.
    """
    cmd = ["info", "--force-share", "--output=json", "-f", fmt, os.fspath(path)]
    try:
        out = _qemu_img(list(cmd), limits).stdout
    except QemuImgError as exc:
        if limits is not None and _exceeded(exc, limits):
            raise QemuImgLimitExceeded(
                f"qemu-img info exceeded its resource limits ({describe_limits(limits)})"
                f" on {os.fspath(path)}",
                cmd=exc.cmd,
                exit_code=exc.exit_code,
                stdout=exc.stdout,
                stderr=exc.stderr,
                hint="the image's header asks for more than a sane image needs; if the"
                " image is trusted, raise [libvirt] images_cpu_time_limit or"
                " images_address_space_limit",
            ) from exc
        raise
    try:
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
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise QemuImgError(
            f"qemu-img info printed no usable JSON for {os.fspath(path)}: {exc}",
            cmd=["qemu-img", *cmd],
            stdout=out,
        ) from exc


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
    """A qcow2 overlay of ``backing_file`` (Nova's ``libvirt.utils.create_image`` with
    a backing file; its older name, ``create_cow_image``, is this function's)."""
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
