"""The guest's <os> and clock timers (nova/virt/libvirt/driver.py: _set_clock, ...).

Nova's ``_set_guest_for_inst_kernel`` (a kernel boot's command line) and ``_set_clock``
(the timers); the BIOS boot order comes from ``blockinfo.get_boot_order``.

Decisions only; guest.py puts them into the ``GuestConfig`` the template lays out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from minidriver import blockinfo
from minidriver.objects import DiskInfo, Instance

# The consoles of a kernel booted directly: Nova's CONSOLE (nova/virt/libvirt/driver.py),
# and no_timer_check under virt_type = qemu, as Nova adds it there.
KERNEL_CONSOLE = "console=tty0 console=ttyS0 console=hvc0"
KERNEL_QEMU_ARGS = " no_timer_check"


@dataclass(frozen=True)
class GuestOS:
    """``<os>``: a BIOS boot from ``boot_devs`` in that order (Nova's ``os_boot_dev``),
    or a kernel given to QEMU (Nova's ``os_kernel``, ``os_initrd``, ``os_cmdline``;
    None when the BIOS boots)."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    boot_devs: tuple[str, ...] = ("hd",)


@dataclass(frozen=True)
class GuestTimer:
    """A ``<clock>`` timer (Nova's ``LibvirtConfigGuestTimer``)."""

    name: str
    tickpolicy: str | None = None
    present: str | None = None  # yes | no


# Nova's _set_kvm_timers for an x86 guest without hw_time_hpet: under kvm only; under
# qemu (TCG) the clock has no timers.
KVM_TIMERS = (
    GuestTimer("pit", tickpolicy="delay"),
    GuestTimer("rtc", tickpolicy="catchup"),
    GuestTimer("hpet", present="no"),
)


def get_guest_os(
    instance: Instance,
    disk_info: DiskInfo,
    instance_dir: Path,
    os_command_line: str = "",
    file_paths: Mapping[str, str] | None = None,
) -> GuestOS:
    """``<os>`` as Nova lays it out: with a kernel image, the copies of the kernel and
    ramdisk in the instance dir and ``root=/dev/<root disk>`` with Nova's consoles
    (``_set_guest_for_inst_kernel``), unless the image gives its own
    ``os_command_line``; otherwise the BIOS boots in ``blockinfo.get_boot_order``'s
    order (an ISO image's root: ``cdrom``). ``file_paths``: a kernel or ramdisk kept
    elsewhere (a template clone's, in its template's dir)."""
    if not instance.kernel_id:
        return GuestOS(boot_devs=blockinfo.get_boot_order(disk_info))
    paths = file_paths or {}
    return GuestOS(
        kernel=paths.get("kernel") or os.fspath(instance_dir / "kernel"),
        initrd=(paths.get("ramdisk") or os.fspath(instance_dir / "ramdisk"))
        if instance.ramdisk_id
        else None,
        cmdline=os_command_line or kernel_cmdline(instance.virt_type, disk_info.root.dev),
        boot_devs=(),
    )


def kernel_cmdline(virt_type: str, root_dev: str) -> str:
    """Nova's command line for a kernel image without ``os_command_line``."""
    extra = KERNEL_QEMU_ARGS if virt_type == "qemu" else ""
    return f"root=/dev/{root_dev} {KERNEL_CONSOLE}{extra}"
