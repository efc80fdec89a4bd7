"""`minidriver cache list|clean` on a real cache made by real spawns (libvirt's test
driver as the hypervisor), with ages set by os.utime."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TEST_DRIVER_NODE

from minidriver.cli import main
from minidriver.config import load_config
from minidriver.driver import LibvirtDriver, base_filename
from minidriver.host import Host

DAY = 86400


@pytest.fixture
def setup(tmp_path: Path) -> tuple[LibvirtDriver, list[str], str]:
    node = tmp_path / "node.xml"
    node.write_text(TEST_DRIVER_NODE)
    state = tmp_path / "state"
    conf = load_config(None, state_dir=state, environ={}).with_libvirt(
        connection_uri=f"test://{node}", virt_type="qemu"
    )
    drv = LibvirtDriver(conf, host=Host(conf))
    image = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    image_id = drv.images.add(image, name="img", disk_format="qcow2").id
    return drv, ["--state-dir", str(state)], image_id


def run(drv: LibvirtDriver, argv: list[str], capsys: pytest.CaptureFixture[str]) -> object:
    assert main(["--json", *argv], host=drv.host) == 0
    return json.loads(capsys.readouterr().out)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_clean_removes_only_old_unused_bases_and_dry_run_changes_nothing(
    setup: tuple[LibvirtDriver, list[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    drv, state, image_id = setup
    kept = drv.spawn("kept", image_id, "t1.nano")
    gone = drv.spawn("gone", image_id, "m1.tiny")
    drv.destroy(gone.uuid)
    base_dir = drv.conf.base_dir
    for f in base_dir.iterdir():
        age(f, 2 * DAY)

    listed = run(drv, [*state, "cache", "list"], capsys)
    assert isinstance(listed, list)
    by_name = {f["name"]: f for f in listed}
    base = base_filename(image_id)
    assert by_name[base]["used_by"] == [kept.uuid]
    assert by_name[base]["removable"] is False

    before = sorted((f.name, f.stat().st_mtime_ns) for f in base_dir.iterdir())
    dry = run(drv, [*state, "cache", "clean", "--dry-run"], capsys)
    assert isinstance(dry, dict)
    assert dry["removed"] == []  # kept uses every base: the root, ephemeral and swap
    assert sorted((f.name, f.stat().st_mtime_ns) for f in base_dir.iterdir()) == before

    drv.destroy(kept.uuid)
    for f in base_dir.iterdir():
        age(f, 2 * DAY)
    before = sorted((f.name, f.stat().st_mtime_ns) for f in base_dir.iterdir())
    dry = run(drv, [*state, "cache", "clean", "--dry-run"], capsys)
    assert isinstance(dry, dict)
    assert {f["name"] for f in dry["removed"]} == {name for name, _ in before}
    assert sorted((f.name, f.stat().st_mtime_ns) for f in base_dir.iterdir()) == before

    done = run(drv, [*state, "cache", "clean"], capsys)
    assert isinstance(done, dict)
    assert done["bytes_freed"] > 0
    assert list(base_dir.iterdir()) == []
    assert list(drv.conf.locks_dir.iterdir()) == []


def test_young_unused_base_stays(
    setup: tuple[LibvirtDriver, list[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    drv, state, image_id = setup
    inst = drv.spawn("x", image_id, "m1.tiny")
    drv.destroy(inst.uuid)
    base = drv.conf.base_dir / base_filename(image_id)
    age(base, DAY - 60)
    done = run(drv, [*state, "cache", "clean"], capsys)
    assert isinstance(done, dict)
    assert done["removed"] == []
    assert base.exists()
