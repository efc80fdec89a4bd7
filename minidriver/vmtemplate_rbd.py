"""A template's frozen layer in Ceph, for instances of ``images_type = rbd`` (no Nova
counterpart; built on Nova's RBD calls: rename, snapshot, protect, clone,
nova/storage/rbd_utils.py).

At ``template create`` each RBD disk of the saved instance, ``<uuid>_<disk>``, is
renamed ``tpl-<template id>_<disk>`` and given a protected snapshot ``snap``: the
frozen layer, never copied. Why a rename: every path that removes an instance's disks
(``delete``, a spawn's undo, ``cleanup``; Nova's ``cleanup_volumes``) removes
``<instance uuid>_*``; under a template-owned name the frozen disks are out of their
reach, whatever becomes of the instance, and ``tpl-<id>_`` says whose they are. A
clone's disks are RBD clones of those snapshots, named ``<clone uuid>_<disk>`` like
any instance's, so they go with the clone by the same paths.

The template dir's ``disk.info`` records the frozen disks as ``rbd:<pool>/<name>``;
it is written before the first rename, so a crash at any point leaves the pools to
look in. That file is the template's (ours, no Nova counterpart) and keeps listing RBD
images; an instance's ``disk.info`` lists none, as Nova's: the source instance's RBD
disks come from ``instance_disks`` (found in the pool by their ``<uuid>_`` name), and
a clone's are found by that name too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from minidriver import imagebackend, rbd_utils
from minidriver.config import Config
from minidriver.disk_info_file import read_disk_info
from minidriver.imagebackend import is_rbd_path, parse_rbd_path, rbd_path
from minidriver.steps import Step, StepTimer

LOG = logging.getLogger(__name__)

FROZEN_PREFIX = "tpl-"
# The snapshot every clone of a frozen disk is made from (Glance's name for an image's).
FROZEN_SNAPSHOT = rbd_utils.IMAGE_SNAPSHOT


def frozen_prefix(template_id: str) -> str:
    return f"{FROZEN_PREFIX}{template_id}_"


def disk_names(instance_uuid: str, formats: Mapping[str, str]) -> dict[str, str]:
    """{disk name: rbd path} of an instance's RBD disks, from its disks ({path:
    format}, as ``instance_disks`` gives them)."""
    out = {}
    for path in formats:
        if is_rbd_path(path):
            name = parse_rbd_path(path)[1]
            out[name.removeprefix(f"{instance_uuid}_")] = path
    return out


def frozen_paths(template_id: str, sources: Mapping[str, str]) -> dict[str, str]:
    """Where each source disk goes: ``rbd:<same pool>/tpl-<id>_<disk>``."""
    return {
        disk: rbd_path(parse_rbd_path(path)[0], frozen_prefix(template_id) + disk)
        for disk, path in sources.items()
    }


def frozen_disks(template_dir: Path) -> dict[str, str]:
    """{disk name: rbd path} of a template's frozen RBD disks (none for a file one)."""
    recorded = read_disk_info(template_dir) or {}
    out = {}
    for path in recorded:
        if is_rbd_path(path):
            name = parse_rbd_path(path)[1]
            out[name.partition("_")[2]] = path
    return out


def freeze(conf: Config, sources: Mapping[str, str], frozen: Mapping[str, str]) -> None:
    """Each source disk renamed to its frozen name, with a protected snapshot. The
    domain is saved (QEMU gone) by now; a disk already renamed (a retry) is kept."""
    for disk, source in sources.items():
        pool, name = parse_rbd_path(source)
        new_name = parse_rbd_path(frozen[disk])[1]
        driver = imagebackend.rbd_driver(conf, pool)
        with driver.connected():
            if not driver.exists(new_name):
                driver.rename(name, new_name)
            driver.create_snap(new_name, FROZEN_SNAPSHOT, protect=True)


def clone_disks(
    conf: Config, frozen: Mapping[str, str], instance_uuid: str, timer: StepTimer
) -> dict[str, str]:
    """A clone's disks: RBD clones of the frozen snapshots, ``<uuid>_<disk>`` in the
    same pool. Returns {disk: rbd path}."""
    made = {}
    with timer.step(Step.CLONE):
        for disk, path in frozen.items():
            pool, name = parse_rbd_path(path)
            driver = imagebackend.rbd_driver(conf, pool)
            location = rbd_utils.RbdLocation(driver.get_fsid(), pool, name, FROZEN_SNAPSHOT)
            target = f"{instance_uuid}_{disk}"
            driver.clone(location, target, pool)
            made[disk] = rbd_path(pool, target)
    return made


def clone_paths(conf: Config, template_dir: Path, instance_uuid: str) -> dict[str, str]:
    """The rbd paths a clone's disks will have: their pools, for the spawn's undo."""
    return {
        disk: rbd_path(parse_rbd_path(path)[0], f"{instance_uuid}_{disk}")
        for disk, path in frozen_disks(template_dir).items()
    }


def clone_commands(frozen: Mapping[str, str], clone_uuid: str) -> list[tuple[str, list[str]]]:
    """``explain --template``: (frozen snapshot, the ``rbd clone`` command) per disk."""
    out = []
    for disk, path in frozen.items():
        pool, name = parse_rbd_path(path)
        snap = f"{pool}/{name}@{FROZEN_SNAPSHOT}"
        out.append((snap, ["rbd", "clone", snap, f"{pool}/{clone_uuid}_{disk}"]))
    return out


def remove_frozen(
    conf: Config, template_id: str, pools: Iterable[str], *, dry_run: bool = False
) -> list[str]:
    """Every ``tpl-<id>_*`` image in ``pools``, its snapshot unprotected first; refused
    by Ceph (RbdImageBusy) while a clone of it exists. Returns ``pool/name`` removed
    (with ``dry_run``: found, and left as they are)."""
    removed = []
    for pool in sorted(set(pools)):
        driver = imagebackend.rbd_driver(conf, pool)
        with driver.connected():
            for name in driver.list_images():
                if not name.startswith(frozen_prefix(template_id)):
                    continue
                if dry_run or driver.remove_image(name):
                    removed.append(f"{pool}/{name}")
    return removed


def template_pools(conf: Config, template_dir: Path, source_formats: Mapping[str, str]) -> set[str]:
    """Where a template's frozen disks may be: its ``disk.info``'s pools, its source
    instance's (its domain's XML, or an older ``disk.info`` that listed RBD disks), and
    with images_type = rbd the configured pool."""
    paths = [*frozen_disks(template_dir).values(), *source_formats]
    pools = {parse_rbd_path(p)[0] for p in paths if is_rbd_path(p)}
    if conf.libvirt.images_type == "rbd":
        pools.add(conf.libvirt.images_rbd_pool)
    return pools


__all__ = [
    "FROZEN_PREFIX",
    "FROZEN_SNAPSHOT",
    "clone_commands",
    "clone_disks",
    "clone_paths",
    "disk_names",
    "freeze",
    "frozen_disks",
    "frozen_paths",
    "frozen_prefix",
    "remove_frozen",
    "template_pools",
]
