"""Resize on this host, confirm and revert (nova/virt/libvirt/driver.py
``migrate_disk_and_power_off``, ``finish_migration``, ``finish_revert_migration``,
``confirm_migration``/``_cleanup_resize``).

``resize`` refuses a smaller root or ephemeral disk (Nova's "Unable to resize disk
down"), powers the guest off, renames the instance dir to ``<dir>_resize`` (Nova's
``inst_base_resize``) and makes the instance dir again: the root copied from the old
one and grown to the new flavor, ephemeral and swap disks made for it through
``_base``, the config drive, kernel and ramdisk copied; then it defines the domain
with the new flavor's vCPUs and memory and starts it if it ran before (Nova's
``power_on``). vm_state ``resized`` (Nova's ``VERIFY_RESIZE``) until
``confirm_resize`` removes ``<dir>_resize`` or ``revert_resize`` puts it back,
defines the old definition and starts it if the resized guest runs.

Where we differ from Nova: Nova copies every disk but swap (the root flattened of its
backing file when it goes to another host), and ``finish_migration``'s
``_create_image`` grows and completes them; we copy the root as it is (a qcow2
overlay keeps its ``_base`` backing file: one host, one ``_base``) and grow it with
``qemu-img resize``, and make the ephemeral disk afresh (its data is not kept; Nova
copies it). Nova's revert regenerates the XML from the old flavor; we define the
definition the domain had, kept in ``<dir>_resize/libvirt.xml``. Cold migration to
another host (issue 20) can reuse ``confirm_resize`` and ``revert_resize``: they read
nothing but the record, the domain and ``<dir>_resize``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt

from minidriver import blockinfo, compute_api, imagebackend
from minidriver.block_device import require_domain
from minidriver.db import InstanceRecord
from minidriver.disk_info_file import read_disk_info, write_disk_info
from minidriver.exception import MinidriverError
from minidriver.fileutils import TRAVERSE_ONLY_DIR, write_private
from minidriver.images import qemu_img
from minidriver.instance_ops import (
    check_instance_state,
    define_xml,
    forget_spawned_disks,
    get_flavor,
    has_config_drive,
    image_meta_of,
    locked,
    refuse_unsupported,
)
from minidriver.instance_xml import instance_of, vif_of
from minidriver.objects import Flavor, GiB
from minidriver.process import run
from minidriver.steps import Step, StepTimer
from minidriver.vm_states import VMState

if TYPE_CHECKING:
    from minidriver.driver import LibvirtDriver

RESIZE_SUFFIX = "_resize"
# Copied as they are from the old instance dir: the root (then grown) and what the
# flavor does not size.
COPIED = ("disk", "disk.config", "kernel", "ramdisk", "console.log")


def resize_dir(instance_dir: Path | str) -> Path:
    """Nova's ``inst_base_resize``: where the old instance dir waits for a decision."""
    return Path(os.fspath(instance_dir) + RESIZE_SUFFIX)


def check_resize_down(old: Flavor, new: Flavor) -> None:
    """Nova's ``migrate_disk_and_power_off`` check: no disk shrinks."""
    if new.root_gb < old.root_gb or new.ephemeral_gb < old.ephemeral_gb:
        raise MinidriverError(
            f"unable to resize disk down: flavor {new.name} has root {new.root_gb} GB,"
            f" ephemeral {new.ephemeral_gb} GB; {old.name} has {old.root_gb} GB,"
            f" {old.ephemeral_gb} GB",
            hint="choose a flavor whose root and ephemeral disks are at least as large",
        )


def resize(drv: LibvirtDriver, instance_uuid: str, flavor: str, *, timeout: float = 60) -> None:
    """Resize the instance to ``flavor``; ``timeout``: the clean shutdown's (Nova's
    ``shutdown_timeout``), then it is stopped hard."""
    with locked(drv, instance_uuid) as record:
        check_instance_state(record, (VMState.ACTIVE, VMState.STOPPED), "resize")
        refuse_unsupported(drv, record, "resize")
        old, new = get_flavor(drv, record.flavor), get_flavor(drv, flavor)
        if new.name == old.name:
            raise MinidriverError(
                f"instance {record.display_name} has flavor {old.name} already",
                hint="choose another flavor",
            )
        check_resize_down(old, new)
        image_meta = image_meta_of(drv, record, "resize")
        compute_api.validate_flavor_image(new, image_meta, drv.conf.libvirt.images_max_virtual_size)
        domain = require_domain(drv.host, record, drv.db.state_id)
        instance_dir = Path(record.instance_dir)
        old_dir = resize_dir(instance_dir)
        root_format = (read_disk_info(instance_dir) or {}).get(os.fspath(instance_dir / "disk"))
        if root_format is None:
            raise MinidriverError(f"instance {record.display_name} records no root disk")
        was_running = bool(domain.isActive())
        original = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

        # migrate_disk_and_power_off
        if was_running:
            drv.power_off(record.uuid, timeout=timeout)
        shutil.rmtree(old_dir, ignore_errors=True)  # a failed resize's (Nova does so too)
        with contextlib.ExitStack() as undo:
            # A failure from here on: the old dir, definition and record back.
            undo.callback(_restore_old, drv, record, original, old, start=was_running)
            os.rename(instance_dir, old_dir)
            write_private(old_dir / "libvirt.xml", original)
            # finish_migration
            instance = instance_of(drv, record, new)
            formats = _make_disks(
                drv, old_dir, instance_dir, new, root_format, os_type=image_meta.os_type
            )
            disk_info = blockinfo.get_disk_info(
                instance.virt_type,
                new,
                image_meta,
                machine_type=drv.conf.libvirt.hw_machine_type,
                config_drive_format=(
                    drv.conf.default.config_drive_format if has_config_drive(instance_dir) else None
                ),
            )
            if "disk.config" in disk_info:
                formats["disk.config"] = "raw"
            write_disk_info(instance_dir, formats)
            xml = define_xml(drv, instance, image_meta, disk_info, formats, vif=vif_of(record))
            write_private(instance_dir / "libvirt.xml", xml)
            drv.db.update_instance(
                record.uuid,
                flavor=new.name,
                old_flavor=old.name,
                vm_state=VMState.RESIZED,
                state="shutoff",
            )
            if was_running:
                domain = require_domain(drv.host, record, drv.db.state_id)
                drv.host.launch(domain)
                drv.wait_for_running(instance, domain)
                drv.db.update_instance(record.uuid, state="running")
            undo.pop_all()
        forget_spawned_disks(drv, record.uuid)


def confirm_resize(drv: LibvirtDriver, instance_uuid: str) -> None:
    """Nova's ``confirm_migration`` (``_cleanup_resize``): the old instance dir removed."""
    with locked(drv, instance_uuid) as record:
        check_instance_state(record, (VMState.RESIZED,), "confirm the resize of")
        domain = require_domain(drv.host, record, drv.db.state_id)
        shutil.rmtree(resize_dir(record.instance_dir), ignore_errors=True)
        running = bool(domain.isActive())
        drv.db.update_instance(
            record.uuid,
            old_flavor="",
            vm_state=VMState.ACTIVE if running else VMState.STOPPED,
            state="running" if running else "shutoff",
        )


def revert_resize(drv: LibvirtDriver, instance_uuid: str) -> None:
    """Nova's ``finish_revert_migration``: the resized domain stopped, the old instance
    dir back in place, the old definition defined and started if the resized guest
    ran (Nova's ``power_on``: whether it ran before the resize)."""
    with locked(drv, instance_uuid) as record:
        check_instance_state(record, (VMState.RESIZED,), "revert the resize of")
        domain = require_domain(drv.host, record, drv.db.state_id)
        instance_dir = Path(record.instance_dir)
        old_dir = resize_dir(instance_dir)
        if not old_dir.is_dir():
            raise MinidriverError(
                f"instance {record.display_name}'s old disks ({old_dir}) are gone",
                hint="confirm the resize instead: minidriver resize-confirm",
            )
        running = bool(domain.isActive())
        if running:
            domain.destroy()
        xml = (old_dir / "libvirt.xml").read_text()
        _restore_old(drv, record, xml, get_flavor(drv, record.old_flavor), start=running)


def _make_disks(
    drv: LibvirtDriver,
    old_dir: Path,
    instance_dir: Path,
    flavor: Flavor,
    root_format: str,
    *,
    os_type: str,
) -> dict[str, str]:
    """The new instance dir's disks, by disk_info name: their formats."""
    instance_dir.mkdir()
    instance_dir.chmod(TRAVERSE_ONLY_DIR)
    for name in COPIED:
        if (old_dir / name).exists():
            # Sparse: a raw root is mostly holes.
            run(["cp", "--sparse=always", "--preserve=mode", old_dir / name, instance_dir / name])
    formats = {"disk": root_format}
    root = instance_dir / "disk"
    if flavor.root_gb and qemu_img.info(root, root_format).virtual_size < flavor.root_gb * GiB:
        qemu_img.resize(root, root_format, flavor.root_gb * GiB)
    backend = imagebackend.local_backend_class(drv.conf)
    timer = StepTimer()
    if flavor.ephemeral_gb:
        fs_type = imagebackend.get_ephemeral_fs(os_type, drv.conf.default.default_ephemeral_format)
        disk = backend(drv.conf, instance_dir / "disk.local", timer)
        disk.cache(
            partial(
                imagebackend.create_ephemeral,
                size_gb=flavor.ephemeral_gb,
                fs_type=fs_type,
                label=imagebackend.EPHEMERAL_LABEL,
            ),
            imagebackend.ephemeral_filename(flavor.ephemeral_gb, fs_type),
            flavor.ephemeral_gb * GiB,
            Step.EPHEMERAL,
        )
        formats["disk.local"] = disk.driver_format
    if flavor.swap:
        disk = backend(drv.conf, instance_dir / "disk.swap", timer)
        disk.cache(
            partial(imagebackend.create_swap, swap_mb=flavor.swap),
            imagebackend.swap_filename(flavor.swap),
            flavor.swap * 1024 * 1024,
            Step.SWAP,
        )
        formats["disk.swap"] = disk.driver_format
    return formats


def _restore_old(
    drv: LibvirtDriver, record: InstanceRecord, xml: str, flavor: Flavor, *, start: bool
) -> None:
    """The old instance dir back in place (if it is not there yet), ``xml`` defined,
    the record on ``flavor``, the guest started when ``start``."""
    instance_dir = Path(record.instance_dir)
    old_dir = resize_dir(instance_dir)
    if old_dir.is_dir():
        shutil.rmtree(instance_dir, ignore_errors=True)
        os.rename(old_dir, instance_dir)
    domain = drv.host.define(xml)
    if domain.isActive():
        domain.destroy()
    drv.db.update_instance(
        record.uuid,
        flavor=flavor.name,
        old_flavor="",
        vm_state=VMState.ACTIVE if start else VMState.STOPPED,
        state="shutoff",
    )
    if start:
        drv.host.launch(domain)
        drv.wait_for_running(instance_of(drv, record, flavor), domain)
        drv.db.update_instance(record.uuid, state="running")
    forget_spawned_disks(drv, record.uuid)
