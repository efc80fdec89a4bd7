"""Getting into a guest: ssh, boot's --wait-ssh, and the key pairs whose keys the
guest trusts (novaclient's ``do_keypair_add``, ``do_keypair_list``, ...).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from minidriver import process, ssh
from minidriver.cli.output import EXIT_OK, DeadlineExceeded, Output, UsageError, format_table
from minidriver.driver import LibvirtDriver
from minidriver.exception import MinidriverError
from minidriver.network import NetworkMode, NetworkRequest
from minidriver.objects import Instance


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
