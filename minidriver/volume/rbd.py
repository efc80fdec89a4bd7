"""Volumes as RBD images in Ceph (cinder/volume/drivers/rbd.py).

A volume is the image ``volume-<id>`` in ``[volume] rbd_pool`` of the cluster that
``[libvirt]`` names. From an image: a copy-on-write clone of the image's protected
snapshot when the image is in the same cluster (Cinder's ``clone_image``; not
flattened, so it costs nothing whatever the image holds), else the image's raw base
from ``_base`` imported (the path an instance's RBD root takes, ``imagebackend.Rbd``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minidriver import imagebackend, rbd_utils
from minidriver.config import Config
from minidriver.steps import StepTimer
from minidriver.volume.backend import VolumeBackend, VolumeConnection

if TYPE_CHECKING:
    from minidriver.images.store import Image as StoreImage
    from minidriver.images.store import ImageService


def rbd_volume_name(volume_id: str) -> str:
    """Cinder's RBD driver names a volume's image ``volume-<id>``."""
    return f"volume-{volume_id}"


class RBDVolumeDriver(VolumeBackend):
    def __init__(self, conf: Config) -> None:
        self.conf = conf
        self.pool = conf.volume.rbd_pool

    def driver(self) -> rbd_utils.RBDDriver:
        return imagebackend.rbd_driver(self.conf, self.pool)

    def check_for_setup_error(self) -> None:
        driver = self.driver()
        with driver.connected():
            driver.check_pool()
            driver.check_pool_not_full()

    def create_volume(self, volume_id: str, size: int) -> str:
        self.driver().create_image(rbd_volume_name(volume_id), size)
        return self.location_of(volume_id)

    def create_volume_from_image(
        self,
        volume_id: str,
        size: int,
        image: StoreImage,
        images: ImageService,
        timer: StepTimer,
    ) -> str:
        driver = self.driver()
        with driver.connected():
            disk = imagebackend.Rbd(
                self.conf,
                timer,
                driver=driver,
                instance_uuid="",
                rbd_name=rbd_volume_name(volume_id),
                clone_location=imagebackend.clone_location(driver, image),
            )
            imagebackend.cache_image(
                disk, self.conf, image, size, open_data=images.open_data, force_raw=True
            )
        return imagebackend.rbd_path(self.pool, disk.rbd_name)

    def location_of(self, volume_id: str) -> str:
        return imagebackend.rbd_path(self.pool, rbd_volume_name(volume_id))

    def delete_volume(self, location: str) -> None:
        pool, name = imagebackend.parse_rbd_path(location)
        imagebackend.rbd_driver(self.conf, pool).remove_image(name)

    def initialize_connection(self, location: str) -> VolumeConnection:
        pool, name = imagebackend.parse_rbd_path(location)
        disk = imagebackend.Rbd(
            self.conf,
            StepTimer(),
            driver=imagebackend.rbd_driver(self.conf, pool),
            instance_uuid="",
            rbd_name=name,
        )
        return VolumeConnection(path=location, network=disk.libvirt_info())
