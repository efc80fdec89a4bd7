"""Volumes and their attachments, recorded in the state database (cinder/volume/api.py).

A volume goes through Cinder's states: ``creating`` while its backend makes it,
``available``, ``in-use`` while attached, ``deleting``, and ``error`` when its backend
failed (its record stays, as in Cinder, until it is deleted). An attachment is one
row per attached volume (no multi-attach), which is also Nova's block device mapping:
the device in the guest, ``boot_index`` 0 for the root of an instance booted from it,
and ``delete_on_termination``.

Each change of a volume's state happens under the volume's lock and in one
transaction, so two commands never both attach, or attach and delete, one volume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import sqlite3
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from minidriver.db import Database, resolve, utc_now
from minidriver.exception import MinidriverError, NotFound
from minidriver.lockutils import external_lock
from minidriver.objects import GiB
from minidriver.steps import StepTimer
from minidriver.volume import pool, rbd
from minidriver.volume.backend import VolumeBackend, VolumeConnection

if TYPE_CHECKING:
    from minidriver.config import Config
    from minidriver.host import Host
    from minidriver.images.store import Image as StoreImage
    from minidriver.images.store import ImageService

LOG = logging.getLogger(__name__)

MAX_SIZE_GB = 16384  # 16 TiB: a typo's guard, not a policy


class VolumeNotFound(NotFound):
    pass


class VolumeError(MinidriverError):
    """A volume cannot do what was asked in its state (delete while attached...)."""


class VolumeStatus(enum.StrEnum):
    CREATING = "creating"
    AVAILABLE = "available"
    IN_USE = "in-use"
    ERROR = "error"
    DELETING = "deleting"


class BackendName(enum.StrEnum):
    RBD = "rbd"
    POOL = "pool"


@dataclass(frozen=True)
class Attachment:
    """A volume attached to an instance (Cinder's attachment, Nova's BDM)."""

    volume_id: str
    instance_uuid: str
    device: str  # vdb...: the target dev in the domain
    boot_index: int | None = None  # 0: the instance's root (boot from volume)
    delete_on_termination: bool = False
    attached_at: str = ""


@dataclass(frozen=True)
class VolumeRecord:
    """One row of ``volumes``."""

    id: str
    name: str
    size_gb: int
    status: str
    backend: str
    location: str  # rbd:pool/volume-<id>, or the pool volume's file; '' until made
    image_id: str
    created_at: str
    updated_at: str
    attachment: Attachment | None = None

    def describe(self) -> str:
        return f"{self.id} ({self.name})"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["attachment"] = dataclasses.asdict(self.attachment) if self.attachment else None
        return data


_VOLUME_FIELDS: Final = tuple(
    f.name for f in dataclasses.fields(VolumeRecord) if f.name != "attachment"
)
_ATTACHMENT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Attachment))
# Built from the records' field names, never from input.
_INSERT_VOLUME: Final = (
    f"INSERT INTO volumes ({', '.join(_VOLUME_FIELDS)})"  # noqa: S608
    f" VALUES ({', '.join(':' + n for n in _VOLUME_FIELDS)})"
)
_INSERT_ATTACHMENT: Final = (
    f"INSERT INTO volume_attachments ({', '.join(_ATTACHMENT_FIELDS)})"  # noqa: S608
    f" VALUES ({', '.join(':' + n for n in _ATTACHMENT_FIELDS)})"
)


def _attachment(row: sqlite3.Row) -> Attachment:
    fields = {n: row[n] for n in _ATTACHMENT_FIELDS}
    fields["delete_on_termination"] = bool(fields["delete_on_termination"])
    return Attachment(**fields)


def volume_lock_name(volume_id: str) -> str:
    return f"volume-{volume_id}"


class VolumeAPI:
    """Cinder's volume API for one state dir: records, states, and the backends."""

    def __init__(self, conf: Config, db: Database, images: ImageService, host: Host) -> None:
        self.conf = conf
        self.db = db
        self.images = images
        self.host = host

    # -- records --------------------------------------------------------------

    def _volume(self, row: sqlite3.Row) -> VolumeRecord:
        rows = self.db.query("SELECT * FROM volume_attachments WHERE volume_id = ?", (row["id"],))
        attachment = _attachment(rows[0]) if rows else None
        return VolumeRecord(**{n: row[n] for n in _VOLUME_FIELDS}, attachment=attachment)

    def get(self, ref: str) -> VolumeRecord:
        """The one volume ``ref`` names: its id, a unique id prefix or its name."""
        rows = self.db.query_ref("volumes", ref, key="id", names=("name",))
        return resolve(
            ref,
            [self._volume(row) for row in rows] if ref else [],
            ident=lambda v: v.id,
            names=lambda v: (v.name,),
            describe=lambda v: v.describe(),
            what="volume",
            not_found=VolumeNotFound(
                f"no volume matches {ref!r}",
                hint="give an id, a unique id prefix or a name (minidriver volume list)",
            ),
        )

    def get_all(self) -> list[VolumeRecord]:
        rows = self.db.query("SELECT * FROM volumes ORDER BY created_at, rowid")
        return [self._volume(row) for row in rows]

    def attachments_of(self, instance_uuid: str) -> list[Attachment]:
        """The volumes attached to an instance, by device name."""
        rows = self.db.query(
            "SELECT * FROM volume_attachments WHERE instance_uuid = ? ORDER BY device",
            (instance_uuid,),
        )
        return [_attachment(r) for r in rows]

    def _set_status(self, volume_id: str, status: VolumeStatus, **fields: str) -> None:
        sets = ", ".join(f"{name} = :{name}" for name in fields)
        with self.db.transaction() as conn:
            conn.execute(
                # Column names come from the code, never from input.
                f"UPDATE volumes SET status = :status, updated_at = :now"  # noqa: S608
                f"{', ' + sets if sets else ''} WHERE id = :id",
                {"status": str(status), "now": utc_now(), "id": volume_id, **fields},
            )

    @contextlib.contextmanager
    def locked(self, volume_id: str) -> Iterator[None]:
        with external_lock(self.conf.locks_dir, volume_lock_name(volume_id)):
            yield

    # -- backends -------------------------------------------------------------

    def default_backend(self) -> BackendName:
        """``[volume] default_backend``, else libvirt's storage pool on the daemon, else
        Ceph when it is configured, else a clear error."""
        configured = self.conf.volume.default_backend
        if configured:
            return BackendName(configured)
        if not self.host.is_embedded:
            return BackendName.POOL
        opts = self.conf.libvirt
        if opts.images_type == "rbd" or opts.images_rbd_ceph_conf:
            return BackendName.RBD
        raise VolumeError(
            "no volume backend: libvirt's storage pools need the libvirt daemon"
            f" ({self.host.uri} is the embedded driver), and no Ceph cluster is configured",
            hint="set [libvirt] images_rbd_ceph_conf (the rbd backend), or start libvirtd",
        )

    def backend(self, name: str) -> VolumeBackend:
        if name == BackendName.RBD:
            return rbd.RBDVolumeDriver(self.conf)
        return pool.StoragePoolDriver(self.conf, self.host, self.db.state_id)

    def connection(self, volume: VolumeRecord) -> VolumeConnection:
        """Cinder's ``initialize_connection``: how QEMU reaches the volume."""
        return self.backend(volume.backend).initialize_connection(volume.location)

    # -- operations -----------------------------------------------------------

    def create(
        self,
        size_gb: int,
        *,
        name: str | None = None,
        image: str | None = None,
        backend: str | None = None,
    ) -> VolumeRecord:
        """A new volume of ``size_gb`` GB, blank or made from ``image``.

        Recorded ``creating`` first; a backend failure leaves the record in ``error``
        (and nothing of it in the backend), as Cinder does: ``volume delete`` forgets it.
        """
        if not 1 <= size_gb <= MAX_SIZE_GB:
            raise VolumeError(
                f"--size {size_gb}: a volume has 1 to {MAX_SIZE_GB} GB",
                hint="give the size in GB, e.g. --size 1",
            )
        chosen = BackendName(backend) if backend else self.default_backend()
        driver = self.backend(chosen)
        driver.check_for_setup_error()  # an unreachable backend: no record at all
        source: StoreImage | None = self.images.get(image) if image else None
        if source is not None:
            min_size = max(source.virtual_size or 0, source.min_disk * GiB)
            if min_size > size_gb * GiB:
                raise VolumeError(
                    f"image {source.name} needs {-(-min_size // GiB)} GB;"
                    f" --size {size_gb} is smaller",
                    hint=f"give --size {-(-min_size // GiB)} or more",
                )
        now = utc_now()
        rec = VolumeRecord(
            id=str(uuidlib.uuid4()),
            name=name or "",
            size_gb=size_gb,
            status=VolumeStatus.CREATING,
            backend=chosen,
            location="",
            image_id=source.id if source else "",
            created_at=now,
            updated_at=now,
        )
        with self.db.transaction() as conn:
            conn.execute(_INSERT_VOLUME, {n: getattr(rec, n) for n in _VOLUME_FIELDS})
        try:
            if source is None:
                location = driver.create_volume(rec.id, size_gb * GiB)
            else:
                location = driver.create_volume_from_image(
                    rec.id, size_gb * GiB, source, self.images, StepTimer()
                )
        except BaseException:
            self._set_status(rec.id, VolumeStatus.ERROR)
            raise
        self._set_status(rec.id, VolumeStatus.AVAILABLE, location=location)
        return self.get(rec.id)

    def delete(self, ref: str) -> VolumeRecord:
        """Remove a volume and its storage; refused while it is attached."""
        volume = self.get(ref)
        with self.locked(volume.id):
            volume = self.get(volume.id)
            if volume.attachment is not None:
                raise VolumeError(
                    f"volume {volume.describe()} is attached to instance"
                    f" {self._instance_name(volume.attachment.instance_uuid)}"
                    f" as {volume.attachment.device}",
                    hint="detach it first: minidriver volume detach INSTANCE VOLUME"
                    + (
                        " (it is the instance's root: delete the instance)"
                        if volume.attachment.boot_index == 0
                        else ""
                    ),
                )
            self._set_status(volume.id, VolumeStatus.DELETING)
            driver = self.backend(volume.backend)
            try:
                # A create that died left no location, maybe storage: removed by name.
                driver.delete_volume(volume.location or driver.location_of(volume.id))
            except BaseException:
                self._set_status(volume.id, VolumeStatus.ERROR)
                raise
            with self.db.transaction() as conn:
                conn.execute("DELETE FROM volumes WHERE id = ?", (volume.id,))
        return volume

    def _instance_name(self, instance_uuid: str) -> str:
        rows = self.db.query("SELECT display_name FROM instances WHERE uuid = ?", (instance_uuid,))
        return f"{rows[0][0]} ({instance_uuid})" if rows else instance_uuid

    def check_attachable(self, volume: VolumeRecord, instance_uuid: str) -> None:
        """Cinder's reserve check: only an available volume is attached."""
        if volume.attachment is not None:
            where = self._instance_name(volume.attachment.instance_uuid)
            raise VolumeError(
                f"volume {volume.describe()} is attached to instance {where}"
                f" as {volume.attachment.device}",
                hint="detach it there first: one volume, one instance (no multi-attach)",
            )
        if volume.status != VolumeStatus.AVAILABLE:
            raise VolumeError(
                f"volume {volume.describe()} is {volume.status}, not available",
                hint="an errored volume cannot be used: delete it and create another",
            )

    def record_attachment(self, attachment: Attachment) -> None:
        """available -> in-use, with its attachment, in one transaction."""
        with self.db.transaction() as conn:
            conn.execute(
                _INSERT_ATTACHMENT,
                {
                    **dataclasses.asdict(attachment),
                    "attached_at": attachment.attached_at or utc_now(),
                    "delete_on_termination": int(attachment.delete_on_termination),
                },
            )
            conn.execute(
                "UPDATE volumes SET status = ?, updated_at = ? WHERE id = ?",
                (str(VolumeStatus.IN_USE), utc_now(), attachment.volume_id),
            )

    def forget_attachment(self, volume_id: str) -> None:
        """in-use -> available: the attachment is gone."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM volume_attachments WHERE volume_id = ?", (volume_id,))
            conn.execute(
                "UPDATE volumes SET status = ?, updated_at = ? WHERE id = ?",
                (str(VolumeStatus.AVAILABLE), utc_now(), volume_id),
            )
