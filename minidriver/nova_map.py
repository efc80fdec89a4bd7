"""Where Nova does each step minidriver does, and where minidriver differs (no Nova
counterpart: a map of Nova's source, read at master, commit 00a030403f, for issue 21).

One table, :data:`NOVA_STEPS`, feeds ``explain --nova`` and the README's section "How
the flow maps to Nova" (a unit test compares the README with :func:`markdown_table`,
so the two never drift). Each Nova entry is ``file:function`` in Nova's tree; every
one was looked up there, and a "differs" cell says what minidriver chooses instead.
"""

from __future__ import annotations

from dataclasses import dataclass

_DRIVER = "nova/virt/libvirt/driver.py"
_BACKEND = "nova/virt/libvirt/imagebackend.py"

# The steps that make a file, as explain names them beside each file it plans.
ROOT = "instance dir, root disk"
KERNEL = "kernel and ramdisk"
EPHEMERAL = "ephemeral disk"
SWAP = "swap disk"
DISK = "the _base cache, a disk on it"
FETCH = "fetch and convert into _base"
RBD = "RBD disks"


@dataclass(frozen=True)
class NovaStep:
    operation: str  # spawn, destroy, snapshot, ...
    step: str  # what is done, in minidriver's words
    nova: str  # file:function in Nova's tree
    minidriver: str  # where minidriver does it
    differs: str = ""  # empty: as in Nova

    def to_dict(self) -> dict[str, str]:
        return {
            "operation": self.operation,
            "step": self.step,
            "nova": self.nova,
            "minidriver": self.minidriver,
            "differs": self.differs,
        }


NOVA_STEPS: tuple[NovaStep, ...] = (
    NovaStep(
        "spawn",
        "the steps in order",
        f"{_DRIVER}:LibvirtDriver.spawn",
        "driver.LibvirtDriver.spawn",
        "every step's creation on an undo list; no vGPU, vTPM or ephemeral encryption",
    ),
    NovaStep(
        "spawn",
        "buses and device names",
        "nova/virt/libvirt/blockinfo.py:get_disk_info",
        "blockinfo.get_disk_info",
        "a typed DiskInfo, not a dict",
    ),
    NovaStep(
        "spawn",
        ROOT,
        f"{_DRIVER}:_create_image, _create_and_inject_local_root",
        "driver.LibvirtDriver.create_image",
        "no file injection; an optional _base/<sha1>_<GB> resized copy (resized_base_copies, ours)",
    ),
    NovaStep(
        "spawn",
        KERNEL,
        f"{_DRIVER}:_create_image (the kernel and ramdisk images, each by Flat.cache)",
        "driver.LibvirtDriver.create_image",
    ),
    NovaStep(
        "spawn",
        EPHEMERAL,
        f"{_DRIVER}:_create_ephemeral",
        "imagebackend.create_ephemeral",
        "the _base name's tag hashes the filesystem made (Nova's: vfat's unless virt_mkfs"
        " names the os_type); no virt_mkfs",
    ),
    NovaStep("spawn", SWAP, f"{_DRIVER}:_create_swap", "imagebackend.create_swap"),
    NovaStep(
        "spawn",
        DISK,
        f"{_BACKEND}:Image.cache, Qcow2.create_image, Flat.create_image",
        "imagebackend.Image.cache, Qcow2, Flat",
        "the inspector's verdict on a cached base kept while the file is unchanged"
        " (trusted_bases; Nova's Qcow2 inspects the base at every spawn)",
    ),
    NovaStep(
        "spawn",
        FETCH,
        "nova/virt/images.py:fetch_to_raw, convert_image, qemu_img_info",
        "images/fetch.py, images/qemu_img.py",
        "a local image store or a URL instead of Glance; the store's hash and the"
        " virtual size checked too",
    ),
    NovaStep(
        "spawn",
        RBD,
        f"{_BACKEND}:Rbd.clone, Rbd.create_image, Rbd.libvirt_info",
        "imagebackend.Rbd",
    ),
    NovaStep(
        "spawn",
        "disk.info, the file disks' formats",
        f"{_BACKEND}:Image.resolve_driver_format (Flat and Qcow2, never Rbd)",
        "driver.LibvirtDriver.create_image, disk_info_file.write_disk_info",
        "written once, for every file disk at once (Nova rewrites it as each file disk's"
        " backend resolves its format); as in Nova no RBD disk in it: they are found as"
        " the pool's <uuid>_* images",
    ),
    NovaStep(
        "spawn",
        "console log",
        f"{_DRIVER}:_ensure_console_log_for_instance",
        "driver.LibvirtDriver.spawn",
        "appended across starts (our choice; Nova's log element has append off)",
    ),
    NovaStep(
        "spawn",
        "domain XML",
        f"{_DRIVER}:_get_guest_xml, _get_guest_config;"
        " nova/virt/libvirt/config.py:LibvirtConfigGuest",
        "guest.get_guest_config, guest.to_xml (templates/domain.xml.j2)",
        "a Jinja template over typed data; libvirt.xml written in the instance dir"
        " (ours: Nova stopped in 15.0.0); no cpu mode under qemu (Nova: host-model)",
    ),
    NovaStep(
        "spawn",
        "define and start",
        f"{_DRIVER}:_create_guest_with_network, _create_guest;"
        " nova/virt/libvirt/guest.py:Guest.create, Guest.launch",
        "host.Host.define, post-XML hook, vif.launch_with_network",
    ),
    NovaStep(
        "spawn",
        "plug the VIF, wait for it paused",
        f"{_DRIVER}:_create_guest_with_network, _get_neutron_events, plug_vifs;"
        " nova/virt/libvirt/vif.py:LibvirtGenericVIFDriver.plug",
        "vif.plug_vifs, vif.launch_with_network",
        "no Neutron: plugged is the network or bridge found active, and the event the"
        " VIF's host end found (QEMU on the forwarded port, the tap); no pause under"
        " libvirt's test driver",
    ),
    NovaStep(
        "spawn",
        "config drive",
        f"{_DRIVER}:_create_configdrive; nova/virt/configdrive.py:ConfigDriveBuilder",
        "driver.LibvirtDriver (post-XML hook), configdrive.make_drive",
        "ISO 9660 built in Python (pycdlib), vfat with mtools: no genisoimage, no mount",
    ),
    NovaStep(
        "spawn",
        "wait for RUNNING",
        f"{_DRIVER}:LibvirtDriver.spawn's _wait_for_boot (FixedIntervalLoopingCall, 0.5 s)",
        "driver.LibvirtDriver.wait_for_running",
        "a deadline (instance_build_timeout 300; Nova's default 0: none); a lifecycle"
        " event ends the wait early",
    ),
    NovaStep(
        "destroy",
        "stop, undefine, remove disks",
        f"{_DRIVER}:destroy, _destroy, cleanup, _undefine_domain, _cleanup_rbd;"
        " nova/storage/rbd_utils.py:RBDDriver.cleanup_volumes",
        "driver.LibvirtDriver.destroy, imagebackend.cleanup_rbd,"
        " rbd_utils.RBDDriver.cleanup_volumes",
        "the state record and the forwarded port are freed here too",
    ),
    NovaStep(
        "power",
        "stop",
        f"{_DRIVER}:power_off, _clean_shutdown",
        "driver.LibvirtDriver.power_off",
        "one ACPI request (Nova sends it again every shutdown_retry_interval, 10 s);"
        " the timeout is 60 s as Nova's shutdown_timeout",
    ),
    NovaStep(
        "power",
        "start",
        f"{_DRIVER}:power_on (_hard_reboot, _get_guest_xml, _create_images_and_backing)",
        "driver.LibvirtDriver.power_on, power.py, instance_xml.py, backing.py",
        "a hard reboot: the XML generated again from the record and the image metadata"
        " kept at boot, missing disks and bases made again; defined over the stopped"
        " domain (Nova undefines it first); a record that cannot be generated faithfully"
        " keeps its definition, with a warning; a suspended instance's start restores"
        " its saved memory",
    ),
    NovaStep(
        "power",
        "reboot",
        f"{_DRIVER}:reboot, _soft_reboot, _hard_reboot, _get_guest_xml, _create_images_and_backing",
        "driver.LibvirtDriver.reboot, power.py, instance_xml.py, backing.py",
        "soft: as Nova, hard after wait_soft_reboot_seconds; hard: as start (the XML"
        " generated again, missing disks and bases made again)",
    ),
    NovaStep(
        "power",
        "power state sync",
        "nova/compute/manager.py:_sync_power_states, _sync_instance_power_state,"
        " handle_lifecycle_event",
        "power_sync.py",
        "at the start of each command on instances and on lifecycle events, not"
        " periodically; records only, never stops a guest Nova would stop",
    ),
    NovaStep(
        "snapshot",
        "root disk to a new image",
        f"{_DRIVER}:snapshot, _live_snapshot; {_BACKEND}:Rbd.direct_snapshot, Rbd._get_parent_pool",
        "driver.LibvirtDriver.snapshot, snapshot.py, imagebackend.Rbd.parent_pool",
        "into the local image store; an RBD root's standard snapshot (no parent pool) read"
        " from an RBD snapshot of it, the guest running on (Nova saves and stops it)",
    ),
    NovaStep(
        "suspend",
        "memory saved, domain stopped",
        f"{_DRIVER}:suspend; nova/virt/libvirt/guest.py:Guest.save_memory_state",
        "driver.LibvirtDriver.suspend",
        "no PCI or mediated devices to detach",
    ),
    NovaStep(
        "resume",
        "domain started from its saved memory",
        f"{_DRIVER}:resume",
        "driver.LibvirtDriver.resume",
        "starts the managed save; Nova defines its existing XML again first",
    ),
    NovaStep(
        "rescue",
        "rescue disk first, root second",
        f"{_DRIVER}:rescue; nova/virt/libvirt/blockinfo.py:_get_rescue_disk_mapping",
        "rescue.rescue",
        "legacy rescue only (no hw_rescue_* stable device rescue, no rescue kernel, ramdisk"
        " or password); disk.config.rescue is a copy of disk.config (Nova builds it again)",
    ),
    NovaStep(
        "unrescue",
        "the kept unrescue.xml defined and started",
        f"{_DRIVER}:unrescue",
        "rescue.unrescue",
    ),
    NovaStep(
        "resize",
        "power off, <dir>_resize, disks for the new flavor",
        f"{_DRIVER}:migrate_disk_and_power_off, finish_migration",
        "resize.resize",
        "this host only; the root copied with its backing file and grown by qemu-img resize"
        " (Nova: copied, then grown by _create_image); a new ephemeral disk (Nova copies it)",
    ),
    NovaStep(
        "resize",
        "confirm: <dir>_resize removed",
        f"{_DRIVER}:confirm_migration, _cleanup_resize",
        "resize.confirm_resize",
    ),
    NovaStep(
        "resize",
        "revert: <dir>_resize back, the old definition",
        f"{_DRIVER}:finish_revert_migration",
        "resize.revert_resize",
        "defines the definition the domain had (Nova makes the XML again from the old"
        " flavor); started when the resized guest runs (Nova: when it ran before)",
    ),
    NovaStep(
        "migrate",
        "power off and undefine here; define and start there, disks where they are",
        f"{_DRIVER}:migrate_disk_and_power_off, finish_migration, _is_path_shared_with;"
        " nova/compute/manager.py:prep_resize, resize_instance, finish_resize",
        "cold_migration.migrate",
        "shared storage only (every disk in Ceph, or the shared-storage check); nothing"
        " copied; the source's domain undefined at once (Nova: at the confirm); a new"
        " forwarded port for a user-mode NIC; no resize snapshot of an RBD root",
    ),
    NovaStep(
        "migrate",
        "confirm: the source's leftovers removed",
        f"{_DRIVER}:confirm_migration, _cleanup_resize; nova/compute/manager.py:confirm_resize",
        "cold_migration.confirm_migration (resize-confirm)",
        "the source's domain is undefined by migrate already; a definition of it still"
        " there is removed",
    ),
    NovaStep(
        "migrate",
        "revert: stopped and undefined there, defined and started here again",
        f"{_DRIVER}:finish_revert_migration; nova/compute/manager.py:revert_resize,"
        " finish_revert_resize",
        "cold_migration.revert_migration (resize-revert)",
        "defines the definition the domain has (Nova makes the XML again); no RBD rollback:"
        " the disks keep what the guest wrote there; started when the migrated guest runs"
        " (Nova: when it ran before)",
    ),
    NovaStep(
        "shelve",
        "power off, snapshot, offload",
        "nova/compute/manager.py:_shelve_instance, _shelve_offload_instance",
        "shelve.shelve",
        "always offloaded at once (Nova's default shelved_offload_time = 0); the forwarded"
        " port freed",
    ),
    NovaStep(
        "unshelve",
        "spawn from the shelve image, the image deleted",
        "nova/compute/manager.py:_unshelve_instance",
        "shelve.unshelve",
        "a new domain name, MAC and port (Nova keeps name and ports); the config drive"
        " built again from the record, without boot-time user data, metadata or hostname",
    ),
    NovaStep(
        "attach",
        "a volume into the guest",
        f"{_DRIVER}:attach_volume",
        "block_device.BlockDeviceManager, driver.LibvirtDriver.attach_volume",
        "volumes from our own volume service (Cinder's role)",
    ),
    NovaStep(
        "detach",
        "a volume out of the guest",
        f"{_DRIVER}:detach_volume, _detach_with_retry",
        "block_device.BlockDeviceManager, driver.LibvirtDriver.detach_volume",
    ),
    NovaStep(
        "console",
        "the live serial console, read-write",
        f"{_DRIVER}:get_serial_console, _create_serial_consoles;"
        " nova/console/websocketproxy.py:NovaProxyRequestHandler",
        "serial_console.SerialConsole, cli/attach.py (console --attach)",
        "libvirt's virDomainOpenConsole on the pty serial, in the terminal; Nova gives"
        " the guest TCP serial ports instead ([serial_console] enabled, default off) and"
        " nova-serialproxy relays one to a websocket client",
    ),
    NovaStep(
        "image cache",
        "unused _base files removed",
        "nova/virt/libvirt/imagecache.py:ImageCacheManager.update;"
        " nova/compute/manager.py:_run_image_cache_manager_pass",
        "imagecache.ImageCacheManager.update (cache clean)",
    ),
)


def steps_of(operation: str) -> tuple[NovaStep, ...]:
    return tuple(s for s in NOVA_STEPS if s.operation == operation)


def step(name: str, operation: str = "spawn") -> NovaStep:
    """The step called ``name`` (one of the constants above); KeyError if none."""
    for s in steps_of(operation):
        if s.step == name:
            return s
    raise KeyError(f"no {operation} step {name!r} in nova_map")


def markdown_table() -> str:
    """The README's table, one row per step of :data:`NOVA_STEPS`."""
    lines = [
        "| Operation | Step | Nova (file:function) | minidriver | Where minidriver differs |",
        "|---|---|---|---|---|",
    ]
    for s in NOVA_STEPS:
        cells = (s.operation, s.step, f"`{s.nova}`", f"`{s.minidriver}`", s.differs or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def text_table(operation: str = "spawn") -> str:
    """``explain --nova``'s lines: each step, the Nova function beside it, and what
    minidriver does otherwise."""
    lines = []
    for s in steps_of(operation):
        lines.append(f"  {s.step:<32} {s.nova}")
        if s.differs:
            lines.append(f"  {'':<32} differs: {s.differs}")
    return "\n".join(lines)
