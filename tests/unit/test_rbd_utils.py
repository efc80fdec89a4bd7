"""What of the Rbd backend needs no cluster: Glance's rbd locations, Nova's reading of
the monitor map, the names disk.info gives RBD disks, the backend choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minidriver import rbd_utils
from minidriver.config import load_config
from minidriver.exception import ImageUnacceptable
from minidriver.imagebackend import (
    Flat,
    Qcow2,
    Rbd,
    backend_class,
    is_rbd_path,
    local_backend_class,
    parse_rbd_path,
    rbd_path,
)

FSID = "fae20fc5-2910-4f6d-89d2-3afad4318d2f"


def test_parse_url_of_a_glance_location() -> None:
    loc = rbd_utils.parse_url(f"rbd://{FSID}/images/7d1e4a52/snap")
    assert loc == rbd_utils.RbdLocation(FSID, "images", "7d1e4a52", "snap")
    assert loc.url == f"rbd://{FSID}/images/7d1e4a52/snap"
    assert str(loc) == "images/7d1e4a52@snap"


def test_parse_url_unquotes_and_url_quotes_back() -> None:
    loc = rbd_utils.RbdLocation(FSID, "my pool", "a/b", "s@1")
    assert loc.url == f"rbd://{FSID}/my%20pool/a%2Fb/s%401"
    assert rbd_utils.parse_url(loc.url) == loc


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file:///var/lib/minidriver/images/x", "not stored in rbd"),
        (f"rbd://{FSID}/images/x", "not rbd://FSID/POOL/IMAGE/SNAPSHOT"),
        (f"rbd://{FSID}/images/x/snap/extra", "not rbd://FSID/POOL/IMAGE/SNAPSHOT"),
        (f"rbd://{FSID}//x/snap", "blank component"),
        ("rbd:///images/x/snap", "blank component"),
    ],
)
def test_parse_url_refuses_what_is_no_rbd_location(url: str, why: str) -> None:
    with pytest.raises(ImageUnacceptable, match=why):
        rbd_utils.parse_url(url)


def test_mon_hosts_from_a_real_mon_dump() -> None:
    # `ceph mon dump --format json` of the dev cluster (Pacific), plus an IPv6 monitor.
    dump = {
        "mons": [
            {
                "rank": 0,
                "name": "a",
                "public_addrs": {
                    "addrvec": [
                        {"type": "v2", "addr": "127.0.0.1:3300", "nonce": 0},
                        {"type": "v1", "addr": "127.0.0.1:6789", "nonce": 0},
                    ]
                },
                "addr": "127.0.0.1:6789/0",
                "public_addr": "127.0.0.1:6789/0",
            },
            {"rank": 1, "name": "b", "addr": "[fd00::2]:6789/0"},
        ]
    }
    assert rbd_utils.parse_mon_dump(json.dumps(dump)) == (
        rbd_utils.MonHost("127.0.0.1", "6789"),
        rbd_utils.MonHost("fd00::2", "6789"),
    )


def test_disk_info_names_an_rbd_disk_as_nova_does() -> None:
    path = rbd_path("rbd", "7d1e4a52-9f64-4d8e-a0b4-1f1a5c3e2b10_disk")
    assert path == "rbd:rbd/7d1e4a52-9f64-4d8e-a0b4-1f1a5c3e2b10_disk"
    assert is_rbd_path(path)
    assert not is_rbd_path("/var/lib/minidriver/instances/x/disk")
    assert parse_rbd_path(path) == ("rbd", "7d1e4a52-9f64-4d8e-a0b4-1f1a5c3e2b10_disk")


@pytest.mark.parametrize(
    ("images_type", "use_cow", "root", "local"),
    [
        ("rbd", True, Rbd, Qcow2),
        ("rbd", False, Rbd, Flat),
        ("default", True, Qcow2, Qcow2),
        ("raw", True, Flat, Flat),
    ],
)
def test_backend_of_the_root_and_of_file_disks(
    tmp_path: Path, images_type: str, use_cow: bool, root: type, local: type
) -> None:
    conf_file = tmp_path / "c.conf"
    conf_file.write_text(
        f"[DEFAULT]\nuse_cow_images = {use_cow}\n[libvirt]\nimages_type = {images_type}\n"
    )
    conf = load_config(conf_file, state_dir=tmp_path, environ={})
    assert backend_class(conf) is root
    assert local_backend_class(conf) is local


def test_without_the_bindings_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A host set up without --with-ceph: the modules are missing (injected here).
    monkeypatch.setattr(rbd_utils, "rados", None)
    driver = rbd_utils.RBDDriver("rbd")
    with pytest.raises(rbd_utils.RbdError, match="python3-rados") as err:
        driver.get_fsid()
    assert err.value.hint is not None
    assert "--with-ceph" in err.value.hint


def test_a_ceph_error_inside_a_connection_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """librbd's own exceptions (here: a snapshot that exists) never escape as tracebacks;
    the connection is shut down either way. The cluster is a stand-in: the fault is
    what is injected, the mapping is what is tested."""
    rbd = pytest.importorskip("rbd")
    shut: list[bool] = []

    class Cluster:
        def shutdown(self) -> None:
            shut.append(True)

    driver = rbd_utils.RBDDriver("rbd")
    monkeypatch.setattr(driver, "_connect", Cluster)
    with (
        pytest.raises(rbd_utils.RbdError, match=r"^Ceph: .*snap exists") as err,
        driver.connected(),
    ):
        raise rbd.ImageExists("snap exists")
    assert err.value.hint is not None
    assert shut == [True]
    assert not driver.is_connected
