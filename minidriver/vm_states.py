"""Nova's vm_states: what the user last asked of an instance (nova/compute/vm_states.py).

libvirt's power state (``running``, ``shutoff``...) says what the hypervisor sees now;
the vm_state says what the instance is meant to be. Both are shown: ``state`` stays
the power state (ssh, console and the pytest plugin rely on it), ``vm_state`` is this.
Nova's lowercase values, of which minidriver uses those of the operations it has.
"""

from __future__ import annotations

import enum


class VMState(enum.StrEnum):
    BUILDING = "building"
    ACTIVE = "active"
    STOPPED = "stopped"
    SUSPENDED = "suspended"
    RESCUED = "rescued"
    RESIZED = "resized"
    SHELVED_OFFLOADED = "shelved_offloaded"
    ERROR = "error"


def synced(vm_state: str, power_state: str) -> str:
    """The vm_state as shown, given the power state libvirt reports now.

    An active instance whose guest shut itself down is stopped: Nova's
    ``_sync_instance_power_state`` stops such an instance on its next pass; here the
    view says so at once, and ``power_sync`` records it.
    """
    if vm_state == VMState.ACTIVE and power_state in ("shutoff", "crashed"):
        return VMState.STOPPED
    return vm_state
