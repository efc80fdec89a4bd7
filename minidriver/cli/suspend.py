"""``suspend`` and ``resume``: Nova's suspend through libvirt's managed save
(novaclient's ``nova suspend`` / ``nova resume``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minidriver.cli.output import Output
    from minidriver.driver import LibvirtDriver


def _result(drv: LibvirtDriver, uuid: str) -> dict[str, str]:
    record = drv.db.get_instance(uuid)
    return {"uuid": uuid, "state": drv.get_info(uuid).state, "vm_state": record.vm_state}


def cmd_suspend(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    record = drv.db.find_instance(args.instance)
    drv.suspend(record.uuid)
    data = _result(drv, record.uuid)
    out.result(data, f"{record.display_name}: suspended (its memory saved)")
    return 0


def cmd_resume(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    record = drv.db.find_instance(args.instance)
    drv.resume(record.uuid)
    data = _result(drv, record.uuid)
    out.result(data, f"{record.display_name}: {data['state']}")
    return 0
