"""virt-install as the benchmark's peer: its command, its version, its runs.

``minidriver boot --no-wait`` against ``virt-install --import`` on the same cached
base, whole process against whole process, to RUNNING and to the guest's ready line,
in turn, with each process's CPU time (user + system, its children's included). The
two do different work by default: ``minidriver boot`` of the bench's flavor makes the
root disk, ``disk.local`` and ``disk.swap`` and a user-mode NIC with a forwarded port;
virt-install is asked for one disk and no network. So each round runs four boots:
minidriver as a user runs it, minidriver asked what virt-install is asked (a flavor
with the root disk alone, ``--network none``), virt-install as asked, and virt-install
given minidriver's work (the same three overlays on the same cached bases and a
user-mode NIC). virt-install needs a libvirt daemon (the embedded driver serves one
process); without it, or without virt-install, the scenario says why instead of a
figure. (No Nova counterpart: tooling.)
"""

from __future__ import annotations

import itertools
import json
import os
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minidriver import console
from minidriver.bench.harness import READY, READY_TIMEOUT, BenchError
from minidriver.bench.sections import peer_missing_section, peer_section
from minidriver.bench.stats import in_turn
from minidriver.objects import Flavor
from minidriver.process import run

if TYPE_CHECKING:  # spawn runs this scenario on its Bench
    from minidriver.bench.spawn import Bench

VIRTINST_INSTALL = "apt-get install -y --no-install-recommends virtinst"
# The flavor of minidriver's like-for-like boot (in the config the bench writes).
LIKE_FLAVOR = "bench.peer"
# The four boots of a round, by their keys in the section's samples.
MINIDRIVER, MINIDRIVER_LIKE, VIRT_INSTALL, VIRT_INSTALL_FULL = (
    "minidriver",
    "minidriver_like",
    "virt_install",
    "virt_install_full",
)


@dataclass(frozen=True)
class ExtraDisk:
    """One more overlay virt-install makes: ``path`` on ``base`` (raw), ``size_mb``."""

    path: Path
    base: Path
    size_mb: int


def like_config(flavor: Flavor) -> str:
    """A config whose one flavor asks what virt-install is asked: the same vCPUs,
    memory and root disk, no ephemeral or swap disk."""
    return (
        f"[flavor:{LIKE_FLAVOR}]\nvcpus = {flavor.vcpus}\n"
        f"memory_mb = {flavor.memory_mb}\nroot_gb = {flavor.root_gb}\n"
    )


@contextmanager
def children_cpu() -> Iterator[dict[str, float]]:
    """The user + system CPU seconds of the children waited for within the block
    (a command and whatever it ran), in the yielded dict's ``cpu`` once it ends."""
    took: dict[str, float] = {}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    yield took
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    took["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


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
    extra_disks: Sequence[ExtraDisk] = (),
    network: str = "none",
) -> list[str]:
    """virt-install importing an overlay it makes on ``base``, serial to a file;
    ``extra_disks`` more overlays on raw bases, ``network`` its ``--network``."""
    paths = [overlay, base, console_log, *(p for d in extra_disks for p in (d.path, d.base))]
    for path in paths:
        if "," in os.fspath(path):
            raise ValueError(f"virt-install options cannot hold a comma: {path}")
    disk = (
        f"path={overlay},format=qcow2,bus=virtio,backing_store={base},"
        f"backing_format={base_format},size={size_gb}"
    )
    more = [
        arg
        for d in extra_disks
        for arg in (
            "--disk",
            f"path={d.path},format=qcow2,bus=virtio,backing_store={d.base},"
            f"backing_format=raw,size={d.size_mb / 1024:g}",
        )
    ]
    options = {
        "--connect": uri,
        "--name": name,
        "--memory": str(memory_mb),
        "--vcpus": str(vcpus),
        "--disk": disk,
        "--graphics": "none",
        "--serial": f"file,path={console_log}",
        "--network": network,
        "--virt-type": virt_type,
        "--machine": "pc",
    }
    pairs = [arg for option in options.items() for arg in option]
    return ["virt-install", "--import", *pairs, *more, *osinfo_args(version), "--noautoconsole"]


@dataclass(frozen=True)
class PeerSetup:
    """What every virt-install run shares: its directory, environment and options;
    ``full``: the ephemeral and swap bases minidriver's boot uses, as (base, MB)."""

    dir: Path
    env: Mapping[str, str]
    options: Mapping[str, Any]
    full: Sequence[tuple[Path, int]] = field(default=())

    def command(
        self, name: str, overlay: Path, console_log: Path, *, full: bool = False
    ) -> list[str]:
        more: dict[str, Any] = {}
        if full:
            more["extra_disks"] = [
                ExtraDisk(overlay.with_suffix(f".{i}.qcow2"), base, size_mb)
                for i, (base, size_mb) in enumerate(self.full, start=1)
            ]
            more["network"] = "user,model=virtio"
        return virt_install_cmd(
            name=name, overlay=overlay, console_log=console_log, **self.options, **more
        )


class Peer:
    """The peer scenario on a Bench's driver, state dir and cached test guest."""

    def __init__(self, bench: Bench, flavor: str) -> None:
        self.bench = bench
        self.flavor = flavor
        self.drv = bench.drv
        self.log = bench.log
        self._serial = itertools.count()

    @property
    def like_config_path(self) -> Path:
        return self.bench.state / "peer-like.conf"

    def minidriver_cmd(self, *, like: bool = False) -> list[str]:
        """``minidriver boot`` as a user runs it, on this run's state dir and host;
        ``like``: asked for what virt-install is asked (one disk, no NIC)."""
        exe = Path(sys.executable).with_name("minidriver")
        prefix = [os.fspath(exe)] if exe.exists() else [sys.executable, "-m", "minidriver"]
        config = os.fspath(self.like_config_path) if like else os.devnull
        state = ["--config", config, "--state-dir", os.fspath(self.bench.state)]
        boot = [
            "boot",
            "--image",
            self.bench.test_image_id,
            "--flavor",
            LIKE_FLAVOR if like else self.flavor,
            "--name",
            "bench-peer-like" if like else "bench-peer",
        ]
        if like:
            boot += ["--network", "none"]
        return [*prefix, *state, "--connect", self.drv.host.uri, "--json", *boot, "--no-wait"]

    def minidriver_boot(self, cmd: Sequence[str], *, ready: bool = True) -> dict[str, Any]:
        started = time.monotonic()
        # As installed: bytecode written once (by the warm-up) and read after, as
        # virt-install's is. An inherited PYTHONDONTWRITEBYTECODE made every run
        # compile minidriver from source (~40 ms here); empty is unset to Python.
        with children_cpu() as took:
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
        self.log(
            f"peer: {data['display_name']} {running:.3f} s to RUNNING ({took['cpu']:.3f} s"
            f" CPU), {to_ready:.2f} s to ready"
        )
        return {
            "running": running,
            "ready": to_ready,
            "spawn": data["timings"]["total"],
            "cpu": took["cpu"],
            "disks": data["disks"],
        }

    def virt_install(
        self, peer: PeerSetup, *, ready: bool = True, full: bool = False
    ) -> dict[str, float]:
        n = next(self._serial)
        name = f"{self.bench.prefix}{n}"
        overlay, log_file = peer.dir / f"vi-{n}.qcow2", peer.dir / f"vi-{n}.log"
        started = time.monotonic()
        try:
            with children_cpu() as took:
                run(
                    peer.command(name, overlay, log_file, full=full),
                    env=peer.env,
                    timeout=READY_TIMEOUT,
                )
            running = time.monotonic() - started
            state = self.drv.host.domain_state(self.bench.conn.lookupByName(name))
            if state != "running":
                raise BenchError(f"virt-install: {name} is {state}")
            if ready:
                console.wait_for_console(log_file, READY, READY_TIMEOUT, interval=0.05)
            to_ready = time.monotonic() - started
        finally:
            self.bench.remove_domain(name)
            for made in peer.dir.glob(f"vi-{n}.*"):
                made.unlink(missing_ok=True)
        what = "virt-install given minidriver's disks and NIC" if full else "virt-install"
        self.log(
            f"peer: {what} {running:.3f} s to RUNNING ({took['cpu']:.3f} s CPU),"
            f" {to_ready:.2f} s to ready"
        )
        return {"running": running, "ready": to_ready, "cpu": took["cpu"]}

    def run(self) -> dict[str, Any]:
        """The scenario's section: warm-up, then ``runs`` rounds of the four boots,
        in turn (in order, then reversed)."""
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
        self.like_config_path.write_text(like_config(f))
        base = bench.base(bench.test_image_id)
        options = {
            "uri": self.drv.host.uri,
            "base": base,
            "base_format": "raw" if bench.conf.default.force_raw_images else "qcow2",
            "size_gb": f.root_gb,
            "virt_type": self.drv.host.virt_type.virt_type,
            "version": parse_version(version),
            "memory_mb": f.memory_mb,
            "vcpus": f.vcpus,
        }
        env = {"XDG_CACHE_HOME": os.fspath(bench.state / "xdg-cache")}  # its log file
        md_cmd, like_cmd = self.minidriver_cmd(), self.minidriver_cmd(like=True)
        self.log("peer: warm-up")
        if not base.exists():
            self.drv.destroy(bench.spawn(bench.test_image_id, flavor, cold=True).uuid)
        warm = self.minidriver_boot(md_cmd, ready=False)
        # virt-install given minidriver's work: overlays on the very bases it used.
        full = [
            (Path(d["backing_file"]), d["virtual_size"] // (1024 * 1024))
            for name, d in warm["disks"].items()
            if name != "disk" and d["backing_file"]
        ]
        setup = PeerSetup(dir=peer_dir, env=env, options=options, full=full)
        self.minidriver_boot(like_cmd, ready=False)
        self.virt_install(setup, ready=False)
        self.virt_install(setup, ready=False, full=True)
        boots: dict[str, Callable[[], Mapping[str, Any]]] = {
            MINIDRIVER: lambda: self.minidriver_boot(md_cmd),
            MINIDRIVER_LIKE: lambda: self.minidriver_boot(like_cmd),
            VIRT_INSTALL: lambda: self.virt_install(setup),
            VIRT_INSTALL_FULL: lambda: self.virt_install(setup, full=True),
        }
        samples: dict[str, list[dict[str, float]]] = {key: [] for key in boots}
        for i in range(bench.runs):
            for key in in_turn(list(boots), i):
                sample = boots[key]()
                samples[key].append({k: v for k, v in sample.items() if k != "disks"})
        n = f"{bench.prefix}N"
        example = setup.command(n, peer_dir / "vi-N.qcow2", peer_dir / "vi-N.log")
        example_full = setup.command(n, peer_dir / "vi-N.qcow2", peer_dir / "vi-N.log", full=True)
        commands = {
            MINIDRIVER: md_cmd,
            MINIDRIVER_LIKE: like_cmd,
            "minidriver_like_config": [like_config(f)],
            VIRT_INSTALL: example,
            VIRT_INSTALL_FULL: example_full,
        }
        return peer_section(
            flavor,
            f"virt-install {version}",
            samples[MINIDRIVER],
            samples[VIRT_INSTALL],
            commands,
            like=samples[MINIDRIVER_LIKE],
            full=samples[VIRT_INSTALL_FULL],
        )
