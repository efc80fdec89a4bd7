"""Templates on libvirt's test driver, with real files and a real state database: the
clone's XML, the refusals, delete while clones exist, the cache's view of frozen disks
and cleanup after a killed ``template create``. Save and restore themselves need QEMU's
save format (the test driver writes its own): tests/integration/test_templates.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from minidriver import cleanup, imagecache, vmtemplate_rbd
from minidriver.cli import main
from minidriver.db import InstanceRecord
from minidriver.driver import LibvirtDriver
from minidriver.guest import METADATA_NAMESPACE, QEMU_NAMESPACE
from minidriver.lockutils import external_lock
from minidriver.vmtemplate import (
    TemplateError,
    TemplateRecord,
    Templates,
    disk_names,
    template_lock_name,
)
from minidriver.vmtemplate_xml import clone_xml


def test_clone_xml_names_the_clones_own_files_and_port(
    drv: LibvirtDriver, empty_qcow2_id: str, tmp_path: Path
) -> None:
    inst = drv.spawn("src", empty_qcow2_id, "t1.nano", network="user", config_drive=True)
    source_dir = inst.instance_dir
    xml = (Path(source_dir) / "libvirt.xml").read_text()
    clone_dir, template_dir = tmp_path / "clone", tmp_path / "tpl"
    new = clone_xml(
        xml,
        name="instance-00000042",
        uuid="11111111-2222-3333-4444-555555555555",
        display_name="c1",
        created_at="2026-12-03T00:00:00Z",
        source_dir=source_dir,
        source_uuid=inst.uuid,
        clone_dir=clone_dir,
        template_dir=template_dir,
        overlaid=["disk", "disk.local", "disk.swap"],
        forward_port=10999,
    )
    root = etree.fromstring(new.encode())
    assert root.findtext("name") == "instance-00000042"
    assert root.findtext("uuid") == "11111111-2222-3333-4444-555555555555"
    meta = root.find(f"metadata/{{{METADATA_NAMESPACE}}}instance")
    assert meta is not None
    assert meta.findtext(f"{{{METADATA_NAMESPACE}}}display-name") == "c1"
    assert meta.findtext(f"{{{METADATA_NAMESPACE}}}instance-uuid") == root.findtext("uuid")
    sources = [s.get("file") for s in root.iterfind("devices/disk/source")]
    assert sources == [
        os.fspath(clone_dir / "disk"),
        os.fspath(clone_dir / "disk.local"),
        os.fspath(clone_dir / "disk.swap"),
        os.fspath(template_dir / "disk.config"),
    ]
    assert [log.get("file") for log in root.iterfind("devices/*/log")] == [
        os.fspath(clone_dir / "console.log")
    ]
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NAMESPACE}}}arg")]
    assert any("hostfwd=tcp:127.0.0.1:10999-:22" in (a or "") for a in args), args
    assert source_dir not in new
    # libvirt takes it: defined next to its source on the same connection.
    drv.host.define(new)


def test_clone_xml_refuses_a_path_outside_the_source_dir(
    drv: LibvirtDriver, empty_qcow2_id: str, tmp_path: Path
) -> None:
    inst = drv.spawn("src", empty_qcow2_id, "t1.nano", network="none")
    xml = (Path(inst.instance_dir) / "libvirt.xml").read_text()
    stray = xml.replace(f"{inst.instance_dir}/disk.swap", "/elsewhere/disk.swap")
    with pytest.raises(TemplateError, match=r"/elsewhere/disk\.swap"):
        clone_xml(
            stray,
            name="n",
            uuid="u",
            display_name="d",
            created_at="",
            source_dir=inst.instance_dir,
            source_uuid=inst.uuid,
            clone_dir=tmp_path,
            template_dir=tmp_path,
            overlaid=["disk", "disk.local", "disk.swap"],
            forward_port=None,
        )


@pytest.mark.parametrize(
    ("network", "stop", "message"),
    [
        ("bridge:br0", False, "bridge network"),
        ("user", True, "is shutoff"),
    ],
)
def test_create_refuses_and_changes_nothing(
    drv: LibvirtDriver, empty_qcow2_id: str, network: str, stop: bool, message: str
) -> None:
    inst = drv.spawn("src", empty_qcow2_id, "t1.nano", network=network)
    if stop:
        drv.power_off(inst.uuid, force=True)
    with pytest.raises(TemplateError, match=message):
        Templates(drv).create(inst.uuid, "t")
    assert Templates(drv).list() == []
    assert not drv.conf.templates_path.exists()
    assert [r.uuid for r in drv.list_instances()] == [inst.uuid]
    assert sorted(p.name for p in Path(inst.instance_dir).iterdir()) == [
        "console.log",
        "disk",
        "disk.info",
        "disk.local",
        "disk.swap",
        "libvirt.xml",
    ]


def test_create_of_a_suspended_instance_says_to_resume_it(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("src", empty_qcow2_id, "t1.nano")
    drv.suspend(inst.uuid)
    with pytest.raises(TemplateError, match="vm_state suspended") as refused:
        Templates(drv).create(inst.uuid, "t")
    assert refused.value.hint == "resume it first (minidriver resume src)"
    assert Templates(drv).list() == [] and not drv.conf.templates_path.exists()
    assert drv.db.get_instance(inst.uuid).vm_state == "suspended"


def test_a_clone_of_a_half_made_template_is_refused_naming_why(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("src", empty_qcow2_id, "t1.nano")
    templates = Templates(drv)
    tpl = template_record(drv, drv.db.get_instance(inst.uuid), "creating")
    templates._insert(tpl)
    with (
        external_lock(drv.conf.locks_dir, template_lock_name(tpl.id)),  # being made
        pytest.raises(TemplateError, match="still being made"),
    ):
        templates.spawn(tpl.id, name="c1")
    with pytest.raises(TemplateError, match="left half-made") as refused:  # its maker died
        templates.spawn(tpl.id, name="c1")
    assert "minidriver cleanup" in (refused.value.hint or "")
    assert [r.uuid for r in drv.db.list_instances()] == [inst.uuid]


def template_record(drv: LibvirtDriver, source: InstanceRecord, status: str) -> TemplateRecord:
    template_dir = drv.conf.templates_path / "t-0001"
    return TemplateRecord(
        id="t-0001",
        name="tpl",
        status=status,
        created_at="2026-12-03T00:00:00Z",
        template_dir=os.fspath(template_dir),
        source_uuid=source.uuid,
        source_dir=source.instance_dir,
        flavor=source.flavor,
        image_id=source.image_id,
        kernel_id="",
        ramdisk_id="",
        network_mode=source.network_mode,
        mac_address=source.mac_address,
        key_name=None,
        disks={"disk": "qcow2"},
        memory_bytes=None,
    )


def test_delete_is_refused_while_clones_exist(drv: LibvirtDriver, empty_qcow2_id: str) -> None:
    inst = drv.spawn("src", empty_qcow2_id, "t1.nano")
    templates = Templates(drv)
    tpl = template_record(drv, drv.db.get_instance(inst.uuid), "active")
    templates._insert(tpl)
    tpl.path.mkdir(parents=True)
    clone = drv.spawn("clone-1", empty_qcow2_id, "t1.nano")
    drv.db.update_instance(clone.uuid, template_id=tpl.id)
    with pytest.raises(TemplateError, match="clone-1"):
        templates.delete(tpl.id)
    assert tpl.path.is_dir() and templates.find("tpl") == tpl
    drv.destroy(clone.uuid)
    templates.delete(tpl.id)
    assert templates.list() == [] and not tpl.path.exists()


def test_the_cache_counts_the_bases_behind_frozen_disks(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("src", empty_qcow2_id, "t1.nano")
    record = drv.db.get_instance(inst.uuid)
    tpl = template_record(drv, record, "active")
    tpl.path.mkdir(parents=True)
    # As `template create` leaves them: the disks moved, the instance gone.
    for name in ("disk", "disk.local", "disk.swap", "disk.info"):
        os.rename(Path(record.instance_dir) / name, tpl.path / name)
    drv.db.delete_instance(record.uuid)
    drv._undefine(record.uuid)
    in_use = drv.bases_in_use()
    frozen_users = {name for name, users in in_use.items() if tpl.path.name in users}
    assert any(n.startswith("ephemeral_1_") for n in frozen_users), in_use
    assert "swap_64" in frozen_users
    assert len(frozen_users) == 3
    # A pass that removes every unused base at once keeps them all.
    settings = dataclasses.replace(
        drv.conf.image_cache, remove_unused_original_minimum_age_seconds=0
    )
    manager = imagecache.ImageCacheManager(
        drv.conf.base_dir, drv.conf.locks_dir, drv.conf.instances_path, settings
    )
    result = manager.update(drv.bases_in_use(), recheck=drv.bases_in_use)
    assert result.removed == () and result.errors == ()
    assert len(list(drv.conf.base_dir.iterdir())) == 3


def test_cleanup_removes_a_half_made_template_and_its_source(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("src", empty_qcow2_id, "t1.nano", network="user")
    record = drv.db.get_instance(inst.uuid)
    templates = Templates(drv)
    tpl = template_record(drv, record, "creating")
    templates._insert(tpl)
    tpl.path.mkdir(parents=True)
    os.rename(Path(record.instance_dir) / "disk", tpl.path / "disk")  # killed mid-move
    stray = drv.conf.templates_path / "no-record"
    stray.mkdir()

    dry = cleanup.cleanup(drv, dry_run=True)
    assert sorted(dry.templates) == sorted([tpl.template_dir, os.fspath(stray)])
    assert inst.uuid in dry.records
    assert templates.list() == [tpl]

    report = cleanup.cleanup(drv, dry_run=False)
    assert sorted(report.templates) == sorted([tpl.template_dir, os.fspath(stray)])
    assert templates.list() == []
    assert list(drv.conf.templates_path.iterdir()) == []
    assert drv.db.list_instances() == []
    assert drv.host.find_domain(record.name) is None
    assert not Path(record.instance_dir).exists()
    assert [r for r in drv.ports.list() if r.instance_uuid == inst.uuid] == []
    # A second pass finds nothing.
    assert cleanup.cleanup(drv, dry_run=False).total() == 0


def test_an_active_template_is_never_an_orphan(drv: LibvirtDriver, empty_qcow2_id: str) -> None:
    inst = drv.spawn("src", empty_qcow2_id, "t1.nano")
    record = drv.db.get_instance(inst.uuid)
    tpl = dataclasses.replace(template_record(drv, record, "active"), source_uuid="gone")
    Templates(drv)._insert(tpl)
    tpl.path.mkdir(parents=True)
    (tpl.path / "memory.save").write_bytes(b"x")
    report = cleanup.cleanup(drv, dry_run=False)
    assert report.templates == []
    assert (tpl.path / "memory.save").exists()
    assert [r.uuid for r in drv.db.list_instances()] == [inst.uuid]


# -- the command line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["boot", "--template", "t", "--image", "cirros"], 2, "--image cannot go with"),
        (["boot", "--template", "t", "--network", "none"], 2, "--network cannot go with"),
        (["boot", "--template", "nope"], 1, "no template matches 'nope'"),
        (["boot", "--name", "x"], 2, "required: --image, --flavor"),
        (["explain", "--template", "nope"], 1, "no template matches 'nope'"),
        (["template", "show", "nope"], 1, "no template matches 'nope'"),
        (["template", "delete", "nope"], 1, "no template matches 'nope'"),
        (["template", "create", "nope", "--name", "t"], 1, "no instance matches 'nope'"),
        (["template", "create", "vm"], 2, "required: --name"),
    ],
)
def test_template_commands_refuse_what_they_cannot_do(
    drv: LibvirtDriver,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    message: str,
) -> None:
    try:
        got = main(["--state-dir", str(drv.conf.state_path), *argv], host=drv.host)
    except SystemExit as exc:
        got = int(exc.code or 0)
    assert got == code
    assert message in capsys.readouterr().err


def test_template_list_and_show(
    drv: LibvirtDriver, empty_qcow2_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = drv.spawn("src", empty_qcow2_id, "t1.nano")
    tpl = template_record(drv, drv.db.get_instance(inst.uuid), "active")
    Templates(drv)._insert(tpl)
    tpl.path.mkdir(parents=True)
    (tpl.path / "memory.save").write_bytes(b"x" * 1000)
    drv.db.update_instance(inst.uuid, template_id=tpl.id)  # as if a clone
    base = ["--state-dir", str(drv.conf.state_path), "--json"]
    assert main([*base, "template", "list"], host=drv.host) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["id"], listed["name"], listed["clones"]) == (tpl.id, "tpl", [inst.uuid])
    assert main([*base, "template", "show", "tpl"], host=drv.host) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["files"]["memory.save"]["size"] == 1000
    assert (
        main(["--state-dir", str(drv.conf.state_path), "template", "show", "t"], host=drv.host) == 0
    )
    assert "clones        " + inst.uuid in capsys.readouterr().out


GOLDEN_AGENT = Path(__file__).parent.parent / "data" / "domain-guest-agent.xml"
GOLDEN_UUID = "7d1e4a52-9f64-4d8e-a0b4-1f1a5c3e2b10"
CLONE_UUID = "11111111-2222-3333-4444-555555555555"


def clone_of_golden(xml: str, tmp_path: Path) -> str:
    """``clone_xml`` of a golden file's domain, as clone c1 (CLONE_UUID)."""
    return clone_xml(
        xml,
        name="instance-00000042",
        uuid=CLONE_UUID,
        display_name="c1",
        created_at="",
        source_dir=f"/var/lib/minidriver/instances/{GOLDEN_UUID}",
        source_uuid=GOLDEN_UUID,
        clone_dir=tmp_path,
        template_dir=tmp_path,
        overlaid=["disk", "disk.local", "disk.swap"],
        forward_port=10999,
    )


def test_clone_xml_gives_the_guest_agent_socket_the_clones_uuid(tmp_path: Path) -> None:
    source_uuid = GOLDEN_UUID
    new = clone_of_golden(GOLDEN_AGENT.read_text(), tmp_path)
    root = etree.fromstring(new.encode())
    [channel] = root.iterfind("devices/channel")
    assert channel.xpath("string(target/@name)") == "org.qemu.guest_agent.0"
    assert channel.xpath("string(source/@path)") == (
        "/var/lib/libvirt/qemu/11111111-2222-3333-4444-555555555555.qga.sock"
    )
    assert source_uuid not in new


def smbios(xml: str) -> dict[str, str]:
    tree = etree.fromstring(xml.encode())
    return {e.get("name", ""): e.text or "" for e in tree.iterfind("sysinfo/system/entry")}


def test_libvirt_refuses_a_sysinfo_uuid_not_the_domains_and_a_clone_has_its_own(
    test_driver: libvirt.virConnect, tmp_path: Path
) -> None:
    xml = GOLDEN_AGENT.read_text()
    stale = xml.replace(f"<uuid>{GOLDEN_UUID}</uuid>", f"<uuid>{CLONE_UUID}</uuid>")
    with pytest.raises(libvirt.libvirtError):
        test_driver.defineXML(stale)
    clone = clone_of_golden(xml, tmp_path)
    assert smbios(clone)["uuid"] == CLONE_UUID
    assert smbios(clone)["serial"] == CLONE_UUID
    domain = test_driver.defineXML(clone)
    assert domain.UUIDString() == CLONE_UUID
    domain.undefine()


def test_a_clone_of_a_template_made_before_sysinfo_still_has_none(tmp_path: Path) -> None:
    tree = etree.fromstring(GOLDEN_AGENT.read_bytes())
    for element in tree.findall("sysinfo"):
        tree.remove(element)
    clone = clone_of_golden(etree.tostring(tree, encoding="unicode"), tmp_path)
    assert smbios(clone) == {}


def agent_error(code: int) -> libvirt.libvirtError:
    exc = libvirt.libvirtError("guest agent")
    exc.err = (code, 0, "guest agent", 0, "", None, None, 0, 0)
    return exc


def test_the_clock_is_set_once_the_agent_answers(drv: LibvirtDriver, empty_qcow2_id: str) -> None:
    from minidriver import guestagent

    inst = drv.spawn("src", empty_qcow2_id, "t1.nano")
    domain = drv.host.find_domain(inst.name)
    assert domain is not None
    calls: list[dict[str, int]] = []
    real = domain.setTime

    def agent_late(time: dict[str, int], flags: int) -> int:
        calls.append(time)
        if len(calls) < 3:  # the fault: an agent not connected yet after the restore
            raise agent_error(libvirt.VIR_ERR_AGENT_UNRESPONSIVE)
        return int(real(time, flags))

    domain.setTime = agent_late
    assert guestagent.sync_guest_time(domain, wait=10) is True
    assert len(calls) == 3
    # Another error (no agent configured at all) ends it at once: no error raised.
    domain.setTime = lambda time, flags: (_ for _ in ()).throw(
        agent_error(libvirt.VIR_ERR_OPERATION_UNSUPPORTED)
    )
    assert guestagent.sync_guest_time(domain, wait=10) is False


RBD_XML = Path(__file__).parent.parent / "data" / "domain-t1.nano-rbd-all-disks.xml"
RBD_SOURCE = "7d1e4a52-9f64-4d8e-a0b4-1f1a5c3e2b10"  # the golden file's instance


def rbd_clone_xml(xml: str, tmp_path: Path) -> str:
    return clone_xml(
        xml,
        name="instance-00000042",
        uuid="11111111-2222-3333-4444-555555555555",
        display_name="c1",
        created_at="2026-12-03T00:00:00Z",
        source_dir=f"/var/lib/minidriver/instances/{RBD_SOURCE}",
        source_uuid=RBD_SOURCE,
        clone_dir=tmp_path,
        template_dir=tmp_path,
        overlaid=[],
        forward_port=10999,
    )


def test_clone_xml_names_the_clones_own_rbd_disks(tmp_path: Path) -> None:
    new = rbd_clone_xml(RBD_XML.read_text(), tmp_path)
    root = etree.fromstring(new.encode())
    clone = "11111111-2222-3333-4444-555555555555"
    assert root.xpath("devices/disk/source/@name") == [
        f"rbd/{clone}_{n}" for n in ("disk", "disk.local", "disk.swap", "disk.config")
    ]
    assert root.xpath("devices/disk/source/host/@name") == ["127.0.0.1", "fd00::2"] * 4
    assert RBD_SOURCE not in new


def test_clone_xml_refuses_an_rbd_disk_not_the_source_instances(tmp_path: Path) -> None:
    stray = RBD_XML.read_text().replace(f"rbd/{RBD_SOURCE}_disk.swap", "rbd/someone_disk.swap")
    with pytest.raises(TemplateError, match=r"RBD image rbd/someone_disk\.swap"):
        rbd_clone_xml(stray, tmp_path)


def test_an_rbd_instances_disks_are_named_for_the_template() -> None:
    uuid = RBD_SOURCE
    formats = {f"rbd:vms/{uuid}_{n}": "raw" for n in ("disk", "disk.local", "disk.swap")}
    formats["/x/kernel"] = "aki"
    assert disk_names(uuid, formats) == {
        "disk": "raw",
        "disk.local": "raw",
        "disk.swap": "raw",
        "kernel": "aki",
    }
    frozen = vmtemplate_rbd.frozen_paths("T", vmtemplate_rbd.disk_names(uuid, formats))
    assert frozen == {n: f"rbd:vms/tpl-T_{n}" for n in ("disk", "disk.local", "disk.swap")}
