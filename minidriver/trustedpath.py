"""Directories in places other users can write to, used only when nobody else controls
them (no Nova counterpart: Nova runs as its own user, on paths only root can make).

As a user other than root, minidriver keeps its forwarded-port reservations and, for a
long state path, the embedded driver's root in ``$XDG_RUNTIME_DIR`` (the user's own,
made by the login manager) or else in ``/tmp/minidriver-<uid>``: a name anyone can
guess and make first, as a directory of theirs or a symlink to one. Whoever controls
such a directory adds or drops our reservations, or writes the ``qemu.conf`` and
domain definitions the embedded driver runs as us. So every component on the way is
checked as it is made or followed: a directory must belong to us or root and be
writable by nobody else unless it is sticky (as ``/tmp`` is: there nobody else may
rename or remove what we own); a symlink is followed only when it belongs to us or root;
the directory itself must be ours and writable by us alone. Once checked, nobody but
root can change any of it, so the path may be used by name afterwards.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from pathlib import Path

from minidriver.exception import MinidriverError

MAX_SYMLINKS = 40  # as the kernel's own limit on a path walk


class UntrustedPath(MinidriverError):
    """A directory we would make or follow is, or could be, controlled by another user."""


def trusted_dir(path: Path, *, mode: int = 0o700, hint: str | None = None) -> Path:
    """Make ``path`` (and its missing parents) or check the one there; return it.

    ``mode`` is the new directory's (its new parents get 0755, less the umask). Raises
    :class:`UntrustedPath`, with ``hint``, when any component is unsafe.
    """
    uid = os.geteuid()
    wanted = Path(os.path.abspath(path))

    def refuse(why: str) -> UntrustedPath:
        return UntrustedPath(f"{wanted} is not safe to use: {why}", hint=hint)

    current = Path("/")
    pending = list(wanted.parts[1:])
    hops = 0
    while True:
        st = os.lstat(current)
        problem = _untrusted(current, st, uid)
        if problem:
            raise refuse(problem)
        if not pending:
            break
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        try:
            entry = os.lstat(candidate)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):  # someone else's: checked below
                os.mkdir(candidate, mode if not pending else 0o755)
            entry = os.lstat(candidate)
        if stat.S_ISLNK(entry.st_mode):
            if entry.st_uid not in (0, uid):
                raise refuse(f"{candidate} is a symlink of {_user(entry.st_uid)}")
            hops += 1
            if hops > MAX_SYMLINKS:
                raise refuse("too many symlinks on the way")
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = Path("/")
            pending = [*target.parts[1 if target.is_absolute() else 0 :], *pending]
            continue
        current = candidate
    if st.st_uid != uid:
        raise refuse(f"{current} belongs to {_user(st.st_uid)}, not to {_user(uid)}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise refuse(f"others may write to {current} (mode {stat.S_IMODE(st.st_mode):04o})")
    return wanted


def _untrusted(path: Path, st: os.stat_result, uid: int) -> str | None:
    """Why the directory ``path`` could be controlled by another user, if it could."""
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid not in (0, uid):
        return f"{path} belongs to {_user(st.st_uid)}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return f"others may write to {path} (mode {stat.S_IMODE(st.st_mode):04o}, not sticky)"
    return None


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
