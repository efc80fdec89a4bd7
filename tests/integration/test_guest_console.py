"""The test guest after "ready", under real QEMU: its console shell driven through
libvirt's console API (minidriver.serial_console), disks attached and detached live
(libvirt's attachDeviceFlags, as the volume service will) and reported by the guest,
and the modes its config drive's metadata turns on."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from cli_run import minidriver, run_json, wanted_connection_uri
from conftest import TRAVERSABLE_TMP
from guest_shell import PROMPT, run, wait_for_line

from minidriver import console
from minidriver.driver import LibvirtDriver
from minidriver.guestimages import testimage
from minidriver.objects import GiB, Instance
from minidriver.serial_console import ConsoleBusy, ConsoleClosed, SerialConsole

pytestmark = pytest.mark.integration

READY = r"^minidriver-guest: ready"
# Clear of the slots libvirt gives the boot disks and of the user-mode NIC's 0x10,
# which libvirt does not know about.
ATTACH_SLOT = 0x1F


def boot(
    driver: LibvirtDriver, image_id: str, name: str, meta: dict[str, str] | None = None
) -> Instance:
    """The test guest, ready (with a config drive holding ``meta`` if given)."""
    inst = driver.spawn(
        name=name, image=image_id, flavor="t1.nano", config_drive=meta is not None, meta=meta
    )
    log = Path(inst.instance_dir) / "console.log"
    try:
        console.wait_for_console(log, READY, 180)
    except console.ConsoleTimeout as exc:
        driver.destroy(inst.uuid)
        pytest.fail(f"{exc}\n--- console tail ---\n{exc.tail}")
    return inst


@pytest.fixture(scope="module")
def ready_guest(driver: LibvirtDriver, test_image_id: str) -> Iterator[Instance]:
    inst = boot(driver, test_image_id, "console-guest")
    yield inst
    driver.destroy(inst.uuid)


@pytest.fixture
def shell(driver: LibvirtDriver, ready_guest: Instance) -> Iterator[SerialConsole]:
    with driver.open_serial_console(ready_guest.uuid) as opened:
        yield opened


def console_log(inst: Instance) -> str:
    return (Path(inst.instance_dir) / "console.log").read_bytes().decode(errors="replace")


def test_a_command_runs_in_the_console_shell(shell: SerialConsole, ready_guest: Instance) -> None:
    assert run(shell, "echo $((6*7))").output == "42\n"
    assert run(shell, "false").status == 1
    assert run(shell, "cd /sys/block && ls -d vda").output == "vda\n"
    assert run(shell, "pwd").output == "/sys/block\n"  # one shell: its state lasts
    # ^C stops the command, not the shell.
    # (A child shell that says it runs, then becomes the sleep: a ^C from then on
    # meets the command, never a shell that has not forked it yet.)
    shell.send_line("sh -c 'echo sleeping; exec sleep 600'")
    shell.read_until(r"^sleeping\n", 30)
    shell.write(b"\x03")
    shell.read_until(rf"^{re.escape(PROMPT)}", 30)
    assert run(shell, "echo still here").output == "still here\n"
    # The console log kept recording while the stream was open, the prompt at a
    # line's start.
    text = console_log(ready_guest)
    assert re.search(r"^42\r?$", text, re.MULTILINE), text[-2000:]
    assert re.search(rf"^{re.escape(PROMPT)}", text, re.MULTILINE)


def test_the_console_is_one_clients_until_forced(
    driver: LibvirtDriver, shell: SerialConsole, ready_guest: Instance
) -> None:
    with pytest.raises(ConsoleBusy) as caught:
        driver.open_serial_console(ready_guest.uuid)
    assert caught.value.hint is not None and "force" in caught.value.hint
    with driver.open_serial_console(ready_guest.uuid, force=True) as taker:
        with pytest.raises(ConsoleClosed) as taken:
            shell.read_until("never", timeout=30)
        assert "was taken" in str(taken.value)
        assert run(taker, "echo $((6*7))").output == "42\n"


def attach_xml(path: Path) -> str:
    return (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='vdz' bus='virtio'/>"
        "<address type='pci' domain='0x0000' bus='0x00'"
        f" slot='{ATTACH_SLOT:#04x}' function='0x0'/></disk>"
    )


def test_a_disk_attached_live_is_reported_then_its_removal(
    driver: LibvirtDriver, shell: SerialConsole, ready_guest: Instance
) -> None:
    volume = driver.conf.state_path / f"volume-{ready_guest.uuid}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", volume, "1G"], check=True)
    domain = driver.host.get_domain(ready_guest.uuid)
    assert domain is not None
    xml = attach_xml(volume)
    try:
        # Half a command typed: the guest's line still starts a line of its own.
        shell.write(b"echo pend")
        domain.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        added = wait_for_line(shell, r"minidriver-guest: disk-added (vd[a-z]+) (\d+) (\w+)")
        name = added.group(1)
        assert added.group(2, 3) == (str(GiB), "blank")
        shell.read_until(rf"^{re.escape(PROMPT)}", 30)  # shown again after the line
        shell.send_line("ing")  # the typed half is still there
        wait_for_line(shell, "pending", 30)
        shell.read_until(rf"^{re.escape(PROMPT)}", 30)

        record = "minidriver-sector-" + ready_guest.uuid[:8]
        wrote = run(
            shell,
            f"printf '{record}\\n' | dd of=/dev/{name} bs=512 seek=1 count=1"
            " conv=sync,notrunc,fsync",
        )
        assert wrote.status == 0, wrote.output

        domain.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        wait_for_line(shell, f"minidriver-guest: disk-removed {name}")
        deadline = time.monotonic() + 30  # libvirt drops it on QEMU's DEVICE_DELETED
        while str(volume) in domain.XMLDesc(0) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert str(volume) not in domain.XMLDesc(0)
        assert run(shell, f"test -e /sys/block/{name}").status == 1

        domain.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        again = wait_for_line(shell, r"minidriver-guest: disk-added (vd[a-z]+) (\d+) (\w+)")
        read = run(shell, f"dd if=/dev/{again.group(1)} bs=512 skip=1 count=1 2>/dev/null")
        assert read.output.split("\n")[0] == record
    finally:
        if str(volume) in domain.XMLDesc(0):
            domain.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            wait_for_line(shell, "minidriver-guest: disk-removed vd[a-z]+")
        volume.unlink(missing_ok=True)
    # Every guest line, however late, started a line of its own.
    text = console_log(ready_guest)
    assert re.findall(r"^minidriver-guest: disk-(?:added|removed)", text, re.MULTILINE) == [
        "minidriver-guest: disk-added",
        "minidriver-guest: disk-removed",
        "minidriver-guest: disk-added",
        "minidriver-guest: disk-removed",
    ], text[-3000:]
    assert text.count("minidriver-guest:") == len(
        re.findall("^minidriver-guest:", text, re.MULTILINE)
    ), text[-3000:]


def dirty_rate(driver: LibvirtDriver, domain: libvirt.virDomain) -> int:
    """MiB/s of guest memory whose content changed, as QEMU samples it over 1 s."""
    domain.startDirtyRateCalc(1, 0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.5)
        [(_, stats)] = driver.host.get_connection().domainListGetStats(
            [domain], libvirt.VIR_DOMAIN_STATS_DIRTYRATE
        )
        if stats.get("dirtyrate.calc_status") == libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED:
            return int(stats["dirtyrate.megabytes_per_second"])
    pytest.fail(f"QEMU did not measure the dirty rate within 30 s: {stats}")


def test_the_dirty_memory_mode_keeps_changing_memory(
    driver: LibvirtDriver, test_image_id: str, ready_guest: Instance
) -> None:
    inst = boot(driver, test_image_id, "dirty-guest", {testimage.META_DIRTY_MEMORY_MB: "32"})
    try:
        assert "minidriver-guest: mode dirty-memory 32" in console_log(inst).splitlines()
        idle, dirty = driver.host.get_domain(ready_guest.uuid), driver.host.get_domain(inst.uuid)
        assert idle is not None and dirty is not None
        # Measured here (TCG, a loaded host): 6 to 40 MiB/s with 32 MiB; idle 0 to 2.
        rates = [dirty_rate(driver, dirty) for _ in range(4)]
        idle_rates = [dirty_rate(driver, idle) for _ in range(2)]
        assert max(rates) >= 4, rates
        assert max(rates) > 2 * max(idle_rates), (rates, idle_rates)
    finally:
        driver.destroy(inst.uuid)


@pytest.mark.parametrize("ignore", [True, False], ids=["ignore-power-button", "default"])
def test_a_soft_stop_and_the_ignore_power_button_mode(test_image: Path, ignore: bool) -> None:
    """``minidriver stop`` presses the ACPI power button, then stops the guest hard
    after ``--timeout``: a guest in the mode is still running then."""
    state = Path(TRAVERSABLE_TMP) / f"mdtest-power-{time.monotonic_ns()}"
    state.mkdir(mode=0o755)
    uri = wanted_connection_uri()
    meta = ["--meta", f"{testimage.META_IGNORE_POWER_BUTTON}=1"] if ignore else []
    try:
        run_json(minidriver(state, uri, "--json", "image", "add", str(test_image), "--name",
                            "g", "--disk-format", "qcow2",
                            "--property", "os_type=linux"))  # fmt: skip
        run_json(minidriver(state, uri, "--json", "boot", "--image", "g", "--flavor", "t1.nano",
                            "--name", "vm", "--config-drive", *meta, "--wait-for", READY,
                            "--timeout", "180"))  # fmt: skip
        shown = run_json(minidriver(state, uri, "--json", "show", "vm"))
        log = Path(shown["instance_dir"]) / "console.log"
        lines = log.read_text(errors="replace").splitlines()
        assert ("minidriver-guest: mode ignore-power-button" in lines) is ignore
        started = time.monotonic()
        stopped = run_json(minidriver(state, uri, "--json", "stop", "vm", "--timeout", "8"))
        took = time.monotonic() - started
        assert stopped["state"] == "shutoff"
        lines = log.read_text(errors="replace").splitlines()
        if ignore:
            assert stopped["clean"] is False
            assert took >= 8  # still running at the deadline: stopped hard
            assert "minidriver-guest: power-button, ignored" in lines
            assert "minidriver-guest: power-button, powering off" not in lines
        else:
            assert stopped["clean"] is True
            assert "minidriver-guest: power-button, powering off" in lines
    finally:
        subprocess.run(minidriver(state, uri, "delete", "--all"), capture_output=True, check=False)
        shutil.rmtree(state, ignore_errors=True)
