"""Key pairs in the state dir, made by the real ssh-keygen and checked by it."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from minidriver.keypairs import (
    InvalidKeyPair,
    KeyPairExists,
    KeyPairNotFound,
    KeyPairStore,
)

IMPORTED = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILKKPDnGB9/9X+u/oRESYminNYMMqLW8nv3vM1sRgBt2 test-ed25519"
)


def keygen_fingerprint(path: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", path], capture_output=True, text=True, check=True
    ).stdout
    return out.split()[1]


def test_create_makes_an_ed25519_pair_private_to_us(tmp_path: Path) -> None:
    store = KeyPairStore(tmp_path / "keypairs")
    pair = store.create("lab")
    assert pair.type == "ssh-ed25519"
    assert pair.private_key == tmp_path / "keypairs" / "lab"
    assert stat.S_IMODE((tmp_path / "keypairs").stat().st_mode) == 0o700
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    # ssh-keygen agrees on the fingerprint, and derives the same public key from the
    # private one: the two files are one pair.
    assert pair.fingerprint == keygen_fingerprint(tmp_path / "keypairs" / "lab.pub")
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", pair.private_key], capture_output=True, text=True, check=True
    ).stdout.split()[:2]
    assert derived == pair.public_key.split()[:2]
    assert sorted(p.name for p in (tmp_path / "keypairs").iterdir()) == ["lab", "lab.pub"]


def test_import_keeps_the_public_key_alone(tmp_path: Path) -> None:
    store = KeyPairStore(tmp_path / "keypairs")
    pair = store.import_public_key("mine", IMPORTED + "\n")
    assert pair.public_key == IMPORTED
    assert pair.private_key is None
    assert pair.fingerprint == keygen_fingerprint(tmp_path / "keypairs" / "mine.pub")


def test_list_get_delete(tmp_path: Path) -> None:
    store = KeyPairStore(tmp_path / "keypairs")
    assert store.list() == []
    store.create("b")
    store.import_public_key("a", IMPORTED)
    assert [k.name for k in store.list()] == ["a", "b"]
    store.delete("b")
    assert [k.name for k in store.list()] == ["a"]
    assert sorted(p.name for p in (tmp_path / "keypairs").iterdir()) == ["a.pub"]
    with pytest.raises(KeyPairNotFound, match="no key pair named 'b'"):
        store.delete("b")


def test_a_name_is_taken_once(tmp_path: Path) -> None:
    store = KeyPairStore(tmp_path / "keypairs")
    first = store.create("k")
    with pytest.raises(KeyPairExists):
        store.create("k")
    with pytest.raises(KeyPairExists):
        store.import_public_key("k", IMPORTED)
    assert store.get("k") == first
    assert sorted(p.name for p in (tmp_path / "keypairs").iterdir()) == ["k", "k.pub"]


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "tab\tname", "x" * 256, "foo.pub"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidKeyPair):
        KeyPairStore(tmp_path / "keypairs").create(name)
    assert not (tmp_path / "keypairs").exists()


@pytest.mark.parametrize(
    "text",
    ["not a key", "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", IMPORTED + "\n" + IMPORTED],
)
def test_an_import_that_is_no_public_key_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(InvalidKeyPair, match="is not an SSH public key"):
        KeyPairStore(tmp_path / "keypairs").import_public_key("k", text)
    assert KeyPairStore(tmp_path / "keypairs").list() == []
