"""The load test's cycles on libvirt's test driver, real files and real SQLite: threads
per cycle, flatness as it is judged, and what a failed spawn leaves destroyed."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import libvirt
import pytest
from pytest_mock import MockerFixture

from minidriver.bench import loadtest
from minidriver.driver import LibvirtDriver


@pytest.fixture
def image_id(drv: LibvirtDriver, tmp_path: Path) -> str:
    path = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"], check=True)
    return drv.images.add(path, name="load", disk_format="qcow2").id


def test_threaded_cycles_are_flat(drv: LibvirtDriver, image_id: str) -> None:
    cycles = loadtest.Cycles(drv, image_id)
    samples = []
    for cycle in range(5):
        cycles.run(cycle, threads=3)
        samples.append(loadtest.sample(drv))
    assert cycles.failures == []
    assert len(cycles.totals) == 15
    assert loadtest.above_baseline(samples) == {}
    assert loadtest.beyond_bound(samples) == []
    assert samples[-1]["db_connections"] == 1  # the pool's idle one
    assert samples[-1]["domains"] == 0
    assert drv.db.list_instances() == []


def test_a_rise_after_the_baseline_is_not_flat() -> None:
    flat = {"fds": 10, "threads": 2, "domains": 0, "files": 7}
    samples = [{**flat, "fds": 12}, flat, flat, {**flat, "fds": 11}, flat]
    # Cycle 1 is warm-up; a rise in any later sample counts, even one that fell again.
    assert loadtest.above_baseline(samples) == {"fds": 1}


def test_database_descriptors_are_judged_by_their_bound_not_by_flatness() -> None:
    """SQLite keeps a closed connection's descriptor for its next connection, so the
    state database's descriptors may rise after the baseline within their bound; one
    beyond it is reported, and so is a connection left open."""
    flat = {"fds": 10, "db_connections": 1, "db_fds": 3, "db_fds_bound": 3, "threads": 2}
    kept = {**flat, "db_fds": 4, "db_fds_bound": 4}  # a second connection was open once
    samples = [flat, flat, kept, kept, {**kept, "db_fds": 5}]
    assert loadtest.above_baseline(samples) == {}
    assert loadtest.beyond_bound(samples) == [5]
    left_open = {**kept, "db_connections": 2, "db_fds": 5, "db_fds_bound": 5}
    assert loadtest.above_baseline([flat, flat, left_open]) == {"db_connections": 1}


def test_the_domain_of_a_failed_spawn_is_destroyed(
    drv: LibvirtDriver, image_id: str, mocker: MockerFixture
) -> None:
    """A spawn fails at start and its undo fails to undefine the domain: the cycle
    counts the failure and leaves no domain, record or dir behind."""
    mocker.patch.object(drv.host, "launch", side_effect=libvirt.libvirtError("injected start"))
    failing = mocker.patch.object(
        drv, "_undefine", side_effect=[libvirt.libvirtError("injected undefine"), None]
    )
    cycles = loadtest.Cycles(drv, image_id)

    cycles.run(0, threads=1)

    assert failing.call_count == 1
    assert len(cycles.failures) == 1 and "injected" in cycles.failures[0]
    assert drv.owned_domains() == {}
    assert drv.db.list_instances() == []
    assert sorted(p.name for p in drv.conf.instances_path.iterdir()) == ["_base", "locks"]
    mocker.stopall()
    cycles.run(1, threads=1)  # and the next cycle runs
    assert len(cycles.totals) == 1


def test_a_sample_waits_for_the_connections_to_be_given_back(
    drv: LibvirtDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection in use as the cycle ends (libvirt's event thread recording a
    lifecycle event) is waited for; one that is never given back shows as open."""
    assert drv.db.list_instances() == []  # the pool's idle connection
    release = threading.Event()

    def hold() -> None:
        with drv.db.transaction():
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    deadline = time.monotonic() + 10
    while drv.db.connections_in_use != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert drv.db.list_instances() == []  # meanwhile: a second connection, idle after
        monkeypatch.setattr(loadtest, "QUIET_WAIT", 0.2)
        assert loadtest.sample(drv)["db_connections"] == 2  # still held: it shows
        threading.Timer(0.1, release.set).start()
        monkeypatch.setattr(loadtest, "QUIET_WAIT", 10.0)
        assert loadtest.sample(drv)["db_connections"] == 1  # given back: waited for
    finally:
        release.set()
        holder.join()
