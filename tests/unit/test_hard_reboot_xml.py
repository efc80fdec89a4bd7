"""A hard reboot generates the domain XML again, as Nova's ``_hard_reboot`` does: what
spawn defined comes back whole (disks, sources, targets, the NIC, sysinfo, <os>), and
a setting changed since the boot shows. On libvirt's test driver (a definition file
per test), with real files, real qemu-img and a real state database.

The setting changed is ``[libvirt] sysinfo_serial`` (``unique`` -> ``none``): the
regenerated XML is spawn's without the SMBIOS serial; a definition kept as it was
would still have it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from minidriver import blockinfo, guest
from minidriver.config import Config
from minidriver.driver import LibvirtDriver
from minidriver.objects import DiskBus, ImageMeta
from minidriver.volume.api import Attachment


def definition(drv: LibvirtDriver, uuid: str) -> str:
    domain = drv.host.get_domain(uuid)
    assert domain is not None
    return str(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def canonical(xml: str) -> str:
    """libvirt's XML with whitespace between elements dropped, for comparison."""
    parser = etree.XMLParser(remove_blank_text=True)
    return etree.tostring(etree.fromstring(xml.encode(), parser), method="c14n").decode()


def without_serial(xml: str) -> str:
    tree = etree.fromstring(xml.encode())
    entries = tree.findall("sysinfo/system/entry[@name='serial']")
    assert entries, "spawn's XML has a serial to lose"
    for entry in entries:
        parent = entry.getparent()
        assert parent is not None
        parent.remove(entry)
    return etree.tostring(tree, encoding="unicode")


@pytest.fixture
def reconfigured(drv: LibvirtDriver) -> Iterator[LibvirtDriver]:
    """The driver of a later command, its configuration edited since the boot
    (``sysinfo_serial = none``), on the same libvirt connection (the test driver keeps
    its domains per connection)."""
    later = LibvirtDriver(drv.conf.with_libvirt(sysinfo_serial="none"), host=drv.host)
    yield later
    later.db.close()


def hard_reboot(drv: LibvirtDriver, later: LibvirtDriver, uuid: str) -> tuple[str, str]:
    """Spawn's definition and the one after a hard reboot by ``later``."""
    spawned = definition(drv, uuid)
    assert later.reboot(uuid, hard=True) == "hard"
    assert later.get_info(uuid).state == "running"
    return spawned, definition(later, uuid)


def test_a_plain_instance_comes_back_as_spawn_defined_it_with_the_change(
    drv: LibvirtDriver, reconfigured: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    written = Path(inst.instance_dir) / "libvirt.xml"
    rendered_at_spawn = written.read_text()

    spawned, rebooted = hard_reboot(drv, reconfigured, inst.uuid)

    assert canonical(rebooted) == canonical(without_serial(spawned))
    assert canonical(written.read_text()) == canonical(without_serial(rendered_at_spawn))


def test_a_start_after_a_stop_generates_it_again_too(
    drv: LibvirtDriver, reconfigured: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    spawned = definition(drv, inst.uuid)
    drv.power_off(inst.uuid, force=True)

    reconfigured.power_on(inst.uuid)

    assert canonical(definition(drv, inst.uuid)) == canonical(without_serial(spawned))


def test_the_machine_type_configured_since_shows(drv: LibvirtDriver, empty_qcow2_id: str) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    later = LibvirtDriver(drv.conf.with_libvirt(hw_machine_type="q35"), host=drv.host)
    try:
        later.reboot(inst.uuid, hard=True)
    finally:
        later.db.close()

    machine = etree.fromstring(definition(drv, inst.uuid).encode()).find("os/type")
    assert machine is not None and machine.get("machine") == "q35"


def test_a_config_drive_keeps_its_file_device_and_format(
    drv: LibvirtDriver, reconfigured: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano", config_drive=True)
    # Changed since the boot too: the drive's file was made as ISO 9660 and stays so.
    conf = reconfigured.conf
    reconfigured.conf = dataclasses.replace(
        conf, default=dataclasses.replace(conf.default, config_drive_format="vfat")
    )

    spawned, rebooted = hard_reboot(drv, reconfigured, inst.uuid)

    assert canonical(rebooted) == canonical(without_serial(spawned))
    drives = [
        disk.get("device")
        for disk in etree.fromstring(rebooted.encode()).iterfind("devices/disk")
        if disk.find("source").get("file") == str(Path(inst.instance_dir) / "disk.config")  # type: ignore[union-attr]
    ]
    assert drives == ["cdrom"]


def test_a_user_mode_nic_keeps_its_mac_and_port(
    drv: LibvirtDriver, reconfigured: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano", network="user")
    port = drv.db.get_instance(inst.uuid).forward_port

    spawned, rebooted = hard_reboot(drv, reconfigured, inst.uuid)

    assert canonical(rebooted) == canonical(without_serial(spawned))
    # The test driver drops QEMU's arguments from its XML: libvirt.xml has them.
    written = (Path(inst.instance_dir) / "libvirt.xml").read_text()
    assert f"hostfwd=tcp:127.0.0.1:{port}-:22" in written
    assert '<entry name="serial">' not in written
    assert drv.db.get_instance(inst.uuid).forward_port == port


def attach_in_definition(drv: LibvirtDriver, uuid: str, volume_id: str) -> Attachment:
    """What ``attach_volume`` leaves in a stopped instance's definition and records
    (the test driver has no virDomainAttachDeviceFlags): the disk at the next free
    device and PCI slot, its serial the volume's id."""
    xml = definition(drv, uuid)
    dev = blockinfo.get_volume_device(guest.disk_targets(xml), DiskBus.VIRTIO, None)
    connection = drv.volumes.connection(drv.volumes.get(volume_id))
    disk = guest.get_volume_disk(
        connection.path,
        connection.driver_format,
        network=connection.network,
        dev=dev,
        bus="virtio",
        cache="none",
        serial=volume_id,
        pci_address=guest.free_volume_pci_address(xml, machine_type=guest.machine_type_of(xml)),
    )
    tree = etree.fromstring(xml.encode())
    devices = tree.find("devices")
    assert devices is not None
    devices.append(etree.fromstring(guest.disk_to_xml(disk).encode()))
    drv.host.define(etree.tostring(tree, encoding="unicode"))
    attachment = Attachment(volume_id, uuid, dev)
    drv.volumes.record_attachment(attachment)
    return attachment


def test_an_attached_volume_stays_at_its_device_and_slot(
    drv: LibvirtDriver, reconfigured: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano", network="user", config_drive=True)
    drv.power_off(inst.uuid, force=True)
    volume = drv.volumes.create(1, name="data")
    attachment = attach_in_definition(drv, inst.uuid, volume.id)

    spawned, rebooted = hard_reboot(drv, reconfigured, inst.uuid)

    assert canonical(rebooted) == canonical(without_serial(spawned))
    disks = etree.fromstring(rebooted.encode()).findall("devices/disk")
    volumes = [d for d in disks if d.findtext("serial") == volume.id]
    assert len(volumes) == 1
    assert volumes[0].find("target").get("dev") == attachment.device  # type: ignore[union-attr]
    assert volumes[0].find("address").get("slot") == "0x11"  # type: ignore[union-attr]


def test_an_instance_whose_image_was_deleted_uses_the_copy_kept_at_boot(
    drv: LibvirtDriver, reconfigured: LibvirtDriver, empty_qcow2: Path
) -> None:
    image = drv.images.add(
        empty_qcow2, name="cirros", disk_format="qcow2", properties={"hw_vif_model": "e1000"}
    )
    inst = drv.spawn("vm", image.id, "t1.nano", network="user")
    drv.images.delete(image.id)

    spawned, rebooted = hard_reboot(drv, reconfigured, inst.uuid)

    assert canonical(rebooted) == canonical(without_serial(spawned))
    # The image's hw_vif_model, from the kept copy (QEMU's arguments: in libvirt.xml).
    assert "e1000,netdev=" in (Path(inst.instance_dir) / "libvirt.xml").read_text()
    kept = ImageMeta.from_json(drv.db.get_instance(inst.uuid).image_meta)
    assert (kept.id, kept.properties) == (image.id, {"hw_vif_model": "e1000"})


def forget_the_kept_copy(conf: Config, uuid: str) -> None:
    """The record as one made before schema 10 keeps it: no image metadata."""
    with sqlite3.connect(conf.database_path) as conn:
        conn.execute("UPDATE instances SET image_meta = '' WHERE uuid = ?", (uuid,))


def test_an_older_record_reads_its_image_from_the_store(
    drv: LibvirtDriver, reconfigured: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    forget_the_kept_copy(drv.conf, inst.uuid)

    spawned, rebooted = hard_reboot(drv, reconfigured, inst.uuid)

    assert canonical(rebooted) == canonical(without_serial(spawned))


def test_an_older_record_whose_image_is_gone_keeps_its_definition_and_says_why(
    drv: LibvirtDriver,
    reconfigured: LibvirtDriver,
    empty_qcow2_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    forget_the_kept_copy(drv.conf, inst.uuid)
    drv.images.delete(empty_qcow2_id)

    with caplog.at_level(logging.WARNING):
        spawned, rebooted = hard_reboot(drv, reconfigured, inst.uuid)

    assert canonical(rebooted) == canonical(spawned)  # the serial stays: not generated
    assert "vm: its definition is kept, not generated again" in caplog.text
    assert "no longer in the image store" in caplog.text


def test_disks_that_do_not_match_the_mapping_keep_the_definition_and_say_so(
    drv: LibvirtDriver,
    reconfigured: LibvirtDriver,
    empty_qcow2_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    info = Path(inst.instance_dir) / "disk.info"
    disks = json.loads(info.read_text())
    # A disk the instance lists that no mapping of its flavor and image has.
    extra = Path(inst.instance_dir) / "disk.extra"
    extra.touch()
    disks[str(extra)] = "raw"
    info.write_text(json.dumps(disks))

    with caplog.at_level(logging.WARNING):
        spawned, rebooted = hard_reboot(drv, reconfigured, inst.uuid)

    assert canonical(rebooted) == canonical(spawned)
    assert "are not the ones its flavor and image map" in caplog.text


def test_a_kernel_image_keeps_its_kernel_ramdisk_and_command_line(
    drv: LibvirtDriver, reconfigured: LibvirtDriver, empty_qcow2: Path, tmp_path: Path
) -> None:
    files = {}
    for name, fill in (("vmlinuz", b"k"), ("initrd.img", b"r")):
        files[name] = tmp_path / name
        files[name].write_bytes(fill * 4096)
    kernel = drv.images.add(files["vmlinuz"], name="vmlinuz", disk_format="aki")
    ramdisk = drv.images.add(files["initrd.img"], name="initrd", disk_format="ari")
    properties = {
        "kernel_id": kernel.id,
        "ramdisk_id": ramdisk.id,
        "os_command_line": "root=/dev/vda ro console=ttyS0",
    }
    disk = drv.images.add(empty_qcow2, name="cloud", disk_format="qcow2", properties=properties)
    inst = drv.spawn("vm", disk.id, "t1.nano")
    drv.images.delete(disk.id)  # its os_command_line is in the kept copy

    spawned, rebooted = hard_reboot(drv, reconfigured, inst.uuid)

    assert canonical(rebooted) == canonical(without_serial(spawned))
    boot = etree.fromstring(rebooted.encode()).find("os")
    assert boot is not None
    assert boot.findtext("kernel") == str(Path(inst.instance_dir) / "kernel")
    assert boot.findtext("initrd") == str(Path(inst.instance_dir) / "ramdisk")
    assert boot.findtext("cmdline") == "root=/dev/vda ro console=ttyS0"
