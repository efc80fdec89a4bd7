"""The command line as the integration tests run it: a child ``python -m minidriver``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def minidriver(state: Path, uri: str, *args: str) -> list[str]:
    """The argv of ``minidriver`` on ``state`` (and ``uri``, unless empty: auto)."""
    argv = ["--state-dir", str(state), *(["--connect", uri] if uri else []), *args]
    return [sys.executable, "-m", "minidriver", *argv]


def run_json(cmd: list[str]) -> Any:
    """Run ``cmd`` (a ``--json`` command), which must succeed; its JSON document."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)
