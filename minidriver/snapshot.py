"""Nova's ``snapshot`` (``nova image-create``): an instance's root disk as a new image
(nova/virt/libvirt/driver.py, ``snapshot`` and ``_live_snapshot``).

A running domain gets Nova's live snapshot: a qcow2 delta on the same backing file,
a shallow block copy of the disk into it with libvirt's block job API (the guest keeps
running on its own disk), the job ended without a pivot, then ``qemu-img convert`` of
the delta's chain into one standalone image. A stopped domain gets a cold snapshot:
``qemu-img convert`` of the disk's chain. Work files live in
``$instances_path/snapshots/`` and are removed in every outcome. An RBD root disk
gets Nova's direct snapshot instead (``imagebackend.Rbd.direct_snapshot``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt
from lxml import etree

from minidriver import rbd_utils
from minidriver.exception import ImageUnacceptable, MinidriverError
from minidriver.fileutils import TRAVERSE_ONLY_DIR, make_dir
from minidriver.images import qemu_img

if TYPE_CHECKING:
    from minidriver.db import InstanceRecord
    from minidriver.imagebackend import Rbd
    from minidriver.images.store import Image as StoreImage
    from minidriver.images.store import ImageService

LOG = logging.getLogger(__name__)

BLOCK_JOB_TIMEOUT = 600  # seconds for the block copy to catch up with the disk
POLL_INTERVAL = 0.1


class SnapshotError(MinidriverError):
    pass


@contextlib.contextmanager
def work_dir(instances_path: Path) -> Iterator[Path]:
    """A private dir under ``snapshots/``, removed however the snapshot ends."""
    parent = instances_path / "snapshots"
    make_dir(parent, TRAVERSE_ONLY_DIR)
    path = Path(tempfile.mkdtemp(prefix="snap-", dir=parent))
    path.chmod(TRAVERSE_ONLY_DIR)  # a daemon's QEMU opens the delta in here
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def disk_target(domain: libvirt.virDomain, path: Path) -> str:
    """The guest device name (vda) of the disk whose source is ``path``."""
    tree = etree.fromstring(domain.XMLDesc(0).encode())
    for disk in tree.iterfind("devices/disk"):
        source = disk.find("source")
        target = disk.find("target")
        if source is not None and target is not None and source.get("file") == str(path):
            dev = target.get("dev")
            if dev:
                return dev
    raise SnapshotError(f"domain {domain.name()} has no disk {path}")


def copy_destination_xml(path: Path, disk_format: str = "qcow2") -> str:
    """The ``<disk>`` a block copy writes into: built, not formatted, as any path
    (``instances_path`` is the user's) may hold ``<``, ``&`` or quotes."""
    disk = etree.Element("disk", type="file")
    etree.SubElement(disk, "source", file=os.fspath(path))
    etree.SubElement(disk, "driver", type=disk_format)
    return etree.tostring(disk, encoding="unicode")


def cold(disk: Path, disk_format: str, out: Path) -> None:
    """The disk and everything under it, as one standalone qcow2."""
    qemu_img.convert(disk, disk_format, out, "qcow2")


def live(
    domain: libvirt.virDomain,
    disk: Path,
    disk_format: str,
    work: Path,
    out: Path,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Nova's ``_live_snapshot``: copy the running disk into a delta, then convert."""
    info = qemu_img.info(disk, disk_format)
    delta = work / "delta.qcow2"
    flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
    if info.backing_file and info.backing_format:
        # Same backing file as the disk: the copy needs only the disk's own clusters.
        qemu_img.create_cow_image(
            Path(info.backing_file), info.backing_format, delta, info.virtual_size
        )
        flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
    else:
        qemu_img.create(delta, "qcow2", info.virtual_size)
    dev = disk_target(domain, disk)
    domain.blockCopy(dev, copy_destination_xml(delta), None, flags)
    try:
        deadline = clock() + BLOCK_JOB_TIMEOUT
        while True:
            job = domain.blockJobInfo(dev, 0)
            if job and job["end"] > 0 and job["cur"] == job["end"]:
                break
            if not job:
                raise SnapshotError(f"the block copy of {dev} ended before it was ready")
            if clock() > deadline:
                raise SnapshotError(f"the block copy of {dev} did not catch up in time")
            time.sleep(POLL_INTERVAL)
    finally:
        # Ends the copy and leaves the guest on its own disk (no pivot), as Nova does.
        with contextlib.suppress(libvirt.libvirtError):
            domain.blockJobAbort(dev, 0)
    qemu_img.convert(delta, "qcow2", out, "qcow2")


def snapshot_properties(record: InstanceRecord, parent: StoreImage | None) -> dict[str, str]:
    """Nova's snapshot metadata: where the image came from and, for a disk booted from
    a kernel image, the kernel, ramdisk and command line it still needs."""
    properties = {
        "image_type": "snapshot",
        "instance_uuid": record.uuid,
        "base_image_ref": record.image_id,
    }
    if record.kernel_id:
        properties["kernel_id"] = record.kernel_id
    if record.ramdisk_id:
        properties["ramdisk_id"] = record.ramdisk_id
    command_line = parent.to_image_meta().os_command_line if parent else ""
    if command_line:
        properties["os_command_line"] = command_line
    return properties


def snapshot_fields(record: InstanceRecord, parent: StoreImage | None) -> dict[str, Any]:
    """What a snapshot's image record takes from its instance and the image it was
    booted from: Nova's minimums and properties."""
    return {
        "min_disk": parent.min_disk if parent else 0,
        "min_ram": parent.min_ram if parent else 0,
        "properties": snapshot_properties(record, parent),
    }


def to_image(
    images: ImageService,
    domain: libvirt.virDomain,
    disk: Path,
    disk_format: str,
    instances_path: Path,
    *,
    name: str,
    record: InstanceRecord,
    parent: StoreImage | None,
    clock: Callable[[], float] = time.monotonic,
) -> StoreImage:
    """A file root disk as a new qcow2 image in the store: live while the domain
    runs, else cold."""
    with work_dir(instances_path) as work:
        out = work / "snapshot.qcow2"
        if domain.isActive():
            live(domain, disk, disk_format, work, out, clock=clock)
        else:
            cold(disk, disk_format, out)
        return images.add(
            out,
            name=name,
            disk_format="qcow2",
            **snapshot_fields(record, parent),
        )


def standard(
    images: ImageService,
    root: Rbd,
    instances_path: Path,
    *,
    name: str,
    record: InstanceRecord,
    parent: StoreImage | None,
) -> StoreImage:
    """Nova's standard snapshot of an RBD root disk, when no direct one can be made:
    its data extracted, converted to a qcow2 image in the store."""
    with work_dir(instances_path) as work:
        raw = work / "snapshot.raw"
        root.snapshot_extract(raw, uuidlib.uuid4().hex)
        out = work / "snapshot.qcow2"
        qemu_img.convert(raw, "raw", out, "qcow2")
        raw.unlink()
        return images.add(
            out,
            name=name,
            disk_format="qcow2",
            **snapshot_fields(record, parent),
        )


def direct(
    images: ImageService,
    root: Rbd,
    instances_path: Path,
    *,
    name: str,
    record: InstanceRecord,
    parent: StoreImage | None,
) -> StoreImage:
    """Nova's direct snapshot of an RBD root disk, running or not (an RBD snapshot is
    crash-consistent): a flattened clone in Ceph in the parent pool (the disk's
    parent's, else the image's), recorded in the store by its rbd location; removed
    again if the store refuses it. Without a parent pool, a standard snapshot, as Nova
    falls back to on ImageUnacceptable."""
    rbd = root.driver
    image_id = str(uuidlib.uuid4())
    with rbd.connected():
        origin = parent.rbd_location if parent else None
        try:
            location = root.direct_snapshot(uuidlib.uuid4().hex, image_id, origin)
        except ImageUnacceptable as exc:
            LOG.warning("Performing standard snapshot because direct snapshot failed: %s", exc)
            return standard(images, root, instances_path, name=name, record=record, parent=parent)
        try:
            return images.add_location(
                image_id,
                name=name,
                url=location.url,
                size=rbd.size(image_id, location.pool),
                **snapshot_fields(record, parent),
            )
        except BaseException:
            rbd_utils.remove_quietly(rbd, image_id, location.pool)
            raise
