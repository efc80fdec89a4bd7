"""Spawn with images_type = rbd: a clone of an image in Ceph against fetch + import.

Three ways to the same root disk, each a spawn with t1.nano to RUNNING (then
destroyed), run in turn so that none always goes first, of the test guest (64 MiB
raw) or with ``--synthetic`` of scripts/bench's 1 GiB qcow2 holding 300 MiB of data:

- clone: the image is in the rbd store; the root disk is a clone of its snapshot;
- import: the image is in the file store and its raw base already in ``_base``; the
  base is imported into the pool (what every later spawn of such an image pays);
- fetch + import: the same with ``_base`` emptied first: fetch, convert, import.

Printed: medians (min..max) of the whole spawn and of its root disk steps (clone;
fetch + convert + import + resize), and each one's ratio to the clone, as the median
of the per-round ratios. One process, a state dir of its own under /var/tmp, removed
at the end with every domain, file and RBD image the run made.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from minidriver.bench.harness import BenchError, make_log, run_guarded
from minidriver.bench.report import cell, format_table, ratio_cell
from minidriver.bench.stats import Stat, in_turn, ratio_stat
from minidriver.bench.synthetic import synthetic_image
from minidriver.config import load_config
from minidriver.driver import LibvirtDriver, base_filename
from minidriver.guestimages import testimage

DEFAULT_CEPH_CONF = "/var/tmp/minidriver-ceph/ceph.conf"  # scripts/ceph-dev-cluster's
FLAVOR = "t1.nano"
SIDES = ("clone", "import", "fetch + import")
DISK_STEPS = ("fetch", "convert", "import", "clone", "resize")


def disk_seconds(timings: dict[str, float]) -> float:
    """What the root disk cost: the steps only it has (ephemeral, swap excluded)."""
    return sum(timings[s] for s in DISK_STEPS)


def check_path(side: str, timings: dict[str, float]) -> None:
    """Each side took the path it is named after, or its figures mean nothing."""
    cloned = timings["clone"] > 0
    fetched = timings["fetch"] > 0
    imported = timings["import"] > 0
    expected = {
        "clone": (True, False, False),
        "import": (False, False, True),
        "fetch + import": (False, True, True),
    }[side]
    if (cloned, fetched, imported) != expected:
        raise BenchError(f"{side}: clone/fetch/import took {cloned, fetched, imported}")


def summary(samples: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    clone_total = [t["total"] for t in samples["clone"]]
    clone_disk = [disk_seconds(t) for t in samples["clone"]]
    out: dict[str, Any] = {}
    for side, runs in samples.items():
        totals = [t["total"] for t in runs]
        disks = [disk_seconds(t) for t in runs]
        out[side] = {
            "spawn": Stat.of(totals).as_dict(),
            "root_disk": Stat.of(disks).as_dict(),
            "spawn_ratio": ratio_stat(totals, clone_total),
            "root_disk_ratio": ratio_stat(disks, clone_disk),
        }
    return out


def render(result: dict[str, Any], runs: int, image: str) -> str:
    rows = [
        [
            side,
            cell(r["spawn"]),
            ratio_cell(r["spawn_ratio"]),
            cell(r["root_disk"]),
            ratio_cell(r["root_disk_ratio"]),
        ]
        for side, r in result.items()
    ]
    return format_table(
        f"spawn of {image} ({FLAVOR}) to RUNNING, images_type = rbd, {runs} runs;"
        " seconds, median (min..max); ratios to the clone, median of the per-round ratios",
        ["root disk by", "spawn", "/ clone", "root disk steps", "/ clone"],
        rows,
    )


class RbdBench:
    def __init__(self, drv: LibvirtDriver, log: Callable[[str], None], path: Path) -> None:
        self.drv = drv
        self.log = log
        self.image_ids: list[str] = []
        log(f"adding {path.name} to the rbd store and to the file store")
        self.rbd_image_id = self._add(path, "rbd")
        self.file_image_id = self._add(path, "file")

    def _add(self, path: Path, store: str) -> str:
        image = self.drv.images.add(
            path,
            name=f"bench-{store}",
            disk_format="qcow2",
            store=store,
            properties=testimage.IMAGE_PROPERTIES,
        )
        self.image_ids.append(image.id)
        return image.id

    def spawn(self, side: str) -> dict[str, float]:
        image_id = self.rbd_image_id if side == "clone" else self.file_image_id
        if side == "fetch + import":
            (self.drv.conf.base_dir / base_filename(image_id)).unlink(missing_ok=True)
        inst = self.drv.spawn(name="bench-rbd", image=image_id, flavor=FLAVOR)
        try:
            check_path(side, inst.timings)
            return dict(inst.timings)
        finally:
            self.drv.destroy(inst.uuid)

    def run(self, runs: int) -> dict[str, list[dict[str, float]]]:
        # Warm-up (the caches of the host, QEMU and the OSD), ending with the base
        # cached: "import" always finds it, as it is run after "fetch + import" or
        # after a round that ended with it.
        for side in reversed(SIDES):
            self.spawn(side)
        samples: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        for i in range(runs):
            for side in in_turn(SIDES, i):
                samples[side].append(self.spawn(side))
            self.log(f"round {i + 1}/{runs}")
        return samples

    def close(self) -> None:
        for record in self.drv.db.list_instances():
            self.drv.destroy(record.uuid)
        for image_id in self.image_ids:
            self.drv.images.delete(image_id)
        self.drv.host.close()


def build_parser() -> argparse.ArgumentParser:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(prog="scripts/bench-rbd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="measured rounds (default 7)")
    parser.add_argument(
        "--ceph-conf",
        default=os.environ.get("MINIDRIVER_TEST_CEPH_CONF") or DEFAULT_CEPH_CONF,
        help="the cluster's ceph.conf (default: $MINIDRIVER_TEST_CEPH_CONF, else the dev"
        " cluster's)",
    )
    parser.add_argument("--connect", metavar="URI", help="libvirt URI (default: auto)")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="the 1 GiB qcow2 with 300 MiB of data (not bootable: RUNNING is the end)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    log = make_log(time.monotonic())
    state = Path(tempfile.mkdtemp(prefix="mdbench-rbd-", dir="/var/tmp"))
    state.chmod(0o755)
    bench: RbdBench | None = None

    def body() -> None:
        nonlocal bench
        conf = load_config(None, state_dir=state, environ={}).with_libvirt(
            images_type="rbd", images_rbd_ceph_conf=args.ceph_conf
        )
        if args.connect:
            conf = conf.with_libvirt(connection_uri=args.connect)
        drv = LibvirtDriver(conf)
        log(f"{drv.host.uri}, {drv.host.virt_type.virt_type}; cluster {args.ceph_conf}")
        if args.synthetic:
            path = synthetic_image(testimage.default_output_dir() / "bench", log)
        else:
            path = testimage.build(log=lambda msg: log(f"test image: {msg}"))
        bench = RbdBench(drv, log, path)
        result = summary(bench.run(args.runs))
        print(render(result, args.runs, path.name), flush=True)

    def cleanup(_code: int) -> None:
        if bench is not None:
            bench.close()
        shutil.rmtree(state, ignore_errors=True)

    return run_guarded(body, cleanup, log)


if __name__ == "__main__":
    sys.exit(main())
