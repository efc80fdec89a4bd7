"""An instance's one network interface, its VIF and MAC (nova/network/model.py).

Nova asks Neutron for a port and gets a VIF (``network_model.VIF``) with a MAC from
Neutron's ``fa:16:3e`` prefix; here the VIF is made locally, in one of four modes:

- ``user``: QEMU's own user-mode network (slirp), the guest's port 22 forwarded from
  a port on 127.0.0.1 (see ``ports.py``); needs no root networking, works anywhere;
- ``network``: a libvirt network (``<interface type='network'>``);
- ``bridge``: a host bridge (``<interface type='bridge'>``);
- ``none``: no NIC.

``get_network_metadata`` writes Nova's ``network_data.json`` for it (links, networks,
services), so that cloud-init configures the NIC by DHCP.
"""

from __future__ import annotations

import enum
import secrets
import uuid as uuidlib
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from minidriver.config import LibvirtOptions
from minidriver.exception import MinidriverError

# Neutron's default base_mac: every Nova guest's MAC starts with it.
MAC_PREFIX = (0xFA, 0x16, 0x3E)
# QEMU's user network: its DHCP server hands out 10.0.2.15 and names this DNS server.
USER_NETWORK_DNS = "10.0.2.3"
USER_NETWORK_MTU = 1500
GUEST_SSH_PORT = 22
# A fixed namespace, so that a network's id in network_data.json is the same each boot.
NETWORK_ID_NAMESPACE = uuidlib.UUID("0e6c1b8a-3f0e-4c55-9a51-7d0b2f6d1c11")


class NetworkMode(enum.StrEnum):
    USER = "user"
    NETWORK = "network"
    BRIDGE = "bridge"
    NONE = "none"

    @property
    def needs_source(self) -> bool:
        """Whether the mode names something on the host (a network, a bridge)."""
        return self in (NetworkMode.NETWORK, NetworkMode.BRIDGE)


class NetworkRequestError(MinidriverError):
    """A ``--network`` value or network option that names no usable network."""


@dataclass(frozen=True)
class NetworkRequest:
    """What a boot asks for: a mode and, for network/bridge, what to attach to."""

    mode: NetworkMode
    source: str = ""  # the libvirt network's or the bridge's name

    @classmethod
    def parse(cls, spec: str | None, options: LibvirtOptions) -> NetworkRequest:
        """``MODE[:NAME]`` (``boot --network``); None: the ``[libvirt]`` options.

        ``network`` and ``bridge`` without a name take ``network_name`` / ``bridge``.
        """
        text = options.network_mode if spec is None else spec
        mode_text, sep, name = text.partition(":")
        try:
            mode = NetworkMode(mode_text)
        except ValueError:
            raise NetworkRequestError(
                f"network mode {mode_text!r} is unknown",
                hint="use user, none, network[:NAME] or bridge[:NAME]",
            ) from None
        if not mode.needs_source:
            if sep:
                raise NetworkRequestError(
                    f"network mode {mode} takes no name ({text!r})",
                    hint=f"use --network {mode}",
                )
            return cls(mode)
        default = options.network_name if mode is NetworkMode.NETWORK else options.bridge
        source = name if sep else default
        if not source:
            option = "network_name" if mode is NetworkMode.NETWORK else "bridge"
            raise NetworkRequestError(
                f"network mode {mode} needs the name of a {mode}",
                hint=f"use --network {mode}:NAME, or set [libvirt] {option}",
            )
        return cls(mode, source)


@dataclass(frozen=True)
class VIF:
    """One instance's interface (Nova's ``VIF``), as recorded and as the XML needs it."""

    mode: NetworkMode
    mac_address: str
    source: str = ""  # network or bridge name
    forward_port: int | None = None  # user mode: the host port on 127.0.0.1

    @property
    def vif_id(self) -> str:
        """A stable id for the interface (Neutron's port id): derived from its MAC."""
        return str(uuidlib.uuid5(NETWORK_ID_NAMESPACE, f"vif:{self.mac_address}"))


def generate_mac_address(taken: Container[str] = ()) -> str:
    """A MAC as Neutron makes one from its default ``base_mac``: ``fa:16:3e`` and
    three random bytes; never one in ``taken`` (this state dir's instances). Nova's own
    ``generate_mac_address`` (nova/utils.py) was removed in 2025, unused."""
    while True:
        mac = ":".join(f"{b:02x}" for b in (*MAC_PREFIX, *secrets.token_bytes(3)))
        if mac not in taken:
            return mac


def get_network_metadata(vif: VIF | None) -> dict[str, Any]:
    """Nova's ``netutils.get_network_metadata``: network_data.json for the VIF.

    One link with the MAC (cloud-init finds the NIC by it), one ``ipv4_dhcp`` network
    on it, and the DNS server where we know it (QEMU's user network). No VIF: empty
    links, networks and services (ours; Nova writes ``{}`` for an instance without
    ports).
    """
    if vif is None or vif.mode is NetworkMode.NONE:
        return {"links": [], "networks": [], "services": []}
    link_id = f"tap{vif.vif_id[:11]}"  # Nova's devname: "tap" + the port id's head
    user = vif.mode is NetworkMode.USER
    network_key = "user" if user else f"{vif.mode}:{vif.source}"
    return {
        "links": [
            {
                "id": link_id,
                "vif_id": vif.vif_id,
                # Nova writes the VIF's type here (bridge, tap, ...; "phy" for others);
                # ours: "ethernet" for QEMU's own network, which has no Neutron VIF type.
                "type": "ethernet" if user else "bridge",
                "mtu": USER_NETWORK_MTU if user else None,
                "ethernet_mac_address": vif.mac_address,
            }
        ],
        "networks": [
            {
                "id": "network0",
                "type": "ipv4_dhcp",
                "link": link_id,
                "network_id": str(uuidlib.uuid5(NETWORK_ID_NAMESPACE, network_key)),
            }
        ],
        "services": [{"type": "dns", "address": USER_NETWORK_DNS}] if user else [],
    }
