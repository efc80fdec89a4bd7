"""Nova's vm_state and suspend/resume (libvirt's managed save), on libvirt's test
driver with real files and a real state database; the command line through ``main``
with the test's own connection injected (the test driver keeps state per connection).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import libvirt
import pytest

from minidriver.cli import main
from minidriver.config import Config
from minidriver.db import Database
from minidriver.driver import LibvirtDriver
from minidriver.exception import MinidriverError
from minidriver.objects import Instance


def domain(drv: LibvirtDriver, name: str) -> libvirt.virDomain:
    return drv.host.get_connection().lookupByName(name)


def suspended(drv: LibvirtDriver, image_id: str) -> tuple[Instance, libvirt.virDomain]:
    """A new instance "vm", suspended; and its domain."""
    inst = drv.spawn("vm", image_id, "t1.nano")
    drv.suspend(inst.uuid)
    return inst, domain(drv, inst.name)


def states(drv: LibvirtDriver, uuid: str) -> tuple[str, str]:
    [listed] = [r for r in drv.list_instances() if r.uuid == uuid]
    return listed.state, listed.vm_state


def test_a_spawn_is_active_and_stop_start_follow(drv: LibvirtDriver, empty_qcow2_id: str) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    assert states(drv, inst.uuid) == ("running", "active")
    drv.power_off(inst.uuid, force=True)
    assert states(drv, inst.uuid) == ("shutoff", "stopped")
    drv.power_on(inst.uuid)
    assert states(drv, inst.uuid) == ("running", "active")


def test_a_guest_that_shut_itself_down_shows_stopped(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    domain(drv, inst.name).destroy()  # not through minidriver
    assert states(drv, inst.uuid) == ("shutoff", "stopped")
    # The record follows (issue 21): by the lifecycle event, or a command's sync.
    drv.sync_power_states()
    assert drv.db.get_instance(inst.uuid).vm_state == "stopped"


def test_suspend_saves_the_memory_and_resume_restores_it(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst, dom = suspended(drv, empty_qcow2_id)
    assert dom.hasManagedSaveImage(0) == 1
    assert states(drv, inst.uuid) == ("shutoff", "suspended")
    drv.resume(inst.uuid)
    assert dom.hasManagedSaveImage(0) == 0  # consumed by the restore
    assert states(drv, inst.uuid) == ("running", "active")


def test_a_suspended_instance_keeps_its_forwarded_port_reserved(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    """As a stopped one does: no other boot can take the port while it is suspended."""
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano", network="user")
    port = drv.db.get_instance(inst.uuid).forward_port
    assert port is not None
    drv.suspend(inst.uuid)
    reservation = drv.ports.get(port)
    assert reservation is not None and reservation.instance_uuid == inst.uuid
    other = drv.spawn("other", empty_qcow2_id, "t1.nano", network="user")
    assert drv.db.get_instance(other.uuid).forward_port != port
    drv.resume(inst.uuid)
    assert drv.db.get_instance(inst.uuid).forward_port == port


def test_start_of_a_suspended_instance_resumes_it(drv: LibvirtDriver, empty_qcow2_id: str) -> None:
    inst, dom = suspended(drv, empty_qcow2_id)
    # libvirt's start of a domain with a managed save image restores that image
    # and removes it; a fresh boot (START_FORCE_BOOT) would discard it instead.
    drv.power_on(inst.uuid)
    assert dom.hasManagedSaveImage(0) == 0
    assert states(drv, inst.uuid) == ("running", "active")


def test_stop_of_a_suspended_instance_is_refused_and_keeps_its_memory(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst, dom = suspended(drv, empty_qcow2_id)
    with pytest.raises(MinidriverError, match="suspended"):
        drv.power_off(inst.uuid)
    assert dom.hasManagedSaveImage(0) == 1
    assert states(drv, inst.uuid) == ("shutoff", "suspended")


def test_wrong_states_are_refused(drv: LibvirtDriver, empty_qcow2_id: str) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    with pytest.raises(MinidriverError, match="not suspended"):
        drv.resume(inst.uuid)
    drv.power_off(inst.uuid, force=True)
    with pytest.raises(MinidriverError, match="not running"):
        drv.suspend(inst.uuid)
    with pytest.raises(MinidriverError, match="not suspended"):
        drv.resume(inst.uuid)
    assert states(drv, inst.uuid) == ("shutoff", "stopped")


def test_a_suspended_instance_refuses_a_soft_reboot_and_boots_afresh_on_a_hard_one(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst, dom = suspended(drv, empty_qcow2_id)
    with pytest.raises(MinidriverError, match="suspended: no guest runs to reboot") as refused:
        drv.reboot(inst.uuid)
    assert "reboot --hard vm" in (refused.value.hint or "")
    assert dom.hasManagedSaveImage(0) == 1
    assert states(drv, inst.uuid) == ("shutoff", "suspended")
    drv.reboot(inst.uuid, hard=True)  # its memory discarded (the test guest shows the boot)
    assert dom.hasManagedSaveImage(0) == 0
    assert states(drv, inst.uuid) == ("running", "active")


def test_delete_of_a_suspended_instance_removes_its_saved_state(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    drv.suspend(inst.uuid)
    drv.destroy(inst.uuid)
    assert drv.host.find_domain(inst.name) is None
    assert drv.db.list_instances() == []
    assert not (drv.conf.instances_path / inst.uuid).exists()


def test_schema_4_gives_old_instances_the_vm_state_of_their_power_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from minidriver import db as db_module

    path = tmp_path / "minidriver.db"
    monkeypatch.setattr(db_module, "MIGRATIONS", db_module.MIGRATIONS[:3])
    with Database(path) as database, database.transaction() as conn:
        for uuid, state in (("u1", "running"), ("u2", "shutoff"), ("u3", "building")):
            conn.execute(
                "INSERT INTO instances (uuid, name, display_name, flavor, image_id, state,"
                " created_at, instance_dir) VALUES (?, ?, ?, 't1.nano', 'i', ?, '', '/x')",
                (uuid, f"instance-{uuid}", uuid, state),
            )
    monkeypatch.undo()
    with Database(path) as database:
        assert {r.uuid: r.vm_state for r in database.list_instances()} == {
            "u1": "active",
            "u2": "stopped",
            "u3": "building",
        }
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(db_module.MIGRATIONS)


# -- the command line --------------------------------------------------------------


def run(drv: LibvirtDriver, conf: Config, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    try:
        code = main(["--state-dir", str(conf.state_path), "--json", *argv], host=drv.host)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_suspend_and_resume_commands(
    drv: LibvirtDriver, conf: Config, empty_qcow2_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = drv.spawn("web", empty_qcow2_id, "t1.nano")
    code, shown = run(drv, conf, capsys, "show", "web")
    assert (code, shown["state"], shown["vm_state"]) == (0, "running", "active")
    code, done = run(drv, conf, capsys, "suspend", "web")
    assert (code, done) == (0, {"uuid": inst.uuid, "state": "shutoff", "vm_state": "suspended"})
    code, listed = run(drv, conf, capsys, "list")
    assert [(i["state"], i["vm_state"]) for i in listed] == [("shutoff", "suspended")]
    code, failed = run(drv, conf, capsys, "stop", "web")
    assert code == 1 and "suspended" in failed["error"]
    code, failed = run(drv, conf, capsys, "reboot", "web")
    assert code == 1 and "suspended" in failed["error"] and "--hard" in failed["hint"]
    code, done = run(drv, conf, capsys, "resume", "web")
    assert (code, done["state"], done["vm_state"]) == (0, "running", "active")
    code, failed = run(drv, conf, capsys, "resume", "web")
    assert code == 1 and "not suspended" in failed["error"]
