"""Parallel spawns of one uncached image: one download, one conversion, all running.

Threads share the session's driver; on a daemon connection, separate `minidriver`
processes join them on the same state dir (the embedded driver allows one process
per root, so there the processes' share is done by threads too).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from minidriver.driver import LibvirtDriver, base_filename
from minidriver.guestimages.testimage import IMAGE_PROPERTIES as LINUX

pytestmark = pytest.mark.integration


def test_eight_spawns_of_an_uncached_image(driver: LibvirtDriver, test_image: Path) -> None:
    image = driver.images.add(test_image, name="concurrent", disk_format="qcow2", properties=LINUX)
    assert not (driver.conf.base_dir / base_filename(image.id)).exists()
    processes = [] if driver.host.is_embedded else list(range(4))
    threads = 8 - len(processes)

    def by_thread(i: int) -> dict[str, float]:
        return driver.spawn(name=f"thread-{i}", image=image.id, flavor="t1.nano").timings

    def by_process(i: int) -> dict[str, float]:
        cmd = [
            sys.executable, "-m", "minidriver", "--json",
            "--state-dir", str(driver.conf.state_path), "--connect", driver.host.uri,
            "boot", "--image", image.id, "--flavor", "t1.nano", "--name", f"process-{i}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr
        timings: dict[str, float] = json.loads(proc.stdout)["timings"]
        return timings

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(by_thread, i) for i in range(threads)]
        futures += [pool.submit(by_process, i) for i in processes]
        timings = [f.result() for f in futures]

    try:
        assert sum(1 for t in timings if t["fetch"] > 0) == 1, timings
        assert sum(1 for t in timings if t["convert"] > 0) == 1, timings
        records = driver.list_instances()
        assert len(records) == 8
        assert {r.state for r in records} == {"running"}
    finally:
        for record in driver.db.list_instances():
            driver.destroy(record.uuid)
    assert driver.db.list_instances() == []
    names = {d.name() for d in driver.host.get_connection().listAllDomains()}
    assert not {r.name for r in records} & names
    assert [
        p
        for p in driver.conf.instances_path.iterdir()
        if p.name not in ("_base", "locks", "snapshots")
    ] == []
    assert list(driver.conf.locks_dir.iterdir()) == []
