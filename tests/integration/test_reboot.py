"""Hard reboot, start, soft reboot and power state with the real test guest: what the
command line says and what the guest's console shows.

The commands run in this process (``main`` with the session's host injected: on the
embedded driver one process holds the root), on the session's state dir.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from minidriver.cli import main
from minidriver.driver import LibvirtDriver, base_filename
from minidriver.guestimages import testimage
from minidriver.objects import Instance

pytestmark = pytest.mark.integration

BOOT_THEN_READY = r"^minidriver-guest: boot-count {n}\r?\n(?:.*\n)*?minidriver-guest: ready\r?$"


def command(
    driver: LibvirtDriver,
    capsys: pytest.CaptureFixture[str],
    *argv: str,
    config: Path | None = None,
) -> Any:
    """``minidriver --json ARGV`` on the session's state dir; its JSON document."""
    capsys.readouterr()
    extra = ["--config", str(config)] if config else []
    code = main(
        ["--state-dir", str(driver.conf.state_path), *extra, "--json", *argv], host=driver.host
    )
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def ready(
    driver: LibvirtDriver,
    image_id: str,
    name: str,
    wait_console: Callable[..., Any],
    meta: dict[str, str] | None = None,
) -> Instance:
    inst = driver.spawn(name=name, image=image_id, flavor="t1.nano", config_drive=True, meta=meta)
    try:
        wait_console(Path(inst.instance_dir) / "console.log", BOOT_THEN_READY.format(n=1), 180)
    except BaseException:
        driver.destroy(inst.uuid)
        raise
    return inst


def test_hard_reboot_and_start_make_the_missing_swap_and_base_again(
    driver: LibvirtDriver,
    test_image_id: str,
    wait_console: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    inst = ready(driver, test_image_id, "remade", wait_console)
    log = Path(inst.instance_dir) / "console.log"
    swap = Path(inst.instance_dir) / "disk.swap"
    base = driver.conf.base_dir / base_filename(test_image_id)
    try:
        swap.unlink()
        base.unlink()
        done = command(driver, capsys, "reboot", "--hard", "remade")
        assert (done["state"], done["done"]) == ("running", "hard")
        assert swap.is_file() and base.is_file()  # the base fetched from the image service
        wait_console(log, BOOT_THEN_READY.format(n=2), 180)

        assert command(driver, capsys, "stop", "remade", "--timeout", "60")["clean"] is True
        swap.unlink()
        base.unlink()
        assert command(driver, capsys, "start", "remade")["state"] == "running"
        assert swap.is_file() and base.is_file()
        wait_console(log, BOOT_THEN_READY.format(n=3), 180)
        assert "minidriver-guest: disk vdc 67108864 swap" in log.read_text(errors="replace")
    finally:
        driver.destroy(inst.uuid)


def test_a_soft_reboot_of_a_guest_ignoring_acpi_falls_back_to_hard(
    driver: LibvirtDriver,
    test_image_id: str,
    wait_console: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    inst = ready(
        driver, test_image_id, "deaf", wait_console, {testimage.META_IGNORE_POWER_BUTTON: "1"}
    )
    log = Path(inst.instance_dir) / "console.log"
    config = tmp_path / "minidriver.conf"
    config.write_text("[libvirt]\nwait_soft_reboot_seconds = 5\n")
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="minidriver.power"):
            done = command(driver, capsys, "reboot", "deaf", config=config)
        assert time.monotonic() - started >= 5
        assert (done["reboot"], done["done"], done["state"]) == ("soft", "hard", "running")
        assert "deaf: soft reboot timed out after 5 s: hard reboot" in caplog.text
        wait_console(log, BOOT_THEN_READY.format(n=2), 180)
        assert "minidriver-guest: power-button, ignored" in log.read_text(errors="replace")
    finally:
        driver.destroy(inst.uuid)


def test_a_guest_powered_off_through_libvirt_alone_shows_stopped(
    driver: LibvirtDriver,
    test_image_id: str,
    wait_console: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    inst = ready(driver, test_image_id, "selfstop", wait_console)
    try:
        # The power button pressed on a connection of the test's own, not minidriver's.
        own = libvirt.open(driver.host.uri)
        try:
            domain = own.lookupByUUIDString(inst.uuid)
            domain.shutdown()
            deadline = time.monotonic() + 120
            while domain.state()[0] != libvirt.VIR_DOMAIN_SHUTOFF:
                assert time.monotonic() < deadline, "the guest did not power off"
                time.sleep(0.5)
        finally:
            own.close()

        shown = command(driver, capsys, "show", "selfstop")
        assert (shown["state"], shown["vm_state"]) == ("shutoff", "stopped")
        record = driver.db.get_instance(inst.uuid)
        assert (record.state, record.vm_state) == ("shutoff", "stopped")
    finally:
        driver.destroy(inst.uuid)
