"""`minidriver cleanup`: reconcile libvirt, the state DB and the disk after a crash.

A killed `boot` or `delete` can leave any part of an instance behind. This pass finds,
for this state dir only (domains are recognised by their metadata's state id):

- domains it defined that have no DB record: destroyed and undefined;
- DB records whose domain is gone: their instance dir and record removed;
- instances still recorded as ``building`` with no spawn at work on them (a spawn
  killed half-way): domain, instance dir and record removed;
- instance dirs with neither record nor domain: removed; a resize's
  ``<uuid>_resize`` dir is kept while its instance has a record, and a shelved
  instance (no domain, no dir) is left alone;
- stale ``.part``/``.converted`` files in ``_base`` and lock files nobody holds;
- forwarded-port reservations of this state dir whose instance is gone;
- images an ``image add`` left ``saving`` when it died, with their partial files;
- templates a killed ``template create`` left half-made, with their source instance,
  and template dirs with no record (``vmtemplate.cleanup``); a killed clone is a
  killed spawn, reaped as one;
- the RBD disks (``<uuid>_*``) of every instance reaped above, found by that name in
  the configured pool as Nova's ``_cleanup_rbd`` finds them (and in any pool its domain
  or an older ``disk.info`` names). Only those: a pool may be shared with other hosts,
  so an RBD image of an unknown uuid is not ours to judge.

A held lock means live work, anything else is fair game: a crash releases every
lock, and a spawn records its final state before it lets its instance's lock go. So
each instance is judged under its own lock, taken without waiting (held: skipped), from
its record, domain and dir as they are once the lock is ours; what the pass listed at
its start only nominates candidates. A partial base file is removed under its base's
lock likewise.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from minidriver import guest, imagebackend, lockutils, rbd_utils, vmtemplate
from minidriver.db import InstanceRecord
from minidriver.disk_info_file import read_disk_info
from minidriver.driver import LibvirtDriver, instance_lock_name
from minidriver.exception import ImageNotFound, InstanceNotFound
from minidriver.images.store import ImageStatus, add_lock_name
from minidriver.resize import RESIZE_SUFFIX
from minidriver.vm_states import VMState

PARTIAL_SUFFIXES = (".part", ".converted")
# Entries of instances_path that are not instance dirs.
NOT_INSTANCES = ("locks", "snapshots")


@dataclass
class CleanupReport:
    dry_run: bool
    domains: list[str] = field(default_factory=list)  # domain names undefined
    records: list[str] = field(default_factory=list)  # instance uuids forgotten
    instance_dirs: list[str] = field(default_factory=list)
    partial_files: list[str] = field(default_factory=list)
    locks: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)  # forwarded-port reservations freed
    # pool/name of reaped instances' disks and of half-made templates' frozen images
    rbd_disks: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # ids of images a dead add left saving
    templates: list[str] = field(default_factory=list)  # half-made template dirs
    # volumes attached to a reaped instance: available again, kept as a delete keeps them
    volumes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # busy or unreachable: what and why

    def total(self) -> int:
        return sum(
            len(x)
            for x in (
                self.domains,
                self.records,
                self.instance_dirs,
                self.partial_files,
                self.locks,
                self.ports,
                self.rbd_disks,
                self.images,
                self.templates,
                self.volumes,
            )
        )


class _Pass:
    """One pass. What it lists at the start only nominates candidates: each is judged
    again, under its instance lock, from a fresh read of its record, domain and dir,
    so that nothing a spawn or delete did meanwhile is judged from an older view."""

    def __init__(self, drv: LibvirtDriver, dry_run: bool) -> None:
        self.drv = drv
        self.conf = drv.conf
        self.locks = drv.conf.locks_dir
        self.report = CleanupReport(dry_run=dry_run)
        self.state_id = drv.db.state_id

    def candidates(self) -> list[str]:
        """Instances that looked unfinished when listed: a domain without a matching
        record, a record without its domain or still ``building``, a dir without
        either. Listed before any is judged, in that order (the report's)."""
        everywhere = {r.uuid: r for r in self.drv.db.list_instances()}
        # Another host's instances are that host's to judge (their domains are there);
        # their dirs, in an instances_path the hosts share, are no strays here.
        records = {u: r for u, r in everywhere.items() if r.runs_on(self.conf.default.host)}
        ours = self.drv.owned_domains()

        def matched(instance_uuid: str) -> bool:
            record, domain = records.get(instance_uuid), ours.get(instance_uuid)
            return record is not None and domain is not None and record.name == domain.name()

        found = [u for u in ours if not matched(u)]
        found += [
            u
            for u, r in records.items()
            if (not matched(u) and not _shelved(r)) or r.state == "building"
        ]
        if self.conf.instances_path.is_dir():
            for entry in sorted(self.conf.instances_path.iterdir()):
                name = entry.name
                if not entry.is_dir() or entry.is_symlink() or name in NOT_INSTANCES:
                    continue
                if name.endswith(RESIZE_SUFFIX) and name.removesuffix(RESIZE_SUFFIX) in everywhere:
                    continue  # a resize waiting for confirm or revert keeps its old disks
                if entry != self.conf.base_dir and name not in everywhere and name not in ours:
                    found.append(name)
        return list(dict.fromkeys(found))

    @contextlib.contextmanager
    def lock(self, lock_dir: Path, name: str) -> Iterator[bool]:
        """Whether the lock is free; if so (and not a dry run), held for the block."""
        if self.report.dry_run:
            yield not lockutils.is_held(lock_dir, name)
            return
        fd = lockutils.try_acquire(lock_dir, name)
        if fd is None:
            yield False
            return
        try:
            yield True
        finally:
            lockutils.release(lock_dir, name, fd)

    def owned_domain(self, instance_uuid: str) -> libvirt.virDomain | None:
        """The instance's domain, if this state dir defined it, as libvirt has it now."""
        try:
            uuidlib.UUID(instance_uuid)
        except ValueError:
            return None  # a stray dir's name, no instance's: it has no domain
        try:
            domain = self.drv.host.get_connection().lookupByUUIDString(instance_uuid)
            owner = guest.owner_of(domain.XMLDesc(0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise
        if owner is None or owner.state_id != self.state_id:
            return None
        return domain if owner.instance_uuid == instance_uuid else None

    def record(self, instance_uuid: str) -> InstanceRecord | None:
        try:
            return self.drv.db.get_instance(instance_uuid)
        except InstanceNotFound:
            return None

    def reap_rbd_disks(self, instance_uuid: str, disks: dict[str, str] | None) -> bool:
        """The RBD disks of an instance being reaped, found as Nova finds them: the
        ``<uuid>_*`` images of the configured pool, and of any pool ``disks`` names
        (what was recorded of it before its domain went: the domain's XML, or an
        old-style disk.info that listed RBD disks); one listing per pool. An
        unreachable cluster is reported and returns False: the caller then keeps the
        dir and the record for the next cleanup (as ``destroy`` keeps the record)."""
        try:
            if not self.report.dry_run:
                removed = imagebackend.cleanup_rbd(self.conf, instance_uuid, disks)
                self.report.rbd_disks.extend(removed)
                return True
            found = imagebackend.find_rbd_disks(self.conf, instance_uuid, disks)
            self.report.rbd_disks.extend("/".join(imagebackend.parse_rbd_path(p)) for p in found)
        except rbd_utils.RbdError as exc:
            self.report.skipped.append(
                f"RBD disks of {instance_uuid} (its dir and record kept for a retry): {exc}"
            )
            return False
        return True

    def instances(self) -> None:
        for instance_uuid in self.candidates():
            with self.lock(self.locks, instance_lock_name(instance_uuid)) as free:
                if not free:
                    self.report.skipped.append(
                        f"{instance_uuid}: its instance is being built or deleted"
                    )
                    continue
                self.judge(instance_uuid)

    def judge(self, instance_uuid: str) -> None:
        """Under the instance's lock: reap what a dead spawn or delete left of it.

        A spawn records its final state before it lets go of the lock, so a record
        still ``building`` here is one whose spawn died; it goes like an orphan."""
        record = self.record(instance_uuid)
        if record is not None and not record.runs_on(self.conf.default.host):
            self.report.skipped.append(f"{instance_uuid}: it runs on host {record.host}")
            return  # moved there since it was listed
        domain = self.owned_domain(instance_uuid)
        if record is not None and record.instance_dir:
            directory = Path(record.instance_dir)
        else:
            directory = self.drv.instance_dir(instance_uuid)
        if record is not None:
            healthy = domain is not None and record.name == domain.name()
            if healthy and record.state != "building":
                return
            if domain is None and _shelved(record):
                return  # offloaded: no domain, no dir, by design
            self.report.records.append(instance_uuid)
        elif domain is None and not directory.is_dir():
            return  # deleted since it was listed
        # Read while the domain is there: its XML stands in for a missing disk.info
        # (an all-RBD instance has none). A stray dir (no domain; its name may be no
        # uuid at all) has only its disk.info.
        if domain is not None:
            disks = self.drv.recorded_disks(directory, instance_uuid)
        else:
            disks = read_disk_info(directory)
        if domain is not None:
            self.report.domains.append(domain.name())
            if not self.report.dry_run:
                self.drv.host.undefine(domain)
        if record is None and directory.is_dir():
            self.report.instance_dirs.append(str(directory))
        self.reap(instance_uuid, directory, disks, has_record=record is not None)

    def reap(
        self, instance_uuid: str, directory: Path, disks: dict[str, str] | None, *, has_record: bool
    ) -> None:
        """Its RBD disks, then its dir and record; its volumes kept, available again."""
        attachments = self.drv.volumes.attachments_of(instance_uuid)
        if not self.reap_rbd_disks(instance_uuid, disks):
            return
        self.report.volumes.extend(a.volume_id for a in attachments)
        if not self.report.dry_run:
            shutil.rmtree(directory, ignore_errors=True)
            if has_record:
                self.drv.db.delete_instance(instance_uuid)
            self.drv.block_devices.forget_instance(instance_uuid)

    def saving_images(self) -> None:
        """Images an ``image add`` left ``saving`` when it died: each add holds its
        image's lock until it ends, so a free lock, with the record read again under
        it, means no add is at work on it. Its record goes, and its partial files."""
        images = self.drv.images
        for listed in images.list():
            if listed.status != ImageStatus.SAVING:
                continue
            with self.lock(images.locks_dir, add_lock_name(listed.id)) as free:
                if not free:
                    self.report.skipped.append(f"image {listed.id}: being added")
                    continue
                try:
                    image = images.get(listed.id)
                except ImageNotFound:
                    continue  # the add failed and forgot it meanwhile
                if image.status != ImageStatus.SAVING:
                    continue
                files = [
                    images.images_path / f"{image.id}{suffix}"
                    for suffix in ("", ".part", ".raw")  # the renamed, copied, converted
                ]
                self.report.images.append(image.id)
                self.report.partial_files.extend(str(f) for f in files if f.exists())
                if not self.report.dry_run:
                    images.delete(image.id)  # the record, then <id> and <id>.part
                    files[-1].unlink(missing_ok=True)

    def partial_files(self) -> None:
        base_dir = self.conf.base_dir
        if not base_dir.is_dir():
            return
        for entry in sorted(base_dir.iterdir()):
            if entry.suffix not in PARTIAL_SUFFIXES or not entry.is_file():
                continue
            # Whoever writes it holds its base's lock (the resized copy's .part: its own).
            base_name = entry.name[: -len(entry.suffix)]
            if lockutils.is_held(self.locks, base_name):
                self.report.skipped.append(f"{entry.name}: being written")
                continue
            if self.report.dry_run:
                self.report.partial_files.append(str(entry))
                continue
            fd = lockutils.try_acquire(self.locks, base_name)
            if fd is None:
                self.report.skipped.append(f"{entry.name}: being written")
                continue
            try:
                entry.unlink(missing_ok=True)
                self.report.partial_files.append(str(entry))
            finally:
                lockutils.release(self.locks, base_name, fd)

    def free_locks(self) -> None:
        for locks in dict.fromkeys((self.locks, self.drv.images.locks_dir)):
            if not locks.is_dir():
                continue
            for entry in sorted(locks.iterdir()):
                if self.report.dry_run:
                    if not lockutils.is_held(locks, entry.name):
                        self.report.locks.append(entry.name)
                    continue
                fd = lockutils.try_acquire(locks, entry.name)
                if fd is not None:  # held: live work, left alone
                    self.report.locks.append(entry.name)
                    lockutils.release(locks, entry.name, fd)  # which removes the file

    def port_reservations(self) -> None:
        """After the records pass: a record it removed (or would) frees its port too."""
        state_id = self.drv.db.state_id
        forgotten = set(self.report.records)
        for reservation in self.drv.ports.list():
            if reservation.state_id != state_id:
                continue
            if reservation.instance_uuid not in forgotten and not reservation.is_stale():
                continue
            self.report.ports.append(reservation.port)
            if not self.report.dry_run:
                self.drv.ports.release(reservation.port, reservation.instance_uuid)


def _shelved(record: InstanceRecord) -> bool:
    return record.vm_state == VMState.SHELVED_OFFLOADED


def cleanup(drv: LibvirtDriver, *, dry_run: bool = False) -> CleanupReport:
    """One reconciliation pass; what it removed (or would remove) is in the report."""
    # First: a half-made template's source instance is destroyed with it, not judged
    # by the passes below.
    templates, sources, frozen = vmtemplate.cleanup(drv, dry_run=dry_run)
    work = _Pass(drv, dry_run)
    work.report.templates.extend(templates)
    work.report.records.extend(sources)
    work.report.rbd_disks.extend(frozen)
    work.instances()
    work.saving_images()
    work.partial_files()
    work.free_locks()
    work.port_reservations()
    return work.report
