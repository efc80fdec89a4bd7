"""Benchmark of live migration (``scripts/bench --only migration``): the test guest
(t1.nano, 128 MB) and a 1 GB guest of the same image moved live between this host's
daemon and a second host of ``scripts/dev-host``, there and back, ``--runs`` times
each way; the medians of ``live-migrate``'s own figure (the move, from the
destination's check to the record naming it).

It runs only when named (never in ``--quick``): it starts a host of its own (a second
libvirtd, as root) and stops and purges it at the end, with its state dir. The moves
go through the command line (``python -m minidriver``), as a user makes them: the
tooling uses only the driver's public API, and the moves are the command's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from minidriver.bench.harness import make_log, run_guarded
from minidriver.bench.report import cell, format_table
from minidriver.bench.stats import Stat
from minidriver.guestimages import testimage

DEV_HOST = Path(__file__).resolve().parents[2] / "scripts" / "dev-host"
FLAVORS = {"t1.nano": 128, "bench.mig1024": 1024}
READY = r"^minidriver-guest: ready"
TIMEOUT = 600


class MigrationBench:
    def __init__(self, state: Path, runs: int, log: Any) -> None:
        self.state = state
        self.runs = runs
        self.log = log
        self.host = f"bench-{os.getpid()}"
        self.started = False

    def md(self, *args: str) -> Any:
        cmd = [sys.executable, "-m", "minidriver", "--state-dir", str(self.state),
               "--config", str(self.state / "minidriver.conf"), "--json", *args]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {proc.stdout}{proc.stderr}")
        return json.loads(proc.stdout)

    def set_up(self) -> None:
        proc = subprocess.run(
            [os.fspath(DEV_HOST), "start", self.host],
            capture_output=True, text=True, timeout=TIMEOUT, check=True,
        )  # fmt: skip
        self.started = True
        uri = proc.stdout.strip().splitlines()[-1]
        (self.state / "minidriver.conf").write_text(
            "[DEFAULT]\nhost = here\n"
            f"[host:{self.host}]\nconnection_uri = {uri}\n"
            "[flavor:bench.mig1024]\nvcpus = 1\nmemory_mb = 1024\nroot_gb = 1\n"
        )
        image = testimage.build(log=lambda _m: None)
        self.md("image", "add", str(image), "--name", "guest", "--disk-format", "qcow2")

    def run(self) -> dict[str, Any]:
        section: dict[str, Any] = {}
        for flavor, ram in FLAVORS.items():
            name = f"mig-{ram}"
            self.md("boot", "--image", "guest", "--flavor", flavor, "--name", name,
                    "--host", "here", "--wait-for", READY, "--timeout", str(TIMEOUT))  # fmt: skip
            there, back = [], []
            for i in range(self.runs):
                there.append(self.md("live-migrate", name, "--host", self.host)["seconds"])
                back.append(self.md("live-migrate", name, "--host", "here")["seconds"])
                self.log(f"{flavor} run {i + 1}: {there[-1]:.2f} s there, {back[-1]:.2f} s back")
            self.md("delete", name)
            section[flavor] = {
                "ram_mb": ram,
                "to_dev_host": Stat.of(there).as_dict(),
                "to_this_host": Stat.of(back).as_dict(),
            }
        return section

    def close(self) -> None:
        if self.started:
            subprocess.run(
                [os.fspath(DEV_HOST), "stop", "--purge", self.host],
                capture_output=True, timeout=TIMEOUT, check=False,
            )  # fmt: skip


def render(section: dict[str, Any], runs: int) -> str:
    rows = [
        (
            flavor,
            f"{s['ram_mb']} MB",
            cell(s["to_dev_host"], 2, " s"),
            cell(s["to_this_host"], 2, " s"),
        )
        for flavor, s in section.items()
    ]
    return format_table(
        f"live migration, the test guest, median (min..max) of {runs} runs each way",
        ("flavor", "RAM", "to the dev host", "back to this host"),
        rows,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """``scripts/bench --only migration``: a state dir and a dev host of its own, both
    removed at the end (also on Ctrl-C)."""
    log = make_log(time.monotonic())
    state = Path(tempfile.mkdtemp(prefix="mdbench-mig-", dir="/var/tmp"))
    state.chmod(0o755)
    bench = MigrationBench(state, args.runs, log)

    def body() -> None:
        bench.set_up()
        section = bench.run()
        print(render(section, args.runs), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"migration": section}, indent=2) + "\n")

    def cleanup(_code: int) -> None:
        with_state = state.exists()
        if with_state:
            subprocess.run(
                [sys.executable, "-m", "minidriver", "--state-dir", str(state), "--config",
                 str(state / "minidriver.conf"), "delete", "--all"],
                capture_output=True, timeout=TIMEOUT, check=False,
            )  # fmt: skip
        bench.close()
        shutil.rmtree(state, ignore_errors=True)

    return run_guarded(body, cleanup, log)
