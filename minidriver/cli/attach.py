"""``console INSTANCE --attach``: the guest's serial console read and written from
this terminal or a pipe (virsh console's loop; Nova has none: its serial console is
nova-serialproxy's websocket to a TCP serial port, ``nova/console/websocketproxy.py``).

One ``select`` watches the keyboard (or the pipe) and the console (its ``fileno()``,
readable while the guest's output waits). On a terminal, the terminal is raw while
attached, so every key (Ctrl-C, Ctrl-D, Ctrl-Z too) reaches the guest, except Ctrl-]
that detaches, as in virsh; its settings come back however the attach ends (detach,
the guest stopping, an error, SIGTERM or SIGHUP). From a pipe, the input is sent as
it comes; once it ends, output is still shown until none came for ``settle`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Protocol

from minidriver import vm_states
from minidriver.cli.output import EXIT_OK, EXIT_TIMEOUT, Output, UsageError
from minidriver.db import InstanceRecord
from minidriver.driver import LibvirtDriver
from minidriver.exception import InstanceNotFound, MinidriverError
from minidriver.serial_console import ConsoleBusy
from minidriver.vmtemplate import TemplateNotFound, Templates

ESCAPE = b"\x1d"  # Ctrl-], virsh console's
DEFAULT_SETTLE = 2.0
_CHUNK = 4096


class Console(Protocol):
    """What the loop needs of a console: ``serial_console.SerialConsole`` is one."""

    def fileno(self) -> int: ...

    def read(self, timeout: float) -> bytes: ...

    def write(self, data: bytes, timeout: float = 10) -> None: ...


class End(enum.StrEnum):
    """Why an attach ended, when it ended as asked (a closed console raises)."""

    DETACHED = "detached"  # Ctrl-] on the terminal
    SETTLED = "settled"  # the input ended, then the console was quiet for settle s
    DEADLINE = "deadline"  # timeout passed


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while attached (raised so that the terminal is
    restored on the way out; the command then exits 128 + the signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The terminal ``fd`` in raw mode (no echo, no line editing, no signal keys, no
    output processing), its settings restored on the way out, whatever the way; SIGTERM
    and SIGHUP leave through here too (:class:`Terminated`) instead of killing the
    process with the terminal still raw."""
    saved = termios.tcgetattr(fd)

    def leave(signum: int, _frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        # After a hang-up the terminal may be gone: nothing left to restore then.
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Writer:
    """Writes the console's bytes to ``fd``, all of them; with ``crlf_to_lf`` a
    ``\\r\\n`` becomes ``\\n`` (for a file or a pipe: the guest's terminal ends its
    lines with both), a ``\\r`` that ends a chunk held back until the next one."""

    def __init__(self, fd: int, *, crlf_to_lf: bool) -> None:
        self.fd = fd
        self.crlf_to_lf = crlf_to_lf
        self._held = b""

    def write(self, data: bytes) -> None:
        if self.crlf_to_lf:
            data = (self._held + data).replace(b"\r\n", b"\n")
            self._held = b""
            if data.endswith(b"\r"):
                data, self._held = data[:-1], b"\r"
        self._write_all(data)

    def flush(self) -> None:
        data, self._held = self._held, b""
        self._write_all(data)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]


def attach(
    console: Console,
    stdin: int,
    stdout: int,
    *,
    escape: bytes | None = ESCAPE,
    settle: float = DEFAULT_SETTLE,
    timeout: float | None = None,
    crlf_to_lf: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> End:
    """Copy ``stdin`` to the console and the console to ``stdout`` until one of:

    * ``escape`` comes in the input (what came before it is sent): ``DETACHED``;
    * the input ended and the console then wrote nothing for ``settle`` seconds:
      ``SETTLED``;
    * ``timeout`` seconds passed (None: no limit): ``DEADLINE``.

    A console that closes (the guest stopped, another client took it) raises its
    ``ConsoleClosed`` once everything it wrote is out.
    """
    out = _Writer(stdout, crlf_to_lf=crlf_to_lf)
    deadline = None if timeout is None else clock() + timeout
    input_open = True
    last_output = clock()
    try:
        while True:
            now = clock()
            waits = []
            if deadline is not None:
                if now >= deadline:
                    return End.DEADLINE
                waits.append(deadline - now)
            if not input_open:
                if now >= last_output + settle:
                    return End.SETTLED
                waits.append(last_output + settle - now)
            watched = [console.fileno(), *([stdin] if input_open else [])]
            readable, _, _ = select.select(watched, [], [], min(waits) if waits else None)
            if console.fileno() in readable:
                data = console.read(0)  # ConsoleClosed ends the attach here
                if data:
                    out.write(data)
                    last_output = clock()
            if stdin in readable:
                data = os.read(stdin, _CHUNK)
                if not data:
                    input_open = False
                    last_output = clock()  # the settle time counts from here at least
                elif _send(console, data, escape):
                    return End.DETACHED
    finally:
        out.flush()


def _send(console: Console, data: bytes, escape: bytes | None) -> bool:
    """Send the input ``data`` up to ``escape``; True when it held the escape."""
    if escape is not None and escape in data:
        before = data[: data.index(escape)]
        if before:
            console.write(before)
        return True
    console.write(data)
    return False


def _find_instance(drv: LibvirtDriver, ref: str) -> InstanceRecord:
    """The instance ``ref`` names; a template's name gets an error of its own."""
    try:
        return drv.db.find_instance(ref)
    except InstanceNotFound:
        try:
            template = Templates(drv).find(ref)
        except TemplateNotFound:
            template = None
        if template is None:
            raise
        raise MinidriverError(
            f"{ref!r} is a template: its guest is saved memory, with no console running",
            hint=f"boot a clone (minidriver boot --template {template.name}) and attach to that",
        ) from None


def cmd_attach(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    """``console INSTANCE --attach``: on a terminal, raw until Ctrl-]; from a pipe,
    until the input ended and the console settled; exit 3 when ``--timeout`` passed."""
    if out.json:
        raise UsageError("console --attach is a live session: it has no --json output")
    if args.follow:
        raise UsageError("give --attach or --follow, not both")
    record = _find_instance(drv, args.instance)
    state = drv.get_info(record.uuid).state
    if record.vm_state == vm_states.VMState.SUSPENDED:
        raise MinidriverError(
            f"instance {record.display_name} is suspended: its memory is saved and no"
            " guest runs to talk to",
            hint=f"resume it first (minidriver resume {record.display_name})",
        )
    if state != "running":
        raise MinidriverError(
            f"instance {record.display_name} is {state}: only a running guest has a console"
            " to attach to",
            hint=f"start it first (minidriver start {record.display_name}); its console"
            f" log stays readable (minidriver console {record.display_name})",
        )
    try:
        console = drv.open_serial_console(record.uuid, force=args.force)
    except ConsoleBusy as exc:
        raise MinidriverError(
            f"the console of {record.display_name} is busy: another client holds it",
            hint="detach that client (Ctrl-] in virsh console or minidriver), or take the"
            " console over with --force (as virsh console --force): the other session ends",
        ) from exc
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    terminal = os.isatty(stdin)
    sys.stdout.flush()
    with console:
        if terminal:
            print(
                f"connected to the console of {record.display_name} ({record.name});"
                " Ctrl-] detaches",
                file=sys.stderr,
            )
        try:
            with raw_terminal(stdin) if terminal else contextlib.nullcontext():
                end = attach(
                    console,
                    stdin,
                    stdout,
                    escape=ESCAPE if terminal else None,
                    settle=DEFAULT_SETTLE if args.settle is None else args.settle,
                    timeout=args.timeout,
                    crlf_to_lf=not os.isatty(stdout),
                )
        except Terminated as exc:
            return 128 + exc.signum
    if end is End.DETACHED:
        print(f"\ndetached from the console of {record.display_name}", file=sys.stderr)
    elif end is End.DEADLINE:
        print(
            f"minidriver: the attach to {record.display_name} ended at its --timeout"
            f" of {args.timeout:g} s",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    return EXIT_OK
