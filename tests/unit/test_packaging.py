"""A non-editable install carries what the package reads at run time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import importlib.resources, sys
from pathlib import Path
import minidriver
from minidriver import guest
from minidriver.guestimages import testimage
assert minidriver.__file__.startswith(sys.argv[1]), minidriver.__file__
env = guest._environment()
assert "domain.xml.j2" in env.list_templates(), env.list_templates()
init = importlib.resources.files("minidriver.guestimages.data") / "testimage-init.sh"
assert init.read_text().startswith("#!/bin/sh")
print(testimage.default_output_dir())
"""


def test_wheel_installs_templates_and_guest_builder(tmp_path: Path) -> None:
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", wheels, ROOT], check=True)
    wheel = next(wheels.glob("minidriver-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True)
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(target), "MINIDRIVER_STATE_DIR": str(state)}
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(target)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    # Outside a checkout the test guest is cached under the state dir.
    assert probe.stdout.strip() == str(state / "test-image")
