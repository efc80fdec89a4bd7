"""``disk.info``: the formats of an instance's disks, by path, as Nova records them
(nova/virt/libvirt/imagebackend.py, ``Image.resolve_driver_format``).

Written once by spawn (``create_image``), read by ``show``, ``delete``, ``snapshot``
and ``cleanup``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from minidriver.exception import MinidriverError

DISK_INFO = "disk.info"


def write_disk_info(
    instance_dir: Path, formats: Mapping[str, str], paths: Mapping[str, str] | None = None
) -> None:
    """``disk.info``: JSON {path: format}, written once and never silently changed.

    ``paths`` names disks that are not files of the instance dir (an RBD root disk is
    ``rbd:<pool>/<uuid>_disk``, as in Nova)."""
    path = instance_dir / DISK_INFO
    paths = paths or {}
    data = {paths.get(name, os.fspath(instance_dir / name)): fmt for name, fmt in formats.items()}
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != data:
            raise MinidriverError(f"{path} records {recorded}, not {data}")
        return
    path.write_text(json.dumps(data))


def read_disk_info(instance_dir: Path) -> dict[str, str] | None:
    """``disk.info`` as recorded; None when there is none."""
    try:
        recorded: dict[str, str] = json.loads((instance_dir / DISK_INFO).read_text())
    except FileNotFoundError:
        return None
    return recorded
