"""Unit tests of the test guest image builder's pure parts (no download, no VM)."""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from minidriver.guestimages import initramfs, testimage
from minidriver.guestimages.initramfs import (
    CpioEntry,
    ModuleTree,
    cpio_chardev,
    cpio_dir,
    cpio_file,
    cpio_symlink,
    write_cpio,
)
from minidriver.guestimages.testimage import Deb
from minidriver.process import run

# ---------------------------------------------------------------------------------------
# helpers


@dataclass
class Member:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    name: str
    data: bytes


def parse_newc(archive: bytes) -> list[Member]:
    """An independent reader of cpio "newc" archives, strict about alignment."""
    members: list[Member] = []
    off = 0
    while True:
        assert archive[off : off + 6] == b"070701", f"bad magic at {off}"
        f = [int(archive[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, check = f
        assert check == 0
        name_start = off + 110
        name = archive[name_start : name_start + namesize]
        assert name.endswith(b"\0")
        data_start = (name_start + namesize + 3) & ~3
        data = archive[data_start : data_start + size]
        off = (data_start + size + 3) & ~3
        if name == b"TRAILER!!!\0":
            assert off == len(archive)
            return members
        members.append(
            Member(ino, mode, uid, gid, nlink, mtime, (rmaj, rmin), name[:-1].decode(), data)
        )


def make_module_elf(modinfo: dict[str, str]) -> bytes:
    """A minimal ELF64 relocatable file with a .modinfo section, as a .ko has."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    info_off = 64
    shstr_off = info_off + len(info)
    shoff = (shstr_off + len(shstrtab) + 7) & ~7
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)

    def shdr(name: int, kind: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, kind, 0, 0, offset, size, 0, 0, 1, 0)

    body = ehdr + info + shstrtab
    body += bytes(shoff - len(body))
    return (
        body
        + shdr(0, 0, 0, 0)
        + shdr(1, 1, info_off, len(info))  # .modinfo, PROGBITS
        + shdr(10, 3, shstr_off, len(shstrtab))  # .shstrtab, STRTAB
    )


SAMPLE = [
    cpio_file("init", b"#!/bin/sh\necho hi\n", 0o755),
    cpio_symlink("bin/sh", "busybox"),
    cpio_file("bin/busybox", b"\x7fELF" + bytes(1001), 0o755),
    cpio_chardev("dev/console", 5, 1),
    cpio_file("lib/modules/a.ko", b"abc"),
    cpio_dir("tmp", 0o1777),
]

# ---------------------------------------------------------------------------------------
# cpio


def test_cpio_round_trip() -> None:
    members = {m.name: m for m in parse_newc(write_cpio(SAMPLE))}

    # Parents added, everything sorted (parents therefore before children).
    assert list(members) == [
        "bin",
        "bin/busybox",
        "bin/sh",
        "dev",
        "dev/console",
        "init",
        "lib",
        "lib/modules",
        "lib/modules/a.ko",
        "tmp",
    ]
    assert members["init"].data == b"#!/bin/sh\necho hi\n"
    assert members["init"].mode == stat.S_IFREG | 0o755
    assert members["bin/busybox"].data == b"\x7fELF" + bytes(1001)
    assert members["bin/sh"].mode == stat.S_IFLNK | 0o777
    assert members["bin/sh"].data == b"busybox"
    assert members["dev/console"].mode == stat.S_IFCHR | 0o600
    assert members["dev/console"].rdev == (5, 1)
    assert members["lib"].mode == stat.S_IFDIR | 0o755
    assert members["tmp"].mode == stat.S_IFDIR | 0o1777
    assert members["lib"].nlink == 2
    assert members["init"].nlink == 1
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == 0 for m in members.values())
    assert [m.ino for m in members.values()] == list(range(1, len(members) + 1))


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs GNU cpio")
def test_cpio_read_by_gnu_cpio() -> None:
    listing = run(["cpio", "-i", "-t", "-v", "--quiet"], input=write_cpio(SAMPLE)).stdout
    lines = listing.splitlines()
    assert [line.split()[-1] for line in lines if "->" not in line] == [
        "bin",
        "bin/busybox",
        "dev",
        "dev/console",
        "init",
        "lib",
        "lib/modules",
        "lib/modules/a.ko",
        "tmp",
    ]
    assert any(re.search(r"^lrwxrwxrwx .* bin/sh -> busybox$", line) for line in lines)
    assert any(re.search(r"^crw------- .* 5, +1 .* dev/console$", line) for line in lines)
    assert any(re.search(r"^-rwxr-xr-x .* 1005 .* bin/busybox$", line) for line in lines)


def test_cpio_is_deterministic_whatever_the_order() -> None:
    assert write_cpio(SAMPLE) == write_cpio(list(reversed(SAMPLE)))


@pytest.mark.parametrize(
    "entries",
    [
        [cpio_file("a", b"1"), cpio_file("a", b"2")],
        [cpio_file("a", b"1"), cpio_file("/a/", b"2")],
        [cpio_file("../etc/passwd", b"")],
        [cpio_file("", b"")],
        [cpio_file("a", b"1"), cpio_file("a/b", b"2")],
        [CpioEntry("d", stat.S_IFDIR | 0o755, b"data")],
    ],
)
def test_cpio_rejects_bad_entries(entries: list[CpioEntry]) -> None:
    with pytest.raises(ValueError):
        write_cpio(entries)


def test_initramfs_layout_and_determinism() -> None:
    modules = [("virtio", b"V" * 10), ("virtio_blk", b"B" * 20)]
    one = testimage.make_initramfs(b"#!/bin/sh\n", b"BB", modules)
    assert one == testimage.make_initramfs(b"#!/bin/sh\n", b"BB", modules)
    assert one[4:8] == b"\0\0\0\0"  # gzip header mtime 0
    members = {m.name: m for m in parse_newc(gzip.decompress(one))}
    assert members["init"].mode == stat.S_IFREG | 0o755
    assert members["etc/minidriver/modules"].data == b"virtio\nvirtio_blk\n"
    assert members["lib/modules/virtio_blk.ko"].data == b"B" * 20
    assert members["dev/console"].rdev == (5, 1)
    assert members["bin/sh"].data == b"busybox"


# ---------------------------------------------------------------------------------------
# modules

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/cdrom/cdrom.ko.xz:
kernel/drivers/scsi/sr_mod.ko.xz: kernel/drivers/scsi/scsi_mod.ko \
kernel/drivers/cdrom/cdrom.ko.xz kernel/drivers/scsi/scsi_common.ko
kernel/fs/nls/nls_iso8859-1.ko:
kernel/fs/fat/fat.ko: kernel/fs/nls/nls_base.ko
kernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko kernel/fs/nls/nls_base.ko
"""
MODULES_BUILTIN = "kernel/fs/nls/nls_base.ko\nkernel/drivers/input/evdev.ko\n"


def _dep_lookup(text: str = MODULES_DEP) -> Callable[[str], list[str]]:
    deps = initramfs.parse_modules_dep(text.replace("\\\n", ""))
    return lambda name: deps[name]


def _assert_load_order(order: list[str], deps: Callable[[str], list[str]]) -> None:
    for i, name in enumerate(order):
        assert set(deps(name)) - {"nls_base"} <= set(order[:i]), name


def test_module_name() -> None:
    assert initramfs.module_name("kernel/fs/nls/nls_iso8859-1.ko") == "nls_iso8859_1"
    assert initramfs.module_name("kernel/drivers/cdrom/cdrom.ko.xz") == "cdrom"
    assert initramfs.module_name("sr_mod.ko.zst") == "sr_mod"
    assert initramfs.module_name("nls_iso8859-1") == "nls_iso8859_1"


def test_parse_modules_dep() -> None:
    deps = initramfs.parse_modules_dep(MODULES_DEP.replace("\\\n", ""))
    assert deps["sr_mod"] == ["scsi_mod", "cdrom", "scsi_common"]
    assert deps["virtio"] == []
    assert deps["nls_iso8859_1"] == []
    with pytest.raises(ValueError):
        initramfs.parse_modules_dep("no colon here\n")


def test_resolve_modules_orders_dependencies_first() -> None:
    deps = _dep_lookup()
    builtin = initramfs.parse_modules_builtin(MODULES_BUILTIN)
    wanted = ["virtio_pci", "virtio_blk", "sr_mod", "vfat", "nls_iso8859-1", "evdev"]
    order = initramfs.resolve_modules(wanted, deps, builtin)
    # Depth first, in the order asked for and the order modules.dep lists dependencies.
    assert order == [
        "virtio_ring",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio",
        "virtio_pci",
        "virtio_blk",
        "scsi_common",
        "scsi_mod",
        "cdrom",
        "sr_mod",
        "fat",
        "vfat",
        "nls_iso8859_1",
    ]
    _assert_load_order(order, deps)
    assert "evdev" not in order  # built in
    assert "nls_base" not in order  # built in, though a dependency


def test_resolve_modules_with_direct_dependencies_only() -> None:
    # modinfo's depends= lists direct dependencies; the result must still be complete.
    direct = {"a": ["b"], "b": ["c"], "c": [], "d": ["c", "a"]}
    order = initramfs.resolve_modules(["d"], lambda n: direct[n])
    assert order == ["c", "b", "a", "d"]


def test_resolve_modules_errors() -> None:
    with pytest.raises(ValueError, match=r"kernel module scsi_mod not found.*needed by sr_mod"):
        initramfs.resolve_modules(["sr_mod"], lambda n: {"sr_mod": ["scsi_mod"]}[n])
    with pytest.raises(ValueError, match=r"kernel module nope not found$"):
        initramfs.resolve_modules(["nope"], _dep_lookup())
    cyclic = {"a": ["b"], "b": ["a"]}
    with pytest.raises(ValueError, match=r"cycle: a -> b -> a"):
        initramfs.resolve_modules(["a"], lambda n: cyclic[n])


def test_read_modinfo() -> None:
    elf = make_module_elf({"license": "GPL", "depends": "virtio,virtio_ring", "name": "vb"})
    assert ("license", "GPL") in initramfs.read_modinfo(elf)
    assert initramfs.modinfo_depends(elf) == ["virtio", "virtio_ring"]
    assert initramfs.modinfo_depends(make_module_elf({"depends": ""})) == []
    with pytest.raises(ValueError):
        initramfs.read_modinfo(b"not an elf file at all, really not" * 3)


def _fake_kernel(root: Path, with_modules_dep: bool) -> ModuleTree:
    moddir = root / "lib" / "modules" / "6.1.0-99-cloud-amd64"
    files = {
        "kernel/drivers/virtio/virtio.ko": {"depends": ""},
        "kernel/drivers/virtio/virtio_ring.ko": {"depends": "virtio"},
        "kernel/drivers/block/virtio_blk.ko.xz": {"depends": "virtio,virtio_ring"},
        "kernel/fs/nls/nls_iso8859-1.ko": {"depends": "nls_base"},
    }
    for rel, info in files.items():
        path = moddir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        elf = make_module_elf(info)
        path.write_bytes(lzma.compress(elf) if rel.endswith(".xz") else elf)
    (moddir / "modules.builtin").write_text("kernel/fs/nls/nls_base.ko\n")
    if with_modules_dep:
        # Deliberately different from the modinfo data: proves which one is used.
        (moddir / "modules.dep").write_text(
            "kernel/drivers/virtio/virtio.ko:\n"
            "kernel/drivers/virtio/virtio_ring.ko:\n"
            "kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko\n"
            "kernel/fs/nls/nls_iso8859-1.ko:\n"
        )
    return ModuleTree(moddir)


def test_module_tree_from_modinfo(tmp_path: Path) -> None:
    tree = _fake_kernel(tmp_path, with_modules_dep=False)
    assert tree.release == "6.1.0-99-cloud-amd64"
    assert tree.resolve(["virtio_blk", "nls_iso8859-1"]) == [
        "virtio",
        "virtio_ring",
        "virtio_blk",
        "nls_iso8859_1",
    ]
    assert tree.read("virtio_blk")[:4] == b"\x7fELF"  # decompressed
    with pytest.raises(ValueError, match="not found"):
        tree.resolve(["ata_piix"])


def test_module_tree_prefers_modules_dep(tmp_path: Path) -> None:
    tree = _fake_kernel(tmp_path, with_modules_dep=True)
    assert tree.resolve(["virtio_blk"]) == ["virtio", "virtio_blk"]


# ---------------------------------------------------------------------------------------
# apt records, cache key, boot record, paths

APT_SHOW = """\
Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Architecture: amd64
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description: Linux for x86-64 cloud (meta-package)
 This package depends on the latest Linux kernel
 and modules for use on cloud platforms.
Size: 1504
SHA256: 00be21c0

Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Architecture: amd64
Size: 928188
SHA256: 3d3fdbe9
"""


def test_parse_apt_records_and_kernel_package() -> None:
    meta, busybox = testimage.parse_apt_records(APT_SHOW)
    assert meta["Description"].endswith("\nand modules for use on cloud platforms.")
    assert testimage.resolve_kernel_package(meta) == "linux-image-6.1.0-56-cloud-amd64=6.1.192-2"
    unpinned = {
        **meta,
        "Depends": "initramfs-tools | linux-initramfs-tool, linux-image-6.1.0-9-amd64",
    }
    assert testimage.resolve_kernel_package(unpinned) == "linux-image-6.1.0-9-amd64"
    with pytest.raises(testimage.TestImageError):
        testimage.resolve_kernel_package({"Package": "x", "Depends": "libc6"})
    deb = testimage._deb(busybox)
    assert deb == Deb("busybox-static", "1:1.35.0-4+deb12u1+b1", "amd64", "3d3fdbe9", 928188)
    assert deb.filename == "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"


KERNEL = Deb("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2", "amd64", "aa" * 32, 1)
BUSYBOX = Deb("busybox-static", "1:1.35.0-4+deb12u1+b1", "amd64", "bb" * 32, 2)


def test_cache_key_follows_the_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    init = b"#!/bin/sh\nsay up\n"
    key = testimage.cache_key(testimage.cache_inputs([KERNEL, BUSYBOX], init))
    assert key == testimage.cache_key(testimage.cache_inputs([BUSYBOX, KERNEL], init))
    newer_kernel = Deb("linux-image-6.1.0-57-cloud-amd64", "6.1.193-1", "amd64", "cc" * 32, 1)
    rebuilt_busybox = Deb(BUSYBOX.package, BUSYBOX.version, "amd64", "dd" * 32, 2)
    changed = [
        testimage.cache_inputs([newer_kernel, BUSYBOX], init),
        testimage.cache_inputs([KERNEL, rebuilt_busybox], init),
        testimage.cache_inputs([KERNEL, BUSYBOX], init + b"say ready\n"),
    ]
    monkeypatch.setattr(testimage, "BUILDER_VERSION", testimage.BUILDER_VERSION + "-next")
    changed.append(testimage.cache_inputs([KERNEL, BUSYBOX], init))
    keys = {testimage.cache_key(inputs) for inputs in changed}
    assert key not in keys
    assert len(keys) == len(changed)


def test_boot_record() -> None:
    sector = testimage.boot_record(0)
    assert len(sector) == testimage.BOOT_RECORD_SIZE == 512
    assert sector.startswith(b"MINIDRIVER-BOOTREC-1 count=0000000000\n")
    assert testimage.parse_boot_record(sector) == 0
    assert testimage.parse_boot_record(testimage.boot_record(42)) == 42
    assert testimage.parse_boot_record(bytes(512)) is None
    assert testimage.parse_boot_record(b"MINIDRIVER-BOOTREC-1 count=x\n") is None


def test_init_script_agrees_with_the_builder() -> None:
    script = testimage.init_script().decode()
    assert script.startswith("#!/bin/sh\n")
    assert f"REC_MAGIC={testimage.BOOT_RECORD_MAGIC.decode()}\n" in script
    assert f"REC_OFFSET={testimage.BOOT_RECORD_OFFSET}\n" in script
    assert f"REC_SECTOR={testimage.BOOT_RECORD_OFFSET // 512}\n" in script
    assert "/etc/minidriver/modules" in script
    for line in ("up", "ready", "disk ", "boot-count ", "config-drive uuid="):
        assert f'say "{line}' in script or f"say {line}" in script
    for late in ("disk-added ", "disk-removed ", "power-button, ignored"):
        assert f'late "{late}' in script
    assert f"PROMPT='{testimage.CONSOLE_PROMPT}'\n" in script
    assert f"meta {testimage.META_IGNORE_POWER_BUTTON})" in script
    assert f"meta {testimage.META_DIRTY_MEMORY_MB})" in script
    assert testimage.FAT_SIZE < testimage.BOOT_RECORD_OFFSET < testimage.DISK_SIZE


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox")
def test_init_script_parses_under_busybox_sh(tmp_path: Path) -> None:
    script = tmp_path / "init"
    script.write_bytes(testimage.init_script())
    run(["busybox", "sh", "-n", script])


def test_syslinux_cfg() -> None:
    cfg = testimage.syslinux_cfg()
    assert "PROMPT 0\n" in cfg
    assert "KERNEL vmlinuz\n" in cfg
    assert "INITRD initrd.img\n" in cfg
    assert re.search(r"^  APPEND .*\bconsole=ttyS0\b", cfg, re.MULTILINE)


def test_output_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert testimage.output_path(tmp_path) == tmp_path / testimage.IMAGE_NAME
    assert (
        testimage.output_path(tmp_path / "new-dir") == tmp_path / "new-dir" / testimage.IMAGE_NAME
    )
    assert testimage.output_path(tmp_path / "g.qcow2") == tmp_path / "g.qcow2"
    assert testimage.output_path(None).name == testimage.IMAGE_NAME
    repo = Path(testimage.__file__).resolve().parents[2]
    if (repo / "setup.cfg").exists():  # running from a checkout: <repo>/build
        assert testimage.default_output_dir() == repo / "build"
    else:
        monkeypatch.setenv("MINIDRIVER_STATE_DIR", str(tmp_path))
        assert testimage.default_output_dir() == tmp_path / "test-image"


def test_iso_output_paths(tmp_path: Path) -> None:
    iso = testimage.ISO_NAME
    assert testimage.output_path(tmp_path, iso) == tmp_path / iso
    assert testimage.output_path(tmp_path / "g.iso", iso) == tmp_path / "g.iso"
    assert testimage.output_path(tmp_path / "g.qcow2", iso) == tmp_path / "g.qcow2" / iso
    assert testimage.output_path(None, iso) == testimage.default_output_dir() / iso


def test_the_iso_is_an_el_torito_cd_that_isolinux_boots(tmp_path: Path) -> None:
    args = [str(a) for a in testimage.mkisofs_args(tmp_path / "tree", tmp_path / "x.iso")]
    assert args[:2] == ["-as", "mkisofs"]
    assert args[args.index("-b") + 1] == "isolinux/isolinux.bin"
    assert {"-no-emul-boot", "-boot-info-table"} <= set(args)
    # No MBR: a hybrid ISO is also a partitioned disk, a polyglot the checks refuse.
    assert not [a for a in args if "hybrid" in a or "mbr" in a.lower()]
    assert args[-1] == str(tmp_path / "tree")


@pytest.mark.parametrize(
    ("argv", "built"),
    [
        ([], [("qcow2", None, False)]),
        (["out.qcow2", "--force"], [("qcow2", Path("out.qcow2"), True)]),
        (["--iso"], [("iso", None, False)]),
        (["--iso", "dir", "--force"], [("iso", Path("dir"), True)]),
    ],
)
def test_build_test_image_builds_the_qcow2_or_with_iso_the_iso(
    argv: list[str], built: list[tuple[str, Path | None, bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, Path | None, bool]] = []
    # The builds themselves download and build for real (the integration tests' fixtures);
    # here only which one the command line runs.
    monkeypatch.setattr(testimage, "build", lambda out, force: calls.append(("qcow2", out, force)))
    monkeypatch.setattr(
        testimage, "build_iso", lambda out, force: calls.append(("iso", out, force))
    )
    assert testimage.main(argv) == 0
    assert calls == built


def test_missing_host_tool_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(testimage.HOST_TOOLS, "no-such-tool-4d4447", "pkg-4d4447")
    with pytest.raises(testimage.TestImageError) as err:
        testimage.check_host_tools()
    assert "no-such-tool-4d4447" in str(err.value)
    assert err.value.hint is not None
    assert "pkg-4d4447" in err.value.hint
