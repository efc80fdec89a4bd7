"""The image cache manager on real files: real bases, real qemu-img overlays with
backing files, ages set with os.utime and a clock handed in.

Nothing is mocked except to inject a fault (a failing unlink, a slow overlay). Files
are read with qemu-img directly, not through our qemu_img module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from minidriver import lockutils
from minidriver.config import Config, load_config
from minidriver.db import InstanceRecord
from minidriver.driver import base_filename
from minidriver.imagebackend import Qcow2, ephemeral_filename, swap_filename
from minidriver.imagecache import (
    BaseKind,
    CachedFile,
    ImageCacheError,
    ImageCacheManager,
    ImageCacheSettings,
    PassResult,
    backing_files_in_use,
    instances_in_use,
    lock_names,
    merge,
    run_loop,
)
from minidriver.images import inspect, qemu_img
from minidriver.images.fetch import TrustedBases
from minidriver.lockutils import external_lock
from minidriver.steps import StepTimer

GiB = 1024**3
MiB = 1024**2
NOW = 1_700_000_000.0
DAY = 86400
HOUR = 3600

SHA_A = hashlib.sha1(b"image-a").hexdigest()
SHA_B = hashlib.sha1(b"image-b").hexdigest()
SHA_C = hashlib.sha1(b"image-c").hexdigest()
EPHEMERAL = ephemeral_filename(1, "ext4")  # ephemeral_1_<md5("ext4")[:7]>
SWAP = swap_filename(64)

UUID_1 = "11111111-1111-4111-8111-111111111111"
UUID_2 = "22222222-2222-4222-8222-222222222222"
UUID_3 = "33333333-3333-4333-8333-333333333333"


# -- helpers ------------------------------------------------------------------------


def run(*args: str | os.PathLike[str]) -> str:
    return subprocess.run(
        [os.fspath(a) for a in args], check=True, capture_output=True, text=True
    ).stdout


def img_info(path: Path, fmt: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(
        run("qemu-img", "info", "--force-share", "--output=json", "-f", fmt, path)
    )
    return info


def make_raw(path: Path, size: int = 16 * MiB, data: int = MiB) -> Path:
    """A sparse raw file with ``data`` bytes of 0xab at its start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"\xab" * data)
        fh.truncate(size)
    return path


def make_overlay(base: Path | str, disk: Path, backing_fmt: str = "raw") -> Path:
    disk.parent.mkdir(parents=True, exist_ok=True)
    run("qemu-img", "create", "-f", "qcow2", "-F", backing_fmt, "-b", base, disk, "1G")
    return disk


def set_age(path: Path, age: float, now: float = NOW) -> None:
    os.utime(path, (now - age, now - age))


def snapshot(*dirs: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every file under ``dirs``: (inode, size, mtime, mode), to compare before/after."""
    seen = {}
    for top in dirs:
        for root, subdirs, files in os.walk(top):
            for name in subdirs + files:
                st = os.lstat(os.path.join(root, name))
                seen[os.path.join(root, name)] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
        if top.exists():
            st = os.lstat(top)
            seen[os.fspath(top)] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
    return seen


class Layout:
    """``<tmp>/instances`` with ``_base`` and ``locks``, as the driver lays them out."""

    def __init__(self, root: Path) -> None:
        self.instances = root / "instances"
        self.base_dir = self.instances / "_base"
        self.locks = self.instances / "locks"
        self.base_dir.mkdir(parents=True)

    def base(self, name: str, *, age: float = 0, size: int = 16 * MiB) -> Path:
        path = make_raw(self.base_dir / name, size)
        set_age(path, age)
        return path

    def manager(
        self, clock: Callable[[], float] = lambda: NOW, **options: Any
    ) -> ImageCacheManager:
        return ImageCacheManager(
            self.base_dir,
            self.locks,
            self.instances,
            ImageCacheSettings(**options),
            clock=clock,
        )

    def in_use(self) -> dict[str, set[str]]:
        return backing_files_in_use(self.instances, self.base_dir)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


def by_name(files: list[CachedFile] | tuple[CachedFile, ...]) -> dict[str, CachedFile]:
    return {f.name: f for f in files}


# -- names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "locks"),
    [
        (SHA_A, BaseKind.ORIGINAL, (SHA_A,)),
        (base_filename("0b6e2e5e-3f4a-4b8c-9d21-2f6f3c1e9a77"), BaseKind.ORIGINAL, None),
        (f"{SHA_A}_10", BaseKind.RESIZED, (SHA_A, f"{SHA_A}_10")),
        (f"{SHA_A}_0", BaseKind.RESIZED, (SHA_A, f"{SHA_A}_0")),
        (EPHEMERAL, BaseKind.EPHEMERAL, (EPHEMERAL,)),
        ("ephemeral_20_default", BaseKind.EPHEMERAL, ("ephemeral_20_default",)),
        (SWAP, BaseKind.SWAP, (SWAP,)),
        (f"{SHA_A}.part", BaseKind.PARTIAL, (SHA_A,)),
        (f"{SHA_A}.converted", BaseKind.PARTIAL, (SHA_A,)),
        (f"{SHA_A}_10.part", BaseKind.PARTIAL, (f"{SHA_A}_10",)),
        (f"{EPHEMERAL}.part", BaseKind.PARTIAL, (EPHEMERAL,)),
        (f"{SWAP}.part", BaseKind.PARTIAL, (SWAP,)),
        # Not cache files: listed never, removed never.
        (SHA_A[:39], None, None),
        (SHA_A.upper(), None, None),
        (f"{SHA_A}.info", None, None),  # old Nova's image info files
        (f"{SHA_A}_10_2", None, None),
        (f"{SHA_A}_x", None, None),
        ("swap_", None, None),
        ("swap_64M", None, None),
        ("ephemeral_1", None, None),
        ("notes.part", None, None),
        (".part", None, None),
        (f"{SHA_A}.part.part", None, None),
        ("README", None, None),
    ],
)
def test_every_kind_of_name_is_classified(
    name: str, kind: BaseKind | None, locks: tuple[str, ...] | None
) -> None:
    assert BaseKind.of(name) is kind
    if locks is not None:
        assert lock_names(name) == locks


def test_thresholds_by_kind() -> None:
    settings = ImageCacheSettings(
        remove_unused_original_minimum_age_seconds=10,
        remove_unused_resized_minimum_age_seconds=5,
    )
    assert BaseKind.ORIGINAL.min_age(settings) == 10
    assert BaseKind.EPHEMERAL.min_age(settings) == 10
    assert BaseKind.SWAP.min_age(settings) == 10
    assert BaseKind.RESIZED.min_age(settings) == 5
    assert BaseKind.PARTIAL.min_age(settings) is None


def test_settings_have_novas_names_and_defaults() -> None:
    assert ImageCacheSettings() == ImageCacheSettings(
        remove_unused_base_images=True,
        remove_unused_original_minimum_age_seconds=86400,
        remove_unused_resized_minimum_age_seconds=3600,
        manager_interval=2400,
        subdirectory_name="_base",
    )


# -- listing ------------------------------------------------------------------------


def test_list_reports_kinds_and_sizes_of_real_files(layout: Layout, tmp_path: Path) -> None:
    base_dir = layout.base_dir
    original = layout.base(SHA_A, size=64 * MiB)
    run("qemu-img", "create", "-f", "qcow2", base_dir / SHA_B, "2G")  # force_raw_images off
    resized = make_raw(base_dir / f"{SHA_A}_1", 1 * GiB, 2 * MiB)
    ephemeral = base_dir / EPHEMERAL
    run("qemu-img", "create", "-f", "raw", ephemeral, "1G")
    run("mkfs", "-t", "ext4", "-F", "-q", "-L", "ephemeral0", ephemeral)
    swap = base_dir / SWAP
    run("qemu-img", "create", "-f", "raw", swap, "64M")
    run("mkswap", swap)
    part = make_raw(base_dir / f"{SHA_C}.part", 8 * MiB)
    # Neither listed nor ever removed: unknown names, a directory, symlinks.
    (base_dir / "README").write_text("not a base")
    (base_dir / f"{SHA_A}.info").write_text("{}")
    (base_dir / "swap_128").mkdir()
    outside = make_raw(tmp_path / "outside", MiB)
    (base_dir / SHA_C).symlink_to(outside)

    files = by_name(layout.manager().list({}))

    assert {name: f.kind for name, f in files.items()} == {
        SHA_A: BaseKind.ORIGINAL,
        SHA_B: BaseKind.ORIGINAL,
        f"{SHA_A}_1": BaseKind.RESIZED,
        EPHEMERAL: BaseKind.EPHEMERAL,
        SWAP: BaseKind.SWAP,
        f"{SHA_C}.part": BaseKind.PARTIAL,
    }
    for path in (original, resized, ephemeral, swap):
        info = img_info(path, "raw")
        assert files[path.name].virtual_size == info["virtual-size"], path.name
        assert files[path.name].actual_size == info["actual-size"], path.name
        assert files[path.name].path == path
    assert files[SHA_B].virtual_size == img_info(base_dir / SHA_B, "qcow2")["virtual-size"]
    assert files[SHA_B].virtual_size == 2 * GiB
    assert files[f"{SHA_C}.part"].virtual_size is None
    assert files[f"{SHA_C}.part"].actual_size == part.stat().st_blocks * 512


def test_list_changes_nothing(layout: Layout) -> None:
    layout.base(SHA_A, age=10 * DAY)
    make_raw(layout.base_dir / f"{SHA_B}.part")
    make_overlay(layout.base_dir / SHA_A, layout.instances / UUID_1 / "disk")
    before = snapshot(layout.instances)
    layout.manager().list(layout.in_use())
    assert snapshot(layout.instances) == before


def test_list_of_a_missing_cache_is_empty(tmp_path: Path) -> None:
    manager = ImageCacheManager(
        tmp_path / "none" / "_base", tmp_path / "locks", tmp_path / "none", ImageCacheSettings()
    )
    assert manager.list({}) == []
    assert manager.update({}).files == ()
    assert backing_files_in_use(tmp_path / "none", tmp_path / "none" / "_base") == {}


# -- what is in use -----------------------------------------------------------------


def test_backing_files_in_use_follows_real_overlays(layout: Layout, tmp_path: Path) -> None:
    inst, base_dir = layout.instances, layout.base_dir
    for name in (SHA_A, SHA_B, f"{SHA_B}_1", EPHEMERAL, SWAP, SHA_C):
        layout.base(name)
    # Instance 1: root, ephemeral and swap overlays on their bases; a config drive.
    make_overlay(base_dir / SHA_A, inst / UUID_1 / "disk")
    make_overlay(base_dir / EPHEMERAL, inst / UUID_1 / "disk.local")
    make_overlay(base_dir / SWAP, inst / UUID_1 / "disk.swap")
    make_raw(inst / UUID_1 / "disk.config", MiB)
    (inst / UUID_1 / "disk.info").write_text(
        json.dumps(
            {
                os.fspath(inst / UUID_1 / n): f
                for n, f in [
                    ("disk", "qcow2"),
                    ("disk.local", "qcow2"),
                    ("disk.swap", "qcow2"),
                    ("disk.config", "raw"),
                ]
            }
        )
    )
    # Instance 2: the seeds' resized chain (disk -> <sha1>_1 -> copy of <sha1>), with
    # a backing path relative to the disk, and no disk.info yet (mid-spawn).
    make_overlay(f"../_base/{SHA_B}_1", inst / UUID_2 / "disk")
    make_overlay(base_dir / SHA_A, inst / UUID_2 / "disk.local")
    # Instance 3: a raw (Flat) disk, no backing file; and a disk whose chain leaves the
    # instance dir through a qcow2 of its own before reaching _base.
    make_raw(inst / UUID_3 / "disk", 64 * MiB)
    middle = make_overlay(base_dir / SWAP, tmp_path / "elsewhere" / "middle.qcow2")
    make_overlay(middle, inst / UUID_3 / "disk.swap", backing_fmt="qcow2")
    # Not instances: a snapshot's work file, a lock, a file at the top level.
    make_overlay(base_dir / SHA_C, inst / "snapshots" / "work" / "disk")
    make_overlay(base_dir / SHA_C, inst / "locks" / "disk")
    make_overlay(base_dir / SHA_C, inst / "disk")

    assert backing_files_in_use(inst, base_dir) == {
        SHA_A: {UUID_1, UUID_2},
        EPHEMERAL: {UUID_1},
        SWAP: {UUID_1, UUID_3},
        f"{SHA_B}_1": {UUID_2},
        SHA_B: {UUID_2},  # the original of a resized base stays with it
    }


def test_a_raw_disk_that_looks_like_qcow2_is_not_read(layout: Layout) -> None:
    """disk.info says raw: the qcow2 header inside is the guest's, not a backing file."""
    layout.base(SHA_A)
    disk = make_overlay(layout.base_dir / SHA_A, layout.instances / UUID_1 / "disk")
    (disk.parent / "disk.info").write_text(json.dumps({os.fspath(disk): "raw"}))
    assert layout.in_use() == {}


def test_a_backing_file_outside_the_cache_is_not_a_base(layout: Layout, tmp_path: Path) -> None:
    other = make_raw(tmp_path / "_base" / SHA_A)  # same names, another directory
    make_overlay(other, layout.instances / UUID_1 / "disk")
    assert layout.in_use() == {}


def test_an_empty_disk_backs_nothing(layout: Layout) -> None:
    """qemu-img create has only opened it; the spawn holds the lock of its base."""
    disk = layout.instances / UUID_1 / "disk"
    disk.parent.mkdir(parents=True)
    disk.touch()
    assert layout.in_use() == {}


def test_an_unreadable_qcow2_disk_stops_the_pass(layout: Layout) -> None:
    old = layout.base(SHA_A, age=10 * DAY)
    disk = layout.instances / UUID_1 / "disk"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"QFI\xfb" + b"\xff" * 508)  # a qcow2 magic, then nonsense
    with pytest.raises(ImageCacheError, match="cannot read the backing chain") as err:
        layout.in_use()
    assert err.value.hint is not None
    # The driver's loop logs it and removes nothing in that pass.
    stop = threading.Event()
    assert run_loop(layout.manager(), layout.in_use, 0.01, stop=stop, passes=1) == 0
    assert old.exists()


def test_merge_and_instances_in_use() -> None:
    records = [
        InstanceRecord(uuid, f"instance-{i:08x}", f"vm{i}", "t1.nano", image, "running", "", "")
        for i, (uuid, image) in enumerate([(UUID_1, "image-a"), (UUID_2, "image-a"), (UUID_3, "b")])
    ]
    from_db = instances_in_use(records, base_filename)
    assert from_db == {base_filename("image-a"): {UUID_1, UUID_2}, base_filename("b"): {UUID_3}}
    merged = merge(from_db, {base_filename("b"): {UUID_1}, SWAP: {UUID_2}}, {})
    assert merged == {
        base_filename("image-a"): {UUID_1, UUID_2},
        base_filename("b"): {UUID_1, UUID_3},
        SWAP: {UUID_2},
    }
    assert from_db[base_filename("b")] == {UUID_3}  # the inputs are left as they were


# -- what a pass removes ------------------------------------------------------------


def test_a_base_in_use_is_never_removed_and_its_mtime_is_renewed(layout: Layout) -> None:
    ancient = 10 * 365 * DAY
    for name in (SHA_A, f"{SHA_B}_1", SHA_B, EPHEMERAL, SWAP):
        layout.base(name, age=ancient)
    make_overlay(layout.base_dir / SHA_A, layout.instances / UUID_1 / "disk")
    make_overlay(layout.base_dir / f"{SHA_B}_1", layout.instances / UUID_2 / "disk")
    make_overlay(layout.base_dir / EPHEMERAL, layout.instances / UUID_2 / "disk.local")
    make_overlay(layout.base_dir / SWAP, layout.instances / UUID_2 / "disk.swap")
    manager = layout.manager(
        remove_unused_original_minimum_age_seconds=0, remove_unused_resized_minimum_age_seconds=0
    )

    result = manager.update(layout.in_use(), recheck=layout.in_use)

    assert result.removed == ()
    assert sorted(result.touched) == sorted([SHA_A, f"{SHA_B}_1", SHA_B, EPHEMERAL, SWAP])
    for f in result.files:
        assert f.path.exists()
        assert f.path.stat().st_mtime == NOW  # the unused clock starts again
        assert not f.removable
        assert f.reason.startswith("in use by 1 instance"), f.reason
    assert by_name(result.files)[SHA_A].used_by == (UUID_1,)
    assert by_name(result.files)[SHA_A].age_seconds == ancient  # as found


@pytest.mark.parametrize(
    ("name", "age", "removed"),
    [
        (SHA_A, DAY - 1, False),
        (SHA_A, DAY + 1, True),
        (f"{SHA_A}_1", HOUR - 1, False),
        (f"{SHA_A}_1", HOUR + 1, True),
        (EPHEMERAL, DAY - 1, False),
        (EPHEMERAL, HOUR + 1, False),  # the original's threshold, not the resized one
        (EPHEMERAL, DAY + 1, True),
        (SWAP, DAY - 1, False),
        (SWAP, HOUR + 1, False),
        (SWAP, DAY + 1, True),
    ],
)
def test_unused_files_go_once_old_enough(
    layout: Layout, name: str, age: float, removed: bool
) -> None:
    path = layout.base(name, age=age)
    freed = path.stat().st_blocks * 512
    manager = layout.manager()  # Nova's defaults: a day, an hour

    assert by_name(manager.list({}))[name].removable is removed
    result = manager.update(layout.in_use(), recheck=layout.in_use)

    assert path.exists() is not removed
    verdict = by_name(result.files)[name]
    assert verdict.removable is removed
    assert verdict.age_seconds == age
    assert verdict.used_by == ()
    assert str(int(age)) in verdict.reason
    assert [f.name for f in result.removed] == ([name] if removed else [])
    assert result.bytes_freed == (freed if removed else 0)
    assert result.touched == ()
    if not removed:
        assert path.stat().st_mtime == NOW - age  # an unused file is never touched


def test_nothing_is_removed_when_remove_unused_base_images_is_off(layout: Layout) -> None:
    names = (SHA_A, f"{SHA_A}_1", EPHEMERAL, SWAP, f"{SHA_B}.part")
    for name in names:
        layout.base(name, age=100 * DAY)
    layout.base(SHA_C, age=100 * DAY)
    make_overlay(layout.base_dir / SHA_C, layout.instances / UUID_1 / "disk")
    manager = layout.manager(remove_unused_base_images=False)

    result = manager.update(layout.in_use(), recheck=layout.in_use)

    assert result.removed == ()
    assert result.bytes_freed == 0
    assert result.touched == (SHA_C,)  # in-use files are still marked
    for name in names:
        assert (layout.base_dir / name).exists()
        assert "remove_unused_base_images is off" in by_name(result.files)[name].reason
    assert len(result.files) == len(names) + 1


def test_a_stale_partial_file_goes_whatever_its_age(layout: Layout) -> None:
    """Its lock is free: the process that wrote it is gone (it would hold the lock)."""
    stale = [f"{SHA_A}.part", f"{SHA_A}.converted", f"{SHA_B}_1.part", f"{EPHEMERAL}.part"]
    for name in stale:
        layout.base(name, age=0)  # written a moment ago, yet nobody is writing it
    result = layout.manager().update({})
    assert sorted(f.name for f in result.removed) == sorted(stale)
    assert all(f.kind is BaseKind.PARTIAL for f in result.removed)
    assert list(layout.base_dir.iterdir()) == []
    assert list(layout.locks.iterdir()) == []  # the lock protocol cleans up after itself


HOLDER = """
import sys, time
from pathlib import Path
from minidriver.lockutils import external_lock

with external_lock(Path(sys.argv[1]), sys.argv[2]):
    Path(sys.argv[3]).touch()
    while not Path(sys.argv[4]).exists():
        time.sleep(0.01)
"""


HoldLock = Callable[[str], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def held_by_thread(locks: Path, name: str) -> Iterator[None]:
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with external_lock(locks, name):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join(10)


@contextlib.contextmanager
def held_by_process(locks: Path, name: str, flags: Path) -> Iterator[None]:
    ready, go = flags / f"ready-{name}", flags / f"go-{name}"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, locks, name, ready, go])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        yield
    finally:
        go.touch()
        assert proc.wait(30) == 0


@pytest.fixture(params=["thread", "process"])
def hold_lock(request: pytest.FixtureRequest, layout: Layout, tmp_path: Path) -> HoldLock:
    """``with hold_lock(name):`` another thread, or another process, holds that lock."""
    if request.param == "thread":
        return lambda name: held_by_thread(layout.locks, name)
    return lambda name: held_by_process(layout.locks, name, tmp_path)


def test_a_partial_file_being_written_is_kept(layout: Layout, hold_lock: HoldLock) -> None:
    part = layout.base(f"{SHA_A}.part", age=30 * DAY)
    manager = layout.manager()
    with hold_lock(SHA_A):
        assert lockutils.is_held(layout.locks, SHA_A)
        listed = by_name(manager.list({}))[part.name]
        assert (listed.removable, listed.reason) == (False, "being written: its lock is held")
        result = manager.update({})
        assert result.removed == ()
        assert by_name(result.files)[part.name].reason == "being written: its lock is held"
        assert part.exists()
    assert not lockutils.is_held(layout.locks, SHA_A)
    assert [f.name for f in manager.update({}).removed] == [part.name]
    assert not part.exists()


def test_a_base_whose_lock_is_held_is_kept(layout: Layout, hold_lock: HoldLock) -> None:
    """A held lock is a spawn using the base right now; the pass does not wait for it."""
    original = layout.base(SHA_A, age=30 * DAY)
    resized = layout.base(f"{SHA_B}_1", age=30 * DAY)
    manager = layout.manager()
    # The resized copy is removed under its original's lock too, as spawn takes them.
    with hold_lock(SHA_A), hold_lock(SHA_B):
        started = time.monotonic()
        result = manager.update({}, recheck=dict)
        assert time.monotonic() - started < 5
        assert result.removed == ()
        for name in (SHA_A, f"{SHA_B}_1"):
            verdict = by_name(result.files)[name]
            assert (verdict.removable, verdict.reason) == (False, "busy: a spawn holds its lock")
    assert original.exists() and resized.exists()
    removed = manager.update({}, recheck=dict).removed
    assert sorted(f.name for f in removed) == sorted([SHA_A, f"{SHA_B}_1"])


def test_recheck_runs_under_the_locks_and_keeps_a_new_user(layout: Layout) -> None:
    """A spawn that began using a base after ``in_use`` was made: the file stays."""
    for name in (SHA_A, SHA_B, f"{SHA_B}_1", SWAP):
        layout.base(name, age=30 * DAY)
    stale = layout.in_use()
    assert stale == {}
    make_overlay(layout.base_dir / f"{SHA_B}_1", layout.instances / UUID_1 / "disk")
    held: dict[str, bool] = {}

    def recheck() -> dict[str, set[str]]:
        for name in (SHA_A, SHA_B, f"{SHA_B}_1", SWAP):
            held[name] = lockutils.is_held(layout.locks, name)
        return layout.in_use()

    result = layout.manager().update(stale, recheck=recheck)

    assert held == dict.fromkeys((SHA_A, SHA_B, f"{SHA_B}_1", SWAP), True)
    assert sorted(f.name for f in result.removed) == sorted([SHA_A, SWAP])
    for name in (SHA_B, f"{SHA_B}_1"):
        verdict = by_name(result.files)[name]
        assert not verdict.removable
        assert verdict.used_by == (UUID_1,)
        assert verdict.reason == "in use by 1 instance (since the scan)"
        assert (layout.base_dir / name).stat().st_mtime == NOW
    assert list(layout.locks.iterdir()) == []


def test_without_recheck_only_the_age_is_checked_again(layout: Layout) -> None:
    """Nova's own re-check: a spawn touches the base under the lock it took."""
    times = iter([NOW, NOW - 2 * DAY])  # the listing's clock, then the one in the lock
    path = layout.base(SHA_A, age=DAY + 1)
    result = layout.manager(clock=lambda: next(times)).update({})
    assert result.removed == ()
    assert path.exists()
    assert "removed once unused for 86400 s" in by_name(result.files)[SHA_A].reason


def test_dry_run_changes_nothing_yet_reports_what_it_would_remove(layout: Layout) -> None:
    layout.base(SHA_A, age=30 * DAY)  # in use
    make_overlay(layout.base_dir / SHA_A, layout.instances / UUID_1 / "disk")
    old = [layout.base(n, age=30 * DAY) for n in (SHA_B, f"{SHA_C}_2", EPHEMERAL, SWAP)]
    young = layout.base(SHA_C, age=60)
    part = layout.base(f"{SHA_C}.part")
    manager = layout.manager()
    before = snapshot(layout.instances)

    result = manager.update(layout.in_use(), dry_run=True, recheck=layout.in_use)

    assert snapshot(layout.instances) == before
    assert result.dry_run
    assert result.touched == ()
    assert sorted(f.name for f in result.removed) == sorted([p.name for p in old] + [part.name])
    assert result.bytes_freed == sum(p.stat().st_blocks * 512 for p in [*old, part])
    assert not by_name(result.files)[young.name].removable
    assert not by_name(result.files)[SHA_A].removable
    # What list() says is what the dry run says, and what the real pass then does.
    assert manager.list(layout.in_use()) == list(result.files)
    real = manager.update(layout.in_use(), recheck=layout.in_use)
    assert [f.name for f in real.removed] == [f.name for f in result.removed]
    assert real.bytes_freed == result.bytes_freed


def test_symlinks_and_unknown_files_are_never_removed(layout: Layout, tmp_path: Path) -> None:
    target = make_raw(tmp_path / "precious" / SHA_A, MiB)
    link = layout.base_dir / SHA_A
    link.symlink_to(target)
    (layout.base_dir / SWAP).symlink_to(tmp_path / "precious")
    unknown = layout.base(f"{SHA_B}.info", age=100 * DAY)
    set_age(target, 100 * DAY)
    manager = layout.manager(
        remove_unused_original_minimum_age_seconds=0, remove_unused_resized_minimum_age_seconds=0
    )
    result = manager.update({})
    assert result.files == ()
    assert link.is_symlink() and target.exists() and unknown.exists()
    assert (tmp_path / "precious").is_dir()


def test_a_failed_removal_is_reported_and_the_pass_goes_on(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck = layout.base(SHA_A, age=30 * DAY)
    gone = layout.base(SHA_B, age=30 * DAY)
    real_unlink = os.unlink

    def failing_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(path) == os.fspath(stuck):  # the injected fault
            raise PermissionError(13, "Permission denied", os.fspath(path))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", failing_unlink)
    result = layout.manager().update({})
    assert [f.name for f in result.removed] == [SHA_B]
    assert result.errors == (f"{SHA_A}: Permission denied",)
    assert by_name(result.files)[SHA_A].reason == "removal failed: Permission denied"
    assert stuck.exists() and not gone.exists()


# -- the periodic loop --------------------------------------------------------------


def test_run_loop_runs_passes_and_reports_them(layout: Layout) -> None:
    layout.base(SHA_A, age=30 * DAY)
    results: list[PassResult] = []
    stop = threading.Event()
    done = run_loop(
        layout.manager(), layout.in_use, 0.01, stop=stop, passes=3, report=results.append
    )
    assert done == 3
    assert [len(r.removed) for r in results] == [1, 0, 0]


def test_run_loop_survives_a_failing_pass_and_stops_when_told(layout: Layout) -> None:
    calls = 0
    stop = threading.Event()

    def in_use() -> dict[str, set[str]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ImageCacheError("a disk cannot be read")
        if calls >= 3:
            stop.set()
        return {}

    done = run_loop(layout.manager(), in_use, 0.01, stop=stop)
    assert stop.is_set()
    assert (calls, done) == (3, 2)
    with pytest.raises(ValueError, match="positive"):
        run_loop(layout.manager(), in_use, 0, stop=stop)


def test_run_loop_waits_the_interval_between_passes(layout: Layout) -> None:
    stop = threading.Event()
    passes: list[float] = []
    thread = threading.Thread(
        target=run_loop,
        args=(layout.manager(), dict, 30.0),
        kwargs={"stop": stop, "report": lambda _r: passes.append(time.monotonic())},
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not passes and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()  # stop ends the wait at once
    assert len(passes) == 1


# -- a pass racing spawns -----------------------------------------------------------


CLEANER_PROCESS = """
import json, sys
from pathlib import Path
from minidriver.config import load_config
from minidriver.imagecache import (
    ImageCacheError, ImageCacheManager, ImageCacheSettings, backing_files_in_use,
)

conf = load_config(None, state_dir=sys.argv[1], environ={})
stop = Path(sys.argv[2])
manager = ImageCacheManager(
    conf.base_dir, conf.locks_dir, conf.instances_path,
    ImageCacheSettings(
        remove_unused_original_minimum_age_seconds=0,
        remove_unused_resized_minimum_age_seconds=0,
    ),
)
def in_use():
    return backing_files_in_use(conf.instances_path, conf.base_dir)
removed = []
while not stop.exists():
    try:
        removed += [f.name for f in manager.update(in_use(), recheck=in_use).removed]
    except ImageCacheError:
        continue
print(json.dumps(removed))
"""


@pytest.mark.parametrize("cleaner_kind", ["thread", "process"])
@pytest.mark.parametrize("resized_base_copies", [False, True], ids=["overlay", "resized"])
def test_a_pass_never_removes_a_base_from_under_a_spawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resized_base_copies: bool, cleaner_kind: str
) -> None:
    """The real Image.cache against passes with both thresholds at 0, in a loop.

    Each spawn takes the base's lock, makes the base if it is missing, makes its overlay
    and lets go; then the instance is deleted, so the next pass may take the base. A
    spawn must never find its base gone before its overlay exists, and while an overlay
    exists its backing file must be there.
    """
    conf: Config = load_config(None, state_dir=tmp_path / "state", environ={})
    conf = conf.with_libvirt(resized_base_copies=resized_base_copies)
    iterations = 100  # per parametrisation: 200 in all
    name = SHA_A
    chained = f"{name}_1" if resized_base_copies else name
    real_create = qemu_img.create_cow_image

    def slow_create(*args: Any, **kwargs: Any) -> list[str]:
        # The injected fault: a slow disk between taking the base and the overlay.
        time.sleep(0.002)
        return real_create(*args, **kwargs)

    monkeypatch.setattr(qemu_img, "create_cow_image", slow_create)

    fetches = 0

    def fetch(target: Path) -> str:
        nonlocal fetches
        fetches += 1
        make_raw(target, 16 * MiB)
        return "raw"

    failures: list[str] = []
    pass_errors: list[BaseException] = []
    removed: list[str] = []
    done = threading.Event()

    def in_use() -> dict[str, set[str]]:
        return backing_files_in_use(conf.instances_path, conf.base_dir)

    manager = ImageCacheManager(
        conf.base_dir,
        conf.locks_dir,
        conf.instances_path,
        ImageCacheSettings(
            remove_unused_original_minimum_age_seconds=0,
            remove_unused_resized_minimum_age_seconds=0,
        ),
    )

    def passes() -> None:
        while not done.is_set():
            try:
                result = manager.update(in_use(), recheck=in_use)
            except ImageCacheError:
                continue  # a disk caught mid-create: the pass removes nothing
            except BaseException as exc:
                pass_errors.append(exc)
                return
            removed.extend(f.name for f in result.removed)

    stop_file = tmp_path / "stop"
    conf.base_dir.mkdir(parents=True, exist_ok=True)
    if cleaner_kind == "thread":
        cleaner = threading.Thread(target=passes)
        cleaner.start()
    else:
        process = subprocess.Popen(
            [sys.executable, "-c", CLEANER_PROCESS, str(conf.state_path), str(stop_file)],
            stdout=subprocess.PIPE,
            text=True,
        )
    try:
        for i in range(iterations):
            disk = conf.instances_path / f"instance-{i}" / "disk"
            disk.parent.mkdir(parents=True)
            try:
                Qcow2(conf, disk, StepTimer()).cache(fetch, name, 1 * GiB)
            except Exception as exc:
                failures.append(f"spawn {i}: {exc}")
                continue
            backing = Path(img_info(disk, "qcow2")["full-backing-filename"])
            if backing != conf.base_dir / chained or not backing.exists():
                failures.append(f"spawn {i}: backing {backing} gone under its overlay")
            shutil.rmtree(disk.parent)
            if i % 10 == 9:  # let a pass take the unused base, for sure, now and then
                deadline = time.monotonic() + 10
                while (conf.base_dir / chained).exists() and time.monotonic() < deadline:
                    time.sleep(0.005)
    finally:
        done.set()
        stop_file.touch()
        if cleaner_kind == "thread":
            cleaner.join(60)
        else:
            out, _ = process.communicate(timeout=60)
            assert process.returncode == 0
            removed.extend(json.loads(out))

    assert failures == []
    assert pass_errors == []
    assert removed.count(chained) >= iterations // 10
    assert fetches >= iterations // 10
    if resized_base_copies:
        assert name in removed


def test_a_pass_drops_the_trust_records_of_bases_that_are_gone(
    layout: Layout, tmp_path: Path
) -> None:
    trusted = TrustedBases(tmp_path / "trusted_bases")
    verdict = inspect.DetectedImage("raw", 16 * MiB)
    old = layout.base(SHA_A, age=2 * DAY)  # unused for two days: this pass removes it
    kept = layout.base(SHA_B, age=0)  # too young to go
    by_hand = layout.base(f"{SHA_B}_10", age=0)
    for base in (old, kept, by_hand):
        trusted.remember(base, "raw", verdict)
    by_hand.unlink()  # removed outside minidriver
    (trusted.records_dir / "garbage").write_text("not json")
    manager = ImageCacheManager(
        layout.base_dir,
        layout.locks,
        layout.instances,
        ImageCacheSettings(),
        clock=lambda: NOW,
        trusted=trusted,
    )

    manager.update(layout.in_use(), dry_run=True)
    assert len(list(trusted.records_dir.iterdir())) == 4  # a dry run changes nothing

    manager.update(layout.in_use(), recheck=layout.in_use)

    assert not old.exists()
    assert sorted(p.name for p in trusted.records_dir.iterdir()) == [SHA_B]
    assert trusted.verdict(kept, "raw") == verdict
