"""The host's commands: host check (can this host start a VM?) and cleanup (after a
crash). Nova's nearest are the driver's checks in ``LibvirtDriver.init_host`` and the
compute manager's periodic clean-up of running deleted instances.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from minidriver import cleanup
from minidriver.cli.output import EXIT_ERROR, EXIT_OK, Output, format_table, human_size
from minidriver.driver import LibvirtDriver
from minidriver.exception import MinidriverError


def cmd_host(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    if args.host_command == "list":
        from minidriver.cli.hosts import cmd_host_list  # noqa: PLC0415 - host list only

        return cmd_host_list(drv, args, out)
    conn = drv.host.get_connection()
    choice = drv.host.virt_type
    path = drv.conf.instances_path
    path.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(path)
    problems = []
    try:
        drv.host.check_instances_path()
    except MinidriverError as exc:
        problems.append(str(exc))
    free = st.f_bavail * st.f_frsize
    ceph = None
    if drv.uses_rbd:
        ceph, ceph_problems = ceph_check(drv)
        problems.extend(ceph_problems)
    data: dict[str, Any] = {
        "uri": drv.host.uri,
        "connection_reason": drv.host.connection_reason,
        "libvirt_version": version_string(conn.getLibVersion()),
        "qemu_version": version_string(conn.getVersion()),
        "virt_type": choice.virt_type,
        "virt_type_reason": choice.reason,
        "instances_path": os.fspath(path),
        "free_bytes": free,
        "problems": problems,
    }
    if ceph is not None:
        data["ceph"] = ceph
    rows = [(k, v) for k, v in data.items() if k not in ("problems", "free_bytes", "ceph")]
    rows.append(("free", human_size(free)))
    if ceph is not None:
        rows.extend((f"ceph {k}", v) for k, v in ceph.items() if v is not None)
    out.result(data, lambda: "\n".join([format_table(("check", "value"), rows), *problems]))
    return EXIT_ERROR if problems else EXIT_OK


def ceph_check(drv: LibvirtDriver) -> tuple[dict[str, Any], list[str]]:
    """With images_type = rbd: the cluster's fsid and health, and the pools of instance
    disks and of images; each problem as one line."""
    opts = drv.conf.libvirt
    pools = {"pool": opts.images_rbd_pool, "images_pool": drv.conf.glance_store.rbd_store_pool}
    report: dict[str, Any] = {
        "conf": opts.images_rbd_ceph_conf or "(librados default)",
        "fsid": None,
        "health": None,
        **pools,
    }
    problems = []
    rbd = drv.rbd_driver()
    try:
        with rbd.connected():
            report["fsid"] = rbd.get_fsid()
            report["health"] = rbd.health()
            for key, pool in pools.items():
                try:
                    rbd.check_pool(pool)
                except MinidriverError as exc:
                    report[key] = f"{pool} (missing)"
                    problems.append(str(exc))
    except MinidriverError as exc:
        problems.append(str(exc) + (f" ({exc.hint})" if exc.hint else ""))
    return report, problems


def version_string(v: int) -> str:
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"


def cmd_cleanup(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    report = cleanup.cleanup(drv, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    lines = [
        *(f"{verb} domain {d} (no record)" for d in report.domains),
        *(f"{verb} instance {u} (no domain)" for u in report.records),
        *(f"{verb} instance dir {d} (no record, no domain)" for d in report.instance_dirs),
        *(f"{verb} partial file {f}" for f in report.partial_files),
        *(f"{verb} free lock {name}" for name in report.locks),
        *(f"{verb} reservation of forwarded port {port}" for port in report.ports),
        *(f"{verb} RBD disk {d}" for d in report.rbd_disks),
        *(f"{verb} image {i} (left saving by an add that died)" for i in report.images),
        *(f"{verb} half-made template {d}" for d in report.templates),
        *(f"{verb} attachment of volume {v} (its instance is gone)" for v in report.volumes),
        *(f"skipped {s}" for s in report.skipped),
        f"{verb} {report.total()} leftovers" if report.total() else "nothing to clean up",
    ]
    out.result(dataclasses.asdict(report), "\n".join(lines))
    return EXIT_OK
