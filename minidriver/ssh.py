"""Logging into a guest: the system ``ssh`` to its forwarded port, and the wait for it.

Guests here are throwaway: their host keys are accepted on first sight
(``StrictHostKeyChecking=accept-new``) into the state dir's own known_hosts, under the
instance's uuid (``HostKeyAlias``), so a port used again by a later guest never meets
the earlier guest's key; ``destroy`` removes the entry. ``BatchMode``: never a prompt.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from minidriver import lockutils
from minidriver.config import Config
from minidriver.db import InstanceRecord
from minidriver.exception import MinidriverError
from minidriver.keypairs import KeyPairStore

LOOPBACK = "127.0.0.1"
# RFC 4253: the server's first line, "SSH-protoversion-softwareversion"; 1.99 is a
# server that also speaks 2.0.
BANNER_PREFIXES = (b"SSH-2.0-", b"SSH-1.99-")
BANNER_MAX = 255  # RFC 4253's limit on the version line
KNOWN_HOSTS_LOCK = "known_hosts"


class SSHTimeout(MinidriverError):
    """The guest's SSH server did not answer in time."""


def ssh_argv(
    *,
    port: int,
    user: str,
    known_hosts: Path,
    host_key_alias: str,
    identity: Path | None,
    command: Sequence[str] = (),
    connect_timeout: int = 10,
) -> list[str]:
    """The ``ssh`` command line that logs into a guest (and runs ``command`` there)."""
    argv = [
        "ssh",
        "-p",
        str(port),
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        f"HostKeyAlias={host_key_alias}",
        "-o",
        "HashKnownHosts=no",  # plain entries, so that forget_host_key finds them
        "-o",
        "BatchMode=yes",
        "-o",
        f"ConnectTimeout={connect_timeout}",
        "-o",
        "LogLevel=ERROR",  # no "Permanently added ..." on every first login
    ]
    if identity is not None:
        argv += ["-i", os.fspath(identity), "-o", "IdentitiesOnly=yes"]
    argv += [f"{user}@{LOOPBACK}"]
    if command:
        argv += ["--", *command]
    return argv


def forget_host_key(known_hosts: Path, alias: str, lock_dir: Path) -> None:
    """Remove ``alias``'s entries from ``known_hosts`` (what ``ssh-keygen -R`` does,
    without its ``.old`` copy)."""
    with lockutils.external_lock(lock_dir, KNOWN_HOSTS_LOCK):
        try:
            lines = known_hosts.read_text().splitlines(keepends=True)
        except FileNotFoundError:
            return
        kept = [line for line in lines if alias not in line.split(" ", 1)[0].split(",")]
        if kept == lines:
            return
        part = known_hosts.with_name(known_hosts.name + ".part")
        part.write_text("".join(kept))
        os.replace(part, known_hosts)


def read_banner(port: int, timeout: float, host: str = LOOPBACK) -> str | None:
    """The SSH version line the server at ``host:port`` sends, or None when nothing
    answers with one (refused, closed, or silent within ``timeout``)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = b""
            # Servers may send other lines before the version line (RFC 4253 4.2).
            while len(data) < 8 * BANNER_MAX:
                chunk = sock.recv(BANNER_MAX)
                if not chunk:
                    return None
                data += chunk
                for line in data.split(b"\n")[:-1]:
                    if line.startswith(BANNER_PREFIXES):
                        return line.rstrip(b"\r").decode(errors="replace")
    except OSError:
        return None
    return None


def wait_for_banner(
    port: int,
    timeout: float,
    *,
    interval: float = 1.0,
    alive: Callable[[], bool] | None = None,
    progress: Callable[[float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Poll 127.0.0.1:``port`` until an SSH server sends its banner; return it.

    QEMU's user network accepts a connection on the forwarded port before the guest
    listens (and then closes it), so an open port is not enough: the banner is.
    ``alive`` stops the wait early when the guest has stopped.
    """
    start = clock()
    deadline = start + timeout
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            raise SSHTimeout(
                f"no SSH server answered on {LOOPBACK}:{port} within {timeout:g} s",
                hint="raise --timeout; `minidriver console` shows how far the guest got",
            )
        banner = read_banner(port, min(5.0, remaining))
        if banner is not None:
            return banner
        if alive is not None and not alive():
            raise MinidriverError(
                "the guest stopped before its SSH server answered",
                hint="see its console: minidriver console INSTANCE",
            )
        if progress is not None:
            progress(clock() - start)
        sleep(max(0.0, min(interval, deadline - clock())))


def instance_ssh_argv(
    record: InstanceRecord,
    conf: Config,
    keypairs: KeyPairStore,
    *,
    user: str | None = None,
    command: Sequence[str] = (),
) -> list[str]:
    """The ``ssh`` command line for an instance, or a clear error saying why there is
    none: no NIC, not the user network (no port on 127.0.0.1), no key."""
    who = f"instance {record.display_name}"
    if record.network_mode == "none":
        raise MinidriverError(
            f"{who} has no network interface",
            hint="boot it with --network user (the default network_mode)",
        )
    if record.network_mode != "user" or record.forward_port is None:
        raise MinidriverError(
            f"{who} is on the {record.network_mode} network {record.network_source!r}: "
            "only the user network forwards a port on 127.0.0.1",
            hint="find its address on that network, or boot with --network user",
        )
    if record.key_name is None:
        raise MinidriverError(
            f"{who} was booted without --key-name: minidriver has no key for it",
            hint=f"boot with --key-name NAME (minidriver keypair create NAME), or run "
            f"ssh -p {record.forward_port} USER@{LOOPBACK} with your own key",
        )
    keypair = keypairs.get(record.key_name)
    return ssh_argv(
        port=record.forward_port,
        user=user or conf.default.ssh_user,
        known_hosts=conf.known_hosts_path,
        host_key_alias=record.uuid,
        # An imported public key: its private half is the user's, in ~/.ssh or an agent.
        identity=keypair.private_key,
        command=command,
    )
