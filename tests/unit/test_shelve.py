"""Shelve and unshelve on libvirt's test driver, with real files, a real image store
and a real state database."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests_helpers_ops import run

from minidriver import shelve
from minidriver.cli import main
from minidriver.config import Config
from minidriver.driver import LibvirtDriver
from minidriver.exception import ImageNotFound, MinidriverError


def test_shelve_offloads_and_unshelve_boots_the_same_instance_again(
    drv: LibvirtDriver, empty_qcow2_id: str
) -> None:
    drv.keypairs.create("k")
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano", key_name="k", config_drive=True)
    image = shelve.shelve(drv, inst.uuid)

    record = drv.db.get_instance(inst.uuid)
    assert (record.vm_state, record.shelved_image_id) == ("shelved_offloaded", image.id)
    assert drv.host.get_domain(inst.uuid) is None
    assert not Path(inst.instance_dir).exists()
    assert drv.images.get(image.id).name == "vm-shelved"
    [listed] = drv.list_instances()
    assert (listed.state, listed.vm_state) == ("nostate", "shelved_offloaded")

    again = shelve.unshelve(drv, inst.uuid)
    record = drv.db.get_instance(inst.uuid)
    assert again.uuid == inst.uuid
    assert (record.vm_state, record.flavor, record.key_name) == ("active", "t1.nano", "k")
    assert (record.image_id, record.created_at, record.shelved_image_id) == (
        empty_qcow2_id, inst.created_at, "",
    )  # fmt: skip
    assert (Path(record.instance_dir) / "disk.config").exists()
    assert drv.get_info(inst.uuid).state == "running"
    with pytest.raises(ImageNotFound):
        drv.images.get(image.id)


def test_commands_wrong_states_cleanup_and_delete(
    drv: LibvirtDriver, conf: Config, empty_qcow2_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    code, failed = run(drv, conf, capsys, "unshelve", "vm")
    assert code == 1 and "vm_state is active" in failed["error"], failed
    assert drv.get_info(inst.uuid).state == "running"

    code, done = run(drv, conf, capsys, "shelve", "vm")
    assert (code, done["vm_state"], done["state"]) == (0, "shelved_offloaded", "nostate")
    image_id = done["shelved_image_id"]
    code, shown = run(drv, conf, capsys, "show", "vm")
    assert (code, shown["vm_state"], shown["shelved_image_id"]) == (
        0,
        "shelved_offloaded",
        image_id,
    )
    assert shown["disks"] == {}
    capsys.readouterr()
    assert main(["--state-dir", str(conf.state_path), "show", "vm"], host=drv.host) == 0
    assert "shelved_offloaded" in capsys.readouterr().out
    for argv in (("shelve", "vm"), ("rescue", "vm"), ("resize", "vm", "--flavor", "m1.small")):
        code, failed = run(drv, conf, capsys, *argv)
        assert code == 1 and "vm_state is shelved_offloaded" in failed["error"], (argv, failed)
        assert "unshelve" in failed["hint"]
    code, report = run(drv, conf, capsys, "cleanup")
    assert (code, report["records"]) == (0, [])
    assert drv.db.get_instance(inst.uuid).vm_state == "shelved_offloaded"

    code, _ = run(drv, conf, capsys, "delete", "vm")
    assert code == 0
    assert drv.db.list_instances() == []
    with pytest.raises(ImageNotFound):
        drv.images.get(image_id)


def test_a_failed_unshelve_keeps_the_shelved_record_and_image(
    drv: LibvirtDriver, empty_qcow2_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    image = shelve.shelve(drv, inst.uuid)
    shelved = drv.db.get_instance(inst.uuid)

    def refuse(xml: str) -> None:
        raise MinidriverError("injected: libvirt refused the definition")

    monkeypatch.setattr(drv.host, "define", refuse)
    with pytest.raises(MinidriverError, match="injected"):
        shelve.unshelve(drv, inst.uuid)
    assert drv.db.get_instance(inst.uuid) == shelved
    assert drv.images.get(image.id).id == image.id
    assert not Path(inst.instance_dir).exists()
