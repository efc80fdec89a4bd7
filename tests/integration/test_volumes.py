"""Volumes on real QEMU (issue 19): attach and detach on the running test guest, boot
from a volume (rbd, and libvirt's storage pool on the daemon), and the faults.

RBD volumes need the dev cluster (``MINIDRIVER_TEST_CEPH_CONF``, as test_rbd.py); the
pool backend runs on the daemon only (the embedded driver has no storage driver,
which a test checks). Every volume, instance and pool a test makes is its own and
removed after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from conftest import ceph_pool
from guest_shell import run, wait_for_line
from pytest_mock import MockerFixture
from test_rbd import ceph_conf, closed_port  # noqa: F401 - the cluster fixture

from minidriver import block_device, guest, rbd_utils
from minidriver.cli import main
from minidriver.driver import LibvirtDriver, base_filename
from minidriver.guestimages.testimage import IMAGE_PROPERTIES as LINUX
from minidriver.objects import GiB
from minidriver.serial_console import SerialConsole
from minidriver.volume.api import VolumeError, VolumeRecord
from minidriver.volume.pool import StoragePoolDriver, StoragePoolUnavailable

pytestmark = pytest.mark.integration

READY = r"^minidriver-guest: ready"
ROOT_LINE = r"^minidriver-guest: disk vda 1073741824 root"


def boot_count(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "boot-count" in line]


@pytest.fixture(params=["rbd", pytest.param("pool", marks=pytest.mark.connection("daemon"))])
def backend(request: pytest.FixtureRequest) -> str:
    """rbd on every connection (with the dev cluster); libvirt's storage pool on the
    daemon only: the embedded driver has none (the last test checks its refusal)."""
    name: str = request.param
    if name == "rbd":
        request.getfixturevalue("ceph_conf")
    return name


@pytest.fixture(scope="module", autouse=True)
def storage_pool_undefined(driver: LibvirtDriver) -> Iterator[None]:
    """The state dir's storage pool, which the pool backend defines on the shared
    daemon, is undefined after these tests: its directory goes with the state dir."""
    yield
    name = StoragePoolDriver(driver.conf, driver.host, driver.db.state_id).name
    try:
        found = driver.host.get_connection().storagePoolLookupByName(name)
    except libvirt.libvirtError:
        return  # never defined, or the embedded driver (no storage driver)
    if found.isActive():
        found.destroy()
    found.undefine()


@pytest.fixture
def vdrv(driver: LibvirtDriver, request: pytest.FixtureRequest) -> LibvirtDriver:
    """The session's driver (its host and state dir), with the dev cluster configured
    when there is one, and detaches that give up after 2 x 5 s."""
    conf = driver.conf.with_libvirt(device_detach_timeout=5, device_detach_attempts=2)
    with contextlib.suppress(pytest.skip.Exception):
        conf = conf.with_libvirt(images_rbd_ceph_conf=request.getfixturevalue("ceph_conf"))
    return LibvirtDriver(conf, host=driver.host)


@pytest.fixture
def made(vdrv: LibvirtDriver) -> Iterator[dict[str, list[str]]]:
    """Instances and volumes a test makes; removed after it (instances first)."""
    things: dict[str, list[str]] = {"instances": [], "volumes": []}
    yield things
    for instance_uuid in things["instances"]:
        with contextlib.suppress(Exception):
            vdrv.destroy(instance_uuid)
    for volume_id in things["volumes"]:
        with contextlib.suppress(Exception):
            vdrv.volumes.delete(volume_id)


def new_volume(
    drv: LibvirtDriver, made: dict[str, list[str]], backend: str, **kw: Any
) -> VolumeRecord:
    volume = drv.volumes.create(1, backend=backend, **kw)
    made["volumes"].append(volume.id)
    return volume


def running_guest(
    drv: LibvirtDriver,
    made: dict[str, list[str]],
    image_id: str,
    wait_console: Callable[..., Any],
    name: str,
) -> str:
    inst = drv.spawn(name=name, image=image_id, flavor="t1.nano")
    made["instances"].append(inst.uuid)
    wait_console(Path(inst.instance_dir) / "console.log", READY, timeout=180)
    return inst.uuid


def domain_of(drv: LibvirtDriver, instance_uuid: str) -> libvirt.virDomain:
    domain = drv.host.get_domain(instance_uuid)
    assert domain is not None
    return domain


def disk_in(xml: str, dev: str) -> str | None:
    return guest.find_disk_xml(xml, dev)


DISK_ADDED = r"minidriver-guest: disk-added (vd[a-z]+) (\d+) (\w+)"


def write_record(shell: SerialConsole, dev: str, record: str) -> None:
    """``record`` in the guest's disk ``dev``, its second sector, synced."""
    wrote = run(
        shell,
        f"printf '{record}\\n' | dd of=/dev/{dev} bs=512 seek=1 count=1 conv=sync,notrunc,fsync",
    )
    assert wrote.status == 0, wrote.output


def test_attach_detach_and_attach_elsewhere(
    vdrv: LibvirtDriver,
    backend: str,
    made: dict[str, list[str]],
    test_image_id: str,
    wait_console: Callable[..., Any],
) -> None:
    first = running_guest(vdrv, made, test_image_id, wait_console, "vol-first")
    volume = new_volume(vdrv, made, backend, name="data")
    record = f"minidriver-volume-{volume.id[:8]}"

    with vdrv.open_serial_console(first) as shell:
        attachment = vdrv.attach_volume(first, "data")
        assert attachment.device == "vdd"  # after vda, vdb, vdc of t1.nano
        # The guest's own report: the disk and its size.
        added = wait_for_line(shell, DISK_ADDED)
        name = added.group(1)
        assert added.group(2) == str(GiB)
        domain = domain_of(vdrv, first)
        for xml in (domain.XMLDesc(0), domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
            disk = disk_in(xml, "vdd")
            assert disk is not None and volume.id in disk  # its serial
            assert "slot='0x11'" in disk or 'slot="0x11"' in disk
        assert vdrv.volumes.get("data").status == "in-use"
        libvirt_xml = (Path(vdrv.db.get_instance(first).instance_dir) / "libvirt.xml").read_text()
        assert disk_in(libvirt_xml, "vdd") is not None
        write_record(shell, name, record)

        detached = vdrv.detach_volume(first, "data")
        wait_for_line(shell, f"minidriver-guest: disk-removed {name}")
    assert (detached.status, detached.attachment) == ("available", None)
    assert disk_in(domain.XMLDesc(0), "vdd") is None
    assert disk_in(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), "vdd") is None

    second = running_guest(vdrv, made, test_image_id, wait_console, "vol-second")
    with vdrv.open_serial_console(second) as shell:
        vdrv.attach_volume(second, volume.id, device="vdf")
        again = wait_for_line(shell, DISK_ADDED)
        assert again.group(2) == str(GiB)
        # What the first guest wrote, read back by the second.
        read = run(shell, f"dd if=/dev/{again.group(1)} bs=512 skip=1 count=1 2>/dev/null")
        assert read.output.split("\n")[0] == record
    # Deleting the instance keeps the volume, available again.
    vdrv.destroy(second)
    made["instances"].remove(second)
    assert vdrv.volumes.get(volume.id).status == "available"


def test_a_hard_reboot_keeps_an_attached_volume(
    vdrv: LibvirtDriver,
    backend: str,
    made: dict[str, list[str]],
    test_image_id: str,
    wait_console: Callable[..., Any],
) -> None:
    """The XML a hard reboot generates again (issue 21) has the volume at its device
    and PCI slot: the guest finds it at boot, with what it wrote there."""
    first = running_guest(vdrv, made, test_image_id, wait_console, "vol-reboot")
    volume = new_volume(vdrv, made, backend, name="kept")
    record = f"minidriver-volume-{volume.id[:8]}"
    with vdrv.open_serial_console(first) as shell:
        vdrv.attach_volume(first, volume.id)
        name = wait_for_line(shell, DISK_ADDED).group(1)
        write_record(shell, name, record)

    vdrv.reboot(first, hard=True)

    log = Path(vdrv.db.get_instance(first).instance_dir) / "console.log"
    # Ready again: its line after the second boot's count.
    wait_console(log, re.compile(r"boot-count 2\b[\s\S]*" + READY, re.MULTILINE), timeout=180)
    assert f"minidriver-guest: disk vdd {GiB} " in log.read_text()  # found at boot
    disk = disk_in(domain_of(vdrv, first).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), "vdd")
    assert disk is not None and volume.id in disk
    assert "slot='0x11'" in disk or 'slot="0x11"' in disk
    with vdrv.open_serial_console(first) as shell:
        read = run(shell, "dd if=/dev/vdd bs=512 skip=1 count=1 2>/dev/null")
        assert read.output.split("\n")[0] == record


def test_boot_from_a_volume_made_from_the_test_image(
    vdrv: LibvirtDriver,
    backend: str,
    made: dict[str, list[str]],
    test_image_id: str,
    wait_console: Callable[..., Any],
) -> None:
    volume = new_volume(vdrv, made, backend, image=test_image_id, name="root")
    if backend == "pool":  # uploaded with its holes: the volume is as sparse as the base
        base = vdrv.conf.base_dir / base_filename(test_image_id)
        allocated = Path(vdrv.volumes.get("root").location).stat().st_blocks * 512
        assert allocated <= base.stat().st_blocks * 512 + 1024 * 1024 < base.stat().st_size
    inst = vdrv.spawn(name="bfv", image="", flavor="t1.nano", boot_volume="root")
    made["instances"].append(inst.uuid)
    log = Path(inst.instance_dir) / "console.log"
    wait_console(log, ROOT_LINE, timeout=180)
    wait_console(log, READY, timeout=180)
    assert boot_count(log) == ["minidriver-guest: boot-count 1"]
    # No root disk file and nothing fetched for the root.
    assert not (Path(inst.instance_dir) / "disk").exists()
    assert "disk" not in vdrv.get_disks(inst.uuid)
    xml = domain_of(vdrv, inst.uuid).XMLDesc(0)
    root = disk_in(xml, "vda")
    assert root is not None and volume.id in root
    assert vdrv.volumes.get("root").attachment.boot_index == 0  # type: ignore[union-attr]
    with pytest.raises(VolumeError, match="is the root disk"):
        vdrv.detach_volume(inst.uuid, "root")

    vdrv.destroy(inst.uuid)
    made["instances"].remove(inst.uuid)
    assert vdrv.volumes.get("root").status == "available"
    again = vdrv.spawn(name="bfv-again", image="", flavor="t1.nano", boot_volume="root")
    made["instances"].append(again.uuid)
    log = Path(again.instance_dir) / "console.log"
    wait_console(log, READY, timeout=180)
    assert boot_count(log) == ["minidriver-guest: boot-count 2"]
    vdrv.destroy(again.uuid, delete_volume=True)
    made["instances"].remove(again.uuid)
    assert volume.id not in {v.id for v in vdrv.volumes.get_all()}


def test_boot_with_volume_size_makes_the_volume_first(
    vdrv: LibvirtDriver,
    made: dict[str, list[str]],
    test_image_id: str,
    wait_console: Callable[..., Any],
    ceph_conf: str,  # noqa: F811
) -> None:
    drv = LibvirtDriver(
        dataclasses.replace(
            vdrv.conf, volume=dataclasses.replace(vdrv.conf.volume, default_backend="rbd")
        ),
        host=vdrv.host,
    )
    inst = drv.spawn(name="bfv-size", image=test_image_id, flavor="t1.nano", volume_size=2)
    made["instances"].append(inst.uuid)
    (volume,) = [v for v in drv.volumes.get_all() if v.name == "bfv-size-root"]
    made["volumes"].append(volume.id)
    assert (volume.size_gb, volume.image_id, volume.backend) == (2, test_image_id, "rbd")
    wait_console(Path(inst.instance_dir) / "console.log", READY, timeout=180)
    assert domain_of(drv, inst.uuid).blockInfo("vda")[0] == 2 * GiB


@pytest.mark.connection("daemon")  # the default backend, the daemon's storage pool
def test_the_boot_command_reports_the_root_volume_it_made(
    vdrv: LibvirtDriver,
    made: dict[str, list[str]],
    test_image_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``boot --volume-size``'s report names the root volume (a boot from an image
    names none, without loading the volume service: test_cli)."""
    capsys.readouterr()
    code = main(
        ["--state-dir", str(vdrv.conf.state_path), "--json", "boot", "--image", test_image_id,
         "--flavor", "t1.nano", "--volume-size", "1", "--name", "bfv-cli", "--no-wait"],
        host=vdrv.host,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    booted = json.loads(out)
    made["instances"].append(booted["uuid"])
    (volume,) = booted["volumes"]
    made["volumes"].append(volume["id"])
    assert (volume["name"], volume["device"], volume["root"], volume["backend"]) == (
        "bfv-cli-root",
        "vda",
        True,
        "pool",
    )
    assert "disk" not in booted["disks"]


# -- faults ----------------------------------------------------------------------------


def unchanged(drv: LibvirtDriver, instance_uuid: str) -> tuple[str, str]:
    domain = domain_of(drv, instance_uuid)
    return domain.XMLDesc(0), domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def test_the_cluster_down_during_attach(
    vdrv: LibvirtDriver,
    made: dict[str, list[str]],
    test_image_id: str,
    wait_console: Callable[..., Any],
    tmp_path: Path,
    ceph_conf: str,  # noqa: F811
) -> None:
    instance_uuid = running_guest(vdrv, made, test_image_id, wait_console, "vol-down")
    volume = new_volume(vdrv, made, "rbd")
    down = tmp_path / "down.conf"
    down.write_text(f"[global]\nmon host = 127.0.0.1:{closed_port()}\n")
    drv = LibvirtDriver(
        vdrv.conf.with_libvirt(images_rbd_ceph_conf=str(down), rbd_connect_timeout=2),
        host=vdrv.host,
    )
    before = unchanged(drv, instance_uuid)
    with pytest.raises(rbd_utils.CephUnreachable, match="within 2 s"):
        drv.attach_volume(instance_uuid, volume.id)
    assert unchanged(drv, instance_uuid) == before
    after = vdrv.volumes.get(volume.id)
    assert (after.status, after.attachment) == ("available", None)


@pytest.fixture
def quota_pool(ceph_conf: str) -> Iterator[str]:  # noqa: F811
    """A pool of this test's own, full: its quota is one byte and it holds data."""

    def ceph_out(pool: str, *args: str) -> str:
        line = f"'{pool}'"
        out = subprocess.run(
            ["ceph", "-c", ceph_conf, *args], check=True, capture_output=True, text=True
        ).stdout
        return "".join(x for x in out.splitlines() if line in x)

    with ceph_pool(ceph_conf, "mdtest-quota") as pool:
        subprocess.run(
            ["rbd", "-c", ceph_conf, "create", "--size", "4M", f"{pool}/seed"], check=True
        )
        subprocess.run(
            ["rbd", "-c", ceph_conf, "bench", "--io-type", "write", "--io-total", "4M",
             f"{pool}/seed"],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            ["ceph", "-c", ceph_conf, "osd", "pool", "set-quota", pool, "max_bytes", "1"],
            check=True, capture_output=True,
        )  # fmt: skip
        # The monitor flags the pool once the OSD has reported its usage (seconds).
        deadline = time.monotonic() + 60
        while "full_quota" not in ceph_out(pool, "osd", "pool", "ls", "detail"):
            assert time.monotonic() < deadline, f"pool {pool} never flagged full"
            time.sleep(1)
        yield pool


def test_a_full_pool_refuses_a_new_volume_at_once(vdrv: LibvirtDriver, quota_pool: str) -> None:
    drv = LibvirtDriver(
        dataclasses.replace(
            vdrv.conf, volume=dataclasses.replace(vdrv.conf.volume, rbd_pool=quota_pool)
        ),
        host=vdrv.host,
    )
    with pytest.raises(rbd_utils.PoolFull, match=r"is full \(its quota is reached\)") as exc:
        drv.volumes.create(1, backend="rbd")
    assert exc.value.hint is not None and "set-quota" in exc.value.hint
    assert drv.volumes.get_all() == []
    assert drv.rbd_driver(quota_pool).list_images() == ["seed"]


def test_a_volume_attached_elsewhere_is_refused(
    vdrv: LibvirtDriver,
    made: dict[str, list[str]],
    test_image_id: str,
    wait_console: Callable[..., Any],
    ceph_conf: str,  # noqa: F811
) -> None:
    first = running_guest(vdrv, made, test_image_id, wait_console, "vol-a")
    second = running_guest(vdrv, made, test_image_id, wait_console, "vol-b")
    volume = new_volume(vdrv, made, "rbd")
    vdrv.attach_volume(first, volume.id)
    before = unchanged(vdrv, second)
    with pytest.raises(VolumeError, match="attached to instance vol-a"):
        vdrv.attach_volume(second, volume.id)
    assert unchanged(vdrv, second) == before
    assert vdrv.volumes.get(volume.id).attachment.instance_uuid == first  # type: ignore[union-attr]


def test_a_disk_the_guest_will_not_release(
    vdrv: LibvirtDriver,
    made: dict[str, list[str]],
    test_image_id: str,
    wait_console: Callable[..., Any],
    mocker: MockerFixture,
    ceph_conf: str,  # noqa: F811
) -> None:
    instance_uuid = running_guest(vdrv, made, test_image_id, wait_console, "vol-stuck")
    volume = new_volume(vdrv, made, "rbd")
    vdrv.attach_volume(instance_uuid, volume.id)
    before = unchanged(vdrv, instance_uuid)
    real = libvirt.virDomain.detachDeviceFlags

    def guest_ignores_unplug(self: libvirt.virDomain, xml: str, flags: int = 0) -> int:
        # The fault: a guest that never acknowledges the unplug (a live detach that
        # libvirt accepts and the device stays); the definition's detach is real.
        if flags & libvirt.VIR_DOMAIN_AFFECT_LIVE:
            return 0
        result: int = real(self, xml, flags)
        return result

    mocker.patch.object(libvirt.virDomain, "detachDeviceFlags", guest_ignores_unplug)
    with pytest.raises(block_device.DeviceDetachFailed, match="did not release vdd"):
        vdrv.detach_volume(instance_uuid, volume.id)
    live, persistent = unchanged(vdrv, instance_uuid)
    assert disk_in(live, "vdd") is not None
    assert disk_in(persistent, "vdd") is not None, "the definition must keep the disk too"
    assert disk_in(before[1], "vdd") == disk_in(persistent, "vdd")
    assert vdrv.volumes.get(volume.id).status == "in-use"
    mocker.stopall()
    assert vdrv.detach_volume(instance_uuid, volume.id).status == "available"


def test_attach_up_to_the_cap_of_fifteen(
    vdrv: LibvirtDriver,
    made: dict[str, list[str]],
    test_image_id: str,
    wait_console: Callable[..., Any],
    ceph_conf: str,  # noqa: F811
) -> None:
    instance_uuid = running_guest(vdrv, made, test_image_id, wait_console, "vol-cap")
    devices = []
    for _ in guest.VOLUME_PCI_SLOTS:
        volume = new_volume(vdrv, made, "rbd")
        devices.append(vdrv.attach_volume(instance_uuid, volume.id).device)
    assert len(devices) == 15
    domain = domain_of(vdrv, instance_uuid)
    assert all(domain.blockInfo(dev)[0] == GiB for dev in devices)
    one_more = new_volume(vdrv, made, "rbd")
    before = unchanged(vdrv, instance_uuid)
    with pytest.raises(guest.NoFreePciSlot, match="all 15 PCI slots"):
        vdrv.attach_volume(instance_uuid, one_more.id)
    assert unchanged(vdrv, instance_uuid) == before
    assert vdrv.volumes.get(one_more.id).status == "available"
    assert domain.isActive()


@pytest.mark.connection("embed")
def test_the_pool_backend_is_refused_on_the_embedded_driver(driver: LibvirtDriver) -> None:
    with pytest.raises(StoragePoolUnavailable, match="embedded driver") as exc:
        driver.volumes.create(1, backend="pool")
    assert exc.value.hint is not None and "rbd" in exc.value.hint
    assert driver.volumes.get_all() == []


def test_a_volume_from_an_image_in_ceph_is_a_clone_of_its_snapshot(
    vdrv: LibvirtDriver,
    made: dict[str, list[str]],
    test_image: Path,
    ceph_conf: str,  # noqa: F811
) -> None:
    image = vdrv.images.add(
        test_image,
        name=f"vol-clone-{uuid.uuid4().hex[:8]}",
        disk_format="qcow2",
        store="rbd",
        properties=LINUX,
    )
    try:
        volume = new_volume(vdrv, made, "rbd", image=image.id)
        rbd = vdrv.rbd_driver(vdrv.conf.volume.rbd_pool)
        name = f"volume-{volume.id}"
        location = rbd_utils.RbdLocation(rbd.get_fsid(), "images", image.id, "snap")
        assert rbd.parent_info(name) == (location, 64 * 2**20)  # not flattened
        assert rbd.size(name) == GiB
        base = vdrv.conf.base_dir / hashlib.sha1(image.id.encode()).hexdigest()
        assert not base.exists(), "a clone fetches nothing into _base"
        vdrv.volumes.delete(volume.id)
        made["volumes"].remove(volume.id)
        assert name not in rbd.list_images()
    finally:
        vdrv.images.delete(image.id)


def test_attach_to_a_stopped_instance_changes_its_definition_only(
    vdrv: LibvirtDriver,
    made: dict[str, list[str]],
    test_image_id: str,
    ceph_conf: str,  # noqa: F811
) -> None:
    inst = vdrv.spawn(name="vol-stopped", image=test_image_id, flavor="t1.nano")
    made["instances"].append(inst.uuid)
    vdrv.power_off(inst.uuid, force=True)
    volume = new_volume(vdrv, made, "rbd")
    assert vdrv.attach_volume(inst.uuid, volume.id).device == "vdd"
    domain = domain_of(vdrv, inst.uuid)
    assert not domain.isActive()
    assert disk_in(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), "vdd") is not None
    vdrv.power_on(inst.uuid)
    assert domain.blockInfo("vdd")[0] == GiB  # the started guest has it
    vdrv.power_off(inst.uuid, force=True)
    assert vdrv.detach_volume(inst.uuid, volume.id).status == "available"
    assert disk_in(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), "vdd") is None
