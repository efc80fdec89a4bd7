"""Flavor, ImageMeta, Instance and the typed DiskInfo (nova/objects/, blockinfo's dict).

Nova passes untyped dicts for disk_info; here every field is named and typed, so a
reader sees in one place what blockinfo decides and the template lays out.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Flavor:
    """A hardware template, with Nova's field names (``swap`` is in MB)."""

    name: str
    vcpus: int
    memory_mb: int
    root_gb: int
    ephemeral_gb: int = 0
    swap: int = 0

    def __post_init__(self) -> None:
        for attr in ("vcpus", "memory_mb"):
            if getattr(self, attr) < 1:
                raise ValueError(f"flavor {self.name}: {attr} must be at least 1")
        for attr in ("root_gb", "ephemeral_gb", "swap"):
            if getattr(self, attr) < 0:
                raise ValueError(f"flavor {self.name}: {attr} must not be negative")


# The m1.* flavors Nova's database once seeded (removed in 14.0.0, commit 1a1a41bdbe;
# DevStack makes them today), plus a tiny one for tests.
DEFAULT_FLAVORS: Mapping[str, Flavor] = MappingProxyType(
    {
        f.name: f
        for f in (
            Flavor("t1.nano", vcpus=1, memory_mb=128, root_gb=1, ephemeral_gb=1, swap=64),
            Flavor("m1.tiny", vcpus=1, memory_mb=512, root_gb=1),
            Flavor("m1.small", vcpus=1, memory_mb=2048, root_gb=20),
            Flavor("m1.medium", vcpus=2, memory_mb=4096, root_gb=40),
            Flavor("m1.large", vcpus=4, memory_mb=8192, root_gb=80),
            Flavor("m1.xlarge", vcpus=8, memory_mb=16384, root_gb=160),
        )
    }
)


@dataclass(frozen=True)
class ImageMeta:
    """What spawn needs to know of an image (Nova's ``objects.ImageMeta``)."""

    id: str
    name: str
    disk_format: str
    container_format: str = "bare"
    size: int = 0
    virtual_size: int | None = None
    min_disk: int = 0  # GB
    min_ram: int = 0  # MB
    properties: Mapping[str, str] = field(default_factory=dict)

    @property
    def kernel_id(self) -> str:
        """The kernel image (aki) this disk image boots with, '' for its own loader."""
        return self.properties.get("kernel_id", "")

    @property
    def ramdisk_id(self) -> str:
        """The ramdisk image (ari) of that kernel, '' for none."""
        return self.properties.get("ramdisk_id", "")

    @property
    def os_command_line(self) -> str:
        """The kernel command line the image asks for, '' for Nova's (guest.KERNEL_CONSOLE)."""
        return self.properties.get("os_command_line", "")

    @property
    def os_type(self) -> str:
        """The guest's OS (Nova's ``os_type``: linux, windows...), '' when not given."""
        return self.properties.get("os_type", "")

    def machine_type(self, default: str) -> str:
        """The image's ``hw_machine_type``, else the host's ``[libvirt] hw_machine_type``
        (Nova's ``libvirt_utils.get_machine_type``)."""
        return self.properties.get("hw_machine_type") or default

    def to_json(self) -> str:
        """The copy an instance keeps (Nova's ``image_*`` system metadata)."""
        return json.dumps({**self.__dict__, "properties": dict(self.properties)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageMeta:
        return cls(**json.loads(text))


class DiskBus(enum.StrEnum):
    VIRTIO = "virtio"
    IDE = "ide"
    SCSI = "scsi"
    SATA = "sata"
    USB = "usb"

    @property
    def dev_prefix(self) -> str:
        """Device name prefix the guest-facing target takes (``vd``, ``hd``, ``sd``)."""
        return {DiskBus.VIRTIO: "vd", DiskBus.IDE: "hd"}.get(self, "sd")


class DeviceType(enum.StrEnum):
    DISK = "disk"
    CDROM = "cdrom"


@dataclass(frozen=True)
class DiskMapping:
    """One entry of disk_info's mapping: where one of the instance's disks goes."""

    name: str  # the file name in the instance dir: disk, disk.local, disk.swap, disk.config
    bus: DiskBus
    dev: str  # vda, vdb, hda...
    type: DeviceType
    boot_index: int | None = None


@dataclass(frozen=True)
class DiskInfo:
    """Nova's disk_info, typed: the default buses and the mapping of every disk."""

    disk_bus: DiskBus
    cdrom_bus: DiskBus
    mapping: tuple[DiskMapping, ...]

    def __iter__(self) -> Iterator[DiskMapping]:
        return iter(self.mapping)

    def __contains__(self, name: object) -> bool:
        return any(m.name == name for m in self.mapping)

    def __getitem__(self, name: str) -> DiskMapping:
        for m in self.mapping:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def root(self) -> DiskMapping:
        return next(m for m in self.mapping if m.boot_index == 1)


@dataclass(frozen=True)
class DriverVolumeBlockDevice:
    """One volume of an instance's block device mapping (Nova's
    ``DriverVolumeBlockDevice``, an entry of ``block_device_mapping``)."""

    volume_id: str
    mount_device: str | None  # vda...; None: the next free one
    boot_index: int | None = None  # 0: the root, as in Nova's BDMs
    delete_on_termination: bool = False

    @property
    def disk_name(self) -> str:
        """Its name in disk_info's mapping, beside disk, disk.local..."""
        return f"volume-{self.volume_id}"


@dataclass(frozen=True)
class BlockDeviceInfo:
    """Nova's ``block_device_info``, typed: the root's device and the volumes."""

    root_device_name: str | None = None
    block_device_mapping: tuple[DriverVolumeBlockDevice, ...] = ()

    @property
    def root_bdm(self) -> DriverVolumeBlockDevice | None:
        """Nova's ``get_root_bdm``: the volume with boot index 0, if any."""
        return next((b for b in self.block_device_mapping if b.boot_index == 0), None)

    @property
    def is_booted_from_volume(self) -> bool:
        """Nova's ``_is_booted_from_volume``: the root is a volume."""
        return self.root_bdm is not None


@dataclass
class Instance:
    """An instance being built or running (a small part of Nova's ``objects.Instance``)."""

    uuid: str
    name: str  # the libvirt domain name, from instance_name_template
    display_name: str
    flavor: Flavor
    image_ref: str
    virt_type: str = "qemu"
    state: str = "building"
    created_at: str = ""
    instance_dir: str = ""
    kernel_id: str = ""  # Nova's fields: the kernel and ramdisk images booted directly
    ramdisk_id: str = ""
    cache_hit: bool = False
    clock_set: bool | None = None  # a restore: the guest's clock set by its agent (None: no agent)
    timings: dict[str, float] = field(default_factory=dict)
