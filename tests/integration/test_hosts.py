"""Several hosts (issue 20), on the daemon and a second host of scripts/dev-host: the
test guest booted on the other host by name (its file disks in the instances_path both
hosts see), placed by the scheduler without one, listed with its host; a file-backed
boot refused on a host that does not see the instances_path (--private-instances).

Daemon only: the embedded driver cannot be another host's peer (README). Every host a
test starts has a name of its own and is stopped and purged after the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from test_rbd import ceph_conf  # noqa: F401 - the cluster fixture

from minidriver import console

pytestmark = [pytest.mark.integration, pytest.mark.connection("daemon")]

REPO = Path(__file__).resolve().parents[2]
DEV_HOST = REPO / "scripts" / "dev-host"
READY = r"^minidriver-guest: ready"
# A boot under TCG on a machine shared with other work: generous.
BOOT_TIMEOUT = 300


def dev_host(*args: str) -> str:
    proc = subprocess.run(
        [os.fspath(DEV_HOST), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mdhosts-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def hosts(state: Path) -> Iterator[dict[str, str]]:
    """A dev host that shares the instances path, and one that does not."""
    tag = uuid.uuid4().hex[:6]
    shared, private = f"h2-{tag}", f"hp-{tag}"
    try:
        uris = {
            shared: dev_host("start", shared),
            private: dev_host("start", private, f"--private-instances={state / 'instances'}"),
        }
        (state / "minidriver.conf").write_text(
            "[DEFAULT]\nhost = here\n"
            + "".join(f"[host:{n}]\nconnection_uri = {u}\n" for n, u in uris.items())
        )
        yield {"shared": shared, "private": private, **uris}
    finally:
        for name in (shared, private):
            subprocess.run([os.fspath(DEV_HOST), "stop", "--purge", name], check=False)


def md(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "minidriver", "--state-dir", str(state),
           "--config", str(state / "minidriver.conf"), "--connect", "qemu:///system",
           *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


def md_json(state: Path, *args: str) -> Any:
    return json.loads(md(state, "--json", *args).stdout)


def boot_ready(state: Path, image: str, name: str, host: str) -> Any:
    """``boot`` of a t1.nano on ``host``, waited for to its ready line; its JSON."""
    return md_json(state, "boot", "--image", image, "--flavor", "t1.nano", "--name", name,
                   "--host", host, "--wait-for", READY, "--timeout", str(BOOT_TIMEOUT))  # fmt: skip


def domain_on(uri: str, instance_uuid: str) -> bool:
    conn = libvirt.open(uri)
    try:
        conn.lookupByUUIDString(instance_uuid)
        return True
    except libvirt.libvirtError as exc:
        assert exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
        return False
    finally:
        conn.close()


def test_boot_on_a_host_by_name_and_by_the_scheduler(
    state: Path, hosts: dict[str, str], test_image: Path
) -> None:
    h2 = hosts["shared"]
    md(state, "image", "add", str(test_image), "--name", "guest", "--disk-format", "qcow2")
    try:
        vm1 = boot_ready(state, "guest", "vm1", h2)
        assert vm1["host"] == h2
        assert domain_on(hosts[h2], vm1["uuid"])
        assert not domain_on("qemu:///system", vm1["uuid"])
        log = Path(vm1["instance_dir"]) / "console.log"
        assert console.read_console(log).count("minidriver-guest: boot-count 1") == 1
        shown = md_json(state, "show", "vm1")
        assert (shown["host"], shown["state"]) == (h2, "running")

        # Without --host: this host has the most free RAM (h2 runs vm1's 128 MiB).
        vm2 = md_json(state, "boot", "--image", "guest", "--flavor", "t1.nano", "--name", "vm2",
                      "--no-wait")  # fmt: skip
        assert vm2["host"] == "here"
        assert domain_on("qemu:///system", vm2["uuid"])

        listed = {i["display_name"]: (i["host"], i["state"]) for i in md_json(state, "list")}
        assert listed == {"vm1": (h2, "running"), "vm2": ("here", "running")}
        by_name = {h["name"]: h for h in md_json(state, "host", "list")}
        assert by_name[h2]["uri"] == hosts[h2]
        assert (by_name[h2]["instances"], by_name[h2]["running"]) == (1, 1)
        assert (by_name["here"]["instances"], by_name["here"]["running"]) == (1, 1)
        assert by_name[h2]["host_uuid"] != by_name["here"]["host_uuid"]
        assert by_name[h2]["free_ram_mb"] == by_name[h2]["memory_mb"] - 128

        # stop and start act on the instance's own host.
        md(state, "stop", "vm1", "--force")
        assert md_json(state, "show", "vm1")["state"] == "shutoff"
        md(state, "start", "vm1")
        assert md_json(state, "show", "vm1")["state"] == "running"
    finally:
        md(state, "delete", "--all", check=False)
    assert not domain_on(hosts[h2], vm1["uuid"])
    assert md_json(state, "list") == []


def test_a_host_without_the_instances_path_is_refused(
    state: Path, hosts: dict[str, str], test_image: Path
) -> None:
    hp = hosts["private"]
    md(state, "image", "add", str(test_image), "--name", "guest2", "--disk-format", "qcow2")
    refused = md(state, "boot", "--image", "guest2", "--flavor", "t1.nano", "--host", hp,
                 check=False)  # fmt: skip
    assert refused.returncode == 1
    assert f"host {hp} does not see {state / 'instances'}" in refused.stderr
    assert "images_type = rbd" in refused.stderr
    assert md_json(state, "list") == []
    conn = libvirt.open(hosts[hp])
    try:
        assert conn.listAllDomains() == []
    finally:
        conn.close()


def test_live_migration_with_files_there_and_back(
    state: Path, hosts: dict[str, str], test_image: Path
) -> None:
    """The test guest moves live from the second host here and back (the scheduler's
    choice: the first host in the configuration of two equal ones), its forwarded
    port changing with each move, never rebooting; a move to the host without the
    instances path is refused; its power button, pressed last, powers it off on the
    host it is on."""
    h2, hp = hosts["shared"], hosts["private"]
    md(state, "image", "add", str(test_image), "--name", "guest3", "--disk-format", "qcow2")
    try:
        vm = boot_ready(state, "guest3", "mover", h2)
        first_port = vm["network"]["forward_port"]
        moved = md_json(state, "live-migrate", "mover", "--host", "here")
        assert (moved["source"], moved["host"]) == (h2, "here")
        assert moved["forward_port"] not in (None, first_port)
        assert domain_on("qemu:///system", vm["uuid"])
        assert not domain_on(hosts[h2], vm["uuid"])
        shown = md_json(state, "show", "mover")
        assert (shown["host"], shown["state"]) == ("here", "running")
        assert shown["network"]["forward_port"] == moved["forward_port"]

        back = md_json(state, "live-migrate", "mover")
        assert (back["source"], back["host"]) == ("here", h2)
        assert domain_on(hosts[h2], vm["uuid"])
        assert not domain_on("qemu:///system", vm["uuid"])

        refused = md(state, "live-migrate", "mover", "--host", hp, check=False)
        assert refused.returncode == 1
        assert f"host {hp} does not see" in refused.stderr
        assert md_json(state, "show", "mover")["host"] == h2

        log = Path(vm["instance_dir"]) / "console.log"
        assert console.read_console(log).count("minidriver-guest: boot-count") == 1
        md(state, "stop", "mover", "--timeout", "120")
        console.wait_for_console(log, r"power-button, powering off", timeout=60)
        shown = md_json(state, "show", "mover")
        assert (shown["host"], shown["state"]) == (h2, "shutoff")
    finally:
        md(state, "delete", "--all", check=False)


def test_cold_migration_of_a_stopped_instance_with_files(
    state: Path, hosts: dict[str, str], test_image: Path
) -> None:
    """File disks in the instances_path both hosts see: a stopped instance migrates to
    the second host, defined there and not started, and its revert brings it back
    here, still stopped; to the host without the instances path it is refused, and
    nothing changes."""
    h2, hp = hosts["shared"], hosts["private"]
    md(state, "image", "add", str(test_image), "--name", "guest6", "--disk-format", "qcow2")
    try:
        vm = md_json(state, "boot", "--image", "guest6", "--flavor", "t1.nano", "--name",
                     "cold", "--host", "here", "--no-wait")  # fmt: skip
        md(state, "stop", "cold", "--force")
        before = md_json(state, "show", "cold")
        refused = md(state, "migrate", "cold", "--host", hp, check=False)
        assert refused.returncode == 1
        assert f"host {hp} does not see {state / 'instances'}" in refused.stderr
        assert md_json(state, "show", "cold") == before
        assert not domain_on(hosts[hp], vm["uuid"])

        moved = md_json(state, "migrate", "cold", "--host", h2)
        assert (moved["host"], moved["source"], moved["state"]) == (h2, "here", "shutoff")
        assert domain_on(hosts[h2], vm["uuid"])
        assert not domain_on("qemu:///system", vm["uuid"])
        shown = md_json(state, "show", "cold")
        assert (shown["vm_state"], shown["state"], shown["source_host"]) == (
            "resized",
            "shutoff",
            "here",
        )

        back = md_json(state, "resize-revert", "cold")
        assert (back["host"], back["source"], back["vm_state"]) == ("here", None, "stopped")
        assert domain_on("qemu:///system", vm["uuid"])
        assert not domain_on(hosts[h2], vm["uuid"])
        shown = md_json(state, "show", "cold")
        assert (shown["host"], shown["state"], shown["disks"]) == (
            "here",
            "shutoff",
            before["disks"],
        )
    finally:
        md(state, "delete", "--all", check=False)


def ports_of(instance_uuid: str) -> list[int]:
    """The forwarded ports reserved for the instance (root's reservations, /run)."""
    found = []
    for entry in Path("/run/minidriver/ports").iterdir():
        if entry.name.isdigit() and json.loads(entry.read_text())["instance_uuid"] == instance_uuid:
            found.append(int(entry.name))
    return sorted(found)


def test_an_aborted_live_migration_leaves_everything_as_it_was(
    state: Path, hosts: dict[str, str], test_image: Path
) -> None:
    """live_migration_completion_timeout = 1 (2 s for the guest's 128 MiB: Nova counts
    2 GiB at least) and live_migration_bandwidth = 8 (MiB/s) on the guest rewriting
    32 MiB of its memory without pause: the move is aborted, the guest runs on the
    source, nothing is on the target, the record and the reservations are as before."""
    h2 = hosts["shared"]
    conf = state / "minidriver.conf"
    md(state, "image", "add", str(test_image), "--name", "guest4", "--disk-format", "qcow2")
    try:
        vm = md_json(
            state, "boot", "--image", "guest4", "--flavor", "t1.nano", "--name", "busy",
            "--config-drive", "--meta", "minidriver_guest_dirty_memory_mb=32",
            "--wait-for", "minidriver-guest: mode dirty-memory 32", "--timeout", str(BOOT_TIMEOUT),
        )  # fmt: skip
        assert vm["host"] == "here"
        before = md_json(state, "show", "busy")
        assert ports_of(vm["uuid"]) == [before["network"]["forward_port"]]
        original = conf.read_text()
        # 8 MiB/s: the guest's 128 MiB cannot move within 2 s, however slowly this
        # loaded machine lets the guest rewrite its memory.
        conf.write_text(
            original + "[libvirt]\nlive_migration_completion_timeout = 1\n"
            "live_migration_bandwidth = 8\n"
        )
        try:
            aborted = md(state, "live-migrate", "busy", "--host", h2, check=False)
        finally:
            conf.write_text(original)
        assert aborted.returncode == 1, aborted.stdout + aborted.stderr
        assert "live migration aborted" in aborted.stderr
        after = md_json(state, "show", "busy")
        assert (after["host"], after["state"]) == ("here", "running")
        assert after["network"] == before["network"]
        assert domain_on("qemu:///system", vm["uuid"])
        assert not domain_on(hosts[h2], vm["uuid"])
        assert ports_of(vm["uuid"]) == [before["network"]["forward_port"]]
    finally:
        md(state, "delete", "--all", check=False)


def test_evacuate_from_a_host_that_is_down(
    state: Path, hosts: dict[str, str], test_image: Path
) -> None:
    """Refused while the second host answers; after its power loss the instance shows
    unknown, and evacuate rebuilds it here from the same disks; when the host comes
    back, its stale definition is removed."""
    h2 = hosts["shared"]
    md(state, "image", "add", str(test_image), "--name", "guest5", "--disk-format", "qcow2")
    try:
        vm = boot_ready(state, "guest5", "evac", h2)
        refused = md(state, "evacuate", "evac", "--host", "here", check=False)
        assert refused.returncode == 1
        assert f"host {h2} answers" in refused.stderr

        dev_host("stop", h2)  # a power loss: its QEMU killed
        listed = {i["display_name"]: (i["host"], i["state"]) for i in md_json(state, "list")}
        assert listed == {"evac": (h2, "unknown")}
        moved = md_json(state, "evacuate", "evac", "--host", "here")
        assert (moved["source"], moved["host"]) == (h2, "here")
        shown = md_json(state, "show", "evac")
        assert (shown["host"], shown["state"]) == ("here", "running")
        # Booted again from its disks: a second boot in the same console log. Its count
        # may repeat: a power loss drops what the guest wrote and never flushed (its
        # boot record, in QEMU's qcow2 cache), as a real one would.
        log = Path(vm["instance_dir"]) / "console.log"
        booted_twice = re.compile(r"boot-count \d+.*boot-count \d+.*ready", re.S)
        console.wait_for_console(log, booted_twice, timeout=BOOT_TIMEOUT)

        assert dev_host("start", h2) == hosts[h2]
        assert domain_on(hosts[h2], vm["uuid"])  # the stale definition, shut off
        came_back = md(state, "host", "list")
        assert "evacuated from it while it was down" in came_back.stdout
        assert not domain_on(hosts[h2], vm["uuid"])
        assert domain_on("qemu:///system", vm["uuid"])
    finally:
        md(state, "delete", "--all", check=False)


def rbd_state(hosts: dict[str, str], ceph_conf: str, test_image: Path) -> Path:  # noqa: F811
    """A state dir of its own with images_type = rbd on ``ceph_conf``'s cluster, this
    host and the second one configured, the test guest added as ``guest``."""
    h2 = hosts["shared"]
    state = Path(tempfile.mkdtemp(prefix="mdhosts-rbd-", dir="/var/tmp"))
    state.chmod(0o755)
    (state / "minidriver.conf").write_text(
        "[DEFAULT]\nhost = here\n"
        f"[libvirt]\nimages_type = rbd\nimages_rbd_ceph_conf = {ceph_conf}\n"
        f"[host:{h2}]\nconnection_uri = {hosts[h2]}\n"
    )
    md(state, "image", "add", str(test_image), "--name", "guest", "--disk-format", "qcow2")
    return state


def test_rbd_live_migration_there_and_back_and_evacuation(
    hosts: dict[str, str],
    test_image: Path,
    ceph_conf: str,  # noqa: F811
) -> None:
    """images_type = rbd (every disk in Ceph: no shared-storage check, no UNSAFE): the
    test guest booted on the second host moves here and back live, never rebooting,
    and its power button powers it off there; another, evacuated from the second host
    after its power loss, runs here, and its stale definition goes when that host is
    back."""
    h2 = hosts["shared"]
    state = rbd_state(hosts, ceph_conf, test_image)
    try:
        vm = boot_ready(state, "guest", "ceph1", h2)
        assert md_json(state, "live-migrate", "ceph1", "--host", "here")["host"] == "here"
        assert domain_on("qemu:///system", vm["uuid"])
        assert md_json(state, "live-migrate", "ceph1", "--host", h2)["host"] == h2
        assert domain_on(hosts[h2], vm["uuid"])
        log = Path(vm["instance_dir"]) / "console.log"
        assert console.read_console(log).count("minidriver-guest: boot-count") == 1
        md(state, "stop", "ceph1", "--timeout", "120")
        console.wait_for_console(log, r"power-button, powering off", timeout=60)
        assert md_json(state, "show", "ceph1")["state"] == "shutoff"

        other = boot_ready(state, "guest", "ceph2", h2)
        dev_host("stop", h2)
        assert md_json(state, "evacuate", "ceph2", "--host", "here")["host"] == "here"
        assert md_json(state, "show", "ceph2")["state"] == "running"
        assert dev_host("start", h2) == hosts[h2]
        md(state, "host", "list")
        assert not domain_on(hosts[h2], other["uuid"])
        assert domain_on(hosts[h2], vm["uuid"])  # ceph1 still lives there, stopped
    finally:
        md(state, "delete", "--all", check=False)
        shutil.rmtree(state, ignore_errors=True)


def booted(count: int) -> str:
    """The console's boot-count line ``count``, then the guest's ready line."""
    return rf"^minidriver-guest: boot-count {count}\r?\n(?:.*\n)*?minidriver-guest: ready"


def test_rbd_cold_migration_confirmed_then_another_reverted(
    hosts: dict[str, str],
    test_image: Path,
    ceph_conf: str,  # noqa: F811
) -> None:
    """images_type = rbd: the test guest cold-migrated to the second host (the
    scheduler's choice: never the source) boots there once more and stays after the
    confirm, nothing of it left here; a second migration, back here, reverted: on the
    second host again, booted once more, nothing of it left here."""
    h2 = hosts["shared"]
    state = rbd_state(hosts, ceph_conf, test_image)
    try:
        vm = boot_ready(state, "guest", "cold1", "here")
        log = Path(vm["instance_dir"]) / "console.log"
        first_port = vm["network"]["forward_port"]

        moved = md_json(state, "migrate", "cold1", "--timeout", "120")
        assert (moved["source"], moved["host"], moved["vm_state"]) == ("here", h2, "resized")
        assert moved["forward_port"] not in (None, first_port)
        assert domain_on(hosts[h2], vm["uuid"])
        assert not domain_on("qemu:///system", vm["uuid"])
        console.wait_for_console(log, booted(2), timeout=BOOT_TIMEOUT)
        shown = md_json(state, "show", "cold1")
        assert (shown["host"], shown["source_host"], shown["state"]) == (h2, "here", "running")
        # Not again before a decision.
        again = md(state, "migrate", "cold1", "--host", "here", check=False)
        assert again.returncode == 1
        assert "vm_state is resized" in again.stderr

        confirmed = md_json(state, "resize-confirm", "cold1")
        assert (confirmed["host"], confirmed["source"], confirmed["vm_state"]) == (
            h2,
            None,
            "active",
        )
        shown = md_json(state, "show", "cold1")
        assert (shown["host"], shown["source_host"], shown["state"]) == (h2, None, "running")
        assert not domain_on("qemu:///system", vm["uuid"])
        assert console.read_console(log).count("minidriver-guest: boot-count") == 2

        # Back here, then reverted: on the second host again.
        back = md_json(state, "migrate", "cold1", "--host", "here", "--timeout", "120")
        assert (back["source"], back["host"]) == (h2, "here")
        assert domain_on("qemu:///system", vm["uuid"])
        assert not domain_on(hosts[h2], vm["uuid"])
        console.wait_for_console(log, booted(3), timeout=BOOT_TIMEOUT)
        reverted = md_json(state, "resize-revert", "cold1")
        assert (reverted["host"], reverted["source"], reverted["vm_state"]) == (h2, None, "active")
        assert domain_on(hosts[h2], vm["uuid"])
        assert not domain_on("qemu:///system", vm["uuid"])
        console.wait_for_console(log, booted(4), timeout=BOOT_TIMEOUT)
        shown = md_json(state, "show", "cold1")
        assert (shown["host"], shown["state"], shown["vm_state"]) == (h2, "running", "active")
        assert console.read_console(log).count("minidriver-guest: boot-count") == 4
    finally:
        md(state, "delete", "--all", check=False)
        shutil.rmtree(state, ignore_errors=True)
