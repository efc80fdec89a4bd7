"""Templates of the test guest under QEMU: saved once, restored as clones that go on
from the saved guest (no new boot), each on its own overlays of the frozen disks;
then a kill -9 in ``template create`` and in ``boot --template``, and ``cleanup``.

What a user checks: the console (the test guest's contract lines), the boot-count
counter the guest keeps on its root disk, the files (hashed), the domains and records.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from cli_run import kill_at, minidriver, run_json
from lxml import etree

from minidriver import savefile
from minidriver.config import Config, load_config
from minidriver.driver import LibvirtDriver
from minidriver.vmtemplate import MEMORY_FILE, TemplateError, Templates

pytestmark = pytest.mark.integration

READY = r"^minidriver-guest: ready"
POWER_BUTTON = "minidriver-guest: power-button, powering off"


def guest_lines(instance_dir: str | Path) -> list[str]:
    text = (Path(instance_dir) / "console.log").read_text(errors="replace")
    return [line.rstrip("\r") for line in text.splitlines() if line.startswith("minidriver-guest:")]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def frozen_hashes(template_dir: Path) -> dict[str, str]:
    return {p.name: file_hash(p) for p in sorted(template_dir.iterdir())}


def boot_counts(instance_dir: str) -> list[str]:
    return [line for line in guest_lines(instance_dir) if "boot-count" in line]


def test_clones_go_on_from_the_saved_guest_with_their_own_disks(
    driver: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> None:
    source = driver.spawn(
        name="tpl-src", image=test_image_id, flavor="t1.nano", network="user", config_drive=True
    )
    wait_console(Path(source.instance_dir) / "console.log", READY)
    templates = Templates(driver)
    tpl = templates.create(source.uuid, "tpl-test")
    try:
        # The instance is consumed; its files are the template's now.
        assert source.uuid not in [r.uuid for r in driver.db.list_instances()]
        assert driver.host.find_domain(source.name) is None
        assert not Path(source.instance_dir).exists()
        header = savefile.read_header(tpl.path / MEMORY_FILE)
        assert f"<name>{source.name}</name>" in header.xml and header.was_running
        assert sorted(tpl.disks) == ["disk", "disk.config", "disk.local", "disk.swap"]
        for name in tpl.disks:
            assert (tpl.path / name).stat().st_mode & 0o222 == 0, name
        before = frozen_hashes(tpl.path)

        a = templates.spawn(tpl.id, name="clone-a")
        b = templates.spawn(tpl.id, name="clone-b")
        assert {a.name, b.name}.isdisjoint({source.name})
        assert [driver.get_info(c.uuid).state for c in (a, b)] == ["running", "running"]
        ports = {driver.db.get_instance(c.uuid).forward_port for c in (a, b)}
        assert len(ports) == 2 and None not in ports
        for clone in (a, b):
            assert driver.db.get_instance(clone.uuid).vm_state == "active"
            assert guest_lines(clone.instance_dir) == []  # restored: no boot lines
            assert not (Path(clone.instance_dir) / "restore.save").exists()

        # Alive where the template was saved: clone a answers its power button.
        assert driver.power_off(a.uuid, timeout=60) is True
        assert guest_lines(a.instance_dir) == [POWER_BUTTON]

        # Each clone writes its own root: a boots twice more, b once.
        driver.power_on(a.uuid)
        wait_console(Path(a.instance_dir) / "console.log", "boot-count 2")
        driver.reboot(a.uuid, hard=True)
        driver.reboot(b.uuid, hard=True)
        wait_console(Path(a.instance_dir) / "console.log", "boot-count 3")
        wait_console(Path(b.instance_dir) / "console.log", READY)
        assert boot_counts(a.instance_dir) == [
            "minidriver-guest: boot-count 2",
            "minidriver-guest: boot-count 3",
        ]
        assert boot_counts(b.instance_dir) == ["minidriver-guest: boot-count 2"]

        assert frozen_hashes(tpl.path) == before
        with pytest.raises(TemplateError, match="clone-a"):
            templates.delete(tpl.id)
        for clone in (a, b):
            driver.destroy(clone.uuid)
        assert frozen_hashes(tpl.path) == before
    finally:
        for record in templates.clones_of(tpl.id):
            driver.destroy(record.uuid)
        templates.delete(tpl.id)
    assert not tpl.path.exists()


def inactive_xml(driver: LibvirtDriver, uuid: str) -> str:
    domain = driver.host.get_domain(uuid)
    assert domain is not None
    xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    parser = etree.XMLParser(remove_blank_text=True)
    return etree.tostring(etree.fromstring(xml.encode(), parser), method="c14n").decode()


def test_a_clones_hard_reboot_generates_its_xml_on_the_same_files(
    driver: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> None:
    """A hard reboot generates a clone's XML again from its record (issue 21): the
    same overlays, the template's shared config drive, the clone's port and sysinfo;
    the guest boots afresh from its overlay on the frozen layer."""
    source = driver.spawn(
        name="tpl-xml-src", image=test_image_id, flavor="t1.nano", network="user", config_drive=True
    )
    wait_console(Path(source.instance_dir) / "console.log", READY)
    templates = Templates(driver)
    tpl = templates.create(source.uuid, "tpl-xml")
    try:
        before = frozen_hashes(tpl.path)
        clone = templates.spawn(tpl.id, name="clone-xml")
        restored = inactive_xml(driver, clone.uuid)
        assert str(tpl.path / "disk.config") in restored

        driver.reboot(clone.uuid, hard=True)

        assert inactive_xml(driver, clone.uuid) == restored
        written = (Path(clone.instance_dir) / "libvirt.xml").read_text()
        assert str(tpl.path / "disk.config") in written
        port = driver.db.get_instance(clone.uuid).forward_port
        assert f"hostfwd=tcp:127.0.0.1:{port}-:22" in written
        wait_console(Path(clone.instance_dir) / "console.log", "boot-count 2")
        assert frozen_hashes(tpl.path) == before
    finally:
        for record in templates.clones_of(tpl.id):
            driver.destroy(record.uuid)
        templates.delete(tpl.id)


# -- kill -9, then cleanup -------------------------------------------------------------

CHILD = r"""
import shutil, sys, time
from pathlib import Path
from unittest import mock

from minidriver import cli, savefile

point, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]

def stall():
    marker.write_text(point)
    time.sleep(3600)

real_move, real_copy = shutil.move, savefile.copy_with_xml
moved = []

def half_move(src, dst):
    if moved:
        stall()
    moved.append(real_move(src, dst))

def copy_then_stall(source, dest, xml):
    real_copy(source, dest, xml)
    stall()

patches = {
    "template-create": mock.patch("minidriver.vmtemplate.shutil.move", half_move),
    "boot-template": mock.patch("minidriver.vmtemplate.savefile.copy_with_xml", copy_then_stall),
}
with patches[point]:
    sys.exit(cli.main(argv))
"""


@pytest.fixture
def state(host_config: Config) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mdtpl-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(
        minidriver(path, host_config.libvirt.connection_uri, "delete", "--all"),
        capture_output=True,
        timeout=120,
        check=False,
    )
    subprocess.run(
        minidriver(path, host_config.libvirt.connection_uri, "cleanup"),
        capture_output=True,
        timeout=120,
        check=False,
    )
    shutil.rmtree(path, ignore_errors=True)


def our_reservations(state: Path) -> list[Path]:
    reservations = load_config(None, state_dir=state, environ={}).port_reservations_path
    return [
        f
        for f in reservations.glob("[0-9]*")
        if json.loads(f.read_text())["state_path"] == str(state)
    ]


def test_kill_9_in_template_create_and_in_boot_template_then_cleanup(
    state: Path, host_config: Config, test_image: Path
) -> None:
    uri = host_config.libvirt.connection_uri

    def md(*args: str) -> list[str]:
        return minidriver(state, uri, *args)

    run_json(md("--json", "image", "add", str(test_image), "--name", "g",
                "--property", "os_type=linux"))  # fmt: skip
    boot = ["boot", "--image", "g", "--flavor", "t1.nano", "--timeout", "180"]
    run_json(md("--json", *boot, "--name", "src", "--wait-for", READY))

    # 1. Killed in `template create`, after the save, between two disk moves.
    kill_at(
        CHILD, "template-create", state / "marker", md("template", "create", "src", "--name", "t")
    )
    report = run_json(md("--json", "cleanup"))
    assert len(report["templates"]) == 1 and len(report["records"]) == 1, report
    assert report["skipped"] == []
    assert run_json(md("--json", "template", "list")) == []
    assert run_json(md("--json", "list")) == []
    assert list((state / "templates").iterdir()) == []
    assert our_reservations(state) == []

    # 2. A template made, then a clone killed while its memory copy was made.
    run_json(md("--json", *boot, "--name", "src2", "--wait-for", READY))
    made = run_json(md("--json", "template", "create", "src2", "--name", "t"))
    before = frozen_hashes(Path(made["template_dir"]))
    kill_at(
        CHILD, "boot-template", state / "marker", md("boot", "--template", "t", "--name", "doomed")
    )
    report = run_json(md("--json", "cleanup"))
    assert len(report["records"]) == 1 and len(report["ports"]) == 1, report
    assert report["templates"] == [] and report["skipped"] == []
    assert run_json(md("--json", "list")) == []
    instances = state / "instances"
    assert sorted(p.name for p in instances.iterdir() if p.is_dir()) == ["_base", "locks"]
    assert our_reservations(state) == []
    assert frozen_hashes(Path(made["template_dir"])) == before
    assert run_json(md("--json", "cleanup", "--dry-run"))["records"] == []

    # 3. The next clone works.
    clone = run_json(md("--json", "boot", "--template", "t", "--name", "next"))
    assert (clone["state"], clone["vm_state"], clone["template"]) == (
        "running",
        "active",
        made["id"],
    )
    run_json(md("--json", "delete", "next"))
    run_json(md("--json", "template", "delete", "t"))
    assert list((state / "templates").iterdir()) == []
