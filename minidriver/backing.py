"""An instance's missing disks and backing files made again before a hard reboot
(``_create_images_and_backing`` of nova/virt/libvirt/driver.py).

Nova walks the file and block disks of the guest's config and, for each one with a
backing file, calls the backend's ``cache`` as a spawn does: a base removed meanwhile
(by the cache manager) is fetched or made again, and a missing overlay is created on
it. Here the disks are those ``instance_disks`` gives, and only what is the image's is
rebuilt from the image: a template clone's disks back onto the template's frozen layer,
which nothing here can make again (refused with the file named); a boot-from-volume
root is the volume (it is not in ``disk.info``); a missing config drive is refused, its
data not being kept (Nova creates an empty disk in place of a missing disk without a
backing file). RBD disks are ours: Nova's ``_get_instance_disk_info_from_config`` leaves
network disks out; here each is checked in Ceph, a missing ephemeral or swap made
again there through the ``Rbd`` backend as a spawn makes it, a missing root refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from minidriver import rbd_utils
from minidriver.config import Config
from minidriver.db import InstanceRecord
from minidriver.exception import ImageNotFound, MinidriverError
from minidriver.imagebackend import (
    EPHEMERAL_LABEL,
    Image,
    Rbd,
    cache_image,
    create_ephemeral,
    create_swap,
    ephemeral_filename,
    get_ephemeral_fs,
    is_rbd_path,
    local_backend_class,
    parse_rbd_path,
    swap_filename,
)
from minidriver.images import qemu_img
from minidriver.images.store import ImageService
from minidriver.objects import Flavor, GiB
from minidriver.steps import Step, StepTimer


class MissingDisk(MinidriverError):
    """A disk or backing file is gone that is not the image's to make again."""


def create_images_and_backing(
    conf: Config,
    images: ImageService,
    record: InstanceRecord,
    flavor: Flavor,
    disks: dict[str, str],
    *,
    rbd_driver: Callable[[str], rbd_utils.RBDDriver],
    timer: StepTimer | None = None,
) -> list[str]:
    """Every disk of ``disks`` ({path: format}, ``instance_disks``') and its backing file
    present again; returns the names of what was made (disks and bases)."""
    timer = timer or StepTimer()
    made: list[str] = []
    for path, fmt in disks.items():
        if is_rbd_path(path):
            made += _rbd_disk(
                conf, images, record, flavor, path=path, rbd_driver=rbd_driver, timer=timer
            )
        else:
            made += _file_disk(conf, images, record, flavor, path=Path(path), fmt=fmt, timer=timer)
    return made


def _file_disk(
    conf: Config,
    images: ImageService,
    record: InstanceRecord,
    flavor: Flavor,
    *,
    path: Path,
    fmt: str,
    timer: StepTimer,
) -> list[str]:
    backing = _backing_file(path, fmt) if path.exists() else None
    if path.exists() and (backing is None or backing.exists()):
        return []
    if record.template_id:
        gone = backing if path.exists() else path
        raise MissingDisk(
            f"instance {record.display_name} is a clone of template {record.template_id}"
            f" and {gone} is gone: its disks back onto the template's frozen layer,"
            " which cannot be made again",
            hint=f"delete it (minidriver delete {record.display_name}) and clone again",
        )
    name = path.name
    disk = local_backend_class(conf)(conf, path, timer)
    if name == "disk":
        try:
            image = images.get(record.image_id)
        except ImageNotFound as exc:
            raise MissingDisk(
                f"instance {record.display_name}: its root {path} or its base is gone and"
                f" so is its image {record.image_id} from the image service",
                hint=f"delete it (minidriver delete {record.display_name})",
            ) from exc
        before = _bases(conf)
        cache_image(
            disk,
            conf,
            image,
            flavor.root_gb * GiB if flavor.root_gb else None,
            open_data=images.open_data,
            force_raw=conf.default.force_raw_images,
        )
    elif name in ("disk.local", "disk.swap"):
        before = _bases(conf)
        cache_local_or_swap(disk, name, flavor, fs_type=ephemeral_fs_of(conf, images, record))
    else:
        # The config drive's data (user data, keys) is not kept: it cannot be made again.
        raise MissingDisk(
            f"instance {record.display_name}: {path} is gone and cannot be made again",
            hint=f"delete it (minidriver delete {record.display_name}) and boot it again",
        )
    return sorted(_bases(conf) - before) + ([name] if disk.made else [])


def _rbd_disk(
    conf: Config,
    images: ImageService,
    record: InstanceRecord,
    flavor: Flavor,
    *,
    path: str,
    rbd_driver: Callable[[str], rbd_utils.RBDDriver],
    timer: StepTimer,
) -> list[str]:
    pool, rbd_name = parse_rbd_path(path)
    driver = rbd_driver(pool)
    with driver.connected():
        if driver.exists(rbd_name):
            return []
        name = rbd_name.removeprefix(f"{record.uuid}_")
        if name not in ("disk.local", "disk.swap") or record.template_id:
            raise MissingDisk(
                f"instance {record.display_name}: its RBD disk {pool}/{rbd_name} is gone",
                hint=f"delete it (minidriver delete {record.display_name})",
            )
        disk = Rbd(conf, timer, driver=driver, instance_uuid=record.uuid, disk_name=name)
        cache_local_or_swap(disk, name, flavor, fs_type=ephemeral_fs_of(conf, images, record))
    return [name]


def cache_local_or_swap(disk: Image, name: str, flavor: Flavor, *, fs_type: str) -> bool:
    """The ephemeral (``disk.local``, a ``fs_type`` filesystem) or swap disk made on its
    base in ``_base`` (Nova's ``_create_ephemeral`` and ``_create_swap`` through
    ``cache``; Flat makes it in place); True on a cache hit."""
    if name == "disk.local":
        fetch_func = partial(
            create_ephemeral,
            size_gb=flavor.ephemeral_gb,
            fs_type=fs_type,
            label=EPHEMERAL_LABEL,
        )
        return disk.cache(
            fetch_func,
            ephemeral_filename(flavor.ephemeral_gb, fs_type),
            flavor.ephemeral_gb * GiB,
            Step.EPHEMERAL,
            generated=True,
        )
    return disk.cache(
        partial(create_swap, swap_mb=flavor.swap),
        swap_filename(flavor.swap),
        flavor.swap * 1024 * 1024,
        Step.SWAP,
        generated=True,
    )


def ephemeral_fs_of(conf: Config, images: ImageService, record: InstanceRecord) -> str:
    """The filesystem of the instance's ephemeral disk, as its spawn chose it: by its
    image's os_type in the metadata kept at its boot (a record made before: the image
    store's; an image deleted since: as for an image without one)."""
    image_meta = images.instance_image_meta(record.image_meta, record.image_id)
    os_type = image_meta.os_type if image_meta is not None else ""
    return get_ephemeral_fs(os_type, conf.default.default_ephemeral_format)


def _backing_file(path: Path, fmt: str) -> Path | None:
    """The file ``path`` backs onto (as qemu-img records it: relative to ``path``)."""
    if fmt != "qcow2":
        return None
    backing = qemu_img.info(path, fmt).backing_file
    if backing is None:
        return None
    return path.parent / backing  # an absolute backing stays as it is


def _bases(conf: Config) -> set[str]:
    """The names of the base files now in ``_base`` (before and after: what was made)."""
    try:
        return {f"_base/{name}" for name in os.listdir(conf.base_dir)}
    except FileNotFoundError:
        return set()
