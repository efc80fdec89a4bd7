"""Moves between hosts: live migration (nova/virt/libvirt/driver.py ``live_migration``,
``_live_migration_operation`` and ``_live_migration_monitor``; nova/virt/libvirt/
migration.py) and evacuation (nova/compute/manager.py ``rebuild_instance`` with
``recreate``, ``_destroy_evacuated_instances``), at the end.

Nova's steps, with one driver per host as in Nova (the source's and the
destination's, on one state dir):

1. ``check_can_live_migrate_destination``: the destination answers, has the memory,
   and sees the instance's files: with file disks, the shared-storage check
   (minidriver.shared_storage); with every disk in Ceph, none is needed;
2. ``pre_live_migration`` on the destination: here the one thing a host must give the
   guest, a forwarded port for a user-mode NIC. Both QEMUs run at once while memory
   moves, and both listen on 127.0.0.1, so the destination's XML forwards a newly
   reserved port; the old one is freed after the move (``show`` gives the new one);
3. ``virDomainMigrateToURI3`` peer-to-peer with Nova's flags (LIVE, PEER2PEER,
   PERSIST_DEST, UNDEFINE_SOURCE), the memory stream on 127.0.0.1 (the migration URI
   and the destination's listen address, set for each migration: libvirt refuses
   127.0.0.1 in qemu.conf). With file disks libvirt cannot tell that both hosts see
   one file system and refuses ("Migration without shared storage is unsafe"); after
   our own check passed, VIR_MIGRATE_UNSAFE says so (ours; Nova's hosts share NFS or
   Ceph, which libvirt recognises);
4. the monitor, while it runs: progress from the job's statistics, and Nova's
   ``live_migration_completion_timeout`` (seconds per GiB of RAM, at least 2 GiB; 0
   disables it), after which the job is aborted (Nova's default
   ``live_migration_timeout_action``) and the guest keeps running on the source;
5. ``post_live_migration``: the record names the destination, the old port is freed.

A migration that fails or is aborted leaves the guest running on the source, the
record unchanged, no domain of it on the destination, and the new port freed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from minidriver import guest, scheduler, shared_storage
from minidriver.db import InstanceRecord
from minidriver.driver import LibvirtDriver
from minidriver.exception import MinidriverError
from minidriver.host import SYSTEM_URI
from minidriver.lockutils import external_lock, instance_lock_name
from minidriver.network import NetworkMode
from minidriver.power import power_task

LOG = logging.getLogger(__name__)

# Nova's _prepare_migration_flags for a live migration (no block migration here).
LIVE_MIGRATION_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_PERSIST_DEST
)
# Where the memory stream goes: this machine only (scripts/dev-host).
MIGRATION_ADDRESS = "127.0.0.1"
# The system daemon as another daemon opens it: qemu:///system inside a daemon is
# that daemon itself ("Attempt to migrate guest to the same host"); +unix goes through
# the socket, which in a dev host's namespace is the system daemon's.
SYSTEM_PEER_URI = "qemu+unix:///system?socket=/run/libvirt/libvirt-sock"
GiB = 1024**3


class LiveMigrationError(MinidriverError):
    """A live migration that did not happen; the guest runs on the source."""


@dataclass(frozen=True)
class Progress:
    """One look at a running migration (the job's statistics on the source)."""

    elapsed: float
    memory_total: int  # bytes; 0 before QEMU reports it
    memory_remaining: int
    memory_processed: int

    def line(self) -> str:
        if not self.memory_total:
            return f"  {self.elapsed:6.1f} s  starting"
        done = 100 * (self.memory_total - self.memory_remaining) / self.memory_total
        return (
            f"  {self.elapsed:6.1f} s  memory {done:5.1f}% ({self.memory_processed // 2**20} MiB"
            f" sent, {self.memory_remaining // 2**20} MiB left)"
        )


def peer_uri(uri: str) -> str:
    """The URI the source's daemon opens to reach a destination at ``uri``."""
    return SYSTEM_PEER_URI if uri == SYSTEM_URI else uri


def completion_timeout(per_gib: int, memory_mb: int) -> float:
    """Nova's completion timeout: ``per_gib`` seconds per GiB of RAM, at least 2 GiB
    (``_live_migration_data_gb``); 0: none."""
    return per_gib * max(2.0, memory_mb / 1024) if per_gib else 0.0


def check_can_live_migrate_destination(
    src: LibvirtDriver,
    dest: LibvirtDriver,
    record: InstanceRecord,
    *,
    command: str = "live-migrate",
    error: type[MinidriverError] = LiveMigrationError,
) -> None:
    """Nova's destination check: the host answers, has the memory (its filters), and,
    with file disks, sees the instance's files. ``command`` and ``error``: those of
    the move asking (a cold migration asks too)."""
    name = dest.conf.default.host
    if name == record.host:
        raise error(
            f"{record.display_name} already runs on host {name}",
            hint=f"name another host: {command} INSTANCE --host NAME",
        )
    flavor = src.get_flavor(record.flavor)
    state = scheduler.host_state(name, 0, dest.host, src.db.list_instances(), src.conf.flavors)
    refused = scheduler.rejection(state, flavor, "")
    if refused is not None:
        raise error(f"host {name} cannot take {record.display_name}: {refused}")
    if not src.uses_rbd:
        shared_storage.check_shared_instances_path(
            record.host, src.conf.instances_path, name, dest.host
        )


def live_migrate(
    src: LibvirtDriver,
    dest: LibvirtDriver,
    instance_uuid: str,
    *,
    progress: Callable[[Progress], None] = lambda _p: None,
    interval: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
) -> InstanceRecord:
    """Move the running instance from ``src``'s host to ``dest``'s; its new record."""
    with (
        external_lock(src.conf.locks_dir, instance_lock_name(instance_uuid)),
        power_task(instance_uuid),
    ):
        record = src.db.get_instance(instance_uuid)
        domain = src.host.owned_domain(instance_uuid, src.db.state_id)
        if domain is None or src.host.domain_state(domain) != "running":
            raise LiveMigrationError(
                f"{record.display_name} is not running on host {record.host}",
                hint="live migration moves a running guest; start it first",
            )
        check_can_live_migrate_destination(src, dest, record)
        with contextlib.ExitStack() as undo:
            xml, persistent, new_port = _pre_live_migration(src, record, domain, undo)
            undo.callback(_no_domain_left, dest, record)
            timeout = completion_timeout(
                src.conf.libvirt.live_migration_completion_timeout,
                src.get_flavor(record.flavor).memory_mb,
            )
            _live_migration_operation(
                domain,
                dest,
                xml=xml,
                persistent=persistent,
                shared_block=src.uses_rbd,
                bandwidth=src.conf.libvirt.live_migration_bandwidth,
                timeout=timeout,
                progress=progress,
                interval=interval,
                clock=clock,
            )
            undo.pop_all()
        old_port = record.forward_port
        dest_name = dest.conf.default.host
        src.db.update_instance(instance_uuid, host=dest_name, forward_port=new_port)
        (Path(record.instance_dir) / "libvirt.xml").write_text(persistent)
        if old_port is not None and old_port != new_port:
            src.ports.release(old_port, instance_uuid)
        return src.db.get_instance(instance_uuid)


def _pre_live_migration(
    src: LibvirtDriver,
    record: InstanceRecord,
    domain: libvirt.virDomain,
    undo: contextlib.ExitStack,
) -> tuple[str, str, int | None]:
    """The destination's XML (live, persistent) and the port a user-mode NIC forwards
    there, newly reserved (freed by ``undo``)."""
    xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE)
    persistent = domain.XMLDesc(
        libvirt.VIR_DOMAIN_XML_MIGRATABLE
        | libvirt.VIR_DOMAIN_XML_SECURE
        | libvirt.VIR_DOMAIN_XML_INACTIVE
    )
    port = reserve_new_port(src, record, undo)
    if port == record.forward_port or port is None:
        return xml, persistent, record.forward_port
    return guest.with_forward_port(xml, port), guest.with_forward_port(persistent, port), port


def reserve_new_port(
    drv: LibvirtDriver, record: InstanceRecord, undo: contextlib.ExitStack
) -> int | None:
    """For a user-mode NIC, a newly reserved port for the host the instance moves to
    (freed by ``undo``); otherwise its port as it is (None for none)."""
    if record.network_mode != NetworkMode.USER or record.forward_port is None:
        return record.forward_port
    port = drv.ports.reserve(
        state_path=drv.conf.state_path, state_id=drv.db.state_id, instance_uuid=record.uuid
    )
    undo.callback(drv.ports.release, port, record.uuid)
    return port


def _live_migration_operation(
    domain: libvirt.virDomain,
    dest: LibvirtDriver,
    *,
    xml: str,
    persistent: str,
    shared_block: bool,
    bandwidth: int,
    timeout: float,
    progress: Callable[[Progress], None],
    interval: float,
    clock: Callable[[], float],
) -> None:
    """migrateToURI3 in a thread of its own (it returns when the move ends), watched
    from here: progress, and the abort at the completion timeout."""
    params: dict[str, str | int] = {
        libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{MIGRATION_ADDRESS}",
        libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: MIGRATION_ADDRESS,
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml,
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: persistent,
    }
    if bandwidth:  # MiB/s (Nova's live_migration_bandwidth)
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth
    flags = LIVE_MIGRATION_FLAGS | (0 if shared_block else libvirt.VIR_MIGRATE_UNSAFE)
    target = peer_uri(dest.host.uri)
    failure: list[libvirt.libvirtError] = []

    def operation() -> None:
        try:
            domain.migrateToURI3(target, params, flags)
        except libvirt.libvirtError as exc:
            failure.append(exc)

    worker = threading.Thread(target=operation, name="live-migration", daemon=True)
    started = clock()
    worker.start()
    aborted = False
    while worker.is_alive():
        elapsed = clock() - started
        progress(_progress(domain, elapsed))
        if timeout and not aborted and elapsed > timeout:
            LOG.warning("live migration not completed after %.0f s: aborting", elapsed)
            with contextlib.suppress(libvirt.libvirtError):  # it may have just ended
                domain.abortJob()
            aborted = True
        worker.join(interval)
    if aborted and failure:
        raise LiveMigrationError(
            f"live migration aborted after {timeout:.0f} s"
            " (live_migration_completion_timeout per GiB of RAM): the guest runs on the source",
            hint="raise [libvirt] live_migration_completion_timeout (0: no limit), or migrate"
            " when the guest writes less memory",
        )
    if failure:
        raise LiveMigrationError(
            f"live migration failed: {failure[0].get_error_message()}",
            hint="the guest runs on the source",
        )


def _progress(domain: libvirt.virDomain, elapsed: float) -> Progress:
    stats: dict[str, Any] = {}
    with contextlib.suppress(libvirt.libvirtError):  # no job yet, or just ended
        stats = domain.jobStats()
    return Progress(
        elapsed=elapsed,
        memory_total=int(stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_TOTAL, 0)),
        memory_remaining=int(stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_REMAINING, 0)),
        memory_processed=int(stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_PROCESSED, 0)),
    )


def _no_domain_left(dest: LibvirtDriver, record: InstanceRecord) -> None:
    """After a failed move: no domain of the instance on the destination (libvirt
    cleans up its own, this makes sure), never touching a running one."""
    with contextlib.suppress(MinidriverError, libvirt.libvirtError):
        domain = dest.host.get_domain(record.uuid)
        if domain is not None and not domain.isActive():
            domain.undefineFlags(0)
        elif domain is not None:
            LOG.error(
                "%s: a running domain is left on host %s", record.uuid, dest.conf.default.host
            )


# -- evacuation ------------------------------------------------------------------------


class EvacuateError(MinidriverError):
    """An evacuation refused or failed; the record still names the down host."""


def host_answers(drv: LibvirtDriver) -> bool:
    """Whether the host of ``drv`` answers (its libvirt opens and replies)."""
    try:
        drv.host.get_connection().getLibVersion()
    except (MinidriverError, libvirt.libvirtError):
        return False
    return True


def evacuate(
    src: LibvirtDriver, dest: LibvirtDriver, instance_uuid: str, *, timeout: float
) -> InstanceRecord:
    """Nova's evacuate: the instance of a host that is down rebuilt on ``dest`` from
    the same shared disks (Nova's ``rebuild_instance`` with ``recreate``: the domain
    defined again from its XML, libvirt.xml, and started; nothing copied). Refused
    while the source answers: two hosts would run one guest on one set of disks."""
    with (
        external_lock(src.conf.locks_dir, instance_lock_name(instance_uuid)),
        power_task(instance_uuid),
    ):
        record = src.db.get_instance(instance_uuid)
        if host_answers(src):
            raise EvacuateError(
                f"host {record.host} answers: evacuate is for an instance whose host is down",
                hint="live-migrate it instead (it keeps running), or stop that host first",
            )
        check_can_live_migrate_destination(src, dest, record)
        xml = (Path(record.instance_dir) / "libvirt.xml").read_text()
        port = record.forward_port
        with contextlib.ExitStack() as undo:
            if record.network_mode == NetworkMode.USER and port is not None:
                # The down host's QEMU is gone with it: its port is likely free again.
                port = src.ports.reserve(
                    state_path=src.conf.state_path,
                    state_id=src.db.state_id,
                    instance_uuid=record.uuid,
                    prefer=record.forward_port,
                )
                if port != record.forward_port:
                    undo.callback(src.ports.release, port, record.uuid)
                xml = guest.with_forward_port(xml, port)
            domain = dest.host.define(xml)
            undo.callback(dest.host.undefine, domain)
            dest.host.launch(domain)
            state = dest.host.wait_for_state(
                domain, "running", timeout, interval=dest.conf.libvirt.wait_interval
            )
            if state != "running":
                raise EvacuateError(
                    f"{record.display_name} did not start on host {dest.conf.default.host}"
                    f" within {timeout:g} s (it is {state})"
                )
            src.db.update_instance(instance_uuid, host=dest.conf.default.host, forward_port=port)
            undo.pop_all()
        (Path(record.instance_dir) / "libvirt.xml").write_text(xml)
        return src.db.get_instance(instance_uuid)


def destroy_evacuated_instances(drv: LibvirtDriver) -> list[str]:
    """Nova's ``_destroy_evacuated_instances``, when a host comes back: the
    definitions of this state dir's instances that now run elsewhere (evacuated while
    the host was down), removed from it; their disks, which the instance still uses
    elsewhere, kept. A running one is left alone: it may be a live migration's
    destination at work. Returns the domain names removed."""
    here = drv.conf.default.host
    removed = []
    for instance_uuid, domain in drv.host.owned_domains(drv.db.state_id).items():
        try:
            record = drv.db.get_instance(instance_uuid)
        except MinidriverError:
            continue  # no record: cleanup's business
        if record.runs_on(here) or domain.isActive():
            continue
        name = domain.name()
        LOG.warning("%s was evacuated from host %s: removing its definition", record.uuid, here)
        drv.host.undefine(domain)
        removed.append(name)
    return removed
