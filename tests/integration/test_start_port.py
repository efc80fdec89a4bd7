"""`start` of a stopped user-mode instance, and `start` or `resume` of a suspended one,
whose forwarded port went away meanwhile: a reboot emptied the reservations under
/run, another state dir's instance reserved the port, or a program listens on it.
Under real QEMU; traffic to 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TRAVERSABLE_TMP

from minidriver.db import Database, InstanceRecord, utc_now
from minidriver.driver import LibvirtDriver
from minidriver.ports import PortReservations, port_is_free

pytestmark = pytest.mark.integration


def qemu_listens(port: int) -> bool:
    if port_is_free(port):
        return False
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        return True


@pytest.fixture
def stopped(driver: LibvirtDriver, test_image_id: str) -> Iterator[tuple[str, int]]:
    """A user-mode instance, stopped: its uuid and its forwarded port."""
    inst = driver.spawn(f"port-{uuid.uuid4().hex[:6]}", test_image_id, "t1.nano")
    port = driver.db.get_instance(inst.uuid).forward_port
    assert port is not None and qemu_listens(port)
    driver.power_off(inst.uuid, force=True)
    yield inst.uuid, port
    driver.destroy(inst.uuid)


@pytest.fixture
def suspended(
    driver: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> Iterator[tuple[str, int]]:
    """A user-mode instance, booted to its ready line, then suspended: its uuid and port."""
    inst = driver.spawn(f"port-{uuid.uuid4().hex[:6]}", test_image_id, "t1.nano")
    port = driver.db.get_instance(inst.uuid).forward_port
    assert port is not None
    wait_console(Path(inst.instance_dir) / "console.log", r"^minidriver-guest: ready")
    driver.suspend(inst.uuid)
    yield inst.uuid, port
    driver.destroy(inst.uuid)


@pytest.fixture
def other_instance() -> Iterator[tuple[Path, str, str]]:
    """Another state dir with an instance of its own: its path, state id and uuid."""
    path = Path(tempfile.mkdtemp(prefix="mdport-", dir=TRAVERSABLE_TMP))
    instance_uuid = str(uuid.uuid4())
    with Database(path / "minidriver.db") as db:
        db.create_instance(
            InstanceRecord(instance_uuid, "instance-00000001", "other", "t1.nano", "i",
                           "running", utc_now(), str(path / instance_uuid))
        )  # fmt: skip
        state_id = db.state_id
    yield path, state_id, instance_uuid
    shutil.rmtree(path, ignore_errors=True)


def test_start_reserves_the_port_again_after_a_reboot(
    driver: LibvirtDriver, stopped: tuple[str, int]
) -> None:
    instance_uuid, port = stopped
    assert driver.ports.release(port, instance_uuid)  # what a reboot does to /run

    driver.power_on(instance_uuid)

    # The same port, unless another boot on this host took it meanwhile (ports are
    # host-wide): whichever it is, it is reserved for the instance, and QEMU has it.
    now = driver.db.get_instance(instance_uuid).forward_port
    assert now is not None
    reservation = driver.ports.get(now)
    assert reservation is not None and reservation.instance_uuid == instance_uuid
    assert qemu_listens(now)


@pytest.mark.parametrize("taken_by", ["another reservation", "a listener"])
def test_start_moves_to_another_port_when_its_port_is_taken(
    driver: LibvirtDriver,
    stopped: tuple[str, int],
    other_instance: tuple[Path, str, str],
    taken_by: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    instance_uuid, old = stopped
    with port_taken(driver, instance_uuid, old, taken_by, other_instance):
        with caplog.at_level(logging.WARNING):
            driver.power_on(instance_uuid)
        assert_moved(driver, instance_uuid, old, caplog)


@pytest.mark.parametrize(
    ("command", "taken_by"), [("resume", "a listener"), ("start", "another reservation")]
)
def test_a_suspended_instance_goes_on_from_its_memory_on_another_port(
    driver: LibvirtDriver,
    suspended: tuple[str, int],
    other_instance: tuple[Path, str, str],
    command: str,
    taken_by: str,
    caplog: pytest.LogCaptureFixture,
    wait_console: Callable[..., Any],
) -> None:
    """The managed save image carries the old port in its XML, and a start restores
    that XML, not the definition: the port must change in both."""
    instance_uuid, old = suspended
    with port_taken(driver, instance_uuid, old, taken_by, other_instance):
        with caplog.at_level(logging.WARNING):
            if command == "resume":
                driver.resume(instance_uuid)
            else:
                driver.power_on(instance_uuid)
        assert_moved(driver, instance_uuid, old, caplog)
    record = driver.db.get_instance(instance_uuid)
    assert (driver.get_info(instance_uuid).state, record.vm_state) == ("running", "active")
    # Restored, not booted: one boot's lines, and the guest answers its power button.
    log = Path(record.instance_dir) / "console.log"
    domain = driver.host.find_domain(record.name)
    assert domain is not None
    domain.shutdown()
    wait_console(log, r"^minidriver-guest: power-button")
    assert log.read_text(errors="replace").count("minidriver-guest: up") == 1


@contextlib.contextmanager
def port_taken(
    driver: LibvirtDriver,
    instance_uuid: str,
    port: int,
    taken_by: str,
    other_instance: tuple[Path, str, str],
) -> Iterator[None]:
    """``port`` taken from the instance while it does not run, given back after."""
    listener = None
    if taken_by == "a listener":  # our reservation stays; someone else binds the port
        listener = socket.socket()
        # As servers bind (QEMU's user network too): the port may still be in
        # TIME_WAIT from a connection to the instance's QEMU, or to the QEMU of a test
        # before, which had the port before it.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
    else:  # a reboot emptied /run, then another state dir's boot took the port
        driver.ports.release(port, instance_uuid)
        path, state_id, other_uuid = other_instance
        theirs = PortReservations(driver.conf.port_reservations_path, port, port)
        assert theirs.reserve(state_path=path, state_id=state_id, instance_uuid=other_uuid) == port
    try:
        yield
    finally:
        if listener is not None:
            listener.close()
        else:
            driver.ports.release(port, other_instance[2])


def assert_moved(
    driver: LibvirtDriver, instance_uuid: str, old: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The instance runs forwarding another port than ``old``, recorded everywhere."""
    new = driver.db.get_instance(instance_uuid).forward_port
    assert new is not None and new != old
    assert f"port {old} is taken" in caplog.text and f"127.0.0.1:{new}" in caplog.text
    reservation = driver.ports.get(new)
    assert reservation is not None and reservation.instance_uuid == instance_uuid
    assert qemu_listens(new)
    domain_xml = driver.host.find_domain(driver.db.get_instance(instance_uuid).name)
    assert domain_xml is not None and f"127.0.0.1:{new}-:22" in domain_xml.XMLDesc(0)
    libvirt_xml = Path(driver.db.get_instance(instance_uuid).instance_dir) / "libvirt.xml"
    assert f"127.0.0.1:{new}-:22" in libvirt_xml.read_text()
    # The old port is no longer this instance's.
    kept = driver.ports.get(old)
    assert kept is None or kept.instance_uuid != instance_uuid
