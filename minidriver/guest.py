"""The domain XML: Python decides, ``templates/domain.xml.j2`` lays typed data out.

Nova's ``_get_guest_xml`` builds LibvirtConfigGuest objects; here ``get_guest_config``
builds a frozen ``GuestConfig`` and ``to_xml`` renders it with autoescape and
StrictUndefined, then parses the result with lxml at once, so that malformed XML
never reaches libvirt.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import platform
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jinja2
from lxml import etree

from minidriver.exception import MinidriverError
from minidriver.objects import DeviceType, DiskInfo, Flavor, Instance

METADATA_NAMESPACE = "urn:minidriver:instance:1"


@dataclass(frozen=True)
class NetworkHost:
    name: str
    port: str


@dataclass(frozen=True)
class NetworkSource:
    """A disk QEMU reaches over the network (Nova's ``source_type = network``): an
    RBD image ``pool/name`` through the cluster's monitors, with cephx auth when a
    libvirt secret holds the user's key."""

    protocol: str  # rbd
    name: str  # pool/image
    hosts: tuple[NetworkHost, ...]
    auth_username: str | None = None
    secret_uuid: str | None = None
    secret_type: str = "ceph"  # noqa: S105 - libvirt's kind of secret, not a password


@dataclass(frozen=True)
class GuestDisk:
    source_path: str  # the file; for a network disk, how disk.info names it
    driver_type: str  # qcow2, raw
    device: DeviceType
    target_dev: str
    target_bus: str
    cache: str
    readonly: bool = False
    network: NetworkSource | None = None


@dataclass(frozen=True)
class GuestMetadata:
    display_name: str
    instance_uuid: str
    state_id: str
    created_at: str
    flavor: Flavor
    image_id: str
    namespace: str = METADATA_NAMESPACE


@dataclass(frozen=True)
class GuestConfig:
    virt_type: str
    name: str
    uuid: str
    memory_kib: int
    vcpus: int
    arch: str
    machine_type: str
    cpu_mode: str | None
    disks: tuple[GuestDisk, ...]
    console_log: str
    metadata: GuestMetadata


class GuestXMLError(MinidriverError):
    """The rendered domain XML is not well formed (a bug, or input that escaped)."""


def supports_direct_io(dirpath: Path) -> bool:
    """Whether files in ``dirpath`` can be opened with O_DIRECT (not on tmpfs)."""
    probe = dirpath / f".directio.{uuidlib.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    try:
        buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
        os.write(fd, buf)
        return True
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def disk_cachemode(instance_dir: Path) -> str:
    """Nova's choice: bypass the host page cache where the filesystem allows it."""
    return "none" if supports_direct_io(instance_dir) else "writeback"


def default_cpu_mode(virt_type: str, configured: str) -> str | None:
    """host-model under kvm, no <cpu> element (QEMU's default model) under TCG."""
    mode = configured or ("host-model" if virt_type == "kvm" else "none")
    return None if mode == "none" else mode


# QEMU's cache mode for RBD disks sets librbd's cache: writeback, as Ceph advises for
# QEMU (librbd stays write-through until the guest's first flush). O_DIRECT, which
# decides the mode of files, means nothing to a network disk.
NETWORK_DISK_CACHE = "writeback"


def get_guest_disks(
    instance_dir: Path,
    disk_info: DiskInfo,
    disk_formats: dict[str, str],
    cache: str,
    network_disks: Mapping[str, NetworkSource] | None = None,
) -> tuple[GuestDisk, ...]:
    """Every disk of ``disk_info``; those named in ``network_disks`` are network disks."""
    network_disks = network_disks or {}
    disks = []
    for m in disk_info:
        network = network_disks.get(m.name)
        disks.append(
            GuestDisk(
                source_path=(
                    f"{network.protocol}:{network.name}"
                    if network
                    else os.fspath(instance_dir / m.name)
                ),
                driver_type=disk_formats[m.name],
                device=m.type,
                target_dev=m.dev,
                target_bus=m.bus.value,
                cache=NETWORK_DISK_CACHE if network else cache,
                readonly=m.type is DeviceType.CDROM,
                network=network,
            )
        )
    return tuple(disks)


def get_guest_config(
    instance: Instance,
    disk_info: DiskInfo,
    disk_formats: dict[str, str],
    *,
    instance_dir: Path,
    machine_type: str,
    cpu_mode: str,
    state_id: str,
    cache: str | None = None,
    network_disks: Mapping[str, NetworkSource] | None = None,
) -> GuestConfig:
    """Every decision about the domain, made here in Python. ``network_disks``: the
    disks (by disk_info name) that live in Ceph rather than in ``instance_dir``."""
    return GuestConfig(
        virt_type=instance.virt_type,
        name=instance.name,
        uuid=instance.uuid,
        memory_kib=instance.flavor.memory_mb * 1024,
        vcpus=instance.flavor.vcpus,
        arch=platform.machine(),
        machine_type=machine_type,
        cpu_mode=default_cpu_mode(instance.virt_type, cpu_mode),
        disks=get_guest_disks(
            instance_dir,
            disk_info,
            disk_formats,
            cache or disk_cachemode(instance_dir),
            network_disks,
        ),
        console_log=os.fspath(instance_dir / "console.log"),
        metadata=GuestMetadata(
            display_name=instance.display_name,
            instance_uuid=instance.uuid,
            state_id=state_id,
            created_at=instance.created_at,
            flavor=instance.flavor,
            image_id=instance.image_ref,
        ),
    )


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("minidriver.templates", "."),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


@dataclass(frozen=True)
class Owner:
    """Who defined a domain, from its minidriver metadata element."""

    state_id: str
    instance_uuid: str
    display_name: str


def owner_of(domain_xml: str) -> Owner | None:
    """The owner recorded in a domain's XML; None for a domain minidriver did not make."""
    tree = etree.fromstring(domain_xml.encode())
    element = tree.find(f"metadata/{{{METADATA_NAMESPACE}}}instance")
    if element is None:
        return None

    def text(tag: str) -> str:
        return element.findtext(f"{{{METADATA_NAMESPACE}}}{tag}") or ""

    return Owner(text("state-id"), text("instance-uuid"), text("display-name"))


def to_xml(config: GuestConfig) -> str:
    """Render the domain XML and prove it well formed before anyone sees it."""
    text = _environment().get_template("domain.xml.j2").render(g=config)
    try:
        etree.fromstring(text.encode())
    except etree.XMLSyntaxError as exc:
        raise GuestXMLError(f"rendered domain XML is not well formed: {exc}") from exc
    return text
