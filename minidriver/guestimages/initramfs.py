"""The generic parts of the test guest's initramfs: a deterministic cpio "newc" writer
and the load order of kernel modules (no Nova counterpart: a tool of the test guest
builder, ``testimage.py``, which decides what goes into the archive).

Modules are named as the kernel names them (``-`` as ``_``, no suffix); their
dependencies come from ``modules.dep`` or, where a kernel package ships none (Debian's:
depmod runs in its postinst), from each module's ``.modinfo`` section.
"""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from minidriver.process import run

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")

# ---------------------------------------------------------------------------------------
# cpio "newc"


@dataclass(frozen=True)
class CpioEntry:
    """One member of a cpio archive: ``path`` relative (no leading slash)."""

    path: str
    mode: int  # full st_mode, with the file type bits
    data: bytes = b""  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # device nodes: (major, minor)


def cpio_dir(path: str, perm: int = 0o755) -> CpioEntry:
    return CpioEntry(path, stat.S_IFDIR | perm)


def cpio_file(path: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(path, stat.S_IFREG | perm, data)


def cpio_symlink(path: str, target: str) -> CpioEntry:
    return CpioEntry(path, stat.S_IFLNK | 0o777, target.encode())


def cpio_chardev(path: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
    return CpioEntry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _cpio_member(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> bytes:
    raw_name = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    head = header + raw_name
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """A deterministic cpio "newc" archive of ``entries``, as the kernel unpacks it.

    Members are sorted by path; missing parent directories are added (mode 0755);
    owners are 0, mtimes 0, inode numbers count from 1. Duplicate paths are an error.
    """
    members: dict[str, CpioEntry] = {}
    for entry in entries:
        path = entry.path.strip("/")
        if not path or ".." in path.split("/"):
            raise ValueError(f"bad cpio path {entry.path!r}")
        if path in members:
            raise ValueError(f"duplicate cpio path {path!r}")
        if entry.data and not (stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode)):
            raise ValueError(f"{path!r}: only files and symlinks carry data")
        members[path] = CpioEntry(path, entry.mode, entry.data, entry.rdev)
    for path in list(members):
        parent = os.path.dirname(path)
        while parent and parent not in members:
            members[parent] = cpio_dir(parent)
            parent = os.path.dirname(parent)
    for path in members:
        parent = os.path.dirname(path)
        if parent and not stat.S_ISDIR(members[parent].mode):
            raise ValueError(f"{path!r}: parent {parent!r} is not a directory")
    out = [
        _cpio_member(ino, path, members[path].mode, members[path].data, members[path].rdev)
        for ino, path in enumerate(sorted(members), start=1)
    ]
    out.append(_cpio_member(0, "TRAILER!!!", 0, b"", (0, 0)))
    return b"".join(out)


# ---------------------------------------------------------------------------------------
# kernel modules


def module_name(path: str) -> str:
    """``kernel/fs/nls/nls_iso8859-1.ko.xz`` -> ``nls_iso8859_1`` (the kernel's name)."""
    base = os.path.basename(path)
    for suffix in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``modules.dep`` (``path: dep-path ...`` per line) as module name -> dependency names."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        path, sep, rest = line.partition(":")
        if not sep:
            raise ValueError(f"bad modules.dep line: {line!r}")
        deps[module_name(path.strip())] = [module_name(d) for d in rest.split()]
    return deps


def parse_modules_builtin(text: str) -> set[str]:
    """``modules.builtin`` (one path per line) as a set of module names."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def read_modinfo(elf: bytes) -> list[tuple[str, str]]:
    """The ``key=value`` strings of a module's ``.modinfo`` section (ELF64, little endian)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if shoff == 0 or shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(elf):
        raise ValueError("bad ELF section header table")

    def section(i: int) -> tuple[int, bytes]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize
        )
        return name, elf[offset : offset + size]

    _, names = section(shstrndx)
    for i in range(shnum):
        name_off, body = section(i)
        if names[name_off : names.find(b"\0", name_off)] == b".modinfo":
            pairs = []
            for item in body.split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    pairs.append((key, value))
            return pairs
    raise ValueError("no .modinfo section")


def modinfo_depends(elf: bytes) -> list[str]:
    """Names from a module's ``depends=`` field (what depmod turns into modules.dep)."""
    for key, value in read_modinfo(elf):
        if key == "depends":
            return [module_name(d) for d in value.split(",") if d]
    return []


def resolve_modules(
    wanted: Iterable[str],
    depends: Callable[[str], Sequence[str]],
    builtin: Iterable[str] = (),
) -> list[str]:
    """Module names in load order: every module after all it depends on.

    ``wanted`` keep their given order where dependencies allow; modules built into the
    kernel are left out (they need no loading). ``depends(name)`` gives direct
    dependencies (a full transitive list, as in modules.dep, works too) and raises
    KeyError for an unknown module.
    """
    skip = {module_name(b) for b in builtin}
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in skip or state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ValueError("module dependency cycle: " + " -> ".join((*chain, name)))
        state[name] = "visiting"
        try:
            deps = depends(name)
        except KeyError:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise ValueError(f"kernel module {name} not found{via}") from None
        for dep in deps:
            visit(module_name(dep), (*chain, name))
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(module_name(name), ())
    return order


class ModuleTree:
    """The modules of one kernel release, ``/lib/modules/<release>`` of an unpacked package."""

    def __init__(self, moddir: Path) -> None:
        self.moddir = moddir
        self.release = moddir.name
        self.paths: dict[str, Path] = {}
        for dirpath, _dirs, files in os.walk(moddir / "kernel"):
            for f in files:
                if f.endswith(MODULE_SUFFIXES):
                    self.paths[module_name(f)] = Path(dirpath, f)
        dep_file = moddir / "modules.dep"
        self._deps = parse_modules_dep(dep_file.read_text()) if dep_file.exists() else None
        builtin_file = moddir / "modules.builtin"
        self.builtin = (
            parse_modules_builtin(builtin_file.read_text()) if builtin_file.exists() else set()
        )

    def read(self, name: str) -> bytes:
        """The module as an uncompressed ELF file."""
        path = self.paths[name]
        data = path.read_bytes()
        if path.name.endswith(".xz"):
            return lzma.decompress(data)
        if path.name.endswith(".gz"):
            return gzip.decompress(data)
        if path.name.endswith(".zst"):
            with tempfile.TemporaryDirectory() as tmp:
                plain = Path(tmp, "m.ko")
                run(["zstd", "-q", "-d", "-o", plain, path])
                return plain.read_bytes()
        return data

    def depends(self, name: str) -> list[str]:
        if name not in self.paths:
            raise KeyError(name)
        if self._deps is not None:
            return self._deps.get(name, [])
        return modinfo_depends(self.read(name))

    def resolve(self, wanted: Iterable[str]) -> list[str]:
        return resolve_modules(wanted, self.depends, self.builtin)
