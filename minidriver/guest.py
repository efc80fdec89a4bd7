"""The domain XML (nova/virt/libvirt/config.py, driver._get_guest_xml); Jinja lays it out.

Nova's ``_get_guest_xml`` builds LibvirtConfigGuest objects; here ``get_guest_config``
builds a frozen ``GuestConfig`` and ``to_xml`` renders it with autoescape and
StrictUndefined, then parses the result with lxml at once, so that malformed XML
never reaches libvirt.
"""

from __future__ import annotations

import errno
import mmap
import os
import platform
import threading
import uuid as uuidlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from xml.parsers import expat

from minidriver import guestagent
from minidriver.exception import MinidriverError, UnsupportedHardware
from minidriver.fileutils import PRIVATE_DIR, make_dir
from minidriver.guestos import KVM_TIMERS, GuestOS, GuestTimer, get_guest_os
from minidriver.network import GUEST_SSH_PORT, VIF, NetworkMode
from minidriver.objects import DeviceType, DiskInfo, Flavor, Instance
from minidriver.sysinfo import GuestSysinfo, get_guest_sysinfo

if TYPE_CHECKING:
    import jinja2
    from lxml import etree

METADATA_NAMESPACE = "urn:minidriver:instance:1"
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
# libvirt marks a domain with QEMU arguments it does not manage "tainted: custom-argv".
CUSTOM_ARGV_TAINT = "custom-argv"
# Attached volumes get explicit PCI slots above the user-mode NIC's (libvirt's own
# assignment would walk into it, QEMU then refusing the device): 0x11 to 0x1f, the
# last slot of the root bus. So at most 15 volumes are attached to one instance.
VOLUME_PCI_SLOTS = range(0x11, 0x20)
# The user-mode NIC is given to QEMU directly, so libvirt does not know its PCI slot and
# may not skip it: it is put where libvirt's own assignment never reaches. libvirt
# fills slots upwards from the lowest free one (pc: 0x01 is the PIIX3, then 0x02...);
# the most a flavor and a config drive can add is four virtio disks and the balloon,
# so 0x10 leaves room for eleven more devices before a collision could happen.
USER_NIC_PCI_SLOT = 0x10
USER_NETDEV_ID = "minidriver-net0"
USER_NIC_ID = "minidriver-nic0"


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
class PciAddress:
    """A device's place on the PCI root bus (libvirt's ``<address type='pci'>``)."""

    slot: int
    domain: str = "0x0000"
    bus: str = "0x00"
    function: str = "0x0"

    @property
    def slot_hex(self) -> str:
        return f"{self.slot:#04x}"


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
    serial: str | None = None  # a volume's id, as Nova sets it (the guest's disk by-id)
    pci_address: PciAddress | None = None  # None: libvirt chooses


@dataclass(frozen=True)
class StoragePoolConfig:
    """A libvirt ``dir`` storage pool (the volume service's pool backend)."""

    name: str
    path: str
    mode: str = "0711"  # the daemon's QEMU runs as another user: traverse only


@dataclass(frozen=True)
class StorageVolConfig:
    """A raw, sparse volume of a storage pool."""

    name: str
    capacity: int  # bytes


@dataclass(frozen=True)
class GuestInterface:
    """A NIC libvirt manages (Nova's ``LibvirtConfigGuestInterface``)."""

    net_type: str  # network | bridge
    source: str  # the network's or the bridge's name
    mac_address: str
    model: str = "virtio"


@dataclass(frozen=True)
class GuestMetadata:
    display_name: str
    instance_uuid: str
    state_id: str
    created_at: str
    flavor: Flavor
    image_id: str
    namespace: str = METADATA_NAMESPACE


# hw_vif_model: the x86 PCI NICs among the models Nova allows for kvm and qemu
# (nova/virt/libvirt/vif.py SUPPORTED_VIF_MODELS), each with its QEMU device (the
# user-mode NIC is given to QEMU directly).
VIF_MODELS: Mapping[str, str] = {
    "virtio": "virtio-net-pci",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
    "ne2k_pci": "ne2k_pci",
    "pcnet": "pcnet",
}


@dataclass(frozen=True)
class GuestChannel:
    """A virtio-serial channel (Nova's ``LibvirtConfigGuestChannel``): the guest
    agent's, on a UNIX socket of the host."""

    target_name: str
    source_path: str | None  # None: libvirt chooses the socket's path


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
    os: GuestOS = field(default_factory=GuestOS)
    interfaces: tuple[GuestInterface, ...] = ()
    channels: tuple[GuestChannel, ...] = ()
    sysinfo: GuestSysinfo | None = None  # and <smbios mode="sysinfo"/> in <os>
    timers: tuple[GuestTimer, ...] = ()
    # Extra QEMU arguments (libvirt's QEMU namespace): the user-mode NIC.
    qemu_args: tuple[str, ...] = ()
    qemu_namespace: str = QEMU_NAMESPACE

    @property
    def taints(self) -> tuple[str, ...]:
        """What libvirt will mark the running domain with."""
        return (CUSTOM_ARGV_TAINT,) if self.qemu_args else ()


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
    """host-model under kvm, no <cpu> element (QEMU's default model) under TCG.

    Our choice under TCG: Nova's empty ``cpu_mode`` means host-model under qemu too
    (``_get_guest_cpu_model_config``). TCG emulates the host's model only in part
    (QEMU warns of each feature it lacks), while its default model is one it emulates
    whole, so a guest sees the same CPU on every host a CI run lands on."""
    mode = configured or ("host-model" if virt_type == "kvm" else "none")
    return None if mode == "none" else mode


# QEMU's cache mode for RBD disks sets librbd's cache: writeback, as Ceph advises for
# QEMU (librbd stays write-through until the guest's first flush). O_DIRECT, which
# decides the mode of files, means nothing to a network disk.
NETWORK_DISK_CACHE = "writeback"


@dataclass(frozen=True)
class GuestVolume:
    """A volume among the disks of a new domain (a root volume, or an attached one
    when a hard reboot generates the XML again): its file or its network source, its
    id as the disk's serial, and the PCI slot its attach gave it (None: libvirt's)."""

    path: str
    network: NetworkSource | None
    serial: str
    pci_address: PciAddress | None = None


def get_guest_disks(
    instance_dir: Path,
    disk_info: DiskInfo,
    disk_formats: dict[str, str],
    cache: str,
    network_disks: Mapping[str, NetworkSource] | None = None,
    *,
    volumes: Mapping[str, GuestVolume] | None = None,
    file_paths: Mapping[str, str] | None = None,
) -> tuple[GuestDisk, ...]:
    """Every disk of ``disk_info``; those named in ``network_disks`` are network disks,
    those in ``volumes`` volumes, those in ``file_paths`` files outside
    ``instance_dir`` (a template clone's shared config drive)."""
    network_disks = network_disks or {}
    volumes = volumes or {}
    file_paths = file_paths or {}
    disks = []
    for m in disk_info:
        volume = volumes.get(m.name)
        if volume is not None:
            disks.append(
                get_volume_disk(
                    volume.path,
                    disk_formats[m.name],
                    network=volume.network,
                    dev=m.dev,
                    bus=m.bus.value,
                    cache=cache,
                    serial=volume.serial,
                    # A root volume's None: at boot libvirt's own slots stay below the NIC's.
                    pci_address=volume.pci_address,
                )
            )
            continue
        network = network_disks.get(m.name)
        disks.append(
            GuestDisk(
                source_path=(
                    f"{network.protocol}:{network.name}"
                    if network
                    else file_paths.get(m.name) or os.fspath(instance_dir / m.name)
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


def get_vif_model(image_properties: Mapping[str, str]) -> str:
    """The image's ``hw_vif_model``, else virtio (Nova's default for kvm and qemu)."""
    model = image_properties.get("hw_vif_model", "virtio")
    if model not in VIF_MODELS:
        raise UnsupportedHardware(
            f"hw_vif_model = {model!r} is not supported",
            hint=f"use one of: {', '.join(sorted(VIF_MODELS))}",
        )
    return model


def parse_xml(xml: str) -> etree._Element:
    """lxml's tree of an XML document libvirt gave (a domain's, the capabilities).
    lxml is imported here, on first use: a boot reads no XML back, and the import
    would cost it about 4 ms (issue 17)."""
    from lxml import etree  # noqa: PLC0415 - see the docstring

    return etree.fromstring(xml.encode())


def xml_text(element: etree._Element) -> str:
    """An element of :func:`parse_xml`'s tree, as XML text."""
    from lxml import etree  # noqa: PLC0415 - see parse_xml

    return etree.tostring(element, encoding="unicode")


def machine_type_of(domain_xml: str) -> str:
    """The machine type a domain was defined with (libvirt's expansion: pc-i440fx-7.2)."""
    os_type = parse_xml(domain_xml).find("os/type")
    return os_type.get("machine", "") if os_type is not None else ""


def pci_root_bus(machine_type: str) -> str:
    """The id libvirt gives QEMU's root PCI bus: pcie.0 on q35, pci.0 on pc."""
    return "pcie.0" if "q35" in machine_type else "pci.0"


def user_network_args(vif: VIF, machine_type: str, model: str = "virtio") -> tuple[str, ...]:
    """QEMU's user network with the guest's SSH port forwarded from 127.0.0.1 only, and a
    NIC of ``model`` on it with the VIF's MAC at a fixed PCI address. ``romfile=`` (none):
    the guest boots from disk, and QEMU has no iPXE ROM here without ipxe-qemu."""
    if vif.forward_port is None:
        raise ValueError("a user-mode VIF needs its forwarded port")
    device = (
        f"{VIF_MODELS[model]},netdev={USER_NETDEV_ID},id={USER_NIC_ID},mac={vif.mac_address},"
        f"bus={pci_root_bus(machine_type)},addr={USER_NIC_PCI_SLOT:#x},romfile="
    )
    return ("-netdev", _user_netdev(vif.forward_port), "-device", device)


def _user_netdev(forward_port: int) -> str:
    return f"user,id={USER_NETDEV_ID},hostfwd=tcp:127.0.0.1:{forward_port}-:{GUEST_SSH_PORT}"


def with_forward_port(domain_xml: str, forward_port: int) -> str:
    """The domain's XML with its user network's SSH forwarded from ``forward_port``
    instead: ``start`` found the old port taken while the instance was stopped."""
    tree = parse_xml(domain_xml)
    for arg in tree.iterfind(f"{{{QEMU_NAMESPACE}}}commandline/{{{QEMU_NAMESPACE}}}arg"):
        if arg.get("value", "").startswith(f"user,id={USER_NETDEV_ID},"):
            arg.set("value", _user_netdev(forward_port))
            return xml_text(tree)
    raise ValueError("the domain has no user-mode NIC")


def get_guest_interfaces(vif: VIF | None, model: str = "virtio") -> tuple[GuestInterface, ...]:
    if vif is None or vif.mode not in (NetworkMode.NETWORK, NetworkMode.BRIDGE):
        return ()
    return (GuestInterface(str(vif.mode), vif.source, vif.mac_address, model),)


def get_guest_channels(
    instance: Instance, image_properties: Mapping[str, str], socket_dir: Path | None
) -> tuple[GuestChannel, ...]:
    """The guest agent's channel when the image asks for it, as Nova adds it. An
    explicit socket path short enough for a UNIX socket (107 bytes): libvirt's own,
    under a long embedded root, would not be."""
    if not guestagent.wants_guest_agent(image_properties):
        return ()
    path = os.fspath(socket_dir / f"{instance.uuid}.qga.sock") if socket_dir else None
    return (GuestChannel(guestagent.CHANNEL_NAME, path),)


def get_guest_config(
    instance: Instance,
    disk_info: DiskInfo,
    disk_formats: dict[str, str],
    *,
    instance_dir: Path,
    machine_type: str,
    cpu_mode: str,
    state_id: str,
    sysinfo_serial: str = "unique",
    cache: str | None = None,
    os_command_line: str = "",
    vif: VIF | None = None,
    network_disks: Mapping[str, NetworkSource] | None = None,
    image_properties: Mapping[str, str] | None = None,
    agent_socket_dir: Path | None = None,
    volumes: Mapping[str, GuestVolume] | None = None,
    file_paths: Mapping[str, str] | None = None,
) -> GuestConfig:
    """Every decision about the domain, made here in Python. ``network_disks``: the
    disks (by disk_info name) that live in Ceph rather than in ``instance_dir``;
    ``file_paths``: the files (disks, ``kernel``, ``ramdisk``) that live elsewhere.
    ``image_properties`` with ``hw_qemu_guest_agent=yes``: the agent's channel, its
    socket in ``agent_socket_dir`` (None: where libvirt puts it). An x86 guest gets
    Nova's SMBIOS sysinfo; under kvm, Nova's timers."""
    user = vif is not None and vif.mode is NetworkMode.USER
    vif_model = get_vif_model(image_properties or {})
    x86 = platform.machine() in ("x86_64", "i686")
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
            volumes=volumes,
            file_paths=file_paths,
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
        os=get_guest_os(instance, disk_info, instance_dir, os_command_line, file_paths),
        interfaces=get_guest_interfaces(vif, vif_model),
        channels=get_guest_channels(instance, image_properties or {}, agent_socket_dir),
        sysinfo=get_guest_sysinfo(instance.uuid, sysinfo_serial) if x86 else None,
        timers=KVM_TIMERS if instance.virt_type == "kvm" and x86 else (),
        qemu_args=(
            user_network_args(vif, machine_type, vif_model) if vif is not None and user else ()
        ),
    )


# One environment per cache dir, made once even when a spawn's loader thread and its
# own thread ask at once (see load_template).
_ENVIRONMENTS: dict[Path | None, jinja2.Environment] = {}
_ENVIRONMENTS_LOCK = threading.Lock()


def _environment(cache_dir: Path | None = None) -> jinja2.Environment:
    with _ENVIRONMENTS_LOCK:
        environment = _ENVIRONMENTS.get(cache_dir)
        if environment is None:
            environment = _ENVIRONMENTS[cache_dir] = _make_environment(cache_dir)
    return environment


def _make_environment(cache_dir: Path | None) -> jinja2.Environment:
    """Jinja's environment; with ``cache_dir``, templates compiled once are kept there.

    Compiling domain.xml.j2 costs each ``minidriver boot`` 10 to 20 ms (scripts/bench's
    machine), loading it compiled 0.3 ms. Jinja's own bytecode cache, rather than a
    template compiled at install: it recompiles when the template's source, Jinja or
    Python changes, and an editable install works the same. Its files hold code that
    is run, so the directory is private (0700; Jinja writes them 0600).
    """
    import jinja2  # noqa: PLC0415 - ~12 ms: paid by the commands that render XML only

    bytecode_cache = None
    if cache_dir is not None:
        make_dir(cache_dir, PRIVATE_DIR)
        bytecode_cache = jinja2.FileSystemBytecodeCache(os.fspath(cache_dir))
    return jinja2.Environment(
        loader=jinja2.PackageLoader("minidriver.templates", "."),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        bytecode_cache=bytecode_cache,
    )


@dataclass(frozen=True)
class Owner:
    """Who defined a domain, from its minidriver metadata element."""

    state_id: str
    instance_uuid: str
    display_name: str


def owner_of(domain_xml: str) -> Owner | None:
    """The owner recorded in a domain's XML; None for a domain minidriver did not make."""
    tree = parse_xml(domain_xml)
    element = tree.find(f"metadata/{{{METADATA_NAMESPACE}}}instance")
    if element is None:
        return None

    def text(tag: str) -> str:
        return element.findtext(f"{{{METADATA_NAMESPACE}}}{tag}") or ""

    return Owner(text("state-id"), text("instance-uuid"), text("display-name"))


def get_all_disks(domain_xml: str, *, volumes: bool = True) -> dict[str, str]:
    """Nova's ``Guest.get_all_disks``: {path: format}, a network disk as
    ``<protocol>:<pool/name>`` (``rbd:pool/uuid_disk``). ``volumes=False``: the
    instance's own disks only (a volume's ``<disk>`` carries its id as ``<serial>``)."""
    disks = {}
    for disk in parse_xml(domain_xml).iterfind("devices/disk"):
        source, driver = disk.find("source"), disk.find("driver")
        if source is None:
            continue  # an empty cdrom drive
        if not volumes and disk.find("serial") is not None:
            continue
        if disk.get("type") == "network":
            path = f"{source.get('protocol')}:{source.get('name')}"
        else:
            path = source.get("file") or source.get("dev") or ""
        if path:
            disks[path] = driver.get("type", "raw") if driver is not None else "raw"
    return disks


# domain.xml.j2 and the macro it imports (which Jinja loads at the render).
DOMAIN_TEMPLATES = ("domain.xml.j2", "disk.xml.j2")


def load_templates(templates: Iterable[str], *, cache_dir: Path | None = None) -> None:
    """Jinja imported and ``templates`` loaded (from ``cache_dir`` once compiled), ahead
    of their render: a spawn loads the domain's while its disks are made (see
    ``driver.loading_xml_template``)."""
    environment = _environment(cache_dir)
    for template in templates:
        environment.get_template(template)


def render_xml(template: str, *, cache_dir: Path | None = None, **values: object) -> str:
    """Render one of the XML templates and prove it well formed before anyone sees it.

    ``cache_dir``: where the compiled template is kept between processes (see
    :func:`_environment`)."""
    text = _environment(cache_dir).get_template(template).render(**values)
    check_well_formed(text, f"rendered {template}")
    return text


def check_well_formed(text: str, what: str) -> None:
    """Raise GuestXMLError unless ``text`` is well-formed XML with its namespace
    prefixes declared. expat (the standard library's C parser) checks it: lxml's
    import would cost a boot about 4 ms (issue 17)."""
    try:
        expat.ParserCreate(namespace_separator=" ").Parse(text, True)
    except expat.ExpatError as exc:
        raise GuestXMLError(f"{what} is not well formed: {exc}") from exc


def to_xml(config: GuestConfig, *, cache_dir: Path | None = None) -> str:
    """The domain XML of a GuestConfig."""
    return render_xml("domain.xml.j2", cache_dir=cache_dir, g=config)


def disk_to_xml(disk: GuestDisk) -> str:
    """One ``<disk>`` device, as ``virDomainAttachDeviceFlags`` takes it."""
    return render_xml("disk.xml.j2", attach=disk)


class NoFreePciSlot(MinidriverError):
    """Every PCI slot for attached volumes is taken."""


def get_volume_disk(
    path: str,
    driver_format: str,
    *,
    network: NetworkSource | None,
    dev: str,
    bus: str,
    cache: str,
    serial: str,
    pci_address: PciAddress | None,
) -> GuestDisk:
    """Nova's ``_get_volume_config``: a volume's ``<disk>``, its serial the volume id."""
    return GuestDisk(
        source_path=f"{network.protocol}:{network.name}" if network else path,
        driver_type=driver_format,
        device=DeviceType.DISK,
        target_dev=dev,
        target_bus=bus,
        cache=NETWORK_DISK_CACHE if network else cache,
        network=network,
        serial=serial,
        pci_address=pci_address,
    )


def used_pci_slots(domain_xml: str) -> set[int]:
    """The slots the domain's devices take on the root PCI bus, from its XML, and the
    user-mode NIC's, which its XML shows only as a QEMU argument."""
    tree = parse_xml(domain_xml)
    slots = {
        int(a.get("slot", "0"), 16)
        for a in tree.iterfind("devices//address[@type='pci']")
        if int(a.get("bus", "0"), 16) == 0
    }
    if tree.find(f"{{{QEMU_NAMESPACE}}}commandline") is not None:
        slots.add(USER_NIC_PCI_SLOT)
    return slots


def free_volume_pci_address(*domain_xmls: str, machine_type: str) -> PciAddress | None:
    """A slot for a volume free in every one of the XMLs (the live domain's and its
    definition's). None on q35: there libvirt hot-plugs into PCIe root ports, away
    from the root bus the NIC sits on."""
    if "q35" in machine_type:
        return None
    used: set[int] = set()
    for xml in domain_xmls:
        used |= used_pci_slots(xml)
    for slot in VOLUME_PCI_SLOTS:
        if slot not in used:
            return PciAddress(slot)
    raise NoFreePciSlot(
        f"all {len(VOLUME_PCI_SLOTS)} PCI slots for volumes"
        f" ({VOLUME_PCI_SLOTS[0]:#x} to {VOLUME_PCI_SLOTS[-1]:#x}) are taken",
        hint="detach a volume first: an instance has at most"
        f" {len(VOLUME_PCI_SLOTS)} attached volumes",
    )


def disk_targets(domain_xml: str) -> list[str]:
    """The target devs of the domain's disks (vda, hdd...)."""
    tree = parse_xml(domain_xml)
    return [t.get("dev", "") for t in tree.iterfind("devices/disk/target")]


def find_disk_xml(domain_xml: str, dev: str) -> str | None:
    """The ``<disk>`` element whose target is ``dev``, as libvirt wrote it (with its
    alias and address: what a detach must name); None when there is none."""
    tree = parse_xml(domain_xml)
    for disk in tree.iterfind("devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") == dev:
            return xml_text(disk)
    return None
