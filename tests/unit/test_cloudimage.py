"""Unit tests of the cloud guest builder's pure parts: apt sources, the cache key, the
files written into the tree, the disk layout (real sfdisk, mkfs.ext4, debugfs), the
initrd check and the command line. No debootstrap, no VM."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from minidriver.guestimages import cloudimage
from minidriver.guestimages.cloudimage import (
    AptSource,
    BuildPlan,
    CloudImageError,
    DiskLayout,
    Package,
    TreeFile,
    TreeUsage,
)
from minidriver.process import run

MIB = 1024 * 1024

# This host's /etc/apt/sources.list.d/debian.sources, with what else such files carry.
DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
Enabled: no
URIs: http://example.org/debian
Suites: bookworm
Components: main
"""

ONE_LINE = """\
# a comment
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://mirror.example/debian bookworm main
deb-src http://mirror.example/debian bookworm main
deb http://mirror.example/debian trixie main   # another release
deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
"""

BOOKWORM = AptSource(("http://deb.debian.org/debian",), ("bookworm", "bookworm-updates"), ("main",))
SECURITY = AptSource(("http://deb.debian.org/debian-security",), ("bookworm-security",), ("main",))


def _plan(**changes: object) -> BuildPlan:
    sources = (BOOKWORM, SECURITY)
    packages = (Package("cloud-init", "22.4.2-1+deb12u4"), Package("udev", "252.39-1~deb12u2"))
    plan = BuildPlan(sources, packages, tuple(cloudimage.guest_files(sources)))
    return dataclasses.replace(plan, **changes)  # type: ignore[arg-type]


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([os.environ["PATH"], "/usr/sbin", "/sbin"]))
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI (scripts/setup-host installs it)")
        pytest.skip(f"{name} not installed")
    return path


# ---------------------------------------------------------------------------------------
# apt sources


def test_deb822_sources_keep_enabled_binary_stanzas() -> None:
    assert cloudimage.parse_deb822_sources(DEB822) == [
        BOOKWORM,
        AptSource(
            ("http://deb.debian.org/debian-security",), ("bookworm-security",), ("main", "contrib")
        ),
    ]


def test_one_line_sources_skip_options_sources_and_comments() -> None:
    assert cloudimage.parse_sources_list(ONE_LINE) == [
        AptSource(("http://mirror.example/debian",), ("bookworm",), ("main",)),
        AptSource(("http://mirror.example/debian",), ("trixie",), ("main",)),
        AptSource(("https://packages.cloud.google.com/apt",), ("cloud-sdk-bookworm",), ("main",)),
    ]


def test_host_sources_read_list_and_sources_files_only(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(ONE_LINE)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "debian.sources").write_text(DEB822)
    (tmp_path / "d" / "nodesource.sources.disabled-by-farm").write_text(DEB822)
    found = cloudimage.host_sources(tmp_path / "sources.list", tmp_path / "d")
    assert len(found) == 3 + 2


def test_guest_sources_are_bookworm_updates_and_security_main_only() -> None:
    sources = cloudimage.parse_sources_list(ONE_LINE) + cloudimage.parse_deb822_sources(DEB822)
    assert cloudimage.guest_sources(sources) == [
        AptSource(("http://mirror.example/debian",), ("bookworm",), ("main",)),
        BOOKWORM,
        SECURITY,
    ]
    assert cloudimage.mirror(cloudimage.guest_sources(sources)) == "http://mirror.example/debian"


def test_no_bookworm_source_is_an_error_with_a_hint() -> None:
    with pytest.raises(CloudImageError, match="no apt source of Debian bookworm") as exc:
        cloudimage.guest_sources(cloudimage.parse_sources_list("deb http://x/debian trixie main"))
    assert exc.value.hint and "deb.debian.org" in exc.value.hint


def test_guest_sources_file_reads_back_as_the_same_sources() -> None:
    text = cloudimage.render_deb822([BOOKWORM, SECURITY])
    assert cloudimage.parse_deb822_sources(text) == [BOOKWORM, SECURITY]
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in text


# ---------------------------------------------------------------------------------------
# the cache key


def test_cache_key_is_stable_and_independent_of_package_order() -> None:
    plan = _plan()
    assert plan.key == _plan().key
    assert plan.key == _plan(packages=tuple(reversed(plan.packages))).key
    assert json.loads(json.dumps(plan.inputs)) == plan.inputs  # what the sidecar stores


@pytest.mark.parametrize(
    "change",
    [
        {
            "packages": (
                Package("cloud-init", "22.4.2-1+deb12u5"),
                Package("udev", "252.39-1~deb12u2"),
            )
        },
        {"packages": (Package("cloud-init", "22.4.2-1+deb12u4"),)},
        {"sources": (BOOKWORM,)},
        {"files": (TreeFile("/etc/fstab", "LABEL=other / ext4 defaults 0 1\n"),)},
        {
            "files": tuple(
                TreeFile(f.path, f.content, 0o600) for f in cloudimage.guest_files([BOOKWORM])
            )
        },
    ],
    ids=["version", "package", "source", "file", "mode"],
)
def test_cache_key_changes_with_each_input(change: dict[str, object]) -> None:
    assert _plan(**change).key != _plan().key


def test_cache_key_changes_with_the_builder_version(monkeypatch: pytest.MonkeyPatch) -> None:
    key = _plan().key
    monkeypatch.setattr(cloudimage, "BUILDER_VERSION", "0-test")
    assert _plan().key != key


def test_recorded_key_needs_every_output(tmp_path: Path) -> None:
    (tmp_path / "debian-cloud.qcow2.inputs").write_text(json.dumps({"key": "abc"}))
    for name in cloudimage.OUTPUT_NAMES[:-1]:
        (tmp_path / name).write_text("x")
    assert cloudimage.recorded_key(tmp_path) is None
    (tmp_path / cloudimage.OUTPUT_NAMES[-1]).write_text("x")
    assert cloudimage.recorded_key(tmp_path) == "abc"
    (tmp_path / "debian-cloud.qcow2.inputs").write_text("{not json")
    assert cloudimage.recorded_key(tmp_path) is None


# ---------------------------------------------------------------------------------------
# files written into the tree


def _files() -> dict[str, TreeFile]:
    return {f.path: f for f in cloudimage.guest_files([BOOKWORM, SECURITY])}


SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's cloud-init imports only under it
READ_CONF = """
import json, sys
from cloudinit import util
print(json.dumps(util.read_conf(sys.argv[1])))
"""


def _cloud_init() -> None:
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import cloudinit.util"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("cloud-init is missing in CI (apt-get install cloud-init)")
        pytest.skip("cloud-init is not installed (apt-get install cloud-init)")


def test_cloud_init_reads_the_config_drive_only(tmp_path: Path) -> None:
    _cloud_init()
    path = tmp_path / "99_minidriver.cfg"
    path.write_text(_files()["/etc/cloud/cloud.cfg.d/99_minidriver.cfg"].content)
    cfg = json.loads(run([SYSTEM_PYTHON, "-c", READ_CONF, path]).stdout)
    assert cfg["datasource_list"] == ["ConfigDrive", "None"]
    # growpart and resize_rootfs keep their defaults (on).
    assert "growpart" not in cfg
    assert "resize_rootfs" not in cfg


def test_cloud_init_config_passes_cloud_inits_own_schema(tmp_path: Path) -> None:
    _cloud_init()
    path = tmp_path / "99_minidriver.cfg"
    # The schema command checks user data, which starts with this line; the system
    # config in cloud.cfg.d has the same keys without it.
    content = _files()["/etc/cloud/cloud.cfg.d/99_minidriver.cfg"].content
    path.write_text("#cloud-config\n" + content)
    out = run([_tool("cloud-init"), "schema", "--config-file", path])
    assert "Valid cloud-config" in out.stdout


def test_fstab_mounts_the_root_by_its_label() -> None:
    lines = [
        line.split()
        for line in _files()["/etc/fstab"].content.splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines == [["LABEL=cloudimg-rootfs", "/", "ext4", "defaults,errors=remount-ro", "0", "1"]]


def test_interfaces_source_what_cloud_init_renders() -> None:
    lines = _files()["/etc/network/interfaces"].content.splitlines()
    assert "source /etc/network/interfaces.d/*" in lines
    assert "iface lo inet loopback" in lines


def test_machine_id_is_empty_for_first_boot() -> None:
    assert _files()["/etc/machine-id"].content == ""


def _fake_tree(root: Path) -> Path:
    """What the build leaves that configure_tree must change."""
    tree = root / "tree"
    for path, content in {
        "etc/ssh/ssh_host_ed25519_key": "secret",
        "etc/ssh/ssh_host_ed25519_key.pub": "public",
        "etc/ssh/sshd_config": "# kept\n",
        "etc/hostname": "buildhost\n",
        "etc/resolv.conf": "nameserver 10.255.255.53\n",
        "etc/apt/sources.list": "deb http://deb.debian.org/debian bookworm main\n",
        "etc/machine-id": "0123456789abcdef0123456789abcdef\n",
        "etc/network/interfaces": "# ifupdown's\n",
        "usr/sbin/policy-rc.d": "exit 101\n",
        "var/cache/apt/pkgcache.bin": "cache",
        "var/cache/apt/archives/udev_252_amd64.deb": "deb",
        "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease": "lists",
        "var/lib/apt/lists/lock": "",
        "var/log/dpkg.log": "log",
        "tmp/junk/file": "junk",
    }.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(content)
    wants = tree / "etc/systemd/system/timers.target.wants"
    wants.mkdir(parents=True)
    (wants / "apt-daily.timer").symlink_to("/lib/systemd/system/apt-daily.timer")
    (wants / "logrotate.timer").symlink_to("/lib/systemd/system/logrotate.timer")
    return tree


def test_configure_tree_writes_masks_and_removes(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path)
    cloudimage.configure_tree(tree, cloudimage.guest_files([BOOKWORM, SECURITY]))

    for item in cloudimage.guest_files([BOOKWORM, SECURITY]):
        path = tree / item.path.lstrip("/")
        assert path.read_text() == item.content
        assert path.stat().st_mode & 0o7777 == item.mode
    units = tree / "etc/systemd/system"
    for unit in cloudimage.MASKED_UNITS:
        assert os.readlink(units / unit) == "/dev/null"
    assert sorted(p.name for p in (units / "timers.target.wants").iterdir()) == ["logrotate.timer"]
    gone = [
        "etc/ssh/ssh_host_ed25519_key",
        "etc/ssh/ssh_host_ed25519_key.pub",
        "etc/hostname",
        "etc/resolv.conf",
        "etc/apt/sources.list",
        "usr/sbin/policy-rc.d",
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/archives/udev_252_amd64.deb",
        "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease",
        "var/log/dpkg.log",
        "tmp/junk",
    ]
    assert [p for p in gone if (tree / p).exists()] == []
    assert (tree / "etc/ssh/sshd_config").exists()
    assert (tree / "var/lib/apt/lists/lock").exists()
    assert (tree / "tmp").is_dir()


# ---------------------------------------------------------------------------------------
# the disk


def test_layout_is_mib_aligned_and_just_above_the_tree() -> None:
    usage = TreeUsage(bytes=423 * MIB, inodes=15835)
    layout = cloudimage.layout_for(usage)
    assert layout.partition_size % MIB == 0
    assert usage.bytes < layout.partition_size < 2 * usage.bytes
    assert layout.partition_size // cloudimage.FS_INODE_RATIO >= usage.inodes
    assert layout.disk_size == MIB + layout.partition_size
    with pytest.raises(ValueError):
        DiskLayout(MIB + 1)


def test_sfdisk_writes_one_linux_partition_at_1_mib(tmp_path: Path) -> None:
    layout = DiskLayout(20 * MIB)
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(layout.disk_size)
    run([_tool("sfdisk"), "--quiet", disk], input=layout.sfdisk_script(0x1234ABCD).encode())
    table = json.loads(run([_tool("sfdisk"), "--json", disk]).stdout)["partitiontable"]
    assert table["label"] == "dos"
    assert table["id"] == "0x1234abcd"
    [part] = table["partitions"]
    assert (part["start"], part["size"], part["type"]) == (2048, 20 * MIB // 512, "83")


def test_write_disk_puts_the_tree_on_partition_1(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/fstab").write_text(cloudimage.fstab())
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/blob").write_bytes(os.urandom(3 * MIB))
    (tree / "lib").symlink_to("usr/lib")
    usage = cloudimage.tree_usage(tree)
    assert usage.inodes == 7  # /, etc, fstab, usr, usr/lib, blob, the lib symlink
    layout = cloudimage.layout_for(usage)
    tools = {t: _tool(t) for t in ("mkfs.ext4", "sfdisk")}
    raw = tmp_path / "disk.raw"
    key = "0123456789abcdef" * 4

    cloudimage.write_disk(tools, tree, raw, layout, key)

    assert raw.stat().st_size == layout.disk_size
    table = json.loads(run([tools["sfdisk"], "--json", raw]).stdout)["partitiontable"]
    [part] = table["partitions"]
    assert part["start"] * 512 == MIB and part["size"] * 512 == layout.partition_size
    # The partition's bytes are an ext4 holding the tree, labelled as fstab says.
    fs = tmp_path / "part1"
    with raw.open("rb") as src, fs.open("wb") as dst:
        src.seek(MIB)
        shutil.copyfileobj(src, dst)
    header = run([_tool("dumpe2fs"), "-h", fs]).stdout
    assert "Filesystem volume name:   cloudimg-rootfs" in header
    assert "Filesystem UUID:          01234567-89ab-cdef-0123-456789abcdef" in header
    assert "Block size:               4096" in header
    assert "Block count:              " + str(layout.partition_size // 4096) in header
    fstab = run([_tool("debugfs"), "-R", "cat /etc/fstab", fs]).stdout
    assert fstab == cloudimage.fstab()
    link = run([_tool("debugfs"), "-R", "stat /lib", fs]).stdout
    assert 'Fast link dest: "usr/lib"' in link
    run([_tool("e2fsck"), "-fn", fs])


# ---------------------------------------------------------------------------------------
# kernel, initrd, command line


def test_kernel_files_follow_the_tree_links(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "boot").mkdir(parents=True)
    (tree / "boot/vmlinuz-6.1.0-56-cloud-amd64").write_bytes(b"kernel")
    (tree / "boot/initrd.img-6.1.0-56-cloud-amd64").write_bytes(b"initrd")
    (tree / "vmlinuz").symlink_to("boot/vmlinuz-6.1.0-56-cloud-amd64")
    (tree / "initrd.img").symlink_to("/boot/initrd.img-6.1.0-56-cloud-amd64")  # absolute
    kernel, initrd = cloudimage.kernel_files(tree)
    assert kernel == tree / "boot/vmlinuz-6.1.0-56-cloud-amd64"
    assert initrd == tree / "boot/initrd.img-6.1.0-56-cloud-amd64"
    (tree / "boot/initrd.img-6.1.0-56-cloud-amd64").unlink()
    with pytest.raises(CloudImageError, match=r"no /initrd\.img"):
        cloudimage.kernel_files(tree)


LISTING = """\
usr/lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/block/virtio_blk.ko
usr/lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/virtio/virtio_pci.ko
usr/lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/virtio/virtio_ring.ko
"""


def test_initrd_check_accepts_built_in_or_module_ext4() -> None:
    cloudimage.check_initrd(LISTING, "CONFIG_EXT4_FS=y\n")
    cloudimage.check_initrd(LISTING + "usr/lib/modules/x/kernel/fs/ext4/ext4.ko\n", "")


def test_initrd_check_names_what_is_missing() -> None:
    listing = LISTING.replace("block/virtio_blk.ko", "block/loop.ko")
    with pytest.raises(CloudImageError, match="lacks virtio_blk, ext4"):
        cloudimage.check_initrd(listing, "CONFIG_EXT4_FS=m\n")


def test_command_line_mounts_partition_1_and_logs_to_serial() -> None:
    args = cloudimage.KERNEL_CMDLINE.split()
    assert args[0] == "root=/dev/vda1"
    assert "ro" in args
    assert args[-1] == "console=ttyS0"  # the last console= is /dev/console


# ---------------------------------------------------------------------------------------
# work dirs


def test_mounts_below_lists_deepest_first() -> None:
    mountinfo = (
        "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "30 22 0:5 / /out/.build-x/tree/proc rw - proc proc rw\n"
        "31 22 0:6 / /out/.build-x/tree/sys rw - sysfs sysfs rw\n"
        "32 31 0:7 / /out/.build-x/tree/sys/kernel/security rw - securityfs s rw\n"
        "33 22 0:8 / /out/.build-xy/tree/proc rw - proc proc rw\n"
        "34 22 0:9 / /out/.build-x/with\\040space rw - tmpfs t rw\n"
    )
    assert cloudimage.mounts_below(mountinfo, Path("/out/.build-x")) == [
        "/out/.build-x/tree/sys/kernel/security",
        "/out/.build-x/with space",
        "/out/.build-x/tree/proc",
        "/out/.build-x/tree/sys",
    ]


def test_a_failed_build_leaves_no_work_dir_and_keeps_the_old_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the build runs as root only")
    _tool("debootstrap")
    out = tmp_path / "out"
    out.mkdir()
    for name in cloudimage.OUTPUT_NAMES:
        (out / name).write_text(f"old {name}\n")
    (out / "debian-cloud.qcow2.inputs").write_text(json.dumps({"key": "old"}))

    def fail(tools: object, tree: Path, plan: object, log: object) -> None:
        (tree / "etc").mkdir(parents=True)
        raise OSError("injected: disk full")

    monkeypatch.setattr(cloudimage, "make_tree", fail)
    with pytest.raises(OSError, match="injected"):
        cloudimage.build(out, log=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*cloudimage.OUTPUT_NAMES, "debian-cloud.qcow2.inputs", ".cloudimage.lock"]
    )
    assert (out / "vmlinuz").read_text() == "old vmlinuz\n"
    assert cloudimage.recorded_key(out) == "old"


def test_script_prints_usage() -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "build-cloud-image"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert "OUT_DIR" in proc.stdout.upper() and "--force" in proc.stdout
