"""The named steps of a spawn and the timer that measures them.

The names are a contract (the CLI, ``--json`` and the benchmarks show them): later
features add steps, none is renamed.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Callable, Iterator


class Step(enum.StrEnum):
    FETCH = "fetch"
    CONVERT = "convert"
    RESIZE = "resize"
    OVERLAY = "overlay"
    EPHEMERAL = "ephemeral"
    SWAP = "swap"
    DEFINE = "define"
    START = "start"
    WAIT = "wait"
    # Added by later features; they extend the list, never rename it.
    CONFIG_DRIVE = "config_drive"
    KERNEL_RAMDISK = "kernel_ramdisk"  # a kernel image's kernel and ramdisk, fetch and copy
    CLONE = "clone"  # images_type = rbd: a copy-on-write clone of the image's snapshot
    IMPORT = "import"  # images_type = rbd: the raw base written into the pool
    SAVE_COPY = "save_copy"  # boot --template: the clone's copy of the saved memory
    RESTORE = "restore"  # boot --template: libvirt's restore of that copy
    SET_TIME = "set_time"  # after a restore: the guest's clock, through its agent
    PLUG_VIFS = "plug_vifs"  # the VIF's network or bridge found up (vif.plug_vifs)
    VIF_PLUGGED = "vif_plugged"  # paused, waiting for network-vif-plugged (vif.py)


# (step, seconds, finished): called when a step starts (finished False) and ends.
StepListener = Callable[[Step, float, bool], None]


class StepTimer:
    """Adds up the seconds spent in each step; every step appears, 0.0 if skipped.

    Steps may run on several threads at once (a spawn's disks are made side by
    side): each thread has its own ``current`` step, and the listener is called by
    one thread at a time, so its lines never interleave.
    """

    def __init__(
        self,
        listener: StepListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.listener = listener
        self.clock = clock
        self.seconds: dict[str, float] = {s.value: 0.0 for s in Step}
        self._started = clock()
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def current(self) -> Step | None:
        """The innermost step this thread is in."""
        step: Step | None = getattr(self._local, "step", None)
        return step

    def _tell(self, step: Step, seconds: float, finished: bool) -> None:
        if self.listener:
            with self._lock:
                self.listener(step, seconds, finished)

    @contextlib.contextmanager
    def step(self, step: Step) -> Iterator[None]:
        outer = self.current
        self._local.step = step
        self._tell(step, 0.0, False)
        start = self.clock()
        try:
            yield
        finally:
            elapsed = self.clock() - start
            with self._lock:
                self.seconds[step.value] += elapsed
            self._local.step = outer
            self._tell(step, elapsed, True)

    def as_dict(self) -> dict[str, float]:
        """The contract's shape: every step, then ``total`` since the timer began."""
        return {
            **{k: round(v, 4) for k, v in self.seconds.items()},
            "total": round(self.clock() - self._started, 4),
        }
