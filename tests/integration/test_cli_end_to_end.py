"""The minidriver command end to end, as a user drives it, with the real test guest."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from minidriver import console, host
from minidriver.config import Config

pytestmark = pytest.mark.integration

MINIDRIVER = [sys.executable, "-m", "minidriver"]
BOOT_THEN_READY = r"^minidriver-guest: boot-count {n}\r?\n(?:.*\n)*?minidriver-guest: ready\r?$"


@pytest.fixture
def cli_state(host_config: Config) -> Iterator[Path]:
    """A state dir of the command's own (its own embedded root, if that is used); its
    instances deleted however the test ended, before the dir goes: on the daemon a
    domain outlives its state dir."""
    path = Path(tempfile.mkdtemp(prefix="mdcli-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    uri = host_config.libvirt.connection_uri
    connect = ["--connect", uri] if uri else []
    subprocess.run(
        [*MINIDRIVER, "--state-dir", str(path), *connect, "delete", "--all"],
        capture_output=True,
        timeout=300,
        check=False,
    )
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def http_root(test_image: Path) -> Iterator[str]:
    """The test image served on 127.0.0.1 (only loopback: the tests send no other traffic)."""
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(test_image.parent)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Cli:
    def __init__(self, state: Path, uri: str) -> None:
        self.base = [*MINIDRIVER, "--state-dir", str(state)]
        if uri:
            self.base += ["--connect", uri]

    def run(self, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == code, f"{args}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run("--json", *args).stdout)


def test_image_boot_manage_delete(
    cli_state: Path, host_config: Config, test_image: Path, http_root: str
) -> None:
    cli = Cli(cli_state, host_config.libvirt.connection_uri)
    local = cli.json("image", "add", str(test_image), "--name", "local", "--disk-format", "qcow2",
                     "--property", "os_type=linux")  # fmt: skip
    remote = cli.json("image", "add", f"{http_root}/{test_image.name}", "--name", "remote",
                      "--property", "os_type=linux")  # fmt: skip
    assert remote["disk_format"] == "qcow2"
    assert remote["os_hash_value"] == local["os_hash_value"]
    listed = cli.json("image", "list")
    assert {i["name"] for i in listed} == {"local", "remote"}

    boot = cli.json(
        "boot", "--image", "remote", "--flavor", "t1.nano", "--name", "e2e",
        "--wait-for", "minidriver-guest: ready", "--timeout", "180",
    )  # fmt: skip
    assert boot["state"] == "running"
    assert boot["cache_hit"] is False
    assert set(boot["timings"]) >= {"fetch", "convert", "overlay", "define", "start", "total"}
    assert boot["disks"]["disk"]["virtual_size"] == 1024**3
    assert [i["display_name"] for i in cli.json("list")] == ["e2e"]
    shown = cli.json("show", "e2e")
    assert shown["uuid"] == boot["uuid"]
    assert "minidriver-guest: boot-count 1" in cli.run("console", "e2e").stdout

    log = Path(boot["instance_dir"]) / "console.log"
    # A second process beside the others: console --follow streams the next boot.
    follow = subprocess.Popen(
        [*cli.base, "console", "e2e", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.json("stop", "e2e")["clean"] is True
        assert cli.json("show", "e2e")["state"] == "shutoff"
        cli.run("start", boot["name"])
        console.wait_for_console(log, r"^minidriver-guest: boot-count 2", timeout=120)
        time.sleep(0.5)  # the follower polls every 0.2 s
    finally:
        follow.send_signal(signal.SIGINT)
        streamed, _ = follow.communicate(timeout=10)
    assert follow.returncode == 0
    assert "minidriver-guest: boot-count 2" in streamed
    cli.run("reboot", boot["uuid"][:8], "--hard")
    # The guest handles the ACPI button once it is ready (acpid starts after the
    # boot-count line): a press before that is lost, as on real hardware.
    console.wait_for_console(log, BOOT_THEN_READY.format(n=3), timeout=120)
    # A soft reboot presses the ACPI button; the guest powers off and libvirt starts it.
    cli.run("reboot", "e2e")
    console.wait_for_console(log, r"^minidriver-guest: boot-count 4", timeout=120)
    assert cli.json("show", "e2e")["state"] == "running"

    cli.run("delete", "e2e")
    assert cli.json("list") == []
    instances = cli_state / "instances"
    assert sorted(p.name for p in instances.iterdir()) == ["_base", "locks"]
    assert list((instances / "locks").iterdir()) == []
    assert not [p for p in (instances / "_base").iterdir() if p.suffix in (".part", ".converted")]
    assert os.listdir(instances / "_base"), "the cache stays"


def test_host_check_says_which_connection_the_default_chose_and_why(cli_state: Path) -> None:
    """Without --connect: the daemon when one listens on its socket, else the embedded
    driver, and host check (human and --json) says which and why."""
    data = Cli(cli_state, "").json("host", "check")
    absent = host.no_daemon_listens(host.DAEMON_SOCKET)
    if absent is None:
        assert data["uri"] == host.SYSTEM_URI
        assert data["connection_reason"] == f"a libvirt daemon answers on {host.DAEMON_SOCKET}"
    else:
        assert data["uri"] == f"{host.EMBED_URI}?root={cli_state / 'embed'}"
        assert data["connection_reason"] == f"no libvirt daemon: {absent}"
    human = Cli(cli_state, "").run("host", "check").stdout
    assert re.search(rf"^connection_reason +{re.escape(data['connection_reason'])}$", human, re.M)
