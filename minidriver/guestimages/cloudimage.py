"""Build a minimal Debian bookworm cloud guest: the image whose cloud-init grows its root.

Where the test guest (:mod:`minidriver.guestimages.testimage`) is busybox, this one is a real
cloud image, built from Debian packages alone, as root:

* ``debootstrap --variant=minbase`` of bookworm from the host's Debian mirror (its apt
  sources), then, in a chroot with the host's bookworm, -updates and -security sources,
  ``apt-get install`` of :data:`PACKAGES` pinned to the versions the host's apt resolves
  (those versions are the cache key, so the guest must get exactly them);
* the tree configured for a cloud (:func:`guest_files`): cloud-init reads the config
  drive only and logs to the serial console (its units' output goes to
  journal+console); ifupdown sources the ``interfaces.d`` that cloud-init renders from
  ``network_data.json``; no SSH host keys, no machine-id, no hostname (made at first
  boot); apt timers and ``systemd-networkd-wait-online`` masked; apt caches removed;
* the root file system written with ``mkfs.ext4 -d`` (label ``cloudimg-rootfs``) into
  partition 1 of an MBR disk made with ``sfdisk`` on a file (no mount, no loop device),
  the partition starting at 1 MiB and just big enough for the tree, so that growpart has
  work at first boot; then ``qemu-img convert -c -O qcow2``;
* the kernel and initramfs-tools' initrd copied out beside the image, to be booted as
  Nova's kernel and ramdisk images with :data:`KERNEL_CMDLINE` (the root is a
  partition, so the whole-disk ``root=/dev/vda`` of Nova's default will not do).

Outputs, in ``OUT_DIR`` (default ``build/cloud-guest``): ``debian-cloud.qcow2``,
``vmlinuz``, ``initrd.img``, ``cmdline`` and the sidecar ``debian-cloud.qcow2.inputs``.
A build is skipped when the sidecar records the same inputs (the resolved versions of
:data:`PACKAGES`, the mirror, the files written into the tree, this builder's version);
``--force`` rebuilds anyway. Work happens in ``OUT_DIR/.build-*``, removed on any
failure; the sidecar is removed before the outputs are replaced and written last.

Bigger than the ~600-line guide: one build read top to bottom (inputs, tree, disk,
kernel, cache key) whose steps share the plan and the work dir; the tree's files are
data that reads best beside the steps that write them.

Usage: ``python -m minidriver.guestimages.cloudimage [OUT_DIR] [--force]`` (or
``scripts/build-cloud-image``). Progress goes to stderr; the kernel command line is the
last line on stdout.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from minidriver.exception import MinidriverError, ProcessExecutionError
from minidriver.fileutils import publish
from minidriver.guestimages.testimage import apt_show, builder_main, resolve_kernel_package
from minidriver.process import run

# Bump when the builder changes what it produces (part of the cache key).
BUILDER_VERSION = "1"

SUITE = "bookworm"
GUEST_SUITES = (SUITE, f"{SUITE}-updates", f"{SUITE}-security")
COMPONENT = "main"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
# On top of minbase. python3-cffi-backend: a dependency of cloud-init's that
# debootstrap's resolver misses (apt's finds it; named so the key pins it). sudo: the
# default user cloud-init makes gets its admin rights through it. qemu-guest-agent:
# minidriver sets a restored clone's clock through it (hw_qemu_guest_agent=yes), and
# QEMU 7.2's agent answers guest-set-time "unsupported" without /sbin/hwclock, which
# bookworm has in util-linux-extra.
PACKAGES = (
    KERNEL_METAPACKAGE,
    "systemd-sysv",
    "udev",
    "cloud-init",
    "cloud-guest-utils",
    "e2fsprogs",
    "fdisk",
    "ifupdown",
    "isc-dhcp-client",
    "openssh-server",
    "python3-cffi-backend",
    "sudo",
    "qemu-guest-agent",
    "util-linux-extra",
)

IMAGE_NAME = "debian-cloud.qcow2"
KERNEL_NAME = "vmlinuz"
RAMDISK_NAME = "initrd.img"
CMDLINE_NAME = "cmdline"
OUTPUT_NAMES = (IMAGE_NAME, KERNEL_NAME, RAMDISK_NAME, CMDLINE_NAME)

ROOT_LABEL = "cloudimg-rootfs"
KERNEL_CMDLINE = "root=/dev/vda1 ro console=ttyS0"
# Modules the initrd must hold to mount the root on /dev/vda1; ext4 may be built in.
INITRD_MODULES = ("virtio_pci", "virtio_blk")

MIB = 1024 * 1024
PARTITION_START = 1 * MIB
SECTOR = 512
FS_BLOCK = 4096
# mkfs.ext4 picks 1 KiB blocks for a small file system; 4 KiB blocks and a fixed inode
# ratio suit the size the root grows to.
FS_INODE_RATIO = 8192
FS_INODE_SIZE = 256
# Room above the tree: ext4's metadata (journal, inode tables, reserved GDT blocks for
# growing) and a little free space for the first boot's writes, before growpart runs.
FS_SLACK = 0.10
FS_HEADROOM = 96 * MIB

CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
}

# Host programs the build runs, with the Debian package providing each.
HOST_TOOLS = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "debootstrap": "debootstrap",
    "chroot": "coreutils",
    "sfdisk": "fdisk",
    "mkfs.ext4": "e2fsprogs",
    "qemu-img": "qemu-utils",
}
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
SOURCES_LIST = Path("/etc/apt/sources.list")
SOURCES_DIR = Path("/etc/apt/sources.list.d")

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class CloudImageError(MinidriverError):
    """The cloud guest image could not be built."""


# ---------------------------------------------------------------------------------------
# apt sources and packages


@dataclass(frozen=True, order=True)
class Package:
    """A package at the version apt resolved, as the guest gets it."""

    name: str
    version: str

    @property
    def pinned(self) -> str:
        return f"{self.name}={self.version}"


@dataclass(frozen=True)
class AptSource:
    """One apt source: a ``deb`` line, or one stanza of a deb822 ``.sources`` file."""

    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_sources_list(text: str) -> list[AptSource]:
    """The ``deb`` lines of a one-line-style ``sources.list`` (``deb-src`` left out)."""
    sources = []
    for raw in text.splitlines():
        words = raw.partition("#")[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2:
            sources.append(AptSource((words[0],), (words[1],), tuple(words[2:])))
    return sources


def parse_deb822_sources(text: str) -> list[AptSource]:
    """The enabled stanzas of type ``deb`` in a deb822 ``.sources`` file."""
    sources = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
            else:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        sources.append(
            AptSource(
                tuple(fields.get("uris", "").split()),
                tuple(fields.get("suites", "").split()),
                tuple(fields.get("components", "").split()),
            )
        )
    return sources


def host_sources(
    sources_list: Path = SOURCES_LIST, sources_dir: Path = SOURCES_DIR
) -> list[AptSource]:
    """The host's apt sources, as apt reads them (``*.list`` and ``*.sources`` only)."""
    found = []
    if sources_list.exists():
        found += parse_sources_list(sources_list.read_text())
    if sources_dir.is_dir():
        for path in sorted(sources_dir.iterdir()):
            if path.suffix == ".list":
                found += parse_sources_list(path.read_text())
            elif path.suffix == ".sources":
                found += parse_deb822_sources(path.read_text())
    return found


def guest_sources(sources: Iterable[AptSource]) -> list[AptSource]:
    """The host's sources of Debian bookworm, -updates and -security, ``main`` only.

    Raises :class:`CloudImageError` when none carries bookworm itself.
    """
    picked: list[AptSource] = []
    for source in sources:
        suites = tuple(s for s in source.suites if s in GUEST_SUITES)
        if suites and COMPONENT in source.components and source.uris:
            entry = AptSource(source.uris, suites, (COMPONENT,))
            if entry not in picked:
                picked.append(entry)
    if not any(SUITE in s.suites for s in picked):
        raise CloudImageError(
            f"no apt source of Debian {SUITE} {COMPONENT} on this host",
            hint=f"add one to {SOURCES_DIR}, e.g. http://deb.debian.org/debian {SUITE} main",
        )
    return picked


def mirror(sources: Sequence[AptSource]) -> str:
    """The URI debootstrap fetches the base system from: the first with bookworm itself."""
    for source in sources:
        if SUITE in source.suites:
            return source.uris[0]
    raise CloudImageError(f"no apt source of Debian {SUITE}")


def render_deb822(sources: Iterable[AptSource]) -> str:
    """``sources`` as a deb822 ``.sources`` file; the keys are debian-archive-keyring's."""
    stanzas = [
        f"Types: deb\nURIs: {' '.join(s.uris)}\nSuites: {' '.join(s.suites)}\n"
        f"Components: {' '.join(s.components)}\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        for s in sources
    ]
    return "\n".join(stanzas)


# ---------------------------------------------------------------------------------------
# what the builder writes into the tree


@dataclass(frozen=True)
class TreeFile:
    """A file the builder writes into the guest's tree (``path`` absolute in the guest)."""

    path: str
    content: str
    mode: int = 0o644


CLOUD_CFG = """\
# minidriver: the instance's metadata comes from its config drive (Nova's config-2),
# nothing else is probed. growpart and resize_rootfs run with their defaults: the root
# partition and its ext4 grow to the disk at first boot.
datasource_list: [ ConfigDrive, None ]
# The image has no locales package: cloud-init's default en_US.UTF-8 would fail in
# locale-gen, C.UTF-8 is built into glibc.
locale: C.UTF-8
# OpenSSH 9 loads no DSA host key: do not spend first-boot time making one.
ssh_genkeytypes: [ rsa, ecdsa, ed25519 ]
"""

NETWORK_INTERFACES = """\
# interfaces(5): the loopback here; cloud-init renders the rest into interfaces.d
# from the config drive's network_data.json (or DHCP on the first NIC).
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback
"""

HOSTS = """\
127.0.0.1\tlocalhost
::1\t\tlocalhost ip6-localhost ip6-loopback
ff02::1\t\tip6-allnodes
ff02::2\t\tip6-allrouters
"""

# Not needed in a cloud guest, and each costs boot time or network under TCG.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-networkd-wait-online.service",
)

# Removed from the tree after the install (made at first boot, or only build leftovers).
REMOVED_GLOBS = (
    "etc/ssh/ssh_host_*",
    "etc/hostname",
    "etc/resolv.conf",
    "etc/apt/sources.list",
    "var/lib/dbus/machine-id",
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/lib/apt/lists/*_*",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/log/*.log",
    "var/log/apt/*",
    "tmp/*",
    "var/tmp/*",
    "usr/sbin/policy-rc.d",
)

POLICY_RC_D = "#!/bin/sh\n# minidriver build: start no service in the chroot\nexit 101\n"


def fstab(label: str = ROOT_LABEL) -> str:
    return (
        "# <file system>\t<mount point>\t<type>\t<options>\t<dump>\t<pass>\n"
        f"LABEL={label}\t/\text4\tdefaults,errors=remount-ro\t0\t1\n"
    )


def guest_files(sources: Sequence[AptSource]) -> list[TreeFile]:
    """Every file the builder writes into the tree (part of the cache key)."""
    return [
        TreeFile("/etc/cloud/cloud.cfg.d/99_minidriver.cfg", CLOUD_CFG),
        TreeFile("/etc/network/interfaces", NETWORK_INTERFACES),
        TreeFile("/etc/fstab", fstab()),
        TreeFile("/etc/hosts", HOSTS),
        # Empty: systemd makes a machine-id at first boot, one per instance.
        TreeFile("/etc/machine-id", "", 0o444),
        TreeFile("/etc/apt/sources.list.d/debian.sources", render_deb822(sources)),
    ]


def write_tree_file(tree: Path, item: TreeFile) -> Path:
    path = tree / item.path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a symlink is replaced, not written through
    path.write_text(item.content)
    path.chmod(item.mode)
    return path


def mask_units(tree: Path, units: Iterable[str] = MASKED_UNITS) -> None:
    """``systemctl mask``, offline: a link to /dev/null in /etc/systemd/system."""
    unit_dir = tree / "etc/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    for unit in units:
        link = unit_dir / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
        # The enablement links of a masked unit are dead weight; drop them.
        for wants in unit_dir.glob(f"*.wants/{unit}"):
            wants.unlink()


def remove_leftovers(tree: Path, patterns: Iterable[str] = REMOVED_GLOBS) -> None:
    for pattern in patterns:
        for path in tree.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


# ---------------------------------------------------------------------------------------
# the disk


@dataclass(frozen=True)
class DiskLayout:
    """An MBR disk with one Linux partition from ``PARTITION_START`` to the disk's end."""

    partition_size: int  # bytes, a multiple of 1 MiB

    def __post_init__(self) -> None:
        if self.partition_size <= 0 or self.partition_size % MIB:
            raise ValueError(f"partition size {self.partition_size} is not a positive MiB count")

    @property
    def disk_size(self) -> int:
        return PARTITION_START + self.partition_size

    def sfdisk_script(self, disk_id: int) -> str:
        """What ``sfdisk`` reads to write the partition table (``disk_id``: 32 bits)."""
        return (
            "label: dos\n"
            f"label-id: 0x{disk_id:08x}\n"
            "unit: sectors\n\n"
            f"start={PARTITION_START // SECTOR}, size={self.partition_size // SECTOR}, type=83\n"
        )


@dataclass(frozen=True)
class TreeUsage:
    """What a tree takes on ext4: bytes of data in whole blocks, and inodes."""

    bytes: int
    inodes: int


def tree_usage(tree: Path) -> TreeUsage:
    """Bytes (files and directories in whole blocks) and inodes the tree takes on ext4.

    Hard links are counted once per name (an overestimate); symlinks shorter than 60
    bytes live in their inode.
    """
    total, inodes = FS_BLOCK, 1
    for dirpath, dirs, files in os.walk(tree):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            inodes += 1
            if stat.S_ISLNK(st.st_mode) and st.st_size < 60:
                continue
            total += max(1, -(-st.st_size // FS_BLOCK)) * FS_BLOCK
    return TreeUsage(total, inodes)


def layout_for(usage: TreeUsage) -> DiskLayout:
    """The smallest sensible layout for a tree: its data, ext4's overhead, a margin."""
    inode_bytes = usage.inodes * FS_INODE_SIZE * 2  # inode tables at twice the count
    need = usage.bytes * (1 + FS_SLACK) + inode_bytes + FS_HEADROOM
    # The inode ratio must give the tree its inodes too.
    need = max(need, usage.inodes * 2 * FS_INODE_RATIO)
    return DiskLayout(-(-int(need) // MIB) * MIB)


def mkfs_command(mkfs: str, tree: Path, image: Path, layout: DiskLayout, fs_uuid: str) -> list[str]:
    """``mkfs.ext4`` writing ``tree`` as the file system of partition 1, in place."""
    return [
        mkfs,
        "-q",
        "-F",
        "-d",
        os.fspath(tree),
        "-L",
        ROOT_LABEL,
        "-U",
        fs_uuid,
        "-b",
        str(FS_BLOCK),
        "-i",
        str(FS_INODE_RATIO),
        "-I",
        str(FS_INODE_SIZE),
        "-E",
        f"offset={PARTITION_START},hash_seed={fs_uuid},root_owner=0:0",
        os.fspath(image),
        str(layout.partition_size // FS_BLOCK),
    ]


def write_disk(
    tools: Mapping[str, str], tree: Path, raw: Path, layout: DiskLayout, key: str
) -> None:
    """The raw disk: ext4 of ``tree`` at 1 MiB, then the MBR naming it partition 1.

    The file system's UUID and the disk id come from the cache key: the same inputs
    give the same identifiers.
    """
    fs_uuid = str(uuid.UUID(key[:32]))
    with raw.open("wb") as f:
        f.truncate(layout.disk_size)
    run(mkfs_command(tools["mkfs.ext4"], tree, raw, layout, fs_uuid), timeout=1800)
    script = layout.sfdisk_script(int(key[32:40], 16))
    run([tools["sfdisk"], "--quiet", "--wipe", "never", raw], input=script.encode(), timeout=60)


# ---------------------------------------------------------------------------------------
# the kernel and its initrd


def kernel_files(tree: Path) -> tuple[Path, Path]:
    """The kernel and initrd the tree's ``/vmlinuz`` and ``/initrd.img`` links name."""
    found = []
    for link in ("vmlinuz", "initrd.img"):
        path = tree / link
        target = os.readlink(path) if path.is_symlink() else None
        # The links are relative (boot/vmlinuz-...) or absolute in the guest.
        real = tree / target.lstrip("/") if target else path
        if not real.is_file():
            raise CloudImageError(f"the tree has no /{link}", hint="is the kernel installed?")
        found.append(real)
    return found[0], found[1]


def check_initrd(listing: str, kernel_config: str) -> None:
    """Raise unless the initrd (``lsinitramfs`` output) can mount the root on /dev/vda1."""
    names = {os.path.basename(line.strip()).split(".ko")[0] for line in listing.splitlines()}
    missing = [m for m in INITRD_MODULES if m not in names]
    if "CONFIG_EXT4_FS=y" not in kernel_config.splitlines() and "ext4" not in names:
        missing.append("ext4")
    if missing:
        raise CloudImageError(
            "the initrd lacks " + ", ".join(missing) + ": the guest could not mount its root",
            hint="check MODULES in the tree's /etc/initramfs-tools/initramfs.conf",
        )


# ---------------------------------------------------------------------------------------
# inputs and the cache


def cache_inputs(
    packages: Sequence[Package], sources: Sequence[AptSource], files: Sequence[TreeFile]
) -> dict[str, object]:
    """Everything a build depends on, as the JSON stored in the sidecar file."""
    return {
        "builder_version": BUILDER_VERSION,
        "suite": SUITE,
        "sources": [
            {"uris": list(s.uris), "suites": list(s.suites), "components": list(s.components)}
            for s in sources
        ],
        "packages": {p.name: p.version for p in packages},
        "files": {
            f.path: {
                "mode": f"{f.mode:04o}",
                "sha256": hashlib.sha256(f.content.encode()).hexdigest(),
            }
            for f in files
        },
        "masked_units": sorted(MASKED_UNITS),
        "removed": list(REMOVED_GLOBS),
        "cmdline": KERNEL_CMDLINE,
        "root_label": ROOT_LABEL,
    }


def cache_key(inputs: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _sidecar(out_dir: Path) -> Path:
    return out_dir / f"{IMAGE_NAME}.inputs"


def recorded_key(out_dir: Path) -> str | None:
    """The key of the build in ``out_dir``, None unless all its outputs are there."""
    if not all((out_dir / name).is_file() for name in OUTPUT_NAMES):
        return None
    try:
        data = json.loads(_sidecar(out_dir).read_text())
    except (OSError, ValueError):
        return None
    key = data.get("key") if isinstance(data, dict) else None
    return key if isinstance(key, str) else None


# ---------------------------------------------------------------------------------------
# host programs and apt


def host_tools(names: Iterable[str] = HOST_TOOLS) -> dict[str, str]:
    """Absolute paths of ``names``; one error naming all missing ones."""
    found = {t: shutil.which(t, path=_TOOL_PATH) for t in names}
    missing = sorted(t for t, p in found.items() if p is None)
    if missing:
        packages = sorted({HOST_TOOLS.get(t, t) for t in missing})
        raise CloudImageError(
            "missing host tools: " + ", ".join(missing),
            hint="apt-get install " + " ".join(packages),
        )
    return {t: p for t, p in found.items() if p is not None}


def check_host_tools(log: Log = _stderr) -> dict[str, str]:
    """The programs the build runs, as root; debootstrap installed with apt if missing."""
    if os.geteuid() != 0:
        raise CloudImageError(
            "building the cloud image needs root (debootstrap, chroot, file ownership)",
            hint="sudo scripts/build-cloud-image",
        )
    if shutil.which("debootstrap", path=_TOOL_PATH) is None:
        log("installing debootstrap (apt-get install debootstrap)")
        apt_get = host_tools(["apt-get"])["apt-get"]
        run(
            [apt_get, "install", "-y", "-q", "--no-install-recommends", "debootstrap"],
            env={"DEBIAN_FRONTEND": "noninteractive"},
            timeout=600,
        )
    return host_tools()


def resolve_packages(tools: Mapping[str, str], log: Log = _stderr) -> list[Package]:
    """:data:`PACKAGES` and the real kernel package, at the versions apt resolves now."""
    records = apt_show(PACKAGES, tools["apt-cache"])
    kernel = resolve_kernel_package(records[KERNEL_METAPACKAGE])
    records.update(apt_show([kernel], tools["apt-cache"]))
    packages = sorted(Package(r["Package"], r["Version"]) for r in records.values())
    log("packages: " + ", ".join(f"{p.name} {p.version}" for p in packages))
    return packages


def _chroot(tools: Mapping[str, str], tree: Path, *args: str, timeout: float) -> None:
    run([tools["chroot"], tree, *args], env=CHROOT_ENV, timeout=timeout)


def debootstrap(tools: Mapping[str, str], tree: Path, mirror_uri: str, log: Log) -> None:
    log(f"debootstrap --variant=minbase {SUITE} from {mirror_uri} (about a minute)")
    run(
        [tools["debootstrap"], "--variant=minbase", SUITE, tree, mirror_uri],
        env={"DEBIAN_FRONTEND": "noninteractive"},
        timeout=1800,
    )


def install_packages(
    tools: Mapping[str, str],
    tree: Path,
    sources: Sequence[AptSource],
    packages: Sequence[Package],
    log: Log,
) -> None:
    """apt-get in the chroot: the pinned packages from bookworm, -updates and -security."""
    write_tree_file(
        tree, TreeFile("/etc/apt/sources.list.d/debian.sources", render_deb822(sources))
    )
    (tree / "etc/apt/sources.list").unlink(missing_ok=True)
    write_tree_file(tree, TreeFile("/usr/sbin/policy-rc.d", POLICY_RC_D, 0o755))
    log(f"apt-get install {len(packages)} packages in the chroot (about a minute)")
    _chroot(tools, tree, "apt-get", "update", "-q", timeout=900)
    pinned = [p.pinned for p in packages]
    try:
        _chroot(
            tools,
            tree,
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            *pinned,
            timeout=1800,
        )
    except ProcessExecutionError as exc:
        raise CloudImageError(
            f"apt-get install in the guest failed: {exc}",
            hint="run apt-get update on the host (the versions pinned come from its lists)",
        ) from exc


def configure_tree(tree: Path, files: Sequence[TreeFile]) -> None:
    for item in files:
        write_tree_file(tree, item)
    mask_units(tree)
    remove_leftovers(tree)


# ---------------------------------------------------------------------------------------
# the build


def _checkout_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.cfg").exists() else None


def default_output_dir() -> Path:
    """``<repo>/build/cloud-guest`` in a checkout, else ``./cloud-guest``."""
    root = _checkout_root()
    return (root / "build" if root is not None else Path.cwd()) / "cloud-guest"


@dataclass(frozen=True)
class CloudImage:
    """A built cloud guest: the disk, its kernel and ramdisk, and their command line."""

    image: Path
    kernel: Path
    ramdisk: Path
    cmdline: str


def _result(out_dir: Path) -> CloudImage:
    return CloudImage(
        out_dir / IMAGE_NAME,
        out_dir / KERNEL_NAME,
        out_dir / RAMDISK_NAME,
        (out_dir / CMDLINE_NAME).read_text().strip(),
    )


def mounts_below(mountinfo: str, path: Path) -> list[str]:
    """Mount points at or under ``path`` in ``/proc/self/mountinfo`` text, deepest first."""
    prefix = os.fspath(path).rstrip("/")
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = fields[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def remove_work_dir(path: Path) -> None:
    """Remove a work dir; first unmount what a killed debootstrap left mounted in it."""
    with contextlib.suppress(OSError):
        for point in mounts_below(Path("/proc/self/mountinfo").read_text(), path):
            run(["umount", "--lazy", point], check=False, timeout=60)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _work_dir(out_dir: Path) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(dir=out_dir, prefix=".build-"))
    try:
        yield work
    finally:
        remove_work_dir(work)


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """One build per output directory at a time; others wait."""
    with (out_dir / ".cloudimage.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class BuildPlan:
    """What one build makes the guest from; its :attr:`key` names the result."""

    sources: tuple[AptSource, ...]
    packages: tuple[Package, ...]
    files: tuple[TreeFile, ...]

    @property
    def inputs(self) -> dict[str, object]:
        return cache_inputs(self.packages, self.sources, self.files)

    @property
    def key(self) -> str:
        return cache_key(self.inputs)


def plan(tools: Mapping[str, str], log: Log = _stderr) -> BuildPlan:
    """The plan as the host's apt sources and lists give it now."""
    sources = tuple(guest_sources(host_sources()))
    packages = tuple(resolve_packages(tools, log))
    return BuildPlan(sources, packages, tuple(guest_files(sources)))


def make_tree(tools: Mapping[str, str], tree: Path, build_plan: BuildPlan, log: Log) -> None:
    """The guest's installed tree (not yet configured)."""
    started = time.monotonic()
    debootstrap(tools, tree, mirror(build_plan.sources), log)
    install_packages(tools, tree, build_plan.sources, build_plan.packages, log)
    log(f"tree installed in {time.monotonic() - started:.0f} s")


def make_outputs(
    tools: Mapping[str, str], tree: Path, work: Path, build_plan: BuildPlan, log: Log
) -> None:
    """From an installed tree, every output into ``work`` under its final name."""
    kernel, initrd = kernel_files(tree)
    listing = run(
        [tools["chroot"], tree, "lsinitramfs", "/" + os.fspath(initrd.relative_to(tree))],
        env=CHROOT_ENV,
        timeout=300,
    ).stdout
    release = kernel.name.removeprefix("vmlinuz-")
    check_initrd(listing, (tree / "boot" / f"config-{release}").read_text())
    shutil.copyfile(kernel, work / KERNEL_NAME)
    shutil.copyfile(initrd, work / RAMDISK_NAME)
    log(f"kernel {release}: vmlinuz and initrd.img copied out")

    configure_tree(tree, build_plan.files)
    usage = tree_usage(tree)
    layout = layout_for(usage)
    log(
        f"root file system: {usage.bytes / MIB:.0f} MiB in {usage.inodes} inodes, "
        f"partition 1 of {layout.partition_size / MIB:.0f} MiB"
    )
    raw = work / "disk.raw"
    write_disk(tools, tree, raw, layout, build_plan.key)
    log("qemu-img convert -c -O qcow2")
    run(
        [tools["qemu-img"], "convert", "-f", "raw", "-O", "qcow2", "-c", raw, work / IMAGE_NAME],
        timeout=1800,
    )
    raw.unlink()
    (work / CMDLINE_NAME).write_text(KERNEL_CMDLINE + "\n")


def build(out_dir: Path | None = None, *, force: bool = False, log: Log = _stderr) -> CloudImage:
    """Build the cloud guest into ``out_dir`` (unless up to date) and return it."""
    out_dir = (out_dir or default_output_dir()).absolute()
    started = time.monotonic()
    tools = check_host_tools(log)
    build_plan = plan(tools, log)
    key = build_plan.key
    if not force and recorded_key(out_dir) == key:
        log(f"{out_dir}: up to date, nothing to do")
        return _result(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir):
        if not force and recorded_key(out_dir) == key:
            log(f"{out_dir}: built meanwhile by another process, up to date")
            return _result(out_dir)
        had = (out_dir / IMAGE_NAME).exists()
        reason = "forced" if force else ("inputs changed" if had else "no image yet")
        log(f"building {out_dir} ({reason})")
        # Work dirs of a killed build (no other build runs here: we hold the lock).
        for stale in out_dir.glob(".build-*"):
            remove_work_dir(stale)
        with _work_dir(out_dir) as work:
            make_tree(tools, work / "tree", build_plan, log)
            make_outputs(tools, work / "tree", work, build_plan, log)
            _sidecar(out_dir).unlink(missing_ok=True)
            for name in OUTPUT_NAMES:
                publish(work / name, out_dir / name)
            record = {"key": key, "inputs": build_plan.inputs}
            sidecar = work / "inputs.json"
            sidecar.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            publish(sidecar, _sidecar(out_dir))
    size = (out_dir / IMAGE_NAME).stat().st_size
    elapsed = time.monotonic() - started
    log(f"wrote {out_dir / IMAGE_NAME} ({size / MIB:.0f} MiB) in {elapsed:.0f} s")
    return _result(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the image's kernel command line (its ``os_command_line``) on stdout."""
    return builder_main(
        argv,
        prog="build-cloud-image",
        description="Build a minimal Debian cloud guest (qcow2, kernel, initrd, command line).",
        out_help=f"output directory (default: {default_output_dir()})",
        out_metavar="OUT_DIR",
        build=lambda out, force: build(out, force=force).cmdline,
    )


if __name__ == "__main__":
    sys.exit(main())
