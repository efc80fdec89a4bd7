"""What the command prints, and its exit codes (novaclient's ``utils.print_list``).

People get aligned tables, each step as it happens and a progress bar on a terminal;
machines get ``--json``: one JSON document on stdout and nothing else there. Errors
are one line and a hint on stderr (and ``{"error": ..., "hint": ...}`` on stdout
with ``--json``), as mkosi's ``die(msg, hint=...)``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from minidriver.exception import MinidriverError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 141  # as a shell reports a process that SIGPIPE ended


class DeadlineExceeded(MinidriverError):
    """A --timeout passed (exit code 3)."""


class UsageError(MinidriverError):
    """Bad command-line input found after parsing (exit code 2)."""


def die(out: Output, exc: MinidriverError, code: int) -> NoReturn:
    print(f"minidriver: error: {exc}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    if out.json:
        json.dump({"error": str(exc), "hint": exc.hint}, sys.stdout)
        sys.stdout.write("\n")
    raise SystemExit(code)


def human_size(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


class Output:
    """Where results go: a table or lines for people, one JSON document for machines."""

    def __init__(self, as_json: bool, stream: TextIO = sys.stdout) -> None:
        self.json = as_json
        self.stream = stream

    def say(self, text: str = "") -> None:
        """Progress and prose for people; silent under --json."""
        if not self.json:
            print(text, file=self.stream, flush=True)

    def result(self, data: Any, text: str | Callable[[], str]) -> None:
        if self.json:
            json.dump(data, self.stream, indent=2, sort_keys=False)
            self.stream.write("\n")
        else:
            rendered = text() if callable(text) else text
            if rendered:
                print(rendered, file=self.stream)


class ProgressBar:
    """A one-line bar on stderr while bytes move; nothing on a pipe or under --json."""

    WIDTH = 30

    def __init__(self, label: str, *, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self.drawn = False
        self.last = 0.0

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()

    def clear(self) -> None:
        """Take the bar off its line (for a line printed meanwhile); the next update
        draws it again."""
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and done != total):
            return
        self.last = now
        if total:
            filled = self.WIDTH * done // total
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            text = f"{self.label} [{bar}] {human_size(done)} / {human_size(total)}"
        else:
            text = f"{self.label} {human_size(done)}"
        self.stream.write(f"\r\033[K{text}")
        self.stream.flush()
        self.drawn = True
