"""Whether two hosts see one instances_path: Nova's shared-storage check
(nova/virt/libvirt/driver.py ``_create_shared_storage_test_file`` and
``_check_shared_storage_test_file``).

Nova makes a temporary file in ``instances_path`` on one host and looks for it on the
other, each compute service in its own file system. Here one process reaches every
host through libvirt only, so the other host looks through its libvirt: a transient
``dir`` storage pool on ``instances_path`` in that host's view, its volumes listed,
the pool destroyed again. Instances with every disk in Ceph (``images_type = rbd``)
need no such check, as in Nova (``is_shared_block_storage``), but their instance dir
(console.log, disk.info) is still written here: that is ours, and no QEMU needs it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt

from minidriver.exception import MinidriverError
from minidriver.host import Host


class SharedStorageError(MinidriverError):
    """The other host does not see this host's instances_path."""


def create_test_file(instances_path: Path) -> str:
    """Nova's ``_create_shared_storage_test_file``: an empty file in instances_path;
    its name."""
    instances_path.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=instances_path, prefix=".shared-check-")
    os.close(fd)
    return os.path.basename(path)


def sees_file(host: Host, directory: Path, filename: str) -> bool:
    """Whether ``host`` sees ``directory/filename`` (Nova's
    ``_check_shared_storage_test_file``), through a transient dir pool on it."""
    name = f"minidriver-check-{uuid.uuid4().hex[:12]}"
    xml = (
        f"<pool type='dir'><name>{name}</name>"
        f"<target><path>{escape(os.fspath(directory))}</path></target></pool>"
    )
    try:
        pool = host.get_connection().storagePoolCreateXML(xml, 0)
    except libvirt.libvirtError:
        return False  # no such directory there: nothing shared
    try:
        return filename in pool.listVolumes()
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            pool.destroy()


def check_shared_instances_path(
    this_host: str, instances_path: Path, other_name: str, other: Host
) -> None:
    """Refuse, clearly, when host ``other_name`` does not see ``instances_path`` as
    this host does: a file-backed instance's disks would not be there."""
    filename = create_test_file(instances_path)
    try:
        shared = sees_file(other, instances_path, filename)
    finally:
        (instances_path / filename).unlink(missing_ok=True)
    if not shared:
        raise SharedStorageError(
            f"host {other_name} does not see {instances_path} as {this_host} does"
            " (a test file made here is not there): file-backed disks cannot run there",
            hint="share instances_path between the hosts at the same path, or keep every"
            " disk in Ceph: [libvirt] images_type = rbd",
        )
