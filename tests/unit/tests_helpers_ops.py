"""Helpers of the rescue, resize and shelve unit tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import libvirt
import pytest

from minidriver.cli import main
from minidriver.config import Config
from minidriver.driver import LibvirtDriver
from minidriver.images import qemu_img


def disk_sizes(instance_dir: Path) -> dict[str, int]:
    """Virtual size of every ``disk*`` image of a dir (config drive and info left out)."""
    return {
        p.name: qemu_img.info(p, "qcow2").virtual_size
        for p in sorted(instance_dir.glob("disk*"))
        if p.name not in ("disk.info", "disk.config")
    }


def domain_xml(drv: LibvirtDriver, uuid: str) -> str:
    domain = drv.host.get_domain(uuid)
    assert domain is not None
    return str(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def run(drv: LibvirtDriver, conf: Config, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """``minidriver --json ARGV`` on ``conf``'s state dir (and config file) and
    ``drv``'s connection: its exit code and JSON document."""
    capsys.readouterr()
    config = ("--config", str(conf.source)) if conf.source else ()
    try:
        code = main(["--state-dir", str(conf.state_path), *config, "--json", *argv], host=drv.host)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, json.loads(capsys.readouterr().out)
