"""Logging into guests: the ssh command line, the banner wait against a real TCP server
on 127.0.0.1, known_hosts upkeep; `minidriver ssh` against a real sshd."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from minidriver import ssh
from minidriver.config import load_config
from minidriver.db import InstanceRecord
from minidriver.exception import MinidriverError
from minidriver.keypairs import KeyPairNotFound, KeyPairStore

UUID = "7d1e4a52-9f64-4d8e-a0b4-1f1a5c3e2b10"


class TinyServer:
    """A TCP server on 127.0.0.1 that closes its first ``silent`` connections at once
    (as QEMU's user network does while the guest has no sshd) and then greets."""

    def __init__(self, greeting: bytes, silent: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port: int = self.sock.getsockname()[1]
        self.greeting = greeting
        self.silent = silent
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.connections += 1
                if self.connections > self.silent:
                    conn.sendall(self.greeting)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[Callable[..., TinyServer]]:
    made: list[TinyServer] = []

    def make(greeting: bytes, silent: int = 0) -> TinyServer:
        made.append(TinyServer(greeting, silent))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_the_banner_is_waited_for_through_closed_connections(
    server: Callable[..., TinyServer],
) -> None:
    srv = server(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", silent=2)
    waited: list[float] = []
    banner = ssh.wait_for_banner(srv.port, 60, interval=0.05, progress=waited.append)
    assert banner == "SSH-2.0-OpenSSH_9.2p1 Debian-2"
    assert srv.connections == 3
    assert len(waited) == 2  # progress after each failed try


def test_lines_before_the_version_line_are_skipped(server: Callable[..., TinyServer]) -> None:
    srv = server(b"welcome\r\nSSH-2.0-x\r\n")
    assert ssh.wait_for_banner(srv.port, 60) == "SSH-2.0-x"


def test_a_server_that_is_no_ssh_server_runs_out_the_deadline(
    server: Callable[..., TinyServer],
) -> None:
    srv = server(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(ssh.SSHTimeout, match=f"no SSH server answered on 127.0.0.1:{srv.port}"):
        ssh.wait_for_banner(srv.port, 0.5, interval=0.05)
    assert srv.connections >= 1


def test_nothing_listening_runs_out_the_deadline() -> None:
    with socket.socket() as sock:  # a port that is surely closed: ours, not listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(ssh.SSHTimeout):
            ssh.wait_for_banner(port, 0.3, interval=0.05)


def test_a_stopped_guest_ends_the_wait_at_once(server: Callable[..., TinyServer]) -> None:
    srv = server(b"", silent=1000)
    with pytest.raises(MinidriverError, match="stopped before its SSH server answered"):
        ssh.wait_for_banner(srv.port, 600, interval=0.05, alive=lambda: False)


def test_ssh_argv_for_throwaway_guests(tmp_path: Path) -> None:
    argv = ssh.ssh_argv(
        port=10022,
        user="debian",
        known_hosts=tmp_path / "known_hosts",
        host_key_alias=UUID,
        identity=tmp_path / "keypairs" / "k",
        command=["df", "-B1", "/"],
    )
    assert argv[:3] == ["ssh", "-p", "10022"]
    options = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert "StrictHostKeyChecking=accept-new" in options
    assert f"UserKnownHostsFile={tmp_path / 'known_hosts'}" in options
    assert f"HostKeyAlias={UUID}" in options
    assert "BatchMode=yes" in options
    assert "IdentitiesOnly=yes" in options
    assert argv[argv.index("-i") + 1] == str(tmp_path / "keypairs" / "k")
    assert argv[-5:] == ["debian@127.0.0.1", "--", "df", "-B1", "/"]


def record(**changes: object) -> InstanceRecord:
    fields: dict[str, object] = {
        "uuid": UUID,
        "name": "instance-00000001",
        "display_name": "vm",
        "flavor": "t1.nano",
        "image_id": "x",
        "state": "running",
        "created_at": "",
        "instance_dir": "/nonexistent",
        "network_mode": "user",
        "mac_address": "fa:16:3e:00:00:01",
        "forward_port": 10022,
        "key_name": "k",
        **changes,
    }
    return InstanceRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"network_mode": "none", "forward_port": None}, "has no network interface"),
        (
            {"network_mode": "bridge", "network_source": "br0", "forward_port": None},
            "only the user network forwards a port on 127.0.0.1",
        ),
        ({"key_name": None}, "was booted without --key-name"),
    ],
)
def test_instance_ssh_argv_says_why_there_is_none(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    conf = load_config(None, state_dir=tmp_path, environ={})
    with pytest.raises(MinidriverError, match=message) as caught:
        ssh.instance_ssh_argv(record(**changes), conf, KeyPairStore(conf.keypairs_path))
    assert caught.value.hint


def test_instance_ssh_argv_uses_the_key_pair_and_the_configured_user(tmp_path: Path) -> None:
    conf_file = tmp_path / "c.conf"
    conf_file.write_text("[DEFAULT]\nssh_user = admin\n")
    conf = load_config(conf_file, state_dir=tmp_path, environ={})
    store = KeyPairStore(conf.keypairs_path)
    with pytest.raises(KeyPairNotFound):
        ssh.instance_ssh_argv(record(), conf, store)
    pair = store.create("k")
    argv = ssh.instance_ssh_argv(record(), conf, store)
    assert argv[argv.index("-i") + 1] == str(pair.private_key)
    assert argv[-1] == "admin@127.0.0.1"
    assert ssh.instance_ssh_argv(record(), conf, store, user="root")[-1] == "root@127.0.0.1"


def test_forget_host_key_removes_only_that_instance(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    other = "0b5a3c44-2a41-4ad4-9a39-5a1f2f0c0d77"
    known.write_text(
        f"{UUID} ssh-ed25519 AAAAkey1\n{other} ssh-ed25519 AAAAkey2\n{UUID} ssh-rsa AAAAkey3\n"
    )
    ssh.forget_host_key(known, UUID, tmp_path / "locks")
    assert known.read_text() == f"{other} ssh-ed25519 AAAAkey2\n"
    ssh.forget_host_key(tmp_path / "absent", UUID, tmp_path / "locks")  # no file: no error
