from __future__ import annotations

import threading
from pathlib import Path

import pytest

from minidriver.console import ConsoleTimeout, wait_for_console


def test_waits_until_the_line_is_written(tmp_path: Path) -> None:
    log = tmp_path / "console.log"

    def guest() -> None:
        with log.open("ab") as fh:
            fh.write(b"booting\r\n")
            fh.flush()
            threading.Event().wait(0.3)
            fh.write(b"minidriver-guest: ready\r\n")

    writer = threading.Thread(target=guest)
    writer.start()
    match = wait_for_console(log, r"^minidriver-guest: (\w+)", timeout=10, interval=0.05)
    writer.join()
    assert match.group(1) == "ready"


def test_deadline_raises_with_the_tail(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("".join(f"line {i}\n" for i in range(50)))
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(ConsoleTimeout) as err:
        wait_for_console(log, "never", timeout=5, clock=lambda: now[0], sleep=sleep)
    assert "within 5 s" in str(err.value)
    assert err.value.tail.splitlines()[-1] == "line 49"
    assert len(err.value.tail.splitlines()) == 20


def test_a_stopped_guest_ends_the_wait_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConsoleTimeout, match="stopped before"):
        wait_for_console(tmp_path / "absent.log", "x", timeout=3600, alive=lambda: False)
