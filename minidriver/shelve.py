"""Shelve and unshelve (nova/compute/manager.py ``_shelve_instance``,
``_shelve_offload_instance``, ``_unshelve_instance``).

``shelve`` powers the guest off (a clean shutdown, then a hard stop), snapshots its
root as the image ``<name>-shelved`` (Nova's ``shelved_image_id``, kept in the
record), then offloads at once, as Nova does with its default
``shelved_offload_time = 0``: the domain undefined, the instance dir and its disks
removed, the forwarded port freed; the record stays, vm_state ``shelved_offloaded``.
``unshelve`` spawns the instance again from that image with the same uuid, display
name, flavor, key pair and network mode, gives it back its original image id and
creation time (Nova restores ``image_ref`` likewise), and deletes the shelve image.

Where we differ from Nova: the unshelved instance gets a new domain name, MAC and
forwarded port (Nova keeps its name and Neutron ports); its config drive, where it
had one, is built again from the record, so a ``--hostname``, user data or metadata
given at boot are not on it (we keep none of them).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from minidriver.block_device import require_domain
from minidriver.exception import ImageNotFound, MinidriverError
from minidriver.images.store import Image as StoreImage
from minidriver.instance_ops import (
    check_instance_state,
    forget_spawned_disks,
    has_config_drive,
    locked,
    refuse_unsupported,
)
from minidriver.objects import Instance
from minidriver.vm_states import VMState

if TYPE_CHECKING:
    from minidriver.driver import LibvirtDriver


def shelve(drv: LibvirtDriver, instance_uuid: str, *, timeout: float = 60) -> StoreImage:
    """Shelve and offload the instance; the shelve image is returned."""
    with locked(drv, instance_uuid) as record:
        check_instance_state(record, (VMState.ACTIVE, VMState.STOPPED), "shelve")
        refuse_unsupported(drv, record, "shelve")
        domain = require_domain(drv.host, record, drv.db.state_id)
        instance_dir = Path(record.instance_dir)
        if domain.isActive():
            drv.power_off(record.uuid, timeout=timeout)  # Nova's _power_off_instance
        image = drv.snapshot(record.uuid, f"{record.display_name}-shelved")
        drv.db.update_instance(
            record.uuid,
            shelved_image_id=image.id,
            config_drive=int(has_config_drive(instance_dir)),
        )
        # _shelve_offload_instance: Nova's driver.destroy, the record kept.
        drv.host.undefine(domain)
        shutil.rmtree(instance_dir, ignore_errors=True)
        if record.forward_port is not None:
            drv.ports.release(record.forward_port, record.uuid)
        drv.db.update_instance(
            record.uuid,
            vm_state=VMState.SHELVED_OFFLOADED,
            state="nostate",
            forward_port=None,
        )
        forget_spawned_disks(drv, record.uuid)
        return image


def unshelve(
    drv: LibvirtDriver, instance_uuid: str, *, timeout: float | None = None, wait: bool = True
) -> Instance:
    """Spawn the shelved instance again from its shelve image, which is then deleted."""
    with locked(drv, instance_uuid) as record:
        check_instance_state(record, (VMState.SHELVED_OFFLOADED,), "unshelve")
        try:
            image = drv.images.get(record.shelved_image_id)
        except ImageNotFound as exc:
            raise MinidriverError(
                f"instance {record.display_name}'s shelve image {record.shelved_image_id}"
                " is gone: it cannot be unshelved",
                hint=f"delete it: minidriver delete {record.display_name}",
            ) from exc
        # spawn makes its record anew, under the lock it takes itself.
        drv.db.delete_instance(record.uuid)
    network = record.network_mode + (f":{record.network_source}" if record.network_source else "")
    try:
        instance = drv.spawn(
            record.display_name,
            image.id,
            record.flavor,
            instance_uuid=record.uuid,
            key_name=record.key_name,
            network=network,
            config_drive=bool(record.config_drive),
            timeout=timeout,
            wait=wait,
        )
    except BaseException:
        with contextlib.suppress(Exception):
            drv.db.create_instance(record)
        raise
    drv.db.update_instance(
        record.uuid,
        image_id=record.image_id,
        created_at=record.created_at,
        config_drive=record.config_drive,
    )
    instance.image_ref = record.image_id
    drv.images.delete(image.id)  # Nova's _delete_snapshot_of_shelved_instance
    return instance
