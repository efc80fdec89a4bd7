"""Nova's SMBIOS sysinfo in the domain XML (a clone's: tests/unit/test_vmtemplate.py),
and the image properties that shape the hardware."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from minidriver import guest, sysinfo
from minidriver.driver import LibvirtDriver
from minidriver.exception import ConfigError, UnsupportedHardware

DATA = Path(__file__).resolve().parents[1] / "data"
SOURCE_UUID = "7d1e4a52-9f64-4d8e-a0b4-1f1a5c3e2b10"  # the golden files' instance
CLONE_UUID = "11111111-2222-3333-4444-555555555555"


def entries(xml: str) -> dict[str, str]:
    tree = etree.fromstring(xml.encode())
    return {e.get("name", ""): e.text or "" for e in tree.iterfind("sysinfo/system/entry")}


def test_the_golden_domain_says_openstack_nova_in_its_smbios() -> None:
    xml = (DATA / "domain-t1.nano-qemu.xml").read_text()
    assert entries(xml) == {
        "manufacturer": "OpenStack Foundation",
        "product": "OpenStack Nova",
        "version": sysinfo.GuestSysinfo(SOURCE_UUID, None).version,
        "serial": SOURCE_UUID,
        "uuid": SOURCE_UUID,
        "family": "Virtual Machine",
    }
    assert etree.fromstring(xml.encode()).xpath("os/smbios/@mode") == ["sysinfo"]


def test_sysinfo_serial_os_is_the_hosts_machine_id(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    assert sysinfo.host_os_serial(machine_id) == "01234567-89ab-cdef-0123-456789abcdef"
    machine_id.write_text("")
    with pytest.raises(ConfigError, match="missing or empty"):
        sysinfo.host_os_serial(machine_id)
    assert sysinfo.get_guest_sysinfo(CLONE_UUID, "none").serial is None


@pytest.mark.parametrize(
    ("props", "model"),
    [({}, "virtio"), ({"hw_vif_model": "e1000"}, "e1000"), ({"hw_vif_model": "pcnet"}, "pcnet")],
)
def test_hw_vif_model_picks_the_nic(props: dict[str, str], model: str) -> None:
    assert guest.get_vif_model(props) == model


def test_an_unknown_hw_vif_model_is_refused() -> None:
    with pytest.raises(UnsupportedHardware, match="hw_vif_model"):
        guest.get_vif_model({"hw_vif_model": "vmxnet9"})


def test_the_image_s_hw_machine_type_wins_over_the_host_s(
    drv: LibvirtDriver, empty_qcow2: Path
) -> None:
    image = drv.images.add(
        empty_qcow2,
        name="q35",
        disk_format="qcow2",
        properties={"hw_machine_type": "q35", "hw_cdrom_bus": "sata"},
    )
    assert drv.conf.libvirt.hw_machine_type == "pc"
    inst = drv.spawn("on-q35", image.id, "t1.nano", config_drive=True)
    xml = drv.host.get_connection().lookupByUUIDString(inst.uuid).XMLDesc(0)
    assert guest.machine_type_of(xml) == "q35"
    tree = etree.fromstring(xml.encode())
    assert tree.xpath("devices/disk[@device='cdrom']/target/@bus") == ["sata"]
