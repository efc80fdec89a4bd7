"""RBD images in a Ceph cluster, through librados and librbd (nova/storage/rbd_utils.py).

``RBDDriver`` works on one pool (Nova's ``images_rbd_pool``, or Glance's
``rbd_store_pool``); any call may name another pool of the same cluster. Each call
connects and disconnects, as Nova's ``RADOSClient`` does, unless it runs inside
``with driver.connected():``, which keeps one connection for everything in it (a
spawn makes one connection, not ten). A driver object is not shared between threads.

The bindings (Debian's ``python3-rados``, ``python3-rbd``) are imported when present;
minidriver works without them until something asks for Ceph.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minidriver.exception import ImageUnacceptable, MinidriverError

# librados and librbd (~10 ms to load) are imported on the first connection, not by
# every command that imports this module; None once found missing.
_UNLOADED: Any = object()
rados: Any = _UNLOADED
rbd: Any = _UNLOADED

LOG = logging.getLogger(__name__)

RBD_URL_PREFIX = "rbd://"
# Glance's rbd store names the snapshot every image is cloned from "snap".
IMAGE_SNAPSHOT = "snap"
CHUNK = 4 * 1024 * 1024  # librbd's default object size: one write per object
REMOVE_TIMEOUT = 30.0  # seconds for a stopped QEMU's watch on a disk to go away
REMOVE_INTERVAL = 0.5
# Once connected, no OSD operation may wait forever (librados' default): an OSD down or
# placement groups inactive become an error, not a hung spawn, delete or image add.
OSD_OP_TIMEOUT = 60  # seconds


class RbdError(MinidriverError):
    """Ceph refused or failed an RBD operation."""


class CephUnreachable(RbdError):
    """No answer from the cluster's monitors within ``rbd_connect_timeout``."""


class PoolNotFound(RbdError):
    pass


class PoolFull(RbdError):
    """The pool takes no more writes (a quota, or a full cluster)."""


class RbdImageBusy(RbdError):
    """An image (or its snapshot) still has clones or watchers."""


@dataclass(frozen=True)
class RbdLocation:
    """Glance's rbd location: ``rbd://<fsid>/<pool>/<image>/<snapshot>``."""

    fsid: str
    pool: str
    image: str
    snapshot: str

    @property
    def url(self) -> str:
        parts = (self.fsid, self.pool, self.image, self.snapshot)
        return RBD_URL_PREFIX + "/".join(urllib.parse.quote(p, safe="") for p in parts)

    def __str__(self) -> str:
        return f"{self.pool}/{self.image}@{self.snapshot}"


@dataclass(frozen=True)
class MonHost:
    """One monitor address, as the domain XML's ``<host name= port=/>`` takes it."""

    name: str
    port: str


def is_rbd_url(url: str) -> bool:
    return url.startswith(RBD_URL_PREFIX)


def parse_url(url: str) -> RbdLocation:
    """Nova's ``parse_url``: the four parts of an rbd location, each unquoted."""
    if not is_rbd_url(url):
        raise ImageUnacceptable(f"location {url!r} is not stored in rbd")
    pieces = [urllib.parse.unquote(p) for p in url[len(RBD_URL_PREFIX) :].split("/")]
    if len(pieces) != 4:
        raise ImageUnacceptable(
            f"location {url!r} is not rbd://FSID/POOL/IMAGE/SNAPSHOT",
        )
    if "" in pieces:
        raise ImageUnacceptable(f"location {url!r} has a blank component")
    return RbdLocation(*pieces)


def parse_mon_dump(dump: str) -> tuple[MonHost, ...]:
    """The monitors' legacy (v1) addresses from ``ceph mon dump --format json``, as
    Nova reads them: ``addr`` is ``host:port/nonce``, IPv6 hosts in brackets."""
    hosts = []
    for mon in json.loads(dump)["mons"]:
        host_port = mon["addr"].rsplit("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        hosts.append(MonHost(host.strip("[]"), port))
    return tuple(hosts)


def _require_bindings() -> None:
    global rados, rbd
    if rados is _UNLOADED:
        try:
            import rados as rados_module  # noqa: PLC0415
            import rbd as rbd_module  # noqa: PLC0415
        except ImportError:  # plain setup-host: no Ceph on this host
            rados_module = rbd_module = None
        rados, rbd = rados_module, rbd_module
    if rados is None or rbd is None:
        raise RbdError(
            "Ceph's Python bindings (python3-rados, python3-rbd) are not installed",
            hint="scripts/setup-host --with-ceph installs them (Debian's packages)",
        )


def remove_quietly(driver: RBDDriver, name: str, pool: str | None = None) -> None:
    """Undo after another failure: remove ``name``, logging (not raising) a failure,
    so that the first error is the one reported."""
    try:
        driver.remove_image(name, pool)
    except RbdError as exc:
        LOG.warning("could not remove RBD image %s/%s: %s", pool or driver.pool, name, exc)


def cleanup_volumes_quietly(driver: RBDDriver, instance_uuid: str) -> None:
    """Undo of a failed spawn: its RBD disks. A failure here is logged, never raised:
    the spawn's own error is the one to report."""
    try:
        driver.cleanup_volumes(instance_uuid)
    except RbdError as exc:
        LOG.warning("could not remove the RBD disks of %s: %s", instance_uuid, exc)


class RBDReader:
    """An RBD image (at a snapshot) read front to back, like a file opened ``rb``."""

    def __init__(self, image: Any) -> None:
        self.image = image
        self.size: int = image.size()
        self.offset = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.size - self.offset
        n = min(n, self.size - self.offset)
        if n <= 0:
            return b""
        data: bytes = self.image.read(self.offset, n)
        self.offset += len(data)
        return data

    def close(self) -> None:
        """The image is closed by the context that opened it."""


class RBDDriver:
    def __init__(
        self,
        pool: str,
        ceph_conf: str = "",
        rbd_user: str = "",
        connect_timeout: int = 5,
    ) -> None:
        self.pool = pool
        self.ceph_conf = ceph_conf
        self.rbd_user = rbd_user
        self.connect_timeout = connect_timeout
        self._cluster: Any = None

    # -- connections ----------------------------------------------------------

    def _connect(self) -> Any:
        _require_bindings()
        where = self.ceph_conf or "librados' default ceph.conf"
        try:
            cluster = rados.Rados(rados_id=self.rbd_user or None)
            if self.ceph_conf:
                cluster.conf_read_file(self.ceph_conf)
            else:
                cluster.conf_read_file()  # $CEPH_CONF, /etc/ceph/ceph.conf, ...
        except rados.Error as exc:
            raise CephUnreachable(
                f"cannot read the Ceph configuration ({where}): {exc}",
                hint="set [libvirt] images_rbd_ceph_conf to the cluster's ceph.conf",
            ) from None
        # Rados.connect(timeout=) does not bound the monitor hunt in this librados
        # (measured: 300 s against a dead monitor); client_mount_timeout does.
        timeout = str(self.connect_timeout)
        cluster.conf_set("client_mount_timeout", timeout)
        cluster.conf_set("rados_mon_op_timeout", timeout)
        cluster.conf_set("rados_osd_op_timeout", str(max(OSD_OP_TIMEOUT, self.connect_timeout)))
        try:
            cluster.connect()
        except rados.Error as exc:
            cluster.shutdown()
            raise CephUnreachable(
                f"cannot reach the Ceph cluster of {where} within {self.connect_timeout} s: {exc}",
                hint="is the cluster up? `ceph -c CONF -s` (for the dev cluster:"
                " scripts/ceph-dev-cluster status)",
            ) from None
        return cluster

    @contextlib.contextmanager
    def connected(self) -> Iterator[Any]:
        """One connection for every call inside; nested uses share it."""
        if self._cluster is not None:
            yield self._cluster
            return
        _require_bindings()  # the except clause below names their errors
        cluster = self._connect()
        self._cluster = cluster
        try:
            yield cluster
        except (rados.Error, rbd.Error) as exc:
            # Whatever librados/librbd raise past the calls that map their own
            # (a cephx refusal, a timeout, an image that exists...): one clear error.
            timed_out = isinstance(exc, rados.TimedOut | rbd.Timeout)
            raise RbdError(
                f"Ceph: {exc}" + (f" (no answer within {OSD_OP_TIMEOUT} s)" if timed_out else ""),
                hint="`ceph -s` (for the dev cluster: scripts/ceph-dev-cluster status) says"
                " whether the cluster is healthy",
            ) from exc
        finally:
            self._cluster = None
            cluster.shutdown()

    @property
    def is_connected(self) -> bool:
        return self._cluster is not None

    @contextlib.contextmanager
    def ioctx(self, pool: str | None = None) -> Iterator[Any]:
        """Nova's ``RADOSClient``: an I/O context on ``pool`` (default: ours)."""
        pool = pool or self.pool
        with self.connected() as cluster:
            try:
                ioctx = cluster.open_ioctx(pool)
            except rados.ObjectNotFound:
                raise PoolNotFound(
                    f"Ceph pool {pool!r} does not exist (cluster {cluster.get_fsid()})",
                    hint=f"create it (ceph osd pool create {pool}; rbd pool init {pool})"
                    " or name another in the config",
                ) from None
            try:
                yield ioctx
            finally:
                ioctx.close()

    @contextlib.contextmanager
    def image(
        self,
        name: str,
        pool: str | None = None,
        snapshot: str | None = None,
        *,
        read_only: bool = False,
    ) -> Iterator[Any]:
        """Nova's ``RBDVolumeProxy``: an open RBD image, closed after."""
        with self.ioctx(pool) as ioctx:
            try:
                image = rbd.Image(ioctx, name, snapshot=snapshot, read_only=read_only)
            except rbd.ImageNotFound:
                at = f"@{snapshot}" if snapshot else ""
                raise RbdError(f"RBD image {pool or self.pool}/{name}{at} does not exist") from None
            try:
                yield image
            finally:
                image.close()

    # -- the cluster ----------------------------------------------------------

    def get_fsid(self) -> str:
        with self.connected() as cluster:
            fsid: str = cluster.get_fsid()
            return fsid

    def _mon_command(self, prefix: str) -> str:
        with self.connected() as cluster:
            ret, out, err = cluster.mon_command(
                json.dumps({"prefix": prefix, "format": "json"}), b""
            )
        if ret != 0:
            raise RbdError(f"ceph {prefix} failed: {err or os.strerror(-ret)}")
        text: str = out.decode()
        return text

    def get_mon_addrs(self) -> tuple[MonHost, ...]:
        return parse_mon_dump(self._mon_command("mon dump"))

    def health(self) -> str:
        """HEALTH_OK, HEALTH_WARN or HEALTH_ERR."""
        status: str = json.loads(self._mon_command("health"))["status"]
        return status

    def check_pool(self, pool: str | None = None) -> None:
        """Raise PoolNotFound (one clear line, a hint) unless the pool exists."""
        with self.ioctx(pool):
            pass

    def check_pool_not_full(self, pool: str | None = None) -> None:
        """Raise PoolFull when the OSD map flags the pool full (its quota reached, or
        the cluster full): a write there would wait for ``OSD_OP_TIMEOUT`` and fail."""
        pool = pool or self.pool
        for entry in json.loads(self._mon_command("osd dump"))["pools"]:
            flags = entry.get("flags_names", "").split(",")
            if entry["pool_name"] == pool and "full" in flags:
                why = "its quota is reached" if "full_quota" in flags else "the cluster is full"
                raise PoolFull(
                    f"Ceph pool {pool!r} is full ({why}): nothing can be written there",
                    hint=f"ceph osd pool get-quota {pool}; free space, or raise the quota"
                    f" (ceph osd pool set-quota {pool} max_bytes N)",
                )

    # -- images ---------------------------------------------------------------

    def exists(self, name: str, pool: str | None = None, snapshot: str | None = None) -> bool:
        try:
            with self.image(name, pool, snapshot, read_only=True):
                return True
        except RbdError as exc:
            if isinstance(exc, CephUnreachable | PoolNotFound):
                raise
            return False

    def is_cloneable(self, url: str, disk_format: str) -> bool:
        """Nova's ``is_cloneable``: the location is in this cluster, the image is raw
        and its snapshot exists; and, ours besides, that snapshot is protected (a
        clone's parent must be, and Nova's clone would fail later). Why not
        is logged; as a warning when a snapshot of this cluster is unusable, since a
        slow fetch and import follows."""
        try:
            location = parse_url(url)
        except ImageUnacceptable as exc:
            LOG.debug("not cloneable: %s", exc)
            return False
        fsid = self.get_fsid()
        if location.fsid != fsid:
            LOG.debug("not cloneable: %s is in cluster %s, not %s", url, location.fsid, fsid)
            return False
        if disk_format != "raw":
            LOG.debug("not cloneable: %s is %s, not raw", url, disk_format)
            return False
        refusal = self._snapshot_refusal(location)
        if refusal is not None:
            LOG.warning("%s: fetching and importing the image instead of a clone", refusal)
            return False
        return True

    def _snapshot_refusal(self, location: RbdLocation) -> str | None:
        """Why the location's snapshot cannot be a clone's parent; None if it can."""
        try:
            with self.image(location.image, location.pool, read_only=True) as image:
                if not image.is_protected_snap(location.snapshot):
                    return f"snapshot {location} is not protected, so it cannot be cloned"
        except rbd.ImageNotFound:
            return f"snapshot {location} does not exist"
        except RbdError as exc:
            if isinstance(exc, CephUnreachable):
                raise
            return str(exc)
        return None

    def clone(self, location: RbdLocation, dest_name: str, dest_pool: str | None = None) -> None:
        """A copy-on-write child of the location's snapshot (Nova's ``clone``)."""
        with self.ioctx(location.pool) as src, self.ioctx(dest_pool) as dest:
            try:
                rbd.RBD().clone(src, location.image, location.snapshot, dest, dest_name)
            except rbd.Error as exc:
                raise RbdError(f"rbd clone of {location} to {dest_name} failed: {exc}") from exc

    def size(self, name: str, pool: str | None = None) -> int:
        with self.image(name, pool, read_only=True) as image:
            size: int = image.size()
            return size

    def resize(self, name: str, size: int, pool: str | None = None) -> None:
        LOG.debug("resizing rbd image %s to %d", name, size)
        with self.image(name, pool) as image:
            image.resize(size)

    def parent_info(self, name: str, pool: str | None = None) -> tuple[RbdLocation, int] | None:
        """The snapshot a clone was made from and its size; None for no parent."""
        with self.image(name, pool, read_only=True) as image:
            try:
                spec = image.get_parent_image_spec()
            except rbd.ImageNotFound:
                return None
        parent = RbdLocation(
            self.get_fsid(), spec["pool_name"], spec["image_name"], spec["snap_name"]
        )
        with self.image(parent.image, parent.pool, parent.snapshot, read_only=True) as image:
            return parent, int(image.size())

    def allocated_bytes(self, name: str, pool: str | None = None) -> int:
        """The image's own data (a clone's, not its parent's): for ``show``'s actual size."""
        total = 0

        def count(_offset: int, length: int, exists: bool) -> None:
            nonlocal total
            if exists:
                total += length

        with self.image(name, pool, read_only=True) as image:
            image.diff_iterate(0, image.size(), None, count, include_parent=False)
        return total

    def flatten(self, name: str, pool: str | None = None) -> None:
        """Copy the parent's data into a clone, which then stands alone."""
        with self.image(name, pool) as image:
            image.flatten()

    def create_snap(
        self, name: str, snapshot: str, pool: str | None = None, *, protect: bool = False
    ) -> None:
        with self.image(name, pool) as image:
            image.create_snap(snapshot)
            if protect:
                image.protect_snap(snapshot)

    def children(self, name: str, snapshot: str, pool: str | None = None) -> list[str]:
        """The clones of a snapshot, as ``pool/image``."""
        with self.image(name, pool, snapshot, read_only=True) as image:
            return [f"{c['pool']}/{c['image']}" for c in image.list_children2()]

    def remove_snap(
        self, name: str, snapshot: str, pool: str | None = None, *, unprotect: bool = False
    ) -> None:
        """Remove a snapshot (unprotecting it first if asked); refused while it has
        clones."""
        with self.image(name, pool) as image:
            try:
                if unprotect and image.is_protected_snap(snapshot):
                    image.unprotect_snap(snapshot)
                image.remove_snap(snapshot)
            except rbd.ImageBusy:
                clones = self.children(name, snapshot, pool)
                raise RbdImageBusy(
                    f"snapshot {pool or self.pool}/{name}@{snapshot} has"
                    f" {len(clones)} clone(s): {', '.join(clones)}",
                    hint="delete (or flatten) the clones first: instances booted from it,"
                    " or images made from them",
                ) from None
            except rbd.ImageNotFound:
                pass  # gone already

    def remove_image(self, name: str, pool: str | None = None) -> bool:
        """Remove an image and its snapshots; False when there was none.

        A QEMU that has just stopped may still watch the image for a moment: removal
        is retried for ``REMOVE_TIMEOUT`` seconds (Nova retries too).
        """
        deadline = time.monotonic() + REMOVE_TIMEOUT
        with self.ioctx(pool) as ioctx:
            while True:
                try:
                    rbd.RBD().remove(ioctx, name)
                    return True
                except rbd.ImageNotFound:
                    return False
                except rbd.ImageHasSnapshots:
                    with self.image(name, pool) as image:
                        snaps = [s["name"] for s in image.list_snaps()]
                    for snap in snaps:
                        self.remove_snap(name, snap, pool, unprotect=True)
                except rbd.ImageBusy:
                    if time.monotonic() > deadline:
                        raise RbdImageBusy(
                            f"RBD image {pool or self.pool}/{name} is still in use"
                            f" (watched) after {REMOVE_TIMEOUT:g} s",
                            hint=f"rbd status {pool or self.pool}/{name} shows who uses it",
                        ) from None
                    time.sleep(REMOVE_INTERVAL)

    def rename(self, name: str, new_name: str, pool: str | None = None) -> None:
        """``rbd rename`` within a pool: the image, its data and snapshots, renamed."""
        with self.ioctx(pool) as ioctx:
            try:
                rbd.RBD().rename(ioctx, name, new_name)
            except rbd.Error as exc:
                raise RbdError(
                    f"rbd rename of {pool or self.pool}/{name} to {new_name} failed: {exc}"
                ) from exc

    def list_images(self, pool: str | None = None) -> list[str]:
        with self.ioctx(pool) as ioctx:
            return list(rbd.RBD().list(ioctx))

    def instance_images(self, instance_uuid: str, pool: str | None = None) -> list[str]:
        """The ``<instance uuid>_*`` images of the pool, from one listing: an instance's
        RBD disks, found by name as Nova's ``cleanup_volumes`` finds them."""
        prefix = f"{instance_uuid}_"
        return [name for name in self.list_images(pool) if name.startswith(prefix)]

    def cleanup_volumes(self, instance_uuid: str, pool: str | None = None) -> list[str]:
        """Nova's ``cleanup_volumes``: remove every ``<instance uuid>_*`` image."""
        with self.connected():
            names = self.instance_images(instance_uuid, pool)
            return [name for name in names if self.remove_image(name, pool)]

    def create_image(self, name: str, size: int, pool: str | None = None) -> None:
        """A new, empty image of ``size`` bytes (Cinder's ``create_volume``)."""
        with self.ioctx(pool) as ioctx:
            try:
                rbd.RBD().create(ioctx, name, size, old_format=False)
            except rbd.ImageExists:
                raise RbdError(f"RBD image {pool or self.pool}/{name} exists already") from None

    def import_image(
        self,
        base: Path,
        name: str,
        pool: str | None = None,
        *,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> None:
        """Nova's ``import_image`` (there: ``rbd import``): a new image with the raw
        file's content. Chunks of zeros are not written (the image stays thin);
        ``on_chunk`` sees every chunk in order (a hash, progress)."""
        size = os.path.getsize(base)
        zeros = bytes(CHUNK)
        with self.ioctx(pool) as ioctx:
            self.create_image(name, size, pool)
            try:
                with rbd.Image(ioctx, name) as image, open(base, "rb") as src:
                    offset = 0
                    while chunk := src.read(CHUNK):
                        if on_chunk is not None:
                            on_chunk(chunk)
                        if chunk != zeros[: len(chunk)]:
                            image.write(chunk, offset)
                        offset += len(chunk)
                    image.flush()
            except BaseException:
                with contextlib.suppress(rbd.Error):
                    rbd.RBD().remove(ioctx, name)
                raise

    @contextlib.contextmanager
    def open_location(self, location: RbdLocation) -> Iterator[RBDReader]:
        """The data of an image at its snapshot, for reading (Glance's download). Only
        from this cluster: a location in another one names nothing here."""
        fsid = self.get_fsid()
        if location.fsid != fsid:
            raise ImageUnacceptable(
                f"image location {location.url} is in Ceph cluster {location.fsid};"
                f" this host reaches cluster {fsid}",
                hint="point [libvirt] images_rbd_ceph_conf at that cluster, or add the"
                " image again from a file or URL",
            )
        with self.image(location.image, location.pool, location.snapshot, read_only=True) as im:
            yield RBDReader(im)


__all__ = [
    "IMAGE_SNAPSHOT",
    "CephUnreachable",
    "MonHost",
    "PoolFull",
    "PoolNotFound",
    "RBDDriver",
    "RBDReader",
    "RbdError",
    "RbdImageBusy",
    "RbdLocation",
    "is_rbd_url",
    "parse_mon_dump",
    "parse_url",
]
