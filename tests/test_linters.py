"""The linters as tests: ruff (lint and format), mypy and the import contracts.

``lint-imports`` checks ``.importlinter``: the layers from the command line down to
the utilities, the tooling on the public API only, no import cycles.

Skipped where a tool is missing on a developer's machine, never in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI (pip install -e .[test])")
        pytest.skip(f"{name} not installed")
    return found


@pytest.mark.parametrize(
    "args",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
        ["lint-imports", "--no-cache"],
    ],
    ids=["ruff-check", "ruff-format", "mypy", "import-contracts"],
)
def test_linter(args: list[str]) -> None:
    proc = subprocess.run(
        [_tool(args[0]), *args[1:]], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
