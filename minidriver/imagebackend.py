"""Nova's image backends (nova/virt/libvirt/imagebackend.py): an instance's disks.

How an instance disk is made from a cached base file, how it is described (``show``,
``boot --json``) and where its RBD parts are.

``Image.cache()`` takes the base file's lock, creates the base if it is missing (the
``fetch_func``: a download, an ephemeral mkfs or a mkswap) or re-checks the cached one
(``images.fetch.BaseRecheck``, for an image's base), then ``create_image`` makes the instance's file
from it: a qcow2 overlay (``Qcow2``) or a full copy (``Flat``, for ``images_type =
raw/flat`` or ``use_cow_images = false``; Flat makes ephemeral and swap disks in place,
with no base, as Nova's does).

``Rbd`` (``images_type = rbd``) keeps every disk in Ceph as ``<instance uuid>_<name>``.
The root: a copy-on-write clone of the image's protected snapshot when the image is in
the same cluster, else the raw base is fetched into ``_base`` as for the others and
imported into the pool (Nova imports it anew for each instance); then it is grown to
the flavor's size. Ephemeral and swap: their formatted ``_base`` file imported (Nova's
``Rbd.create_image`` behind ``cache``). The config drive: built as a local file, then
``import_file``. Their network source (``libvirt_info``), details, the root's direct
snapshot and the removal of an instance's RBD disks are the backend's work, as in Nova;
as in Nova, ``disk.info`` lists none of them: an instance's RBD disks are the pool's
``<uuid>_*`` images (``find_rbd_disks``, ``cleanup_rbd``).

About 800 lines, over the ~600 the layout aims at: the three backends and the helpers
they share (sizes, copies, preallocation, the disk reports) are one room.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from minidriver import guest, rbd_utils
from minidriver.config import Config
from minidriver.exception import ImageUnacceptable, MinidriverError
from minidriver.fileutils import (
    PRIVATE_UMASK,
    TRAVERSE_ONLY_DIR,
    make_dir,
    publish,
    removed_on_error,
)
from minidriver.images import fetch, qemu_img
from minidriver.images.inspect import UNINSPECTED
from minidriver.lockutils import external_lock
from minidriver.objects import GiB, MiB
from minidriver.process import ResourceLimits, run
from minidriver.steps import Step, StepTimer

if TYPE_CHECKING:
    from minidriver.images.fetch import BaseRecheck
    from minidriver.images.store import Image as StoreImage

LOG = logging.getLogger(__name__)

# Makes a base file at the path it is given; returns the base's format.
FetchFunc = Callable[[Path], str]

# Nova's ephemeral filesystems (nova/privsep/fs.py) when default_ephemeral_format is
# unset: by the image's os_type, vfat for any other or none. And the disk's label.
EPHEMERAL_FS_BY_OS_TYPE: Mapping[str, str] = {"linux": "ext4", "windows": "ntfs"}
EPHEMERAL_DEFAULT_FS = "vfat"
EPHEMERAL_LABEL = "ephemeral0"


@dataclass(frozen=True)
class DiskDetails:
    """One disk of an instance as it is on disk now (``show``, ``boot --json``)."""

    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None
    backing_format: str | None = None
    backing_virtual_size: int | None = None


class FlavorDiskSmallerThanImage(MinidriverError):
    pass


def touch(path: Path) -> None:
    """Mark a base as in use for the image cache manager: its mtime, from which the
    manager counts a base's age (as Nova's ``Qcow2.create_image`` touches it at spawn,
    ``_update_utime_ignore_eacces``, and its manager in ``_mark_in_use``)."""
    os.utime(path)


class Image(abc.ABC):
    """One disk of an instance (``path``), made from a base file in ``_base``."""

    driver_format: str
    # Nova's is_file_in_instance_path: a file of the instance dir, which disk.info lists.
    is_file_in_instance_path = True
    # Whether a disk made from nothing (an ephemeral's mkfs, a mkswap) is made where it
    # lives, with no base in _base: Nova's Flat does so.
    generates_in_place = False

    def __init__(self, conf: Config, path: Path, timer: StepTimer) -> None:
        self.conf = conf
        self.path = path
        self.timer = timer
        self.commands: list[list[str]] = []  # what was run, for `explain` and `show`
        self.base_format = "raw"  # set by cache(): the format of the base in use
        # What create_image made, for details() (None: made by someone else).
        self.virtual_size: int | None = None
        self.backing: tuple[Path, str, int | None] | None = None  # file, format, size
        self.base_virtual_size: int | None = None  # when cache() read it
        self.made = False

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
        *,
        recheck: BaseRecheck | None = None,
        base_ready: Callable[[], None] | None = None,
        generated: bool = False,
    ) -> bool:
        """Create the base (once, under its lock) and the instance disk from it.

        Returns True on a cache hit: the base was already there. ``step`` is the timer
        step that pays for the work (fetch_func times its own steps when None).
        ``base_format`` is what the base must be: raw, or the image's own format when
        ``force_raw_images`` is off; the overlay names it with ``-F``. ``recheck``
        checks a base that was already there again, under the lock (the one the
        fetch made was checked in full); its virtual size serves the size check.
        ``base_ready`` is called once the base passed every check, before the disk
        is made on it. ``generated``: ``fetch_func`` makes the disk from nothing (no
        image), and a backend that ``generates_in_place`` runs it on ``path`` itself.
        """
        if generated and self.generates_in_place:
            return self._generate(fetch_func, size, step)
        make_dir(self.base_dir, TRAVERSE_ONLY_DIR)
        base = self.base_dir / filename
        whole = self.timer.step(step) if step else contextlib.nullcontext()
        with whole, external_lock(self.conf.locks_dir, filename):
            hit = base.exists()
            virtual = None
            if not hit:
                # No half-made base may stay under its final name for the next spawn.
                with removed_on_error(base):
                    made = fetch_func(base)
                    if made != base_format:
                        raise MinidriverError(f"base {base} is {made}, expected {base_format}")
            elif recheck is not None:
                virtual = recheck.check(base)
            touch(base)
            if hit and recheck is not None:
                recheck.touched(base)
            self.base_format = base_format
            self.base_virtual_size = self.verify_base_size(
                base, size, base_format, self.limits, virtual
            )
            if base_ready is not None:
                base_ready()
            if not self.exists():
                with self.removed_on_error():
                    self.create_image(base, size, timed=step is None)
                self.made = True
        return hit

    def _generate(self, fetch_func: FetchFunc, size: int | None, step: Step | None) -> bool:
        """Nova's ``Flat.create_image`` when generating: the disk made in the instance
        dir, no base, no base lock (the file is this instance's alone)."""
        with self.timer.step(step) if step else contextlib.nullcontext():
            if not self.exists():
                with self.removed_on_error():
                    self.base_format = fetch_func(self.path)
                    self.virtual_size = size
                    self.preallocate(size)
                self.made = True
        return False

    def preallocate(self, size: int | None) -> None:
        """Nova's ``preallocate_images = space``: the disk's ``size`` bytes reserved
        up front (``fallocate -n``: its data untouched), where the file system can."""
        wanted = size and self.conf.default.preallocate_images == "space"
        if wanted and can_fallocate(os.fspath(self.path.parent)):
            run(["fallocate", "-n", "-l", str(size), os.fspath(self.path)])

    def details(self) -> DiskDetails:
        """The disk as ``show`` reports it. One this object made is described from
        what it made and ``os.stat`` (no qemu-img runs); any other, by qemu-img."""
        if not self.made:
            return disk_details(self.path, self.driver_format)
        st = os.stat(self.path)
        virtual = self.virtual_size
        backing_file = backing_format = backing_size = None
        if self.backing is not None:
            backing, backing_format, backing_size = self.backing
            backing_file = os.fspath(backing)
            if backing_size is None:
                backing_size = file_virtual_size(backing, backing_format)
            if virtual is None:  # an overlay made without a size has its backing's
                virtual = backing_size
        return DiskDetails(
            path=os.fspath(self.path),
            format=self.driver_format,
            virtual_size=raw_virtual_size(st.st_size) if virtual is None else virtual,
            actual_size=allocated_bytes(st),
            backing_file=backing_file,
            backing_format=backing_format,
            backing_virtual_size=backing_size,
        )

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
        base: Path,
        size: int | None,
        base_format: str,
        limits: ResourceLimits,
        virtual: int | None = None,
    ) -> int | None:
        """The base's virtual size (``virtual`` when the re-check just read it),
        checked against ``size``; None when no size is asked (the base is then not
        shown to qemu-img). A raw base's is its file's size: qemu-img would say the
        same, so none runs for it."""
        if size is None:
            return None
        if virtual is None:
            virtual = file_virtual_size(base, base_format, limits)
        if size < virtual:
            raise FlavorDiskSmallerThanImage(
                f"flavor's disk ({size} bytes) is smaller than the image ({virtual} bytes)",
                hint="choose a flavor with a larger root_gb",
            )
        return virtual

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
        base_size = self.base_virtual_size
        if base_size is None:  # no flavor size to check against: read it now, for details
            base_size = file_virtual_size(base, self.base_format, self.limits)
        self.backing = (base, self.base_format, base_size)
        if self.conf.libvirt.resized_base_copies and size is not None:
            backing = self._resized_base(base, size, timed)
            self.backing = (backing, self.base_format, size)
            size = None
        self.virtual_size = size
        with self._step(Step.OVERLAY, timed):
            self.commands.append(
                qemu_img.create_cow_image(backing, self.base_format, self.path, size)
            )
            self.preallocate(size)

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
    """A full copy of the base, grown to size (no backing file), in the base's format:
    raw, or the image's own (qcow2) when ``force_raw_images`` is off, as Nova's Flat
    copies it (``copy_image``) and then reads its format. Ephemeral and swap disks are
    made in place, with no base."""

    driver_format = "raw"
    generates_in_place = True

    def create_image(self, base: Path, size: int | None, *, timed: bool) -> None:
        # A kernel or ramdisk (aki, ari) is copied as it is, and given as raw.
        fmt = "raw" if self.base_format in UNINSPECTED else self.base_format
        base_size = self.base_virtual_size
        if base_size is None:
            base_size = file_virtual_size(base, fmt, self.limits)
        with self._step(Step.OVERLAY, timed):
            self.commands.append(copy_sparse(base, self.path))
        self.driver_format = fmt
        self.virtual_size = base_size
        if size is not None and size > base_size:
            with self._step(Step.RESIZE, timed):
                self.commands.append(qemu_img.resize(self.path, fmt, size))
            self.virtual_size = size
        self.preallocate(size)


class Rbd(Image):
    """A disk as the RBD image ``<instance uuid>_<disk name>`` (Nova's names): ``disk``,
    ``disk.local``, ``disk.swap``, ``disk.config``.

    ``clone_location``: the root's cloneable snapshot (the driver asked
    ``is_cloneable``), or None to import a base from ``_base``. ``path`` is
    ``rbd:<pool>/<name>`` (Nova's), as ``show`` names it; it is no file, and, as in
    Nova, ``disk.info`` does not list it.
    """

    driver_format = "raw"
    is_file_in_instance_path = False

    def __init__(
        self,
        conf: Config,
        timer: StepTimer,
        *,
        driver: rbd_utils.RBDDriver,
        instance_uuid: str,
        disk_name: str = "disk",
        clone_location: rbd_utils.RbdLocation | None = None,
        rbd_name: str | None = None,
    ) -> None:
        self.driver = driver
        # rbd_name: an image named otherwise than an instance's disk (a volume's).
        self.rbd_name = rbd_name or f"{instance_uuid}_{disk_name}"
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
        *,
        recheck: BaseRecheck | None = None,
        base_ready: Callable[[], None] | None = None,
        generated: bool = False,
    ) -> bool:
        """Clone when the image allows it (no base in ``_base`` at all; returns False:
        no cached base was used), else the usual base, then an import."""
        if self.clone_location is None:
            return super().cache(
                fetch_func,
                filename,
                size,
                step,
                base_format,
                recheck=recheck,
                base_ready=base_ready,
                generated=generated,
            )
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

    def import_file(self, local_file: Path) -> None:
        """Nova's ``Rbd.import_file``: a local file (the config drive) becomes this
        disk, replacing any image of that name."""
        self.driver.remove_image(self.rbd_name)
        self.driver.import_image(local_file, self.rbd_name)
        self.commands.append(["rbd", "import", os.fspath(local_file), self.source_name])

    @contextlib.contextmanager
    def removed_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            with contextlib.suppress(rbd_utils.RbdError):
                self.driver.remove_image(self.rbd_name)
            raise

    def libvirt_info(self) -> guest.NetworkSource:
        """Nova's ``Rbd.libvirt_info``: the disk as QEMU reaches it, through the
        cluster's monitors, with cephx auth when a libvirt secret holds the key
        (``rbd_user``/``rbd_secret_uuid``)."""
        opts = self.conf.libvirt
        auth = bool(opts.rbd_secret_uuid)
        return guest.NetworkSource(
            protocol="rbd",
            name=self.source_name,
            hosts=tuple(guest.NetworkHost(h.name, h.port) for h in self.driver.get_mon_addrs()),
            auth_username=opts.rbd_user if auth else None,
            secret_uuid=opts.rbd_secret_uuid if auth else None,
        )

    def details(self) -> DiskDetails:
        return rbd_disk_details(self.driver, self.rbd_name)

    def parent_pool(self, fsid: str, image_location: rbd_utils.RbdLocation | None) -> str:
        """Nova's ``_get_parent_pool``: the pool of the disk's own parent (a clone's),
        else of the image's location in this cluster; ImageUnacceptable when neither
        (the snapshot is then a standard one)."""
        parent = self.driver.parent_info(self.rbd_name)
        if parent is not None:
            return parent[0].pool
        if image_location is not None and image_location.fsid == fsid:
            return image_location.pool
        raise ImageUnacceptable(
            f"cannot determine the parent storage pool for {self.rbd_name}: it is no"
            " clone and its image has no location in this cluster",
            hint="the snapshot is taken as a standard one into the image store",
        )

    def direct_snapshot(
        self, snapshot_name: str, image_id: str, parent: rbd_utils.RbdLocation | None
    ) -> rbd_utils.RbdLocation:
        """Nova's ``direct_snapshot``: an RBD snapshot of the disk, cloned as
        ``image_id`` into the parent pool (``parent_pool``; ``parent`` is the image's
        location), flattened (it must outlive this disk), with its own protected
        ``snap``. The disk's temporary snapshot goes in every outcome."""
        driver = self.driver
        fsid = driver.get_fsid()
        dest_pool = self.parent_pool(fsid, parent)
        source = rbd_utils.RbdLocation(fsid, driver.pool, self.rbd_name, snapshot_name)
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
        return rbd_utils.RbdLocation(fsid, dest_pool, image_id, rbd_utils.IMAGE_SNAPSHOT)

    def snapshot_extract(self, target: Path, snapshot_name: str) -> None:
        """Nova's ``Rbd.snapshot_extract`` for a standard snapshot: the disk's data as
        a raw file. Read from an RBD snapshot of the disk (crash-consistent, so a
        running guest goes on; ours: Nova saves the guest's memory and stops it
        first), removed afterwards."""
        driver = self.driver
        driver.create_snap(self.rbd_name, snapshot_name)
        try:
            location = rbd_utils.RbdLocation(
                driver.get_fsid(), driver.pool, self.rbd_name, snapshot_name
            )
            with driver.open_location(location) as reader, open(target, "wb") as out:
                while chunk := reader.read(4 * MiB):
                    out.write(chunk)
        finally:
            driver.remove_snap(self.rbd_name, snapshot_name)


def cache_image(
    disk: Image,
    conf: Config,
    image: StoreImage,
    size: int | None,
    *,
    open_data: fetch.OpenData,
    force_raw: bool,
    progress: fetch.Progress | None = None,
    base_ready: Callable[[], None] | None = None,
) -> bool:
    """A disk made from ``image`` through its base in ``_base`` (Nova's
    ``_create_and_inject_local_root``'s ``cache`` call): the base fetched once
    (``fetch_to_raw``), a cached one checked again first, under its lock. Returns True
    on a cache hit. An instance's root disk and a volume made from an image both come
    this way. ``base_ready`` is called once the base passed its checks (see cache)."""
    limits = qemu_img.resource_limits(
        conf.libvirt.images_cpu_time_limit, conf.libvirt.images_address_space_limit
    )
    fetch_func = functools.partial(
        fetch.fetch_to_raw,
        image,
        force_raw=force_raw,
        timer=disk.timer,
        progress=progress,
        limits=limits,
        max_virtual_size=conf.libvirt.images_max_virtual_size,
        open_data=open_data,
    )
    base_format = "raw" if force_raw else qemu_img.qemu_format(image.disk_format)
    filename = base_filename(image.id)
    # A cached base is checked again before a disk is made on it (cheaply: its head
    # and qemu-img info); the base the fetch makes is checked in full instead.
    recheck = fetch.BaseRecheck(
        base_format,
        limits=limits,
        disk_format=image.disk_format,
        trusted=fetch.TrustedBases(conf.trusted_bases_path),
    )
    return disk.cache(
        fetch_func, filename, size, base_format=base_format, recheck=recheck, base_ready=base_ready
    )


def base_filename(image_id: str) -> str:
    """Nova names a cached base after the sha1 of the image id (not a security hash)."""
    return hashlib.sha1(image_id.encode(), usedforsecurity=False).hexdigest()


def clone_location(driver: rbd_utils.RBDDriver, image: StoreImage) -> rbd_utils.RbdLocation | None:
    """Nova's ``Rbd.clone`` choice: the first of the image's locations that
    ``is_cloneable`` (it logs why one is not); None: fetch and import instead."""
    for location in image.locations:
        if driver.is_cloneable(location["url"], image.disk_format):
            return rbd_utils.parse_url(location["url"])
    return None


def rbd_driver(conf: Config, pool: str | None = None) -> rbd_utils.RBDDriver:
    """A driver for ``pool`` (default ``images_rbd_pool``) of the configured cluster;
    a new one per use, as a driver is not shared between threads."""
    opts = conf.libvirt
    return rbd_utils.RBDDriver(
        pool or opts.images_rbd_pool,
        opts.images_rbd_ceph_conf,
        opts.rbd_user,
        opts.rbd_connect_timeout,
    )


def rbd_path(pool: str, name: str) -> str:
    """How ``show`` and a template's ``disk.info`` name an RBD disk (Nova's
    ``rbd:pool/name``)."""
    return f"rbd:{pool}/{name}"


def is_rbd_path(path: str) -> bool:
    return path.startswith("rbd:")


def parse_rbd_path(path: str) -> tuple[str, str]:
    """``rbd:<pool>/<name>`` -> (pool, name)."""
    pool, _, name = path.removeprefix("rbd:").partition("/")
    return pool, name


def rbd_pools_of(conf: Config, disks: Mapping[str, str] | None) -> set[str]:
    """The pools that may hold an instance's RBD disks: with images_type = rbd the
    configured pool, where spawn puts them and Nova's ``_cleanup_rbd`` looks; and any
    pool its recorded ``disks`` ({path: format}) name: its domain's XML, or the
    ``disk.info`` of an instance made when that file still listed RBD disks."""
    pools = {conf.libvirt.images_rbd_pool} if conf.libvirt.images_type == "rbd" else set()
    pools.update(parse_rbd_path(path)[0] for path in disks or () if is_rbd_path(path))
    return pools


def find_rbd_disks(
    conf: Config, instance_uuid: str, disks: Mapping[str, str] | None
) -> dict[str, str]:
    """{``rbd:pool/name``: format} of an instance's RBD disks, found as Nova finds them
    (``disk.info`` has none): the ``<uuid>_*`` images of each pool of
    :func:`rbd_pools_of`, one listing per pool."""
    return {
        rbd_path(pool, name): Rbd.driver_format
        for pool in sorted(rbd_pools_of(conf, disks))
        for name in rbd_driver(conf, pool).instance_images(instance_uuid)
    }


def cleanup_rbd(conf: Config, instance_uuid: str, disks: Mapping[str, str] | None) -> list[str]:
    """Nova's ``_cleanup_rbd``: an instance's ``<uuid>_*`` RBD images, never an
    image's, in each pool of :func:`rbd_pools_of`. Returns ``pool/name`` of each removed."""
    removed: list[str] = []
    for pool in sorted(rbd_pools_of(conf, disks)):
        names = rbd_driver(conf, pool).cleanup_volumes(instance_uuid)
        removed.extend(f"{pool}/{name}" for name in names)
    return removed


def rbd_disk_details(driver: rbd_utils.RBDDriver, name: str) -> DiskDetails:
    """An RBD disk as ``show`` describes a file: its size, its own data, and the image
    snapshot it is a clone of (``rbd:pool/image@snap``) as its backing."""
    with driver.connected():
        parent = driver.parent_info(name)
        return DiskDetails(
            path=rbd_path(driver.pool, name),
            format="raw",
            virtual_size=driver.size(name),
            actual_size=driver.allocated_bytes(name),
            backing_file=f"rbd:{parent[0]}" if parent else None,
            backing_format="raw" if parent else None,
            backing_virtual_size=parent[1] if parent else None,
        )


def disk_details(path: Path | str, fmt: str) -> DiskDetails:
    """A disk file as qemu-img sees it, and its backing file's virtual size: for an
    instance whose disks were made by another process."""
    info = qemu_img.info(path, fmt)
    backing_size = None
    if info.backing_file and info.backing_format:
        backing_size = qemu_img.info(info.backing_file, info.backing_format).virtual_size
    return DiskDetails(
        path=os.fspath(path),
        format=info.format,
        virtual_size=info.virtual_size,
        actual_size=info.actual_size,
        backing_file=info.backing_file,
        backing_format=info.backing_format,
        backing_virtual_size=backing_size,
    )


def file_details(path: Path, fmt: str = "raw") -> DiskDetails:
    """A raw file with no backing file (the config drive) from ``os.stat`` alone."""
    if fmt != "raw":
        return disk_details(path, fmt)
    st = os.stat(path)
    return DiskDetails(
        os.fspath(path), fmt, raw_virtual_size(st.st_size), allocated_bytes(st), None
    )


def raw_virtual_size(file_size: int) -> int:
    """qemu-img's virtual size of a raw file: its size in whole 512-byte sectors."""
    return -(-file_size // 512) * 512


def allocated_bytes(st: os.stat_result) -> int:
    """qemu-img's ``actual-size`` of a file: the blocks the file system allocated."""
    return st.st_blocks * 512


def file_virtual_size(
    path: Path, fmt: str, limits: ResourceLimits = qemu_img.DEFAULT_LIMITS
) -> int:
    if fmt == "raw":
        return raw_virtual_size(os.path.getsize(path))
    return qemu_img.info(path, fmt, limits).virtual_size


@functools.cache
def can_fallocate(directory: str) -> bool:
    """Nova's ``_can_fallocate``: whether fallocate(1) works in ``directory`` (asked
    once per directory here, once per backend class in Nova); a warning when not."""
    test_file = os.path.join(directory, ".fallocate_test")
    try:
        run(["fallocate", "-l", "1", test_file])
    except MinidriverError:
        LOG.warning("cannot preallocate disks in %s: fallocate fails there", directory)
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(test_file)
    return True


def get_ephemeral_fs(os_type: str, default_ephemeral_format: str = "") -> str:
    """The filesystem of an ephemeral disk, as Nova's ``configurable_mkfs`` picks it
    (no ``virt_mkfs`` commands here): ``default_ephemeral_format``, else by os_type."""
    return default_ephemeral_format or EPHEMERAL_FS_BY_OS_TYPE.get(os_type, EPHEMERAL_DEFAULT_FS)


def ephemeral_filename(size_gb: int, fs_type: str) -> str:
    """Nova's form of the name: ``ephemeral_<GB>_<first 7 hex of md5(fs type)>``.

    The tag hashes the filesystem made: our choice. Nova's (``_create_image`` through
    ``get_fs_type_for_os_type``) hashes the os_type's filesystem only when
    ``virt_mkfs`` gives that os_type a command, else the default's (vfat), so an
    ``os_type=linux`` instance's ext4 base is named like a vfat one (``_0706d66``) and
    the two would share one cache file."""
    tag = hashlib.md5(fs_type.encode(), usedforsecurity=False).hexdigest()[:7]
    return f"ephemeral_{size_gb}_{tag}"


def swap_filename(size_mb: int) -> str:
    return f"swap_{size_mb}"


def copy_sparse_cmd(source: Path, dest: Path) -> list[str]:
    return ["cp", "--sparse=always", "--reflink=auto", os.fspath(source), os.fspath(dest)]


def copy_sparse(source: Path, dest: Path) -> list[str]:
    return run(copy_sparse_cmd(source, dest), umask=PRIVATE_UMASK).cmd


def mkfs_cmd(fs_type: str, label: str, target: Path) -> list[str]:
    """Nova's ``unprivileged_mkfs`` options: forced where mkfs would ask about a file
    that is not a block device, FAT's label option ``-n``; quiet where mkfs can be."""
    cmd = ["mkfs", "-t", fs_type]
    if fs_type in ("ext2", "ext3", "ext4", "ntfs"):
        cmd.append("-F")
    if fs_type.startswith("ext") or fs_type == "xfs":
        cmd.append("-q")
    label_opt = "-n" if fs_type in ("vfat", "msdos") else "-L"
    return [*cmd, label_opt, label, os.fspath(target)]


def mkswap_cmd(target: Path) -> list[str]:
    return ["mkswap", os.fspath(target)]


def backend_class(conf: Config) -> type[Image]:
    """Nova's choice: ``images_type``, with ``default`` following ``use_cow_images``."""
    images_type = conf.libvirt.images_type
    if images_type == "rbd":
        return Rbd
    return local_backend_class(conf)


def local_backend_class(conf: Config) -> type[Image]:
    """The backend of disks kept in files: all of an instance's disks but with
    ``images_type = rbd``, where none is a file (the same choice then stands for a
    file disk, were one asked for)."""
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
    "EPHEMERAL_DEFAULT_FS",
    "EPHEMERAL_FS_BY_OS_TYPE",
    "EPHEMERAL_LABEL",
    "DiskDetails",
    "Flat",
    "FlavorDiskSmallerThanImage",
    "Image",
    "Qcow2",
    "Rbd",
    "backend_class",
    "cleanup_rbd",
    "clone_location",
    "create_ephemeral",
    "create_swap",
    "disk_details",
    "ephemeral_filename",
    "find_rbd_disks",
    "get_ephemeral_fs",
    "is_rbd_path",
    "local_backend_class",
    "parse_rbd_path",
    "rbd_driver",
    "rbd_path",
    "rbd_pools_of",
    "swap_filename",
]
