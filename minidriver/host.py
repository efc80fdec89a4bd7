"""The libvirt host (nova/virt/libvirt/host.py): connection, events, domains.

The connection follows ``[libvirt] connection_uri``; empty means: as root, the system
daemon, or the embedded QEMU driver (on a short root derived from ``state_path``) when
no daemon listens: its socket is absent, or refuses connections as a stale socket
does. A daemon that answers and refuses us is an error, never a silent switch to
another libvirt with other domains. As another user, ``qemu:///session``.

Domains are found by uuid, as Nova's ``Host._get_domain`` finds them: an instance's
domain has the instance's uuid. A name is only a label another state dir on the same
daemon may take over; the owner metadata says which state dir defined a domain.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import re
import socket
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from minidriver import guest
from minidriver.config import Config
from minidriver.exception import HostError, MinidriverError
from minidriver.fileutils import create_private
from minidriver.trustedpath import trusted_dir

LOG = logging.getLogger(__name__)

SYSTEM_URI = "qemu:///system"
SESSION_URI = "qemu:///session"
EMBED_URI = "qemu:///embed"
# Where qemu:///system reaches the (monolithic) daemon, libvirtd.
DAEMON_SOCKET = Path("/run/libvirt/libvirt-sock")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")

# libvirt's domain states, named as users see them (lower case, libvirt's words).
LifecycleListener = Callable[[str, int, int], None]

POWER_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

# What the embedded driver needs that a daemon has by default: console output written
# by QEMU itself (there may be no virtlogd), and QEMU running as us, so that it can
# reach files under private (0700) directories.
EMBED_QEMU_CONF = """\
# Written by minidriver for its embedded libvirt QEMU driver.
stdio_handler = "file"
user = "{user}"
group = "{group}"
"""

_event_loop_lock = threading.Lock()
_event_loop_started = False


def start_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread.

    Needed before the first connection is opened: lifecycle events, keep-alives and
    the embedded driver all run on it. Once per process.
    """
    global _event_loop_started  # noqa: PLW0603 - one loop per process, by libvirt's design
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-event-loop", daemon=True).start()
        _event_loop_started = True


def _quiet_libvirt_errors() -> None:
    # libvirt prints every error to stderr by default; we raise them instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


@dataclass(frozen=True)
class VirtTypeChoice:
    virt_type: str  # kvm or qemu
    reason: str


def detect_virt_type(
    configured: str,
    *,
    dev_kvm: Path = Path("/dev/kvm"),
    sys_module: Path = Path("/sys/module"),
) -> VirtTypeChoice:
    """Choose kvm only where it really runs ordinary guests, else TCG (``qemu``).

    A /dev/kvm alone is not enough: on hosts where it is backed by kvm_pvm an ordinary
    kernel spins at 100% CPU and prints nothing. Real KVM has kvm_intel or kvm_amd.
    """
    if configured != "auto":
        return VirtTypeChoice(configured, f"virt_type = {configured} in the config")
    if not dev_kvm.exists():
        return VirtTypeChoice("qemu", f"{dev_kvm} is missing: using TCG")
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return VirtTypeChoice("qemu", f"{dev_kvm} is not accessible to this user: using TCG")
    loaded = [m for m in ("kvm_intel", "kvm_amd") if (sys_module / m).is_dir()]
    if loaded:
        return VirtTypeChoice("kvm", f"{dev_kvm} usable and {loaded[0]} loaded")
    if (sys_module / "kvm_pvm").is_dir():
        return VirtTypeChoice(
            "qemu", f"{dev_kvm} is backed by kvm_pvm (PVM guests only): using TCG"
        )
    return VirtTypeChoice("qemu", "neither kvm_intel nor kvm_amd is loaded: using TCG")


def _qemu_conf_setting(qemu_conf: Path, name: str) -> str | None:
    """A setting's value in a daemon's qemu.conf (quotes removed); None when unset.

    One search of the whole file: Debian's qemu.conf has ~1,000 lines, nearly all
    comments, and a match per line cost every spawn ~2 ms."""
    with contextlib.suppress(OSError):
        pattern = rf'^[^\S\n]*{re.escape(name)}[^\S\n]*=[^\S\n]*("([^"\n]*)"|\S+)'
        match = re.search(pattern, qemu_conf.read_text(), re.MULTILINE)
        if match:
            return match.group(2) if match.group(2) is not None else match.group(1)
    return None


def qemu_user_of_daemon(qemu_conf: Path = QEMU_CONF) -> str:
    """The user a libvirt daemon runs QEMU as (Debian's build default: libvirt-qemu)."""
    return _qemu_conf_setting(qemu_conf, "user") or "libvirt-qemu"


def dynamic_ownership_of_daemon(qemu_conf: Path = QEMU_CONF) -> bool:
    """Whether the daemon gives a domain's disks to QEMU's user while it runs (the
    default): our disk files are private to us, so without it that QEMU cannot open
    them. Measured on libvirt 9.0: a running domain's disks belong to libvirt-qemu,
    with their modes kept (0600); a stopped one's return to us, but for the read-only
    ones and the backing files, which libvirt never gives back as others may share them."""
    return _qemu_conf_setting(qemu_conf, "dynamic_ownership") != "0"


@dataclass(frozen=True)
class ConnectionChoice:
    """The libvirt URI in use and why it was chosen (``host check``, ``--debug``)."""

    uri: str
    reason: str


def no_daemon_listens(path: Path) -> str | None:
    """Why no libvirt daemon listens on the socket ``path``; None when one may.

    Only an absent socket, or one that refuses connections (a daemon that died and
    left it), means nobody is there; any other answer, a refusal of us included
    (EACCES), means someone is.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, NotADirectoryError):
            return f"{path} does not exist"
        except ConnectionRefusedError:
            return f"nothing listens on {path} (connection refused: a stale socket)"
        except OSError:
            return None
    return None


def untraversable_parents(path: Path, user: str) -> list[Path]:
    """Directories on the way to ``path`` that ``user`` may not enter."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return []  # no such user here: nothing we can check
    if pw.pw_uid == 0:
        return []
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    blocked = []
    for directory in [*reversed(path.parents), path]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            break  # created later by us, with a traversable mode
        if st.st_uid == pw.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            blocked.append(directory)
    return blocked


def embedded_root_holder(root: Path) -> int | None:
    """The pid of another live process holding the embedded root ``root``, if any.

    libvirt's embedded driver allows one process per root and fails on its pid file
    otherwise. Read the pid file instead of locking it: a POSIX lock test from this
    process could drop the lock libvirt itself holds here.
    """
    try:
        pid = int((root / "run" / "qemu" / "driver.pid").read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


class Host:
    """One libvirt connection, opened on first use, with lifecycle event waiters."""

    def __init__(self, conf: Config, *, daemon_socket: Path = DAEMON_SOCKET) -> None:
        self.conf = conf
        self.daemon_socket = daemon_socket
        self._conn: libvirt.virConnect | None = None
        self._choice: ConnectionChoice | None = None
        self._lock = threading.Lock()
        self._waiters: dict[str, list[threading.Event]] = {}
        # Callers' threads change the waiters while the event loop's thread reads them.
        self._waiters_lock = threading.Lock()
        # Called on every lifecycle event (uuid, event, detail); weak: a driver that
        # is gone stops listening.
        self._listeners: list[weakref.WeakMethod[LifecycleListener]] = []
        self._virt_type: VirtTypeChoice | None = None

    # -- connection -----------------------------------------------------------

    @property
    def uri(self) -> str:
        """The URI in use (resolved from ``connection_uri`` on first connect)."""
        return self.connection_choice.uri

    @property
    def connection_reason(self) -> str:
        """Why this connection: the config, or what the default found on this host."""
        return self.connection_choice.reason

    @property
    def connection_choice(self) -> ConnectionChoice:
        self.get_connection()
        assert self._choice is not None
        return self._choice

    @property
    def is_embedded(self) -> bool:
        return self.uri.startswith(EMBED_URI)

    def get_connection(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is None:
                start_event_loop()
                _quiet_libvirt_errors()
                self._conn, self._choice = self._open()
                LOG.debug("libvirt connection %s: %s", self._choice.uri, self._choice.reason)
                self._conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle_event, None
                )
            return self._conn

    def _open(self) -> tuple[libvirt.virConnect, ConnectionChoice]:
        uri = self.conf.libvirt.connection_uri
        reason = f"connection_uri = {uri} (the config or --connect)"
        if not uri:
            if os.geteuid() != 0:
                reason = "not root: the user's own libvirt session"
                return self._open_uri(SESSION_URI), ConnectionChoice(SESSION_URI, reason)
            conn, uri, reason = self._open_daemon()
            if conn is not None:
                return conn, ConnectionChoice(uri, reason)
        if uri == EMBED_URI:
            uri = f"{EMBED_URI}?root={self.conf.embed_root}"
        if uri.startswith(EMBED_URI):
            self._prepare_embed_root(uri)
        return self._open_uri(uri), ConnectionChoice(uri, reason)

    def _open_daemon(self) -> tuple[libvirt.virConnect | None, str, str]:
        """The system daemon: (connection, URI, why); when none listens, (None, the
        embedded driver's URI, why). A daemon that answers and refuses us is an error."""
        uri = SYSTEM_URI
        if self.daemon_socket != DAEMON_SOCKET:
            uri = f"qemu+unix:///system?socket={self.daemon_socket}"
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            # Asked after the failure, not before: a daemon that has just stopped is
            # then seen gone, and a healthy one costs no extra connection.
            absent = no_daemon_listens(self.daemon_socket)
            if absent is None:
                raise HostError(
                    f"the libvirt daemon on {self.daemon_socket} refused {SYSTEM_URI}:"
                    f" {exc.get_error_message()}",
                    hint="fix the daemon or our access to it (its log, its socket's"
                    " permissions), or choose the embedded driver: --connect"
                    f" {EMBED_URI} or [libvirt] connection_uri = {EMBED_URI}",
                ) from exc
            return None, EMBED_URI, f"no libvirt daemon: {absent}"
        return conn, uri, f"a libvirt daemon answers on {self.daemon_socket}"

    def _open_uri(self, uri: str) -> libvirt.virConnect:
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise HostError(
                f"cannot connect to libvirt at {uri}: {exc.get_error_message()}",
                hint="run scripts/setup-host, or start the daemons: virtlogd -d; libvirtd -d",
            ) from exc

    def _prepare_embed_root(self, uri: str) -> None:
        match = re.search(r"[?&]root=([^&]+)", uri)
        if not match:
            raise HostError(f"{uri}: the embedded driver needs root=DIR")
        root = Path(match.group(1))
        # Whoever controls the root controls what the embedded driver runs as us.
        hint = (
            "remove it if you did not make it, or choose a state_path (or XDG_RUNTIME_DIR)"
            " of your own"
        )
        etc = trusted_dir(trusted_dir(root, hint=hint) / "etc", hint=hint)
        holder = embedded_root_holder(root)
        if holder is not None:
            raise HostError(
                f"the embedded libvirt at {root} is in use by process {holder}"
                " (it allows one process at a time)",
                hint="start a libvirt daemon to share one host between processes:"
                " virtlogd -d; libvirtd -d (scripts/setup-host does it)",
            )
        # The embedded driver reads <root>/etc/qemu.conf (its other config, such as
        # domain definitions, lives under <root>/etc/qemu/).
        pw = pwd.getpwuid(os.geteuid())
        text = EMBED_QEMU_CONF.format(user=pw.pw_name, group=grp.getgrgid(os.getegid()).gr_name)
        conf_file = etc / "qemu.conf"
        try:
            st = os.lstat(conf_file)
            current = conf_file.read_text() if stat.S_ISREG(st.st_mode) else None
        except FileNotFoundError:
            current = None
        if current != text:
            # Replaced, never written through: what was there may be a symlink.
            part = etc / f".qemu.conf.{os.getpid()}.part"
            part.unlink(missing_ok=True)
            with create_private(part) as out:
                out.write(text.encode())
            os.replace(part, conf_file)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    # -- facts ----------------------------------------------------------------

    @property
    def virt_type(self) -> VirtTypeChoice:
        if self._virt_type is None:
            self._virt_type = detect_virt_type(self.conf.libvirt.virt_type)
        return self._virt_type

    def qemu_user(self) -> str | None:
        """The user QEMU runs as on this connection; None when it is us."""
        if self.uri == SYSTEM_URI:
            return qemu_user_of_daemon()
        return None

    def agent_socket_dir(self, *, create: bool = False) -> Path | None:
        """Where guest agent sockets go: a directory QEMU may create them in, short
        enough for their paths (107 bytes); None: libvirt's own choice."""
        if self.uri == SYSTEM_URI:
            return Path("/var/lib/libvirt/qemu")  # the daemon's QEMU user owns it
        if self.is_embedded:
            path = self.conf.embed_root / "qga"
            if create:
                path.mkdir(mode=0o755, parents=True, exist_ok=True)
            return path
        return None

    def host_uuid(self) -> str:
        """The host UUID libvirt reports (libvirtd.conf's host_uuid, else the SMBIOS')."""
        caps = guest.parse_xml(self.get_connection().getCapabilities())
        return str(caps.findtext("host/uuid") or "")

    def supported_virt_types(self) -> frozenset[str]:
        """The domain types (qemu, kvm) this libvirt offers for hvm guests: Nova's
        ``supported_instances`` hypervisor types, from the capabilities."""
        caps = guest.parse_xml(self.get_connection().getCapabilities())
        return frozenset(
            str(domain.get("type"))
            for guest_el in caps.iterfind("guest")
            if guest_el.findtext("os_type") == "hvm"
            for domain in guest_el.iterfind("arch/domain")
        )

    def memory_mb(self) -> tuple[int, int]:
        """(the host's memory, what the kernel has free now), in MiB."""
        conn = self.get_connection()
        return int(conn.getInfo()[1]), int(conn.getFreeMemory()) // 1024**2

    def check_instances_path(self, qemu_conf: Path = QEMU_CONF) -> None:
        """Fail early, with the fix, when QEMU could not open our disk files."""
        user = self.qemu_user()
        if user is None:
            return
        if user not in ("root", "+0") and not dynamic_ownership_of_daemon(qemu_conf):
            raise HostError(
                f"libvirt's QEMU runs as {user} without dynamic_ownership ({qemu_conf}):"
                " it cannot open the instances' disks, which are private to us",
                hint=f"set dynamic_ownership = 1 (libvirt's default) in {qemu_conf}"
                " and restart libvirtd",
            )
        blocked = untraversable_parents(self.conf.instances_path, user)
        if blocked:
            raise HostError(
                f"libvirt's QEMU runs as {user} and cannot enter {blocked[0]}"
                f" on the way to {self.conf.instances_path}",
                hint=f"chmod o+x {' '.join(map(str, blocked))}, or choose another state_path",
            )

    # -- domains --------------------------------------------------------------

    def define(self, xml: str) -> libvirt.virDomain:
        """Nova's ``Host.write_instance_config``: define a persistent domain.

        libvirt parses the XML and refuses what it cannot use, as for Nova; its schema
        check (``VIR_DOMAIN_DEFINE_VALIDATE``, ~10 ms a define here) is left to the
        unit tests, which run every golden XML through ``virt-xml-validate``.
        """
        return self.get_connection().defineXML(xml)

    def launch(self, domain: libvirt.virDomain, *, pause: bool = False) -> None:
        """Start the domain; ``pause``: its vCPUs stopped until ``resume`` (Nova's
        ``Guest.launch(pause=True)``, while a spawn waits for its VIF)."""
        domain.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if pause else 0)

    @staticmethod
    def undefine(domain: libvirt.virDomain) -> None:
        """Stop the domain if it runs, then forget it (and any saved state of it)."""
        try:
            if domain.isActive():
                domain.destroy()
        except libvirt.libvirtError as exc:
            # It stopped between the two calls (the embedded driver, reconnecting to
            # the QEMU of a killed process, may only now find it gone).
            if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                raise
        domain.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )

    def find_domain(self, name: str) -> libvirt.virDomain | None:
        """The domain of that name, whoever defined it (names are checked for clashes)."""
        try:
            return self.get_connection().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def is_name_collision(self, exc: libvirt.libvirtError, name: str, domain_uuid: str) -> bool:
        """Whether a define was refused because another domain holds ``name``: libvirt
        says so (by its error code) and a domain of that name with another uuid is
        there. Any other refusal is no reason to try another name."""
        refusals = (libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_ERR_DOM_EXIST)
        if exc.get_error_code() not in refusals:
            return False
        holder = self.find_domain(name)
        return holder is not None and holder.UUIDString() != domain_uuid

    def get_domain(self, instance_uuid: str) -> libvirt.virDomain | None:
        """Nova's ``_get_domain``: the domain whose uuid is the instance's; None if none."""
        try:
            return self.get_connection().lookupByUUIDString(instance_uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def owned_domain(self, instance_uuid: str, state_id: str) -> libvirt.virDomain | None:
        """The instance's domain, if any, refused when another state dir defined it."""
        domain = self.get_domain(instance_uuid)
        if domain is None:
            return None
        owner = guest.owner_of(domain.XMLDesc(0))
        if owner is None or owner.state_id != state_id:
            raise MinidriverError(
                f"domain {domain.name()} ({instance_uuid}) belongs to another state dir;"
                " not touching it",
                hint="run minidriver with that state dir (--state-dir) to manage it",
            )
        return domain

    def owned_domains(self, state_id: str) -> dict[str, libvirt.virDomain]:
        """Every domain the state dir ``state_id`` defined, by instance uuid."""
        owned = {}
        for domain, xml in self.domains_xml():
            owner = guest.owner_of(xml)
            if owner is not None and owner.state_id == state_id:
                owned[owner.instance_uuid] = domain
        return owned

    def domains_xml(self) -> list[tuple[libvirt.virDomain, str]]:
        """Every domain with its XML; one that vanishes meanwhile (a daemon is shared)
        is left out rather than failing the listing."""
        found = []
        for domain in self.get_connection().listAllDomains():
            try:
                found.append((domain, domain.XMLDesc(0)))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return found

    def domain_state(self, domain: libvirt.virDomain) -> str:
        state, _reason = domain.state()
        return POWER_STATES.get(state, "unknown")

    def wait_for_state(
        self,
        domain: libvirt.virDomain,
        wanted: str,
        timeout: float,
        *,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        stop_on: tuple[str, ...] = (),
    ) -> str:
        """Poll the domain's state every ``interval`` seconds (a lifecycle event wakes
        the wait early) until it is ``wanted`` or one of ``stop_on``, or ``timeout``
        has passed. Returns the last state seen: the caller tells which it was."""
        deadline = clock() + timeout
        with self.lifecycle_waiter(domain.UUIDString()) as changed:
            while True:
                state = self.domain_state(domain)
                if state == wanted or state in stop_on:
                    return state
                remaining = deadline - clock()
                if remaining <= 0:
                    return state
                changed.wait(min(interval, remaining))
                changed.clear()

    # -- lifecycle events -------------------------------------------------------

    def _lifecycle_event(
        self, _conn: Any, domain: libvirt.virDomain, event: int, detail: int, _opaque: Any
    ) -> None:
        domain_uuid = domain.UUIDString()
        with self._waiters_lock:
            waiters = tuple(self._waiters.get(domain_uuid, ()))
            self._listeners = [ref for ref in self._listeners if ref() is not None]
            listeners = [ref() for ref in self._listeners]
        for waiter in waiters:
            waiter.set()
        for listener in listeners:
            if listener is not None:
                listener(domain_uuid, event, detail)

    def add_lifecycle_listener(self, listener: LifecycleListener) -> None:
        """Call the bound method ``listener(domain uuid, event, detail)`` on every
        lifecycle event, in the event loop's thread, while its object lives."""
        with self._waiters_lock:
            self._listeners.append(weakref.WeakMethod(listener))

    @contextlib.contextmanager
    def lifecycle_waiter(self, domain_uuid: str) -> Iterator[threading.Event]:
        """An Event set whenever the domain's lifecycle changes (started, stopped...)."""
        event = threading.Event()
        with self._waiters_lock:
            self._waiters.setdefault(domain_uuid, []).append(event)
        try:
            yield event
        finally:
            with self._waiters_lock:
                waiters = self._waiters[domain_uuid]
                waiters.remove(event)
                if not waiters:
                    del self._waiters[domain_uuid]
