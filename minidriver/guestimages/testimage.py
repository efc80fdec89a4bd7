"""Build the tiny bootable BIOS test guest that the integration tests boot (no Nova
counterpart: a tool for minidriver's tests), as a qcow2 disk or as an ISO.

The guest is made from Debian packages alone, with no mount and no root needed:

* the cloud kernel (``linux-image-cloud-amd64`` resolved to its real package) and
  ``busybox-static``, fetched with ``apt-get download`` into ``<out_dir>/debs/`` and
  unpacked with ``dpkg-deb -x``;
* an initramfs, a deterministic cpio "newc" archive (``initramfs.py``) gzipped with
  mtime 0: ``/init`` (``minidriver/guestimages/data/testimage-init.sh``), busybox, and
  the kernel modules the guest needs, in their load order;
* a raw 64 MiB disk: a FAT file system (label ``MDGUEST``) at its start with syslinux
  installed by ``syslinux --install`` and the files copied in by ``mcopy``, and a boot
  record at byte 32 MiB that ``/init`` counts boots in;
* ``qemu-img convert -O qcow2 -c`` of that disk to ``minidriver-test-guest.qcow2``;
* or, with ``--iso``, ``minidriver-test-guest.iso``: the same kernel and initramfs on
  an El Torito CD booted by Debian's ``isolinux`` (``/isolinux/``: ``isolinux.bin``,
  ``ldlinux.c32``, ``isolinux.cfg``, ``vmlinuz``, ``initrd.img``), written by
  ``xorriso -as mkisofs`` with every date fixed. Not a hybrid ISO: a file that is both
  an ISO and a partitioned disk is a polyglot, which the image checks refuse. Booted
  from it, no disk carries a boot record (``boot-count error: ...``); every other
  console line is as from the qcow2.

What the guest prints on its serial console (the lines tests rely on), its console
shell and its modes are described in the init script and the README. A build is
skipped when the output exists and its sidecar ``<out>.inputs`` records the same
inputs (package versions, the init script, this builder's version; for the ISO also
the isolinux files); ``--force`` rebuilds anyway.

A little over the ~600-line guide: the qcow2 and the ISO are two outputs of one build
(same packages, kernel, initramfs and cache key); the generic cpio writer already
lives apart, in ``initramfs.py``.

Usage: ``python -m minidriver.guestimages.testimage [OUT] [--force] [--iso]`` (or
``scripts/build-test-image``), OUT being the image file or a directory to put it in.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import importlib.resources
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from minidriver.config import load_config
from minidriver.exception import MinidriverError
from minidriver.guestimages.initramfs import (
    ModuleTree,
    cpio_chardev,
    cpio_dir,
    cpio_file,
    cpio_symlink,
    write_cpio,
)
from minidriver.process import run

# Bump when the builder changes what it produces (part of the cache key).
BUILDER_VERSION = "1"
ISO_BUILDER_VERSION = "1"

IMAGE_NAME = "minidriver-test-guest.qcow2"
# Its Glance properties: a Linux guest (Nova then formats its ephemeral disk ext4).
IMAGE_PROPERTIES = {"os_type": "linux"}
ISO_NAME = "minidriver-test-guest.iso"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

MIB = 1024 * 1024
DISK_SIZE = 64 * MIB
FAT_SIZE = 30 * MIB  # ends before the boot record
FAT_LABEL = "MDGUEST"
FAT_VOLUME_ID = "4d444753"  # "MDGS": fixed for reproducible images

# The boot record: one text line at the start of the sector at 32 MiB of the root disk,
# padded with NUL bytes to 512; /init increments the count on every boot.
BOOT_RECORD_OFFSET = 32 * MIB
BOOT_RECORD_SIZE = 512
BOOT_RECORD_MAGIC = b"MINIDRIVER-BOOTREC-1"

# no_timer_check: the kernel's check of the IO-APIC timer at boot can fail (or hang)
# when a loaded host starves a TCG guest, and under qemu the domain has no KVM timer
# settings (as Nova gives it none); Nova adds it for a kernel booted under qemu too.
KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet no_timer_check"

# After "ready": the console shell's prompt, and the instance metadata keys (Nova's
# ``meta``, on the config drive) that turn the guest's modes on.
CONSOLE_PROMPT = "minidriver-guest$ "
META_IGNORE_POWER_BUTTON = "minidriver_guest_ignore_power_button"  # "1": on
META_DIRTY_MEMORY_MB = "minidriver_guest_dirty_memory_mb"  # MiB rewritten without pause

# Loaded in this order (each after its dependencies); built-in ones are skipped.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "ata_piix",
    "sr_mod",
    "isofs",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859-1",
    "nls_utf8",
    "button",  # ACPI power button (a module in Debian's cloud kernel)
    "evdev",  # /dev/input/event* for acpid
)

INIT_SCRIPT_RESOURCE = "testimage-init.sh"

# Host programs the build runs, with the Debian package providing each.
HOST_TOOLS = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "mkfs.fat": "dosfstools",
    "syslinux": "syslinux",
    "mcopy": "mtools",
    "qemu-img": "qemu-utils",
}
# The ISO's: Debian's isolinux (package isolinux) and the syslinux core module it
# loads (syslinux-common), both BIOS only; xorriso writes the CD.
ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
ISO_BOOT_FILES = {ISOLINUX_BIN: "isolinux", LDLINUX_C32: "syslinux-common"}
ISO_VOLUME_ID = "MDGUEST"
# sbin directories are often missing from a non-root PATH.
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

Log = Callable[[str], None]


class TestImageError(MinidriverError):
    """The test guest image could not be built."""

    __test__ = False  # not a pytest test class, despite the name


# ---------------------------------------------------------------------------------------
# boot record, syslinux, inputs


def boot_record(count: int = 0) -> bytes:
    """The boot record sector as /init reads and writes it."""
    line = BOOT_RECORD_MAGIC + b" count=%010d\n" % count
    return line + b"\0" * (BOOT_RECORD_SIZE - len(line))


def parse_boot_record(sector: bytes) -> int | None:
    """The boot count in a boot record sector, None when it carries no record."""
    line = sector.split(b"\n", 1)[0]
    prefix = BOOT_RECORD_MAGIC + b" count="
    if not line.startswith(prefix) or not line[len(prefix) :].isdigit():
        return None
    return int(line[len(prefix) :])


def syslinux_cfg(cmdline: str = KERNEL_CMDLINE) -> str:
    return (
        "DEFAULT minidriver\n"
        "PROMPT 0\n"
        "TIMEOUT 1\n"
        "LABEL minidriver\n"
        "  KERNEL vmlinuz\n"
        "  INITRD initrd.img\n"
        f"  APPEND {cmdline}\n"
    )


def init_script() -> bytes:
    return (
        importlib.resources.files("minidriver.guestimages.data") / INIT_SCRIPT_RESOURCE
    ).read_bytes()


@dataclass(frozen=True)
class Deb:
    """A Debian package version as apt knows it."""

    package: str
    version: str
    architecture: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        """The name ``apt-get download`` gives the file (``:`` of an epoch as ``%3a``)."""
        return f"{self.package}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


def cache_inputs(debs: Sequence[Deb], init: bytes) -> dict[str, object]:
    """Everything a build depends on, as the JSON stored in the sidecar file."""
    return {
        "builder_version": BUILDER_VERSION,
        "debs": [
            {"package": d.package, "version": d.version, "sha256": d.sha256}
            for d in sorted(debs, key=lambda d: d.package)
        ],
        "init_sha256": hashlib.sha256(init).hexdigest(),
        "modules": list(GUEST_MODULES),
        "cmdline": KERNEL_CMDLINE,
    }


def cache_key(inputs: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# host programs


def _tool(name: str) -> str:
    path = shutil.which(name, path=_TOOL_PATH)
    if path is None:
        raise TestImageError(
            f"{name} not found", hint=f"install the Debian package {HOST_TOOLS.get(name, name)}"
        )
    return path


def check_host_tools() -> dict[str, str]:
    """Absolute paths of the programs the build runs; one error naming all missing ones."""
    found = {t: shutil.which(t, path=_TOOL_PATH) for t in HOST_TOOLS}
    missing = sorted(t for t, p in found.items() if p is None)
    if missing:
        packages = sorted({HOST_TOOLS[t] for t in missing})
        raise TestImageError(
            "missing host tools: " + ", ".join(missing),
            hint="apt-get install " + " ".join(packages),
        )
    return {t: p for t, p in found.items() if p is not None}


def parse_apt_records(text: str) -> list[dict[str, str]]:
    """``apt-cache show`` output as one dict per record (continuation lines joined)."""
    records: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    key = ""
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if fields:
                records.append(fields)
            fields, key = {}, ""
        elif line[0].isspace() and key:
            fields[key] += "\n" + line.strip()
        else:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return records


def apt_show(specs: Sequence[str], apt_cache: str | None = None) -> dict[str, dict[str, str]]:
    """apt's record of each ``package`` (its candidate) or ``package=version``, by package
    (``apt_cache``: the tool's path, found on PATH when None)."""
    apt_cache = apt_cache or _tool("apt-cache")
    result = run([apt_cache, "show", "--no-all-versions", *specs], check=False)
    records: dict[str, dict[str, str]] = {}
    for record in parse_apt_records(result.stdout):
        records.setdefault(record.get("Package", ""), record)
    missing = [s for s in specs if s.partition("=")[0] not in records]
    if missing:
        raise TestImageError(
            "apt knows no installable " + ", ".join(missing),
            hint="run apt-get update (the packages are in Debian main)",
        )
    return records


def _deb(fields: Mapping[str, str]) -> Deb:
    try:
        return Deb(
            fields["Package"],
            fields["Version"],
            fields["Architecture"],
            fields["SHA256"],
            int(fields["Size"]),
        )
    except (KeyError, ValueError) as exc:
        raise TestImageError(f"apt record of {fields.get('Package')} lacks {exc}") from None


def resolve_kernel_package(meta_fields: Mapping[str, str]) -> str:
    """``name=version`` of the real kernel package a ``linux-image-*`` metapackage depends on.

    Without a version pinned by ``(= version)`` just the name (apt's candidate).
    """
    for alternative in meta_fields.get("Depends", "").split(","):
        first = alternative.split("|")[0].strip()
        name, _, constraint = first.partition(" ")
        if name.startswith("linux-image-") and name != meta_fields.get("Package"):
            constraint = constraint.strip("() ")
            if constraint.startswith("=") and constraint[1:].strip():
                return f"{name}={constraint[1:].strip()}"
            return name
    raise TestImageError(f"{meta_fields.get('Package')} depends on no linux-image package")


def resolve_packages(log: Log = print) -> list[Deb]:
    """The kernel and busybox packages to build from, as apt resolves them now."""
    records = apt_show([KERNEL_METAPACKAGE, BUSYBOX_PACKAGE])
    kernel = resolve_kernel_package(records[KERNEL_METAPACKAGE])
    kernel_record = apt_show([kernel])[kernel.partition("=")[0]]
    debs = [_deb(kernel_record), _deb(records[BUSYBOX_PACKAGE])]
    for d in debs:
        log(f"package: {d.package} {d.version}")
    return debs


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def fetch_deb(deb: Deb, debs_dir: Path, log: Log = print) -> Path:
    """The package file in ``debs_dir``, downloaded with ``apt-get download`` unless cached."""
    path = debs_dir / deb.filename
    if path.exists():
        if path.stat().st_size == deb.size and _sha256_file(path) == deb.sha256:
            log(f"cached: {path.name}")
            return path
        log(f"cached {path.name} does not match apt's checksum; downloading again")
    debs_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=debs_dir, prefix=".download-") as tmp:
        log(f"downloading {deb.package} {deb.version} ({deb.size / MIB:.1f} MiB)")
        run([_tool("apt-get"), "download", f"{deb.package}={deb.version}"], cwd=tmp, timeout=900)
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise TestImageError(f"apt-get download {deb.package} left {len(got)} .deb files")
        if _sha256_file(got[0]) != deb.sha256:
            raise TestImageError(f"{got[0].name}: checksum differs from apt's record")
        os.replace(got[0], path)
    return path


# ---------------------------------------------------------------------------------------
# the build


def _checkout_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.cfg").exists() else None


def default_output_dir() -> Path:
    """``<repo>/build`` in a checkout, else ``<state dir>/test-image``."""
    root = _checkout_root()
    if root is not None:
        return root / "build"
    # The state dir as the config names it (MINIDRIVER_CONFIG, MINIDRIVER_STATE_DIR).
    return load_config(None).state_path / "test-image"


def output_path(out: Path | None, name: str = IMAGE_NAME) -> Path:
    """Where a build of ``name`` writes for ``out``: a file named like ``name`` (its
    suffix: ``.qcow2`` or ``.iso``), else a directory for ``name``."""
    if out is None:
        return default_output_dir() / name
    out = Path(out)
    if out.is_dir() or out.suffix != Path(name).suffix:
        return out / name
    return out


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".inputs")


def _recorded_key(out: Path) -> str | None:
    try:
        data = json.loads(_sidecar(out).read_text())
    except (OSError, ValueError):
        return None
    key = data.get("key") if isinstance(data, dict) else None
    return key if isinstance(key, str) else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """One build per output directory at a time (they share debs/); others wait."""
    with (out_dir / ".testimage.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_initramfs(init: bytes, busybox: bytes, modules: Sequence[tuple[str, bytes]]) -> bytes:
    """The gzipped initramfs: /init, busybox, /dev/console, modules and their load order."""
    entries = [
        cpio_file("init", init, 0o755),
        cpio_file("bin/busybox", busybox, 0o755),
        cpio_symlink("bin/sh", "busybox"),
        cpio_dir("dev"),
        cpio_chardev("dev/console", 5, 1),
        cpio_dir("proc", 0o555),
        cpio_dir("sys", 0o555),
        cpio_dir("mnt"),
        cpio_dir("tmp", 0o1777),
        cpio_dir("lib/modules"),
        cpio_file("etc/minidriver/modules", "".join(f"{n}\n" for n, _ in modules).encode()),
    ]
    entries += [cpio_file(f"lib/modules/{name}.ko", data) for name, data in modules]
    return gzip.compress(write_cpio(entries), compresslevel=9, mtime=0)


def _single(paths: Iterable[Path], what: str) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        raise TestImageError(f"expected one {what}, found {len(found)}")
    return found[0]


def make_boot_files(
    tools: Mapping[str, str], debs: Sequence[Path], work: Path, log: Log
) -> tuple[Path, Path]:
    """``work/vmlinuz`` and ``work/initrd.img`` (mtime 0) from the kernel and busybox
    packages (``debs``, in that order): what any boot medium of the guest carries."""
    kernel_deb, busybox_deb = debs
    kroot, bbroot = work / "kernel", work / "busybox"
    run([tools["dpkg-deb"], "-x", kernel_deb, kroot], timeout=300)
    run([tools["dpkg-deb"], "-x", busybox_deb, bbroot], timeout=300)
    vmlinuz = _single((kroot / "boot").glob("vmlinuz-*"), "vmlinuz in the kernel package")
    tree = ModuleTree(_single((kroot / "lib" / "modules").iterdir(), "module directory"))
    names = tree.resolve(GUEST_MODULES)
    modules = [(n, tree.read(n)) for n in names]
    log(f"kernel {tree.release}: modules {' '.join(names)}")
    initrd = make_initramfs(init_script(), (bbroot / "bin" / "busybox").read_bytes(), modules)
    (work / "initrd.img").write_bytes(initrd)
    log(f"initramfs: {len(initrd) / MIB:.1f} MiB ({len(modules)} modules)")
    shutil.copyfile(vmlinuz, work / "vmlinuz")
    for name in ("vmlinuz", "initrd.img"):
        os.utime(work / name, (0, 0))
    return work / "vmlinuz", work / "initrd.img"


def _build_image(tools: Mapping[str, str], debs: Sequence[Path], out: Path, log: Log) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        make_boot_files(tools, debs, work, log)
        (work / "syslinux.cfg").write_text(syslinux_cfg())
        os.utime(work / "syslinux.cfg", (0, 0))

        fat = work / "fat.img"
        # mtools (and the syslinux installer, built on it) stamp directory entries with
        # SOURCE_DATE_EPOCH when set: without it two builds differ. mcopy -m keeps the
        # files' own mtime (0).
        env = {"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": "0"}
        mkfs = [tools["mkfs.fat"], "-C", "--invariant", "-i", FAT_VOLUME_ID, "-n", FAT_LABEL]
        run([*mkfs, fat, str(FAT_SIZE // 1024)])
        run([tools["syslinux"], "--install", fat], env=env)
        boot_files = [work / n for n in ("vmlinuz", "initrd.img", "syslinux.cfg")]
        run([tools["mcopy"], "-m", "-i", fat, *boot_files, "::/"], env=env)

        raw = work / "disk.raw"
        with raw.open("wb") as dst, fat.open("rb") as src:
            shutil.copyfileobj(src, dst, MIB)
            dst.seek(BOOT_RECORD_OFFSET)
            dst.write(boot_record(0))
            dst.truncate(DISK_SIZE)

        tmp_out = work / "image.qcow2"
        run(
            [tools["qemu-img"], "convert", "-f", "raw", "-O", "qcow2", "-c", raw, tmp_out],
            timeout=300,
        )
        with tmp_out.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_out, out)


def build(out: Path | None = None, *, force: bool = False, log: Log = print) -> Path:
    """Build the test guest image (unless up to date) and return its path.

    ``out`` is the image file or a directory for it (default: :func:`default_output_dir`).
    """
    return build_cached(output_path(out), _build_image, force=force, log=log)


def _iso_boot_file_digests() -> dict[str, str]:
    missing = [f"{p} ({package})" for p, package in ISO_BOOT_FILES.items() if not p.is_file()]
    if missing:
        raise TestImageError(
            "missing isolinux files: " + ", ".join(missing),
            hint="apt-get install " + " ".join(sorted(set(ISO_BOOT_FILES.values()))),
        )
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ISO_BOOT_FILES}


def mkisofs_args(tree: Path, out: Path) -> list[str | os.PathLike[str]]:
    """``xorriso -as mkisofs`` arguments for an El Torito CD of ``tree``, isolinux
    booting with no emulation (the boot info table is what isolinux.bin expects)."""
    return [
        "-as", "mkisofs", "-quiet", "-o", out, "-V", ISO_VOLUME_ID, "-R",
        "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat",
        "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table", tree,
    ]  # fmt: skip


def _build_iso(tools: Mapping[str, str], debs: Sequence[Path], out: Path, log: Log) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        vmlinuz, initrd = make_boot_files(tools, debs, work, log)
        boot = work / "tree" / "isolinux"
        boot.mkdir(parents=True)
        for path in ISO_BOOT_FILES:
            shutil.copyfile(path, boot / path.name)
        shutil.copyfile(vmlinuz, boot / "vmlinuz")
        shutil.copyfile(initrd, boot / "initrd.img")
        (boot / "isolinux.cfg").write_text(syslinux_cfg())
        for path in [*boot.iterdir(), boot, boot.parent]:  # the directories' dates too
            os.utime(path, (0, 0))
        tmp_out = work / "image.iso"
        # xorriso takes the volume's own dates and uuid from SOURCE_DATE_EPOCH: two
        # builds of the same inputs are the same bytes.
        env = {"SOURCE_DATE_EPOCH": "0"}
        run([tools["xorriso"], *mkisofs_args(work / "tree", tmp_out)], env=env, timeout=300)
        with tmp_out.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_out, out)


def build_iso(out: Path | None = None, *, force: bool = False, log: Log = print) -> Path:
    """Build the test guest as a bootable ISO (unless up to date) and return its path.

    ``out`` is the ISO file or a directory for it (default: next to the qcow2).
    """
    extra = {"iso_builder_version": ISO_BUILDER_VERSION, "isolinux": _iso_boot_file_digests()}
    return build_cached(
        output_path(out, ISO_NAME),
        _build_iso,
        extra_inputs=extra,
        tools={"xorriso": _tool("xorriso")},
        force=force,
        log=log,
    )


# Makes one artefact at ``out`` from the host tools and the two packages' files.
Maker = Callable[[Mapping[str, str], Sequence[Path], Path, Log], None]


def build_cached(
    out: Path,
    make: Maker,
    *,
    extra_inputs: Mapping[str, object] | None = None,
    tools: Mapping[str, str] | None = None,
    force: bool = False,
    log: Log = print,
) -> Path:
    """``make`` the artefact ``out`` from the packages apt resolves now, unless its
    sidecar records the same inputs (those of every build, plus ``extra_inputs``).
    One build per output directory at a time; a killed build's leftovers are removed."""
    out = out.absolute()
    tools = {**check_host_tools(), **(tools or {})}
    started = time.monotonic()
    debs = resolve_packages(log)
    inputs = {**cache_inputs(debs, init_script()), **(extra_inputs or {})}
    key = cache_key(inputs)
    if not force and out.exists() and _recorded_key(out) == key:
        log(f"{out}: up to date, nothing to do")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent):
        if not force and out.exists() and _recorded_key(out) == key:
            log(f"{out}: built meanwhile by another process, up to date")
            return out
        reason = "forced" if force else ("inputs changed" if out.exists() else "no image yet")
        log(f"building {out} ({reason})")
        debs_dir = out.parent / "debs"
        # Work directories of a killed build (no other build runs here: we hold the lock).
        for stale in [*out.parent.glob(".build-*"), *debs_dir.glob(".download-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        deb_files = [fetch_deb(d, debs_dir, log) for d in debs]  # kernel, then busybox
        _sidecar(out).unlink(missing_ok=True)
        make(tools, deb_files, out, log)
        record = {"key": key, "inputs": inputs}
        _write_atomic(_sidecar(out), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    log(f"wrote {out} ({out.stat().st_size / MIB:.1f} MiB) in {time.monotonic() - started:.1f} s")
    return out


# A builder's work for ``(OUT or None, --force)``; may return a line for stdout.
Build = Callable[[Path | None, bool], str | None]


def builder_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    out_help: str,
    out_metavar: str,
    build: Build,
    alternatives: Mapping[str, tuple[str, Build]] | None = None,
) -> int:
    """The command line of an image builder: ``[OUT] [--force]``, plus one flag per
    ``alternatives`` entry (``--flag``: (help, the build it runs instead)); errors are
    one line on stderr and exit 1. ``build`` may return a line to print on stdout."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("out", nargs="?", type=Path, metavar=out_metavar, help=out_help)
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    alternatives = alternatives or {}
    for flag, (flag_help, _) in alternatives.items():
        parser.add_argument(flag, action="store_true", help=flag_help)
    args = parser.parse_args(argv)
    chosen = [alt for flag, (_, alt) in alternatives.items() if getattr(args, flag[2:])]
    try:
        line = (chosen[0] if chosen else build)(args.out, args.force)
    except MinidriverError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        print(f"{prog}: error: {exc}{hint}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if line is not None:
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def build_quietly(out: Path | None, force: bool) -> None:
        build(out, force=force)

    def build_iso_quietly(out: Path | None, force: bool) -> None:
        build_iso(out, force=force)

    iso_help = (
        "build the same guest as a bootable ISO 9660 image (isolinux, xorriso) instead:"
        " OUT is then a *.iso file or a directory"
    )
    return builder_main(
        argv,
        prog="build-test-image",
        description="Build the tiny BIOS test guest (qcow2) the integration tests boot.",
        out_help=f"image file (*.qcow2) or directory (default: {default_output_dir()})",
        out_metavar="OUT",
        build=build_quietly,
        alternatives={"--iso": (iso_help, build_iso_quietly)},
    )


if __name__ == "__main__":
    sys.exit(main())
