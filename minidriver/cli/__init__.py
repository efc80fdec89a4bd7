"""The ``minidriver`` command: parses, calls the driver, prints (novaclient's shell).

Exit codes: 0 done, 1 a clear error (one line and a hint on stderr; a traceback only
with ``--debug``), 2 usage, 3 a deadline passed; ``minidriver ssh`` exits with the
remote command's code (255: ssh itself failed); 141 when the reader of stdout went away.

Each command group is a module of this package, imported when one of its commands
runs: ``--help`` loads no driver, ``list`` no image builder.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from minidriver.cli.output import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    DeadlineExceeded,
    Output,
    UsageError,
    die,
)
from minidriver.cli.parser import parse_args
from minidriver.exception import MinidriverError

if TYPE_CHECKING:
    from minidriver.config import Config
    from minidriver.driver import LibvirtDriver
    from minidriver.host import Host

# command -> the module (of this package) whose cmd_<command> runs it
COMMANDS = {
    "boot": "boot",
    "explain": "boot",
    "demo": "boot",
    "list": "instances",
    "show": "instances",
    "console": "instances",
    "delete": "instances",
    "stop": "instances",
    "start": "instances",
    "reboot": "instances",
    "snapshot": "instances",
    "suspend": "suspend",
    "resume": "suspend",
    "rescue": "operations",
    "unrescue": "operations",
    "resize": "operations",
    "resize-confirm": "operations",
    "resize-revert": "operations",
    "shelve": "operations",
    "unshelve": "operations",
    "template": "vmtemplate",
    "ssh": "guestaccess",
    "keypair": "guestaccess",
    "image": "images",
    "flavor": "images",
    "cache": "images",
    "host": "host",
    "cleanup": "host",
    "volume": "volumes",
    "live-migrate": "hosts",
    "migrate": "hosts",
    "evacuate": "hosts",
}
# The commands that read or act on instances, and talk to libvirt anyway: each brings
# the records' power state in step with libvirt first (Nova's _sync_power_states; see
# power_sync). `console` reads the log file alone: the embedded libvirt allows one
# process at a time, and `console --follow` runs beside other commands. `boot` and
# `cleanup` are left out: a new instance has no stale record, and cleanup reconciles;
# so is `evacuate`, whose instance's host is down.
SYNCS_POWER_STATES = frozenset(
    {"list", "show", "delete", "stop", "start", "reboot", "snapshot", "suspend", "resume",
     "ssh", "rescue", "unrescue", "resize", "resize-confirm", "resize-revert", "shelve",
     "unshelve", "live-migrate"}
)  # fmt: skip


def run_command(
    args: argparse.Namespace,
    conf: Config,
    out: Output,
    host: Host | None = None,
    *,
    freeze_imports: bool = False,
) -> int:
    """Run ``args.command``. ``freeze_imports``: this process is the command (see
    ``main``), and what the command imports stays until it exits.

    The modules, classes and functions imported here live as long as the process; the
    cyclic garbage collector would walk them over and over while they load and once
    more at exit (about 25 ms of a 0.5 s ``boot`` on scripts/bench's machine). So
    collections pause while they load, and then ``gc.freeze`` moves them out of the
    collector's sight; garbage made afterwards is collected as usual.
    """
    if freeze_imports:
        gc.disable()
    try:
        from minidriver.driver import LibvirtDriver  # noqa: PLC0415 - not for --help or usage errors

        module = importlib.import_module(f"{__name__}.{COMMANDS[args.command]}")
    finally:
        if freeze_imports:
            gc.freeze()
            gc.enable()
    command: Callable[[LibvirtDriver, argparse.Namespace, Output], int]
    command = getattr(module, f"cmd_{args.command.replace('-', '_')}")
    drv = LibvirtDriver(conf, host=host)
    if conf.hosts:
        from minidriver.cli.hosts import driver_for_instance  # noqa: PLC0415 - several hosts

        drv = driver_for_instance(drv, args)
    if args.command in SYNCS_POWER_STATES:
        drv.sync_power_states()
    return command(drv, args, out)


def main(argv: Sequence[str] | None = None, *, host: Host | None = None) -> int:
    """The command. ``host`` injects a libvirt connection (tests share one across calls).

    Without ``argv`` the process is the command (its console script, ``python -m
    minidriver``) and its imports are frozen out of the garbage collector's work (see
    ``run_command``); a caller that passes ``argv`` keeps its collector as it was.
    """
    own_process = argv is None
    args = parse_args(argv)
    out = Output(args.json, stream=sys.stdout)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not args.debug:
        # The format inspector logs each refusal that we report as an error anyway.
        logging.getLogger("oslo_utils").setLevel(logging.ERROR)
    # Past parsing: every command talks to libvirt.
    import libvirt  # noqa: PLC0415

    from minidriver.config import load_config  # noqa: PLC0415

    try:
        conf = load_config(args.config, state_dir=args.state_dir)
        if args.connect:
            conf = conf.with_libvirt(connection_uri=args.connect)
        return run_command(args, conf, out, host, freeze_imports=own_process)
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
