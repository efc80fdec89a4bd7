"""What an attach decides before libvirt is asked (issue 19): the device name by
blockinfo's naming, a PCI slot clear of the user-mode NIC, the disk XML (golden
files); and the volume commands' table of valid and invalid invocations."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lxml import etree

from minidriver import blockinfo, guest, objects
from minidriver.cli import main
from minidriver.config import Config
from minidriver.exception import UnsupportedHardware
from minidriver.host import Host
from minidriver.objects import DEFAULT_FLAVORS, DiskBus, ImageMeta

DATA = Path(__file__).parent.parent / "data"
MONS = (guest.NetworkHost("127.0.0.1", "6789"),)
VOLUME_ID = "4a75ce05-a718-420f-8fe3-9e0165db1c40"
IMAGE = ImageMeta(id="0d521083-52b6-458b-b668-b0470c016034", name="guest", disk_format="qcow2")


@pytest.mark.parametrize(
    ("used", "requested", "expected"),
    [
        ({"vda", "vdb", "vdc", "hdd"}, None, "vdd"),
        ({"vda", "vdc"}, None, "vdb"),
        ({"vda"}, "vdz", "vdz"),
        (set(), None, "vda"),
    ],
)
def test_the_next_free_device(used: set[str], requested: str | None, expected: str) -> None:
    assert blockinfo.get_volume_device(used, DiskBus.VIRTIO, requested) == expected


@pytest.mark.parametrize(
    ("requested", "message"),
    [("vda", "vda is taken"), ("sdb", "not a virtio device"), ("vdaa", "not a virtio")],
)
def test_a_device_asked_for_must_be_free_and_on_the_bus(requested: str, message: str) -> None:
    with pytest.raises(UnsupportedHardware, match=message):
        blockinfo.get_volume_device({"vda"}, DiskBus.VIRTIO, requested)


def test_every_virtio_name_taken() -> None:
    used = {f"vd{chr(c)}" for c in range(ord("a"), ord("z") + 1)}
    with pytest.raises(UnsupportedHardware, match="no free device name"):
        blockinfo.get_volume_device(used, DiskBus.VIRTIO, None)


def domain_xml(*slots: int, user_nic: bool = True) -> str:
    devices = "".join(
        f"<disk><address type='pci' domain='0x0000' bus='0x00' slot='{s:#x}' function='0x0'/>"
        "</disk>"
        for s in slots
    )
    qemu = (
        f"<qemu:commandline xmlns:qemu='{guest.QEMU_NAMESPACE}'><qemu:arg value='-device'/>"
        "</qemu:commandline>"
        if user_nic
        else ""
    )
    return f"<domain><devices>{devices}</devices>{qemu}</domain>"


def test_volume_slots_start_above_the_user_nic() -> None:
    address = guest.free_volume_pci_address(domain_xml(3, 4, 5), machine_type="pc")
    assert address == guest.PciAddress(0x11)
    assert guest.USER_NIC_PCI_SLOT in guest.used_pci_slots(domain_xml())
    assert guest.USER_NIC_PCI_SLOT not in guest.used_pci_slots(domain_xml(user_nic=False))


def test_a_slot_must_be_free_in_the_live_domain_and_its_definition() -> None:
    live, persistent = domain_xml(0x11), domain_xml(0x12)
    address = guest.free_volume_pci_address(live, persistent, machine_type="pc")
    assert address == guest.PciAddress(0x13)


def test_the_cap_is_fifteen_volumes_with_a_clear_error() -> None:
    full = domain_xml(*guest.VOLUME_PCI_SLOTS)
    assert len(guest.VOLUME_PCI_SLOTS) == 15
    with pytest.raises(guest.NoFreePciSlot, match="all 15 PCI slots") as exc:
        guest.free_volume_pci_address(full, machine_type="pc")
    assert exc.value.hint is not None and "detach a volume" in exc.value.hint


def test_q35_leaves_the_slot_to_libvirt() -> None:
    assert guest.free_volume_pci_address(domain_xml(), machine_type="q35") is None


CASES = {
    "file": guest.get_volume_disk(
        f"/var/lib/minidriver/volumes/volume-{VOLUME_ID}",
        "raw",
        network=None,
        dev="vdd",
        bus="virtio",
        cache="none",
        serial=VOLUME_ID,
        pci_address=guest.PciAddress(0x11),
    ),
    "rbd": guest.get_volume_disk(
        f"rbd:volumes/volume-{VOLUME_ID}",
        "raw",
        network=guest.NetworkSource("rbd", f"volumes/volume-{VOLUME_ID}", MONS),
        dev="vde",
        bus="virtio",
        cache="none",
        serial=VOLUME_ID,
        pci_address=guest.PciAddress(0x12),
    ),
}


def canonical(text: str) -> bytes:
    parser = etree.XMLParser(remove_blank_text=True)
    return etree.tostring(etree.fromstring(text.encode(), parser), method="c14n")


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_volume_disk_xml(case: str, request: pytest.FixtureRequest) -> None:
    xml = guest.disk_to_xml(CASES[case])
    golden = DATA / f"disk-volume-{case}.xml"
    if request.config.getoption("--regenerate-golden"):
        golden.write_text(xml)
    assert canonical(xml) == canonical(golden.read_text())


def test_a_network_volume_uses_the_network_cache_mode() -> None:
    assert CASES["rbd"].cache == guest.NETWORK_DISK_CACHE
    assert CASES["file"].cache == "none"


# -- the commands ------------------------------------------------------------------


Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(conf_host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(["--state-dir", str(tmp_path / "state"), *argv], host=conf_host)
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def conf_host(conf: Config) -> Iterator[Host]:
    host = Host(conf)
    yield host
    host.close()


INVOCATIONS = [
    (["volume", "create"], 2, "--size"),
    (["volume", "create", "--size", "x"], 2, "invalid int"),
    (["volume", "create", "--size", "0"], 1, "1 to 16384 GB"),
    (["volume", "create", "--size", "1", "--backend", "lvm"], 2, "invalid choice"),
    (["volume", "create", "--size", "1", "--image", "nope"], 1, "no image matches"),
    (["volume", "show", "nope"], 1, "no volume matches 'nope'"),
    (["volume", "delete", "nope"], 1, "no volume matches 'nope'"),
    (["volume", "attach", "vm"], 2, "required: volume"),
    (["volume", "attach", "nope", "v"], 1, "no instance matches 'nope'"),
    (["volume", "detach", "nope", "v"], 1, "no instance matches 'nope'"),
]


@pytest.mark.parametrize(("argv", "code", "message"), INVOCATIONS)
def test_volume_invocations(cli: Cli, argv: list[str], code: int, message: str) -> None:
    got, _out, err = cli(*argv)
    assert got == code, err
    assert message in err


def test_create_list_show_delete_in_json(cli: Cli) -> None:
    code, out, _ = cli("--json", "volume", "create", "--size", "1", "--name", "data")
    assert code == 0
    created = json.loads(out)
    assert (created["status"], created["backend"], created["attachment"]) == (
        "available",
        "pool",
        None,
    )
    code, out, _ = cli("--json", "volume", "list")
    assert [v["id"] for v in json.loads(out)] == [created["id"]]
    code, out, _ = cli("--json", "volume", "show", "data")
    assert json.loads(out) == created
    code, out, _ = cli("volume", "list")
    assert out.splitlines()[0].split() == [
        "id",
        "name",
        "size_gb",
        "status",
        "backend",
        "attached_to",
    ]
    code, out, _ = cli("--json", "volume", "delete", "data")
    assert json.loads(out) == {"deleted": created["id"]}
    code, out, _err = cli("--json", "volume", "show", "data")
    assert code == 1 and json.loads(out)["error"] == "no volume matches 'data'"


# -- boot from volume: blockinfo's block_device_info --------------------------------


def test_a_root_volume_replaces_the_root_disk() -> None:
    bdm = objects.DriverVolumeBlockDevice(VOLUME_ID, None, boot_index=0)
    info = objects.BlockDeviceInfo(block_device_mapping=(bdm,))
    assert info.is_booted_from_volume
    disk_info = blockinfo.get_disk_info(
        "qemu",
        DEFAULT_FLAVORS["t1.nano"],
        IMAGE,
        config_drive_format="iso9660",
        block_device_info=info,
    )
    assert [(m.name, m.dev, m.boot_index) for m in disk_info] == [
        (f"volume-{VOLUME_ID}", "vda", 1),
        ("disk.local", "vdb", None),
        ("disk.swap", "vdc", None),
        ("disk.config", "hda", None),
    ]
    assert "disk" not in disk_info
    assert blockinfo.get_boot_order(disk_info) == ("hd",)


def test_no_root_volume_keeps_the_root_disk() -> None:
    attached = objects.DriverVolumeBlockDevice(VOLUME_ID, "vdd")  # no boot index
    info = objects.BlockDeviceInfo(block_device_mapping=(attached,))
    assert not info.is_booted_from_volume
    disk_info = blockinfo.get_disk_info(
        "qemu", DEFAULT_FLAVORS["t1.nano"], IMAGE, block_device_info=info
    )
    assert disk_info.root.name == "disk"


def test_the_root_volume_in_the_domain_xml(tmp_path: Path) -> None:
    bdm = objects.DriverVolumeBlockDevice(VOLUME_ID, None, boot_index=0)
    disk_info = blockinfo.get_disk_info(
        "qemu",
        DEFAULT_FLAVORS["m1.tiny"],
        IMAGE,
        block_device_info=objects.BlockDeviceInfo(block_device_mapping=(bdm,)),
    )
    volume = guest.GuestVolume(
        f"rbd:volumes/volume-{VOLUME_ID}",
        guest.NetworkSource("rbd", f"volumes/volume-{VOLUME_ID}", MONS),
        VOLUME_ID,
    )
    instance = objects.Instance(
        uuid="9f3c1c57-2f71-4c43-9d0c-3bb5d3a2b1d1",
        name="instance-00000001",
        display_name="bfv",
        flavor=DEFAULT_FLAVORS["m1.tiny"],
        image_ref=IMAGE.id,
    )
    config = guest.get_guest_config(
        instance,
        disk_info,
        {bdm.disk_name: "raw"},
        instance_dir=tmp_path,
        machine_type="pc",
        cpu_mode="",
        state_id="0b5a3c44-2a41-4ad4-9a39-5a1f2f0c0d77",
        cache="none",
        volumes={bdm.disk_name: volume},
    )
    (disk,) = etree.fromstring(guest.to_xml(config).encode()).iterfind("devices/disk")
    assert disk.get("type") == "network"
    assert disk.find("source").get("name") == f"volumes/volume-{VOLUME_ID}"  # type: ignore[union-attr]
    assert disk.find("target").get("dev") == "vda"  # type: ignore[union-attr]
    assert disk.findtext("serial") == VOLUME_ID


BOOT_INVOCATIONS = [
    (["boot", "--flavor", "t1.nano"], 2, "--image"),
    (["boot", "--boot-volume", "v", "--image", "i", "--flavor", "t1.nano"], 2, "no --image"),
    (["boot", "--boot-volume", "nope", "--flavor", "t1.nano"], 1, "no volume matches 'nope'"),
    (["boot", "--image", "i", "--volume-size", "x", "--flavor", "t1.nano"], 2, "invalid int"),
]


@pytest.mark.parametrize(("argv", "code", "message"), BOOT_INVOCATIONS)
def test_boot_from_volume_invocations(cli: Cli, argv: list[str], code: int, message: str) -> None:
    got, _out, err = cli(*argv)
    assert got == code, err
    assert message in err


def test_a_blank_volume_does_not_boot(cli: Cli) -> None:
    assert cli("volume", "create", "--size", "1", "--name", "blank")[0] == 0
    code, _out, err = cli("boot", "--boot-volume", "blank", "--flavor", "t1.nano")
    assert code == 1
    assert "was not made from an image: nothing to boot" in err
    code, out, _err = cli("--json", "volume", "show", "blank")
    assert json.loads(out)["status"] == "available"
