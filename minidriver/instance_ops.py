"""What rescue, resize and shelve share: the vm_state check of nova/compute/api.py's
``check_instance_state`` and the instance and its XML rebuilt from its record
(Nova keeps ``objects.Instance`` in its database; we keep ``InstanceRecord``;
``instance_of`` and ``vif_of`` live in ``instance_xml``, which a hard reboot uses).

Each operation runs under the instance's lock, as a spawn and a delete do, so
``cleanup`` never judges an instance half-way through one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from minidriver import compute_api
from minidriver.db import InstanceRecord
from minidriver.exception import MinidriverError
from minidriver.instance_xml import kept_image_meta
from minidriver.lockutils import external_lock, instance_lock_name
from minidriver.network import VIF
from minidriver.objects import DiskInfo, Flavor, ImageMeta, Instance
from minidriver.power import power_task

if TYPE_CHECKING:
    from minidriver.driver import LibvirtDriver


def check_instance_state(record: InstanceRecord, allowed: Iterable[str], what: str) -> None:
    """Nova's ``check_instance_state``: ``what`` is refused unless the instance's
    vm_state is one of ``allowed``; one clear error, nothing changed."""
    allowed = tuple(allowed)
    if record.vm_state not in allowed:
        raise MinidriverError(
            f"cannot {what} instance {record.display_name}: its vm_state is"
            f" {record.vm_state} (needs {' or '.join(allowed)})",
            hint=HINTS.get(record.vm_state, "see `minidriver show` for its state"),
        )


# What a user does next, by the vm_state that refused the operation.
HINTS = {
    "rescued": "unrescue it first: minidriver unrescue INSTANCE",
    "resized": "confirm or revert the resize first: minidriver resize-confirm|resize-revert",
    "shelved_offloaded": "unshelve it first: minidriver unshelve INSTANCE",
    "suspended": "resume it first: minidriver resume INSTANCE",
    "active": "it runs as booted; nothing to undo",
    "stopped": "it is stopped as booted; nothing to undo",
}


def refuse_unsupported(drv: LibvirtDriver, record: InstanceRecord, what: str) -> None:
    """RBD disks and volumes are not handled by these operations yet: refused before
    anything changes (Nova's libvirt driver supports both)."""
    if drv.uses_rbd:
        raise MinidriverError(
            f"cannot {what} instance {record.display_name}: images_type = rbd is not"
            " supported by rescue, resize and shelve yet",
            hint="use a file-backed state dir (images_type = qcow2 or flat)",
        )
    if drv.volumes.attachments_of(record.uuid):
        raise MinidriverError(
            f"cannot {what} instance {record.display_name}: it has volumes attached",
            hint="detach its volumes first (minidriver volume detach); a boot volume"
            " instance cannot be rescued, resized or shelved yet",
        )


@contextlib.contextmanager
def locked(drv: LibvirtDriver, instance_uuid: str) -> Iterator[InstanceRecord]:
    """The instance's lock held, and its lifecycle events left alone while the
    operation stops and starts its domain (power.power_task); its record as read under
    the lock."""
    with (
        external_lock(drv.conf.locks_dir, instance_lock_name(instance_uuid)),
        power_task(instance_uuid),
    ):
        yield drv.db.get_instance(instance_uuid)


def image_meta_of(drv: LibvirtDriver, record: InstanceRecord, what: str) -> ImageMeta:
    """The instance's image's metadata as kept at its boot (Nova's
    ``instance.image_meta``, ``instance_xml.kept_image_meta``); a clear refusal for a
    record made before copies were kept whose image is gone from the store."""
    image_meta = kept_image_meta(drv, record)
    if image_meta is None:
        raise MinidriverError(
            f"cannot {what} instance {record.display_name}: its image {record.image_id}"
            " is no longer in the image store, and it was booted before minidriver kept"
            " a copy of an image's metadata",
            hint="snapshot the instance and boot the snapshot instead",
        )
    return image_meta


def get_flavor(drv: LibvirtDriver, name: str) -> Flavor:
    return compute_api.get_flavor(drv.conf, name)


def has_config_drive(instance_dir: Path) -> bool:
    return (instance_dir / "disk.config").exists()


def define_xml(
    drv: LibvirtDriver,
    instance: Instance,
    image_meta: ImageMeta,
    disk_info: DiskInfo,
    formats: dict[str, str],
    *,
    vif: VIF | None,
) -> str:
    """The domain XML for ``disk_info`` (Nova's ``_get_guest_xml``), defined over the
    instance's domain (same uuid and name); the XML is returned, not written."""
    xml = drv.to_xml(instance, image_meta, disk_info, formats, vif=vif)
    drv.host.define(xml)
    return xml


def forget_spawned_disks(drv: LibvirtDriver, instance_uuid: str) -> None:
    """What the driver remembers of the disks its spawn made is stale now."""
    drv._spawned_disks.pop(instance_uuid, None)
