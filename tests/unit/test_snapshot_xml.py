"""The block copy's destination XML, which carries a path the user chose (its
instances_path): the live snapshot itself runs on real QEMU only
(tests/integration/test_snapshot.py), libvirt's test driver has no block copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lxml import etree

from minidriver import snapshot


@pytest.mark.parametrize("name", ["a<b", "a&b", "a'b", 'a"b', "a<b&c'd\"e>f"])
def test_the_copy_destination_names_any_path_as_text(tmp_path: Path, name: str) -> None:
    delta = tmp_path / name / "delta.qcow2"
    disk = etree.fromstring(snapshot.copy_destination_xml(delta).encode())
    assert (disk.tag, disk.get("type")) == ("disk", "file")
    assert disk.find("source").get("file") == os.fspath(delta)  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
