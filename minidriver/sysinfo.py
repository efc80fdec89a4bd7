"""The guest's SMBIOS system information (nova/virt/libvirt/driver.py:_get_guest_config_sysinfo).

Nova gives every x86 guest a ``<sysinfo type="smbios">`` and ``<smbios mode="sysinfo"/>``
in ``<os>``, so the guest's DMI tables say who made it: cloud-init's ``ds-identify``
recognises an OpenStack guest by the product name "OpenStack Nova". libvirt checks
that the sysinfo's uuid equals the domain's, so a domain whose uuid changes (a
template's clone) has its sysinfo rewritten with it (:func:`with_uuid`).
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from minidriver import __version__
from minidriver.exception import ConfigError

if TYPE_CHECKING:
    from lxml import etree

# Nova's defaults (nova/version.py: NOVA_VENDOR, NOVA_PRODUCT); the version is ours.
MANUFACTURER = "OpenStack Foundation"
PRODUCT = "OpenStack Nova"
FAMILY = "Virtual Machine"
MACHINE_ID = Path("/etc/machine-id")


@dataclass(frozen=True)
class GuestSysinfo:
    """``<sysinfo type="smbios"><system>``: Nova's ``LibvirtConfigGuestSysinfo``."""

    uuid: str
    serial: str | None  # None: no serial entry (sysinfo_serial = none)
    manufacturer: str = MANUFACTURER
    product: str = PRODUCT
    version: str = f"minidriver {__version__}"
    family: str = FAMILY


def host_os_serial(machine_id: Path = MACHINE_ID) -> str:
    """``sysinfo_serial = os``: the host's machine-id, written as a uuid."""
    try:
        text = machine_id.read_text().split()
    except FileNotFoundError:
        text = []
    if not text:
        raise ConfigError(
            f"[libvirt] sysinfo_serial = os, but {machine_id} is missing or empty",
            hint="use sysinfo_serial = unique (Nova's default), or none",
        )
    return str(uuidlib.UUID(text[0]))


def get_guest_sysinfo(instance_uuid: str, sysinfo_serial: str = "unique") -> GuestSysinfo:
    """The sysinfo of an instance; the serial as Nova's ``sysinfo_serial`` picks it."""
    if sysinfo_serial == "unique":
        serial: str | None = instance_uuid
    elif sysinfo_serial == "os":
        serial = host_os_serial()
    else:
        serial = None
    return GuestSysinfo(uuid=instance_uuid, serial=serial)


def with_uuid(tree: etree._Element, old_uuid: str, new_uuid: str) -> None:
    """Give a domain's parsed XML's sysinfo the domain's new uuid (and its serial, when
    that was the old uuid: ``sysinfo_serial = unique``)."""
    for entry in tree.iterfind("sysinfo/system/entry"):
        if entry.get("name") in ("uuid", "serial") and entry.text == old_uuid:
            entry.text = new_uuid
