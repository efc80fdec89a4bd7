"""Templates and their clones: a ready guest saved once, restored as many new instances
(no Nova counterpart; Kata Containers' VM templating, done with libvirt's save and
restore, ``virDomainSave`` / ``virDomainRestore``; Nova's suspend uses their managed
form, ``virDomainManagedSave``).

``create`` turns a running instance into a template: its memory saved by libvirt into
``<state_path>/templates/<id>/memory.save``, its disk files (and kernel, ramdisk, config
drive and ``libvirt.xml``) moved there and made read-only (the frozen layer), the
instance consumed (domain undefined, record, port and known_hosts entry gone). With
``images_type = rbd`` the frozen layer stays in Ceph: protected snapshots of the disks,
renamed for the template (``vmtemplate_rbd``). The template dir's ``disk.info`` (ours)
keeps naming them, ``rbd:<pool>/tpl-<id>_<disk>``, as the only record of where they
are; an instance dir's lists file disks only, as Nova's does.

``spawn`` restores a clone: a qcow2 overlay of each frozen disk in a new instance dir,
the template's XML given the clone's name, uuid, paths and forwarded port
(``vmtemplate_xml``), defined, and a copy of the saved memory with that XML in its
header restored onto it (``savefile`` says why a copy); an RBD template's clone gets RBD
clones of its frozen snapshots instead of overlays, ``<clone uuid>_<disk>``. The guest
goes on from where the template was saved: no boot, so no new console lines; a clone is
ready once it is RUNNING. Clones share the template's hostname, machine-id, SSH host
keys and MAC (user-mode NIC or none only: on a shared network two clones would collide).

Crash safety follows spawn's: a clone is an instance recorded ``building`` under its
instance lock until it runs, so ``cleanup`` reaps a killed one like any killed spawn
(its save copy lives in its instance dir); a template is ``creating`` under its own
lock until done, and ``cleanup`` removes a half-made one with what is left of its
source instance (:func:`cleanup`).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import os
import shutil
import sqlite3
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import libvirt

from minidriver import (
    guestagent,
    imagebackend,
    lockutils,
    rbd_utils,
    savefile,
    ssh,
    vmtemplate_rbd,
)
from minidriver.compute_api import validate_display_name
from minidriver.db import InstanceRecord, resolve, utc_now
from minidriver.disk_info_file import write_disk_info
from minidriver.driver import (
    InstanceBuildTimeout,
    LibvirtDriver,
    SpawnError,
    instance_lock_name,
)
from minidriver.exception import NotFound, TemplateError, TemplateNotFound
from minidriver.images import qemu_img
from minidriver.lockutils import external_lock
from minidriver.network import NetworkMode
from minidriver.objects import Instance
from minidriver.steps import Step, StepListener, StepTimer
from minidriver.vm_states import VMState
from minidriver.vmtemplate_xml import CONSOLE_LOG, SHARED_FILES, clone_xml

# Imported from here by the API's users; the exceptions live in ``exception`` (where
# ``vmtemplate_xml`` raises them too).
__all__ = [
    "MEMORY_FILE",
    "RESTORE_FILE",
    "TemplateError",
    "TemplateNotFound",
    "TemplateRecord",
    "Templates",
    "cleanup",
    "disk_names",
    "remove_half_made",
    "template_lock_name",
]

MEMORY_FILE = "memory.save"  # in the template dir: what virDomainSave wrote
RESTORE_FILE = "restore.save"  # in a clone's instance dir until its restore returns
XML_FILE = "libvirt.xml"


def template_lock_name(template_id: str) -> str:
    return f"template-{template_id}"


@dataclass(frozen=True)
class TemplateRecord:
    """One row of ``templates`` (schema 5)."""

    id: str
    name: str
    status: str  # creating | active
    created_at: str
    template_dir: str
    source_uuid: str  # the instance it was made from (consumed)
    source_dir: str  # that instance's dir: the paths in the saved XML
    flavor: str
    image_id: str
    kernel_id: str
    ramdisk_id: str
    network_mode: str
    mac_address: str | None
    key_name: str | None
    disks: dict[str, str]  # file name in the template dir -> format
    memory_bytes: int | None
    # The source instance's copy of its image's metadata, its clones' (schema 10).
    image_meta: str = ""

    @property
    def path(self) -> Path:
        return Path(self.template_dir)

    @property
    def overlaid(self) -> list[str]:
        """The disks each clone gets its own overlay of."""
        return [name for name in self.disks if name not in SHARED_FILES]

    def describe(self) -> str:
        return f"{self.id} ({self.name})"

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        del fields["image_meta"]  # the image's, not the template's: `image show` has it
        return fields


_FIELDS: Final = tuple(f.name for f in dataclasses.fields(TemplateRecord))
# Built from the record's field names, never from input.
_INSERT: Final = (
    f"INSERT INTO templates ({', '.join(_FIELDS)})"  # noqa: S608
    f" VALUES ({', '.join(':' + name for name in _FIELDS)})"
)


def _row(row: sqlite3.Row) -> TemplateRecord:
    fields = {name: row[name] for name in _FIELDS}
    fields["disks"] = json.loads(fields["disks"])
    return TemplateRecord(**fields)


def _params(rec: TemplateRecord) -> dict[str, Any]:
    return {**dataclasses.asdict(rec), "disks": json.dumps(rec.disks)}


# -- templates ---------------------------------------------------------------------


class Templates:
    """The templates of one state dir, and the clones restored from them."""

    def __init__(self, drv: LibvirtDriver) -> None:
        self.drv = drv
        self.conf = drv.conf
        self.db = drv.db

    # -- records ----------------------------------------------------------------

    def list(self) -> list[TemplateRecord]:
        rows = self.db.query("SELECT * FROM templates ORDER BY created_at, rowid")
        return [_row(r) for r in rows]

    def get(self, template_id: str) -> TemplateRecord:
        rows = self.db.query("SELECT * FROM templates WHERE id = ?", (template_id,))
        if not rows:
            raise TemplateNotFound(f"template {template_id} not found")
        return _row(rows[0])

    def find(self, ref: str) -> TemplateRecord:
        """The one template ``ref`` names: its id, a unique id prefix or its name."""
        rows = self.db.query_ref("templates", ref, key="id", names=("name",))
        return resolve(
            ref,
            [_row(r) for r in rows] if ref else [],
            ident=lambda t: t.id,
            names=lambda t: (t.name,),
            describe=lambda t: t.describe(),
            what="template",
            not_found=TemplateNotFound(
                f"no template matches {ref!r}",
                hint="see `minidriver template list`; make one with `template create`",
            ),
        )

    def clones_of(self, template_id: str) -> builtins.list[InstanceRecord]:
        return [r for r in self.db.list_instances() if r.template_id == template_id]

    def _insert(self, rec: TemplateRecord) -> None:
        with self.db.transaction() as conn:
            try:
                conn.execute(_INSERT, _params(rec))
            except sqlite3.IntegrityError as exc:
                raise TemplateError(
                    f"a template named {rec.name!r} exists", hint="choose another --name"
                ) from exc

    def _forget(self, template_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM templates WHERE id = ?", (template_id,))

    # -- create -----------------------------------------------------------------

    def create(self, instance_uuid: str, name: str) -> TemplateRecord:
        """The running instance saved as the template ``name``; the instance is
        consumed. Refused, with nothing changed, for an instance that is not running,
        has a NIC other than the user network's or is itself a clone."""
        validate_display_name(name)
        record = self.drv.db.get_instance(instance_uuid)
        formats = self._check_source(record, name)
        template_id = str(uuidlib.uuid4())
        template_dir = self.conf.templates_path / template_id
        tpl = TemplateRecord(
            id=template_id,
            name=name,
            status="creating",
            created_at=utc_now(),
            template_dir=os.fspath(template_dir),
            source_uuid=record.uuid,
            source_dir=record.instance_dir,
            flavor=record.flavor,
            image_id=record.image_id,
            kernel_id=record.kernel_id,
            ramdisk_id=record.ramdisk_id,
            network_mode=record.network_mode,
            mac_address=record.mac_address,
            key_name=record.key_name,
            disks=disk_names(record.uuid, formats),
            memory_bytes=None,
            image_meta=record.image_meta,
        )
        locks = self.conf.locks_dir
        saved = False
        try:
            with (
                external_lock(locks, instance_lock_name(record.uuid)),
                external_lock(locks, template_lock_name(template_id)),
            ):
                self._insert(tpl)
                try:
                    self._save(record, tpl)
                except BaseException:
                    # Not saved: the instance is untouched and goes on running.
                    shutil.rmtree(template_dir, ignore_errors=True)
                    self._forget(template_id)
                    raise
                saved = True
                self._freeze(record, tpl, formats)
        except BaseException:
            if saved:
                # Its memory and some of its disks are the template's now: neither
                # the instance nor the template can go on; both go, as `cleanup`
                # does after a crash (outside the locks, which destroy takes).
                remove_half_made(self.drv, tpl)
            raise
        return self.get(template_id)

    def _check_source(self, record: InstanceRecord, name: str) -> dict[str, str]:
        """Refuses what cannot be a template's source; returns its disks ({path:
        format}, ``instance_disks``': its RBD disks found in the pool)."""
        if record.network_mode not in (NetworkMode.USER, NetworkMode.NONE):
            raise TemplateError(
                f"instance {record.display_name} is on a {record.network_mode} network:"
                " its clones would share its MAC and address there",
                hint="make templates of instances booted with --network user (or none)",
            )
        if record.template_id:
            raise TemplateError(
                f"instance {record.display_name} is a clone: its disks are overlays of"
                " another template's",
                hint="make the template from an instance booted from an image",
            )
        state = self.drv.get_info(record.uuid).state
        if state != "running" or record.vm_state != VMState.ACTIVE:
            hint = "boot it with --wait-for or --wait-ssh, then make the template"
            if record.vm_state == VMState.SUSPENDED:
                hint = f"resume it first (minidriver resume {record.display_name})"
            raise TemplateError(
                f"instance {record.display_name} is {state} (vm_state {record.vm_state});"
                " a template is made from a running, ready guest",
                hint=hint,
            )
        if any(t.name == name for t in self.list()):
            raise TemplateError(f"a template named {name!r} exists", hint="choose another --name")
        formats = self.drv.instance_disks(Path(record.instance_dir), record.uuid) or {}
        if not formats:
            raise TemplateError(f"instance {record.display_name} has no disks on record")
        return formats

    def _save(self, record: InstanceRecord, tpl: TemplateRecord) -> None:
        """virDomainSave into the template's dir; the domain is stopped by it."""
        tpl.path.mkdir(parents=True)
        tpl.path.chmod(0o755)
        self.conf.templates_path.chmod(0o755)
        domain = self.drv._domain_of(record.uuid)
        domain.save(os.fspath(tpl.path / MEMORY_FILE))

    def _freeze(self, record: InstanceRecord, tpl: TemplateRecord, formats: dict[str, str]) -> None:
        """The instance's files moved into the template's dir, read-only; the instance
        consumed (``formats``: its disks, as ``_check_source`` found them). The record
        and the port go last: a crash before leaves a ``creating`` template naming its
        source, which `cleanup` removes together."""
        savefile.read_header(tpl.path / MEMORY_FILE)  # libvirt wrote one clones can use
        source = Path(record.instance_dir)
        rbd_sources = vmtemplate_rbd.disk_names(record.uuid, formats)
        frozen = vmtemplate_rbd.frozen_paths(tpl.id, rbd_sources)
        # First, so that a crash past here leaves the pools of the frozen disks named.
        write_disk_info(tpl.path, tpl.disks, frozen)
        vmtemplate_rbd.freeze(self.conf, rbd_sources, frozen)
        kernels = [f for f in ("kernel", "ramdisk") if (source / f).exists()]
        moved = [*(d for d in tpl.disks if d not in frozen), XML_FILE, *kernels]
        for file_name in moved:
            shutil.move(source / file_name, tpl.path / file_name)
            (tpl.path / file_name).chmod(0o444)
        self.drv._undefine(record.uuid)
        shutil.rmtree(source, ignore_errors=True)
        if record.forward_port is not None:
            self.drv.ports.release(record.forward_port, record.uuid)
        ssh.forget_host_key(self.conf.known_hosts_path, record.uuid, self.conf.locks_dir)
        memory = (tpl.path / MEMORY_FILE).stat().st_size
        with self.db.transaction() as conn:
            self.db.delete_instance(record.uuid)
            conn.execute(
                "UPDATE templates SET status = 'active', memory_bytes = ? WHERE id = ?",
                (memory, tpl.id),
            )

    # -- delete -----------------------------------------------------------------

    def delete(self, template_id: str) -> None:
        """Remove the template's files, frozen RBD images and record; refused while
        clones of it exist."""
        tpl = self.get(template_id)
        with external_lock(self.conf.locks_dir, template_lock_name(tpl.id)):
            clones = self.clones_of(tpl.id)
            if clones:
                raise TemplateError(
                    f"template {tpl.name} has {len(clones)} clone(s): "
                    + ", ".join(c.describe() for c in clones),
                    hint="delete its clones first",
                )
            # The images first: should Ceph refuse, the record and dir still name them.
            pools = vmtemplate_rbd.template_pools(self.conf, tpl.path, {})
            vmtemplate_rbd.remove_frozen(self.conf, tpl.id, pools)
            shutil.rmtree(tpl.path, ignore_errors=True)
            self._forget(tpl.id)

    # -- clones -----------------------------------------------------------------

    def spawn(
        self,
        template_id: str,
        *,
        name: str | None = None,
        timeout: float | None = None,
        listener: StepListener | None = None,
        set_clock: bool = True,
    ) -> Instance:
        """A new instance restored from the template: overlays of its frozen disks,
        its own uuid, domain name, display name (default: the template's name),
        console log and forwarded port. Returns once it is RUNNING and, with a guest
        agent, its clock is set (``set_clock=False``: the caller does it, with
        :meth:`set_clock`, while it waits for something else). ``timeout`` (default
        ``instance_build_timeout``) bounds the whole of it."""
        drv = self.drv
        tpl = self.get(template_id)
        if tpl.status != "active":
            if lockutils.is_held(self.conf.locks_dir, template_lock_name(tpl.id)):
                raise TemplateError(
                    f"template {tpl.name} is still being made",
                    hint="wait for its `template create` to finish",
                )
            raise TemplateError(
                f"template {tpl.name} was left half-made by a `template create` that died",
                hint="`minidriver cleanup` removes it (and what is left of its instance)",
            )
        display_name = name or tpl.name
        validate_display_name(display_name)
        timer = StepTimer(listener, clock=drv.clock)
        budget = self.conf.default.instance_build_timeout if timeout is None else timeout
        deadline = drv.clock() + budget
        header = savefile.read_header(tpl.path / MEMORY_FILE)
        template_xml = (tpl.path / XML_FILE).read_text()
        drv.host.check_instances_path()
        instance = Instance(
            uuid=str(uuidlib.uuid4()),
            name=drv._next_domain_name(),
            display_name=display_name,
            flavor=drv.get_flavor(tpl.flavor),
            image_ref=tpl.image_id,
            virt_type=drv.host.virt_type.virt_type,
            created_at=utc_now(),
            kernel_id=tpl.kernel_id,
            ramdisk_id=tpl.ramdisk_id,
        )
        instance.instance_dir = os.fspath(drv.instance_dir(instance.uuid))
        with external_lock(self.conf.locks_dir, instance_lock_name(instance.uuid)):
            try:
                self._restore(
                    instance,
                    tpl=tpl,
                    header=header,
                    template_xml=template_xml,
                    timer=timer,
                    deadline=deadline,
                    set_clock=set_clock,
                )
            except InstanceBuildTimeout as exc:
                raise InstanceBuildTimeout(
                    "wait_for_running",
                    TimeoutError(f"not RUNNING within {budget:g} s of the restore's start"),
                    instance,
                ) from exc
            # Before the lock goes: to `cleanup`, "building" with a free lock is a
            # spawn (or a restore) that died.
            instance.state = "running"
            drv.db.update_instance(instance.uuid, state="running", vm_state=VMState.ACTIVE)
        instance.timings = timer.as_dict()
        return instance

    def _restore(
        self,
        instance: Instance,
        *,
        tpl: TemplateRecord,
        header: savefile.SaveHeader,
        template_xml: str,
        timer: StepTimer,
        deadline: float,
        set_clock: bool,
    ) -> None:
        drv = self.drv
        clone_dir = Path(instance.instance_dir)
        with contextlib.ExitStack() as undo:
            step = "record"
            try:
                drv.db.create_instance(_clone_record(instance, tpl, drv.conf.default.host))
                undo.callback(drv.db.delete_instance, instance.uuid)
                port = None
                if tpl.network_mode == NetworkMode.USER:
                    step = "allocate_network"
                    port = self._reserve_port(instance.uuid, undo)

                step = "create_image"
                undo.callback(shutil.rmtree, clone_dir, ignore_errors=True)
                clone_dir.mkdir(parents=True)
                clone_dir.chmod(0o755)
                frozen = vmtemplate_rbd.frozen_disks(tpl.path)
                if frozen:
                    self._clone_rbd_disks(instance.uuid, tpl, frozen, timer, undo)
                else:
                    self._overlay_disks(clone_dir, tpl, timer)
                (clone_dir / CONSOLE_LOG).touch()

                def xml_for(text: str) -> str:
                    return clone_xml(
                        text,
                        name=instance.name,
                        uuid=instance.uuid,
                        display_name=instance.display_name,
                        created_at=instance.created_at,
                        source_dir=tpl.source_dir,
                        source_uuid=tpl.source_uuid,
                        clone_dir=clone_dir,
                        template_dir=tpl.path,
                        overlaid=tpl.overlaid,
                        forward_port=port,
                    )

                step = "define"
                with timer.step(Step.DEFINE):
                    persistent = xml_for(template_xml)
                    (clone_dir / XML_FILE).write_text(persistent)
                    domain = drv.host.define(persistent)
                undo.callback(drv._undefine, instance.uuid)

                step = "restore"
                copy = clone_dir / RESTORE_FILE
                try:
                    with timer.step(Step.SAVE_COPY):
                        savefile.copy_with_xml(tpl.path / MEMORY_FILE, copy, xml_for(header.xml))
                    with timer.step(Step.RESTORE):
                        drv.host.get_connection().restoreFlags(
                            os.fspath(copy), None, libvirt.VIR_DOMAIN_SAVE_RUNNING
                        )
                finally:
                    copy.unlink(missing_ok=True)

                step = "wait_for_running"
                with timer.step(Step.WAIT):
                    drv.wait_for_running(instance, domain, max(0.0, deadline - drv.clock()))
                if set_clock and guestagent.has_agent_channel(template_xml):
                    # The guest's clock is the template's, stopped at the save.
                    with timer.step(Step.SET_TIME):
                        instance.clock_set = guestagent.sync_guest_time(
                            domain, wait=min(guestagent.AGENT_WAIT, deadline - drv.clock())
                        )
            except InstanceBuildTimeout:
                raise
            except Exception as exc:
                raise SpawnError(step, exc, instance) from exc
            undo.pop_all()

    @staticmethod
    def _overlay_disks(clone_dir: Path, tpl: TemplateRecord, timer: StepTimer) -> None:
        with timer.step(Step.OVERLAY):
            for disk in tpl.overlaid:
                qemu_img.create_cow_image(tpl.path / disk, tpl.disks[disk], clone_dir / disk, None)
        shared = {d: os.fspath(tpl.path / d) for d in tpl.disks if d in SHARED_FILES}
        formats = {d: ("qcow2" if d not in shared else tpl.disks[d]) for d in tpl.disks}
        write_disk_info(clone_dir, formats, shared)

    def _clone_rbd_disks(
        self,
        instance_uuid: str,
        tpl: TemplateRecord,
        frozen: dict[str, str],
        timer: StepTimer,
        undo: contextlib.ExitStack,
    ) -> None:
        """RBD clones of the frozen snapshots, named as an instance's disks: `cleanup`
        after a kill finds them by that name, as any instance's (no ``disk.info``: as
        in Nova, it lists no RBD disk)."""
        paths = vmtemplate_rbd.clone_paths(self.conf, tpl.path, instance_uuid)
        for pool in {imagebackend.parse_rbd_path(p)[0] for p in paths.values()}:
            undo.callback(
                rbd_utils.cleanup_volumes_quietly,
                imagebackend.rbd_driver(self.conf, pool),
                instance_uuid,
            )
        vmtemplate_rbd.clone_disks(self.conf, frozen, instance_uuid, timer)

    def set_clock(self, instance_uuid: str) -> bool | None:
        """A clone's clock set to the host's through its guest agent: True when done,
        False when the agent did not do it, None when the guest has no agent."""
        domain = self.drv._domain_of(instance_uuid)
        if not guestagent.has_agent_channel(domain.XMLDesc(0)):
            return None
        return guestagent.sync_guest_time(domain)

    def _reserve_port(self, instance_uuid: str, undo: contextlib.ExitStack) -> int:
        port = self.drv.ports.reserve(
            state_path=self.conf.state_path,
            state_id=self.db.state_id,
            instance_uuid=instance_uuid,
        )
        undo.callback(self.drv.ports.release, port, instance_uuid)
        self.db.update_instance(instance_uuid, forward_port=port)
        return port


def _clone_record(instance: Instance, tpl: TemplateRecord, host: str) -> InstanceRecord:
    return InstanceRecord(
        uuid=instance.uuid,
        name=instance.name,
        display_name=instance.display_name,
        flavor=tpl.flavor,
        image_id=tpl.image_id,
        state="building",
        created_at=instance.created_at,
        instance_dir=instance.instance_dir,
        kernel_id=tpl.kernel_id,
        ramdisk_id=tpl.ramdisk_id,
        network_mode=tpl.network_mode,
        mac_address=tpl.mac_address,
        key_name=tpl.key_name,
        vm_state=VMState.BUILDING,
        template_id=tpl.id,
        host=host,
        image_meta=tpl.image_meta,
    )


# -- after a crash -------------------------------------------------------------------


def disk_names(instance_uuid: str, formats: dict[str, str]) -> dict[str, str]:
    """{disk name: format} of an instance's disks ({path: format}, as
    ``instance_disks`` gives them): a file's name, or an RBD disk's ``<uuid>_<name>``
    without the uuid."""
    rbd = vmtemplate_rbd.disk_names(instance_uuid, formats)
    names = {name: formats[path] for name, path in rbd.items()}
    rbd_paths = set(rbd.values())
    names.update({Path(p).name: fmt for p, fmt in formats.items() if p not in rbd_paths})
    return names


def _half_made_pools(drv: LibvirtDriver, tpl: TemplateRecord) -> set[str]:
    source_formats = drv.recorded_disks(Path(tpl.source_dir), tpl.source_uuid) or {}
    return vmtemplate_rbd.template_pools(drv.conf, tpl.path, source_formats)


def remove_half_made(drv: LibvirtDriver, tpl: TemplateRecord) -> list[str]:
    """A template that was not finished, and what is left of its source instance and
    of its frozen RBD disks (``pool/name`` of those removed, returned)."""
    pools = _half_made_pools(drv, tpl)
    with contextlib.suppress(NotFound):
        drv.destroy(tpl.source_uuid)
    removed = vmtemplate_rbd.remove_frozen(drv.conf, tpl.id, pools)
    shutil.rmtree(tpl.path, ignore_errors=True)
    Templates(drv)._forget(tpl.id)
    return removed


def cleanup(drv: LibvirtDriver, *, dry_run: bool) -> tuple[list[str], list[str], list[str]]:
    """What a killed ``template create`` left: a template still ``creating`` whose lock
    is free, with its dir and what is left of its source instance (whose memory and
    disks were, or were becoming, the template's); and template dirs with no record.
    Returns (removed or would-be-removed template dirs, source instances destroyed,
    frozen RBD images removed as ``pool/name``). Killed clones are ordinary killed
    spawns: the instance pass reaps them."""
    templates = Templates(drv)
    locks = drv.conf.locks_dir
    dirs: list[str] = []
    sources: list[str] = []
    images: list[str] = []
    known = set()
    for tpl in templates.list():
        known.add(tpl.id)
        if tpl.status == "active" or lockutils.is_held(locks, template_lock_name(tpl.id)):
            continue
        dirs.append(tpl.template_dir)
        with contextlib.suppress(NotFound):
            drv.db.get_instance(tpl.source_uuid)
            sources.append(tpl.source_uuid)
        if dry_run:
            pools = _half_made_pools(drv, tpl)
            images.extend(vmtemplate_rbd.remove_frozen(drv.conf, tpl.id, pools, dry_run=True))
        else:
            images.extend(remove_half_made(drv, tpl))
    root = drv.conf.templates_path
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.name in known or lockutils.is_held(locks, template_lock_name(entry.name)):
                continue
            dirs.append(os.fspath(entry))
            if not dry_run:
                shutil.rmtree(entry, ignore_errors=True)
    # No sweep of tpl-* images without a record: a pool may serve other state dirs,
    # whose templates this one cannot tell from orphans. None is left without one:
    # the record comes before the first rename and goes after the last removal.
    return dirs, sources, images
