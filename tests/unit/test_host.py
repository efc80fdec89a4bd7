from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from minidriver import host
from minidriver.config import load_config
from minidriver.exception import HostError


def sysfs(tmp_path: Path, *modules: str) -> Path:
    root = tmp_path / "sys" / "module"
    for m in modules:
        (root / m).mkdir(parents=True)
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def dev_kvm(tmp_path: Path) -> Path:
    path = tmp_path / "kvm"
    path.write_text("")
    return path


@pytest.mark.parametrize(
    ("modules", "expected", "reason"),
    [
        (("kvm", "kvm_intel"), "kvm", "kvm_intel loaded"),
        (("kvm", "kvm_amd"), "kvm", "kvm_amd loaded"),
        (("kvm", "kvm_pvm"), "qemu", "kvm_pvm"),
        (("kvm",), "qemu", "neither kvm_intel nor kvm_amd"),
    ],
)
def test_auto_virt_type_needs_real_kvm(
    tmp_path: Path, dev_kvm: Path, modules: tuple[str, ...], expected: str, reason: str
) -> None:
    choice = host.detect_virt_type("auto", dev_kvm=dev_kvm, sys_module=sysfs(tmp_path, *modules))
    assert choice.virt_type == expected
    assert reason in choice.reason


def test_auto_without_dev_kvm_is_tcg(tmp_path: Path) -> None:
    choice = host.detect_virt_type(
        "auto", dev_kvm=tmp_path / "absent", sys_module=sysfs(tmp_path, "kvm_intel")
    )
    assert choice == host.VirtTypeChoice("qemu", f"{tmp_path / 'absent'} is missing: using TCG")


def test_configured_virt_type_wins(tmp_path: Path) -> None:
    choice = host.detect_virt_type("kvm", dev_kvm=tmp_path / "absent", sys_module=sysfs(tmp_path))
    assert choice.virt_type == "kvm"
    assert "in the config" in choice.reason


@pytest.mark.kvm_pvm  # deselected on other hosts (tests/skip_policy.py)
def test_this_machine_chooses_tcg_when_kvm_is_pvm() -> None:
    assert host.detect_virt_type("auto").virt_type == "qemu"


def test_untraversable_parents_names_the_blocking_directory(tmp_path: Path) -> None:
    top = tmp_path / "top"
    private = top / "private"
    (private / "instances").mkdir(parents=True)
    top.chmod(0o755)
    private.chmod(0o700)
    tmp_path.chmod(0o755)
    blocked = host.untraversable_parents(private / "instances", "nobody")
    assert private in blocked
    private.chmod(0o711)
    assert private not in host.untraversable_parents(private / "instances", "nobody")
    assert host.untraversable_parents(private, "root") == []


def test_qemu_user_of_daemon_reads_qemu_conf(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('#user = "root"\n user = "qemu-runner"\n')
    assert host.qemu_user_of_daemon(conf) == "qemu-runner"
    conf.write_text('#user = "root"\n')
    assert host.qemu_user_of_daemon(conf) == "libvirt-qemu"
    # Read from the line that sets it: not a longer name, not a comment's text.
    conf.write_text('username = "a"\n# see: user = "b"\ngroup = "kvm"\n\tuser="c"  # ours\n')
    assert host.qemu_user_of_daemon(conf) == "c"
    conf.write_text("user = +0\n")
    assert host.qemu_user_of_daemon(conf) == "+0"


def test_embedded_root_held_by_another_live_process_is_named(tmp_path: Path) -> None:
    piddir = tmp_path / "run" / "qemu"
    piddir.mkdir(parents=True)
    assert host.embedded_root_holder(tmp_path) is None
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (piddir / "driver.pid").write_text(f"{sleeper.pid}\n")
        assert host.embedded_root_holder(tmp_path) == sleeper.pid
        conf = load_config(None, state_dir=tmp_path, environ={}).with_libvirt(
            connection_uri=f"qemu:///embed?root={tmp_path}"
        )
        with pytest.raises(HostError, match=rf"in use by process {sleeper.pid}") as err:
            host.Host(conf).get_connection()
        assert err.value.hint is not None
        assert "libvirtd" in err.value.hint
    finally:
        sleeper.kill()
        sleeper.wait()
    assert host.embedded_root_holder(tmp_path) is None  # a dead holder does not count
    (piddir / "driver.pid").write_text(f"{os.getpid()}\n")
    assert host.embedded_root_holder(tmp_path) is None  # nor do we


def test_unreachable_uri_is_a_host_error(tmp_path: Path) -> None:
    conf = load_config(None, state_dir=tmp_path, environ={}).with_libvirt(
        connection_uri="qemu+unix:///system?socket=/nonexistent/sock"
    )
    with pytest.raises(HostError, match="cannot connect to libvirt") as err:
        host.Host(conf).get_connection()
    assert err.value.hint is not None


def test_undefine_survives_a_domain_that_stops_between_check_and_destroy(
    test_driver: libvirt.virConnect,
) -> None:
    xml = (
        "<domain type='test'><name>racer</name><memory>65536</memory>"
        "<os><type>hvm</type></os></domain>"
    )
    domain = test_driver.defineXML(xml)  # defined, never started

    class StoppedMeanwhile:
        """isActive still said yes; by destroy, the domain had stopped (the race)."""

        def isActive(self) -> bool:
            return True

        def __getattr__(self, name: str) -> object:
            return getattr(domain, name)

    host.Host.undefine(StoppedMeanwhile())
    assert test_driver.listAllDomains() == []


def test_qemu_conf_dynamic_ownership_is_on_unless_turned_off(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text("#dynamic_ownership = 1\n")
    assert host.dynamic_ownership_of_daemon(conf)
    conf.write_text("dynamic_ownership = 0\n")
    assert not host.dynamic_ownership_of_daemon(conf)
    assert host.dynamic_ownership_of_daemon(tmp_path / "absent")


# -- which connection, and why ------------------------------------------------------
#
# Real unix sockets stand where the daemon's would be. The embedded driver is opened in
# a child process: it allows one root per process, and this one may hold another.

CHOOSE = """
import sys
from pathlib import Path
from minidriver.config import load_config
from minidriver.host import Host

h = Host(load_config(None, state_dir=sys.argv[1], environ={}), daemon_socket=Path(sys.argv[2]))
h.get_connection()
print(h.uri)
print(h.connection_reason)
h.close()
"""


@pytest.fixture
def short_state_dir() -> Iterator[Path]:
    """A state dir short enough for the embedded root to live in it (and go with it)."""
    path = Path(tempfile.mkdtemp(prefix="md-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def default_connection_in_child(state_dir: Path, socket_path: Path) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", CHOOSE, state_dir, socket_path],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def stale_socket(path: Path) -> Path:
    """A socket file that nobody listens on, as a daemon that died leaves it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(os.fspath(path))
    return path


@contextlib.contextmanager
def hanging_up_listener(path: Path) -> Iterator[None]:
    """Something that listens and closes every connection: a daemon refusing us."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.fspath(path))
    server.listen(8)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        server.close()


def test_no_daemon_socket_falls_back_to_the_embedded_driver(
    tmp_path: Path, short_state_dir: Path
) -> None:
    missing = tmp_path / "libvirt-sock"
    uri, reason = default_connection_in_child(short_state_dir, missing)
    assert uri == f"qemu:///embed?root={short_state_dir / 'embed'}"
    assert reason == f"no libvirt daemon: {missing} does not exist"


def test_a_stale_daemon_socket_falls_back_to_the_embedded_driver(
    tmp_path: Path, short_state_dir: Path
) -> None:
    stale = stale_socket(tmp_path / "libvirt-sock")
    uri, reason = default_connection_in_child(short_state_dir, stale)
    assert uri.startswith("qemu:///embed?root=")
    assert (
        reason
        == f"no libvirt daemon: nothing listens on {stale} (connection refused: a stale socket)"
    )


def test_a_daemon_that_answers_and_refuses_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    path = tmp_path / "libvirt-sock"
    conf = load_config(None, state_dir=tmp_path / "state", environ={})
    with hanging_up_listener(path):
        h = host.Host(conf, daemon_socket=path)
        with pytest.raises(HostError, match=f"the libvirt daemon on {path} refused") as err:
            h.get_connection()
    assert err.value.hint is not None
    assert "--connect qemu:///embed" in err.value.hint
    assert not (tmp_path / "state" / "embed").exists()


def test_a_socket_we_may_not_connect_to_means_a_daemon_is_there(tmp_path: Path) -> None:
    """EACCES: a daemon listens but not for us. Asked as a user of its own (setpriv),
    as root passes any permission."""
    directory = Path(tempfile.mkdtemp(prefix="md-sock-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        path = directory / "libvirt-sock"
        with hanging_up_listener(path):
            path.chmod(0o700)
            probe = (
                "import sys; from pathlib import Path; from minidriver import host;"
                " print(host.no_daemon_listens(Path(sys.argv[1])))"
            )
            proc = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                 sys.executable, "-c", probe, path],
                capture_output=True, text=True, cwd="/", timeout=60, check=True,
            )  # fmt: skip
        assert proc.stdout.strip() == "None"
        assert "does not exist" in str(host.no_daemon_listens(directory / "absent"))
    finally:
        shutil.rmtree(directory)


def test_a_configured_uri_says_so(tmp_path: Path, node_file: Path) -> None:
    conf = load_config(None, state_dir=tmp_path, environ={})
    h = host.Host(conf.with_libvirt(connection_uri=f"test://{node_file}"))
    try:
        assert (
            h.connection_reason == f"connection_uri = test://{node_file} (the config or --connect)"
        )
    finally:
        h.close()
