"""Issue 18's acceptance on the Debian cloud guest: a template made once from a guest
that answers SSH; clones restored from it answer ``minidriver ssh`` at once, four of
them together each keep their own files, the frozen disks never change, and the
clock of a clone is the host's (set through the guest agent after the restore), as it
is after a resume (or a start) of a clone suspended for a while.

Everything goes through the ``minidriver`` command, as a user runs it, on a state dir
of its own; the only traffic is ssh to 127.0.0.1.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cli_run import run_with_config
from conftest import TRAVERSABLE_TMP

from minidriver.guestimages import cloudimage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BOOT_TIMEOUT = 900  # seconds; the Debian guest's sshd answers after 75 to 90 s under TCG
CLONES = 4
CLOCK_TOLERANCE = 2.0  # seconds
SUSPENDED_FOR = 20.0  # seconds a clone stays suspended: its clock falls that far behind


@pytest.fixture
def state() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mdtplc-", dir=TRAVERSABLE_TMP))
    path.chmod(0o755)
    (path / "minidriver.conf").write_text(
        "[flavor:tpl.test]\nvcpus = 1\nmemory_mb = 512\nroot_gb = 4\n"
    )
    yield path
    minidriver(path, "delete", "--all", check=False)
    minidriver(path, "template", "delete", "deb-ready", check=False)
    minidriver(path, "cleanup", check=False)
    shutil.rmtree(path, ignore_errors=True)


minidriver = functools.partial(run_with_config, timeout=BOOT_TIMEOUT + 60)


def doc(state: Path, *argv: str) -> Any:
    return json.loads(minidriver(state, "--json", *argv).stdout)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def assert_clock_is_the_hosts(state: Path, name: str) -> None:
    """The guest's ``date`` within CLOCK_TOLERANCE of the host's, around the ssh call."""
    t0 = time.time()
    guest = float(minidriver(state, "ssh", name, "--", "date", "+%s.%N").stdout.strip())
    t1 = time.time()
    assert t0 - CLOCK_TOLERANCE <= guest <= t1 + CLOCK_TOLERANCE, (name, t0, guest, t1)


def test_clones_of_a_debian_template_answer_ssh_with_their_own_files_and_clock(
    state: Path, cloud_image: cloudimage.CloudImage
) -> None:
    doc(state, "keypair", "create", "k")
    doc(state, "image", "add", str(cloud_image.kernel), "--name", "k-deb", "--disk-format", "aki")
    doc(state, "image", "add", str(cloud_image.ramdisk), "--name", "r-deb", "--disk-format", "ari")
    doc(state, "image", "add", str(cloud_image.image), "--name", "deb", "--disk-format", "qcow2",
        "--property", "kernel_id=k-deb", "--property", "ramdisk_id=r-deb",
        "--property", f"os_command_line={cloud_image.cmdline}",
        "--property", "hw_qemu_guest_agent=yes", "--property", "os_type=linux")  # fmt: skip
    booted = doc(state, "boot", "--image", "deb", "--flavor", "tpl.test", "--name", "deb-src",
                 "--key-name", "k", "--config-drive", "--wait-ssh",
                 "--timeout", str(BOOT_TIMEOUT))  # fmt: skip
    assert booted["ssh"]["banner"].startswith("SSH-2.0-OpenSSH")
    template = doc(state, "template", "create", "deb-src", "--name", "deb-ready")
    frozen = {
        name: f["path"]
        for name, f in template["files"].items()
        if name in ("disk", "disk.local", "disk.config", "kernel", "ramdisk")
    }
    before = {name: digest(Path(path)) for name, path in frozen.items()}

    # One clone, alone: ssh answers, its clock is the host's.
    first = doc(state, "boot", "--template", "deb-ready", "--name", "c0", "--wait-ssh",
                "--timeout", "300")  # fmt: skip
    assert first["state"] == "running" and first["template"] == template["id"]
    print(f"clone c0: timings {first['timings']}, ssh after {first['ssh']['ready_after']} s")
    minidriver(state, "ssh", "c0", "--", "true")
    assert_clock_is_the_hosts(state, "c0")
    # Suspended a while, then resumed (or started, which resumes): the guest goes on
    # with the clock it had at the suspend, until the agent sets it again.
    for wake in ("resume", "start"):
        assert doc(state, "suspend", "c0")["vm_state"] == "suspended"
        time.sleep(SUSPENDED_FOR)
        assert doc(state, wake, "c0")["state"] == "running"
        assert_clock_is_the_hosts(state, "c0")
    minidriver(state, "delete", "c0")

    # Four at once, each writing a file the others must not see.
    names = [f"c{i}" for i in range(1, CLONES + 1)]

    def clone(name: str) -> dict[str, Any]:
        data: dict[str, Any] = doc(state, "boot", "--template", "deb-ready", "--name", name,
                                   "--wait-ssh", "--timeout", "600")  # fmt: skip
        return data

    with ThreadPoolExecutor(CLONES) as pool:
        clones = list(pool.map(clone, names))
    assert len({c["uuid"] for c in clones}) == CLONES
    assert len({c["network"]["forward_port"] for c in clones}) == CLONES
    for name in names:
        # ssh joins its arguments into one line for the remote shell: one argument here.
        minidriver(state, "ssh", name, "--", f"echo {name} > /home/debian/mine-{name}")
    for name in names:
        seen = minidriver(state, "ssh", name, "--", "cat /home/debian/mine-*").stdout
        assert seen.split() == [name], (name, seen)
        assert_clock_is_the_hosts(state, name)
    minidriver(state, "delete", *names)
    assert {name: digest(Path(path)) for name, path in frozen.items()} == before
