"""Load test: spawn/destroy cycles of the test guest, watching for leaks.

Reports the median and p95 spawn time and, sampled after each cycle, this process's
open file descriptors and threads, the domains defined on the connection and the files
under the state dir: after the first cycles warm the cache, none of them may grow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from minidriver.config import load_config
from minidriver.driver import LibvirtDriver
from minidriver.guestimages import testimage

WARM_UP = 2  # cycles before the baseline: the cache and connection settle


def count_files(root: Path) -> int:
    return sum(len(files) for _dirs, _subdirs, files in os.walk(root))


def sample(drv: LibvirtDriver) -> dict[str, int]:
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        # Only this run's: other users of a shared daemon come and go.
        "domains": len(drv.owned_domains()),
        "files": count_files(drv.conf.state_path),
    }


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/load-test", description=__doc__)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--connect", metavar="URI", help="libvirt URI (default: auto)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.cycles <= WARM_UP:
        parser.error(f"--cycles must be more than {WARM_UP}")

    image = testimage.build(log=lambda msg: print(f"test image: {msg}", file=sys.stderr))
    state = Path(tempfile.mkdtemp(prefix="mdload-", dir="/var/tmp"))
    state.chmod(0o755)
    try:
        conf = load_config(None, state_dir=state, environ={})
        if args.connect:
            conf = conf.with_libvirt(connection_uri=args.connect)
        drv = LibvirtDriver(conf)
        image_id = drv.images.add(image, name="load", disk_format="qcow2").id
        totals: list[float] = []
        samples: list[dict[str, int]] = []
        for cycle in range(args.cycles):
            inst = drv.spawn(name=f"load-{cycle}", image=image_id, flavor="t1.nano")
            totals.append(inst.timings["total"])
            drv.destroy(inst.uuid)
            samples.append(sample(drv))
            print(f"cycle {cycle + 1}/{args.cycles}: spawn {totals[-1]:.3f} s {samples[-1]}")
        measured = totals[WARM_UP:]
        baseline, last = samples[WARM_UP - 1], samples[-1]
        growth = {k: last[k] - baseline[k] for k in baseline}
        print(
            f"\n{len(measured)} spawns after {WARM_UP} warm-up cycles:"
            f" median {statistics.median(measured):.3f} s, p95 {p95(measured):.3f} s,"
            f" min {min(measured):.3f} s, max {max(measured):.3f} s"
        )
        print(f"after cycle {WARM_UP} -> after cycle {args.cycles}: {baseline} -> {last}")
        leaks = {k: v for k, v in growth.items() if v > 0}
        print("no growth" if not leaks else f"GROWTH: {leaks}")
        if args.json:
            doc = {
                "cycles": args.cycles,
                "warm_up": WARM_UP,
                "uri": drv.host.uri,
                "spawn_total_s": totals,
                "median_s": statistics.median(measured),
                "p95_s": p95(measured),
                "samples": samples,
                "growth": growth,
            }
            Path(args.json).write_text(json.dumps(doc, indent=2))
        drv.host.close()
        return 1 if leaks else 0
    finally:
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
