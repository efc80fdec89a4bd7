"""A boot request, checked and resolved before the driver builds it (nova/compute/api.py).

In Nova the compute API refuses a bad request (a display name, a flavor too small for
the image, a kernel image that is missing, bad config drive data) and the compute
manager allocates its network before the virt driver is asked; the driver only builds.
Here ``LibvirtDriver.spawn`` and ``explain`` call these first, so nothing is written
for a request that cannot boot.
"""

from __future__ import annotations

import unicodedata
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minidriver import configdrive
from minidriver.exception import (
    FlavorNotFound,
    ImageNotFound,
    ImageUnacceptable,
    MinidriverError,
)
from minidriver.imagebackend import FlavorDiskSmallerThanImage
from minidriver.images.inspect import UNINSPECTED
from minidriver.network import (
    VIF,
    NetworkMode,
    NetworkRequest,
    generate_mac_address,
    get_network_metadata,
)
from minidriver.objects import Flavor, GiB, ImageMeta

if TYPE_CHECKING:
    from minidriver.config import Config
    from minidriver.db import Database
    from minidriver.images.store import Image as StoreImage
    from minidriver.images.store import ImageService
    from minidriver.keypairs import KeyPairStore

MAX_DISPLAY_NAME = 255  # Nova's limit


@dataclass(frozen=True)
class BuildRequest:
    """A boot request the compute API has checked, with what it names resolved: what
    ``spawn`` builds (Nova's ``BuildRequest``, its image, flavor and network)."""

    uuid: str
    display_name: str
    flavor: Flavor
    image: StoreImage
    image_meta: ImageMeta
    kernel: StoreImage | None
    ramdisk: StoreImage | None
    vif: VIF | None
    config_drive: configdrive.ConfigDriveData | None


def build_request(
    conf: Config,
    images: ImageService,
    keypairs: KeyPairStore,
    db: Database,
    *,
    name: str,
    image: str,
    flavor: str,
    config_drive: bool | None = None,
    hostname: str | None = None,
    user_data: bytes | None = None,
    public_keys: Mapping[str, str] | None = None,
    meta: Mapping[str, str] | None = None,
    network: str | None = None,
    key_name: str | None = None,
    boot_from_volume: bool = False,
    instance_uuid: str | None = None,
) -> BuildRequest:
    """Check a request (``LibvirtDriver.spawn``'s arguments) and resolve its flavor,
    images, NIC (a MAC no instance of this state dir has), key pair and config drive
    data; any refusal comes before anything is written. ``instance_uuid``: the uuid
    to build under (an unshelve's); a new one by default."""
    validate_display_name(name)
    flavor_obj = get_flavor(conf, flavor)
    store_image = images.get(image)
    image_meta = store_image.to_image_meta()
    validate_flavor_image(
        flavor_obj,
        image_meta,
        conf.libvirt.images_max_virtual_size,
        root_on_volume=boot_from_volume,
    )
    kernel, ramdisk = handle_kernel_and_ramdisk(images, image_meta)
    instance_uuid = instance_uuid or str(uuidlib.uuid4())
    requested = NetworkRequest.parse(network, conf.libvirt)
    vif = None
    if requested.mode is not NetworkMode.NONE:
        taken = {r.mac_address for r in db.list_instances() if r.mac_address}
        vif = VIF(requested.mode, generate_mac_address(taken), requested.source)
    keys = dict(public_keys or {})
    if key_name is not None:
        keys[key_name] = keypairs.get(key_name).public_key
    drive = None
    if config_drive or (config_drive is None and conf.default.force_config_drive):
        drive = configdrive.ConfigDriveData(
            uuid=instance_uuid,
            name=name,
            hostname=hostname or configdrive.hostname_from_display_name(name),
            user_data=user_data,
            public_keys=keys,
            meta=meta or {},
            network_data=get_network_metadata(vif),
        )
    elif hostname or user_data or keys or meta:
        raise MinidriverError(
            "hostname, user data, keys and metadata reach the guest on a config drive",
            hint="add --config-drive (or set force_config_drive = true)",
        )
    return BuildRequest(
        instance_uuid, name, flavor_obj, store_image, image_meta, kernel, ramdisk, vif, drive
    )


def get_flavor(conf: Config, name: str) -> Flavor:
    try:
        return conf.flavors[name]
    except KeyError:
        raise FlavorNotFound(
            f"no flavor named {name!r}",
            hint=f"flavors: {', '.join(sorted(conf.flavors))}",
        ) from None


def validate_display_name(name: str) -> None:
    """Any text goes into the domain XML escaped; control characters (NUL, newlines...)
    cannot be XML at all, so they are refused here, before anything is written."""
    if not name or len(name) > MAX_DISPLAY_NAME:
        raise MinidriverError(
            f"the display name must be 1 to {MAX_DISPLAY_NAME} characters long",
            hint="choose a shorter --name",
        )
    bad = sorted({f"U+{ord(c):04X}" for c in name if unicodedata.category(c) == "Cc"})
    if bad:
        raise MinidriverError(
            f"the display name {name!r} has control characters ({', '.join(bad)})",
            hint="use printable characters only",
        )


def validate_flavor_image(
    flavor: Flavor, image: ImageMeta, max_virtual_size: int = 0, *, root_on_volume: bool = False
) -> None:
    """Nova's ``_validate_flavor_image_nostatus``: refuse a flavor too small for the
    image, an image over the ``images_max_virtual_size`` ceiling (ours; bytes; 0: none), or
    one that is no disk at all. ``root_on_volume``: the flavor's root size does not
    count (the volume holds the root), as Nova skips that check for boot from volume."""
    if image.disk_format in UNINSPECTED:
        # Kernels and ramdisks are never shown to qemu-img, so never a root disk.
        raise ImageUnacceptable(
            f"image {image.name} is a kernel or ramdisk ({image.disk_format}), not a disk",
            hint="boot a disk image; a kernel or ramdisk is referenced from one",
        )
    virtual_size = image.virtual_size or 0
    if max_virtual_size and virtual_size > max_virtual_size:
        raise ImageUnacceptable(
            f"image {image.name}'s virtual size ({virtual_size} bytes) is over"
            f" images_max_virtual_size ({max_virtual_size} bytes)",
            hint="use a smaller image, or raise [libvirt] images_max_virtual_size",
        )
    if flavor.root_gb and not root_on_volume:
        root = flavor.root_gb * GiB
        if image.virtual_size is not None and root < image.virtual_size:
            raise FlavorDiskSmallerThanImage(
                f"flavor {flavor.name}'s root disk ({flavor.root_gb} GB) is smaller than"
                f" image {image.name} ({image.virtual_size} bytes virtual)",
                hint="choose a flavor with a larger root_gb",
            )
        if image.min_disk > flavor.root_gb:
            raise FlavorDiskSmallerThanImage(
                f"image {image.name} needs min_disk {image.min_disk} GB; flavor"
                f" {flavor.name} has {flavor.root_gb} GB",
                hint="choose a flavor with a larger root_gb",
            )
    if image.min_ram > flavor.memory_mb:
        raise MinidriverError(
            f"image {image.name} needs min_ram {image.min_ram} MB; flavor {flavor.name}"
            f" has {flavor.memory_mb} MB",
            hint="choose a flavor with more memory",
        )


def handle_kernel_and_ramdisk(
    images: ImageService, image_meta: ImageMeta
) -> tuple[StoreImage | None, StoreImage | None]:
    """Nova's ``_handle_kernel_and_ramdisk``: the kernel (aki) and ramdisk (ari) images
    a disk image names in its ``kernel_id``/``ramdisk_id`` properties, checked to
    exist and to be of their kind."""
    if not image_meta.kernel_id:
        if image_meta.ramdisk_id:
            raise ImageUnacceptable(
                f"image {image_meta.name} names a ramdisk_id but no kernel_id",
                hint="set the kernel_id property too (a ramdisk needs its kernel)",
            )
        return None, None
    kernel = _linked_image(images, image_meta, "kernel_id", "aki")
    ramdisk = _linked_image(images, image_meta, "ramdisk_id", "ari")
    return kernel, ramdisk


def _linked_image(
    images: ImageService, image_meta: ImageMeta, prop: str, disk_format: str
) -> StoreImage | None:
    ref = image_meta.properties.get(prop, "")
    if not ref:
        return None
    try:
        linked = images.get(ref)
    except ImageNotFound as exc:
        raise ImageNotFound(
            f"image {image_meta.name}'s {prop} {ref!r} is not in the image store",
            hint=f"add it with `minidriver image add --disk-format {disk_format}`",
        ) from exc
    if linked.disk_format != disk_format:
        raise ImageUnacceptable(
            f"image {image_meta.name}'s {prop} names {linked.describe()}, a"
            f" {linked.disk_format} image, not {disk_format}",
            hint=f"point {prop} at an image added with --disk-format {disk_format}",
        )
    return linked
