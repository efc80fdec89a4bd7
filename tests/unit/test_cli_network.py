"""`boot --network/--key-name/--wait-ssh`, `keypair`, `ssh`, and what `show` and `delete`
do with a NIC, on libvirt's test driver.

The test driver runs no QEMU, so nothing listens on an instance's forwarded port: the
tests put there what a guest would, a tiny TCP server for the banner wait and a real
``sshd`` (as root, on 127.0.0.1 only, with its own config and keys) for `minidriver
ssh`. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_DRIVER_NODE
from lxml import etree
from test_cli import Cli, qcow2

from minidriver.cli import main
from minidriver.config import load_config
from minidriver.host import Host
from minidriver.ports import port_is_free

MiB = 1024**2
SSHD = "/usr/sbin/sshd"
NODE_WITH_NETWORK = TEST_DRIVER_NODE.replace(
    "</node>",
    "  <network><name>labnet</name><bridge name='virbr-md'/>"
    "<ip address='192.0.2.1' netmask='255.255.255.0'/></network>\n"
    # The host's bridge that bridge:br-lab boots plug into (vif.plug_vifs finds it up).
    "  <interface type='bridge' name='br-lab'><start mode='onboot'/>"
    "<bridge stp='off'><interface type='ethernet' name='eth9'>"
    "<mac address='aa:bb:cc:00:00:09'/></interface></bridge></interface>\n</node>",
)


@pytest.fixture
def cli(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cli]:
    # capfd, not capsys: `minidriver ssh` runs ssh on this process's file descriptors.
    monkeypatch.delenv("MINIDRIVER_CONFIG", raising=False)
    monkeypatch.delenv("MINIDRIVER_STATE_DIR", raising=False)
    node = tmp_path / "testdriver.xml"
    node.write_text(NODE_WITH_NETWORK)
    conf = load_config(None, state_dir=tmp_path / "state", environ={}).with_libvirt(
        connection_uri=f"test://{node}", virt_type="qemu"
    )
    host = Host(conf)
    c = Cli(host, tmp_path / "state", capfd)
    c.ok("image", "add", str(qcow2(tmp_path / "g.qcow2", 64 * MiB, data=False)), "--name", "g")
    yield c
    host.close()


def boot(cli: Cli, *extra: str, name: str = "vm") -> dict[str, Any]:
    doc: dict[str, Any] = cli.json(
        "boot", "--image", "g", "--flavor", "t1.nano", "--name", name, *extra
    )
    return doc


def reservation_files(cli: Cli, port: int) -> list[Path]:
    """The port's reservation, if it names this test's state dir."""
    directory = load_config(None, state_dir=cli.state_dir, environ={}).port_reservations_path
    path = directory / str(port)
    if path.exists() and json.loads(path.read_text())["state_path"] == str(cli.state_dir):
        return [path]
    return []


# -- boot, show, delete -------------------------------------------------------------


def test_user_mode_is_the_default_and_show_says_port_mac_and_taint(cli: Cli) -> None:
    booted = boot(cli)
    net = booted["network"]
    assert net["mode"] == "user" and net["source"] is None
    assert net["mac_address"].startswith("fa:16:3e:")
    port = net["forward_port"]
    assert 10022 <= port <= 10999
    assert booted["tainted"] == ["custom-argv"]
    shown = cli.json("show", "vm")
    assert shown["network"] == net and shown["tainted"] == ["custom-argv"]
    text = cli.ok("show", "vm").out
    assert f"127.0.0.1:{port} -> guest port 22" in text
    assert "custom-argv" in text
    # The XML that was defined forwards that port, from 127.0.0.1 only, to that MAC.
    xml = (Path(booted["instance_dir"]) / "libvirt.xml").read_text()
    assert f"hostfwd=tcp:127.0.0.1:{port}-:22" in xml
    assert f"mac={net['mac_address']}" in xml
    assert reservation_files(cli, port)


def test_two_boots_get_two_ports_and_delete_frees_them(cli: Cli) -> None:
    ports = [boot(cli, name=f"vm{i}")["network"]["forward_port"] for i in range(2)]
    assert ports[0] != ports[1]
    cli.ok("delete", "vm0", "vm1")
    assert not any(reservation_files(cli, p) for p in ports)
    # The freed port is the next boot's again.
    assert boot(cli, name="vm2")["network"]["forward_port"] == min(ports)


@pytest.mark.parametrize(
    ("network", "xml_type", "source"),
    [("bridge:br-lab", "bridge", "br-lab"), ("network:labnet", "network", "labnet")],
)
def test_network_and_bridge_modes(cli: Cli, network: str, xml_type: str, source: str) -> None:
    booted = boot(cli, "--network", network)
    assert booted["network"]["mode"] == xml_type
    assert booted["network"]["source"] == source
    assert booted["network"]["forward_port"] is None
    assert booted["tainted"] == []
    domain = cli.host.get_connection().lookupByName(booted["name"])
    tree = etree.fromstring(domain.XMLDesc(0).encode())
    assert tree.xpath("devices/interface/@type") == [xml_type]
    assert tree.xpath("devices/interface/mac/@address") == [booted["network"]["mac_address"]]
    assert tree.xpath("devices/interface/model/@type") == ["virtio"]


def test_none_mode_has_no_nic_and_empty_network_data(cli: Cli) -> None:
    booted = boot(cli, "--network", "none", "--config-drive")
    assert booted["network"] == {
        "mode": "none",
        "source": None,
        "mac_address": None,
        "forward_port": None,
    }
    xml = (Path(booted["instance_dir"]) / "libvirt.xml").read_text()
    assert "<interface" not in xml and "qemu:commandline" not in xml


def test_print_xml_shows_the_nic_of_the_mode_asked(cli: Cli) -> None:
    xml = cli.json("boot", "--image", "g", "--flavor", "t1.nano", "--print-xml",
                   "--network", "bridge:br9")["xml"]  # fmt: skip
    assert '<source bridge="br9"/>' in xml
    assert cli.instances() == []


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--network", "slirp"], 1, "network mode 'slirp' is unknown"),
        (["--network", "bridge"], 1, "network mode bridge needs the name of a bridge"),
        (["--key-name", "k"], 1, "no key pair named 'k'"),
        (["--wait-ssh", "--network", "none"], 2, "--wait-ssh needs the user network"),
        (["--wait-ssh", "--no-wait"], 2, "cannot go with --no-wait"),
    ],
)
def test_bad_network_boots_leave_nothing(
    cli: Cli, argv: list[str], code: int, message: str
) -> None:
    result = cli.run("boot", "--image", "g", "--flavor", "t1.nano", *argv)
    assert result.code == code, result
    assert message in result.err
    assert "hint:" in result.err
    assert cli.instances() == [] and cli.domains() == []


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ("network:nosuchnet", "network nosuchnet is not active"),
        ("bridge:br-none", "bridge br-none is not active"),
    ],
)
def test_a_vif_that_cannot_be_plugged_fails_the_boot_and_leaves_nothing(
    cli: Cli, network: str, message: str
) -> None:
    result = cli.run("boot", "--image", "g", "--flavor", "t1.nano", "--network", network)
    assert result.code == 1, result
    assert f"failed at plug_vifs: cannot plug the VIF: {message}" in result.err
    assert "hint:" in result.err
    assert cli.instances() == [] and cli.domains() == []


def test_a_key_needs_a_config_drive(cli: Cli) -> None:
    cli.ok("keypair", "create", "k")
    result = cli.run("boot", "--image", "g", "--flavor", "t1.nano", "--key-name", "k")
    assert result.code == 1
    assert "reach the guest on a config drive" in result.err
    assert "--config-drive" in result.err


def test_the_key_pair_goes_on_the_config_drive_with_the_network_data(cli: Cli) -> None:
    pub = cli.json("keypair", "create", "k")["public_key"]
    booted = boot(cli, "--key-name", "k", "--config-drive")
    assert booted["key_name"] == "k"
    drive = Path(booted["instance_dir"]) / "disk.config"
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open(str(drive))
    try:

        def read(path: str) -> Any:
            import io

            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path=path)
            return json.loads(buf.getvalue())

        meta = read("/openstack/latest/meta_data.json")
        network = read("/openstack/latest/network_data.json")
    finally:
        iso.close()
    assert meta["public_keys"] == {"k": pub}
    assert network["links"][0]["ethernet_mac_address"] == booted["network"]["mac_address"]
    assert network["networks"][0]["type"] == "ipv4_dhcp"


# -- keypair ------------------------------------------------------------------------


def test_keypair_commands(cli: Cli, tmp_path: Path) -> None:
    made = cli.json("keypair", "create", "lab")
    assert made["type"] == "ssh-ed25519" and made["private_key"].endswith("/keypairs/lab")
    assert oct(os.stat(made["private_key"]).st_mode & 0o777) == "0o600"
    again = cli.run("keypair", "create", "lab")
    assert again.code == 1 and "a key pair named 'lab' exists" in again.err
    pub = tmp_path / "id.pub"
    pub.write_text(made["public_key"].replace("minidriver:lab", "imported") + "\n")
    imported = cli.json("keypair", "create", "mine", "--public-key", str(pub))
    assert imported["private_key"] is None
    assert imported["fingerprint"] == made["fingerprint"]
    assert [k["name"] for k in cli.json("keypair", "list")] == ["lab", "mine"]
    assert "(imported)" in cli.ok("keypair", "list").out
    cli.ok("keypair", "delete", "lab")
    gone = cli.run("keypair", "delete", "lab")
    assert gone.code == 1 and "no key pair named 'lab'" in gone.err
    assert [k["name"] for k in cli.json("keypair", "list")] == ["mine"]


# -- boot --wait-ssh ----------------------------------------------------------------


def serve_banner_on_reserved_port(cli: Cli, stop: threading.Event) -> threading.Thread:
    """What the guest's sshd would do: greet on the port the boot reserves."""
    directory = load_config(None, state_dir=cli.state_dir, environ={}).port_reservations_path

    def run() -> None:
        port = None
        while port is None and not stop.is_set():
            for entry in directory.glob("[0-9]*"):
                try:
                    if json.loads(entry.read_text())["state_path"] == str(cli.state_dir):
                        port = int(entry.name)
                except (OSError, ValueError):
                    pass
            time.sleep(0.01)
        if port is None:
            return
        with socket.socket() as sock:
            # As sshd binds (and QEMU's forwarder): the port may be in TIME_WAIT from
            # a connection of a test before.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
            sock.settimeout(0.1)
            while not stop.is_set():
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.sendall(b"SSH-2.0-TinyGuest\r\n")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_wait_ssh_reports_when_ssh_answered(cli: Cli) -> None:
    stop = threading.Event()
    thread = serve_banner_on_reserved_port(cli, stop)
    try:
        booted = boot(cli, "--wait-ssh", "--timeout", "60")
    finally:
        stop.set()
        thread.join()
    assert booted["ssh"]["port"] == booted["network"]["forward_port"]
    assert booted["ssh"]["banner"] == "SSH-2.0-TinyGuest"
    assert booted["ssh"]["ready_after"] > 0


def test_wait_ssh_past_the_timeout_exits_3_and_leaves_nothing(cli: Cli) -> None:
    result = cli.run(
        "boot", "--image", "g", "--flavor", "t1.nano", "--name", "vm", "--wait-ssh",
        "--timeout", "1",
    )  # fmt: skip
    assert result.code == 3, result
    assert "no SSH server answered on 127.0.0.1:" in result.err
    assert cli.instances() == [] and cli.domains() == []


# -- minidriver ssh, against a real sshd ---------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Callable[[int, Path], None]]:
    """``start(port, authorized_keys)``: a real sshd on 127.0.0.1:port, as the guest's."""
    if not os.path.exists(SSHD) or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(f"{SSHD} (openssh-server) and root are needed in CI")
        pytest.skip(f"needs {SSHD} (apt-get install openssh-server) and root")
    procs: list[subprocess.Popen[bytes]] = []

    def start(port: int, authorized_keys: Path) -> None:
        work = tmp_path / f"sshd-{port}"
        work.mkdir()
        host_key = work / "host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key], check=True)
        config = work / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"PidFile {work / 'sshd.pid'}\nAuthorizedKeysFile {authorized_keys}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        )
        # sshd insists on its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        procs.append(subprocess.Popen([SSHD, "-D", "-e", "-f", config]))
        deadline = time.monotonic() + 30
        while port_is_free(port):
            assert procs[-1].poll() is None, "sshd exited"
            assert time.monotonic() < deadline, "sshd did not listen"
            time.sleep(0.05)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def run_ssh(cli: Cli, *argv: str) -> tuple[int, str, str]:
    """main() in this process (the test driver's domains live here); ssh's output goes
    to the file descriptors, which the cli fixture captures."""
    capfd = cli.capsys
    capfd.readouterr()
    try:
        code = main(["--state-dir", str(cli.state_dir), "ssh", *argv], host=cli.host)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capfd.readouterr()
    return code, out, err


def test_minidriver_ssh_runs_commands_and_passes_their_exit_code(
    cli: Cli, sshd: Callable[[int, Path], None]
) -> None:
    cli.ok("keypair", "create", "k")
    booted = boot(cli, "--key-name", "k", "--config-drive")
    port = booted["network"]["forward_port"]
    sshd(port, cli.state_dir / "keypairs" / "k.pub")

    code, out, _ = run_ssh(cli, "vm", "--user", "root", "--", "echo", "hello from", "$((6*7))")
    assert (code, out) == (0, "hello from 42\n")
    assert run_ssh(cli, "vm", "--user", "root", "--", "false")[0] == 1
    assert run_ssh(cli, "vm", "--user", "root", "--", "exit 7")[0] == 7
    # The guest's host key was taken without a prompt, under the instance's uuid.
    known_hosts = cli.state_dir / "known_hosts"
    assert known_hosts.read_text().startswith(booted["uuid"] + " ")
    # A user the guest does not know: ssh's own failure, 255.
    code, _, err = run_ssh(cli, "vm", "--user", "nosuchuser", "--", "true")
    assert code == 255 and "Permission denied" in err

    cli.ok("delete", "vm")
    assert booted["uuid"] not in known_hosts.read_text()


def test_minidriver_ssh_says_why_it_cannot(cli: Cli) -> None:
    boot(cli, name="nokey")
    boot(cli, "--network", "none", name="nonic")
    boot(cli, "--network", "bridge:br-lab", name="bridged")
    cli.ok("keypair", "create", "k")
    boot(cli, "--key-name", "k", "--config-drive", name="stopped")
    cli.ok("stop", "stopped", "--force")
    for name, message in [
        ("nokey", "was booted without --key-name"),
        ("nonic", "has no network interface"),
        ("bridged", "only the user network forwards a port on 127.0.0.1"),
        ("stopped", "is shutoff, not running"),
    ]:
        code, _, err = run_ssh(cli, name, "--", "true")
        assert code == 1, (name, err)
        assert message in err and "hint:" in err


def test_ssh_is_installed_where_minidriver_runs() -> None:
    """`minidriver ssh` and `keypair create` run the system ssh and ssh-keygen."""
    assert shutil.which("ssh") and shutil.which("ssh-keygen")


def test_wait_ssh_on_a_guest_that_stops_fails_and_leaves_nothing(cli: Cli) -> None:
    """The guest is RUNNING, then stops before any SSH server answers (the fault,
    injected once the boot has reached its wait for ssh): exit 1, and the failed boot
    is removed as a timed-out one is."""
    stop = threading.Event()

    def stop_the_guest_once_it_runs() -> None:
        db = cli.state_dir / "minidriver.db"
        while not stop.is_set():
            with contextlib.suppress(sqlite3.Error):
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                with contextlib.closing(conn):
                    row = conn.execute("SELECT name FROM instances WHERE state = 'running'")
                    running = row.fetchone()
                if running is not None:
                    cli.host.get_connection().lookupByName(running[0]).destroy()
                    return
            time.sleep(0.01)

    thread = threading.Thread(target=stop_the_guest_once_it_runs, daemon=True)
    thread.start()
    try:
        result = cli.run(
            "boot", "--image", "g", "--flavor", "t1.nano", "--name", "vm", "--wait-ssh",
            "--timeout", "60",
        )  # fmt: skip
    finally:
        stop.set()
        thread.join()
    assert result.code == 1, result
    assert "the guest stopped before its SSH server answered" in result.err
    assert cli.instances() == [] and cli.domains() == []


@pytest.mark.parametrize(
    ("network", "plug"),
    [
        ("user", "plug_vifs: nothing to find up (user mode's port is reserved before)"),
        ("network:labnet", "plug_vifs: network labnet must be active on the host"),
        ("bridge:br-lab", "plug_vifs: bridge br-lab must be active on the host"),
    ],
)
def test_dry_run_says_what_plugging_checks_and_that_the_test_driver_does_not_pause(
    cli: Cli, network: str, plug: str
) -> None:
    plan = cli.json("boot", "--image", "g", "--flavor", "t1.nano", "--dry-run",
                    "--network", network)  # fmt: skip
    assert plan["launch"] == [plug, "start: not paused, no network-vif-plugged expected"]
    text = cli.ok("explain", "--image", "g", "--flavor", "t1.nano").out
    assert "then, once the domain is defined:\n  plug_vifs: nothing to find up" in text
