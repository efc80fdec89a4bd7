"""The serial console's reading side, and what libvirt's test driver says to it.

libvirt's ``test:///`` driver has no console API (``virDomainOpenConsole`` is not
supported there), so the stream itself is exercised on the test guest under QEMU
(tests/integration/test_guest_console.py); here the buffer that a stream feeds is
fed by a real thread, as libvirt's event loop feeds it, and read with deadlines.
"""

from __future__ import annotations

import select
import threading
import time

import pytest

from minidriver.driver import LibvirtDriver
from minidriver.serial_console import (
    ConsoleBuffer,
    ConsoleClosed,
    SerialConsoleError,
    SerialConsoleTimeout,
    normalize,
    raw_length,
)


def feed_later(buffer: ConsoleBuffer, *chunks: bytes, delay: float = 0.05) -> threading.Thread:
    """Feed ``chunks`` from another thread, ``delay`` seconds apart (as the event loop)."""

    def feed() -> None:
        for chunk in chunks:
            time.sleep(delay)
            buffer.feed(chunk)

    thread = threading.Thread(target=feed)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "raw",
    [
        b"abc",
        b"line one\r\nline two\r\n",
        b"\r\n\r\nx\r",
        "caf\u00e9\r\nna\u00efve\r\n".encode(),
        b"\xff\xfe half \xe2\x82\r\n",
    ],
)
def test_each_prefix_of_the_text_maps_back_to_its_bytes(raw: bytes) -> None:
    text = normalize(raw)
    assert "\r\n" not in text
    for chars in range(len(text) + 1):
        used = raw_length(raw, chars)
        assert normalize(raw[:used]) == text[:chars]


def test_read_until_waits_across_chunks_and_leaves_the_rest_unread() -> None:
    buffer = ConsoleBuffer("vm")
    # The match needs all three chunks; the line end arrives split in two.
    thread = feed_later(buffer, b"echo $((6*7))\r\n4", b"2\r", b"\nminidriver-guest$ ")
    started = time.monotonic()
    match = buffer.read_until(r"^(\d+)\n", timeout=10)  # "$" would take the "4" alone
    assert match.group(1) == "42"
    assert time.monotonic() - started < 5  # woken by the feed, not by the deadline
    # A prompt has no line end: "$" matches at the end of what came.
    assert buffer.read_until(r"^minidriver-guest\$ $", timeout=10).start() == 0
    thread.join()
    buffer.feed(b"echo\r\n\r\n")
    assert buffer.text() == "echo\n\n"
    assert buffer.discard() == "echo\n\n"
    assert buffer.text() == ""


def test_read_until_past_its_deadline_says_what_came() -> None:
    buffer = ConsoleBuffer("vm")
    buffer.feed(b"minidriver-guest: up\r\n")
    started = time.monotonic()
    with pytest.raises(SerialConsoleTimeout) as caught:
        buffer.read_until(r"^minidriver-guest: ready$", timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 5
    assert caught.value.received == "minidriver-guest: up\n"
    assert "'^minidriver-guest: ready$' within 0.3 s" in str(caught.value)
    assert buffer.text() == "minidriver-guest: up\n"  # still unread


def test_the_end_of_the_stream_wakes_a_waiting_reader() -> None:
    buffer = ConsoleBuffer("vm")
    buffer.feed(b"minidriver-guest: power-button, powering off\r\n")
    threading.Timer(0.1, buffer.end, args=("the console stream ended",)).start()
    started = time.monotonic()
    with pytest.raises(ConsoleClosed) as caught:
        buffer.read_until("never", timeout=30)
    assert time.monotonic() - started < 10
    assert str(caught.value).startswith("the console stream ended before it matched")
    assert caught.value.received == "minidriver-guest: power-button, powering off\n"


def test_read_gives_raw_bytes_as_they_come_then_the_end() -> None:
    buffer = ConsoleBuffer("vm")
    assert buffer.read(timeout=0.05) == b""
    thread = feed_later(buffer, b"\x1b[0mhello\r\n")
    assert buffer.read(timeout=10) == b"\x1b[0mhello\r\n"
    thread.join()
    buffer.feed(b"last words\r\n")
    buffer.end("the console stream ended")
    buffer.end("a later reason is not kept")
    assert buffer.read(timeout=1) == b"last words\r\n"  # what came before the end
    with pytest.raises(ConsoleClosed, match=r"^the console stream ended$"):
        buffer.read(timeout=1)
    assert buffer.ended == "the console stream ended"


def readable(fd: int, timeout: float = 0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_its_descriptor_is_readable_exactly_while_a_read_would_not_wait() -> None:
    buffer = ConsoleBuffer("vm")
    buffer.feed(b"before anyone asked\r\n")
    fd = buffer.fileno()  # made late: what is already there counts
    assert readable(fd)
    assert buffer.read(timeout=0) == b"before anyone asked\r\n"
    assert not readable(fd)
    thread = feed_later(buffer, b"one", b"two")
    assert readable(fd, timeout=10)  # a select wakes when the event loop feeds
    thread.join()
    assert buffer.read(timeout=0) == b"onetwo"
    assert not readable(fd)
    buffer.feed(b"prompt$ ")
    buffer.read_until(r"\$ ", timeout=1)
    assert not readable(fd)
    buffer.end("the console stream ended")
    assert readable(fd)  # the end too: the next read raises at once
    with pytest.raises(ConsoleClosed):
        buffer.read(timeout=0)
    assert readable(fd)
    buffer.close()
    buffer.close()


def test_unread_bytes_are_capped_oldest_first() -> None:
    buffer = ConsoleBuffer("vm", limit=10)
    buffer.feed(b"0123456789")
    buffer.feed(b"abc")
    assert buffer.read(timeout=0) == b"3456789abc"


def test_the_test_driver_has_no_console_api(drv: LibvirtDriver, empty_qcow2_id: str) -> None:
    inst = drv.spawn(name="vm", image=empty_qcow2_id, flavor="t1.nano")
    with pytest.raises(SerialConsoleError) as caught:
        drv.open_serial_console(inst.uuid)
    assert "has no console API" in str(caught.value)
    assert caught.value.hint is not None and "QEMU driver" in caught.value.hint
