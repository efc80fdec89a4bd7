"""stop, start, reboot and suspend of a rescued, resized or shelved instance: one
clear error naming how the operation ends, nothing changed (Nova's API allows them in
other vm_states only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tests_helpers_ops import domain_xml, run

from minidriver.config import Config, load_config
from minidriver.driver import LibvirtDriver

ENTER = {
    "rescued": (("rescue", "vm"), "unrescue"),
    "resized": (("resize", "vm", "--flavor", "t1.more"), "resize-confirm"),
    "shelved_offloaded": (("shelve", "vm"), "unshelve"),
}


@pytest.fixture
def conf(tmp_path: Path, node_file: Path) -> Config:
    path = tmp_path / "minidriver.conf"
    path.write_text(
        "[flavor:t1.more]\nvcpus = 2\nmemory_mb = 256\nroot_gb = 1\nephemeral_gb = 1\nswap = 64\n"
    )
    return load_config(path, state_dir=tmp_path / "state", environ={}).with_libvirt(
        connection_uri=f"test://{node_file}", virt_type="qemu"
    )


@pytest.fixture
def drv(conf: Config, make_driver: Callable[[Config], LibvirtDriver]) -> LibvirtDriver:
    return make_driver(conf)


@pytest.mark.parametrize("vm_state", list(ENTER))
def test_power_commands_wait_for_the_operation_to_end(
    drv: LibvirtDriver,
    conf: Config,
    empty_qcow2_id: str,
    capsys: pytest.CaptureFixture[str],
    vm_state: str,
) -> None:
    inst = drv.spawn("vm", empty_qcow2_id, "t1.nano")
    argv, way_out = ENTER[vm_state]
    code, done = run(drv, conf, capsys, *argv)
    assert code == 0, done
    assert drv.db.get_instance(inst.uuid).vm_state == vm_state
    domain = drv.host.get_domain(inst.uuid)
    before = (domain_xml(drv, inst.uuid), domain.state()) if domain else None

    for command in (("stop", "vm"), ("start", "vm"), ("reboot", "vm"), ("reboot", "vm", "--hard"),
                    ("suspend", "vm")):  # fmt: skip
        code, failed = run(drv, conf, capsys, *command)
        assert code == 1, (command, failed)
        assert f"is {vm_state}: it cannot be" in failed["error"], (command, failed)
        assert way_out in failed["hint"], (command, failed)
        assert drv.db.get_instance(inst.uuid).vm_state == vm_state
        domain = drv.host.get_domain(inst.uuid)
        assert ((domain_xml(drv, inst.uuid), domain.state()) if domain else None) == before
