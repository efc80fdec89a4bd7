"""Cold migration to another host, its confirm and its revert (nova/virt/libvirt/
driver.py ``migrate_disk_and_power_off``, ``finish_migration``,
``confirm_migration``, ``finish_revert_migration``; nova/compute/manager.py
``prep_resize``, ``resize_instance``, ``finish_resize``, ``confirm_resize``,
``revert_resize``).

Nova's steps, with one driver per host as in Nova (the source's and the
destination's, on one state dir):

1. ``prep_resize`` on the destination: another host than the source (Nova's
   ``allow_resize_to_same_host`` is false by default), that answers, has the memory,
   and sees the instance's disks: every disk in Ceph (``images_type = rbd``), or the
   shared-storage check on ``instances_path`` (minidriver.shared_storage). Nothing is
   copied: the disks stay where they are. Volumes are refused (not handled yet);
2. ``migrate_disk_and_power_off`` on the source: the guest powered off (a clean
   shutdown, then a hard stop after ``timeout``) and its domain undefined;
3. ``finish_migration`` on the destination: the same definition (its migratable XML)
   defined there, a user-mode NIC forwarding a newly reserved port (as a live
   migration's), started if it ran; the record names the destination and keeps the
   source (Nova's ``migration.source_compute``) in ``source_host``; vm_state
   ``resized`` (Nova's ``VERIFY_RESIZE``);
4. ``resize-confirm`` (``confirm_migration``): the source's leftovers removed (a
   definition of the instance there, if any); ``resize-revert``
   (``finish_revert_migration``): the guest stopped and undefined on the destination,
   defined on the source again and started if it ran there.

Where we differ from Nova: Nova undefines the source's domain only at the confirm
(``_cleanup_resize``); we undefine it at once, so that no host keeps a definition of
an instance the record places elsewhere (``destroy_evacuated_instances`` removes such
ones). Nova's revert rolls an RBD root disk back to the snapshot its
``finish_migration`` took; we take none: the disks keep what the guest wrote on the
destination. Our revert defines the definition the domain has (with the source's
port), where Nova generates the XML again.

A move that fails leaves the instance on the source as it was (defined, started if it
ran), nothing of it on the destination, the record unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import libvirt

from minidriver import guest
from minidriver.block_device import require_domain
from minidriver.db import InstanceRecord
from minidriver.driver import LibvirtDriver
from minidriver.exception import MinidriverError
from minidriver.instance_ops import check_instance_state, get_flavor, locked
from minidriver.instance_xml import instance_of
from minidriver.migration import check_can_live_migrate_destination, host_answers, reserve_new_port
from minidriver.vm_states import VMState

LOG = logging.getLogger(__name__)

# The definition that moves: no live state, every secret kept, nothing that ties it
# to the host it was read on.
DEFINITION = (
    libvirt.VIR_DOMAIN_XML_INACTIVE
    | libvirt.VIR_DOMAIN_XML_MIGRATABLE
    | libvirt.VIR_DOMAIN_XML_SECURE
)


class MigrationError(MinidriverError):
    """A cold migration, its confirm or its revert refused or failed."""


def is_migration(record: InstanceRecord) -> bool:
    """Whether the instance's pending resize is a migration to another host."""
    return record.vm_state == VMState.RESIZED and bool(record.source_host)


def migrate(
    src: LibvirtDriver, dest: LibvirtDriver, instance_uuid: str, *, timeout: float = 60
) -> InstanceRecord:
    """Move the instance from ``src``'s host to ``dest``'s, powered off; its new
    record. ``timeout``: the clean shutdown's (Nova's ``shutdown_timeout``)."""
    with locked(src, instance_uuid) as record:
        check_instance_state(record, (VMState.ACTIVE, VMState.STOPPED), "migrate")
        if src.volumes.attachments_of(record.uuid):
            raise MigrationError(
                f"cannot migrate instance {record.display_name}: it has volumes attached",
                hint="detach its volumes first (minidriver volume detach); an instance"
                " booted from a volume cannot be migrated yet",
            )
        domain = require_domain(src.host, record, src.db.state_id)
        check_can_live_migrate_destination(
            src, dest, record, command="migrate", error=MigrationError
        )
        was_running = bool(domain.isActive())
        original = domain.XMLDesc(DEFINITION)
        here, there = src.conf.default.host, dest.conf.default.host

        # migrate_disk_and_power_off
        if was_running:
            src.power_off(record.uuid, timeout=timeout)
        with contextlib.ExitStack() as undo:
            undo.callback(_define_again, src, record, original, start=was_running)
            xml, port = _with_new_port(src, record, original, undo)
            src.host.undefine(domain)
            # finish_migration
            moved = dest.host.define(xml)
            undo.callback(dest.host.undefine, moved)
            src.db.update_instance(
                record.uuid,
                host=there,
                source_host=here,
                forward_port=port,
                vm_state=VMState.RESIZED,
                state="shutoff",
            )
            if was_running:
                dest.host.launch(moved)
                dest.wait_for_running(
                    instance_of(dest, record, get_flavor(dest, record.flavor)), moved
                )
                src.db.update_instance(record.uuid, state="running")
            undo.pop_all()
        _moved(src, record, xml, port)
        return src.db.get_instance(record.uuid)


def confirm_migration(dest: LibvirtDriver, src: LibvirtDriver, instance_uuid: str) -> None:
    """Nova's ``confirm_migration`` on the source (``src``): with the disks shared,
    nothing to remove there but a definition of the instance, if one is left. A
    source that does not answer is no reason to refuse: its definition goes when it
    comes back (``destroy_evacuated_instances``)."""
    with locked(dest, instance_uuid) as record:
        _check_migrated(record, "confirm the migration of")
        domain = require_domain(dest.host, record, dest.db.state_id)
        if host_answers(src):
            left = src.host.owned_domain(record.uuid, src.db.state_id)
            if left is not None and not left.isActive():
                src.host.undefine(left)
        else:
            LOG.warning("host %s does not answer: its leftovers stay", record.source_host)
        running = bool(domain.isActive())
        dest.db.update_instance(
            record.uuid,
            source_host="",
            old_flavor="",
            vm_state=VMState.ACTIVE if running else VMState.STOPPED,
            state="running" if running else "shutoff",
        )


def revert_migration(dest: LibvirtDriver, src: LibvirtDriver, instance_uuid: str) -> None:
    """Nova's ``revert_resize`` on the destination (``dest``: the guest stopped, its
    domain undefined) and ``finish_revert_migration`` on the source (``src``: the
    domain defined there again, started if the migrated guest runs). Refused while the
    source does not answer: the instance would have no host."""
    with locked(dest, instance_uuid) as record:
        _check_migrated(record, "revert the migration of")
        if not host_answers(src):
            raise MigrationError(
                f"host {record.source_host} does not answer: {record.display_name} cannot"
                " go back to it",
                hint="start that host again, or keep the instance where it is:"
                " minidriver resize-confirm",
            )
        domain = require_domain(dest.host, record, dest.db.state_id)
        running = bool(domain.isActive())
        current = domain.XMLDesc(DEFINITION)
        if running:
            domain.destroy()
        with contextlib.ExitStack() as undo:
            undo.callback(_define_again, dest, record, current, start=running)
            xml, port = _with_new_port(src, record, current, undo)
            back = src.host.define(xml)
            undo.callback(src.host.undefine, back)
            dest.host.undefine(domain)
            dest.db.update_instance(
                record.uuid,
                host=record.source_host,
                source_host="",
                forward_port=port,
                vm_state=VMState.ACTIVE if running else VMState.STOPPED,
                state="shutoff",
            )
            if running:
                src.host.launch(back)
                src.wait_for_running(instance_of(src, record, get_flavor(src, record.flavor)), back)
                dest.db.update_instance(record.uuid, state="running")
            undo.pop_all()
        _moved(src, record, xml, port)


def _check_migrated(record: InstanceRecord, what: str) -> None:
    check_instance_state(record, (VMState.RESIZED,), what)
    if not record.source_host:
        raise MigrationError(
            f"instance {record.display_name} was resized on its host, not migrated",
            hint="confirm or revert it as a resize: minidriver resize-confirm|resize-revert",
        )


def _with_new_port(
    drv: LibvirtDriver, record: InstanceRecord, xml: str, undo: contextlib.ExitStack
) -> tuple[str, int | None]:
    """``xml`` for the host the instance moves to, and its port there: a user-mode
    NIC's newly reserved (freed by ``undo``), else the one it has."""
    port = reserve_new_port(drv, record, undo)
    if port is not None and port != record.forward_port:
        xml = guest.with_forward_port(xml, port)
    return xml, port


def _moved(drv: LibvirtDriver, record: InstanceRecord, xml: str, port: int | None) -> None:
    """After a move: the port the instance left freed, the definition kept as ours."""
    if record.forward_port is not None and record.forward_port != port:
        drv.ports.release(record.forward_port, record.uuid)
    (Path(record.instance_dir) / "libvirt.xml").write_text(xml)


def _define_again(drv: LibvirtDriver, record: InstanceRecord, xml: str, *, start: bool) -> None:
    """After a failed move: the instance on ``drv``'s host as ``record`` has it, its
    ``xml`` defined, started when ``start``."""
    domain = drv.host.define(xml)
    drv.db.update_instance(
        record.uuid,
        host=record.host,
        source_host=record.source_host,
        forward_port=record.forward_port,
        vm_state=record.vm_state,
        state="shutoff",
    )
    if start:
        drv.host.launch(domain)
        drv.db.update_instance(record.uuid, state="running")
