"""Domain XML: golden files compared semantically, and every rendering defined,
started and undefined on libvirt's own test driver."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

import jinja2
import libvirt
import pytest
from conftest import TEST_DRIVER_NODE
from lxml import etree
from pytest_mock import MockerFixture

from minidriver import blockinfo, guest, guestos
from minidriver.network import VIF, NetworkMode
from minidriver.objects import DEFAULT_FLAVORS, Flavor, ImageMeta, Instance

DATA = Path(__file__).resolve().parents[1] / "data"
INSTANCE_DIR = Path("/var/lib/minidriver/instances/7d1e4a52-9f64-4d8e-a0b4-1f1a5c3e2b10")

NANO = DEFAULT_FLAVORS["t1.nano"]
MAC = "fa:16:3e:4d:a1:07"
USER_VIF = VIF(NetworkMode.USER, MAC, forward_port=10022)
# The most disks an instance can have: root, ephemeral, swap and a vfat config drive,
# all virtio (each a PCI device libvirt places itself), beside the user-mode NIC.
MOST_DISKS = Flavor("most", 1, 128, 1, ephemeral_gb=1, swap=16)
# images_type = rbd: the root disk in Ceph, through the dev cluster's monitor (and a
# second one, as real clusters have), with and without cephx auth.
MONS = (guest.NetworkHost("127.0.0.1", "6789"), guest.NetworkHost("fd00::2", "6789"))
RBD_ROOT = guest.NetworkSource(protocol="rbd", name=f"rbd/{INSTANCE_DIR.name}_disk", hosts=MONS)
RBD_ROOT_AUTH = guest.NetworkSource(
    protocol="rbd",
    name=f"vms/{INSTANCE_DIR.name}_disk",
    hosts=MONS,
    auth_username="nova",
    secret_uuid="457eb676-33da-42ec-9a8c-9293d545c337",
)

# images_type = rbd puts every disk in Ceph: root, ephemeral, swap and config drive.
RBD_ALL = {
    name: guest.NetworkSource(protocol="rbd", name=f"rbd/{INSTANCE_DIR.name}_{name}", hosts=MONS)
    for name in ("disk", "disk.local", "disk.swap", "disk.config")
}

AGENT_SOCKET_DIR = Path("/var/lib/libvirt/qemu")

# flavor, image properties, virt_type, config drive format, NIC, root disk in Ceph (or
# every disk named in a mapping)
RbdDisks = guest.NetworkSource | Mapping[str, guest.NetworkSource] | None
Case = tuple[Flavor, dict[str, str], str, str | None, VIF | None, RbdDisks]
CASES: dict[str, Case] = {
    "t1.nano-qemu": (NANO, {}, "qemu", None, None, None),
    "m1.small-kvm": (DEFAULT_FLAVORS["m1.small"], {}, "kvm", None, None, None),
    "t1.nano-config-drive": (NANO, {}, "qemu", "iso9660", None, None),
    "scsi-bus": (
        Flavor("two", 2, 256, 2, swap=16),
        {"hw_disk_bus": "scsi"},
        "qemu",
        None,
        None,
        None,
    ),
    # The four network modes (none: no interface at all).
    "net-user": (NANO, {}, "qemu", None, USER_VIF, None),
    "net-network": (NANO, {}, "qemu", None, VIF(NetworkMode.NETWORK, MAC, "labnet"), None),
    "net-bridge": (NANO, {}, "qemu", None, VIF(NetworkMode.BRIDGE, MAC, "br-lab"), None),
    "net-none": (NANO, {}, "qemu", None, VIF(NetworkMode.NONE, MAC), None),
    "net-user-most-disks": (MOST_DISKS, {}, "qemu", "vfat", USER_VIF, None),
    "t1.nano-rbd": (NANO, {}, "qemu", None, None, RBD_ROOT),
    "m1.small-rbd-auth": (DEFAULT_FLAVORS["m1.small"], {}, "kvm", "iso9660", None, RBD_ROOT_AUTH),
    "t1.nano-rbd-all-disks": (NANO, {}, "qemu", "iso9660", USER_VIF, RBD_ALL),
    # An ISO image: its root is a cdrom (hda), the BIOS boots cdrom; with a config
    # drive, a second cdrom on the last IDE device.
    "iso-root": (NANO, {}, "qemu", None, None, None),
    "iso-root-config-drive": (NANO, {}, "qemu", "iso9660", None, None),
    # Nova's image property: the QEMU guest agent's virtio-serial channel.
    "guest-agent": (NANO, {"hw_qemu_guest_agent": "yes"}, "qemu", None, USER_VIF, None),
    # A kernel image without os_command_line: Nova's consoles, and no_timer_check
    # under qemu only.
    "kernel-cmdline-qemu": (
        NANO,
        {"kernel_id": "aki", "ramdisk_id": "ari"},
        "qemu",
        None,
        None,
        None,
    ),
    "kernel-cmdline-kvm": (NANO, {"kernel_id": "aki"}, "kvm", None, None, None),
    # Nova's SMBIOS sysinfo without a serial entry (sysinfo_serial = none).
    "sysinfo-serial-none": (NANO, {}, "qemu", None, None, None),
    # The buses, machine type and NIC model from the image's properties; the config
    # drive on the next free device of its bus.
    "image-q35-sata-e1000": (
        NANO,
        {
            "hw_machine_type": "q35",
            "hw_disk_bus": "sata",
            "hw_cdrom_bus": "sata",
            "hw_vif_model": "e1000",
        },
        "qemu",
        "iso9660",
        USER_VIF,
        None,
    ),
    "image-ide-disks-config-drive": (
        NANO,
        {"hw_disk_bus": "ide", "hw_vif_model": "rtl8139"},
        "kvm",
        "iso9660",
        VIF(NetworkMode.NETWORK, MAC, "labnet"),
        None,
    ),
}
SYSINFO_SERIAL = {"sysinfo-serial-none": "none"}
# The image's disk_format where it is not qcow2.
DISK_FORMATS = {"iso-root": "iso", "iso-root-config-drive": "iso"}
# The test driver's node, with the libvirt network the network mode names.
NODE_WITH_NETWORK = TEST_DRIVER_NODE.replace(
    "</node>",
    "  <network><name>labnet</name><bridge name='virbr-md'/>"
    "<ip address='192.0.2.1' netmask='255.255.255.0'/></network>\n</node>",
)


def render(
    flavor: Flavor,
    props: dict[str, str],
    virt_type: str,
    config_drive: str | None,
    vif: VIF | None = None,
    rbd_root: RbdDisks = None,
    display_name: str = "web-1",
    disk_format: str = "qcow2",
    cache_dir: Path | None = None,
    sysinfo_serial: str = "unique",
) -> str:
    image = ImageMeta(id="c036d689-0336-4fcd-a8e0-4aed4dd5e420", name="x", disk_format=disk_format)
    image = ImageMeta(**{**image.__dict__, "properties": props})
    instance = Instance(
        uuid=INSTANCE_DIR.name,
        name="instance-0000002a",
        display_name=display_name,
        flavor=flavor,
        image_ref=image.id,
        virt_type=virt_type,
        created_at="2026-11-22T00:00:00+00:00",
        kernel_id=props.get("kernel_id", ""),
        ramdisk_id=props.get("ramdisk_id", ""),
    )
    machine_type = image.machine_type("pc")
    disk_info = blockinfo.get_disk_info(
        virt_type, flavor, image, machine_type=machine_type, config_drive_format=config_drive
    )
    network_disks = {"disk": rbd_root} if isinstance(rbd_root, guest.NetworkSource) else rbd_root
    formats = {m.name: ("raw" if m.name == "disk.config" else "qcow2") for m in disk_info}
    for name in network_disks or {}:
        formats[name] = "raw"
    config = guest.get_guest_config(
        instance,
        disk_info,
        formats,
        instance_dir=INSTANCE_DIR,
        machine_type=machine_type,
        cpu_mode="",
        state_id="0b5a3c44-2a41-4ad4-9a39-5a1f2f0c0d77",
        sysinfo_serial=sysinfo_serial,
        cache="none",
        vif=vif,
        network_disks=network_disks,
        image_properties=props,
        agent_socket_dir=AGENT_SOCKET_DIR,
    )
    return guest.to_xml(config, cache_dir=cache_dir)


def render_case(case: str) -> str:
    return render(
        *CASES[case],
        disk_format=DISK_FORMATS.get(case, "qcow2"),
        sysinfo_serial=SYSINFO_SERIAL.get(case, "unique"),
    )


def canonical(text: str) -> bytes:
    parser = etree.XMLParser(remove_blank_text=True)
    return etree.tostring(etree.fromstring(text.encode(), parser), method="c14n")


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_xml(case: str, request: pytest.FixtureRequest) -> None:
    xml = render_case(case)
    golden = DATA / f"domain-{case}.xml"
    if request.config.getoption("--regenerate-golden"):
        golden.write_text(xml)
    assert canonical(xml) == canonical(golden.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_xml_defines_and_starts_on_the_test_driver(case: str, tmp_path: Path) -> None:
    node = tmp_path / "testdriver.xml"
    node.write_text(NODE_WITH_NETWORK)
    test_driver = libvirt.open(f"test://{node}")
    try:
        vif_model = CASES[case][1].get("hw_vif_model", "virtio")
        _define_start_undefine(test_driver, render_case(case), vif_model)
    finally:
        test_driver.close()


def libvirt_disk_order(targets: list[tuple[str | None, str | None]]) -> list[str | None]:
    """The order libvirt keeps disks in (its virDomainDiskInsert): each disk goes right
    after the last one on its bus with a lower name, so a bus's disks stay together in
    name order (an ISO root hda pulls the config drive hdb in front of the vd disks)."""
    order: list[tuple[str | None, str | None]] = []
    for dev, bus in targets:
        at = len(order)
        for i in range(len(order) - 1, -1, -1):
            if order[i][1] == bus and (order[i][0] or "") > (dev or ""):
                at = i
            elif order[i][1] == bus and at == len(order):
                at = i + 1
                break
        order.insert(at, (dev, bus))
    return [dev for dev, _bus in order]


def _define_start_undefine(
    test_driver: libvirt.virConnect, xml: str, vif_model: str = "virtio"
) -> None:
    dom = test_driver.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    dom.create()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    described = etree.fromstring(dom.XMLDesc(0).encode())
    targets = [t.get("dev") for t in described.iterfind("devices/disk/target")]
    rendered_targets = etree.fromstring(xml.encode()).iterfind("devices/disk/target")
    assert targets == libvirt_disk_order([(t.get("dev"), t.get("bus")) for t in rendered_targets])
    rendered = etree.fromstring(xml.encode())
    for path in ("devices/interface/@type", "devices/interface/mac/@address"):
        assert described.xpath(path) == rendered.xpath(path)
    nics = len(rendered.findall("devices/interface"))
    assert described.xpath("devices/interface/model/@type") == [vif_model] * nics
    dom.destroy()
    dom.undefine()
    assert test_driver.listAllDomains() == []


QEMU_NS = {"qemu": guest.QEMU_NAMESPACE}


def test_user_mode_is_qemus_own_network_forwarding_only_from_loopback() -> None:
    tree = etree.fromstring(render(*CASES["net-user"]).encode())
    assert tree.findall("devices/interface") == []  # libvirt manages no NIC here
    args = [a.get("value") for a in tree.iterfind("qemu:commandline/qemu:arg", QEMU_NS)]
    assert args == [
        "-netdev",
        "user,id=minidriver-net0,hostfwd=tcp:127.0.0.1:10022-:22",
        "-device",
        f"virtio-net-pci,netdev=minidriver-net0,id=minidriver-nic0,mac={MAC},"
        "bus=pci.0,addr=0x10,romfile=",
    ]


def test_other_modes_add_no_qemu_arguments_and_no_taint() -> None:
    for case in ("net-network", "net-bridge", "net-none", "t1.nano-qemu"):
        tree = etree.fromstring(render(*CASES[case]).encode())
        assert tree.find("qemu:commandline", QEMU_NS) is None, case


def test_the_user_nic_slot_is_beyond_what_libvirt_assigns_to_the_most_disks() -> None:
    """libvirt places devices without an address in the lowest free slots from 0x02
    up (0x00: host bridge, 0x01: PIIX3). The most disks plus the balloon fill 0x02 to
    0x06 (a real boot of this case is in tests/integration/test_network.py)."""
    tree = etree.fromstring(render(*CASES["net-user-most-disks"]).encode())
    virtio_disks = [t for t in tree.iterfind("devices/disk/target") if t.get("bus") == "virtio"]
    auto_placed = len(virtio_disks) + len(tree.findall("devices/memballoon"))
    assert auto_placed == 5
    assert 0x02 + auto_placed - 1 < guest.USER_NIC_PCI_SLOT
    assert tree.find(".//address") is None  # every other device is libvirt's to place


def test_q35_puts_the_user_nic_on_its_pcie_root() -> None:
    vif = VIF(NetworkMode.USER, MAC, forward_port=10100)
    assert "bus=pcie.0,addr=0x10" in guest.user_network_args(vif, "pc-q35-7.2")[3]
    assert "bus=pci.0,addr=0x10" in guest.user_network_args(vif, "pc-i440fx-7.2")[3]


def test_hostile_display_name_is_escaped_and_changes_no_device() -> None:
    hostile = "</minidriver:display-name></minidriver:instance></metadata><devices><disk/>&\"'"
    xml = render(*CASES["t1.nano-qemu"], display_name=hostile)
    tree = etree.fromstring(xml.encode())
    ns = {"m": guest.METADATA_NAMESPACE}
    assert tree.findtext("metadata/m:instance/m:display-name", namespaces=ns) == hostile
    assert len(tree.findall("devices/disk")) == 3


def test_control_characters_never_reach_libvirt() -> None:
    with pytest.raises(guest.GuestXMLError, match="not well formed"):
        render(*CASES["t1.nano-qemu"], display_name="bell\x07")


@pytest.mark.parametrize(
    "text",
    [
        "<domain><name>a</domain>",  # a mismatched tag
        "<domain><qemu:commandline/></domain>",  # a prefix never declared
        "<domain>\x07</domain>",  # a control character
        "<domain/><domain/>",  # two roots
    ],
)
def test_what_is_not_well_formed_xml_is_refused(text: str) -> None:
    with pytest.raises(guest.GuestXMLError, match=r"^the text is not well formed: "):
        guest.check_well_formed(text, "the text")


def test_declared_namespaces_are_well_formed() -> None:
    guest.check_well_formed(
        f'<domain xmlns:qemu="{guest.QEMU_NAMESPACE}"><qemu:commandline/></domain>', "domain"
    )


def test_cpu_mode_follows_virt_type() -> None:
    assert guest.default_cpu_mode("qemu", "") is None
    assert guest.default_cpu_mode("kvm", "") == "host-model"
    assert guest.default_cpu_mode("kvm", "host-passthrough") == "host-passthrough"
    assert guest.default_cpu_mode("kvm", "none") is None


@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_cachemode_matches_what_dd_can_do(where: str, tmp_path: Path) -> None:
    directory = tmp_path if where == "tmp_path" else Path(where)
    # An independent probe: dd's oflag=direct opens with O_DIRECT as QEMU would.
    probe = directory / f"dd-probe-{tmp_path.name}"
    dd = subprocess.run(
        ["dd", "if=/dev/zero", f"of={probe}", "bs=4096", "count=1", "oflag=direct"],
        capture_output=True,
        check=False,
    )
    probe.unlink(missing_ok=True)
    before = set(directory.iterdir())
    assert guest.disk_cachemode(directory) == ("none" if dd.returncode == 0 else "writeback")
    assert set(directory.iterdir()) == before, "the probe file was left behind"


def test_rbd_root_is_a_network_disk_and_the_others_stay_files() -> None:
    tree = etree.fromstring(render(*CASES["m1.small-rbd-auth"]).encode())
    root, *others = tree.findall("devices/disk")
    assert root.get("type") == "network"
    assert root.findall("target")[0].get("dev") == "vda"
    assert root.findall("driver")[0].get("type") == "raw"
    (source,) = root.findall("source")
    assert (source.get("protocol"), source.get("name")) == ("rbd", RBD_ROOT_AUTH.name)
    assert [(h.get("name"), h.get("port")) for h in source.iterfind("host")] == [
        ("127.0.0.1", "6789"),
        ("fd00::2", "6789"),
    ]
    (auth,) = root.findall("auth")
    (secret,) = auth.findall("secret")
    assert auth.get("username") == "nova"
    assert (secret.get("type"), secret.get("uuid")) == ("ceph", RBD_ROOT_AUTH.secret_uuid)
    assert all(d.get("type") == "file" for d in others)
    no_auth = etree.fromstring(render(*CASES["t1.nano-rbd"]).encode())
    assert no_auth.findall("devices/disk/auth") == []


def test_rbd_every_disk_is_a_network_disk_none_a_file() -> None:
    tree = etree.fromstring(render(*CASES["t1.nano-rbd-all-disks"]).encode())
    disks = tree.findall("devices/disk")
    assert [d.get("type") for d in disks] == ["network"] * 4
    assert tree.xpath("devices/disk/source/@file") == []
    assert [d.get("device") for d in disks] == ["disk", "disk", "disk", "cdrom"]
    assert tree.xpath("devices/disk/source/@name") == [
        f"rbd/{INSTANCE_DIR.name}_{n}" for n in ("disk", "disk.local", "disk.swap", "disk.config")
    ]
    assert tree.xpath("devices/disk/driver/@type") == ["raw"] * 4
    assert tree.xpath("devices/disk[@device='cdrom']/readonly") != []


def test_an_iso_root_is_a_cdrom_the_bios_boots_first() -> None:
    tree = etree.fromstring(render(*CASES["iso-root-config-drive"], disk_format="iso").encode())
    assert tree.xpath("os/boot/@dev") == ["cdrom"]
    cdrom = "devices/disk[@device='cdrom']"
    assert tree.xpath(f"{cdrom}/target/@dev") == ["hda", "hdb"]
    assert tree.xpath(f"{cdrom}/source/@file") == [
        f"{INSTANCE_DIR}/disk",
        f"{INSTANCE_DIR}/disk.config",
    ]
    # The root stays the qcow2 overlay on the cached ISO, as every root disk.
    assert tree.xpath(f"{cdrom}/driver/@type") == ["qcow2", "raw"]
    assert tree.xpath("devices/disk[@device='disk']/target/@dev") == ["vda", "vdb"]


def test_a_disk_image_boots_hd_and_a_kernel_image_no_device() -> None:
    tree = etree.fromstring(render(*CASES["t1.nano-qemu"]).encode())
    assert tree.xpath("os/boot/@dev") == ["hd"]
    image = ImageMeta(id="k", name="k", disk_format="qcow2", properties={"kernel_id": "aki"})
    instance = Instance(INSTANCE_DIR.name, "instance-2a", "k", NANO, image.id, kernel_id="aki")
    disk_info = blockinfo.get_disk_info("qemu", NANO, image)
    # QEMU loads the kernel itself: the BIOS boots nothing.
    assert guestos.get_guest_os(instance, disk_info, INSTANCE_DIR).boot_devs == ()


def test_a_template_loaded_ahead_is_not_compiled_again_at_its_render(
    tmp_path: Path, mocker: MockerFixture
) -> None:
    """What a spawn's loader thread does while the disks are made is what the render
    then uses."""
    guest._ENVIRONMENTS.clear()  # as in a new process
    compiled = mocker.spy(jinja2.Environment, "compile")
    guest.load_templates(guest.DOMAIN_TEMPLATES, cache_dir=tmp_path / "jinja_cache")
    loaded = compiled.call_count

    render(DEFAULT_FLAVORS["t1.nano"], {}, "qemu", None, cache_dir=tmp_path / "jinja_cache")

    assert loaded == 2  # domain.xml.j2 and the disk macro it imports
    assert compiled.call_count == loaded


def test_the_compiled_template_is_kept_private_and_loaded_by_the_next_process(
    tmp_path: Path, mocker: MockerFixture
) -> None:
    cache_dir = tmp_path / "state" / "jinja_cache"
    flavor = DEFAULT_FLAVORS["t1.nano"]
    compiled = mocker.spy(jinja2.Environment, "compile")

    guest._ENVIRONMENTS.clear()  # as in a new process
    first = render(flavor, {}, "qemu", None, cache_dir=cache_dir)
    # domain.xml.j2 and the disk macro it imports (disk.xml.j2), each compiled once.
    assert compiled.call_count == 2
    assert cache_dir.stat().st_mode & 0o777 == 0o700
    kept = list(cache_dir.iterdir())
    assert len(kept) == 2
    assert {p.stat().st_mode & 0o777 for p in kept} == {0o600}

    guest._ENVIRONMENTS.clear()
    second = render(flavor, {}, "qemu", None, cache_dir=cache_dir)

    assert compiled.call_count == 2  # both loaded, not compiled again
    assert second == first == render(flavor, {}, "qemu", None)
