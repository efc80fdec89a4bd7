"""Bus and device naming of an instance's disks (nova/virt/libvirt/blockinfo.py).

``get_disk_info`` decides, for every disk of the instance, which bus it sits on and
which device name it takes in the guest; the domain XML only lays that out.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from typing import Final

from minidriver.exception import UnsupportedHardware
from minidriver.objects import (
    BlockDeviceInfo,
    DeviceType,
    DiskBus,
    DiskInfo,
    DiskMapping,
    Flavor,
    ImageMeta,
)

# Buses libvirt's QEMU driver offers for disks, as Nova lists them for kvm and qemu
# (SUPPORTED_DEVICE_BUSES), less fdc: no floppies here.
DISK_BUSES = {DiskBus.VIRTIO, DiskBus.IDE, DiskBus.SCSI, DiskBus.SATA, DiskBus.USB}
# A cdrom cannot sit on virtio.
CDROM_BUSES = {DiskBus.IDE, DiskBus.SCSI, DiskBus.SATA, DiskBus.USB}
# The BIOS boot device (libvirt's <boot dev=...>) of each device type, Nova's
# BOOT_DEV_FOR_TYPE.
BOOT_DEV_FOR_TYPE: Final[Mapping[DeviceType, str]] = {
    DeviceType.DISK: "hd",
    DeviceType.CDROM: "cdrom",
}


def _bus_property(image_meta: ImageMeta, prop: str, allowed: set[DiskBus]) -> DiskBus | None:
    value = image_meta.properties.get(prop)
    if value is None:
        return None
    try:
        bus = DiskBus(value)
    except ValueError:
        bus = None
    if bus is None or bus not in allowed:
        raise UnsupportedHardware(
            f"image {image_meta.name}: {prop} = {value!r} is not supported",
            hint=f"use one of: {', '.join(sorted(b.value for b in allowed))}",
        )
    return bus


def get_disk_bus_for_device_type(
    image_meta: ImageMeta, device_type: DeviceType, machine_type: str
) -> DiskBus:
    """The bus for a device type: the image's ``hw_*_bus`` property, else the default."""
    is_q35 = "q35" in machine_type
    if device_type is DeviceType.CDROM:
        bus = _bus_property(image_meta, "hw_cdrom_bus", CDROM_BUSES)
        # q35 has no IDE controller; pc's cdrom is IDE (Debian's cloud kernel has no AHCI).
        default = DiskBus.SATA if is_q35 else DiskBus.IDE
    else:
        bus = _bus_property(image_meta, "hw_disk_bus", DISK_BUSES)
        default = DiskBus.VIRTIO
    if bus is DiskBus.IDE and is_q35:
        raise UnsupportedHardware(
            f"image {image_meta.name}: the IDE bus does not exist on machine type {machine_type}",
            hint="use hw_machine_type = pc, or another bus",
        )
    return bus or default


def get_dev_count_for_disk_bus(bus: DiskBus) -> int:
    """How many devices a bus takes (IDE: two channels of two)."""
    return 4 if bus is DiskBus.IDE else 26


def find_disk_dev_for_disk_bus(used: list[DiskMapping], bus: DiskBus) -> str:
    """The first free device name on ``bus``."""
    taken = {m.dev for m in used}
    count = get_dev_count_for_disk_bus(bus)
    for letter in string.ascii_lowercase[:count]:
        dev = bus.dev_prefix + letter
        if dev not in taken:
            return dev
    raise UnsupportedHardware(f"no free device name left on the {bus} bus")


def get_volume_device(used_devs: Iterable[str], bus: DiskBus, requested: str | None) -> str:
    """The device of a volume attached to an instance whose disks take ``used_devs``:
    ``requested`` when it is free and on ``bus``, else the first free name (Nova's
    ``get_info_from_bdm`` without a device name: ``find_disk_dev_for_disk_bus``)."""
    used = [DiskMapping(dev, bus, dev, DeviceType.DISK) for dev in used_devs]
    if requested is None:
        return find_disk_dev_for_disk_bus(used, bus)
    letters = string.ascii_lowercase[: get_dev_count_for_disk_bus(bus)]
    if (
        len(requested) != len(bus.dev_prefix) + 1
        or requested[:-1] != bus.dev_prefix
        or (requested[-1] not in letters)
    ):
        raise UnsupportedHardware(
            f"device {requested!r} is not a {bus} device",
            hint=f"give {bus.dev_prefix}{letters[1]} to {bus.dev_prefix}{letters[-1]},"
            " or no --device for the next free one",
        )
    if requested in {m.dev for m in used}:
        raise UnsupportedHardware(
            f"device {requested} is taken on this instance",
            hint="give another --device, or none for the next free one",
        )
    return requested


def get_disk_info(
    virt_type: str,
    flavor: Flavor,
    image_meta: ImageMeta,
    *,
    machine_type: str = "pc",
    config_drive_format: str | None = None,
    block_device_info: BlockDeviceInfo | None = None,
    rescue: bool = False,
) -> DiskInfo:
    """Where each disk of a new instance goes, in Nova's order.

    Root ``disk`` first with boot index 1 (a cdrom when the image is an ISO), then
    ``disk.local`` (ephemeral) and ``disk.swap``, and the config drive last, on the
    next free device of its bus as Nova's ``get_disk_mapping`` places it (since 15.0.0,
    Ocata; before, the last device): ``iso9660`` a cdrom (``hda`` on ``pc`` behind virtio
    disks, ``hdb`` behind an ISO root), ``vfat`` a disk.
    With a root volume in ``block_device_info`` (boot from volume) the root is that
    volume, a disk at ``root_device_name`` (default: the first free), and there is
    no ``disk``. Its other volumes (attached ones, as a hard reboot maps them) come
    after the swap disk, at their devices, and before the config drive, as Nova's
    ``_get_disk_mapping`` places them.

    ``rescue``: Nova's legacy rescue mapping (``_get_rescue_disk_mapping``): the
    rescue disk ``disk.rescue`` first (it boots), the instance's root ``disk`` after
    it, and the config drive as ``disk.config.rescue``; no ephemeral, swap or volume.
    """
    if virt_type not in ("kvm", "qemu"):
        raise UnsupportedHardware(f"virt_type {virt_type!r} is not supported")
    disk_bus = get_disk_bus_for_device_type(image_meta, DeviceType.DISK, machine_type)
    cdrom_bus = get_disk_bus_for_device_type(image_meta, DeviceType.CDROM, machine_type)
    mapping: list[DiskMapping] = []

    def add(
        name: str,
        bus: DiskBus,
        dtype: DeviceType,
        boot_index: int | None = None,
    ) -> None:
        dev = find_disk_dev_for_disk_bus(mapping, bus)
        mapping.append(DiskMapping(name, bus, dev, dtype, boot_index))

    if rescue:
        add("disk.rescue", disk_bus, DeviceType.DISK, boot_index=1)
        add("disk", disk_bus, DeviceType.DISK)
        if config_drive_format == "iso9660":
            add("disk.config.rescue", cdrom_bus, DeviceType.CDROM)
        elif config_drive_format == "vfat":
            add("disk.config.rescue", disk_bus, DeviceType.DISK)
        return DiskInfo(disk_bus=disk_bus, cdrom_bus=cdrom_bus, mapping=tuple(mapping))
    root_bdm = block_device_info.root_bdm if block_device_info else None
    if root_bdm is not None:
        assert block_device_info is not None
        dev = block_device_info.root_device_name or root_bdm.mount_device
        dev = get_volume_device((), disk_bus, dev)
        mapping.append(DiskMapping(root_bdm.disk_name, disk_bus, dev, DeviceType.DISK, 1))
    elif image_meta.disk_format == "iso":
        add("disk", cdrom_bus, DeviceType.CDROM, boot_index=1)
    else:
        add("disk", disk_bus, DeviceType.DISK, boot_index=1)
    if flavor.ephemeral_gb > 0:
        add("disk.local", disk_bus, DeviceType.DISK)
    if flavor.swap > 0:
        add("disk.swap", disk_bus, DeviceType.DISK)
    _add_attached_volumes(mapping, block_device_info or BlockDeviceInfo())
    if config_drive_format == "iso9660":
        add("disk.config", cdrom_bus, DeviceType.CDROM)
    elif config_drive_format == "vfat":
        add("disk.config", disk_bus, DeviceType.DISK)
    elif config_drive_format is not None:
        raise UnsupportedHardware(f"config drive format {config_drive_format!r} is unknown")
    return DiskInfo(disk_bus=disk_bus, cdrom_bus=cdrom_bus, mapping=tuple(mapping))


def _add_attached_volumes(mapping: list[DiskMapping], block_device_info: BlockDeviceInfo) -> None:
    """Each volume but the root at its device (virtio, as attach puts it)."""
    for bdm in block_device_info.block_device_mapping:
        if bdm is not block_device_info.root_bdm:
            dev = get_volume_device((m.dev for m in mapping), DiskBus.VIRTIO, bdm.mount_device)
            mapping.append(DiskMapping(bdm.disk_name, DiskBus.VIRTIO, dev, DeviceType.DISK))


def get_boot_order(disk_info: DiskInfo) -> tuple[str, ...]:
    """The BIOS boot devices, first to last, as Nova's ``get_boot_order``: the device
    type of every disk that has a boot index, in boot index order, each type once.

    Only the root has one here (index 1), so an ordinary image boots ``hd`` and an
    ISO image, whose root is a cdrom, boots ``cdrom``. The ephemeral, swap and config
    drive disks get no boot index, in Nova too, so they never enter the order.
    """
    booted = sorted((m for m in disk_info if m.boot_index is not None), key=_boot_index)
    order: list[str] = []
    for m in booted:
        dev = BOOT_DEV_FOR_TYPE[m.type]
        if dev not in order:
            order.append(dev)
    return tuple(order)


def _boot_index(mapping: DiskMapping) -> int:
    return mapping.boot_index or 0
