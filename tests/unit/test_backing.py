"""What a hard reboot must not make again from the image: a template clone's frozen
layer, a config drive; and what it makes as the boot made it (real files, real
qemu-img, a real state DB)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from minidriver.backing import MissingDisk, create_images_and_backing
from minidriver.config import Config
from minidriver.driver import LibvirtDriver
from minidriver.images import qemu_img


def clone_of_a_template(drv: LibvirtDriver, image_id: str, tmp_path: Path) -> tuple[str, Path]:
    """An instance recorded as a clone whose root backs onto a frozen file; its uuid
    and that file."""
    inst = drv.spawn("clone", image_id, "t1.nano")
    frozen = tmp_path / "frozen-disk"
    qemu_img.create(frozen, "qcow2", 2**30)
    root = Path(inst.instance_dir) / "disk"
    root.unlink()
    qemu_img.create_cow_image(frozen, "qcow2", root, None)
    drv.db.update_instance(inst.uuid, template_id="tpl-1")
    return inst.uuid, frozen


def recreate(drv: LibvirtDriver, conf: Config, uuid: str) -> list[str]:
    record = drv.db.get_instance(uuid)
    disks = drv.instance_disks(Path(record.instance_dir), uuid) or {}
    return create_images_and_backing(
        conf, drv.images, record, drv.get_flavor(record.flavor), disks, rbd_driver=drv.rbd_driver
    )


def test_a_clone_whose_frozen_layer_is_gone_is_refused(
    drv: LibvirtDriver, conf: Config, empty_qcow2_id: str, tmp_path: Path
) -> None:
    uuid, frozen = clone_of_a_template(drv, empty_qcow2_id, tmp_path)
    assert recreate(drv, conf, uuid) == []  # all there: nothing made
    frozen.unlink()
    with pytest.raises(MissingDisk, match=r"clone of template tpl-1 and .*frozen-disk is gone"):
        recreate(drv, conf, uuid)
    assert not frozen.exists()


def test_a_clone_s_missing_swap_is_not_made_from_the_image(
    drv: LibvirtDriver, conf: Config, empty_qcow2_id: str, tmp_path: Path
) -> None:
    uuid, _frozen = clone_of_a_template(drv, empty_qcow2_id, tmp_path)
    swap = drv.instance_dir(uuid) / "disk.swap"
    swap.unlink()
    with pytest.raises(MissingDisk, match="frozen layer"):
        recreate(drv, conf, uuid)
    assert not swap.exists()


def test_a_missing_config_drive_is_refused(
    drv: LibvirtDriver, conf: Config, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano", config_drive=True)
    os.unlink(Path(inst.instance_dir) / "disk.config")
    with pytest.raises(MissingDisk, match=r"disk.config is gone and cannot be made again"):
        recreate(drv, conf, inst.uuid)


def test_only_what_is_missing_is_made(
    drv: LibvirtDriver, conf: Config, empty_qcow2_id: str
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    assert recreate(drv, conf, inst.uuid) == []
    (Path(inst.instance_dir) / "disk.local").unlink()
    assert recreate(drv, conf, inst.uuid) == ["disk.local"]


def test_an_ephemeral_disk_keeps_the_filesystem_of_its_image_deleted_since(
    drv: LibvirtDriver, conf: Config, empty_qcow2: Path
) -> None:
    """The image's os_type as kept at boot: ext4 for linux, not the vfat of an image
    without one (Nova's ``instance.os_type`` outlives the image too)."""
    image = drv.images.add(
        empty_qcow2, name="linux", disk_format="qcow2", properties={"os_type": "linux"}
    )
    inst = drv.spawn("vm", image.id, "t1.nano")
    ephemeral = Path(inst.instance_dir) / "disk.local"
    ephemeral.unlink()
    drv.images.delete(image.id)

    assert recreate(drv, conf, inst.uuid) == ["disk.local"]  # on the base in _base
    backing = qemu_img.info(ephemeral, "qcow2").backing_file
    assert backing is not None and Path(backing).name == "ephemeral_1_40d1d2c"
