"""Shelve and unshelve of the test guest under QEMU: no domain and no instance dir
while shelved, the image kept; unshelved from it, the same root boots once more."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from boots import wait_ready

from minidriver import shelve
from minidriver.driver import LibvirtDriver
from minidriver.exception import ImageNotFound

pytestmark = pytest.mark.integration


def test_shelve_then_unshelve(
    driver: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> None:
    inst = driver.spawn(name="shelved", image=test_image_id, flavor="t1.nano")
    instance_dir = Path(inst.instance_dir)
    try:
        assert "minidriver-guest: boot-count 1" in wait_ready(wait_console, instance_dir, 1)

        image = shelve.shelve(driver, inst.uuid)
        assert driver.host.get_domain(inst.uuid) is None
        assert driver.host.find_domain(inst.name) is None
        assert not instance_dir.exists()
        assert driver.images.get(image.id).status == "active"
        assert driver.db.get_instance(inst.uuid).vm_state == "shelved_offloaded"

        again = shelve.unshelve(driver, inst.uuid)
        assert again.uuid == inst.uuid
        lines = wait_ready(wait_console, Path(again.instance_dir), 1)
        assert "minidriver-guest: boot-count 2" in lines
        assert driver.db.get_instance(inst.uuid).vm_state == "active"
        with pytest.raises(ImageNotFound):
            driver.images.get(image.id)
    finally:
        driver.destroy(inst.uuid)
