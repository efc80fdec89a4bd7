"""An instance's RBD disks found as Nova finds them, the pool's ``<uuid>_*`` images, and
not in ``disk.info`` (which lists file disks only, as Nova's): spawn, show, start,
delete and cleanup on the Ceph dev cluster (``MINIDRIVER_TEST_CEPH_CONF``) with
libvirt's test driver, real files and a real state DB. Every RBD image a test makes is
named by a fresh uuid and removed by that test."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ceph_conf_or_skip, rbd_ls

from minidriver.backing import MissingDisk
from minidriver.cleanup import cleanup
from minidriver.config import Config
from minidriver.driver import LibvirtDriver

POOL = "rbd"  # images_rbd_pool's default
ALL_DISKS = ("disk", "disk.config", "disk.local", "disk.swap")  # t1.nano, config drive


@pytest.fixture(scope="session")
def ceph_conf() -> str:
    return ceph_conf_or_skip()


@pytest.fixture
def rbd_drv(
    conf: Config, ceph_conf: str, make_driver: Callable[[Config], LibvirtDriver]
) -> LibvirtDriver:
    """This test's state dir with images_type = rbd, in the dev cluster's pool."""
    return make_driver(conf.with_libvirt(images_type="rbd", images_rbd_ceph_conf=ceph_conf))


@pytest.fixture
def image_id(rbd_drv: LibvirtDriver, empty_qcow2: Path) -> str:
    """A blank qcow2, in the file store: each spawn fetches, converts and imports it."""
    return rbd_drv.images.add(empty_qcow2, name="cirros", disk_format="qcow2").id


@pytest.fixture
def instances(rbd_drv: LibvirtDriver, ceph_conf: str) -> Iterator[list[str]]:
    """Uuids of the instances a test boots: whatever the test left of them goes after."""
    made: list[str] = []
    yield made
    for instance_uuid in made:
        with contextlib.suppress(Exception):
            rbd_drv.destroy(instance_uuid)
        for name in ours(ceph_conf, instance_uuid):
            subprocess.run(["rbd", "-c", ceph_conf, "rm", f"{POOL}/{name}"], check=False)


def ours(ceph_conf: str, instance_uuid: str) -> list[str]:
    return [n for n in rbd_ls(ceph_conf, POOL) if n.startswith(f"{instance_uuid}_")]


def spawn(drv: LibvirtDriver, image_id: str, instances: list[str], name: str) -> str:
    inst = drv.spawn(name, image_id, "t1.nano", config_drive=True)
    instances.append(inst.uuid)
    return inst.uuid


def another_process(drv: LibvirtDriver) -> LibvirtDriver:
    """A driver with no spawn of its own to go by (as `show` or `delete` in a new
    process), on the same libvirt connection: a test driver's state is its own."""
    return LibvirtDriver(drv.conf, host=drv.host)


def remove_domain(drv: LibvirtDriver, instance_uuid: str) -> None:
    """The domain stopped and undefined behind minidriver's back (a crash's work)."""
    domain = drv.host.get_domain(instance_uuid)
    assert domain is not None
    domain.destroy()
    domain.undefine()


def test_an_rbd_instance_has_no_disk_info_and_its_disks_are_found_by_name(
    rbd_drv: LibvirtDriver,
    image_id: str,
    instances: list[str],
    ceph_conf: str,
) -> None:
    uuid = spawn(rbd_drv, image_id, instances, "no-info")
    instance_dir = rbd_drv.instance_dir(uuid)
    assert sorted(p.name for p in instance_dir.iterdir()) == ["console.log", "libvirt.xml"]
    assert ours(ceph_conf, uuid) == [f"{uuid}_{n}" for n in ALL_DISKS]

    expected = {f"rbd:{POOL}/{uuid}_{n}": "raw" for n in ALL_DISKS}
    other = another_process(rbd_drv)
    assert other.instance_disks(instance_dir, uuid) == expected
    shown = other.get_disks(uuid)
    assert {n: d.path for n, d in shown.items()} == {n: f"rbd:{POOL}/{uuid}_{n}" for n in ALL_DISKS}
    # A crash of a delete between the undefine and the disks' removal: neither a domain
    # nor a disk.info names them now; the pool still does.
    remove_domain(rbd_drv, uuid)
    assert other.instance_disks(instance_dir, uuid) == expected


def test_an_image_named_for_the_instance_is_one_of_its_disks_and_goes_with_it(
    rbd_drv: LibvirtDriver,
    image_id: str,
    instances: list[str],
    ceph_conf: str,
) -> None:
    uuid = spawn(rbd_drv, image_id, instances, "extra")
    subprocess.run(
        ["rbd", "-c", ceph_conf, "create", "--size", "4M", f"{POOL}/{uuid}_disk.extra"],
        check=True,
    )
    other = another_process(rbd_drv)
    shown = other.get_disks(uuid)
    assert sorted(shown) == sorted([*ALL_DISKS, "disk.extra"])
    assert shown["disk.extra"].virtual_size == 4 * 2**20

    other.destroy(uuid)
    assert ours(ceph_conf, uuid) == []
    assert not rbd_drv.instance_dir(uuid).exists()


def test_an_instance_whose_disk_info_lists_its_rbd_disks_still_works(
    rbd_drv: LibvirtDriver,
    image_id: str,
    instances: list[str],
    ceph_conf: str,
) -> None:
    """An instance made before disk.info listed file disks only: its rbd: entries are
    read as before, with no disk twice, and nothing of it is left after a delete."""
    uuid = spawn(rbd_drv, image_id, instances, "old-style")
    instance_dir = rbd_drv.instance_dir(uuid)
    old_style = {f"rbd:{POOL}/{uuid}_{n}": "raw" for n in ALL_DISKS}
    (instance_dir / "disk.info").write_text(json.dumps(old_style))
    other = another_process(rbd_drv)

    assert other.instance_disks(instance_dir, uuid) == old_style
    assert sorted(other.get_disks(uuid)) == sorted(ALL_DISKS)
    other.power_off(uuid, force=True)
    subprocess.run(["rbd", "-c", ceph_conf, "rm", f"{POOL}/{uuid}_disk.swap"], check=True)
    other.power_on(uuid)
    assert ours(ceph_conf, uuid) == [f"{uuid}_{n}" for n in ALL_DISKS]

    other.destroy(uuid)
    assert ours(ceph_conf, uuid) == []
    assert not instance_dir.exists()
    assert other.db.list_instances() == []


def test_a_start_makes_a_missing_rbd_swap_again_and_refuses_a_missing_root(
    rbd_drv: LibvirtDriver,
    image_id: str,
    instances: list[str],
    ceph_conf: str,
) -> None:
    """A disk gone from the pool is still the instance's: its domain names it."""
    uuid = spawn(rbd_drv, image_id, instances, "missing")
    other = another_process(rbd_drv)
    other.power_off(uuid, force=True)
    subprocess.run(["rbd", "-c", ceph_conf, "rm", f"{POOL}/{uuid}_disk.swap"], check=True)

    other.power_on(uuid)
    assert f"{uuid}_disk.swap" in ours(ceph_conf, uuid)
    assert other.get_disks(uuid)["disk.swap"].virtual_size == 64 * 2**20

    other.power_off(uuid, force=True)
    subprocess.run(["rbd", "-c", ceph_conf, "rm", f"{POOL}/{uuid}_disk"], check=True)
    with pytest.raises(MissingDisk, match=rf"its RBD disk {POOL}/{uuid}_disk is gone"):
        other.power_on(uuid)


def test_cleanup_lists_then_removes_the_rbd_disks_of_a_killed_spawn(
    rbd_drv: LibvirtDriver, image_id: str, instances: list[str], ceph_conf: str
) -> None:
    killed = spawn(rbd_drv, image_id, instances, "killed")
    rbd_drv.db.update_instance(killed, state="building")  # as a killed spawn leaves it
    # A delete that died after the domain and the record went: a dir of no instance.
    stray = spawn(rbd_drv, image_id, instances, "stray")
    remove_domain(rbd_drv, stray)
    rbd_drv.db.delete_instance(stray)

    dry = cleanup(rbd_drv, dry_run=True)
    expected = sorted(f"{POOL}/{u}_{n}" for u in (killed, stray) for n in ALL_DISKS)
    assert sorted(dry.rbd_disks) == expected
    assert ours(ceph_conf, killed) and ours(ceph_conf, stray)

    done = cleanup(rbd_drv)
    assert sorted(done.rbd_disks) == expected
    assert ours(ceph_conf, killed) == ours(ceph_conf, stray) == []
    assert not rbd_drv.instance_dir(killed).exists() and not rbd_drv.instance_dir(stray).exists()
    assert rbd_drv.db.list_instances() == []


def test_cleanup_with_the_cluster_out_of_reach_says_so_and_keeps_what_finds_them(
    rbd_drv: LibvirtDriver,
    image_id: str,
    instances: list[str],
    make_driver: Callable[[Config], LibvirtDriver],
    ceph_conf: str,
    tmp_path: Path,
) -> None:
    killed = spawn(rbd_drv, image_id, instances, "killed")
    rbd_drv.db.update_instance(killed, state="building")
    remove_domain(rbd_drv, killed)  # no XML to name the pool either
    down = tmp_path / "down.conf"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        down.write_text(f"[global]\nmon host = 127.0.0.1:{s.getsockname()[1]}\n")
    cut_off = make_driver(
        rbd_drv.conf.with_libvirt(images_rbd_ceph_conf=str(down), rbd_connect_timeout=1)
    )

    for dry_run in (True, False):
        report = cleanup(cut_off, dry_run=dry_run)
        assert any(
            line.startswith(f"RBD disks of {killed}") and "cannot reach the Ceph cluster" in line
            for line in report.skipped
        ), report
        assert report.rbd_disks == []
    assert rbd_drv.db.get_instance(killed).state == "building"
    assert rbd_drv.instance_dir(killed).is_dir()
    assert ours(ceph_conf, killed) == [f"{killed}_{n}" for n in ALL_DISKS]

    assert sorted(cleanup(rbd_drv).rbd_disks) == [f"{POOL}/{killed}_{n}" for n in ALL_DISKS]
    assert ours(ceph_conf, killed) == []
