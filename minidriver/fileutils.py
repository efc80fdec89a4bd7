"""Writing files so that a crash or an error never leaves half of one under its name,
and so that guest data is private from its first byte, and no write starts that cannot
fit (Nova: oslo.utils' ``fileutils``, its ``remove_path_on_error`` among them).

Guest data (disks, the config drive with user data and keys, the console, images) is
for us and QEMU's user alone. Nova leaves these modes to the umask; here we choose to
do better: files are made ``0600`` whatever the umask, and the directories QEMU must
pass through are ``0711``: a daemon's QEMU (``libvirt-qemu``) may enter them, nobody
else may list them. It still opens the files because libvirt's dynamic ownership (on
by default in ``qemu.conf``) gives each disk of a domain to QEMU's user while it runs.

A full filesystem mid-write (ours, or a program's we ran) becomes one clear
:class:`InsufficientSpace`, not an errno.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from minidriver.exception import MinidriverError, ProcessExecutionError

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
TRAVERSE_ONLY_DIR = 0o711
# For the programs that write guest data (qemu-img, cp, mkfs.vfat): they create their
# files with 0666 or 0644 less the umask.
PRIVATE_UMASK = 0o077


def make_dir(path: Path, mode: int) -> None:
    """``path`` (and missing parents, as ``mkdir -p``) with exactly ``mode``.

    Set whatever the umask, and on a directory an older version made with another mode.
    """
    path.mkdir(parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != mode:
        path.chmod(mode)


def write_private(path: Path, text: str) -> None:
    """``path.write_text(text)``, the file 0600 whatever the umask or its old mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(fd, PRIVATE_FILE)
        out.write(text)


def create_private(path: Path) -> BinaryIO:
    """A new file (never an existing one, nor a planted symlink) open for writing, 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
    return os.fdopen(fd, "wb")


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: Path, target: Path) -> None:
    """Make ``temp`` durable and give it its final name in one atomic step."""
    with open(temp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(temp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def removed_on_error(*paths: Path) -> Iterator[None]:
    """oslo.utils' ``remove_path_on_error``, as Nova uses it: no half-written file
    outlives a failure."""
    try:
        yield
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise


class InsufficientSpace(MinidriverError):
    """A directory has no room for what must be written there."""


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use in ``directory``'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def ensure_free_space(directory: Path, needed: int, what: str) -> None:
    available = free_bytes(directory)
    if needed > available:
        raise InsufficientSpace(
            f"{what} needs {needed} bytes free in {directory}, {available} available",
            hint=f"free space in {directory} (minidriver cache clean removes unused bases),"
            " or use a flavor and image that fit",
        )


def _is_out_of_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # A program (qemu-img) reports the errno's text; process.run sets LC_ALL=C.
    return isinstance(exc, ProcessExecutionError) and os.strerror(errno.ENOSPC) in exc.stderr


@contextlib.contextmanager
def out_of_space_is_clear(directory: Path, what: str) -> Iterator[None]:
    """A full filesystem mid-write becomes one clear error, not an errno."""
    try:
        yield
    except (OSError, ProcessExecutionError) as exc:
        if not _is_out_of_space(exc):
            raise
        raise InsufficientSpace(
            f"{what} ran out of space in {directory} ({free_bytes(directory)} bytes available now)",
            hint=f"free space in {directory} (minidriver cache clean removes unused bases)"
            " and try again",
        ) from exc
