"""Issue 11's acceptance: a Debian cloud guest (cloud-init, openssh-server) booted with
a key pair and a config drive answers `minidriver ssh`, and exit codes pass through.

Everything goes through the `minidriver` command in its own processes, as a user runs
it, on a state dir of its own; the only traffic is ssh to 127.0.0.1.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_run import run_with_config
from conftest import TRAVERSABLE_TMP

from minidriver.guestimages import cloudimage
from minidriver.objects import GiB

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT_GB = 4  # more than the cloud image's virtual size: cloud-init grows the root into it
BOOT_TIMEOUT = 900  # seconds; a Debian guest's sshd answered after 83 s under TCG here


@pytest.fixture
def cli_state() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mdssh-", dir=TRAVERSABLE_TMP))
    path.chmod(0o755)
    (path / "minidriver.conf").write_text(
        f"[flavor:ssh.test]\nvcpus = 1\nmemory_mb = 1024\nroot_gb = {ROOT_GB}\n"
    )
    yield path
    minidriver(path, "delete", "--all", check=False)
    shutil.rmtree(path, ignore_errors=True)


minidriver = functools.partial(run_with_config, timeout=BOOT_TIMEOUT + 60)


def test_ssh_into_a_debian_guest_booted_with_a_key_pair(
    cloud_image: cloudimage.CloudImage, cli_state: Path
) -> None:
    minidriver(cli_state, "image", "add", str(cloud_image.kernel), "--name", "vmlinuz",
               "--disk-format", "aki")  # fmt: skip
    minidriver(cli_state, "image", "add", str(cloud_image.ramdisk), "--name", "initrd",
               "--disk-format", "ari")  # fmt: skip
    minidriver(cli_state, "image", "add", str(cloud_image.image), "--name", "debian",
               "--disk-format", "qcow2", "--property", "kernel_id=vmlinuz",
               "--property", "ramdisk_id=initrd",
               "--property", f"os_command_line={cloud_image.cmdline}",
               "--property", "os_type=linux")  # fmt: skip
    minidriver(cli_state, "keypair", "create", "k")
    booted = json.loads(
        minidriver(
            cli_state, "--json", "boot", "--image", "debian", "--flavor", "ssh.test",
            "--name", "deb", "--key-name", "k", "--config-drive", "--wait-ssh",
            "--timeout", str(BOOT_TIMEOUT),
        ).stdout
    )  # fmt: skip
    assert booted["ssh"]["banner"].startswith("SSH-2.0-")
    assert booted["ssh"]["port"] == booted["network"]["forward_port"]

    # sshd may answer before cloud-init has put the key in place: retry the login (255
    # is ssh's own failure) until the guest lets us in.
    df = minidriver(cli_state, "ssh", "deb", "--", "df", "-B1", "/", check=False)
    for _ in range(60):
        if df.returncode != 255:
            break
        subprocess.run(["sleep", "5"], check=True)
        df = minidriver(cli_state, "ssh", "deb", "--", "df", "-B1", "/", check=False)
    assert df.returncode == 0, df.stderr
    # Filesystem 1B-blocks Used Available Use% Mounted on / then the root's line.
    size = int(df.stdout.splitlines()[1].split()[1])
    image_virtual = json.loads(minidriver(cli_state, "--json", "image", "show", "debian").stdout)[
        "virtual_size"
    ]
    # cloud-init grew the root file system past the image, into the flavor's disk.
    assert image_virtual < size <= ROOT_GB * GiB, (size, image_virtual)

    assert minidriver(cli_state, "ssh", "deb", "--", "false", check=False).returncode == 1
    assert minidriver(cli_state, "ssh", "deb", "--", "exit 3", check=False).returncode == 3
