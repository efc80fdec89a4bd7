"""``template create | list | show | delete``, ``boot --template`` and ``explain
--template``: templates and their clones (minidriver.vmtemplate) on the command line."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import threading
import time
from pathlib import Path
from typing import Any

from minidriver import console, savefile, vmtemplate_rbd
from minidriver.cli.guestaccess import wait_ssh
from minidriver.cli.instances import instance_dict, show_text
from minidriver.cli.output import (
    DeadlineExceeded,
    Output,
    UsageError,
    format_table,
    human_size,
)
from minidriver.driver import InstanceBuildTimeout, LibvirtDriver
from minidriver.imagebackend import parse_rbd_path
from minidriver.images import qemu_img
from minidriver.network import NetworkMode
from minidriver.steps import Step
from minidriver.vmtemplate import (
    MEMORY_FILE,
    RESTORE_FILE,
    TemplateRecord,
    Templates,
)

# boot's options that choose what a boot makes; a clone is what its template was.
NOT_WITH_TEMPLATE = (
    "image",
    "flavor",
    "config_drive",
    "user_data",
    "key_file",
    "key_name",
    "hostname",
    "network",
    "print_xml",
    "dry_run",
    "no_wait",
)


def template_dict(templates: Templates, tpl: TemplateRecord) -> dict[str, Any]:
    files = {}
    for name in sorted(os.listdir(tpl.path)) if tpl.path.is_dir() else []:
        path = tpl.path / name
        files[name] = {"path": os.fspath(path), "size": path.stat().st_size}
    return {
        **tpl.to_dict(),
        "clones": [c.uuid for c in templates.clones_of(tpl.id)],
        "files": files,
        # images_type = rbd: where each frozen disk is, as rbd:pool/name (its @snap).
        "rbd_disks": vmtemplate_rbd.frozen_disks(tpl.path),
    }


def template_text(data: dict[str, Any]) -> str:
    keys = ("id", "name", "status", "created_at", "template_dir", "flavor", "image_id")
    rows: list[tuple[str, object]] = [(k, data[k]) for k in keys]
    rows.append(("network", data["network_mode"]))
    if data["key_name"]:
        rows.append(("key_name", data["key_name"]))
    rows.append(("clones", ", ".join(data["clones"]) or "none"))
    files = [f"{name:<13} {human_size(f['size'])}" for name, f in data["files"].items()]
    files += [f"{name:<13} {path}@snap" for name, path in data["rbd_disks"].items()]
    return format_table(("field", "value"), rows) + "\n\n" + "\n".join(files)


def cmd_template(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    templates = Templates(drv)
    sub = args.template_command
    if sub == "create":
        record = drv.db.find_instance(args.instance)
        out.say(f"saving {record.display_name} ({record.name}) as template {args.name}")
        started = time.monotonic()
        tpl = templates.create(record.uuid, args.name)
        data = template_dict(templates, tpl)
        data["seconds"] = round(time.monotonic() - started, 3)
        out.result(
            data,
            f"template {tpl.name} {tpl.id}: memory {human_size(tpl.memory_bytes or 0)},"
            f" {len(tpl.disks)} frozen files, {data['seconds']:.2f} s;"
            f" instance {record.display_name} consumed",
        )
    elif sub == "list":
        found = templates.list()
        out.result(
            [template_dict(templates, t) for t in found],
            lambda: format_table(
                ("id", "name", "status", "flavor", "memory", "clones"),
                [
                    (
                        t.id,
                        t.name,
                        t.status,
                        t.flavor,
                        human_size(t.memory_bytes or 0),
                        len(templates.clones_of(t.id)),
                    )
                    for t in found
                ],
            ),
        )
    elif sub == "show":
        data = template_dict(templates, templates.find(args.template))
        out.result(data, lambda: template_text(data))
    elif sub == "delete":
        tpl = templates.find(args.template)
        templates.delete(tpl.id)
        out.result({"deleted": tpl.id}, f"deleted template {tpl.name} {tpl.id}")
    return 0


def check_boot_options(args: argparse.Namespace) -> None:
    given = [
        "--" + name.replace("_", "-") for name in NOT_WITH_TEMPLATE if getattr(args, name, None)
    ]
    if args.meta:
        given.append("--meta")
    if given:
        raise UsageError(
            f"{', '.join(given)} cannot go with --template: a clone is what its template was",
            hint="boot a new instance from an image instead, or drop those options",
        )


def cmd_boot_template(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    """``boot --template``: a clone, then the optional waits on its console and SSH."""
    check_boot_options(args)
    templates = Templates(drv)
    tpl = templates.find(args.template)
    if args.wait_ssh and tpl.network_mode != NetworkMode.USER:
        raise UsageError(
            f"--wait-ssh needs the user network; template {tpl.name} has {tpl.network_mode}",
            hint="make the template from an instance booted with --network user",
        )
    if args.wait_for:
        try:
            re.compile(args.wait_for)
        except re.error as exc:
            raise UsageError(f"--wait-for {args.wait_for!r} is not a valid regex: {exc}") from None
    started = time.monotonic()

    def listener(step: Step, seconds: float, finished: bool) -> None:
        if finished:
            out.say(f"  {step.value:<12} {seconds:7.3f} s")

    out.say(f"restoring a clone of template {tpl.name} ({tpl.id[:8]})")
    try:
        # With --wait-ssh the clock is set while the SSH server is waited for: the
        # agent takes a few seconds to answer after a restore, sshd as many.
        inst = templates.spawn(
            tpl.id,
            name=args.name,
            timeout=args.timeout,
            listener=listener,
            set_clock=not args.wait_ssh,
        )
    except InstanceBuildTimeout as exc:
        raise DeadlineExceeded(str(exc), hint="raise --timeout") from exc
    clock: list[bool | None] = []
    setter = threading.Thread(
        target=lambda: clock.append(templates.set_clock(inst.uuid)), name="set-clock"
    )
    if args.wait_ssh:
        setter.start()
    out.say(f"  {'total':<12} {inst.timings['total']:7.3f} s")
    if args.wait_for:
        budget = (
            args.timeout if args.timeout is not None else drv.conf.default.instance_build_timeout
        )
        try:
            # The clone's console log is its own and new: only what the guest printed
            # after the restore can match.
            console.wait_for_console(
                Path(inst.instance_dir) / "console.log",
                args.wait_for,
                max(0.0, budget - (time.monotonic() - started)),
                alive=lambda: drv.get_info(inst.uuid).state == "running",
            )
        except console.ConsoleTimeout as exc:
            if not args.keep_on_timeout:
                drv.destroy(inst.uuid)
            raise DeadlineExceeded(
                f"the clone's console did not match {args.wait_for!r} within {budget:g} s"
                " (a restored guest prints no boot lines)",
                hint="wait for output the guest writes after the restore, or use --wait-ssh",
            ) from exc
    try:
        ssh_ready = wait_ssh(drv, inst, args, started) if args.wait_ssh else None
    finally:
        if setter.is_alive():
            setter.join()
    if ssh_ready is not None:
        out.say(
            f"  ssh answered {ssh_ready['ready_after']:.3f} s after start: {ssh_ready['banner']}"
        )
    data = instance_dict(drv, inst.uuid)
    data["template"] = tpl.id
    data["timings"] = inst.timings
    data["clock_set"] = clock[0] if clock else inst.clock_set
    if ssh_ready is not None:
        data["ssh"] = ssh_ready
    out.result(data, lambda: show_text(data, drv.conf.base_dir))
    return 0


def rbd_clone_files(drv: LibvirtDriver, frozen: dict[str, str]) -> list[dict[str, Any]]:
    """An RBD template's frozen snapshots and the RBD clone a new clone gets of each."""
    files: list[dict[str, Any]] = []
    for disk, (snap, command) in zip(
        frozen, vmtemplate_rbd.clone_commands(frozen, "<new uuid>"), strict=True
    ):
        pool, name = parse_rbd_path(frozen[disk])
        size = drv.rbd_driver(pool).size(name)
        files.append(
            {
                "path": f"rbd:{snap}",
                "format": "raw",
                "virtual_size": size,
                "backing_file": None,
                "note": "frozen: a protected RBD snapshot, shared by every clone",
                "commands": [],
            }
        )
        files.append(
            {
                "path": f"rbd:{command[-1]}",
                "format": "raw",
                "virtual_size": size,
                "backing_file": f"rbd:{snap}",
                "note": "the clone's own writes: an RBD clone, no copy",
                "commands": [command],
            }
        )
    return files


def cmd_explain_template(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    """What ``boot --template`` would make and run, from the template as it is."""
    if args.image or args.flavor:
        raise UsageError("--template cannot go with --image or --flavor")
    tpl = Templates(drv).find(args.template)
    header = savefile.read_header(tpl.path / MEMORY_FILE)
    clone_dir = drv.conf.instances_path / "<new uuid>"
    files: list[dict[str, Any]] = []
    rbd_frozen = vmtemplate_rbd.frozen_disks(tpl.path)
    files.extend(rbd_clone_files(drv, rbd_frozen))
    for disk in tpl.disks:
        if disk in rbd_frozen:
            continue
        frozen = tpl.path / disk
        info = qemu_img.info(frozen, tpl.disks[disk])
        entry: dict[str, Any] = {
            "path": os.fspath(frozen),
            "format": tpl.disks[disk],
            "virtual_size": info.virtual_size,
            "backing_file": info.backing_file,
            "note": "frozen, read-only, shared by every clone",
            "commands": [],
        }
        files.append(entry)
        if disk in tpl.overlaid:
            overlay = clone_dir / disk
            files.append(
                {
                    "path": os.fspath(overlay),
                    "format": "qcow2",
                    "virtual_size": info.virtual_size,
                    "backing_file": os.fspath(frozen),
                    "note": "the clone's own writes",
                    "commands": [
                        qemu_img.create_cow_image_cmd(frozen, tpl.disks[disk], overlay, None)
                    ],
                }
            )
    memory = tpl.path / MEMORY_FILE
    copy = clone_dir / RESTORE_FILE
    files.append(
        {
            "path": os.fspath(memory),
            "format": "libvirt save image",
            "virtual_size": memory.stat().st_size,
            "backing_file": None,
            "note": f"the guest's memory (stream at byte {header.stream_offset})",
            "commands": [],
        }
    )
    files.append(
        {
            "path": os.fspath(copy),
            "format": "libvirt save image",
            "virtual_size": memory.stat().st_size,
            "backing_file": None,
            "note": "the clone's copy: its own name, uuid, paths and port in the header"
            " XML, the stream copied (copy_file_range); removed once restored",
            "commands": [
                ["virsh", "define", os.fspath(clone_dir / "libvirt.xml")],
                ["virsh", "restore", os.fspath(copy), "--running"],
            ],
        }
    )
    data = {"template": tpl.id, "name": tpl.name, "files": files}

    def text() -> str:
        lines = [f"a clone of template {tpl.name} would be made of:"]
        for f in files:
            lines.append(
                f"{f['path']}\n    {f['format']}, {human_size(f['virtual_size'])}: {f['note']}"
            )
            lines.extend(f"    $ {shlex.join(c)}" for c in f["commands"])
        return "\n".join(lines)

    out.result(data, text)
    return 0
