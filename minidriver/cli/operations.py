"""``rescue``/``unrescue``, ``resize``/``resize-confirm``/``resize-revert`` and
``shelve``/``unshelve`` (novaclient's ``nova rescue``, ``nova resize``, ``nova
resize-confirm``, ``nova resize-revert``, ``nova shelve``, ``nova unshelve``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minidriver.cli.output import Output
    from minidriver.driver import LibvirtDriver


def _operate(
    drv: LibvirtDriver,
    args: argparse.Namespace,
    out: Output,
    operation: Callable[[str], Any],
    done: str,
) -> int:
    """Run ``operation`` on the instance ``args`` names; print its state after, and
    ``done`` (formatted with the instance's name and what ``operation`` returned)."""
    record = drv.db.find_instance(args.instance)
    returned = operation(record.uuid)
    after = drv.db.get_instance(record.uuid)
    data = {
        "uuid": record.uuid,
        "name": record.display_name,
        "state": drv.get_info(record.uuid).state,
        "vm_state": after.vm_state,
        "flavor": after.flavor,
        "old_flavor": after.old_flavor or None,
        "shelved_image_id": after.shelved_image_id or None,
    }
    out.result(data, done.format(name=record.display_name, returned=returned, args=args))
    return 0


def cmd_rescue(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    from minidriver import rescue  # noqa: PLC0415 - loaded by its command only

    return _operate(drv, args, out, lambda u: rescue.rescue(drv, u, args.image), "{name}: rescued")


def cmd_unrescue(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    from minidriver import rescue  # noqa: PLC0415 - loaded by its command only

    return _operate(drv, args, out, lambda u: rescue.unrescue(drv, u), "{name}: unrescued")


def cmd_resize(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    from minidriver import resize  # noqa: PLC0415 - loaded by its command only

    return _operate(
        drv,
        args,
        out,
        lambda u: resize.resize(drv, u, args.flavor, timeout=args.timeout),
        "{name}: resized to {args.flavor}; keep it with `minidriver resize-confirm {name}`,"
        " undo it with `minidriver resize-revert {name}`",
    )


def cmd_resize_confirm(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    return _finish_resize(drv, args, out, revert=False)


def cmd_resize_revert(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    return _finish_resize(drv, args, out, revert=True)


def _finish_resize(
    drv: LibvirtDriver, args: argparse.Namespace, out: Output, *, revert: bool
) -> int:
    """Confirm or revert what left the instance ``resized``: a resize, or a migrate."""
    from minidriver import resize  # noqa: PLC0415 - loaded by its command only

    record = drv.db.find_instance(args.instance)
    if record.source_host:  # a migrate's, not a resize's
        from minidriver.cli.hosts import finish_migration  # noqa: PLC0415 - migrations only

        return finish_migration(drv, record, out, revert=revert)
    if revert:
        return _operate(
            drv, args, out, lambda u: resize.revert_resize(drv, u), "{name}: resize reverted"
        )
    return _operate(
        drv, args, out, lambda u: resize.confirm_resize(drv, u), "{name}: resize confirmed"
    )


def cmd_shelve(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    from minidriver import shelve  # noqa: PLC0415 - loaded by its command only

    return _operate(
        drv,
        args,
        out,
        lambda u: shelve.shelve(drv, u, timeout=args.timeout),
        "{name}: shelved as image {returned.name} ({returned.id})",
    )


def cmd_unshelve(drv: LibvirtDriver, args: argparse.Namespace, out: Output) -> int:
    from minidriver import shelve  # noqa: PLC0415 - loaded by its command only

    return _operate(
        drv,
        args,
        out,
        lambda u: shelve.unshelve(drv, u, timeout=args.timeout),
        "{name}: unshelved",
    )
