"""VIF plugging on QEMU: the guest started paused until its VIF's host end is up
(Nova's network-vif-plugged), then resumed; no pause when no event is expected; a
timeout fatal (nothing left behind) or only logged, by ``vif_plugging_is_fatal``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest
from pytest_mock import MockerFixture

from minidriver import explain
from minidriver.driver import LibvirtDriver, SpawnError
from minidriver.ports import port_is_free
from minidriver.steps import Step
from minidriver.vif import VirtualInterfaceCreateException

pytestmark = pytest.mark.integration


def with_options(driver: LibvirtDriver, **options: Any) -> LibvirtDriver:
    conf = driver.conf
    conf = dataclasses.replace(conf, default=dataclasses.replace(conf.default, **options))
    return LibvirtDriver(conf, host=driver.host)


class Watch:
    """What libvirt and the host show when each step starts, for the building instance."""

    def __init__(self, drv: LibvirtDriver) -> None:
        self.drv = drv
        self.started: dict[str, tuple[int, bool | None]] = {}

    def __call__(self, step: Step, _seconds: float, finished: bool) -> None:
        if finished or step not in (Step.VIF_PLUGGED, Step.WAIT):
            return
        (record,) = [r for r in self.drv.db.list_instances() if r.vm_state == "building"]
        domain = self.drv.host.get_connection().lookupByName(record.name)
        port = record.forward_port
        self.started[step.value] = (
            domain.state()[0],
            None if port is None else not port_is_free(port),
        )


def test_the_guest_waits_paused_for_its_port_then_runs(
    driver: LibvirtDriver, test_image_id: str, wait_console: Callable[..., Any]
) -> None:
    watch = Watch(driver)
    inst = driver.spawn("vif-wait", test_image_id, "t1.nano", listener=watch)
    try:
        # Paused while waiting; by then QEMU already held the forwarded port.
        assert watch.started[Step.VIF_PLUGGED] == (libvirt.VIR_DOMAIN_PAUSED, True)
        assert watch.started[Step.WAIT][0] == libvirt.VIR_DOMAIN_RUNNING
        assert {"plug_vifs", "vif_plugged"} <= inst.timings.keys()
        assert driver.get_info(inst.uuid).state == "running"
        wait_console(
            Path(inst.instance_dir) / "console.log", r"^minidriver-guest: ready", timeout=300
        )
    finally:
        driver.destroy(inst.uuid)


@pytest.mark.parametrize(
    ("network", "options"),
    [("none", {}), ("user", {"vif_plugging_timeout": 0})],
)
def test_no_pause_when_no_event_is_expected(
    driver: LibvirtDriver, test_image_id: str, network: str, options: dict[str, Any]
) -> None:
    drv = with_options(driver, **options)
    watch = Watch(drv)
    inst = drv.spawn("vif-none", test_image_id, "t1.nano", network=network, listener=watch)
    try:
        assert Step.VIF_PLUGGED not in watch.started
        assert inst.timings["vif_plugged"] == 0
        assert drv.get_info(inst.uuid).state == "running"
    finally:
        drv.destroy(inst.uuid)


def test_a_fatal_timeout_fails_the_boot_and_leaves_nothing(
    driver: LibvirtDriver, test_image_id: str, mocker: MockerFixture
) -> None:
    drv = with_options(driver, vif_plugging_timeout=1, vif_plugging_is_fatal=True)
    # The fault: the VIF's host end is never seen (Neutron's event never comes).
    mocker.patch("minidriver.vif.is_plugged", return_value=False)
    before = {r.uuid for r in drv.db.list_instances()}

    with pytest.raises(SpawnError) as exc_info:
        drv.spawn("vif-fatal", test_image_id, "t1.nano")

    error = exc_info.value
    assert error.step == "vif_plugged"
    assert isinstance(error.cause, VirtualInterfaceCreateException)
    assert "network-vif-plugged" in str(error) and "within 1 s" in str(error)
    assert error.instance is not None
    assert drv.host.find_domain(error.instance.name) is None
    assert not Path(error.instance.instance_dir).exists()
    assert {r.uuid for r in drv.db.list_instances()} == before
    reserved = [r for r in drv.ports.list() if r.instance_uuid == error.instance.uuid]
    assert reserved == []


def test_a_timeout_not_fatal_is_logged_and_the_guest_runs(
    driver: LibvirtDriver,
    test_image_id: str,
    mocker: MockerFixture,
    caplog: pytest.LogCaptureFixture,
    wait_console: Callable[..., Any],
) -> None:
    drv = with_options(driver, vif_plugging_timeout=1, vif_plugging_is_fatal=False)
    mocker.patch("minidriver.vif.is_plugged", return_value=False)

    with caplog.at_level(logging.WARNING, logger="minidriver.vif"):
        inst = drv.spawn("vif-warn", test_image_id, "t1.nano")
    try:
        assert any("vif_plugging_is_fatal = false" in m for m in caplog.messages)
        assert inst.timings["vif_plugged"] >= 1
        assert drv.get_info(inst.uuid).state == "running"
        wait_console(
            Path(inst.instance_dir) / "console.log", r"^minidriver-guest: ready", timeout=300
        )
    finally:
        drv.destroy(inst.uuid)


def test_explain_says_the_start_pauses_for_the_vif(
    driver: LibvirtDriver, test_image_id: str
) -> None:
    plan = explain.explain(driver, test_image_id, "t1.nano")
    assert plan.launch[1:2] == ["start: paused"]
    assert "wait up to vif_plugging_timeout = 300 s for network-vif-plugged" in plan.launch[2]
    assert "(QEMU listening on 127.0.0.1:" in plan.launch[2]
    assert plan.launch[3] == "resume"
