from __future__ import annotations

import pytest

from minidriver.blockinfo import get_boot_order, get_disk_info
from minidriver.exception import UnsupportedHardware
from minidriver.objects import (
    DEFAULT_FLAVORS,
    BlockDeviceInfo,
    DeviceType,
    DiskBus,
    DiskInfo,
    DiskMapping,
    DriverVolumeBlockDevice,
    Flavor,
    ImageMeta,
)

NANO = DEFAULT_FLAVORS["t1.nano"]
TINY = DEFAULT_FLAVORS["m1.tiny"]


def image(disk_format: str = "qcow2", **props: str) -> ImageMeta:
    return ImageMeta(id="i", name="img", disk_format=disk_format, properties=props)


def layout(info: object) -> list[tuple[str, str, str, str, int | None]]:
    return [(m.name, m.bus.value, m.dev, m.type.value, m.boot_index) for m in info]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("flavor", "img", "config_drive", "expected"),
    [
        (TINY, image(), None, [("disk", "virtio", "vda", "disk", 1)]),
        (
            NANO,
            image(),
            None,
            [
                ("disk", "virtio", "vda", "disk", 1),
                ("disk.local", "virtio", "vdb", "disk", None),
                ("disk.swap", "virtio", "vdc", "disk", None),
            ],
        ),
        (
            NANO,
            image(),
            "iso9660",
            [
                ("disk", "virtio", "vda", "disk", 1),
                ("disk.local", "virtio", "vdb", "disk", None),
                ("disk.swap", "virtio", "vdc", "disk", None),
                ("disk.config", "ide", "hda", "cdrom", None),
            ],
        ),
        (
            Flavor("swaponly", 1, 64, 1, swap=32),
            image(),
            "vfat",
            [
                ("disk", "virtio", "vda", "disk", 1),
                ("disk.swap", "virtio", "vdb", "disk", None),
                ("disk.config", "virtio", "vdc", "disk", None),
            ],
        ),
        (
            NANO,
            image(hw_disk_bus="scsi"),
            None,
            [
                ("disk", "scsi", "sda", "disk", 1),
                ("disk.local", "scsi", "sdb", "disk", None),
                ("disk.swap", "scsi", "sdc", "disk", None),
            ],
        ),
        (
            TINY,
            image(hw_disk_bus="ide", hw_cdrom_bus="ide"),
            "iso9660",
            [("disk", "ide", "hda", "disk", 1), ("disk.config", "ide", "hdb", "cdrom", None)],
        ),
        (TINY, image("iso"), None, [("disk", "ide", "hda", "cdrom", 1)]),
        (
            TINY,
            image(hw_cdrom_bus="scsi"),
            "iso9660",
            [("disk", "virtio", "vda", "disk", 1), ("disk.config", "scsi", "sda", "cdrom", None)],
        ),
    ],
)
def test_nova_naming_rules(
    flavor: Flavor, img: ImageMeta, config_drive: str | None, expected: list[object]
) -> None:
    info = get_disk_info("qemu", flavor, img, config_drive_format=config_drive)
    assert layout(info) == expected
    assert info.root.name == "disk"


def test_q35_puts_cdroms_on_sata() -> None:
    info = get_disk_info("kvm", TINY, image(), machine_type="q35", config_drive_format="iso9660")
    assert info.cdrom_bus is DiskBus.SATA
    assert info["disk.config"].type is DeviceType.CDROM
    assert (
        info["disk.config"].dev == "sda"
    )  # the next free device, as Nova gives it (was the last, sdz)


@pytest.mark.parametrize(
    ("props", "machine", "message"),
    [
        ({"hw_disk_bus": "floppy"}, "pc", "hw_disk_bus = 'floppy' is not supported"),
        ({"hw_cdrom_bus": "virtio"}, "pc", "hw_cdrom_bus = 'virtio' is not supported"),
        ({"hw_disk_bus": "ide"}, "q35", "IDE bus does not exist on machine type q35"),
    ],
)
def test_bad_bus_properties_are_refused(props: dict[str, str], machine: str, message: str) -> None:
    with pytest.raises(UnsupportedHardware) as err:
        get_disk_info("qemu", TINY, image(**props), machine_type=machine)
    assert message in str(err.value)


def test_unknown_virt_type() -> None:
    with pytest.raises(UnsupportedHardware, match="virt_type 'lxc'"):
        get_disk_info("lxc", TINY, image())


@pytest.mark.parametrize(
    ("img", "config_drive", "order"),
    [
        (image(), None, ("hd",)),
        (image(), "iso9660", ("hd",)),  # the config drive is a cdrom, but never booted
        (image("iso"), None, ("cdrom",)),
        (image("iso"), "iso9660", ("cdrom",)),
        (image("iso"), "vfat", ("cdrom",)),
    ],
)
def test_boot_order_follows_the_root_device_type(
    img: ImageMeta, config_drive: str | None, order: tuple[str, ...]
) -> None:
    info = get_disk_info("qemu", NANO, img, config_drive_format=config_drive)
    assert get_boot_order(info) == order


def test_boot_order_sorts_by_boot_index_and_names_each_device_type_once() -> None:
    """Nova's rule on a mapping with more boot indexes than spawn makes (volumes)."""
    info = DiskInfo(
        DiskBus.VIRTIO,
        DiskBus.IDE,
        (
            DiskMapping("vol-b", DiskBus.VIRTIO, "vdb", DeviceType.DISK, boot_index=3),
            DiskMapping("disk", DiskBus.VIRTIO, "vda", DeviceType.DISK, boot_index=2),
            DiskMapping("disk.local", DiskBus.VIRTIO, "vdc", DeviceType.DISK),
            DiskMapping("cd", DiskBus.IDE, "hda", DeviceType.CDROM, boot_index=1),
        ),
    )
    assert get_boot_order(info) == ("cdrom", "hd")


def test_attached_volumes_keep_their_devices_before_the_config_drive() -> None:
    """A hard reboot maps the attached volumes (Nova's block device mapping) at their
    devices after the swap disk, and the config drive on the next free device after
    them, as Nova's ``_get_disk_mapping`` does."""
    bdms = BlockDeviceInfo(
        block_device_mapping=(
            DriverVolumeBlockDevice("v1", "vde"),
            DriverVolumeBlockDevice("v2", "vdf"),
        )
    )
    info = get_disk_info("qemu", NANO, image(), config_drive_format="vfat", block_device_info=bdms)
    assert layout(info) == [
        ("disk", "virtio", "vda", "disk", 1),
        ("disk.local", "virtio", "vdb", "disk", None),
        ("disk.swap", "virtio", "vdc", "disk", None),
        ("volume-v1", "virtio", "vde", "disk", None),
        ("volume-v2", "virtio", "vdf", "disk", None),
        ("disk.config", "virtio", "vdd", "disk", None),
    ]
