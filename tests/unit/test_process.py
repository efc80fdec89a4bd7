from __future__ import annotations

import pytest

from minidriver.exception import ProcessExecutionError
from minidriver.process import ResourceLimits, run


def test_output_and_clean_locale() -> None:
    result = run(["sh", "-c", 'echo "$LC_ALL"; echo err >&2'])
    assert result.stdout == "C\n"
    assert result.stderr == "err\n"


def test_non_zero_exit_names_the_program_and_its_last_error_line() -> None:
    with pytest.raises(ProcessExecutionError) as err:
        run(["sh", "-c", "echo first >&2; echo 'the reason' >&2; exit 3"])
    assert str(err.value) == "sh failed: the reason"
    assert err.value.exit_code == 3
    assert run(["sh", "-c", "exit 3"], check=False).returncode == 3


def test_missing_program_is_one_line_with_a_hint() -> None:
    with pytest.raises(ProcessExecutionError) as err:
        run(["no-such-program-here", "x"])
    assert str(err.value) == "no-such-program-here not found"
    assert err.value.hint


def test_timeout() -> None:
    with pytest.raises(ProcessExecutionError, match=r"did not finish within 0\.2 s"):
        run(["sleep", "5"], timeout=0.2)


def test_resource_limits_are_enforced() -> None:
    limits = ResourceLimits(cpu_time=7, address_space=64 * 1024**2)
    assert run(["sh", "-c", "ulimit -t; ulimit -v"], limits=limits).stdout == "7\n65536\n"
    # qemu-img cannot even start in 8 MiB of address space: the limit bites.
    with pytest.raises(ProcessExecutionError):
        run(["qemu-img", "--version"], limits=ResourceLimits(address_space=8 * 1024**2))
