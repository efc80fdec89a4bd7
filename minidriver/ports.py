"""Host ports forwarded to guests in user mode: chosen race-free, host-wide.

A forwarded port is a host resource, so its record lives outside any state dir: one
file per port in ``port_reservations_path`` (``<port>``, JSON: the state dir, its id
and the instance), created while a host-wide lock is held. A port is free when no
file reserves it *and* binding 127.0.0.1:<port> succeeds (another program may hold it).
The file stays while the instance exists, running or stopped, so no other boot of any
state dir takes the port meanwhile; ``destroy`` removes it. A reservation whose state
dir no longer has its instance (a crash, a removed state dir) is stale and is taken over.
The default directory is under ``/run``, which a reboot empties: ``start`` of a stopped
or suspended instance reserves its port again, or another one when its port was taken
meanwhile (by another reservation, or a program listening on it).

Holding the lock only while choosing is enough between minidriver processes: the file,
not the lock, keeps the port until QEMU binds it (and after). What no lock can stop is
an unrelated program binding the port between our check and QEMU's start; QEMU then
fails to start and the spawn is undone with that error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from minidriver import lockutils
from minidriver.exception import MinidriverError
from minidriver.trustedpath import trusted_dir

LOCK_NAME = "ports.lock"
LOOPBACK = "127.0.0.1"


class NoFreePort(MinidriverError):
    """Every port of the forward range is reserved or in use."""


@dataclass(frozen=True)
class Reservation:
    port: int
    state_path: str
    state_id: str
    instance_uuid: str

    def is_stale(self) -> bool:
        """Its instance is gone (or its whole state dir): nothing will use or release
        the port any more. A spawn records its instance before it reserves, and
        destroy releases before it forgets the record, so a live reservation always
        has its record. A database that cannot be read counts as live."""
        database = os.path.join(self.state_path, "minidriver.db")
        if not self.state_path or not os.path.exists(database):
            return True
        try:
            conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
            try:
                row = conn.execute(
                    "SELECT 1 FROM instances WHERE uuid = ?", (self.instance_uuid,)
                ).fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            return False
        return row is None


def port_is_free(port: int) -> bool:
    """Whether QEMU could listen on 127.0.0.1:``port`` now: nobody listens there or
    holds it bound.

    Bound as QEMU's user-mode network (libslirp's ``tcp_listen``) binds a forwarded
    port, with ``SO_REUSEADDR``: a connection to the port that ended lately and waits
    out its TIME_WAIT (about a minute) does not hold it, for QEMU or for us.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


class PortReservations:
    """The host-wide reservations of forwarded ports in ``low..high``."""

    def __init__(self, path: Path, low: int, high: int) -> None:
        self.path = path
        self.low = low
        self.high = high

    def _file(self, port: int) -> Path:
        return self.path / str(port)

    def _make_dir(self) -> None:
        # A directory made first by someone else (the /tmp fallback's name can be
        # guessed), or a symlink to one, would let them add or drop our reservations.
        trusted_dir(
            self.path,
            mode=0o755,
            hint="remove it if you did not make it, or set [libvirt] port_reservations_path"
            " (or XDG_RUNTIME_DIR) to a directory of yours",
        )

    def get(self, port: int) -> Reservation | None:
        try:
            data = json.loads(self._file(port).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # Half-written by a crash (we write then rename, so only by hand): stale.
            return Reservation(port, state_path="", state_id="", instance_uuid="")
        return Reservation(port=port, **{k: str(data.get(k, "")) for k in _FIELDS})

    def list(self) -> list[Reservation]:
        if not os.path.lexists(self.path):
            return []
        self._make_dir()  # checks it: makes nothing, as it exists
        found = []
        for entry in sorted(self.path.iterdir(), key=lambda p: p.name):
            if entry.name.isdigit():
                reservation = self.get(int(entry.name))
                if reservation is not None:
                    found.append(reservation)
        return found

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._make_dir()
        with lockutils.external_lock(self.path, LOCK_NAME):
            yield

    def _choose(self) -> int:
        for port in range(self.low, self.high + 1):
            current = self.get(port)
            if current is not None and not current.is_stale():
                continue
            if port_is_free(port):
                return port
        raise NoFreePort(
            f"no free port to forward in {self.low}..{self.high}: every one is reserved"
            " by an instance or in use on 127.0.0.1",
            hint="delete instances you no longer need, or widen [libvirt]"
            " forward_port_min..forward_port_max",
        )

    def first_free(self) -> int:
        """The port a reservation would take now (``explain``); reserves nothing."""
        with self._locked():
            return self._choose()

    def reserve(
        self, *, state_path: Path, state_id: str, instance_uuid: str, prefer: int | None = None
    ) -> int:
        """Choose a free port, record it for the instance and return it.

        ``prefer``: that port if it can be had (in the range, free on 127.0.0.1, and
        reserved by no one else, or by this very instance), as ``start`` asks for the
        port a stopped instance had; else any free one."""
        with self._locked():
            if prefer is not None and self._available(prefer, state_id, instance_uuid):
                port = prefer
            else:
                port = self._choose()
            self._write(Reservation(port, os.fspath(state_path), state_id, instance_uuid))
            return port

    def _available(self, port: int, state_id: str, instance_uuid: str) -> bool:
        if not self.low <= port <= self.high:
            return False
        current = self.get(port)
        if current is not None:
            mine = (current.state_id, current.instance_uuid) == (state_id, instance_uuid)
            if not mine and not current.is_stale():
                return False
        return port_is_free(port)

    def _write(self, reservation: Reservation) -> None:
        target = self._file(reservation.port)
        part = target.with_name(f".{target.name}.{os.getpid()}.part")
        fields = asdict(reservation)
        del fields["port"]
        part.write_text(json.dumps(fields))
        os.replace(part, target)

    def release(self, port: int, instance_uuid: str) -> bool:
        """Drop ``port``'s reservation if ``instance_uuid`` holds it; True if dropped."""
        with self._locked():
            current = self.get(port)
            if current is None or current.instance_uuid != instance_uuid:
                return False
            self._file(port).unlink(missing_ok=True)
            return True


_FIELDS = ("state_path", "state_id", "instance_uuid")
