"""Reading the test guest's console across boots: its lines, and a wait for the n-th
``ready`` (the console log is appended across starts)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

BOOT_TIMEOUT = 240  # seconds for one boot's `ready` under TCG on a shared machine


def guest_lines(instance_dir: Path) -> list[str]:
    text = (instance_dir / "console.log").read_text(errors="replace")
    return [line.rstrip("\r") for line in text.splitlines() if line.startswith("minidriver-guest:")]


def wait_ready(wait_console: Callable[..., Any], instance_dir: Path, boots: int) -> list[str]:
    """Wait until the guest has said ``ready`` ``boots`` times; the lines of the last boot."""
    wait_console(
        instance_dir / "console.log",
        rf"(?s)(?:^minidriver-guest: ready\b.*?){{{boots}}}",
        BOOT_TIMEOUT,
    )
    lines = guest_lines(instance_dir)
    starts = [i for i, line in enumerate(lines) if line == "minidriver-guest: up"]
    return lines[starts[boots - 1] :] if len(starts) >= boots else lines
