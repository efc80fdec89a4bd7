"""User-mode networking under real QEMU with the busybox test guest: the NIC where it
was put, QEMU listening on the forwarded port on 127.0.0.1, distinct ports for
concurrent boots of two state dirs, freed by delete. Traffic: 127.0.0.1 only."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest
from conftest import TRAVERSABLE_TMP
from lxml import etree

from minidriver import guest
from minidriver.driver import LibvirtDriver
from minidriver.host import SYSTEM_URI, Host
from minidriver.objects import Flavor
from minidriver.ports import port_is_free

pytestmark = pytest.mark.integration

QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")


def hmp(domain: libvirt.virDomain, command: str) -> str:
    """A human monitor command: what QEMU itself says it has."""
    out: str = libvirt_qemu.qemuMonitorCommand(
        domain, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    )
    return out


def qemu_listens(port: int) -> bool:
    """Someone holds 127.0.0.1:port and accepts a connection there."""
    if port_is_free(port):
        return False
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        return True


def assert_freed(drv: LibvirtDriver, port: int, ours: set[str]) -> None:
    """Our instances' delete gave ``port`` back: no reservation of ours holds it and
    no QEMU of ours listens there. The host's forwarded ports are shared, so a run
    beside this one (the test command runs two) may have reserved it again at once;
    its reservation comes before its QEMU listens."""
    holder = drv.ports.get(port)
    if port_is_free(port):
        assert holder is None or holder.instance_uuid not in ours, (port, holder)
        return
    holder = drv.ports.get(port)  # looked at again: reserved before it was listened on
    assert holder is not None and holder.instance_uuid not in ours, (port, holder)


@pytest.fixture
def most_disks_driver(driver: LibvirtDriver, libvirt_host: Host) -> Iterator[LibvirtDriver]:
    """The session's state dir and host, with a vfat config drive (a virtio disk) and a
    flavor with every disk: the most PCI devices libvirt places itself."""
    conf = driver.conf
    conf = dataclasses.replace(
        conf,
        default=dataclasses.replace(conf.default, config_drive_format="vfat"),
        flavors={**conf.flavors, "most": Flavor("most", 1, 128, 1, ephemeral_gb=1, swap=16)},
    )
    drv = LibvirtDriver(conf, host=libvirt_host)
    yield drv
    drv.db.close()


def test_user_mode_nic_next_to_the_most_disks(
    most_disks_driver: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> None:
    drv = most_disks_driver
    inst = drv.spawn("net-most", test_image_id, "most", config_drive=True)
    try:
        record = drv.db.get_instance(inst.uuid)
        port = record.forward_port
        assert record.network_mode == "user" and port is not None
        wait_console(Path(inst.instance_dir) / "console.log", r"^minidriver-guest: ready")
        console = (Path(inst.instance_dir) / "console.log").read_text(errors="replace")
        for disk in ("vda", "vdb", "vdc", "vdd"):
            assert f"minidriver-guest: disk {disk} " in console, console

        domain = drv.host.get_connection().lookupByName(inst.name)
        # libvirt placed every device it knows below the NIC's slot...
        live = etree.fromstring(domain.XMLDesc(0).encode())
        slots = {
            int(a.get("slot", "0"), 16) for a in live.iterfind("devices/*/address[@type='pci']")
        }
        assert len(slots) >= 5 and guest.USER_NIC_PCI_SLOT not in slots, slots
        # ...and QEMU has the NIC there, with the recorded MAC, on its user network.
        pci = hmp(domain, "info pci")
        devices = {
            int(m.group(1)): block
            for block in pci.split("Bus ")
            if (m := re.match(r"\s*0, device\s+(\d+), function 0:", block))
        }
        nic = devices.get(guest.USER_NIC_PCI_SLOT, "")
        assert "Ethernet controller" in nic and '"minidriver-nic0"' in nic, pci
        network = hmp(domain, "info network")
        assert f"macaddr={record.mac_address}" in network and "type=user" in network, network
        assert qemu_listens(port)
        if drv.host.uri == SYSTEM_URI:  # the daemon's log of the domain says the taint
            log = (QEMU_LOG_DIR / f"{inst.name}.log").read_text(errors="replace")
            assert "tainted: custom-argv" in log
    finally:
        drv.destroy(inst.uuid)
    assert_freed(drv, port, {inst.uuid})


def cli(state: Path, uri: str, *argv: str) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "minidriver", "--json", "--state-dir", str(state),
         "--connect", uri, *argv],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def other_state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mdnet-", dir=TRAVERSABLE_TMP))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_concurrent_boots_of_two_state_dirs_get_distinct_ports_freed_by_delete(
    driver: LibvirtDriver, test_image: Path, test_image_id: str, other_state_dir: Path
) -> None:
    # The other state dir's boot is another process, on its own connection (the
    # embedded driver takes a root per state dir, so it works there too).
    uri = driver.host.uri.split("?")[0]
    cli(other_state_dir, uri, "image", "add", str(test_image), "--name", "g",
        "--disk-format", "qcow2", "--property", "os_type=linux")  # fmt: skip

    def by_thread(i: int) -> str:
        return driver.spawn(f"net-{i}", test_image_id, "t1.nano").uuid

    with ThreadPoolExecutor(max_workers=3) as pool:
        threads = [pool.submit(by_thread, i) for i in range(2)]
        process = pool.submit(cli, other_state_dir, uri, "boot", "--image", "g",
                              "--flavor", "t1.nano", "--name", "net-other")  # fmt: skip
        uuids = [f.result() for f in threads]
        other = process.result()
    try:
        ports = [driver.db.get_instance(u).forward_port for u in uuids]
        ports.append(other["network"]["forward_port"])
        assert None not in ports and len(set(ports)) == 3, ports
        for port in ports:
            assert port is not None and qemu_listens(port), port
    finally:
        for u in uuids:
            driver.destroy(u)
        cli(other_state_dir, uri, "delete", "net-other")
    for port in ports:
        assert port is not None
        assert_freed(driver, port, {*uuids, other["uuid"]})
    leftovers = set(os.listdir(other_state_dir / "instances")) - {"_base", "locks"}
    assert leftovers == set()
