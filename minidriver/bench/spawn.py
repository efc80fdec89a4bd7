"""Benchmarks of spawn: where the time goes, against the floor and against a peer.

Everything runs in one process on one state dir (a new one under /var/tmp, removed at
the end with every domain and storage pool the run made, also on Ctrl-C):

1. phases: cold spawn (empty cache) and warm spawn (cached base) of the test guest,
   split per step, plus the time from spawn's start to the guest's ``ready`` line;
2. floor: the XML minidriver rendered, defined and started by hand on overlays made
   by bare ``qemu-img create`` (all at once, as spawn makes them), and a bare
   ``qemu-img convert`` of the image: what no spawn can go below;
3. scaling: a synthetic 1 GiB qcow2 holding 300 MiB of data (not bootable: measured
   to RUNNING): cold spawn against ``qemu-img convert`` alone and against convert +
   the image's warm floor, then each new root size (1 to 8 GB) on a warm cache, in the
   default chain and in the older ``_<GB>`` chain;
4. peer: ``minidriver boot`` against ``virt-install --import`` on the same cached
   base, whole process against whole process, to RUNNING and to the ready line, and
   their CPU time; also like for like both ways (minidriver with one disk and no NIC,
   virt-install with minidriver's three disks and a user-mode NIC);
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
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from minidriver import console
from minidriver.bench.harness import (
    READY,
    READY_TIMEOUT,
    BenchError,
    Log,
    Runs,
    StartedEvents,
    build_doc,
    cpu_seconds,
    make_log,
    run_guarded,
)
from minidriver.bench.peer import Peer
from minidriver.bench.report import render
from minidriver.bench.sections import (
    LEVELS,
    SIZES_GB,
    Batch,
    concurrency_section,
    floor_section,
    phases_section,
    ready_section,
    scaling_section,
)
from minidriver.bench.stats import in_turn
from minidriver.bench.synthetic import SYNTHETIC_CHUNK, SYNTHETIC_CHUNKS, synthetic_image
from minidriver.config import Config, load_config
from minidriver.driver import LibvirtDriver, base_filename
from minidriver.exception import MinidriverError
from minidriver.guestimages import testimage
from minidriver.images import qemu_img
from minidriver.objects import Flavor, Instance
from minidriver.process import run

SCENARIOS = ("phases", "scaling", "peer", "concurrency")  # floor and ready ride on phases

# Root-only flavors for the synthetic image: the figures are the root disk's alone.
BENCH_FLAVORS: Mapping[str, Flavor] = {
    f"bench.r{gb}": Flavor(f"bench.r{gb}", vcpus=1, memory_mb=128, root_gb=gb) for gb in SIZES_GB
}


def is_ours(name: str, xml: str, state_id: str, name_prefix: str) -> bool:
    """A domain this run made: minidriver's carry our state id, virt-install's our prefix."""
    return name.startswith(name_prefix) or f">{state_id}<" in xml


def pool_path(xml: str) -> str | None:
    match = re.search(r"<target>\s*<path>([^<]+)</path>", xml)
    return match.group(1) if match else None


@dataclass(frozen=True)
class FloorTemplate:
    """An instance's rendered XML and the overlay commands minidriver ran for it."""

    instance_dir: Path
    xml: str
    disks: tuple[Path, ...]
    overlays: tuple[tuple[str, ...], ...]


class Bench:
    """The scenarios, on one driver and one state dir (the peer's runs: ``peer.Peer``)."""

    def __init__(self, conf: Config, state: Path, work_dir: Path, runs: Runs, log: Log) -> None:
        # A shared daemon holds other state dirs' instance-%08x domains, and a name is
        # taken between spawn's check and its define: this run's names are its own.
        default = dataclasses.replace(conf.default, instance_name_template=f"{state.name}-%08x")
        self.conf = dataclasses.replace(
            conf, default=default, flavors={**conf.flavors, **BENCH_FLAVORS}
        )
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
        self.test_image = testimage.build(log=lambda msg: log(f"test image: {msg}"))
        self.test_image_id = self.drv.images.add(
            self.test_image,
            name="bench",
            disk_format="qcow2",
            properties=testimage.IMAGE_PROPERTIES,
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
        started, cpu = time.monotonic(), cpu_seconds()
        inst = self.spawn(self.test_image_id, flavor, cold=cold)
        cpu = cpu_seconds() - cpu
        try:
            if not ready:
                return dict(inst.timings)
            console.wait_for_console(
                Path(inst.instance_dir) / "console.log", READY, READY_TIMEOUT, interval=0.05
            )
            figures = dict(inst.timings)
            figures["cpu"] = cpu
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

    def floor_template(self, image_id: str, flavor: str) -> FloorTemplate:
        """A warm spawn whose domain is then undefined: its dir, XML and disks stay."""
        inst = self.spawn(image_id, flavor, cold=False)
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
        self.remove_domain(inst.name)
        return FloorTemplate(
            instance_dir, (instance_dir / "libvirt.xml").read_text(), tuple(disks), tuple(overlays)
        )

    def floor_once(self, template: FloorTemplate) -> dict[str, float]:
        """Fresh overlays by bare qemu-img, then define + create of the same XML."""
        for disk in template.disks:
            disk.unlink(missing_ok=True)
        (template.instance_dir / "console.log").write_bytes(b"")
        t0, cpu = time.monotonic(), cpu_seconds()
        # At once, as spawn makes them: the floor is the least the same work can take.
        with ThreadPoolExecutor(max_workers=len(template.overlays)) as pool:
            list(pool.map(run, template.overlays))
        t1 = time.monotonic()
        domain = self.conn.defineXML(template.xml)
        try:
            t2 = time.monotonic()
            domain.create()
            t3 = time.monotonic()
            cpu = cpu_seconds() - cpu
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                domain.destroy()
            domain.undefine()
        return {"overlays": t1 - t0, "define": t2 - t1, "create": t3 - t2, "cpu": cpu}

    # -- 1, 2 and 6: phases, the floor, time to ready

    def phases(self, flavor: str) -> dict[str, dict[str, Any]]:
        log = self.log
        source = self.drv.images.get(self.test_image_id).path
        log("phases: warm-up")
        self.spawn_to_ready(flavor, cold=True, ready=False)
        template = self.floor_template(self.test_image_id, flavor)  # the warm-up's warm spawn
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

        def cold_spawn() -> dict[str, float]:
            inst = self.spawn(image_id, smallest, cold=True)
            self.drv.destroy(inst.uuid)
            return inst.timings

        log("scaling: warm-up")
        cold_spawn()
        template = self.floor_template(image_id, smallest)  # on the warm-up's base
        self.floor_once(template)
        self.convert_once(source, "qcow2")
        spawns: list[dict[str, float]] = []
        converts: list[float] = []
        floors: list[dict[str, float]] = []
        for i in range(self.runs):
            # The floor's overlay is made on the base the cold spawn of the round left.
            for what in in_turn(("cold", "convert", "floor"), i):
                if what == "cold":
                    spawns.append(cold_spawn())
                elif what == "convert":
                    converts.append(self.convert_once(source, "qcow2"))
                else:
                    floors.append(self.floor_once(template))
            warm_floor = sum(floors[-1].values())
            log(
                f"scaling {i + 1}/{self.runs}: cold spawn {spawns[-1]['total']:.3f} s,"
                f" convert {converts[-1]:.3f} s, warm floor {warm_floor:.3f} s"
            )

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
        return scaling_section(image, spawns, converts, sizes, floors)

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

    def remove_domain(self, name: str) -> None:
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
                self.remove_domain(name)
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


# -- the command ------------------------------------------------------------


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
        choices=(*SCENARIOS, "template", "migration"),
        help="run only this scenario (repeatable); template (the Debian guest booted and"
        " cloned, minutes under TCG) and migration (live migrations to and from a"
        " scripts/dev-host host, as root) run only when named, and alone",
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
        "peer": lambda: {"peer": Peer(bench, flavor).run()},
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
    if args.only and "migration" in args.only:
        if set(args.only) != {"migration"}:
            parser.error("--only migration runs alone")
        from minidriver.bench import livemigration  # noqa: PLC0415 - a scenario of its own

        return livemigration.run_from_args(args)
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
