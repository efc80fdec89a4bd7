"""kill -9 of `minidriver boot` at several points, then `minidriver cleanup`: nothing
of that boot is left, the cache holds no partial file, and the next boot succeeds.

The child runs the real command; the only injected fault is a stall at the chosen
point (it writes a marker file and sleeps), so that the kill lands there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_run import kill_at, minidriver, run_json

from minidriver.config import Config, load_config

pytestmark = pytest.mark.integration

CHILD = r"""
import sys, time
from pathlib import Path
from unittest import mock

from minidriver import cli
from minidriver.images import fetch, qemu_img

point, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]

def stall():
    marker.write_text(point)
    time.sleep(3600)

def half_download(image, dest, progress=None, open_data=None):
    with open(image.path, "rb") as src, open(dest, "wb") as out:
        out.write(src.read(1 << 20))
    stall()

def half_convert(source, source_fmt, dest, dest_fmt, **kw):
    dest.write_bytes(b"\0" * (1 << 20))
    stall()

patches = {
    "fetch": mock.patch.object(fetch, "download", half_download),
    "convert": mock.patch.object(qemu_img, "convert", half_convert),
    "define": mock.patch("minidriver.host.Host.launch", lambda self, d, **kw: stall()),
    "start": mock.patch(
        "minidriver.driver.LibvirtDriver.wait_for_running", lambda *a, **k: stall()
    ),
}
with patches[point]:
    sys.exit(cli.main(argv))
"""


@pytest.fixture
def state(host_config: Config) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mdcrash-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    # Should the test fail half-way, its domains must not outlive their state dir.
    subprocess.run(
        minidriver(path, host_config.libvirt.connection_uri, "cleanup"),
        capture_output=True,
        timeout=120,
        check=False,
    )
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("point", ["fetch", "convert", "define", "start"])
def test_kill_9_then_cleanup_then_boot(
    point: str, state: Path, host_config: Config, test_image: Path
) -> None:
    uri = host_config.libvirt.connection_uri
    run_json(minidriver(state, uri, "--json", "image", "add", str(test_image), "--name", "g",
                        "--property", "os_type=linux"))  # fmt: skip
    boot_args = minidriver(state, uri, "boot", "--image", "g", "--flavor", "t1.nano")
    kill_at(CHILD, point, state / "marker", boot_args)

    report = run_json(minidriver(state, uri, "--json", "cleanup"))
    assert isinstance(report, dict)
    assert report["skipped"] == []
    if point in ("define", "start"):
        assert len(report["records"]) == 1  # the record and its domain, both gone
    # The forwarded port is reserved right after the record, before any of the points.
    assert len(report["ports"]) == 1
    reservations = load_config(None, state_dir=state, environ={}).port_reservations_path
    assert not [
        f
        for f in reservations.glob("[0-9]*")
        if json.loads(f.read_text())["state_path"] == str(state)
    ]
    assert run_json(minidriver(state, uri, "--json", "list")) == []
    instances = state / "instances"
    assert sorted(p.name for p in instances.iterdir() if p.is_dir()) == ["_base", "locks"]
    assert not [
        p.name for p in (instances / "_base").iterdir() if p.suffix in (".part", ".converted")
    ]
    assert list((instances / "locks").iterdir()) == []
    assert run_json(minidriver(state, uri, "--json", "cleanup", "--dry-run")) == {
        "dry_run": True, "domains": [], "records": [], "instance_dirs": [],
        "partial_files": [], "locks": [], "ports": [], "rbd_disks": [], "images": [],
        "skipped": [],
        "templates": [],
        "volumes": [],
    }  # fmt: skip

    boot = run_json(
        minidriver(
            state,
            uri,
            "--json",
            "boot",
            "--image",
            "g",
            "--flavor",
            "t1.nano",
            "--wait-for",
            "minidriver-guest: ready",
            "--timeout",
            "180",
        )
    )
    assert isinstance(boot, dict)
    assert boot["state"] == "running"
    run_json(minidriver(state, uri, "--json", "delete", "--all"))
