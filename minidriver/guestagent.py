"""The QEMU guest agent: whether a guest has one, and the guest's clock set through
it after a restore (Nova's ``hw_qemu_guest_agent`` and ``Guest.sync_guest_time``,
nova/virt/libvirt/guest.py).

A restored guest's clock is the one it had when it was saved: a clone of a template
saved an hour ago starts an hour behind. Through the agent's ``guest-set-time`` the
host's time is written into the guest (QEMU 7.2's agent also needs ``/sbin/hwclock``
in the guest, or it answers "unsupported").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import libvirt

LOG = logging.getLogger(__name__)

CHANNEL_NAME = "org.qemu.guest_agent.0"
# After a restore libvirt reconnects to the agent's socket; until the agent answers
# there setTime fails as unresponsive. Tried again within this many seconds.
AGENT_WAIT = 15.0
AGENT_RETRY_INTERVAL = 0.25
_TRUE = frozenset({"1", "t", "true", "on", "y", "yes"})  # oslo's bool_from_string


def wants_guest_agent(properties: Mapping[str, str]) -> bool:
    """Nova's image property ``hw_qemu_guest_agent``, read as oslo reads booleans."""
    return properties.get("hw_qemu_guest_agent", "").strip().lower() in _TRUE


def has_agent_channel(domain_xml: str) -> bool:
    from lxml import etree  # noqa: PLC0415 - see guest.parse_xml (guest imports us)

    root = etree.fromstring(domain_xml.encode())
    return any(t.get("name") == CHANNEL_NAME for t in root.iterfind("devices/channel/target"))


def sync_guest_time(
    domain: libvirt.virDomain,
    *,
    wait: float = AGENT_WAIT,
    clock: Callable[[], float] = time.monotonic,
    now: Callable[[], float] = time.time,
) -> bool:
    """Set the guest's clock to the host's; True when the agent did it.

    Not having it done is no error (no agent in the guest, an old agent): it is logged,
    as Nova logs it, and the guest keeps its clock.
    """
    deadline = clock() + wait
    while True:
        t = now()
        seconds = int(t)
        try:
            domain.setTime({"seconds": seconds, "nseconds": int((t - seconds) * 1e9)}, 0)
            return True
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            if code != libvirt.VIR_ERR_AGENT_UNRESPONSIVE or clock() >= deadline:
                LOG.warning(
                    "could not set the clock of %s through its guest agent: %s",
                    domain.name(),
                    exc.get_error_message(),
                )
                return False
        time.sleep(AGENT_RETRY_INTERVAL)
