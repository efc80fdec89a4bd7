"""Benchmarks of spawn: where the time goes, as medians over repeated runs.

Scenarios run side by side in one process on one state dir:

- ``cold``: spawn with an empty cache (the image's base removed before each run);
- ``warm``: spawn with the base cached;
- both split per step, plus the time from spawn's start to the guest's ``ready``
  line on its console (the guest's own boot, under TCG where KVM is unusable).

Each scenario runs once as a warm-up, then ``--runs`` times; min / median / max.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from minidriver import console, testimage
from minidriver.config import load_config
from minidriver.driver import LibvirtDriver, base_filename
from minidriver.steps import Step

READY = r"^minidriver-guest: ready"
COLUMNS = [s.value for s in Step] + ["total", "ready"]


def spawn_once(drv: LibvirtDriver, image_id: str, flavor: str, *, cold: bool) -> dict[str, float]:
    if cold:
        (drv.conf.base_dir / base_filename(image_id)).unlink(missing_ok=True)
    started = time.monotonic()
    inst = drv.spawn(name="bench", image=image_id, flavor=flavor)
    try:
        console.wait_for_console(
            Path(inst.instance_dir) / "console.log", READY, timeout=300, interval=0.05
        )
        figures = dict(inst.timings)
        figures["ready"] = time.monotonic() - started
        if inst.cache_hit == cold:
            raise RuntimeError(f"expected cache_hit={not cold}, got {inst.cache_hit}")
        return figures
    finally:
        drv.destroy(inst.uuid)


def summarize(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        col: {
            "min": min(s[col] for s in samples),
            "median": statistics.median(s[col] for s in samples),
            "max": max(s[col] for s in samples),
        }
        for col in COLUMNS
    }


def print_table(results: dict[str, dict[str, dict[str, float]]], runs: int) -> None:
    print(f"\nspawn of the test guest, t1.nano, medians of {runs} runs (min..max), seconds")
    header = f"{'step':<10}" + "".join(f"{name:>24}" for name in results)
    print(header)
    for col in COLUMNS:
        cells = []
        for figures in results.values():
            f = figures[col]
            cells.append(f"{f['median']:8.3f} ({f['min']:.3f}..{f['max']:.3f})")
        print(f"{col:<10}" + "".join(f"{c:>24}" for c in cells))
    if "cold" in results and "warm" in results:
        cold, warm = results["cold"]["total"]["median"], results["warm"]["total"]["median"]
        print(f"\nwarm/cold spawn total: {warm / cold:.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs per scenario")
    parser.add_argument("--quick", action="store_true", help="3 runs per scenario")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--connect", metavar="URI", help="libvirt URI (default: auto)")
    parser.add_argument("--flavor", default="t1.nano")
    args = parser.parse_args(argv)
    runs = 3 if args.quick else args.runs

    image = testimage.build(log=lambda msg: print(f"test image: {msg}", file=sys.stderr))
    # A traversable state dir of its own: libvirt's QEMU user must reach it.
    state = Path(tempfile.mkdtemp(prefix="mdbench-", dir="/var/tmp"))
    state.chmod(0o755)
    try:
        conf = load_config(None, state_dir=state, environ={})
        if args.connect:
            conf = conf.with_libvirt(connection_uri=args.connect)
        drv = LibvirtDriver(conf)
        image_id = drv.images.add(image, name="bench", disk_format="qcow2").id
        print(
            f"host: {drv.host.uri}, virt_type {drv.host.virt_type.virt_type}"
            f" ({drv.host.virt_type.reason})",
            file=sys.stderr,
        )
        results: dict[str, dict[str, dict[str, float]]] = {}
        samples: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
        # Warm-up, then alternate cold and warm runs so both see the same machine.
        spawn_once(drv, image_id, args.flavor, cold=True)
        for i in range(runs):
            for scenario in ("cold", "warm"):
                figures = spawn_once(drv, image_id, args.flavor, cold=scenario == "cold")
                samples[scenario].append(figures)
                print(
                    f"run {i + 1}/{runs} {scenario}: total {figures['total']:.3f} s,"
                    f" ready {figures['ready']:.3f} s",
                    file=sys.stderr,
                )
        for scenario, rows in samples.items():
            results[scenario] = summarize(rows)
        print_table(results, runs)
        if args.json:
            doc: dict[str, Any] = {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": f"{platform.node()} {platform.machine()}, {platform.platform()}",
                "uri": drv.host.uri,
                "virt_type": drv.host.virt_type.virt_type,
                "runs": runs,
                "flavor": args.flavor,
                "results": results,
                "samples": samples,
            }
            Path(args.json).write_text(json.dumps(doc, indent=2))
        drv.host.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
