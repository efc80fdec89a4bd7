"""vif.py: the VIF plugged, the events a spawn waits for, and the wait itself.

Real parts: libvirt's test driver for networks and bridges, real sockets on 127.0.0.1
for a user-mode VIF's host end. A boot that goes through it is in test_cli_network.py
(plugging) and tests/integration/test_spawn.py (the paused wait on QEMU).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cli_network import NODE_WITH_NETWORK

from minidriver.config import load_config
from minidriver.host import Host
from minidriver.network import VIF, NetworkMode
from minidriver.steps import StepTimer
from minidriver.vif import (
    VIF_PLUGGED,
    VirtualInterfaceCreateException,
    get_neutron_events,
    is_plugged,
    plug_vifs,
    wait_for_vif_plugged,
)

MAC = "fa:16:3e:00:00:01"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    node = tmp_path / "testdriver.xml"
    node.write_text(NODE_WITH_NETWORK)
    conf = load_config(None, state_dir=tmp_path / "state", environ={}).with_libvirt(
        connection_uri=f"test://{node}", virt_type="qemu"
    )
    h = Host(conf)
    yield h
    h.close()


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A port held on 127.0.0.1, as QEMU's user network holds a forwarded port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


USER = VIF(NetworkMode.USER, MAC, forward_port=10022)


@pytest.mark.parametrize(
    ("vif", "virt_type", "timeout", "hypervisor", "expected"),
    [
        (USER, "qemu", 300, "QEMU", [(VIF_PLUGGED, USER.vif_id)]),
        (USER, "kvm", 1, "QEMU", [(VIF_PLUGGED, USER.vif_id)]),
        (VIF(NetworkMode.BRIDGE, MAC, "br0"), "qemu", 300, "QEMU", [(VIF_PLUGGED, USER.vif_id)]),
        # Nothing to wait for: no pause.
        (None, "qemu", 300, "QEMU", []),
        (VIF(NetworkMode.NONE, MAC), "qemu", 300, "QEMU", []),
        (USER, "qemu", 0, "QEMU", []),  # vif_plugging_timeout = 0
        (USER, "lxc", 300, "QEMU", []),  # Nova waits under kvm and qemu only
        (USER, "qemu", 300, "TEST", []),  # no QEMU: nothing starts paused or plugs
    ],
)
def test_events_expected_as_nova_decides(
    vif: VIF | None, virt_type: str, timeout: int, hypervisor: str, expected: list[Any]
) -> None:
    assert get_neutron_events(vif, virt_type, timeout, hypervisor) == expected


def test_a_user_vif_is_plugged_once_its_port_is_held(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    assert is_plugged(None, VIF(NetworkMode.USER, MAC, forward_port=port))
    assert not is_plugged(None, VIF(NetworkMode.USER, MAC, forward_port=free_port()))


def test_the_wait_ends_when_the_port_is_held_and_fails_when_never() -> None:
    port = free_port()
    vif = VIF(NetworkMode.USER, MAC, forward_port=port)
    assert wait_for_vif_plugged(None, vif, 0.2) is False

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def bind_later() -> None:
        sock.bind(("127.0.0.1", port))
        sock.listen()

    timer = threading.Timer(0.1, bind_later)
    timer.start()
    try:
        assert wait_for_vif_plugged(None, vif, 30) is True
    finally:
        timer.join()
        sock.close()


@pytest.mark.parametrize(
    "vif",
    [
        None,
        VIF(NetworkMode.NONE, MAC),
        VIF(NetworkMode.USER, MAC, forward_port=10022),
        VIF(NetworkMode.NETWORK, MAC, "labnet"),
        VIF(NetworkMode.BRIDGE, MAC, "br-lab"),
    ],
)
def test_plug_finds_what_the_vif_attaches_to(host: Host, vif: VIF | None) -> None:
    plug_vifs(host, vif, StepTimer())  # raises if not found up


@pytest.mark.parametrize(
    ("vif", "hint"),
    [
        (VIF(NetworkMode.NETWORK, MAC, "nosuchnet"), "virsh net-start nosuchnet"),
        (VIF(NetworkMode.BRIDGE, MAC, "br-none"), "ip link set br-none up"),
    ],
)
def test_plug_fails_clearly_without_it(host: Host, vif: VIF, hint: str) -> None:
    with pytest.raises(VirtualInterfaceCreateException) as exc_info:
        plug_vifs(host, vif, StepTimer())
    assert f"{vif.mode} {vif.source} is not active" in str(exc_info.value)
    assert exc_info.value.hint is not None and hint in exc_info.value.hint
    assert exc_info.value.step == "plug_vifs"


def test_plug_fails_on_a_network_that_is_down(host: Host) -> None:
    host.get_connection().networkLookupByName("labnet").destroy()
    with pytest.raises(VirtualInterfaceCreateException, match="network labnet is not active"):
        plug_vifs(host, VIF(NetworkMode.NETWORK, MAC, "labnet"), StepTimer())
