"""The volume service (issue 19) on libvirt's test driver: its pool backend through
libvirt's storage API, the records and Cinder's states in real SQLite, the refusals.
The RBD backend and attach/detach run in tests/integration/test_volumes.py."""

from __future__ import annotations

import sqlite3
import subprocess
import uuid
from pathlib import Path

import libvirt
import pytest
from pytest_mock import MockerFixture

from minidriver import cleanup
from minidriver.config import load_config
from minidriver.db import InstanceRecord
from minidriver.driver import LibvirtDriver
from minidriver.exception import ConfigError
from minidriver.objects import GiB
from minidriver.volume import pool
from minidriver.volume.api import Attachment, VolumeError, VolumeNotFound, VolumeStatus


def pool_of(drv: LibvirtDriver) -> libvirt.virStoragePool:
    name = f"minidriver-{drv.db.state_id[:8]}-volumes"
    return drv.host.get_connection().storagePoolLookupByName(name)


def add_instance(drv: LibvirtDriver, name: str = "vm1") -> InstanceRecord:
    """A record alone (no domain): what the volume service reads of an instance."""
    rec = InstanceRecord(
        uuid=str(uuid.uuid4()),
        name=f"instance-{name}",
        display_name=name,
        flavor="t1.nano",
        image_id="",
        state="running",
        created_at="2026-12-03T00:00:00Z",
        instance_dir="/nonexistent",
    )
    drv.db.create_instance(rec)
    return rec


def test_a_blank_volume_is_a_volume_of_this_state_dirs_pool(drv: LibvirtDriver) -> None:
    volume = drv.volumes.create(1, name="data")
    assert (volume.status, volume.backend, volume.size_gb) == ("available", "pool", 1)
    vol = pool_of(drv).storageVolLookupByName(f"volume-{volume.id}")
    assert vol.info()[1] == GiB  # capacity
    assert vol.path() == volume.location
    assert [v.id for v in drv.volumes.get_all()] == [volume.id]
    assert drv.volumes.get("data").id == volume.id
    assert drv.volumes.get(volume.id[:8]).id == volume.id


def test_delete_removes_the_pool_volume_and_the_record(drv: LibvirtDriver) -> None:
    volume = drv.volumes.create(1, name="data")
    drv.volumes.delete("data")
    assert pool_of(drv).listVolumes() == []
    assert drv.volumes.get_all() == []
    with pytest.raises(VolumeNotFound):
        drv.volumes.get(volume.id)


def test_delete_is_refused_while_attached_naming_the_instance(drv: LibvirtDriver) -> None:
    volume = drv.volumes.create(1, name="data")
    rec = add_instance(drv, "vm1")
    drv.volumes.record_attachment(Attachment(volume.id, rec.uuid, "vdd"))
    assert drv.volumes.get(volume.id).status == VolumeStatus.IN_USE
    with pytest.raises(VolumeError, match=r"attached to instance vm1 .* as vdd") as exc:
        drv.volumes.delete("data")
    assert exc.value.hint is not None and "volume detach" in exc.value.hint
    assert drv.volumes.get(volume.id).status == VolumeStatus.IN_USE
    assert pool_of(drv).listVolumes() == [f"volume-{volume.id}"]


def test_a_volume_attached_elsewhere_is_not_attachable(drv: LibvirtDriver) -> None:
    volume = drv.volumes.create(1)
    first, second = add_instance(drv, "vm1"), add_instance(drv, "vm2")
    drv.volumes.record_attachment(Attachment(volume.id, first.uuid, "vdd"))
    with pytest.raises(VolumeError, match="attached to instance vm1"):
        drv.volumes.check_attachable(drv.volumes.get(volume.id), second.uuid)


def test_deleting_an_instance_makes_its_volumes_available(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    volume = drv.volumes.create(1)
    instance = drv.spawn("vm1", empty_qcow2_id, "t1.nano")
    drv.volumes.record_attachment(Attachment(volume.id, instance.uuid, "vdd"))
    drv.destroy(instance.uuid)
    kept = drv.volumes.get(volume.id)
    assert (kept.status, kept.attachment) == ("available", None)


def test_one_attachment_per_volume_in_the_database(drv: LibvirtDriver) -> None:
    volume = drv.volumes.create(1)
    first, second = add_instance(drv, "vm1"), add_instance(drv, "vm2")
    drv.volumes.record_attachment(Attachment(volume.id, first.uuid, "vdd"))
    with pytest.raises(Exception, match="UNIQUE") as exc:
        drv.volumes.record_attachment(Attachment(volume.id, second.uuid, "vdd"))
    assert isinstance(exc.value.__cause__, sqlite3.IntegrityError)
    attachment = drv.volumes.get(volume.id).attachment
    assert attachment is not None and attachment.instance_uuid == first.uuid


@pytest.mark.parametrize("size", [0, -1, 16385])
def test_sizes_out_of_range_are_refused_before_a_record(drv: LibvirtDriver, size: int) -> None:
    with pytest.raises(VolumeError, match="1 to 16384 GB"):
        drv.volumes.create(size)
    assert drv.volumes.get_all() == []


def test_an_image_larger_than_the_volume_is_refused(drv: LibvirtDriver, tmp_path: Path) -> None:
    big = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", big, str(2 * GiB)], check=True)
    image = drv.images.add(big, name="big", disk_format="qcow2")
    with pytest.raises(VolumeError, match="image big needs 2 GB") as exc:
        drv.volumes.create(1, image=image.id)
    assert exc.value.hint == "give --size 2 or more"
    assert drv.volumes.get_all() == []


def test_a_backend_failure_leaves_the_record_in_error(
    drv: LibvirtDriver, mocker: MockerFixture
) -> None:
    mocker.patch.object(
        pool.StoragePoolDriver,
        "create_volume",
        side_effect=libvirt.libvirtError("injected: no space left in the pool"),
    )
    with pytest.raises(libvirt.libvirtError):
        drv.volumes.create(1, name="broken")
    (volume,) = drv.volumes.get_all()
    assert (volume.status, volume.location) == ("error", "")
    drv.volumes.delete("broken")  # as Cinder: an errored volume is deleted
    assert drv.volumes.get_all() == []


def test_volume_options(tmp_path: Path) -> None:
    ini = tmp_path / "md.conf"
    ini.write_text("[volume]\ndefault_backend = rbd\nrbd_pool = vols\n")
    conf = load_config(ini, state_dir=tmp_path / "s", environ={})
    assert (conf.volume.default_backend, conf.volume.rbd_pool) == ("rbd", "vols")
    assert conf.volume.storage_pool_path == str(tmp_path / "s" / "volumes")
    ini.write_text("[volume]\ndefault_backend = lvm\n")
    with pytest.raises(ConfigError, match="not one of: rbd, pool"):
        load_config(ini, state_dir=tmp_path / "s", environ={})
    ini.write_text("[libvirt]\ndevice_detach_timeout = 0\n")
    with pytest.raises(ConfigError, match="device_detach_timeout = 0: at least 1"):
        load_config(ini, state_dir=tmp_path / "s", environ={})


def test_cleanup_frees_the_volumes_of_an_instance_whose_domain_is_gone(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    volume = drv.volumes.create(1)
    kept = drv.volumes.create(1)
    gone = drv.spawn("gone", empty_qcow2_id, "t1.nano")
    alive = drv.spawn("alive", empty_qcow2_id, "t1.nano")
    drv.volumes.record_attachment(Attachment(volume.id, gone.uuid, "vdd"))
    drv.volumes.record_attachment(Attachment(kept.id, alive.uuid, "vdd"))
    domain = drv.host.get_domain(gone.uuid)
    assert domain is not None
    drv.host.undefine(domain)  # as after a crash: the record, no domain

    assert cleanup.cleanup(drv, dry_run=True).volumes == [volume.id]
    assert drv.volumes.get(volume.id).status == VolumeStatus.IN_USE
    report = cleanup.cleanup(drv)
    assert (report.records, report.volumes) == ([gone.uuid], [volume.id])
    assert drv.volumes.get(volume.id).status == VolumeStatus.AVAILABLE
    assert drv.volumes.get(kept.id).status == VolumeStatus.IN_USE


def test_delete_removes_storage_a_failed_create_left_unrecorded(
    drv: LibvirtDriver, mocker: MockerFixture
) -> None:
    real = pool.StoragePoolDriver.create_volume

    def made_then_failed(self: pool.StoragePoolDriver, volume_id: str, size: int) -> str:
        real(self, volume_id, size)
        raise libvirt.libvirtError("injected: the connection dropped after the create")

    mocker.patch.object(pool.StoragePoolDriver, "create_volume", made_then_failed)
    with pytest.raises(libvirt.libvirtError):
        drv.volumes.create(1, name="half")
    (volume,) = drv.volumes.get_all()
    assert (volume.status, volume.location) == ("error", "")
    assert pool_of(drv).listVolumes() == [f"volume-{volume.id}"]
    drv.volumes.delete("half")
    assert pool_of(drv).listVolumes() == []
    assert drv.volumes.get_all() == []
