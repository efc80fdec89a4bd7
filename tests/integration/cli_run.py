"""The command line as the integration tests run it: a child ``python -m minidriver``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def minidriver(state: Path, uri: str, *args: str) -> list[str]:
    """The argv of ``minidriver`` on ``state`` (and ``uri``, unless empty: auto)."""
    argv = ["--state-dir", str(state), *(["--connect", uri] if uri else []), *args]
    return [sys.executable, "-m", "minidriver", *argv]


def run_json(cmd: list[str]) -> Any:
    """Run ``cmd`` (a ``--json`` command), which must succeed; its JSON document."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def wanted_connection_uri() -> str:
    """The connection ``MINIDRIVER_TEST_CONNECTION`` names; empty (auto) when unset."""
    wanted = os.environ.get("MINIDRIVER_TEST_CONNECTION", "")
    return {"daemon": "qemu:///system", "embed": "qemu:///embed"}.get(wanted, "")


def run_with_config(
    state: Path, *argv: str, timeout: float, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``minidriver`` on ``state`` and its ``minidriver.conf``, on the test connection."""
    uri = wanted_connection_uri()
    cmd = [sys.executable, "-m", "minidriver", "--state-dir", str(state),
           "--config", str(state / "minidriver.conf"), *(["--connect", uri] if uri else []),
           *argv]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


def kill_at(child_code: str, point: str, marker: Path, argv: list[str]) -> None:
    """Run ``python -c child_code point marker ARGS`` (``argv`` a :func:`minidriver`
    argv), wait until the child writes ``marker`` (it stalls at ``point``), then
    ``kill -9`` it."""
    marker.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-c", child_code, point, str(marker), *argv[3:]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        assert time.monotonic() < deadline, f"{point} never reached the stall"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
