"""A running guest's serial console, live, through libvirt's console API (Nova's
nearest: the driver's ``get_serial_console``, which gives nova-serialproxy the address
of a TCP serial port; this is the stream ``virsh console`` uses instead).

``SerialConsole.open(domain)`` opens the domain's console (``virDomainOpenConsole``)
on a non-blocking ``virStream``. libvirt's event loop (the thread ``host.py`` runs)
calls back whenever the stream is readable, and the bytes are kept until read, so a
read waits on a condition with a deadline and never blocks the loop. The same code
works on the daemon (the stream is a remote one) and on the embedded driver (a pty
read by the process itself). Both kinds of reader are served:

* a test: ``send_line("echo $((6*7))")``, then ``read_until(r"^42\\n", timeout=10)``;
  ``read_until`` sees the text with the terminal's ``\\r\\n`` line ends as ``\\n``;
* an interactive terminal: ``write(keys)`` and ``read(timeout)``, raw bytes as they
  come, to be shown as they are; ``fileno()`` is readable whenever unread bytes wait
  (or the stream ended), so that one ``select`` watches the console and the keyboard
  (``cli/attach.py``, ``console --attach``).

The console log (the serial's ``<log>`` file) keeps recording meanwhile: QEMU writes
the serial's output there whoever reads the pty.

libvirt lets one client hold a console at a time: a second ``open`` fails with
:class:`ConsoleBusy`, unless ``force=True`` (libvirt's ``VIR_DOMAIN_CONSOLE_FORCE``),
which takes it over and ends the first client's stream (:class:`ConsoleClosed`
there). A stopped domain ends the stream too.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import libvirt

from minidriver.exception import MinidriverError

# Bytes kept unread at most: a guest that writes while nobody reads (a boot, a loop)
# must not fill our memory; the oldest go first.
MAX_PENDING = 4 * 1024 * 1024
_CHUNK = 65536
# How long a write waits, in steps, for a full stream to drain.
_WRITE_RETRY = 0.01


class SerialConsoleError(MinidriverError):
    """The serial console could not be opened or used."""


class ConsoleBusy(SerialConsoleError):
    """Another client holds the console."""


class ConsoleClosed(SerialConsoleError):
    """The console's stream ended: the domain stopped, or another client took it."""

    def __init__(self, message: str, received: str = "", *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.received = received  # the text that came and was not read


class SerialConsoleTimeout(SerialConsoleError):
    """The awaited text did not come before the deadline."""

    def __init__(self, message: str, received: str) -> None:
        super().__init__(message)
        self.received = received  # what came meanwhile (unread: a later read sees it)


def normalize(raw: bytes) -> str:
    """The text a terminal shows for ``raw``: ``\\r\\n`` as ``\\n``; bytes that are not
    UTF-8 kept as surrogates, so that the text maps back to the bytes exactly."""
    return raw.decode("utf-8", "surrogateescape").replace("\r\n", "\n")


def raw_length(raw: bytes, chars: int) -> int:
    """How many bytes of ``raw`` the first ``chars`` characters of ``normalize(raw)`` are."""
    used = 0
    for i, line in enumerate(raw.split(b"\r\n")):
        if i:
            if chars == 0:
                return used
            chars -= 1  # the "\n" that stood for this "\r\n"
            used += 2
        text = line.decode("utf-8", "surrogateescape")
        if chars <= len(text):
            return used + len(text[:chars].encode("utf-8", "surrogateescape"))
        chars -= len(text)
        used += len(line)
    return used


class ConsoleBuffer:
    """What a console stream brought and nobody has read yet: fed by libvirt's event
    loop thread, read by the caller's, who waits on it with a deadline.

    Bytes kept unread are capped at ``limit``: a guest that writes while nobody reads
    (a boot, a loop) must not fill our memory; the oldest go first.
    """

    def __init__(
        self,
        name: str,
        *,
        limit: int = MAX_PENDING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name  # the domain's, for messages
        self.limit = limit
        self._clock = clock
        self._pending = bytearray()
        self._cond = threading.Condition()
        self._ended: str | None = None
        # The pipe behind fileno(), made on first use: it holds one byte exactly while
        # something is there to read (bytes, or the end), so a select() on it wakes.
        self._wake: tuple[int, int] | None = None
        self._wake_set = False

    def fileno(self) -> int:
        """A descriptor readable while unread bytes wait or the stream has ended."""
        with self._cond:
            if self._wake is None:
                self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._wake_set = False
                self._update_wake()
            return self._wake[0]

    def close(self) -> None:
        """Close ``fileno()``'s pipe, if it was made."""
        with self._cond:
            if self._wake is not None:
                for fd in self._wake:
                    os.close(fd)
                self._wake = None

    def _update_wake(self) -> None:
        """With the lock held: the pipe readable exactly when a read would not wait."""
        ready = bool(self._pending) or self._ended is not None
        if self._wake is None or ready == self._wake_set:
            return
        if ready:
            os.write(self._wake[1], b"\0")
        else:
            os.read(self._wake[0], 1)
        self._wake_set = ready

    def feed(self, data: bytes) -> None:
        with self._cond:
            self._pending += data
            if len(self._pending) > self.limit:
                del self._pending[: len(self._pending) - self.limit]
            self._update_wake()
            self._cond.notify_all()

    def end(self, why: str) -> None:
        """No more will come (the first reason given is kept); readers wake up."""
        with self._cond:
            self._ended = self._ended or why
            self._update_wake()
            self._cond.notify_all()

    @property
    def ended(self) -> str | None:
        """Why the stream ended; None while it runs (unread bytes may remain)."""
        with self._cond:
            return self._ended

    def read(self, timeout: float) -> bytes:
        """The bytes that came, as soon as any are there (``b""`` when none came
        within ``timeout``); once the stream has ended and all was read, raises
        :class:`ConsoleClosed`."""
        deadline = self._clock() + timeout
        with self._cond:
            while not self._pending:
                if self._ended is not None:
                    raise ConsoleClosed(self._ended)
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return b""
                self._cond.wait(remaining)
            data = bytes(self._pending)
            self._pending.clear()
            self._update_wake()
            return data

    def read_until(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until the unread text matches ``pattern`` (multi-line: ``^`` and ``$``
        at line ends), and read it up to the match's end; the rest stays unread.
        As in any expect tool, ``$`` also matches at the end of what came so far (a
        prompt ends there): to wait for a whole line, end the pattern with ``\\n``.
        Raises :class:`SerialConsoleTimeout` past ``timeout``, :class:`ConsoleClosed`
        when the stream ends first."""
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = self._clock() + timeout
        with self._cond:
            while True:
                raw = bytes(self._pending)
                match = regex.search(normalize(raw))
                if match:
                    del self._pending[: raw_length(raw, match.end())]
                    self._update_wake()
                    return match
                if self._ended is not None:
                    raise ConsoleClosed(
                        f"{self._ended} before it matched {regex.pattern!r}", normalize(raw)
                    )
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise SerialConsoleTimeout(
                        f"the console of {self.name} did not match {regex.pattern!r}"
                        f" within {timeout:g} s",
                        normalize(raw),
                    )
                self._cond.wait(remaining)

    def text(self) -> str:
        """The unread text, left unread."""
        with self._cond:
            return normalize(bytes(self._pending))

    def discard(self) -> str:
        """Read and return everything unread."""
        with self._cond:
            text = normalize(bytes(self._pending))
            self._pending.clear()
            self._update_wake()
            return text


class SerialConsole:
    """One open console stream of one domain; close it (or use ``with``) when done."""

    def __init__(
        self,
        domain: libvirt.virDomain,
        stream: libvirt.virStream,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.domain = domain
        self._stream = stream
        self._clock = clock
        self._buffer = ConsoleBuffer(domain.name(), clock=clock)
        self._closed = False

    @classmethod
    def open(
        cls,
        domain: libvirt.virDomain,
        *,
        force: bool = False,
        device: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> SerialConsole:
        """Open ``domain``'s console (``device``: a console or serial alias, default the
        first console). The connection's libvirt event loop must be running (``Host``
        starts it before it connects)."""
        name = domain.name()
        stream = domain.connect().newStream(libvirt.VIR_STREAM_NONBLOCK)
        flags = libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else 0
        try:
            domain.openConsole(device, stream, flags)
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise _open_error(domain, name, exc) from exc
        console = cls(domain, stream, clock=clock)
        events = (
            libvirt.VIR_STREAM_EVENT_READABLE
            | libvirt.VIR_STREAM_EVENT_ERROR
            | libvirt.VIR_STREAM_EVENT_HANGUP
        )
        try:
            stream.eventAddCallback(events, console._on_event, None)
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise SerialConsoleError(
                f"cannot watch the console stream of {name}: {exc.get_error_message()}"
            ) from exc
        return console

    # -- the event loop's side ---------------------------------------------------

    def _on_event(self, stream: libvirt.virStream, events: int, _opaque: Any) -> None:
        ended: str | None = None
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            ended = self._drain(stream)
        if ended is None and events & (
            libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
        ):
            ended = "the console stream was hung up"
        if ended is not None:
            with contextlib.suppress(libvirt.libvirtError):
                stream.eventRemoveCallback()
            self._buffer.end(ended)

    def _drain(self, stream: libvirt.virStream) -> str | None:
        """Read what the stream has; why it ended, if it did."""
        while True:
            try:
                data = stream.recv(_CHUNK)
            except libvirt.libvirtError as exc:
                return f"the console stream failed: {exc.get_error_message()}"
            if isinstance(data, int):  # -2: nothing more for now
                return None
            if not data:
                return "the console stream ended"
            self._buffer.feed(data)

    # -- the caller's side --------------------------------------------------------

    def write(self, data: bytes, timeout: float = 10) -> None:
        """Send ``data`` to the guest, all of it, or raise before ``timeout`` passes."""
        deadline = self._clock() + timeout
        view = memoryview(data)
        while view:
            self._check_usable()
            try:
                sent = self._stream.send(bytes(view))
            except libvirt.libvirtError as exc:
                raise self._closed_error(f"cannot write: {exc.get_error_message()}") from exc
            if sent > 0:
                view = view[sent:]
                continue
            if self._clock() >= deadline:
                raise SerialConsoleTimeout(
                    f"the console of {self.domain.name()} took no input for {timeout:g} s",
                    self._buffer.text(),
                )
            time.sleep(_WRITE_RETRY)

    def send_line(self, line: str, timeout: float = 10) -> None:
        """``line`` and a line end, as Enter on a terminal sends it."""
        self.write(line.encode() + b"\n", timeout)

    def read(self, timeout: float) -> bytes:
        """The bytes that came, raw, as soon as any are there (``b""`` when none came
        within ``timeout``); raises :class:`ConsoleClosed` once the stream has ended
        and everything was read."""
        self._check_open()
        try:
            return self._buffer.read(timeout)
        except ConsoleClosed as end:
            raise self._closed_error(end.message) from None

    def read_until(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until the unread text matches ``pattern`` (multi-line: ``^`` and ``$``
        at line ends; ``$`` also at the end of what came so far, so end a pattern
        with ``\\n`` to wait for a whole line), and read it up to the match's end;
        the rest stays unread.

        Raises :class:`SerialConsoleTimeout` past ``timeout``, :class:`ConsoleClosed`
        when the stream ends first; both carry the text that came (still unread).
        """
        self._check_open()
        try:
            return self._buffer.read_until(pattern, timeout)
        except ConsoleClosed as end:
            raise self._closed_error(end.message, end.received) from None

    def text(self) -> str:
        """The unread text, left unread."""
        return self._buffer.text()

    def discard(self) -> str:
        """Read and return everything unread (e.g. what came before a command)."""
        return self._buffer.discard()

    def fileno(self) -> int:
        """A descriptor that is readable while unread bytes wait or the stream has
        ended (then ``read`` returns at once): for a ``select`` beside other files."""
        self._check_open()
        return self._buffer.fileno()

    @property
    def ended(self) -> bool:
        """Whether the stream has ended (unread bytes may remain)."""
        return self._buffer.ended is not None

    def close(self) -> None:
        """Stop the stream and let another client open the console; twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._buffer.end("closed")
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.eventRemoveCallback()
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()
        self._buffer.close()

    def __enter__(self) -> SerialConsole:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- errors -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SerialConsoleError(f"the console of {self.domain.name()} is closed")

    def _check_usable(self) -> None:
        self._check_open()
        ended = self._buffer.ended
        if ended is not None:
            raise self._closed_error(ended)

    def _closed_error(self, why: str, received: str = "") -> ConsoleClosed:
        """Why the stream ended, as the user sees it: the domain stopped, or (still
        running) libvirt gave the console to a client that forced it."""
        name = self.domain.name()
        if self._closed:
            return ConsoleClosed(f"the console of {name} was closed meanwhile", received)
        try:
            running = bool(self.domain.isActive())
        except libvirt.libvirtError:
            running = False
        if not running:
            return ConsoleClosed(f"{name} stopped: {why}", received)
        return ConsoleClosed(
            f"the console of {name} was taken: {why}",
            received,
            hint="another client opened it with force (virsh console --force, or"
            " force=True); open it again to take it back",
        )


def _open_error(domain: libvirt.virDomain, name: str, exc: libvirt.libvirtError) -> Exception:
    code = exc.get_error_code()
    if code == libvirt.VIR_ERR_NO_SUPPORT:
        return SerialConsoleError(
            f"this libvirt connection has no console API ({exc.get_error_message()})",
            hint="libvirt's test driver has none; use the QEMU driver (daemon or embedded)",
        )
    try:
        running = bool(domain.isActive())
    except libvirt.libvirtError:
        running = False
    if not running:
        return SerialConsoleError(
            f"{name} is not running: it has no console to open",
            hint="start it first (minidriver start)",
        )
    if code == libvirt.VIR_ERR_OPERATION_FAILED:
        # What libvirt's QEMU driver reports when another client holds the console.
        return ConsoleBusy(
            f"another client holds the console of {name} ({exc.get_error_message()})",
            hint="close it (leave virsh console with Ctrl-]), or take it over with"
            " force=True (libvirt's VIR_DOMAIN_CONSOLE_FORCE)",
        )
    return SerialConsoleError(f"cannot open the console of {name}: {exc.get_error_message()}")
