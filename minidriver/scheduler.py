"""Placement on several hosts: host states, filters, the RAM weigher (nova/scheduler/).

Nova's scheduler, as it is by default (``[filter_scheduler] enabled_filters`` in
nova/conf/scheduler.py: ComputeFilter, ComputeCapabilitiesFilter,
ImagePropertiesFilter and the server group filters; then the weighers), reduced to
what one state dir knows:

- ``ComputeFilter``: the host answers (Nova asks whether its service is up);
- ``ImagePropertiesFilter``: the image's ``img_hv_type`` (or its older name
  ``hypervisor_type``), when set, is a domain type the host's libvirt offers;
- enough free memory for the flavor: Nova asks Placement for it (the host's
  ``MEMORY_MB`` inventory less its allocations) before any filter runs; here the host's
  memory less the flavors of this state dir's instances on it.

Hosts that pass are weighed by Nova's ``RAMWeigher`` (free RAM, more wins). Nova then
picks at random among the best ``host_subset_size`` (1 by default): ties are rare
there; here, with every host on one machine, they are not, so ties go to the host
with the fewest instances, then to the first in the configuration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import libvirt

from minidriver.config import Config
from minidriver.db import InstanceRecord
from minidriver.exception import HostError, MinidriverError
from minidriver.host import Host
from minidriver.objects import Flavor


class NoValidHost(MinidriverError):
    """Nova's NoValidHost: no host passes the filters."""


@dataclass(frozen=True)
class HostState:
    """What placement knows of one host (Nova's ``host_manager.HostState``)."""

    name: str
    uri: str
    order: int  # its place in the configuration: this host 0, then [host:NAME] sections
    reachable: bool
    error: str  # why it is not reachable ('' when it is)
    host_uuid: str
    virt_types: frozenset[str]
    memory_mb: int
    free_ram_mb: int  # memory_mb less the flavors of our instances on it (Nova's)
    node_free_mb: int  # what its kernel has free now
    instances: int  # this state dir's instances recorded on it
    running: int  # of those, the ones whose domain runs


def host_state(
    name: str,
    order: int,
    host: Host,
    records: Sequence[InstanceRecord],
    flavors: Mapping[str, Flavor],
) -> HostState:
    """The state of ``host`` (named ``name``), whose instances are ``records``."""
    ours = [r for r in records if r.host == name]
    used = sum(flavors[r.flavor].memory_mb for r in ours if r.flavor in flavors)
    try:
        uri = host.uri
        memory_mb, node_free_mb = host.memory_mb()
        running = 0
        for record in ours:
            domain = host.get_domain(record.uuid)
            running += domain is not None and host.domain_state(domain) == "running"
        return HostState(
            name=name,
            uri=uri,
            order=order,
            reachable=True,
            error="",
            host_uuid=host.host_uuid(),
            virt_types=host.supported_virt_types(),
            memory_mb=memory_mb,
            free_ram_mb=memory_mb - used,
            node_free_mb=node_free_mb,
            instances=len(ours),
            running=running,
        )
    except (HostError, libvirt.libvirtError) as exc:
        error = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
        return HostState(
            name=name,
            uri=host.conf.libvirt.connection_uri,
            order=order,
            reachable=False,
            error=error,
            host_uuid="",
            virt_types=frozenset(),
            memory_mb=0,
            free_ram_mb=0,
            node_free_mb=0,
            instances=len(ours),
            running=0,
        )


def host_states(
    conf: Config, records: Sequence[InstanceRecord], hosts: Mapping[str, Host]
) -> list[HostState]:
    """Every configured host's state, in the configuration's order."""
    return [
        host_state(name, order, hosts[name], records, conf.flavors)
        for order, name in enumerate(conf.host_names)
    ]


def image_virt_type(properties: Mapping[str, str]) -> str:
    """The hypervisor type an image asks for ('' when none): Nova's ``img_hv_type``,
    which older images call ``hypervisor_type``."""
    return properties.get("img_hv_type") or properties.get("hypervisor_type") or ""


def rejection(state: HostState, flavor: Flavor, virt_type: str) -> str | None:
    """Why the filters refuse ``state`` for this boot; None when it passes."""
    if not state.reachable:
        return f"unreachable: {state.error}"
    if virt_type and virt_type not in state.virt_types:
        offered = ", ".join(sorted(state.virt_types)) or "none"
        return f"the image asks for virt type {virt_type}; the host offers {offered}"
    if flavor.memory_mb > state.free_ram_mb:
        return (
            f"{flavor.name} needs {flavor.memory_mb} MiB; {state.free_ram_mb} MiB free"
            " (its memory less its instances' flavors)"
        )
    return None


def weighed(states: Iterable[HostState]) -> list[HostState]:
    """Best first: most free RAM (Nova's RAMWeigher), then fewest instances, then the
    configuration's order."""
    return sorted(states, key=lambda s: (-s.free_ram_mb, s.instances, s.order))


def select_destination(states: Sequence[HostState], flavor: Flavor, virt_type: str) -> HostState:
    """Nova's ``select_destinations`` for one instance: filter, weigh, take the best."""
    refused = {s.name: rejection(s, flavor, virt_type) for s in states}
    passed = [s for s in states if refused[s.name] is None]
    if not passed:
        reasons = "; ".join(f"{name}: {why}" for name, why in refused.items())
        raise NoValidHost(
            f"no host can run {flavor.name}: {reasons}",
            hint="start a host (minidriver host list shows them), free memory, or name"
            " one with boot --host",
        )
    return weighed(passed)[0]
