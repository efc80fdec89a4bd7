"""Instance records kept in step with libvirt's power state (``_sync_power_states``,
``_sync_instance_power_state`` and ``handle_lifecycle_event`` of nova/compute/manager.py).

A guest that powers itself off, or crashes, changes no record by itself. Nova finds it
two ways: its periodic ``_sync_power_states`` compares every instance with the
hypervisor, and its libvirt host turns lifecycle events into
``handle_lifecycle_event`` calls. Here there is no periodic task: every command that
reads or acts on instances syncs first (one domain listing), and a process whose host
runs the event loop syncs the instance an event names.

The record's power state (``state``) becomes libvirt's. Its vm_state follows Nova's
``_sync_instance_power_state`` where that only records: an active instance whose guest
is shut off or crashed becomes stopped (Nova calls its stop API for it). Where Nova
acts on the guest (a stopped instance found running is force-stopped, an active one
found suspended is stopped) we record the power state only and touch no guest.
Instances being built are left alone, as Nova skips those with a task in progress.
"""

from __future__ import annotations

import logging

import libvirt

from minidriver import vm_states
from minidriver.db import Database, InstanceRecord
from minidriver.exception import InstanceNotFound
from minidriver.host import POWER_STATES, Host
from minidriver.vm_states import VMState

LOG = logging.getLogger(__name__)

# The lifecycle events that change a power state. Nova's host.py turns STOPPED,
# STARTED, SUSPENDED and RESUMED into its own lifecycle events; CRASHED, which it
# leaves out, is ours.
POWER_EVENTS = frozenset(
    {
        libvirt.VIR_DOMAIN_EVENT_STARTED,
        libvirt.VIR_DOMAIN_EVENT_RESUMED,
        libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
        libvirt.VIR_DOMAIN_EVENT_STOPPED,
        libvirt.VIR_DOMAIN_EVENT_CRASHED,
    }
)


def sync_instance_power_state(db: Database, record: InstanceRecord, power_state: str) -> bool:
    """Nova's ``_sync_instance_power_state``, recording only (see above); True when
    the record changed."""
    if VMState.BUILDING in (record.vm_state, record.state):
        return False
    vm_state = vm_states.synced(record.vm_state, power_state)
    if (record.state, record.vm_state) == (power_state, vm_state):
        return False
    LOG.info(
        "%s: power state %s in the record, %s in libvirt: recorded (vm_state %s)",
        record.display_name,
        record.state,
        power_state,
        vm_state,
    )
    try:
        db.update_instance(record.uuid, state=power_state, vm_state=vm_state)
    except InstanceNotFound:
        return False  # deleted meanwhile (a delete or cleanup stopped the domain)
    return True


def sync_power_states(db: Database, host: Host, host_name: str) -> list[str]:
    """Nova's ``_sync_power_states``: every record of host ``host_name`` whose domain
    libvirt lists there, brought up to date; returns the uuids changed. One listing of
    the domains (by uuid: an instance's domain has its uuid); a record without a domain
    is ``cleanup``'s. Another host's records are that host's (an instance evacuated
    from here may still have its old, stopped definition here)."""
    domains = {d.UUIDString(): d for d in host.get_connection().listAllDomains()}
    changed = []
    for record in db.list_instances():
        domain = domains.get(record.uuid)
        if domain is None or not record.runs_on(host_name):
            continue
        try:
            state, _reason = domain.state()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            continue  # gone since the listing (a daemon is shared)
        if sync_instance_power_state(db, record, POWER_STATES.get(state, "unknown")):
            changed.append(record.uuid)
    return changed


def handle_lifecycle_event(
    db: Database, host: Host, host_name: str, instance_uuid: str, event: int
) -> bool:
    """Nova's ``handle_lifecycle_event``: the instance an event names synced; True
    when its record changed. The state recorded is the one libvirt reports when the
    event is handled, not the event's: events queued behind a reboot's stop and start
    must not leave the record stopped. Events of domains that are no instance of
    ``db`` are ignored."""
    if event not in POWER_EVENTS:
        return False
    try:
        record = db.get_instance(instance_uuid)
    except InstanceNotFound:
        return False
    if not record.runs_on(host_name):
        return False  # e.g. the source's end of a live migration
    domain = host.get_domain(instance_uuid)
    if domain is None:
        return False
    try:
        state = host.domain_state(domain)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return False  # undefined since the lookup: a delete's stop, then its undefine
    return sync_instance_power_state(db, record, state)
