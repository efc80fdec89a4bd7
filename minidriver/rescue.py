"""Rescue and unrescue (nova/virt/libvirt/driver.py ``rescue``/``unrescue``, legacy mode).

``rescue`` keeps the domain's definition as ``unrescue.xml`` in the instance dir,
makes ``disk.rescue`` from the rescue image (default: the instance's own) through
``_base`` as any root, and defines the domain again with the rescue disk first (it
boots), the instance's root ``disk`` second and, where the instance has a config
drive, ``disk.config.rescue`` (blockinfo's rescue mapping); then it starts it. A
stopped instance can be rescued, as in Nova. ``unrescue`` defines ``unrescue.xml``
again, starts it and removes the ``*.rescue`` files.

Where we differ from Nova: ``disk.config.rescue`` is a copy of the instance's
``disk.config`` (Nova builds it again, ``_create_configdrive(rescue=True)``: we keep
no user data to build it from); no rescue kernel or ramdisk options
(``rescue_kernel_id``...), no rescue password, and no stable device rescue (the
``hw_rescue_*`` image properties).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt

from minidriver import blockinfo, compute_api, imagebackend
from minidriver.block_device import require_domain
from minidriver.disk_info_file import read_disk_info
from minidriver.exception import MinidriverError
from minidriver.fileutils import PRIVATE_FILE, write_private
from minidriver.instance_ops import (
    check_instance_state,
    define_xml,
    get_flavor,
    has_config_drive,
    locked,
    refuse_unsupported,
)
from minidriver.instance_xml import instance_of, vif_of
from minidriver.objects import GiB
from minidriver.steps import StepTimer
from minidriver.vm_states import VMState

if TYPE_CHECKING:
    from minidriver.driver import LibvirtDriver

UNRESCUE_XML = "unrescue.xml"
RESCUE_SUFFIX = ".rescue"


def rescue(drv: LibvirtDriver, instance_uuid: str, image: str | None = None) -> None:
    """Boot the instance from a rescue disk, its own root attached second."""
    with locked(drv, instance_uuid) as record:
        check_instance_state(record, (VMState.ACTIVE, VMState.STOPPED), "rescue")
        refuse_unsupported(drv, record, "rescue")
        domain = require_domain(drv.host, record, drv.db.state_id)
        flavor = get_flavor(drv, record.flavor)
        rescue_image = drv.images.get(image or record.image_id)
        image_meta = rescue_image.to_image_meta()
        compute_api.validate_flavor_image(
            flavor, image_meta, drv.conf.libvirt.images_max_virtual_size
        )
        instance = instance_of(drv, record, flavor)
        instance_dir = Path(instance.instance_dir)
        recorded = read_disk_info(instance_dir) or {}
        root_format = recorded.get(os.fspath(instance_dir / "disk"))
        if root_format is None:
            raise MinidriverError(
                f"instance {record.display_name} records no root disk in {instance_dir}",
            )
        config_drive = has_config_drive(instance_dir)
        disk_info = blockinfo.get_disk_info(
            instance.virt_type,
            flavor,
            image_meta,
            machine_type=drv.conf.libvirt.hw_machine_type,
            config_drive_format=drv.conf.default.config_drive_format if config_drive else None,
            rescue=True,
        )
        was_running = bool(domain.isActive())
        original = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        with contextlib.ExitStack() as undo:
            write_private(instance_dir / UNRESCUE_XML, original)
            undo.callback(_remove_rescue_files, instance_dir)
            disk = imagebackend.local_backend_class(drv.conf)(
                drv.conf, instance_dir / "disk.rescue", StepTimer()
            )
            imagebackend.cache_image(
                disk,
                drv.conf,
                rescue_image,
                flavor.root_gb * GiB if flavor.root_gb else None,
                open_data=drv.images.open_data,
                force_raw=drv.conf.default.force_raw_images,
            )
            formats = {"disk.rescue": disk.driver_format, "disk": root_format}
            if config_drive:
                shutil.copyfile(instance_dir / "disk.config", instance_dir / "disk.config.rescue")
                (instance_dir / "disk.config.rescue").chmod(PRIVATE_FILE)
                formats["disk.config.rescue"] = "raw"
            if was_running:
                domain.destroy()  # Nova's _destroy: the guest is not asked to shut down
                undo.callback(_restore, drv, original, was_running)
            else:
                undo.callback(_restore, drv, original, False)
            define_xml(drv, instance, image_meta, disk_info, formats, vif=vif_of(record))
            drv.host.launch(require_domain(drv.host, record, drv.db.state_id))
            drv.db.update_instance(record.uuid, state="running", vm_state=VMState.RESCUED)
            undo.pop_all()


def unrescue(drv: LibvirtDriver, instance_uuid: str) -> None:
    """Nova's ``unrescue``: the kept definition defined and started again, the
    rescue files removed."""
    with locked(drv, instance_uuid) as record:
        check_instance_state(record, (VMState.RESCUED,), "unrescue")
        domain = require_domain(drv.host, record, drv.db.state_id)
        instance_dir = Path(record.instance_dir)
        xml = (instance_dir / UNRESCUE_XML).read_text()
        if domain.isActive():
            domain.destroy()
        domain = drv.host.define(xml)
        drv.host.launch(domain)
        _remove_rescue_files(instance_dir)
        drv.db.update_instance(record.uuid, state="running", vm_state=VMState.ACTIVE)


def _restore(drv: LibvirtDriver, xml: str, start: bool) -> None:
    """A failed rescue: the original definition back, started if it ran."""
    domain = drv.host.define(xml)
    if domain.isActive():
        domain.destroy()
    if start:
        drv.host.launch(domain)


def _remove_rescue_files(instance_dir: Path) -> None:
    """``unrescue.xml`` and every ``*.rescue`` file, as Nova's unrescue removes them."""
    (instance_dir / UNRESCUE_XML).unlink(missing_ok=True)
    for path in instance_dir.glob(f"*{RESCUE_SUFFIX}"):
        path.unlink(missing_ok=True)
