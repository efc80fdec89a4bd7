"""Rescue and unrescue on libvirt's test driver, with real files and a real state
database: the rescue definition's disks, the kept definition, the wrong states."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree
from tests_helpers_ops import domain_xml, run

from minidriver import rescue
from minidriver.config import Config
from minidriver.driver import LibvirtDriver
from minidriver.exception import MinidriverError


def disks(xml: str) -> list[tuple[str, str]]:
    """(target dev, source file name) of every disk, in the definition's order."""
    tree = etree.fromstring(xml.encode())
    return [
        (str(disk.find("target").get("dev")), Path(str(disk.find("source").get("file"))).name)  # type: ignore[union-attr]
        for disk in tree.iterfind("devices/disk")
    ]


def test_rescue_boots_the_rescue_disk_with_the_root_second(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano", config_drive=True)
    instance_dir = Path(inst.instance_dir)
    original = domain_xml(drv, inst.uuid)
    rescue.rescue(drv, inst.uuid)

    assert disks(domain_xml(drv, inst.uuid)) == [
        ("vda", "disk.rescue"),
        ("vdb", "disk"),
        ("hda", "disk.config.rescue"),  # the next free IDE device, as Nova since Ocata
    ]
    assert (instance_dir / "unrescue.xml").read_text() == original
    assert (instance_dir / "disk.config.rescue").read_bytes() == (
        instance_dir / "disk.config"
    ).read_bytes()
    assert drv.db.get_instance(inst.uuid).vm_state == "rescued"
    assert drv.get_info(inst.uuid).state == "running"

    rescue.unrescue(drv, inst.uuid)
    assert domain_xml(drv, inst.uuid) == original
    assert sorted(p.name for p in instance_dir.glob("*rescue*")) == []
    assert drv.db.get_instance(inst.uuid).vm_state == "active"
    assert drv.get_info(inst.uuid).state == "running"


def test_a_stopped_instance_can_be_rescued(drv: LibvirtDriver, empty_qcow2_id: str) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    drv.power_off(inst.uuid, force=True)
    rescue.rescue(drv, inst.uuid, empty_qcow2_id)
    assert drv.get_info(inst.uuid).state == "running"
    assert drv.db.get_instance(inst.uuid).vm_state == "rescued"


def test_commands_and_wrong_states(
    drv: LibvirtDriver, conf: Config, empty_qcow2_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    code, failed = run(drv, conf, capsys, "unrescue", "vm")
    assert code == 1 and "vm_state is active" in failed["error"], failed
    code, done = run(drv, conf, capsys, "rescue", "vm", "--image", "cirros")
    assert (code, done["vm_state"], done["state"]) == (0, "rescued", "running")
    xml = domain_xml(drv, inst.uuid)
    for argv in (("rescue", "vm"), ("resize", "vm", "--flavor", "m1.small"), ("shelve", "vm")):
        code, failed = run(drv, conf, capsys, *argv)
        assert code == 1 and "vm_state is rescued" in failed["error"], (argv, failed)
        assert "unrescue" in failed["hint"]
    assert domain_xml(drv, inst.uuid) == xml
    code, shown = run(drv, conf, capsys, "show", "vm")
    assert shown["vm_state"] == "rescued"
    code, report = run(drv, conf, capsys, "cleanup")
    assert (code, report["records"], report["domains"]) == (0, [], [])
    code, done = run(drv, conf, capsys, "unrescue", "vm")
    assert (code, done["vm_state"]) == (0, "active")


def test_a_failed_rescue_leaves_the_instance_as_it_was(
    drv: LibvirtDriver, empty_qcow2_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    original = domain_xml(drv, inst.uuid)

    def refuse(*_args: object, **_kwargs: object) -> str:
        raise MinidriverError("injected: libvirt refused the definition")

    monkeypatch.setattr(rescue, "define_xml", refuse)
    with pytest.raises(MinidriverError, match="injected"):
        rescue.rescue(drv, inst.uuid)
    assert domain_xml(drv, inst.uuid) == original
    assert drv.get_info(inst.uuid).state == "running"
    assert drv.db.get_instance(inst.uuid).vm_state == "active"
    assert list(Path(inst.instance_dir).glob("*rescue*")) == []


def test_delete_of_a_rescued_instance_removes_everything(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    rescue.rescue(drv, inst.uuid)
    drv.destroy(inst.uuid)
    assert drv.host.get_domain(inst.uuid) is None
    assert not Path(inst.instance_dir).exists()


@pytest.mark.parametrize("operation", ["rescue", "resize", "shelve"])
def test_rbd_state_dirs_are_refused_before_anything_changes(
    drv: LibvirtDriver,
    conf: Config,
    empty_qcow2_id: str,
    make_driver: Callable[[Config], LibvirtDriver],
    operation: str,
) -> None:
    """Not built for images_type = rbd yet: one clear refusal, nothing changed."""
    from minidriver import resize, shelve

    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    xml = domain_xml(drv, inst.uuid)
    rbd = make_driver(conf.with_libvirt(images_type="rbd"))
    calls: dict[str, Callable[[], object]] = {
        "rescue": lambda: rescue.rescue(rbd, inst.uuid),
        "resize": lambda: resize.resize(rbd, inst.uuid, "m1.small"),
        "shelve": lambda: shelve.shelve(rbd, inst.uuid),
    }
    with pytest.raises(MinidriverError, match="images_type = rbd is not supported"):
        calls[operation]()
    assert domain_xml(drv, inst.uuid) == xml
    assert drv.db.get_instance(inst.uuid).vm_state == "active"
    assert drv.get_info(inst.uuid).state == "running"
