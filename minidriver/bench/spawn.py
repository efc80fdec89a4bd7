"""Benchmarks of spawn: where the time goes, against the floor and against a peer.

Everything runs in one process on one state dir (a new one under /var/tmp, removed at
the end with every domain and storage pool the run made, also on Ctrl-C):

1. phases: cold spawn (empty cache) and warm spawn (cached base) of the test guest,
   split per step, plus the time from spawn's start to the guest's ``ready`` line;
2. floor: the XML minidriver rendered, defined and started by hand on overlays made
   by bare ``qemu-img create``, and a bare ``qemu-img convert`` of the image: what no
   spawn can go below;
3. scaling: a synthetic 1 GiB qcow2 holding 300 MiB of data (not bootable: measured
   to RUNNING): cold spawn against ``qemu-img convert`` alone, then each new root size
   (1 to 8 GB) on a warm cache, in the default chain and in the older ``_<GB>`` chain;
4. peer: ``minidriver boot`` against ``virt-install --import`` on the same cached
   base, whole process against whole process, to RUNNING and to the ready line;
5. concurrency: 1, 2, 4, 8 spawns at once (threads, one driver) of the uncached
   synthetic image, and the same 8 one after another;
6. time to ready: the phases' boots split into the driver's share (spawn total) and
   the guest's (from its lifecycle STARTED event to the ready line).

Every scenario runs once as a warm-up, then ``--runs`` times (``--quick``: 3, and 2
of the long ones, scaling's sizes and concurrency): min / median / max. Two things
compared run in alternation (A B, then B A) and are compared by the ratio of each
pair, median over the pairs: both halves of a ratio saw the same machine, which other
people's work shares.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import libvirt

from minidriver import console
from minidriver.config import Config, load_config
from minidriver.driver import LibvirtDriver, base_filename
from minidriver.exception import MinidriverError
from minidriver.guestimages import testimage
from minidriver.host import EMBED_URI
from minidriver.images import qemu_img
from minidriver.objects import Flavor, GiB, Instance, MiB
from minidriver.process import run
from minidriver.steps import Step

READY = r"^minidriver-guest: ready"
READY_TIMEOUT = 180.0  # seconds; the guest boots in 4 to 8 s under TCG here
COLUMNS = [s.value for s in Step] + ["total", "ready"]
SIZES_GB = (1, 2, 4, 8)
LEVELS = (1, 2, 4, 8)
SCENARIOS = ("phases", "scaling", "peer", "concurrency")  # floor and ready ride on phases

# Root-only flavors for the synthetic image: the figures are the root disk's alone.
BENCH_FLAVORS: Mapping[str, Flavor] = {
    f"bench.r{gb}": Flavor(f"bench.r{gb}", vcpus=1, memory_mb=128, root_gb=gb) for gb in SIZES_GB
}

# The synthetic image: written by qemu-io in 4 MiB chunks spread over the disk, each
# chunk a different non-zero byte (qemu-img convert skips only zeros, so all of it is
# copied). The name changes whenever what is written does.
SYNTHETIC_NAME = "synthetic-1g-300m-v1.qcow2"
SYNTHETIC_VIRTUAL = GiB
SYNTHETIC_CHUNK = 4 * MiB
SYNTHETIC_CHUNKS = 75  # 300 MiB

VIRTINST_INSTALL = "apt-get install -y --no-install-recommends virtinst"

# Targets (issue 7); each is reported met or not with its figure.
OVERHEAD_TARGET = 1.10  # warm spawn / warm floor
COLD_TARGET = 1.20  # cold spawn / (convert + warm floor)
FLAT_TARGET = 1.20  # 8 GB / 1 GB spawn time in the default chain

Log = Callable[[str], None]
A = TypeVar("A")
B = TypeVar("B")


class BenchError(MinidriverError):
    """A benchmark found the system not as it must be to measure (say, a cache miss)."""


# -- statistics (pure) --------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """min / median / max of ``n`` samples."""

    min: float
    median: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("no samples")
        return cls(min(values), statistics.median(values), max(values), len(values))

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def summarize(samples: Sequence[Mapping[str, float]], columns: Sequence[str]) -> dict[str, Any]:
    """Each column's min / median / max over the samples (as JSON-ready dicts)."""
    return {col: Stat.of([s[col] for s in samples]).as_dict() for col in columns}


def pair_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """The ratio of each pair (same index: measured next to each other)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators for {len(denominators)} denominators")
    if any(d <= 0 for d in denominators):
        raise ValueError("a denominator is not positive")
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def ratio_stat(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    """Per-pair ratios, summarised: the median is the median of the ratios."""
    return Stat.of(pair_ratios(numerators, denominators)).as_dict()


def alternate(
    runs: int, first: Callable[[int], A], second: Callable[[int], B]
) -> tuple[list[A], list[B]]:
    """``runs`` pairs, run A B, B A, A B...: neither side always goes first."""
    a: list[A] = []
    b: list[B] = []
    for i in range(runs):
        if i % 2 == 0:
            a.append(first(i))
            b.append(second(i))
        else:
            b.append(second(i))
            a.append(first(i))
    return a, b


def in_turn(items: Sequence[A], i: int) -> list[A]:
    """``items`` in order on even rounds, reversed on odd ones."""
    return list(items) if i % 2 == 0 else list(reversed(items))


# -- tables (pure) ------------------------------------------------------------------


def cell(stat: Mapping[str, float], digits: int = 3, suffix: str = "") -> str:
    """``median (min..max)``."""
    d = digits
    return f"{stat['median']:.{d}f}{suffix} ({stat['min']:.{d}f}..{stat['max']:.{d}f})"


def ratio_cell(stat: Mapping[str, float]) -> str:
    return cell(stat, 2, "x")


def format_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} columns")
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(headers), rule, *(line(r) for r in rows)])


def render_header(doc: Mapping[str, Any]) -> str:
    return (
        f"minidriver bench, {doc['date']}: {doc['machine']}\n"
        f"libvirt {doc['uri']}, virt_type {doc['virt_type']}; after a warm-up, {doc['runs']} runs"
        f" per scenario ({doc['long_runs']} of scaling's sizes and of concurrency);"
        " seconds, median (min..max); ratios per pair, median of the pairs"
    )


def render_phases(section: Mapping[str, Any]) -> str:
    cold, warm = section["summary"]["cold"], section["summary"]["warm"]
    rows = [[col, cell(cold[col]), cell(warm[col])] for col in COLUMNS]
    rows.append(["warm / cold total", "", ratio_cell(section["warm_over_cold"])])
    return format_table(
        f"1. phases: spawn of the test guest, {section['flavor']}"
        " (ready: spawn start to the guest's ready line)",
        ["step", "cold", "warm"],
        rows,
    )


def render_floor(section: Mapping[str, Any]) -> str:
    s, r = section["summary"], section["ratios"]
    n = len(section["commands"]["overlays"])
    rows = [
        ["qemu-img convert of the image to raw", cell(s["convert"])],
        [f"qemu-img create of the {n} overlays", cell(s["overlays"])],
        ["libvirt define (same XML)", cell(s["define"])],
        ["libvirt create", cell(s["create"])],
        ["warm floor: overlays + define + create", cell(s["warm_floor"])],
        ["cold floor: convert + warm floor", cell(s["cold_floor"])],
        ["minidriver warm spawn (phases, same rounds)", cell(section["spawn"]["warm"])],
        ["minidriver cold spawn (phases, same rounds)", cell(section["spawn"]["cold"])],
        ["minidriver warm spawn / warm floor", ratio_cell(r["warm"])],
        ["minidriver cold spawn / cold floor", ratio_cell(r["cold"])],
    ]
    return format_table(
        "2. the floor: the rendered XML by hand on fresh overlays, and bare qemu-img",
        ["", "seconds or ratio"],
        rows,
    )


def render_scaling(section: Mapping[str, Any]) -> str:
    image, cold = section["image"], section["cold"]
    first = format_table(
        f"3a. synthetic qcow2, {image['virtual_size'] / GiB:g} GiB virtual,"
        f" {image['data_bytes'] / MiB:.0f} MiB data: cold spawn to RUNNING (root 1 GB)",
        ["", "seconds or ratio"],
        [
            ["cold spawn to RUNNING", cell(cold["spawn"]["total"])],
            ["  its fetch (copy + sha512 + checks)", cell(cold["spawn"]["fetch"])],
            ["  its convert (+ fsync)", cell(cold["spawn"]["convert"])],
            ["qemu-img convert alone", cell(cold["convert"])],
            ["cold spawn / qemu-img convert", ratio_cell(cold["ratio"])],
        ],
    )
    sizes = section["sizes"]
    rows = [
        [
            f"{gb} GB",
            cell(sizes["default"][gb]),
            cell(sizes["resized_copies"][gb]),
            cell(sizes["resize_step"][gb]),
            ratio_cell(section["older_over_default"][gb]),
        ]
        for gb in sizes["default"]
    ]
    flat, gbs = section["flat"], list(sizes["default"])
    flat_cells = [ratio_cell(flat["default"]), ratio_cell(flat["resized_copies"])]
    rows.append([f"{gbs[-1]} GB / {gbs[0]} GB", *flat_cells, "", ""])
    second = format_table(
        "3b. a new root size on a warm cache, spawn to RUNNING"
        " (older chain: a _base/<sha1>_<GB> copy per new size)",
        ["root", "default chain", "older chain", "  its resize step", "older / default"],
        rows,
    )
    return first + "\n\n" + second


def render_peer(section: Mapping[str, Any]) -> str:
    title = "4. peer, warm cache, whole process: minidriver boot --no-wait vs virt-install --import"
    if section.get("missing"):
        return format_table(title, ["", ""], [["virt-install", section["missing"]]])
    s, r = section["summary"], section["ratios"]
    rows = [
        [
            f"minidriver boot ({section['flavor']})",
            cell(s["minidriver"]["running"]),
            cell(s["minidriver"]["ready"]),
        ],
        ["  its spawn() (its --json timings)", cell(s["minidriver"]["spawn"]), ""],
        ["  the rest of the process", cell(s["minidriver"]["outside"]), ""],
        [
            section["virt_install"],
            cell(s["virt_install"]["running"]),
            cell(s["virt_install"]["ready"]),
        ],
        ["minidriver / virt-install", ratio_cell(r["running"]), ratio_cell(r["ready"])],
    ]
    return format_table(title, ["", "to RUNNING", "to ready"], rows)


def _counts(values: Sequence[int]) -> str:
    return " ".join(str(v) for v in values)


def render_concurrency(section: Mapping[str, Any]) -> str:
    rows = []
    for level in section["levels"]:
        how = "at once" if level["mode"] == "concurrent" else "one after another"
        rows.append(
            [
                f"{level['spawns']} {how}",
                cell(level["total"]),
                _counts(level["downloads"]),
                cell(level["per_spawn"]),
            ]
        )
    n = max(LEVELS)
    rows.append([f"{n} at once / {n} one after another", ratio_cell(section["ratio"]), "", ""])
    return format_table(
        "5. concurrency: spawns of one uncached image (synthetic, root 1 GB) to RUNNING,"
        " one driver",
        ["spawns", "total", "downloads per round", "per spawn"],
        rows,
    )


def render_ready(section: Mapping[str, Any]) -> str:
    rows = [
        [
            name,
            cell(part["ready"]),
            cell(part["driver"]),
            cell(part["started"]),
            cell(part["guest"]),
            cell(part["driver_share"], 2),
        ]
        for name, part in section.items()
    ]
    return format_table(
        "6. time to ready: spawn start to the ready line, the driver's share and the guest's",
        [
            "",
            "to ready",
            "driver (spawn total)",
            "STARTED event at",
            "guest (STARTED to ready)",
            "driver / ready",
        ],
        rows,
    )


def render_targets(targets: Sequence[Mapping[str, Any]]) -> str:
    def met(value: bool | None) -> str:
        return {True: "met", False: "NOT met", None: "not measured"}[value]

    rows = [[t["name"], t["goal"], t["measured"], met(t["met"])] for t in targets]
    return format_table("targets", ["target", "goal", "measured (median)", ""], rows)


RENDERERS: Mapping[str, Callable[[Mapping[str, Any]], str]] = {
    "phases": render_phases,
    "floor": render_floor,
    "scaling": render_scaling,
    "peer": render_peer,
    "concurrency": render_concurrency,
    "ready": render_ready,
}


def render(doc: Mapping[str, Any]) -> str:
    """Every table of ``doc`` (the JSON document), in the scenarios' order."""
    parts = [render_header(doc)]
    parts += [RENDERERS[name](section) for name, section in doc["scenarios"].items()]
    parts.append(render_targets(doc["targets"]))
    per = ", ".join(f"{k} {v:.0f} s" for k, v in doc["scenario_seconds"].items())
    parts.append(f"wall time {doc['wall_seconds']:.0f} s ({per})")
    return "\n\n".join(parts)


# -- sections from samples (pure) ---------------------------------------------------


def phases_section(
    flavor: str, cold: Sequence[Mapping[str, float]], warm: Sequence[Mapping[str, float]]
) -> dict[str, Any]:
    return {
        "flavor": flavor,
        "summary": {"cold": summarize(cold, COLUMNS), "warm": summarize(warm, COLUMNS)},
        "warm_over_cold": ratio_stat([w["total"] for w in warm], [c["total"] for c in cold]),
        "samples": {"cold": list(cold), "warm": list(warm)},
    }


FLOOR_COLUMNS = ("convert", "overlays", "define", "create", "warm_floor", "cold_floor")


def floor_section(
    floor: Sequence[Mapping[str, float]],
    cold: Sequence[Mapping[str, float]],
    warm: Sequence[Mapping[str, float]],
    commands: Mapping[str, Any],
) -> dict[str, Any]:
    """``floor`` has convert, overlays, define, create per round; ``cold`` and ``warm``
    are the phases' spawns of the same rounds."""
    samples = []
    for f in floor:
        warm_floor = f["overlays"] + f["define"] + f["create"]
        samples.append({**f, "warm_floor": warm_floor, "cold_floor": f["convert"] + warm_floor})
    return {
        "summary": summarize(samples, FLOOR_COLUMNS),
        "spawn": {
            "warm": Stat.of([w["total"] for w in warm]).as_dict(),
            "cold": Stat.of([c["total"] for c in cold]).as_dict(),
        },
        "ratios": {
            "warm": ratio_stat([w["total"] for w in warm], [s["warm_floor"] for s in samples]),
            "cold": ratio_stat([c["total"] for c in cold], [s["cold_floor"] for s in samples]),
        },
        "commands": dict(commands),
        "samples": samples,
    }


def ready_section(
    cold: Sequence[Mapping[str, float]], warm: Sequence[Mapping[str, float]]
) -> dict[str, Any]:
    """Boot start to ready, split: the driver's (spawn total) and the guest's (from the
    STARTED event to ready). The two overlap between the event and spawn's return."""

    def part(samples: Sequence[Mapping[str, float]]) -> dict[str, Any]:
        return {
            "ready": Stat.of([s["ready"] for s in samples]).as_dict(),
            "driver": Stat.of([s["total"] for s in samples]).as_dict(),
            "started": Stat.of([s["started"] for s in samples]).as_dict(),
            "guest": Stat.of([s["ready"] - s["started"] for s in samples]).as_dict(),
            "driver_share": ratio_stat(
                [s["total"] for s in samples], [s["ready"] for s in samples]
            ),
        }

    return {"cold": part(cold), "warm": part(warm)}


def scaling_section(
    image: Mapping[str, int],
    cold_spawns: Sequence[Mapping[str, float]],
    converts: Sequence[float],
    sizes: Mapping[str, Mapping[int, Sequence[Mapping[str, float]]]],
) -> dict[str, Any]:
    """``sizes[chain][gb]``: the spawns of each round, chains ``default`` and
    ``resized_copies``, rounds in the same order for every size and chain."""
    default, older = sizes["default"], sizes["resized_copies"]
    gbs = sorted(default)
    first, last = gbs[0], gbs[-1]

    def totals(runs: Sequence[Mapping[str, float]]) -> list[float]:
        return [r["total"] for r in runs]

    return {
        "image": dict(image),
        "cold": {
            "spawn": summarize(cold_spawns, COLUMNS[:-1]),
            "convert": Stat.of(converts).as_dict(),
            "ratio": ratio_stat(totals(cold_spawns), converts),
        },
        "sizes": {
            "default": {str(gb): Stat.of(totals(default[gb])).as_dict() for gb in gbs},
            "resized_copies": {str(gb): Stat.of(totals(older[gb])).as_dict() for gb in gbs},
            "resize_step": {
                str(gb): Stat.of([r["resize"] for r in older[gb]]).as_dict() for gb in gbs
            },
        },
        "older_over_default": {
            str(gb): ratio_stat(totals(older[gb]), totals(default[gb])) for gb in gbs
        },
        "flat": {
            chain: ratio_stat(totals(runs[last]), totals(runs[first]))
            for chain, runs in (("default", default), ("resized_copies", older))
        },
        "samples": {
            chain: {str(gb): list(v) for gb, v in runs.items()} for chain, runs in sizes.items()
        },
    }


@dataclass(frozen=True)
class Batch:
    """One batch of spawns: how many, how, how long in all, and each spawn's timings."""

    spawns: int
    mode: str  # concurrent or sequential
    total: float
    timings: tuple[Mapping[str, float], ...]
    cache_hits: tuple[bool, ...]

    @property
    def downloads(self) -> int:
        return sum(1 for t in self.timings if t["fetch"] > 0)


def concurrency_section(batches: Sequence[Batch]) -> dict[str, Any]:
    """Batches of every round; the largest concurrent and sequential ones are paired
    round by round, in the order they were measured."""
    keys = sorted({(b.mode != "concurrent", b.spawns) for b in batches})
    levels = []
    for sequential, spawns in keys:
        mode = "sequential" if sequential else "concurrent"
        same = [b for b in batches if b.mode == mode and b.spawns == spawns]
        levels.append(
            {
                "spawns": spawns,
                "mode": mode,
                "total": Stat.of([b.total for b in same]).as_dict(),
                "downloads": [b.downloads for b in same],
                "base_creations": [b.cache_hits.count(False) for b in same],
                "per_spawn": Stat.of([t["total"] for b in same for t in b.timings]).as_dict(),
                "samples": [
                    {"total": b.total, "spawns": [dict(t) for t in b.timings]} for b in same
                ],
            }
        )
    n = max(b.spawns for b in batches)
    conc = [b.total for b in batches if b.mode == "concurrent" and b.spawns == n]
    seq = [b.total for b in batches if b.mode == "sequential" and b.spawns == n]
    return {"levels": levels, "ratio": ratio_stat(conc, seq)}


def peer_section(
    flavor: str,
    virt_install: str,
    minidriver: Sequence[Mapping[str, float]],
    peer: Sequence[Mapping[str, float]],
    commands: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    cols = ("running", "ready")
    outside = [{**m, "outside": m["running"] - m["spawn"]} for m in minidriver]
    return {
        "flavor": flavor,
        "virt_install": virt_install,
        "missing": None,
        "summary": {
            "minidriver": summarize(outside, (*cols, "spawn", "outside")),
            "virt_install": summarize(peer, cols),
        },
        "ratios": {c: ratio_stat([m[c] for m in minidriver], [p[c] for p in peer]) for c in cols},
        "commands": {k: list(v) for k, v in commands.items()},
        "samples": {"minidriver": list(minidriver), "virt_install": list(peer)},
    }


def peer_missing_section(flavor: str, why: str) -> dict[str, Any]:
    return {"flavor": flavor, "virt_install": None, "missing": why}


def _target(name: str, goal: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"name": name, "goal": goal, "measured": measured, "met": met}


def evaluate_targets(scenarios: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's targets, each with its figure and whether it is met (None: not run)."""
    out = []
    floor = scenarios.get("floor")
    if floor:
        r = floor["ratios"]["warm"]["median"]
        out.append(
            _target(
                "warm spawn overhead above the floor",
                f"< {(OVERHEAD_TARGET - 1) * 100:.0f}%",
                f"{round((r - 1) * 100):+d}% ({r:.2f}x)",  # never "-0%"
                r < OVERHEAD_TARGET,
            )
        )
        r = floor["ratios"]["cold"]["median"]
        out.append(
            _target(
                "cold spawn vs qemu-img convert + floor",
                f"<= {COLD_TARGET:.1f}x",
                f"{r:.2f}x",
                r <= COLD_TARGET,
            )
        )
    scaling = scenarios.get("scaling")
    if scaling:
        sizes = list(scaling["sizes"]["default"])
        r = scaling["flat"]["default"]["median"]
        older = scaling["flat"]["resized_copies"]["median"]
        out.append(
            _target(
                f"new root size, warm cache, default chain: {sizes[-1]} GB / {sizes[0]} GB",
                f"flat (<= {FLAT_TARGET:.1f}x)",
                f"{r:.2f}x (older chain {older:.2f}x)",
                r <= FLAT_TARGET,
            )
        )
    conc = scenarios.get("concurrency")
    if conc:
        n = max(LEVELS)
        top = [lv for lv in conc["levels"] if lv["mode"] == "concurrent" and lv["spawns"] == n]
        downloads = top[0]["downloads"] if top else []
        r = conc["ratio"]["median"]
        out.append(
            _target(
                f"{n} concurrent spawns vs {n} one after another",
                "sooner (< 1x), one download",
                f"{r:.2f}x, downloads {_counts(downloads)}",
                r < 1 and bool(downloads) and all(d == 1 for d in downloads),
            )
        )
    peer = scenarios.get("peer")
    if peer:
        name = "warm minidriver boot vs virt-install, to RUNNING"
        if peer.get("missing"):
            out.append(_target(name, "< 1x", peer["missing"], None))
        else:
            r = peer["ratios"]["running"]["median"]
            out.append(_target(name, "< 1x", f"{r:.2f}x", r < 1))
    return out


# -- commands (pure) ----------------------------------------------------------------


def synthetic_writes(
    virtual: int = SYNTHETIC_VIRTUAL, chunk: int = SYNTHETIC_CHUNK, count: int = SYNTHETIC_CHUNKS
) -> list[str]:
    """qemu-io commands: ``count`` chunks spread evenly, each of its own non-zero byte."""
    stride = (virtual // count) // MiB * MiB
    if stride < chunk:
        raise ValueError(f"{count} chunks of {chunk} bytes do not fit in {virtual}")
    return [f"write -P {(i * 37) % 255 + 1} {i * stride} {chunk}" for i in range(count)]


def parse_version(text: str) -> tuple[int, ...]:
    """``4.1.0`` (or ``virt-install 4.1.0``) -> (4, 1, 0)."""
    match = re.search(r"(\d+(?:\.\d+)*)", text)
    if not match:
        raise ValueError(f"no version in {text!r}")
    return tuple(int(p) for p in match.group(1).split("."))


def osinfo_args(version: tuple[int, ...]) -> list[str]:
    """virt-install 4.0 made an OS mandatory unless told otherwise."""
    if version >= (4, 0):
        return ["--osinfo", "detect=on,require=off"]
    return ["--os-variant", "generic"]


def virt_install_cmd(
    *,
    uri: str,
    name: str,
    overlay: Path,
    base: Path,
    base_format: str,
    size_gb: int,
    console_log: Path,
    virt_type: str,
    version: tuple[int, ...],
    memory_mb: int = 128,
    vcpus: int = 1,
) -> list[str]:
    """virt-install importing an overlay it makes on ``base``, serial to a file."""
    for path in (overlay, base, console_log):
        if "," in os.fspath(path):
            raise ValueError(f"virt-install options cannot hold a comma: {path}")
    disk = (
        f"path={overlay},format=qcow2,bus=virtio,backing_store={base},"
        f"backing_format={base_format},size={size_gb}"
    )
    options = {
        "--connect": uri,
        "--name": name,
        "--memory": str(memory_mb),
        "--vcpus": str(vcpus),
        "--disk": disk,
        "--graphics": "none",
        "--serial": f"file,path={console_log}",
        "--network": "none",
        "--virt-type": virt_type,
        "--machine": "pc",
    }
    pairs = [arg for option in options.items() for arg in option]
    return ["virt-install", "--import", *pairs, *osinfo_args(version), "--noautoconsole"]


def is_ours(name: str, xml: str, state_id: str, name_prefix: str) -> bool:
    """A domain this run made: minidriver's carry our state id, virt-install's our prefix."""
    return name.startswith(name_prefix) or f">{state_id}<" in xml


def pool_path(xml: str) -> str | None:
    match = re.search(r"<target>\s*<path>([^<]+)</path>", xml)
    return match.group(1) if match else None


# -- measuring ----------------------------------------------------------------------


def synthetic_image(work_dir: Path, log: Log) -> Path:
    """The synthetic qcow2, made once and kept in ``work_dir``."""
    out = work_dir / SYNTHETIC_NAME
    if out.exists():
        return out
    work_dir.mkdir(parents=True, exist_ok=True)
    log(f"writing {out} ({SYNTHETIC_CHUNKS * SYNTHETIC_CHUNK // MiB} MiB of data)")
    temp = out.with_name(f".{out.name}.{os.getpid()}")
    try:
        qemu_img.create(temp, "qcow2", SYNTHETIC_VIRTUAL)
        commands = [arg for write in synthetic_writes() for arg in ("-c", write)]
        run(["qemu-io", "-f", "qcow2", *commands, temp])
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    return out


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


@dataclass(frozen=True)
class Runs:
    """Measured runs per scenario: ``long`` for scaling's sizes and concurrency, whose
    one run is 8 and 23 spawns."""

    short: int
    long: int


@dataclass(frozen=True)
class FloorTemplate:
    """An instance's rendered XML and the overlay commands minidriver ran for it."""

    instance_dir: Path
    xml: str
    disks: tuple[Path, ...]
    overlays: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class PeerSetup:
    """What every virt-install run shares: its directory, environment and options."""

    dir: Path
    env: Mapping[str, str]
    options: Mapping[str, Any]

    def command(self, name: str, overlay: Path, console_log: Path) -> list[str]:
        return virt_install_cmd(name=name, overlay=overlay, console_log=console_log, **self.options)


class Bench:
    """The scenarios, on one driver and one state dir."""

    def __init__(self, conf: Config, state: Path, work_dir: Path, runs: Runs, log: Log) -> None:
        self.conf = dataclasses.replace(conf, flavors={**conf.flavors, **BENCH_FLAVORS})
        self.state = state
        self.work_dir = work_dir
        self.runs = runs.short
        self.long_runs = runs.long
        self.log = log
        self.drv = LibvirtDriver(self.conf)
        self.conn = self.drv.host.get_connection()
        self.events = StartedEvents(self.drv.host.uri)
        self.prefix = f"{state.name}-vi-"
        self.scratch = state / "scratch"
        self.scratch.mkdir()
        self._older: LibvirtDriver | None = None
        self._synthetic: str | None = None
        self._keep: list[str] = []  # instances kept until the end (the floor's template)
        self._serial = itertools.count()
        self.test_image = testimage.build(log=lambda msg: log(f"test image: {msg}"))
        self.test_image_id = self.drv.images.add(
            self.test_image, name="bench", disk_format="qcow2"
        ).id

    # -- helpers

    @property
    def older_chain(self) -> LibvirtDriver:
        """A driver on the same host and state with ``resized_base_copies = true``."""
        if self._older is None:
            self._older = LibvirtDriver(
                self.conf.with_libvirt(resized_base_copies=True), host=self.drv.host
            )
        return self._older

    @property
    def synthetic_id(self) -> str:
        if self._synthetic is None:
            path = synthetic_image(self.work_dir, self.log)
            self.log(f"adding {path.name} to the store")
            self._synthetic = self.drv.images.add(path, name="synthetic", disk_format="qcow2").id
        return self._synthetic

    def base(self, image_id: str) -> Path:
        return self.conf.base_dir / base_filename(image_id)

    def spawn(
        self, image_id: str, flavor: str, *, cold: bool, drv: LibvirtDriver | None = None
    ) -> Instance:
        """A spawn to RUNNING, the cache emptied first when ``cold``; checks hit or miss."""
        drv = drv or self.drv
        if cold:
            self.base(image_id).unlink(missing_ok=True)
        inst = drv.spawn(name="bench", image=image_id, flavor=flavor)
        if inst.cache_hit == cold:
            drv.destroy(inst.uuid)
            raise BenchError(f"expected cache_hit={not cold}, got {inst.cache_hit}")
        return inst

    def spawn_to_ready(self, flavor: str, *, cold: bool, ready: bool = True) -> dict[str, float]:
        """A spawn of the test guest, then the wait for its ready line (unless not
        ``ready``: warm-ups), the STARTED event's time; destroyed after."""
        started = time.monotonic()
        inst = self.spawn(self.test_image_id, flavor, cold=cold)
        try:
            if not ready:
                return dict(inst.timings)
            console.wait_for_console(
                Path(inst.instance_dir) / "console.log", READY, READY_TIMEOUT, interval=0.05
            )
            figures = dict(inst.timings)
            figures["ready"] = time.monotonic() - started
            event = self.events.started(inst.uuid)
            if event is None:
                raise BenchError(f"no STARTED event for {inst.name}")
            figures["started"] = event - started
            return figures
        finally:
            self.drv.destroy(inst.uuid)

    def convert_once(self, source: Path, fmt: str) -> float:
        """A bare ``qemu-img convert`` to raw (the file removed after)."""
        dest = self.scratch / "convert.raw"
        dest.unlink(missing_ok=True)
        started = time.monotonic()
        run(qemu_img.convert_cmd(source, fmt, dest, "raw"))
        elapsed = time.monotonic() - started
        dest.unlink()
        return elapsed

    def floor_template(self, flavor: str) -> FloorTemplate:
        """A warm spawn whose domain is then undefined: its dir, XML and disks stay."""
        inst = self.spawn(self.test_image_id, flavor, cold=False)
        self._keep.append(inst.uuid)
        instance_dir = Path(inst.instance_dir)
        disks, overlays = [], []
        for path, fmt in json.loads((instance_dir / "disk.info").read_text()).items():
            info = qemu_img.info(path, fmt)
            if fmt != "qcow2" or not info.backing_file:
                raise BenchError(
                    f"{path} is not a qcow2 overlay: the floor needs the qcow2 backend"
                )
            disks.append(Path(path))
            cmd = qemu_img.create_cow_image_cmd(
                Path(info.backing_file), info.backing_format or "raw", Path(path), info.virtual_size
            )
            overlays.append(tuple(cmd))
        self._remove_domain(inst.name)
        return FloorTemplate(
            instance_dir, (instance_dir / "libvirt.xml").read_text(), tuple(disks), tuple(overlays)
        )

    def floor_once(self, template: FloorTemplate) -> dict[str, float]:
        """Fresh overlays by bare qemu-img, then define + create of the same XML."""
        for disk in template.disks:
            disk.unlink(missing_ok=True)
        (template.instance_dir / "console.log").write_bytes(b"")
        t0 = time.monotonic()
        for cmd in template.overlays:
            run(cmd)
        t1 = time.monotonic()
        domain = self.conn.defineXML(template.xml)
        try:
            t2 = time.monotonic()
            domain.create()
            t3 = time.monotonic()
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                domain.destroy()
            domain.undefine()
        return {"overlays": t1 - t0, "define": t2 - t1, "create": t3 - t2}

    # -- 1, 2 and 6: phases, the floor, time to ready

    def phases(self, flavor: str) -> dict[str, dict[str, Any]]:
        log = self.log
        source = self.drv.images.get(self.test_image_id).path
        log("phases: warm-up")
        self.spawn_to_ready(flavor, cold=True, ready=False)
        template = self.floor_template(flavor)  # the warm-up's warm spawn
        self.floor_once(template)
        self.convert_once(source, "qcow2")
        cold: list[dict[str, float]] = []
        warm: list[dict[str, float]] = []
        floor: list[dict[str, float]] = []
        for i in range(self.runs):
            convert = 0.0
            for what in in_turn(("cold", "convert", "warm", "floor"), i):
                if what == "cold":
                    cold.append(self.spawn_to_ready(flavor, cold=True))
                elif what == "warm":
                    warm.append(self.spawn_to_ready(flavor, cold=False))
                elif what == "convert":
                    convert = self.convert_once(source, "qcow2")
                else:
                    floor.append(self.floor_once(template))
            floor[-1]["convert"] = convert
            log(
                f"phases {i + 1}/{self.runs}: cold {cold[-1]['total']:.3f} s,"
                f" warm {warm[-1]['total']:.3f} s, floor"
                f" {sum(floor[-1][k] for k in ('overlays', 'define', 'create')):.3f} s,"
                f" convert {convert:.3f} s, ready {warm[-1]['ready']:.2f} s"
            )
        commands = {
            "convert": qemu_img.convert_cmd(source, "qcow2", self.scratch / "convert.raw", "raw"),
            "overlays": [list(c) for c in template.overlays],
            "define_create": ["virDomainDefineXML", "virDomainCreate"],
        }
        return {
            "phases": phases_section(flavor, cold, warm),
            "floor": floor_section(floor, cold, warm, commands),
            "ready": ready_section(cold, warm),
        }

    # -- 3: image size scaling

    def scaling(self) -> dict[str, Any]:
        log = self.log
        image_id = self.synthetic_id
        source = self.drv.images.get(image_id).path
        info = qemu_img.info(source, "qcow2")
        smallest = f"bench.r{SIZES_GB[0]}"

        def cold_spawn(_i: int) -> dict[str, float]:
            inst = self.spawn(image_id, smallest, cold=True)
            self.drv.destroy(inst.uuid)
            return inst.timings

        def convert(_i: int) -> float:
            return self.convert_once(source, "qcow2")

        log("scaling: warm-up")
        cold_spawn(-1)
        convert(-1)
        spawns, converts = alternate(self.runs, cold_spawn, convert)
        log(f"scaling: cold spawn {statistics.median(s['total'] for s in spawns):.3f} s")

        chains = {"default": self.drv, "resized_copies": self.older_chain}

        def new_size(chain: str, gb: int) -> Instance:
            # A new size for the older chain: its _<GB> copy must not exist yet.
            (self.conf.base_dir / f"{base_filename(image_id)}_{gb}").unlink(missing_ok=True)
            return self.spawn(image_id, f"bench.r{gb}", cold=False, drv=chains[chain])

        self.destroy_all([new_size(chain, SIZES_GB[0]) for chain in chains])
        sizes: dict[str, dict[int, list[dict[str, float]]]] = {
            chain: {gb: [] for gb in SIZES_GB} for chain in chains
        }
        for i in range(self.long_runs):
            for j, gb in enumerate(in_turn(SIZES_GB, i)):
                pair = [(chain, new_size(chain, gb)) for chain in in_turn(list(chains), i + j)]
                # Both stopped at once after the pair: libvirt takes 1 to 2 s per domain.
                self.destroy_all([inst for _, inst in pair])
                for chain, inst in pair:
                    sizes[chain][gb].append(inst.timings)
            log(
                f"scaling {i + 1}/{self.long_runs}: "
                + ", ".join(
                    f"{gb} GB {sizes['default'][gb][-1]['total']:.2f}"
                    f"/{sizes['resized_copies'][gb][-1]['total']:.2f} s"
                    for gb in SIZES_GB
                )
            )
        image = {
            "virtual_size": info.virtual_size,
            "data_bytes": SYNTHETIC_CHUNKS * SYNTHETIC_CHUNK,
        }
        return scaling_section(image, spawns, converts, sizes)

    # -- 4: the peer

    def minidriver_cmd(self, flavor: str) -> list[str]:
        """``minidriver boot`` as a user runs it, on this run's state dir and host."""
        exe = Path(sys.executable).with_name("minidriver")
        prefix = [os.fspath(exe)] if exe.exists() else [sys.executable, "-m", "minidriver"]
        state = ["--config", os.devnull, "--state-dir", os.fspath(self.state)]
        boot = ["boot", "--image", self.test_image_id, "--flavor", flavor, "--name", "bench-peer"]
        return [*prefix, *state, "--connect", self.drv.host.uri, "--json", *boot, "--no-wait"]

    def minidriver_boot(self, cmd: Sequence[str], *, ready: bool = True) -> dict[str, float]:
        started = time.monotonic()
        # As installed: bytecode written once (by the warm-up) and read after, as
        # virt-install's is. An inherited PYTHONDONTWRITEBYTECODE made every run
        # compile minidriver from source (~40 ms here); empty is unset to Python.
        out = run(cmd, timeout=READY_TIMEOUT, env={"PYTHONDONTWRITEBYTECODE": ""})
        running = time.monotonic() - started
        data = json.loads(out.stdout)
        try:
            if data["state"] != "running" or not data["cache_hit"]:
                raise BenchError(f"minidriver boot: {data['state']}, warm: {data['cache_hit']}")
            log_file = Path(data["instance_dir"]) / "console.log"
            if ready:
                console.wait_for_console(log_file, READY, READY_TIMEOUT, interval=0.05)
            to_ready = time.monotonic() - started
        finally:
            self.drv.destroy(data["uuid"])
        self.log(f"peer: minidriver boot {running:.3f} s to RUNNING, {to_ready:.2f} s to ready")
        return {"running": running, "ready": to_ready, "spawn": data["timings"]["total"]}

    def virt_install(self, peer: PeerSetup, *, ready: bool = True) -> dict[str, float]:
        n = next(self._serial)
        name = f"{self.prefix}{n}"
        overlay, log_file = peer.dir / f"vi-{n}.qcow2", peer.dir / f"vi-{n}.log"
        started = time.monotonic()
        try:
            run(peer.command(name, overlay, log_file), env=peer.env, timeout=READY_TIMEOUT)
            running = time.monotonic() - started
            state = self.drv.host.domain_state(self.conn.lookupByName(name))
            if state != "running":
                raise BenchError(f"virt-install: {name} is {state}")
            if ready:
                console.wait_for_console(log_file, READY, READY_TIMEOUT, interval=0.05)
            to_ready = time.monotonic() - started
        finally:
            self._remove_domain(name)
            overlay.unlink(missing_ok=True)
            log_file.unlink(missing_ok=True)
        self.log(f"peer: virt-install {running:.3f} s to RUNNING, {to_ready:.2f} s to ready")
        return {"running": running, "ready": to_ready}

    def peer(self, flavor: str) -> dict[str, Any]:
        if self.drv.host.uri.startswith(EMBED_URI):
            why = "needs a libvirt daemon (the embedded driver serves one process)"
            return peer_missing_section(flavor, why)
        if shutil.which("virt-install") is None:
            return peer_missing_section(flavor, f"not installed: {VIRTINST_INSTALL}")
        version = run(["virt-install", "--version"]).stdout.strip()
        # virt-install makes a storage pool named after the directory: make it ours.
        peer_dir = self.state / f"{self.state.name}-peer"
        peer_dir.mkdir(mode=0o755)
        f = self.conf.flavors[flavor]
        setup = PeerSetup(
            dir=peer_dir,
            env={"XDG_CACHE_HOME": os.fspath(self.state / "xdg-cache")},  # its log file
            options={
                "uri": self.drv.host.uri,
                "base": self.base(self.test_image_id),
                "base_format": "raw" if self.conf.default.force_raw_images else "qcow2",
                "size_gb": f.root_gb,
                "virt_type": self.drv.host.virt_type.virt_type,
                "version": parse_version(version),
                "memory_mb": f.memory_mb,
                "vcpus": f.vcpus,
            },
        )
        md_cmd = self.minidriver_cmd(flavor)
        self.log("peer: warm-up")
        if not self.base(self.test_image_id).exists():
            self.drv.destroy(self.spawn(self.test_image_id, flavor, cold=True).uuid)
        self.minidriver_boot(md_cmd, ready=False)
        self.virt_install(setup, ready=False)
        md, vi = alternate(
            self.runs, lambda _i: self.minidriver_boot(md_cmd), lambda _i: self.virt_install(setup)
        )
        example = setup.command(f"{self.prefix}N", peer_dir / "vi-N.qcow2", peer_dir / "vi-N.log")
        commands = {"minidriver": md_cmd, "virt_install": example}
        return peer_section(flavor, f"virt-install {version}", md, vi, commands)

    # -- 5: concurrency

    def batch(self, image_id: str, spawns: int, *, concurrent: bool) -> Batch:
        """``spawns`` spawns of the uncached image, all kept running until the end."""
        flavor = f"bench.r{SIZES_GB[0]}"
        self.base(image_id).unlink(missing_ok=True)
        instances: list[Instance] = []
        errors: list[BaseException] = []

        def one(i: int) -> Instance:
            return self.drv.spawn(name=f"bench-{i}", image=image_id, flavor=flavor)

        try:
            started = time.monotonic()
            if concurrent:
                with ThreadPoolExecutor(max_workers=spawns) as pool:
                    futures: list[Future[Instance]] = [pool.submit(one, i) for i in range(spawns)]
                    for future in futures:
                        try:
                            instances.append(future.result())
                        except Exception as exc:
                            errors.append(exc)
            else:
                for i in range(spawns):
                    instances.append(one(i))
            total = time.monotonic() - started
        finally:
            self.destroy_all(instances)
        if errors:
            raise errors[0]
        return Batch(
            spawns,
            "concurrent" if concurrent else "sequential",
            total,
            tuple(i.timings for i in instances),
            tuple(i.cache_hit for i in instances),
        )

    def concurrency(self) -> dict[str, Any]:
        image_id = self.synthetic_id
        self.log("concurrency: warm-up")
        self.batch(image_id, 1, concurrent=True)
        plan = [(n, True) for n in LEVELS] + [(max(LEVELS), False)]
        batches: list[Batch] = []
        for i in range(self.long_runs):
            for spawns, concurrent in in_turn(plan, i):
                batches.append(self.batch(image_id, spawns, concurrent=concurrent))
            self.log(
                f"concurrency {i + 1}/{self.long_runs}: "
                + ", ".join(
                    f"{b.spawns}{'c' if b.mode == 'concurrent' else 's'} {b.total:.2f} s"
                    f" ({b.downloads} dl)"
                    for b in batches[-len(plan) :]
                )
            )
        return concurrency_section(batches)

    # -- clean-up

    def destroy_all(self, instances: Sequence[Instance]) -> None:
        """Destroy in parallel: libvirt takes 1 to 2 s to stop each QEMU here."""
        if not instances:
            return
        with ThreadPoolExecutor(max_workers=len(instances)) as pool:
            for future in [pool.submit(self.drv.destroy, i.uuid) for i in instances]:
                future.result()

    def _remove_domain(self, name: str) -> None:
        try:
            domain = self.conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        with contextlib.suppress(libvirt.libvirtError):
            domain.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            domain.undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            )

    def sweep(self) -> list[str]:
        """Remove whatever this run left on libvirt: domains, and virt-install's pools."""
        removed = []
        state_id = self.drv.db.state_id
        for domain in self.conn.listAllDomains(0):
            try:
                name, xml = domain.name(), domain.XMLDesc(0)
            except libvirt.libvirtError:
                continue  # gone meanwhile
            if is_ours(name, xml, state_id, self.prefix):
                self._remove_domain(name)
                removed.append(f"domain {name}")
        for pool in self.conn.listAllStoragePools(0):
            try:
                path = pool_path(pool.XMLDesc(0))
            except libvirt.libvirtError:
                continue
            if path and Path(path).is_relative_to(self.state):
                with contextlib.suppress(libvirt.libvirtError):
                    pool.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    pool.undefine()
                removed.append(f"pool {pool.name()}")
        return removed

    def close(self) -> list[str]:
        for uuid in self._keep:
            with contextlib.suppress(MinidriverError):
                self.drv.destroy(uuid)
        removed = self.sweep()
        self.events.close()
        self.drv.host.close()
        return removed


# -- the command --------------------------------------------------------------------


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


def build_parser() -> argparse.ArgumentParser:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="measured runs per scenario")
    parser.add_argument(
        "--quick", action="store_true", help="3 runs, 2 of the long ones (under 5 min here)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--connect", metavar="URI", help="libvirt URI (default: auto)")
    parser.add_argument("--flavor", default="t1.nano", help="flavor of the test guest")
    parser.add_argument(
        "--only",
        action="append",
        choices=(*SCENARIOS, "template"),
        help="run only this scenario (repeatable); template (the Debian guest booted and"
        " cloned, minutes under TCG) runs only when named, and alone",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where the synthetic image is kept between runs (default: build/bench)",
    )
    return parser


def run_scenarios(
    bench: Bench, chosen: Sequence[str], flavor: str
) -> tuple[dict[str, Any], dict[str, float]]:
    """The chosen scenarios' sections, in the tables' order, and each one's wall time."""
    runners: Mapping[str, Callable[[], dict[str, Any]]] = {
        "phases": lambda: bench.phases(flavor),  # also floor and ready
        "scaling": lambda: {"scaling": bench.scaling()},
        "peer": lambda: {"peer": bench.peer(flavor)},
        "concurrency": lambda: {"concurrency": bench.concurrency()},
    }
    scenarios: dict[str, Any] = {}
    seconds = {}
    for name in chosen:
        started = time.monotonic()
        scenarios.update(runners[name]())
        seconds[name] = round(time.monotonic() - started, 1)
    order = ("phases", "floor", "scaling", "peer", "concurrency", "ready")
    return {k: scenarios[k] for k in order if k in scenarios}, seconds


def make_log(started: float) -> Log:
    def log(msg: str) -> None:
        print(f"bench [{time.monotonic() - started:5.0f} s]: {msg}", file=sys.stderr, flush=True)

    return log


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runs = Runs(3, 2) if args.quick else Runs(args.runs, args.runs)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.only and "template" in args.only:
        if set(args.only) != {"template"}:
            parser.error("--only template runs alone")
        from minidriver.bench import template  # noqa: PLC0415 - a scenario of its own

        return template.run_from_args(args)
    chosen = [s for s in SCENARIOS if not args.only or s in args.only]
    work_dir = args.work_dir or testimage.default_output_dir() / "bench"
    wall_start = time.monotonic()
    log = make_log(wall_start)
    # A traversable state dir of its own: libvirt's QEMU user must reach it.
    state = Path(tempfile.mkdtemp(prefix="mdbench-", dir="/var/tmp"))
    state.chmod(0o755)
    bench: Bench | None = None

    def body() -> None:
        nonlocal bench
        conf = load_config(None, state_dir=state, environ={})
        if args.connect:
            conf = conf.with_libvirt(connection_uri=args.connect)
        bench = Bench(conf, state, work_dir, runs, log)
        host = bench.drv.host
        log(f"{host.uri}, {host.virt_type.virt_type} ({host.virt_type.reason}); state {state}")
        scenarios, seconds = run_scenarios(bench, chosen, args.flavor)
        wall = time.monotonic() - wall_start
        doc = build_doc(
            uri=host.uri,
            virt_type=host.virt_type.virt_type,
            runs=runs,
            quick=args.quick,
            scenarios=scenarios,
            seconds=seconds,
            wall=wall,
        )
        print(render(doc), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")

    def cleanup(code: int) -> None:
        if bench is not None:
            left = bench.close()
            if left and code:
                log(f"removed what the failed run left: {', '.join(left)}")
        shutil.rmtree(state, ignore_errors=True)

    return run_guarded(body, cleanup, log)


if __name__ == "__main__":
    sys.exit(main())
