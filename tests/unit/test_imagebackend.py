"""The base-file lock and ``Image.cache`` under concurrency, on real files."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import img_info

from minidriver.config import Config, load_config
from minidriver.exception import MinidriverError
from minidriver.imagebackend import Flat, Image, Qcow2
from minidriver.lockutils import external_lock
from minidriver.steps import StepTimer

GiB = 1024**3
MiB = 1024**2
BASE_SIZE = 64 * MiB


@pytest.fixture
def conf(tmp_path: Path) -> Config:
    return load_config(None, state_dir=tmp_path / "state", environ={})


# -- external_lock ------------------------------------------------------------------


def test_lock_file_exists_while_held_and_is_removed_after(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    with external_lock(locks, "base"):
        assert (locks / "base").exists()
    assert list(locks.iterdir()) == []


def test_lock_file_is_removed_after_an_error_too(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    with pytest.raises(RuntimeError), external_lock(locks, "base"):
        raise RuntimeError("inside")
    assert list(locks.iterdir()) == []
    with external_lock(locks, "base"):  # and it can be taken again
        pass


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_lock_names_cannot_leave_the_lock_dir(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="bad lock name"), external_lock(tmp_path, name):
        pass


def test_lock_blocks_another_thread_until_released(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    acquired = threading.Event()

    def other() -> None:
        with external_lock(locks, "base"):
            acquired.set()

    with external_lock(locks, "base"):
        thread = threading.Thread(target=other)
        thread.start()
        assert not acquired.wait(0.3)
    assert acquired.wait(10)
    thread.join(10)
    assert list(locks.iterdir()) == []


def test_different_names_do_not_exclude_each_other(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    acquired = threading.Event()

    def other() -> None:
        with external_lock(locks, "other"):
            acquired.set()

    with external_lock(locks, "base"):
        thread = threading.Thread(target=other)
        thread.start()
        assert acquired.wait(10)
    thread.join(10)


def increment(counter: Path) -> None:
    """A read-modify-write that loses updates unless it is serialised."""
    value = int(counter.read_text())
    time.sleep(0)  # let another thread run between the read and the write
    counter.write_text(str(value + 1))


def test_lock_excludes_across_threads(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    counter = tmp_path / "counter"
    counter.write_text("0")
    threads, rounds = 4, 100
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        for _ in range(rounds):
            with external_lock(locks, "counter"):
                increment(counter)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert int(counter.read_text()) == threads * rounds
    assert list(locks.iterdir()) == []


WORKER = """
import sys, time
from pathlib import Path
from minidriver.lockutils import external_lock

locks, counter, ready, go = (Path(arg) for arg in sys.argv[1:5])
ready.touch()
while not go.exists():
    time.sleep(0.001)
for _ in range(int(sys.argv[5])):
    with external_lock(locks, "counter"):
        value = int(counter.read_text())
        time.sleep(0)
        counter.write_text(str(value + 1))
"""


def test_lock_excludes_across_processes(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    counter = tmp_path / "counter"
    counter.write_text("0")
    go = tmp_path / "go"
    processes, rounds = 2, 300
    ready = [tmp_path / f"ready-{i}" for i in range(processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, locks, counter, flag, go, str(rounds)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 60
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both interpreters are up: start together
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert int(counter.read_text()) == processes * rounds
    assert list(locks.iterdir()) == []


# -- Image.cache ------------------------------------------------------------------


def make_base(target: Path) -> None:
    """A raw base with data at its start, written without our qemu_img module."""
    with open(target, "wb") as fh:
        fh.write(b"\xab" * MiB)
        fh.truncate(BASE_SIZE)


def test_cache_from_four_threads_fetches_once(conf: Config) -> None:
    threads = 4
    calls: list[Path] = []
    calls_lock = threading.Lock()
    start = threading.Barrier(threads)
    hits: dict[int, bool] = {}
    errors: list[BaseException] = []

    def fetch(target: Path) -> str:
        with calls_lock:
            calls.append(target)
        time.sleep(0.2)  # a slow download: the others must wait, not fetch too
        make_base(target)
        return "raw"

    def disk_path(i: int) -> Path:
        return conf.instances_path / f"instance-{i}" / "disk"

    def boot(i: int) -> None:
        disk_path(i).parent.mkdir(parents=True)
        image = Qcow2(conf, disk_path(i), StepTimer())
        start.wait()
        try:
            hits[i] = image.cache(fetch, "shared-base", 1 * GiB)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=boot, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)

    assert errors == []
    base = conf.base_dir / "shared-base"
    assert calls == [base]
    assert sorted(hits.values()) == [False, True, True, True]
    for i in range(threads):
        info = img_info(disk_path(i))
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == 1 * GiB
        assert info["full-backing-filename"] == os.fspath(base)
    assert img_info(base)["virtual-size"] == BASE_SIZE
    assert list(conf.locks_dir.iterdir()) == []


def test_failed_fetch_leaves_the_lock_free_and_the_next_call_fetches(conf: Config) -> None:
    disk = conf.instances_path / "i" / "disk"
    disk.parent.mkdir(parents=True)
    image = Qcow2(conf, disk, StepTimer())

    def broken(target: Path) -> str:
        raise MinidriverError("download failed")

    with pytest.raises(MinidriverError, match="download failed"):
        image.cache(broken, "base", 1 * GiB)
    assert not (conf.base_dir / "base").exists()
    assert not disk.exists()
    assert list(conf.locks_dir.iterdir()) == []

    calls: list[Path] = []

    def fetch(target: Path) -> str:
        calls.append(target)
        make_base(target)
        return "raw"

    assert image.cache(fetch, "base", 1 * GiB) is False
    assert calls == [conf.base_dir / "base"]
    assert disk.exists()


def test_half_made_base_is_not_left_under_its_final_name(conf: Config) -> None:
    disk = conf.instances_path / "i" / "disk.local"
    disk.parent.mkdir(parents=True)

    def half(target: Path) -> str:
        target.write_bytes(b"\0" * 4096)  # qemu-img create worked...
        raise OSError(28, "No space left on device")  # ...mkfs did not

    with pytest.raises(OSError, match="No space"):
        Qcow2(conf, disk, StepTimer()).cache(half, "ephemeral_1_40d1d2c", 1 * GiB)
    assert not (conf.base_dir / "ephemeral_1_40d1d2c").exists()


def test_a_base_larger_than_the_disk_is_refused(conf: Config) -> None:
    disk = conf.instances_path / "i" / "disk"
    disk.parent.mkdir(parents=True)

    def fetch(target: Path) -> str:
        make_base(target)
        return "raw"

    with pytest.raises(MinidriverError, match="smaller than the image"):
        Qcow2(conf, disk, StepTimer()).cache(fetch, "base", 32 * MiB)
    assert not disk.exists()
    assert (conf.base_dir / "base").exists()  # the cache keeps what it fetched
    assert list(conf.locks_dir.iterdir()) == []


def test_flat_disk_is_a_full_copy_grown_to_size(conf: Config) -> None:
    disk = conf.instances_path / "i" / "disk"
    disk.parent.mkdir(parents=True)

    def fetch(target: Path) -> str:
        make_base(target)
        return "raw"

    image: Image = Flat(conf, disk, StepTimer())
    assert image.cache(fetch, "base", 1 * GiB) is False
    info = img_info(disk)
    assert info["format"] == "raw"
    assert info["virtual-size"] == 1 * GiB
    assert "backing-filename" not in info
    with open(disk, "rb") as fh:
        assert fh.read(MiB) == b"\xab" * MiB
    # A copy, not a link: the base is untouched by writes to the disk.
    assert disk.stat().st_ino != (conf.base_dir / "base").stat().st_ino
