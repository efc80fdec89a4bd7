"""Forwarded-port reservations: distinct under threads and processes of several state
dirs, never a port someone listens on, stale ones taken over, released by owners only."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from minidriver.db import Database, InstanceRecord, utc_now
from minidriver.ports import NoFreePort, PortReservations, port_is_free


def unheld(port: int) -> bool:
    """No socket holds ``port``, not even one in TIME_WAIT (which ``port_is_free``
    allows, as QEMU does): the tests bind their ports without ``SO_REUSEADDR``."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_range(size: int) -> tuple[int, int]:
    """``size`` consecutive ports nobody uses now, high in the unprivileged range."""
    for low in range(47000, 60000, size):
        if all(unheld(p) for p in range(low, low + size)):
            return low, low + size - 1
    raise AssertionError("no free port range on this host")


class StateDir:
    """A real state dir with a database, holding instance records as spawn makes them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = Database(path / "minidriver.db")

    def add_instance(self) -> str:
        instance_uuid = str(uuid.uuid4())
        seq = self.db.next_sequence("instance")
        self.db.create_instance(
            InstanceRecord(
                uuid=instance_uuid,
                name=f"instance-{seq:08x}",
                display_name="vm",
                flavor="t1.nano",
                image_id="x",
                state="building",
                created_at=utc_now(),
                instance_dir=str(self.path / instance_uuid),
            )
        )
        return instance_uuid

    def reserve(self, ports: PortReservations) -> int:
        return ports.reserve(
            state_path=self.path, state_id=self.db.state_id, instance_uuid=self.add_instance()
        )


@pytest.fixture
def state_dirs(tmp_path: Path) -> Iterator[list[StateDir]]:
    dirs = [StateDir(tmp_path / f"state{i}") for i in range(2)]
    yield dirs
    for d in dirs:
        d.db.close()


def test_threads_of_two_state_dirs_get_distinct_ports(
    tmp_path: Path, state_dirs: list[StateDir]
) -> None:
    low, high = free_range(24)
    ports = PortReservations(tmp_path / "reservations", low, high)
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda i: state_dirs[i % 2].reserve(ports), range(16)))
    assert len(set(got)) == 16
    assert {r.port for r in ports.list()} == set(got)
    assert all(low <= p <= high for p in got)


RESERVE = """
import json, sys, uuid
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from minidriver.db import Database, InstanceRecord, utc_now
from minidriver.ports import PortReservations

reservations, state, low, high = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
db = Database(state / "minidriver.db")
ports = PortReservations(Path(reservations), low, high)

def one(i):
    u = str(uuid.uuid4())
    db.create_instance(InstanceRecord(u, f"vm-{u}", "vm", "t1.nano", "x", "building",
                                      utc_now(), str(state / u)))
    return ports.reserve(state_path=state, state_id=db.state_id, instance_uuid=u)

with ThreadPoolExecutor(4) as pool:
    print(json.dumps(list(pool.map(one, range(4)))))
"""


def test_processes_of_four_state_dirs_get_distinct_ports(tmp_path: Path) -> None:
    low, high = free_range(24)
    reservations = tmp_path / "reservations"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RESERVE, reservations, tmp_path / f"s{i}", str(low), str(high)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    got = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        got += json.loads(out)
    assert len(got) == 16 and len(set(got)) == 16
    owners = {r.port: r.state_path for r in PortReservations(reservations, low, high).list()}
    assert set(owners) == set(got)
    assert len(set(owners.values())) == 4


def test_a_port_someone_listens_on_is_skipped(tmp_path: Path, state_dirs: list[StateDir]) -> None:
    low, high = free_range(3)
    ports = PortReservations(tmp_path / "reservations", low, high)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", low))
        listener.listen()
        assert state_dirs[0].reserve(ports) == low + 1


def test_reserved_ports_are_skipped_and_exhaustion_is_one_clear_error(
    tmp_path: Path, state_dirs: list[StateDir]
) -> None:
    low, high = free_range(2)
    ports = PortReservations(tmp_path / "reservations", low, high)
    assert [state_dirs[0].reserve(ports), state_dirs[1].reserve(ports)] == [low, high]
    with pytest.raises(NoFreePort, match=f"no free port to forward in {low}..{high}") as caught:
        state_dirs[0].reserve(ports)
    assert "forward_port_max" in (caught.value.hint or "")


def test_release_only_by_the_owner_then_the_port_is_free_again(
    tmp_path: Path, state_dirs: list[StateDir]
) -> None:
    low, high = free_range(1)
    ports = PortReservations(tmp_path / "reservations", low, high)
    port = state_dirs[0].reserve(ports)
    reservation = ports.get(port)
    assert reservation is not None
    assert not ports.release(port, str(uuid.uuid4()))
    assert ports.get(port) == reservation
    assert ports.release(port, reservation.instance_uuid)
    assert ports.list() == []
    assert state_dirs[1].reserve(ports) == port


def test_a_reservation_whose_instance_or_state_dir_is_gone_is_taken_over(
    tmp_path: Path, state_dirs: list[StateDir]
) -> None:
    low, high = free_range(1)
    ports = PortReservations(tmp_path / "reservations", low, high)
    first = state_dirs[0].reserve(ports)
    held = ports.get(first)
    assert held is not None and not held.is_stale()
    state_dirs[0].db.delete_instance(held.instance_uuid)  # a crash between the two
    assert held.is_stale()
    assert state_dirs[1].reserve(ports) == first
    taken = ports.get(first)
    assert taken is not None and taken.state_path == str(state_dirs[1].path)
    # A state dir removed as a whole (a test's temp dir): its reservations go too.
    state_dirs[1].db.close()
    (state_dirs[1].path / "minidriver.db").unlink()
    assert state_dirs[0].reserve(ports) == first


def test_first_free_reserves_nothing(tmp_path: Path) -> None:
    low, high = free_range(2)
    ports = PortReservations(tmp_path / "reservations", low, high)
    assert ports.first_free() == low
    assert ports.first_free() == low
    assert ports.list() == []


def test_a_port_left_in_time_wait_is_free_and_a_listened_one_is_not() -> None:
    """As QEMU's user-mode network binds a forwarded port (SO_REUSEADDR): after a
    connection the listener closed first, the port waits out TIME_WAIT, and QEMU could
    still listen there, so the port is free; one somebody listens on is not."""
    low, _high = free_range(1)
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", low))
        listener.listen(1)
        assert not port_is_free(low)
        with socket.create_connection(("127.0.0.1", low), timeout=5) as client:
            accepted, _addr = listener.accept()
            accepted.close()  # the listener's side ends first: its socket keeps the port
            assert client.recv(1) == b""
    # /proc/net/tcp: "sl local_address rem_address st ...", the port in hex, 06 TIME_WAIT.
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    waiting = [f for f in map(str.split, lines) if f[1].endswith(f":{low:04X}") and f[3] == "06"]
    assert waiting, "the ended connection should wait out TIME_WAIT on the port"
    assert port_is_free(low)
