"""Volumes in a libvirt storage pool, for hosts without Ceph (libvirt's storage API:
virStoragePool, virStorageVol; Cinder has no driver for it).

The pool is a ``dir`` pool under the state dir (``[volume] storage_pool_path``), defined
on first use, named after the state dir so that state dirs sharing a daemon keep apart.
A volume is the raw file ``volume-<id>`` in it, made and removed by libvirt
(``createXML``, ``delete``); a volume from an image gets the image's raw base from
``_base`` (fetched as an instance's root is) by ``upload``, then is grown. libvirt's
embedded driver has no storage driver: there the backend refuses and names rbd.
"""

from __future__ import annotations

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
        vol = self.driver._create(self.volume_id, max(size or 0, length))
        try:
            with self._step(Step.IMPORT, timed):
                stream = self.driver.host.get_connection().newStream(0)
                vol.upload(stream, 0, length, 0)
                try:
                    with open(base, "rb") as src:
                        while chunk := src.read(UPLOAD_CHUNK):
                            stream.send(chunk)
                    stream.finish()
                except BaseException:
                    stream.abort()
                    raise
        except BaseException:
            vol.delete(0)
            raise
        self.path = Path(vol.path())
        self.commands.append(["virsh", "vol-upload", os.fspath(self.path), os.fspath(base)])
