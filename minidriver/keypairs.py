"""SSH key pairs kept in the state dir (nova/api/openstack/compute/keypairs.py).

``create`` makes an ed25519 pair with ``ssh-keygen`` and keeps the private key, unlike
Nova, which handed it over once (and since API microversion 2.92 makes no keys, it
only imports them): these are keys for throwaway guests that
``minidriver ssh`` logs into. ``import_public_key`` records someone's public key
alone, as Nova's import does. Files: ``keypairs/NAME`` (private, 0600) and
``keypairs/NAME.pub``, in a 0700 directory.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from minidriver import configdrive
from minidriver.exception import MinidriverError, NotFound
from minidriver.process import run

KEY_TYPE = "ed25519"


class KeyPairNotFound(NotFound):
    pass


class KeyPairExists(MinidriverError):
    pass


class InvalidKeyPair(MinidriverError):
    pass


@dataclass(frozen=True)
class KeyPair:
    name: str
    public_key: str  # one OpenSSH line
    fingerprint: str  # SHA256:..., as ssh-keygen -l prints it
    private_key: Path | None  # None for an imported public key

    @property
    def type(self) -> str:
        return self.public_key.split()[0]

    def to_dict(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "type": self.type,
            "fingerprint": self.fingerprint,
            "public_key": self.public_key,
            "private_key": os.fspath(self.private_key) if self.private_key else None,
        }


def fingerprint(public_key: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def validate_name(name: str) -> None:
    """Nova's key pair names; and, as they name files here (NAME and NAME.pub), no
    leading dot and no ``.pub`` ending: ``foo.pub`` would be key pair foo's file."""
    bad_file = name.startswith(".") or name.endswith(".pub")
    if configdrive.KEY_NAME.fullmatch(name) is None or bad_file:
        raise InvalidKeyPair(
            f"key pair name {name!r} is not valid",
            hint="1 to 255 letters, digits, spaces, '@', '.', '_' or '-', not starting"
            " with '.' nor ending in '.pub'",
        )


class KeyPairStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _make_dir(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.chmod(0o700)

    def _public(self, name: str) -> Path:
        return self.path / f"{name}.pub"

    def get(self, name: str) -> KeyPair:
        validate_name(name)
        try:
            public_key = self._public(name).read_text().strip()
        except FileNotFoundError:
            raise KeyPairNotFound(
                f"no key pair named {name!r}",
                hint=f"create it: minidriver keypair create {name}",
            ) from None
        private = self.path / name
        return KeyPair(
            name=name,
            public_key=public_key,
            fingerprint=fingerprint(public_key),
            private_key=private if private.exists() else None,
        )

    def list(self) -> list[KeyPair]:
        if not self.path.is_dir():
            return []
        names = sorted(p.name[: -len(".pub")] for p in self.path.glob("*.pub"))
        return [self.get(name) for name in names if not name.startswith(".")]

    def create(self, name: str) -> KeyPair:
        """A new ed25519 pair, made aside and published only when complete."""
        validate_name(name)
        self._make_dir()
        with tempfile.TemporaryDirectory(prefix=".new-", dir=self.path) as tmp:
            key = Path(tmp) / "key"
            run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    KEY_TYPE,
                    "-N",
                    "",
                    "-C",
                    f"minidriver:{name}",
                    "-f",
                    key,
                ]
            )
            key.chmod(0o600)
            self._publish(name, Path(f"{key}.pub"), private=key)
        return self.get(name)

    def import_public_key(self, name: str, public_key: str) -> KeyPair:
        """Record someone's public key (``keypair create --public-key FILE``)."""
        validate_name(name)
        public_key = public_key.strip()
        try:
            configdrive.validate_public_key(name, public_key)
        except configdrive.InvalidConfigDrive as exc:
            raise InvalidKeyPair(exc.message, hint=exc.hint) from None
        self._make_dir()
        with tempfile.TemporaryDirectory(prefix=".new-", dir=self.path) as tmp:
            pub = Path(tmp) / "key.pub"
            pub.write_text(public_key + "\n")
            self._publish(name, pub, private=None)
        return self.get(name)

    def _publish(self, name: str, pub: Path, *, private: Path | None) -> None:
        # The .pub is what makes a pair exist: linked last, and only if no other
        # `create NAME` got there first (link fails on an existing name).
        if private is not None:
            try:
                os.link(private, self.path / name)
            except FileExistsError:
                raise self._exists(name) from None
        try:
            os.link(pub, self._public(name))
        except FileExistsError:
            if private is not None:
                (self.path / name).unlink()
            raise self._exists(name) from None

    def _exists(self, name: str) -> KeyPairExists:
        return KeyPairExists(
            f"a key pair named {name!r} exists",
            hint=f"choose another name, or delete it: minidriver keypair delete {name}",
        )

    def delete(self, name: str) -> None:
        self.get(name)  # not found: the error
        self._public(name).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.path / name).unlink()
