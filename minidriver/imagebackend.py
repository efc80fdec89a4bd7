"""Nova's image backends: how an instance disk is made from a cached base file.

``Image.cache()`` takes the base file's lock, creates the base if it is missing (the
``fetch_func``: a download, an ephemeral mkfs or a mkswap), then ``create_image``
makes the instance's file from it: a qcow2 overlay (``Qcow2``) or a full copy
(``Flat``, for ``images_type = raw/flat`` or ``use_cow_images = false``).

``Rbd`` (``images_type = rbd``) keeps the root disk in Ceph as ``<instance uuid>_disk``:
a copy-on-write clone of the image's protected snapshot when the image is in the same
cluster, else the raw base is fetched into ``_base`` as for the others and imported
into the pool (Nova imports it anew for each instance); then it is grown to the
flavor's size.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from minidriver import rbd_utils
from minidriver.config import Config
from minidriver.exception import MinidriverError
from minidriver.fileutils import (
    PRIVATE_UMASK,
    TRAVERSE_ONLY_DIR,
    make_dir,
    publish,
    removed_on_error,
)
from minidriver.images import qemu_img
from minidriver.images.inspect import UNINSPECTED
from minidriver.lockutils import external_lock
from minidriver.objects import GiB, MiB
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
        make_dir(self.base_dir, TRAVERSE_ONLY_DIR)
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
                with self.removed_on_error():
                    self.create_image(base, size, timed=step is None)
        return hit

    def removed_on_error(self) -> contextlib.AbstractContextManager[None]:
        """Whatever ``create_image`` made is removed if it fails half-way."""
        return removed_on_error(self.path)

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


class Rbd(Image):
    """The root disk as the RBD image ``<instance uuid>_<disk name>`` (Nova's names).

    ``clone_location``: the image's cloneable snapshot (the driver asked
    ``is_cloneable``), or None to fetch into ``_base`` and import. ``path`` is
    ``rbd:<pool>/<name>``, as ``disk.info`` records it; it is no file.
    """

    driver_format = "raw"

    def __init__(
        self,
        conf: Config,
        timer: StepTimer,
        *,
        driver: rbd_utils.RBDDriver,
        instance_uuid: str,
        disk_name: str = "disk",
        clone_location: rbd_utils.RbdLocation | None = None,
    ) -> None:
        self.driver = driver
        self.rbd_name = f"{instance_uuid}_{disk_name}"
        self.clone_location = clone_location
        super().__init__(conf, Path(rbd_path(driver.pool, self.rbd_name)), timer)

    @property
    def source_name(self) -> str:
        """``pool/name``: the domain XML's ``<source name=>``."""
        return f"{self.driver.pool}/{self.rbd_name}"

    def exists(self) -> bool:
        return self.driver.exists(self.rbd_name)

    def cache(
        self,
        fetch_func: FetchFunc,
        filename: str,
        size: int | None,
        step: Step | None = None,
        base_format: str = "raw",
    ) -> bool:
        """Clone when the image allows it (no base in ``_base`` at all; returns False:
        no cached base was used), else the usual base, then an import."""
        if self.clone_location is None:
            return super().cache(fetch_func, filename, size, step, base_format)
        with self.removed_on_error():
            with self.timer.step(Step.CLONE):
                self.driver.clone(self.clone_location, self.rbd_name)
            self.commands.append(["rbd", "clone", str(self.clone_location), self.source_name])
            self._grow(size, timed=True)
        return False

    def create_image(self, base: Path, size: int | None, *, timed: bool) -> None:
        """Nova's ``Rbd.create_image`` past the fetch: import the raw base, grow it."""
        if self.base_format != "raw":
            raise MinidriverError(f"base {base} is {self.base_format}: rbd imports raw only")
        with self._step(Step.IMPORT, timed):
            self.driver.import_image(base, self.rbd_name)
        self.commands.append(["rbd", "import", os.fspath(base), self.source_name])
        self._grow(size, timed=timed)

    def _grow(self, size: int | None, *, timed: bool) -> None:
        if size is None:
            return
        current = self.driver.size(self.rbd_name)
        if size < current:
            raise FlavorDiskSmallerThanImage(
                f"flavor's disk ({size} bytes) is smaller than the image ({current} bytes)",
                hint="choose a flavor with a larger root_gb",
            )
        if size > current:
            with self._step(Step.RESIZE, timed):
                self.driver.resize(self.rbd_name, size)
            self.commands.append(["rbd", "resize", "--size", f"{size // MiB}M", self.source_name])

    @contextlib.contextmanager
    def removed_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            with contextlib.suppress(rbd_utils.RbdError):
                self.driver.remove_image(self.rbd_name)
            raise

    def direct_snapshot(
        self, snapshot_name: str, image_id: str, dest_pool: str
    ) -> rbd_utils.RbdLocation:
        """Nova's ``direct_snapshot``: an RBD snapshot of the disk, cloned into
        ``dest_pool`` as ``image_id``, flattened (it must outlive this disk), with its
        own protected ``snap``. The disk's temporary snapshot goes in every outcome."""
        driver = self.driver
        source = rbd_utils.RbdLocation(driver.get_fsid(), driver.pool, self.rbd_name, snapshot_name)
        driver.create_snap(self.rbd_name, snapshot_name, protect=True)
        try:
            driver.clone(source, image_id, dest_pool)
            try:
                driver.flatten(image_id, dest_pool)
                driver.create_snap(image_id, rbd_utils.IMAGE_SNAPSHOT, dest_pool, protect=True)
            except BaseException:
                driver.remove_image(image_id, dest_pool)
                raise
        finally:
            driver.remove_snap(self.rbd_name, snapshot_name, unprotect=True)
        return rbd_utils.RbdLocation(source.fsid, dest_pool, image_id, rbd_utils.IMAGE_SNAPSHOT)


def rbd_path(pool: str, name: str) -> str:
    """How ``disk.info`` and ``show`` name an RBD disk (Nova's ``rbd:pool/name``)."""
    return f"rbd:{pool}/{name}"


def copy_sparse_cmd(source: Path, dest: Path) -> list[str]:
    return ["cp", "--sparse=always", "--reflink=auto", os.fspath(source), os.fspath(dest)]


def copy_sparse(source: Path, dest: Path) -> list[str]:
    return run(copy_sparse_cmd(source, dest), umask=PRIVATE_UMASK).cmd


def mkfs_cmd(fs_type: str, label: str, target: Path) -> list[str]:
    return ["mkfs", "-t", fs_type, "-F", "-q", "-L", label, os.fspath(target)]


def mkswap_cmd(target: Path) -> list[str]:
    return ["mkswap", os.fspath(target)]


def backend_class(conf: Config) -> type[Image]:
    """Nova's choice: ``images_type``, with ``default`` following ``use_cow_images``."""
    images_type = conf.libvirt.images_type
    if images_type == "rbd":
        return Rbd
    return local_backend_class(conf)


def local_backend_class(conf: Config) -> type[Image]:
    """The backend of disks kept in files: all of them, or with ``images_type = rbd``
    the ephemeral and swap disks (the root alone goes to Ceph)."""
    images_type = conf.libvirt.images_type
    if images_type in ("default", "rbd"):
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
    "Rbd",
    "backend_class",
    "create_ephemeral",
    "create_swap",
    "local_backend_class",
    "rbd_path",
]
