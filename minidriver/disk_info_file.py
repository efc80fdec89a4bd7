"""``disk.info``: the formats of an instance's file disks, by path, as Nova records them
(nova/virt/libvirt/imagebackend.py, ``Image.resolve_driver_format``).

Written once by spawn (``create_image``), read by ``show``, ``delete``, ``snapshot``,
``cleanup`` and the image cache manager. Like Nova, it is written under a temporary
name and renamed; here also made durable first (``fileutils.publish``). A file that
cannot be read is no crash: the domain's XML lists the same disks.

As in Nova (whose ``Rbd`` has no ``disk_info_path``), it lists no RBD disk: an
all-RBD instance has no ``disk.info``, and its RBD disks are the pool's ``<uuid>_*``
images (``LibvirtDriver.instance_disks``). One written before this was so lists them
as ``rbd:<pool>/<name>``; readers still take them. A template's ``disk.info``
(``vmtemplate``, ours) names its frozen RBD images.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from minidriver.exception import MinidriverError
from minidriver.fileutils import create_private, publish, removed_on_error

LOG = logging.getLogger(__name__)

DISK_INFO = "disk.info"


def write_disk_info(
    instance_dir: Path, formats: Mapping[str, str], paths: Mapping[str, str] | None = None
) -> None:
    """``disk.info``: JSON {path: format}, written once and never silently changed.

    Written to a temporary file and renamed (``publish``), so no reader ever sees half
    of it. ``paths`` names disks that are not files of this dir: a template clone's
    shared files, a template's frozen RBD images (``rbd:<pool>/tpl-<id>_<disk>``)."""
    path = instance_dir / DISK_INFO
    paths = paths or {}
    data = {paths.get(name, os.fspath(instance_dir / name)): fmt for name, fmt in formats.items()}
    if path.exists():
        recorded = read_disk_info(instance_dir)
        if recorded != data:
            raise MinidriverError(f"{path} records {recorded}, not {data}")
        return
    # A dot name: nothing that scans the instance dir's disk* files ever sees it.
    temp = instance_dir / f".{DISK_INFO}.tmp"
    temp.unlink(missing_ok=True)  # a crashed writer's
    with removed_on_error(temp):
        with create_private(temp) as out:
            out.write(json.dumps(data).encode())
        publish(temp, path)


def read_disk_info(instance_dir: Path) -> dict[str, str] | None:
    """``disk.info`` as recorded; None when there is none or it cannot be read (torn,
    not JSON, not {path: format}): the caller then asks libvirt for the disks."""
    path = instance_dir / DISK_INFO
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        LOG.warning("%s cannot be read (%s); the domain's XML lists the disks", path, exc)
        return None
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()
    ):
        LOG.warning("%s is not {path: format}; the domain's XML lists the disks", path)
        return None
    return recorded
