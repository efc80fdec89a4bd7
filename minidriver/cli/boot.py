"""Booting: boot, and the two commands that show or run a boot for you, explain and
demo (novaclient's ``do_boot``).

``boot`` shows each of spawn's steps as it ends, then waits on the console
(``--wait-for``) or the guest's SSH server (``--wait-ssh``) within what is left of
``--timeout``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minidriver import console
from minidriver.cli.instances import chain_lines, instance_dict, show_text
from minidriver.cli.output import (
    EXIT_OK,
    DeadlineExceeded,
    Output,
    ProgressBar,
    UsageError,
    human_size,
)
from minidriver.cli.parser import build_parser, key_values
from minidriver.driver import InstanceBuildTimeout, LibvirtDriver
from minidriver.exception import MinidriverError
from minidriver.images.store import Image as StoreImage
from minidriver.objects import Instance
from minidriver.steps import Step

if TYPE_CHECKING:
    from minidriver import explain

TEST_IMAGE_NAME = "minidriver-test-guest"


def cmd_boot(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    if args.template:
        from minidriver.cli import vmtemplate  # noqa: PLC0415 - only a clone needs it

        return vmtemplate.cmd_boot_template(drv, args, out)
    need_image_and_flavor(args)
    if args.print_xml or args.dry_run:
        from minidriver import explain  # noqa: PLC0415 - a boot that runs does not need it

        plan = explain.explain(
            drv, args.image, args.flavor, args.network, boot_volume=args.boot_volume
        )
        if args.print_xml:
            out.result({"xml": plan.xml}, plan.xml.rstrip("\n"))
        else:
            out.result(
                {"dry_run": True, **plan.to_dict()},
                lambda: (
                    "dry run: image, flavor and host check out; nothing was done\n"
                    + plan_text(plan)
                ),
            )
        return EXIT_OK
    started = time.monotonic()
    if len(drv.conf.host_names) > 1 or args.host is not None:
        from minidriver.cli.hosts import place  # noqa: PLC0415 - with several hosts only

        drv = place(drv, args, out, image_to_boot(drv, args).properties)
    inst = boot_instance(drv, args, out)
    ssh_ready = None
    if args.wait_ssh:
        from minidriver.cli.guestaccess import wait_ssh  # noqa: PLC0415 - with --wait-ssh only

        ssh_ready = wait_ssh(drv, inst, args, started)
    if ssh_ready is not None:
        out.say(
            f"  ssh answered {ssh_ready['ready_after']:.3f} s after start: {ssh_ready['banner']}"
        )
    # A new instance's one possible volume is the root it boots from.
    from_volume = args.boot_volume is not None or args.volume_size is not None
    data = instance_dict(drv, inst.uuid, list_volumes=from_volume)
    data["cache_hit"] = inst.cache_hit
    data["timings"] = inst.timings
    if ssh_ready is not None:
        data["ssh"] = ssh_ready
    out.result(data, lambda: show_text(data, drv.conf.base_dir))
    return EXIT_OK


def boot_instance(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> Instance:
    """spawn, showing each step as it ends, then the optional wait on the console."""
    started = time.monotonic()
    timeout = args.timeout

    bar = ProgressBar("fetch", enabled=not out.json)

    def listener(step: Step, seconds: float, finished: bool) -> None:
        # The ephemeral and swap disks are made while the root's image is fetched.
        if finished:
            bar.clear()
            out.say(f"  {step.value:<12} {seconds:7.3f} s")
        elif step is Step.CONVERT:
            bar.clear()
            out.say("  convert ...")

    image = image_to_boot(drv, args)
    drv.get_flavor(args.flavor)
    if args.wait_for:
        try:
            re.compile(args.wait_for)
        except re.error as exc:
            raise MinidriverError(
                f"--wait-for {args.wait_for!r} is not a valid regex: {exc}",
                hint="a Python regular expression, e.g. 'minidriver-guest: ready'",
            ) from None
    if args.wait_ssh:
        from minidriver.cli.guestaccess import check_wait_ssh  # noqa: PLC0415 - as above

        check_wait_ssh(drv, args)
    name = args.name or image.name
    out.say(f"booting {name} from {image.name} ({image.id[:8]}) as {args.flavor}")
    try:
        drive_args = config_drive_args(args)
        with bar:
            inst = drv.spawn(
                name,
                image.id,
                args.flavor,
                keep_on_timeout=args.keep_on_timeout,
                timeout=timeout,
                wait=not args.no_wait,
                listener=listener,
                progress=bar.update,
                network=args.network,
                key_name=args.key_name,
                boot_volume=args.boot_volume,
                volume_size=args.volume_size,
                **drive_args,
            )
    except InstanceBuildTimeout as exc:
        raise DeadlineExceeded(
            str(exc), hint="raise --timeout, or --keep-on-timeout to debug"
        ) from exc
    if args.wait_for:
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        log = Path(inst.instance_dir) / "console.log"
        try:
            console.wait_for_console(
                log,
                args.wait_for,
                remaining if remaining is not None else drv.conf.default.instance_build_timeout,
                alive=lambda: drv.get_info(inst.uuid).state == "running",
            )
        except console.ConsoleTimeout as exc:
            if not args.keep_on_timeout:
                drv.destroy(inst.uuid)
            budget = timeout if timeout is not None else drv.conf.default.instance_build_timeout
            message = (
                str(exc)
                if exc.stopped
                else f"the console did not match {args.wait_for!r} within {budget:g} s"
            )
            if exc.tail:
                message += "\nlast console lines:\n" + exc.tail
            hint = "raise --timeout, or --keep-on-timeout to look at the guest"
            if exc.stopped:
                raise MinidriverError(message, hint="see the console lines above") from exc
            raise DeadlineExceeded(message, hint=hint) from exc
    out.say(f"  {'total':<12} {inst.timings['total']:7.3f} s")
    if args.wait_for:
        out.say(
            f"  console matched {args.wait_for!r} {time.monotonic() - started:.3f} s after start"
        )
    return inst


def config_drive_args(args: argparse.Namespace) -> dict[str, Any]:
    """boot's config drive options, as spawn takes them (files read here)."""
    keys = {}
    if args.key_file:
        key_file = Path(args.key_file)
        keys[key_file.stem] = key_file.read_text()
    return {
        "config_drive": True if args.config_drive else None,
        "hostname": args.hostname,
        "user_data": Path(args.user_data).read_bytes() if args.user_data else None,
        "public_keys": keys,
        "meta": key_values(args.meta, "--meta"),
    }


def image_to_boot(drv: LibvirtDriver, args: argparse.Namespace) -> StoreImage:
    """--image, or the image the --boot-volume was made from."""
    if not args.boot_volume:
        return drv.images.get(args.image)
    if args.image or args.volume_size is not None:
        raise UsageError(
            "--boot-volume boots the volume's own image: no --image or --volume-size",
            hint="--image IMAGE --volume-size GB makes a new volume instead",
        )
    return drv.images.get(
        drv.block_devices.image_of_volume(drv.volumes.get(args.boot_volume), drv.images)
    )


def need_image_and_flavor(args: argparse.Namespace) -> None:
    needed = ("flavor",) if getattr(args, "boot_volume", None) else ("image", "flavor")
    missing = [f"--{name}" for name in needed if not getattr(args, name)]
    if missing:
        raise UsageError(
            # argparse's own words, as when both options were required
            f"{args.command}: the following arguments are required: {', '.join(missing)}"
            " (or --template)",
            hint=f"e.g. {args.command} --image IMAGE --flavor t1.nano",
        )


def cmd_explain(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    if args.template:
        from minidriver.cli import vmtemplate  # noqa: PLC0415 - only a clone needs it

        if args.nova:
            raise UsageError(
                "explain: --nova maps a spawn's steps; a --template clone is restored, not spawned",
                hint="explain --nova --image IMAGE --flavor FLAVOR",
            )

        return vmtemplate.cmd_explain_template(drv, args, out)
    need_image_and_flavor(args)
    from minidriver import explain  # noqa: PLC0415 - not for boot

    plan = explain.explain(drv, args.image, args.flavor, boot_volume=args.boot_volume)
    document = plan.to_dict(nova=args.nova)
    nova = ""
    if args.nova:
        from minidriver import nova_map  # noqa: PLC0415 - only --nova needs it

        document["nova"] = [s.to_dict() for s in nova_map.steps_of("spawn")]
        nova = (
            "\n\neach step of spawn, the Nova function that does it"
            " (nova_map.py; the README's table):\n" + nova_map.text_table("spawn")
        )
    out.result(
        document,
        lambda: (
            "the chain of files a boot would make:\n"
            + plan_text(plan, nova=args.nova)
            + "\n\nthen, once the domain is defined:\n"
            + "\n".join(f"  {line}" for line in plan.launch)
            + "\n\nthe domain XML (name and uuid are given at boot):\n"
            + plan.xml.rstrip("\n")
            + nova
        ),
    )
    return EXIT_OK


def plan_text(plan: explain.Plan, *, nova: bool = False) -> str:
    """Each file, its commands; with ``nova``, the Nova function that makes it too."""
    lines = []
    for f in plan.files:
        size = human_size(f.virtual_size) if f.virtual_size is not None else "?"
        state = "cached" if f.exists else "new"
        lines.append(f"{f.path}\n    {f.format}, {size} virtual, {state}: {f.note}")
        step = f.nova_step() if nova else None
        if step is not None:
            lines.append(f"    nova: {step.nova}")
            if step.differs:
                lines.append(f"    differs: {step.differs}")
        lines.extend(f"    $ {shlex.join(c)}" for c in f.commands)
    return "\n".join(lines)


def cmd_demo(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    from minidriver.guestimages import testimage  # noqa: PLC0415 - only demo needs the builder

    path = testimage.build(log=lambda msg: out.say(f"test image: {msg}"))
    image = next(
        (i for i in drv.images.list() if i.name == TEST_IMAGE_NAME and i.status == "active"), None
    )
    digest = hashlib.sha512(path.read_bytes()).hexdigest()
    if (
        image is None
        or image.os_hash_value != digest
        or dict(image.properties) != testimage.IMAGE_PROPERTIES
    ):
        image = drv.images.add(
            path, name=TEST_IMAGE_NAME, disk_format="qcow2", properties=testimage.IMAGE_PROPERTIES
        )
        out.say(f"added image {image.name} {image.id}")
    choice = drv.host.virt_type
    out.say(f"host: {drv.host.uri}, virt_type {choice.virt_type} ({choice.reason})")
    # The same options `boot` parses, so the demo runs boot's own path.
    boot_args = build_parser().parse_args(
        ["boot", "--image", image.id, "--flavor", "t1.nano", "--name", "demo",
         "--timeout", str(args.timeout), "--wait-for", r"^minidriver-guest: ready",
         "--config-drive", "--hostname", "demo"]
    )  # fmt: skip
    # Under --json the boot's progress goes to stderr: stdout holds one document.
    inst = boot_instance(drv, boot_args, Output(False, stream=sys.stderr) if out.json else out)
    record = drv.db.get_instance(inst.uuid)
    try:
        text = console.read_console(Path(record.instance_dir) / "console.log")
        guest_lines = [
            line.rstrip("\r") for line in text.splitlines() if line.startswith("minidriver-guest:")
        ]
        out.say("\nthe guest's console:")
        out.say("\n".join(guest_lines))
        data = instance_dict(drv, record.uuid)
        out.say("\nits image chain:")
        out.say("\n".join(chain_lines(data["disks"], drv.conf.base_dir)))
    finally:
        drv.destroy(record.uuid)
        out.say(f"\ndeleted {record.name}; the cache in {drv.conf.base_dir} stays")
    out.result({"instance": data, "console": guest_lines}, "")
    return EXIT_OK
