"""Typed settings from an INI file, with Nova's option names and sections (nova/conf/).

Nova's names where Nova has the option; :data:`ORIGINS` says whose each option is
(Nova's, Glance's, Cinder's or ours) and where ours differs. Every option and its
default is listed once, in the dataclasses below. Precedence:
explicit arguments (the CLI's ``--state-dir``), then ``MINIDRIVER_STATE_DIR`` /
``MINIDRIVER_CONFIG``, then the file, then the defaults.
"""

from __future__ import annotations

import configparser
import dataclasses
import hashlib
import os
import socket
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from string import Template
from typing import Any

from minidriver.exception import ConfigError
from minidriver.objects import DEFAULT_FLAVORS, Flavor

# A UNIX socket path may hold 107 bytes; libvirt puts the QEMU monitor socket at
# <root>/lib/qemu/domain-<id>-<name, 20 chars>/monitor.sock, about 55 bytes below root.
EMBED_ROOT_MAX = 48


def default_state_path() -> str:
    if os.geteuid() == 0:
        return "/var/lib/minidriver"
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data_home, "minidriver")


def runtime_dir() -> Path:
    """This user's minidriver files that last until the host reboots.

    Root's are under /run; another user's under ``$XDG_RUNTIME_DIR``, else in /tmp
    under a name of their uid, which anyone could make first: whoever uses a path
    under it checks it (trustedpath.trusted_dir).
    """
    if os.geteuid() == 0:
        return Path("/run/minidriver")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "minidriver"
    return Path(f"/tmp/minidriver-{os.geteuid()}")


def default_port_reservations_path() -> Path:
    return runtime_dir() / "ports"


@dataclass(frozen=True)
class DefaultOptions:
    """``[DEFAULT]``"""

    state_path: str = field(default_factory=default_state_path)
    instances_path: str = "$state_path/instances"
    use_cow_images: bool = True
    force_raw_images: bool = True
    preallocate_images: str = "none"
    instance_build_timeout: int = 300
    instance_name_template: str = "instance-%08x"
    image_size_cap: int = 1024**4  # Glance's name: the largest image `image add` takes
    force_config_drive: bool = False
    config_drive_format: str = "iso9660"
    # The filesystem of ephemeral disks; empty: by the image's os_type (linux: ext4,
    # else vfat), as Nova chooses it.
    default_ephemeral_format: str = ""
    # Seconds a spawn waits, its guest paused, for its VIF to be plugged (Nova's
    # network-vif-plugged; see vif.py); 0: no wait, no pause. Fatal: the spawn fails.
    vif_plugging_timeout: int = 300
    vif_plugging_is_fatal: bool = True
    # The login `minidriver ssh` uses (Debian cloud images' cloud-init default user).
    ssh_user: str = "debian"
    # Nova's name of this host: the libvirt of [libvirt] connection_uri. Instances
    # record the host they run on; [host:NAME] sections name the others.
    host: str = field(default_factory=socket.gethostname)


@dataclass(frozen=True)
class LibvirtOptions:
    """``[libvirt]``"""

    connection_uri: str = ""  # empty: chosen at connect time (see host.py)
    virt_type: str = "auto"
    cpu_mode: str = ""  # empty: host-model under kvm, none under TCG
    hw_machine_type: str = "pc"
    # The guest's SMBIOS serial: unique (the instance's uuid), os (/etc/machine-id) or none.
    sysinfo_serial: str = "unique"
    images_type: str = "default"
    wait_interval: float = 0.5
    # Nova's: how long a soft reboot waits for the guest to shut down before it falls
    # back to a hard reboot.
    wait_soft_reboot_seconds: int = 120
    resized_base_copies: bool = False
    # Limits of every `qemu-img info` on an image (Nova's QEMU_IMG_LIMITS; 0: none).
    images_cpu_time_limit: int = 30  # seconds of CPU
    images_address_space_limit: int = 2 * 1024**3  # bytes
    # The largest virtual size an image may have (bytes); 0: only the flavor bounds it.
    images_max_virtual_size: int = 0
    # The instance's one NIC: user (QEMU's own network, the guest's port 22 forwarded
    # from 127.0.0.1), network (a libvirt network), bridge (a host bridge) or none.
    network_mode: str = "user"
    network_name: str = "default"  # for network_mode = network
    bridge: str = ""  # for network_mode = bridge
    # The host ports user mode forwards to guests' port 22 (both ends included).
    forward_port_min: int = 10022
    forward_port_max: int = 10999
    # The record of forwarded ports, shared by every state dir of the user (root's:
    # every root state dir on the host; users apart need ranges apart);
    # empty: /run/minidriver/ports as root, else $XDG_RUNTIME_DIR/minidriver/ports
    # (or /tmp/minidriver-<uid>/ports).
    port_reservations_path: str = ""
    # images_type = rbd: root disks are RBD images <instance uuid>_disk in this pool.
    images_rbd_pool: str = "rbd"
    images_rbd_ceph_conf: str = ""  # empty: librados' own search (/etc/ceph/ceph.conf...)
    rbd_user: str = ""  # the cephx user (client.<rbd_user>); empty: librados' default
    rbd_secret_uuid: str = ""  # libvirt secret of rbd_user's key: QEMU's <auth>
    rbd_connect_timeout: int = 5  # seconds to reach the cluster before a clear error
    # Nova's: seconds to wait for the guest to release a detached device, per attempt,
    # and how many times the detach is asked before a clear error.
    device_detach_timeout: int = 20
    device_detach_attempts: int = 8
    # Nova's: seconds per GiB of guest RAM (at least 2 GiB) a live migration may take
    # before it is aborted, the guest left on the source; 0: no limit.
    live_migration_completion_timeout: int = 800
    # Nova's: MiB/s a live migration may use; 0: QEMU's own choice (unlimited here).
    live_migration_bandwidth: int = 0


@dataclass(frozen=True)
class ImageCacheOptions:
    """``[image_cache]``"""

    subdirectory_name: str = "_base"
    remove_unused_base_images: bool = True
    remove_unused_original_minimum_age_seconds: int = 86400
    remove_unused_resized_minimum_age_seconds: int = 3600
    manager_interval: int = 2400  # seconds between passes of `cache clean --loop`


@dataclass(frozen=True)
class GlanceStoreOptions:
    """``[glance_store]``: Glance's rbd store, for ``image add --store rbd``.

    The cluster is the one ``[libvirt]`` names (``images_rbd_ceph_conf``, ``rbd_user``):
    a clone needs the image and the disk in the same cluster, so one host has one.
    """

    rbd_store_pool: str = "images"


@dataclass(frozen=True)
class VolumeOptions:
    """``[volume]``: the volume service (``minidriver volume``), Cinder's role.

    The RBD backend uses the cluster ``[libvirt]`` names (``images_rbd_ceph_conf``,
    ``rbd_user``), so that a volume made from an image in Ceph is a clone of it.
    """

    # rbd | pool; empty: pool on the libvirt daemon, else rbd when Ceph is configured
    # (images_type = rbd or images_rbd_ceph_conf set). Cinder's default_volume_type.
    default_backend: str = ""
    rbd_pool: str = "volumes"  # Cinder's RBD driver option rbd_pool
    # The libvirt `dir` storage pool of the pool backend; empty: one named after this
    # state dir (minidriver-<state id>-volumes), so that state dirs sharing a daemon
    # keep apart. No Cinder counterpart (Cinder's LVM driver names a volume group).
    storage_pool: str = ""
    storage_pool_path: str = "$state_path/volumes"


@dataclass(frozen=True)
class HostOptions:
    """``[host:NAME]``: another libvirt host this state dir runs instances on.

    Every other setting (paths, images_type, the Ceph cluster) is this file's: the
    hosts share the state dir, and the disks they can all reach (Ceph, or an
    instances_path every host sees at the same path).
    """

    connection_uri: str = ""


# Sections named [host:NAME]; in ORIGINS under this key.
HOST_SECTION = "host:NAME"

CHOICES: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("DEFAULT", "preallocate_images"): ("none", "space"),
    ("DEFAULT", "config_drive_format"): ("iso9660", "vfat"),
    ("DEFAULT", "default_ephemeral_format"): ("", "ext2", "ext3", "ext4", "xfs", "vfat"),
    ("libvirt", "sysinfo_serial"): ("unique", "os", "none"),
    ("libvirt", "virt_type"): ("auto", "kvm", "qemu"),
    ("libvirt", "cpu_mode"): ("", "host-model", "host-passthrough", "custom", "none"),
    ("libvirt", "images_type"): ("default", "qcow2", "raw", "flat", "rbd"),
    ("libvirt", "network_mode"): ("user", "network", "bridge", "none"),
    ("volume", "default_backend"): ("", "rbd", "pool"),
}

SECTIONS: Mapping[str, type[Any]] = {
    "DEFAULT": DefaultOptions,
    "libvirt": LibvirtOptions,
    "image_cache": ImageCacheOptions,
    "glance_store": GlanceStoreOptions,
    "volume": VolumeOptions,
}
FLAVOR_FIELDS = ("vcpus", "memory_mb", "root_gb", "ephemeral_gb", "swap")


@dataclass(frozen=True)
class OptionOrigin:
    """Whose option a setting is: ``owner`` is Nova, Glance, glance_store, Cinder or
    ours (minidriver's alone); ``differs`` says how ours differs from the owner's
    (default, unit, choices), empty when it does not."""

    owner: str
    source: str  # where the owner defines it ("" for ours)
    differs: str = ""


_NOVA_CONF = "nova/conf/compute.py"
_NOVA_LIBVIRT = "nova/conf/libvirt.py"
_NOVA_CACHE = "nova/conf/imagecache.py"
_NOVA_DRIVE = "nova/conf/configdrive.py"

# Every option, checked against its owner's source for issue 21 (Nova at 00a030403f; the
# README's table "Whose option" is made from this and a unit test keeps it so).
ORIGINS: Mapping[tuple[str, str], OptionOrigin] = {
    ("DEFAULT", "state_path"): OptionOrigin(
        "Nova", "nova/conf/paths.py", "Nova's default: $pybasedir (Nova's install dir)"
    ),
    ("DEFAULT", "instances_path"): OptionOrigin("Nova", _NOVA_CONF),
    ("DEFAULT", "use_cow_images"): OptionOrigin("Nova", _NOVA_CONF),
    ("DEFAULT", "force_raw_images"): OptionOrigin("Nova", _NOVA_CONF),
    ("DEFAULT", "preallocate_images"): OptionOrigin("Nova", _NOVA_CONF),
    ("DEFAULT", "instance_build_timeout"): OptionOrigin(
        "Nova",
        _NOVA_CONF,
        "Nova's default: 0 (no limit; its compute manager's periodic check sets the"
        " instance to ERROR); ours: 300, the deadline of wait_for_running",
    ),
    ("DEFAULT", "instance_name_template"): OptionOrigin("Nova", _NOVA_CONF),
    ("DEFAULT", "image_size_cap"): OptionOrigin(
        "Glance", "glance/common/config.py", "applied by image add, in [DEFAULT] here too"
    ),
    ("DEFAULT", "force_config_drive"): OptionOrigin("Nova", _NOVA_DRIVE),
    ("DEFAULT", "config_drive_format"): OptionOrigin("Nova", _NOVA_DRIVE),
    ("DEFAULT", "default_ephemeral_format"): OptionOrigin(
        "Nova", _NOVA_CONF, "no ntfs here (vfat instead, Nova's own default)"
    ),
    ("DEFAULT", "vif_plugging_timeout"): OptionOrigin(
        "Nova", _NOVA_CONF, "the event stood in for by the VIF's host end found up (vif.py)"
    ),
    ("DEFAULT", "vif_plugging_is_fatal"): OptionOrigin("Nova", _NOVA_CONF),
    ("DEFAULT", "ssh_user"): OptionOrigin("ours", ""),
    ("DEFAULT", "host"): OptionOrigin("Nova", "nova/conf/netconf.py"),
    ("libvirt", "connection_uri"): OptionOrigin(
        "Nova",
        _NOVA_LIBVIRT,
        "empty means, in Nova, the URI of virt_type (qemu:///system); here the system"
        " daemon, else the embedded driver, or qemu:///session for a user",
    ),
    ("libvirt", "virt_type"): OptionOrigin(
        "Nova",
        _NOVA_LIBVIRT,
        "Nova's default: kvm (also lxc, parallels); auto, our default, is ours",
    ),
    ("libvirt", "cpu_mode"): OptionOrigin(
        "Nova",
        _NOVA_LIBVIRT,
        "empty means host-model under kvm and qemu in Nova; here none under qemu (TCG)",
    ),
    ("libvirt", "hw_machine_type"): OptionOrigin(
        "Nova",
        _NOVA_LIBVIRT,
        "Nova's is a list of arch=type, unset (then pc for x86_64:"
        " nova/virt/libvirt/utils.py:get_default_machine_type); ours one type, pc",
    ),
    ("libvirt", "sysinfo_serial"): OptionOrigin(
        "Nova", _NOVA_LIBVIRT, "no hardware or auto here (they ask libvirt for the host's uuid)"
    ),
    ("libvirt", "images_type"): OptionOrigin("Nova", _NOVA_LIBVIRT, "no lvm or ploop here"),
    ("libvirt", "wait_interval"): OptionOrigin(
        "ours", "", "Nova's spawn waits at a fixed 0.5 s, in code"
    ),
    ("libvirt", "wait_soft_reboot_seconds"): OptionOrigin("Nova", _NOVA_LIBVIRT),
    ("libvirt", "resized_base_copies"): OptionOrigin(
        "ours",
        "",
        "the seeds' _base/<sha1>_<GB> chain; Nova makes one only for a disk already on one",
    ),
    ("libvirt", "images_cpu_time_limit"): OptionOrigin("Nova", _NOVA_LIBVIRT),
    ("libvirt", "images_address_space_limit"): OptionOrigin(
        "Nova", _NOVA_LIBVIRT, "in bytes here; Nova's is in GiB (default 2): the same limit"
    ),
    ("libvirt", "images_max_virtual_size"): OptionOrigin("ours", "", "no Nova option"),
    ("libvirt", "network_mode"): OptionOrigin("ours", "", "Nova's networks are Neutron's"),
    ("libvirt", "network_name"): OptionOrigin("ours", ""),
    ("libvirt", "bridge"): OptionOrigin("ours", ""),
    ("libvirt", "forward_port_min"): OptionOrigin("ours", ""),
    ("libvirt", "forward_port_max"): OptionOrigin("ours", ""),
    ("libvirt", "port_reservations_path"): OptionOrigin("ours", ""),
    ("libvirt", "images_rbd_pool"): OptionOrigin("Nova", _NOVA_LIBVIRT),
    ("libvirt", "images_rbd_ceph_conf"): OptionOrigin("Nova", _NOVA_LIBVIRT),
    ("libvirt", "rbd_user"): OptionOrigin("Nova", _NOVA_LIBVIRT),
    ("libvirt", "rbd_secret_uuid"): OptionOrigin("Nova", _NOVA_LIBVIRT),
    ("libvirt", "rbd_connect_timeout"): OptionOrigin("Nova", _NOVA_LIBVIRT),
    ("libvirt", "device_detach_timeout"): OptionOrigin("Nova", _NOVA_LIBVIRT),
    ("libvirt", "device_detach_attempts"): OptionOrigin("Nova", _NOVA_LIBVIRT),
    ("libvirt", "live_migration_completion_timeout"): OptionOrigin("Nova", _NOVA_LIBVIRT),
    ("libvirt", "live_migration_bandwidth"): OptionOrigin("Nova", _NOVA_LIBVIRT),
    ("image_cache", "subdirectory_name"): OptionOrigin("Nova", _NOVA_CACHE),
    ("image_cache", "remove_unused_base_images"): OptionOrigin("Nova", _NOVA_CACHE),
    ("image_cache", "remove_unused_original_minimum_age_seconds"): OptionOrigin(
        "Nova", _NOVA_CACHE
    ),
    ("image_cache", "remove_unused_resized_minimum_age_seconds"): OptionOrigin("Nova", _NOVA_CACHE),
    ("image_cache", "manager_interval"): OptionOrigin(
        "Nova", _NOVA_CACHE, "here the interval of cache clean --loop"
    ),
    ("glance_store", "rbd_store_pool"): OptionOrigin(
        "glance_store", "glance_store/_drivers/rbd.py"
    ),
    ("volume", "default_backend"): OptionOrigin(
        "ours", "", "in the role of Cinder's default_volume_type"
    ),
    ("volume", "rbd_pool"): OptionOrigin(
        "Cinder", "cinder/volume/drivers/rbd.py", "Cinder's default: rbd"
    ),
    ("volume", "storage_pool"): OptionOrigin("ours", ""),
    ("volume", "storage_pool_path"): OptionOrigin("ours", ""),
    (HOST_SECTION, "connection_uri"): OptionOrigin(
        "ours",
        "",
        "Nova runs a nova-compute beside each host's libvirt ([libvirt] connection_uri"
        " of each); here one state dir reaches the other hosts' libvirt by their URIs",
    ),
}


def origins_markdown() -> str:
    """The README's table "Whose option", from :data:`ORIGINS`."""
    lines = ["| Option | Whose | Where minidriver differs |", "|---|---|---|"]
    for (section, name), origin in ORIGINS.items():
        whose = f"{origin.owner} (`{origin.source}`)" if origin.source else origin.owner
        lines.append(f"| `[{section}] {name}` | {whose} | {origin.differs or '-'} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Config:
    """All settings, with the paths derived from them."""

    default: DefaultOptions = field(default_factory=DefaultOptions)
    libvirt: LibvirtOptions = field(default_factory=LibvirtOptions)
    image_cache: ImageCacheOptions = field(default_factory=ImageCacheOptions)
    glance_store: GlanceStoreOptions = field(default_factory=GlanceStoreOptions)
    volume: VolumeOptions = field(default_factory=VolumeOptions)
    flavors: Mapping[str, Flavor] = field(default_factory=lambda: dict(DEFAULT_FLAVORS))
    # The other hosts ([host:NAME]), in the file's order.
    hosts: Mapping[str, HostOptions] = field(default_factory=dict)
    source: str | None = None  # the file it was read from, if any
    # The settings as read, when these are another host's (for_host).
    home: Config | None = None

    @property
    def host_names(self) -> tuple[str, ...]:
        """Every host, this one ([DEFAULT] host as read) first, then the file's order."""
        base = self.home or self
        return (base.default.host, *base.hosts)

    def for_host(self, name: str) -> Config:
        """The settings as the driver on host ``name`` sees them: its name as
        ``[DEFAULT] host``, its URI as ``[libvirt] connection_uri``."""
        base = self.home or self
        if name == self.default.host:
            return self
        if name == base.default.host:
            return base
        try:
            uri = base.hosts[name].connection_uri
        except KeyError:
            raise ConfigError(
                f"no host {name!r} in the configuration",
                hint=f"hosts: {', '.join(self.host_names)} ([host:NAME] sections add others)",
            ) from None
        default = dataclasses.replace(base.default, host=name)
        return dataclasses.replace(base, default=default, home=base).with_libvirt(
            connection_uri=uri
        )

    @property
    def state_path(self) -> Path:
        return Path(self.default.state_path)

    @property
    def instances_path(self) -> Path:
        return Path(self.default.instances_path)

    @property
    def base_dir(self) -> Path:
        return self.instances_path / self.image_cache.subdirectory_name

    @property
    def locks_dir(self) -> Path:
        return self.instances_path / "locks"

    @property
    def images_path(self) -> Path:
        """Where the local image service keeps image files."""
        return self.state_path / "images"

    @property
    def templates_path(self) -> Path:
        """Templates (``template create``): one dir each, its memory state and frozen disks."""
        return self.state_path / "templates"

    @property
    def database_path(self) -> Path:
        return self.state_path / "minidriver.db"

    @property
    def trusted_bases_path(self) -> Path:
        """The re-check's verdicts on cached bases (images.fetch.TrustedBases)."""
        return self.state_path / "trusted_bases"

    @property
    def template_cache_path(self) -> Path:
        """The domain XML template, compiled (Jinja's bytecode cache; guest.to_xml)."""
        return self.state_path / "jinja_cache"

    @property
    def keypairs_path(self) -> Path:
        """SSH keypairs (``keypair create``): NAME (private, 0600) and NAME.pub."""
        return self.state_path / "keypairs"

    @property
    def known_hosts_path(self) -> Path:
        """The guests' SSH host keys, one entry per instance (``minidriver ssh``)."""
        return self.state_path / "known_hosts"

    @property
    def port_reservations_path(self) -> Path:
        """Host-wide: every state dir on this host must see the same directory."""
        if self.libvirt.port_reservations_path:
            return Path(self.libvirt.port_reservations_path)
        return default_port_reservations_path()

    @property
    def embed_root(self) -> Path:
        """Root of the embedded QEMU driver: short, so that monitor sockets fit."""
        candidate = self.state_path / "embed"
        if len(os.fspath(candidate)) <= EMBED_ROOT_MAX:
            return candidate
        tag = hashlib.sha1(os.fsencode(self.state_path), usedforsecurity=False).hexdigest()
        return runtime_dir() / f"embed-{tag[:12]}"

    def with_libvirt(self, **changes: Any) -> Config:
        """A copy with some ``[libvirt]`` options changed (tests, CLI overrides)."""
        return dataclasses.replace(self, libvirt=dataclasses.replace(self.libvirt, **changes))


def _parse_value(section: str, name: str, raw: str, kind: Any) -> Any:
    raw = raw.strip()
    try:
        if kind in (bool, "bool"):
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
    except ValueError:
        type_name = kind if isinstance(kind, str) else kind.__name__
        raise ConfigError(
            f"[{section}] {name} = {raw!r} is not a valid {type_name}",
        ) from None
    choices = CHOICES.get((section, name))
    if choices is not None and raw not in choices:
        raise ConfigError(
            f"[{section}] {name} = {raw!r} is not one of: {', '.join(c for c in choices if c)}"
        )
    return raw


def _section(parser: configparser.RawConfigParser, section: str, cls: type[Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    items = parser.defaults() if section == "DEFAULT" else dict(parser.items(section))
    for name, raw in items.items():
        if section != "DEFAULT" and name in parser.defaults():
            continue  # RawConfigParser copies DEFAULT into every section
        if name not in known:
            raise ConfigError(
                f"unknown option [{section}] {name}",
                hint=f"known options in [{section}]: {', '.join(sorted(known))}",
            )
        values[name] = _parse_value(section, name, raw, known[name].type)
    return cls(**values)


def _flavor(parser: configparser.RawConfigParser, section: str) -> Flavor:
    name = section.split(":", 1)[1].strip()
    values: dict[str, int] = {}
    for key, raw in parser.items(section):
        if key in parser.defaults():
            continue
        if key not in FLAVOR_FIELDS:
            raise ConfigError(
                f"unknown option [{section}] {key}",
                hint=f"a flavor has {', '.join(FLAVOR_FIELDS)}",
            )
        values[key] = _parse_value(section, key, raw, int)
    missing = [f for f in ("vcpus", "memory_mb", "root_gb") if f not in values]
    if missing:
        raise ConfigError(f"[{section}] misses {', '.join(missing)}")
    try:
        return Flavor(name=name, **values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _hosts(parser: configparser.RawConfigParser, this_host: str) -> dict[str, HostOptions]:
    hosts = {}
    for section in parser.sections():
        if not section.startswith("host:"):
            continue
        name = section.split(":", 1)[1].strip()
        opts: HostOptions = _section(parser, section, HostOptions)
        if not name or name == this_host:
            raise ConfigError(
                f"[{section}] names {'no host' if not name else 'this host'}",
                hint="this host is [DEFAULT] host with [libvirt] connection_uri;"
                " [host:NAME] sections name the others",
            )
        if not opts.connection_uri:
            raise ConfigError(
                f"[{section}] misses connection_uri",
                hint="the libvirt URI of that host, e.g. what scripts/dev-host start prints",
            )
        hosts[name] = opts
    return hosts


def _check_rbd(opts: LibvirtOptions) -> None:
    """QEMU authenticates as ``rbd_user`` with the key in libvirt's secret: a secret
    without a user names nobody, and a secret uuid must be one."""
    if opts.rbd_connect_timeout < 1:
        raise ConfigError(
            f"[libvirt] rbd_connect_timeout = {opts.rbd_connect_timeout}: at least 1 second"
        )
    if not opts.rbd_secret_uuid:
        return
    if not opts.rbd_user:
        raise ConfigError(
            "[libvirt] rbd_secret_uuid is set but rbd_user is not",
            hint="set rbd_user to the cephx user whose key the libvirt secret holds",
        )
    try:
        uuidlib.UUID(opts.rbd_secret_uuid)
    except ValueError:
        raise ConfigError(
            f"[libvirt] rbd_secret_uuid = {opts.rbd_secret_uuid!r} is not a uuid",
            hint="virsh secret-list shows the uuids of libvirt's secrets",
        ) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read the settings.

    ``path`` (else ``$MINIDRIVER_CONFIG``) names the INI file; without one the defaults
    apply. ``state_dir`` (else ``$MINIDRIVER_STATE_DIR``) overrides ``state_path``.
    """
    env = os.environ if environ is None else environ
    source = os.fspath(path) if path is not None else env.get("MINIDRIVER_CONFIG") or None
    parser = configparser.RawConfigParser()
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    if source is not None:
        try:
            with open(source, encoding="utf-8") as fh:
                parser.read_file(fh)
        except OSError as exc:
            raise ConfigError(
                f"cannot read config file {source}: {exc.strerror}",
                hint="check --config or MINIDRIVER_CONFIG; without either, defaults apply",
            ) from None
        except configparser.Error as exc:
            raise ConfigError(f"config file {source} is not valid INI: {exc}") from None

    for section in parser.sections():
        if section not in SECTIONS and not section.startswith(("flavor:", "host:")):
            raise ConfigError(
                f"unknown section [{section}] in {source}",
                hint="sections: [DEFAULT], [libvirt], [image_cache], [glance_store], [volume],"
                " [flavor:NAME], [host:NAME]",
            )
    default: DefaultOptions = _section(parser, "DEFAULT", DefaultOptions)
    libvirt_opts = (
        _section(parser, "libvirt", LibvirtOptions)
        if parser.has_section("libvirt")
        else LibvirtOptions()
    )
    image_cache = (
        _section(parser, "image_cache", ImageCacheOptions)
        if parser.has_section("image_cache")
        else ImageCacheOptions()
    )
    glance_store = (
        _section(parser, "glance_store", GlanceStoreOptions)
        if parser.has_section("glance_store")
        else GlanceStoreOptions()
    )
    volume = (
        _section(parser, "volume", VolumeOptions)
        if parser.has_section("volume")
        else VolumeOptions()
    )
    _check_rbd(libvirt_opts)
    for name in ("device_detach_timeout", "device_detach_attempts"):
        if getattr(libvirt_opts, name) < 1:
            raise ConfigError(f"[libvirt] {name} = {getattr(libvirt_opts, name)}: at least 1")
    flavors = dict(DEFAULT_FLAVORS)
    for section in parser.sections():
        if section.startswith("flavor:"):
            flavor = _flavor(parser, section)
            flavors[flavor.name] = flavor

    override = state_dir if state_dir is not None else env.get("MINIDRIVER_STATE_DIR") or None
    state_path = os.path.abspath(os.fspath(override) if override else default.state_path)
    instances_path = Template(default.instances_path).safe_substitute(state_path=state_path)
    default = dataclasses.replace(
        default, state_path=state_path, instances_path=os.path.abspath(instances_path)
    )
    pool_path = Template(volume.storage_pool_path).safe_substitute(state_path=state_path)
    volume = dataclasses.replace(volume, storage_pool_path=os.path.abspath(pool_path))
    low, high = libvirt_opts.forward_port_min, libvirt_opts.forward_port_max
    if not 1024 <= low <= high <= 65535:
        raise ConfigError(
            f"[libvirt] forward_port_min = {low}, forward_port_max = {high}: not a port range",
            hint="1024 <= forward_port_min <= forward_port_max <= 65535",
        )
    return Config(
        default=default,
        libvirt=libvirt_opts,
        image_cache=image_cache,
        glance_store=glance_store,
        volume=volume,
        flavors=flavors,
        hosts=_hosts(parser, default.host),
        source=source,
    )
