"""Nova's image backends: how an instance disk is made from a cached base file.

``Image.cache()`` takes the base file's lock, creates the base if it is missing (the
``fetch_func``: a download, an ephemeral mkfs or a mkswap), then ``create_image``
makes the instance's file from it: a qcow2 overlay (``Qcow2``) or a full copy
(``Flat``, for ``images_type = raw/flat`` or ``use_cow_images = false``).
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from minidriver.config import Config
from minidriver.exception import MinidriverError
from minidriver.fileutils import publish, removed_on_error
from minidriver.images import qemu_img
from minidriver.images.inspect import UNINSPECTED
from minidriver.lockutils import external_lock
from minidriver.objects import GiB
from minidriver.process import ResourceLimits, run
from minidriver.steps import Step, StepTimer

# Makes a base file at the path it is given; returns the base's format.
FetchFunc = Callable[[Path], str]


class FlavorDiskSmallerThanImage(MinidriverError):
    pass


def touch(path: Path) -> None:
    """Mark a base as in use for the image cache manager (Nova updates its mtime)."""
    os.utime(path)


class Image(abc.ABC):
    """One disk of an instance (``path``), made from a base file in ``_base``."""

    driver_format: str

    def __init__(self, conf: Config, path: Path, timer: StepTimer) -> None:
        self.conf = conf
        self.path = path
        self.timer = timer
        self.commands: list[list[str]] = []  # what was run, for `explain` and `show`
        self.base_format = "raw"  # set by cache(): the format of the base in use

    @property
    def base_dir(self) -> Path:
        return self.conf.base_dir

    def exists(self) -> bool:
        return self.path.exists()

    def cache(
        self,
        fetch_func: FetchFunc,
        filename: str,
        size: int | None,
        step: Step | None = None,
        base_format: str = "raw",
    ) -> bool:
        """Create the base (once, under its lock) and the instance disk from it.

        Returns True on a cache hit: the base was already there. ``step`` is the timer
        step that pays for the work (fetch_func times its own steps when None).
        ``base_format`` is what the base must be: raw, or the image's own format when
        ``force_raw_images`` is off; the overlay names it with ``-F``.
        """
        self.base_dir.mkdir(parents=True, exist_ok=True)
        base = self.base_dir / filename
        whole = self.timer.step(step) if step else contextlib.nullcontext()
        with whole, external_lock(self.conf.locks_dir, filename):
            hit = base.exists()
            if not hit:
                # No half-made base may stay under its final name for the next spawn.
                with removed_on_error(base):
                    made = fetch_func(base)
                    if made != base_format:
                        raise MinidriverError(f"base {base} is {made}, expected {base_format}")
            touch(base)
            self.base_format = base_format
            self.verify_base_size(base, size, base_format, self.limits)
            if not self.exists():
                with removed_on_error(self.path):
                    self.create_image(base, size, timed=step is None)
        return hit

    @property
    def limits(self) -> ResourceLimits:
        return qemu_img.resource_limits(
            self.conf.libvirt.images_cpu_time_limit, self.conf.libvirt.images_address_space_limit
        )

    @staticmethod
    def verify_base_size(
        base: Path, size: int | None, base_format: str, limits: ResourceLimits
    ) -> None:
        if size is None:
            return
        virtual = qemu_img.info(base, base_format, limits).virtual_size
        if size < virtual:
            raise FlavorDiskSmallerThanImage(
                f"flavor's disk ({size} bytes) is smaller than the image ({virtual} bytes)",
                hint="choose a flavor with a larger root_gb",
            )

    @abc.abstractmethod
    def create_image(self, base: Path, size: int | None, *, timed: bool) -> None:
        """Make ``self.path`` from ``base`` at ``size`` bytes (None: the base's size).

        ``timed``: record the work as the overlay and resize steps (the root disk);
        ephemeral and swap disks are timed as a whole by ``cache``.
        """

    def _step(self, step: Step, timed: bool) -> contextlib.AbstractContextManager[None]:
        return self.timer.step(step) if timed else contextlib.nullcontext()


class Qcow2(Image):
    driver_format = "qcow2"

    def create_image(self, base: Path, size: int | None, *, timed: bool) -> None:
        backing = base
        if self.conf.libvirt.resized_base_copies and size is not None:
            backing = self._resized_base(base, size, timed)
            size = None
        with self._step(Step.OVERLAY, timed):
            self.commands.append(
                qemu_img.create_cow_image(backing, self.base_format, self.path, size)
            )
            if self.conf.default.preallocate_images == "space":
                run(["fallocate", "-n", "-l", str(size or os.path.getsize(backing)), self.path])

    def _resized_base(self, base: Path, size: int, timed: bool) -> Path:
        """The seeds' older chain: ``_base/<sha1>_<GB>``, a full raw copy, resized."""
        resized = base.with_name(f"{base.name}_{size // GiB}")
        with external_lock(self.conf.locks_dir, resized.name):
            if resized.exists():
                touch(resized)
                return resized
            temp = resized.with_name(resized.name + ".part")
            with self._step(Step.RESIZE, timed), removed_on_error(temp):
                self.commands.append(copy_sparse(base, temp))
                self.commands.append(qemu_img.resize(temp, self.base_format, size))
                os.replace(temp, resized)
        return resized


class Flat(Image):
    """A full raw copy of the base, grown to size (no backing file)."""

    driver_format = "raw"

    def create_image(self, base: Path, size: int | None, *, timed: bool) -> None:
        with self._step(Step.OVERLAY, timed):
            # A kernel or ramdisk (aki, ari) is copied as it is, like a raw disk.
            if self.base_format in ("raw", *UNINSPECTED):
                self.commands.append(copy_sparse(base, self.path))
            else:
                self.commands.append(qemu_img.convert(base, self.base_format, self.path, "raw"))
        if size is not None and size > os.path.getsize(self.path):
            with self._step(Step.RESIZE, timed):
                self.commands.append(qemu_img.resize(self.path, "raw", size))


def copy_sparse_cmd(source: Path, dest: Path) -> list[str]:
    return ["cp", "--sparse=always", "--reflink=auto", os.fspath(source), os.fspath(dest)]


def copy_sparse(source: Path, dest: Path) -> list[str]:
    return run(copy_sparse_cmd(source, dest)).cmd


def mkfs_cmd(fs_type: str, label: str, target: Path) -> list[str]:
    return ["mkfs", "-t", fs_type, "-F", "-q", "-L", label, os.fspath(target)]


def mkswap_cmd(target: Path) -> list[str]:
    return ["mkswap", os.fspath(target)]


def backend_class(conf: Config) -> type[Image]:
    """Nova's choice: ``images_type``, with ``default`` following ``use_cow_images``."""
    images_type = conf.libvirt.images_type
    if images_type == "default":
        return Qcow2 if conf.default.use_cow_images else Flat
    return Qcow2 if images_type == "qcow2" else Flat


def create_ephemeral(target: Path, size_gb: int, fs_type: str, label: str) -> str:
    """Nova's ``_create_ephemeral``: a raw file with a filesystem on it.

    Made under ``.part`` and renamed: a crash mid-mkfs leaves no base to reuse.
    """
    temp = target.with_name(target.name + ".part")
    with removed_on_error(temp):
        qemu_img.create(temp, "raw", size_gb * GiB)
        run(mkfs_cmd(fs_type, label, temp))
        publish(temp, target)
    return "raw"


def create_swap(target: Path, swap_mb: int) -> str:
    """Nova's ``_create_swap``: a raw file with a swap signature (made like the above)."""
    temp = target.with_name(target.name + ".part")
    with removed_on_error(temp):
        qemu_img.create(temp, "raw", swap_mb * 1024 * 1024)
        run(mkswap_cmd(temp))
        publish(temp, target)
    return "raw"


__all__ = [
    "Flat",
    "FlavorDiskSmallerThanImage",
    "Image",
    "Qcow2",
    "backend_class",
    "create_ephemeral",
    "create_swap",
]
