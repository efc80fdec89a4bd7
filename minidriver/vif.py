"""Plugging an instance's VIF, and the wait for it to be plugged (nova/virt/libvirt/vif.py
for the plug; driver.py's ``_create_guest_with_network`` and ``_get_neutron_events``
for the wait).

Nova plugs the VIFs, starts the guest paused, waits up to ``vif_plugging_timeout`` for
Neutron's ``network-vif-plugged`` event of every port that was down, and resumes; with
no event expected (no port, a timeout of 0, a virt_type other than kvm or qemu) it
neither pauses nor waits. A timeout fails the spawn when ``vif_plugging_is_fatal``,
else is logged and the boot goes on. There is no Neutron here; what stands in for it:

- plugging (Nova's os-vif wiring the port): what the VIF attaches to is found up on
  the host, the libvirt network active or the bridge active (libvirt's interface API);
  user mode attaches to nothing, its port is reserved before (``ports.py``);
- the event (Neutron's agent seeing the port wired): the VIF's host end exists once
  QEMU runs it, paused or not: in user mode QEMU listens on the reserved port on
  127.0.0.1; with a network or a bridge, the tap device libvirt made (the live XML's
  ``<target dev>``) is on the host.

Unplugging has nothing to do here: the tap goes with QEMU, and the port reservation is
``destroy``'s.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import libvirt

from minidriver import guest
from minidriver.config import Config
from minidriver.exception import MinidriverError
from minidriver.host import Host
from minidriver.network import VIF, NetworkMode
from minidriver.ports import port_is_free
from minidriver.steps import Step, StepTimer

LOG = logging.getLogger(__name__)

VIF_PLUGGED = "network-vif-plugged"
# Nova expects events under these virt_types only.
EVENT_VIRT_TYPES = ("kvm", "qemu")
# How often the VIF's host end is looked for while the guest is paused (ours: Nova's
# wait is for a message, not a poll).
POLL_INTERVAL = 0.02


class VirtualInterfaceCreateException(MinidriverError):
    """Nova's name: the VIF could not be plugged, or was not plugged in time;
    ``step`` is the spawn's step that failed (plug_vifs, vif_plugged)."""

    def __init__(self, message: str, *, step: Step, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.step = step.value


Event = tuple[str, str]


def plug_vifs(host: Host, vif: VIF | None, timer: StepTimer) -> None:
    """Nova's ``plug_vifs``, before the define as in Nova: timed as its own step."""
    with timer.step(Step.PLUG_VIFS):
        if vif is not None and vif.mode.needs_source:
            check_source_active(host, vif)


def check_source_active(host: Host, vif: VIF) -> None:
    """Find up what ``vif`` attaches to: the libvirt network active, the bridge active.

    A connection with no interface API (the embedded driver has none) cannot look for a
    bridge: QEMU's start then says whether it exists."""
    conn = host.get_connection()
    try:
        if vif.mode is NetworkMode.NETWORK:
            found = conn.networkLookupByName(vif.source)
        else:
            found = conn.interfaceLookupByName(vif.source)
        active = bool(found.isActive())
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        if code in (libvirt.VIR_ERR_NO_NETWORK, libvirt.VIR_ERR_NO_INTERFACE):
            active = False
        elif code == libvirt.VIR_ERR_NO_SUPPORT:
            LOG.debug("%s has no interface API: bridge %s not looked for", host.uri, vif.source)
            return
        else:
            raise
    if not active:
        start = (
            f"virsh net-start {vif.source}"
            if vif.mode is NetworkMode.NETWORK
            else f"ip link set {vif.source} up"
        )
        raise VirtualInterfaceCreateException(
            f"cannot plug the VIF: {vif.mode} {vif.source} is not active on {host.uri}",
            hint=f"{start}, or boot with another --network",
            step=Step.PLUG_VIFS,
        )


def get_neutron_events(
    vif: VIF | None, virt_type: str, timeout: float, hypervisor: str
) -> list[Event]:
    """The events a spawn waits for, paused: one for a VIF, none (no pause) without a
    VIF, with a timeout of 0, or under another virt_type, as Nova's
    ``_create_guest_with_network`` decides. ``hypervisor`` is libvirt's name of the
    connection's driver: only QEMU starts a domain paused and makes the VIF's host end
    (libvirt's test driver, the unit tests', does neither; ours)."""
    if vif is None or vif.mode is NetworkMode.NONE:
        return []
    if timeout <= 0 or virt_type not in EVENT_VIRT_TYPES or hypervisor != "QEMU":
        return []
    return [(VIF_PLUGGED, vif.vif_id)]


def tap_device(domain: libvirt.virDomain, mac_address: str) -> str | None:
    """The host device libvirt made for the interface of that MAC, from the live XML."""
    tree = guest.parse_xml(domain.XMLDesc(0))
    for iface in tree.iterfind("devices/interface"):
        mac = iface.find("mac")
        target = iface.find("target")
        if mac is not None and mac.get("address", "").lower() == mac_address.lower():
            return target.get("dev") if target is not None else None
    return None


def is_plugged(domain: libvirt.virDomain | None, vif: VIF) -> bool:
    """Whether the VIF's host end exists: the event Neutron would send. A user-mode
    VIF's is found without its domain (None)."""
    if vif.mode is NetworkMode.USER:
        # QEMU holds the reserved port once its user network is up.
        return vif.forward_port is None or not port_is_free(vif.forward_port)
    dev = tap_device(domain, vif.mac_address) if domain is not None else None
    return dev is not None and os.path.exists(f"/sys/class/net/{dev}")


def wait_for_vif_plugged(
    domain: libvirt.virDomain | None,
    vif: VIF,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Look for the VIF's host end until ``timeout``; False if it never showed."""
    deadline = clock() + timeout
    while not is_plugged(domain, vif):
        if clock() >= deadline:
            return False
        sleep(POLL_INTERVAL)
    return True


def launch_with_network(
    host: Host,
    domain: libvirt.virDomain,
    vif: VIF | None,
    conf: Config,
    timer: StepTimer,
    *,
    vifs_already_plugged: bool = False,
) -> None:
    """Nova's ``_create_guest_with_network`` after the define: start, paused when an
    event is expected; wait for it; resume. A fatal timeout raises (the spawn's undo
    list then stops and removes the domain); a non-fatal one is logged.
    ``vifs_already_plugged`` (Nova's argument, which its ``_hard_reboot`` passes
    unless ``[workarounds] wait_for_vif_plugged_event_during_hard_reboot`` names the
    port's vnic type, an option we do not have): no event expected, no pause."""
    timeout = conf.default.vif_plugging_timeout
    events = (
        []
        if vifs_already_plugged
        else get_neutron_events(
            vif, host.virt_type.virt_type, timeout, host.get_connection().getType()
        )
    )
    with timer.step(Step.START):
        host.launch(domain, pause=bool(events))
    if not events or vif is None:
        return
    with timer.step(Step.VIF_PLUGGED):
        plugged = wait_for_vif_plugged(domain, vif, timeout)
    if not plugged:
        what = f"{VIF_PLUGGED} for {vif.mode} VIF {vif.vif_id} not seen within {timeout} s"
        if conf.default.vif_plugging_is_fatal:
            raise VirtualInterfaceCreateException(
                what,
                hint="see why the VIF's host end did not come up (the QEMU log), or raise"
                " [DEFAULT] vif_plugging_timeout",
                step=Step.VIF_PLUGGED,
            )
        LOG.warning("%s; going on (vif_plugging_is_fatal = false)", what)
    domain.resume()
