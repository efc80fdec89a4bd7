"""Hard reboot and start as Nova's ``_hard_reboot`` (missing disks and bases made
again), the soft reboot's fallback, and the records' power state kept in step with
libvirt, on libvirt's test driver with real files, real qemu-img and a real state DB.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest
from pytest_mock import MockerFixture

from minidriver import power_sync
from minidriver.cli import main
from minidriver.config import Config
from minidriver.driver import LibvirtDriver, base_filename
from minidriver.exception import MinidriverError
from minidriver.images import qemu_img
from minidriver.power import power_task


def remove_swap_and_root_base(drv: LibvirtDriver, uuid: str, image_id: str) -> tuple[Path, Path]:
    swap = drv.instance_dir(uuid) / "disk.swap"
    base = drv.conf.base_dir / base_filename(image_id)
    swap.unlink()
    base.unlink()
    return swap, base


def test_a_hard_reboot_makes_the_missing_swap_and_root_base_again(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    swap, base = remove_swap_and_root_base(drv, inst.uuid, empty_qcow2_id)

    assert drv.reboot(inst.uuid, hard=True) == "hard"

    assert base.is_file()
    info = qemu_img.info(swap, "qcow2")
    assert info.virtual_size == 64 * 2**20
    assert info.backing_file is not None and Path(info.backing_file).name == "swap_64"
    assert drv.get_info(inst.uuid).state == "running"
    assert drv.db.get_instance(inst.uuid).vm_state == "active"


def test_a_start_after_a_stop_makes_them_again_too(drv: LibvirtDriver, empty_qcow2_id: str) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    drv.power_off(inst.uuid, force=True)
    swap, base = remove_swap_and_root_base(drv, inst.uuid, empty_qcow2_id)

    drv.power_on(inst.uuid)

    assert base.is_file() and swap.is_file()
    assert (drv.get_info(inst.uuid).state, drv.db.get_instance(inst.uuid).vm_state) == (
        "running",
        "active",
    )


def test_a_root_whose_image_is_gone_too_is_refused_clearly(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    drv.power_off(inst.uuid, force=True)
    remove_swap_and_root_base(drv, inst.uuid, empty_qcow2_id)
    drv.images.delete(empty_qcow2_id)

    with pytest.raises(MinidriverError, match=r"its root .* is gone and so is its image"):
        drv.power_on(inst.uuid)
    assert drv.get_info(inst.uuid).state == "shutoff"


def test_a_soft_reboot_the_guest_ignores_falls_back_to_a_hard_one(
    conf: Config, make_driver: Any, empty_qcow2: Path, mocker: MockerFixture
) -> None:
    drv = make_driver(conf.with_libvirt(wait_soft_reboot_seconds=1))
    image_id = drv.images.add(empty_qcow2, name="cirros", disk_format="qcow2").id
    inst = drv.spawn("vm", image_id, "t1.nano")
    # The fault: a guest that ignores its ACPI power button (the test driver's guest
    # would stop at once).
    mocker.patch.object(libvirt.virDomain, "shutdown", autospec=True)
    started = time.monotonic()

    assert drv.reboot(inst.uuid) == "hard"

    assert time.monotonic() - started >= 1
    assert drv.get_info(inst.uuid).state == "running"


def test_a_soft_reboot_the_guest_answers_stays_soft(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    assert drv.reboot(inst.uuid) == "soft"
    assert drv.get_info(inst.uuid).state == "running"


# -- power state ---------------------------------------------------------------------


def run(drv: LibvirtDriver, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    code = main(["--state-dir", str(drv.conf.state_path), "--json", *argv], host=drv.host)
    assert code == 0
    return json.loads(capsys.readouterr().out)


def stop_behind_minidrivers_back(drv: LibvirtDriver, name: str) -> None:
    """The guest stops by itself: the domain is stopped through libvirt alone (the
    test driver keeps its domains per connection, so on the driver's connection)."""
    drv.host.get_connection().lookupByName(name).destroy()


def test_a_command_records_a_guest_that_stopped_by_itself(
    drv: LibvirtDriver, empty_qcow2_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    other = drv.spawn("other", empty_qcow2_id, "t1.nano")
    with power_task(inst.uuid):  # the event handler looks away: the command syncs
        stop_behind_minidrivers_back(drv, inst.name)
        shown = run(drv, capsys, "show", "vm")

        assert (shown["state"], shown["vm_state"]) == ("shutoff", "stopped")
        record = drv.db.get_instance(inst.uuid)
        assert (record.state, record.vm_state) == ("shutoff", "stopped")
    untouched = drv.db.get_instance(other.uuid)
    assert (untouched.state, untouched.vm_state) == ("running", "active")


def test_sync_power_states_lists_what_it_changed(drv: LibvirtDriver, empty_qcow2_id: str) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    drv.spawn("other", empty_qcow2_id, "t1.nano")
    with power_task(inst.uuid):
        stop_behind_minidrivers_back(drv, inst.name)
        assert drv.sync_power_states() == [inst.uuid]
        assert drv.sync_power_states() == []


def test_a_lifecycle_event_records_the_stop_while_the_process_lives(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    stop_behind_minidrivers_back(drv, inst.name)

    deadline = time.monotonic() + 30
    while drv.db.get_instance(inst.uuid).vm_state != "stopped":
        assert time.monotonic() < deadline, "no lifecycle event recorded the stop"
        time.sleep(0.05)
    assert drv.db.get_instance(inst.uuid).state == "shutoff"


class EventSeen:
    """A lifecycle listener registered last: when it is called for a domain, the
    listeners registered before it have been."""

    def __init__(self, domain_uuid: str) -> None:
        self.domain_uuid = domain_uuid
        self.seen = threading.Event()

    def __call__(self, domain_uuid: str, _event: int, _detail: int) -> None:
        if domain_uuid == self.domain_uuid:
            self.seen.set()


def test_a_driver_whose_database_is_closed_ignores_the_events_of_a_shared_host(
    drv: LibvirtDriver, empty_qcow2_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A driver made on a host another driver goes on using (as the tests make them)
    and its database closed: until it is collected, its listener still hears the
    host's events, and must not log each one as an error."""
    done_with = LibvirtDriver(drv.conf, host=drv.host)
    done_with.db.close()
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    last = EventSeen(inst.uuid)
    drv.host.add_lifecycle_listener(last.__call__)
    stop_behind_minidrivers_back(drv, inst.name)
    assert last.seen.wait(30), "no lifecycle event of the stop"
    assert done_with.db.closed  # alive, and so listening, until here
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert drv.db.get_instance(inst.uuid).vm_state == "stopped"


def test_a_building_instance_is_left_to_its_spawn(drv: LibvirtDriver, empty_qcow2_id: str) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    drv.db.update_instance(inst.uuid, vm_state="building", state="building")
    with power_task(inst.uuid):
        stop_behind_minidrivers_back(drv, inst.name)
        assert drv.sync_power_states() == []
    assert drv.db.get_instance(inst.uuid).vm_state == "building"


def test_an_event_of_a_domain_undefined_meanwhile_is_dropped_quietly(
    drv: LibvirtDriver, empty_qcow2_id: str, mocker: MockerFixture
) -> None:
    """A delete stops the domain, then undefines it: the stop's event can be handled
    once the domain is gone, its lookup done just before. Nothing to record, and no
    traceback on the command's stderr."""
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    stale = drv.host.get_domain(inst.uuid)
    assert stale is not None
    stale.destroy()
    # The stop's own event, recorded by the driver's listener while the domain is
    # still defined: waited for, so that it cannot come between the lines below.
    deadline = time.monotonic() + 10
    while drv.db.get_instance(inst.uuid).vm_state != "stopped":
        assert time.monotonic() < deadline, "the stop's event was never recorded"
        time.sleep(0.01)
    stale.undefine()
    mocker.patch.object(drv.host, "get_domain", return_value=stale)  # the lookup's race
    before = drv.db.get_instance(inst.uuid)

    assert not power_sync.handle_lifecycle_event(
        drv.db,
        drv.host,
        drv.conf.default.host,
        inst.uuid,
        libvirt.VIR_DOMAIN_EVENT_STOPPED,
    )
    assert drv.db.get_instance(inst.uuid) == before
