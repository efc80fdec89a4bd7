"""Per-file external locks (Nova's ``utils.synchronized(name, external=True)``).

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


@contextlib.contextmanager
def external_lock(lock_dir: Path, name: str) -> Iterator[None]:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"bad lock name {name!r}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the file we locked was removed by the previous holder: retry
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
