"""The only way minidriver runs another program.

Argument lists only (never a shell), ``os.fspath`` on every argument, ``LC_ALL=C`` so
that output can be parsed, the command line logged at debug level, exit codes checked.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from minidriver.exception import ProcessExecutionError

LOG = logging.getLogger(__name__)

Arg = str | os.PathLike[str]


@dataclass(frozen=True)
class ResourceLimits:
    """Limits for a child process (oslo.concurrency's ``ProcessLimits``, as Nova uses
    them for qemu-img).

    Applied with util-linux's ``prlimit`` in front of the command rather than a
    ``preexec_fn``, which is unsafe in a process with threads (libvirt's event loop).
    """

    cpu_time: int | None = None  # seconds
    address_space: int | None = None  # bytes

    def prefix(self) -> list[str]:
        args = ["prlimit"]
        if self.cpu_time is not None:
            args.append(f"--cpu={self.cpu_time}")
        if self.address_space is not None:
            args.append(f"--as={self.address_space}")
        return [*args, "--"] if len(args) > 1 else []


@dataclass(frozen=True)
class Completed:
    """What a finished program left: its exit code and its output as text."""

    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str


def _environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env.pop("LANGUAGE", None)
    if extra:
        env.update(extra)
    return env


def run(
    args: Sequence[Arg],
    *,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Arg | None = None,
    timeout: float | None = None,
    limits: ResourceLimits | None = None,
    umask: int | None = None,
) -> Completed:
    """Run ``args`` and wait for it; ``umask`` is the program's (ours when None).

    Raises :class:`ProcessExecutionError` when the program is missing, exceeds
    ``timeout``, or (with ``check``) exits non-zero. Output is captured and decoded
    leniently: these programs print paths and sizes, not text to preserve exactly.
    """
    cmd = (limits.prefix() if limits else []) + [os.fspath(a) for a in args]
    LOG.debug("running: %s", shlex.join(cmd))
    try:
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            env=_environment(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
            umask=-1 if umask is None else umask,
        )
    except FileNotFoundError as exc:
        raise ProcessExecutionError(
            f"{cmd[0]} not found",
            cmd=cmd,
            hint="install it (scripts/setup-host installs everything minidriver runs)",
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ProcessExecutionError(
            f"{cmd[0]} did not finish within {timeout:g} s", cmd=cmd
        ) from exc
    stdout = proc.stdout.decode(errors="replace")
    stderr = proc.stderr.decode(errors="replace")
    if check and proc.returncode != 0:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}"
        if proc.returncode < 0:
            detail = f"killed by signal {-proc.returncode}"
        raise ProcessExecutionError(
            f"{os.path.basename(cmd[0])} failed: {detail}",
            cmd=cmd,
            exit_code=proc.returncode,
            stdout=stdout,
            stderr=stderr,
        )
    return Completed(cmd=cmd, returncode=proc.returncode, stdout=stdout, stderr=stderr)


def run_attached(args: Sequence[Arg]) -> int:
    """Run ``args`` on this terminal (stdin, stdout, stderr inherited) and return its
    exit code unchecked: for ``minidriver ssh``, whose exit code is the remote one.
    The user's locale is kept: the output is theirs to read, not ours to parse."""
    cmd = [os.fspath(a) for a in args]
    LOG.debug("running: %s", shlex.join(cmd))
    try:
        return subprocess.run(cmd, check=False).returncode
    except FileNotFoundError as exc:
        raise ProcessExecutionError(
            f"{cmd[0]} not found",
            cmd=cmd,
            hint="install it (scripts/setup-host installs openssh-client)",
        ) from exc
