"""LibvirtDriver: spawn, destroy, get_info, list_instances, in Nova's step order.

``spawn`` is Nova's: ``get_disk_info``, ``create_image``, the console log, ``to_xml``,
define, the post-XML hook, launch, ``wait_for_running``. Everything a spawn creates
goes on an undo list; on any failure the list runs (domain, instance dir, DB record:
never the shared cache) and a typed error names the step that failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import unicodedata
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import libvirt

from minidriver import (
    blockinfo,
    configdrive,
    guest,
    imagebackend,
    imagecache,
    rbd_utils,
    snapshot,
    ssh,
)
from minidriver.config import Config
from minidriver.db import Database, InstanceRecord, utc_now
from minidriver.exception import (
    FlavorNotFound,
    ImageNotFound,
    ImageUnacceptable,
    MinidriverError,
)
from minidriver.host import Host
from minidriver.imagebackend import (
    Flat,
    FlavorDiskSmallerThanImage,
    Image,
    Rbd,
    create_ephemeral,
    create_swap,
    local_backend_class,
)
from minidriver.images import fetch, qemu_img
from minidriver.images.inspect import UNINSPECTED
from minidriver.images.store import Image as StoreImage
from minidriver.images.store import ImageService
from minidriver.keypairs import KeyPairStore
from minidriver.lockutils import external_lock
from minidriver.network import (
    VIF,
    NetworkMode,
    NetworkRequest,
    generate_mac_address,
    get_network_metadata,
)
from minidriver.objects import DiskInfo, Flavor, GiB, ImageMeta, Instance
from minidriver.ports import PortReservations
from minidriver.steps import Step, StepListener, StepTimer

LOG = logging.getLogger(__name__)

# Nova's default ephemeral filesystem for Linux guests, and its label.
EPHEMERAL_FS = "ext4"
EPHEMERAL_LABEL = "ephemeral0"


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
class DiskDetails:
    """One disk of an instance as it is on disk now (``show``, ``boot --json``)."""

    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None
    backing_format: str | None = None
    backing_virtual_size: int | None = None


@dataclass(frozen=True)
class InstanceInfo:
    """Nova's ``hardware.InstanceInfo``: what libvirt says of a domain now."""

    state: str
    internal_id: int | None = None


def base_filename(image_id: str) -> str:
    """Nova names a cached base after the sha1 of the image id (not a security hash)."""
    return hashlib.sha1(image_id.encode(), usedforsecurity=False).hexdigest()


MAX_DISPLAY_NAME = 255  # Nova's limit
DEFINE_ATTEMPTS = 5  # names taken by other state dirs in a row before giving up


def validate_display_name(name: str) -> None:
    """Any text goes into the domain XML escaped; control characters (NUL, newlines...)
    cannot be XML at all, so they are refused here, before anything is written."""
    if not name or len(name) > MAX_DISPLAY_NAME:
        raise MinidriverError(
            f"the display name must be 1 to {MAX_DISPLAY_NAME} characters long",
            hint="choose a shorter --name",
        )
    bad = sorted({f"U+{ord(c):04X}" for c in name if unicodedata.category(c) == "Cc"})
    if bad:
        raise MinidriverError(
            f"the display name {name!r} has control characters ({', '.join(bad)})",
            hint="use printable characters only",
        )


def instance_lock_name(instance_uuid: str) -> str:
    return f"instance-{instance_uuid}"


def ephemeral_filename(size_gb: int, fs_type: str = EPHEMERAL_FS) -> str:
    """Nova's name: ``ephemeral_<GB>_<first 7 hex of md5(fs type)>``."""
    tag = hashlib.md5(fs_type.encode(), usedforsecurity=False).hexdigest()[:7]
    return f"ephemeral_{size_gb}_{tag}"


def swap_filename(size_mb: int) -> str:
    return f"swap_{size_mb}"


class LibvirtDriver:
    def __init__(
        self,
        conf: Config,
        *,
        host: Host | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conf = conf
        self.host = host or Host(conf)
        self.db = Database(conf.database_path)
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

    def rbd_driver(self, pool: str | None = None) -> rbd_utils.RBDDriver:
        """A driver for ``pool`` (default ``images_rbd_pool``) of the configured
        cluster; a new one per use, as a driver is not shared between threads."""
        opts = self.conf.libvirt
        return rbd_utils.RBDDriver(
            pool or opts.images_rbd_pool,
            opts.images_rbd_ceph_conf,
            opts.rbd_user,
            opts.rbd_connect_timeout,
        )

    @property
    def uses_rbd(self) -> bool:
        return self.conf.libvirt.images_type == "rbd"

    # -- lookups --------------------------------------------------------------

    def get_flavor(self, name: str) -> Flavor:
        try:
            return self.conf.flavors[name]
        except KeyError:
            raise FlavorNotFound(
                f"no flavor named {name!r}",
                hint=f"flavors: {', '.join(sorted(self.conf.flavors))}",
            ) from None

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
    ) -> Instance:
        """Boot ``image`` with ``flavor`` as a new instance displayed as ``name``.

        ``timeout`` (default ``instance_build_timeout``) bounds the whole spawn, from
        now until RUNNING; ``wait=False`` returns once the domain is started.
        ``config_drive`` (default ``force_config_drive``) adds ``disk.config`` with the
        hostname, user data, public keys and metadata; bad values fail here, before
        anything is written. ``network`` is ``MODE[:NAME]`` (default: ``[libvirt]
        network_mode``); ``key_name`` names a key pair whose public key goes on the
        config drive and which ``minidriver ssh`` logs in with.
        """
        validate_display_name(name)
        timer = StepTimer(listener, clock=self.clock)
        budget = self.conf.default.instance_build_timeout if timeout is None else timeout
        deadline = self.clock() + budget
        flavor_obj = self.get_flavor(flavor)
        store_image = self.images.get(image)
        image_meta = store_image.to_image_meta()
        check_flavor_fits(flavor_obj, image_meta, self.conf.libvirt.images_max_virtual_size)
        kernel, ramdisk = self.kernel_images(image_meta)
        instance_uuid = str(uuidlib.uuid4())
        request = NetworkRequest.parse(network, self.conf.libvirt)
        vif = None
        if request.mode is not NetworkMode.NONE:
            taken = {r.mac_address for r in self.db.list_instances() if r.mac_address}
            vif = VIF(request.mode, generate_mac_address(taken), request.source)
        keys = dict(public_keys or {})
        if key_name is not None:
            keys[key_name] = self.keypairs.get(key_name).public_key
        drive = None
        if config_drive or (config_drive is None and self.conf.default.force_config_drive):
            drive = configdrive.ConfigDriveData(
                uuid=instance_uuid,
                name=name,
                hostname=hostname or configdrive.hostname_from_display_name(name),
                user_data=user_data,
                public_keys=keys,
                meta=meta or {},
                network_data=get_network_metadata(vif),
            )
        elif hostname or user_data or keys or meta:
            raise MinidriverError(
                "hostname, user data, keys and metadata reach the guest on a config drive",
                hint="add --config-drive (or set force_config_drive = true)",
            )
        self.host.check_instances_path()
        instance = Instance(
            uuid=instance_uuid,
            name=self._next_domain_name(),
            display_name=name,
            flavor=flavor_obj,
            image_ref=store_image.id,
            virt_type=self.host.virt_type.virt_type,
            created_at=utc_now(),
            kernel_id=kernel.id if kernel else "",
            ramdisk_id=ramdisk.id if ramdisk else "",
        )
        instance.instance_dir = os.fspath(self.instance_dir(instance.uuid))
        # Held for the whole spawn: `cleanup` leaves an instance alone while it is built.
        with external_lock(self.conf.locks_dir, instance_lock_name(instance.uuid)):
            try:
                domain = self._spawn(
                    instance,
                    store_image,
                    image_meta,
                    timer,
                    deadline=deadline if wait else None,
                    keep_on_timeout=keep_on_timeout,
                    progress=progress,
                    config_drive=drive,
                    vif=vif,
                    key_name=key_name,
                )
            except InstanceBuildTimeout as exc:
                # Said against the whole spawn's budget, which is what the caller gave.
                raise InstanceBuildTimeout(
                    "wait_for_running",
                    TimeoutError(f"not RUNNING within {budget:g} s of the spawn's start"),
                    instance,
                ) from exc
        instance.state = self.host.domain_state(domain)
        self.db.update_instance(instance.uuid, state=instance.state)
        instance.timings = timer.as_dict()
        return instance

    def _spawn(
        self,
        instance: Instance,
        image: StoreImage,
        image_meta: ImageMeta,
        timer: StepTimer,
        *,
        deadline: float | None,
        keep_on_timeout: bool,
        progress: fetch.Progress | None,
        config_drive: configdrive.ConfigDriveData | None,
        vif: VIF | None = None,
        key_name: str | None = None,
    ) -> libvirt.virDomain:
        """Nova's spawn, step by step, with everything it creates on an undo list.

        With ``images_type = rbd`` one connection to the cluster serves the whole
        spawn; it outlives the undo list, which may need it to remove the root disk.
        """
        rbd = self.rbd_driver() if self.uses_rbd else None
        with contextlib.ExitStack() as session, contextlib.ExitStack() as undo:
            step = "record"
            try:
                self.db.create_instance(_record(instance, vif, key_name))
                undo.callback(self.db.delete_instance, instance.uuid)

                if vif is not None and vif.mode is NetworkMode.USER:
                    step = "allocate_network"
                    vif = self._reserve_forward_port(instance.uuid, vif, undo)

                step = "get_disk_info"
                disk_info = blockinfo.get_disk_info(
                    instance.virt_type,
                    instance.flavor,
                    image_meta,
                    machine_type=self.conf.libvirt.hw_machine_type,
                    config_drive_format=(
                        self.conf.default.config_drive_format if config_drive else None
                    ),
                )
                step = "create_image"
                undo.callback(shutil.rmtree, instance.instance_dir, ignore_errors=True)
                network_disks: dict[str, guest.NetworkSource] = {}
                if rbd is not None:
                    self._connect_rbd(rbd, instance.uuid, session, undo)
                formats = self.create_image(
                    instance, disk_info, image, timer=timer, progress=progress, rbd=rbd
                )
                if rbd is not None:
                    network_disks["disk"] = self.rbd_network_source(rbd, instance.uuid)
                step = "console"
                instance_dir = Path(instance.instance_dir)
                (instance_dir / "console.log").touch()

                step = "define"
                with timer.step(Step.DEFINE):
                    domain = self._define(
                        instance,
                        image_meta,
                        disk_info,
                        formats,
                        vif=vif,
                        network_disks=network_disks,
                    )
                undo.callback(self._undefine, instance.name)

                # Nova's post-XML callback: the config drive is made once the domain
                # that names it is defined, before it starts.
                if config_drive is not None:
                    step = "config_drive"
                    with timer.step(Step.CONFIG_DRIVE):
                        configdrive.make_drive(
                            instance_dir / "disk.config",
                            config_drive,
                            self.conf.default.config_drive_format,
                        )

                step = "start"
                with timer.step(Step.START):
                    self.host.launch(domain)

                step = "wait_for_running"
                if deadline is not None:
                    with timer.step(Step.WAIT):
                        remaining = max(0.0, deadline - self.clock())
                        self.wait_for_running(instance, domain, remaining)
            except InstanceBuildTimeout:
                if keep_on_timeout:
                    undo.pop_all()
                    # Kept for debugging: no longer "building", so cleanup leaves it.
                    self.db.update_instance(instance.uuid, state="error")
                raise
            except Exception as exc:
                raise SpawnError(step, exc, instance) from exc
            undo.pop_all()
        return domain

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

    def _connect_rbd(
        self,
        rbd: rbd_utils.RBDDriver,
        instance_uuid: str,
        session: contextlib.ExitStack,
        undo: contextlib.ExitStack,
    ) -> None:
        """One connection for the spawn (``session``); an unreachable cluster or a
        missing pool is one clear error before anything is made in it."""
        session.enter_context(rbd.connected())
        rbd.check_pool()
        undo.callback(self._undo_rbd_disks, rbd, instance_uuid)

    def _undo_rbd_disks(self, rbd: rbd_utils.RBDDriver, instance_uuid: str) -> None:
        """Undo of a failed spawn: its RBD disks. A failure here is logged, never
        raised: the spawn's own error is the one to report."""
        try:
            rbd.cleanup_volumes(instance_uuid)
        except rbd_utils.RbdError as exc:
            LOG.warning("could not remove the RBD disks of %s: %s", instance_uuid, exc)

    def rbd_network_source(
        self, rbd: rbd_utils.RBDDriver, instance_uuid: str, disk_name: str = "disk"
    ) -> guest.NetworkSource:
        """The root disk as QEMU reaches it: the monitors, and cephx auth when a
        libvirt secret holds the key (Nova's ``rbd_user``/``rbd_secret_uuid``)."""
        opts = self.conf.libvirt
        auth = bool(opts.rbd_secret_uuid)
        return guest.NetworkSource(
            protocol="rbd",
            name=f"{rbd.pool}/{instance_uuid}_{disk_name}",
            hosts=tuple(guest.NetworkHost(h.name, h.port) for h in rbd.get_mon_addrs()),
            auth_username=opts.rbd_user if auth else None,
            secret_uuid=opts.rbd_secret_uuid if auth else None,
        )

    def _define(
        self,
        instance: Instance,
        image_meta: ImageMeta,
        disk_info: DiskInfo,
        formats: dict[str, str],
        *,
        vif: VIF | None,
        network_disks: Mapping[str, guest.NetworkSource],
    ) -> libvirt.virDomain:
        """to_xml, write libvirt.xml, define. Another state dir on the same daemon may
        take the chosen name between our check and our define (each counts its own
        names): then the next free name is taken and the XML made again."""
        for _attempt in range(DEFINE_ATTEMPTS):
            xml = self.to_xml(
                instance, image_meta, disk_info, formats, vif=vif, network_disks=network_disks
            )
            (Path(instance.instance_dir) / "libvirt.xml").write_text(xml)
            try:
                return self.host.define(xml)
            except libvirt.libvirtError:
                taken = self.host.find_domain(instance.name)
                if taken is None or taken.UUIDString() == instance.uuid:
                    raise
                LOG.debug("domain name %s was just taken; choosing another", instance.name)
                instance.name = self._next_domain_name()
                self.db.update_instance(instance.uuid, name=instance.name)
        raise MinidriverError(f"no free domain name after {DEFINE_ATTEMPTS} attempts")

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
    ) -> dict[str, str]:
        """Nova's ``_create_image``: the instance dir, the kernel and ramdisk of a kernel
        image, the root, ephemeral and swap disks.

        With ``rbd`` (``images_type = rbd``) the root disk is an RBD image in its pool;
        ephemeral and swap stay files. Returns each disk's driver format, as written
        to ``disk.info``.
        """
        instance_dir = Path(instance.instance_dir)
        instance_dir.mkdir(parents=True)
        instance_dir.chmod(0o755)
        if instance.kernel_id:
            self.create_kernel_ramdisk(instance, timer=timer, progress=progress)
        backend = local_backend_class(self.conf)
        flavor = instance.flavor

        def disk(name: str) -> Image:
            return backend(self.conf, instance_dir / name, timer)

        root: Image = disk("disk")
        if rbd is not None:
            root = Rbd(
                self.conf,
                timer,
                driver=rbd,
                instance_uuid=instance.uuid,
                clone_location=self.clone_location(rbd, image),
            )
        root_size = flavor.root_gb * GiB if flavor.root_gb else None
        # RBD holds raw data only: its base is raw whatever force_raw_images says.
        force_raw = self.conf.default.force_raw_images or rbd is not None
        limits = qemu_img.resource_limits(
            self.conf.libvirt.images_cpu_time_limit, self.conf.libvirt.images_address_space_limit
        )
        fetch_func = partial(
            fetch.fetch_to_raw,
            image,
            force_raw=force_raw,
            timer=timer,
            progress=progress,
            limits=limits,
            max_virtual_size=self.conf.libvirt.images_max_virtual_size,
            open_data=self.images.open_data,
        )
        base_format = "raw" if force_raw else qemu_img.qemu_format(image.disk_format)
        # A cached base is checked again before a disk is made on it (cheaply: its head
        # and qemu-img info); the base the fetch makes is checked in full instead.
        fetch.recheck_base(
            self.conf.base_dir / base_filename(image.id),
            base_format,
            limits=limits,
            disk_format=image.disk_format,
        )
        instance.cache_hit = root.cache(
            fetch_func, base_filename(image.id), root_size, base_format=base_format
        )
        formats = {"disk": root.driver_format}
        if "disk.local" in disk_info:
            disk("disk.local").cache(
                partial(
                    create_ephemeral,
                    size_gb=flavor.ephemeral_gb,
                    fs_type=EPHEMERAL_FS,
                    label=EPHEMERAL_LABEL,
                ),
                ephemeral_filename(flavor.ephemeral_gb),
                flavor.ephemeral_gb * GiB,
                Step.EPHEMERAL,
            )
            formats["disk.local"] = backend.driver_format
        if "disk.swap" in disk_info:
            disk("disk.swap").cache(
                partial(create_swap, swap_mb=flavor.swap),
                swap_filename(flavor.swap),
                flavor.swap * 1024 * 1024,
                Step.SWAP,
            )
            formats["disk.swap"] = backend.driver_format
        if "disk.config" in disk_info:
            formats["disk.config"] = "raw"  # made after define (see _spawn)
        write_disk_info(instance_dir, formats, {"disk": os.fspath(root.path)})
        return formats

    def kernel_images(self, image_meta: ImageMeta) -> tuple[StoreImage | None, StoreImage | None]:
        """The kernel (aki) and ramdisk (ari) images a disk image names in its
        ``kernel_id``/``ramdisk_id`` properties, checked before anything is written."""
        if not image_meta.kernel_id:
            if image_meta.ramdisk_id:
                raise ImageUnacceptable(
                    f"image {image_meta.name} names a ramdisk_id but no kernel_id",
                    hint="set the kernel_id property too (a ramdisk needs its kernel)",
                )
            return None, None
        kernel = self._linked_image(image_meta, "kernel_id", "aki")
        ramdisk = self._linked_image(image_meta, "ramdisk_id", "ari")
        return kernel, ramdisk

    def _linked_image(
        self, image_meta: ImageMeta, prop: str, disk_format: str
    ) -> StoreImage | None:
        ref = image_meta.properties.get(prop, "")
        if not ref:
            return None
        try:
            linked = self.images.get(ref)
        except ImageNotFound as exc:
            raise ImageNotFound(
                f"image {image_meta.name}'s {prop} {ref!r} is not in the image store",
                hint=f"add it with `minidriver image add --disk-format {disk_format}`",
            ) from exc
        if linked.disk_format != disk_format:
            raise ImageUnacceptable(
                f"image {image_meta.name}'s {prop} names {linked.describe()}, a"
                f" {linked.disk_format} image, not {disk_format}",
                hint=f"point {prop} at an image added with --disk-format {disk_format}",
            )
        return linked

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

    def clone_location(
        self, rbd: rbd_utils.RBDDriver, image: StoreImage
    ) -> rbd_utils.RbdLocation | None:
        """Nova's ``Rbd.clone`` choice: the first of the image's locations that
        ``is_cloneable`` (it logs why one is not); None: fetch and import instead."""
        for location in image.locations:
            if rbd.is_cloneable(location["url"], image.disk_format):
                return rbd_utils.parse_url(location["url"])
        return None

    def to_xml(
        self,
        instance: Instance,
        image_meta: ImageMeta,
        disk_info: DiskInfo,
        formats: dict[str, str],
        *,
        vif: VIF | None = None,
        network_disks: Mapping[str, guest.NetworkSource] | None = None,
    ) -> str:
        config = guest.get_guest_config(
            instance,
            disk_info,
            formats,
            instance_dir=Path(instance.instance_dir),
            machine_type=self.conf.libvirt.hw_machine_type,
            cpu_mode=self.conf.libvirt.cpu_mode,
            state_id=self.db.state_id,
            os_command_line=image_meta.os_command_line,
            vif=vif,
            network_disks=network_disks,
        )
        return guest.to_xml(config)

    def wait_for_running(
        self, instance: Instance, domain: libvirt.virDomain, timeout: float | None = None
    ) -> None:
        """Nova's ``_wait_for_boot``: a fixed-interval loop, here with a deadline.

        A lifecycle event wakes the loop early; the interval bounds every wait.
        """
        interval = self.conf.libvirt.wait_interval
        if timeout is None:
            timeout = self.conf.default.instance_build_timeout
        deadline = self.clock() + timeout
        with self.host.lifecycle_waiter(instance.uuid) as changed:
            while True:
                state = self.host.domain_state(domain)
                if state == "running":
                    return
                if state in ("shutoff", "crashed"):
                    raise MinidriverError(f"domain {instance.name} stopped while booting")
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise InstanceBuildTimeout(
                        "wait_for_running",
                        TimeoutError(f"not RUNNING within {timeout:g} s (state {state})"),
                        instance,
                    )
                changed.wait(min(interval, remaining))
                changed.clear()

    # -- other operations -----------------------------------------------------

    def _owned_domain(self, name: str) -> libvirt.virDomain | None:
        """The domain of that name if this state dir defined it (its metadata says so)."""
        domain = self.host.find_domain(name)
        if domain is None:
            return None
        owner = guest.owner_of(domain.XMLDesc(0))
        if owner is None or owner.state_id != self.db.state_id:
            raise MinidriverError(
                f"domain {name} belongs to another state dir; not touching it",
                hint="run minidriver with that state dir (--state-dir) to manage it",
            )
        return domain

    def owned_domains(self) -> dict[str, libvirt.virDomain]:
        """Every domain this state dir defined, by instance uuid (from its metadata)."""
        owned = {}
        for domain, xml in self.host.domains_xml():
            owner = guest.owner_of(xml)
            if owner is not None and owner.state_id == self.db.state_id:
                owned[owner.instance_uuid] = domain
        return owned

    def _undefine(self, name: str) -> None:
        domain = self._owned_domain(name)
        if domain is not None:
            self.host.undefine(domain)

    def destroy(self, instance_uuid: str) -> None:
        """Stop and undefine the domain, remove the instance dir, free its forwarded port,
        forget its SSH host key, remove its record.

        Whatever of it exists is removed; what is already gone is no error. The image
        cache stays.
        """
        record = self.db.get_instance(instance_uuid)
        instance_dir = Path(record.instance_dir or self.instance_dir(record.uuid))
        with external_lock(self.conf.locks_dir, instance_lock_name(record.uuid)):
            self._undefine(record.name)
            # Before the instance dir: its disk.info says where the RBD disks are. An
            # unreachable cluster stops here, with the record kept for another try.
            self.destroy_rbd_disks(record.uuid, instance_dir)
            shutil.rmtree(instance_dir, ignore_errors=True)
            if record.forward_port is not None:
                self.ports.release(record.forward_port, record.uuid)
            ssh.forget_host_key(self.conf.known_hosts_path, record.uuid, self.conf.locks_dir)
            self.db.delete_instance(record.uuid)

    def rbd_pools_of(self, instance_dir: Path) -> set[str]:
        """The pools holding an instance's RBD disks, from its ``disk.info``; without
        one (a spawn that died early), the configured pool when images_type = rbd."""
        recorded = read_disk_info(instance_dir)
        if recorded is None:
            return {self.conf.libvirt.images_rbd_pool} if self.uses_rbd else set()
        return {parse_rbd_path(path)[0] for path in recorded if is_rbd_path(path)}

    def destroy_rbd_disks(self, instance_uuid: str, instance_dir: Path) -> list[str]:
        """Nova's ``cleanup_volumes`` for one instance: its ``<uuid>_*`` RBD images,
        never an image's. Returns ``pool/name`` of each one removed."""
        removed: list[str] = []
        for pool in sorted(self.rbd_pools_of(instance_dir)):
            names = self.rbd_driver(pool).cleanup_volumes(instance_uuid)
            removed.extend(f"{pool}/{name}" for name in names)
        return removed

    def get_info(self, instance_uuid: str) -> InstanceInfo:
        record = self.db.get_instance(instance_uuid)
        domain = self.host.find_domain(record.name)
        if domain is None:
            return InstanceInfo(state="nostate")
        internal = domain.ID()
        return InstanceInfo(
            state=self.host.domain_state(domain), internal_id=internal if internal >= 0 else None
        )

    # -- power ----------------------------------------------------------------

    def _domain_of(self, instance_uuid: str) -> libvirt.virDomain:
        record = self.db.get_instance(instance_uuid)
        domain = self._owned_domain(record.name)
        if domain is None:
            raise MinidriverError(
                f"instance {record.display_name} ({record.uuid}) has no domain {record.name}",
                hint="delete it and boot again",
            )
        return domain

    def _wait_for_state(self, domain: libvirt.virDomain, state: str, timeout: float) -> bool:
        deadline = self.clock() + timeout
        with self.host.lifecycle_waiter(domain.UUIDString()) as changed:
            while self.host.domain_state(domain) != state:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                changed.wait(min(self.conf.libvirt.wait_interval, remaining))
                changed.clear()
        return True

    def power_off(self, instance_uuid: str, *, timeout: float = 60, force: bool = False) -> bool:
        """Nova's ``power_off``: an ACPI shutdown, then a hard stop after ``timeout``.

        Returns True when the guest shut down cleanly (False: it was stopped hard).
        """
        domain = self._domain_of(instance_uuid)
        clean = False
        if domain.isActive():
            if not force:
                domain.shutdown()
                clean = self._wait_for_state(domain, "shutoff", timeout)
            if not clean:
                with contextlib.suppress(libvirt.libvirtError):
                    domain.destroy()  # it may have stopped just now
        self.db.update_instance(instance_uuid, state="shutoff")
        return clean

    def power_on(self, instance_uuid: str) -> None:
        domain = self._domain_of(instance_uuid)
        if not domain.isActive():
            self.host.launch(domain)
        self.db.update_instance(instance_uuid, state="running")

    def reboot(self, instance_uuid: str, *, hard: bool = False) -> None:
        """Soft: the guest is asked (ACPI) and libvirt starts it again once it has
        stopped. Hard: as Nova's ``_hard_reboot``, the domain is stopped and started."""
        domain = self._domain_of(instance_uuid)
        if hard or not domain.isActive():
            with contextlib.suppress(libvirt.libvirtError):
                domain.destroy()
            self.host.launch(domain)
        else:
            domain.reboot(0)

    def get_disks(self, instance_uuid: str) -> dict[str, DiskDetails]:
        """Every disk recorded in ``disk.info``, keyed by its disk_info name."""
        record = self.db.get_instance(instance_uuid)
        recorded = read_disk_info(Path(record.instance_dir))
        if recorded is None:
            return {}
        disks = {}
        for path, fmt in recorded.items():
            if is_rbd_path(path):
                pool, name = parse_rbd_path(path)
                disks[name.removeprefix(f"{record.uuid}_")] = self._rbd_disk_details(pool, name)
                continue
            info = qemu_img.info(path, fmt)
            backing_size = None
            if info.backing_file and info.backing_format:
                backing_size = qemu_img.info(info.backing_file, info.backing_format).virtual_size
            disks[Path(path).name] = DiskDetails(
                path=path,
                format=info.format,
                virtual_size=info.virtual_size,
                actual_size=info.actual_size,
                backing_file=info.backing_file,
                backing_format=info.backing_format,
                backing_virtual_size=backing_size,
            )
        return disks

    def _rbd_disk_details(self, pool: str, name: str) -> DiskDetails:
        """An RBD disk as ``show`` describes a file: its size, its own data, and the
        image snapshot it is a clone of (``rbd:pool/image@snap``) as its backing."""
        rbd = self.rbd_driver(pool)
        with rbd.connected():
            parent = rbd.parent_info(name)
            return DiskDetails(
                path=imagebackend.rbd_path(pool, name),
                format="raw",
                virtual_size=rbd.size(name),
                actual_size=rbd.allocated_bytes(name),
                backing_file=f"rbd:{parent[0]}" if parent else None,
                backing_format="raw" if parent else None,
                backing_virtual_size=parent[1] if parent else None,
            )

    # -- snapshots ------------------------------------------------------------

    def snapshot(self, instance_uuid: str, name: str) -> StoreImage:
        """Nova's ``snapshot``: the root disk as a new, bootable image in the store."""
        record = self.db.get_instance(instance_uuid)
        domain = self._domain_of(instance_uuid)
        disk = Path(record.instance_dir) / "disk"
        formats = read_disk_info(Path(record.instance_dir)) or {}
        try:
            parent = self.images.get(record.image_id)
        except ImageNotFound:
            parent = None  # deleted since the boot: the snapshot stands alone anyway
        rbd_root = next((p for p in formats if is_rbd_path(p)), None)
        if rbd_root is not None:
            return self._direct_snapshot(record, rbd_root, name, parent)
        disk_format = formats[os.fspath(disk)]
        with snapshot.work_dir(self.conf.instances_path) as work:
            out = work / "snapshot.qcow2"
            if domain.isActive():
                snapshot.live(domain, disk, disk_format, work, out, clock=self.clock)
            else:
                snapshot.cold(disk, disk_format, out)
            return self.images.add(
                out,
                name=name,
                disk_format="qcow2",
                min_disk=parent.min_disk if parent else 0,
                min_ram=parent.min_ram if parent else 0,
                properties=snapshot_properties(record, parent),
            )

    def _direct_snapshot(
        self, record: InstanceRecord, root_path: str, name: str, parent: StoreImage | None
    ) -> StoreImage:
        """Nova's direct snapshot of an RBD root disk, running or not (an RBD snapshot
        is crash-consistent): the new image is a flattened clone in Ceph, recorded
        with its rbd location, into the pool of the image the instance was booted
        from when that is in this cluster (Nova's choice), else Glance's pool."""
        pool, _name = parse_rbd_path(root_path)
        rbd = self.rbd_driver(pool)
        image_id = str(uuidlib.uuid4())
        with rbd.connected():
            origin = parent.rbd_location if parent else None
            if origin is not None and origin.fsid == rbd.get_fsid():
                dest_pool = origin.pool
            else:
                dest_pool = self.conf.glance_store.rbd_store_pool
            root = Rbd(
                self.conf, StepTimer(clock=self.clock), driver=rbd, instance_uuid=record.uuid
            )
            location = root.direct_snapshot(uuidlib.uuid4().hex, image_id, dest_pool)
            try:
                return self.images.add_location(
                    image_id,
                    name=name,
                    url=location.url,
                    size=rbd.size(image_id, dest_pool),
                    min_disk=parent.min_disk if parent else 0,
                    min_ram=parent.min_ram if parent else 0,
                    properties=snapshot_properties(record, parent),
                )
            except BaseException:
                rbd_utils.remove_quietly(rbd, image_id, dest_pool)
                raise

    # -- image cache ----------------------------------------------------------

    def image_cache_manager(self) -> imagecache.ImageCacheManager:
        return imagecache.ImageCacheManager(
            self.conf.base_dir, self.conf.locks_dir, self.conf.instances_path, self.conf.image_cache
        )

    def bases_in_use(self) -> dict[str, set[str]]:
        """Nova's count of what is in use: every instance disk's backing chain on this
        host, plus the base of every instance recorded in the state DB."""
        return imagecache.merge(
            imagecache.backing_files_in_use(self.conf.instances_path, self.conf.base_dir),
            imagecache.instances_in_use(self.db.list_instances(), base_filename),
        )

    def list_instances(self) -> list[InstanceRecord]:
        """This state dir's instances, with the state libvirt reports now."""
        out = []
        for record in self.db.list_instances():
            domain = self.host.find_domain(record.name)
            state = self.host.domain_state(domain) if domain else "nostate"
            out.append(InstanceRecord(**{**record.__dict__, "state": state}))
        return out


def check_flavor_fits(flavor: Flavor, image: ImageMeta, max_virtual_size: int = 0) -> None:
    """Refuse, before anything is written, a flavor too small for the image, an image
    over the ``images_max_virtual_size`` ceiling (bytes; 0: none), or one that is no
    disk at all."""
    if image.disk_format in UNINSPECTED:
        # Kernels and ramdisks are never shown to qemu-img, so never a root disk.
        raise ImageUnacceptable(
            f"image {image.name} is a kernel or ramdisk ({image.disk_format}), not a disk",
            hint="boot a disk image; a kernel or ramdisk is referenced from one",
        )
    virtual_size = image.virtual_size or 0
    if max_virtual_size and virtual_size > max_virtual_size:
        raise ImageUnacceptable(
            f"image {image.name}'s virtual size ({virtual_size} bytes) is over"
            f" images_max_virtual_size ({max_virtual_size} bytes)",
            hint="use a smaller image, or raise [libvirt] images_max_virtual_size",
        )
    if flavor.root_gb:
        root = flavor.root_gb * GiB
        if image.virtual_size is not None and root < image.virtual_size:
            raise FlavorDiskSmallerThanImage(
                f"flavor {flavor.name}'s root disk ({flavor.root_gb} GB) is smaller than"
                f" image {image.name} ({image.virtual_size} bytes virtual)",
                hint="choose a flavor with a larger root_gb",
            )
        if image.min_disk > flavor.root_gb:
            raise FlavorDiskSmallerThanImage(
                f"image {image.name} needs min_disk {image.min_disk} GB; flavor"
                f" {flavor.name} has {flavor.root_gb} GB",
                hint="choose a flavor with a larger root_gb",
            )
    if image.min_ram > flavor.memory_mb:
        raise MinidriverError(
            f"image {image.name} needs min_ram {image.min_ram} MB; flavor {flavor.name}"
            f" has {flavor.memory_mb} MB",
            hint="choose a flavor with more memory",
        )


def write_disk_info(
    instance_dir: Path, formats: dict[str, str], paths: Mapping[str, str] | None = None
) -> None:
    """``disk.info``: JSON {path: format}, written once and never silently changed.

    ``paths`` names disks that are not files of the instance dir (an RBD root disk is
    ``rbd:<pool>/<uuid>_disk``, as in Nova)."""
    path = instance_dir / "disk.info"
    paths = paths or {}
    data = {paths.get(name, os.fspath(instance_dir / name)): fmt for name, fmt in formats.items()}
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != data:
            raise MinidriverError(f"{path} records {recorded}, not {data}")
        return
    path.write_text(json.dumps(data))


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


def read_disk_info(instance_dir: Path) -> dict[str, str] | None:
    """``disk.info`` as recorded; None when there is none."""
    try:
        recorded: dict[str, str] = json.loads((instance_dir / "disk.info").read_text())
    except FileNotFoundError:
        return None
    return recorded


def is_rbd_path(path: str) -> bool:
    return path.startswith("rbd:")


def parse_rbd_path(path: str) -> tuple[str, str]:
    """``rbd:<pool>/<name>`` -> (pool, name)."""
    pool, _, name = path.removeprefix("rbd:").partition("/")
    return pool, name


def _record(instance: Instance, vif: VIF | None, key_name: str | None) -> InstanceRecord:
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
    )
