"""The local image service: Glance's image model on one host.

Image files live in ``images_path/<id>``; their records in the ``images`` table of the
state database, with Glance's field names, statuses and checksums (md5 ``checksum``,
sha512 ``os_hash_value``), so that code written against Glance reads the same here.

``add`` reads its source once: each chunk is hashed, fed to the format inspectors and
written to ``<id>.part``; only a file that passed every check is renamed to ``<id>``
and its record made active. A record is written first, as ``saving``, so that an
interrupted add is visible in the list rather than a silent stray file; the add holds
the image's lock (``add_lock_name``) from then until it ends, so a ``saving`` record
whose lock is free was left by a crash, and ``minidriver cleanup`` removes it and its
partial files.

``add(..., store="rbd")`` is Glance's rbd store: the same checked copy, converted to
raw when it is not (qemu-img must agree with the inspector first, and the result is
inspected again), then written into the pool as an RBD image named by the image id,
with a protected snapshot ``snap`` to clone from; the location recorded is
``rbd://<fsid>/<pool>/<id>/snap`` and the checksums are of the raw data stored.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import sqlite3
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Final, TypedDict

from minidriver import lockutils, rbd_utils
from minidriver.db import Database, resolve, utc_now
from minidriver.exception import (
    ImageNotFound,
    ImageUnacceptable,
    MinidriverError,
)
from minidriver.fileutils import (
    PRIVATE_DIR,
    PRIVATE_FILE,
    ensure_free_space,
    fsync_dir,
    make_dir,
    out_of_space_is_clear,
)
from minidriver.images import download, inspect, qemu_img
from minidriver.images.inspect import Readable
from minidriver.objects import ImageMeta
from minidriver.process import ResourceLimits

CHUNK_SIZE: Final = 1024 * 1024
# Glance's image_size_cap default: the largest image add accepts.
DEFAULT_SIZE_CAP: Final = 1024**4
OS_HASH_ALGO: Final = "sha512"

# Glance's container formats that hold one bare disk; ovf, ova, docker and
# compressed wrap it in something no format inspector reads.
CONTAINER_FORMATS: Final = ("bare", "ami", "aki", "ari")

# Where ``add`` puts the data: a file under images_path, or an RBD image (Glance's
# stores of those names).
STORES: Final = ("file", "rbd")

# The hex length of each checksum algorithm ``add`` verifies.
CHECKSUM_ALGOS: Final[Mapping[str, int]] = {"md5": 32, "sha256": 64, "sha512": 128}


def add_lock_name(image_id: str) -> str:
    """The lock an ``add`` holds while its image is ``saving``."""
    return f"image-{image_id}"


class ImageStoreError(MinidriverError):
    """The image service could not read or write an image file."""


class ImageStatus(enum.StrEnum):
    """Glance's statuses. ``add`` writes its record as saving at once (Glance's
    queued is an image record still waiting for data, which ``add`` never makes)."""

    QUEUED = "queued"
    SAVING = "saving"
    ACTIVE = "active"


class Location(TypedDict):
    """One of Glance's image locations."""

    url: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Image:
    """An image record, with Glance's fields."""

    id: str
    name: str
    disk_format: str
    container_format: str
    size: int  # bytes; 0 until active
    virtual_size: int | None  # None if unknown
    min_disk: int  # GB
    min_ram: int  # MB
    checksum: str | None  # md5 hex
    os_hash_algo: str | None
    os_hash_value: str | None
    status: ImageStatus
    created_at: str
    updated_at: str
    properties: Mapping[str, str]
    locations: tuple[Location, ...]

    @property
    def path(self) -> Path:
        """The file of the first ``file://`` location."""
        for location in self.locations:
            url = urllib.parse.urlsplit(location["url"])
            if url.scheme == "file":
                return Path(urllib.parse.unquote(url.path))  # url2pathname on POSIX
        raise ImageNotFound(
            f"image {self.id} has no file (status {self.status})",
            hint="an image has its file once it is active",
        )

    @property
    def rbd_location(self) -> rbd_utils.RbdLocation | None:
        """The first ``rbd://`` location, if the image is stored in Ceph."""
        for location in self.locations:
            if rbd_utils.is_rbd_url(location["url"]):
                return rbd_utils.parse_url(location["url"])
        return None

    def to_image_meta(self) -> ImageMeta:
        return ImageMeta(
            id=self.id,
            name=self.name,
            disk_format=self.disk_format,
            container_format=self.container_format,
            size=self.size,
            virtual_size=self.virtual_size,
            min_disk=self.min_disk,
            min_ram=self.min_ram,
            properties=dict(self.properties),
        )

    def to_dict(self) -> dict[str, Any]:
        """Glance's field names, for ``--json``; properties nested, as the openstack
        client prints them."""
        return {
            "id": self.id,
            "name": self.name,
            "disk_format": self.disk_format,
            "container_format": self.container_format,
            "size": self.size if self.status == ImageStatus.ACTIVE else None,
            "virtual_size": self.virtual_size,
            "min_disk": self.min_disk,
            "min_ram": self.min_ram,
            "checksum": self.checksum,
            "os_hash_algo": self.os_hash_algo,
            "os_hash_value": self.os_hash_value,
            "status": str(self.status),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "properties": dict(self.properties),
            "locations": [
                {"url": loc["url"], "metadata": dict(loc["metadata"])} for loc in self.locations
            ],
        }

    def describe(self) -> str:
        """``id (name, status)``, for messages listing several."""
        return f"{self.id} ({self.name}, {self.status})"


def _image(row: sqlite3.Row) -> Image:
    return Image(
        id=row["id"],
        name=row["name"],
        disk_format=row["disk_format"],
        container_format=row["container_format"],
        size=row["size"] or 0,
        virtual_size=row["virtual_size"],
        min_disk=row["min_disk"],
        min_ram=row["min_ram"],
        checksum=row["checksum"],
        os_hash_algo=row["os_hash_algo"],
        os_hash_value=row["os_hash_value"],
        status=ImageStatus(row["status"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        properties=MappingProxyType(json.loads(row["properties"])),
        locations=tuple(json.loads(row["locations"])),
    )


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algo, _, value = checksum.partition(":")
    algo, value = algo.lower(), value.lower()
    length = CHECKSUM_ALGOS.get(algo)
    if length is None or len(value) != length or not all(c in "0123456789abcdef" for c in value):
        raise ImageUnacceptable(
            f"checksum {checksum!r} is not ALGO:HEX",
            hint="give md5:<32 hex>, sha256:<64 hex> or sha512:<128 hex>",
        )
    return algo, value


def _label(source: Path | str) -> str:
    """How messages name a source: a file's name, or a URL as given."""
    return source if isinstance(source, str) and download.is_url(source) else Path(source).name


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class ImageService:
    """Glance's image API, on the local state dir.

    ``rbd`` makes a driver for Glance's rbd store pool (a new one per use: a driver
    is not shared between threads); without it ``store="rbd"`` is refused.
    ``locks_dir`` holds the locks of adds in progress (default: ``locks`` beside
    ``images_path``, so ``$state_path/locks``, where ``cleanup`` looks).
    """

    def __init__(
        self,
        db: Database,
        images_path: Path,
        *,
        size_cap: int = DEFAULT_SIZE_CAP,
        rbd: Callable[[], rbd_utils.RBDDriver] | None = None,
        limits: ResourceLimits | None = qemu_img.DEFAULT_LIMITS,
        locks_dir: Path | None = None,
    ) -> None:
        self.db = db
        self.images_path = images_path
        self.locks_dir = locks_dir or images_path.parent / "locks"
        self.size_cap = size_cap
        self.rbd = rbd
        self.limits = limits

    def rbd_driver(self) -> rbd_utils.RBDDriver:
        if self.rbd is None:
            raise ImageStoreError(
                "this image service has no rbd store",
                hint="configure [glance_store] rbd_store_pool and the cluster in [libvirt]",
            )
        return self.rbd()

    def add(
        self,
        source: Path | str,
        *,
        name: str,
        disk_format: str = inspect.AUTO,
        container_format: str = "bare",
        min_disk: int = 0,
        min_ram: int = 0,
        properties: Mapping[str, str] | None = None,
        checksum: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        store: str = "file",
    ) -> Image:
        """Copy ``source`` (a path, or an http(s) URL) into the store; the active image.

        ``disk_format`` must match the content (``auto`` takes what is detected);
        ``checksum`` (``md5:HEX``, ``sha256:HEX``, ``sha512:HEX``) must match the
        bytes. ``store``: ``file``, or ``rbd`` (stored as raw in Ceph). On any failure
        nothing is left: no file, no RBD image, no record.
        """
        # Refuse bad arguments before any byte is copied.
        if isinstance(source, str) and "://" in source:
            download.check_url(source)  # a URL, but not http(s): file:, ftp: ...
        inspect.validate_disk_format(disk_format)
        if container_format not in CONTAINER_FORMATS:
            raise ImageUnacceptable(
                f"container format {container_format!r} is not supported",
                hint=f"minidriver stores bare disks: {', '.join(CONTAINER_FORMATS)}",
            )
        if min_disk < 0 or min_ram < 0:
            raise ImageUnacceptable("min_disk and min_ram must not be negative")
        if store not in STORES:
            raise ImageStoreError(
                f"store {store!r} is not one of: {', '.join(STORES)}",
                hint="--store file (the default) or --store rbd",
            )
        if store == "rbd" and disk_format in inspect.UNINSPECTED:
            raise ImageUnacceptable(
                f"a {disk_format} (kernel or ramdisk) is no disk to store in rbd",
                hint="add kernels and ramdisks to the file store (--store file)",
            )
        expected = _parse_checksum(checksum) if checksum is not None else None
        rbd = self.rbd_driver() if store == "rbd" else None

        image_id = str(uuid.uuid4())
        # With rbd, the cluster and its pool are checked before any byte is copied.
        with (
            rbd.connected() if rbd else contextlib.nullcontext(),
            lockutils.external_lock(self.locks_dir, add_lock_name(image_id)),
        ):
            if rbd is not None:
                rbd.check_pool()
            now = utc_now()
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO images (id, name, disk_format, container_format, min_disk, "
                    "min_ram, status, created_at, updated_at, properties) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        image_id,
                        name,
                        disk_format,
                        container_format,
                        min_disk,
                        min_ram,
                        ImageStatus.SAVING,
                        now,
                        now,
                        json.dumps(dict(properties or {}), sort_keys=True),
                    ),
                )
            part = self.images_path / f"{image_id}.part"
            final = self.images_path / image_id
            try:
                detected, hashes = self._copy(source, part, disk_format, expected, progress)
                if expected is not None and hashes[expected[0]] != expected[1]:
                    raise ImageUnacceptable(
                        f"image {_label(source)} is refused: its {expected[0]} checksum is "
                        f"{hashes[expected[0]]}, not {expected[1]}",
                        hint="the file is corrupt or not the one the checksum is for",
                    )
                if rbd is None:
                    self._activate(image_id, part, final, detected, hashes)
                else:
                    self._activate_rbd(rbd, image_id, part, detected, _label(source))
            except BaseException as exc:
                part.unlink(missing_ok=True)
                final.unlink(missing_ok=True)
                part.with_suffix(".raw").unlink(missing_ok=True)
                # The original error matters more than a failed clean-up; a record left
                # behind stays visible as "saving".
                with contextlib.suppress(MinidriverError):
                    self._forget(image_id)
                if isinstance(exc, OSError):
                    raise self._os_error(source, exc) from exc
                raise
            return self.get(image_id)

    def _os_error(self, source: Path | str, exc: OSError) -> MinidriverError:
        if exc.filename == os.fspath(source):
            if isinstance(exc, FileNotFoundError):
                return ImageNotFound(f"image file {source} does not exist", hint="check the path")
            return ImageStoreError(
                f"cannot read image file {source}: {exc.strerror}",
                hint="check the path and its permissions",
            )
        return ImageStoreError(
            f"cannot add image {_label(source)} to {self.images_path}: {exc.strerror or exc}",
            hint=f"check the free space and permissions of {self.images_path}",
        )

    @contextlib.contextmanager
    def _open(self, source: Path | str) -> Iterator[tuple[Readable, int | None]]:
        """The source's bytes and their size, if known in advance."""
        if isinstance(source, str) and download.is_url(source):
            with download.open_url(source, self.size_cap) as body:
                yield body, body.total
            return
        with open(os.fspath(source), "rb") as src:
            yield src, os.fstat(src.fileno()).st_size

    def _copy(
        self,
        source: Path | str,
        part: Path,
        disk_format: str,
        expected: tuple[str, str] | None,
        progress: Callable[[int, int], None] | None,
    ) -> tuple[inspect.DetectedImage, dict[str, str]]:
        """One pass over ``source``: hash, inspect and write to ``part``, then fsync."""
        hashers = {"md5": hashlib.md5(usedforsecurity=False), OS_HASH_ALGO: hashlib.sha512()}
        if expected is not None and expected[0] not in hashers:
            hashers[expected[0]] = hashlib.new(expected[0])
        make_dir(self.images_path, PRIVATE_DIR)
        with self._open(source) as (src, total):
            reader = inspect.InspectingReader(src, disk_format, label=_label(source))
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
            try:
                while chunk := reader.read(CHUNK_SIZE):
                    for hasher in hashers.values():
                        hasher.update(chunk)
                    _write_all(fd, chunk)
                    if progress is not None:
                        progress(reader.bytes_read, total or 0)
                # Durable before it is checked and renamed: a crash must never leave
                # a complete-looking <id> with missing blocks.
                os.fsync(fd)
            finally:
                os.close(fd)
            detected = reader.check()
        return detected, {algo: hasher.hexdigest() for algo, hasher in hashers.items()}

    def _activate(
        self,
        image_id: str,
        part: Path,
        final: Path,
        detected: inspect.DetectedImage,
        hashes: Mapping[str, str],
    ) -> None:
        location: Location = {"url": final.as_uri(), "metadata": {}}
        with self.db.transaction() as conn:
            # Under the write lock, so that a concurrent delete either sees the image
            # active with its file, or made this add fail before the rename.
            row = conn.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is None:
                raise ImageNotFound(f"image {image_id} was deleted while it was being added")
            os.rename(part, final)
            conn.execute(
                "UPDATE images SET disk_format = ?, size = ?, virtual_size = ?, "
                "checksum = ?, os_hash_algo = ?, os_hash_value = ?, status = ?, "
                "updated_at = ?, locations = ? WHERE id = ?",
                (
                    detected.format if row["disk_format"] == inspect.AUTO else row["disk_format"],
                    os.stat(final).st_size,
                    detected.virtual_size or None,
                    hashes["md5"],
                    OS_HASH_ALGO,
                    hashes[OS_HASH_ALGO],
                    ImageStatus.ACTIVE,
                    utc_now(),
                    json.dumps([location]),
                    image_id,
                ),
            )
            # The rename durable before the record says active.
            fsync_dir(self.images_path)

    def _to_raw(self, part: Path, detected: inspect.DetectedImage, label: str) -> Path:
        """The checked copy as raw: itself, or converted next to it (``<id>.raw``)
        after qemu-img agreed with the inspector; the result is inspected again."""
        if detected.format == "raw":
            return part
        fmt = qemu_img.qemu_format(detected.format)
        virtual_size = inspect.agree(label, part, detected.format, self.limits)
        if virtual_size > self.size_cap:
            raise ImageUnacceptable(
                f"image {label} is refused: as raw it is {virtual_size} bytes, over the"
                f" store's image_size_cap ({self.size_cap} bytes)",
                hint="raise [DEFAULT] image_size_cap, or use a smaller image",
            )
        raw = part.with_suffix(".raw")
        converting = f"converting {label} to raw"
        ensure_free_space(self.images_path, virtual_size, converting)
        with out_of_space_is_clear(self.images_path, converting):
            qemu_img.convert(part, fmt, raw, "raw")
        inspect.check_image(raw, "raw", label=f"{label} as raw")
        part.unlink()
        return raw

    def _activate_rbd(
        self,
        rbd: rbd_utils.RBDDriver,
        image_id: str,
        part: Path,
        detected: inspect.DetectedImage,
        label: str,
    ) -> None:
        """Glance's rbd store ``add``: raw data into the pool, a protected snapshot."""
        raw = self._to_raw(part, detected, label)
        hashers = {"md5": hashlib.md5(usedforsecurity=False), OS_HASH_ALGO: hashlib.sha512()}

        def hash_chunk(chunk: bytes) -> None:
            for hasher in hashers.values():
                hasher.update(chunk)

        location = rbd_utils.RbdLocation(
            rbd.get_fsid(), rbd.pool, image_id, rbd_utils.IMAGE_SNAPSHOT
        )
        rbd.import_image(raw, image_id, on_chunk=hash_chunk)
        try:
            rbd.create_snap(image_id, location.snapshot, protect=True)
            size = raw.stat().st_size
            with self.db.transaction() as conn:
                row = conn.execute("SELECT id FROM images WHERE id = ?", (image_id,)).fetchone()
                if row is None:
                    raise ImageNotFound(f"image {image_id} was deleted while it was being added")
                conn.execute(
                    "UPDATE images SET disk_format = 'raw', size = ?, virtual_size = ?, "
                    "checksum = ?, os_hash_algo = ?, os_hash_value = ?, status = ?, "
                    "updated_at = ?, locations = ? WHERE id = ?",
                    (
                        size,
                        size,
                        hashers["md5"].hexdigest(),
                        OS_HASH_ALGO,
                        hashers[OS_HASH_ALGO].hexdigest(),
                        ImageStatus.ACTIVE,
                        utc_now(),
                        json.dumps([{"url": location.url, "metadata": {}}]),
                        image_id,
                    ),
                )
        except BaseException:
            # The first error is the one to report; a failed removal is only logged.
            rbd_utils.remove_quietly(rbd, image_id)
            raise
        finally:
            raw.unlink(missing_ok=True)

    def add_location(
        self,
        image_id: str,
        *,
        name: str,
        url: str,
        size: int,
        disk_format: str = "raw",
        min_disk: int = 0,
        min_ram: int = 0,
        properties: Mapping[str, str] | None = None,
    ) -> Image:
        """An active image whose data already sits at ``url`` (Glance's image create
        plus location add, as Nova's direct snapshot does): no checksum, no copy."""
        now = utc_now()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO images (id, name, disk_format, container_format, size, "
                "virtual_size, min_disk, min_ram, status, created_at, updated_at, "
                "properties, locations) VALUES (?, ?, ?, 'bare', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    image_id,
                    name,
                    disk_format,
                    size,
                    size if disk_format == "raw" else None,
                    min_disk,
                    min_ram,
                    ImageStatus.ACTIVE,
                    now,
                    now,
                    json.dumps(dict(properties or {}), sort_keys=True),
                    json.dumps([{"url": url, "metadata": {}}]),
                ),
            )
        return self.get(image_id)

    def _forget(self, image_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM images WHERE id = ?", (image_id,))

    def get(self, ref: str) -> Image:
        """The image ``ref`` names: its id, a unique id prefix or a unique name."""
        rows = self.db.query_ref("images", ref, key="id", names=("name",))
        return resolve(
            ref,
            [_image(row) for row in rows] if ref else [],
            ident=lambda image: image.id,
            names=lambda image: (image.name,),
            describe=lambda image: image.describe(),
            what="image",
            not_found=ImageNotFound(
                f"no image matches {ref!r}",
                hint="give an image id, a unique id prefix or a unique name",
            ),
        )

    def instance_image_meta(self, kept: str, image_id: str) -> ImageMeta | None:
        """Nova's ``instance.image_meta``: ``kept``, the copy an instance keeps from its
        boot (``ImageMeta.to_json``); for a record made before copies were kept (''),
        image ``image_id``'s here; None when that image is gone too."""
        if kept:
            return ImageMeta.from_json(kept)
        try:
            return self.get(image_id).to_image_meta()
        except ImageNotFound:
            return None

    def list(self) -> list[Image]:
        """Every image, oldest first; ``saving`` ones too."""
        return [
            _image(row) for row in self.db.query("SELECT * FROM images ORDER BY created_at, rowid")
        ]

    def delete(self, ref: str) -> None:
        image = self.get(ref)
        location = image.rbd_location
        if location is not None:
            # Glance's order for rbd: the snapshot (refused while clones use it), the
            # image, then the record; a refusal leaves the image whole.
            rbd = self.rbd_driver()
            with rbd.connected():
                rbd.remove_snap(location.image, location.snapshot, location.pool, unprotect=True)
                rbd.remove_image(location.image, location.pool)
        # The record goes first: a file without a record is garbage, a record without
        # its file would be an image that fails at boot.
        self._forget(image.id)
        for path in (self.images_path / image.id, self.images_path / f"{image.id}.part"):
            path.unlink(missing_ok=True)

    def open_data(self, image: Image) -> contextlib.AbstractContextManager[Readable]:
        """The image's data for reading, wherever it is stored (fetch's source)."""
        location = image.rbd_location
        if location is not None:
            return self.rbd_driver().open_location(location)
        return open(image.path, "rb")

    def open(self, ref: str) -> BinaryIO:
        """The image's data, for reading (as Glance's download)."""
        image = self.get(ref)
        if image.status != ImageStatus.ACTIVE:
            raise ImageUnacceptable(
                f"image {image.id} is {image.status}, not active",
                hint="an interrupted add leaves a saving image; delete it and add again",
            )
        try:
            return open(image.path, "rb")
        except FileNotFoundError:
            raise ImageNotFound(
                f"the file of image {image.id} is missing: {image.path}",
                hint="delete the image and add it again",
            ) from None
