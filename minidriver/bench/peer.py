"""virt-install as the benchmark's peer: its command, its version, its runs.

``minidriver boot --no-wait`` against ``virt-install --import`` on the same cached
base, whole process against whole process, to RUNNING and to the guest's ready line,
in alternation. virt-install needs a libvirt daemon (the embedded driver serves one
process); without it, or without virt-install, the scenario says why instead of a
figure. (No Nova counterpart: tooling.)
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minidriver import console
from minidriver.bench.harness import READY, READY_TIMEOUT, BenchError
from minidriver.bench.sections import peer_missing_section, peer_section
from minidriver.bench.stats import alternate
from minidriver.process import run

if TYPE_CHECKING:  # spawn runs this scenario on its Bench
    from minidriver.bench.spawn import Bench

VIRTINST_INSTALL = "apt-get install -y --no-install-recommends virtinst"


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


@dataclass(frozen=True)
class PeerSetup:
    """What every virt-install run shares: its directory, environment and options."""

    dir: Path
    env: Mapping[str, str]
    options: Mapping[str, Any]

    def command(self, name: str, overlay: Path, console_log: Path) -> list[str]:
        return virt_install_cmd(name=name, overlay=overlay, console_log=console_log, **self.options)


class Peer:
    """The peer scenario on a Bench's driver, state dir and cached test guest."""

    def __init__(self, bench: Bench, flavor: str) -> None:
        self.bench = bench
        self.flavor = flavor
        self.drv = bench.drv
        self.log = bench.log
        self._serial = itertools.count()

    def minidriver_cmd(self) -> list[str]:
        """``minidriver boot`` as a user runs it, on this run's state dir and host."""
        exe = Path(sys.executable).with_name("minidriver")
        prefix = [os.fspath(exe)] if exe.exists() else [sys.executable, "-m", "minidriver"]
        state = ["--config", os.devnull, "--state-dir", os.fspath(self.bench.state)]
        boot = [
            "boot",
            "--image",
            self.bench.test_image_id,
            "--flavor",
            self.flavor,
            "--name",
            "bench-peer",
        ]
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
        name = f"{self.bench.prefix}{n}"
        overlay, log_file = peer.dir / f"vi-{n}.qcow2", peer.dir / f"vi-{n}.log"
        started = time.monotonic()
        try:
            run(peer.command(name, overlay, log_file), env=peer.env, timeout=READY_TIMEOUT)
            running = time.monotonic() - started
            state = self.drv.host.domain_state(self.bench.conn.lookupByName(name))
            if state != "running":
                raise BenchError(f"virt-install: {name} is {state}")
            if ready:
                console.wait_for_console(log_file, READY, READY_TIMEOUT, interval=0.05)
            to_ready = time.monotonic() - started
        finally:
            self.bench.remove_domain(name)
            overlay.unlink(missing_ok=True)
            log_file.unlink(missing_ok=True)
        self.log(f"peer: virt-install {running:.3f} s to RUNNING, {to_ready:.2f} s to ready")
        return {"running": running, "ready": to_ready}

    def run(self) -> dict[str, Any]:
        """The scenario's section: warm-up, then ``runs`` pairs in alternation."""
        bench, flavor = self.bench, self.flavor
        if self.drv.host.is_embedded:
            why = "needs a libvirt daemon (the embedded driver serves one process)"
            return peer_missing_section(flavor, why)
        if shutil.which("virt-install") is None:
            return peer_missing_section(flavor, f"not installed: {VIRTINST_INSTALL}")
        version = run(["virt-install", "--version"]).stdout.strip()
        # virt-install makes a storage pool named after the directory: make it ours.
        peer_dir = bench.state / f"{bench.state.name}-peer"
        peer_dir.mkdir(mode=0o755)
        f = bench.conf.flavors[flavor]
        base = bench.base(bench.test_image_id)
        setup = PeerSetup(
            dir=peer_dir,
            env={"XDG_CACHE_HOME": os.fspath(bench.state / "xdg-cache")},  # its log file
            options={
                "uri": self.drv.host.uri,
                "base": base,
                "base_format": "raw" if bench.conf.default.force_raw_images else "qcow2",
                "size_gb": f.root_gb,
                "virt_type": self.drv.host.virt_type.virt_type,
                "version": parse_version(version),
                "memory_mb": f.memory_mb,
                "vcpus": f.vcpus,
            },
        )
        md_cmd = self.minidriver_cmd()
        self.log("peer: warm-up")
        if not base.exists():
            self.drv.destroy(bench.spawn(bench.test_image_id, flavor, cold=True).uuid)
        self.minidriver_boot(md_cmd, ready=False)
        self.virt_install(setup, ready=False)
        md, vi = alternate(
            bench.runs, lambda _i: self.minidriver_boot(md_cmd), lambda _i: self.virt_install(setup)
        )
        example = setup.command(f"{bench.prefix}N", peer_dir / "vi-N.qcow2", peer_dir / "vi-N.log")
        commands = {"minidriver": md_cmd, "virt_install": example}
        return peer_section(flavor, f"virt-install {version}", md, vi, commands)
