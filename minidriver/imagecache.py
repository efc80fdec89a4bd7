"""The image cache manager keeping ``_base`` from growing (nova/virt/libvirt/imagecache.py).

Every spawn leaves its base files in ``_base``; nothing else ever removes them. A pass
(Nova's ``ImageCacheManager.update``, run by ``_run_image_cache_manager_pass``):

1. lists ``_base`` and names each file's kind (original, resized, ephemeral, swap, or
   a partial ``.part``/``.converted`` left by a download or mkfs);
2. touches every file in use (os.utime), as Nova's ``_mark_in_use`` does, so that the
   "unused for N seconds" clock of a base only starts once its last user is gone;
3. removes what is unused and old enough: originals, ephemeral and swap bases after
   ``remove_unused_original_minimum_age_seconds``, resized copies after
   ``remove_unused_resized_minimum_age_seconds``.

"In use" is a mapping from base file name to the instance uuids using it: the
backing chains of the disks on this host (:func:`backing_files_in_use`) merged with the
bases of the instances in the state database (:func:`instances_in_use`, :func:`merge`).

A removal must never pull a base from under a spawn. ``Image.cache`` holds the base's
lock while it creates the base, touches it and makes the overlay on it, so a removal
takes the same lock and decides again inside it: the file is re-stat'ed (age) and, when
the caller passes ``recheck``, the disks are scanned again (use). Locks are only *tried*
(``LOCK_NB``): a held lock means a spawn is using the file right now, so the pass skips
it instead of stalling behind a download. A resized copy ``<sha1>_<GB>`` is removed
under its original's lock too (spawn's order: original, then resized), because
``Qcow2._resized_base`` lets go of the resized lock before the overlay on it exists.

A ``.part``/``.converted`` file is written only by a holder of its base's lock
(``fetch_to_raw``, ``create_ephemeral``, ``create_swap``, ``_resized_base``), who
keeps it for the whole write. So if that lock can be taken, nobody is writing the file:
it is the leftover of a killed process and is removed whatever its age. Its age says
nothing anyway: a slow download keeps an old mtime between writes to a sparse region.

Only regular files directly in ``_base`` whose names have one of the kinds above are
ever listed or removed: never a symlink, a directory or an unknown name.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from minidriver import lockutils
from minidriver.config import ImageCacheOptions
from minidriver.db import InstanceRecord
from minidriver.exception import MinidriverError
from minidriver.images import inspect, qemu_img
from minidriver.images.fetch import TrustedBases

LOG = logging.getLogger(__name__)

# base file name -> uuids of the instances using it
InUse = Mapping[str, set[str]]
InUseFn = Callable[[], InUse]
Clock = Callable[[], float]

PARTIAL_SUFFIXES = (".part", ".converted")
# Directories of instances_path that are not instance dirs (besides the cache itself).
NOT_INSTANCE_DIRS = frozenset({"locks", "snapshots"})
QCOW2_MAGIC = b"QFI\xfb"
MAX_CHAIN = 16  # backing files followed per disk; a longer chain is not ours
# Locks held at once while re-scanning: bounded, so a pass over a huge cache cannot
# run out of file descriptors.
LOCK_BATCH = 64


class ImageCacheError(MinidriverError):
    """The cache pass cannot tell what is in use, so it removes nothing."""


# The settings are ``[image_cache]`` itself.
ImageCacheSettings = ImageCacheOptions


_SHA1 = r"[0-9a-f]{40}"


class BaseKind(StrEnum):
    ORIGINAL = "original"  # <sha1 of image id>
    RESIZED = "resized"  # <sha1>_<GB>
    EPHEMERAL = "ephemeral"  # ephemeral_<GB>_<fs tag>
    SWAP = "swap"  # swap_<MB>
    PARTIAL = "partial"  # one of the above + .part / .converted: being written, or stale

    @classmethod
    def of(cls, name: str) -> BaseKind | None:
        """The kind of a file named ``name`` in ``_base``; None: not a cache file."""
        for suffix in PARTIAL_SUFFIXES:
            if name.endswith(suffix) and _whole_kind(name.removesuffix(suffix)):
                return cls.PARTIAL
        return _whole_kind(name)

    def min_age(self, settings: ImageCacheSettings) -> int | None:
        """Seconds unused before removal (Nova's thresholds); None: age does not count."""
        if self is BaseKind.PARTIAL:
            return None
        if self is BaseKind.RESIZED:
            return settings.remove_unused_resized_minimum_age_seconds
        return settings.remove_unused_original_minimum_age_seconds


_PATTERNS: tuple[tuple[BaseKind, re.Pattern[str]], ...] = (
    (BaseKind.ORIGINAL, re.compile(_SHA1)),
    (BaseKind.RESIZED, re.compile(rf"{_SHA1}_[0-9]+")),
    (BaseKind.EPHEMERAL, re.compile(r"ephemeral_[0-9]+_[0-9A-Za-z]+")),
    (BaseKind.SWAP, re.compile(r"swap_[0-9]+")),
)


def _whole_kind(name: str) -> BaseKind | None:
    for kind, pattern in _PATTERNS:
        if pattern.fullmatch(name):
            return kind
    return None


def original_of(name: str) -> str | None:
    """``<sha1>`` for a resized copy ``<sha1>_<GB>``; None for any other name."""
    if _whole_kind(name) is BaseKind.RESIZED:
        return name.partition("_")[0]
    return None


def lock_names(name: str) -> tuple[str, ...]:
    """The locks a writer of ``name`` holds, in the order spawn takes them."""
    for suffix in PARTIAL_SUFFIXES:
        stem = name.removesuffix(suffix)
        if stem != name and _whole_kind(stem):
            return (stem,)  # the .part's writer holds its base's lock for the whole write
    original = original_of(name)
    return (original, name) if original else (name,)


@dataclass(frozen=True)
class CachedFile:
    """One file of ``_base`` and what the cache manager does with it."""

    name: str
    path: Path
    kind: BaseKind
    virtual_size: int | None  # None for a partial file, or one whose format is unclear
    actual_size: int  # bytes allocated on disk
    age_seconds: float  # now - mtime
    used_by: tuple[str, ...]  # instance uuids, sorted
    removable: bool  # removed by this pass (or would be: list(), dry runs)
    reason: str  # why it goes or stays


@dataclass(frozen=True)
class PassResult:
    """What one pass saw and did."""

    files: tuple[CachedFile, ...]  # every cache file, with this pass's verdict
    removed: tuple[CachedFile, ...]  # in a dry run: what would have been removed
    bytes_freed: int
    touched: tuple[str, ...]  # in-use files whose mtime was renewed
    errors: tuple[str, ...]  # files that could not be removed, and why
    dry_run: bool = False


# -- what is in use ----------------------------------------------------------------


def merge(*maps: InUse) -> dict[str, set[str]]:
    """The union of several in-use mappings."""
    merged: dict[str, set[str]] = {}
    for mapping in maps:
        for name, uuids in mapping.items():
            merged.setdefault(name, set()).update(uuids)
    return merged


def instances_in_use(
    records: Iterable[InstanceRecord], base_name: Callable[[str], str]
) -> dict[str, set[str]]:
    """The bases of the instances in the state database (``base_name``: the driver's
    ``base_filename``), whether or not their disks exist yet: the image's, and the
    kernel's and ramdisk's of an instance booted from a kernel image."""
    in_use: dict[str, set[str]] = {}
    for record in records:
        for image_id in (record.image_id, record.kernel_id, record.ramdisk_id):
            if image_id:
                in_use.setdefault(base_name(image_id), set()).add(record.uuid)
    return in_use


def _recorded_formats(instance_dir: Path) -> dict[str, str]:
    """``disk.info`` by file name; empty while a spawn has not written it yet."""
    try:
        data = json.loads((instance_dir / "disk.info").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {Path(str(path)).name: str(fmt) for path, fmt in data.items()}


def _is_qcow2(path: Path, recorded: str | None) -> bool:
    """``disk.info`` decides; without it, the header magic does.

    disk.info first: a raw disk's first bytes are the guest's, and a guest that wrote a
    qcow2 header there must not steer (or block) the pass.
    """
    if recorded is not None:
        return recorded == "qcow2"
    with open(path, "rb") as fh:
        return fh.read(len(QCOW2_MAGIC)) == QCOW2_MAGIC


def _disk_info(path: Path) -> qemu_img.QemuImgInfo | None:
    """qemu-img's view of a qcow2 disk; None if it vanished or has no header yet."""
    try:
        if path.stat().st_size == 0:
            # A file qemu-img create has only just opened: its spawn holds the lock of
            # whatever it will back onto, so it protects that base itself.
            return None
        return qemu_img.info(path, "qcow2")
    except FileNotFoundError:
        return None
    except qemu_img.QemuImgError as exc:
        if not path.exists():
            return None  # the instance was deleted while we looked
        raise ImageCacheError(
            f"cannot read the backing chain of {path}: {exc}",
            hint="nothing is removed from the cache while a disk's backing file is unknown",
        ) from exc


def _chain(disk: Path, base_dir: Path) -> Iterator[str]:
    """Names of the files in ``base_dir`` that ``disk``'s backing chain goes through."""
    base_real = os.path.realpath(base_dir)
    path, seen = disk, {os.path.realpath(disk)}
    for _ in range(MAX_CHAIN):
        info = _disk_info(path)
        if info is None or not info.backing_file:
            return
        backing = Path(info.backing_file)
        if not backing.is_absolute():
            backing = path.parent / backing
        # The parent's real path, not the file's: the name in _base is what counts.
        if os.path.realpath(backing.parent) == base_real:
            yield backing.name
        real = os.path.realpath(backing)
        if info.backing_format != "qcow2" or real in seen:
            return
        seen.add(real)
        path = backing


def _disks(instance_dir: Path) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(instance_dir), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if not entry.name.startswith("disk") or entry.name == "disk.info":
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_file(follow_symlinks=False):
                yield Path(entry.path)


def backing_files_in_use(instances_path: Path, base_dir: Path) -> dict[str, set[str]]:
    """Base file name -> uuids of the instances whose disks back onto it.

    Every ``<instances_path>/<uuid>/disk*`` that is qcow2 has its backing chain
    followed; raw disks have none. An instance on a resized copy ``<sha1>_<GB>`` keeps
    the original ``<sha1>`` in use too, as in Nova. Raises :class:`ImageCacheError` if
    a qcow2 disk cannot be read: a pass that cannot see a disk must remove nothing.
    """
    in_use: dict[str, set[str]] = {}
    try:
        entries = sorted(os.scandir(instances_path), key=lambda e: e.name)
    except FileNotFoundError:
        return in_use
    skip = NOT_INSTANCE_DIRS | {base_dir.name}
    for entry in entries:
        if entry.name in skip or not entry.is_dir(follow_symlinks=False):
            continue
        instance_dir = Path(entry.path)
        recorded = _recorded_formats(instance_dir)
        for disk in _disks(instance_dir):
            try:
                if not _is_qcow2(disk, recorded.get(disk.name)):
                    continue
            except FileNotFoundError:
                continue
            for name in _chain(disk, base_dir):
                in_use.setdefault(name, set()).add(entry.name)
                original = original_of(name)
                if original:
                    in_use.setdefault(original, set()).add(entry.name)
    return in_use


# -- locks -------------------------------------------------------------------------
#
# Spawn waits for a base's lock; a pass only tries it (lockutils.try_acquire): it must
# never wait behind a download, and a held lock means the file is in use anyway.


class _LockSet:
    """Locks held together during one batch of removals, each taken once."""

    def __init__(self, lock_dir: Path) -> None:
        self.lock_dir = lock_dir
        self.held: dict[str, int] = {}

    def try_acquire(self, names: Iterable[str]) -> bool:
        """All of ``names`` (in order), or none of those this call took."""
        taken: list[str] = []
        for name in names:
            if name in self.held:
                continue
            fd = lockutils.try_acquire(self.lock_dir, name)
            if fd is None:
                for undo in reversed(taken):
                    lockutils.release(self.lock_dir, undo, self.held.pop(undo))
                return False
            self.held[name] = fd
            taken.append(name)
        return True

    def release(self) -> None:
        while self.held:
            name, fd = self.held.popitem()
            lockutils.release(self.lock_dir, name, fd)


# -- the manager -------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    path: Path
    kind: BaseKind
    st: os.stat_result


class ImageCacheManager:
    """Lists ``base_dir`` and removes what no instance uses (Nova's ImageCacheManager)."""

    def __init__(
        self,
        base_dir: Path,
        locks_dir: Path,
        instances_path: Path,
        settings: ImageCacheSettings,
        *,
        clock: Clock = time.time,
        trusted: TrustedBases | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.locks_dir = locks_dir
        self.instances_path = instances_path
        self.settings = settings
        self.clock = clock
        # The spawn's records of bases it checked (images/fetch.py): a pass drops
        # those of bases that are gone.
        self.trusted = trusted

    def backing_files_in_use(self) -> dict[str, set[str]]:
        return backing_files_in_use(self.instances_path, self.base_dir)

    def list(self, in_use: InUse) -> builtins.list[CachedFile]:
        """Every cache file and what a pass would do with it now (changes nothing)."""
        now = self.clock()
        return [self._probed(self._describe(e, in_use, now)) for e in self._scan()]

    def update(
        self, in_use: InUse, *, dry_run: bool = False, recheck: InUseFn | None = None
    ) -> PassResult:
        """One pass: touch what is in use, remove what is unused and old enough.

        ``recheck`` returns the in-use mapping afresh (the same function that made
        ``in_use``); it is called again while the candidates' locks are held, so a base
        that a spawn started to use after ``in_use`` was made is seen and kept. Without
        it only the age is checked again inside the lock, as in Nova.
        """
        now = self.clock()
        files: dict[str, CachedFile] = {}
        touched: list[str] = []
        for entry in self._scan():
            cached = self._describe(entry, in_use, now)
            if cached.used_by and not dry_run and self._touch(entry.path, now):
                touched.append(entry.name)
            files[entry.name] = cached
        candidates = [f for f in files.values() if f.removable]
        removed: list[CachedFile] = []
        errors: list[str] = []
        if dry_run:
            for candidate in candidates:
                files[candidate.name] = verdict = self._probed(candidate)
                if verdict.removable:
                    removed.append(verdict)
        else:
            for start in range(0, len(candidates), LOCK_BATCH):
                batch = candidates[start : start + LOCK_BATCH]
                for verdict, error in self._remove_batch(batch, recheck):
                    files[verdict.name] = verdict
                    if verdict.removable:
                        removed.append(verdict)
                    if error:
                        errors.append(error)
            if self.trusted is not None:
                self.trusted.prune()
        return PassResult(
            files=tuple(files.values()),
            removed=tuple(removed),
            bytes_freed=sum(f.actual_size for f in removed),
            touched=tuple(touched),
            errors=tuple(errors),
            dry_run=dry_run,
        )

    # -- listing --

    def _scan(self) -> builtins.list[_Entry]:
        try:
            dirents = sorted(os.scandir(self.base_dir), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        entries = []
        for dirent in dirents:
            kind = BaseKind.of(dirent.name)
            if kind is None:
                LOG.debug("not a cache file, left alone: %s", dirent.path)
                continue
            try:
                st = dirent.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                entries.append(_Entry(dirent.name, Path(dirent.path), kind, st))
        return entries

    def _describe(self, entry: _Entry, in_use: InUse, now: float) -> CachedFile:
        """The verdict from the listing alone (no lock looked at)."""
        used_by = tuple(sorted(in_use.get(entry.name, ())))
        age = now - entry.st.st_mtime
        removable, reason = self._judge(entry.kind, age, len(used_by))
        return CachedFile(
            name=entry.name,
            path=entry.path,
            kind=entry.kind,
            virtual_size=_virtual_size(entry),
            actual_size=entry.st.st_blocks * 512,
            age_seconds=age,
            used_by=used_by,
            removable=removable,
            reason=reason,
        )

    def _judge(self, kind: BaseKind, age: float, users: int) -> tuple[bool, str]:
        if kind is BaseKind.PARTIAL:
            if not self.settings.remove_unused_base_images:
                return False, "stale unless being written; remove_unused_base_images is off"
            return True, "stale: its lock is free, so no one is writing it"
        if users:
            return False, f"in use by {users} instance{'s' if users > 1 else ''}"
        min_age = kind.min_age(self.settings) or 0
        if not self.settings.remove_unused_base_images:
            return False, f"unused for {age:.0f} s; remove_unused_base_images is off"
        if age < min_age:
            return False, f"unused for {age:.0f} s; removed once unused for {min_age} s"
        return True, f"unused for {age:.0f} s (threshold {min_age} s)"

    def _probed(self, cached: CachedFile) -> CachedFile:
        """A removable verdict, corrected if someone holds one of the file's locks."""
        if not cached.removable:
            return cached
        if any(lockutils.is_held(self.locks_dir, n) for n in lock_names(cached.name)):
            return _busy(cached)
        return cached

    def _touch(self, path: Path, now: float) -> bool:
        try:
            os.utime(path, (now, now), follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            LOG.warning("cannot touch in-use base %s: %s", path, exc.strerror)
            return False
        return True

    # -- removal --

    def _remove_batch(
        self, batch: builtins.list[CachedFile], recheck: InUseFn | None
    ) -> builtins.list[tuple[CachedFile, str | None]]:
        locks = _LockSet(self.locks_dir)
        try:
            verdicts: builtins.list[tuple[CachedFile, str | None]] = []
            locked = []
            for candidate in batch:
                if locks.try_acquire(lock_names(candidate.name)):
                    locked.append(candidate)
                else:
                    verdicts.append((_busy(candidate), None))
            if locked:
                # Scanned with the locks held: a spawn that started using one of these
                # files after ``in_use`` was made has finished its overlay by now.
                fresh = recheck() if recheck is not None else None
                verdicts += [self._remove_locked(c, fresh) for c in locked]
            return verdicts
        finally:
            locks.release()

    def _remove_locked(
        self, candidate: CachedFile, fresh: InUse | None
    ) -> tuple[CachedFile, str | None]:
        """Decide again, under the file's lock(s), and remove."""
        kept = replace(candidate, removable=False)
        try:
            st = os.lstat(candidate.path)
        except FileNotFoundError:
            return replace(kept, reason="already gone"), None
        if not stat.S_ISREG(st.st_mode):
            return replace(kept, reason="no longer a regular file"), None
        if candidate.kind is not BaseKind.PARTIAL:
            now = self.clock()
            entry = _Entry(candidate.name, candidate.path, candidate.kind, st)
            candidate = self._describe(entry, fresh or {}, now)
            if candidate.used_by:
                self._touch(candidate.path, now)
                return replace(candidate, reason=f"{candidate.reason} (since the scan)"), None
            if not candidate.removable:
                return candidate, None
        LOG.info("removing %s base file %s: %s", candidate.kind, candidate.path, candidate.reason)
        try:
            os.unlink(candidate.path)
        except OSError as exc:
            LOG.error("cannot remove base file %s: %s", candidate.path, exc.strerror)
            return (
                replace(kept, reason=f"removal failed: {exc.strerror}"),
                f"{candidate.name}: {exc.strerror}",
            )
        return replace(candidate, actual_size=st.st_blocks * 512), None


def _busy(cached: CachedFile) -> CachedFile:
    if cached.kind is BaseKind.PARTIAL:
        return replace(cached, removable=False, reason="being written: its lock is held")
    return replace(cached, removable=False, reason="busy: a spawn holds its lock")


def _virtual_size(entry: _Entry) -> int | None:
    """What the guest sees: by the format inspector (the check that admitted the base),
    not by a format qemu-img would have to guess."""
    if entry.kind is BaseKind.PARTIAL:
        return None
    try:
        return inspect.check_image(entry.path, inspect.AUTO).virtual_size
    except MinidriverError:
        return None


def run_loop(
    manager: ImageCacheManager,
    in_use_fn: InUseFn,
    interval: float,
    *,
    stop: threading.Event,
    passes: int | None = None,
    dry_run: bool = False,
    report: Callable[[PassResult], None] | None = None,
) -> int:
    """Nova's periodic ``_run_image_cache_manager_pass``, for ``cache clean --loop``.

    A pass at once, then one every ``interval`` seconds until ``stop`` is set (or
    ``passes`` have run). A pass that fails is logged and the next one runs on time,
    as with Nova's periodic tasks. Returns the number of passes that succeeded.
    """
    if interval <= 0:
        raise ValueError(f"interval must be positive, not {interval}")
    done = attempts = 0
    while not stop.is_set():
        attempts += 1
        try:
            result = manager.update(in_use_fn(), dry_run=dry_run, recheck=in_use_fn)
        except (MinidriverError, OSError) as exc:
            LOG.error("image cache pass failed: %s", exc)
        else:
            done += 1
            LOG.info(
                "image cache pass: %d files, %d removed, %d bytes freed",
                len(result.files),
                len(result.removed),
                result.bytes_freed,
            )
            if report is not None:
                report(result)
        if passes is not None and attempts >= passes:
            break
        stop.wait(interval)
    return done
