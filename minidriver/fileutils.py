"""Writing files so that a crash or an error never leaves half of one under its name,
and so that guest data is private from its first byte.

Guest data (disks, the config drive with user data and keys, the console, images) is
for us and QEMU's user alone. Nova leaves these modes to the umask; here we choose to
do better: files are made ``0600`` whatever the umask, and the directories QEMU must
pass through are ``0711``: a daemon's QEMU (``libvirt-qemu``) may enter them, nobody
else may list them. It still opens the files because libvirt's dynamic ownership (on
by default in ``qemu.conf``) gives each disk of a domain to QEMU's user while it runs.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

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
    """Nova's ``remove_path_on_error``: no half-written file outlives a failure."""
    try:
        yield
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise
