"""What a volume backend does (cinder/volume/driver.py's VolumeDriver), and how QEMU
reaches a volume (the ``connection_info`` of Cinder's ``initialize_connection``)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minidriver.guest import NetworkSource
from minidriver.steps import StepTimer

if TYPE_CHECKING:
    from minidriver.images.store import Image as StoreImage
    from minidriver.images.store import ImageService


@dataclass(frozen=True)
class VolumeConnection:
    """A volume as the domain XML names it: a file (the pool backend) or a network
    disk (rbd). ``path`` is how ``disk.info`` and ``show`` name it."""

    path: str  # the file, or rbd:pool/volume-<id>
    driver_format: str = "raw"
    network: NetworkSource | None = None


class VolumeBackend(abc.ABC):
    """Cinder's VolumeDriver: makes, removes and connects the storage of volumes.
    ``location`` is the backend's name for a volume, as the record keeps it."""

    @abc.abstractmethod
    def check_for_setup_error(self) -> None:
        """Raise a clear error now when the backend cannot serve (Cinder's name)."""

    @abc.abstractmethod
    def create_volume(self, volume_id: str, size: int) -> str:
        """A blank volume of ``size`` bytes; returns its location."""

    @abc.abstractmethod
    def create_volume_from_image(
        self,
        volume_id: str,
        size: int,
        image: StoreImage,
        images: ImageService,
        timer: StepTimer,
    ) -> str:
        """A volume holding ``image``'s data, grown to ``size`` bytes."""

    @abc.abstractmethod
    def location_of(self, volume_id: str) -> str:
        """Where a volume of this id is made: what a delete removes when a create died
        before it recorded the location."""

    @abc.abstractmethod
    def delete_volume(self, location: str) -> None:
        """Remove the volume; one already gone is no error."""

    @abc.abstractmethod
    def initialize_connection(self, location: str) -> VolumeConnection:
        """How QEMU reaches the volume."""
