"""images_type = rbd on a real Ceph cluster (scripts/ceph-dev-cluster): the test guest
booted from an image in Ceph (a clone, nothing fetched), from an image in the file
store (fetch + import), from a direct snapshot; destroy and the faults.

The cluster comes from ``MINIDRIVER_TEST_CEPH_CONF`` (its ceph.conf). Without it these
tests skip, except under CI, where they fail: CI starts the cluster for them. Every
RBD image a test makes is named by a fresh uuid and removed by that test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_run import kill_at, minidriver, run_json
from conftest import ceph_conf_or_skip, ceph_pool, rbd_ls

from minidriver import cli, rbd_utils
from minidriver.cleanup import cleanup
from minidriver.config import Config
from minidriver.driver import LibvirtDriver, SpawnError
from minidriver.exception import MinidriverError
from minidriver.explain import explain
from minidriver.guestimages.testimage import IMAGE_PROPERTIES as LINUX
from minidriver.images import qemu_img
from minidriver.images.store import Image
from minidriver.objects import GiB, MiB
from minidriver.vmtemplate import TemplateError, Templates

pytestmark = pytest.mark.integration

ROOT_LINE = r"^minidriver-guest: disk vda 1073741824 root"
READY = r"^minidriver-guest: ready"
# t1.nano's ephemeral disk as Nova makes it (ext4) and its swap, as the guest sees them.
EPHEMERAL_LINE = r"^minidriver-guest: disk vdb 1073741824 ext4"
SWAP_LINE = r"^minidriver-guest: disk vdc 67108864 swap"
LOCAL_DISKS = ("disk.local", "disk.swap")
ALL_DISKS = ("disk", "disk.config", "disk.local", "disk.swap")
# What an rbd instance's dir holds: no disk at all, so no disk.info (Nova's Rbd writes
# none: the disks are found in the pool by their <uuid>_ names).
INSTANCE_FILES = ["console.log", "libvirt.xml"]


@pytest.fixture(scope="session")
def ceph_conf() -> str:
    return ceph_conf_or_skip()


@pytest.fixture
def rbd_drv(driver: LibvirtDriver, ceph_conf: str) -> LibvirtDriver:
    """The session's driver (its host, its state dir) with images_type = rbd."""
    conf = driver.conf.with_libvirt(images_type="rbd", images_rbd_ceph_conf=ceph_conf)
    return LibvirtDriver(conf, host=driver.host)


@pytest.fixture
def images(rbd_drv: LibvirtDriver) -> Iterator[list[Image]]:
    """Images a test adds (newest first at the end); deleted after it, newest first."""
    made: list[Image] = []
    yield made
    for image in reversed(made):
        with contextlib.suppress(Exception):
            rbd_drv.images.delete(image.id)


@pytest.fixture
def instances(rbd_drv: LibvirtDriver) -> Iterator[list[str]]:
    """Uuids of instances a test boots; destroyed after it."""
    made: list[str] = []
    yield made
    for instance_uuid in made:
        with contextlib.suppress(Exception):
            rbd_drv.destroy(instance_uuid)


def in_pool(drv: LibvirtDriver, pool: str, prefix: str) -> list[str]:
    return [n for n in drv.rbd_driver(pool).list_images() if n.startswith(prefix)]


def console_log(drv: LibvirtDriver, instance_uuid: str) -> Path:
    return Path(drv.db.get_instance(instance_uuid).instance_dir) / "console.log"


def base_of(drv: LibvirtDriver, image_id: str) -> Path:
    return drv.conf.base_dir / hashlib.sha1(image_id.encode()).hexdigest()


def assert_nothing_left(drv: LibvirtDriver, instance_uuid: str) -> None:
    assert instance_uuid not in {r.uuid for r in drv.db.list_instances()}
    assert not drv.instance_dir(instance_uuid).exists()
    assert in_pool(drv, drv.conf.libvirt.images_rbd_pool, instance_uuid) == []
    assert instance_uuid not in drv.owned_domains()


def test_boot_from_an_rbd_image_is_a_clone_of_its_snapshot(
    rbd_drv: LibvirtDriver,
    test_image: Path,
    images: list[Image],
    instances: list[str],
    wait_console: Callable[..., Any],
) -> None:
    image = rbd_drv.images.add(
        test_image, name="rbd-clone", disk_format="qcow2", store="rbd", properties=LINUX
    )
    images.append(image)
    rbd = rbd_drv.rbd_driver()
    fsid = rbd.get_fsid()
    # Glance's rbd store: raw, a protected snapshot, the location of that snapshot.
    assert image.disk_format == "raw"
    assert image.size == image.virtual_size == 64 * MiB
    assert [loc["url"] for loc in image.locations] == [f"rbd://{fsid}/images/{image.id}/snap"]
    assert in_pool(rbd_drv, "images", image.id) == [image.id]

    inst = rbd_drv.spawn(name="rbd-clone", image=image.id, flavor="t1.nano")
    instances.append(inst.uuid)
    disk = f"{inst.uuid}_disk"
    assert not base_of(rbd_drv, image.id).exists(), "nothing may be downloaded into _base"
    assert inst.timings["clone"] > 0
    assert inst.timings["fetch"] == inst.timings["convert"] == inst.timings["import"] == 0
    parent = rbd.parent_info(disk)
    assert parent == (rbd_utils.RbdLocation(fsid, "images", image.id, "snap"), 64 * MiB)
    assert rbd.size(disk) == GiB
    root = rbd_drv.get_disks(inst.uuid)["disk"]
    assert root.path == f"rbd:rbd/{disk}"
    assert root.backing_file == f"rbd:images/{image.id}@snap"
    assert (root.virtual_size, root.backing_virtual_size) == (GiB, 64 * MiB)
    wait_console(console_log(rbd_drv, inst.uuid), ROOT_LINE)
    wait_console(console_log(rbd_drv, inst.uuid), READY)

    # The image is in use: deleting it is refused, and it stays whole.
    with pytest.raises(rbd_utils.RbdImageBusy, match=rf"1 clone\(s\): rbd/{disk}"):
        rbd_drv.images.delete(image.id)
    assert rbd.children(image.id, "snap", "images") == [f"rbd/{disk}"]

    rbd_drv.destroy(inst.uuid)
    assert_nothing_left(rbd_drv, inst.uuid)
    assert in_pool(rbd_drv, "images", image.id) == [image.id], "never an image's RBD"
    rbd_drv.images.delete(image.id)
    assert in_pool(rbd_drv, "images", image.id) == []


def test_boot_from_a_file_image_fetches_and_imports(
    rbd_drv: LibvirtDriver,
    test_image: Path,
    images: list[Image],
    instances: list[str],
    wait_console: Callable[..., Any],
) -> None:
    image = rbd_drv.images.add(test_image, name="rbd-import", disk_format="qcow2", properties=LINUX)
    images.append(image)
    inst = rbd_drv.spawn(name="rbd-import", image=image.id, flavor="t1.nano")
    instances.append(inst.uuid)
    assert inst.timings["fetch"] > 0
    assert inst.timings["convert"] > 0
    assert inst.timings["import"] > 0
    assert inst.timings["clone"] == 0
    assert base_of(rbd_drv, image.id).is_file()
    rbd = rbd_drv.rbd_driver()
    assert rbd.parent_info(f"{inst.uuid}_disk") is None
    assert rbd.size(f"{inst.uuid}_disk") == GiB
    assert not (Path(inst.instance_dir) / "disk.info").exists()
    found = rbd_drv.instance_disks(Path(inst.instance_dir), inst.uuid)
    assert found == {f"rbd:rbd/{inst.uuid}_{n}": "raw" for n in ("disk", *LOCAL_DISKS)}
    wait_console(console_log(rbd_drv, inst.uuid), ROOT_LINE)
    rbd_drv.destroy(inst.uuid)
    assert_nothing_left(rbd_drv, inst.uuid)


def test_direct_snapshot_boots_with_the_next_boot_count(
    rbd_drv: LibvirtDriver,
    test_image: Path,
    images: list[Image],
    instances: list[str],
    wait_console: Callable[..., Any],
) -> None:
    image = rbd_drv.images.add(
        test_image, name="rbd-src", disk_format="qcow2", store="rbd", properties=LINUX
    )
    images.append(image)
    inst = rbd_drv.spawn(name="rbd-src", image=image.id, flavor="t1.nano")
    instances.append(inst.uuid)
    wait_console(console_log(rbd_drv, inst.uuid), r"^minidriver-guest: boot-count 1")
    wait_console(console_log(rbd_drv, inst.uuid), READY)

    snap = rbd_drv.snapshot(inst.uuid, "rbd-snap")  # the guest runs on
    images.append(snap)
    rbd = rbd_drv.rbd_driver()
    assert [loc["url"] for loc in snap.locations] == [
        f"rbd://{rbd.get_fsid()}/images/{snap.id}/snap"
    ]
    assert snap.properties["instance_uuid"] == inst.uuid
    assert rbd_drv.get_info(inst.uuid).state == "running"
    # Flattened: it stands alone; the disk's temporary snapshot is gone.
    assert rbd.parent_info(snap.id, "images") is None
    with rbd.image(f"{inst.uuid}_disk") as disk:
        assert list(disk.list_snaps()) == []

    child = rbd_drv.spawn(name="rbd-child", image=snap.id, flavor="t1.nano")
    instances.append(child.uuid)
    assert child.timings["clone"] > 0
    wait_console(console_log(rbd_drv, child.uuid), r"^minidriver-guest: boot-count 2")
    for instance_uuid in (child.uuid, inst.uuid):
        rbd_drv.destroy(instance_uuid)
        assert_nothing_left(rbd_drv, instance_uuid)


def test_snapshot_of_an_imported_disk_goes_to_its_images_pool(
    rbd_drv: LibvirtDriver, test_image: Path, images: list[Image], instances: list[str]
) -> None:
    """No parent clone (the image's snapshot is not protected, so the disk was
    imported): Nova's _get_parent_pool takes the pool of the image's location."""
    image = add_rbd_image(rbd_drv, test_image, images, "rbd-imported")
    with rbd_drv.rbd_driver("images").image(image.id) as rbd_image:
        rbd_image.unprotect_snap("snap")
    inst = rbd_drv.spawn(name="rbd-imported", image=image.id, flavor="t1.nano")
    instances.append(inst.uuid)
    rbd = rbd_drv.rbd_driver()
    assert rbd.parent_info(f"{inst.uuid}_disk") is None

    snap = rbd_drv.snapshot(inst.uuid, "rbd-imported-snap")
    images.append(snap)
    assert [loc["url"] for loc in snap.locations] == [
        f"rbd://{rbd.get_fsid()}/images/{snap.id}/snap"
    ]


def test_snapshot_without_a_parent_pool_is_a_standard_one(
    rbd_drv: LibvirtDriver,
    test_image: Path,
    images: list[Image],
    instances: list[str],
    wait_console: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    ceph_conf: str,
) -> None:
    """A file image imported into the pool: the disk has no parent and the image no
    location in the cluster. Nova then takes a standard snapshot: an image file."""
    image = rbd_drv.images.add(test_image, name="rbd-file-src", disk_format="qcow2")
    images.append(image)
    inst = rbd_drv.spawn(name="rbd-file-src", image=image.id, flavor="t1.nano")
    instances.append(inst.uuid)
    wait_console(console_log(rbd_drv, inst.uuid), r"^minidriver-guest: boot-count 1", timeout=300)
    wait_console(console_log(rbd_drv, inst.uuid), READY, timeout=300)

    # The image store's pool is one of the test's own, so that its listing holds only
    # what this snapshot might put there.
    with ceph_pool(ceph_conf, "mdtest-images") as store_pool:
        glance_store = dataclasses.replace(rbd_drv.conf.glance_store, rbd_store_pool=store_pool)
        drv = LibvirtDriver(
            dataclasses.replace(rbd_drv.conf, glance_store=glance_store), host=rbd_drv.host
        )
        with caplog.at_level(logging.WARNING, logger="minidriver.snapshot"):
            snap = drv.snapshot(inst.uuid, "rbd-standard")
        images.append(snap)
        assert drv.rbd_driver(store_pool).list_images() == []
    assert "Performing standard snapshot" in caplog.text
    assert "cannot determine the parent storage pool" in caplog.text
    assert snap.rbd_location is None and snap.disk_format == "qcow2"
    assert qemu_img.info(snap.path, "qcow2").virtual_size == GiB
    with rbd_drv.rbd_driver().image(f"{inst.uuid}_disk") as disk:
        assert list(disk.list_snaps()) == []  # the extract's snapshot is gone
    assert rbd_drv.get_info(inst.uuid).state == "running"

    child = rbd_drv.spawn(name="rbd-file-child", image=snap.id, flavor="t1.nano")
    instances.append(child.uuid)
    wait_console(console_log(rbd_drv, child.uuid), r"^minidriver-guest: boot-count 2", timeout=300)


def test_unprotected_image_snapshot_falls_back_to_import(
    rbd_drv: LibvirtDriver,
    test_image: Path,
    images: list[Image],
    instances: list[str],
    wait_console: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = rbd_drv.images.add(
        test_image, name="rbd-unprot", disk_format="qcow2", store="rbd", properties=LINUX
    )
    images.append(image)
    with rbd_drv.rbd_driver("images").image(image.id) as rbd_image:
        rbd_image.unprotect_snap("snap")
    with caplog.at_level(logging.WARNING, logger="minidriver.rbd_utils"):
        inst = rbd_drv.spawn(name="rbd-unprot", image=image.id, flavor="t1.nano")
    instances.append(inst.uuid)
    assert f"snapshot images/{image.id}@snap is not protected" in caplog.text
    assert "fetching and importing the image instead" in caplog.text
    assert inst.timings["clone"] == 0
    assert inst.timings["fetch"] > 0, "fetched from its rbd snapshot, hash checked"
    assert inst.timings["import"] > 0
    assert rbd_drv.rbd_driver().parent_info(f"{inst.uuid}_disk") is None
    wait_console(console_log(rbd_drv, inst.uuid), ROOT_LINE)


def add_rbd_image(drv: LibvirtDriver, test_image: Path, images: list[Image], name: str) -> Image:
    """The test guest added with --store rbd; deleted after the test (``images``)."""
    image = drv.images.add(
        test_image, name=name, disk_format="qcow2", store="rbd", properties=LINUX
    )
    images.append(image)
    return image


def test_every_disk_of_an_rbd_instance_is_in_ceph(
    rbd_drv: LibvirtDriver,
    ceph_conf: str,
    test_image: Path,
    images: list[Image],
    instances: list[str],
    wait_console: Callable[..., Any],
) -> None:
    image = add_rbd_image(rbd_drv, test_image, images, "rbd-all")
    inst = rbd_drv.spawn(
        name="rbd-all", image=image.id, flavor="t1.nano", config_drive=True, hostname="rbd-all"
    )
    instances.append(inst.uuid)
    pool = rbd_drv.conf.libvirt.images_rbd_pool
    names = [f"{inst.uuid}_{n}" for n in ALL_DISKS]
    assert [n for n in rbd_ls(ceph_conf, pool) if n.startswith(inst.uuid)] == names
    instance_dir = Path(inst.instance_dir)
    assert sorted(p.name for p in instance_dir.iterdir()) == INSTANCE_FILES
    # Ephemeral and swap: their formatted _base files imported, as Nova's Rbd backend does.
    assert {p.name for p in rbd_drv.conf.base_dir.iterdir()} >= {"ephemeral_1_40d1d2c", "swap_64"}
    log = console_log(rbd_drv, inst.uuid)
    for line in (ROOT_LINE, EPHEMERAL_LINE, SWAP_LINE):
        wait_console(log, line)
    wait_console(log, rf"^minidriver-guest: config-drive uuid={inst.uuid} hostname=rbd-all")
    wait_console(log, READY)

    # show: every disk at its place in the pool, as this driver and another process see it.
    expected = {n: f"rbd:{pool}/{inst.uuid}_{n}" for n in ALL_DISKS}
    assert {n: d.path for n, d in rbd_drv.get_disks(inst.uuid).items()} == expected
    other = LibvirtDriver(rbd_drv.conf, host=rbd_drv.host)
    shown = other.get_disks(inst.uuid)
    assert {n: d.path for n, d in shown.items()} == expected
    assert (shown["disk.local"].virtual_size, shown["disk.swap"].virtual_size) == (GiB, 64 * MiB)
    domain = rbd_drv.host.get_domain(inst.uuid)
    assert domain is not None
    domain_xml = domain.XMLDesc(0)
    assert "<source file=" not in domain_xml
    assert domain_xml.count("protocol='rbd'") == 4

    snap = rbd_drv.snapshot(inst.uuid, "rbd-all-snap")  # still Nova's direct snapshot
    images.append(snap)
    assert in_pool(rbd_drv, "images", snap.id) == [snap.id]

    rbd_drv.destroy(inst.uuid)
    assert_nothing_left(rbd_drv, inst.uuid)
    assert [n for n in rbd_ls(ceph_conf, pool) if n.startswith(inst.uuid)] == []
    assert {image.id, snap.id} <= set(rbd_ls(ceph_conf, "images")), "the images stay"


def test_explain_shows_every_disk_imported_into_the_pool(
    rbd_drv: LibvirtDriver, test_image_id: str
) -> None:
    plan = explain(rbd_drv, test_image_id, "t1.nano")
    rbd_files = {f.path.rsplit("_", 1)[-1]: f for f in plan.files if f.path.startswith("rbd:")}
    assert sorted(rbd_files) == ["disk", "disk.local", "disk.swap"]
    local = rbd_files["disk.local"].commands
    assert local[0][:2] == ("rbd", "import")
    assert local[0][2].endswith("/_base/ephemeral_1_40d1d2c")
    assert rbd_files["disk.swap"].commands[0][2].endswith("/_base/swap_64")
    assert "<source file=" not in plan.xml


def test_config_drive_import_failing_leaves_nothing(
    rbd_drv: LibvirtDriver, test_image_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = rbd_utils.RBDDriver.import_image

    def import_image(self: rbd_utils.RBDDriver, base: Path, name: str, *a: Any, **kw: Any) -> None:
        if name.endswith("_disk.config"):  # the fault: the pool refuses the config drive
            raise rbd_utils.RbdError(f"injected: import of {name} refused")
        real_import(self, base, name, *a, **kw)

    monkeypatch.setattr(rbd_utils.RBDDriver, "import_image", import_image)
    before = set(rbd_drv.owned_domains())
    with pytest.raises(SpawnError, match=r"injected: import of .*_disk\.config refused") as err:
        rbd_drv.spawn(name="rbd-cfgfail", image=test_image_id, flavor="t1.nano", config_drive=True)
    assert err.value.step == "config_drive"
    assert err.value.instance is not None
    assert_nothing_left(rbd_drv, err.value.instance.uuid)
    assert set(rbd_drv.owned_domains()) == before


def test_cleanup_after_a_dead_spawn_removes_every_rbd_disk(
    rbd_drv: LibvirtDriver, test_image_id: str, instances: list[str]
) -> None:
    inst = rbd_drv.spawn(name="rbd-dead", image=test_image_id, flavor="t1.nano", config_drive=True)
    instances.append(inst.uuid)
    # What a spawn killed after its launch leaves: the record still "building", the
    # domain running, every disk in the pool.
    rbd_drv.db.update_instance(inst.uuid, state="building")
    pool = rbd_drv.conf.libvirt.images_rbd_pool
    assert in_pool(rbd_drv, pool, inst.uuid) == [f"{inst.uuid}_{n}" for n in ALL_DISKS]
    report = cleanup(rbd_drv)
    assert sorted(report.rbd_disks) == [f"{pool}/{inst.uuid}_{n}" for n in ALL_DISKS]
    assert_nothing_left(rbd_drv, inst.uuid)


def snapshot_digest(drv: LibvirtDriver, name: str) -> str:
    """A frozen snapshot's own data (allocated extents, offsets and bytes) and size."""
    digest = hashlib.sha256()
    with drv.rbd_driver().image(name, snapshot="snap", read_only=True) as image:
        extents: list[tuple[int, int]] = []

        def extent(offset: int, length: int, exists: bool) -> None:
            if exists:
                extents.append((offset, length))

        size = image.size()
        image.diff_iterate(0, size, None, extent, include_parent=False)
        digest.update(str(size).encode())
        for offset, length in extents:
            digest.update(f"{offset}:{length}".encode() + image.read(offset, length))
    return digest.hexdigest()


def test_template_of_an_rbd_instance_is_rbd_snapshots_and_clones(
    rbd_drv: LibvirtDriver,
    ceph_conf: str,
    test_image: Path,
    images: list[Image],
    instances: list[str],
    wait_console: Callable[..., Any],
) -> None:
    image = add_rbd_image(rbd_drv, test_image, images, "rbd-tpl")
    source = rbd_drv.spawn(
        name="rbd-tpl-src", image=image.id, flavor="t1.nano", network="user", config_drive=True
    )
    instances.append(source.uuid)
    wait_console(console_log(rbd_drv, source.uuid), r"^minidriver-guest: boot-count 1")
    wait_console(console_log(rbd_drv, source.uuid), READY)
    templates = Templates(rbd_drv)
    tpl = templates.create(source.uuid, f"rbd-tpl-{uuid.uuid4().hex[:8]}")
    pool = rbd_drv.conf.libvirt.images_rbd_pool
    rbd = rbd_drv.rbd_driver()
    frozen = [f"tpl-{tpl.id}_{n}" for n in ALL_DISKS]
    try:
        # The frozen layer is the instance's own RBD disks, renamed, each with a
        # protected snapshot: nothing copied, nothing local.
        assert sorted(tpl.disks) == sorted(ALL_DISKS)
        listed = rbd_ls(ceph_conf, pool)
        assert [n for n in listed if n.startswith(f"tpl-{tpl.id}_")] == frozen
        assert [n for n in listed if n.startswith(source.uuid)] == []
        for name in frozen:
            with rbd.image(name, read_only=True) as disk:
                assert disk.is_protected_snap("snap"), name
        assert sorted(p.name for p in tpl.path.iterdir()) == [
            "disk.info",
            "libvirt.xml",
            "memory.save",
        ]
        assert not base_of(rbd_drv, image.id).exists(), "no local copy of the root"
        before = {name: snapshot_digest(rbd_drv, name) for name in frozen}
        # The frozen root is a clone of the image's snapshot: the image is in use.
        with pytest.raises(rbd_utils.RbdImageBusy, match=rf"rbd/tpl-{tpl.id}_disk"):
            rbd_drv.images.delete(image.id)

        a = templates.spawn(tpl.id, name="rbd-clone-a")
        instances.append(a.uuid)
        b = templates.spawn(tpl.id, name="rbd-clone-b")
        instances.append(b.uuid)
        fsid = rbd.get_fsid()
        for clone in (a, b):
            assert rbd_drv.get_info(clone.uuid).state == "running"
            assert in_pool(rbd_drv, pool, clone.uuid) == [f"{clone.uuid}_{n}" for n in ALL_DISKS]
            assert rbd.parent_info(f"{clone.uuid}_disk") == (
                rbd_utils.RbdLocation(fsid, pool, f"tpl-{tpl.id}_disk", "snap"),
                GiB,
            )
            assert sorted(p.name for p in Path(clone.instance_dir).iterdir()) == INSTANCE_FILES
        assert sorted(rbd.children(f"tpl-{tpl.id}_disk", "snap")) == sorted(
            f"{pool}/{c.uuid}_disk" for c in (a, b)
        )

        # Each clone writes its own root (the guest's boot-count): a twice, b once.
        rbd_drv.reboot(a.uuid, hard=True)
        wait_console(console_log(rbd_drv, a.uuid), r"^minidriver-guest: boot-count 2")
        rbd_drv.reboot(a.uuid, hard=True)
        rbd_drv.reboot(b.uuid, hard=True)
        wait_console(console_log(rbd_drv, a.uuid), r"^minidriver-guest: boot-count 3")
        wait_console(console_log(rbd_drv, b.uuid), r"^minidriver-guest: boot-count 2")
        wait_console(console_log(rbd_drv, b.uuid), READY)
        assert "boot-count 3" not in console_log(rbd_drv, b.uuid).read_text()
        assert {name: snapshot_digest(rbd_drv, name) for name in frozen} == before

        with pytest.raises(TemplateError, match="rbd-clone-a"):
            templates.delete(tpl.id)
        for clone in (a, b):
            rbd_drv.destroy(clone.uuid)
            assert_nothing_left(rbd_drv, clone.uuid)
        assert [n for n in rbd_ls(ceph_conf, pool) if n.startswith(f"tpl-{tpl.id}_")] == frozen
    finally:
        for record in templates.clones_of(tpl.id):
            rbd_drv.destroy(record.uuid)
        templates.delete(tpl.id)
    assert not tpl.path.exists()
    listed = rbd_ls(ceph_conf, pool)
    assert [n for n in listed if n.startswith((f"tpl-{tpl.id}", source.uuid))] == []
    assert image.id in rbd_ls(ceph_conf, "images"), "the image stays"


# A child `minidriver` that stalls at a point (a marker file says it got there) to be
# killed there by the test.
CHILD = r"""
import sys, time
from pathlib import Path
from unittest import mock

from minidriver import cli, rbd_utils

point, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
calls = []

def second_call_stalls(real):
    def call(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            marker.write_text(point)
            time.sleep(3600)
        return real(*args, **kwargs)
    return call

patches = {
    # template create: the first disk frozen, the second renamed, the others not yet
    "template-create": mock.patch.object(
        rbd_utils.RBDDriver, "create_snap", second_call_stalls(rbd_utils.RBDDriver.create_snap)
    ),
    # boot --template: the clone's first disk made, not the others
    "boot-template": mock.patch.object(
        rbd_utils.RBDDriver, "clone", second_call_stalls(rbd_utils.RBDDriver.clone)
    ),
}
with patches[point]:
    sys.exit(cli.main(argv))
"""


@pytest.fixture
def disks_pool(ceph_conf: str) -> Iterator[str]:
    """A pool of the test's own for its instances' disks: its listing holds only what
    the test made, whatever the other integration run does in the cluster."""
    with ceph_pool(ceph_conf, "mdtest-disks") as pool:
        yield pool


@pytest.fixture
def rbd_state(host_config: Config, ceph_conf: str, disks_pool: str) -> Iterator[Path]:
    """A state dir of its own (with images_type = rbd, its disks in ``disks_pool``),
    emptied after the test."""
    path = Path(tempfile.mkdtemp(prefix="mdrbd-", dir="/var/tmp"))
    path.chmod(0o755)
    conf = (
        f"[libvirt]\nimages_type = rbd\nimages_rbd_ceph_conf = {ceph_conf}\n"
        f"images_rbd_pool = {disks_pool}\n"
    )
    (path / "minidriver.conf").write_text(conf)
    yield path
    uri = host_config.libvirt.connection_uri

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = minidriver(path, uri, "--config", str(path / "minidriver.conf"), *args)
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    run("delete", "--all")
    listed = run("--json", "template", "list")
    for tpl in json.loads(listed.stdout) if listed.returncode == 0 else []:
        run("template", "delete", tpl["id"])
    run("cleanup")
    shutil.rmtree(path, ignore_errors=True)


def test_kill_9_in_rbd_template_create_and_clone_then_cleanup(
    rbd_state: Path, host_config: Config, ceph_conf: str, disks_pool: str, test_image: Path
) -> None:
    uri = host_config.libvirt.connection_uri
    conf = ["--config", str(rbd_state / "minidriver.conf")]
    marker = rbd_state / "marker"
    pool = disks_pool

    def md(*args: str) -> list[str]:
        return minidriver(rbd_state, uri, *conf, *args)

    def ours(*prefixes: str) -> list[str]:
        return [n for n in rbd_ls(ceph_conf, pool) if n.startswith(prefixes)]

    image = run_json(md("--json", "image", "add", str(test_image), "--name", "g", "--store", "rbd",
                            "--property", "os_type=linux"))  # fmt: skip
    boot = ["boot", "--image", "g", "--flavor", "t1.nano", "--timeout", "180", "--config-drive"]
    src = run_json(md("--json", *boot, "--name", "src", "--wait-for", READY))

    # 1. Killed in `template create`, after the save, half-way through the freezing.
    kill_at(CHILD, "template-create", marker, md("template", "create", "src", "--name", "t"))
    [half_made] = run_json(md("--json", "template", "list"))
    assert half_made["status"] == "creating"
    frozen_prefix = f"tpl-{half_made['id']}_"
    renamed = [n.removeprefix(frozen_prefix) for n in ours(frozen_prefix)]
    not_yet = [n.removeprefix(f"{src['uuid']}_") for n in ours(src["uuid"])]
    assert len(renamed) == 2 and sorted(renamed + not_yet) == list(ALL_DISKS)
    before = sorted(rbd_ls(ceph_conf, pool))
    dry = run_json(md("--json", "cleanup", "--dry-run"))
    assert sorted(dry["rbd_disks"]) == [f"{pool}/{frozen_prefix}{n}" for n in renamed]
    assert len(dry["templates"]) == 1 and sorted(rbd_ls(ceph_conf, pool)) == before
    report = run_json(md("--json", "cleanup"))
    assert len(report["templates"]) == 1 and len(report["records"]) == 1, report
    assert sorted(report["rbd_disks"]) == [f"{pool}/{frozen_prefix}{n}" for n in renamed]
    assert report["skipped"] == []
    assert run_json(md("--json", "template", "list")) == []
    assert ours(src["uuid"], frozen_prefix) == []

    # 2. A template made, then a clone killed with one of its disks cloned.
    src2 = run_json(md("--json", *boot, "--name", "src2", "--wait-for", READY))
    made = run_json(md("--json", "template", "create", "src2", "--name", "t"))
    frozen = sorted(ours(f"tpl-{made['id']}_"))
    assert frozen == [f"tpl-{made['id']}_{n}" for n in ALL_DISKS]
    kill_at(CHILD, "boot-template", marker, md("boot", "--template", "t", "--name", "doomed"))
    report = run_json(md("--json", "cleanup"))
    assert len(report["records"]) == 1 and len(report["rbd_disks"]) == 1, report
    assert report["templates"] == [] and report["skipped"] == []
    doomed = report["records"][0]
    assert ours(doomed, src2["uuid"]) == []
    assert sorted(ours(f"tpl-{made['id']}_")) == frozen, "cleanup never removes a template's"
    assert run_json(md("--json", "cleanup", "--dry-run"))["rbd_disks"] == []

    # explain --template and template show name the frozen snapshots and the clones.
    plan = run_json(md("--json", "explain", "--template", "t"))
    commands = [c for f in plan["files"] for c in f["commands"] if c[:2] == ["rbd", "clone"]]
    assert sorted(c[2] for c in commands) == sorted(f"{pool}/{n}@snap" for n in frozen)
    shown = run_json(md("--json", "template", "show", "t"))
    assert sorted(shown["rbd_disks"].values()) == [f"rbd:{pool}/{n}" for n in frozen]

    # 3. The next clone works; then everything goes, but the image.
    clone = run_json(md("--json", "boot", "--template", "t", "--name", "next"))
    assert clone["state"] == "running"
    assert ours(clone["uuid"]) == [f"{clone['uuid']}_{n}" for n in ALL_DISKS]
    run_json(md("--json", "delete", "next"))
    run_json(md("--json", "template", "delete", "t"))
    assert ours(f"tpl-{made['id']}", clone["uuid"]) == []
    run_json(md("--json", "image", "delete", "g"))
    assert image["id"] not in rbd_ls(ceph_conf, "images")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_cluster_down_at_spawn_is_a_clear_error_and_leaves_nothing(
    rbd_drv: LibvirtDriver, test_image_id: str, tmp_path: Path
) -> None:
    down = tmp_path / "down.conf"
    down.write_text(f"[global]\nmon host = 127.0.0.1:{closed_port()}\n")
    drv = LibvirtDriver(
        rbd_drv.conf.with_libvirt(images_rbd_ceph_conf=str(down), rbd_connect_timeout=2),
        host=rbd_drv.host,
    )
    before = set(rbd_drv.owned_domains())
    with pytest.raises(SpawnError) as err:
        drv.spawn(name="rbd-down", image=test_image_id, flavor="t1.nano")
    assert err.value.step == "create_image"
    assert "cannot reach the Ceph cluster" in str(err.value)
    assert "within 2 s" in str(err.value)
    assert err.value.hint is not None
    assert err.value.instance is not None
    instance_uuid = err.value.instance.uuid
    assert_nothing_left(rbd_drv, instance_uuid)
    assert set(rbd_drv.owned_domains()) == before


def test_missing_pool_is_a_clear_error_and_leaves_nothing(
    rbd_drv: LibvirtDriver, test_image_id: str
) -> None:
    pool = f"missing-{uuid.uuid4().hex[:8]}"
    drv = LibvirtDriver(rbd_drv.conf.with_libvirt(images_rbd_pool=pool), host=rbd_drv.host)
    with pytest.raises(SpawnError, match=f"Ceph pool '{pool}' does not exist") as err:
        drv.spawn(name="rbd-nopool", image=test_image_id, flavor="t1.nano")
    assert err.value.hint is not None
    assert f"ceph osd pool create {pool}" in err.value.hint
    assert err.value.instance is not None
    assert_nothing_left(rbd_drv, err.value.instance.uuid)


def test_cli_host_check_and_image_add_store_rbd(
    rbd_drv: LibvirtDriver,
    ceph_conf: str,
    test_image: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "rbd.conf"
    config.write_text(f"[libvirt]\nimages_type = rbd\nimages_rbd_ceph_conf = {ceph_conf}\n")
    state = ["--config", str(config), "--state-dir", str(rbd_drv.conf.state_path), "--json"]

    assert cli.main(["host", "check", *state], host=rbd_drv.host) == 0
    check = json.loads(capsys.readouterr().out)
    fsid = rbd_drv.rbd_driver().get_fsid()
    assert check["ceph"]["fsid"] == fsid
    assert check["ceph"]["health"].startswith("HEALTH_")
    assert (check["ceph"]["pool"], check["ceph"]["images_pool"]) == ("rbd", "images")

    argv = ["image", "add", str(test_image), "--name", "cli-rbd", "--store", "rbd",
            "--property", "os_type=linux", *state]  # fmt: skip
    assert cli.main(argv, host=rbd_drv.host) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["locations"][0]["url"] == f"rbd://{fsid}/images/{added['id']}/snap"
    assert cli.main(["image", "delete", added["id"], *state], host=rbd_drv.host) == 0
    capsys.readouterr()
    assert in_pool(rbd_drv, "images", added["id"]) == []

    config.write_text(config.read_text() + "images_rbd_pool = nowhere\n")
    assert cli.main(["host", "check", *state], host=rbd_drv.host) == 1
    check = json.loads(capsys.readouterr().out)
    assert check["ceph"]["pool"] == "nowhere (missing)"
    assert any("'nowhere' does not exist" in p for p in check["problems"])


def test_a_start_makes_a_missing_rbd_swap_again_and_never_the_root(
    rbd_drv: LibvirtDriver,
    test_image: Path,
    images: list[Image],
    instances: list[str],
    wait_console: Callable[..., Any],
) -> None:
    """An ephemeral or swap disk missing from the pool is made there again (ours: Nova's
    hard reboot leaves network disks out); the root is the instance's own data, never
    made again from the image."""
    image = add_rbd_image(rbd_drv, test_image, images, "rbd-restart")
    inst = rbd_drv.spawn(name="rbd-restart", image=image.id, flavor="t1.nano")
    instances.append(inst.uuid)
    log = console_log(rbd_drv, inst.uuid)
    wait_console(log, READY)
    pool = rbd_drv.conf.libvirt.images_rbd_pool
    rbd = rbd_drv.rbd_driver(pool)

    rbd_drv.power_off(inst.uuid, force=True)
    rbd.remove_image(f"{inst.uuid}_disk.swap")
    rbd_drv.power_on(inst.uuid)
    assert f"{inst.uuid}_disk.swap" in in_pool(rbd_drv, pool, inst.uuid)
    wait_console(log, r"^minidriver-guest: boot-count 2")
    second_boot = log.read_text(errors="replace").rsplit("minidriver-guest: up", 1)[1]
    assert "minidriver-guest: disk vdc 67108864 swap" in second_boot  # the new swap disk

    rbd_drv.power_off(inst.uuid, force=True)
    rbd.remove_image(f"{inst.uuid}_disk")
    with pytest.raises(MinidriverError, match=rf"its RBD disk {pool}/{inst.uuid}_disk is gone"):
        rbd_drv.power_on(inst.uuid)
    assert f"{inst.uuid}_disk" not in in_pool(rbd_drv, pool, inst.uuid)
