"""The test guest's console shell, driven through libvirt's console API: a command
run and its output and exit status read back (the integration tests of the disks a
guest sees, and later of the operations that need a shell in the guest)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from minidriver.guestimages import testimage
from minidriver.serial_console import ConsoleClosed, SerialConsole, SerialConsoleTimeout

PROMPT = testimage.CONSOLE_PROMPT


@dataclass(frozen=True)
class Result:
    output: str  # what the command printed, line ends as "\n"
    status: int


def run(console: SerialConsole, command: str, timeout: float = 60) -> Result:
    """Run one line in the guest's shell; its output and exit status, once the shell
    waits at its prompt again (so that the next line typed is not echoed into it).

    The output lies between two marker lines the typed line's echo cannot match (it
    holds ``%s`` and ``$?`` where the printed ones hold the token and the status); the
    end marker starts with a line break of its own, so that an output that does not
    end a line (a disk sector) still leaves the marker at a line's start.
    """
    token = uuid.uuid4().hex[:12]
    console.send_line(
        f"printf 'mdbegin-%s\\n' {token}; {command}; printf '\\nmdend-%s-{token}\\n' $?"
    )
    try:
        # After the prompt when the line was typed ahead of it (the shell still busy
        # with the previous one): the echo comes first, then the prompt, then this.
        console.read_until(rf"(?:^|{re.escape(PROMPT)})mdbegin-{token}\n", timeout)
        end = console.read_until(rf"^mdend-(\d+)-{token}\n", timeout)
        console.read_until(rf"^{re.escape(PROMPT)}", timeout)
    except (SerialConsoleTimeout, ConsoleClosed) as exc:
        raise AssertionError(f"{exc}; the console showed:\n{exc.received}") from None
    # The end marker's own line break, which ends an output that ends without one.
    return Result(end.string[: end.start() - 1], int(end.group(1)))


def wait_for_line(console: SerialConsole, pattern: str, timeout: float = 60) -> re.Match[str]:
    """The next whole line matching ``pattern`` (from its start to its end)."""
    return console.read_until(rf"^{pattern}\n", timeout)
