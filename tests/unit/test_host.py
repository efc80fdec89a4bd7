from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest

from minidriver import host
from minidriver.config import load_config
from minidriver.exception import HostError


def sysfs(tmp_path: Path, *modules: str) -> Path:
    root = tmp_path / "sys" / "module"
    for m in modules:
        (root / m).mkdir(parents=True)
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def dev_kvm(tmp_path: Path) -> Path:
    path = tmp_path / "kvm"
    path.write_text("")
    return path


@pytest.mark.parametrize(
    ("modules", "expected", "reason"),
    [
        (("kvm", "kvm_intel"), "kvm", "kvm_intel loaded"),
        (("kvm", "kvm_amd"), "kvm", "kvm_amd loaded"),
        (("kvm", "kvm_pvm"), "qemu", "kvm_pvm"),
        (("kvm",), "qemu", "neither kvm_intel nor kvm_amd"),
    ],
)
def test_auto_virt_type_needs_real_kvm(
    tmp_path: Path, dev_kvm: Path, modules: tuple[str, ...], expected: str, reason: str
) -> None:
    choice = host.detect_virt_type("auto", dev_kvm=dev_kvm, sys_module=sysfs(tmp_path, *modules))
    assert choice.virt_type == expected
    assert reason in choice.reason


def test_auto_without_dev_kvm_is_tcg(tmp_path: Path) -> None:
    choice = host.detect_virt_type(
        "auto", dev_kvm=tmp_path / "absent", sys_module=sysfs(tmp_path, "kvm_intel")
    )
    assert choice == host.VirtTypeChoice("qemu", f"{tmp_path / 'absent'} is missing: using TCG")


def test_configured_virt_type_wins(tmp_path: Path) -> None:
    choice = host.detect_virt_type("kvm", dev_kvm=tmp_path / "absent", sys_module=sysfs(tmp_path))
    assert choice.virt_type == "kvm"
    assert "in the config" in choice.reason


@pytest.mark.kvm_pvm  # deselected on other hosts (tests/skip_policy.py)
def test_this_machine_chooses_tcg_when_kvm_is_pvm() -> None:
    assert host.detect_virt_type("auto").virt_type == "qemu"


def test_untraversable_parents_names_the_blocking_directory(tmp_path: Path) -> None:
    top = tmp_path / "top"
    private = top / "private"
    (private / "instances").mkdir(parents=True)
    top.chmod(0o755)
    private.chmod(0o700)
    tmp_path.chmod(0o755)
    blocked = host.untraversable_parents(private / "instances", "nobody")
    assert private in blocked
    private.chmod(0o711)
    assert private not in host.untraversable_parents(private / "instances", "nobody")
    assert host.untraversable_parents(private, "root") == []


def test_qemu_user_of_daemon_reads_qemu_conf(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('#user = "root"\n user = "qemu-runner"\n')
    assert host.qemu_user_of_daemon(conf) == "qemu-runner"
    conf.write_text('#user = "root"\n')
    assert host.qemu_user_of_daemon(conf) == "libvirt-qemu"


def test_embedded_root_held_by_another_live_process_is_named(tmp_path: Path) -> None:
    piddir = tmp_path / "run" / "qemu"
    piddir.mkdir(parents=True)
    assert host.embedded_root_holder(tmp_path) is None
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (piddir / "driver.pid").write_text(f"{sleeper.pid}\n")
        assert host.embedded_root_holder(tmp_path) == sleeper.pid
        conf = load_config(None, state_dir=tmp_path, environ={}).with_libvirt(
            connection_uri=f"qemu:///embed?root={tmp_path}"
        )
        with pytest.raises(HostError, match=rf"in use by process {sleeper.pid}") as err:
            host.Host(conf).get_connection()
        assert err.value.hint is not None
        assert "libvirtd" in err.value.hint
    finally:
        sleeper.kill()
        sleeper.wait()
    assert host.embedded_root_holder(tmp_path) is None  # a dead holder does not count
    (piddir / "driver.pid").write_text(f"{os.getpid()}\n")
    assert host.embedded_root_holder(tmp_path) is None  # nor do we


def test_unreachable_uri_is_a_host_error(tmp_path: Path) -> None:
    conf = load_config(None, state_dir=tmp_path, environ={}).with_libvirt(
        connection_uri="qemu+unix:///system?socket=/nonexistent/sock"
    )
    with pytest.raises(HostError, match="cannot connect to libvirt") as err:
        host.Host(conf).get_connection()
    assert err.value.hint is not None


def test_undefine_survives_a_domain_that_stops_between_check_and_destroy(
    test_driver: libvirt.virConnect,
) -> None:
    xml = (
        "<domain type='test'><name>racer</name><memory>65536</memory>"
        "<os><type>hvm</type></os></domain>"
    )
    domain = test_driver.defineXML(xml)  # defined, never started

    class StoppedMeanwhile:
        """isActive still said yes; by destroy, the domain had stopped (the race)."""

        def isActive(self) -> bool:
            return True

        def __getattr__(self, name: str) -> object:
            return getattr(domain, name)

    host.Host.undefine(StoppedMeanwhile())
    assert test_driver.listAllDomains() == []
