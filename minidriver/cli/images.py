"""The image service, the flavors and the _base image cache: image, flavor, cache
(novaclient's ``do_flavor_list``; ``cache clean`` is a pass of Nova's
``ImageCacheManager``).
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from minidriver import imagecache
from minidriver.cli.output import (
    EXIT_ERROR,
    EXIT_OK,
    Output,
    ProgressBar,
    UsageError,
    format_table,
    human_size,
)
from minidriver.cli.parser import key_values
from minidriver.driver import LibvirtDriver
from minidriver.images import download


def cmd_image(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    sub = args.image_command
    if sub == "add":
        props = key_values(args.property, "--property")
        source: Path | str = args.source if download.is_url(args.source) else Path(args.source)
        with ProgressBar("add", enabled=not out.json) as bar:
            img = drv.images.add(
                source,
                name=args.name,
                disk_format=args.disk_format,
                properties=props,
                checksum=args.checksum,
                progress=bar.update,
                store=args.store,
            )
        out.result(
            img.to_dict(),
            f"added image {img.name} {img.id} ({img.disk_format}, {human_size(img.size)})",
        )
    elif sub == "list":
        images = drv.images.list()
        out.result(
            [i.to_dict() for i in images],
            lambda: format_table(
                ("id", "name", "disk_format", "size", "virtual_size", "status"),
                [
                    (
                        i.id,
                        i.name,
                        i.disk_format,
                        human_size(i.size),
                        human_size(i.virtual_size) if i.virtual_size else "",
                        i.status,
                    )
                    for i in images
                ],
            ),
        )
    elif sub == "show":
        img = drv.images.get(args.image)
        data = img.to_dict()
        out.result(data, lambda: format_table(("field", "value"), sorted(data.items())))
    elif sub == "delete":
        img = drv.images.get(args.image)
        drv.images.delete(img.id)
        out.result({"deleted": img.id}, f"deleted image {img.name} {img.id}")
    return EXIT_OK


def cmd_flavor(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    flavors = sorted(drv.conf.flavors.values(), key=lambda f: (f.memory_mb, f.name))
    out.result(
        [asdict(f) for f in flavors],
        lambda: format_table(
            ("name", "vcpus", "memory_mb", "root_gb", "ephemeral_gb", "swap"),
            [(f.name, f.vcpus, f.memory_mb, f.root_gb, f.ephemeral_gb, f.swap) for f in flavors],
        ),
    )
    return EXIT_OK


def cmd_cache(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    manager = drv.image_cache_manager()
    if args.cache_command == "list":
        files = manager.list(drv.bases_in_use())
        out.result([cached_file_dict(f) for f in files], lambda: cache_table(files))
        return EXIT_OK
    if args.loop:
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        interval = drv.conf.image_cache.manager_interval
        if interval <= 0:
            raise UsageError(f"[image_cache] manager_interval = {interval}: --loop needs > 0")
        out.say(f"a cache pass every {interval} s; stop with Ctrl-C or SIGTERM")
        imagecache.run_loop(
            manager,
            drv.bases_in_use,
            interval,
            stop=stop,
            dry_run=args.dry_run,
            report=lambda r: out.result(pass_report(r), pass_text(r)),
        )
        return EXIT_OK
    result = manager.update(drv.bases_in_use(), dry_run=args.dry_run, recheck=drv.bases_in_use)
    out.result(pass_report(result), pass_text(result))
    return EXIT_ERROR if result.errors else EXIT_OK


def cached_file_dict(f: imagecache.CachedFile) -> dict[str, Any]:
    return {
        "name": f.name,
        "path": str(f.path),
        "kind": f.kind.value,
        "virtual_size": f.virtual_size,
        "actual_size": f.actual_size,
        "age_seconds": round(f.age_seconds, 1),
        "used_by": list(f.used_by),
        "removable": f.removable,
        "reason": f.reason,
    }


def cache_table(files: Sequence[imagecache.CachedFile]) -> str:
    rows = [
        (
            f.name,
            f.kind.value,
            human_size(f.virtual_size) if f.virtual_size is not None else "",
            human_size(f.actual_size),
            f"{f.age_seconds / 3600:.1f} h",
            len(f.used_by),
            "yes" if f.removable else "no",
            f.reason,
        )
        for f in files
    ]
    headers = ("name", "kind", "virtual", "actual", "age", "users", "removable", "why")
    return format_table(headers, rows)


def pass_report(result: imagecache.PassResult) -> dict[str, Any]:
    return {
        "dry_run": result.dry_run,
        "removed": [cached_file_dict(f) for f in result.removed],
        "bytes_freed": result.bytes_freed,
        "touched": list(result.touched),
        "errors": list(result.errors),
    }


def pass_text(result: imagecache.PassResult) -> str:
    verb = "would remove" if result.dry_run else "removed"
    lines = [f"{verb} {f.name} ({f.kind.value}, {f.reason})" for f in result.removed]
    lines.append(f"{verb} {len(result.removed)} files, {human_size(result.bytes_freed)}")
    lines.extend(f"error: {e}" for e in result.errors)
    return "\n".join(lines)
