"""The benchmark's tables and targets, rendered from the JSON document (pure).

``render`` prints every scenario's table in order, then the targets, each with its
goal, its figure (median, and the spread of the pairs where it is a ratio) and
whether it is met. (No Nova counterpart: tooling.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from minidriver.bench.sections import COLUMNS, LEVELS
from minidriver.objects import GiB, MiB

# Targets (issue 7); each is reported met or not with its figure.
OVERHEAD_TARGET = 1.10  # warm spawn / warm floor
COLD_TARGET = 1.20  # cold spawn / (convert + warm floor), the test guest
SYNTHETIC_COLD_TARGET = 1.5  # the same, the synthetic image (issue 17)
FLAT_TARGET = 1.20  # 8 GB / 1 GB spawn time in the default chain
PEER_TARGET = 0.9  # warm minidriver boot / virt-install, to RUNNING (issue 17)


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
    cpu = section.get("cpu")
    if cpu:
        rows += [
            ["CPU (user+sys, ours and children's): warm floor", cell(cpu["floor"])],
            ["CPU: minidriver warm spawn", cell(cpu["warm"])],
            ["CPU: warm spawn above the floor, per pair", cell(cpu["warm_above_floor"])],
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
            ["  its fetch (checks of the store's file)", cell(cold["spawn"]["fetch"])],
            ["  its convert (+ fsync, sha512 beside it)", cell(cold["spawn"]["convert"])],
            ["qemu-img convert alone", cell(cold["convert"])],
            ["cold spawn / qemu-img convert", ratio_cell(cold["ratio"])],
            *(
                [
                    ["warm floor: qemu-img create + define + create", cell(cold["floor"])],
                    ["cold floor: qemu-img convert + warm floor", cell(cold["cold_floor"])],
                    ["cold spawn / cold floor", ratio_cell(cold["ratio_floor"])],
                ]
                if "ratio_floor" in cold
                else []
            ),
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
    s = section["summary"]
    cpu = "cpu" in s["minidriver"]

    def row(label: str, stats: Mapping[str, Any]) -> list[str]:
        cells = [label, cell(stats["running"]), cell(stats["ready"])]
        return cells + ([cell(stats["cpu"])] if cpu else [])

    def ratio_row(label: str, ratios: Mapping[str, Any]) -> list[str]:
        cells = [label, ratio_cell(ratios["running"]), ratio_cell(ratios["ready"])]
        return cells + ([ratio_cell(ratios["cpu"])] if cpu else [])

    blank = [""] if cpu else []
    rows = [
        row(f"minidriver boot ({section['flavor']})", s["minidriver"]),
        ["  its spawn() (its --json timings)", cell(s["minidriver"]["spawn"]), "", *blank],
        ["  the rest of the process", cell(s["minidriver"]["outside"]), "", *blank],
        row(section["virt_install"] + " (one disk, no NIC)", s["virt_install"]),
        ratio_row("minidriver / virt-install", section["ratios"]),
    ]
    if "minidriver_like" in s:
        rows += [
            row("minidriver boot, one disk, --network none", s["minidriver_like"]),
            ratio_row("  / virt-install (like for like)", section["ratios_like"]),
        ]
    if "virt_install_full" in s:
        rows += [
            row("virt-install given minidriver's 3 disks, a user NIC", s["virt_install_full"]),
            ratio_row("minidriver boot / that (like for like)", section["ratios_full"]),
        ]
    headers = ["", "to RUNNING", "to ready"] + (["CPU (user+sys)"] if cpu else [])
    return format_table(title, headers, rows)


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

    rows = [
        [t["name"], t["goal"], t["measured"], t.get("spread", ""), met(t["met"])] for t in targets
    ]
    return format_table(
        "targets", ["target", "goal", "measured (median)", "pairs (min..max)", ""], rows
    )


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


def _target(
    name: str, goal: str, measured: str, met: bool | None, ratio: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """``ratio``: the per-pair ratio the figure is the median of; its spread is shown."""
    spread = f"{ratio['min']:.2f}..{ratio['max']:.2f}x" if ratio else ""
    return {"name": name, "goal": goal, "measured": measured, "spread": spread, "met": met}


def evaluate_targets(scenarios: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issues 7 and 17's targets, each with its figure (and the spread of the pairs
    where it is a ratio) and whether it is met (None: not measured)."""
    out = []
    floor = scenarios.get("floor")
    if floor:
        ratio = floor["ratios"]["warm"]
        r = ratio["median"]
        out.append(
            _target(
                "warm spawn overhead above the floor",
                f"within {OVERHEAD_TARGET:.2f}x",
                f"{round((r - 1) * 100):+d}% ({r:.2f}x)",  # never "-0%"
                r <= OVERHEAD_TARGET,
                ratio,
            )
        )
        ratio = floor["ratios"]["cold"]
        r = ratio["median"]
        out.append(
            _target(
                "cold spawn vs qemu-img convert + floor",
                f"<= {COLD_TARGET:.1f}x",
                f"{r:.2f}x",
                r <= COLD_TARGET,
                ratio,
            )
        )
    scaling = scenarios.get("scaling")
    if scaling:
        cold = scaling["cold"]
        name = (
            f"cold spawn of the synthetic {scaling['image']['data_bytes'] / MiB:.0f} MiB image"
            " vs qemu-img convert alone + the warm floor"
        )
        goal = f"at most {SYNTHETIC_COLD_TARGET:.1f}x"
        if "ratio_floor" in cold:
            r = cold["ratio_floor"]["median"]
            met = r <= SYNTHETIC_COLD_TARGET
            out.append(_target(name, goal, f"{r:.2f}x", met, cold["ratio_floor"]))
        else:
            out.append(_target(name, goal, "no floor in this document", None))
        sizes = list(scaling["sizes"]["default"])
        r = scaling["flat"]["default"]["median"]
        older = scaling["flat"]["resized_copies"]["median"]
        out.append(
            _target(
                f"new root size, warm cache, default chain: {sizes[-1]} GB / {sizes[0]} GB",
                f"flat (<= {FLAT_TARGET:.1f}x)",
                f"{r:.2f}x (older chain {older:.2f}x)",
                r <= FLAT_TARGET,
                scaling["flat"]["default"],
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
                conc["ratio"],
            )
        )
    peer = scenarios.get("peer")
    if peer:
        name = "warm minidriver boot vs virt-install, to RUNNING"
        goal = f"at most {PEER_TARGET:.1f}x"
        if peer.get("missing"):
            out.append(_target(name, goal, peer["missing"], None))
        else:
            for label, key in (
                ("", "ratios"),
                (", like for like: one disk, no NIC", "ratios_like"),
                (", like for like: virt-install with its disks, a NIC", "ratios_full"),
            ):
                if key in peer:
                    ratio = peer[key]["running"]
                    r = ratio["median"]
                    out.append(_target(name + label, goal, f"{r:.2f}x", r <= PEER_TARGET, ratio))
    return out
