"""Issue 10 end to end: a Debian cloud guest booted from kernel and ramdisk images,
its root grown by cloud-init's growpart and resize_rootfs to the flavor's root size.

The guest (scripts/build-cloud-image) is a minimal debootstrap with cloud-init on the
ConfigDrive datasource; its root is partition 1 of a small disk. The config drive's
user data runs in cloud-init's final stage, after the resize, and prints the sizes the
guest sees and cloud-init's own resize lines to the serial console.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from minidriver.config import Config
from minidriver.driver import LibvirtDriver
from minidriver.guestimages import cloudimage
from minidriver.host import Host
from minidriver.objects import Flavor, GiB, MiB

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Partition 1 starts at 1 MiB: growpart takes it to the end of the disk.
PARTITION_OFFSET = MiB
CLOUD_INIT_DONE = r"Cloud-init v\. \S+ finished at"
BOOT_TIMEOUT = 600  # s; measured here under TCG: about 75 s to cloud-init's final line

USER_DATA = b"""#!/bin/sh
# cloud-init's final stage: growpart and resize_rootfs have run.
{
  echo "minidriver-cloud: partition $(blockdev --getsize64 /dev/vda1)"
  echo "minidriver-cloud: filesystem $(df -B1 --output=size / | tail -n 1 | tr -d ' ')"
  grep -E 'cc_growpart|cc_resizefs' /var/log/cloud-init.log | sed 's/^/minidriver-cloud: log /'
} > /dev/ttyS0
"""


@pytest.fixture(scope="module")
def cloud_driver(
    host_config: Config, libvirt_host: Host, cloud_image: cloudimage.CloudImage
) -> Iterator[LibvirtDriver]:
    """The session's state dir, with flavors whose roots are 4 and 8 GB, and the three
    images of the cloud guest in its image service."""
    flavors = {
        f"c1.root{gb}": Flavor(f"c1.root{gb}", vcpus=1, memory_mb=1024, root_gb=gb) for gb in (4, 8)
    }
    conf = dataclasses.replace(host_config, flavors={**host_config.flavors, **flavors})
    drv = LibvirtDriver(conf, host=libvirt_host)
    kernel = drv.images.add(cloud_image.kernel, name="cloud-kernel", disk_format="aki")
    ramdisk = drv.images.add(cloud_image.ramdisk, name="cloud-ramdisk", disk_format="ari")
    drv.images.add(
        cloud_image.image,
        name="debian-cloud",
        disk_format="qcow2",
        properties={
            "kernel_id": kernel.id,
            "ramdisk_id": ramdisk.id,
            "os_command_line": cloud_image.cmdline,
            "os_type": "linux",
        },
    )
    yield drv
    for record in drv.db.list_instances():
        drv.destroy(record.uuid)
    drv.db.close()


def cloud_lines(console_text: str) -> dict[str, Any]:
    # Not anchored at the line's start: the guest's getty shares ttyS0, and its
    # prompt ("cloud-8 login: ", no newline) can come just before one of our lines.
    sizes = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"minidriver-cloud: (partition|filesystem) (\d+)", console_text)
    }
    log = re.findall(r"minidriver-cloud: log (.*)$", console_text, re.M)
    return {"sizes": sizes, "log": log}


@pytest.mark.parametrize("root_gb", [4, 8])
def test_cloud_init_grows_the_root_to_the_flavor(
    cloud_driver: LibvirtDriver,
    wait_console: Callable[..., re.Match[str]],
    record_property: Callable[[str, object], None],
    root_gb: int,
) -> None:
    started = time.monotonic()
    instance = cloud_driver.spawn(
        f"cloud-{root_gb}",
        "debian-cloud",
        f"c1.root{root_gb}",
        config_drive=True,
        user_data=USER_DATA,
    )
    instance_dir = Path(instance.instance_dir)
    console_log = instance_dir / "console.log"
    wait_console(console_log, CLOUD_INIT_DONE, timeout=BOOT_TIMEOUT)
    # The user data's lines come just before cloud-init's last one; give the console
    # a moment to reach the file.
    wait_console(console_log, r"minidriver-cloud: filesystem \d+", timeout=30)
    seconds = round(time.monotonic() - started, 1)
    record_property("seconds_to_cloud_init_final", seconds)
    text = console_log.read_text(errors="replace")
    # Shown with -rA: the figure the issue asks for, and what the guest said.
    print(f"root {root_gb} GB: spawn to cloud-init's final line in {seconds} s")
    print("\n".join(line for line in text.splitlines() if "minidriver-cloud:" in line))

    # The kernel and ramdisk images booted the disk image (no BIOS boot loader in it).
    xml = (instance_dir / "libvirt.xml").read_text()
    assert f"<kernel>{instance_dir / 'kernel'}</kernel>" in xml
    assert f"<initrd>{instance_dir / 'ramdisk'}</initrd>" in xml

    seen = cloud_lines(text)
    root = root_gb * GiB
    partition = seen["sizes"]["partition"]
    # growpart takes partition 1 to the disk's end (it may leave alignment slack).
    assert root - PARTITION_OFFSET - MiB <= partition <= root - PARTITION_OFFSET, seen
    # ext4's own metadata (inode tables, journal) is not in df's size.
    assert 0.95 * partition <= seen["sizes"]["filesystem"] <= partition, seen
    # cloud-init's own lines: growpart changed the partition, resize2fs grew the fs.
    assert any("cc_growpart" in line and "resized" in line.lower() for line in seen["log"]), seen
    assert any("cc_resizefs" in line and "resiz" in line.lower() for line in seen["log"]), seen

    cloud_driver.destroy(instance.uuid)
    assert not instance_dir.exists()
    assert cloud_driver.host.find_domain(instance.name) is None
