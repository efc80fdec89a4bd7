"""libvirt's QEMU save image header: read, rewritten with another XML, copied.

The files are built byte by byte after libvirt's layout (src/qemu/qemu_saveimage.h),
independently of the module: the magic, five little-endian words, fourteen unused, the
XML and cookie NUL-terminated and padded, then a stream. A real save file is read in
the integration tests (tests/integration/test_templates.py).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from minidriver import savefile

XML = "<domain type='qemu'><name>instance-00000001</name><uuid>u1</uuid></domain>"
COOKIE = b"<cookie>\n  <slirpHelper/>\n</cookie>\n"
STREAM = b"QEVM\x00\x00\x00\x03" + os.urandom(300_000)


def save_image(
    path: Path, *, xml: str = XML, pad: int = 4096, magic: bytes = b"LibvirtQemudSave"
) -> Path:
    data = xml.encode() + b"\0" + COOKIE + b"\0"
    data_len = len(data) + pad
    words = struct.pack("<5I", 2, data_len, 1, 0, len(xml.encode()) + 1)
    path.write_bytes(magic + words + bytes(56) + data.ljust(data_len, b"\0") + STREAM)
    return path


def test_the_header_as_libvirt_writes_it(tmp_path: Path) -> None:
    header = savefile.read_header(save_image(tmp_path / "a.save"))
    assert header.version == 2
    assert header.was_running is True
    assert header.compressed == 0
    assert header.xml == XML
    assert header.cookie == COOKIE
    assert header.stream_offset == 92 + len(XML) + 1 + len(COOKIE) + 1 + 4096


def test_a_copy_carries_the_new_xml_and_the_same_stream(tmp_path: Path) -> None:
    source = save_image(tmp_path / "a.save")
    new_xml = XML.replace("instance-00000001", "instance-00000002").replace("u1", "u2")
    dest = tmp_path / "b.save"
    savefile.copy_with_xml(source, dest, new_xml)
    copied = savefile.read_header(dest)
    assert (copied.xml, copied.cookie, copied.was_running) == (new_xml, COOKIE, True)
    # It fits in libvirt's padding: the stream stays where it was, byte for byte.
    assert copied.stream_offset == savefile.read_header(source).stream_offset
    assert dest.read_bytes()[copied.stream_offset :] == STREAM
    assert dest.stat().st_size == source.stat().st_size


def test_an_xml_longer_than_the_padding_moves_the_stream(tmp_path: Path) -> None:
    source = save_image(tmp_path / "a.save", pad=0)
    new_xml = XML.replace("</domain>", "<description>" + "x" * 5000 + "</description></domain>")
    dest = tmp_path / "b.save"
    savefile.copy_with_xml(source, dest, new_xml)
    copied = savefile.read_header(dest)
    assert copied.xml == new_xml and copied.cookie == COOKIE
    assert dest.read_bytes()[copied.stream_offset :] == STREAM


def test_the_same_xml_gives_the_same_bytes(tmp_path: Path) -> None:
    source = save_image(tmp_path / "a.save")
    header = savefile.read_header(source)
    assert savefile.header_bytes(header, header.xml) == source.read_bytes()[: header.stream_offset]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"QFI\xfb" + bytes(200), "not a libvirt QEMU save image"),
        (b"", "not a libvirt QEMU save image"),
        (None, "unfinished"),
    ],
)
def test_what_is_not_a_save_image_is_refused(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "x.save"
    if content is None:
        save_image(path, magic=b"LibvirtQemudPart")
    else:
        path.write_bytes(content)
    with pytest.raises(savefile.SaveImageError, match=message):
        savefile.read_header(path)


def test_a_copy_never_overwrites(tmp_path: Path) -> None:
    source = save_image(tmp_path / "a.save")
    dest = tmp_path / "b.save"
    dest.write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        savefile.copy_with_xml(source, dest, XML)
    assert dest.read_bytes() == b"mine"
