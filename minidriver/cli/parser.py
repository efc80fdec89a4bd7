"""The command line: global options, every command's options, their help
(novaclient's ``shell.py``).

argparse and nothing of the driver: ``--help`` and a usage error cost no more than
this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from minidriver import __version__
from minidriver.exception import MinidriverError


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the command: the sub-parsers' copies default to
    # SUPPRESS, so they only override what the top level parsed when given.
    kw: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--config", metavar="FILE", help="INI config file", **kw)
    parser.add_argument("--state-dir", metavar="DIR", help="state directory", **kw)
    parser.add_argument("--connect", metavar="URI", help="libvirt connection URI", **kw)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout", **kw)
    parser.add_argument("--debug", action="store_true", help="debug log, tracebacks", **kw)


# The global options that take a value: what follows one is no command's name.
_VALUED_OPTIONS = ("--config", "--state-dir", "--connect")


class _NotBuilt:
    """What a command that is not built is made of: every argparse call on it does
    nothing and returns it again, so each command's code reads the same whether its
    command is built or not."""

    def __getattr__(self, _name: str) -> Callable[..., _NotBuilt]:
        return lambda *_args, **_kw: self


def named_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is no option or option value;
    None if there is none."""
    words = iter(argv)
    for word in words:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
        valued = any(option.startswith(word) for option in _VALUED_OPTIONS)
        if valued and word.startswith("--") and len(word) > 2:
            next(words, None)  # its value (argparse takes unambiguous abbreviations)
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, that command's alone (see parse_args).

    ``only`` a word that names no command builds the whole command line."""
    names: list[str] = []
    parser = _build(only, names)
    return parser if only is None or only in names else _build(None, names)


def _build(only: str | None, names: list[str]) -> argparse.ArgumentParser:
    """The command line, with ``only`` or every command built; each command's name,
    built or not, appended to ``names``."""
    parser = argparse.ArgumentParser(
        prog="minidriver",
        description="Boot VMs the way Nova's libvirt driver does, on one host.",
    )
    parser.add_argument("--version", action="version", version=f"minidriver {__version__}")
    _global_options(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, parent: Any = sub, **kw: Any) -> argparse.ArgumentParser:
        if parent is sub:
            names.append(name)
        if isinstance(parent, _NotBuilt) or (parent is sub and only not in (None, name)):
            return cast(argparse.ArgumentParser, _NotBuilt())
        p: argparse.ArgumentParser = parent.add_parser(
            name, help=help_text, description=help_text, parents=[common], **kw
        )
        return p

    host = command("host", "the libvirt host").add_subparsers(
        dest="host_command", metavar="SUBCOMMAND", required=True
    )
    command("check", "can this host start a VM? libvirt, QEMU, virt_type, disk", host)
    command("list", "every configured host: URI, host UUID, free memory, instances", host)
    p = command("live-migrate", "move a running instance to another host, live")
    p.add_argument("instance")
    p.add_argument("--host", metavar="NAME", help="the destination (default: the scheduler's)")
    p = command(
        "migrate", "move an instance to another host, powered off (confirm or revert after)"
    )
    p.add_argument("instance")
    p.add_argument("--host", metavar="NAME", help="the destination (default: the scheduler's)")
    p.add_argument("--timeout", type=float, default=60, metavar="SECONDS", help="clean shutdown")
    p = command("evacuate", "rebuild an instance of a host that is down on another host")
    p.add_argument("instance")
    p.add_argument("--host", metavar="NAME", required=True, help="the host to rebuild it on")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="bound on its start")

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
    _volume_commands(command)
    return parser


def _volume_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    volume = command("volume", "volumes (Cinder's role): rbd or a libvirt pool").add_subparsers(
        dest="volume_command", metavar="SUBCOMMAND", required=True
    )
    p = command("create", "a new volume, blank or from an image", volume)
    p.add_argument("--size", type=int, required=True, metavar="GB", help="its size in GB")
    p.add_argument("--image", help="the image whose data it starts with")
    p.add_argument("--name", help="its name (default: none, as Cinder's)")
    p.add_argument(
        "--backend",
        choices=["rbd", "pool"],
        help="rbd (Ceph) or pool (a libvirt storage pool, daemon only);"
        " default: [volume] default_backend",
    )
    command("list", "list volumes and where they are attached", volume)
    command("show", "show one volume", volume).add_argument("volume")
    command("delete", "delete a volume (refused while attached)", volume).add_argument("volume")
    p = command("attach", "attach a volume to an instance (live when it runs)", volume)
    p.add_argument("instance")
    p.add_argument("volume")
    p.add_argument("--device", metavar="vdX", help="its device (default: the next free one)")
    p = command("detach", "detach a volume from an instance (waits for the guest)", volume)
    p.add_argument("instance")
    p.add_argument("volume")


def _boot_command(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("boot", "boot a new instance (or restore a clone of a template)")
    p.add_argument("--image", help="required unless --template")
    p.add_argument("--flavor", help="required unless --template")
    p.add_argument("--template", metavar="NAME", help="restore a clone of this template")
    p.add_argument("--name", help="display name (default: the image's name)")
    p.add_argument(
        "--host", metavar="NAME", help="the host to boot on (default: the scheduler's choice)"
    )
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
    p.add_argument(
        "--boot-volume", metavar="VOLUME", help="boot from this volume (made from an image)"
    )
    p.add_argument(
        "--volume-size",
        type=int,
        metavar="GB",
        help="make a volume of GB from --image first and boot from it",
    )


def _console_command(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command(
        "console",
        "print an instance's serial console log, or (--attach) type into its console",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--attach: the running guest's serial console, read-write, while its"
        " console log keeps\nbeing written. On a terminal: raw mode, every key goes to the"
        " guest; Ctrl-] detaches.\nFrom a pipe: the input is sent as it comes; after its"
        " end, output is printed until the\nconsole was quiet for --settle seconds (a"
        " \\r\\n printed as \\n when stdout is no terminal).\n--timeout bounds the whole"
        " attach (exit 3 when it passes). One client at a time:\na console held elsewhere"
        " is an error unless --force takes it over (as virsh console\n--force). On the"
        " embedded driver the state dir's libvirt is this process's while attached.",
    )
    p.add_argument("instance")
    p.add_argument("--follow", "-f", action="store_true", help="stream until interrupted")
    p.add_argument("--attach", action="store_true", help="read and write the live serial console")
    p.add_argument(
        "--force", action="store_true", help="with --attach: take the console from its holder"
    )
    p.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="with --attach: end after this long"
    )
    p.add_argument(
        "--settle",
        type=float,
        metavar="SECONDS",
        help="with --attach: once the input ended, wait for this much quiet (default 2)",
    )


def _operation_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Rescue, resize and shelve (issue 22)."""
    p = command("rescue", "boot an instance from a rescue disk, its root attached second")
    p.add_argument("instance")
    p.add_argument("--image", help="the rescue image (default: the instance's own)")
    command("unrescue", "boot a rescued instance from its own root again").add_argument("instance")
    p = command("resize", "give an instance another flavor (confirm or revert after)")
    p.add_argument("instance")
    p.add_argument("--flavor", required=True)
    p.add_argument("--timeout", type=float, default=60, metavar="SECONDS", help="clean shutdown")
    command("resize-confirm", "keep a resize: its old disks removed").add_argument("instance")
    command("resize-revert", "undo a resize: the old disks and flavor back").add_argument(
        "instance"
    )
    p = command("shelve", "snapshot an instance, then remove its domain and disks")
    p.add_argument("instance")
    p.add_argument("--timeout", type=float, default=60, metavar="SECONDS", help="clean shutdown")
    p = command("unshelve", "boot a shelved instance again from its shelve image")
    p.add_argument("instance")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="the boot's deadline")


def _instance_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    command("list", "list this state dir's instances")
    command("show", "show an instance and its image chain").add_argument("instance")
    p = command("ssh", "log into an instance (user network) with its key pair's key")
    p.add_argument("instance")
    p.add_argument("--user", help="login name (default: [DEFAULT] ssh_user)")
    p.add_argument("remote_command", nargs="*", metavar="-- COMMAND", help="run this instead")
    _console_command(command)
    p = command("delete", "delete instances (the image cache stays)")
    p.add_argument("instances", nargs="*", metavar="INSTANCE")
    p.add_argument("--all", action="store_true", help="every instance of this state dir")
    p.add_argument(
        "--delete-volume",
        action="store_true",
        help="delete a boot volume too (Nova's delete_on_termination; default: kept)",
    )
    p = command("stop", "shut an instance down: ACPI, then a hard stop after the timeout")
    p.add_argument("instance")
    p.add_argument("--force", action="store_true", help="hard stop at once")
    p.add_argument("--timeout", type=float, default=60, metavar="SECONDS")
    command("start", "start a stopped instance (a suspended one resumes)").add_argument("instance")
    command("suspend", "save the guest's memory and stop it (managed save)").add_argument(
        "instance"
    )
    command("resume", "start a suspended instance from its saved memory").add_argument("instance")
    _operation_commands(command)
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
    p.add_argument("--image", help="required unless --template")
    p.add_argument("--flavor", help="required unless --template")
    p.add_argument("--template", metavar="NAME", help="what boot --template would make")
    p.add_argument("--boot-volume", metavar="VOLUME", help="what boot --boot-volume would make")
    p.add_argument(
        "--nova",
        action="store_true",
        help="also the Nova function beside each file and each step of spawn, and where"
        " minidriver differs",
    )
    template = command("template", "a ready guest saved once, restored as clones").add_subparsers(
        dest="template_command", metavar="SUBCOMMAND", required=True
    )
    p = command("create", "save a running instance as a template (consumes it)", template)
    p.add_argument("instance")
    p.add_argument("--name", required=True, help="the template's name")
    command("list", "list templates", template)
    command("show", "show a template, its files and clones", template).add_argument("template")
    command("delete", "delete a template (refused while it has clones)", template).add_argument(
        "template"
    )
    p = command("demo", "first run: build the test guest, boot it, show it, delete it")
    p.add_argument("--timeout", type=float, default=300, metavar="SECONDS")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """argparse, but ``ssh INSTANCE [options] -- COMMAND...`` keeps the command whole:
    argparse cannot give a ``*`` positional what follows ``--`` once options came
    between the two."""
    words = sys.argv[1:] if argv is None else argv
    # Only the command named is built: the others would cost every run ~7 ms of
    # argparse (scripts/bench's machine), mostly its gettext lookups.
    parser = build_parser(named_command(words))
    args, extra = parser.parse_known_args(words)
    if extra and args.command == "ssh" and extra[0] == "--" and not args.remote_command:
        args.remote_command = extra[1:]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def key_values(items: list[str], option: str) -> dict[str, str]:
    """Repeated ``K=V`` options (``--property``, ``--meta``) as one mapping."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MinidriverError(
                f"{option} {item!r}: expected K=V", hint=f"e.g. {option} os=linux"
            )
        pairs[key] = value
    return pairs
