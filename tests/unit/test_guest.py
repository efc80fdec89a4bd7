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

CASES = {
    "t1.nano-qemu": (DEFAULT_FLAVORS["t1.nano"], {}, "qemu", None),
    "m1.small-kvm": (DEFAULT_FLAVORS["m1.small"], {}, "kvm", None),
    "t1.nano-config-drive": (DEFAULT_FLAVORS["t1.nano"], {}, "qemu", "iso9660"),
    "scsi-bus": (Flavor("two", 2, 256, 2, swap=16), {"hw_disk_bus": "scsi"}, "qemu", None),
}


def render(
    flavor: Flavor,
    props: dict[str, str],
    virt_type: str,
    config_drive: str | None,
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
    config = guest.get_guest_config(
        instance,
        disk_info,
        formats,
        instance_dir=INSTANCE_DIR,
        machine_type="pc",
        cpu_mode="",
        state_id="0b5a3c44-2a41-4ad4-9a39-5a1f2f0c0d77",
        cache="none",
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
