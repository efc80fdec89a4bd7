"""``migrate``'s refusals on libvirt's test driver (two test-driver nodes stand for
two hosts), with real files and a real state database: each is one error, exit 1,
and the instance left as it was. The moves themselves run on real daemons and Ceph:
tests/integration/test_hosts.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tests_helpers_ops import run

from minidriver import cold_migration
from minidriver.config import Config, load_config
from minidriver.driver import LibvirtDriver
from minidriver.volume.api import Attachment


@pytest.fixture
def hconf(tmp_path: Path, node_file: Path) -> Config:
    """This host ``here`` and two others: ``h2`` (a test-driver node of its own) and
    ``down`` (whose libvirt cannot be opened)."""
    node2 = tmp_path / "h2.xml"
    node2.write_text(node_file.read_text())
    path = tmp_path / "minidriver.conf"
    path.write_text(
        "[DEFAULT]\nhost = here\n"
        f"[host:h2]\nconnection_uri = test://{node2}\n"
        f"[host:down]\nconnection_uri = test://{tmp_path / 'no-such-node.xml'}\n"
    )
    return load_config(path, state_dir=tmp_path / "state", environ={}).with_libvirt(
        connection_uri=f"test://{node_file}", virt_type="qemu"
    )


@pytest.fixture
def hdrv(hconf: Config, make_driver: Callable[[Config], LibvirtDriver]) -> LibvirtDriver:
    return make_driver(hconf)


@pytest.fixture
def vm(hdrv: LibvirtDriver, empty_qcow2: Path) -> str:
    image = hdrv.images.add(empty_qcow2, name="cirros", disk_format="qcow2").id
    return hdrv.spawn("vm", image, "t1.nano").uuid


@pytest.mark.parametrize(
    ("argv", "prepare", "message"),
    [
        # File disks, and h2 does not see this host's instances_path.
        ((), None, "host h2 does not see"),
        (("--host", "h2"), None, "host h2 does not see"),
        (("--host", "here"), None, "vm already runs on host here"),
        (("--host", "down"), None, "host down cannot take vm: unreachable"),
        (("--host", "elsewhere"), None, "no host 'elsewhere' in the configuration"),
        ((), {"vm_state": "rescued"}, "cannot migrate instance vm: its vm_state is rescued"),
        ((), {"vm_state": "resized"}, "cannot migrate instance vm: its vm_state is resized"),
        ((), "volume", "cannot migrate instance vm: it has volumes attached"),
    ],
)
def test_a_refused_migrate_is_one_error_and_changes_nothing(
    hdrv: LibvirtDriver,
    hconf: Config,
    vm: str,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    prepare: dict[str, str] | str | None,
    message: str,
) -> None:
    if prepare == "volume":
        volume = hdrv.volumes.create(1, name="data")
        hdrv.volumes.record_attachment(Attachment(volume.id, vm, "vdd"))
    elif isinstance(prepare, dict):
        hdrv.db.update_instance(vm, **prepare)
    before = hdrv.db.get_instance(vm)
    code, out = run(hdrv, hconf, capsys, "migrate", "vm", *argv)
    assert code == 1
    assert message in out["error"]
    assert hdrv.db.get_instance(vm) == before
    domain = hdrv.host.get_domain(vm)
    assert domain is not None and hdrv.host.domain_state(domain) == "running"


def test_with_no_other_host_migrate_says_so(
    drv: LibvirtDriver, empty_qcow2_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    uuid = drv.spawn("solo", empty_qcow2_id, "t1.nano").uuid
    before = drv.db.get_instance(uuid)
    code, out = run(drv, drv.conf, capsys, "migrate", "solo")
    assert code == 1
    assert "no other host to move solo to" in out["error"]
    assert "[host:NAME] connection_uri" in out["hint"]
    assert drv.db.get_instance(uuid) == before


def test_a_revert_to_a_source_that_does_not_answer_is_refused(
    hdrv: LibvirtDriver, hconf: Config, vm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A migration from host ``down`` (the record as ``migrate`` leaves it) cannot go
    back there; the confirm says where to keep it."""
    hdrv.db.update_instance(vm, vm_state="resized", source_host="down")
    before = hdrv.db.get_instance(vm)
    code, out = run(hdrv, hconf, capsys, "resize-revert", "vm")
    assert code == 1
    assert "host down does not answer: vm cannot go back to it" in out["error"]
    assert "resize-confirm" in out["hint"]
    assert hdrv.db.get_instance(vm) == before
    domain = hdrv.host.get_domain(vm)
    assert domain is not None and hdrv.host.domain_state(domain) == "running"

    # Its confirm keeps it here: no source to clean while it is down.
    code, out = run(hdrv, hconf, capsys, "resize-confirm", "vm")
    assert code == 0
    assert (out["host"], out["source"], out["vm_state"]) == ("here", None, "active")
    after = hdrv.db.get_instance(vm)
    assert (after.host, after.source_host, after.vm_state) == ("here", "", "active")


def test_a_migration_is_not_confirmed_as_a_resize_nor_the_reverse(
    vm: str, hdrv: LibvirtDriver
) -> None:
    hdrv.db.update_instance(vm, vm_state="resized", old_flavor="t1.nano")
    with pytest.raises(cold_migration.MigrationError, match="resized on its host, not migrated"):
        cold_migration.confirm_migration(hdrv, hdrv, vm)
    assert not cold_migration.is_migration(hdrv.db.get_instance(vm))
