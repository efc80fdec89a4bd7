"""The instance commands: list, show, console, delete, stop, start, reboot, snapshot
(novaclient's ``do_list``, ``do_show``, ``do_console_log``, ``do_delete``, ...).

``instance_dict`` is the JSON document of an instance that ``list``, ``show`` and
``boot`` print, ``show_text`` its text for people (fields, network, image chain).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from minidriver import console, vm_states
from minidriver.cli.output import (
    EXIT_ERROR,
    EXIT_OK,
    Output,
    UsageError,
    format_table,
    human_size,
)
from minidriver.db import InstanceRecord
from minidriver.driver import LibvirtDriver, base_filename
from minidriver.exception import MinidriverError
from minidriver.guest import CUSTOM_ARGV_TAINT
from minidriver.network import NetworkMode


def instance_dict(
    drv: LibvirtDriver, uuid: str, *, state: str | None = None, list_volumes: bool = True
) -> dict[str, Any]:
    """What show and list say of an instance (``drv``: its host's driver); ``state``
    when already known (``unknown``: its host does not answer). ``list_volumes=False``:
    known to have none (a boot from an image), so the volume service is not loaded."""
    record = drv.db.get_instance(uuid)
    return {
        "uuid": record.uuid,
        "name": record.name,
        "display_name": record.display_name,
        "host": record.host,
        # A migrate's source host, until confirmed or reverted (Nova's source_compute).
        "source_host": record.source_host or None,
        "state": (state := state or drv.get_info(uuid).state),
        "vm_state": vm_states.synced(record.vm_state, state),
        "flavor": record.flavor,
        # A resize's flavor before it, until confirmed or reverted; a shelve's image.
        "old_flavor": record.old_flavor or None,
        "shelved_image_id": record.shelved_image_id or None,
        "image": record.image_id,
        "virt_type": drv.host.virt_type.virt_type if state != "unknown" else None,
        "instance_dir": record.instance_dir,
        "created_at": record.created_at,
        "disks": {name: asdict(d) for name, d in drv.get_disks(uuid).items()},
        # Attached volumes, the root first when it boots from one (boot_index 0).
        "volumes": volume_list(drv, uuid) if list_volumes else [],
        "network": {
            "mode": record.network_mode,
            "source": record.network_source or None,
            "mac_address": record.mac_address,
            "forward_port": record.forward_port,
        },
        "key_name": record.key_name,
        # libvirt's mark for QEMU arguments it does not manage: the user network's.
        "tainted": [CUSTOM_ARGV_TAINT] if record.network_mode == NetworkMode.USER else [],
        # A kernel image's kernel and ramdisk (None for a BIOS boot from the disk).
        "kernel": boot_file(record, "kernel", record.kernel_id, drv.conf.base_dir),
        "ramdisk": boot_file(record, "ramdisk", record.ramdisk_id, drv.conf.base_dir),
    }


def boot_file(
    record: InstanceRecord, name: str, image_id: str, base_dir: Path
) -> dict[str, Any] | None:
    """The instance's copy of a kernel or ramdisk image and the cached base it came from."""
    if not image_id:
        return None
    path = Path(record.instance_dir) / name
    return {
        "image": image_id,
        "path": os.fspath(path),
        "size": path.stat().st_size if path.exists() else None,
        "base": os.fspath(base_dir / base_filename(image_id)),
    }


def chain_lines(disks: dict[str, dict[str, Any]], base_dir: Path) -> list[str]:
    lines = []
    for name, d in disks.items():
        line = (
            f"{name:<11} {d['format']:<6} {human_size(d['virtual_size'])} virtual,"
            f" {human_size(d['actual_size'])} actual"
        )
        if d["backing_file"]:
            backing = Path(d["backing_file"])
            shown = (
                f"{base_dir.name}/{backing.name}" if backing.parent == base_dir else str(backing)
            )
            line += f", backing {shown}"
            if d.get("backing_format"):
                line += f" {d['backing_format']} {human_size(d['backing_virtual_size'] or 0)}"
        lines.append(line)
    return lines


def boot_file_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    for name in ("kernel", "ramdisk"):
        f = data.get(name)
        if f:
            size = "missing" if f["size"] is None else human_size(f["size"])
            lines.append(
                f"{name:<11} {size}, a copy of _base/{Path(f['base']).name} (image {f['image']})"
            )
    return lines


def volume_list(drv: LibvirtDriver, uuid: str) -> list[dict[str, Any]]:
    out = []
    for a in sorted(drv.volumes.attachments_of(uuid), key=lambda a: (a.boot_index != 0, a.device)):
        volume = drv.volumes.get(a.volume_id)
        out.append(
            {
                "id": volume.id,
                "name": volume.name,
                "device": a.device,
                "root": a.boot_index == 0,
                "size_gb": volume.size_gb,
                "backend": volume.backend,
                "location": volume.location,
            }
        )
    return out


def volume_lines(volumes: list[dict[str, Any]]) -> list[str]:
    return [
        f"{v['device']:<11} volume {v['name'] or v['id']} {v['size_gb']} GB"
        f" ({v['backend']}: {v['location']}){', the root' if v['root'] else ''}"
        for v in volumes
    ]


def show_text(data: dict[str, Any], base_dir: Path) -> str:
    rows = [
        (key, data[key])
        for key in (
            "uuid",
            "name",
            "display_name",
            "host",
            "state",
            "vm_state",
            "flavor",
            "image",
            "virt_type",
            "instance_dir",
            "created_at",
        )
    ]
    rows += network_rows(data)
    text = format_table(("field", "value"), rows)
    lines = (
        boot_file_lines(data)
        + chain_lines(data["disks"], base_dir)
        + volume_lines(data.get("volumes", []))
    )
    return text + "\n\n" + "\n".join(lines)


def network_rows(data: dict[str, Any]) -> list[tuple[str, object]]:
    net = data["network"]
    mode = net["mode"]
    if mode == NetworkMode.NONE:
        return [("network", "none")]
    rows: list[tuple[str, object]] = [
        ("network", f"{mode}:{net['source']}" if net["source"] else mode),
        ("mac_address", net["mac_address"]),
    ]
    if net["forward_port"] is not None:
        rows.append(("ssh", f"127.0.0.1:{net['forward_port']} -> guest port 22"))
    if data["key_name"]:
        rows.append(("key_name", data["key_name"]))
    for taint in data["tainted"]:
        rows.append(("tainted", f"{taint} (libvirt's mark: QEMU arguments it does not manage)"))
    return rows


def cmd_list(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    if drv.conf.hosts:
        from minidriver.cli.hosts import instances_everywhere  # noqa: PLC0415 - several hosts

        found = instances_everywhere(drv)
    else:
        found = [(drv, r) for r in drv.list_instances()]
    rows = [
        (r.uuid, r.name, r.display_name, r.host, r.state, r.vm_state, r.flavor) for _, r in found
    ]
    out.result(
        [instance_dict(d, r.uuid, state=r.state) for d, r in found],
        lambda: format_table(
            ("uuid", "name", "display_name", "host", "state", "vm_state", "flavor"), rows
        ),
    )
    return EXIT_OK


def cmd_show(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    record = drv.db.find_instance(args.instance)
    data = instance_dict(drv, record.uuid)
    out.result(data, lambda: show_text(data, drv.conf.base_dir))
    return EXIT_OK


def cmd_console(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    if args.attach:
        from minidriver.cli.attach import cmd_attach  # noqa: PLC0415 - termios etc. only here

        return cmd_attach(drv, args, out)
    for given, option in ((args.force, "--force"), (args.timeout, "--timeout")):
        if given:
            raise UsageError(f"{option} goes with --attach")
    if args.settle is not None:
        raise UsageError("--settle goes with --attach")
    record = drv.db.find_instance(args.instance)
    log = Path(record.instance_dir) / "console.log"
    text = console.read_console(log)
    out.result({"uuid": record.uuid, "console": text}, text.rstrip("\n"))
    if args.follow and not out.json:
        follow(log, len(text.encode()))
    return EXIT_OK


def follow(log: Path, offset: int) -> None:
    try:
        while True:
            with open(log, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
                offset += len(chunk)
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass


def cmd_delete(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    if args.all == bool(args.instances):
        raise UsageError("give INSTANCE... or --all, not both or neither")
    refs = [r.uuid for r in drv.db.list_instances()] if args.all else args.instances
    deleted, failed = [], []
    for ref in refs:
        try:
            record = drv.db.find_instance(ref)
            on_host = drv
            if drv.conf.hosts:
                from minidriver.cli.hosts import driver_on  # noqa: PLC0415 - several hosts

                on_host = driver_on(drv, record.host)
            on_host.destroy(record.uuid, delete_volume=args.delete_volume)
            deleted.append(record.uuid)
            out.say(f"deleted {record.display_name} ({record.uuid})")
        except MinidriverError as exc:
            failed.append({"instance": ref, "error": str(exc), "hint": exc.hint})
            print(f"minidriver: error: {ref}: {exc}", file=sys.stderr)
            if exc.hint:
                print(f"hint: {exc.hint}", file=sys.stderr)
    result: dict[str, Any] = {"deleted": deleted, "failed": failed}
    if failed:
        # Still one document: the partial result, with the error keys every error has.
        result["error"] = f"{len(failed)} of {len(refs)} instances could not be deleted"
        result["hint"] = failed[0]["hint"]
    out.result(result, "")
    return EXIT_ERROR if failed else EXIT_OK


def cmd_stop(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    record = drv.db.find_instance(args.instance)
    out.say(f"stopping {record.display_name} ({record.name})")
    clean = drv.power_off(record.uuid, timeout=args.timeout, force=args.force)
    how = "shut down cleanly" if clean else "stopped hard"
    out.result({"uuid": record.uuid, "state": "shutoff", "clean": clean}, f"{how}")
    return EXIT_OK


def cmd_start(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    record = drv.db.find_instance(args.instance)
    drv.power_on(record.uuid)
    state = drv.get_info(record.uuid).state
    out.result({"uuid": record.uuid, "state": state}, f"{record.display_name}: {state}")
    return EXIT_OK


def cmd_reboot(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    record = drv.db.find_instance(args.instance)
    done = drv.reboot(record.uuid, hard=args.hard)
    state = drv.get_info(record.uuid).state
    kind = "hard" if args.hard else "soft"
    fallback = " (the soft one timed out: rebooted hard)" if done != kind else ""
    out.result(
        {"uuid": record.uuid, "state": state, "reboot": kind, "done": done},
        f"{record.display_name}: {kind} reboot requested, {state}{fallback}",
    )
    return EXIT_OK


def cmd_snapshot(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    record = drv.db.find_instance(args.instance)
    state = drv.get_info(record.uuid).state
    kind = "live" if state == "running" else "cold"
    out.say(f"{kind} snapshot of {record.display_name} ({state})")
    started = time.monotonic()
    image = drv.images.get(drv.snapshot(record.uuid, args.name).id)
    out.result(
        image.to_dict(),
        f"image {image.name} {image.id} ({human_size(image.size)},"
        f" {time.monotonic() - started:.2f} s)",
    )
    return EXIT_OK
