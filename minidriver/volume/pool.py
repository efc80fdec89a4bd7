"""Volumes in a libvirt storage pool, for hosts without Ceph (libvirt's storage API:
virStoragePool, virStorageVol; Cinder has no driver for it).

The pool is a ``dir`` pool under the state dir (``[volume] storage_pool_path``), defined
on first use, named after the state dir so that state dirs sharing a daemon keep apart.
A volume is the raw file ``volume-<id>`` in it, made and removed by libvirt
(``createXML``, ``delete``); a volume from an image gets the image's raw base from
``_base`` (fetched as an instance's root is) by a sparse ``upload``, then is grown. libvirt's
embedded driver has no storage driver: there the backend refuses and names rbd.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt

from minidriver import guest, imagebackend
from minidriver.config import Config
from minidriver.exception import MinidriverError
from minidriver.fileutils import TRAVERSE_ONLY_DIR, make_dir
from minidriver.host import Host
from minidriver.steps import Step, StepTimer
from minidriver.volume.backend import VolumeBackend, VolumeConnection

if TYPE_CHECKING:
    from minidriver.images.store import Image as StoreImage
    from minidriver.images.store import ImageService

UPLOAD_CHUNK = 4 * 1024 * 1024


class StoragePoolUnavailable(MinidriverError):
    """The storage pool backend cannot serve on this connection."""


def pool_volume_name(volume_id: str) -> str:
    return f"volume-{volume_id}"


class StoragePoolDriver(VolumeBackend):
    def __init__(self, conf: Config, host: Host, state_id: str) -> None:
        self.conf = conf
        self.host = host
        self.name = conf.volume.storage_pool or f"minidriver-{state_id[:8]}-volumes"
        self.path = Path(conf.volume.storage_pool_path)

    def check_for_setup_error(self) -> None:
        self.storage_pool()

    def storage_pool(self) -> libvirt.virStoragePool:
        """The pool, defined, built and started on first use."""
        if self.host.is_embedded:
            raise StoragePoolUnavailable(
                f"libvirt's storage pools need the libvirt daemon; {self.host.uri} is the"
                " embedded driver, which has no storage driver",
                hint="use the rbd backend (--backend rbd, or [volume] default_backend = rbd)"
                " with a Ceph cluster, or start libvirtd",
            )
        conn = self.host.get_connection()
        try:
            pool = conn.storagePoolLookupByName(self.name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise
            # The daemon's QEMU (libvirt-qemu) must reach the files: traversable only.
            make_dir(self.path, TRAVERSE_ONLY_DIR)
            xml = guest.render_xml(
                "storage_pool.xml.j2", pool=guest.StoragePoolConfig(self.name, os.fspath(self.path))
            )
            pool = conn.storagePoolDefineXML(xml, 0)
        if not pool.isActive():
            pool.create(0)
        return pool

    def _create(self, volume_id: str, size: int) -> libvirt.virStorageVol:
        xml = guest.render_xml(
            "storage_vol.xml.j2", vol=guest.StorageVolConfig(pool_volume_name(volume_id), size)
        )
        return self.storage_pool().createXML(xml, 0)

    def create_volume(self, volume_id: str, size: int) -> str:
        path: str = self._create(volume_id, size).path()
        return path

    def create_volume_from_image(
        self,
        volume_id: str,
        size: int,
        image: StoreImage,
        images: ImageService,
        timer: StepTimer,
    ) -> str:
        disk = PoolVolume(self, volume_id, timer)
        imagebackend.cache_image(
            disk, self.conf, image, size, open_data=images.open_data, force_raw=True
        )
        return os.fspath(disk.path)

    def location_of(self, volume_id: str) -> str:
        return os.fspath(self.path / pool_volume_name(volume_id))

    def delete_volume(self, location: str) -> None:
        conn = self.host.get_connection()
        self.storage_pool().refresh(0)
        try:
            vol = conn.storageVolLookupByPath(location)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return
            raise
        vol.delete(0)

    def initialize_connection(self, location: str) -> VolumeConnection:
        return VolumeConnection(path=location)


def _section(fd: int) -> tuple[bool, int]:
    """Whether the file at ``fd``'s offset is in data or in a hole, and how long that
    lasts (SEEK_DATA / SEEK_HOLE); the offset is left where it was."""
    here = os.lseek(fd, 0, os.SEEK_CUR)
    if here >= os.fstat(fd).st_size:
        return True, 0  # the end: the next read is empty
    try:
        data = os.lseek(fd, here, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        data = os.fstat(fd).st_size  # only a hole up to the end
    if data > here:
        section = (False, data - here)
    else:
        section = (True, os.lseek(fd, here, os.SEEK_HOLE) - here)
    os.lseek(fd, here, os.SEEK_SET)
    return section


def _send_sparse(stream: libvirt.virStream, fd: int) -> None:
    """The file at ``fd`` into ``stream``, its holes sent as holes (``virsh vol-upload
    --sparse``): a base of a few MiB of data in a GiB of zeros uploads a few MiB, and
    the volume stays as sparse as the base."""
    stream.sparseSendAll(
        lambda _stream, nbytes, _fd: os.read(fd, min(nbytes, UPLOAD_CHUNK)),
        lambda _stream, _fd: _section(fd),
        lambda _stream, length, _fd: os.lseek(fd, length, os.SEEK_CUR),
        fd,
    )


class PoolVolume(imagebackend.Image):
    """A pool volume as an image backend's disk: ``cache`` brings the base into
    ``_base``; ``create_image`` uploads it into a new volume through libvirt."""

    driver_format = "raw"

    def __init__(self, driver: StoragePoolDriver, volume_id: str, timer: StepTimer) -> None:
        self.driver = driver
        self.volume_id = volume_id
        super().__init__(driver.conf, driver.path / pool_volume_name(volume_id), timer)

    def exists(self) -> bool:
        return False  # a new volume's name is new

    def create_image(self, base: Path, size: int | None, *, timed: bool) -> None:
        length = os.path.getsize(base)
        capacity = max(size or 0, length)
        vol = self.driver._create(self.volume_id, capacity)
        try:
            with self._step(Step.IMPORT, timed):
                stream = self.driver.host.get_connection().newStream(0)
                vol.upload(stream, 0, length, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
                try:
                    with open(base, "rb") as src:
                        _send_sparse(stream, src.fileno())
                    stream.finish()
                except BaseException:
                    stream.abort()
                    raise
                # A sparse upload leaves the file as long as the data sent: the
                # volume is grown back to its size.
                resized = vol.info()[1] < capacity
                if resized:
                    vol.resize(capacity, 0)
        except BaseException:
            vol.delete(0)
            raise
        self.path = Path(vol.path())
        self.commands.append(
            ["virsh", "vol-upload", "--sparse", os.fspath(self.path), os.fspath(base)]
        )
        if resized:
            self.commands.append(["virsh", "vol-resize", os.fspath(self.path), str(capacity)])
