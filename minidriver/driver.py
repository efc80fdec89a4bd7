"""LibvirtDriver (nova/virt/libvirt/driver.py): spawn, destroy, snapshot.

``spawn`` is Nova's: ``get_disk_info``, ``create_image``, the console log, ``to_xml``,
define, the post-XML hook, launch, ``wait_for_running``. Everything a spawn creates
goes on an undo list; on any failure the list runs (domain, instance dir, DB record:
never the shared cache) and a typed error names the step that failed.

The driver keeps Nova's steps; the rest lives in rooms named after Nova's: the request's
checks in ``compute_api``, the disks (and their RBD side) in ``imagebackend``, the
domains (found by uuid) and the waits in ``host``, ``disk.info`` in ``disk_info_file``
(Nova keeps it in imagebackend). ``nova_map`` says where Nova does each step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt

from minidriver import (
    blockinfo,
    compute_api,
    configdrive,
    guest,
    imagebackend,
    objects,
    rbd_utils,
    vm_states,
)
from minidriver.backing import cache_local_or_swap
from minidriver.config import Config
from minidriver.db import Database, InstanceRecord, utc_now
from minidriver.disk_info_file import read_disk_info, write_disk_info
from minidriver.exception import ImageNotFound, MinidriverError
from minidriver.fileutils import PRIVATE_FILE, TRAVERSE_ONLY_DIR, write_private
from minidriver.host import Host
from minidriver.imagebackend import (
    DiskDetails,
    Flat,
    Image,
    Rbd,
    base_filename,
    get_ephemeral_fs,
    is_rbd_path,
    local_backend_class,
    parse_rbd_path,
)
from minidriver.images import fetch, qemu_img
from minidriver.images.store import Image as StoreImage
from minidriver.images.store import ImageService
from minidriver.keypairs import KeyPairStore
from minidriver.lockutils import external_lock, instance_lock_name
from minidriver.network import VIF, NetworkMode
from minidriver.objects import DiskInfo, Flavor, GiB, ImageMeta, Instance
from minidriver.ports import PortReservations
from minidriver.power import PowerOperations
from minidriver.steps import Step, StepListener, StepTimer
from minidriver.vif import launch_with_network, plug_vifs
from minidriver.vm_states import VMState

if TYPE_CHECKING:
    from minidriver import block_device, imagecache
    from minidriver.serial_console import SerialConsole
    from minidriver.volume.api import Attachment, VolumeAPI, VolumeRecord

LOG = logging.getLogger(__name__)

# Imported from here by the API's users (DiskDetails is what get_disks returns).
__all__ = [
    "DiskDetails",
    "InstanceBuildTimeout",
    "InstanceInfo",
    "LibvirtDriver",
    "SpawnError",
    "base_filename",
    "instance_lock_name",
]


class SpawnError(MinidriverError):
    """A spawn failed; ``step`` names where ("create_image", "define", ...)."""

    def __init__(self, step: str, cause: BaseException, instance: Instance | None) -> None:
        what = instance.display_name if instance else "instance"
        super().__init__(
            f"spawn of {what} failed at {step}: {cause}",
            hint=getattr(cause, "hint", None),
        )
        self.step = step
        self.cause = cause
        self.instance = instance


class InstanceBuildTimeout(SpawnError):
    """The domain did not report RUNNING before ``instance_build_timeout``."""


@dataclass(frozen=True)
class InstanceInfo:
    """Nova's ``hardware.InstanceInfo``: what libvirt says of a domain now."""

    state: str
    internal_id: int | None = None


DEFINE_ATTEMPTS = 5  # names taken by other state dirs in a row before giving up


def _connect_rbd(
    rbd: rbd_utils.RBDDriver,
    instance_uuid: str,
    session: contextlib.ExitStack,
    undo: contextlib.ExitStack,
) -> None:
    """The spawn's connection to the cluster, held for the whole ``session``: an
    unreachable cluster or a missing pool is one clear error before anything is made
    in it; the instance's RBD images go on the ``undo`` list."""
    session.enter_context(rbd.connected())
    rbd.check_pool()
    undo.callback(rbd_utils.cleanup_volumes_quietly, rbd, instance_uuid)


@contextlib.contextmanager
def loading_xml_template(cache_dir: Path) -> Iterator[None]:
    """The domain XML's templates loaded in a thread of its own while the block runs.

    Importing Jinja and loading the compiled template cost a warm boot ~15 ms
    (scripts/bench, peer scenario); create_image's qemu-img runs, waited for with the
    GIL released, hide them. A failure to load is left to to_xml, which meets and
    reports it.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xml-template") as loader:
        loader.submit(guest.load_templates, guest.DOMAIN_TEMPLATES, cache_dir=cache_dir)
        yield


class LibvirtDriver(PowerOperations):
    """Nova's ``LibvirtDriver`` for one host and one state dir.

    Its methods are Nova's steps (spawn and its parts, destroy, snapshot, get_info,
    get_disks; the power operations, suspend and resume from ``power``); what a step
    needs of the request, the disks or libvirt is asked of ``compute_api``,
    ``imagebackend`` and ``host``.

    Bigger than the ~400-line guide (about 850 lines), and so the module (about 1,050):
    spawn and its steps (``spawn``, ``_spawn``, ``_define``, ``create_image``,
    ``create_kernel_ramdisk``, ``to_xml``, ``wait_for_running`` and the small ones they
    call: some 530 lines with the boot from volume's) are Nova's driver methods and the
    backbone the design keeps readable top to bottom in one place; the other operations
    are each a few calls into the modules above (volumes: ``block_device``).
    """

    def __init__(
        self,
        conf: Config,
        *,
        host: Host | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conf = conf
        self.host = host or Host(conf)
        self.db = Database(conf.database_path, host=conf.default.host)
        self.images = ImageService(
            self.db,
            conf.images_path,
            size_cap=conf.default.image_size_cap,
            rbd=lambda: self.rbd_driver(conf.glance_store.rbd_store_pool),
            limits=qemu_img.resource_limits(
                conf.libvirt.images_cpu_time_limit, conf.libvirt.images_address_space_limit
            ),
        )
        self.keypairs = KeyPairStore(conf.keypairs_path)
        self.ports = PortReservations(
            conf.port_reservations_path,
            conf.libvirt.forward_port_min,
            conf.libvirt.forward_port_max,
        )
        self.clock = clock
        # What this driver's spawns made, by instance uuid: get_disks describes those
        # disks from it (and os.stat) instead of running qemu-img on each.
        self._spawned_disks: dict[str, dict[str, Callable[[], DiskDetails]]] = {}
        self._init_power_sync()

    @functools.cached_property
    def volumes(self) -> VolumeAPI:
        """The volume service (Cinder's role) of this state dir."""
        from minidriver.volume.api import VolumeAPI  # noqa: PLC0415 - boot does not need it (issue 17)

        return VolumeAPI(self.conf, self.db, self.images, self.host)

    @functools.cached_property
    def block_devices(self) -> block_device.BlockDeviceManager:
        from minidriver import block_device  # noqa: PLC0415 - boot does not need it (issue 17)

        return block_device.BlockDeviceManager(
            self.conf, self.db, self.host, self.volumes, clock=self.clock
        )

    def attach_volume(
        self, instance_ref: str, volume_ref: str, *, device: str | None = None
    ) -> Attachment:
        """Nova's ``attach_volume``: live when the guest runs, always in its definition."""
        return self.block_devices.attach_volume(instance_ref, volume_ref, device=device)

    def detach_volume(self, instance_ref: str, volume_ref: str) -> VolumeRecord:
        """Nova's ``detach_volume``: waits for the guest to release the disk."""
        return self.block_devices.detach_volume(instance_ref, volume_ref)

    def rbd_driver(self, pool: str | None = None) -> rbd_utils.RBDDriver:
        """A driver for ``pool`` (default ``images_rbd_pool``) of the configured cluster."""
        return imagebackend.rbd_driver(self.conf, pool)

    @property
    def uses_rbd(self) -> bool:
        return self.conf.libvirt.images_type == "rbd"

    # -- lookups --------------------------------------------------------------

    def get_flavor(self, name: str) -> Flavor:
        return compute_api.get_flavor(self.conf, name)

    def instance_dir(self, instance_uuid: str) -> Path:
        return self.conf.instances_path / instance_uuid

    # -- spawn ----------------------------------------------------------------

    def spawn(
        self,
        name: str,
        image: str,
        flavor: str,
        *,
        keep_on_timeout: bool = False,
        timeout: float | None = None,
        wait: bool = True,
        listener: StepListener | None = None,
        progress: fetch.Progress | None = None,
        config_drive: bool | None = None,
        hostname: str | None = None,
        user_data: bytes | None = None,
        public_keys: Mapping[str, str] | None = None,
        meta: Mapping[str, str] | None = None,
        network: str | None = None,
        key_name: str | None = None,
        boot_volume: str | None = None,
        volume_size: int | None = None,
        instance_uuid: str | None = None,
    ) -> Instance:
        """Boot ``image`` with ``flavor`` as a new instance displayed as ``name``.

        ``boot_volume`` (a volume made from an image; ``image`` is then that image,
        whatever is given) boots from that volume: Nova's boot from volume, the root
        on it, no ``disk`` and no fetch for the root. ``volume_size`` (GB) makes a
        volume from ``image`` first and boots from it (Nova's source=image,
        dest=volume); a failed boot deletes that volume again. ``instance_uuid``: the
        uuid to spawn under (an unshelve keeps its instance's); a new one by default.

        ``timeout`` (default ``instance_build_timeout``) bounds the whole spawn, from
        now until RUNNING; ``wait=False`` returns once the domain is started.
        ``config_drive`` (default ``force_config_drive``) adds ``disk.config`` with the
        hostname, user data, public keys and metadata; bad values fail here, before
        anything is written. ``network`` is ``MODE[:NAME]`` (default: ``[libvirt]
        network_mode``); ``key_name`` names a key pair whose public key goes on the
        config drive and which ``minidriver ssh`` logs in with.
        """
        timer = StepTimer(listener, clock=self.clock)
        budget = self.conf.default.instance_build_timeout if timeout is None else timeout
        deadline = self.clock() + budget
        with contextlib.ExitStack() as undo:
            root_volume = None
            if boot_volume is not None or volume_size is not None:
                root_volume = self.block_devices.root_volume(
                    boot_volume, volume_size, image=image, name=f"{name}-root", undo=undo
                )
            if root_volume is not None:
                image = self.block_devices.image_of_volume(root_volume, self.images)
            request = compute_api.build_request(
                self.conf,
                self.images,
                self.keypairs,
                self.db,
                name=name,
                image=image,
                flavor=flavor,
                config_drive=config_drive,
                hostname=hostname,
                user_data=user_data,
                public_keys=public_keys,
                meta=meta,
                network=network,
                key_name=key_name,
                boot_from_volume=root_volume is not None,
                instance_uuid=instance_uuid,
            )
            instance = self._spawn_instance(
                request,
                timer=timer,
                budget=budget,
                deadline=deadline if wait else None,
                keep_on_timeout=keep_on_timeout,
                progress=progress,
                key_name=key_name,
                root_volume=root_volume,
            )
            undo.pop_all()
        return instance

    def _spawn_instance(
        self,
        request: compute_api.BuildRequest,
        *,
        timer: StepTimer,
        budget: float,
        deadline: float | None,
        keep_on_timeout: bool,
        progress: fetch.Progress | None,
        key_name: str | None,
        root_volume: VolumeRecord | None,
    ) -> Instance:
        """The instance of a checked request, built under its lock: ``_spawn``."""
        self.host.check_instances_path()
        instance = Instance(
            uuid=request.uuid,
            name=self._next_domain_name(),
            display_name=request.display_name,
            flavor=request.flavor,
            image_ref=request.image.id,
            virt_type=self.host.virt_type.virt_type,
            created_at=utc_now(),
            kernel_id=request.kernel.id if request.kernel else "",
            ramdisk_id=request.ramdisk.id if request.ramdisk else "",
        )
        instance.instance_dir = os.fspath(self.instance_dir(instance.uuid))
        # Held for the whole spawn: `cleanup` leaves an instance alone while it is built.
        with external_lock(self.conf.locks_dir, instance_lock_name(instance.uuid)):
            try:
                domain = self._spawn(
                    instance,
                    request,
                    timer,
                    deadline=deadline,
                    keep_on_timeout=keep_on_timeout,
                    progress=progress,
                    key_name=key_name,
                    root_volume=root_volume,
                )
            except InstanceBuildTimeout as exc:
                # Said against the whole spawn's budget, which is what the caller gave.
                raise InstanceBuildTimeout(
                    "wait_for_running",
                    TimeoutError(f"not RUNNING within {budget:g} s of the spawn's start"),
                    instance,
                ) from exc
            # Before the lock goes: to `cleanup`, "building" with a free lock is a
            # spawn that died, and it reaps that instance.
            instance.state = self.host.domain_state(domain)
            self.db.update_instance(instance.uuid, state=instance.state, vm_state=VMState.ACTIVE)
        instance.timings = timer.as_dict()
        return instance

    def _spawn(
        self,
        instance: Instance,
        request: compute_api.BuildRequest,
        timer: StepTimer,
        *,
        deadline: float | None,
        keep_on_timeout: bool,
        progress: fetch.Progress | None,
        key_name: str | None = None,
        root_volume: VolumeRecord | None = None,
    ) -> libvirt.virDomain:
        """Nova's spawn, step by step. Everything it creates goes on an undo list, our
        choice (Nova removes the instance dir and disks a failed spawn created, in
        ``_create_guest_with_network``'s cleanup).

        With ``images_type = rbd`` one connection to the cluster serves the whole
        spawn; it outlives the undo list, which may need it to remove the root disk.
        """
        rbd = self.rbd_driver() if self.uses_rbd else None
        image_meta, vif, config_drive = request.image_meta, request.vif, request.config_drive
        instance_dir = Path(instance.instance_dir)
        with contextlib.ExitStack() as session, contextlib.ExitStack() as undo:
            step = "record"
            try:
                self.db.create_instance(
                    _record(
                        instance,
                        vif,
                        key_name,
                        self.conf.default.host,
                        config_drive=config_drive is not None,
                        image_meta=image_meta,
                    )
                )
                undo.callback(self.db.delete_instance, instance.uuid)

                if vif is not None and vif.mode is NetworkMode.USER:
                    step = "allocate_network"
                    vif = self._reserve_forward_port(instance.uuid, vif, undo)

                step = "get_disk_info"
                disk_info = self.get_disk_info(
                    instance,
                    image_meta,
                    config_drive=config_drive is not None,
                    root_volume=root_volume,
                )
                step = "attach_root_volume"
                volumes = self._claim_root_volume(
                    instance.uuid, root_volume, disk_info, session, undo
                )
                step = "create_image"
                undo.callback(shutil.rmtree, instance.instance_dir, ignore_errors=True)
                if rbd is not None:
                    _connect_rbd(rbd, instance.uuid, session, undo)
                with loading_xml_template(self.conf.template_cache_path):
                    disks = self.create_image(
                        instance, disk_info, request.image, timer=timer, progress=progress, rbd=rbd
                    )
                # console.log, ours, in the instance dir create_image made.
                (instance_dir / "console.log").touch(mode=PRIVATE_FILE)

                plug_vifs(self.host, vif, timer)  # its failure names its own step

                step = "define"
                with timer.step(Step.DEFINE):
                    domain = self._define(
                        instance,
                        image_meta,
                        disk_info,
                        disk_formats(disks, disk_info) | dict.fromkeys(volumes, "raw"),
                        vif=vif,
                        network_disks={
                            n: d.libvirt_info() for n, d in disks.items() if isinstance(d, Rbd)
                        },
                        volumes=volumes,
                    )
                undo.callback(self._undefine, instance.uuid)

                # Nova's post-XML callback: the config drive is made once the domain
                # that names it is defined, before it starts.
                if config_drive is not None:
                    step = "config_drive"
                    with timer.step(Step.CONFIG_DRIVE):
                        self._create_configdrive(instance_dir, config_drive, disks)

                # Paused while it waits for its VIF, when one is expected (vif.py).
                step = "start"
                launch_with_network(self.host, domain, vif, self.conf, timer)

                step = "wait_for_running"
                if deadline is not None:
                    with timer.step(Step.WAIT):
                        remaining = max(0.0, deadline - self.clock())
                        self.wait_for_running(instance, domain, remaining)
            except InstanceBuildTimeout:
                if keep_on_timeout:
                    undo.pop_all()
                    # Kept for debugging: no longer "building", so cleanup leaves it.
                    self.db.update_instance(instance.uuid, state="error", vm_state=VMState.ERROR)
                raise
            except Exception as exc:
                raise SpawnError(getattr(exc, "step", step), exc, instance) from exc
            undo.pop_all()
        self._spawned_disks[instance.uuid] = spawned_disks(disks, disk_info, instance_dir)
        return domain

    def _claim_root_volume(
        self,
        instance_uuid: str,
        root_volume: VolumeRecord | None,
        disk_info: DiskInfo,
        session: contextlib.ExitStack,
        undo: contextlib.ExitStack,
    ) -> dict[str, guest.GuestVolume]:
        """The root volume claimed for the spawn (``BlockDeviceManager``); none, and
        the volume code not even imported, when the root is an image's disk."""
        if root_volume is None:
            return {}
        return self.block_devices.claim_root_volume(
            instance_uuid, root_volume, disk_info, session, undo
        )

    def _create_configdrive(
        self, instance_dir: Path, data: configdrive.ConfigDriveData, disks: Mapping[str, Image]
    ) -> None:
        """Nova's ``_create_configdrive``: built as ``disk.config`` in the instance dir;
        with an RBD config disk, imported as ``<uuid>_disk.config`` and the local file
        removed whether or not the import worked, as Nova does."""
        local = instance_dir / "disk.config"
        configdrive.make_drive(local, data, self.conf.default.config_drive_format)
        config_disk = disks.get("disk.config")
        if isinstance(config_disk, Rbd):
            try:
                config_disk.import_file(local)
            finally:
                local.unlink(missing_ok=True)

    def get_disk_info(
        self,
        instance: Instance,
        image_meta: ImageMeta,
        *,
        config_drive: bool,
        root_volume: VolumeRecord | None,
    ) -> DiskInfo:
        """blockinfo's ``get_disk_info`` with Nova's ``block_device_info``: the root
        volume (boot index 0) when the instance boots from one."""
        bdms = []
        if root_volume is not None:
            bdms.append(objects.DriverVolumeBlockDevice(root_volume.id, None, boot_index=0))
        return blockinfo.get_disk_info(
            instance.virt_type,
            instance.flavor,
            image_meta,
            machine_type=image_meta.machine_type(self.conf.libvirt.hw_machine_type),
            config_drive_format=self.conf.default.config_drive_format if config_drive else None,
            block_device_info=objects.BlockDeviceInfo(block_device_mapping=tuple(bdms)),
        )

    def _reserve_forward_port(
        self, instance_uuid: str, vif: VIF, undo: contextlib.ExitStack
    ) -> VIF:
        """User mode: a host port for the guest's SSH, recorded; the undo list frees it."""
        port = self.ports.reserve(
            state_path=self.conf.state_path,
            state_id=self.db.state_id,
            instance_uuid=instance_uuid,
        )
        undo.callback(self.ports.release, port, instance_uuid)
        self.db.update_instance(instance_uuid, forward_port=port)
        return dataclasses.replace(vif, forward_port=port)

    def _define(
        self,
        instance: Instance,
        image_meta: ImageMeta,
        disk_info: DiskInfo,
        formats: dict[str, str],
        *,
        vif: VIF | None,
        network_disks: Mapping[str, guest.NetworkSource],
        volumes: Mapping[str, guest.GuestVolume] | None = None,
    ) -> libvirt.virDomain:
        """to_xml, write libvirt.xml (ours: Nova stopped writing it in 15.0.0), define.
        Another state dir on the same daemon may take the chosen name between our
        check and our define (each counts its own names): on that collision alone the
        next free name is taken and the XML made again. Any other refusal is raised as
        it is."""
        collision = None
        for _attempt in range(DEFINE_ATTEMPTS):
            xml = self.to_xml(
                instance,
                image_meta,
                disk_info,
                formats,
                vif=vif,
                network_disks=network_disks,
                volumes=volumes,
            )
            write_private(Path(instance.instance_dir) / "libvirt.xml", xml)
            try:
                return self.host.define(xml)
            except libvirt.libvirtError as exc:
                if not self.host.is_name_collision(exc, instance.name, instance.uuid):
                    raise
                collision = exc
                LOG.debug("domain name %s was just taken; choosing another", instance.name)
                instance.name = self._next_domain_name()
                self.db.update_instance(instance.uuid, name=instance.name)
        raise MinidriverError(
            f"no free domain name after {DEFINE_ATTEMPTS} attempts: {collision}",
            hint="other state dirs on this libvirt are taking the free names; try again",
        ) from collision

    def _next_domain_name(self) -> str:
        """``instance_name_template`` over the DB's sequence, skipping names in use.

        Two state dirs may share one libvirt daemon: a name another one holds is skipped.
        """
        while True:
            name = self.conf.default.instance_name_template % self.db.next_sequence("instance")
            if self.host.find_domain(name) is None:
                return name

    def create_image(
        self,
        instance: Instance,
        disk_info: DiskInfo,
        image: StoreImage,
        *,
        timer: StepTimer,
        progress: fetch.Progress | None = None,
        rbd: rbd_utils.RBDDriver | None = None,
    ) -> dict[str, Image]:
        """Nova's ``_create_image``: the instance dir, the kernel and ramdisk of a kernel
        image, the root, ephemeral and swap disks, and ``disk.info``.

        With ``rbd`` (``images_type = rbd``) every disk is an RBD image in its pool and
        the instance dir holds none, nor a ``disk.info`` (Nova's ``Rbd`` writes none:
        ``instance_disks`` finds them by name). Returns the disks by disk_info name; an
        RBD config drive is among them, named for the XML, and made after define (see
        _spawn).
        """
        instance_dir = Path(instance.instance_dir)
        instance_dir.mkdir(parents=True)
        instance_dir.chmod(TRAVERSE_ONLY_DIR)  # its files are private (see fileutils)
        if instance.kernel_id:
            self.create_kernel_ramdisk(instance, timer=timer, progress=progress)
        backend = local_backend_class(self.conf)
        flavor = instance.flavor

        def disk(name: str) -> Image:
            if rbd is not None:
                return Rbd(
                    self.conf, timer, driver=rbd, instance_uuid=instance.uuid, disk_name=name
                )
            return backend(self.conf, instance_dir / name, timer)

        disks: dict[str, Image] = {}
        others: list[Callable[[], bool]] = []
        fs_type = get_ephemeral_fs(
            image.properties.get("os_type", ""), self.conf.default.default_ephemeral_format
        )
        for name in ("disk.local", "disk.swap"):
            if name in disk_info:
                disks[name] = disk(name)
                others.append(
                    partial(cache_local_or_swap, disks[name], name, flavor, fs_type=fs_type)
                )
        if rbd is not None and "disk.config" in disk_info:
            disks["disk.config"] = disk("disk.config")
        # The ephemeral and swap disks are made beside the root's own disk, each under
        # its base's lock: three qemu-img runs at once instead of one after another (a
        # warm t1.nano spawn: ~30 ms sooner on a loaded host). They start once the
        # root's base passed its checks, so a refused image makes nothing else; every
        # one has ended, made or failed, before this returns, so the undo list never
        # races a worker. Files only: an RBD disk would share the spawn's RBDDriver,
        # which serves one thread.
        beside = rbd is None
        futures: list[Future[bool]] = []
        with ThreadPoolExecutor(max_workers=max(1, len(others))) as pool:

            def start_others() -> None:
                if beside and not futures:
                    futures.extend(pool.submit(make) for make in others)

            # Booted from a volume (Nova's _is_booted_from_volume): no root disk, no fetch.
            if "disk" in disk_info:
                root: Image = disk("disk")
                if rbd is not None:
                    clone = imagebackend.clone_location(rbd, image)
                    root = Rbd(
                        self.conf,
                        timer,
                        driver=rbd,
                        instance_uuid=instance.uuid,
                        clone_location=clone,
                    )
                instance.cache_hit = imagebackend.cache_image(
                    root,
                    self.conf,
                    image,
                    flavor.root_gb * GiB if flavor.root_gb else None,
                    open_data=self.images.open_data,
                    # RBD holds raw data only: its base is raw whatever force_raw_images says.
                    force_raw=self.conf.default.force_raw_images or rbd is not None,
                    progress=progress,
                    base_ready=start_others,
                )
                disks = {"disk": root, **disks}
            start_others()  # an RBD clone or a root volume has no base: the others start now
            for future in futures:
                future.result()
        if not beside:
            for make in others:
                make()
        # The file disks only, as Nova's disk.info: an all-RBD instance has none.
        files = {
            name: fmt
            for name, fmt in disk_formats(disks, disk_info).items()
            if name not in disks or disks[name].is_file_in_instance_path
        }
        if files:
            write_disk_info(instance_dir, files)
        return disks

    def create_kernel_ramdisk(
        self, instance: Instance, *, timer: StepTimer, progress: fetch.Progress | None = None
    ) -> None:
        """Nova's ``_create_image`` for a kernel image: the kernel and ramdisk are
        fetched into ``_base`` like any image and copied into the instance dir as
        ``kernel`` and ``ramdisk``, the files ``<os>`` names."""
        instance_dir = Path(instance.instance_dir)
        for name, ref in (("kernel", instance.kernel_id), ("ramdisk", instance.ramdisk_id)):
            if not ref:
                continue
            image = self.images.get(ref)
            # Timed as a whole as this step, not as the root disk's fetch.
            fetch_func = partial(
                fetch.fetch_to_raw, image, force_raw=False, timer=StepTimer(), progress=progress
            )
            Flat(self.conf, instance_dir / name, timer).cache(
                fetch_func,
                base_filename(image.id),
                None,
                Step.KERNEL_RAMDISK,
                base_format=image.disk_format,
            )

    def to_xml(
        self,
        instance: Instance,
        image_meta: ImageMeta,
        disk_info: DiskInfo,
        formats: dict[str, str],
        *,
        vif: VIF | None = None,
        network_disks: Mapping[str, guest.NetworkSource] | None = None,
        volumes: Mapping[str, guest.GuestVolume] | None = None,
        file_paths: Mapping[str, str] | None = None,
    ) -> str:
        config = guest.get_guest_config(
            instance,
            disk_info,
            formats,
            instance_dir=Path(instance.instance_dir),
            machine_type=image_meta.machine_type(self.conf.libvirt.hw_machine_type),
            cpu_mode=self.conf.libvirt.cpu_mode,
            sysinfo_serial=self.conf.libvirt.sysinfo_serial,
            state_id=self.db.state_id,
            os_command_line=image_meta.os_command_line,
            vif=vif,
            network_disks=network_disks,
            image_properties=image_meta.properties,
            agent_socket_dir=self.host.agent_socket_dir(create=True),
            volumes=volumes,
            file_paths=file_paths,
        )
        return guest.to_xml(config, cache_dir=self.conf.template_cache_path)

    def wait_for_running(
        self, instance: Instance, domain: libvirt.virDomain, timeout: float | None = None
    ) -> None:
        """Nova's ``_wait_for_boot``: a fixed-interval loop, here with a deadline.

        A lifecycle event wakes the loop early; the interval bounds every wait.
        """
        if timeout is None:
            timeout = self.conf.default.instance_build_timeout
        state = self.host.wait_for_state(
            domain,
            "running",
            timeout,
            interval=self.conf.libvirt.wait_interval,
            clock=self.clock,
            stop_on=("shutoff", "crashed"),
        )
        if state in ("shutoff", "crashed"):
            raise MinidriverError(f"domain {instance.name} stopped while booting")
        if state != "running":
            raise InstanceBuildTimeout(
                "wait_for_running",
                TimeoutError(f"not RUNNING within {timeout:g} s (state {state})"),
                instance,
            )

    # -- other operations -----------------------------------------------------

    def owned_domains(self) -> dict[str, libvirt.virDomain]:
        """Every domain this state dir defined, by instance uuid (from its metadata)."""
        return self.host.owned_domains(self.db.state_id)

    def _undefine(self, instance_uuid: str) -> None:
        domain = self.host.owned_domain(instance_uuid, self.db.state_id)
        if domain is not None:
            self.host.undefine(domain)

    def recorded_disks(self, instance_dir: Path, instance_uuid: str) -> dict[str, str] | None:
        """{path: format} as recorded: the instance's ``disk.info`` (its file disks),
        or when that is missing or cannot be read (an all-RBD instance has none), the
        disks its domain's XML lists, volumes aside (libvirt's word); None when there
        is neither. Asks Ceph nothing."""
        disks = read_disk_info(instance_dir)
        if disks is None:
            domain = self.host.get_domain(instance_uuid)
            if domain is not None:
                disks = guest.get_all_disks(domain.XMLDesc(0), volumes=False)
        return disks

    def instance_disks(self, instance_dir: Path, instance_uuid: str) -> dict[str, str] | None:
        """{path: format} of an instance's disks, ``rbd:pool/name`` for an RBD disk:
        the recorded ones, and its RBD disks as Nova finds them, the ``<uuid>_*``
        images of the pool (one listing; a recorded RBD disk the pool lacks stays, for
        a hard reboot to make again or refuse). None when there is nothing of either."""
        recorded = self.recorded_disks(instance_dir, instance_uuid)
        found = imagebackend.find_rbd_disks(self.conf, instance_uuid, recorded)
        if recorded is None and not found:
            return None
        return {**(recorded or {}), **found}

    def destroy(self, instance_uuid: str, *, delete_volume: bool = False) -> None:
        """Stop and undefine the domain, remove the instance dir, free its forwarded port,
        forget its SSH host key, remove its record. Its volumes are kept, available
        again; ``delete_volume`` (Nova's ``delete_on_termination``) deletes its root
        volume too.

        Whatever of it exists is removed; what is already gone is no error. The image
        cache stays. The domain is the one with the instance's uuid, whatever its name.
        """
        with external_lock(self.conf.locks_dir, instance_lock_name(instance_uuid)):
            # Read under the lock: a `cleanup` or another delete may have removed the
            # instance while we waited for it.
            record = self.db.get_instance(instance_uuid)
            instance_dir = Path(record.instance_dir or self.instance_dir(record.uuid))
            # Asked while the domain is there: its XML stands in for a missing disk.info.
            disks = self.recorded_disks(instance_dir, record.uuid)
            self._undefine(record.uuid)
            # Before the instance dir, whose old-style disk.info may name another pool.
            # An unreachable cluster stops here, with the record kept for another try.
            imagebackend.cleanup_rbd(self.conf, record.uuid, disks)
            shutil.rmtree(instance_dir, ignore_errors=True)
            # A resize's old dir and a shelve's image (issue 22) go with it.
            shutil.rmtree(f"{instance_dir}_resize", ignore_errors=True)
            if record.shelved_image_id:
                with contextlib.suppress(ImageNotFound):
                    self.images.delete(record.shelved_image_id)
            # Its volumes outlive it, available again, unless the root goes with it.
            attachments = self.block_devices.forget_instance(record.uuid)
            if record.forward_port is not None:
                self.ports.release(record.forward_port, record.uuid)
            from minidriver import ssh  # noqa: PLC0415 - boot does not need it (issue 17)

            ssh.forget_host_key(self.conf.known_hosts_path, record.uuid, self.conf.locks_dir)
            self.db.delete_instance(record.uuid)
            self._spawned_disks.pop(record.uuid, None)
            # Last: a volume that cannot be removed now is a volume in error, which
            # `volume delete` retries; the instance is gone either way.
            for attachment in attachments:
                if attachment.boot_index == 0 and (
                    delete_volume or attachment.delete_on_termination
                ):
                    self.volumes.delete(attachment.volume_id)

    def get_info(self, instance_uuid: str) -> InstanceInfo:
        record = self.db.get_instance(instance_uuid)
        domain = self.host.get_domain(record.uuid)
        if domain is None:
            return InstanceInfo(state="nostate")
        internal = domain.ID()
        return InstanceInfo(
            state=self.host.domain_state(domain), internal_id=internal if internal >= 0 else None
        )

    def get_disks(self, instance_uuid: str) -> dict[str, DiskDetails]:
        """Every disk of the instance, keyed by its disk_info name.

        The disks a spawn of this driver made are described from what it made and
        ``os.stat``, with no qemu-img; any other instance's are read from qemu-img (a
        file) or librbd (an RBD disk)."""
        made = self._spawned_disks.get(instance_uuid)
        if made is not None:
            return {name: describe() for name, describe in made.items()}
        record = self.db.get_instance(instance_uuid)
        recorded = self.instance_disks(Path(record.instance_dir), record.uuid) or {}
        disks = {}
        for path, fmt in recorded.items():
            if is_rbd_path(path):
                pool, name = parse_rbd_path(path)
                details = imagebackend.rbd_disk_details(self.rbd_driver(pool), name)
                disks[name.removeprefix(f"{record.uuid}_")] = details
            else:
                disks[Path(path).name] = imagebackend.disk_details(path, fmt)
        return disks

    # -- power ----------------------------------------------------------------

    def _domain_of(self, instance_uuid: str) -> libvirt.virDomain:
        from minidriver import block_device  # noqa: PLC0415 - boot does not need it (issue 17)

        return block_device.require_domain(
            self.host, self.db.get_instance(instance_uuid), self.db.state_id
        )

    def open_serial_console(self, instance_uuid: str, *, force: bool = False) -> SerialConsole:
        """The running instance's serial console, open for reading and writing
        (``serial_console.py``); ``force`` takes it from another client."""
        from minidriver.serial_console import SerialConsole  # noqa: PLC0415 - not for a boot

        return SerialConsole.open(self._domain_of(instance_uuid), force=force, clock=self.clock)

    # -- snapshots ------------------------------------------------------------

    def snapshot(self, instance_uuid: str, name: str) -> StoreImage:
        """Nova's ``snapshot``: the root disk as a new, bootable image in the store (an
        RBD root disk by Nova's direct snapshot)."""
        from minidriver import snapshot  # noqa: PLC0415 - boot does not need it (issue 17)

        record = self.db.get_instance(instance_uuid)
        domain = self._domain_of(instance_uuid)
        instance_dir = Path(record.instance_dir)
        disks = self.instance_disks(instance_dir, record.uuid) or {}
        try:
            parent = self.images.get(record.image_id)
        except ImageNotFound:
            parent = None  # deleted since the boot: the snapshot stands alone anyway
        root_name = f"{record.uuid}_disk"
        rbd_root = next(
            (p for p in disks if is_rbd_path(p) and parse_rbd_path(p)[1] == root_name), None
        )
        if rbd_root is not None:
            rbd = self.rbd_driver(parse_rbd_path(rbd_root)[0])
            root = Rbd(self.conf, StepTimer(), driver=rbd, instance_uuid=record.uuid)
            return snapshot.direct(
                self.images,
                root,
                self.conf.instances_path,
                name=name,
                record=record,
                parent=parent,
            )
        disk = instance_dir / "disk"
        disk_format = disks.get(os.fspath(disk))
        if any(a.boot_index == 0 for a in self.volumes.attachments_of(record.uuid)):
            raise MinidriverError(
                f"instance {record.display_name} boots from a volume: its root is no image"
                " backend disk, and snapshots of volumes are not built yet",
                hint="make an image of the volume's image instead, or boot from an image",
            )
        if disk_format is None:
            raise MinidriverError(f"instance {record.display_name} records no root disk {disk}")
        return snapshot.to_image(
            self.images,
            domain,
            disk,
            disk_format,
            self.conf.instances_path,
            name=name,
            record=record,
            parent=parent,
            clock=self.clock,
        )

    # -- image cache ----------------------------------------------------------

    def image_cache_manager(self) -> imagecache.ImageCacheManager:
        from minidriver import imagecache  # noqa: PLC0415 - boot does not need it (issue 17)

        return imagecache.ImageCacheManager(
            self.conf.base_dir,
            self.conf.locks_dir,
            self.conf.instances_path,
            self.conf.image_cache,
            trusted=fetch.TrustedBases(self.conf.trusted_bases_path),
        )

    def bases_in_use(self) -> dict[str, set[str]]:
        """What is in use, as Nova's cache manager counts it (``_list_backing_images``
        and the images of ``_list_running_instances``): every instance disk's backing
        chain on this host, plus the base of every instance recorded in the state DB."""
        from minidriver import imagecache  # noqa: PLC0415 - boot does not need it (issue 17)

        return imagecache.merge(
            imagecache.backing_files_in_use(self.conf.instances_path, self.conf.base_dir),
            imagecache.instances_in_use(self.db.list_instances(), base_filename),
            # A template's dir is laid out as an instance dir: its frozen disks back
            # onto _base like the disks they were.
            imagecache.backing_files_in_use(self.conf.templates_path, self.conf.base_dir),
        )

    def list_instances(self) -> list[InstanceRecord]:
        """This state dir's instances on this host, with the state libvirt reports now."""
        out = []
        for record in self.db.list_instances():
            if not record.runs_on(self.conf.default.host):
                continue
            domain = self.host.get_domain(record.uuid)
            state = self.host.domain_state(domain) if domain else "nostate"
            vm_state = vm_states.synced(record.vm_state, state)
            out.append(InstanceRecord(**{**record.__dict__, "state": state, "vm_state": vm_state}))
        return out


def disk_formats(disks: Mapping[str, Image], disk_info: DiskInfo) -> dict[str, str]:
    """Each disk's driver format, by disk_info name, as ``disk.info`` records them."""
    formats = {name: disk.driver_format for name, disk in disks.items()}
    if "disk.config" in disk_info:
        formats["disk.config"] = "raw"  # made after define (see _spawn)
    return formats


def spawned_disks(
    disks: Mapping[str, Image], disk_info: DiskInfo, instance_dir: Path
) -> dict[str, Callable[[], DiskDetails]]:
    """How ``get_disks`` describes the disks a spawn made, by disk_info name."""
    made: dict[str, Callable[[], DiskDetails]] = {n: d.details for n, d in disks.items()}
    if "disk.config" in disk_info and "disk.config" not in made:
        made["disk.config"] = partial(imagebackend.file_details, instance_dir / "disk.config")
    return made


def _record(
    instance: Instance,
    vif: VIF | None,
    key_name: str | None,
    host: str,
    *,
    config_drive: bool = False,
    image_meta: ImageMeta | None = None,
) -> InstanceRecord:
    return InstanceRecord(
        uuid=instance.uuid,
        name=instance.name,
        display_name=instance.display_name,
        flavor=instance.flavor.name,
        image_id=instance.image_ref,
        state=instance.state,
        created_at=instance.created_at,
        instance_dir=instance.instance_dir,
        kernel_id=instance.kernel_id,
        ramdisk_id=instance.ramdisk_id,
        network_mode=str(vif.mode) if vif else str(NetworkMode.NONE),
        network_source=vif.source if vif else "",
        mac_address=vif.mac_address if vif else None,
        key_name=key_name,
        config_drive=int(config_drive),
        host=host,
        image_meta=image_meta.to_json() if image_meta else "",
    )
