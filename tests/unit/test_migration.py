"""Live migration's pure parts (minidriver.migration): Nova's completion timeout, the
URI a daemon reaches the system daemon by, the progress line. The moves themselves run
on real daemons: tests/integration/test_hosts.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from minidriver import migration
from minidriver.config import load_config


@pytest.mark.parametrize(
    ("per_gib", "memory_mb", "seconds"),
    [
        (800, 128, 1600.0),  # Nova counts 2 GiB at least
        (1, 128, 2.0),
        (10, 4096, 40.0),
        (0, 4096, 0.0),  # 0: no limit
    ],
)
def test_completion_timeout_is_per_gib_of_ram(per_gib: int, memory_mb: int, seconds: float) -> None:
    assert migration.completion_timeout(per_gib, memory_mb) == seconds


def test_the_default_is_novas(tmp_path: Path) -> None:
    conf = load_config(None, state_dir=tmp_path, environ={})
    assert conf.libvirt.live_migration_completion_timeout == 800


def test_the_system_daemon_is_reached_through_its_socket() -> None:
    assert migration.peer_uri("qemu:///system") == (
        "qemu+unix:///system?socket=/run/libvirt/libvirt-sock"
    )
    other = "qemu+unix:///system?socket=/var/tmp/minidriver-hosts/h2/sock/libvirt-sock"
    assert migration.peer_uri(other) == other


def test_progress_line() -> None:
    assert "starting" in migration.Progress(0.4, 0, 0, 0).line()
    line = migration.Progress(3.0, 128 * 2**20, 32 * 2**20, 100 * 2**20).line()
    assert "memory  75.0% (100 MiB sent, 32 MiB left)" in line
