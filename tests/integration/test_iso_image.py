"""An ISO image booted for real: the test guest as a CD (``build-test-image --iso``),
added with ``--disk-format iso`` and booted by the BIOS from its cdrom, as a user
drives it with the ``minidriver`` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from minidriver.config import Config
from minidriver.guestimages import testimage

pytestmark = pytest.mark.integration

READY = "minidriver-guest: ready"


@pytest.fixture(scope="session")
def test_iso() -> Path:
    """The test guest's ISO, built once and cached next to its qcow2."""
    return testimage.build_iso(log=lambda _msg: None)


@pytest.fixture
def cli_state(host_config: Config) -> Iterator[Path]:
    """A state dir of the command's own; whatever a failed test left in it is deleted
    through the same connection (an embedded root's guests outlive their process)."""
    path = Path(tempfile.mkdtemp(prefix="mdiso-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    minidriver(path, host_config.libvirt.connection_uri, "delete", "--all", code=None)
    shutil.rmtree(path, ignore_errors=True)


def minidriver(state: Path, uri: str, *args: str, code: int | None = 0) -> str:
    cmd = [sys.executable, "-m", "minidriver", "--state-dir", str(state)]
    cmd += [*(["--connect", uri] if uri else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if code is not None:
        assert proc.returncode == code, f"{args}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def test_the_guest_iso_boots_from_its_cdrom(
    cli_state: Path, host_config: Config, test_iso: Path
) -> None:
    uri = host_config.libvirt.connection_uri

    def cli_json(*args: str) -> Any:
        return json.loads(minidriver(cli_state, uri, "--json", *args))

    added = cli_json(
        "image", "add", str(test_iso), "--name", "guest-iso", "--disk-format", "iso",
        "--property", "os_type=linux",
    )  # fmt: skip
    assert added["disk_format"] == "iso"
    boot = cli_json(
        "boot", "--image", "guest-iso", "--flavor", "t1.nano", "--name", "from-iso",
        "--config-drive", "--wait-for", READY, "--timeout", "240",
    )  # fmt: skip
    assert boot["state"] == "running"

    console = minidriver(cli_state, uri, "console", "from-iso").splitlines()
    assert READY in console
    # The root is the cdrom (hda), so the ephemeral disk is the first virtio disk, and
    # no disk carries the qcow2 guest's boot record: this boot came from the ISO.
    assert "minidriver-guest: disk vda 1073741824 ext4" in console
    assert "minidriver-guest: boot-count error: no disk carries the boot record" in console
    assert f"minidriver-guest: config-drive uuid={boot['uuid']} hostname=from-iso" in console
    defined = etree.parse(Path(boot["instance_dir"]) / "libvirt.xml").getroot()
    assert defined.xpath("os/boot/@dev") == ["cdrom"]
    assert defined.xpath("devices/disk[@device='cdrom']/target/@dev") == ["hda", "hdb"]

    # The second boot starts from the cached ISO, checked again as an ISO.
    again = cli_json(
        "boot", "--image", "guest-iso", "--flavor", "t1.nano", "--name", "again",
        "--wait-for", READY, "--timeout", "240",
    )  # fmt: skip
    assert again["cache_hit"] is True
    minidriver(cli_state, uri, "delete", "from-iso", "again")
    assert cli_json("list") == []
