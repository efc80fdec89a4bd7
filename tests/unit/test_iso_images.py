"""ISO images (``--disk-format iso``) spawned on libvirt's own test driver, with a real
ISO 9660 file made by ``xorriso -as mkisofs``: the root is a cdrom the BIOS boots
first, as in Nova, and a warm spawn re-checks the cached ISO as an ISO.

The real boot of the test guest's ISO is in tests/integration/test_iso_image.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import img_info
from lxml import etree

from minidriver.driver import LibvirtDriver, SpawnError, base_filename
from minidriver.exception import ImageUnacceptable

GiB = 1024**3


def make_iso(tmp: Path, name: str = "install.iso") -> Path:
    """A small ISO 9660 image, as any ISO tool writes it (xorriso, from setup-host)."""
    xorriso = shutil.which("xorriso")
    assert xorriso, "xorriso is missing: scripts/setup-host installs it"
    content = tmp / f"{name}.content"
    content.mkdir()
    (content / "README").write_text("an installer would be here\n")
    path = tmp / name
    subprocess.run(
        [xorriso, "-as", "mkisofs", "-quiet", "-V", "MDISO", "-R", "-o", path, content],
        check=True,
        capture_output=True,
    )
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def iso(tmp_path: Path) -> Path:
    return make_iso(tmp_path)


def defined_xml(drv: LibvirtDriver, name: str) -> etree._Element:
    dom = drv.host.get_connection().lookupByName(name)
    return etree.fromstring(dom.XMLDesc(0).encode())


def disks_of(tree: etree._Element) -> dict[str, tuple[str, str]]:
    """target dev -> (device, source file) of every disk of a domain."""
    found = {}
    for disk in tree.iterfind("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        assert target is not None and source is not None
        found[target.get("dev", "")] = (disk.get("device", ""), source.get("file", ""))
    return found


def test_an_iso_root_is_a_cdrom_the_bios_boots_first(drv: LibvirtDriver, iso: Path) -> None:
    image = drv.images.add(iso, name="installer", disk_format="iso")
    assert image.disk_format == "iso"

    inst = drv.spawn("from-iso", "installer", "t1.nano", config_drive=True)

    assert drv.get_info(inst.uuid).state == "running"
    tree = defined_xml(drv, inst.name)
    assert tree.xpath("os/boot/@dev") == ["cdrom"]
    instance_dir = Path(inst.instance_dir)
    assert disks_of(tree) == {
        "hda": ("cdrom", os.fspath(instance_dir / "disk")),
        "vda": ("disk", os.fspath(instance_dir / "disk.local")),
        "vdb": ("disk", os.fspath(instance_dir / "disk.swap")),
        "hdb": ("cdrom", os.fspath(instance_dir / "disk.config")),
    }
    # The root is an overlay on the ISO cached as it is: nothing converted it.
    base = drv.conf.base_dir / base_filename(image.id)
    assert sha256(base) == sha256(iso)
    root = img_info(instance_dir / "disk")
    assert (root["format"], root["virtual-size"]) == ("qcow2", 1 * GiB)
    assert root["full-backing-filename"] == os.fspath(base)
    assert root["backing-filename-format"] == "raw"
    disk_info = json.loads((instance_dir / "disk.info").read_text())
    assert disk_info[os.fspath(instance_dir / "disk")] == "qcow2"


def test_a_warm_spawn_rechecks_the_cached_iso_as_an_iso(drv: LibvirtDriver, iso: Path) -> None:
    drv.images.add(iso, name="installer", disk_format="iso")
    cold = drv.spawn("cold", "installer", "t1.nano")
    warm = drv.spawn("warm", "installer", "t1.nano")

    assert (cold.cache_hit, warm.cache_hit) == (False, True)
    assert defined_xml(drv, warm.name).xpath("os/boot/@dev") == ["cdrom"]


def test_a_cached_iso_that_became_something_else_is_refused(
    drv: LibvirtDriver, iso: Path, tmp_path: Path
) -> None:
    image = drv.images.add(iso, name="installer", disk_format="iso")
    drv.spawn("cold", "installer", "t1.nano")
    base = drv.conf.base_dir / base_filename(image.id)
    header = tmp_path / "header.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", header, "16M"], check=True)
    with open(base, "r+b") as fh:  # a qcow2 header in the ISO's free system area
        fh.write(header.read_bytes()[:512])

    with pytest.raises(SpawnError, match="failed its re-check") as err:
        drv.spawn("warm", "installer", "t1.nano")

    assert isinstance(err.value.cause, ImageUnacceptable)
    assert [i.display_name for i in drv.db.list_instances()] == ["cold"]
