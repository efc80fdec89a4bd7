"""The guest's serial console log: reading it and waiting for a line, with a deadline."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from minidriver.exception import MinidriverError


class ConsoleTimeout(MinidriverError):
    """The console did not show the awaited text before the deadline."""

    def __init__(self, message: str, tail: str, *, stopped: bool = False) -> None:
        super().__init__(message)
        self.tail = tail
        self.stopped = stopped  # the guest stopped: waiting longer would not help


def read_console(path: Path) -> str:
    """The whole log as text ('' before the guest wrote anything)."""
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])


def wait_for_console(
    path: Path,
    pattern: str | re.Pattern[str],
    timeout: float,
    *,
    interval: float = 0.2,
    alive: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> re.Match[str]:
    """Poll ``path`` until ``pattern`` matches (multi-line), or raise ConsoleTimeout.

    ``alive`` is asked each round: once it says False (the domain stopped), the wait
    ends at once instead of running out the clock.
    """
    regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
    deadline = clock() + timeout
    while True:
        text = read_console(path)
        match = regex.search(text)
        if match:
            return match
        if alive is not None and not alive():
            raise ConsoleTimeout(
                f"the guest stopped before its console matched {regex.pattern!r}",
                tail(text),
                stopped=True,
            )
        if clock() >= deadline:
            raise ConsoleTimeout(
                f"console did not match {regex.pattern!r} within {timeout:g} s", tail(text)
            )
        sleep(interval)
