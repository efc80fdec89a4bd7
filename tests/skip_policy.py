"""The project's rules for tests that do not run, as pytest hooks (tests/conftest.py
takes them in): a skipped test is an untested feature.

* A test that cannot apply to a run is deselected by a marker, never skipped:
  ``@pytest.mark.connection("daemon", ...)`` runs only on the named test connections
  (``MINIDRIVER_TEST_CONNECTION``: ``daemon``, ``embed``, unset is ``auto``);
  ``@pytest.mark.kvm_pvm`` only on a host whose ``/dev/kvm`` is kvm_pvm's.
* Under ``CI`` (set and not ``0``/``false``) every skip fails the run: the session
  ends with exit code 1 and the summary lists each skipped test with its reason.
  What may still skip on a machine set up by the README is listed in the README.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CONNECTIONS = ("daemon", "embed", "auto")
KVM_PVM_MODULE = Path("/sys/module/kvm_pvm")


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _connection() -> str:
    return os.environ.get("MINIDRIVER_TEST_CONNECTION", "") or "auto"


class SkipsFailCI:
    """Collects every skip of the session; under CI they fail it."""

    def __init__(self) -> None:
        self.skips: list[tuple[str, str]] = []

    def _record(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = str(report.longrepr)
        if isinstance(report.longrepr, tuple):  # (file, line, "Skipped: why")
            reason = report.longrepr[2]
        self.skips.append((report.nodeid, reason.removeprefix("Skipped: ")))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.skips and session.exitstatus in (
            pytest.ExitCode.OK,
            pytest.ExitCode.NO_TESTS_COLLECTED,
        ):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.skips:
            return
        terminalreporter.section("skips fail the run under CI", sep="=", red=True, bold=True)
        for nodeid, reason in self.skips:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}")
        terminalreporter.line(
            f"{len(self.skips)} skipped: install what they need (scripts/setup-host"
            " --for-tests) or deselect by a marker a test that cannot apply to this run"
        )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "connection(*names): runs only on these test connections (daemon, embed, auto:"
        " MINIDRIVER_TEST_CONNECTION); deselected on the others",
    )
    config.addinivalue_line(
        "markers", "kvm_pvm: runs only where /dev/kvm is kvm_pvm's; deselected elsewhere"
    )
    # xdist's workers report to the controller, which alone decides the exit code.
    if _under_ci() and not hasattr(config, "workerinput"):
        config.pluginmanager.register(SkipsFailCI(), "minidriver-skips-fail-ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    connection = _connection()
    kvm_pvm = KVM_PVM_MODULE.is_dir()
    keep: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        wanted = item.get_closest_marker("connection")
        if wanted is not None:
            unknown = set(wanted.args) - set(CONNECTIONS)
            if unknown or not wanted.args:
                raise pytest.UsageError(
                    f"{item.nodeid}: connection marker wants some of {', '.join(CONNECTIONS)}"
                )
        applies = (wanted is None or connection in wanted.args) and (
            kvm_pvm or item.get_closest_marker("kvm_pvm") is None
        )
        (keep if applies else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep
