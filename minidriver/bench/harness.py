"""What every benchmark runs in: its errors and exit codes, signals, the log, the
machine's description and the JSON document. (No Nova counterpart: tooling.)

``run_guarded`` gives a benchmark one error line and an exit code, and a clean-up no
second Ctrl-C can interrupt: a benchmark makes domains and files that must not
outlive it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import libvirt

from minidriver.bench.report import evaluate_targets
from minidriver.exception import MinidriverError

Log = Callable[[str], None]

READY = r"^minidriver-guest: ready"
READY_TIMEOUT = 180.0  # seconds; the guest boots in 4 to 8 s under TCG here


class BenchError(MinidriverError):
    """A benchmark found the system not as it must be to measure (say, a cache miss)."""


@dataclass(frozen=True)
class Runs:
    """Measured runs per scenario: ``long`` for scaling's sizes and concurrency, whose
    one run is 8 and 23 spawns."""

    short: int
    long: int


class StartedEvents:
    """When each domain's lifecycle STARTED event reached this process (monotonic).

    On a connection of its own: libvirt takes one lifecycle callback per connection,
    and the driver's Host has registered its own.
    """

    def __init__(self, uri: str) -> None:
        self._conn = libvirt.open(uri)
        self._times: dict[str, float] = {}
        self._lock = threading.Lock()
        self._id = self._conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None
        )

    def _event(self, _conn: Any, domain: Any, event: int, _detail: int, _opaque: Any) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            now = time.monotonic()
            with self._lock:
                self._times[domain.UUIDString()] = now

    def started(self, uuid: str) -> float | None:
        with self._lock:
            return self._times.pop(uuid, None)

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.domainEventDeregisterAny(self._id)
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()


def make_log(started: float) -> Log:
    def log(msg: str) -> None:
        print(f"bench [{time.monotonic() - started:5.0f} s]: {msg}", file=sys.stderr, flush=True)

    return log


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Clean-up must finish: a second Ctrl-C would leave domains behind."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_guarded(body: Callable[[], None], cleanup: Callable[[int], None], log: Log) -> int:
    """A benchmark's ``body``, its errors as one line and an exit code (130 on Ctrl-C
    or SIGTERM, 1 on an error), then ``cleanup(code)`` that no signal can interrupt."""
    signal.signal(signal.SIGTERM, _terminate)
    code = 0
    try:
        body()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        code = 130
    except MinidriverError as exc:
        log(f"error: {exc}" + (f"\nhint: {exc.hint}" if exc.hint else ""))
        code = 1
    except libvirt.libvirtError as exc:
        log(f"error: libvirt: {exc.get_error_message()}")
        code = 1
    finally:
        with signals_ignored():
            cleanup(code)
    return code


def build_doc(
    *,
    uri: str,
    virt_type: str,
    runs: Runs,
    quick: bool,
    scenarios: Mapping[str, Any],
    seconds: Mapping[str, float],
    wall: float,
) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "uri": uri,
        "virt_type": virt_type,
        "runs": runs.short,
        "long_runs": runs.long,
        "quick": quick,
        "wall_seconds": round(wall, 1),
        "scenario_seconds": dict(seconds),
        "scenarios": dict(scenarios),
        "targets": evaluate_targets(scenarios),
    }


def machine_description() -> str:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{platform.node()}, {os.cpu_count()} CPUs ({cpu or platform.machine()}),"
        f" {platform.system()} {platform.release()}"
    )


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, all its threads, and of its
    children waited for: a difference of two readings is the CPU a piece of work cost,
    which other people's load on the machine disturbs far less than its wall time."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime
