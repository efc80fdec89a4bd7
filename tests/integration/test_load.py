"""The threaded load test, briefly, under real QEMU: open files, threads, domains and
files under its state dir stay flat from the second cycle to the last."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minidriver.config import Config

pytestmark = pytest.mark.integration


def test_threaded_load_test_is_flat(host_config: Config, test_image: Path, tmp_path: Path) -> None:
    uri = host_config.libvirt.connection_uri
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, "-m", "minidriver.bench.loadtest", "--threads", "2", "--cycles", "5",
         "--json", str(out), *(["--connect", uri] if uri else [])],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    print(proc.stdout)
    assert doc["threads"] == 2 and doc["failures"] == []
    assert len(doc["spawn_total_s"]) == 10
    assert doc["flat"] is True and doc["above_baseline"] == {}
    assert doc["db_fds_beyond_bound"] == []
    assert [s["db_connections"] for s in doc["samples"]] == [1] * 5
    assert [s["domains"] for s in doc["samples"]] == [0] * 5
    assert "flat (no sample of cycles 2..5 above cycle 2's)" in proc.stdout
