"""`minidriver cleanup` in a loop beside a loop of boots and deletes on one state dir:
cleanup never removes an instance that a boot reported, and nothing is left at the end.

Both loops run the real command (`python -m minidriver`), each in processes of its own,
on one libvirt daemon: the embedded driver allows one process per root, so there a
boot and a cleanup of one state dir cannot run at once and this race cannot happen.
Each boot and delete is a process of its own; the cleanup loop is one process that
runs the command's ``main`` pass after pass (as the tests share a connection across
calls), so that passes follow each other closely and a boot's every instant falls
inside one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from minidriver import guest
from minidriver.config import Config, load_config
from minidriver.db import Database
from minidriver.host import Host

# The embedded driver allows one process per root: no other process can run a cleanup
# beside a boot there, so the race exists on a daemon only.
pytestmark = [pytest.mark.integration, pytest.mark.connection("daemon")]

BOOTS = 16  # half of them --no-wait
HARD_LIMIT = 300.0  # seconds for the whole loop, whatever the machine's load

CLEANER = r"""
import contextlib, io, json, sys, time
from pathlib import Path
from minidriver import cli
from minidriver.config import load_config
from minidriver.host import Host

stop, limit, state, uri = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
host = Host(load_config(None, environ={}).with_libvirt(connection_uri=uri))
argv = ["--json", "--state-dir", state, "--connect", uri, "cleanup"]
deadline = time.monotonic() + limit
while not stop.exists() and time.monotonic() < deadline:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(argv, host=host)
    print(json.dumps({"rc": rc, "report": json.loads(out.getvalue())}), flush=True)
    if rc:
        break
"""


@pytest.fixture
def state(host_config: Config, libvirt_host: Host) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mdrace-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    # Should the test fail half-way, its domains must not outlive their state dir.
    for args in (["delete", "--all"], ["cleanup"]):
        subprocess.run(cli(path, libvirt_host.uri, *args), capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def cli(state: Path, uri: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "minidriver", "--json", "--state-dir", str(state),
            "--connect", uri, *args]  # fmt: skip


def run(cmd: list[str]) -> tuple[int, Any, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else None, proc.stderr


def test_cleanup_never_removes_what_a_concurrent_boot_made(
    state: Path, libvirt_host: Host, test_image: Path
) -> None:
    uri = libvirt_host.uri
    rc, _, err = run(cli(state, uri, "image", "add", str(test_image), "--name", "g",
                         "--disk-format", "qcow2", "--property", "os_type=linux"))  # fmt: skip
    assert rc == 0, err
    with Database(state / "minidriver.db") as db:
        state_id = db.state_id

    stop = state / "stop"
    cleaner = subprocess.Popen(
        [sys.executable, "-c", CLEANER, str(stop), str(HARD_LIMIT), str(state), uri],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    started = time.monotonic()
    booted: list[dict[str, Any]] = []
    try:
        for i in range(BOOTS):
            assert time.monotonic() - started < HARD_LIMIT, f"only {i} boots in {HARD_LIMIT} s"
            assert cleaner.poll() is None, cleaner.communicate()
            wait = [] if i % 2 else ["--no-wait"]
            rc, boot, err = run(cli(state, uri, "boot", "--image", "g", "--flavor", "t1.nano",
                                    "--name", f"race-{i}", *wait))  # fmt: skip
            assert rc == 0, f"boot {i}: {err}"
            booted.append(boot)
            # Whole right after the boot said so: its domain and its disks...
            assert libvirt_host.find_domain(boot["name"]) is not None, f"boot {i}: no domain"
            assert (Path(boot["instance_dir"]) / "disk").is_file(), f"boot {i}: no disk"
            # ...and its delete is a delete, not "no instance matches".
            rc, deleted, err = run(cli(state, uri, "delete", boot["uuid"]))
            assert rc == 0, f"delete of boot {i}: {err}"
            assert deleted == {"deleted": [boot["uuid"]], "failed": []}
    finally:
        stop.touch()
        out, err = cleaner.communicate(timeout=150)
    elapsed = time.monotonic() - started
    passes = [json.loads(line) for line in out.splitlines()]
    reports = [p["report"] for p in passes]
    print(f"{len(booted)} boots and deletes, {len(reports)} cleanup passes, {elapsed:.1f} s")
    assert cleaner.returncode == 0, err
    assert [p for p in passes if p["rc"] != 0] == []
    # The loops overlapped: some pass found a boot or delete at work and left it alone.
    at_work = [line for r in reports for line in r["skipped"]]
    assert any(b["uuid"] in line for b in booted for line in at_work), at_work

    reaped = {x for r in reports for key in ("domains", "records", "instance_dirs") for x in r[key]}
    for boot in booted:
        assert not {boot["uuid"], boot["name"], boot["instance_dir"]} & reaped, boot

    # Nothing left: no domain, record, instance dir, lock or port reservation.
    assert [
        d.name()
        for d, xml in libvirt_host.domains_xml()
        if (owner := guest.owner_of(xml)) is not None and owner.state_id == state_id
    ] == []
    rc, listed, err = run(cli(state, uri, "list"))
    assert rc == 0 and listed == [], err
    instances = state / "instances"
    assert sorted(p.name for p in instances.iterdir()) == ["_base", "locks"]
    assert list((instances / "locks").iterdir()) == []
    reservations = load_config(None, state_dir=state, environ={}).port_reservations_path
    assert [
        f.name
        for f in reservations.glob("[0-9]*")
        if json.loads(f.read_text())["state_path"] == os.fspath(state)
    ] == []
