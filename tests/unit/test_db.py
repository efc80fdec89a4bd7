"""The state database, on real SQLite files."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from minidriver import db as db_module
from minidriver.bench.loadtest import open_descriptors
from minidriver.db import (
    MIGRATIONS,
    Database,
    InstanceRecord,
    StateDatabaseError,
    utc_now,
)
from minidriver.exception import AmbiguousReference, InstanceNotFound

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with Database(tmp_path / "state" / "minidriver.db") as database:
        yield database


def record(uuid_: str, display_name: str, seq: int, created_at: str = "") -> InstanceRecord:
    return InstanceRecord(
        uuid=uuid_,
        name=f"instance-{seq:08x}",
        display_name=display_name,
        flavor="t1.nano",
        image_id=str(uuid.uuid4()),
        state="building",
        created_at=created_at or utc_now(),
        instance_dir=f"/var/lib/minidriver/instances/{uuid_}",
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_new_database_has_the_schema_wal_and_a_state_id(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "minidriver.db"
    with Database(path) as database:
        assert database.schema_version == len(MIGRATIONS)
        assert uuid.UUID(database.state_id).version == 4
        tables = {row[0] for row in database.query("SELECT name FROM sqlite_master")}
        assert {"meta", "sequences", "images", "instances"} <= tables
    assert (path.parent.stat().st_mode & 0o777) == 0o755
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_migrates_an_empty_file_and_reopening_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "minidriver.db"
    path.touch()
    with Database(path) as database:
        state_id = database.state_id
        assert database.schema_version == len(MIGRATIONS)
    before = digest(path)
    with Database(path) as database:
        assert database.state_id == state_id
        assert database.schema_version == len(MIGRATIONS)
    assert digest(path) == before


def test_a_second_migration_is_an_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "minidriver.db"
    with Database(path) as database:
        database.create_instance(record(str(uuid.uuid4()), "old", 1))
        state_id = database.state_id
    runs: list[int] = []

    def schema_2(conn: sqlite3.Connection) -> None:
        runs.append(1)
        conn.execute("ALTER TABLE instances ADD COLUMN zone TEXT NOT NULL DEFAULT 'here'")

    monkeypatch.setattr(db_module, "MIGRATIONS", (*MIGRATIONS, schema_2))
    for _ in range(2):
        with Database(path) as database:
            assert database.schema_version == len(MIGRATIONS) + 1
            assert database.state_id == state_id
            assert [r.display_name for r in database.list_instances()] == ["old"]
            assert database.query("SELECT zone FROM instances")[0][0] == "here"
    assert runs == [1]


def test_schema_2_gives_old_instances_no_kernel(tmp_path: Path) -> None:
    """A state dir made before kernel images: its instances read back with '' ids, and
    a new one records both."""
    path = tmp_path / "minidriver.db"
    conn = sqlite3.connect(path)
    with conn:
        MIGRATIONS[0](conn)
        conn.execute(
            "INSERT INTO instances VALUES ('u-old', 'instance-1', 'old', 't1.nano', 'img',"
            " 'running', '2026-01-01T00:00:00Z', '/x')"
        )
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    with Database(path) as database:
        old = database.get_instance("u-old")
        assert (old.kernel_id, old.ramdisk_id) == ("", "")
        new = dataclasses.replace(
            record(str(uuid.uuid4()), "new", 2), kernel_id="k-id", ramdisk_id="r-id"
        )
        database.create_instance(new)
        assert database.get_instance(new.uuid) == new
        database.update_instance(new.uuid, ramdisk_id="")
        assert database.get_instance(new.uuid).ramdisk_id == ""


def test_instances_of_the_first_schema_get_no_nic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema 2 (networking) on a database of schema 1: old instances had no NIC."""
    path = tmp_path / "minidriver.db"
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS[:1])
    with Database(path) as database, database.transaction() as conn:
        conn.execute(
            "INSERT INTO instances VALUES ('u1', 'instance-1', 'old', 't1.nano', 'i', "
            "'running', '', '/x')"
        )
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS)
    with Database(path) as database:
        assert database.schema_version == len(MIGRATIONS)
        old = database.get_instance("u1")
        assert (old.network_mode, old.mac_address, old.forward_port, old.key_name) == (
            "none",
            None,
            None,
            None,
        )
        database.update_instance("u1", forward_port=10022, key_name="k")
        assert database.get_instance("u1").forward_port == 10022


def test_a_failed_migration_leaves_the_old_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "minidriver.db"
    Database(path).close()

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half (x)")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(db_module, "MIGRATIONS", (*MIGRATIONS, broken))
    with pytest.raises(RuntimeError):
        Database(path)
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS)
    with Database(path) as database:
        assert database.schema_version == len(MIGRATIONS)
        assert not database.query("SELECT name FROM sqlite_master WHERE name = 'half'")


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "minidriver.db"
    Database(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StateDatabaseError, match="schema version") as err:
        Database(path)
    assert err.value.hint


def test_unopenable_path_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StateDatabaseError, match="cannot open the state database"):
        Database(blocker / "minidriver.db")


def test_sequence_starts_at_one_and_is_per_name(db: Database) -> None:
    assert [db.next_sequence("instance") for _ in range(3)] == [1, 2, 3]
    assert db.next_sequence("other") == 1
    assert db.next_sequence("instance") == 4


WORKER = """
import sys
from pathlib import Path
from minidriver.db import Database
sys.stdin.readline()  # start together
db = Database(Path(sys.argv[1]))
print(" ".join(str(db.next_sequence("instance")) for _ in range(50)))
db.close()
"""


def test_sequence_is_atomic_across_processes(tmp_path: Path) -> None:
    # Both processes also race to create the schema of a database that does not exist.
    path = tmp_path / "minidriver.db"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )
        for _ in range(2)
    ]
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    values: list[int] = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        values += [int(v) for v in out.split()]
    assert sorted(values) == list(range(1, 101))
    with Database(path) as database:
        assert database.next_sequence("instance") == 101


def test_sequence_is_atomic_across_threads(db: Database) -> None:
    values: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        got = [db.next_sequence("instance") for _ in range(50)]
        with lock:
            values.extend(got)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(values) == list(range(1, 201))


def test_transaction_rolls_back_on_error_and_nests(db: Database) -> None:
    with pytest.raises(RuntimeError), db.transaction():
        db.next_sequence("instance")
        raise RuntimeError("undo")
    assert db.next_sequence("instance") == 1

    with db.transaction():
        db.next_sequence("instance")  # 2, kept
        with pytest.raises(RuntimeError), db.transaction():
            db.next_sequence("instance")  # 3, rolled back to the savepoint
            raise RuntimeError("inner only")
    assert db.next_sequence("instance") == 3


def test_instance_round_trip_update_and_delete(db: Database) -> None:
    rec = record(str(uuid.uuid4()), "web", 1)
    db.create_instance(rec)
    assert db.get_instance(rec.uuid) == rec
    db.update_instance(rec.uuid, state="running")
    assert db.get_instance(rec.uuid) == dataclasses.replace(rec, state="running")
    with pytest.raises(TypeError):
        db.update_instance(rec.uuid, colour="blue")
    with pytest.raises(InstanceNotFound):
        db.update_instance(str(uuid.uuid4()), state="running")
    db.delete_instance(rec.uuid)
    db.delete_instance(rec.uuid)  # absent: no error
    with pytest.raises(InstanceNotFound, match=rec.uuid):
        db.get_instance(rec.uuid)


def test_domain_names_are_unique(db: Database) -> None:
    db.create_instance(record(str(uuid.uuid4()), "a", 1))
    with pytest.raises(StateDatabaseError, match="instance-00000001"):
        db.create_instance(record(str(uuid.uuid4()), "b", 1))


def test_list_is_oldest_first(db: Database) -> None:
    newer = record(str(uuid.uuid4()), "newer", 1, "2024-05-02T00:00:00Z")
    older = record(str(uuid.uuid4()), "older", 2, "2024-05-01T00:00:00Z")
    same_second = record(str(uuid.uuid4()), "same", 3, "2024-05-02T00:00:00Z")
    for rec in (newer, older, same_second):
        db.create_instance(rec)
    assert [r.display_name for r in db.list_instances()] == ["older", "newer", "same"]


def test_find_instance(db: Database) -> None:
    web1 = record("aaaa1111-0000-4000-8000-000000000001", "web", 1)
    web2 = record("aaaa2222-0000-4000-8000-000000000002", "web", 2)
    db_ = record("bbbb3333-0000-4000-8000-000000000003", "db", 3)
    for rec in (web1, web2, db_):
        db.create_instance(rec)

    assert db.find_instance(web1.uuid) == web1
    assert db.find_instance("aaaa1") == web1
    assert db.find_instance("AAAA2") == web2  # uuids are case-insensitive
    assert db.find_instance("b") == db_
    assert db.find_instance("db") == db_
    assert db.find_instance("instance-00000002") == web2

    with pytest.raises(AmbiguousReference) as err:
        db.find_instance("web")
    for rec in (web1, web2):
        assert rec.uuid in str(err.value)
        assert rec.name in str(err.value)
    with pytest.raises(AmbiguousReference):
        db.find_instance("aaaa")

    with pytest.raises(InstanceNotFound, match="'nothing'") as not_found:
        db.find_instance("nothing")
    assert not_found.value.hint
    with pytest.raises(InstanceNotFound):
        db.find_instance("")


def test_an_exact_uuid_wins_over_a_name(db: Database) -> None:
    target = record(str(uuid.uuid4()), "target", 1)
    impostor = record(str(uuid.uuid4()), target.uuid, 2)
    db.create_instance(target)
    db.create_instance(impostor)
    assert db.find_instance(target.uuid) == target


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "minidriver.db"
    path.write_bytes(b"this is not SQLite\n" * 100)
    with pytest.raises(StateDatabaseError, match="not a database"):
        Database(path)


def test_a_writer_waits_for_another_connections_transaction(tmp_path: Path) -> None:
    path = tmp_path / "minidriver.db"
    got: list[int] = []
    with Database(path) as first, Database(path) as second:
        started = threading.Event()

        def other_writer() -> None:
            started.set()
            got.append(second.next_sequence("instance"))

        writer = threading.Thread(target=other_writer)
        with first.transaction():
            assert first.next_sequence("instance") == 1
            writer.start()
            started.wait()
            # Readers are not blocked by a writer (WAL) and see the last commit.
            assert second.query("SELECT count(*) FROM sequences")[0][0] == 0
        writer.join()
    # The second writer waited (busy timeout) instead of failing with "locked".
    assert got == [2]


def test_an_exact_name_wins_over_a_uuid_prefix(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.db")
    named_b = InstanceRecord(
        uuid="11111111-0000-4000-8000-000000000000",
        name="instance-00000001",
        display_name="b",
        flavor="m1.tiny",
        image_id="i",
        state="running",
        created_at="2026-11-22T00:00:00Z",
        instance_dir="/nonexistent/1",
    )
    starts_with_b = dataclasses.replace(
        named_b, uuid="b2222222-0000-4000-8000-000000000000", name="instance-00000002",
        display_name="other", instance_dir="/nonexistent/2",
    )  # fmt: skip
    db.create_instance(named_b)
    db.create_instance(starts_with_b)
    assert db.find_instance("b").uuid == named_b.uuid
    assert db.find_instance("b2").uuid == starts_with_b.uuid
    db.close()


def fds_open_on(path: Path) -> int:
    """This process's file descriptors on the database file, its WAL and its shm."""
    return open_descriptors(path)[0]


def test_threads_that_end_leave_no_connection_open(tmp_path: Path) -> None:
    """A thread pool made per round (as the bench's) must not grow the open files."""
    path = tmp_path / "minidriver.db"
    threads_per_round, rounds = 8, 12
    with Database(path) as db:
        assert db.list_instances() == []
        idle = fds_open_on(path)  # the pool's idle connection: the file, its WAL, its shm
        ready = threading.Barrier(threads_per_round)

        def work() -> None:
            ready.wait(10)  # all at once: the most connections in use together
            db.next_sequence("instance")
            assert db.list_instances() == []

        after_round = []
        for _round in range(rounds):
            threads = [threading.Thread(target=work) for _ in range(threads_per_round)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            after_round.append(fds_open_on(path))
            # What a round opens beyond the idle connection is closed when its
            # operation ends.
            assert db.connections[0] == 1
        assert db.next_sequence("instance") == threads_per_round * rounds + 1
        # SQLite may keep a closed connection's fds for a later open while another
        # connection holds a lock on the file, so the count after a round varies with
        # the threads' timing, but never beyond one round's connections (two fds
        # each): one connection kept per thread passed that bound in round 2, and one
        # leaked per round would by round 8.
        assert max(after_round) <= idle + 2 * threads_per_round, after_round
        # Exactly: the database file's for the most connections open at once, the
        # WAL's of the one open, the shared memory's.
        open_now, most_open = db.connections
        assert 1 < most_open <= threads_per_round
        assert max(after_round) <= most_open + open_now + 1, (after_round, most_open)
    assert fds_open_on(path) == 0


def test_a_connection_counts_as_open_while_its_file_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted open before SQLite opens its file and closed after: a connection that
    opens while another closes shows as two open at once, as their descriptors were
    (counted after the open, the load test once found one descriptor beyond the
    bound its count gave)."""
    with Database(tmp_path / "minidriver.db") as db:
        seen: list[int] = []
        real_connect = sqlite3.connect

        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            seen.append(db.connections[0])
            conn: sqlite3.Connection = real_connect(*args, **kwargs)
            return conn

        monkeypatch.setattr(sqlite3, "connect", connect)
        with db.transaction():  # this thread holds the idle connection
            other = threading.Thread(target=db.list_instances)
            other.start()
            other.join()
        assert seen == [2]  # the other thread's, counted with the one in use
        assert db.connections == (1, 2)

        def refused(*_args: object, **_kwargs: object) -> sqlite3.Connection:
            raise sqlite3.OperationalError("unable to open database file")

        monkeypatch.setattr(sqlite3, "connect", refused)
        failed: list[StateDatabaseError] = []

        def query() -> None:
            try:
                db.list_instances()
            except StateDatabaseError as exc:
                failed.append(exc)

        with db.transaction():
            other = threading.Thread(target=query)
            other.start()
            other.join()
        assert [str(e).startswith("cannot open the state database") for e in failed] == [True]
        assert db.connections == (1, 2)  # the refused one no longer counts


def test_schema_8_puts_old_instances_on_the_host_that_migrates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several hosts: instances recorded before hosts were get the name of the host
    whose minidriver opens the database first ([DEFAULT] host), the only one then;
    new records keep the host they name."""
    path = tmp_path / "minidriver.db"
    # The schemas before the hosts' one, wherever it stands in the list.
    before = MIGRATIONS[: MIGRATIONS.index(db_module._schema_8)]
    monkeypatch.setattr(db_module, "MIGRATIONS", before)
    with Database(path) as database, database.transaction() as conn:
        conn.execute(
            "INSERT INTO instances (uuid, name, display_name, flavor, image_id, state,"
            " created_at, instance_dir) VALUES ('u1', 'instance-1', 'old', 't1.nano', 'i',"
            " 'running', '', '/x')"
        )
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS)
    with Database(path, host="lab-1") as database:
        assert database.schema_version == len(MIGRATIONS)
        [old] = database.list_instances()
        assert old.host == "lab-1"
        new = dataclasses.replace(record(str(uuid.uuid4()), "new", 2), host="lab-2")
        database.create_instance(new)
        assert database.get_instance(new.uuid).host == "lab-2"
    with Database(path, host="lab-3") as database:
        assert sorted(r.host for r in database.list_instances()) == ["lab-1", "lab-2"]


def test_schema_9_gives_old_instances_no_pending_migration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cold migration: rows made before have no source host (a resize stays on its
    host); a migrate's record keeps the one it names."""
    path = tmp_path / "minidriver.db"
    before = MIGRATIONS[: MIGRATIONS.index(db_module._schema_9)]
    monkeypatch.setattr(db_module, "MIGRATIONS", before)
    with Database(path) as database, database.transaction() as conn:
        conn.execute(
            "INSERT INTO instances (uuid, name, display_name, flavor, image_id, state,"
            " created_at, instance_dir, vm_state, old_flavor) VALUES ('u1', 'instance-1',"
            " 'old', 't1.small', 'i', 'running', '', '/x', 'resized', 't1.nano')"
        )
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS)
    with Database(path, host="lab-1") as database:
        assert database.schema_version == len(MIGRATIONS)
        [old] = database.list_instances()
        assert (old.vm_state, old.source_host) == ("resized", "")
        database.update_instance("u1", host="lab-2", source_host="lab-1")
        assert database.get_instance("u1").source_host == "lab-1"


def test_schema_10_gives_old_instances_no_image_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows made before keep no copy of their image's metadata (a hard reboot reads
    the image store for them); a new record keeps the one it is given."""
    path = tmp_path / "minidriver.db"
    before = MIGRATIONS[: MIGRATIONS.index(db_module._schema_10)]
    monkeypatch.setattr(db_module, "MIGRATIONS", before)
    with Database(path) as database, database.transaction() as conn:
        conn.execute(
            "INSERT INTO instances (uuid, name, display_name, flavor, image_id, state,"
            " created_at, instance_dir) VALUES ('u1', 'instance-1', 'old', 't1.nano', 'i',"
            " 'running', '', '/x')"
        )
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS)
    with Database(path) as database:
        assert database.schema_version == len(MIGRATIONS)
        [old] = database.list_instances()
        assert old.image_meta == ""
        meta = '{"id": "i", "properties": {"os_type": "linux"}}'
        database.update_instance("u1", image_meta=meta)
        assert database.get_instance("u1").image_meta == meta
