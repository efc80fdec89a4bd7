"""The ``minidriver`` command: parses, calls the driver, prints.

People get aligned tables and each step as it happens; machines get ``--json``: one
JSON document on stdout and nothing else there. Exit codes: 0 done, 1 a clear error
(one line and a hint on stderr; a traceback only with ``--debug``), 2 usage, 3 a
deadline passed; ``minidriver ssh`` exits with the remote command's code (255: ssh
itself failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn, TextIO

import libvirt

from minidriver import __version__, cleanup, console, explain, imagecache, process, ssh
from minidriver.config import Config, load_config
from minidriver.db import InstanceRecord
from minidriver.driver import InstanceBuildTimeout, LibvirtDriver, base_filename
from minidriver.exception import MinidriverError
from minidriver.guest import CUSTOM_ARGV_TAINT
from minidriver.host import Host
from minidriver.images import download
from minidriver.network import NetworkMode, NetworkRequest
from minidriver.objects import Instance
from minidriver.steps import Step

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 141  # as a shell reports a process that SIGPIPE ended
TEST_IMAGE_NAME = "minidriver-test-guest"


class DeadlineExceeded(MinidriverError):
    """A --timeout passed (exit code 3)."""


def human_size(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


class Output:
    """Where results go: a table or lines for people, one JSON document for machines."""

    def __init__(self, as_json: bool, stream: TextIO = sys.stdout) -> None:
        self.json = as_json
        self.stream = stream

    def say(self, text: str = "") -> None:
        """Progress and prose for people; silent under --json."""
        if not self.json:
            print(text, file=self.stream, flush=True)

    def result(self, data: Any, text: str | Callable[[], str]) -> None:
        if self.json:
            json.dump(data, self.stream, indent=2, sort_keys=False)
            self.stream.write("\n")
        else:
            rendered = text() if callable(text) else text
            if rendered:
                print(rendered, file=self.stream)


class ProgressBar:
    """A one-line bar on stderr while bytes move; nothing on a pipe or under --json."""

    WIDTH = 30

    def __init__(self, label: str, *, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self.drawn = False
        self.last = 0.0

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and done != total):
            return
        self.last = now
        if total:
            filled = self.WIDTH * done // total
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            text = f"{self.label} [{bar}] {human_size(done)} / {human_size(total)}"
        else:
            text = f"{self.label} {human_size(done)}"
        self.stream.write(f"\r\033[K{text}")
        self.stream.flush()
        self.drawn = True


# -- the parser -------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the command: the sub-parsers' copies default to
    # SUPPRESS, so they only override what the top level parsed when given.
    kw: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--config", metavar="FILE", help="INI config file", **kw)
    parser.add_argument("--state-dir", metavar="DIR", help="state directory", **kw)
    parser.add_argument("--connect", metavar="URI", help="libvirt connection URI", **kw)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout", **kw)
    parser.add_argument("--debug", action="store_true", help="debug log, tracebacks", **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minidriver",
        description="Boot VMs the way Nova's libvirt driver does, on one host.",
    )
    parser.add_argument("--version", action="version", version=f"minidriver {__version__}")
    _global_options(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        return p

    host = command("host", "the libvirt host").add_subparsers(
        dest="host_command", metavar="SUBCOMMAND", required=True
    )
    command("check", "can this host start a VM? libvirt, QEMU, virt_type, disk", host)

    image = command("image", "the local image service").add_subparsers(
        dest="image_command", metavar="SUBCOMMAND", required=True
    )
    p = command("add", "add an image from a local file or an http(s) URL", image)
    p.add_argument("source", help="path or http(s) URL of the image")
    p.add_argument("--name", required=True)
    p.add_argument(
        "--disk-format",
        default="auto",
        choices=["auto", "raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi", "iso", "aki", "ari", "ami"],
    )
    p.add_argument("--checksum", metavar="ALGO:HEX", help="md5, sha256 or sha512 of the source")
    p.add_argument("--property", metavar="K=V", action="append", default=[], help="image property")
    p.add_argument(
        "--store",
        default="file",
        choices=["file", "rbd"],
        help="file (default) or rbd: raw in Ceph's [glance_store] rbd_store_pool",
    )
    command("list", "list images", image)
    command("show", "show one image", image).add_argument("image")
    command("delete", "delete an image", image).add_argument("image")

    flavor = command("flavor", "flavors").add_subparsers(
        dest="flavor_command", metavar="SUBCOMMAND", required=True
    )
    command("list", "list flavors", flavor)

    keypair = command("keypair", "SSH key pairs kept in the state dir").add_subparsers(
        dest="keypair_command", metavar="SUBCOMMAND", required=True
    )
    p = command("create", "a new ed25519 key pair (or import a public key)", keypair)
    p.add_argument("name")
    p.add_argument("--public-key", metavar="FILE", help="import this public key instead")
    command("list", "list key pairs", keypair)
    command("delete", "delete a key pair", keypair).add_argument("name")

    _boot_command(command)
    _instance_commands(command)
    return parser


def _boot_command(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("boot", "boot a new instance")
    p.add_argument("--image", required=True)
    p.add_argument("--flavor", required=True)
    p.add_argument("--name", help="display name (default: the image's name)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="bound on the whole boot")
    p.add_argument("--wait-for", metavar="REGEX", help="wait until the console matches")
    p.add_argument("--keep-on-timeout", action="store_true", help="keep it when time runs out")
    p.add_argument("--no-wait", action="store_true", help="return once the domain is started")
    p.add_argument("--print-xml", action="store_true", help="print the domain XML, boot nothing")
    p.add_argument("--dry-run", action="store_true", help="check everything, boot nothing")
    p.add_argument("--config-drive", action="store_true", help="attach a config drive")
    p.add_argument("--user-data", metavar="FILE", help="user data for the config drive")
    p.add_argument("--key-file", metavar="FILE", help="an SSH public key for the config drive")
    p.add_argument("--key-name", metavar="NAME", help="a key pair's public key, for the drive")
    p.add_argument(
        "--network", metavar="MODE[:NAME]", help="user, none, network[:NAME] or bridge[:NAME]"
    )
    p.add_argument(
        "--wait-ssh", action="store_true", help="wait until the guest's SSH server answers"
    )
    p.add_argument(
        "--meta", metavar="K=V", action="append", default=[], help="metadata (repeatable)"
    )
    p.add_argument("--hostname", metavar="NAME", help="the guest's hostname (a DNS label)")


def _instance_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    command("list", "list this state dir's instances")
    command("show", "show an instance and its image chain").add_argument("instance")
    p = command("ssh", "log into an instance (user network) with its key pair's key")
    p.add_argument("instance")
    p.add_argument("--user", help="login name (default: [DEFAULT] ssh_user)")
    p.add_argument("remote_command", nargs="*", metavar="-- COMMAND", help="run this instead")
    p = command("console", "print an instance's serial console log")
    p.add_argument("instance")
    p.add_argument("--follow", "-f", action="store_true", help="stream until interrupted")
    p = command("delete", "delete instances (the image cache stays)")
    p.add_argument("instances", nargs="*", metavar="INSTANCE")
    p.add_argument("--all", action="store_true", help="every instance of this state dir")
    p = command("stop", "shut an instance down: ACPI, then a hard stop after the timeout")
    p.add_argument("instance")
    p.add_argument("--force", action="store_true", help="hard stop at once")
    p.add_argument("--timeout", type=float, default=60, metavar="SECONDS")
    command("start", "start a stopped instance").add_argument("instance")
    p = command("reboot", "reboot an instance (ACPI; --hard: stop and start)")
    p.add_argument("instance")
    p.add_argument("--hard", action="store_true")
    p = command("snapshot", "a new image from an instance's root disk (live if running)")
    p.add_argument("instance")
    p.add_argument("--name", required=True, help="the new image's name")
    cache = command("cache", "the _base image cache").add_subparsers(
        dest="cache_command", metavar="SUBCOMMAND", required=True
    )
    command("list", "every cached file: kind, sizes, age, users, removable", cache)
    p = command("clean", "one image cache manager pass (Nova's)", cache)
    p.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    p.add_argument("--loop", action="store_true", help="a pass every manager_interval seconds")
    p = command("cleanup", "after a crash: remove this state dir's leftovers")
    p.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    p = command("explain", "the files and commands a boot would make, and its XML")
    p.add_argument("--image", required=True)
    p.add_argument("--flavor", required=True)
    p = command("demo", "first run: build the test guest, boot it, show it, delete it")
    p.add_argument("--timeout", type=float, default=300, metavar="SECONDS")


# -- commands ---------------------------------------------------------------------


def instance_dict(drv: LibvirtDriver, uuid: str) -> dict[str, Any]:
    record = drv.db.get_instance(uuid)
    return {
        "uuid": record.uuid,
        "name": record.name,
        "display_name": record.display_name,
        "state": drv.get_info(uuid).state,
        "flavor": record.flavor,
        "image": record.image_id,
        "virt_type": drv.host.virt_type.virt_type,
        "instance_dir": record.instance_dir,
        "created_at": record.created_at,
        "disks": {name: asdict(d) for name, d in drv.get_disks(uuid).items()},
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


def show_text(data: dict[str, Any], base_dir: Path) -> str:
    rows = [
        (key, data[key])
        for key in (
            "uuid",
            "name",
            "display_name",
            "state",
            "flavor",
            "image",
            "virt_type",
            "instance_dir",
            "created_at",
        )
    ]
    rows += network_rows(data)
    text = format_table(("field", "value"), rows)
    lines = boot_file_lines(data) + chain_lines(data["disks"], base_dir)
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


def boot_instance(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> Instance:
    """spawn, showing each step as it ends, then the optional wait on the console."""
    started = time.monotonic()
    timeout = args.timeout

    def listener(step: Step, seconds: float, finished: bool) -> None:
        if finished:
            out.say(f"  {step.value:<12} {seconds:7.3f} s")
        elif step is Step.CONVERT:
            out.say("  convert ...")

    image = drv.images.get(args.image)
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
        check_wait_ssh(drv, args)
    name = args.name or image.name
    out.say(f"booting {name} from {image.name} ({image.id[:8]}) as {args.flavor}")
    try:
        drive_args = config_drive_args(args)
        with ProgressBar("fetch", enabled=not out.json) as bar:
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


def check_wait_ssh(drv: LibvirtDriver, args: argparse.Namespace) -> None:
    """--wait-ssh's conditions, checked before anything is booted."""
    if args.no_wait:
        raise UsageError(
            "--wait-ssh waits for a running guest: it cannot go with --no-wait",
            hint="drop one of the two",
        )
    if NetworkRequest.parse(args.network, drv.conf.libvirt).mode is not NetworkMode.USER:
        raise UsageError(
            "--wait-ssh needs the user network: only it forwards a port on 127.0.0.1",
            hint="boot with --network user",
        )


def wait_ssh(
    drv: LibvirtDriver, inst: Instance, args: argparse.Namespace, started: float
) -> dict[str, Any]:
    """After RUNNING: wait for the guest's SSH banner within what is left of --timeout."""
    port = drv.db.get_instance(inst.uuid).forward_port
    assert port is not None  # check_wait_ssh made sure of the user network
    budget = args.timeout if args.timeout is not None else drv.conf.default.instance_build_timeout
    remaining = max(0.0, budget - (time.monotonic() - started))
    tty = not args.json and sys.stderr.isatty()

    def progress(waited: float) -> None:
        if tty:
            sys.stderr.write(f"\r\033[K  waiting for ssh on 127.0.0.1:{port} ... {waited:.0f} s")
            sys.stderr.flush()

    try:
        banner = ssh.wait_for_banner(
            port,
            remaining,
            alive=lambda: drv.get_info(inst.uuid).state == "running",
            progress=progress,
        )
    except ssh.SSHTimeout as exc:
        if not args.keep_on_timeout:
            drv.destroy(inst.uuid)
        raise DeadlineExceeded(
            f"no SSH server answered on 127.0.0.1:{port} within {budget:g} s of the boot",
            hint="raise --timeout, or --keep-on-timeout to look at the guest",
        ) from exc
    except MinidriverError:
        # The guest stopped before its SSH server answered: as with --wait-for, the
        # failed boot is removed unless it is to be kept.
        if not args.keep_on_timeout:
            drv.destroy(inst.uuid)
        raise
    finally:
        if tty:
            sys.stderr.write("\r\033[K")
    return {"port": port, "banner": banner, "ready_after": round(time.monotonic() - started, 3)}


def key_values(items: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MinidriverError(
                f"{option} {item!r}: expected K=V", hint=f"e.g. {option} os=linux"
            )
        pairs[key] = value
    return pairs


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


def cmd_boot(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    if args.print_xml or args.dry_run:
        plan = explain.explain(drv, args.image, args.flavor, args.network)
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
    inst = boot_instance(drv, args, out)
    ssh_ready = wait_ssh(drv, inst, args, started) if args.wait_ssh else None
    if ssh_ready is not None:
        out.say(
            f"  ssh answered {ssh_ready['ready_after']:.3f} s after start: {ssh_ready['banner']}"
        )
    data = instance_dict(drv, inst.uuid)
    data["cache_hit"] = inst.cache_hit
    data["timings"] = inst.timings
    if ssh_ready is not None:
        data["ssh"] = ssh_ready
    out.result(data, lambda: show_text(data, drv.conf.base_dir))
    return EXIT_OK


def cmd_ssh(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    record = drv.db.find_instance(args.instance)
    argv = ssh.instance_ssh_argv(
        record, drv.conf, drv.keypairs, user=args.user, command=args.remote_command
    )
    state = drv.get_info(record.uuid).state
    if state != "running":
        raise MinidriverError(
            f"instance {record.display_name} is {state}, not running",
            hint=f"start it: minidriver start {record.display_name}",
        )
    return process.run_attached(argv)


def cmd_keypair(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    store = drv.keypairs
    sub = args.keypair_command
    if sub == "create":
        if args.public_key:
            keypair = store.import_public_key(args.name, Path(args.public_key).read_text())
        else:
            keypair = store.create(args.name)
        where = f", private key {keypair.private_key}" if keypair.private_key else " (imported)"
        out.result(keypair.to_dict(), f"key pair {keypair.name}: {keypair.fingerprint}{where}")
    elif sub == "list":
        pairs = store.list()
        out.result(
            [k.to_dict() for k in pairs],
            lambda: format_table(
                ("name", "type", "fingerprint", "private_key"),
                [(k.name, k.type, k.fingerprint, k.private_key or "(imported)") for k in pairs],
            ),
        )
    elif sub == "delete":
        store.delete(args.name)
        out.result({"deleted": args.name}, f"deleted key pair {args.name}")
    return EXIT_OK


def cmd_list(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    records = drv.list_instances()
    rows = [(r.uuid, r.name, r.display_name, r.state, r.flavor) for r in records]
    out.result(
        [instance_dict(drv, r.uuid) for r in records],
        lambda: format_table(("uuid", "name", "display_name", "state", "flavor"), rows),
    )
    return EXIT_OK


def cmd_show(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    record = drv.db.find_instance(args.instance)
    data = instance_dict(drv, record.uuid)
    out.result(data, lambda: show_text(data, drv.conf.base_dir))
    return EXIT_OK


def cmd_console(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    record = drv.db.find_instance(args.instance)
    log = Path(record.instance_dir) / "console.log"
    text = console.read_console(log)
    out.result({"uuid": record.uuid, "console": text}, text.rstrip("\n"))
    if args.follow and not out.json:
        follow(log, len(text.encode()))
    return EXIT_OK


def cmd_flavor(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    flavors = sorted(drv.conf.flavors.values(), key=lambda f: (f.memory_mb, f.name))
    out.result(
        [asdict(f) for f in flavors],
        lambda: format_table(
            ("name", "vcpus", "memory_mb", "root_gb", "ephemeral_gb", "swap"),
            [(f.name, f.vcpus, f.memory_mb, f.root_gb, f.ephemeral_gb, f.swap) for f in flavors],
        ),
    )
    return EXIT_OK


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
    drv.reboot(record.uuid, hard=args.hard)
    state = drv.get_info(record.uuid).state
    kind = "hard" if args.hard else "soft"
    out.result(
        {"uuid": record.uuid, "state": state, "reboot": kind},
        f"{record.display_name}: {kind} reboot requested, {state}",
    )
    return EXIT_OK


def plan_text(plan: explain.Plan) -> str:
    lines = []
    for f in plan.files:
        size = human_size(f.virtual_size) if f.virtual_size is not None else "?"
        state = "cached" if f.exists else "new"
        lines.append(f"{f.path}\n    {f.format}, {size} virtual, {state}: {f.note}")
        lines.extend(f"    $ {shlex.join(c)}" for c in f.commands)
    return "\n".join(lines)


def cmd_explain(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    plan = explain.explain(drv, args.image, args.flavor)
    out.result(
        plan.to_dict(),
        lambda: (
            "the chain of files a boot would make:\n"
            + plan_text(plan)
            + "\n\nthe domain XML (name and uuid are given at boot):\n"
            + plan.xml.rstrip("\n")
        ),
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


def cmd_cleanup(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    report = cleanup.cleanup(drv, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    lines = [
        *(f"{verb} domain {d} (no record)" for d in report.domains),
        *(f"{verb} instance {u} (no domain)" for u in report.records),
        *(f"{verb} instance dir {d} (no record, no domain)" for d in report.instance_dirs),
        *(f"{verb} partial file {f}" for f in report.partial_files),
        *(f"{verb} free lock {name}" for name in report.locks),
        *(f"{verb} reservation of forwarded port {port}" for port in report.ports),
        *(f"{verb} RBD disk {d}" for d in report.rbd_disks),
        *(f"{verb} image {i} (left saving by an add that died)" for i in report.images),
        *(f"skipped {s}" for s in report.skipped),
        f"{verb} {report.total()} leftovers" if report.total() else "nothing to clean up",
    ]
    out.result(dataclasses.asdict(report), "\n".join(lines))
    return EXIT_OK


def cached_file_dict(f: imagecache.CachedFile) -> dict[str, Any]:
    return {
        "name": f.name,
        "path": str(f.path),
        "kind": f.kind.value,
        "virtual_size": f.virtual_size,
        "actual_size": f.actual_size,
        "age_seconds": round(f.age_seconds, 1),
        "used_by": list(f.used_by),
        "removable": f.removable,
        "reason": f.reason,
    }


def cache_table(files: Sequence[imagecache.CachedFile]) -> str:
    rows = [
        (
            f.name,
            f.kind.value,
            human_size(f.virtual_size) if f.virtual_size is not None else "",
            human_size(f.actual_size),
            f"{f.age_seconds / 3600:.1f} h",
            len(f.used_by),
            "yes" if f.removable else "no",
            f.reason,
        )
        for f in files
    ]
    headers = ("name", "kind", "virtual", "actual", "age", "users", "removable", "why")
    return format_table(headers, rows)


def pass_report(result: imagecache.PassResult) -> dict[str, Any]:
    return {
        "dry_run": result.dry_run,
        "removed": [cached_file_dict(f) for f in result.removed],
        "bytes_freed": result.bytes_freed,
        "touched": list(result.touched),
        "errors": list(result.errors),
    }


def pass_text(result: imagecache.PassResult) -> str:
    verb = "would remove" if result.dry_run else "removed"
    lines = [f"{verb} {f.name} ({f.kind.value}, {f.reason})" for f in result.removed]
    lines.append(f"{verb} {len(result.removed)} files, {human_size(result.bytes_freed)}")
    lines.extend(f"error: {e}" for e in result.errors)
    return "\n".join(lines)


def cmd_cache(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    manager = drv.image_cache_manager()
    if args.cache_command == "list":
        files = manager.list(drv.bases_in_use())
        out.result([cached_file_dict(f) for f in files], lambda: cache_table(files))
        return EXIT_OK
    if args.loop:
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        interval = drv.conf.image_cache.manager_interval
        if interval <= 0:
            raise UsageError(f"[image_cache] manager_interval = {interval}: --loop needs > 0")
        out.say(f"a cache pass every {interval} s; stop with Ctrl-C or SIGTERM")
        imagecache.run_loop(
            manager,
            drv.bases_in_use,
            interval,
            stop=stop,
            dry_run=args.dry_run,
            report=lambda r: out.result(pass_report(r), pass_text(r)),
        )
        return EXIT_OK
    result = manager.update(drv.bases_in_use(), dry_run=args.dry_run, recheck=drv.bases_in_use)
    out.result(pass_report(result), pass_text(result))
    return EXIT_ERROR if result.errors else EXIT_OK


def run_command(
    args: argparse.Namespace, conf: Config, out: Output, host: Host | None = None
) -> int:
    commands: dict[str, Callable[[LibvirtDriver, argparse.Namespace, Output], int]] = {
        "boot": cmd_boot,
        "list": cmd_list,
        "show": cmd_show,
        "console": cmd_console,
        "delete": cmd_delete,
        "image": cmd_image,
        "flavor": cmd_flavor,
        "host": cmd_host_check,
        "stop": cmd_stop,
        "start": cmd_start,
        "reboot": cmd_reboot,
        "explain": cmd_explain,
        "cache": cmd_cache,
        "snapshot": cmd_snapshot,
        "cleanup": cmd_cleanup,
        "demo": cmd_demo,
        "ssh": cmd_ssh,
        "keypair": cmd_keypair,
    }
    return commands[args.command](LibvirtDriver(conf, host=host), args, out)


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
            drv.destroy(record.uuid)
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


def cmd_image(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    sub = args.image_command
    if sub == "add":
        props = key_values(args.property, "--property")
        source: Path | str = args.source if download.is_url(args.source) else Path(args.source)
        with ProgressBar("add", enabled=not out.json) as bar:
            img = drv.images.add(
                source,
                name=args.name,
                disk_format=args.disk_format,
                properties=props,
                checksum=args.checksum,
                progress=bar.update,
                store=args.store,
            )
        out.result(
            img.to_dict(),
            f"added image {img.name} {img.id} ({img.disk_format}, {human_size(img.size)})",
        )
    elif sub == "list":
        images = drv.images.list()
        out.result(
            [i.to_dict() for i in images],
            lambda: format_table(
                ("id", "name", "disk_format", "size", "virtual_size", "status"),
                [
                    (
                        i.id,
                        i.name,
                        i.disk_format,
                        human_size(i.size),
                        human_size(i.virtual_size) if i.virtual_size else "",
                        i.status,
                    )
                    for i in images
                ],
            ),
        )
    elif sub == "show":
        img = drv.images.get(args.image)
        data = img.to_dict()
        out.result(data, lambda: format_table(("field", "value"), sorted(data.items())))
    elif sub == "delete":
        img = drv.images.get(args.image)
        drv.images.delete(img.id)
        out.result({"deleted": img.id}, f"deleted image {img.name} {img.id}")
    return EXIT_OK


def cmd_host_check(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    conn = drv.host.get_connection()
    choice = drv.host.virt_type
    path = drv.conf.instances_path
    path.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(path)
    problems = []
    try:
        drv.host.check_instances_path()
    except MinidriverError as exc:
        problems.append(str(exc))
    free = st.f_bavail * st.f_frsize
    ceph = None
    if drv.uses_rbd:
        ceph, ceph_problems = ceph_check(drv)
        problems.extend(ceph_problems)
    data: dict[str, Any] = {
        "uri": drv.host.uri,
        "connection_reason": drv.host.connection_reason,
        "libvirt_version": version_string(conn.getLibVersion()),
        "qemu_version": version_string(conn.getVersion()),
        "virt_type": choice.virt_type,
        "virt_type_reason": choice.reason,
        "instances_path": os.fspath(path),
        "free_bytes": free,
        "problems": problems,
    }
    if ceph is not None:
        data["ceph"] = ceph
    rows = [(k, v) for k, v in data.items() if k not in ("problems", "free_bytes", "ceph")]
    rows.append(("free", human_size(free)))
    if ceph is not None:
        rows.extend((f"ceph {k}", v) for k, v in ceph.items() if v is not None)
    out.result(data, lambda: "\n".join([format_table(("check", "value"), rows), *problems]))
    return EXIT_ERROR if problems else EXIT_OK


def ceph_check(drv: LibvirtDriver) -> tuple[dict[str, Any], list[str]]:
    """With images_type = rbd: the cluster's fsid and health, and the pools of instance
    disks and of images; each problem as one line."""
    opts = drv.conf.libvirt
    pools = {"pool": opts.images_rbd_pool, "images_pool": drv.conf.glance_store.rbd_store_pool}
    report: dict[str, Any] = {
        "conf": opts.images_rbd_ceph_conf or "(librados default)",
        "fsid": None,
        "health": None,
        **pools,
    }
    problems = []
    rbd = drv.rbd_driver()
    try:
        with rbd.connected():
            report["fsid"] = rbd.get_fsid()
            report["health"] = rbd.health()
            for key, pool in pools.items():
                try:
                    rbd.check_pool(pool)
                except MinidriverError as exc:
                    report[key] = f"{pool} (missing)"
                    problems.append(str(exc))
    except MinidriverError as exc:
        problems.append(str(exc) + (f" ({exc.hint})" if exc.hint else ""))
    return report, problems


def version_string(v: int) -> str:
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"


def cmd_demo(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    from minidriver.guestimages import testimage  # noqa: PLC0415 - only demo needs the builder

    path = testimage.build(log=lambda msg: out.say(f"test image: {msg}"))
    image = next(
        (i for i in drv.images.list() if i.name == TEST_IMAGE_NAME and i.status == "active"), None
    )
    digest = hashlib.sha512(path.read_bytes()).hexdigest()
    if image is None or image.os_hash_value != digest:
        image = drv.images.add(path, name=TEST_IMAGE_NAME, disk_format="qcow2")
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


# -- entry point ------------------------------------------------------------------


class UsageError(MinidriverError):
    """Bad command-line input found after parsing (exit code 2)."""


def die(out: Output, exc: MinidriverError, code: int) -> NoReturn:
    print(f"minidriver: error: {exc}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    if out.json:
        json.dump({"error": str(exc), "hint": exc.hint}, sys.stdout)
        sys.stdout.write("\n")
    raise SystemExit(code)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """argparse, but ``ssh INSTANCE [options] -- COMMAND...`` keeps the command whole:
    argparse cannot give a ``*`` positional what follows ``--`` once options came
    between the two."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "ssh" and extra[0] == "--" and not args.remote_command:
        args.remote_command = extra[1:]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None, *, host: Host | None = None) -> int:
    """The command. ``host`` injects a libvirt connection (tests share one across calls)."""
    args = parse_args(argv)
    out = Output(args.json, stream=sys.stdout)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not args.debug:
        # The format inspector logs each refusal that we report as an error anyway.
        logging.getLogger("oslo_utils").setLevel(logging.ERROR)
    try:
        conf = load_config(args.config, state_dir=args.state_dir)
        if args.connect:
            conf = conf.with_libvirt(connection_uri=args.connect)
        return run_command(args, conf, out, host)
    except DeadlineExceeded as exc:
        die(out, exc, EXIT_TIMEOUT)
    except UsageError as exc:
        die(out, exc, EXIT_USAGE)
    except MinidriverError as exc:
        if args.debug:
            logging.exception("failed")
        die(out, exc, EXIT_ERROR)
    except libvirt.libvirtError as exc:
        if args.debug:
            logging.exception("failed")
        die(out, MinidriverError(f"libvirt: {exc.get_error_message()}"), EXIT_ERROR)
    except BrokenPipeError:
        # The reader went away (`minidriver list --json | head`): nothing more to say
        # to it, and no traceback when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if args.debug:
            logging.exception("failed")
        where = f": {exc.filename}" if exc.filename else ""
        die(
            out,
            MinidriverError(
                f"{exc.strerror or exc}{where}", hint="check the path and its permissions"
            ),
            EXIT_ERROR,
        )
    except KeyboardInterrupt:
        print("minidriver: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
