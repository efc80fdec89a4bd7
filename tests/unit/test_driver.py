"""LibvirtDriver.spawn end to end with real parts: libvirt's own test driver as the
hypervisor, real qemu-img, mkfs and mkswap on real files, a real state database.

Only the one failing call is replaced in the fault tests. What is checked is what a
user would look at: files and their formats (read with qemu-img directly, not through
our qemu_img module), the domains on the connection, the database records.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest
from conftest import TIMING_KEYS as CONTRACT_TIMING_KEYS
from conftest import img_info
from lxml import etree
from pytest_mock import MockerFixture

from minidriver import explain, process
from minidriver.config import Config, load_config
from minidriver.db import InstanceRecord
from minidriver.driver import InstanceBuildTimeout, LibvirtDriver, SpawnError
from minidriver.exception import (
    FlavorNotFound,
    ImageNotFound,
    InstanceNotFound,
    MinidriverError,
    ProcessExecutionError,
)
from minidriver.imagebackend import FlavorDiskSmallerThanImage
from minidriver.images.qemu_img import QemuImgError
from minidriver.objects import Flavor, Instance

GiB = 1024**3
MiB = 1024**2
SOURCE_VIRTUAL = 64 * MiB
SOURCE_DATA = 4 * MiB  # written with pattern 0xab at offset 0
PATTERN = 0xAB
# The contract's names, and the steps later features added: the config drive, a
# kernel image's kernel and ramdisk, the rbd clone and import.
TIMING_KEYS = CONTRACT_TIMING_KEYS | {"config_drive", "kernel_ramdisk", "clone", "import"}
# ... and those of a clone restored from a template (boot --template)
TIMING_KEYS |= {"save_copy", "restore", "set_time"}
# ... and the VIF plugged, and the paused wait for it (vif.py)
TIMING_KEYS |= {"plug_vifs", "vif_plugged"}
# The disks of a t1.nano (root 1 GB, ephemeral 1 GB, swap 64 MB) and their sizes.
NANO_DISKS = {"disk": 1 * GiB, "disk.local": 1 * GiB, "disk.swap": 64 * MiB}


# -- independent helpers ------------------------------------------------------


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


# cirros is a Linux: added with os_type=linux, its ephemeral disk is ext4, as in Nova.
LINUX = {"os_type": "linux"}


def ephemeral_base_name(size_gb: int, fs_type: str = "ext4") -> str:
    return f"ephemeral_{size_gb}_{hashlib.md5(fs_type.encode()).hexdigest()[:7]}"


def file_sha256(path: Path) -> str:
    """sha256 over the file's data extents and their offsets: the content of a sparse
    file without reading its holes (a 1 GiB ephemeral base is mostly hole)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        digest.update(str(size).encode())
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole after offset
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            digest.update(f"@{start}".encode())
            while start < end:
                chunk = os.pread(fd, min(MiB, end - start), start)
                digest.update(chunk)
                start += len(chunk)
            offset = end
    finally:
        os.close(fd)
    return digest.hexdigest()


def reads_pattern(path: Path, fmt: str) -> bool:
    """The guest's view through the whole backing chain starts with the source's data."""
    proc = subprocess.run(
        ["qemu-io", "-r", "-f", fmt, "-c", f"read -P {PATTERN:#x} 0 {SOURCE_DATA}", path],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0 and "verification failed" not in proc.stdout


def domain_disks(xml: str) -> list[tuple[str | None, str | None]]:
    """(source file, driver type) of each disk of a domain XML, in order."""
    tree = etree.fromstring(xml.encode())
    return [
        (disk.find("source").get("file"), disk.find("driver").get("type"))  # type: ignore[union-attr]
        for disk in tree.iterfind("devices/disk")
    ]


def stray_files(instances_path: Path) -> list[Path]:
    """Half-written files that must never outlive the step that wrote them."""
    return sorted(p for pattern in ("*.part", "*.converted") for p in instances_path.rglob(pattern))


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


@dataclasses.dataclass(frozen=True)
class BaseState:
    inode: int
    mtime_ns: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> BaseState:
        st = path.stat()
        return cls(st.st_ino, st.st_mtime_ns, file_sha256(path))


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="session")
def source_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 of 64 MiB virtual with 4 MiB of 0xab at its start, made once."""
    path = tmp_path_factory.mktemp("source") / "source.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", path, str(SOURCE_VIRTUAL)], check=True
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {PATTERN:#x} 0 {SOURCE_DATA}", path],
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture(scope="session")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 of 2 GiB virtual (a few hundred KiB on disk): too big for 1 GB roots."""
    path = tmp_path_factory.mktemp("big") / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(2 * GiB)], check=True)
    return path


@pytest.fixture
def image_id(drv: LibvirtDriver, source_image: Path) -> str:
    return drv.images.add(source_image, name="cirros", disk_format="qcow2", properties=LINUX).id


def conn_of(drv: LibvirtDriver) -> Any:
    return drv.host.get_connection()


def domains(drv: LibvirtDriver) -> list[str]:
    return sorted(d.name() for d in conn_of(drv).listAllDomains())


def root_base(drv: LibvirtDriver, image_id: str) -> Path:
    return drv.conf.base_dir / sha1(image_id)


# -- 1, 2: a spawn and its files ------------------------------------------------


def test_spawn_makes_a_running_domain_and_the_seeds_files(
    drv: LibvirtDriver, image_id: str
) -> None:
    inst = drv.spawn("web-1", "cirros", "t1.nano")

    assert inst.name == "instance-00000001"
    assert inst.display_name == "web-1"
    assert inst.image_ref == image_id
    assert drv.get_info(inst.uuid).state == "running"
    dom = conn_of(drv).lookupByName(inst.name)
    assert dom.UUIDString() == inst.uuid
    assert dom.isPersistent()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    record = drv.db.get_instance(inst.uuid)
    assert (record.name, record.display_name, record.state) == (inst.name, "web-1", "running")

    base_dir = drv.conf.base_dir
    instance_dir = drv.conf.instances_path / inst.uuid
    assert Path(inst.instance_dir) == instance_dir

    # The root disk: a qcow2 overlay at flavor size on the raw, converted base.
    base = base_dir / sha1(image_id)
    disk = img_info(instance_dir / "disk")
    assert disk["format"] == "qcow2"
    assert disk["virtual-size"] == 1 * GiB
    assert disk["full-backing-filename"] == os.fspath(base)
    assert disk["backing-filename-format"] == "raw"
    base_info = img_info(base)
    assert base_info["format"] == "raw"
    assert base_info["virtual-size"] == SOURCE_VIRTUAL
    with open(base, "rb") as fh:
        assert fh.read(SOURCE_DATA) == bytes([PATTERN]) * SOURCE_DATA
        assert fh.read(MiB) == bytes(MiB)
    assert reads_pattern(instance_dir / "disk", "qcow2")

    # Ephemeral and swap: overlays on their formatted bases.
    for name, backing in (
        ("disk.local", ephemeral_base_name(1)),
        ("disk.swap", "swap_64"),
    ):
        info = img_info(instance_dir / name)
        assert info["format"] == "qcow2", name
        assert info["virtual-size"] == NANO_DISKS[name], name
        assert info["full-backing-filename"] == os.fspath(base_dir / backing), name
        assert info["backing-filename-format"] == "raw", name
        assert img_info(base_dir / backing)["format"] == "raw", name
    blkid = subprocess.run(
        ["blkid", "-p", "-o", "export", base_dir / ephemeral_base_name(1)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "TYPE=ext4" in blkid.splitlines()
    with open(base_dir / "swap_64", "rb") as fh:
        assert b"SWAPSPACE2" in fh.read(4096)

    disk_info = json.loads((instance_dir / "disk.info").read_text())
    assert disk_info == {os.fspath(instance_dir / name): "qcow2" for name in NANO_DISKS}

    # libvirt.xml is what was defined.
    written = (instance_dir / "libvirt.xml").read_text()
    defined = dom.XMLDesc(0)
    assert domain_disks(written) == domain_disks(defined)
    assert domain_disks(defined) == [(os.fspath(instance_dir / n), "qcow2") for n in NANO_DISKS]
    tree = etree.fromstring(written.encode())
    assert (tree.findtext("name"), tree.findtext("uuid")) == (inst.name, inst.uuid)

    assert (instance_dir / "console.log").is_file()
    assert stray_files(drv.conf.instances_path) == []
    assert list(drv.conf.locks_dir.iterdir()) == []
    assert sorted(p.name for p in instance_dir.iterdir()) == sorted(
        [*NANO_DISKS, "disk.info", "libvirt.xml", "console.log"]
    )


def test_second_spawn_of_an_image_uses_the_cache(drv: LibvirtDriver, image_id: str) -> None:
    first = drv.spawn("one", "cirros", "t1.nano")
    base = root_base(drv, image_id)
    before = BaseState.of(base)

    assert set(first.timings) == TIMING_KEYS
    assert all(type(v) is float for v in first.timings.values())
    assert first.cache_hit is False
    assert first.timings["fetch"] > 0
    assert first.timings["convert"] > 0
    assert first.timings["ephemeral"] > 0
    assert first.timings["swap"] > 0
    assert first.timings["total"] >= first.timings["fetch"] + first.timings["convert"]

    second = drv.spawn("two", image_id, "t1.nano")
    assert second.name == "instance-00000002"
    assert second.uuid != first.uuid
    assert set(second.timings) == TIMING_KEYS
    assert all(type(v) is float for v in second.timings.values())
    assert second.cache_hit is True
    assert second.timings["fetch"] == 0
    assert second.timings["convert"] == 0
    after = BaseState.of(base)
    assert after.inode == before.inode
    assert after.sha256 == before.sha256
    # Touched for the cache manager on each use: never moved backwards.
    assert after.mtime_ns >= before.mtime_ns
    assert img_info(drv.conf.instances_path / second.uuid / "disk")[
        "full-backing-filename"
    ] == os.fspath(base)
    assert domains(drv) == ["instance-00000001", "instance-00000002"]
    assert {d.state for d in drv.list_instances()} == {"running"}


# -- 3, 4: the other chains -----------------------------------------------------


def test_resized_base_copies_make_the_older_chain(
    conf: Config, make_driver: Callable[[Config], LibvirtDriver], source_image: Path
) -> None:
    drv = make_driver(conf.with_libvirt(resized_base_copies=True))
    image = drv.images.add(source_image, name="cirros", disk_format="qcow2", properties=LINUX)
    inst = drv.spawn("old-chain", "cirros", "t1.nano")

    base = root_base(drv, image.id)
    resized = base.with_name(base.name + "_1")
    info = img_info(resized)
    assert info["format"] == "raw"
    assert info["virtual-size"] == 1 * GiB
    assert img_info(base)["virtual-size"] == SOURCE_VIRTUAL
    disk = img_info(drv.conf.instances_path / inst.uuid / "disk")
    assert disk["format"] == "qcow2"
    assert disk["virtual-size"] == 1 * GiB
    assert disk["full-backing-filename"] == os.fspath(resized)
    assert disk["backing-filename-format"] == "raw"
    assert reads_pattern(drv.conf.instances_path / inst.uuid / "disk", "qcow2")
    assert inst.timings["resize"] > 0
    assert stray_files(drv.conf.instances_path) == []
    assert list(drv.conf.locks_dir.iterdir()) == []

    # A second instance of the same size reuses the copy.
    resized_inode = resized.stat().st_ino
    again = drv.spawn("old-chain-2", "cirros", "t1.nano")
    assert again.timings["resize"] == 0
    assert resized.stat().st_ino == resized_inode


@pytest.mark.parametrize(
    "how", ["images_type=raw", "use_cow_images=false"], ids=["images_type", "use_cow_images"]
)
def test_flat_disks_are_raw_copies(
    conf: Config,
    make_driver: Callable[[Config], LibvirtDriver],
    source_image: Path,
    how: str,
) -> None:
    if how == "images_type=raw":
        conf = conf.with_libvirt(images_type="raw")
    else:
        conf = dataclasses.replace(
            conf, default=dataclasses.replace(conf.default, use_cow_images=False)
        )
    drv = make_driver(conf)
    drv.images.add(source_image, name="cirros", disk_format="qcow2", properties=LINUX)
    inst = drv.spawn("flat", "cirros", "t1.nano")

    instance_dir = drv.conf.instances_path / inst.uuid
    for name, size in NANO_DISKS.items():
        info = img_info(instance_dir / name)
        assert info["format"] == "raw", name
        assert info["virtual-size"] == size, name
        assert "backing-filename" not in info, name
    with open(instance_dir / "disk", "rb") as fh:
        assert fh.read(SOURCE_DATA) == bytes([PATTERN]) * SOURCE_DATA
    disk_info = json.loads((instance_dir / "disk.info").read_text())
    assert disk_info == {os.fspath(instance_dir / name): "raw" for name in NANO_DISKS}
    defined = conn_of(drv).lookupByName(inst.name).XMLDesc(0)
    assert domain_disks(defined) == [(os.fspath(instance_dir / n), "raw") for n in NANO_DISKS]
    assert drv.get_info(inst.uuid).state == "running"
    # Nova's Flat makes ephemeral and swap in the instance dir: no base for them.
    assert sorted(p.name for p in drv.conf.base_dir.iterdir()) == [sha1(inst.image_ref)]
    assert fs_type(instance_dir / "disk.local") == "ext4"
    assert fs_type(instance_dir / "disk.swap") == "swap"


def fs_type(path: Path) -> str:
    """What blkid finds on a disk file (the filesystem or swap a guest would see)."""
    proc = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", path],
        check=True,
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip()


def flat_conf(conf: Config, **default: Any) -> Config:
    """``use_cow_images = false`` (unless ``default`` says otherwise) and ``default``."""
    return dataclasses.replace(
        conf, default=dataclasses.replace(conf.default, **({"use_cow_images": False} | default))
    )


def test_flat_copies_a_qcow2_base_as_it_is_without_force_raw_images(
    conf: Config, make_driver: Callable[[Config], LibvirtDriver], source_image: Path
) -> None:
    drv = make_driver(flat_conf(conf, force_raw_images=False))
    image_id = drv.images.add(source_image, name="cirros", disk_format="qcow2").id
    inst = drv.spawn("flat-qcow2", "cirros", "t1.nano")

    instance_dir = Path(inst.instance_dir)
    base = root_base(drv, image_id)
    assert img_info(base)["format"] == "qcow2"
    disk = img_info(instance_dir / "disk")
    assert disk["format"] == "qcow2"
    assert disk["virtual-size"] == 1 * GiB  # grown from the image's 64 MiB
    assert "backing-filename" not in disk
    assert reads_pattern(instance_dir / "disk", "qcow2")
    assert timings_ran(inst.timings, "overlay", "resize")
    disk_info = json.loads((instance_dir / "disk.info").read_text())
    assert disk_info[os.fspath(instance_dir / "disk")] == "qcow2"
    defined = conn_of(drv).lookupByName(inst.name).XMLDesc(0)
    assert domain_disks(defined)[0] == (os.fspath(instance_dir / "disk"), "qcow2")
    shown = drv.get_disks(inst.uuid)["disk"]
    assert (shown.format, shown.virtual_size, shown.backing_file) == ("qcow2", 1 * GiB, None)


def timings_ran(timings: dict[str, float], *steps: str) -> bool:
    return all(timings[s] > 0 for s in steps)


@pytest.mark.parametrize("use_cow_images", [False, True])
def test_preallocate_images_space_allocates_each_disk(
    conf: Config,
    make_driver: Callable[[Config], LibvirtDriver],
    source_image: Path,
    use_cow_images: bool,
) -> None:
    drv = make_driver(flat_conf(conf, preallocate_images="space", use_cow_images=use_cow_images))
    drv.images.add(source_image, name="cirros", disk_format="qcow2")
    inst = drv.spawn("prealloc", "cirros", "t1.nano")

    for name, size in NANO_DISKS.items():
        allocated = (Path(inst.instance_dir) / name).stat().st_blocks * 512
        assert allocated >= size, name


def test_explain_plans_the_flat_disks_spawn_makes(
    conf: Config, make_driver: Callable[[Config], LibvirtDriver], source_image: Path
) -> None:
    drv = make_driver(flat_conf(conf, force_raw_images=False, preallocate_images="space"))
    image_id = drv.images.add(source_image, name="cirros", disk_format="qcow2").id
    plan = explain.explain(drv, image_id, "t1.nano")
    planned = {Path(f.path).name: f for f in plan.files if Path(f.path).name.startswith("disk")}
    assert {n: f.format for n, f in planned.items()} == {
        "disk": "qcow2",
        "disk.local": "raw",
        "disk.swap": "raw",
    }
    for name, size in NANO_DISKS.items():
        assert list(planned[name].commands[-1])[:4] == ["fallocate", "-n", "-l", str(size)]
    assert not any(Path(f.path).name.startswith(("ephemeral_", "swap_")) for f in plan.files)
    assert domain_disks(plan.xml)[0][1] == "qcow2"

    inst = drv.spawn("flat", image_id, "t1.nano")
    made = {n: img_info(Path(inst.instance_dir) / n)["format"] for n in NANO_DISKS}
    assert made == {n: f.format for n, f in planned.items()}


def test_without_preallocation_a_flat_disk_stays_sparse(
    conf: Config, make_driver: Callable[[Config], LibvirtDriver], source_image: Path
) -> None:
    drv = make_driver(flat_conf(conf))
    drv.images.add(source_image, name="cirros", disk_format="qcow2")
    inst = drv.spawn("sparse", "cirros", "t1.nano")

    allocated = (Path(inst.instance_dir) / "disk.local").stat().st_blocks * 512
    assert allocated < 256 * MiB


# -- 5: faults -------------------------------------------------------------------


@pytest.fixture
def warm_cache(drv: LibvirtDriver, image_id: str) -> dict[Path, BaseState]:
    """The root base cached by an earlier spawn (m1.tiny: no ephemeral, no swap),
    whose instance is gone again."""
    inst = drv.spawn("warm-up", "cirros", "m1.tiny")
    drv.destroy(inst.uuid)
    assert domains(drv) == []
    base = root_base(drv, image_id)
    return {base: BaseState.of(base)}


def assert_spawn_left_nothing(
    drv: LibvirtDriver, error: SpawnError, cached: dict[Path, BaseState]
) -> None:
    assert isinstance(error.instance, Instance)
    assert domains(drv) == []
    assert drv.db.list_instances() == []
    with pytest.raises(InstanceNotFound):
        drv.db.get_instance(error.instance.uuid)
    assert not Path(error.instance.instance_dir).exists()
    instances_path = drv.conf.instances_path
    leftovers = [p.name for p in instances_path.iterdir() if p.name not in ("_base", "locks")]
    assert leftovers == []
    for base, state in cached.items():
        now = BaseState.of(base)
        assert (now.inode, now.sha256) == (state.inode, state.sha256), base
    assert stray_files(instances_path) == []
    assert files_under(drv.conf.locks_dir) == []


def test_failed_conversion_leaves_no_base(
    drv: LibvirtDriver, image_id: str, mocker: MockerFixture
) -> None:
    injected = QemuImgError("injected: convert failed", cmd=["qemu-img", "convert"], exit_code=1)
    convert = mocker.patch("minidriver.images.qemu_img.convert", side_effect=injected)

    with pytest.raises(SpawnError) as exc_info:
        drv.spawn("bad-convert", "cirros", "t1.nano")

    assert convert.call_count == 1
    assert exc_info.value.step == "create_image"
    assert exc_info.value.cause is injected
    assert_spawn_left_nothing(drv, exc_info.value, {})
    base = root_base(drv, image_id)
    assert [p.name for p in drv.conf.base_dir.iterdir() if p.name.startswith(base.name)] == []


def test_failed_define_is_undone(
    drv: LibvirtDriver, warm_cache: dict[Path, BaseState], mocker: MockerFixture
) -> None:
    injected = libvirt.libvirtError("injected")
    mocker.patch.object(drv.host, "define", side_effect=injected)

    with pytest.raises(SpawnError) as exc_info:
        drv.spawn("bad-define", "cirros", "t1.nano")

    assert exc_info.value.step == "define"
    assert exc_info.value.cause is injected
    assert_spawn_left_nothing(drv, exc_info.value, warm_cache)


def test_failed_start_undefines_the_domain(
    drv: LibvirtDriver, warm_cache: dict[Path, BaseState], mocker: MockerFixture
) -> None:
    injected = libvirt.libvirtError("injected")
    launch = mocker.patch.object(drv.host, "launch", side_effect=injected)

    with pytest.raises(SpawnError) as exc_info:
        drv.spawn("bad-start", "cirros", "t1.nano")

    # The domain was defined (launch got it) and is gone again.
    assert launch.call_count == 1
    assert exc_info.value.step == "start"
    assert exc_info.value.cause is injected
    assert_spawn_left_nothing(drv, exc_info.value, warm_cache)


def start_paused(domain: Any, *, pause: bool = False) -> None:
    # The test driver refuses VIR_DOMAIN_START_PAUSED; start and suspend instead.
    domain.create()
    domain.suspend()


def test_never_running_times_out_and_is_undone(
    conf: Config,
    make_driver: Callable[[Config], LibvirtDriver],
    source_image: Path,
    mocker: MockerFixture,
) -> None:
    drv = make_driver(conf.with_libvirt(wait_interval=0.1))
    image = drv.images.add(source_image, name="cirros", disk_format="qcow2")
    inst = drv.spawn("warm-up", "cirros", "m1.tiny")
    drv.destroy(inst.uuid)
    cached = {root_base(drv, image.id): BaseState.of(root_base(drv, image.id))}
    mocker.patch.object(drv.host, "launch", side_effect=start_paused)

    with pytest.raises(InstanceBuildTimeout) as exc_info:
        drv.spawn("paused", "cirros", "t1.nano", timeout=1.0)

    assert exc_info.value.step == "wait_for_running"
    assert "paused" in str(exc_info.value)
    assert_spawn_left_nothing(drv, exc_info.value, cached)


def test_keep_on_timeout_keeps_everything_until_destroy(
    conf: Config,
    make_driver: Callable[[Config], LibvirtDriver],
    source_image: Path,
    mocker: MockerFixture,
) -> None:
    drv = make_driver(conf.with_libvirt(wait_interval=0.1))
    image = drv.images.add(source_image, name="cirros", disk_format="qcow2", properties=LINUX)
    mocker.patch.object(drv.host, "launch", side_effect=start_paused)

    with pytest.raises(InstanceBuildTimeout) as exc_info:
        drv.spawn("kept", "cirros", "t1.nano", timeout=1.0, keep_on_timeout=True)

    inst = exc_info.value.instance
    assert inst is not None
    assert exc_info.value.step == "wait_for_running"
    assert domains(drv) == [inst.name]
    assert drv.get_info(inst.uuid).state == "paused"
    assert [(r.uuid, r.state) for r in drv.list_instances()] == [(inst.uuid, "paused")]
    instance_dir = drv.conf.instances_path / inst.uuid
    assert sorted(p.name for p in instance_dir.iterdir()) == sorted(
        [*NANO_DISKS, "disk.info", "libvirt.xml", "console.log"]
    )
    bases = {
        p: BaseState.of(p)
        for p in (
            root_base(drv, image.id),
            drv.conf.base_dir / ephemeral_base_name(1),
            drv.conf.base_dir / "swap_64",
        )
    }

    drv.destroy(inst.uuid)

    assert domains(drv) == []
    assert not instance_dir.exists()
    assert drv.db.list_instances() == []
    for base, state in bases.items():
        now = BaseState.of(base)
        assert (now.inode, now.sha256) == (state.inode, state.sha256), base


def test_domain_that_stops_while_booting_fails_at_once(
    drv: LibvirtDriver, warm_cache: dict[Path, BaseState], mocker: MockerFixture
) -> None:
    def start_and_crash(domain: Any, *, pause: bool = False) -> None:
        domain.create()
        domain.destroy()

    mocker.patch.object(drv.host, "launch", side_effect=start_and_crash)

    with pytest.raises(SpawnError) as exc_info:
        drv.spawn("stops", "cirros", "t1.nano", timeout=30)

    assert not isinstance(exc_info.value, InstanceBuildTimeout)
    assert exc_info.value.step == "wait_for_running"
    assert_spawn_left_nothing(drv, exc_info.value, warm_cache)


def test_enospc_on_the_ephemeral_base(
    drv: LibvirtDriver, warm_cache: dict[Path, BaseState], mocker: MockerFixture
) -> None:
    injected = OSError(errno.ENOSPC, "No space left on device")
    # The name backing.cache_local_or_swap looks up when it builds the ephemeral's
    # fetch_func (it imports create_ephemeral from imagebackend into its own namespace).
    create = mocker.patch("minidriver.backing.create_ephemeral", side_effect=injected)

    with pytest.raises(SpawnError) as exc_info:
        drv.spawn("full-disk", "cirros", "t1.nano")

    assert create.call_count == 1
    assert exc_info.value.step == "create_image"
    assert isinstance(exc_info.value.cause, OSError)
    assert exc_info.value.cause.errno == errno.ENOSPC
    assert_spawn_left_nothing(drv, exc_info.value, warm_cache)
    assert not (drv.conf.base_dir / ephemeral_base_name(1)).exists()


def test_failed_mkfs_leaves_no_ephemeral_base(
    drv: LibvirtDriver, image_id: str, mocker: MockerFixture
) -> None:
    def mkfs_out_of_space(args: Any, **kwargs: Any) -> Any:
        if args[0] == "mkfs":
            raise ProcessExecutionError(
                "mkfs: No space left on device", cmd=[os.fspath(a) for a in args], exit_code=1
            )
        return process.run(args, **kwargs)

    mocker.patch("minidriver.imagebackend.run", side_effect=mkfs_out_of_space)
    with pytest.raises(SpawnError) as exc_info:
        drv.spawn("full-disk", "cirros", "t1.nano")
    assert exc_info.value.step == "create_image"
    assert not (drv.conf.base_dir / ephemeral_base_name(1)).exists()


def test_without_force_raw_images_the_base_keeps_the_image_format(
    conf: Config, make_driver: Callable[[Config], LibvirtDriver], source_image: Path
) -> None:
    conf = dataclasses.replace(
        conf, default=dataclasses.replace(conf.default, force_raw_images=False)
    )
    drv = make_driver(conf)
    image = drv.images.add(source_image, name="cirros", disk_format="qcow2")
    first = drv.spawn("first", "cirros", "t1.nano")
    assert first.timings["convert"] == 0
    base = root_base(drv, image.id)
    assert img_info(base)["format"] == "qcow2"
    second = drv.spawn("second", "cirros", "t1.nano")
    assert second.cache_hit is True
    for inst in (first, second):
        disk = img_info(drv.conf.instances_path / inst.uuid / "disk")
        # The overlay names the base's real format: a qcow2 base is never read as raw.
        assert disk["full-backing-filename"] == str(base)
        assert disk["backing-filename-format"] == "qcow2"
        assert disk["virtual-size"] == GiB


# -- 6: bad input, refused before anything is written ----------------------------


def assert_nothing_written(drv: LibvirtDriver) -> None:
    assert files_under(drv.conf.instances_path) == []
    assert drv.db.list_instances() == []
    assert domains(drv) == []


def test_unknown_flavor(drv: LibvirtDriver, image_id: str) -> None:
    with pytest.raises(FlavorNotFound, match=r"m9\.huge"):
        drv.spawn("x", "cirros", "m9.huge")
    assert_nothing_written(drv)
    # Not even a domain name was used up.
    assert drv.spawn("y", "cirros", "t1.nano").name == "instance-00000001"


def test_unknown_image(drv: LibvirtDriver, image_id: str) -> None:
    with pytest.raises(ImageNotFound):
        drv.spawn("x", "no-such-image", "t1.nano")
    assert_nothing_written(drv)


def test_flavor_smaller_than_the_image(
    tmp_path: Path,
    node_file: Path,
    make_driver: Callable[[Config], LibvirtDriver],
    big_image: Path,
) -> None:
    config_file = tmp_path / "minidriver.conf"
    config_file.write_text("[flavor:small]\nvcpus = 1\nmemory_mb = 64\nroot_gb = 1\n")
    conf = load_config(config_file, state_dir=tmp_path / "state", environ={}).with_libvirt(
        connection_uri=f"test://{node_file}", virt_type="qemu"
    )
    drv = make_driver(conf)
    image = drv.images.add(big_image, name="big", disk_format="qcow2")
    assert image.virtual_size == 2 * GiB

    with pytest.raises(FlavorDiskSmallerThanImage):
        drv.spawn("x", "big", "small")
    assert_nothing_written(drv)


def test_image_min_disk_larger_than_the_root(drv: LibvirtDriver, source_image: Path) -> None:
    drv.images.add(source_image, name="needs-2g", disk_format="qcow2", min_disk=2)
    with pytest.raises(FlavorDiskSmallerThanImage, match="min_disk"):
        drv.spawn("x", "needs-2g", "t1.nano")
    assert_nothing_written(drv)


def test_image_min_ram_larger_than_the_flavor(drv: LibvirtDriver, source_image: Path) -> None:
    drv.images.add(source_image, name="needs-ram", disk_format="qcow2", min_ram=256)
    with pytest.raises(MinidriverError, match="min_ram"):
        drv.spawn("x", "needs-ram", "t1.nano")
    assert_nothing_written(drv)


# -- 7: destroy of what is half there ----------------------------------------------


def record_only(drv: LibvirtDriver, uuid: str, name: str, display_name: str) -> None:
    """A DB record as a spawn killed early leaves it: no domain, maybe no dir."""
    drv.db.create_instance(
        InstanceRecord(
            uuid=uuid,
            name=name,
            display_name=display_name,
            flavor="t1.nano",
            image_id="none",
            state="building",
            created_at="2026-01-01T00:00:00Z",
            instance_dir=os.fspath(drv.conf.instances_path / uuid),
        )
    )


def test_destroy_of_a_record_and_dir_without_domain(drv: LibvirtDriver) -> None:
    uuid = "2f0c5d3e-1111-4a4a-8b8b-000000000001"
    instance_dir = drv.conf.instances_path / uuid
    instance_dir.mkdir(parents=True)
    (instance_dir / "disk").write_bytes(b"half")
    record_only(drv, uuid, "instance-000000aa", "half")
    assert drv.get_info(uuid).state == "nostate"

    drv.destroy(uuid)

    assert not instance_dir.exists()
    assert drv.db.list_instances() == []
    with pytest.raises(InstanceNotFound):
        drv.destroy(uuid)


def test_destroy_of_a_record_alone(drv: LibvirtDriver) -> None:
    uuid = "2f0c5d3e-1111-4a4a-8b8b-000000000002"
    record_only(drv, uuid, "instance-000000ab", "record-only")
    drv.destroy(uuid)
    assert drv.db.list_instances() == []


def test_destroy_after_the_domain_vanished(drv: LibvirtDriver, image_id: str) -> None:
    inst = drv.spawn("vanishing", "cirros", "t1.nano")
    other = drv.spawn("staying", "cirros", "t1.nano")
    dom = conn_of(drv).lookupByName(inst.name)
    dom.destroy()
    dom.undefine()
    assert drv.get_info(inst.uuid).state == "nostate"
    base = root_base(drv, image_id)
    before = BaseState.of(base)

    drv.destroy(inst.uuid)

    assert not (drv.conf.instances_path / inst.uuid).exists()
    assert [r.uuid for r in drv.db.list_instances()] == [other.uuid]
    assert domains(drv) == [other.name]
    assert (drv.conf.instances_path / other.uuid / "disk").exists()
    after = BaseState.of(base)
    assert (after.inode, after.sha256) == (before.inode, before.sha256)


def test_destroy_removes_a_running_instance(drv: LibvirtDriver, image_id: str) -> None:
    inst = drv.spawn("short-lived", "cirros", "t1.nano")
    drv.destroy(inst.uuid)
    assert domains(drv) == []
    assert not (drv.conf.instances_path / inst.uuid).exists()
    assert drv.db.list_instances() == []
    assert root_base(drv, image_id).exists()
    assert (drv.conf.base_dir / ephemeral_base_name(1)).exists()
    assert (drv.conf.base_dir / "swap_64").exists()


# -- 8: what the driver reports -----------------------------------------------------


def test_list_instances_shows_live_states(drv: LibvirtDriver, image_id: str) -> None:
    running = drv.spawn("running", "cirros", "t1.nano")
    paused = drv.spawn("paused", "cirros", "t1.nano")
    stopped = drv.spawn("stopped", "cirros", "t1.nano")
    gone = drv.spawn("gone", "cirros", "t1.nano")
    conn = conn_of(drv)
    conn.lookupByName(paused.name).suspend()
    conn.lookupByName(stopped.name).destroy()
    dom = conn.lookupByName(gone.name)
    dom.destroy()
    dom.undefine()

    states = {r.display_name: r.state for r in drv.list_instances()}
    assert states == {
        "running": "running",
        "paused": "paused",
        "stopped": "shutoff",
        "gone": "nostate",
    }
    assert [r.uuid for r in drv.list_instances()] == [
        running.uuid,
        paused.uuid,
        stopped.uuid,
        gone.uuid,
    ]
    assert drv.get_info(paused.uuid).state == "paused"
    assert drv.get_info(stopped.uuid).state == "shutoff"


def test_get_disks_reports_formats_and_backing_files(drv: LibvirtDriver, image_id: str) -> None:
    inst = drv.spawn("disks", "cirros", "t1.nano")
    disks = drv.get_disks(inst.uuid)

    assert sorted(disks) == sorted(NANO_DISKS)
    base_dir = drv.conf.base_dir
    backing = {
        "disk": base_dir / sha1(image_id),
        "disk.local": base_dir / ephemeral_base_name(1),
        "disk.swap": base_dir / "swap_64",
    }
    for name, details in disks.items():
        path = drv.conf.instances_path / inst.uuid / name
        assert details.path == os.fspath(path)
        assert details.format == "qcow2"
        assert details.virtual_size == NANO_DISKS[name]
        assert details.backing_file == os.fspath(backing[name])
        assert details.actual_size == img_info(path)["actual-size"]


def test_get_disks_of_an_instance_without_disk_info(drv: LibvirtDriver) -> None:
    uuid = "2f0c5d3e-1111-4a4a-8b8b-000000000003"
    record_only(drv, uuid, "instance-000000ac", "no-disks")
    assert drv.get_disks(uuid) == {}


def with_options(conf: Config, case: str) -> Config:
    """The disk layouts a spawn can make, by name."""
    if case == "flat":  # raw copies, no backing file
        return conf.with_libvirt(images_type="flat")
    if case == "resized":  # the seeds' chain: overlays on _base/<sha1>_<GB>
        return conf.with_libvirt(resized_base_copies=True)
    if case == "qcow2-base-no-root-size":  # an overlay with its qcow2 base's size
        zero = Flavor("z1.zero", vcpus=1, memory_mb=128, root_gb=0, ephemeral_gb=1, swap=64)
        return dataclasses.replace(
            conf,
            default=dataclasses.replace(conf.default, force_raw_images=False),
            flavors={**conf.flavors, zero.name: zero},
        )
    return conf  # qcow2 overlays on raw bases


@pytest.mark.parametrize("case", ["overlays", "flat", "resized", "qcow2-base-no-root-size"])
def test_a_spawns_disk_report_is_what_qemu_img_says_without_running_it(
    conf: Config,
    make_driver: Callable[[Config], LibvirtDriver],
    source_image: Path,
    mocker: MockerFixture,
    case: str,
) -> None:
    conf = with_options(conf, case)
    drv = make_driver(conf)
    drv.images.add(source_image, name="cirros", disk_format="qcow2")
    flavor = "z1.zero" if case == "qcow2-base-no-root-size" else "t1.nano"
    inst = drv.spawn("report", "cirros", flavor, config_drive=True)
    qemu_img_runs = mocker.patch("minidriver.images.qemu_img.run", wraps=process.run)

    made = drv.get_disks(inst.uuid)

    assert qemu_img_runs.call_count == 0  # boot's report: from what spawn made, and stat
    assert list(made) == ["disk", "disk.local", "disk.swap", "disk.config"]
    for name, details in made.items():
        info = img_info(Path(details.path))
        assert details.path == os.fspath(drv.conf.instances_path / inst.uuid / name)
        assert (details.format, details.virtual_size, details.actual_size) == (
            info["format"],
            info["virtual-size"],
            info["actual-size"],
        ), name
        assert details.backing_file == info.get("backing-filename"), name
        assert details.backing_format == info.get("backing-filename-format"), name
        if details.backing_file is not None:
            backing = img_info(Path(details.backing_file))
            assert details.backing_virtual_size == backing["virtual-size"], name
        else:
            assert details.backing_virtual_size is None
    # show in another process (no spawn of its own to go by) asks qemu-img: the same.
    mocker.stopall()
    assert make_driver(conf).get_disks(inst.uuid) == made


# -- config drive -----------------------------------------------------------------


def test_config_drive_is_made_after_define_and_listed_last(
    drv: LibvirtDriver, image_id: str
) -> None:
    inst = drv.spawn(
        "web 1", "cirros", "t1.nano", config_drive=True, meta={"role": "test"}, user_data=b"hi"
    )
    drive = drv.conf.instances_path / inst.uuid / "disk.config"
    assert img_info(drive)["format"] == "raw"
    domain = drv.host.get_connection().lookupByUUIDString(inst.uuid)
    xml = etree.fromstring(domain.XMLDesc(0).encode())
    disks = xml.findall("devices/disk")
    assert disks[-1].get("device") == "cdrom"
    assert disks[-1].find("source").get("file") == str(drive)  # type: ignore[union-attr]
    assert disks[-1].find("target").get("dev") == "hda"  # type: ignore[union-attr]
    assert inst.timings["config_drive"] > 0
    assert drv.get_disks(inst.uuid)["disk.config"].format == "raw"
    drv.destroy(inst.uuid)
    assert not drive.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config_drive": True, "hostname": "-bad-"}, "hostname"),
        ({"config_drive": True, "user_data": b"x" * 70000}, "user data"),
        ({"config_drive": True, "public_keys": {"k": "not a key"}}, "key"),
        ({"config_drive": True, "meta": {"k" * 256: "v"}}, "255"),
        ({"hostname": "probe-1"}, "config drive"),
    ],
)
def test_bad_config_drive_input_writes_nothing(
    drv: LibvirtDriver, image_id: str, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(MinidriverError) as err:
        drv.spawn("x", "cirros", "t1.nano", **kwargs)
    assert message in str(err.value).lower()
    assert_nothing_written(drv)


# -- display names ----------------------------------------------------------------


def test_markup_in_a_display_name_is_escaped_and_adds_no_device(
    drv: LibvirtDriver, image_id: str
) -> None:
    hostile = "</name><devices><disk type='file'><source file='/etc/shadow'/></disk>&\"'"
    inst = drv.spawn(hostile, "cirros", "t1.nano")
    xml = etree.fromstring(
        drv.host.get_connection().lookupByUUIDString(inst.uuid).XMLDesc(0).encode()
    )
    assert len(xml.findall("devices/disk")) == 3
    assert "/etc/shadow" not in [d.get("file") for d in xml.iterfind("devices/disk/source")]
    assert drv.db.get_instance(inst.uuid).display_name == hostile


@pytest.mark.parametrize("name", ["nul\x00byte", "new\nline", "bell\x07", "", "x" * 256])
def test_display_names_xml_cannot_hold_are_refused_before_anything_is_written(
    drv: LibvirtDriver, image_id: str, name: str
) -> None:
    with pytest.raises(MinidriverError, match="display name"):
        drv.spawn(name, "cirros", "t1.nano")
    assert_nothing_written(drv)


def test_a_domain_name_taken_between_check_and_define_is_replaced(
    conf: Config,
    make_driver: Callable[[Config], LibvirtDriver],
    source_image: Path,
    mocker: MockerFixture,
    tmp_path: Path,
) -> None:
    mine = make_driver(conf)
    other_conf = load_config(None, state_dir=tmp_path / "other", environ={}).with_libvirt(
        connection_uri=conf.libvirt.connection_uri, virt_type="qemu"
    )
    other = LibvirtDriver(other_conf, host=mine.host)  # two state dirs, one hypervisor
    mine.images.add(source_image, name="cirros", disk_format="qcow2")
    other.images.add(source_image, name="cirros", disk_format="qcow2")
    theirs = other.spawn("theirs", "cirros", "m1.tiny")
    assert theirs.name == "instance-00000001"
    # The race: at our check the name still looked free; the other dir defined it first.
    real_find = mine.host.find_domain
    lookups = []

    def racing_find(name: str) -> Any:
        lookups.append(name)
        return None if len(lookups) == 1 else real_find(name)

    mocker.patch.object(mine.host, "find_domain", side_effect=racing_find)
    inst = mine.spawn("mine", "cirros", "m1.tiny")
    assert inst.name == "instance-00000002"
    assert mine.db.get_instance(inst.uuid).name == inst.name
    assert f"<name>{inst.name}</name>" in (Path(inst.instance_dir) / "libvirt.xml").read_text()
    assert other.db.get_instance(theirs.uuid).name == "instance-00000001"


# -- two state dirs on one hypervisor: domains are found by uuid -------------------


def two_state_dirs(
    conf: Config,
    make_driver: Callable[[Config], LibvirtDriver],
    source_image: Path,
    tmp_path: Path,
) -> tuple[LibvirtDriver, LibvirtDriver]:
    mine = make_driver(conf)
    other_conf = load_config(None, state_dir=tmp_path / "other", environ={}).with_libvirt(
        connection_uri=conf.libvirt.connection_uri, virt_type="qemu"
    )
    other = LibvirtDriver(other_conf, host=mine.host)  # two state dirs, one hypervisor
    mine.images.add(source_image, name="cirros", disk_format="qcow2")
    other.images.add(source_image, name="cirros", disk_format="qcow2")
    return mine, other


def test_delete_goes_by_uuid_when_another_state_dir_took_the_domain_name(
    conf: Config,
    make_driver: Callable[[Config], LibvirtDriver],
    source_image: Path,
    tmp_path: Path,
) -> None:
    mine, other = two_state_dirs(conf, make_driver, source_image, tmp_path)
    lost = mine.spawn("lost", "cirros", "m1.tiny")
    # Its domain went behind minidriver's back; the other state dir's count took the name.
    dom = conn_of(mine).lookupByName(lost.name)
    dom.destroy()
    dom.undefine()
    theirs = other.spawn("theirs", "cirros", "m1.tiny")
    assert theirs.name == lost.name

    assert mine.get_info(lost.uuid).state == "nostate"
    assert {r.display_name: r.state for r in mine.list_instances()} == {"lost": "nostate"}
    with pytest.raises(MinidriverError, match="has no domain"):
        mine.power_on(lost.uuid)
    mine.destroy(lost.uuid)

    assert mine.db.list_instances() == []
    assert not Path(lost.instance_dir).exists()
    assert domains(mine) == [theirs.name]
    assert other.get_info(theirs.uuid).state == "running"
    assert Path(theirs.instance_dir).is_dir()


def test_a_define_refusal_is_raised_as_itself_even_when_the_name_is_taken(
    conf: Config,
    make_driver: Callable[[Config], LibvirtDriver],
    source_image: Path,
    tmp_path: Path,
    mocker: MockerFixture,
) -> None:
    mine, other = two_state_dirs(conf, make_driver, source_image, tmp_path)
    theirs = other.spawn("theirs", "cirros", "m1.tiny")
    # The name looked free at our check (the race of the test above), and libvirt
    # refuses our define for a reason of its own: that reason is the error, and no
    # other name is tried.
    real_find, real_define = mine.host.find_domain, mine.host.define
    lookups: list[str] = []

    def racing_find(name: str) -> Any:
        lookups.append(name)
        return None if len(lookups) == 1 else real_find(name)

    try:
        conn_of(mine).defineXML("<domain type='test'><name>no-os</name></domain>")
    except libvirt.libvirtError as exc:
        refusal = exc
    assert refusal.get_error_code() == libvirt.VIR_ERR_XML_ERROR
    defines: list[str] = []

    def refused_once(xml: str) -> Any:
        defines.append(xml)
        if len(defines) == 1:
            raise refusal
        return real_define(xml)

    mocker.patch.object(mine.host, "find_domain", side_effect=racing_find)
    mocker.patch.object(mine.host, "define", side_effect=refused_once)

    with pytest.raises(SpawnError) as exc_info:
        mine.spawn("mine", "cirros", "m1.tiny")

    assert exc_info.value.step == "define"
    assert exc_info.value.cause is refusal
    assert len(defines) == 1
    assert mine.db.list_instances() == []
    assert domains(mine) == [theirs.name]


# -- disk.info: written whole, and a torn one is no crash ---------------------------


def test_a_torn_disk_info_leaves_show_delete_and_snapshot_to_libvirts_list(
    drv: LibvirtDriver, image_id: str
) -> None:
    inst = drv.spawn("torn", "cirros", "t1.nano")
    made = drv.get_disks(inst.uuid)
    disk_info = Path(inst.instance_dir) / "disk.info"
    disk_info.write_text(disk_info.read_text()[:25])  # as a crash mid-write leaves one
    # A driver with no spawn of its own to go by (another process: `show`).
    shown = LibvirtDriver(drv.conf, host=drv.host)

    assert shown.get_disks(inst.uuid) == made
    shown.power_off(inst.uuid, force=True)  # the test driver has no block copy: cold
    snap = shown.snapshot(inst.uuid, "from-torn")
    assert img_info(Path(drv.images.get(snap.id).path))["format"] == "qcow2"
    shown.destroy(inst.uuid)

    assert drv.db.list_instances() == []
    assert domains(drv) == []
    assert not Path(inst.instance_dir).exists()
