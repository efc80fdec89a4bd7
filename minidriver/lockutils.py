"""Per-file external locks (oslo.concurrency's lockutils, as nova/utils.py uses them).

An ``flock`` on a file in ``$instances_path/locks``: it excludes other processes and,
since every acquisition opens the file anew, other threads of this one too. The lock
file is removed on release; a waiter that then wins the lock on the removed inode sees
that the path no longer names it and tries again, so removal never lets two holders in.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def _check_name(name: str) -> None:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"bad lock name {name!r}")


def _acquire(lock_dir: Path, name: str, *, blocking: bool) -> int | None:
    _check_name(name)
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked an inode its last holder had unlinked: try again


def try_acquire(lock_dir: Path, name: str) -> int | None:
    """The held lock's fd, or None at once if another holder has it."""
    return _acquire(lock_dir, name, blocking=False)


def release(lock_dir: Path, name: str, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        (lock_dir / name).unlink()
    os.close(fd)


def is_held(lock_dir: Path, name: str) -> bool:
    """Whether someone holds ``name``'s lock now; creates, removes and changes nothing."""
    _check_name(name)
    path = lock_dir / name
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # a holder keeps its lock file until it lets go
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return False
            except FileNotFoundError:
                return False
        finally:
            os.close(fd)  # closing drops our shared lock


@contextlib.contextmanager
def external_lock(lock_dir: Path, name: str) -> Iterator[None]:
    """Hold ``name``'s lock for the block, waiting for it as long as it takes."""
    fd = _acquire(lock_dir, name, blocking=True)
    assert fd is not None
    try:
        yield
    finally:
        release(lock_dir, name, fd)


def instance_lock_name(instance_uuid: str) -> str:
    """The lock held while an instance is built, changed or deleted."""
    return f"instance-{instance_uuid}"
