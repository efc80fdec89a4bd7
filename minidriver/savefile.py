"""libvirt's QEMU save image: its header, and a copy with another domain XML in it
(no Nova counterpart: libvirt's src/qemu/qemu_saveimage.c; Nova only asks libvirt to
save and restore).

``virDomainSave`` writes, in this order (all integers 32-bit little-endian):

- the magic ``LibvirtQemudSave`` (16 bytes), or ``LibvirtQemudPart`` while writing;
- version (2), data_len, was_running, compressed, cookieOffset, 14 unused words:
  92 bytes in all;
- data_len bytes: the domain XML, NUL-terminated, the migration cookie (XML, also
  NUL-terminated) at 92 + cookieOffset, then NUL padding that libvirt leaves so the XML
  can be edited in place (``virDomainSaveImageDefineXML``);
- QEMU's migration stream, from byte 92 + data_len to the end.

Read on this machine from a real ``virsh save`` of the test guest (libvirt 9.0): version
2, a 4187-byte XML, the cookie right after it, data_len 69959, the stream starting
with QEMU's ``QEVM`` magic.

A clone cannot be restored from the template's own file: libvirt's restore checks the
XML it is given against the header's, and name and uuid are part of that check, and
``virDomainSaveImageDefineXML`` refuses a new name or uuid for the same reason. So each
clone gets its own copy whose header carries its own XML; the stream is copied as it
is (``copy_file_range``: in the kernel, a reflink where the file system has them).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from minidriver.exception import MinidriverError

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"  # libvirt's mark of a save still being written
VERSION = 2
_FIELDS = struct.Struct("<5I")  # version, data_len, was_running, compressed, cookieOffset
HEADER_SIZE = len(MAGIC) + _FIELDS.size + 14 * 4  # 92
# The header plus the XML and cookie of any domain we make; refused beyond this.
MAX_DATA_LEN = 16 * 1024 * 1024
COPY_CHUNK = 1 << 30


class SaveImageError(MinidriverError):
    """A file is not a save image this code can read or rewrite."""


@dataclass(frozen=True)
class SaveHeader:
    version: int
    data_len: int
    was_running: bool
    compressed: int  # 0: raw stream; a clone copies it as it is, whatever it is
    xml: str
    cookie: bytes  # the migration cookie, without its NUL; may be empty

    @property
    def stream_offset(self) -> int:
        return HEADER_SIZE + self.data_len


def read_header(path: Path) -> SaveHeader:
    """The header of the save image at ``path``."""
    with open(path, "rb") as fh:
        head = fh.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE or head[: len(MAGIC)] != MAGIC:
            what = "unfinished" if head[: len(MAGIC)] == PARTIAL_MAGIC else "not"
            raise SaveImageError(f"{path} is {what} a libvirt QEMU save image")
        version, data_len, was_running, compressed, cookie_offset = _FIELDS.unpack_from(
            head, len(MAGIC)
        )
        if version != VERSION or data_len > MAX_DATA_LEN or cookie_offset > data_len:
            raise SaveImageError(
                f"{path}: save image version {version}, data_len {data_len}: not one this"
                f" code knows (version {VERSION})"
            )
        data = fh.read(data_len)
    if len(data) < data_len:
        raise SaveImageError(f"{path}: the save image ends inside its header")
    xml_end = data.find(b"\0")
    if xml_end < 0 or (cookie_offset and xml_end >= cookie_offset):
        raise SaveImageError(f"{path}: the save image's domain XML is not NUL-terminated")
    cookie = b""
    if cookie_offset:
        cookie = data[cookie_offset:].split(b"\0", 1)[0]
    return SaveHeader(
        version=version,
        data_len=data_len,
        was_running=bool(was_running),
        compressed=compressed,
        xml=data[:xml_end].decode(),
        cookie=cookie,
    )


def header_bytes(old: SaveHeader, xml: str) -> bytes:
    """A header like ``old`` with ``xml`` in it, exactly ``old.data_len`` long when the
    new XML and the cookie fit there (libvirt's padding leaves room), so the stream
    stays where it was; longer otherwise."""
    xml_data = xml.encode() + b"\0"
    cookie = old.cookie + b"\0" if old.cookie else b""
    used = len(xml_data) + len(cookie)
    data_len = max(old.data_len, used)
    if data_len > MAX_DATA_LEN:
        raise SaveImageError(f"a domain XML of {len(xml_data)} bytes is too large")
    fields = _FIELDS.pack(
        old.version, data_len, int(old.was_running), old.compressed, len(xml_data) if cookie else 0
    )
    data = (xml_data + cookie).ljust(data_len, b"\0")
    return MAGIC + fields + bytes(14 * 4) + data


def copy_with_xml(source: Path, dest: Path, xml: str) -> None:
    """``dest``: the save image ``source`` with ``xml`` as its domain XML.

    The copy is marked partial (libvirt's own ``LibvirtQemudPart``) until its stream
    is all there, so a copy cut short by a crash is never restored.
    """
    old = read_header(source)
    header = header_bytes(old, xml)
    size = source.stat().st_size
    with open(source, "rb") as src, open(dest, "xb") as out:
        out.write(PARTIAL_MAGIC + header[len(MAGIC) :])
        out.flush()
        offset, left = old.stream_offset, size - old.stream_offset
        while left > 0:
            # copy_file_range moves the data in the kernel (a reflink on btrfs or
            # xfs): no pass through this process.
            done = os.copy_file_range(
                src.fileno(), out.fileno(), min(left, COPY_CHUNK), offset, None
            )
            if done == 0:
                raise SaveImageError(f"{source} shrank while it was copied")
            offset += done
            left -= done
        out.seek(0)
        out.write(MAGIC)
        out.flush()
        os.fsync(out.fileno())
