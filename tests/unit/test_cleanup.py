"""`cleanup` on libvirt's test driver with leftovers made for real: it removes this
state dir's orphans, skips live work, and never touches another state dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TEST_DRIVER_NODE

from minidriver import lockutils
from minidriver.cleanup import cleanup
from minidriver.config import load_config
from minidriver.db import InstanceRecord
from minidriver.driver import LibvirtDriver, base_filename, instance_lock_name
from minidriver.host import Host
from minidriver.images.store import ImageStatus

MiB = 1024**2


@pytest.fixture
def host(tmp_path: Path) -> Host:
    node = tmp_path / "node.xml"
    node.write_text(TEST_DRIVER_NODE)
    conf = load_config(None, state_dir=tmp_path / "unused", environ={}).with_libvirt(
        connection_uri=f"test://{node}", virt_type="qemu"
    )
    return Host(conf)


def driver(host: Host, state: Path) -> LibvirtDriver:
    conf = load_config(None, state_dir=state, environ={}).with_libvirt(
        connection_uri=host.conf.libvirt.connection_uri, virt_type="qemu"
    )
    return LibvirtDriver(conf, host=host)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"], check=True)
    return path


def test_orphans_of_every_kind_are_removed_and_others_kept(
    host: Host, tmp_path: Path, image: Path
) -> None:
    mine = driver(host, tmp_path / "mine")
    other = driver(host, tmp_path / "other")
    image_id = mine.images.add(image, name="i", disk_format="qcow2").id
    other_image = other.images.add(image, name="i", disk_format="qcow2").id
    healthy = mine.spawn("healthy", image_id, "m1.tiny")
    no_record = mine.spawn("no-record", image_id, "m1.tiny")
    no_domain = mine.spawn("no-domain", image_id, "m1.tiny")
    theirs = other.spawn("theirs", other_image, "m1.tiny")
    # The leftovers a crash could make:
    mine.db.delete_instance(no_record.uuid)
    mine.host.get_connection().lookupByName(no_domain.name).destroy()
    mine.host.get_connection().lookupByName(no_domain.name).undefine()
    stray = mine.conf.instances_path / "0f0f0f0f-0000-4000-8000-000000000000"
    stray.mkdir()
    part = mine.conf.base_dir / f"{base_filename('gone')}.part"
    part.write_bytes(b"half")
    free_lock = mine.conf.locks_dir / "stale-lock"
    free_lock.write_text("")

    ports = {r.instance_uuid: r.port for r in mine.ports.list()}
    dry = cleanup(mine, dry_run=True)
    assert dry.domains == [no_record.name]
    assert dry.records == [no_domain.uuid]
    assert dry.instance_dirs == [no_record.instance_dir, str(stray)]
    assert dry.partial_files == [str(part)]
    assert dry.locks == ["stale-lock"]
    assert dry.ports == sorted([ports[no_record.uuid], ports[no_domain.uuid]])
    assert stray.exists() and part.exists() and free_lock.exists()

    done = cleanup(mine)
    assert done.total() == dry.total() == 8
    domains = {d.name() for d in host.get_connection().listAllDomains()}
    assert domains == {healthy.name, theirs.name}
    assert [r.uuid for r in mine.db.list_instances()] == [healthy.uuid]
    assert not Path(no_record.instance_dir).exists()
    assert not Path(no_domain.instance_dir).exists()
    assert not stray.exists() and not part.exists() and not free_lock.exists()
    assert Path(healthy.instance_dir).exists()
    assert [r.uuid for r in other.db.list_instances()] == [theirs.uuid]
    assert cleanup(mine).total() == 0


def test_a_spawn_killed_half_way_is_removed_but_live_work_is_not(
    host: Host, tmp_path: Path, image: Path
) -> None:
    drv = driver(host, tmp_path / "state")
    image_id = drv.images.add(image, name="i", disk_format="qcow2").id
    dead = drv.spawn("dead", image_id, "m1.tiny")
    drv.db.update_instance(dead.uuid, state="building")  # as a killed spawn leaves it
    busy = InstanceRecord(
        uuid="1e1e1e1e-0000-4000-8000-000000000000",
        name="instance-000000ff",
        display_name="being built",
        flavor="m1.tiny",
        image_id=image_id,
        state="building",
        created_at="2026-11-22T00:00:00Z",
        instance_dir=str(drv.instance_dir("1e1e1e1e-0000-4000-8000-000000000000")),
    )
    drv.db.create_instance(busy)
    Path(busy.instance_dir).mkdir()
    base = base_filename("being-fetched")
    writing = drv.conf.base_dir / f"{base}.part"
    writing.write_bytes(b"in progress")

    held = threading.Event()
    release = threading.Event()

    def spawn_at_work() -> None:
        with (
            lockutils.external_lock(drv.conf.locks_dir, instance_lock_name(busy.uuid)),
            lockutils.external_lock(drv.conf.locks_dir, base),
        ):
            held.set()
            release.wait(30)

    worker = threading.Thread(target=spawn_at_work)
    worker.start()
    try:
        assert held.wait(10)
        report = cleanup(drv)
    finally:
        release.set()
        worker.join()
    assert report.records == [dead.uuid]
    assert report.domains == [dead.name]
    assert not Path(dead.instance_dir).exists()
    assert [r.uuid for r in drv.db.list_instances()] == [busy.uuid]
    assert Path(busy.instance_dir).exists()
    assert writing.exists()
    assert len(report.skipped) == 2


def test_port_reservations_of_gone_instances_are_freed(
    host: Host, tmp_path: Path, image: Path
) -> None:
    mine = driver(host, tmp_path / "mine")
    other = driver(host, tmp_path / "other")
    image_id = mine.images.add(image, name="i", disk_format="qcow2").id
    other_image = other.images.add(image, name="i", disk_format="qcow2").id
    kept = mine.spawn("kept", image_id, "m1.tiny")
    crashed = mine.spawn("crashed", image_id, "m1.tiny")
    theirs = other.spawn("theirs", other_image, "m1.tiny")
    ours = {kept.uuid, crashed.uuid, theirs.uuid}

    def reserved() -> dict[str, int]:
        # The unit tests' registry is shared by the session: only these instances count.
        return {r.instance_uuid: r.port for r in mine.ports.list() if r.instance_uuid in ours}

    port_of = reserved()
    # A crash between forgetting the record and releasing the port (and its domain).
    mine.db.delete_instance(crashed.uuid)

    assert cleanup(mine, dry_run=True).ports == [port_of[crashed.uuid]]
    assert len(reserved()) == 3
    report = cleanup(mine)
    assert report.ports == [port_of[crashed.uuid]]
    assert set(reserved()) == {kept.uuid, theirs.uuid}


def test_rbd_disks_out_of_reach_keep_their_record_and_dir(host: Host, tmp_path: Path) -> None:
    """A spawn died with its root disk in Ceph and the cluster is down now: cleanup says
    so and keeps the record and dir (disk.info names the pool), so a later cleanup can
    still find and remove the disk."""
    pytest.importorskip("rbd")
    down = tmp_path / "down.conf"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down.write_text(f"[global]\nmon host = 127.0.0.1:{port}\n")
    drv = driver(host, tmp_path / "mine")
    drv.conf = drv.conf.with_libvirt(images_rbd_ceph_conf=str(down), rbd_connect_timeout=1)
    uuid = "0f0f0f0f-0000-4000-8000-00000000abcd"
    directory = drv.instance_dir(uuid)
    directory.mkdir(parents=True)
    (directory / "disk.info").write_text(f'{{"rbd:rbd/{uuid}_disk": "raw"}}')
    drv.db.create_instance(
        InstanceRecord(uuid, "instance-00000009", "died", "t1.nano", "img", "building",
                       "2026-11-22T00:00:00Z", str(directory))
    )  # fmt: skip

    report = cleanup(drv)

    assert any("cannot reach the Ceph cluster" in line for line in report.skipped), report
    assert drv.db.get_instance(uuid).display_name == "died"
    assert (directory / "disk.info").is_file()


def test_a_torn_disk_info_is_no_crash_for_cleanup(host: Host, tmp_path: Path, image: Path) -> None:
    """A crash while disk.info was written (by a minidriver that wrote it in place)
    leaves half of it: cleanup reaps the instance all the same, by libvirt's list of
    its disks while the domain is there, and without one after."""
    drv = driver(host, tmp_path / "state")
    image_id = drv.images.add(image, name="i", disk_format="qcow2").id
    no_record = drv.spawn("no-record", image_id, "m1.tiny")
    died = drv.spawn("died", image_id, "m1.tiny")
    drv.db.delete_instance(no_record.uuid)
    drv.db.update_instance(died.uuid, state="building")  # as a killed spawn leaves it
    for inst in (no_record, died):
        disk_info = Path(inst.instance_dir) / "disk.info"
        disk_info.write_text(disk_info.read_text()[:17])

    assert sorted(cleanup(drv, dry_run=True).domains) == sorted([no_record.name, died.name])
    report = cleanup(drv)

    assert sorted(report.domains) == sorted([no_record.name, died.name])
    assert report.records == [died.uuid]
    assert host.get_connection().listAllDomains() == []
    assert drv.db.list_instances() == []
    assert not Path(no_record.instance_dir).exists()
    assert not Path(died.instance_dir).exists()
    assert cleanup(drv).total() == 0


def add_from_fifo(drv: LibvirtDriver, fifo: Path, name: str) -> subprocess.Popen[bytes]:
    """``minidriver image add`` of a FIFO: it copies what is written, then waits."""
    os.mkfifo(fifo)
    return subprocess.Popen(
        [sys.executable, "-m", "minidriver", "--state-dir", str(drv.conf.state_path),
         "--connect", drv.conf.libvirt.connection_uri,
         "image", "add", str(fifo), "--name", name, "--disk-format", "raw"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def saving_with_data(drv: LibvirtDriver, name: str, size: int) -> str:
    """The id of image ``name`` once its add has ``size`` bytes in its .part file."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for image in drv.images.list():
            part = drv.conf.images_path / f"{image.id}.part"
            if image.name == name and part.exists() and part.stat().st_size >= size:
                assert image.status == ImageStatus.SAVING
                return image.id
        time.sleep(0.05)
    raise AssertionError(f"the add of {name} never got {size} bytes in")


def test_an_image_add_killed_mid_copy_is_reaped_and_a_live_one_is_not(
    host: Host, tmp_path: Path
) -> None:
    drv = driver(host, tmp_path / "state")
    data = bytes(512) + os.urandom(4 * MiB - 512)  # raw, no header to mistake
    dead = add_from_fifo(drv, tmp_path / "dead.fifo", "dead")
    live = add_from_fifo(drv, tmp_path / "live.fifo", "live")
    with open(tmp_path / "dead.fifo", "wb") as dead_src, open(tmp_path / "live.fifo", "wb") as src:
        dead_src.write(data[:MiB])
        dead_src.flush()
        src.write(data[:MiB])
        src.flush()
        dead_id = saving_with_data(drv, "dead", MiB)
        live_id = saving_with_data(drv, "live", MiB)
        dead.kill()  # SIGKILL mid-copy: its record stays saving, its .part half full
        dead.wait()

        dry = cleanup(drv, dry_run=True)
        report = cleanup(drv)

        assert dry.images == report.images == [dead_id]
        part = drv.conf.images_path / f"{dead_id}.part"
        assert dry.partial_files == report.partial_files == [str(part)]
        assert f"image {live_id}: being added" in report.skipped
        assert not part.exists()
        assert [i.id for i in drv.images.list()] == [live_id]
        src.write(data[MiB:])  # the live add goes on, and ends well
    assert live.wait(60) == 0, live.stderr.read() if live.stderr else ""
    image = drv.images.get("live")
    assert image.status == ImageStatus.ACTIVE and image.path.read_bytes() == data
    assert sorted(p.name for p in drv.conf.images_path.iterdir()) == [live_id]
    assert cleanup(drv).total() == 0
