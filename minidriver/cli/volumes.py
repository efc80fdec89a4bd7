"""Volumes: volume create | list | show | delete | attach | detach (cinderclient's
``do_create``, ``do_list``...; attach and detach are novaclient's ``volume-attach``
and ``volume-detach``)."""

from __future__ import annotations

import argparse
from typing import Any

from minidriver.cli.output import EXIT_OK, Output, format_table
from minidriver.driver import LibvirtDriver
from minidriver.exception import InstanceNotFound
from minidriver.volume.api import VolumeRecord


def _attached(drv: LibvirtDriver, volume: VolumeRecord) -> str:
    a = volume.attachment
    if a is None:
        return ""
    try:
        name = drv.db.get_instance(a.instance_uuid).display_name
    except InstanceNotFound:
        name = a.instance_uuid
    return f"{name} ({a.device}{', root' if a.boot_index == 0 else ''})"


def _show(drv: LibvirtDriver, volume: VolumeRecord) -> str:
    data = volume.to_dict()
    rows: list[tuple[str, Any]] = [(k, v) for k, v in data.items() if k != "attachment"]
    rows.append(("attached_to", _attached(drv, volume)))
    return format_table(("field", "value"), rows)


def cmd_volume(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    sub = args.volume_command
    api = drv.volumes
    if sub == "create":
        volume = api.create(args.size, name=args.name, image=args.image, backend=args.backend)
        out.result(
            volume.to_dict(),
            f"created volume {volume.name or '-'} {volume.id} ({volume.size_gb} GB,"
            f" {volume.backend}: {volume.location})",
        )
    elif sub == "list":
        volumes = api.get_all()
        out.result(
            [v.to_dict() for v in volumes],
            lambda: format_table(
                ("id", "name", "size_gb", "status", "backend", "attached_to"),
                [
                    (v.id, v.name, v.size_gb, v.status, v.backend, _attached(drv, v))
                    for v in volumes
                ],
            ),
        )
    elif sub == "show":
        volume = api.get(args.volume)
        out.result(volume.to_dict(), lambda: _show(drv, volume))
    elif sub == "delete":
        volume = api.delete(args.volume)
        out.result({"deleted": volume.id}, f"deleted volume {volume.name or '-'} {volume.id}")
    elif sub == "attach":
        attachment = drv.attach_volume(args.instance, args.volume, device=args.device)
        volume = api.get(attachment.volume_id)
        out.result(
            volume.to_dict(),
            f"attached volume {volume.name or volume.id} to {args.instance} as {attachment.device}",
        )
    elif sub == "detach":
        volume = drv.detach_volume(args.instance, args.volume)
        out.result(volume.to_dict(), f"detached volume {volume.name or volume.id}")
    return EXIT_OK
