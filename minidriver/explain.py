"""What a boot would do, before anything runs: the chain of files of seed 000.

For each file a boot would create (or find cached): its path, format, virtual size and
the exact command lines that make it, built by the same ``*_cmd`` functions the real
code runs; then the domain XML. Nothing is written, nothing is defined.

With ``images_type = rbd`` the cluster is asked (read only) whether the image can be
cloned; every disk's work in the pool is done through librbd, so its lines are the
``rbd`` commands that do the same.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from minidriver import compute_api, guest, nova_map
from minidriver.driver import LibvirtDriver, base_filename
from minidriver.imagebackend import (
    EPHEMERAL_LABEL,
    Flat,
    Qcow2,
    Rbd,
    backend_class,
    clone_location,
    copy_sparse_cmd,
    ephemeral_filename,
    get_ephemeral_fs,
    local_backend_class,
    mkfs_cmd,
    mkswap_cmd,
    swap_filename,
)
from minidriver.images import qemu_img
from minidriver.images.store import Image as StoreImage
from minidriver.network import VIF, NetworkMode, NetworkRequest, generate_mac_address
from minidriver.objects import GiB, Instance, MiB
from minidriver.rbd_utils import RbdLocation
from minidriver.steps import StepTimer
from minidriver.vif import VIF_PLUGGED, get_neutron_events


@dataclass(frozen=True)
class PlannedFile:
    path: str
    format: str
    virtual_size: int | None
    exists: bool  # already there (a cached base): nothing to run for it
    commands: tuple[tuple[str, ...], ...]
    note: str = ""
    step: str = ""  # the nova_map step that makes it ("": none of spawn's, a volume)

    def nova_step(self) -> nova_map.NovaStep | None:
        return nova_map.step(self.step) if self.step else None


@dataclass
class Plan:
    image_id: str
    flavor: str
    files: list[PlannedFile] = field(default_factory=list)
    xml: str = ""
    launch: list[str] = field(default_factory=list)  # the VIF plugged, the start, the wait

    def add(
        self,
        path: Path,
        fmt: str,
        size: int | None,
        cmds: list[list[str]],
        note: str = "",
        *,
        step: str,
    ) -> None:
        """A file a boot may make: nothing to run for it if it is there (cached)."""
        exists = path.exists()
        self.files.append(
            PlannedFile(
                path=str(path),
                format=fmt,
                virtual_size=size,
                exists=exists,
                commands=() if exists else tuple(tuple(c) for c in cmds),
                note=note,
                step=step,
            )
        )

    def to_dict(self, *, nova: bool = False) -> dict[str, object]:
        """``nova``: each file also names the Nova function that makes it and where
        minidriver differs (``explain --nova``), from :data:`nova_map.NOVA_STEPS`."""
        files = []
        for f in self.files:
            entry: dict[str, object] = {
                "path": f.path,
                "format": f.format,
                "virtual_size": f.virtual_size,
                "exists": f.exists,
                "commands": [list(c) for c in f.commands],
                "note": f.note,
            }
            if nova:
                step = f.nova_step()
                entry["nova"] = step.nova if step else None
                entry["differs"] = step.differs if step else None
            files.append(entry)
        return {
            "image": self.image_id,
            "flavor": self.flavor,
            "files": files,
            "launch": self.launch,
            "xml": self.xml,
        }


def explain(
    drv: LibvirtDriver,
    image_ref: str | None,
    flavor_name: str,
    network: str | None = None,
    *,
    boot_volume: str | None = None,
) -> Plan:
    """What a boot of ``image_ref`` would make; with ``boot_volume``, of that volume
    (its image's properties, the volume as the root, no root disk and no fetch)."""
    flavor = drv.get_flavor(flavor_name)
    volume = drv.volumes.get(boot_volume) if boot_volume else None
    image = drv.images.get(
        drv.block_devices.image_of_volume(volume, drv.images) if volume else image_ref or ""
    )
    meta = image.to_image_meta()
    compute_api.validate_flavor_image(
        flavor, meta, drv.conf.libvirt.images_max_virtual_size, root_on_volume=volume is not None
    )
    kernel, ramdisk = compute_api.handle_kernel_and_ramdisk(drv.images, meta)
    conf = drv.conf
    plan = Plan(image_id=image.id, flavor=flavor.name)
    instance = Instance(
        uuid=str(uuidlib.uuid4()),
        name=conf.default.instance_name_template % 0,  # the real name is given at boot
        display_name=image.name,
        flavor=flavor,
        image_ref=image.id,
        virt_type=drv.host.virt_type.virt_type,
        kernel_id=kernel.id if kernel else "",
        ramdisk_id=ramdisk.id if ramdisk else "",
    )
    instance_dir = conf.instances_path / instance.uuid
    instance.instance_dir = str(instance_dir)
    backend = local_backend_class(conf)
    disk_info = drv.get_disk_info(instance, meta, config_drive=False, root_volume=volume)
    formats = {m.name: backend.driver_format for m in disk_info}
    if backend is Flat and "disk" in formats and not conf.default.force_raw_images:
        formats["disk"] = qemu_img.qemu_format(image.disk_format)  # copied as it is
    rbd_paths: dict[str, str] = {}
    network_disks: dict[str, guest.NetworkSource] = {}
    clone = None
    if backend_class(conf) is Rbd:
        rbd = drv.rbd_driver()
        with rbd.connected():
            rbd.check_pool()
            clone = clone_location(rbd, image)
            for m in disk_info:
                if volume is not None and m.name == f"volume-{volume.id}":
                    continue  # the root volume: its own backend's
                disk = Rbd(
                    conf, StepTimer(), driver=rbd, instance_uuid=instance.uuid, disk_name=m.name
                )
                rbd_paths[m.name] = os.fspath(disk.path)
                network_disks[m.name] = disk.libvirt_info()
                formats[m.name] = Rbd.driver_format
    rbd_root = rbd_paths.get("disk")

    # A kernel image's kernel and ramdisk: fetched as they are, copied into the
    # instance dir for <os> to name.
    for name, linked in (("kernel", kernel), ("ramdisk", ramdisk)):
        if linked is not None:
            add_boot_file(plan, name, linked, conf.base_dir, instance_dir)
    volumes: dict[str, guest.GuestVolume] = {}
    if volume is not None:
        connection = drv.volumes.connection(volume)
        plan.files.append(
            PlannedFile(
                path=connection.path,
                format=connection.driver_format,
                virtual_size=volume.size_gb * GiB,
                exists=True,
                commands=(),
                note=f"volume {volume.name or volume.id}, the root (boot from volume):"
                " no root disk, nothing fetched",
            )
        )
        volumes[f"volume-{volume.id}"] = guest.GuestVolume(
            connection.path, connection.network, volume.id
        )
        formats[f"volume-{volume.id}"] = connection.driver_format
    else:
        add_root_files(plan, drv, image, instance_dir, clone=clone, rbd_root=rbd_root)
    add_local_disks(plan, drv, instance_dir, rbd_paths, meta.os_type)

    vif = planned_vif(drv, NetworkRequest.parse(network, drv.conf.libvirt))
    plan.launch = launch_steps(drv, vif)
    config = guest.get_guest_config(
        instance,
        disk_info,
        formats,
        instance_dir=instance_dir,
        machine_type=meta.machine_type(conf.libvirt.hw_machine_type),
        cpu_mode=conf.libvirt.cpu_mode,
        sysinfo_serial=conf.libvirt.sysinfo_serial,
        state_id=drv.db.state_id,
        cache="none",
        network_disks=network_disks,
        os_command_line=meta.os_command_line,
        vif=vif,
        image_properties=meta.properties,
        agent_socket_dir=drv.host.agent_socket_dir(),
        volumes=volumes,
    )
    plan.xml = guest.to_xml(config, cache_dir=drv.conf.template_cache_path)
    return plan


def planned_vif(drv: LibvirtDriver, request: NetworkRequest) -> VIF | None:
    """The NIC a boot would get: a fresh MAC and, in user mode, the port it would take
    now (reserved only by the boot itself)."""
    if request.mode is NetworkMode.NONE:
        return None
    port = drv.ports.first_free() if request.mode is NetworkMode.USER else None
    return VIF(request.mode, generate_mac_address(), request.source, port)


def launch_steps(drv: LibvirtDriver, vif: VIF | None) -> list[str]:
    """After the define: what plugging the VIF checks, and whether the start pauses to
    wait for ``network-vif-plugged`` (vif.py) and on what."""
    options = drv.conf.default
    if vif is not None and vif.mode.needs_source:
        plug = f"plug_vifs: {vif.mode} {vif.source} must be active on the host"
    else:
        plug = "plug_vifs: nothing to find up (user mode's port is reserved before)"
    events = get_neutron_events(
        vif,
        drv.host.virt_type.virt_type,
        options.vif_plugging_timeout,
        drv.host.get_connection().getType(),
    )
    if not events or vif is None:
        return [plug, "start: not paused, no network-vif-plugged expected"]
    if vif.mode is NetworkMode.USER:
        sign = f"QEMU listening on 127.0.0.1:{vif.forward_port}"
    else:
        sign = "the tap device libvirt makes, on the host"
    then = "the boot fails" if options.vif_plugging_is_fatal else "a warning, and the boot goes on"
    return [
        plug,
        "start: paused",
        f"vif_plugged: wait up to vif_plugging_timeout = {options.vif_plugging_timeout} s"
        f" for {VIF_PLUGGED} of VIF {vif.vif_id} ({sign}); none: {then}"
        f" (vif_plugging_is_fatal = {str(options.vif_plugging_is_fatal).lower()})",
        "resume",
    ]


def add_boot_file(
    plan: Plan, name: str, image: StoreImage, base_dir: Path, instance_dir: Path
) -> None:
    """A kernel or ramdisk image: its base, then the copy ``<os>`` names."""
    base = base_dir / base_filename(image.id)
    if not base.exists():
        part = base.with_name(base.name + ".part")
        plan.add(
            part,
            image.disk_format,
            image.size,
            [],
            f"copy of {image.path}, sha512 verified",
            step=nova_map.KERNEL,
        )
    plan.add(
        base, image.disk_format, image.size, [], f"{name}, image {image.id}", step=nova_map.KERNEL
    )
    target = instance_dir / name
    plan.files.append(
        PlannedFile(
            path=str(target),
            format=image.disk_format,
            virtual_size=image.size,
            exists=False,
            commands=(tuple(copy_sparse_cmd(base, target)),),
            note=f"a full copy of {base_dir.name}/{base.name}",
            step=nova_map.KERNEL,
        )
    )


def add_root_files(
    plan: Plan,
    drv: LibvirtDriver,
    image: StoreImage,
    instance_dir: Path,
    *,
    clone: RbdLocation | None,
    rbd_root: str | None,
) -> None:
    """The root disk: a clone, or the download, the conversion, the optional _<GB>
    copy and the disk itself (a file, or imported into RBD)."""
    conf = drv.conf
    flavor = drv.get_flavor(plan.flavor)
    backend = local_backend_class(conf)
    meta = image.to_image_meta()
    root_size = flavor.root_gb * GiB if flavor.root_gb else None
    base = conf.base_dir / base_filename(image.id)
    source_fmt = qemu_img.qemu_format(image.disk_format)
    force_raw = conf.default.force_raw_images or rbd_root is not None
    base_fmt = "raw" if force_raw else source_fmt
    part = base.with_name(base.name + ".part")
    if clone is not None and rbd_root is not None:
        add_rbd_disk(
            plan,
            rbd_root,
            root_size,
            ["clone", str(clone), rbd_root],
            f"a copy-on-write clone of {clone}: nothing is fetched",
            step=nova_map.RBD,
        )
    else:
        if not base.exists():
            plan.add(
                part,
                source_fmt,
                meta.virtual_size,
                [],
                f"copy of {image_source(image)}, verified",
                step=nova_map.FETCH,
            )
        if force_raw and source_fmt != "raw":
            converted = base.with_name(base.name + ".converted")
            plan.add(
                base,
                "raw",
                meta.virtual_size,
                [qemu_img.convert_cmd(part, source_fmt, converted, "raw")],
                f"converted, then renamed from {converted.name}",
                step=nova_map.FETCH,
            )
        else:
            plan.add(
                base,
                base_fmt,
                meta.virtual_size,
                [],
                f"renamed from {part.name}",
                step=nova_map.FETCH,
            )
    if clone is None and rbd_root is not None:
        add_rbd_disk(
            plan,
            rbd_root,
            root_size,
            ["import", str(base), rbd_root],
            f"{base.name} imported into the pool (the image is not cloneable)",
            step=nova_map.RBD,
        )
    if rbd_root is None:
        backing = base
        if backend is Qcow2 and conf.libvirt.resized_base_copies and root_size is not None:
            resized = base.with_name(f"{base.name}_{flavor.root_gb}")
            temp = resized.with_name(resized.name + ".part")
            plan.add(
                resized,
                base_fmt,
                root_size,
                [copy_sparse_cmd(base, temp), qemu_img.resize_cmd(temp, base_fmt, root_size)],
                f"a full copy, resized, renamed from {temp.name}",
                step=nova_map.DISK,
            )
            backing, root_size = resized, None
        add_disk(
            plan,
            instance_dir / "disk",
            cow=backend is Qcow2,
            backing=backing,
            backing_fmt=base_fmt,
            size=root_size,
            preallocate=preallocate_cmds(drv, instance_dir / "disk", root_size),
        )


def add_local_disks(
    plan: Plan,
    drv: LibvirtDriver,
    instance_dir: Path,
    rbd_paths: Mapping[str, str],
    os_type: str = "",
) -> None:
    """Ephemeral and swap: formatted bases in _base, the instance's files on them, or
    with images_type = rbd (``rbd_paths``: each disk's ``rbd:pool/name``) the bases
    imported into the pool, as Nova's Rbd backend does. ``os_type``, the image's,
    decides the ephemeral filesystem."""
    flavor = drv.get_flavor(plan.flavor)
    backend = local_backend_class(drv.conf)
    base_dir = drv.conf.base_dir
    # (disk, its base, size, the command that formats the base's temp file, its kind,
    # the nova_map step that makes the base)
    local: list[tuple[str, Path, int, Callable[[Path], list[str]], str, str]] = []
    if flavor.ephemeral_gb:
        fs_type = get_ephemeral_fs(os_type, drv.conf.default.default_ephemeral_format)
        eph = base_dir / ephemeral_filename(flavor.ephemeral_gb, fs_type)
        mkfs = partial(mkfs_cmd, fs_type, EPHEMERAL_LABEL)
        local.append(
            ("disk.local", eph, flavor.ephemeral_gb * GiB, mkfs, fs_type, nova_map.EPHEMERAL)
        )
    if flavor.swap:
        swap = base_dir / swap_filename(flavor.swap)
        local.append(("disk.swap", swap, flavor.swap * MiB, mkswap_cmd, "swap", nova_map.SWAP))
    for name, base, size, format_cmd, kind, step in local:
        if backend.generates_in_place and name not in rbd_paths:
            # Nova's Flat: made in the instance dir, no base.
            target = instance_dir / name
            temp = target.with_name(target.name + ".part")
            plan.add(
                target,
                "raw",
                size,
                [
                    qemu_img.create_cmd(temp, "raw", size),
                    format_cmd(temp),
                    *preallocate_cmds(drv, target, size),
                ],
                f"{kind}, made in place (no base), renamed from {temp.name}",
                step=step,
            )
            continue
        temp = base.with_name(base.name + ".part")
        plan.add(
            base,
            "raw",
            size,
            [qemu_img.create_cmd(temp, "raw", size), format_cmd(temp)],
            f"{kind}, renamed from {temp.name}",
            step=step,
        )
        if name in rbd_paths:
            add_rbd_disk(
                plan,
                rbd_paths[name],
                None,
                ["import", str(base), rbd_paths[name]],
                f"{base.name} imported into the pool",
                step=nova_map.RBD,
            )
        else:
            add_disk(
                plan,
                instance_dir / name,
                cow=backend is Qcow2,
                backing=base,
                backing_fmt="raw",
                size=size,
                preallocate=preallocate_cmds(drv, instance_dir / name, size),
            )


def image_source(image: StoreImage) -> str:
    location = image.rbd_location
    return str(location) if location is not None else str(image.path)


def add_rbd_disk(
    plan: Plan, rbd_path: str, size: int | None, first: list[str], note: str, *, step: str
) -> None:
    """A disk in the pool, made by ``rbd <first...>`` and grown to ``size``."""
    plan.files.append(
        PlannedFile(
            path=rbd_path,
            format="raw",
            virtual_size=size,
            exists=False,
            commands=rbd_commands(first, size),
            note=note,
            step=step,
        )
    )


def rbd_commands(first: list[str], size: int | None) -> tuple[tuple[str, ...], ...]:
    """The ``rbd`` command lines equal to what librbd is asked: ``first``, then the
    resize to the flavor's root size (``rbd:`` dropped: the CLI takes pool/name)."""
    cmds = [["rbd", *(a.removeprefix("rbd:") for a in first)]]
    if size is not None:
        cmds.append(["rbd", "resize", "--size", f"{size // MiB}M", cmds[0][-1]])
    return tuple(tuple(c) for c in cmds)


def preallocate_cmds(drv: LibvirtDriver, path: Path, size: int | None) -> list[list[str]]:
    """``preallocate_images = space``: the fallocate a disk of ``size`` gets."""
    if size and drv.conf.default.preallocate_images == "space":
        return [["fallocate", "-n", "-l", str(size), str(path)]]
    return []


def add_disk(
    plan: Plan,
    path: Path,
    *,
    cow: bool,
    backing: Path,
    backing_fmt: str,
    size: int | None,
    preallocate: list[list[str]],
) -> None:
    if cow:
        cmds = [qemu_img.create_cow_image_cmd(backing, backing_fmt, path, size)]
        note = f"overlay on {backing.parent.name}/{backing.name}"
        fmt = "qcow2"
    else:
        # Nova's Flat: copied as it is (a qcow2 base stays qcow2), then grown.
        cmds = [copy_sparse_cmd(backing, path)]
        if size is not None:
            cmds.append(qemu_img.resize_cmd(path, backing_fmt, size))
        note = f"a full copy of {backing.parent.name}/{backing.name}"
        fmt = backing_fmt
    cmds += preallocate
    plan.files.append(
        PlannedFile(
            path=str(path),
            format=fmt,
            virtual_size=size,
            exists=False,
            commands=tuple(tuple(c) for c in cmds),
            note=note,
            step=nova_map.DISK,
        )
    )
