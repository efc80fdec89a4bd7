"""The state database, one SQLite file ``$state_path/minidriver.db`` (Nova's nova/db/).

It holds the instances, the local image service's images, the templates, the volumes
and the counter behind the domain names. Several threads and several processes (two
CLI commands at once, a cache manager pass) use it together, so:

- WAL mode, so that readers never wait for a writer;
- every write in a ``BEGIN IMMEDIATE`` transaction: the write lock is taken up front,
  so two read-modify-write transactions cannot deadlock on a lock upgrade;
- a 30 s busy timeout: a process waits for another's transaction instead of failing;
- within a process, a connection per operation, borrowed from a small pool: a
  transaction or a query holds one for its duration only, so no thread keeps one (a
  thread pool made per round, a library user's threads), and the pool keeps at most
  ``IDLE_CONNECTIONS`` open between operations. A new connection for every operation
  would make SQLite checkpoint the WAL (copy and fsync) whenever the last one closes,
  hence the pool.

The schema is versioned with ``PRAGMA user_version``: ``MIGRATIONS[n]`` takes the
schema from version ``n`` to ``n + 1``. A new release appends to the list; a released
migration is never edited.
"""

from __future__ import annotations

import dataclasses
import socket
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from minidriver import lockutils
from minidriver.exception import AmbiguousReference, InstanceNotFound, MinidriverError

BUSY_TIMEOUT = 30.0  # seconds
IDLE_CONNECTIONS = 1  # kept open between operations; more are opened under concurrency


class StateDatabaseError(MinidriverError):
    """The state database cannot be opened, read or written."""


T = TypeVar("T")


def resolve(
    ref: str,
    found: list[T],
    *,
    ident: Callable[[T], str],
    names: Callable[[T], tuple[str, ...]],
    describe: Callable[[T], str],
    what: str,
    not_found: MinidriverError,
) -> T:
    """The one thing ``ref`` names among ``found`` (the rows matching it somehow).

    An exact id wins, then an exact name, and only then an id prefix: ``delete b`` must
    not delete an instance whose uuid happens to start with b when one is named b.
    """
    for matches in (
        [x for x in found if ident(x) == ref],
        [x for x in found if ref in names(x)],
        [x for x in found if ident(x).startswith(ref.lower())],
    ):
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise AmbiguousReference(
                f"{ref!r} matches {len(matches)} {what}s: "
                + ", ".join(describe(x) for x in matches),
                hint=f"name the {what} by its {'uuid' if what == 'instance' else 'id'}",
            )
    raise not_found


def utc_now() -> str:
    """Now as ISO 8601 UTC, to the second, as Glance and Nova print timestamps."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _schema_1(conn: sqlite3.Connection) -> None:
    """The first release's schema."""
    statements = (
        """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE sequences (
            name TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        )
        """,
        # Glance's image fields; properties and locations are JSON, as Glance keeps
        # them in side tables we do not need.
        """
        CREATE TABLE images (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            disk_format TEXT NOT NULL,
            container_format TEXT NOT NULL,
            size INTEGER,
            virtual_size INTEGER,
            min_disk INTEGER NOT NULL DEFAULT 0,
            min_ram INTEGER NOT NULL DEFAULT 0,
            checksum TEXT,
            os_hash_algo TEXT,
            os_hash_value TEXT,
            status TEXT NOT NULL CHECK (status IN ('queued', 'saving', 'active')),
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            properties TEXT NOT NULL DEFAULT '{}',
            locations TEXT NOT NULL DEFAULT '[]'
        )
        """,
        "CREATE INDEX images_name ON images (name)",
        # No foreign key to images: as in Nova, an image may be deleted while
        # instances booted from it live on (their base file is in the cache).
        """
        CREATE TABLE instances (
            uuid TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            display_name TEXT NOT NULL,
            flavor TEXT NOT NULL,
            image_id TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at TEXT NOT NULL,
            instance_dir TEXT NOT NULL
        )
        """,
        "CREATE INDEX instances_display_name ON instances (display_name)",
    )
    for statement in statements:
        conn.execute(statement)
    # The state dir's own id: tells two state dirs apart (and a copied one from its
    # origin, once the copy is re-keyed).
    conn.execute("INSERT INTO meta (key, value) VALUES ('state_id', ?)", (str(uuid.uuid4()),))


def _schema_2(conn: sqlite3.Connection) -> None:
    """Nova's ``kernel_id``/``ramdisk_id`` of an instance booted from a kernel image
    (AKI/ARI): the cache manager counts their bases as in use. '' when none."""
    conn.execute("ALTER TABLE instances ADD COLUMN kernel_id TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE instances ADD COLUMN ramdisk_id TEXT NOT NULL DEFAULT ''")


def _schema_3(conn: sqlite3.Connection) -> None:
    """Networking (issue 11): each instance's NIC, its forwarded port, its key pair.

    Instances made before had no NIC: their mode is ``none``."""
    for column in (
        "network_mode TEXT NOT NULL DEFAULT 'none'",
        "network_source TEXT NOT NULL DEFAULT ''",
        "mac_address TEXT",
        "forward_port INTEGER",
        "key_name TEXT",
    ):
        conn.execute(f"ALTER TABLE instances ADD COLUMN {column}")


def _schema_4(conn: sqlite3.Connection) -> None:
    """Nova's vm_state beside the power state (issue 18); rows made before get the
    vm_state their power state implies (``state`` held ``building`` and ``error`` too)."""
    conn.execute("ALTER TABLE instances ADD COLUMN vm_state TEXT NOT NULL DEFAULT 'active'")
    conn.execute(
        "UPDATE instances SET vm_state = CASE"
        " WHEN state IN ('building', 'error') THEN state"
        " WHEN state IN ('shutoff', 'crashed') THEN 'stopped'"
        " ELSE 'active' END"
    )


def _schema_5(conn: sqlite3.Connection) -> None:
    """Templates (issue 18): a saved guest's memory and frozen disks, and the template
    each clone was restored from ('' for a booted instance). The rows are read and
    written by ``minidriver.vmtemplate``."""
    conn.execute(
        """
        CREATE TABLE templates (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL CHECK (status IN ('creating', 'active')),
            created_at TEXT NOT NULL,
            template_dir TEXT NOT NULL,
            source_uuid TEXT NOT NULL,
            source_dir TEXT NOT NULL,
            flavor TEXT NOT NULL,
            image_id TEXT NOT NULL,
            kernel_id TEXT NOT NULL DEFAULT '',
            ramdisk_id TEXT NOT NULL DEFAULT '',
            network_mode TEXT NOT NULL,
            mac_address TEXT,
            key_name TEXT,
            disks TEXT NOT NULL DEFAULT '{}',
            memory_bytes INTEGER
        )
        """
    )
    conn.execute("ALTER TABLE instances ADD COLUMN template_id TEXT NOT NULL DEFAULT ''")


def _schema_6(conn: sqlite3.Connection) -> None:
    """Volumes (issue 19): Cinder's volumes with their states, and their attachments,
    each also Nova's block device mapping (the device, the boot index of a root
    volume, ``delete_on_termination``). One attachment per volume: no multi-attach.
    The rows are read and written by ``minidriver.volume.api``."""
    conn.execute(
        """
        CREATE TABLE volumes (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            size_gb INTEGER NOT NULL,
            status TEXT NOT NULL
                CHECK (status IN ('creating', 'available', 'in-use', 'error', 'deleting')),
            backend TEXT NOT NULL CHECK (backend IN ('rbd', 'pool')),
            location TEXT NOT NULL DEFAULT '',
            image_id TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """
    )
    conn.execute("CREATE INDEX volumes_name ON volumes (name)")
    conn.execute(
        """
        CREATE TABLE volume_attachments (
            volume_id TEXT PRIMARY KEY REFERENCES volumes (id),
            instance_uuid TEXT NOT NULL,
            device TEXT NOT NULL,
            boot_index INTEGER,
            delete_on_termination INTEGER NOT NULL DEFAULT 0,
            attached_at TEXT NOT NULL,
            UNIQUE (instance_uuid, device)
        )
        """
    )


def _schema_7(conn: sqlite3.Connection) -> None:
    """Resize and shelve (issue 22): the flavor a resize left (Nova's
    ``instance.old_flavor``) until it is confirmed or reverted, and the image a shelve
    took (Nova's ``system_metadata['shelved_image_id']``) until the unshelve, and
    whether it has a config drive (Nova's ``instance.config_drive``), which an
    unshelve builds again; rows made before say 0."""
    conn.execute("ALTER TABLE instances ADD COLUMN old_flavor TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE instances ADD COLUMN shelved_image_id TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE instances ADD COLUMN config_drive INTEGER NOT NULL DEFAULT 0")


def _schema_8(conn: sqlite3.Connection) -> None:
    """Several hosts (issue 20): the host each instance runs on, Nova's
    ``instance.host``. Rows made before have '' here, and ``Database`` gives them the
    name of the host that opens the database to migrate it: the only one there was."""
    conn.execute("ALTER TABLE instances ADD COLUMN host TEXT NOT NULL DEFAULT ''")


def _schema_9(conn: sqlite3.Connection) -> None:
    """Cold migration (issue 20): the host a pending migration left, Nova's
    ``migration.source_compute``, until it is confirmed or reverted; '' for none, and
    for a resize, which stays on its host."""
    conn.execute("ALTER TABLE instances ADD COLUMN source_host TEXT NOT NULL DEFAULT ''")


def _schema_10(conn: sqlite3.Connection) -> None:
    """The metadata of the image an instance booted (``objects.ImageMeta`` as JSON),
    kept with it as Nova keeps ``instance.image_meta`` in its system metadata: a hard
    reboot generates the domain XML from it, even once the image is deleted. A
    template keeps its source instance's for its clones. Rows made before have ''
    (their image's metadata is read from the image store)."""
    conn.execute("ALTER TABLE instances ADD COLUMN image_meta TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE templates ADD COLUMN image_meta TEXT NOT NULL DEFAULT ''")


Migration = Callable[[sqlite3.Connection], None]

# MIGRATIONS[n] upgrades schema version n to n + 1. Append only.
MIGRATIONS: Final[Sequence[Migration]] = (
    _schema_1,
    _schema_2,
    _schema_3,
    _schema_4,
    _schema_5,
    _schema_6,
    _schema_7,
    _schema_8,
    _schema_9,
    _schema_10,
)


@dataclass(frozen=True)
class InstanceRecord:
    """One row of ``instances``: what outlives the process that spawned the guest."""

    uuid: str
    name: str  # the libvirt domain name
    display_name: str
    flavor: str  # the flavor's name
    image_id: str
    state: str
    created_at: str  # ISO 8601 UTC
    instance_dir: str
    kernel_id: str = ""  # the kernel image (aki) booted directly; '' for none
    ramdisk_id: str = ""  # its ramdisk image (ari); '' for none
    network_mode: str = "none"  # user | network | bridge | none
    network_source: str = ""  # the libvirt network's or bridge's name
    mac_address: str | None = None
    forward_port: int | None = None  # user mode: the host port on 127.0.0.1
    key_name: str | None = None  # the key pair booted with (boot --key-name)
    vm_state: str = "building"  # Nova's vm_state (minidriver.vm_states.VMState)
    template_id: str = ""  # the template a clone was restored from; '' when booted
    old_flavor: str = ""  # resized: the flavor a revert goes back to; '' otherwise
    shelved_image_id: str = ""  # shelved: the image its unshelve boots; '' otherwise
    config_drive: int = 0  # 1: booted with a config drive
    host: str = ""  # Nova's instance.host: the [DEFAULT] host of the host it runs on
    source_host: str = ""  # resized by a migrate: the host it left; '' otherwise
    image_meta: str = ""  # its image's metadata at boot (ImageMeta.to_json); '' before schema 10

    def runs_on(self, host: str) -> bool:
        """Whether it runs on ``host``; a record made without a host ('') runs on the
        host of whoever reads it (one host was all there was)."""
        return self.host in ("", host)

    def describe(self) -> str:
        """``uuid (display name, domain name)``, for messages listing several."""
        return f"{self.uuid} ({self.display_name}, {self.name})"


_INSTANCE_FIELDS: Final = tuple(f.name for f in dataclasses.fields(InstanceRecord))
# Built from the record's field names, never from input.
_INSERT_INSTANCE: Final = (
    f"INSERT INTO instances ({', '.join(_INSTANCE_FIELDS)})"  # noqa: S608
    f" VALUES ({', '.join(':' + name for name in _INSTANCE_FIELDS)})"
)
_UPDATE_INSTANCE: Final = "UPDATE instances SET {} WHERE uuid = :uuid".format(  # noqa: S608
    ", ".join(f"{name} = :{name}" for name in _INSTANCE_FIELDS if name != "uuid")
)


def _instance(row: sqlite3.Row) -> InstanceRecord:
    return InstanceRecord(**{name: row[name] for name in _INSTANCE_FIELDS})


class _PerThread(threading.local):
    conn: sqlite3.Connection | None = None  # borrowed for this thread's operation
    depth = 0  # transaction nesting


class Database:
    """The state database of one state dir.

    Open one per process (a connection must not cross a ``fork``) and share it between
    the process's threads: each operation borrows a connection of its own, so a thread
    waiting for the write lock never holds up another thread's reads, and a thread
    that ends leaves nothing open behind it.
    """

    def __init__(self, path: Path, *, host: str | None = None) -> None:
        self.path = path
        # This host's name ([DEFAULT] host): the host of instances recorded before
        # instances recorded theirs (schema 7).
        self.host = socket.gethostname() if host is None else host
        self._local = _PerThread()
        self._idle: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._closed = False
        self._open = 0  # connections open now, idle or in use
        self._most_open = 0  # the most open at once
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise self._cannot_open(exc) from exc
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise

    def _cannot_open(self, exc: Exception) -> StateDatabaseError:
        return StateDatabaseError(
            f"cannot open the state database {self.path}: {exc}",
            hint="check that the state dir exists and is writable",
        )

    def _connect(self) -> sqlite3.Connection:
        # Counted open before its file is, as _disconnect counts it closed after:
        # a connection opening while another closes then shows as two open at once,
        # which their descriptors were (see connections).
        with self._pool_lock:
            self._open += 1
            self._most_open = max(self._most_open, self._open)
        try:
            # isolation_level=None: the sqlite3 module must not open transactions
            # behind our back; transaction() says BEGIN IMMEDIATE itself.
            # check_same_thread=False: a pooled connection serves one thread at a
            # time, but not always the same one.
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            with self._pool_lock:
                self._open -= 1
            raise self._cannot_open(exc) from exc
        conn.row_factory = sqlite3.Row
        return conn

    def _disconnect(self, conn: sqlite3.Connection) -> None:
        conn.close()
        with self._pool_lock:
            self._open -= 1

    @property
    def connections(self) -> tuple[int, int]:
        """How many connections are open now (idle and in use), and the most that
        were open at once.

        SQLite keeps a closed connection's descriptor of the database file open while
        another connection of this process holds a lock on it (closing it would drop
        the process's POSIX locks), and gives it to the next connection it opens. A WAL
        connection holds its shared lock while it is open, so those descriptors stay
        until the last connection closes: this process has at most the most
        connections open at once of them, plus one WAL descriptor per open connection
        and one for the shared memory.
        """
        with self._pool_lock:
            return self._open, self._most_open

    @property
    def connections_in_use(self) -> int:
        """The open connections an operation holds now (not idle in the pool)."""
        with self._pool_lock:
            return self._open - len(self._idle)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection for one operation: this thread's, inside its transaction;
        else one from the pool (or a new one), given back after."""
        local = self._local
        if local.conn is not None:
            yield local.conn
            return
        with self._pool_lock:
            if self._closed:
                raise StateDatabaseError(f"state database {self.path} is closed")
            conn = self._idle.pop() if self._idle else None
        local.conn = conn = conn or self._connect()
        try:
            yield conn
        finally:
            local.conn = None
            self._give_back(conn)

    def _give_back(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:  # only after an error SQLite did not end: never reuse it
            self._disconnect(conn)
            return
        with self._pool_lock:
            if not self._closed and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        self._disconnect(conn)

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the idle connections; one in use closes when its operation ends."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            self._disconnect(conn)

    # -- schema ----------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        return int(self.query("PRAGMA user_version")[0][0])

    def _set_up(self) -> None:
        """WAL mode and the current schema, once per database."""
        wal = self.query("PRAGMA journal_mode")[0][0] == "wal"
        if wal and self.schema_version == len(MIGRATIONS):
            return  # the usual case: no write, no lock
        # Switching to WAL needs an exclusive lock that SQLite's busy handler does not
        # wait for (it fails at once with "database is locked" when two processes
        # create the database together), so set-up is serialised by a file lock.
        try:
            with lockutils.external_lock(self.path.parent, f"{self.path.name}.lock"):
                self.query("PRAGMA journal_mode = WAL")
                self._migrate()
        except OSError as exc:
            raise self._cannot_open(exc) from exc

    def _migrate(self) -> None:
        with self.transaction() as conn:
            # Read again under the write lock: another process may have migrated
            # between our look and our lock.
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > len(MIGRATIONS):
                raise StateDatabaseError(
                    f"the state database {self.path} has schema version {version}; "
                    f"this minidriver knows versions up to {len(MIGRATIONS)}",
                    hint="use the newer minidriver that wrote it, or another state dir",
                )
            if version == len(MIGRATIONS):
                return  # another process did it while we waited
            for migration in MIGRATIONS[version:]:
                migration(conn)
                if migration is _schema_8:
                    conn.execute("UPDATE instances SET host = ? WHERE host = ''", (self.host,))
            # PRAGMA takes no parameters; the value is our own integer.
            conn.execute(f"PRAGMA user_version = {len(MIGRATIONS):d}")

    @property
    def state_id(self) -> str:
        return str(self.query("SELECT value FROM meta WHERE key = 'state_id'")[0][0])

    # -- primitives ------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: ``BEGIN IMMEDIATE``, then ``COMMIT`` or ``ROLLBACK``.

        Nested use joins the outer transaction through a savepoint, so a helper that
        opens its own transaction can run inside a caller's.
        """
        with self._connection() as conn:
            local = self._local
            outermost = local.depth == 0
            savepoint = f"sp{local.depth}"
            try:
                conn.execute("BEGIN IMMEDIATE" if outermost else f"SAVEPOINT {savepoint}")
            except sqlite3.Error as exc:
                raise self._error("cannot start a transaction", exc) from exc
            local.depth += 1
            try:
                yield conn
            except BaseException as exc:
                local.depth -= 1
                # SQLite ends the transaction itself on some errors (SQLITE_FULL);
                # a second ROLLBACK would then hide the first error.
                if conn.in_transaction:
                    if outermost:
                        conn.execute("ROLLBACK")
                    else:
                        conn.execute(f"ROLLBACK TO {savepoint}")
                        conn.execute(f"RELEASE {savepoint}")
                if isinstance(exc, sqlite3.Error):
                    raise self._error("cannot write", exc) from exc
                raise
            local.depth -= 1
            try:
                conn.execute("COMMIT" if outermost else f"RELEASE {savepoint}")
            except sqlite3.Error as exc:
                if outermost and conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise self._error("cannot commit", exc) from exc

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[sqlite3.Row]:
        """Run one read statement and return all its rows."""
        with self._connection() as conn:
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise self._error("cannot read", exc) from exc

    def query_ref(
        self, table: str, ref: str, *, key: str, names: Sequence[str]
    ) -> list[sqlite3.Row]:
        """The rows of ``table`` that ``ref`` may name, oldest first, for :func:`resolve`:
        ``key`` equal to it or starting with it, or a ``names`` column equal to it."""
        named = "".join(f" OR {column} = :ref" for column in names)
        return self.query(
            # Table and column names come from the code, never from input.
            f"SELECT * FROM {table} WHERE {key} = :ref OR substr({key}, 1, :len) = :prefix"  # noqa: S608
            f"{named} ORDER BY created_at, rowid",
            {"ref": ref, "len": len(ref), "prefix": ref.lower()},
        )

    def _error(self, what: str, exc: sqlite3.Error) -> StateDatabaseError:
        hint = None
        if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            hint = f"another process held the database for more than {BUSY_TIMEOUT:g} s"
        return StateDatabaseError(f"state database {self.path}: {what}: {exc}", hint=hint)

    def next_sequence(self, name: str) -> int:
        """The next value of the counter ``name``: 1 first, then 2, 3..."""
        with self.transaction() as conn:
            row = conn.execute(
                "INSERT INTO sequences (name, value) VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET value = value + 1 "
                "RETURNING value",
                (name,),
            ).fetchone()
        return int(row[0])

    # -- instances -------------------------------------------------------------

    def create_instance(self, rec: InstanceRecord) -> None:
        with self.transaction() as conn:
            try:
                conn.execute(_INSERT_INSTANCE, dataclasses.asdict(rec))
            except sqlite3.IntegrityError as exc:
                raise StateDatabaseError(
                    f"cannot record instance {rec.uuid} (domain {rec.name}): {exc}"
                ) from exc

    def update_instance(self, uuid: str, **fields: str | int | None) -> None:
        """Change some fields of an instance, e.g. ``update_instance(u, state="running")``."""
        if "uuid" in fields:
            raise TypeError("update_instance: the uuid of an instance does not change")
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM instances WHERE uuid = ?", (uuid,)).fetchone()
            if row is None:
                raise InstanceNotFound(f"instance {uuid} not found")
            rec = dataclasses.replace(_instance(row), **fields)  # type: ignore[arg-type]
            conn.execute(_UPDATE_INSTANCE, dataclasses.asdict(rec))

    def get_instance(self, uuid: str) -> InstanceRecord:
        rows = self.query("SELECT * FROM instances WHERE uuid = ?", (uuid,))
        if not rows:
            raise InstanceNotFound(f"instance {uuid} not found")
        return _instance(rows[0])

    def find_instance(self, ref: str) -> InstanceRecord:
        """The one instance ``ref`` names: its uuid, a unique uuid prefix, its display
        name or its domain name."""
        rows = self.query_ref("instances", ref, key="uuid", names=("display_name", "name"))
        return resolve(
            ref,
            [_instance(row) for row in rows] if ref else [],
            ident=lambda rec: rec.uuid,
            names=lambda rec: (rec.display_name, rec.name),
            describe=lambda rec: rec.describe(),
            what="instance",
            not_found=InstanceNotFound(
                f"no instance matches {ref!r}",
                hint="give a uuid, a unique uuid prefix, a display name or a domain name",
            ),
        )

    def list_instances(self) -> list[InstanceRecord]:
        """Every instance, oldest first."""
        rows = self.query("SELECT * FROM instances ORDER BY created_at, rowid")
        return [_instance(row) for row in rows]

    def delete_instance(self, uuid: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM instances WHERE uuid = ?", (uuid,))
