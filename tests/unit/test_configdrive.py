"""The config drive: built for real, read back by tools nobody here wrote (xorriso,
mtools, blkid, fsck.vfat) and by cloud-init's own config drive reader."""

from __future__ import annotations

import base64
import errno
import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pycdlib
import pytest
from pycdlib.pycdlibexception import PyCdlibInvalidInput

from minidriver import configdrive
from minidriver.configdrive import (
    ConfigDriveData,
    ConfigDriveError,
    InvalidConfigDrive,
    hostname_from_display_name,
    make_drive,
    metadata_files,
)
from minidriver.exception import ProcessExecutionError
from minidriver.process import Completed, run

UUID = "6e3c1b52-8f9a-4d2e-9b7c-1f0a2d3e4c5b"
MAC = "52:54:00:12:34:56"

# Made with ssh-keygen -t TYPE -N '' for these tests.
ED25519 = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILKKPDnGB9/9X+u/oRESYminNYMMqLW8nv3vM1sRgBt2 test-ed25519"
)
RSA = (
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDUtjUa9HWQERnHVYJ2VVzfTinJ7y/G9yNudUXFKPX4zxz5RZMMq1dbW"
    "tYrSEHVnEkC0tcy6rbM/xuhf/kwGvqH7fqqNcRofPmVL8b6IruaiU7xzaadXrXbEniRKcqctsDoMtG38YLgfSYBJXZKQp"
    "yr7pGSU5XxUzxXqT+Pim377w== test-rsa"
)
ECDSA_256 = (
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBAsRYf35nXff2k8S4pPSl"
    "I0/cho+CTU4wPFUKGn+2lgp35yhmUvZ0ovxA1R86iOGyqQateuLtp6t6g/zWUTSb0I= test-ecdsa256"
)
ECDSA_384 = (
    "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBFb5gqc7Qz9YjeVXoL7Kq"
    "ALX4tWgdfoOHXabU2lc2K1U3pMzdyiAIwvSLzqhjH0cxDt+3jUPLasbtq0TPHwo/A0KiMLmFnftNMJvI9E+0twLFAKgU8"
    "6mLNCPXmh+MAKlOw== test-ecdsa384"
)
ECDSA_521 = (
    "ecdsa-sha2-nistp521 AAAAE2VjZHNhLXNoYTItbmlzdHA1MjEAAAAIbmlzdHA1MjEAAACFBAFM9N7hZgxiDb3jw6AhS"
    "YD6eOQ76tn9692006OVMdJI8WEi5nHIIplb5ZrNU5GfO+g8WNKM/QaKesUWL+Unmu1nqgBoRqQynmYRzWSnwqJEmVpSSX"
    "eLLRzvrwain6/tE7IiNVLgJ0FOJ0P1rsKFoLUxtg40PId+lXV9TbSNTnoJNSei+g== test-ecdsa521"
)
DSA = (
    "ssh-dss AAAAB3NzaC1kc3MAAACBALXu/AnMZCb2Ti8o2aqJLGp0GVcjDZTItDxLEIWvrTI5aQtGh1gnN0/MglkP3/rtF"
    "HhqPVNIvIMLkAOUHhJcSNXdxFhAtOe6ckU1VIUvSydlapKFa3MYesz5m7zqQaVycZgjdJfx1L/PEocILlVz0c49Y3AR+Ff"
    "VY7IUj7XQAf3jAAAAFQDuWS8f6zgPEagAcKRjRyPpMJVwJwAAAIEAg00sWRD0JWshNrBHtNzNaVsIoQVYKxp7dSzzbpaKQ"
    "rvjCNlel916Iu1jGHVEfeeLVVq6cwQ31FtAxic0tIB7n3YOWERjiSzViwIV4fzId15XeuFJQ8AChuqkIqgy/B7X9EB8BZb"
    "+r42JdYON/QwTzRV6xtzh2R3fcqjTnTRejBAAAACAdssiHQAgm79JFKE1jz89N+BPpKZni7cqIy/Wxc1c5E8PNKXcFoJV3"
    "t5RB1OAkOy5ZFL9XMPIYSnHI1hQ2O9Kgi/1nXoCqz8cWzWyWtVMWm90mg+assH1eirFKUZQZxOgPaxrMFRkPOiJe93kbAr"
    "HpMH16gWkM7jtZg5UjoIkH2Y= test-dsa"
)


def _ssh_string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


# A security key (FIDO) has no ssh-keygen without the hardware: its blob, built by hand
# from the ed25519 key's point and the usual application string.
_ED25519_POINT = base64.b64decode(ED25519.split()[1])[-32:]
SK_ED25519 = (
    "sk-ssh-ed25519@openssh.com "
    + base64.b64encode(
        _ssh_string(b"sk-ssh-ed25519@openssh.com")
        + _ssh_string(_ED25519_POINT)
        + _ssh_string(b"ssh:")
    ).decode()
)

NETWORK_DATA: dict[str, Any] = {
    "links": [
        {
            "id": "tap6e3c1b52-8f",
            "vif_id": "6e3c1b52-8f9a-4d2e-9b7c-000000000001",
            "type": "ovs",
            "mtu": 1450,
            "ethernet_mac_address": MAC,
        }
    ],
    "networks": [
        {
            "id": "network0",
            "type": "ipv4_dhcp",
            "link": "tap6e3c1b52-8f",
            "network_id": "6e3c1b52-8f9a-4d2e-9b7c-000000000002",
        }
    ],
    "services": [{"type": "dns", "address": "10.0.2.3"}],
}
# gzip, as cloud-init accepts it: user data is bytes, not text, and must arrive exact.
USER_DATA = gzip.compress(b"#cloud-config\nruncmd:\n  - [touch, /run/config-drive-seen]\n", mtime=0)


def _data(**overrides: Any) -> ConfigDriveData:
    fields: dict[str, Any] = {
        "uuid": UUID,
        "name": "Web server 1",
        "hostname": "web-server-1",
        "launch_index": 0,
        "availability_zone": "nova",
        "public_keys": {"lab": ED25519, "backup key": RSA},
        "meta": {"role": "web", "owner": "lab team"},
        "user_data": USER_DATA,
        "network_data": NETWORK_DATA,
        "vendor_data": {"cloud-init": "#cloud-config\n{}\n"},
    }
    fields.update(overrides)
    return ConfigDriveData(**fields)


def _tool(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI (scripts/setup-host installs it)")
        pytest.skip(f"{name} not installed")
    return found


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _extract_iso(image: Path, dest: Path, read_fs: str = "any") -> dict[str, bytes]:
    # read_fs: any (Rock Ridge first), norock (the Joliet tree), ecma119 (plain names).
    xorriso = _tool("xorriso")
    run([xorriso, "-read_fs", read_fs, "-indev", image, "-osirrox", "on", "-extract", "/", dest])
    run(["chmod", "-R", "u+w", dest])  # Rock Ridge modes are read-only
    return _tree(dest)


def _extract_vfat(image: Path, dest: Path) -> dict[str, bytes]:
    dest.mkdir(parents=True)
    env = {"MTOOLS_SKIP_CHECK": "1"}
    run([_tool("mcopy"), "-s", "-n", "-i", image, "::/openstack", dest], env=env, input=b"")
    return _tree(dest)


def _extract(fmt: str, image: Path, dest: Path) -> dict[str, bytes]:
    return _extract_iso(image, dest) if fmt == "iso9660" else _extract_vfat(image, dest)


def _blkid(image: Path) -> dict[str, str]:
    out = run([_tool("blkid"), "-p", "-o", "export", image]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_layout_follows_novas_versions() -> None:
    data = _data()
    files = metadata_files(data)
    versions = sorted({name.split("/")[1] for name in files})
    assert versions == sorted(configdrive.OPENSTACK_VERSIONS)
    # The oldest version has what Nova gave it then; the newest ones have everything.
    assert sorted(n for n in files if "/2012-08-10/" in n) == [
        "openstack/2012-08-10/meta_data.json",
        "openstack/2012-08-10/user_data",
    ]
    for version in ("2018-08-27", "latest"):
        assert sorted(n.rsplit("/", 1)[1] for n in files if f"/{version}/" in n) == [
            "meta_data.json",
            "network_data.json",
            "user_data",
            "vendor_data.json",
            "vendor_data2.json",
        ]
    assert files["openstack/latest/user_data"] == USER_DATA
    assert json.loads(files["openstack/latest/network_data.json"]) == NETWORK_DATA
    assert json.loads(files["openstack/latest/vendor_data2.json"]) == {}
    md = json.loads(files["openstack/latest/meta_data.json"])
    assert md == {
        "uuid": UUID,
        "meta": {"role": "web", "owner": "lab team"},
        "files": [],
        "public_keys": {"lab": ED25519, "backup key": RSA},
        "keys": [
            {"name": "lab", "type": "ssh", "data": ED25519},
            {"name": "backup key", "type": "ssh", "data": RSA},
        ],
        "hostname": "web-server-1",
        "name": "Web server 1",
        "launch_index": 0,
        "availability_zone": "nova",
        "random_seed": base64.b64encode(data.random_seed).decode(),
        "devices": [],
        "dedicated_cpus": [],
    }
    assert files["openstack/2020-10-14/meta_data.json"] == files["openstack/latest/meta_data.json"]
    assert "random_seed" not in json.loads(files["openstack/2012-08-10/meta_data.json"])
    # No user data, no user_data file (cloud-init then reads none).
    assert not any(n.endswith("/user_data") for n in metadata_files(_data(user_data=None)))


def test_iso9660_read_back_by_xorriso_and_blkid(tmp_path: Path) -> None:
    data = _data()
    expected = metadata_files(data)
    drive = tmp_path / "disk.config"
    make_drive(drive, data, "iso9660")
    assert sorted(os.listdir(tmp_path)) == ["disk.config"]

    info = run([_tool("xorriso"), "-indev", drive, "-pvd_info"]).stdout
    assert "Volume Id    : config-2\n" in info
    assert _blkid(drive)["LABEL"] == "config-2"
    assert _blkid(drive)["TYPE"] == "iso9660"
    # The Rock Ridge tree and the Joliet tree both carry the real names and content.
    assert _extract_iso(drive, tmp_path / "rr") == expected
    assert _extract_iso(drive, tmp_path / "joliet", "norock") == expected
    # The plain ISO 9660 names: interchange level 2, for readers with neither.
    plain = _extract_iso(drive, tmp_path / "plain", "ecma119")
    assert len(plain) == len(expected)
    assert (
        plain["OPENSTACK/2012_08_10/META_DATA.JSON"]
        == expected["openstack/2012-08-10/meta_data.json"]
    )
    assert plain["OPENSTACK/LATEST/USER_DATA"] == USER_DATA


def test_vfat_read_back_by_mtools_blkid_and_fsck(tmp_path: Path) -> None:
    data = _data()
    drive = tmp_path / "disk.config"
    make_drive(drive, data, "vfat")
    assert sorted(os.listdir(tmp_path)) == ["disk.config"]
    assert drive.stat().st_size == 64 * 1024**2  # Nova's size

    env = {"MTOOLS_SKIP_CHECK": "1"}
    label = run([_tool("mlabel"), "-i", drive, "-s", "::"], env=env).stdout
    assert label.strip() == "Volume label is config-2"
    assert _blkid(drive)["LABEL"] == "config-2"
    assert _blkid(drive)["TYPE"] == "vfat"
    run([_tool("fsck.vfat"), "-n", drive])
    assert _extract_vfat(drive, tmp_path / "out") == metadata_files(data)


CLOUD_INIT_PROBE = """
import base64, copy, json, sys
from cloudinit.sources import normalize_pubkey_data
from cloudinit.sources.helpers import openstack

result = openstack.ConfigDriveReader(sys.argv[1]).read_v2()
md = result["metadata"]
keys = ["instance-id", "local-hostname", "uuid", "hostname", "name", "launch_index",
        "availability_zone", "public_keys", "meta"]
print(json.dumps({
    "metadata": {k: md[k] for k in keys},
    "ssh_keys": normalize_pubkey_data(md["public_keys"]),
    "random_seed": base64.b64encode(md["random_seed"]).decode(),
    "userdata": base64.b64encode(result["userdata"]).decode(),
    "networkdata": copy.deepcopy(result["networkdata"]),  # converting changes it
    "network_config": openstack.convert_net_json(
        result["networkdata"], known_macs={sys.argv[2]: "eth0"}),
    "vendordata": result["vendordata"],
    "vendordata2": result["vendordata2"],
    "files": result["files"],
}, indent=2))
"""

SYSTEM_PYTHON = "/usr/bin/python3"


def _cloud_init_python() -> str:
    # Debian's cloud-init imports only under the system Python.
    try:
        probe = subprocess.run(
            [SYSTEM_PYTHON, "-c", "import cloudinit.sources.helpers.openstack"],
            capture_output=True,
            check=False,
        )
        importable = probe.returncode == 0
    except FileNotFoundError:
        importable = False
    if not importable:
        if os.environ.get("CI"):
            pytest.fail("cloud-init is missing in CI (apt-get install cloud-init)")
        pytest.skip(f"{SYSTEM_PYTHON} cannot import cloudinit (apt-get install cloud-init)")
    return SYSTEM_PYTHON


@pytest.mark.parametrize("fmt", ["iso9660", "vfat"])
def test_cloud_init_reads_the_drive(tmp_path: Path, fmt: str) -> None:
    python = _cloud_init_python()
    data = _data()
    drive = tmp_path / "disk.config"
    make_drive(drive, data, fmt)
    mnt = tmp_path / "mnt"
    _extract(fmt, drive, mnt)

    out = run([python, "-c", CLOUD_INIT_PROBE, mnt, MAC]).stdout
    seen = json.loads(out)
    assert seen["metadata"] == {
        "instance-id": UUID,
        "local-hostname": "web-server-1",
        "uuid": UUID,
        "hostname": "web-server-1",
        "name": "Web server 1",
        "launch_index": 0,
        "availability_zone": "nova",
        "public_keys": {"lab": ED25519, "backup key": RSA},
        "meta": {"role": "web", "owner": "lab team"},
    }
    assert seen["ssh_keys"] == [ED25519, RSA]
    assert base64.b64decode(seen["random_seed"]) == data.random_seed
    assert base64.b64decode(seen["userdata"]) == USER_DATA
    assert seen["networkdata"] == NETWORK_DATA
    assert seen["network_config"] == {
        "version": 1,
        "config": [
            {
                "type": "physical",
                "name": "eth0",
                "mac_address": MAC,
                "mtu": 1450,
                "subnets": [{"type": "dhcp4"}],
            },
            {"type": "nameserver", "address": "10.0.2.3"},
        ],
    }
    assert seen["vendordata"] == {"cloud-init": "#cloud-config\n{}\n"}
    assert seen["vendordata2"] == {}
    assert seen["files"] == {}


@pytest.mark.parametrize(
    "key", [ED25519, RSA, ECDSA_256, ECDSA_384, ECDSA_521, DSA, SK_ED25519, ED25519 + "\n"]
)
def test_every_ssh_key_type_is_accepted(key: str) -> None:
    data = _data(public_keys={"k": key})
    assert data.public_keys["k"] == key.strip()  # a .pub file's newline goes


_ED25519_TYPE, _ED25519_BODY, _ = ED25519.split()
BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"user_data": b"x" * (configdrive.MAX_USERDATA_BYTES + 1)}, r"user data is 49150 bytes"),
    ({"public_keys": {"k": "ssh-ed25519"}}, r"nothing follows 'ssh-ed25519'"),
    ({"public_keys": {"k": ""}}, r"it is empty"),
    ({"public_keys": {"k": "ssh-foo AAAAC3Nz"}}, r"'ssh-foo' is not a key type"),
    ({"public_keys": {"k": "ssh-ed25519 not*base64"}}, r"its body is not base64"),
    ({"public_keys": {"k": f"ssh-rsa {_ED25519_BODY}"}}, r"its body is not a ssh-rsa key"),
    ({"public_keys": {"k": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"}}, r"not a ssh-ed25519 key"),
    ({"public_keys": {"k": f"{ED25519}\n{RSA}"}}, r"more than one line"),
    ({"public_keys": {"k": f'command="sh" {ED25519}'}}, r"not a key type"),
    ({"public_keys": {"k": "-----BEGIN OPENSSH PRIVATE KEY-----"}}, r"it is a private key"),
    ({"public_keys": {"a/b": ED25519}}, r"key name 'a/b'"),
    ({"meta": {"k" * 256: "v"}}, r"metadata key 'k{40}\.\.\.' must be 1 to 255"),
    ({"meta": {"": "v"}}, r"metadata key '' must be"),
    ({"meta": {"a/b": "v"}}, r"metadata key 'a/b'"),
    ({"meta": {"k": "v" * 256}}, r"metadata 'k': the value has 256 characters"),
    ({"meta": {"k": 1}}, r"the value must be text"),
    ({"meta": {f"k{i}": "v" for i in range(129)}}, r"129 metadata items.*128"),
    ({"hostname": ""}, r"hostname '' is not a valid DNS label"),
    ({"hostname": "-web"}, r"hostname '-web' is not a valid DNS label"),
    ({"hostname": "web-"}, r"is not a valid DNS label"),
    ({"hostname": "Web"}, r"is not a valid DNS label"),
    ({"hostname": "web_1"}, r"is not a valid DNS label"),
    ({"hostname": "web.example.com"}, r"is not a valid DNS label"),
    ({"hostname": "a" * 64}, r"is not a valid DNS label"),
    ({"uuid": "not-a-uuid"}, r"instance uuid 'not-a-uuid' is not a UUID"),
    ({"uuid": UUID.upper()}, r"is not a UUID in its canonical form"),
    ({"launch_index": -1}, r"launch_index must not be negative"),
    ({"availability_zone": ""}, r"availability zone '' must be 1 to 255"),
    ({"network_data": {"x": {1, 2}}}, r"network_data cannot be written as JSON"),
    ({"vendor_data": ["not", "an", "object"]}, r"vendor_data must be a JSON object"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_refused_before_anything_is_written(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidConfigDrive, match=message) as err:
        make_drive(tmp_path / "disk.config", _data(**overrides))
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_user_data_at_novas_limit_is_accepted() -> None:
    # 65535 base64 characters: Nova's MAX_USERDATA_SIZE, as its API counts it.
    data = _data(user_data=b"x" * 49149)
    assert len(base64.b64encode(data.user_data or b"")) <= 65535


def test_bad_hostname_suggests_a_sanitized_one() -> None:
    with pytest.raises(InvalidConfigDrive) as err:
        _data(hostname="Web_Server 1")
    assert err.value.hint == "e.g. 'web-server-1'"


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigDrive, match="config drive format 'udf' is unknown"):
        make_drive(tmp_path / "disk.config", _data(), "udf")
    assert list(tmp_path.iterdir()) == []


def test_checked_data_cannot_change_afterwards() -> None:
    meta = {"role": "web"}
    network: dict[str, Any] = {"links": [], "networks": [], "services": []}
    data = _data(meta=meta, network_data=network)
    meta["role"] = "x" * 300
    network["links"].append({"id": "late"})
    assert data.meta == {"role": "web"}
    assert data.network_data["links"] == []


def test_mcopy_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drive = tmp_path / "disk.config"
    part = tmp_path / "disk.config.part"

    def failing_mcopy(args: list[Any], **kwargs: Any) -> Completed:
        if os.path.basename(str(args[0])) == "mcopy":
            assert part.exists()  # mkfs.vfat made it: the cleanup must remove it
            raise ProcessExecutionError("mcopy failed: Disk full", cmd=[str(a) for a in args])
        return run(args, **kwargs)

    monkeypatch.setattr(configdrive, "run", failing_mcopy)
    with pytest.raises(ProcessExecutionError, match="Disk full"):
        make_drive(drive, _data(), "vfat")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "fault",
    [PyCdlibInvalidInput("injected"), OSError(errno.ENOSPC, "No space left on device")],
    ids=["pycdlib", "disk-full"],
)
def test_iso_write_failure_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: Exception
) -> None:
    drive = tmp_path / "disk.config"

    def half_write(self: pycdlib.PyCdlib, outfp: Any, *args: Any, **kwargs: Any) -> None:
        outfp.write(b"\0" * 4096)
        outfp.flush()
        assert (tmp_path / "disk.config.part").stat().st_size == 4096
        raise fault

    monkeypatch.setattr(pycdlib.PyCdlib, "write_fp", half_write)
    with pytest.raises(ConfigDriveError, match=r"cannot build the config drive .*disk\.config"):
        make_drive(drive, _data(), "iso9660")
    assert list(tmp_path.iterdir()) == []


def test_stale_part_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "disk.config.part").write_bytes(b"left by a crash")
    make_drive(tmp_path / "disk.config", _data(), "vfat")
    assert sorted(os.listdir(tmp_path)) == ["disk.config"]


HOSTNAMES = [
    ("web server 1", "web-server-1"),
    ("My_Server.example.com", "my-server-example-com"),
    ("UPPER", "upper"),
    ("--Leading and trailing--", "leading-and-trailing"),
    ("..dots..", "dots"),
    ("a  b", "a--b"),  # Nova keeps runs of '-'
    ("hello!@#$%^&*()world", "helloworld"),
    ("café crème", "cafe-creme"),  # Nova keeps the accents, which no DNS name takes
    ("日本語", "server"),
    ("", "server"),
    ("!!!", "server"),
    ("a" * 70, "a" * 63),
    ("x" * 62 + " y", "x" * 62),  # the cut leaves no '-' at the end
]


@pytest.mark.parametrize(("display_name", "hostname"), HOSTNAMES)
def test_hostname_from_display_name(display_name: str, hostname: str) -> None:
    assert hostname_from_display_name(display_name) == hostname
    configdrive.validate_hostname(hostname)


def test_hostname_default_is_sanitized_too() -> None:
    assert hostname_from_display_name("日本語", default=f"Server-{UUID}") == f"server-{UUID}"
    with pytest.raises(InvalidConfigDrive):
        hostname_from_display_name("!!!", default="***")
