"""``minidriver console INSTANCE --attach`` on the test guest under real QEMU, driven
through a pipe as a script drives it: a command typed into the guest's console shell,
its output printed, the console log holding the same lines; one client at a time."""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import tempfile
import termios
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_run import minidriver, run_json, wanted_connection_uri
from conftest import TRAVERSABLE_TMP

from minidriver import console

pytestmark = pytest.mark.integration

READY = r"^minidriver-guest: ready"


@dataclass(frozen=True)
class Booted:
    state: Path
    uri: str
    uuid: str
    console_log: Path

    def argv(self, *args: str) -> list[str]:
        return minidriver(self.state, self.uri, *args)


@pytest.fixture(scope="module")
def booted(test_image: Path) -> Iterator[Booted]:
    """The test guest, ready, booted by the command in a state dir of its own (its own
    embedded root, on the embedded driver); deleted however the tests end."""
    state = Path(tempfile.mkdtemp(prefix="mdattach-", dir=TRAVERSABLE_TMP))
    state.chmod(0o755)
    uri = wanted_connection_uri()
    try:
        run_json(minidriver(state, uri, "--json", "image", "add", str(test_image),
                            "--name", "guest", "--disk-format", "qcow2"))  # fmt: skip
        inst = run_json(minidriver(state, uri, "--json", "boot", "--image", "guest",
                                   "--flavor", "t1.nano", "--name", "vm", "--network", "none",
                                   "--wait-for", READY, "--timeout", "300"))  # fmt: skip
        log = Path(inst["instance_dir"]) / "console.log"
        yield Booted(state, uri, inst["uuid"], log)
    finally:
        subprocess.run(minidriver(state, uri, "delete", "--all"),
                       capture_output=True, timeout=300, check=False)  # fmt: skip
        shutil.rmtree(state, ignore_errors=True)


def attach(booted: Booted, stdin: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        booted.argv("console", "vm", "--attach", *options),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_piped_command_runs_in_the_guest_and_its_output_is_printed(booted: Booted) -> None:
    token = uuid.uuid4().hex[:12]
    # The echo of the typed line holds "$((6*7))", the output "42": only the
    # output matches the line below.
    proc = attach(booted, f"echo md-$((6*7))-{token}\n", "--settle", "5", "--timeout", "120")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"^md-42-{token}$", proc.stdout, re.MULTILINE), proc.stdout
    assert f"echo md-$((6*7))-{token}" in proc.stdout  # the guest's echo of the line
    assert "\r" not in proc.stdout  # a pipe gets "\n" line ends
    assert proc.stderr == ""
    # The console log kept recording meanwhile: the same lines.
    console.wait_for_console(booted.console_log, rf"^md-42-{token}\r?$", 30)
    assert re.search(rf"^minidriver-guest\$ echo md-\$\(\(6\*7\)\)-{token}\r?$",
                     console.read_console(booted.console_log), re.MULTILINE)  # fmt: skip


def test_on_a_terminal_keys_go_to_the_guest_until_ctrl_bracket(booted: Booted) -> None:
    master, terminal = os.openpty()
    before = termios.tcgetattr(terminal)
    child = subprocess.Popen(
        booted.argv("console", "vm", "--attach", "--timeout", "240"),
        stdin=terminal,
        stdout=terminal,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        token = uuid.uuid4().hex[:12]
        # The command makes the terminal raw once it holds the console.
        deadline = time.monotonic() + 120
        while termios.tcgetattr(terminal)[3] & termios.ICANON:
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the terminal never became raw"
            time.sleep(0.1)
        # Typed as on a keyboard: Enter is "\r" (the guest's terminal makes it "\n").
        os.write(master, f"echo term-$((6*7))-{token}\r".encode())
        shown = read_terminal(master, f"term-42-{token}\r\n".encode(), child)
        assert f"echo term-$((6*7))-{token}\r\n".encode() in shown  # raw: the guest echoes
        os.write(master, b"\x1d")
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert "connected to the console of vm" in err
        assert "detached from the console of vm" in err
        assert termios.tcgetattr(terminal) == before
    finally:
        child.kill()
        child.wait()
        os.close(master)
        os.close(terminal)


def read_terminal(master: int, until: bytes, child: subprocess.Popen[str]) -> bytes:
    """What the terminal showed, from its master side, until ``until`` came."""
    deadline = time.monotonic() + 120
    shown = b""
    while until not in shown:
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        assert time.monotonic() < deadline, f"the terminal showed {shown!r}, never {until!r}"
        if select.select([master], [], [], 1)[0]:
            shown += os.read(master, 4096)
    return shown


def test_the_timeout_bounds_an_attach_whose_input_never_ends(booted: Booted) -> None:
    read_end, write_end = os.pipe()  # input that stays open: nothing ever ends it
    try:
        proc = subprocess.run(
            booted.argv("console", "vm", "--attach", "--timeout", "5"),
            stdin=read_end,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "ended at its --timeout of 5 s" in proc.stderr


@pytest.mark.connection("daemon")
def test_a_held_console_is_busy_until_forced(booted: Booted) -> None:
    # (On the embedded driver the attached command holds the state dir's libvirt:
    # a second command of that state dir fails on it before it reaches the console.)
    holder = subprocess.Popen(
        booted.argv("console", "vm", "--attach", "--timeout", "240"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The holder is attached once its typed line comes back through the console.
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write("echo held-$((1+1))\n")
        holder.stdin.flush()
        for line in holder.stdout:
            if line.strip() == "held-2":
                break
        busy = attach(booted, "echo never\n", "--timeout", "60")
        assert busy.returncode == 1, busy.stdout + busy.stderr
        assert "the console of vm is busy" in busy.stderr
        assert "--force" in busy.stderr
        token = uuid.uuid4().hex[:12]
        forced = attach(booted, f"echo forced-{token}\n", "--force", "--settle", "5")
        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert re.search(rf"^forced-{token}$", forced.stdout, re.MULTILINE), forced.stdout
        _, err = holder.communicate(timeout=120)
        assert holder.returncode == 1, err
        assert "the console of instance-" in err and "was taken" in err
    finally:
        holder.kill()
        holder.wait()


def test_a_stopped_instance_has_no_console_to_attach_to(booted: Booted) -> None:
    # Last in this module: it stops the guest.
    subprocess.run(booted.argv("stop", "vm", "--force"), check=True, timeout=300)
    proc = attach(booted, "echo never\n", "--timeout", "60")
    assert proc.returncode == 1
    assert "minidriver: error: instance vm is shutoff" in proc.stderr
    assert "minidriver start vm" in proc.stderr
