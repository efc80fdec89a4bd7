"""tests/skip_policy.py run for real: pytest sessions of example tests (pytester, in a
child process) with the project's hooks as their conftest."""

from __future__ import annotations

from pathlib import Path

import pytest
import skip_policy

pytest_plugins = ["pytester"]

EXAMPLES = """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("no frobnicator on this host")

@pytest.mark.connection("daemon")
def test_on_the_daemon_only():
    pass

@pytest.mark.connection("embed", "auto")
def test_never_on_the_daemon():
    pass
"""


@pytest.fixture
def examples(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeconftest(Path(skip_policy.__file__).read_text())
    pytester.makepyfile(test_examples=EXAMPLES)
    for name in ("CI", "MINIDRIVER_TEST_CONNECTION"):
        monkeypatch.delenv(name, raising=False)
    return pytester


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_under_ci_a_skip_fails_the_run_and_says_why(
    examples: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, workers: list[str]
) -> None:
    monkeypatch.setenv("CI", "true")
    result = examples.runpytest_subprocess("-p", "no:cacheprovider", *workers)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*skips fail the run under CI*",
            "SKIPPED test_examples.py::test_skips: no frobnicator on this host",
        ]
    )


def test_outside_ci_a_skip_is_reported_only(
    examples: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    for ci in ("", "false", "0"):
        monkeypatch.setenv("CI", ci)
        result = examples.runpytest_subprocess("-p", "no:cacheprovider")
        assert result.ret == pytest.ExitCode.OK, ci
        result.assert_outcomes(passed=2, skipped=1)


@pytest.mark.parametrize(
    ("connection", "ran"),
    [
        ("daemon", "test_on_the_daemon_only"),
        ("embed", "test_never_on_the_daemon"),
        ("", "test_never_on_the_daemon"),  # unset: auto
    ],
)
def test_a_test_for_another_connection_is_deselected_not_skipped(
    examples: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, connection: str, ran: str
) -> None:
    monkeypatch.setenv("MINIDRIVER_TEST_CONNECTION", connection)
    monkeypatch.setenv("CI", "true")
    result = examples.runpytest_subprocess("-p", "no:cacheprovider", "-v", "-k", "not skips")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=2, deselected=2)
    result.stdout.fnmatch_lines([f"*::{ran} PASSED*"])


def test_a_kvm_pvm_test_runs_only_on_a_kvm_pvm_host(examples: pytest.Pytester) -> None:
    examples.makepyfile(
        test_pvm="import pytest\n\n@pytest.mark.kvm_pvm\ndef test_pvm():\n    pass\n"
    )
    result = examples.runpytest_subprocess("-p", "no:cacheprovider", "test_pvm.py")
    if skip_policy.KVM_PVM_MODULE.is_dir():
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(deselected=1)


def test_a_connection_marker_must_name_known_connections(examples: pytest.Pytester) -> None:
    examples.makepyfile(
        test_bad='import pytest\n\n@pytest.mark.connection("libvirtd")\ndef test_x():\n    pass\n'
    )
    result = examples.runpytest_subprocess("-p", "no:cacheprovider", "test_bad.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*connection marker wants some of daemon, embed, auto*"])
