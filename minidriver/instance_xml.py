"""An existing instance's domain XML generated again from its record, as a hard reboot
and a start make it (nova/virt/libvirt/driver.py ``_hard_reboot``: ``get_disk_info``
and ``_get_guest_xml`` from the instance, its ``image_meta`` and its block device info).

The XML comes from the same ``LibvirtDriver.to_xml`` a spawn uses, fed with:

- the record (Nova keeps ``objects.Instance``, we keep ``InstanceRecord``): name,
  uuid, flavor, creation time, kernel and ramdisk, the NIC (mode, MAC, the forwarded
  port as reserved now), the config drive;
- the image's metadata kept with the instance at its boot (schema 10), as Nova reads
  ``instance.image_meta`` (its system metadata) and not Glance: a hard reboot works
  once the image is deleted. A record made before keeps none: the image store's is
  read then;
- the disks the instance has (``LibvirtDriver.instance_disks``: formats, an RBD
  disk's pool and name, a template clone's config drive where its template keeps it;
  a clone's kernel and ramdisk, which no disk list names, where its definition says);
- its volumes' attachments (Nova's block device mapping), each at its device, with
  the PCI slot its attach chose (kept clear of the user-mode NIC's, which libvirt
  does not know);
- today's options (``hw_machine_type``, ``cpu_mode``, ``sysinfo_serial``...), as
  Nova's ``_get_guest_xml`` reads its configuration at every hard reboot.

Where we differ from Nova: what cannot be made again faithfully keeps its definition,
with a warning that says why (Nova always generates): a record with no image metadata
whose image is gone from the store too, or disks that do not match the mapping the
flavor and image give (a disk missing from the instance's list, or one it lists that
the mapping has no place for). The config drive keeps the format it was made in (its
device in the definition), not today's ``config_drive_format``: its file is not made
again (Nova's mapping would follow the option).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from minidriver import blockinfo, guest
from minidriver.db import InstanceRecord
from minidriver.imagebackend import Rbd, is_rbd_path, parse_rbd_path
from minidriver.network import VIF, NetworkMode
from minidriver.objects import (
    BlockDeviceInfo,
    DriverVolumeBlockDevice,
    Flavor,
    ImageMeta,
    Instance,
)
from minidriver.steps import StepTimer

if TYPE_CHECKING:
    from lxml import etree

    from minidriver.driver import LibvirtDriver

LOG = logging.getLogger(__name__)


def instance_of(drv: LibvirtDriver, record: InstanceRecord, flavor: Flavor) -> Instance:
    """The instance a record describes, with ``flavor``."""
    return Instance(
        uuid=record.uuid,
        name=record.name,
        display_name=record.display_name,
        flavor=flavor,
        image_ref=record.image_id,
        virt_type=drv.host.virt_type.virt_type,
        state=record.state,
        created_at=record.created_at,
        instance_dir=record.instance_dir or str(drv.instance_dir(record.uuid)),
        kernel_id=record.kernel_id,
        ramdisk_id=record.ramdisk_id,
    )


def vif_of(record: InstanceRecord) -> VIF | None:
    """The instance's NIC as recorded (its MAC and forwarded port kept)."""
    if record.network_mode == NetworkMode.NONE or not record.mac_address:
        return None
    return VIF(
        NetworkMode(record.network_mode),
        record.mac_address,
        record.network_source,
        record.forward_port,
    )


def kept_image_meta(drv: LibvirtDriver, record: InstanceRecord) -> ImageMeta | None:
    """Nova's ``instance.image_meta``: the copy kept at boot; for a record made before
    copies were kept, the image store's; None when the image is gone from it too."""
    return drv.images.instance_image_meta(record.image_meta, record.image_id)


def guest_xml(drv: LibvirtDriver, record: InstanceRecord, definition: str) -> str | None:
    """The domain XML of the recorded instance, made again as its spawn made it;
    ``definition`` is the domain's current (inactive) XML. None, with a warning, when
    it cannot be made faithfully: the caller keeps ``definition``."""
    name = record.display_name
    image_meta = kept_image_meta(drv, record)
    if image_meta is None:
        LOG.warning(
            "%s: its definition is kept, not generated again: it was booted before"
            " minidriver kept an image's metadata with its instance, and its image %s"
            " is no longer in the image store",
            name,
            record.image_id,
        )
        return None
    flavor = drv.get_flavor(record.flavor)
    instance = instance_of(drv, record, flavor)
    instance_dir = Path(instance.instance_dir)
    tree = guest.parse_xml(definition)
    formats: dict[str, str] = {}
    file_paths = _kernel_elsewhere(tree, instance_dir)
    network_disks: dict[str, guest.NetworkSource] = {}
    for path, fmt in (drv.instance_disks(instance_dir, record.uuid) or {}).items():
        if is_rbd_path(path):
            pool, rbd_name = parse_rbd_path(path)
            disk = rbd_name.removeprefix(f"{record.uuid}_")
            rbd = drv.rbd_driver(pool)
            with rbd.connected():
                network_disks[disk] = Rbd(
                    drv.conf, StepTimer(), driver=rbd, instance_uuid=record.uuid, rbd_name=rbd_name
                ).libvirt_info()
        else:
            disk = Path(path).name
            if Path(path).parent != instance_dir:
                file_paths[disk] = path
        formats[disk] = fmt
    config_drive = bool(record.config_drive) or "disk.config" in formats
    if config_drive:
        formats.setdefault("disk.config", "raw")
    volumes: dict[str, guest.GuestVolume] = {}
    bdms = []
    for attachment in drv.volumes.attachments_of(record.uuid):
        bdm = DriverVolumeBlockDevice(
            attachment.volume_id,
            attachment.device,
            boot_index=attachment.boot_index,
            delete_on_termination=attachment.delete_on_termination,
        )
        bdms.append(bdm)
        connection = drv.volumes.connection(drv.volumes.get(attachment.volume_id))
        formats[bdm.disk_name] = connection.driver_format
        volumes[bdm.disk_name] = guest.GuestVolume(
            connection.path,
            connection.network,
            attachment.volume_id,
            None if attachment.boot_index == 0 else _root_bus_address(tree, attachment.device),
        )
    disk_info = blockinfo.get_disk_info(
        instance.virt_type,
        flavor,
        image_meta,
        machine_type=image_meta.machine_type(drv.conf.libvirt.hw_machine_type),
        config_drive_format=(
            _config_drive_format(tree) or drv.conf.default.config_drive_format
            if config_drive
            else None
        ),
        block_device_info=BlockDeviceInfo(block_device_mapping=tuple(bdms)),
    )
    mapped = {m.name for m in disk_info}
    if mapped != set(formats):
        LOG.warning(
            "%s: its definition is kept, not generated again: its disks (%s) are not the"
            " ones its flavor and image map (%s)",
            name,
            ", ".join(sorted(formats)) or "none",
            ", ".join(sorted(mapped)),
        )
        return None
    return drv.to_xml(
        instance,
        image_meta,
        disk_info,
        formats,
        vif=vif_of(record),
        network_disks=network_disks,
        volumes=volumes,
        file_paths=file_paths,
    )


def _kernel_elsewhere(tree: etree._Element, instance_dir: Path) -> dict[str, str]:
    """The kernel and ramdisk the definition boots from outside the instance dir (a
    template clone's: its template's copies), by their file names there."""
    found = {}
    for tag, name in (("os/kernel", "kernel"), ("os/initrd", "ramdisk")):
        path = tree.findtext(tag)
        if path and Path(path).parent != instance_dir:
            found[name] = path
    return found


def _config_drive_format(tree: etree._Element) -> str | None:
    """The format the config drive was made in, from its device in the definition
    (a cdrom holds ISO 9660, a disk vfat); None when the definition has none."""
    for disk in tree.iterfind("devices/disk"):
        source = disk.find("source")
        if source is None:
            continue
        where = source.get("file") or source.get("name") or ""
        if os.path.basename(where) == "disk.config" or where.endswith("_disk.config"):
            return "iso9660" if disk.get("device") == "cdrom" else "vfat"
    return None


def _root_bus_address(tree: etree._Element, dev: str) -> guest.PciAddress | None:
    """The slot on the PCI root bus the disk at ``dev`` has in the definition."""
    for disk in tree.iterfind("devices/disk"):
        target, address = disk.find("target"), disk.find("address[@type='pci']")
        if target is None or target.get("dev") != dev or address is None:
            continue
        if int(address.get("bus", "0"), 16) == 0:
            return guest.PciAddress(int(address.get("slot", "0"), 16))
    return None
