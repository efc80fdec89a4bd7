"""Fixtures shared by unit and integration tests.

libvirt's embedded driver allows one root per process and one process per root, so
the connection is session-scoped: one Host, on one state dir, per pytest process.
``MINIDRIVER_TEST_CONNECTION`` picks it: ``daemon`` (qemu:///system, which must
answer), ``embed`` (the embedded driver, even where a daemon runs) or unset (auto, as
users get it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

# The rules for tests that do not run: markers that deselect, and skips failing CI.
from skip_policy import pytest_collection_modifyitems, pytest_configure  # noqa: F401 - hooks

from minidriver import config, console, guest
from minidriver.config import Config, load_config
from minidriver.driver import LibvirtDriver
from minidriver.guestimages import cloudimage, testimage
from minidriver.host import EMBED_URI, SYSTEM_URI, Host

# A run started with SIGINT ignored (a background job of a non-interactive shell, as a
# CI runner may start it) passes the ignore on to every child, and the tests that
# interrupt a child (the plugin's, console --follow's) would see SIGINT ignored there:
# Python's own default is restored, for this process and so for its children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# libvirt's QEMU runs as libvirt-qemu under a daemon and must traverse every parent of
# the state dir; pytest's own temp dirs are 0700, so integration state lives here.
TRAVERSABLE_TMP = Path("/var/tmp")


@pytest.fixture(scope="session")
def test_image() -> Path:
    """The test guest image, built once and cached (scripts/build-test-image)."""
    from minidriver.guestimages import testimage

    return testimage.build(log=lambda _msg: None)


@pytest.fixture(scope="session")
def session_port_reservations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("port-reservations")


@pytest.fixture(autouse=True)
def isolated_port_reservations(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unit tests reserve forwarded ports in a registry of their session, not the host's
    (/run/minidriver/ports): their state dirs outlive them in pytest's temp dirs, and
    their reservations with them. Integration tests use the host's, as users do."""
    if request.node.get_closest_marker("integration") is None:
        path = request.getfixturevalue("session_port_reservations")
        monkeypatch.setattr(config, "default_port_reservations_path", lambda: path)


@pytest.fixture(scope="session")
def cloud_image() -> cloudimage.CloudImage:
    """The Debian cloud guest (scripts/build-cloud-image): built once, about two
    minutes, then cached by its inputs."""
    return cloudimage.build(log=lambda _msg: None)


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    """A state dir that libvirt's QEMU user can traverse, removed after the session."""
    path = Path(tempfile.mkdtemp(prefix="mdtest-", dir=TRAVERSABLE_TMP))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _connection_uri() -> str:
    wanted = os.environ.get("MINIDRIVER_TEST_CONNECTION", "")
    return {"daemon": SYSTEM_URI, "embed": EMBED_URI, "": ""}[wanted]


@pytest.fixture(scope="session")
def host_config(state_dir: Path) -> Config:
    conf = load_config(None, state_dir=state_dir, environ={})
    return conf.with_libvirt(connection_uri=_connection_uri())


@pytest.fixture(scope="session")
def session_id() -> str:
    """Marks every domain this session defines, so that the sweep finds them all."""
    return str(uuid.uuid4())


@pytest.fixture(scope="session")
def libvirt_host(host_config: Config, session_id: str) -> Iterator[Host]:
    host = Host(host_config)
    host.get_connection()
    wanted = os.environ.get("MINIDRIVER_TEST_CONNECTION", "")
    if wanted == "daemon":
        assert host.uri == SYSTEM_URI, host.uri
    elif wanted == "embed":
        assert host.is_embedded, host.uri
    yield host
    sweep_domains(host, session_id)
    host.close()


def sweep_domains(host: Host, state_id: str) -> list[str]:
    """Destroy and undefine every domain whose metadata names ``state_id``."""
    swept = []
    for domain, xml in host.domains_xml():
        owner = guest.owner_of(xml)
        if owner is not None and owner.state_id == state_id:
            host.undefine(domain)
            swept.append(domain.name())
    return swept


@pytest.fixture(scope="session")
def driver(host_config: Config, libvirt_host: Host) -> Iterator[LibvirtDriver]:
    """The driver on the session's host; destroys every instance it left at the end."""
    drv = LibvirtDriver(host_config, host=libvirt_host)
    yield drv
    for record in drv.db.list_instances():
        with contextlib.suppress(Exception):
            drv.destroy(record.uuid)


@pytest.fixture(scope="session")
def test_image_id(driver: LibvirtDriver, test_image: Path) -> str:
    """The test guest, added once to the session's image service."""
    return driver.images.add(
        test_image,
        name="minidriver-test-guest",
        disk_format="qcow2",
        properties=testimage.IMAGE_PROPERTIES,
    ).id


@pytest.fixture
def wait_console() -> Callable[..., re.Match[str]]:
    """``wait_console(path, pattern, timeout=90)``: fails the test with the tail."""

    def wait(path: Path, pattern: str, timeout: float = 90) -> re.Match[str]:
        try:
            return console.wait_for_console(path, pattern, timeout)
        except console.ConsoleTimeout as exc:
            pytest.fail(f"{exc}\n--- console tail ---\n{exc.tail}")

    return wait


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regenerate-golden",
        action="store_true",
        help="rewrite tests/data golden files from the current output instead of comparing",
    )


def ceph_conf_or_skip() -> str:
    """The Ceph dev cluster's ceph.conf, from ``MINIDRIVER_TEST_CEPH_CONF``; without it
    the test skips, except under CI, where it fails: CI starts the cluster."""
    conf = os.environ.get("MINIDRIVER_TEST_CEPH_CONF", "")
    if not conf:
        why = "MINIDRIVER_TEST_CEPH_CONF is not set (conf=$(scripts/ceph-dev-cluster start))"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: CI must start the Ceph dev cluster for these tests")
        pytest.skip(why)
    if not Path(conf).is_file():
        pytest.fail(f"MINIDRIVER_TEST_CEPH_CONF={conf}: no such file")
    return conf


def rbd_ls(ceph_conf: str, pool: str) -> list[str]:
    """The pool's images as ``rbd ls`` lists them: what a user would check."""
    proc = subprocess.run(
        ["rbd", "-c", ceph_conf, "ls", pool], capture_output=True, text=True, check=True
    )
    return proc.stdout.split()


@contextlib.contextmanager
def ceph_pool(ceph_conf: str, prefix: str) -> Iterator[str]:
    """A pool of the caller's own (``<prefix>-<hex>``, initialised for RBD), removed
    with all it holds afterwards. The two integration runs share the cluster, so a
    test that compares a whole pool's listing needs a pool that only it writes to."""
    pool = f"{prefix}-{uuid.uuid4().hex[:8]}"

    def ceph(*args: str) -> None:
        subprocess.run(["ceph", "-c", ceph_conf, *args], check=True, capture_output=True)

    ceph("osd", "pool", "create", pool)
    try:
        subprocess.run(["rbd", "-c", ceph_conf, "pool", "init", pool], check=True)
        yield pool
    finally:
        ceph("osd", "pool", "rm", pool, pool, "--yes-i-really-really-mean-it")


# A libvirt test-driver node with no domains: each test opens its own copy, so state
# defined by one test never leaks into another.
TEST_DRIVER_NODE = """\
<node>
  <cpu>
    <nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>
    <mhz>2000</mhz><model>x86_64</model>
  </cpu>
  <memory>4194304</memory>
  <!-- A host bridge, found up by vif.plug_vifs when a test boots with bridge:br0. -->
  <interface type="bridge" name="br0"><start mode="onboot"/>
    <bridge stp="off"><interface type="ethernet" name="eth0">
      <mac address="aa:bb:cc:00:00:01"/></interface></bridge>
  </interface>
</node>
"""


@pytest.fixture
def test_driver(tmp_path: Path) -> Iterator[libvirt.virConnect]:
    """A fresh connection to libvirt's own test driver, from a definition file."""
    node = tmp_path / "testdriver.xml"
    node.write_text(TEST_DRIVER_NODE)
    conn = libvirt.open(f"test://{node}")
    yield conn
    conn.close()


@pytest.fixture
def node_file(tmp_path: Path) -> Path:
    """This test's own test-driver node: nothing defined in one test leaks to another."""
    node = tmp_path / "testdriver.xml"
    node.write_text(TEST_DRIVER_NODE)
    return node


@pytest.fixture
def conf(tmp_path: Path, node_file: Path) -> Config:
    """A state dir of this test's own on its own test-driver node (unit tests)."""
    return load_config(None, state_dir=tmp_path / "state", environ={}).with_libvirt(
        connection_uri=f"test://{node_file}", virt_type="qemu"
    )


@pytest.fixture
def drv(conf: Config, make_driver: Callable[[Config], LibvirtDriver]) -> LibvirtDriver:
    """The driver on ``conf``: libvirt's test driver, real files, real SQLite."""
    return make_driver(conf)


@pytest.fixture(scope="session")
def empty_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A blank 64 MiB qcow2 (no guest in it): enough for what runs on the test driver."""
    path = tmp_path_factory.mktemp("src") / "cirros.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(64 * 2**20)], check=True)
    return path


@pytest.fixture
def empty_qcow2_id(drv: LibvirtDriver, empty_qcow2: Path) -> str:
    """:func:`empty_qcow2` added to ``drv``'s image service as ``cirros``."""
    return drv.images.add(empty_qcow2, name="cirros", disk_format="qcow2").id


@pytest.fixture
def make_driver() -> Iterator[Callable[[Config], LibvirtDriver]]:
    """Drivers made in a test, their connections and databases closed after it."""
    made: list[LibvirtDriver] = []

    def make(conf: Config) -> LibvirtDriver:
        drv = LibvirtDriver(conf)
        made.append(drv)
        return drv

    yield make
    for drv in made:
        drv.host.close()
        drv.db.close()


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: int) -> Iterator[Path]:
    """A size-limited tmpfs at ``mountpoint`` (a small disk to fill), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "mdtest", mountpoint],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", mountpoint], check=True)


# The contract's step names (issue 3/4): boot --json's timings have at least these.
TIMING_KEYS = frozenset(
    {"fetch", "convert", "resize", "overlay", "ephemeral", "swap", "define", "start", "wait"}
    | {"total"}
)


def img_info(path: Path) -> dict[str, Any]:
    """qemu-img's own view of a file, its format probed (tests made every file)."""
    out = subprocess.run(
        ["qemu-img", "info", "--force-share", "--output=json", os.fspath(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info: dict[str, Any] = json.loads(out)
    return info
