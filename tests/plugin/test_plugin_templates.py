"""The plugin's templates (``minidriver_template``, ``minidriver_vm(template=...)``)
torn down in every outcome, run as users run them: pytest in a child (see
test_plugin.py for why a child, and on which connection).

Each example notes its state dir, its id and what it made; afterwards nothing of it
may be left: no domain, no template (record or dir), no instance, no save copy, no
forwarded-port reservation. Where the example runs on the user's state dir
(``--minidriver-config``, which the plugin keeps) the dir itself is searched; else it
must be gone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_plugin import (
    RECORD_CONFTEST,
    cli_json,
    connect_args_for_cli,
    daemon_domains_mentioning,
    interrupt_when,
    processes_mentioning,
    run,
    wait_until,
)

from minidriver.config import default_port_reservations_path
from minidriver.host import SYSTEM_URI

pytest_plugins = ["pytester"]

# ``note(kind, **data)``: what the outer test checks, one JSON file per kind.
NOTE_CONFTEST = (
    RECORD_CONFTEST
    + """

@pytest.fixture(scope="session")
def note(minidriver_driver):
    def write(kind, **data):
        data.update(
            pid=os.getpid(),
            state_path=str(minidriver_driver.conf.state_path),
            state_id=minidriver_driver.db.state_id,
            uri=minidriver_driver.host.uri,
        )
        publish(Path(__file__).parent / "notes" / f"{kind}.json", data)

    return write
"""
)

# A template fixture, and a test of a clone; SLEEP: seconds the clone's test sleeps.
CLONE = """
import time

import pytest

SLEEP = {sleep}


@pytest.fixture(scope="session")
def ready_guest(minidriver_template, minidriver_test_image, note):
    note("session")
    tpl = minidriver_template(image=minidriver_test_image, wait_for=r"^minidriver-guest: ready")
    note("template", id=tpl.id, name=tpl.name)
    return tpl


def test_clone(minidriver_vm, ready_guest, note):
    vm = minidriver_vm(template=ready_guest)
    record = vm.driver.db.get_instance(vm.uuid)
    note("clone", uuid=vm.uuid, name=vm.name, instance_dir=str(vm.instance_dir),
         port=record.forward_port)
    assert vm.info().state == "running"
    time.sleep(SLEEP)
    assert vm.info().state == "paused", "the test's body fails"
"""

# The template's source guest never prints the line; the next test sees what is left.
NEVER_READY = """
def test_template_never_ready(minidriver_template, minidriver_test_image, note):
    note("session")
    minidriver_template(image=minidriver_test_image, wait_for=r"^minidriver-guest: never printed")


def test_after(minidriver_driver, note):
    note("after", instances=[r.uuid for r in minidriver_driver.db.list_instances()])
"""


@pytest.fixture
def user_state() -> Iterator[Path]:
    """A state dir of the user's (``--minidriver-config``), traversable by a daemon's
    QEMU; the plugin keeps it, the test searches it, then removes it."""
    path = Path(tempfile.mkdtemp(prefix="mdplugtpl-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(
        [sys.executable, "-m", "minidriver", "--state-dir", str(path), *connect_args_for_cli(),
         "delete", "--all"], capture_output=True, check=False, timeout=300,
    )  # fmt: skip
    subprocess.run(["rm", "-rf", str(path)], check=False)


def user_config(pytester: pytest.Pytester, state: Path) -> str:
    conf = pytester.path / "minidriver.conf"
    conf.write_text(f"[DEFAULT]\nstate_path = {state}\n")
    return f"--minidriver-config={conf}"


def read_notes(pytester: pytest.Pytester) -> dict[str, dict[str, Any]]:
    directory = pytester.path / "notes"
    if not directory.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in directory.glob("*.json")}


def reservations_of(state_path: str) -> list[str]:
    """Forwarded-port reservations (host-wide, as root under /run) naming the state dir."""
    found = []
    for path in sorted(default_port_reservations_path().glob("[0-9]*")):
        try:
            owner = json.loads(path.read_text()).get("state_path")
        except (OSError, ValueError):
            continue
        if owner == state_path:
            found.append(path.name)
    return found


def assert_nothing_left(notes: dict[str, dict[str, Any]], *, kept_dir: bool) -> None:
    """No domain, process, port reservation, instance, template or save copy of the run;
    the state dir gone, or (``kept_dir``: the user's) left with no instance or template."""
    session = notes["session"]
    state_path, state_id = session["state_path"], session["state_id"]
    state = Path(state_path)
    if "clone" in notes:
        assert not Path(notes["clone"]["instance_dir"]).exists()
    assert wait_until(lambda: not processes_mentioning(state_path), 10), processes_mentioning(
        state_path
    )
    if session["uri"] == SYSTEM_URI:
        assert daemon_domains_mentioning([state_path, state_id]) == []
    assert reservations_of(state_path) == []
    if not kept_dir:
        assert not state.exists()
        return
    options = ["--state-dir", state_path, *connect_args_for_cli(), "--json"]
    assert cli_json(*options, "list") == []
    assert cli_json(*options, "template", "list") == []
    templates = state / "templates"
    assert not templates.exists() or list(templates.iterdir()) == []
    instances = state / "instances"
    left = sorted(p.name for p in instances.iterdir()) if instances.is_dir() else []
    assert set(left) <= {"_base", "locks", "snapshots"}, left
    assert list(state.rglob("*.save")) == []


@pytest.mark.integration
def test_a_clone_whose_test_fails_leaves_nothing(
    pytester: pytest.Pytester, user_state: Path
) -> None:
    pytester.makeconftest(NOTE_CONFTEST)
    pytester.makepyfile(test_clone=CLONE.format(sleep=0))
    result = run(pytester, user_config(pytester, user_state))
    result.assert_outcomes(failed=1)
    assert "the test's body fails" in result.stdout.str()
    notes = read_notes(pytester)
    assert {"session", "template", "clone"} <= notes.keys(), notes
    assert_nothing_left(notes, kept_dir=True)


@pytest.mark.integration
def test_a_template_whose_wait_never_matches_fails_and_leaves_nothing(
    pytester: pytest.Pytester, user_state: Path
) -> None:
    pytester.makeconftest(NOTE_CONFTEST)
    pytester.makepyfile(test_never=NEVER_READY)
    # The wait outlasts the guest's boot, so that the console it shows holds the
    # ready line: 20 s did not on a loaded CI host (the spawn took 5 s, and the guest
    # had not printed it 15 s later).
    result = run(pytester, user_config(pytester, user_state), "--minidriver-boot-timeout=60")
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    # The failure says what was awaited, and shows the console the guest wrote.
    assert "did not match '^minidriver-guest: never printed'" in out, out
    assert "--- last console lines ---" in out and "minidriver-guest: ready" in out, out
    notes = read_notes(pytester)
    # The source guest went with the failure, not at the session's end.
    assert notes["after"]["instances"] == []
    assert_nothing_left(notes, kept_dir=True)


@pytest.mark.integration
@pytest.mark.parametrize("when", ["the template is built", "a clone's test runs"])
def test_sigint_leaves_nothing_of_templates(pytester: pytest.Pytester, when: str) -> None:
    pytester.makeconftest(NOTE_CONFTEST)
    if when == "the template is built":
        pytester.makepyfile(test_run=NEVER_READY)
    else:
        pytester.makepyfile(test_run=CLONE.format(sleep=300))
    notes_dir = pytester.path / "notes"

    def building() -> bool:
        """The template's source guest booted (its wait for a line never printed runs)."""
        if not (notes_dir / "session.json").exists():
            return False
        state = Path(json.loads((notes_dir / "session.json").read_text())["state_path"])
        return any(
            "minidriver-guest: ready" in p.read_text(errors="replace")
            for p in state.glob("instances/*/console.log")
        )

    def ready() -> bool:
        if when == "the template is built":
            return building()
        return (notes_dir / "clone.json").exists()

    interrupt_when(pytester, "test_run.py", ready)
    assert_nothing_left(read_notes(pytester), kept_dir=False)
