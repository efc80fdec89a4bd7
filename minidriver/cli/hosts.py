"""Several hosts on the command line: ``host list``, where a boot goes (``boot --host``,
else Nova's scheduler: minidriver.scheduler), and each instance's command on the
connection of the host it runs on."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import libvirt

from minidriver.cli.output import EXIT_OK, Output, format_table
from minidriver.db import InstanceRecord
from minidriver.driver import LibvirtDriver
from minidriver.exception import HostError, InstanceNotFound


def driver_on(drv: LibvirtDriver, name: str) -> LibvirtDriver:
    """The driver of host ``name`` (Nova's: one per compute host), on the same state."""
    if name == drv.conf.default.host:
        return drv
    return LibvirtDriver(drv.conf.for_host(name))


def driver_for_instance(drv: LibvirtDriver, args: argparse.Namespace) -> LibvirtDriver:
    """For a command naming one INSTANCE: the driver of the host it runs on. An
    unknown INSTANCE is left for the command to report."""
    ref = getattr(args, "instance", None)
    if not isinstance(ref, str):
        return drv
    try:
        record = drv.db.find_instance(ref)
    except InstanceNotFound:
        return drv
    return driver_on(drv, record.host) if record.host else drv


def instances_everywhere(drv: LibvirtDriver) -> list[tuple[LibvirtDriver, InstanceRecord]]:
    """Every instance of the state dir with the driver of its host, host by host in the
    configuration's order; an unreachable host's instances with their recorded state
    made ``unknown`` (nothing can say more)."""
    found: list[tuple[LibvirtDriver, InstanceRecord]] = []
    for name in drv.conf.host_names:
        host_drv = driver_on(drv, name)
        try:
            records = host_drv.list_instances()
        except (HostError, libvirt.libvirtError):
            records = [
                dataclasses.replace(r, state="unknown")
                for r in drv.db.list_instances()
                if r.host == name
            ]
        found.extend((host_drv, r) for r in records)
    return found


def cmd_host_list(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    from minidriver import migration, scheduler  # noqa: PLC0415 - host list only

    drivers = {name: driver_on(drv, name) for name in drv.conf.host_names}
    for name, host_drv in drivers.items():
        if migration.host_answers(host_drv):
            for domain in migration.destroy_evacuated_instances(host_drv):
                out.say(f"host {name}: removed {domain}, evacuated from it while it was down")
    records = drv.db.list_instances()
    hosts = {name: d.host for name, d in drivers.items()}
    states = scheduler.host_states(drv.conf, records, hosts)
    data: list[dict[str, Any]] = []
    for state in states:
        item = dataclasses.asdict(state)
        item["virt_types"] = sorted(state.virt_types)
        del item["order"]
        data.append(item)
    rows = [
        (
            s.name,
            s.uri,
            s.host_uuid or "-",
            f"{s.free_ram_mb} MiB" if s.reachable else "-",
            f"{s.running}/{s.instances}",
            "" if s.reachable else f"unreachable: {s.error}",
        )
        for s in states
    ]
    header = ("host", "uri", "host_uuid", "free_ram", "running/instances", "")
    out.result(data, lambda: format_table(header, rows))
    return EXIT_OK


def cmd_live_migrate(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    """Nova's live migration of a running instance: ``--host``, else the scheduler's
    choice among the other hosts."""
    from minidriver import migration  # noqa: PLC0415 - live-migrate only

    record = drv.db.find_instance(args.instance)
    src = driver_on(drv, record.host)
    name = destination(drv, record, args.host)
    dest = driver_on(drv, name)
    out.say(f"live-migrating {record.display_name} from host {record.host} to host {name}")
    shown = [float("-inf")]

    def progress(p: migration.Progress) -> None:
        if p.elapsed - shown[0] >= 2:  # a line every 2 s is enough to see it move
            shown[0] = p.elapsed
            out.say(p.line())

    started = time.monotonic()
    moved = migration.live_migrate(src, dest, record.uuid, progress=progress)
    seconds = time.monotonic() - started
    data = {
        "uuid": moved.uuid,
        "source": record.host,
        "host": moved.host,
        "forward_port": moved.forward_port,
        "seconds": round(seconds, 3),
    }
    port = f", SSH now forwarded from 127.0.0.1:{moved.forward_port}" if moved.forward_port else ""
    out.result(data, f"{moved.display_name} runs on host {moved.host} ({seconds:.1f} s){port}")
    return EXIT_OK


def destination(drv: LibvirtDriver, record: InstanceRecord, name: str | None) -> str:
    """Where a move of ``record`` goes: host ``name``, else the scheduler's choice among
    the hosts it does not run on."""
    from minidriver import scheduler  # noqa: PLC0415 - moves only

    if name is not None:
        return name
    others = [n for n in drv.conf.host_names if n != record.host]
    if not others:
        raise scheduler.NoValidHost(
            f"no other host to move {record.display_name} to",
            hint="add one to the configuration: [host:NAME] connection_uri = URI"
            " (scripts/dev-host starts one on this machine)",
        )
    records = drv.db.list_instances()
    flavor = drv.get_flavor(record.flavor)
    states = [
        scheduler.host_state(n, order, driver_on(drv, n).host, records, drv.conf.flavors)
        for order, n in enumerate(drv.conf.host_names)
        if n != record.host
    ]
    return scheduler.select_destination(states, flavor, "").name


def cmd_migrate(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    """Nova's cold migration: powered off here, defined and started there, vm_state
    ``resized`` until ``resize-confirm`` or ``resize-revert``."""
    from minidriver import cold_migration  # noqa: PLC0415 - migrate only

    record = drv.db.find_instance(args.instance)
    name = destination(drv, record, args.host)
    out.say(f"migrating {record.display_name} from host {record.host} to host {name}")
    started = time.monotonic()
    moved = cold_migration.migrate(
        driver_on(drv, record.host), driver_on(drv, name), record.uuid, timeout=args.timeout
    )
    seconds = time.monotonic() - started
    data = {**_migration_data(moved), "seconds": round(seconds, 3)}
    out.result(
        data,
        f"{moved.display_name} runs on host {moved.host} ({seconds:.1f} s); keep it there with"
        f" `minidriver resize-confirm {moved.display_name}`, send it back with"
        f" `minidriver resize-revert {moved.display_name}`",
    )
    return EXIT_OK


def finish_migration(
    drv: LibvirtDriver, record: InstanceRecord, out: Output, *, revert: bool
) -> int:
    """``resize-confirm`` and ``resize-revert`` of an instance a ``migrate`` moved."""
    from minidriver import cold_migration  # noqa: PLC0415 - migrations only

    dest, src = driver_on(drv, record.host), driver_on(drv, record.source_host)
    if revert:
        cold_migration.revert_migration(dest, src, record.uuid)
    else:
        cold_migration.confirm_migration(dest, src, record.uuid)
    after = drv.db.get_instance(record.uuid)
    done = f"back on host {after.host}" if revert else f"kept on host {after.host}"
    out.result(
        _migration_data(after),
        f"{after.display_name}: migration {'reverted' if revert else 'confirmed'}, {done}",
    )
    return EXIT_OK


def _migration_data(record: InstanceRecord) -> dict[str, Any]:
    return {
        "uuid": record.uuid,
        "name": record.display_name,
        "host": record.host,
        "source": record.source_host or None,
        "state": record.state,
        "vm_state": record.vm_state,
        "flavor": record.flavor,
        "forward_port": record.forward_port,
    }


def cmd_evacuate(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    """Nova's evacuate: the instance of a host that is down, rebuilt on ``--host``."""
    from minidriver import migration  # noqa: PLC0415 - evacuate only

    record = drv.db.find_instance(args.instance)
    src, dest = driver_on(drv, record.host), driver_on(drv, args.host)
    timeout = args.timeout or drv.conf.default.instance_build_timeout
    moved = migration.evacuate(src, dest, record.uuid, timeout=timeout)
    data = {
        "uuid": moved.uuid,
        "source": record.host,
        "host": moved.host,
        "forward_port": moved.forward_port,
    }
    out.result(data, f"{moved.display_name} rebuilt on host {moved.host} from its disks")
    return EXIT_OK


def place(
    drv: LibvirtDriver, args: argparse.Namespace, out: Output, properties: Mapping[str, str]
) -> LibvirtDriver:
    """The driver of the host a new instance goes to: ``--host``, else the scheduler's
    choice; with files for disks, only a host that sees this host's instances_path.
    ``properties``: the boot's image's (its img_hv_type)."""
    from minidriver import scheduler, shared_storage  # noqa: PLC0415 - boots only

    conf = drv.conf
    name = getattr(args, "host", None)
    if name is None and len(conf.host_names) == 1:
        return drv  # one host: nothing to choose, and no connection opened early
    flavor = drv.get_flavor(args.flavor)
    virt_type = scheduler.image_virt_type(properties)
    records = drv.db.list_instances()
    if name is None:
        hosts = {n: driver_on(drv, n).host for n in conf.host_names}
        states = scheduler.host_states(conf, records, hosts)
        name = scheduler.select_destination(states, flavor, virt_type).name
        out.say(f"scheduled on host {name}")
    else:
        # A named host still passes the filters (as Nova's requested host does).
        order = conf.host_names.index(name) if name in conf.host_names else -1
        named = driver_on(drv, name)
        refused = scheduler.rejection(
            scheduler.host_state(name, order, named.host, records, conf.flavors),
            flavor,
            virt_type,
        )
        if refused is not None:
            raise scheduler.NoValidHost(
                f"host {name} cannot run {flavor.name}: {refused}",
                hint="minidriver host list shows the hosts",
            )
    target = driver_on(drv, name)
    if target is not drv and not drv.uses_rbd:
        shared_storage.check_shared_instances_path(
            conf.default.host, conf.instances_path, name, target.host
        )
    return target
