"""Resize, resize-confirm and resize-revert on libvirt's test driver, with real
qcow2 files, real qemu-img and a real state database; the flavor to grow to comes
from the test's own config file, as a user defines one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tests_helpers_ops import disk_sizes, domain_xml, run

from minidriver import resize
from minidriver.config import Config, load_config
from minidriver.driver import LibvirtDriver
from minidriver.exception import MinidriverError
from minidriver.objects import GiB

GROW = "[flavor:t1.grow]\nvcpus = 2\nmemory_mb = 256\nroot_gb = 2\nephemeral_gb = 2\nswap = 128\n"


@pytest.fixture
def gconf(tmp_path: Path, node_file: Path) -> Config:
    path = tmp_path / "minidriver.conf"
    path.write_text(GROW)
    return load_config(path, state_dir=tmp_path / "state", environ={}).with_libvirt(
        connection_uri=f"test://{node_file}", virt_type="qemu"
    )


@pytest.fixture
def gdrv(gconf: Config, make_driver: Callable[[Config], LibvirtDriver]) -> LibvirtDriver:
    return make_driver(gconf)


@pytest.fixture
def image_id(gdrv: LibvirtDriver, empty_qcow2: Path) -> str:
    return gdrv.images.add(empty_qcow2, name="cirros", disk_format="qcow2").id


def test_resize_grows_the_disks_and_revert_brings_the_old_ones_back(
    gdrv: LibvirtDriver, image_id: str
) -> None:
    inst = gdrv.spawn("vm", image_id, "t1.nano")
    instance_dir = Path(inst.instance_dir)
    before = disk_sizes(instance_dir)
    old_xml = domain_xml(gdrv, inst.uuid)
    resize.resize(gdrv, inst.uuid, "t1.grow")

    record = gdrv.db.get_instance(inst.uuid)
    assert (record.vm_state, record.flavor, record.old_flavor) == ("resized", "t1.grow", "t1.nano")
    assert disk_sizes(instance_dir) == {
        "disk": 2 * GiB,
        "disk.local": 2 * GiB,
        "disk.swap": 128 * 2**20,
    }
    xml = domain_xml(gdrv, inst.uuid)
    assert "<vcpu placement='static'>2</vcpu>" in xml or ">2</vcpu>" in xml
    assert "262144" in xml  # 256 MiB in KiB
    old_dir = Path(f"{instance_dir}_resize")
    assert disk_sizes(old_dir) == before
    assert gdrv.get_info(inst.uuid).state == "running"

    resize.revert_resize(gdrv, inst.uuid)
    record = gdrv.db.get_instance(inst.uuid)
    assert (record.vm_state, record.flavor, record.old_flavor) == ("active", "t1.nano", "")
    assert disk_sizes(instance_dir) == before
    assert not old_dir.exists()
    assert domain_xml(gdrv, inst.uuid) == old_xml
    assert gdrv.get_info(inst.uuid).state == "running"


def test_confirm_removes_the_old_disks_and_delete_removes_everything(
    gdrv: LibvirtDriver, gconf: Config, image_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = gdrv.spawn("vm", image_id, "t1.nano")
    old_dir = Path(f"{inst.instance_dir}_resize")
    code, done = run(gdrv, gconf, capsys, "resize", "vm", "--flavor", "t1.grow")
    assert (code, done["vm_state"], done["flavor"], done["old_flavor"]) == (
        0, "resized", "t1.grow", "t1.nano",
    )  # fmt: skip
    code, listed = run(gdrv, gconf, capsys, "list")
    assert [i["vm_state"] for i in listed] == ["resized"]
    code, report = run(gdrv, gconf, capsys, "cleanup")
    assert (code, report["records"], report["instance_dirs"]) == (0, [], [])
    assert old_dir.is_dir() and Path(inst.instance_dir).is_dir()
    code, done = run(gdrv, gconf, capsys, "resize-confirm", "vm")
    assert (code, done["vm_state"], done["flavor"]) == (0, "active", "t1.grow")
    assert not old_dir.exists()
    assert disk_sizes(Path(inst.instance_dir))["disk"] == 2 * GiB

    # A second resize keeps its old dir until delete removes it with the rest.
    gconf_big = gconf.source
    assert gconf_big is not None
    Path(gconf_big).write_text(GROW + GROW.replace("t1.grow", "t1.grow2").replace("= 2\n", "= 3\n"))
    code, done = run(gdrv, gconf, capsys, "resize", "vm", "--flavor", "t1.grow2")
    assert code == 0, done
    assert old_dir.is_dir()
    code, _ = run(gdrv, gconf, capsys, "delete", "vm")
    assert code == 0 and not old_dir.exists() and not Path(inst.instance_dir).exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("resize-confirm", "vm"), "needs resized"),
        (("resize-revert", "vm"), "needs resized"),
        (("resize", "vm", "--flavor", "m1.tiny"), "unable to resize disk down"),
        (("resize", "vm", "--flavor", "t1.nano"), "already"),
        (("resize", "vm", "--flavor", "nope"), "no flavor"),
    ],
)
def test_wrong_resize_requests_are_one_error_and_change_nothing(
    gdrv: LibvirtDriver,
    gconf: Config,
    image_id: str,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    message: str,
) -> None:
    inst = gdrv.spawn("vm", image_id, "t1.nano")
    xml = domain_xml(gdrv, inst.uuid)
    sizes = disk_sizes(Path(inst.instance_dir))
    code, failed = run(gdrv, gconf, capsys, *argv)
    assert code == 1 and message in failed["error"], failed
    record = gdrv.db.get_instance(inst.uuid)
    assert (record.vm_state, record.flavor) == ("active", "t1.nano")
    assert domain_xml(gdrv, inst.uuid) == xml
    assert disk_sizes(Path(inst.instance_dir)) == sizes
    assert not Path(f"{inst.instance_dir}_resize").exists()
    assert gdrv.get_info(inst.uuid).state == "running"


def test_a_resized_instance_cannot_be_resized_again_before_a_decision(
    gdrv: LibvirtDriver, image_id: str
) -> None:

    inst = gdrv.spawn("vm", image_id, "t1.nano")
    resize.resize(gdrv, inst.uuid, "t1.grow")
    with pytest.raises(MinidriverError, match="vm_state is resized"):
        resize.resize(gdrv, inst.uuid, "t1.nano")


def test_a_failed_resize_puts_everything_back(
    gdrv: LibvirtDriver, image_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:

    inst = gdrv.spawn("vm", image_id, "t1.nano")
    xml = domain_xml(gdrv, inst.uuid)
    sizes = disk_sizes(Path(inst.instance_dir))

    def refuse(_xml: str) -> None:
        raise MinidriverError("injected: libvirt refused the definition")

    monkeypatch.setattr(resize, "define_xml", lambda *_a, **_k: refuse(""))
    with pytest.raises(MinidriverError, match="injected"):
        resize.resize(gdrv, inst.uuid, "t1.grow")
    record = gdrv.db.get_instance(inst.uuid)
    assert (record.vm_state, record.flavor, record.old_flavor) == ("active", "t1.nano", "")
    assert disk_sizes(Path(inst.instance_dir)) == sizes
    assert domain_xml(gdrv, inst.uuid) == xml
    assert not Path(f"{inst.instance_dir}_resize").exists()
    assert gdrv.get_info(inst.uuid).state == "running"


def test_an_instance_whose_image_was_deleted_resizes_from_its_kept_metadata(
    gdrv: LibvirtDriver, image_id: str
) -> None:
    """Nova's resize reads ``instance.image_meta``, not Glance: a deleted image is no
    obstacle."""
    inst = gdrv.spawn("vm", image_id, "t1.nano")
    gdrv.images.delete(image_id)

    resize.resize(gdrv, inst.uuid, "t1.grow")

    assert gdrv.db.get_instance(inst.uuid).flavor == "t1.grow"
    assert disk_sizes(Path(inst.instance_dir))["disk.local"] == 2 * GiB
