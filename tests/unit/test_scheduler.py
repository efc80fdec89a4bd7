"""Placement on several hosts (minidriver.scheduler, the command line's hosts): the
filters (reachable, the image's virt type, enough free memory), the RAM weigher and
its ties; then ``host list``, ``boot`` and ``list`` against a test-driver host beside
one that does not answer (a socket nobody listens on), as a user sees them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_DRIVER_NODE

from minidriver import scheduler
from minidriver.cli import main
from minidriver.config import load_config
from minidriver.host import Host
from minidriver.objects import Flavor
from minidriver.scheduler import HostState, NoValidHost

NANO = Flavor("t1.nano", 1, 128, 1, 0, 0)


def state(name: str, order: int, *, free: int = 4096, instances: int = 0, **kw: Any) -> HostState:
    values: dict[str, Any] = {
        "name": name,
        "uri": f"test:///{name}",
        "order": order,
        "reachable": True,
        "error": "",
        "host_uuid": f"uuid-{name}",
        "virt_types": frozenset({"qemu"}),
        "memory_mb": 8192,
        "free_ram_mb": free,
        "node_free_mb": free,
        "instances": instances,
        "running": instances,
    }
    values.update(kw)
    return HostState(**values)


def test_most_free_ram_wins() -> None:
    states = [state("a", 0, free=1024), state("b", 1, free=4096), state("c", 2, free=2048)]
    assert scheduler.select_destination(states, NANO, "").name == "b"


def test_ties_go_to_fewest_instances_then_configuration_order() -> None:
    states = [state("a", 0, instances=2), state("b", 1, instances=1), state("c", 2, instances=1)]
    assert scheduler.select_destination(states, NANO, "").name == "b"
    assert [s.name for s in scheduler.weighed(states)] == ["b", "c", "a"]


@pytest.mark.parametrize(
    ("refused", "virt_type", "why"),
    [
        (state("a", 0, reachable=False, error="no socket"), "", "unreachable: no socket"),
        (state("a", 0), "kvm", "the image asks for virt type kvm; the host offers qemu"),
        (state("a", 0, free=100), "", "t1.nano needs 128 MiB; 100 MiB free"),
    ],
)
def test_filters_refuse_with_the_reason(refused: HostState, virt_type: str, why: str) -> None:
    ok = state("b", 1, free=200, virt_types=frozenset({"qemu", "kvm"}))
    assert scheduler.select_destination([refused, ok], NANO, virt_type).name == "b"
    with pytest.raises(NoValidHost) as err:
        scheduler.select_destination([refused], NANO, virt_type)
    assert f"a: {why}" in str(err.value)


def test_image_virt_type_property() -> None:
    assert scheduler.image_virt_type({"img_hv_type": "kvm"}) == "kvm"
    assert scheduler.image_virt_type({"hypervisor_type": "qemu"}) == "qemu"
    assert scheduler.image_virt_type({}) == ""


# -- the command line, with a host that does not answer --------------------------------


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Host, Path, Path]:
    monkeypatch.delenv("MINIDRIVER_CONFIG", raising=False)
    monkeypatch.delenv("MINIDRIVER_STATE_DIR", raising=False)
    node = tmp_path / "testdriver.xml"
    node.write_text(TEST_DRIVER_NODE)
    conf_file = tmp_path / "minidriver.conf"
    conf_file.write_text(
        "[DEFAULT]\nhost = here\n"
        f"[libvirt]\nconnection_uri = test://{node}\nvirt_type = qemu\n"
        f"[host:gone]\nconnection_uri = qemu+unix:///system?socket={tmp_path}/no-daemon\n"
    )
    state_dir = tmp_path / "state"
    conf = load_config(conf_file, state_dir=state_dir, environ={})
    return Host(conf), conf_file, state_dir


def run(setup: tuple[Host, Path, Path], capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    host, conf_file, state_dir = setup
    capsys.readouterr()
    argv = ("--config", str(conf_file), "--state-dir", str(state_dir), "--json", *argv)
    try:
        code = main(list(argv), host=host)
    except SystemExit as exc:  # a clear error: one JSON document on stdout
        code = int(exc.code or 0)
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_host_list_boot_and_list_name_the_hosts(
    setup: tuple[Host, Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, hosts = run(setup, capsys, "host", "list")
    assert code == 0
    assert [(h["name"], h["reachable"]) for h in hosts] == [("here", True), ("gone", False)]
    here, gone = hosts
    # The test driver reports no host UUID (a daemon does: tests/integration).
    assert here["free_ram_mb"] > 0 and here["instances"] == 0 and here["running"] == 0
    assert "no-daemon" in gone["error"]
    assert (gone["free_ram_mb"], gone["instances"]) == (0, 0)

    image = tmp_path / "image.raw"
    image.write_bytes(b"\0" * 1024 * 1024)
    code, _ = run(
        setup, capsys, "image", "add", str(image), "--name", "img", "--disk-format", "raw"
    )
    assert code == 0
    # The scheduler leaves out the host that does not answer.
    code, booted = run(
        setup, capsys, "boot", "--image", "img", "--flavor", "t1.nano", "--name", "vm1", "--no-wait"
    )
    assert code == 0, booted
    assert booted["host"] == "here"
    code, shown = run(setup, capsys, "show", "vm1")
    assert shown["host"] == "here"

    # Named, it is refused with the reason; an unknown host is named as such.
    code, err = run(
        setup, capsys, "boot", "--image", "img", "--flavor", "t1.nano", "--host", "gone"
    )
    assert code == 1 and err["error"].startswith("host gone cannot run t1.nano: unreachable")
    code, err = run(
        setup, capsys, "boot", "--image", "img", "--flavor", "t1.nano", "--host", "nope"
    )
    assert code == 1 and "no host 'nope'" in err["error"]

    code, listed = run(setup, capsys, "list")
    assert [(i["display_name"], i["host"]) for i in listed] == [("vm1", "here")]
    code, hosts = run(setup, capsys, "host", "list")
    assert hosts[0]["instances"] == 1
    assert hosts[0]["free_ram_mb"] == here["free_ram_mb"] - 128
