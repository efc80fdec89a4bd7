"""The NIC's request, MAC and network_data.json, read back by cloud-init itself."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from test_configdrive import _cloud_init_python, _extract

from minidriver.config import LibvirtOptions
from minidriver.configdrive import ConfigDriveData, make_drive
from minidriver.network import (
    VIF,
    NetworkMode,
    NetworkRequest,
    NetworkRequestError,
    generate_mac_address,
    get_network_metadata,
)

OPTIONS = LibvirtOptions(network_name="default", bridge="br-lab")
UUID = "6e3c1b52-8f9a-4d2e-9b7c-1f0a2d3e4c5b"


@pytest.mark.parametrize(
    ("spec", "options", "expected"),
    [
        (None, OPTIONS, NetworkRequest(NetworkMode.USER)),
        (None, LibvirtOptions(network_mode="none"), NetworkRequest(NetworkMode.NONE)),
        ("user", OPTIONS, NetworkRequest(NetworkMode.USER)),
        ("none", OPTIONS, NetworkRequest(NetworkMode.NONE)),
        ("network", OPTIONS, NetworkRequest(NetworkMode.NETWORK, "default")),
        ("network:lab", OPTIONS, NetworkRequest(NetworkMode.NETWORK, "lab")),
        ("bridge", OPTIONS, NetworkRequest(NetworkMode.BRIDGE, "br-lab")),
        ("bridge:br0", OPTIONS, NetworkRequest(NetworkMode.BRIDGE, "br0")),
        (
            None,
            LibvirtOptions(network_mode="bridge", bridge="br1"),
            NetworkRequest(NetworkMode.BRIDGE, "br1"),
        ),
    ],
)
def test_network_requests(
    spec: str | None, options: LibvirtOptions, expected: NetworkRequest
) -> None:
    assert NetworkRequest.parse(spec, options) == expected


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("slirp", OPTIONS, "network mode 'slirp' is unknown"),
        ("user:x", OPTIONS, "network mode user takes no name"),
        ("none:x", OPTIONS, "network mode none takes no name"),
        ("bridge", LibvirtOptions(), "network mode bridge needs the name of a bridge"),
        ("bridge:", OPTIONS, "network mode bridge needs the name of a bridge"),
        ("network", LibvirtOptions(network_name=""), "needs the name of a network"),
    ],
)
def test_bad_network_requests(spec: str, options: LibvirtOptions, message: str) -> None:
    with pytest.raises(NetworkRequestError, match=re.escape(message)) as caught:
        NetworkRequest.parse(spec, options)
    assert caught.value.hint


def test_macs_have_novas_prefix_and_avoid_taken_ones() -> None:
    macs = {generate_mac_address() for _ in range(200)}
    assert all(re.fullmatch(r"fa:16:3e(:[0-9a-f]{2}){3}", m) for m in macs)
    assert len(macs) > 190  # 24 random bits: a repeat among 200 is rare
    # With all but one of a small space taken, the free one is found.
    taken = set(macs)
    fresh = generate_mac_address(taken)
    assert fresh not in taken


def test_network_data_of_the_user_network() -> None:
    vif = VIF(NetworkMode.USER, "fa:16:3e:01:02:03", forward_port=10022)
    data = get_network_metadata(vif)
    (link,) = data["links"]
    assert link["ethernet_mac_address"] == "fa:16:3e:01:02:03"
    assert link["id"].startswith("tap") and link["vif_id"] == vif.vif_id
    assert data["networks"] == [
        {
            "id": "network0",
            "type": "ipv4_dhcp",
            "link": link["id"],
            "network_id": data["networks"][0]["network_id"],
        }
    ]
    assert data["services"] == [{"type": "dns", "address": "10.0.2.3"}]
    assert get_network_metadata(vif) == data  # the same each time: ids are derived


def test_no_nic_no_network_data() -> None:
    empty: dict[str, list[object]] = {"links": [], "networks": [], "services": []}
    assert get_network_metadata(None) == empty
    assert get_network_metadata(VIF(NetworkMode.NONE, "fa:16:3e:00:00:01")) == empty


CONVERT = """
import json, sys
from cloudinit.sources.helpers import openstack
result = openstack.ConfigDriveReader(sys.argv[1]).read_v2()
config = openstack.convert_net_json(result["networkdata"], known_macs={sys.argv[2]: "ens16"})
print(json.dumps(config))
"""


@pytest.mark.parametrize(
    ("vif", "nameservers"),
    [
        (VIF(NetworkMode.USER, "fa:16:3e:aa:bb:cc", forward_port=10022), ["10.0.2.3"]),
        (VIF(NetworkMode.BRIDGE, "fa:16:3e:aa:bb:cd", "br0"), []),
        (VIF(NetworkMode.NETWORK, "fa:16:3e:aa:bb:ce", "default"), []),
    ],
)
def test_cloud_init_configures_the_nic_by_dhcp(
    tmp_path: Path, vif: VIF, nameservers: list[str]
) -> None:
    """cloud-init reads the drive's network_data.json into its own network config: one
    physical NIC found by our MAC, configured by DHCP."""
    python = _cloud_init_python()
    data = ConfigDriveData(
        uuid=UUID, name="vm", hostname="vm", network_data=get_network_metadata(vif)
    )
    drive = tmp_path / "disk.config"
    make_drive(drive, data)
    _extract("iso9660", drive, tmp_path / "mnt")
    out = subprocess.run(
        [python, "-c", CONVERT, tmp_path / "mnt", vif.mac_address],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    config = json.loads(out)["config"]
    (nic,) = [c for c in config if c["type"] == "physical"]
    assert nic["mac_address"] == vif.mac_address
    assert nic["name"] == "ens16"
    assert nic["subnets"] == [{"type": "dhcp4"}]
    assert [c["address"] for c in config if c["type"] == "nameserver"] == nameservers
