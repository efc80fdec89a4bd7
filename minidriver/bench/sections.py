"""Each benchmark scenario's section of the JSON document, from its samples (pure).

A section holds the summaries (min / median / max), the per-pair ratios and the raw
samples; the tables (``report``) are rendered from it alone, so a saved document
renders the same. (No Nova counterpart: tooling.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from minidriver.bench.stats import Stat, ratio_stat, summarize
from minidriver.steps import Step

# The phases' columns: spawn's steps, its total, and spawn's start to the ready line.
COLUMNS = [s.value for s in Step] + ["total", "ready"]
SIZES_GB = (1, 2, 4, 8)  # scaling's root sizes
LEVELS = (1, 2, 4, 8)  # concurrency's spawns at once


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
    section = {
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
    if all("cpu" in x for x in (*floor, *warm)):
        # CPU seconds in this process and its children (libvirt's own work is the
        # daemon's): the warm spawn's above the floor's, pair by pair.
        section["cpu"] = {
            "floor": Stat.of([f["cpu"] for f in floor]).as_dict(),
            "warm": Stat.of([w["cpu"] for w in warm]).as_dict(),
            "warm_above_floor": Stat.of(
                [w["cpu"] - f["cpu"] for w, f in zip(warm, floor, strict=True)]
            ).as_dict(),
        }
    return section


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
    floors: Sequence[Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """``sizes[chain][gb]``: the spawns of each round, chains ``default`` and
    ``resized_copies``, rounds in the same order for every size and chain.
    ``floors``: the image's warm floor (overlays, define, create) of each cold round,
    measured beside that round's cold spawn and convert."""
    default, older = sizes["default"], sizes["resized_copies"]
    gbs = sorted(default)
    first, last = gbs[0], gbs[-1]

    def totals(runs: Sequence[Mapping[str, float]]) -> list[float]:
        return [r["total"] for r in runs]

    cold: dict[str, Any] = {
        "spawn": summarize(cold_spawns, COLUMNS[:-1]),
        "convert": Stat.of(converts).as_dict(),
        "ratio": ratio_stat(totals(cold_spawns), converts),
    }
    if floors:
        warm_floors = [f["overlays"] + f["define"] + f["create"] for f in floors]
        cold_floors = [c + w for c, w in zip(converts, warm_floors, strict=True)]
        cold["floor"] = Stat.of(warm_floors).as_dict()
        cold["cold_floor"] = Stat.of(cold_floors).as_dict()
        cold["ratio_floor"] = ratio_stat(totals(cold_spawns), cold_floors)
        cold["floor_samples"] = [dict(f) for f in floors]
    return {
        "image": dict(image),
        "cold": cold,
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
    *,
    like: Sequence[Mapping[str, float]] = (),
    full: Sequence[Mapping[str, float]] = (),
) -> dict[str, Any]:
    """``minidriver`` and ``peer`` (virt-install) samples of the same rounds; ``like``:
    minidriver asked what virt-install is asked, ``full``: virt-install given
    minidriver's disks and NIC. Samples with ``cpu`` (seconds) get its column and
    ratios too."""
    cols = ("running", "ready")
    cpu = ("cpu",) if minidriver and all("cpu" in m for m in (*minidriver, *peer)) else ()
    outside = [{**m, "outside": m["running"] - m["spawn"]} for m in minidriver]
    summary = {
        "minidriver": summarize(outside, (*cols, "spawn", "outside", *cpu)),
        "virt_install": summarize(peer, (*cols, *cpu)),
    }

    def ratios(num: Sequence[Mapping[str, float]], den: Sequence[Mapping[str, float]]) -> Any:
        return {c: ratio_stat([n[c] for n in num], [d[c] for d in den]) for c in (*cols, *cpu)}

    section: dict[str, Any] = {
        "flavor": flavor,
        "virt_install": virt_install,
        "missing": None,
        "summary": summary,
        "ratios": ratios(minidriver, peer),
        "commands": {k: list(v) for k, v in commands.items()},
        "samples": {"minidriver": list(minidriver), "virt_install": list(peer)},
    }
    if like:
        like_outside = [{**m, "outside": m["running"] - m["spawn"]} for m in like]
        summary["minidriver_like"] = summarize(like_outside, (*cols, "spawn", "outside", *cpu))
        section["ratios_like"] = ratios(like, peer)
        section["samples"]["minidriver_like"] = list(like)
    if full:
        summary["virt_install_full"] = summarize(full, (*cols, *cpu))
        section["ratios_full"] = ratios(minidriver, full)
        section["samples"]["virt_install_full"] = list(full)
    return section


def peer_missing_section(flavor: str, why: str) -> dict[str, Any]:
    return {"flavor": flavor, "virt_install": None, "missing": why}
