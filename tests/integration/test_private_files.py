"""Private files that QEMU still opens: the test guest boots from disks and a config
drive (user data) that no other user of the host may read, on the daemon (QEMU runs as
libvirt-qemu and gets the disks through libvirt's dynamic ownership) and on the
embedded driver (QEMU runs as us)."""

from __future__ import annotations

import dataclasses
import os
import pwd
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from minidriver.driver import LibvirtDriver
from minidriver.exception import HostError

pytestmark = pytest.mark.integration

GROUP_OTHER = 0o077


def exposed(directory: Path, owners: set[int]) -> dict[str, str]:
    """Files of ``directory`` that others may read or write, or that belong to someone
    else than ``owners``, as ``ls -l`` shows them."""
    found = {}
    for path in sorted(directory.iterdir()):
        st = os.stat(path)
        if st.st_mode & GROUP_OTHER or st.st_uid not in owners:
            found[path.name] = f"{stat.filemode(st.st_mode)} uid {st.st_uid}"
    return found


@pytest.mark.parametrize("drive_format", ["iso9660", "vfat"])
def test_private_disks_and_user_data_boot(
    driver: LibvirtDriver,
    test_image_id: str,
    wait_console: Callable[..., Any],
    drive_format: str,
) -> None:
    conf = driver.conf
    conf = dataclasses.replace(
        conf, default=dataclasses.replace(conf.default, config_drive_format=drive_format)
    )
    drv = LibvirtDriver(conf, host=driver.host)
    qemu_user = drv.host.qemu_user()
    owners = {os.geteuid()} | ({pwd.getpwnam(qemu_user).pw_uid} if qemu_user else set())
    inst = drv.spawn(
        name="private",
        image=test_image_id,
        flavor="t1.nano",
        config_drive=True,
        hostname="private-1",
        user_data=b"#!/bin/sh\necho s3cret\n",
    )
    instance_dir = Path(inst.instance_dir)
    try:
        wait_console(
            instance_dir / "console.log",
            rf"^minidriver-guest: config-drive uuid={inst.uuid} hostname=private-1",
        )
        wait_console(instance_dir / "console.log", r"^minidriver-guest: ready")
        assert exposed(instance_dir, owners) == {}
        assert exposed(drv.conf.base_dir, owners) == {}
        assert exposed(drv.conf.images_path, owners) == {}
        for directory in (instance_dir, drv.conf.base_dir):
            assert stat.S_IMODE(directory.stat().st_mode) & 0o066 == 0, directory
        assert drv.power_off(inst.uuid, timeout=60)
        assert exposed(instance_dir, owners) == {}
        # Started again: the disks it had, private as they are, open again.
        drv.power_on(inst.uuid)
        wait_console(instance_dir / "console.log", r"^minidriver-guest: boot-count 2")
    finally:
        drv.destroy(inst.uuid)


def test_a_daemon_without_dynamic_ownership_is_refused_with_the_fix(
    driver: LibvirtDriver, tmp_path: Path
) -> None:
    """Its QEMU could not open our private disks: said before anything is made. Where
    QEMU runs as us (the embedded driver) the setting does not matter."""
    qemu_conf = tmp_path / "qemu.conf"
    qemu_conf.write_text("dynamic_ownership = 0\n")
    if driver.host.qemu_user() is None:
        driver.host.check_instances_path(qemu_conf)
        return
    with pytest.raises(HostError, match="without dynamic_ownership") as err:
        driver.host.check_instances_path(qemu_conf)
    assert err.value.hint == (
        f"set dynamic_ownership = 1 (libvirt's default) in {qemu_conf} and restart libvirtd"
    )
    qemu_conf.write_text("#dynamic_ownership = 0\n")
    driver.host.check_instances_path(qemu_conf)
