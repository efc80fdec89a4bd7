"""Domain XML: golden files compared semantically, and every rendering defined,
started and undefined on libvirt's own test driver."""

from __future__ import annotations

import subprocess
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from minidriver import blockinfo, guest
from minidriver.objects import DEFAULT_FLAVORS, Flavor, ImageMeta, Instance

DATA = Path(__file__).resolve().parents[1] / "data"
INSTANCE_DIR = Path("/var/lib/minidriver/instances/7d1e4a52-9f64-4d8e-a0b4-1f1a5c3e2b10")

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

Case = tuple[Flavor, dict[str, str], str, str | None, guest.NetworkSource | None]
CASES: dict[str, Case] = {
    "t1.nano-qemu": (DEFAULT_FLAVORS["t1.nano"], {}, "qemu", None, None),
    "m1.small-kvm": (DEFAULT_FLAVORS["m1.small"], {}, "kvm", None, None),
    "t1.nano-config-drive": (DEFAULT_FLAVORS["t1.nano"], {}, "qemu", "iso9660", None),
    "scsi-bus": (Flavor("two", 2, 256, 2, swap=16), {"hw_disk_bus": "scsi"}, "qemu", None, None),
    "t1.nano-rbd": (DEFAULT_FLAVORS["t1.nano"], {}, "qemu", None, RBD_ROOT),
    "m1.small-rbd-auth": (DEFAULT_FLAVORS["m1.small"], {}, "kvm", "iso9660", RBD_ROOT_AUTH),
}


def render(
    flavor: Flavor,
    props: dict[str, str],
    virt_type: str,
    config_drive: str | None,
    rbd_root: guest.NetworkSource | None = None,
    display_name: str = "web-1",
) -> str:
    image = ImageMeta(id="c036d689-0336-4fcd-a8e0-4aed4dd5e420", name="x", disk_format="qcow2")
    image = ImageMeta(**{**image.__dict__, "properties": props})
    instance = Instance(
        uuid=INSTANCE_DIR.name,
        name="instance-0000002a",
        display_name=display_name,
        flavor=flavor,
        image_ref=image.id,
        virt_type=virt_type,
        created_at="2026-11-22T00:00:00+00:00",
    )
    disk_info = blockinfo.get_disk_info(virt_type, flavor, image, config_drive_format=config_drive)
    formats = {m.name: ("raw" if m.name == "disk.config" else "qcow2") for m in disk_info}
    if rbd_root is not None:
        formats["disk"] = "raw"
    config = guest.get_guest_config(
        instance,
        disk_info,
        formats,
        instance_dir=INSTANCE_DIR,
        machine_type="pc",
        cpu_mode="",
        state_id="0b5a3c44-2a41-4ad4-9a39-5a1f2f0c0d77",
        cache="none",
        network_disks={"disk": rbd_root} if rbd_root else None,
    )
    return guest.to_xml(config)


def canonical(text: str) -> bytes:
    parser = etree.XMLParser(remove_blank_text=True)
    return etree.tostring(etree.fromstring(text.encode(), parser), method="c14n")


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_xml(case: str, request: pytest.FixtureRequest) -> None:
    xml = render(*CASES[case])
    golden = DATA / f"domain-{case}.xml"
    if request.config.getoption("--regenerate-golden"):
        golden.write_text(xml)
    assert canonical(xml) == canonical(golden.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_xml_defines_and_starts_on_the_test_driver(
    case: str, test_driver: libvirt.virConnect
) -> None:
    xml = render(*CASES[case])
    dom = test_driver.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    dom.create()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    described = etree.fromstring(dom.XMLDesc(0).encode())
    targets = [t.get("dev") for t in described.iterfind("devices/disk/target")]
    expected = [
        t.get("dev") for t in etree.fromstring(xml.encode()).iterfind("devices/disk/target")
    ]
    assert targets == expected
    dom.destroy()
    dom.undefine()
    assert test_driver.listAllDomains() == []


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
