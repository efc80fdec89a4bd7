"""The config drive, ``disk.config`` (nova/virt/configdrive.py, nova/api/metadata/).

Nova's ``ConfigDriveBuilder`` and the files of its ``InstanceMetadata``, for one instance.

The drive carries what cloud-init's ConfigDrive datasource reads at first boot: a
filesystem labelled ``config-2`` with ``openstack/<version>/meta_data.json``,
``user_data``, ``network_data.json``, ``vendor_data.json`` and ``vendor_data2.json``
for every metadata version Nova writes up to 2020-10-14, and ``latest`` (Nova's
2025-04-04 adds only share devices, which minidriver has none of: not written here).
Two formats, as in Nova:

- ``iso9660``: built in Python with pycdlib (Nova runs ``mkisofs_cmd``,
  genisoimage, with ``-ldots -allow-lowercase -allow-multidot -l -J -r -V config-2``):
  Rock Ridge 1.09 and Joliet carry the real names (``meta_data.json``), as in Nova's;
  the plain ISO 9660 names are the strict interchange level 2 form
  (``META_DATA.JSON;1``), where Nova's options keep lower case and dots (our choice:
  guests read the Rock Ridge or Joliet names);
- ``vfat``: a 64 MiB FAT made by ``mkfs.vfat``, filled by mtools' ``mcopy`` without
  mounting anything (Nova mounts it).

Everything the caller passes is checked when :class:`ConfigDriveData` is made, with
Nova's limits, so nothing is written for bad input; a drive is built under
``<path>.part`` and renamed, so a failure leaves no file at ``path``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import re
import shutil
import tempfile
import unicodedata
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from minidriver import __version__
from minidriver.exception import MinidriverError
from minidriver.fileutils import PRIVATE_UMASK, create_private, publish, removed_on_error
from minidriver.process import run

LOG = logging.getLogger(__name__)

# The label cloud-init looks for (it also accepts CONFIG-2).
VOLUME_LABEL = "config-2"
FORMATS = ("iso9660", "vfat")
# Nova's CONFIGDRIVESIZE_BYTES: the size of a vfat drive.
VFAT_SIZE = 64 * 1024**2

# Nova's metadata versions (nova/api/metadata/base.py), oldest first, up to VICTORIA:
# Nova's EPOXY (2025-04-04) adds share devices only, and there are none here. Each adds
# to the one before; cloud-init reads the newest it knows (2018-08-27 in cloud-init 22.4).
FOLSOM = "2012-08-10"
GRIZZLY = "2013-04-04"  # random_seed
HAVANA = "2013-10-17"  # vendor_data.json
LIBERTY = "2015-10-15"  # network_data.json
NEWTON_ONE = "2016-06-30"  # devices
NEWTON_TWO = "2016-10-06"  # vendor_data2.json
OCATA = "2017-02-22"
ROCKY = "2018-08-27"
VICTORIA = "2020-10-14"  # dedicated_cpus
OPENSTACK_VERSIONS = (
    FOLSOM,
    GRIZZLY,
    HAVANA,
    LIBERTY,
    NEWTON_ONE,
    NEWTON_TWO,
    OCATA,
    ROCKY,
    VICTORIA,
    "latest",
)

# Nova's limits. User data is limited once base64-encoded (the API takes it so):
# 65535 characters of base64 hold 49149 bytes.
MAX_USERDATA_SIZE = 65535
MAX_USERDATA_BYTES = MAX_USERDATA_SIZE // 4 * 3
MAX_METADATA_ITEMS = 128  # the metadata_items quota's default
MAX_METADATA_LENGTH = 255
MAX_NAME_LENGTH = 255
# Nova's API schema for metadata keys (parameter_types.metadata).
METADATA_KEY = re.compile(r"[a-zA-Z0-9-_:. ]{1,255}")
# Nova's key pair names (from API microversion 2.92).
KEY_NAME = re.compile(r"[a-zA-Z0-9 @._-]{1,255}")
# One DNS label (RFC 1123): what a guest can take as its hostname.
HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
DEFAULT_HOSTNAME = "server"

SSH_KEY_TYPES = frozenset(
    {
        "ssh-rsa",
        "ssh-dss",
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
PUBLIC_KEY_HINT = "pass the one line of a .pub file (e.g. ~/.ssh/id_ed25519.pub)"


class InvalidConfigDrive(MinidriverError):
    """What was asked to go on a config drive is not acceptable; nothing was written."""


class ConfigDriveError(MinidriverError):
    """A config drive could not be built (the file system, pycdlib or a tool failed)."""


def _default_network_data() -> dict[str, Any]:
    return {"links": [], "networks": [], "services": []}


@dataclass(frozen=True)
class ConfigDriveData:
    """What goes on one instance's config drive. Checked when made: an instance of
    this class always makes a valid drive.

    ``public_keys`` maps a key name to one line of an OpenSSH ``.pub`` file (surrounding
    whitespace is dropped). ``network_data`` and ``vendor_data`` are written as JSON
    as given (Nova's network_data.json and its static vendor_data.json);
    ``vendor_data2.json`` holds the output of Nova's dynamic vendor data services,
    which we have none of, so it is ``{}``. ``random_seed`` is Nova's 512 random bytes,
    which cloud-init feeds to the guest's entropy pool.
    """

    uuid: str
    name: str
    hostname: str
    launch_index: int = 0
    availability_zone: str = "nova"
    public_keys: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, str] = field(default_factory=dict)
    user_data: bytes | None = None
    network_data: Mapping[str, Any] = field(default_factory=_default_network_data)
    vendor_data: Mapping[str, Any] = field(default_factory=dict)
    random_seed: bytes = field(default_factory=lambda: os.urandom(512), repr=False)

    def __post_init__(self) -> None:
        keys = {k: v.strip() if isinstance(v, str) else v for k, v in self.public_keys.items()}
        object.__setattr__(self, "public_keys", MappingProxyType(keys))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))
        # A deep copy through JSON: it proves the data can be written, and later
        # changes to the caller's dicts cannot reach a checked drive.
        for attr in ("network_data", "vendor_data"):
            object.__setattr__(self, attr, MappingProxyType(_json_copy(attr, getattr(self, attr))))
        validate(self)


def _json_copy(what: str, value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidConfigDrive(f"{what} must be a JSON object, not {type(value).__name__}")
    try:
        copied: dict[str, Any] = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidConfigDrive(f"{what} cannot be written as JSON: {exc}") from exc
    return copied


def validate(data: ConfigDriveData) -> None:
    """Raise :class:`InvalidConfigDrive` for anything Nova would refuse.

    Run by ``ConfigDriveData`` itself; public for callers that want to re-check.
    """
    try:
        parsed = uuidlib.UUID(data.uuid)
    except (ValueError, AttributeError, TypeError):
        parsed = None
    if parsed is None or str(parsed) != data.uuid:
        raise InvalidConfigDrive(
            f"instance uuid {data.uuid!r} is not a UUID in its canonical form",
            hint="e.g. 6e3c1b52-8f9a-4d2e-9b7c-1f0a2d3e4c5b (lower case, with dashes)",
        )
    if not isinstance(data.name, str) or len(data.name) > MAX_NAME_LENGTH:
        raise InvalidConfigDrive(f"instance name must be text of at most {MAX_NAME_LENGTH} chars")
    validate_hostname(data.hostname)
    if isinstance(data.launch_index, bool) or not isinstance(data.launch_index, int):
        raise InvalidConfigDrive(f"launch_index must be an integer, not {data.launch_index!r}")
    if data.launch_index < 0:
        raise InvalidConfigDrive(f"launch_index must not be negative, not {data.launch_index}")
    zone = data.availability_zone
    if not isinstance(zone, str) or not 1 <= len(zone) <= MAX_NAME_LENGTH:
        raise InvalidConfigDrive(f"availability zone {zone!r} must be 1 to 255 characters")
    for key_name, key in data.public_keys.items():
        validate_public_key(key_name, key)
    _validate_meta(data.meta)
    _validate_user_data(data.user_data)
    if not isinstance(data.random_seed, bytes):
        raise InvalidConfigDrive("random_seed must be bytes")


def validate_hostname(hostname: str) -> None:
    """Refuse a hostname that is not one DNS label (RFC 1123), as a guest needs it.

    Nova sanitizes a display name into a hostname (:func:`hostname_from_display_name`);
    an explicit hostname is refused rather than silently changed.
    """
    if not isinstance(hostname, str) or HOSTNAME.fullmatch(hostname) is None:
        suggestion = hostname_from_display_name(hostname) if isinstance(hostname, str) else ""
        raise InvalidConfigDrive(
            f"hostname {hostname!r} is not a valid DNS label: 1 to 63 characters of "
            "a-z, 0-9 and '-', not starting or ending with '-'",
            hint=f"e.g. {suggestion!r}" if suggestion else None,
        )


def hostname_from_display_name(name: str, default: str = DEFAULT_HOSTNAME) -> str:
    """A valid hostname made from a display name, as Nova's ``utils.sanitize_hostname``.

    Nova's steps: spaces, ``_`` and ``.`` become ``-``; other characters that cannot be
    in a hostname go; lower case; ``-`` and ``.`` stripped from both ends; at most 63
    characters; ``default`` when nothing is left (Nova passes ``Server-<uuid>``).
    Unlike Nova, accents are folded (``café`` gives ``cafe``, where Nova keeps the
    ``é``) and every other non-ASCII character goes, so the result is always a
    valid DNS label; and the cut to 63 comes last, so it cannot leave a ``-`` at the end.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    hostname = re.sub(r"[ _.]", "-", ascii_name)
    hostname = re.sub(r"[^a-z0-9-]", "", hostname.lower())
    hostname = hostname.strip("-")[:63].rstrip("-")
    if hostname:
        return hostname
    fallback = hostname_from_display_name(default, default="") if default else ""
    if not fallback:
        raise InvalidConfigDrive(f"no hostname can be made from {name!r} or {default!r}")
    return fallback


def validate_public_key(key_name: str, key: str) -> None:
    """Refuse anything but one OpenSSH public key line: ``TYPE BASE64 [COMMENT]``.

    The body must decode and name the same key type as the prefix. Newlines are
    refused: cloud-init writes each key as a line of ``authorized_keys``, so a second
    line would be a key nobody asked for.
    """
    if not isinstance(key_name, str) or KEY_NAME.fullmatch(key_name) is None:
        raise InvalidConfigDrive(
            f"key name {key_name!r} must be 1 to 255 characters of letters, digits, "
            "space, '@', '.', '_' and '-'"
        )
    if not isinstance(key, str):
        raise InvalidConfigDrive(f"public key {key_name!r} must be text")

    def refuse(why: str, hint: str = PUBLIC_KEY_HINT) -> InvalidConfigDrive:
        return InvalidConfigDrive(f"public key {key_name!r} is not an SSH public key: {why}", hint)

    if "PRIVATE KEY" in key:
        raise refuse("it is a private key", hint="pass the .pub file next to it, never this one")
    if "\n" in key or "\r" in key:
        raise refuse("it has more than one line")
    parts = key.split(None, 2)
    if not parts:
        raise refuse("it is empty")
    key_type = parts[0]
    if key_type not in SSH_KEY_TYPES:
        raise refuse(
            f"{key_type[:40]!r} is not a key type ({', '.join(sorted(SSH_KEY_TYPES))})",
            hint=PUBLIC_KEY_HINT + "; authorized_keys options are not accepted",
        )
    if len(parts) < 2:
        raise refuse(f"nothing follows {key_type!r}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise refuse("its body is not base64") from None
    # The blob names the key type again, as an SSH string (uint32 length, bytes), and
    # the key itself follows.
    length = int.from_bytes(blob[:4], "big")
    if len(blob) <= 4 + length or blob[4 : 4 + length] != key_type.encode():
        raise refuse(f"its body is not a {key_type} key")


def _validate_meta(meta: Mapping[str, str]) -> None:
    if len(meta) > MAX_METADATA_ITEMS:
        raise InvalidConfigDrive(
            f"{len(meta)} metadata items: Nova's limit (the metadata_items quota) is "
            f"{MAX_METADATA_ITEMS}"
        )
    for key, value in meta.items():
        if not isinstance(key, str) or METADATA_KEY.fullmatch(key) is None:
            shown = key[:40] + "..." if isinstance(key, str) and len(key) > 40 else key
            raise InvalidConfigDrive(
                f"metadata key {shown!r} must be 1 to {MAX_METADATA_LENGTH} characters of "
                "letters, digits, space, '-', '_', ':' and '.'"
            )
        if not isinstance(value, str):
            raise InvalidConfigDrive(f"metadata {key!r}: the value must be text, not {value!r}")
        if len(value) > MAX_METADATA_LENGTH:
            raise InvalidConfigDrive(
                f"metadata {key!r}: the value has {len(value)} characters; "
                f"Nova's limit is {MAX_METADATA_LENGTH}"
            )


def _validate_user_data(user_data: bytes | None) -> None:
    if user_data is None:
        return
    if not isinstance(user_data, bytes):
        raise InvalidConfigDrive(f"user data must be bytes, not {type(user_data).__name__}")
    encoded = len(base64.b64encode(user_data))
    if encoded > MAX_USERDATA_SIZE:
        raise InvalidConfigDrive(
            f"user data is {len(user_data)} bytes ({encoded} once base64-encoded); Nova's "
            f"limit is {MAX_USERDATA_SIZE} bytes base64-encoded, {MAX_USERDATA_BYTES} bytes raw",
            hint="compress it (cloud-init reads gzip) or fetch the rest with #include",
        )


def _at_least(version: str, first: str) -> bool:
    return OPENSTACK_VERSIONS.index(version) >= OPENSTACK_VERSIONS.index(first)


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def meta_data(data: ConfigDriveData, version: str = "latest") -> dict[str, Any]:
    """The content of ``openstack/<version>/meta_data.json``, as Nova fills it.

    Nova's ``project_id`` (2015-10-15 on) is left out: there is no project here. Nova
    also appends its ``dhcp_domain`` to the hostname; we write the hostname alone.
    """
    md: dict[str, Any] = {
        "uuid": data.uuid,
        "meta": dict(data.meta),
        "files": [],
        "public_keys": dict(data.public_keys),
        "keys": [
            {"name": name, "type": "ssh", "data": key} for name, key in data.public_keys.items()
        ],
        "hostname": data.hostname,
        "name": data.name,
        "launch_index": data.launch_index,
        "availability_zone": data.availability_zone,
    }
    if _at_least(version, GRIZZLY):
        md["random_seed"] = base64.b64encode(data.random_seed).decode()
    if _at_least(version, NEWTON_ONE):
        md["devices"] = []
    if _at_least(version, VICTORIA):
        md["dedicated_cpus"] = []
    return md


def metadata_files(data: ConfigDriveData) -> dict[str, bytes]:
    """Every file of the drive: its path inside the drive (``openstack/latest/...``),
    and its content. Each version gets the files Nova gives it."""
    files: dict[str, bytes] = {}
    for version in OPENSTACK_VERSIONS:
        base = f"openstack/{version}"
        files[f"{base}/meta_data.json"] = _json(meta_data(data, version))
        if data.user_data is not None:
            files[f"{base}/user_data"] = data.user_data
        if _at_least(version, HAVANA):
            files[f"{base}/vendor_data.json"] = _json(dict(data.vendor_data))
        if _at_least(version, LIBERTY):
            files[f"{base}/network_data.json"] = _json(dict(data.network_data))
        if _at_least(version, NEWTON_TWO):
            files[f"{base}/vendor_data2.json"] = _json({})
    return files


def make_drive(path: Path, data: ConfigDriveData, fmt: str = "iso9660") -> None:
    """Build the config drive at ``path`` in ``fmt`` (``iso9660`` or ``vfat``).

    Built under ``<path>.part`` and renamed when complete; on any failure the
    ``.part`` is removed and ``path`` is left as it was (absent, in a spawn).
    """
    builders: dict[str, Callable[[Path, Mapping[str, bytes]], None]] = {
        "iso9660": _make_iso9660,
        "vfat": _make_vfat,
    }
    builder = builders.get(fmt)
    if builder is None:
        raise InvalidConfigDrive(
            f"config drive format {fmt!r} is unknown", hint=f"use one of: {', '.join(FORMATS)}"
        )
    # pycdlib (~5 ms to import) here, where a drive is made, not in every command.
    from pycdlib.pycdlibexception import PyCdlibException  # noqa: PLC0415

    files = metadata_files(data)
    path = Path(path)
    part = path.with_name(path.name + ".part")
    try:
        with removed_on_error(part):
            part.unlink(missing_ok=True)  # left by a crash: never reused
            builder(part, files)
            publish(part, path)
    except (OSError, PyCdlibException) as exc:
        raise ConfigDriveError(f"cannot build the config drive {path}: {exc}") from exc
    LOG.debug("config drive %s: %s, %d files, %d bytes", path, fmt, len(files), path.stat().st_size)


def _iso9660_name(name: str, *, directory: bool) -> str:
    """The plain ISO 9660 name (level 2: A-Z, 0-9 and _; files as NAME.EXT;1).

    Readers that know Rock Ridge or Joliet (Linux, Windows, cloud-init) see the real
    name; this one is for those that know neither.
    """

    def dchars(text: str) -> str:
        return re.sub(r"[^A-Z0-9_]", "_", text.upper())

    if directory:
        return dchars(name)
    stem, _, ext = name.rpartition(".") if "." in name else (name, "", "")
    return f"{dchars(stem)}.{dchars(ext)};1"


def _make_iso9660(target: Path, files: Mapping[str, bytes]) -> None:
    import pycdlib  # noqa: PLC0415 - see make_drive

    iso = pycdlib.PyCdlib()
    iso.new(
        interchange_level=2,
        vol_ident=VOLUME_LABEL,
        pub_ident_str=f"minidriver {__version__}",
        joliet=3,
        rock_ridge="1.09",
    )
    try:
        paths = [PurePosixPath(p) for p in files]
        directories = sorted(
            {parent for p in paths for parent in p.parents if parent.name},
            key=lambda d: (len(d.parts), d),
        )
        for directory in directories:
            iso.add_directory(
                "/" + "/".join(_iso9660_name(part, directory=True) for part in directory.parts),
                rr_name=directory.name,
                joliet_path=f"/{directory}",
            )
        for p in paths:
            content = files[str(p)]
            iso_dirs = [_iso9660_name(part, directory=True) for part in p.parent.parts]
            iso_path = "/" + "/".join([*iso_dirs, _iso9660_name(p.name, directory=False)])
            iso.add_fp(
                io.BytesIO(content), len(content), iso_path, rr_name=p.name, joliet_path=f"/{p}"
            )
        with create_private(target) as out:
            iso.write_fp(out)
    finally:
        iso.close()


def _sbin_tool(name: str) -> str:
    # sbin directories are often missing from a non-root PATH.
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=search) or name


def _make_vfat(target: Path, files: Mapping[str, bytes]) -> None:
    with tempfile.TemporaryDirectory(prefix="configdrive-") as tmp:
        tree = Path(tmp)
        for name, content in files.items():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes(content)
        size_kib = str(VFAT_SIZE // 1024)
        run(
            [_sbin_tool("mkfs.vfat"), "-C", "-n", VOLUME_LABEL, target, size_kib],
            timeout=60,
            umask=PRIVATE_UMASK,
        )
        # mtools checks nothing it needs here; an empty stdin answers any prompt.
        env = {"MTOOLS_SKIP_CHECK": "1"}
        tops = sorted(tree.iterdir())
        run(["mcopy", "-s", "-Q", "-i", target, *tops, "::/"], env=env, input=b"", timeout=60)
