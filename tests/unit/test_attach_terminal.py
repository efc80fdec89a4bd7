"""``console --attach``'s loop and terminal handling, on a real pty (``os.openpty``):
the user types on the pty's master side, the loop runs on its terminal side.

The console is the real :class:`ConsoleBuffer` that libvirt's event loop feeds in
``SerialConsole`` (fed here by a thread, as there); what the loop sends to the guest
is recorded (libvirt's test driver has no console API: the stream itself is exercised
on the test guest in tests/integration/test_console_attach.py).
"""

from __future__ import annotations

import os
import select
import signal
import termios
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from test_vmtemplate import template_record

from minidriver.cli import main
from minidriver.cli.attach import End, Terminated, attach, raw_terminal
from minidriver.config import Config
from minidriver.driver import LibvirtDriver
from minidriver.serial_console import ConsoleBuffer, ConsoleClosed
from minidriver.vmtemplate import Templates


class BufferConsole:
    """A console whose guest side is this test: what the guest prints is fed into a
    real ConsoleBuffer; what the loop writes is kept in ``sent``."""

    def __init__(self) -> None:
        self.buffer = ConsoleBuffer("vm")
        self.sent = bytearray()
        self.wrote = threading.Event()

    def fileno(self) -> int:
        return self.buffer.fileno()

    def read(self, timeout: float) -> bytes:
        return self.buffer.read(timeout)

    def write(self, data: bytes, timeout: float = 10) -> None:
        self.sent += data
        self.wrote.set()


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    master, terminal = os.openpty()
    yield master, terminal
    os.close(master)
    os.close(terminal)


@pytest.fixture
def guest() -> Iterator[BufferConsole]:
    console = BufferConsole()
    yield console
    console.buffer.close()


def later(action: Callable[[], None], delay: float = 0.2) -> threading.Thread:
    """``action`` in another thread after ``delay`` (the user, or the guest)."""

    def run() -> None:
        time.sleep(delay)
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def read_master(master: int, until: bytes, timeout: float = 10) -> bytes:
    """What the terminal showed, read from the pty's master until ``until`` came."""
    deadline = time.monotonic() + timeout
    shown = b""
    while until not in shown:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"the terminal showed {shown!r}, never {until!r}"
        if select.select([master], [], [], remaining)[0]:
            shown += os.read(master, 4096)
    return shown


def is_raw(attrs: list[object]) -> bool:
    lflag = attrs[3]
    assert isinstance(lflag, int)
    return not lflag & (termios.ECHO | termios.ICANON | termios.ISIG)


def test_keys_go_raw_to_the_guest_until_ctrl_bracket_then_the_terminal_is_restored(
    pty: tuple[int, int], guest: BufferConsole
) -> None:
    master, terminal = pty
    before = termios.tcgetattr(terminal)
    seen: dict[str, object] = {}

    def user() -> None:
        seen["raw"] = is_raw(termios.tcgetattr(terminal))
        os.write(master, b"ls\r\x03")  # Enter and Ctrl-C are the guest's keys now
        assert guest.wrote.wait(10)
        guest.buffer.feed(b"ls\r\nbin  etc\r\nminidriver-guest$ ")
        seen["shown"] = read_master(master, b"minidriver-guest$ ")
        os.write(master, b"pwd\x1dnever sent")

    thread = later(user)
    with raw_terminal(terminal):
        end = attach(guest, terminal, terminal, timeout=60)
    thread.join()
    assert end is End.DETACHED
    assert seen["raw"] is True
    assert bytes(guest.sent) == b"ls\r\x03pwd"  # nothing after Ctrl-]
    # A terminal gets the guest's bytes as they are (its own "\r\n").
    assert seen["shown"] == b"ls\r\nbin  etc\r\nminidriver-guest$ "
    assert termios.tcgetattr(terminal) == before


def test_the_terminal_is_restored_when_the_guest_stops(
    pty: tuple[int, int], guest: BufferConsole
) -> None:
    master, terminal = pty
    before = termios.tcgetattr(terminal)
    guest.buffer.feed(b"minidriver-guest: power-button, powering off\r\n")
    thread = later(lambda: guest.buffer.end("the console stream ended"))
    with pytest.raises(ConsoleClosed, match="the console stream ended"), raw_terminal(terminal):
        attach(guest, terminal, terminal, timeout=60)
    thread.join()
    assert termios.tcgetattr(terminal) == before
    # What the guest printed before it stopped was shown first.
    assert read_master(master, b"powering off\r\n").endswith(b"powering off\r\n")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_the_terminal_is_restored_on_sigterm_and_sighup(
    pty: tuple[int, int], guest: BufferConsole, signum: int
) -> None:
    _, terminal = pty
    before = termios.tcgetattr(terminal)
    handler = signal.getsignal(signum)
    thread = later(lambda: os.kill(os.getpid(), signum))
    with pytest.raises(Terminated) as caught, raw_terminal(terminal):
        attach(guest, terminal, terminal, timeout=60)
    thread.join()
    assert caught.value.signum == signum
    assert termios.tcgetattr(terminal) == before
    assert signal.getsignal(signum) == handler


def test_the_terminal_is_restored_when_the_timeout_passes(
    pty: tuple[int, int], guest: BufferConsole
) -> None:
    _, terminal = pty
    before = termios.tcgetattr(terminal)
    started = time.monotonic()
    with raw_terminal(terminal):
        end = attach(guest, terminal, terminal, timeout=0.5)
    assert end is End.DEADLINE
    assert 0.5 <= time.monotonic() - started < 10
    assert termios.tcgetattr(terminal) == before


def test_piped_input_is_sent_then_output_shown_until_the_console_settles(
    guest: BufferConsole,
) -> None:
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    # Ctrl-] is data in a pipe: only a terminal's user detaches with it.
    os.write(stdin_w, b"echo hi\n\x1d")
    os.close(stdin_w)
    # The guest answers after the input ended, a "\r\n" split across two chunks.

    answered: list[float] = []

    def answer() -> None:
        guest.buffer.feed(b"echo hi\r")
        guest.buffer.feed(b"\nhi\r\n$ ")
        answered.append(time.monotonic())

    feeder = later(answer)
    end = attach(guest, stdin_r, stdout_w, escape=None, settle=1, crlf_to_lf=True, timeout=60)
    ended = time.monotonic()
    feeder.join()
    os.close(stdin_r)
    os.close(stdout_w)
    with os.fdopen(stdout_r, "rb") as out:
        shown = out.read()
    assert end is End.SETTLED
    assert bytes(guest.sent) == b"echo hi\n\x1d"
    assert shown == b"echo hi\nhi\n$ "
    # The second of quiet is counted from the last output, not from the attach (which
    # a loaded machine may start after the answer).
    assert ended - answered[0] >= 1


def command(
    drv: LibvirtDriver, conf: Config, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str]:
    """``minidriver ARGV`` on the test's own connection: its exit code and stderr."""
    capsys.readouterr()
    try:
        code = main(["--state-dir", str(conf.state_path), *argv], host=drv.host)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_attach_says_clearly_why_it_cannot(
    drv: LibvirtDriver, conf: Config, empty_qcow2_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = drv.spawn("web", empty_qcow2_id, "t1.nano")
    # libvirt's test driver runs the domain but has no console API.
    code, err = command(drv, conf, capsys, "console", "web", "--attach")
    assert code == 1 and "this libvirt connection has no console API" in err
    code, err = command(drv, conf, capsys, "console", "web", "--attach", "--json")
    assert code == 2 and "no --json" in err
    code, err = command(drv, conf, capsys, "console", "web", "--attach", "--follow")
    assert code == 2 and "not both" in err
    for option in (["--force"], ["--timeout", "5"], ["--settle", "1"]):
        code, err = command(drv, conf, capsys, "console", "web", *option)
        assert code == 2 and f"{option[0]} goes with --attach" in err
    drv.suspend(inst.uuid)
    code, err = command(drv, conf, capsys, "console", "web", "--attach")
    assert code == 1 and "instance web is suspended" in err
    assert "minidriver resume web" in err
    drv.resume(inst.uuid)
    drv.power_off(inst.uuid, force=True)
    code, err = command(drv, conf, capsys, "console", "web", "--attach")
    assert code == 1 and "instance web is shutoff" in err and "minidriver start web" in err
    # Its log is still there to read.
    assert command(drv, conf, capsys, "console", "web")[0] == 0


def test_attach_to_a_template_says_to_boot_a_clone(
    drv: LibvirtDriver, conf: Config, empty_qcow2_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The test driver's save image is no QEMU one, which template create checks: the
    # record is made as create makes it.
    source = drv.db.get_instance(drv.spawn("base", empty_qcow2_id, "t1.nano").uuid)
    Templates(drv)._insert(template_record(drv, source, "active"))
    code, err = command(drv, conf, capsys, "console", "tpl", "--attach")
    assert code == 1 and "'tpl' is a template" in err
    assert "minidriver boot --template tpl" in err
    code, err = command(drv, conf, capsys, "console", "nothing-of-that-name", "--attach")
    assert code == 1 and "no instance matches 'nothing-of-that-name'" in err
