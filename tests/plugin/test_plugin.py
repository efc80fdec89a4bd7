"""The pytest plugin (minidriver.pytest_plugin), run as users run it: pytest in a child.

Each test writes example test files with ``pytester`` and runs pytest on them in a
child process (the embedded driver allows one root per process, and a child shows
what a user's run leaves behind), on the connection this run was asked for
(``MINIDRIVER_TEST_CONNECTION``, passed on as ``--minidriver-connect``). The examples
record their state dir, its id and their VMs; afterwards nothing of them may be left:
no state dir, no process using it, no domain carrying its state id.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from minidriver.host import EMBED_URI, SYSTEM_URI

pytest_plugins = ["pytester"]

MINIDRIVER = Path(sys.executable).parent / "minidriver"
RUN_TIMEOUT = 900  # seconds, a whole child pytest run; the guest boots in ~5 s idle

# The examples' conftest: ``record(vm, booted=False)`` writes what the outer test checks.
RECORD_CONFTEST = """
import json
import os
from pathlib import Path

import pytest

RECORDS = Path(__file__).parent / "records"


# Written whole: the outer test may read at any time.
def publish(path, data):
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


@pytest.fixture
def record(request, minidriver_driver):
    def write(vm, booted=False):
        data = {
            "test": request.node.nodeid,
            "pid": os.getpid(),
            "state_path": str(minidriver_driver.conf.state_path),
            "state_id": minidriver_driver.db.state_id,
            "uri": minidriver_driver.host.uri,
            "uuid": vm.uuid,
            "name": vm.name,
            "instance_dir": str(vm.instance_dir),
            "images": [image.name for image in minidriver_driver.images.list()],
            "cache_hit": vm.instance.cache_hit,
            "booted": booted,
        }
        stem = "".join(c if c.isalnum() else "_" for c in request.node.name)
        publish(RECORDS / f"{stem}{'-booted' if booted else ''}.json", data)

    return write
"""

PASSING = """
import pytest
from minidriver.exception import FlavorNotFound


def test_boot(minidriver_vm, minidriver_test_image, record):
    vm = minidriver_vm(image=minidriver_test_image, config_drive=True, name="plugin pass")
    record(vm)
    vm.wait_for_console(r"^minidriver-guest: ready", timeout=120)
    text = vm.console_text()
    assert "minidriver-guest: disk vda 1073741824 root" in text
    assert f"minidriver-guest: config-drive uuid={vm.uuid} hostname=plugin-pass" in text
    assert vm.display_name == "plugin pass"
    assert vm.name.startswith("instance-")
    assert vm.info().state == "running"
    assert vm.timings["total"] > 0
    snap = vm.snapshot("plugin-snap")
    assert vm.driver.images.get(snap.id).name == "plugin-snap"


def test_unknown_flavor(minidriver_vm, minidriver_test_image):
    with pytest.raises(FlavorNotFound):
        minidriver_vm(image=minidriver_test_image, flavor="no-such-flavor")
"""

FAILING = """
def test_fails(minidriver_vm, minidriver_test_image, record):
    vm = minidriver_vm(image=minidriver_test_image)
    record(vm)
    vm.wait_for_console(r"^minidriver-guest: ready", timeout=120)
    vm.wait_for_console(r"^minidriver-guest: never printed", timeout=2)
"""

SLEEPER = """
import time


def test_warm_up(minidriver_driver, minidriver_test_image):
    # The session's fixtures (image build check, connection) outside the timed test.
    assert minidriver_driver.host.uri


def test_sleeps(minidriver_vm, minidriver_test_image, record):
    vm = minidriver_vm(image=minidriver_test_image)
    record(vm)
    vm.wait_for_console(r"^minidriver-guest: ready", timeout=120)
    record(vm, booted=True)
    time.sleep(120)
"""

PARAMETRISED = """
import pytest


@pytest.mark.parametrize("n", [1, 2, 3])
def test_many(minidriver_vm, minidriver_test_image, record, n):
    vm = minidriver_vm(image=minidriver_test_image, name=f"many-{n}")
    record(vm)
    vm.wait_for_console(r"^minidriver-guest: ready", timeout=120)
    assert "minidriver-guest: disk vda 1073741824 root" in vm.console_text()
"""


def wanted_uri() -> str | None:
    """The connection the outer run was asked for (as tests/conftest.py reads it)."""
    wanted = os.environ.get("MINIDRIVER_TEST_CONNECTION", "")
    return {"daemon": SYSTEM_URI, "embed": EMBED_URI, "": None}[wanted]


def connect_args() -> list[str]:
    uri = wanted_uri()
    return [] if uri is None else [f"--minidriver-connect={uri}"]


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", *connect_args(), *args, timeout=RUN_TIMEOUT
    )


def read_records(pytester: pytest.Pytester) -> list[dict[str, Any]]:
    directory = pytester.path / "records"
    if not directory.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in args:
                found.append(f"{cmdline.parent.name}: {args[:200]}")
    return found


def daemon_domains_mentioning(texts: list[str]) -> list[str]:
    conn = libvirt.openReadOnly(SYSTEM_URI)
    try:
        found = []
        for domain in conn.listAllDomains():
            with contextlib.suppress(libvirt.libvirtError):  # another run's, gone meanwhile
                xml = domain.XMLDesc(0)
                if any(t in xml for t in texts):
                    found.append(domain.name())
        return found
    finally:
        conn.close()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def assert_nothing_left(records: list[dict[str, Any]]) -> None:
    """No state dir, no instance dir, no process, no domain of the recorded runs."""
    assert records, "the example recorded nothing"
    wanted = wanted_uri()
    for rec in records:
        if wanted == SYSTEM_URI:
            assert rec["uri"] == SYSTEM_URI, rec
        elif wanted == EMBED_URI:
            assert rec["uri"].startswith(EMBED_URI), rec
        assert not Path(rec["instance_dir"]).exists(), rec
        assert not Path(rec["state_path"]).exists(), rec
    state_paths = sorted({rec["state_path"] for rec in records})
    for state_path in state_paths:
        # Destroy waits for QEMU; the slack covers a process still being reaped.
        def gone(path: str = state_path) -> bool:
            return not processes_mentioning(path)

        assert wait_until(gone, 10), processes_mentioning(state_path)
    if any(rec["uri"] == SYSTEM_URI for rec in records):
        marks = [*state_paths, *{rec["state_id"] for rec in records}]
        assert daemon_domains_mentioning(marks) == []


def section(stdout: str, title: str) -> str:
    """One report section of a run's output: from its title line to the next rule."""
    lines = stdout.splitlines()
    start = next(
        i for i, line in enumerate(lines) if title in line and line.startswith(("---", "==="))
    )
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].startswith(("---", "===", "___"))),
        len(lines),
    )
    return "\n".join(lines[start + 1 : end])


# -- without VMs ----------------------------------------------------------------------


def test_options_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(
        [
            "*minidriver: real VMs as fixtures*",
            "*--minidriver-config=FILE*",
            "*--minidriver-connect=URI*",
            "*--minidriver-boot-timeout=SECONDS*",
            "*--minidriver-keep-on-failure*",
        ]
    )


def test_unused_plugin_touches_nothing(pytester: pytest.Pytester) -> None:
    """Loaded but not asked for: no libvirt import, no connection, no state dir."""
    pytester.makepyfile(
        """
        import os
        import sys
        from pathlib import Path


        def test_nothing(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("minidriver")
            assert "libvirt" not in sys.modules
            assert "minidriver.driver" not in sys.modules
            assert not list(Path("/var/tmp").glob(f"mdpytest-{os.getpid()}-*"))
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--minidriver-connect=qemu:///nowhere"
    )
    result.assert_outcomes(passed=1)


# -- with VMs -------------------------------------------------------------------------


@pytest.mark.integration
def test_passing_test_leaves_nothing(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RECORD_CONFTEST)
    pytester.makepyfile(test_passing=PASSING)
    result = run(pytester)
    result.assert_outcomes(passed=2)
    records = read_records(pytester)
    assert len(records) == 1
    assert_nothing_left(records)


@pytest.mark.integration
def test_failing_test_reports_console_and_timings(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RECORD_CONFTEST)
    pytester.makepyfile(test_failing=FAILING)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    # The failure itself: an AssertionError carrying the console's last lines.
    assert "ConsoleWaitFailed" in out
    assert "--- last console lines ---" in out
    assert "did not match '^minidriver-guest: never printed' within 2 s" in out
    [rec] = read_records(pytester)
    body = section(out, "minidriver vm test-fails")
    assert f"instance {rec['uuid']}  domain {rec['name']}  flavor t1.nano" in body
    assert "minidriver-guest: disk vda 1073741824 root" in body
    assert "minidriver-guest: ready" in body
    timings = next(line for line in body.splitlines() if line.startswith("timings: "))
    for step in ("fetch", "convert", "overlay", "define", "start", "total"):
        assert f"{step} " in timings, timings
    assert_nothing_left([rec])


@pytest.mark.integration
def test_keep_on_failure_keeps_and_names_the_vm(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RECORD_CONFTEST)
    pytester.makepyfile(test_failing=FAILING)
    result = run(pytester, "--minidriver-keep-on-failure")
    [rec] = read_records(pytester)
    out = result.stdout.str()
    kept = section(out, "minidriver: VMs kept for failed tests").splitlines()
    try:
        result.assert_outcomes(failed=1)
        assert kept[0].startswith(f"{rec['uuid']}  {rec['name']}  test-fails"), kept
        assert kept[1].strip().startswith("delete with: minidriver "), kept
        assert Path(rec["instance_dir"], "disk").is_file()
        listed = cli(kept[1], "--json", "list")
        assert [(i["uuid"], i["state"]) for i in listed] == [(rec["uuid"], "running")]
        # The command the summary gives removes the VM.
        cli(kept[1])
        assert cli(kept[1], "--json", "list") == []
    finally:
        with contextlib.suppress(Exception):
            cli(kept[-1], "delete", "--all")
        shutil.rmtree(rec["state_path"])
    assert_nothing_left([rec])


def cli(summary_line: str, *override: str) -> Any:
    """Run the summary's ``delete with: minidriver ...`` line, or its options + override."""
    argv = shlex.split(summary_line.split("delete with: ", 1)[1])
    assert argv[0] == "minidriver"
    if override:
        options = argv[1 : argv.index("delete")]
        argv = ["minidriver", *options, *override]
    proc = subprocess.run(
        [str(MINIDRIVER), *argv[1:]], capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout) if "--json" in argv else proc.stdout


@pytest.mark.integration
def test_user_config_is_kept_but_emptied(pytester: pytest.Pytester) -> None:
    """--minidriver-config: the user's state dir stays, with its cache, and nothing else."""
    # A daemon's QEMU must traverse the state dir: not under pytest's 0700 temp dirs.
    state = Path(tempfile.mkdtemp(prefix="mdplugin-", dir="/var/tmp"))
    try:
        state.chmod(0o755)
        conf = pytester.path / "minidriver.conf"
        conf.write_text(f"[DEFAULT]\nstate_path = {state}\n")
        pytester.makeconftest(RECORD_CONFTEST)
        pytester.makepyfile(
            test_config="""
            def test_boot(minidriver_vm, minidriver_test_image, record):
                assert minidriver_vm.boot_timeout == 111
                vm = minidriver_vm(image=minidriver_test_image)
                record(vm)
                assert vm.driver.conf.source is not None
                vm.wait_for_console(r"^minidriver-guest: ready")
            """
        )
        result = run(pytester, f"--minidriver-config={conf}", "--minidriver-boot-timeout=111")
        result.assert_outcomes(passed=1)
        [rec] = read_records(pytester)
        assert rec["state_path"] == str(state)
        assert rec["images"] == ["minidriver-test-guest.qcow2"]
        assert state.is_dir()
        base = [p.name for p in (state / "instances" / "_base").iterdir()]
        assert any(len(name) == 40 for name in base), base  # the cached base stays
        options = ["--config", str(conf), *connect_args_for_cli(), "--json"]
        assert cli_json(*options, "list") == []
        assert cli_json(*options, "image", "list") == []
        assert not Path(rec["instance_dir"]).exists()
        assert processes_mentioning(rec["instance_dir"]) == []
        if rec["uri"] == SYSTEM_URI:
            assert daemon_domains_mentioning([rec["state_id"], rec["instance_dir"]]) == []
    finally:
        shutil.rmtree(state)


def connect_args_for_cli() -> list[str]:
    uri = wanted_uri()
    return [] if uri is None else ["--connect", uri]


def cli_json(*args: str) -> Any:
    proc = subprocess.run(
        [str(MINIDRIVER), *args], capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.integration
def test_pytest_timeout_still_tears_down(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RECORD_CONFTEST)
    pytester.makepyfile(test_sleeper=SLEEPER)
    result = run(pytester, "--timeout=20", "--timeout-method=signal")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "Failed: Timeout" in out
    records = read_records(pytester)
    assert any(rec["booted"] for rec in records), "the VM was not up before the timeout"
    assert "minidriver-guest: ready" in section(out, "minidriver vm test-sleeps")
    assert_nothing_left(records)


@pytest.mark.integration
def test_sigint_still_tears_down(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RECORD_CONFTEST)
    pytester.makepyfile(test_sleeper=SLEEPER)
    booted = pytester.path / "records" / "test_sleeps-booted.json"
    interrupt_when(pytester, "test_sleeper.py", booted.exists)
    assert_nothing_left(read_records(pytester))


def interrupt_when(pytester: pytest.Pytester, test_file: str, ready: Callable[[], bool]) -> str:
    """Run pytest on ``test_file`` in a child, SIGINT it once ``ready()``; the child
    must end interrupted. Its output."""
    log_path = pytester.path / "pytest.log"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *connect_args()]
    with log_path.open("w") as log:
        proc = pytester.popen([*argv, test_file], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: ready() or proc.poll() is not None, RUN_TIMEOUT)
        assert proc.poll() is None, log_path.read_text()
        assert ready()
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log_path.read_text()
    assert returncode == pytest.ExitCode.INTERRUPTED, out
    assert "KeyboardInterrupt" in out
    return out


@pytest.mark.integration
def test_parametrised_three_vms(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RECORD_CONFTEST)
    pytester.makepyfile(test_many=PARAMETRISED)
    result = run(pytester)
    result.assert_outcomes(passed=3)
    records = read_records(pytester)
    assert len(records) == 3
    # One session: one state dir, the image added once, its base converted once.
    assert len({rec["state_path"] for rec in records}) == 1
    assert all(rec["images"] == ["minidriver-test-guest.qcow2"] for rec in records)
    assert sorted(rec["cache_hit"] for rec in records) == [False, True, True]
    assert len({rec["uuid"] for rec in records}) == 3
    assert_nothing_left(records)


@pytest.mark.integration
def test_parametrised_three_vms_on_two_workers(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RECORD_CONFTEST)
    pytester.makepyfile(test_many=PARAMETRISED)
    result = run(pytester, "-n", "2")
    result.assert_outcomes(passed=3)
    records = read_records(pytester)
    assert len(records) == 3
    # Each worker its own state dir (named after its pid), never another's.
    for rec in records:
        assert Path(rec["state_path"]).name.startswith(f"mdpytest-{rec['pid']}-"), rec
    assert len({rec["pid"] for rec in records}) == len({rec["state_path"] for rec in records})
    assert_nothing_left(records)
