"""A pytest plugin: real VMs as fixtures, destroyed whatever the test's outcome.

Registered through the ``pytest11`` entry point, so installing minidriver enables it;
it does nothing until a test asks for one of its fixtures. Importing it imports
neither libvirt nor the driver, opens no connection and makes no directory; it has no
autouse fixture.

Fixtures:

- ``minidriver_vm``: a factory, ``vm = minidriver_vm(image=..., flavor="t1.nano",
  name=None, config_drive=None, user_data=None, hostname=None, meta=None)``, returning
  a :class:`MinidriverVM` (``uuid``, ``name``, ``display_name``, ``console_text()``,
  ``wait_for_console(pattern, timeout)``, ``snapshot(name)``, ``info()``). ``image`` is
  a ``Path`` or an existing file (added to the store once per session, keyed by its
  resolved path) or an image id or name in the store. Every VM a test made is
  destroyed when the test ends, and its snapshots deleted.
- ``minidriver_template``: a session-scoped factory, ``tpl = minidriver_template(
  image=..., flavor="t1.nano", wait_for=REGEX, wait_ssh=False, network=None,
  config_drive=None, key_name=None)``: boots the image once, waits for the console line
  (or the guest's SSH banner), saves it as a template and returns a
  :class:`MinidriverTemplate`; the same arguments return the same template for the
  rest of the session, which deletes it at its end. ``minidriver_vm(template=tpl)``
  then restores a clone of it: RUNNING in about a second, already booted. A clone
  prints no boot lines (its console holds only what the guest writes after the
  restore), and shares the template's hostname, machine-id and SSH host keys.
- ``minidriver_driver``: the session's :class:`~minidriver.driver.LibvirtDriver`.
- ``minidriver_config``: the session's :class:`~minidriver.config.Config`: a fresh state
  dir under ``/var/tmp`` (mode 0755, as a daemon's QEMU runs as ``libvirt-qemu`` and must
  traverse it), removed at the end; or the user's file with ``--minidriver-config``
  (never removed). A conftest may override it, or ``minidriver_driver``, to put the
  plugin on a driver it already has (one embedded root per process, see below).
- ``minidriver_test_image``: the project's test guest (``testimage.build()``).

Options: ``--minidriver-config FILE``, ``--minidriver-connect URI`` (else
``$MINIDRIVER_CONNECTION_URI``, else the config's ``connection_uri``, else auto),
``--minidriver-boot-timeout SECONDS`` (300: the spawn's deadline and the default of
``wait_for_console``), ``--minidriver-keep-on-failure`` (failed tests' VMs stay; the
terminal summary lists them with the command that deletes them).

On a failed test the report gets one section per VM: its state, per-step timings
and the last lines of its console.

Teardown, in every outcome:

- the factory's teardown destroys the test's VMs (a failed, timed-out or interrupted
  test too); a spawn cut short undoes itself (the driver's undo list runs on any
  exception);
- a template whose build fails (its wait runs out, its save fails) or is cut short
  destroys its source guest at once; a clone is a VM like any other; the session's
  templates are deleted at its end, after their clones;
- the session's teardown destroys what survived (VMs whose destroy failed), then, on
  a state dir it made, every instance recorded there and every libvirt domain that
  carries its state id, and removes the dir (with the embedded driver's root);
- a ``pytest_sessionfinish`` wrapper repeats that sweep after all fixtures are torn
  down, for the case where another finalizer's error cut the session teardown short;
- SIGINT: pytest turns it into KeyboardInterrupt and tears every fixture down in
  ``pytest_sessionfinish``; a second Ctrl-C while VMs are being destroyed is held back
  until they are (the run then stops after that test);
- pytest-timeout with the ``signal`` method (the default on Linux) fails the test
  with an exception, and teardown runs as for any failure. The ``thread`` method ends
  the process with ``os._exit``, as does SIGKILL: nothing can clean up then; the state
  dir (``/var/tmp/mdpytest-<pid>-*``) names the process, and
  ``minidriver --state-dir DIR --connect URI delete --all`` removes its VMs.

pytest-xdist: every pytest process, each xdist worker included, gets its own state
dir (``mdpytest-<pid>-``). On a daemon, workers could share one: the state database
serialises writers and the image cache locks each base file. But the embedded driver
(``qemu:///embed``, the fallback where no daemon runs) allows one process per root and
one root per process, and its root lives in the state dir, so workers sharing a state
dir would fail there. One rule that is correct on both connections costs each worker
one copy and conversion of each image into its own cache (for the test guest, about
0.1 s). With ``--minidriver-config`` every worker uses the user's state dir: fine on a
daemon; on the embedded driver the second worker is refused with the process holding
the root named. State dirs sharing a daemon each count their own ``instance-%08x``
names, and the driver checks a name is free before defining it; two of them may pick
the same one at the same moment, and libvirt refuses the second define. The factory
then spawns again (the spawn undid itself; the next try takes the next name).

Bigger than the ~600-line guide: the teardown guarantees above (factory, session,
sessionfinish sweep, SIGINT) and the template fixtures share one registry of what
the session made; split, each part would need the others' internals.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from minidriver.config import Config, load_config
from minidriver.console import ConsoleTimeout, read_console, tail, wait_for_console
from minidriver.exception import ImageNotFound, InstanceNotFound

if TYPE_CHECKING:
    from minidriver.driver import InstanceInfo, LibvirtDriver
    from minidriver.images.store import Image as StoreImage
    from minidriver.objects import Instance

# A daemon's QEMU (libvirt-qemu) must traverse every parent; pytest's temp dirs are 0700.
STATE_ROOT = Path("/var/tmp")
STATE_PREFIX = "mdpytest-"  # short: the embedded root <state dir>/embed must stay short
CONNECTION_ENV = "MINIDRIVER_CONNECTION_URI"
DEFAULT_BOOT_TIMEOUT = 300.0
DEFAULT_FLAVOR = "t1.nano"
CONSOLE_TAIL_LINES = 30
KEPT_PROPERTY = "minidriver_kept"
STOPPED_STATES = ("shutoff", "crashed", "nostate")


class ConsoleWaitFailed(AssertionError):
    """The console did not show the awaited line in time; the message has its tail."""

    def __init__(self, message: str, tail: str) -> None:
        super().__init__(message)
        self.tail = tail


# -- options ------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("minidriver", "minidriver: real VMs as fixtures")
    group.addoption(
        "--minidriver-config",
        metavar="FILE",
        help="use this minidriver config (its state dir, kept after the run) instead of"
        " a fresh state dir per session",
    )
    group.addoption(
        "--minidriver-connect",
        metavar="URI",
        help=f"libvirt URI (default: ${CONNECTION_ENV}, else the config's connection_uri,"
        " else the daemon when it answers, else the embedded driver)",
    )
    group.addoption(
        "--minidriver-boot-timeout",
        type=float,
        default=DEFAULT_BOOT_TIMEOUT,
        metavar="SECONDS",
        help="deadline of each spawn, and of wait_for_console by default (default: 300)",
    )
    group.addoption(
        "--minidriver-keep-on-failure",
        action="store_true",
        help="keep the VMs of failed tests and list them in the terminal summary",
    )


# -- the session's bookkeeping --------------------------------------------------------


@dataclass
class _Registry:
    """What this pytest process made, so that every teardown path finds it."""

    # State dirs this process created, until removed; with their driver once made.
    owned: dict[Path, Config] = field(default_factory=dict)
    drivers: dict[Path, LibvirtDriver] = field(default_factory=dict)
    # VMs spawned and not yet destroyed (uuid -> driver), kept ones excluded.
    live: dict[str, LibvirtDriver] = field(default_factory=dict)
    # State dirs holding VMs kept for failed tests: left in place.
    kept_dirs: set[Path] = field(default_factory=set)
    # Summary lines of kept VMs, gathered from reports (xdist workers' included).
    kept_lines: list[str] = field(default_factory=list)

    def destroy(self, driver: LibvirtDriver, uuid: str) -> None:
        with contextlib.suppress(InstanceNotFound):
            driver.destroy(uuid)
        self.live.pop(uuid, None)

    def sweep(self, driver: LibvirtDriver) -> None:
        """Destroy what this session made on ``driver`` and left alive.

        On a state dir this process made (and kept nothing in), that is everything in
        it: every instance recorded, then every domain carrying its state id (one whose
        spawn was cut short between define and the undo).
        """
        errors: list[BaseException] = []
        for uuid, owner in list(self.live.items()):
            if owner is driver:
                try:
                    self.destroy(driver, uuid)
                except Exception as exc:  # try the others, raise the first
                    errors.append(exc)
        state_path = driver.conf.state_path
        if state_path in self.owned and state_path not in self.kept_dirs:
            for record in driver.db.list_instances():
                try:
                    self.destroy(driver, record.uuid)
                except Exception as exc:
                    errors.append(exc)
            try:
                _sweep_domains(driver)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def remove_state_dir(self, conf: Config) -> None:
        """Remove a state dir this process made, unless VMs were kept in it."""
        state_path = conf.state_path
        if state_path not in self.owned or state_path in self.kept_dirs:
            return
        driver = self.drivers.pop(state_path, None)
        if driver is not None:
            driver.host.close()
            driver.db.close()
        shutil.rmtree(state_path, ignore_errors=True)
        # The embedded root sits in the state dir unless that path was too long for it.
        if not conf.embed_root.is_relative_to(state_path):
            shutil.rmtree(conf.embed_root, ignore_errors=True)
        del self.owned[state_path]

    def final_sweep(self) -> None:
        """After every fixture's teardown: whatever an interrupted teardown left."""
        for driver in {id(d): d for d in [*self.live.values(), *self.drivers.values()]}.values():
            with contextlib.suppress(Exception):
                if driver.conf.state_path.exists():
                    self.sweep(driver)
        for conf in list(self.owned.values()):
            with contextlib.suppress(Exception):
                self.remove_state_dir(conf)


def _sweep_domains(driver: LibvirtDriver) -> list[str]:
    """Destroy and undefine every domain the driver's state dir defined."""
    import libvirt  # noqa: PLC0415 - the plugin loads without libvirt

    swept = []
    for domain in driver.owned_domains().values():
        # A sweep goes on past one domain it cannot remove; what is left shows in libvirt.
        with contextlib.suppress(libvirt.libvirtError):
            driver.host.undefine(domain)
            swept.append(domain.name())
    return swept


_REGISTRY = pytest.StashKey[_Registry]()
_FACTORY = pytest.StashKey["MinidriverVMFactory"]()


def _registry(config: pytest.Config) -> _Registry:
    registry = config.stash.get(_REGISTRY, None)
    if registry is None:
        registry = config.stash[_REGISTRY] = _Registry()
    return registry


@contextlib.contextmanager
def _sigint_held(session: pytest.Session | None = None) -> Iterator[None]:
    """Clean-up that a second Ctrl-C cannot cut short.

    A SIGINT arriving meanwhile is held until the block ends, then asks pytest to stop
    after the current test: raising KeyboardInterrupt from a finalizer would skip the
    finalizers after it (the session's sweep among them).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and session is not None:
            session.shouldstop = "interrupted (SIGINT) while minidriver destroyed VMs"


# -- the VM handle ------------------------------------------------------------------


class MinidriverVM:
    """One VM a test booted: its identity, console, snapshots and state."""

    def __init__(
        self,
        driver: LibvirtDriver,
        instance: Instance,
        *,
        boot_timeout: float,
        on_snapshot: Callable[[str], None],
    ) -> None:
        self.driver = driver
        self.instance = instance
        self.boot_timeout = boot_timeout
        self._on_snapshot = on_snapshot
        self.destroyed = False

    @property
    def uuid(self) -> str:
        return self.instance.uuid

    @property
    def name(self) -> str:
        """The libvirt domain name (``instance-%08x``)."""
        return self.instance.name

    @property
    def display_name(self) -> str:
        return self.instance.display_name

    @property
    def instance_dir(self) -> Path:
        return Path(self.instance.instance_dir)

    @property
    def console_path(self) -> Path:
        return self.instance_dir / "console.log"

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per spawn step (``Instance.timings``)."""
        return self.instance.timings

    def console_text(self) -> str:
        """The whole serial console so far."""
        return read_console(self.console_path)

    def wait_for_console(self, pattern: str, timeout: float | None = None) -> re.Match[str]:
        """Wait until ``pattern`` (a regex, multi-line) matches the console.

        Fails the test (:class:`ConsoleWaitFailed`, an AssertionError) with the last
        console lines after ``timeout`` (default ``--minidriver-boot-timeout``) or as
        soon as the guest stops.
        """
        __tracebackhide__ = True
        wait = self.boot_timeout if timeout is None else timeout
        try:
            return wait_for_console(self.console_path, pattern, wait, alive=self._alive)
        except ConsoleTimeout as exc:
            raise ConsoleWaitFailed(
                f"{self.display_name} ({self.uuid}): {exc}\n--- last console lines ---\n{exc.tail}",
                exc.tail,
            ) from None

    def _alive(self) -> bool:
        return self.info().state not in STOPPED_STATES

    def snapshot(self, name: str) -> StoreImage:
        """A new image of the root disk (live when running), deleted at the test's end."""
        image = self.driver.snapshot(self.uuid, name)
        self._on_snapshot(image.id)
        return image

    def info(self) -> InstanceInfo:
        """What libvirt says of the domain now (``.state``: "running", ...)."""
        return self.driver.get_info(self.uuid)

    def report(self) -> str:
        """The failure report's section: state, timings, the console's last lines."""
        try:
            state = self.info().state
        except Exception as exc:  # a report must not fail
            state = f"unknown ({exc})"
        timings = ", ".join(f"{step} {secs:.3f} s" for step, secs in self.timings.items())
        lines = tail(self.console_text(), CONSOLE_TAIL_LINES)
        return (
            f"instance {self.uuid}  domain {self.name}  flavor {self.instance.flavor.name}"
            f"  state {state}\n"
            f"timings: {timings or 'none'}\n"
            f"console, last {CONSOLE_TAIL_LINES} lines of {self.console_path}:\n"
            f"{lines}\n"
        )

    def __repr__(self) -> str:
        return f"<MinidriverVM {self.display_name} {self.uuid} {self.name}>"


# -- the session's images and the factory -------------------------------------------


class _Session:
    """The session's driver with the images it added (one per image file)."""

    def __init__(self, driver: LibvirtDriver, registry: _Registry, config: pytest.Config):
        self.driver = driver
        self.registry = registry
        self.boot_timeout: float = config.getoption("minidriver_boot_timeout")
        self.keep_on_failure: bool = config.getoption("minidriver_keep_on_failure")
        self._by_path: dict[Path, str] = {}

    def image_ref(self, image: str | os.PathLike[str]) -> str:
        """An image id in the store: a file is added once per session, keyed by path;
        the project's test guest (``minidriver_test_image``) as the Linux it is."""
        if isinstance(image, os.PathLike) or os.path.isfile(image):
            path = Path(image).resolve()
            if path not in self._by_path:
                from minidriver.guestimages import testimage  # noqa: PLC0415 - as the fixture

                test_guest = path.name in (testimage.IMAGE_NAME, testimage.ISO_NAME)
                properties = testimage.IMAGE_PROPERTIES if test_guest else None
                added = self.driver.images.add(path, name=path.name, properties=properties)
                self._by_path[path] = added.id
            return self._by_path[path]
        return self.driver.images.get(image).id

    def close(self) -> None:
        """Destroy what survived on this driver; delete the images the session added."""
        try:
            self.registry.sweep(self.driver)
        finally:
            if not self.registry.kept_dirs:
                for image_id in self._by_path.values():
                    with contextlib.suppress(ImageNotFound):
                        self.driver.images.delete(image_id)
                self._by_path.clear()


class MinidriverVMFactory:
    """``minidriver_vm(image=..., ...)``: boots a VM that lives until the test ends."""

    def __init__(self, session: _Session, item: pytest.Item) -> None:
        self._session = session
        self._item = item
        self.vms: list[MinidriverVM] = []
        self.snapshots: list[str] = []
        self.kept = False

    @property
    def driver(self) -> LibvirtDriver:
        return self._session.driver

    @property
    def boot_timeout(self) -> float:
        return self._session.boot_timeout

    @property
    def keep_on_failure(self) -> bool:
        return self._session.keep_on_failure

    def __call__(
        self,
        *,
        image: str | os.PathLike[str] | None = None,
        flavor: str = DEFAULT_FLAVOR,
        name: str | None = None,
        config_drive: bool | None = None,
        user_data: bytes | str | None = None,
        hostname: str | None = None,
        meta: Mapping[str, str] | None = None,
        template: MinidriverTemplate | str | None = None,
    ) -> MinidriverVM:
        """Boot ``image`` with ``flavor``, or restore a clone of ``template`` (a
        :class:`MinidriverTemplate`, or a template's name or id); returns once the
        domain is RUNNING. A clone is ready then: it goes on from where its template
        was saved, prints no boot lines, and ``wait_for_console`` sees only what it
        writes after the restore.

        ``name`` is the display name (default: the test's name, numbered from the
        second VM on). ``user_data``, ``hostname`` or ``meta`` imply a config drive.
        """
        if (image is None) == (template is None):
            raise TypeError("minidriver_vm: give image= or template=, one of the two")
        display_name = name or self._default_name()
        if template is not None:
            instance = self._clone(template, display_name)
        else:
            assert image is not None
            if isinstance(user_data, str):
                user_data = user_data.encode()
            if config_drive is None and (user_data or hostname or meta):
                config_drive = True
            image_id = self._session.image_ref(image)
            instance = self.driver.spawn(
                display_name,
                image_id,
                flavor,
                timeout=self.boot_timeout,
                config_drive=config_drive,
                user_data=user_data,
                hostname=hostname,
                meta=meta,
            )
        self._session.registry.live[instance.uuid] = self.driver
        vm = MinidriverVM(
            self.driver,
            instance,
            boot_timeout=self.boot_timeout,
            on_snapshot=self.snapshots.append,
        )
        self.vms.append(vm)
        return vm

    def _clone(self, template: MinidriverTemplate | str, display_name: str) -> Instance:
        from minidriver.vmtemplate import Templates  # noqa: PLC0415 - the plugin loads without libvirt

        templates = Templates(self.driver)
        ref = template.id if isinstance(template, MinidriverTemplate) else template
        return templates.spawn(templates.find(ref).id, name=display_name, timeout=self.boot_timeout)

    def _default_name(self) -> str:
        base = re.sub(r"[^A-Za-z0-9-]+", "-", self._item.name).strip("-")[:48] or "vm"
        return base if not self.vms else f"{base}-{len(self.vms) + 1}"

    def destroy(self, vm: MinidriverVM) -> None:
        """Destroy one VM now (the test's end would otherwise)."""
        self._session.registry.destroy(self.driver, vm.uuid)
        vm.destroyed = True

    def keep(self) -> list[str]:
        """Keep this test's VMs (a failed test, ``--minidriver-keep-on-failure``)."""
        registry = self._session.registry
        lines = []
        uri = self.driver.host.uri
        conf = self.driver.conf
        for vm in self.vms:
            if vm.destroyed:
                continue
            registry.live.pop(vm.uuid, None)
            lines.append(
                f"{vm.uuid}  {vm.name}  {vm.display_name}  ({self._item.nodeid})"
                f"  state dir {conf.state_path}  {uri}"
            )
        if lines:
            self.kept = True
            registry.kept_dirs.add(conf.state_path)
            where = ["--config", conf.source] if conf.source else ["--state-dir", conf.state_path]
            uuids = [vm.uuid for vm in self.vms if not vm.destroyed]
            command = shlex.join(
                ["minidriver", *map(str, where), "--connect", uri, "delete", *uuids]
            )
            lines.append(f"  delete with: {command}")
        return lines

    def teardown(self) -> None:
        """Destroy every VM of the test (newest first), then its snapshots."""
        if self.kept:
            return
        errors: list[BaseException] = []
        for vm in reversed(self.vms):
            if vm.destroyed:
                continue
            try:
                self.destroy(vm)
            except BaseException as exc:  # a timeout's Failed too: go on
                errors.append(exc)
        for image_id in self.snapshots:
            with contextlib.suppress(ImageNotFound):
                self.driver.images.delete(image_id)
        if errors:
            raise errors[0]


# -- templates ----------------------------------------------------------------------


@dataclass(frozen=True)
class MinidriverTemplate:
    """A template the session made: a ready guest, saved; clone it with
    ``minidriver_vm(template=...)``."""

    id: str
    name: str
    seconds: float  # boot, wait and save, once for the session


class MinidriverTemplateFactory:
    """``minidriver_template(image=..., wait_for=...)``: a template, made once per
    session for the same arguments, deleted at the session's end."""

    def __init__(self, session: _Session) -> None:
        self._session = session
        self._made: dict[tuple[object, ...], MinidriverTemplate] = {}

    def __call__(
        self,
        *,
        image: str | os.PathLike[str],
        flavor: str = DEFAULT_FLAVOR,
        wait_for: str | None = None,
        wait_ssh: bool = False,
        network: str | None = None,
        config_drive: bool | None = None,
        key_name: str | None = None,
        name: str | None = None,
    ) -> MinidriverTemplate:
        """Boot ``image``, wait until its console matches ``wait_for`` (and/or its
        SSH server answers, ``wait_ssh``), save it as a template. A template must
        be made of a ready guest: give at least one of the two waits."""
        from minidriver.vmtemplate import Templates  # noqa: PLC0415 - the plugin loads without libvirt

        if wait_for is None and not wait_ssh:
            raise TypeError("minidriver_template: give wait_for= or wait_ssh=True")
        image_id = self._session.image_ref(image)
        key = (image_id, flavor, wait_for, wait_ssh, network, config_drive, key_name)
        if key in self._made:
            return self._made[key]
        driver = self._session.driver
        timeout = self._session.boot_timeout
        started = time.monotonic()
        tpl_name = name or f"pytest-template-{len(self._made) + 1}-{os.getpid()}"
        instance = driver.spawn(
            f"{tpl_name}-source",
            image_id,
            flavor,
            timeout=timeout,
            network=network,
            config_drive=config_drive,
            key_name=key_name,
        )
        self._session.registry.live[instance.uuid] = driver
        try:
            self._wait_ready(instance, tpl_name, wait_for, wait_ssh, started)
            record = Templates(driver).create(instance.uuid, tpl_name)
        except BaseException:
            # Now, not at the session's end: the source would run until then.
            with _sigint_held():
                self._session.registry.destroy(driver, instance.uuid)
            raise
        self._session.registry.live.pop(instance.uuid, None)  # consumed
        made = MinidriverTemplate(record.id, record.name, time.monotonic() - started)
        self._made[key] = made
        return made

    def _wait_ready(
        self,
        instance: Instance,
        tpl_name: str,
        wait_for: str | None,
        wait_ssh: bool,
        started: float,
    ) -> None:
        """Until the template's source guest is ready, within the boot timeout; a
        console that never matches fails as a VM's ``wait_for_console`` does, with
        its last lines."""
        from minidriver import ssh  # noqa: PLC0415 - the plugin loads without libvirt

        __tracebackhide__ = True
        driver = self._session.driver
        timeout = self._session.boot_timeout
        alive = lambda: driver.get_info(instance.uuid).state == "running"  # noqa: E731
        if wait_for is not None:
            log = Path(instance.instance_dir) / "console.log"
            remaining = max(0.0, timeout - (time.monotonic() - started))
            try:
                wait_for_console(log, wait_for, remaining, alive=alive)
            except ConsoleTimeout as exc:
                raise ConsoleWaitFailed(
                    f"template {tpl_name}, its source {instance.display_name}: {exc}\n"
                    f"--- last console lines ---\n{exc.tail}",
                    exc.tail,
                ) from None
        if wait_ssh:
            port = driver.db.get_instance(instance.uuid).forward_port
            if port is None:
                raise TypeError("minidriver_template: wait_ssh needs the user network")
            remaining = max(0.0, timeout - (time.monotonic() - started))
            ssh.wait_for_banner(port, remaining, alive=alive)

    def close(self) -> None:
        """Delete the session's templates (their clones are gone by now)."""
        from minidriver.vmtemplate import TemplateNotFound, Templates  # noqa: PLC0415

        templates = Templates(self._session.driver)
        errors: list[BaseException] = []
        for made in self._made.values():
            try:
                templates.delete(made.id)
            except TemplateNotFound:
                pass
            except Exception as exc:  # a kept clone holds it: go on with the others
                errors.append(exc)
        self._made.clear()
        if errors and not self._session.registry.kept_dirs:
            raise errors[0]


# -- fixtures -----------------------------------------------------------------------


def _connection_override(config: pytest.Config) -> str | None:
    option: str | None = config.getoption("minidriver_connect")
    if option is not None:
        return option
    return os.environ.get(CONNECTION_ENV) or None


@pytest.fixture(scope="session")
def minidriver_config(pytestconfig: pytest.Config) -> Iterator[Config]:
    """The session's config: ``--minidriver-config FILE``, else a fresh state dir."""
    registry = _registry(pytestconfig)
    uri = _connection_override(pytestconfig)
    path: str | None = pytestconfig.getoption("minidriver_config")
    if path:
        conf = load_config(path)
        yield conf if uri is None else conf.with_libvirt(connection_uri=uri)
        return
    # The pid tells whose dir it is (an xdist worker's, a killed run's).
    state = Path(tempfile.mkdtemp(prefix=f"{STATE_PREFIX}{os.getpid()}-", dir=STATE_ROOT))
    state.chmod(0o755)
    conf = load_config(None, state_dir=state, environ={})
    if uri is not None:
        conf = conf.with_libvirt(connection_uri=uri)
    registry.owned[conf.state_path] = conf
    try:
        yield conf
    finally:
        with _sigint_held():
            registry.remove_state_dir(conf)


@pytest.fixture(scope="session")
def minidriver_driver(
    pytestconfig: pytest.Config, minidriver_config: Config
) -> Iterator[LibvirtDriver]:
    """The session's LibvirtDriver; at the end, what it made is gone."""
    from minidriver.driver import LibvirtDriver  # noqa: PLC0415 - the plugin loads without libvirt

    registry = _registry(pytestconfig)
    driver = LibvirtDriver(minidriver_config)
    if minidriver_config.state_path in registry.owned:
        registry.drivers[minidriver_config.state_path] = driver
    try:
        driver.host.get_connection()  # libvirt's refusal shows as this fixture's error
        yield driver
    finally:
        with _sigint_held():
            try:
                registry.sweep(driver)
            finally:
                driver.host.close()


@pytest.fixture(scope="session")
def _minidriver_session(
    pytestconfig: pytest.Config, minidriver_driver: LibvirtDriver
) -> Iterator[_Session]:
    session = _Session(minidriver_driver, _registry(pytestconfig), pytestconfig)
    try:
        yield session
    finally:
        with _sigint_held():
            session.close()


@pytest.fixture
def minidriver_vm(
    request: pytest.FixtureRequest, _minidriver_session: _Session
) -> Iterator[MinidriverVMFactory]:
    """A factory of VMs, every one destroyed when the test ends (whatever its outcome)."""
    assert isinstance(request.node, pytest.Item)
    factory = MinidriverVMFactory(_minidriver_session, request.node)
    request.node.stash[_FACTORY] = factory
    try:
        yield factory
    finally:
        with _sigint_held(request.session):
            factory.teardown()


@pytest.fixture(scope="session")
def minidriver_template(
    _minidriver_session: _Session,
) -> Iterator[MinidriverTemplateFactory]:
    """A factory of templates (boot, wait, save), each made once per session and
    deleted at its end; clone one with ``minidriver_vm(template=...)``."""
    factory = MinidriverTemplateFactory(_minidriver_session)
    try:
        yield factory
    finally:
        with _sigint_held():
            factory.close()


@pytest.fixture(scope="session")
def minidriver_test_image() -> Path:
    """The project's test guest (qcow2), built once and cached (testimage.build)."""
    from minidriver.guestimages import testimage  # noqa: PLC0415 - only this fixture needs the builder

    return testimage.build(log=lambda _msg: None)


# -- reports ------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    factory = item.stash.get(_FACTORY, None)
    if factory is None or not report.failed or report.when == "teardown":
        return report
    for vm in factory.vms:
        if not vm.destroyed:
            report.sections.append((f"minidriver vm {vm.display_name}", vm.report()))
    if factory.keep_on_failure and not factory.kept:
        kept = factory.keep()
        if kept:
            report.user_properties.append((KEPT_PROPERTY, kept))
    return report


class _KeptSummary:
    """Lists kept VMs at the end, from the reports (on the xdist controller: the
    workers' reports, whose ``user_properties`` travel with them)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in report.user_properties:
            if name == KEPT_PROPERTY and isinstance(value, list | tuple):
                _registry(self.config).kept_lines.extend(map(str, value))

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        lines = _registry(self.config).kept_lines
        if lines:
            terminalreporter.section("minidriver: VMs kept for failed tests")
            for line in lines:
                terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_KeptSummary(config), "minidriver-kept-summary")


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        registry = session.config.stash.get(_REGISTRY, None)
        if registry is not None:
            with _sigint_held():
                registry.final_sweep()
