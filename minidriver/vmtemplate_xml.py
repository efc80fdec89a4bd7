"""A template's domain XML rewritten for one of its clones (no Nova counterpart:
templates are ours, see ``vmtemplate``).

The saved guest's XML names the source instance everywhere: its name and uuid, its
files, its RBD disks, its guest agent's socket and its forwarded port. ``clone_xml``
gives each of them the clone's, and refuses a path it does not know rather than leave
it pointing at another instance's file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from lxml import etree

from minidriver import sysinfo
from minidriver.exception import TemplateError
from minidriver.guest import METADATA_NAMESPACE, QEMU_NAMESPACE

CONSOLE_LOG = "console.log"
# Used in place by every clone, read-only; every other disk gets an overlay per clone.
SHARED_FILES: Final = ("disk.config", "kernel", "ramdisk")
HOSTFWD = re.compile(r"(hostfwd=tcp:127\.0\.0\.1:)\d+(-)")


def clone_xml(
    xml: str,
    *,
    name: str,
    uuid: str,
    display_name: str,
    created_at: str,
    source_dir: str,
    source_uuid: str,
    clone_dir: Path,
    template_dir: Path,
    overlaid: Iterable[str],
    forward_port: int | None,
) -> str:
    """The template's domain XML (the saved one or ``libvirt.xml``) for a clone: its
    name, uuid and metadata; each file of the source instance's dir named by the
    clone's overlay, the template's shared copy or the clone's console log; the
    SMBIOS uuid (libvirt wants the domain's) and serial; the forwarded port; the
    guest agent's socket, named after the instance's uuid. A path this does not know
    is refused, never left pointing at another instance's file."""
    root = etree.fromstring(xml.encode())
    overlays = set(overlaid)

    def move(path: str | None) -> str:
        p = Path(path or "")
        if p.parent == Path(source_dir):
            if p.name in overlays or p.name == CONSOLE_LOG:
                return os.fspath(clone_dir / p.name)
            if p.name in SHARED_FILES:
                return os.fspath(template_dir / p.name)
        raise TemplateError(f"the template's XML names {path}, which no clone can have")

    _set_text(root, "name", name)
    sysinfo.with_uuid(root, root.findtext("uuid") or "", uuid)
    _set_text(root, "uuid", uuid)
    meta = root.find(f"metadata/{{{METADATA_NAMESPACE}}}instance")
    if meta is None:
        raise TemplateError("the template's XML has no minidriver metadata")
    for tag, value in (
        ("display-name", display_name),
        ("instance-uuid", uuid),
        ("created-at", created_at),
    ):
        _set_text(meta, f"{{{METADATA_NAMESPACE}}}{tag}", value)
    for source in root.iterfind("devices/disk/source[@file]"):
        source.set("file", move(source.get("file")))
    for source in root.iterfind("devices/disk/source[@protocol='rbd']"):
        source.set("name", _renamed_rbd_disk(source.get("name", ""), source_uuid, uuid))
    for element in [*root.iterfind("os/kernel"), *root.iterfind("os/initrd")]:
        element.text = move(element.text)
    for log in root.iterfind("devices/*/log"):
        log.set("file", move(log.get("file")))
    for source in root.iterfind("devices/channel/source[@path]"):
        source.set("path", _renamed_socket(source.get("path", ""), source_uuid, uuid))
    for arg in root.iterfind(f"{{{QEMU_NAMESPACE}}}commandline/{{{QEMU_NAMESPACE}}}arg"):
        value = arg.get("value", "")
        if HOSTFWD.search(value):
            if forward_port is None:
                raise TemplateError("the template forwards a port but the clone has none")
            arg.set("value", HOSTFWD.sub(rf"\g<1>{forward_port}\g<2>", value))
    return etree.tostring(root, encoding="unicode")


def _renamed_rbd_disk(name: str, source_uuid: str, uuid: str) -> str:
    """``pool/<source uuid>_<disk>`` -> ``pool/<clone uuid>_<disk>``: the clone's own
    RBD clone of that disk's frozen snapshot."""
    pool, _, image = name.partition("/")
    if not image.startswith(f"{source_uuid}_"):
        raise TemplateError(f"the template's XML names RBD image {name}, which no clone can have")
    return f"{pool}/{uuid}_{image.removeprefix(source_uuid + '_')}"


def _renamed_socket(path: str, source_uuid: str, uuid: str) -> str:
    p = Path(path)
    if source_uuid not in p.name:
        raise TemplateError(f"the template's XML names a socket {path} no clone can share")
    return os.fspath(p.with_name(p.name.replace(source_uuid, uuid)))


def _set_text(parent: Any, path: str, value: str) -> None:
    element = parent.find(path)
    if element is None:
        raise TemplateError(f"the template's XML has no <{path}>")
    element.text = value
