"""The power operations of nova/virt/libvirt/driver.py: power_off, power_on, reboot,
suspend, resume, and the clean shutdown they share.

``PowerOperations`` is a part of ``LibvirtDriver`` (a mixin), kept apart so that the
driver's module holds spawn and its steps; every public method is the driver's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import libvirt

from minidriver import backing, guest, guestagent, instance_xml, power_sync
from minidriver.exception import MinidriverError
from minidriver.fileutils import write_private
from minidriver.network import NetworkMode
from minidriver.objects import Flavor, Instance
from minidriver.steps import StepTimer
from minidriver.vif import launch_with_network, plug_vifs
from minidriver.vm_states import VMState

if TYPE_CHECKING:
    from minidriver import rbd_utils
    from minidriver.config import Config
    from minidriver.db import Database
    from minidriver.driver import LibvirtDriver
    from minidriver.host import Host
    from minidriver.images.store import ImageService
    from minidriver.ports import PortReservations

LOG = logging.getLogger(__name__)


_Method = TypeVar("_Method", bound=Callable[..., Any])

# The instances a power operation of this process is changing, whichever driver or
# host runs it: their lifecycle events meanwhile are the operation's own, and it
# records the outcome (Nova's sync skips an instance with a task state).
_POWER_TASKS: set[str] = set()
_POWER_TASKS_LOCK = threading.Lock()


@contextlib.contextmanager
def power_task(instance_uuid: str) -> Iterator[None]:
    """Marks ``instance_uuid`` as changing under a power operation of this process."""
    with _POWER_TASKS_LOCK:
        mine = instance_uuid not in _POWER_TASKS
        _POWER_TASKS.add(instance_uuid)
    try:
        yield
    finally:
        if mine:
            with _POWER_TASKS_LOCK:
                _POWER_TASKS.discard(instance_uuid)


def _power_task(method: _Method) -> _Method:
    """The operation (its first argument the instance's uuid) run as a power task."""

    @functools.wraps(method)
    def run(self: PowerOperations, instance_uuid: str, *args: Any, **kwargs: Any) -> Any:
        with power_task(instance_uuid):
            return method(self, instance_uuid, *args, **kwargs)

    return cast(_Method, run)


class PowerOperations:
    """The driver's power operations; what they use of the driver is declared here."""

    conf: Config
    db: Database
    host: Host
    ports: PortReservations
    clock: Callable[[], float]

    if TYPE_CHECKING:
        images: ImageService

        def _domain_of(self, instance_uuid: str) -> libvirt.virDomain: ...
        def get_flavor(self, name: str) -> Flavor: ...
        def rbd_driver(self, pool: str | None = None) -> rbd_utils.RBDDriver: ...
        def instance_disks(
            self, instance_dir: Path, instance_uuid: str
        ) -> dict[str, str] | None: ...
        def create_kernel_ramdisk(self, instance: Instance, *, timer: StepTimer) -> None: ...
        def wait_for_running(
            self, instance: Instance, domain: libvirt.virDomain, timeout: float | None = None
        ) -> None: ...

    def _init_power_sync(self) -> None:
        """Lifecycle events keep this state dir's records in step while the driver
        lives (``power_sync``); the instances a power operation is changing are left
        to that operation (``power_task``)."""
        self.host.add_lifecycle_listener(self._handle_lifecycle_event)

    def sync_power_states(self) -> list[str]:
        """Nova's ``_sync_power_states``: every record brought in step with libvirt's
        power state; the uuids of those changed."""
        return power_sync.sync_power_states(self.db, self.host, self.conf.default.host)

    def _handle_lifecycle_event(self, instance_uuid: str, event: int, _detail: int) -> None:
        with _POWER_TASKS_LOCK:
            if instance_uuid in _POWER_TASKS:
                return
        if self.db.closed:
            return  # this driver is done with; a host it shared goes on with others
        try:
            power_sync.handle_lifecycle_event(
                self.db, self.host, self.conf.default.host, instance_uuid, event
            )
        except Exception:
            if self.db.closed:
                return  # closed while the event was handled
            # In libvirt's event loop thread: nothing above it to report to.
            LOG.exception("lifecycle event of %s not recorded", instance_uuid)

    def _clean_shutdown(self, domain: libvirt.virDomain, timeout: float) -> bool:
        """Nova's ``_clean_shutdown``: the guest asked to shut down (ACPI), then waited
        for up to ``timeout`` seconds; True when it stopped."""
        domain.shutdown()
        reached = self.host.wait_for_state(
            domain,
            "shutoff",
            timeout,
            interval=self.conf.libvirt.wait_interval,
            clock=self.clock,
        )
        return reached == "shutoff"

    @_power_task
    def power_off(self, instance_uuid: str, *, timeout: float = 60, force: bool = False) -> bool:
        """Nova's ``power_off``: an ACPI shutdown, then a hard stop after ``timeout``
        (Nova's ``shutdown_timeout``, 60 s; Nova also repeats the request every
        ``shutdown_retry_interval``, which we do not).

        Returns True when the guest shut down cleanly (False: it was stopped hard).
        """
        self._refuse_in_operation(instance_uuid, "stopped")
        domain = self._domain_of(instance_uuid)
        self._refuse_if_suspended(instance_uuid, "stop")
        clean = False
        if domain.isActive():
            if not force:
                clean = self._clean_shutdown(domain, timeout)
            if not clean:
                with contextlib.suppress(libvirt.libvirtError):
                    domain.destroy()  # it may have stopped just now
        self.db.update_instance(instance_uuid, state="shutoff", vm_state=VMState.STOPPED)
        return clean

    @_power_task
    def power_on(self, instance_uuid: str) -> None:
        """Nova's ``power_on``, which is its ``_hard_reboot`` (see there). A suspended
        instance is resumed instead: libvirt's start of a domain with a managed save
        image restores that image (its memory is kept), and its clock is set as
        ``resume`` sets it."""
        self._refuse_in_operation(instance_uuid, "started")
        domain = self._domain_of(instance_uuid)
        if domain.isActive():
            self.db.update_instance(instance_uuid, state="running", vm_state=VMState.ACTIVE)
            return
        if domain.hasManagedSaveImage(0) != 1:
            self._hard_reboot(instance_uuid, domain)
            return
        domain = self._reserve_forward_port_again(instance_uuid, domain)
        self.host.launch(domain)
        self.db.update_instance(instance_uuid, state="running", vm_state=VMState.ACTIVE)
        # As Nova's resume does: the guest's clock stood still while it was saved.
        if guestagent.has_agent_channel(domain.XMLDesc(0)):
            guestagent.sync_guest_time(domain)

    def _hard_reboot(self, instance_uuid: str, domain: libvirt.virDomain) -> None:
        """Nova's ``_hard_reboot``: the domain stopped; its XML generated again from the
        record through spawn's ``to_xml`` (``instance_xml``: the image's metadata kept
        at boot, the disks it has, its volumes, today's options); the disks and backing
        files it needs made again where missing (``backing``: Nova's
        ``_create_images_and_backing``; a ``_base`` file the cache manager removed is
        fetched again through the cache, with its checks and lock); the VIF plugged,
        the XML defined over the domain (same uuid and name) and written to
        ``libvirt.xml``, the domain launched (Nova's ``_create_guest_with_network``,
        with ``vifs_already_plugged`` as Nova's hard reboot passes it: no pause, no
        wait for ``network-vif-plugged``), waited for until RUNNING.

        Where we differ: Nova undefines the domain (its ``destroy``) and defines the
        new XML; we define it over the stopped domain, which libvirt replaces whole.
        What ``instance_xml`` cannot generate faithfully keeps its definition (a
        warning says why), its forwarded port moved if another holds it now
        (``_reserve_forward_port_again``).
        """
        if domain.isActive():
            with contextlib.suppress(libvirt.libvirtError):
                domain.destroy()  # it may have stopped just now
        domain = self._reserve_forward_port_again(instance_uuid, domain)
        record = self.db.get_instance(instance_uuid)  # with the port reserved now
        xml = instance_xml.guest_xml(
            cast("LibvirtDriver", self), record, domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        )
        disks = self.instance_disks(Path(record.instance_dir), record.uuid) or {}
        made = backing.create_images_and_backing(
            self.conf,
            self.images,
            record,
            self.get_flavor(record.flavor),
            disks,
            rbd_driver=self.rbd_driver,
        )
        instance = instance_xml.instance_of(
            cast("LibvirtDriver", self), record, self.get_flavor(record.flavor)
        )
        if record.kernel_id and not record.template_id:  # a clone's are its template's
            self.create_kernel_ramdisk(instance, timer=StepTimer())
        if made:
            LOG.warning("%s: made again before its start: %s", record.display_name, ", ".join(made))
        timer = StepTimer()
        vif = instance_xml.vif_of(record)
        plug_vifs(self.host, vif, timer)
        if xml is not None:
            domain = self.host.define(xml)
            write_private(Path(record.instance_dir) / "libvirt.xml", xml)
        launch_with_network(self.host, domain, vif, self.conf, timer, vifs_already_plugged=True)
        self.wait_for_running(instance, domain)  # as Nova's _hard_reboot waits
        self.db.update_instance(instance_uuid, state="running", vm_state=VMState.ACTIVE)

    @_power_task
    def suspend(self, instance_uuid: str) -> None:
        """Nova's ``suspend``: the guest's memory saved by libvirt's managed save, the
        domain stopped (power state shutoff), vm_state suspended."""
        self._refuse_in_operation(instance_uuid, "suspended")
        domain = self._domain_of(instance_uuid)
        if not domain.isActive():
            record = self.db.get_instance(instance_uuid)
            raise MinidriverError(
                f"instance {record.display_name} is not running; only a running one"
                " can be suspended",
                hint=f"start it first: minidriver start {record.display_name}",
            )
        domain.managedSave(0)
        self.db.update_instance(instance_uuid, state="shutoff", vm_state=VMState.SUSPENDED)

    @_power_task
    def resume(self, instance_uuid: str) -> None:
        """Nova's ``resume``: the domain started again from its managed save image."""
        record = self.db.get_instance(instance_uuid)
        domain = self._domain_of(instance_uuid)
        if domain.isActive() or not domain.hasManagedSaveImage(0):
            raise MinidriverError(
                f"instance {record.display_name} is not suspended"
                f" ({self.host.domain_state(domain)}, vm_state {record.vm_state})",
                hint="only a suspended instance resumes",
            )
        self.power_on(instance_uuid)  # restores the saved memory, sets the clock

    def _refuse_in_operation(self, instance_uuid: str, what: str) -> None:
        """A rescued, resized or shelved instance is not stopped, started, rebooted or
        suspended until that operation ends, as Nova's API allows these in other
        vm_states only (its ``check_instance_state``): the domain stands for the
        operation, and a power operation would record the instance active or stopped."""
        record = self.db.get_instance(instance_uuid)
        ends = {
            VMState.RESCUED: "unrescue it first: minidriver unrescue",
            VMState.RESIZED: "confirm or revert the resize first: minidriver resize-confirm"
            " or resize-revert",
            VMState.SHELVED_OFFLOADED: "unshelve it first: minidriver unshelve",
        }
        if record.vm_state in ends:
            raise MinidriverError(
                f"instance {record.display_name} is {record.vm_state}: it cannot be {what}",
                hint=f"{ends[VMState(record.vm_state)]} {record.display_name}",
            )

    def _refuse_if_suspended(self, instance_uuid: str, what: str) -> None:
        record = self.db.get_instance(instance_uuid)
        if record.vm_state == VMState.SUSPENDED:
            raise MinidriverError(
                f"instance {record.display_name} is suspended: {what} would lose its saved memory",
                hint=f"resume it first (minidriver resume {record.display_name}), or delete it",
            )

    def _reserve_forward_port_again(
        self, instance_uuid: str, domain: libvirt.virDomain
    ) -> libvirt.virDomain:
        """The port a stopped or suspended instance forwards, reserved again: the
        reservations live under /run, which a reboot empties, and a program may listen
        on the port meanwhile, so another instance or program may hold it now. Then
        another port is reserved and the domain defined again with it; a suspended
        one's saved memory too, whose XML, not the definition, is what its start
        restores (QEMU would fail on the old port)."""
        record = self.db.get_instance(instance_uuid)
        old = record.forward_port
        if record.network_mode != NetworkMode.USER or old is None:
            return domain
        port = self.ports.reserve(
            state_path=self.conf.state_path,
            state_id=self.db.state_id,
            instance_uuid=instance_uuid,
            prefer=old,
        )
        if port == old:
            return domain
        with contextlib.ExitStack() as undo:
            undo.callback(self.ports.release, port, instance_uuid)
            if domain.hasManagedSaveImage(0):
                secure = libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE
                saved = domain.managedSaveGetXMLDesc(secure)
                domain.managedSaveDefineXML(guest.with_forward_port(saved, port), 0)
                undo.callback(domain.managedSaveDefineXML, saved, 0)
            xml = guest.with_forward_port(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), port)
            domain = self.host.define(xml)
            self.db.update_instance(instance_uuid, forward_port=port)
            undo.pop_all()
        (Path(record.instance_dir) / "libvirt.xml").write_text(xml)
        self.ports.release(old, instance_uuid)  # if it is still ours (a listener took it)
        LOG.warning(
            "%s: port %d is taken; its SSH is forwarded from 127.0.0.1:%d now",
            record.display_name,
            old,
            port,
        )
        return domain

    @_power_task
    def reboot(self, instance_uuid: str, *, hard: bool = False) -> str:
        """Soft, as Nova's ``_soft_reboot``: the guest is asked to shut down (ACPI),
        waited for up to ``[libvirt] wait_soft_reboot_seconds``, and launched again by
        this process; a guest that does not stop in time is rebooted hard, as Nova's
        ``reboot`` falls back. Hard: ``_hard_reboot``. Returns the reboot done:
        "soft" or "hard".

        A stopped instance is rebooted hard (Nova's ``_soft_reboot`` finds no running
        guest to ask and fails, and its ``reboot`` falls back to ``_hard_reboot``).
        A suspended one has no guest to ask: a soft reboot is refused, as Nova's API
        refuses it (``vm_states.ALLOW_SOFT_REBOOT`` is active only); a hard one boots
        it afresh, its saved memory discarded, as Nova's ``_hard_reboot`` discards it
        (its ``destroy`` undefines the domain with its managed save), where a plain
        start would restore it.
        """
        self._refuse_in_operation(instance_uuid, "rebooted")
        domain = self._domain_of(instance_uuid)
        if domain.isActive() and not hard:
            # Not libvirt's reboot: its restart needs a libvirt alive when the guest
            # stops, and on the embedded driver that is this process, gone by then.
            wait = self.conf.libvirt.wait_soft_reboot_seconds
            if self._clean_shutdown(domain, wait):
                self.host.launch(domain)
                self.db.update_instance(instance_uuid, state="running", vm_state=VMState.ACTIVE)
                return "soft"
            LOG.warning(
                "%s: soft reboot timed out after %d s: hard reboot",
                self.db.get_instance(instance_uuid).display_name,
                wait,
            )
        elif domain.hasManagedSaveImage(0):
            if not hard:
                name = self.db.get_instance(instance_uuid).display_name
                raise MinidriverError(
                    f"instance {name} is suspended: no guest runs to reboot",
                    hint=f"resume it (minidriver resume {name}), or boot it afresh with"
                    f" `minidriver reboot --hard {name}` (its saved memory is discarded)",
                )
            domain.managedSaveRemove(0)
        self._hard_reboot(instance_uuid, domain)
        return "hard"
