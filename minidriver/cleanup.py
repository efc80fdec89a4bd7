"""`minidriver cleanup`: reconcile libvirt, the state DB and the disk after a crash.

A killed `boot` or `delete` can leave any part of an instance behind. This pass finds,
for this state dir only (domains are recognised by their metadata's state id):

- domains it defined that have no DB record: destroyed and undefined;
- DB records whose domain is gone: their instance dir and record removed;
- instances still recorded as ``building`` with no spawn at work on them (a spawn
  killed half-way): domain, instance dir and record removed;
- instance dirs with neither record nor domain: removed;
- stale ``.part``/``.converted`` files in ``_base`` and lock files nobody holds;
- forwarded-port reservations of this state dir whose instance is gone.
- the RBD disks (``<uuid>_*``) of every instance reaped above. Only those: a pool may
  be shared with other hosts, so an RBD image of an unknown uuid is not ours to judge.

An instance whose lock is held is being built or deleted right now and is skipped,
and so is a partial base file whose base's lock is held: a crash releases every lock,
so a held lock always means live work.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from minidriver import imagebackend, lockutils, rbd_utils
from minidriver.driver import LibvirtDriver, instance_lock_name

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
    rbd_disks: list[str] = field(default_factory=list)  # pool/name of reaped instances
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
            )
        )


class _Pass:
    def __init__(self, drv: LibvirtDriver, dry_run: bool) -> None:
        self.drv = drv
        self.conf = drv.conf
        self.locks = drv.conf.locks_dir
        self.report = CleanupReport(dry_run=dry_run)
        self.records = {r.uuid: r for r in drv.db.list_instances()}
        self.ours = drv.owned_domains()  # instance uuid -> its domain

    def busy(self, instance_uuid: str, what: str) -> bool:
        if lockutils.is_held(self.locks, instance_lock_name(instance_uuid)):
            self.report.skipped.append(f"{what}: its instance is being built or deleted")
            return True
        return False

    def matched(self, instance_uuid: str) -> bool:
        record, domain = self.records.get(instance_uuid), self.ours.get(instance_uuid)
        return record is not None and domain is not None and record.name == domain.name()

    def reap_rbd_disks(
        self, instance_uuid: str, directory: Path, disks: dict[str, str] | None = None
    ) -> bool:
        """The RBD disks of an instance being reaped; before its dir, whose disk.info
        says where they are (``disks``: what was read of it, or of the domain's XML,
        before the domain went). An unreachable cluster is reported and returns False:
        the caller then keeps the dir and the record, the only trace of those disks,
        for the next cleanup (as ``destroy`` keeps the record)."""
        if disks is None:
            disks = self.drv.instance_disks(directory, instance_uuid)
        try:
            if not self.report.dry_run:
                removed = imagebackend.cleanup_rbd(self.conf, instance_uuid, disks)
                self.report.rbd_disks.extend(removed)
                return True
            for pool in sorted(imagebackend.rbd_pools_of(self.conf, disks)):
                names = self.drv.rbd_driver(pool).list_images()
                self.report.rbd_disks.extend(
                    f"{pool}/{n}" for n in names if n.startswith(f"{instance_uuid}_")
                )
        except rbd_utils.RbdError as exc:
            self.report.skipped.append(
                f"RBD disks of {instance_uuid} (its dir and record kept for a retry): {exc}"
            )
            return False
        return True

    def domains_without_record(self) -> None:
        for instance_uuid, domain in self.ours.items():
            if self.matched(instance_uuid) or self.busy(instance_uuid, domain.name()):
                continue
            self.report.domains.append(domain.name())
            directory = self.drv.instance_dir(instance_uuid)
            if directory.is_dir():
                self.report.instance_dirs.append(str(directory))
            # Read while the domain is there: its XML stands in for a torn disk.info.
            disks = self.drv.instance_disks(directory, instance_uuid)
            if not self.report.dry_run:
                self.drv.host.undefine(domain)
            reaped = True
            if instance_uuid not in self.records:  # else records_without_domain reaps it
                reaped = self.reap_rbd_disks(instance_uuid, directory, disks)
            if reaped and not self.report.dry_run:
                shutil.rmtree(directory, ignore_errors=True)

    def records_without_domain(self) -> None:
        for instance_uuid, record in self.records.items():
            # A spawn that finished set the state; "building" with the lock free means
            # the spawn died: what it left is removed like an orphan.
            died = record.state == "building"
            if (self.matched(instance_uuid) and not died) or self.busy(
                instance_uuid, instance_uuid
            ):
                continue
            domain = self.ours.get(instance_uuid)
            directory = Path(record.instance_dir or self.drv.instance_dir(instance_uuid))
            disks = self.drv.instance_disks(directory, instance_uuid)
            if domain is not None and not self.report.dry_run:
                self.drv.host.undefine(domain)
            if domain is not None:
                self.report.domains.append(domain.name())
            self.report.records.append(instance_uuid)
            if self.reap_rbd_disks(instance_uuid, directory, disks) and not self.report.dry_run:
                shutil.rmtree(directory, ignore_errors=True)
                self.drv.db.delete_instance(instance_uuid)

    def dirs_without_either(self) -> None:
        if not self.conf.instances_path.is_dir():
            return
        for entry in sorted(self.conf.instances_path.iterdir()):
            name = entry.name
            if not entry.is_dir() or entry.is_symlink() or name in NOT_INSTANCES:
                continue
            if entry == self.conf.base_dir or name in self.records or name in self.ours:
                continue
            if self.busy(name, f"instance dir {name}"):
                continue
            self.report.instance_dirs.append(str(entry))
            if self.reap_rbd_disks(name, entry) and not self.report.dry_run:
                shutil.rmtree(entry, ignore_errors=True)

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
        if not self.locks.is_dir():
            return
        for entry in sorted(self.locks.iterdir()):
            if self.report.dry_run:
                if not lockutils.is_held(self.locks, entry.name):
                    self.report.locks.append(entry.name)
                continue
            fd = lockutils.try_acquire(self.locks, entry.name)
            if fd is not None:  # held: live work, left alone
                self.report.locks.append(entry.name)
                lockutils.release(self.locks, entry.name, fd)  # which removes the file

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


def cleanup(drv: LibvirtDriver, *, dry_run: bool = False) -> CleanupReport:
    """One reconciliation pass; what it removed (or would remove) is in the report."""
    work = _Pass(drv, dry_run)
    work.domains_without_record()
    work.records_without_domain()
    work.dirs_without_either()
    work.partial_files()
    work.free_locks()
    work.port_reservations()
    return work.report
