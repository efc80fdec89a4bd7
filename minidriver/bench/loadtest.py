"""Load test: spawn/destroy cycles of the test guest, watching for leaks.

Each cycle spawns and destroys the test guest once in this thread or, with
``--threads N``, once in each of N threads at the same time. A cycle's threads are new
ones, as a thread pool made per round (the bench's) makes them, so that anything kept
per thread shows up as growth. After each cycle, with nothing in flight, it samples
this process's open file descriptors and threads, the domains of this run and the
files under the state dir (but for libvirt's own domain logs, which the embedded
driver keeps there, one per domain name, as a daemon does in /var/log/libvirt/qemu).

Flat, as checked and reported: no sample from the end of cycle 2 (once the cache and
the connection have settled) to the last is above the sample at the end of cycle 2.
The state database's descriptors are counted apart from the other fds: SQLite keeps
those of closed connections for its next ones (``Database.connections`` says why), so
their number follows the most connections that were ever open at once, which the
threads' timing decides. What is judged flat instead is the number of connections
open, and their descriptors are checked against SQLite's bound after every cycle.
A spawn that fails is counted, and what it left (its domain too) is destroyed before
the sample, so that a failure is reported as one and not as a leak. Also reports the
median and p95 spawn time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from minidriver.cleanup import cleanup
from minidriver.config import load_config
from minidriver.driver import LibvirtDriver
from minidriver.exception import InstanceNotFound
from minidriver.guestimages import testimage

WARM_UP = 2  # cycles before the baseline: the cache and connection settle


def count_files(root: Path, *, besides: Path | None = None) -> int:
    return sum(
        len(files)
        for top, _subdirs, files in os.walk(root)
        if besides is None or not Path(top).is_relative_to(besides)
    )


def open_descriptors(database: Path) -> tuple[int, int]:
    """This process's open file descriptors: those on the database (its file, WAL and
    shared memory), and the others."""
    on_database = others = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own, closed by now
            continue
        if target.startswith(os.fspath(database)):
            on_database += 1
        else:
            others += 1
    return on_database, others


# Reported, not judged flat: checked against each other by beyond_bound().
BOUNDED = ("db_fds", "db_fds_bound")


# How long a sample waits for the state database's connections to be given back.
QUIET_WAIT = 2.0  # seconds


def sample(drv: LibvirtDriver) -> dict[str, int]:
    # libvirt's event loop thread may still be recording a lifecycle event of the
    # cycle's destroy (power_sync) with a connection: waited for, a little. A
    # connection never given back stays in use, and shows as one more open.
    deadline = time.monotonic() + QUIET_WAIT
    while drv.db.connections_in_use and time.monotonic() < deadline:
        time.sleep(0.01)
    # libvirt keeps a log per domain name, as a daemon does in /var/log/libvirt/qemu;
    # the embedded driver's are under the state dir. Counted apart: a log, not a leak.
    libvirt_logs = drv.conf.embed_root / "log"
    db_fds, fds = open_descriptors(drv.db.path)
    open_now, most_open = drv.db.connections
    return {
        "fds": fds,
        "db_connections": open_now,
        "db_fds": db_fds,
        # Each connection ever open at once may leave its file's, each open one has
        # its WAL's, and the process has one on the shared memory; the forwarded
        # ports' read-only look at a reservation's state dir (one at a time, under
        # the reservations' lock) may leave one more.
        "db_fds_bound": most_open + open_now + 1 + 1,
        "threads": threading.active_count(),
        # Only this run's: other users of a shared daemon come and go.
        "domains": len(drv.owned_domains()),
        "files": count_files(drv.conf.state_path, besides=libvirt_logs),
    }


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def above_baseline(samples: list[dict[str, int]]) -> dict[str, int]:
    """Each measure's largest rise over the baseline (the sample after cycle
    ``WARM_UP``) in any later sample; empty when all are flat."""
    baseline = samples[WARM_UP - 1]
    judged = [k for k in baseline if k not in BOUNDED]
    rises = {k: max(s[k] for s in samples[WARM_UP - 1 :]) - baseline[k] for k in judged}
    return {k: v for k, v in rises.items() if v > 0}


def beyond_bound(samples: list[dict[str, int]]) -> list[int]:
    """The cycles (from 1) after which the state database had more descriptors open
    than SQLite keeps for the connections this process opened."""
    return [i for i, s in enumerate(samples, 1) if s["db_fds"] > s["db_fds_bound"]]


class Cycles:
    """Spawn and destroy, from one thread or several, recording times and failures."""

    def __init__(self, drv: LibvirtDriver, image_id: str) -> None:
        self.drv = drv
        self.image_id = image_id
        self.totals: list[float] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def one(self, name: str) -> None:
        try:
            inst = self.drv.spawn(name=name, image=self.image_id, flavor="t1.nano")
            self.drv.destroy(inst.uuid)
        except Exception as exc:  # counted and reported; run() sweeps what it left
            with self._lock:
                self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            return
        with self._lock:
            self.totals.append(inst.timings["total"])

    def run(self, cycle: int, threads: int) -> None:
        """One cycle: one spawn here, or one in each of ``threads`` new threads; then,
        if one failed, what it left is destroyed (nothing else is in flight)."""
        failed_before = len(self.failures)
        if not threads:
            self.one(f"load-{cycle}")
        else:
            workers = [
                threading.Thread(target=self.one, args=(f"load-{cycle}-{i}",), name=f"load-{i}")
                for i in range(threads)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        if len(self.failures) > failed_before:
            self.sweep()

    def sweep(self) -> None:
        """Every instance of this run, and what a failed spawn whose undo failed too
        left without a record (its domain, dir, port): this state dir's ``cleanup``."""
        for record in self.drv.db.list_instances():
            with contextlib.suppress(InstanceNotFound):
                self.drv.destroy(record.uuid)
        cleanup(self.drv)


def report(
    args: argparse.Namespace, uri: str, cycles: Cycles, samples: list[dict[str, int]]
) -> int:
    """Print the run's figures and verdict (and write them as JSON if asked); the
    exit status: 1 if not flat or a spawn failed."""
    totals = cycles.totals
    measured = totals[WARM_UP * max(1, args.threads) :] or totals
    baseline, last = samples[WARM_UP - 1], samples[-1]
    rises = above_baseline(samples)
    beyond = beyond_bound(samples)
    how = f"{args.threads} threads at once" if args.threads else "one thread"
    print(f"\n{len(totals)} spawns in {args.cycles} cycles ({how}), {WARM_UP} of warm-up")
    if measured:
        print(
            f"spawn after the warm-up: median {statistics.median(measured):.3f} s,"
            f" p95 {p95(measured):.3f} s, min {min(measured):.3f} s,"
            f" max {max(measured):.3f} s"
        )
    print(f"after cycle {WARM_UP} -> after cycle {args.cycles}: {baseline} -> {last}")
    print(
        f"flat (no sample of cycles {WARM_UP}..{args.cycles} above cycle {WARM_UP}'s)"
        if not rises
        else f"NOT FLAT, rose above cycle {WARM_UP}'s by: {rises}"
    )
    if beyond:
        print(f"state database descriptors beyond SQLite's bound after cycles {beyond}")
    if cycles.failures:
        print(f"{len(cycles.failures)} failed spawns (destroyed):", *cycles.failures, sep="\n  ")
    if args.json:
        doc = {
            "cycles": args.cycles,
            "threads": args.threads,
            "warm_up": WARM_UP,
            "uri": uri,
            "spawn_total_s": totals,
            "median_s": statistics.median(measured) if measured else None,
            "p95_s": p95(measured) if measured else None,
            "samples": samples,
            "growth": {k: last[k] - baseline[k] for k in baseline},
            "above_baseline": rises,
            "db_fds_beyond_bound": beyond,
            "flat": not rises and not beyond,
            "failures": cycles.failures,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 1 if rises or beyond or cycles.failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/load-test", description=__doc__)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="spawn and destroy in N new threads at once per cycle (default: in this one)",
    )
    parser.add_argument("--connect", metavar="URI", help="libvirt URI (default: auto)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.cycles <= WARM_UP:
        parser.error(f"--cycles must be more than {WARM_UP}")
    if args.threads < 0:
        parser.error("--threads must not be negative")

    image = testimage.build(log=lambda msg: print(f"test image: {msg}", file=sys.stderr))
    state = Path(tempfile.mkdtemp(prefix="mdload-", dir="/var/tmp"))
    state.chmod(0o755)
    drv: LibvirtDriver | None = None
    try:
        conf = load_config(None, state_dir=state, environ={})
        if args.connect:
            conf = conf.with_libvirt(connection_uri=args.connect)
        drv = LibvirtDriver(conf)
        image_id = drv.images.add(
            image, name="load", disk_format="qcow2", properties=testimage.IMAGE_PROPERTIES
        ).id
        cycles = Cycles(drv, image_id)
        samples: list[dict[str, int]] = []
        for cycle in range(args.cycles):
            cycles.run(cycle, args.threads)
            samples.append(sample(drv))
            print(f"cycle {cycle + 1}/{args.cycles}: {samples[-1]}")
        return report(args, drv.host.uri, cycles, samples)
    finally:
        if drv is not None:
            with contextlib.suppress(Exception):  # the run's own error comes first
                Cycles(drv, "").sweep()
            drv.host.close()
            drv.db.close()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
