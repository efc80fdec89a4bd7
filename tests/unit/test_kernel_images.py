"""Kernel and ramdisk images (Nova's AKI/ARI) on libvirt's test driver.

A disk image names a kernel (aki) and a ramdisk (ari) in the store by its
``kernel_id``/``ramdisk_id`` properties and may give ``os_command_line``. spawn fetches
them through ``_base`` like any image, copies them into the instance dir and the domain
boots them directly: ``<kernel>``, ``<initrd>``, ``<cmdline>``. The "kernel" here is a
few hundred KiB of bytes that are no disk: neither the store nor spawn may show them to
qemu-img, and libvirt's test driver never runs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from lxml import etree

from minidriver.cli import main
from minidriver.config import load_config
from minidriver.driver import LibvirtDriver, base_filename
from minidriver.exception import ImageNotFound, ImageUnacceptable
from minidriver.host import Host

MiB = 1024**2


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def boot_files(tmp_path: Path) -> dict[str, Path]:
    """A "kernel" and a "ramdisk": distinct bytes, no disk format in them."""
    files = {}
    for name, size, seed in (("vmlinuz", 300_000, b"k"), ("initrd.img", 200_000, b"r")):
        path = tmp_path / name
        path.write_bytes(hashlib.shake_256(seed).digest(size))
        files[name] = path
    return files


@pytest.fixture
def disk_image(tmp_path: Path) -> Path:
    path = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(64 * MiB)], check=True)
    return path


def add_kernel_image(
    drv: LibvirtDriver,
    boot_files: dict[str, Path],
    disk_image: Path,
    *,
    ramdisk: bool = True,
    cmdline: str | None = None,
) -> dict[str, str]:
    kernel = drv.images.add(boot_files["vmlinuz"], name="vmlinuz", disk_format="aki")
    properties = {"kernel_id": kernel.id}
    ids = {"kernel": kernel.id}
    if ramdisk:
        initrd = drv.images.add(boot_files["initrd.img"], name="initrd", disk_format="ari")
        properties["ramdisk_id"] = initrd.id
        ids["ramdisk"] = initrd.id
    if cmdline is not None:
        properties["os_command_line"] = cmdline
    disk = drv.images.add(disk_image, name="cloud", disk_format="qcow2", properties=properties)
    ids["disk"] = disk.id
    return ids


def domain_os(drv: LibvirtDriver, name: str) -> etree._Element:
    domain = drv.host.get_connection().lookupByName(name)
    os_element = etree.fromstring(domain.XMLDesc(0).encode()).find("os")
    assert os_element is not None
    return os_element


def test_spawn_boots_the_kernel_and_ramdisk_the_image_names(
    drv: LibvirtDriver, boot_files: dict[str, Path], disk_image: Path
) -> None:
    cmdline = "root=/dev/vda1 ro console=ttyS0"
    ids = add_kernel_image(drv, boot_files, disk_image, cmdline=cmdline)
    instance = drv.spawn("k1", "cloud", "t1.nano")

    instance_dir = Path(instance.instance_dir)
    os_element = domain_os(drv, instance.name)
    assert os_element.findtext("kernel") == os.fspath(instance_dir / "kernel")
    assert os_element.findtext("initrd") == os.fspath(instance_dir / "ramdisk")
    assert os_element.findtext("cmdline") == cmdline
    # The bytes the store holds, through _base, into the instance dir.
    for name, source, image in (
        ("kernel", boot_files["vmlinuz"], ids["kernel"]),
        ("ramdisk", boot_files["initrd.img"], ids["ramdisk"]),
    ):
        assert sha256(instance_dir / name) == sha256(source)
        assert sha256(drv.conf.base_dir / base_filename(image)) == sha256(source)
    assert instance.timings["kernel_ramdisk"] > 0
    record = drv.db.get_instance(instance.uuid)
    assert (record.kernel_id, record.ramdisk_id) == (ids["kernel"], ids["ramdisk"])
    # The cache manager must not take the kernel or ramdisk from a living instance.
    in_use = drv.bases_in_use()
    for image in (ids["disk"], ids["kernel"], ids["ramdisk"]):
        assert in_use[base_filename(image)] == {instance.uuid}

    drv.destroy(instance.uuid)
    assert not instance_dir.exists()
    for image in ids.values():
        assert (drv.conf.base_dir / base_filename(image)).is_file()  # the cache stays
    assert drv.bases_in_use() == {}


def test_second_spawn_reuses_the_cached_kernel(
    drv: LibvirtDriver, boot_files: dict[str, Path], disk_image: Path
) -> None:
    ids = add_kernel_image(drv, boot_files, disk_image)
    drv.spawn("k1", "cloud", "t1.nano")
    kernel_base = drv.conf.base_dir / base_filename(ids["kernel"])
    inode = kernel_base.stat().st_ino
    second = drv.spawn("k2", "cloud", "t1.nano")
    assert kernel_base.stat().st_ino == inode
    assert sha256(Path(second.instance_dir) / "kernel") == sha256(boot_files["vmlinuz"])


def test_nova_default_command_line_and_no_initrd(
    drv: LibvirtDriver, boot_files: dict[str, Path], disk_image: Path
) -> None:
    add_kernel_image(drv, boot_files, disk_image, ramdisk=False)
    instance = drv.spawn("k1", "cloud", "t1.nano")
    os_element = domain_os(drv, instance.name)
    # Nova's CONSOLE, and no_timer_check under virt_type = qemu (the test driver's).
    assert os_element.findtext("cmdline") == (
        "root=/dev/vda console=tty0 console=ttyS0 console=hvc0 no_timer_check"
    )
    assert os_element.find("initrd") is None
    assert not (Path(instance.instance_dir) / "ramdisk").exists()
    assert drv.db.get_instance(instance.uuid).ramdisk_id == ""


def assert_nothing_written(drv: LibvirtDriver) -> None:
    assert drv.db.list_instances() == []
    assert drv.host.get_connection().listAllDomains() == []
    leftovers = [p for p in drv.conf.instances_path.iterdir() if p.name != "_base"]
    assert leftovers == []


@pytest.mark.parametrize(
    ("properties", "error", "message"),
    [
        ({"kernel_id": "no-such-image"}, ImageNotFound, "kernel_id 'no-such-image' is not in"),
        ({"kernel_id": "DISK"}, ImageUnacceptable, "a qcow2 image, not aki"),
        ({"kernel_id": "KERNEL", "ramdisk_id": "KERNEL"}, ImageUnacceptable, "aki image, not ari"),
        ({"ramdisk_id": "RAMDISK"}, ImageUnacceptable, "names a ramdisk_id but no kernel_id"),
    ],
)
def test_bad_kernel_references_are_refused_before_anything_is_written(
    drv: LibvirtDriver,
    boot_files: dict[str, Path],
    disk_image: Path,
    properties: dict[str, str],
    error: type[Exception],
    message: str,
) -> None:
    drv.conf.instances_path.mkdir(parents=True, exist_ok=True)
    kernel = drv.images.add(boot_files["vmlinuz"], name="vmlinuz", disk_format="aki")
    ramdisk = drv.images.add(boot_files["initrd.img"], name="initrd", disk_format="ari")
    plain = drv.images.add(disk_image, name="plain", disk_format="qcow2")
    names = {"KERNEL": kernel.id, "RAMDISK": ramdisk.id, "DISK": plain.id}
    resolved = {k: names.get(v, v) for k, v in properties.items()}
    drv.images.add(disk_image, name="cloud", disk_format="qcow2", properties=resolved)
    with pytest.raises(error, match=message):
        drv.spawn("k1", "cloud", "t1.nano")
    assert_nothing_written(drv)


def test_snapshot_keeps_the_kernel_the_disk_needs(
    drv: LibvirtDriver, boot_files: dict[str, Path], disk_image: Path
) -> None:
    cmdline = "root=/dev/vda1 ro console=ttyS0"
    ids = add_kernel_image(drv, boot_files, disk_image, cmdline=cmdline)
    instance = drv.spawn("k1", "cloud", "t1.nano")
    drv.power_off(instance.uuid, force=True)
    snap = drv.snapshot(instance.uuid, "k1-snap")
    assert snap.properties["kernel_id"] == ids["kernel"]
    assert snap.properties["ramdisk_id"] == ids["ramdisk"]
    assert snap.properties["os_command_line"] == cmdline
    # ... so it boots the same way.
    again = drv.spawn("k2", snap.id, "t1.nano")
    assert domain_os(drv, again.name).findtext("cmdline") == cmdline


# -- the command --------------------------------------------------------------------


def cli(
    host: Host, state_dir: Path, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(["--state-dir", str(state_dir), *argv], host=host)
    except SystemExit as exc:
        assert isinstance(exc.code, int)
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_image_add_boot_show_and_explain_name_the_kernel(
    tmp_path: Path,
    node_file: Path,
    boot_files: dict[str, Path],
    disk_image: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "cli-state"
    host_conf = load_config(None, state_dir=state, environ={}).with_libvirt(
        connection_uri=f"test://{node_file}", virt_type="qemu"
    )
    host = Host(host_conf)
    try:

        def run(*argv: str) -> str:
            code, out, err = cli(host, state, capsys, *argv)
            assert code == 0, err
            return out

        kernel = json.loads(
            run("--json", "image", "add", str(boot_files["vmlinuz"]), "--name", "vmlinuz",
                "--disk-format", "aki")
        )  # fmt: skip
        ramdisk = json.loads(
            run("--json", "image", "add", str(boot_files["initrd.img"]), "--name", "initrd",
                "--disk-format", "ari")
        )  # fmt: skip
        assert (kernel["disk_format"], ramdisk["disk_format"]) == ("aki", "ari")
        run("image", "add", str(disk_image), "--name", "cloud",
            "--property", f"kernel_id={kernel['id']}",
            "--property", f"ramdisk_id={ramdisk['id']}",
            "--property", "os_command_line=root=/dev/vda1 console=ttyS0")  # fmt: skip

        plan = json.loads(run("--json", "explain", "--image", "cloud", "--flavor", "t1.nano"))
        paths = [Path(f["path"]).name for f in plan["files"]]
        assert paths[:6] == [
            base_filename(kernel["id"]) + ".part",
            base_filename(kernel["id"]),
            "kernel",
            base_filename(ramdisk["id"]) + ".part",
            base_filename(ramdisk["id"]),
            "ramdisk",
        ]
        assert "<cmdline>root=/dev/vda1 console=ttyS0</cmdline>" in plan["xml"]

        booted = json.loads(
            run("--json", "boot", "--image", "cloud", "--flavor", "t1.nano", "--name", "k1")
        )
        shown = json.loads(run("--json", "show", "k1"))
        assert shown["kernel"] == {
            "image": kernel["id"],
            "path": os.fspath(Path(booted["instance_dir"]) / "kernel"),
            "size": boot_files["vmlinuz"].stat().st_size,
            "base": os.fspath(state / "instances" / "_base" / base_filename(kernel["id"])),
        }
        assert shown["ramdisk"]["image"] == ramdisk["id"]
        text = run("show", "k1")
        assert f"a copy of _base/{base_filename(kernel['id'])} (image {kernel['id']})" in text
        # A kernel is no disk: booting one is refused with a hint.
        code, _, err = cli(host, state, capsys, "boot", "--image", "vmlinuz", "--flavor", "t1.nano")
        assert code == 1
        assert "image vmlinuz is a kernel or ramdisk (aki), not a disk" in err
    finally:
        host.close()
