"""scripts/dev-host: a second libvirt host on this machine, started, checked the way a
user would (its URI, its own host UUID, no TCP listener, its own /run/libvirt), its
QEMU killed by ``stop``, nothing left after it, and ``--private-instances``.

Daemon only: the host is a second libvirtd beside the system's, and the system daemon's
socket is what the dev host's namespace reaches as this host. Every host a test starts
has a name of its own and is stopped and purged by that test.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from lxml import etree

pytestmark = [pytest.mark.integration, pytest.mark.connection("daemon")]

REPO = Path(__file__).resolve().parents[2]
DEV_HOST = REPO / "scripts" / "dev-host"
BASE = Path("/var/tmp/minidriver-hosts")
# The system daemon as the dev host's namespace (and so its libvirtd) reaches it.
SYSTEM_PEER_URI = "qemu+unix:///system?socket=/run/libvirt/libvirt-sock"
# A start waits for libvirtd's capability probe of QEMU: seconds, more on a busy machine.
TIMEOUT = 300

# The smallest domain that runs a QEMU: no disk, the BIOS finds nothing to boot and waits.
TINY_DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>16</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>"""


def dev_host(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.fspath(DEV_HOST), *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=TIMEOUT,
    )


def host_uuid(uri: str) -> str:
    conn = libvirt.open(uri)
    try:
        return str(etree.fromstring(conn.getCapabilities()).findtext("host/uuid"))
    finally:
        conn.close()


def namespace_pids(ns: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "mnt") == ns:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def tcp_listeners(pid: int) -> list[str]:
    """The TCP sockets in LISTEN state that process ``pid`` holds (its fds against
    /proc/net/tcp and tcp6), as local addresses in /proc's hex."""
    inodes = set()
    for fd in (Path("/proc") / str(pid) / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                listening.append(fields[1])
    return listening


@pytest.fixture
def host_name() -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    yield name
    dev_host("stop", "--purge", name, check=False)


def test_start_status_stop(host_name: str) -> None:
    started = dev_host("start", host_name)
    uri = started.stdout.strip().splitlines()[-1]
    directory = BASE / host_name
    assert uri == f"qemu+unix:///system?socket={directory}/sock/libvirt-sock"

    # Its own host, answering with a host UUID of its own and no domain of the system's.
    own_uuid = host_uuid(uri)
    assert own_uuid != host_uuid("qemu:///system")
    conn = libvirt.open(uri)
    try:
        assert conn.listAllDomains() == []
        # A QEMU of its own, to see stop kill it as a power loss would.
        domain = conn.defineXML(TINY_DOMAIN.format(name=f"{host_name}-tiny"))
        domain.create()
        assert domain.isActive()
    finally:
        conn.close()

    status = dev_host("status", host_name).stdout
    fields = dict(line.split(": ", 1) for line in status.splitlines() if ": " in line)
    assert fields["host_uuid"] == own_uuid
    assert fields["uri"] == uri
    libvirtd_pid = int(fields["libvirtd"])
    assert tcp_listeners(libvirtd_pid) == []

    # Idempotent: a second start finds it running and prints the same URI.
    again = dev_host("start", host_name)
    assert again.stdout.strip().splitlines()[-1] == uri
    assert dev_host("status", host_name).stdout == status

    # Inside its namespace /run/libvirt is its own, and the system daemon is reached
    # through the socket bound there: the URI its libvirtd migrates back to.
    inside = dev_host("exec", host_name, "--", "ls", "/run/libvirt/qemu").stdout.split()
    assert f"{host_name}-tiny.pid" in inside
    assert not (Path("/run/libvirt/qemu") / f"{host_name}-tiny.pid").exists()
    peer = dev_host("exec", host_name, "--", "virsh", "-c", SYSTEM_PEER_URI, "capabilities").stdout
    assert etree.fromstring(peer.encode()).findtext("host/uuid") == host_uuid("qemu:///system")

    ns = (directory / "mntns").read_text().strip()
    # virtlogd, libvirtd and the anchor that keeps the namespace until stop ends (QEMU
    # has a namespace of its own).
    members = namespace_pids(ns)
    anchor = int((directory / "anchor.pid").read_text())
    assert len(members) == 3 and anchor in members, members
    qemu_pid = int((directory / "run" / "qemu" / f"{host_name}-tiny.pid").read_text())
    assert Path(f"/proc/{qemu_pid}/comm").read_text().startswith("qemu-")
    # Held open, the namespace keeps its inode while we look: freed, its number would
    # go to the next namespace made on this machine (libvirt makes one per QEMU).
    held = os.open(f"/proc/{libvirtd_pid}/ns/mnt", os.O_RDONLY)
    try:
        assert os.readlink(f"/proc/{libvirtd_pid}/ns/mnt") == ns
        stopped = dev_host("stop", host_name)
        assert f"QEMU {qemu_pid} killed" in stopped.stderr
        assert namespace_pids(ns) == []
    finally:
        os.close(held)
    assert not any(alive(pid) for pid in members)
    assert not alive(qemu_pid)
    assert not (directory / "sock").exists()
    assert not (directory / "run").exists()
    assert dev_host("status", host_name, check=False).returncode == 1
    assert dev_host("stop", host_name).returncode == 0  # stopped twice: nothing to do

    # Back from the power loss: the same host, its definition kept, its guest off.
    uri = dev_host("start", host_name).stdout.strip().splitlines()[-1]
    assert host_uuid(uri) == own_uuid
    conn = libvirt.open(uri)
    try:
        domain = conn.lookupByName(f"{host_name}-tiny")
        assert not domain.isActive()
        domain.undefine()
    finally:
        conn.close()


def test_private_instances(host_name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    instances = tmp_path_factory.mktemp("instances")
    (instances / "seen-by-this-host").write_text("")
    dev_host("start", host_name, f"--private-instances={instances}")
    inside = dev_host("exec", host_name, "--", "ls", "-A", os.fspath(instances)).stdout.split()
    assert inside == []
    dev_host("exec", host_name, "--", "touch", os.fspath(instances / "seen-by-the-dev-host"))
    assert sorted(p.name for p in instances.iterdir()) == ["seen-by-this-host"]
    assert (BASE / host_name / "instances" / "seen-by-the-dev-host").exists()

    # Running with another choice of instances path is refused, not silently kept.
    other = dev_host("start", host_name, check=False)
    assert other.returncode == 1
    assert "stop" in other.stderr
