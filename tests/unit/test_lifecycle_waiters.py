"""Lifecycle waiters (``Host.lifecycle_waiter``) registered and dropped from many
threads while libvirt's event loop thread delivers events, on libvirt's test driver."""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Iterator

import libvirt
import pytest

from minidriver.config import Config
from minidriver.host import Host

THREADS = 8
ROUNDS = 20000  # registrations per thread

DOMAIN = """\
<domain type='test'>
  <name>waited</name>
  <uuid>{uuid}</uuid>
  <memory>65536</memory>
  <os><type>hvm</type></os>
</domain>
"""


@pytest.fixture
def host(conf: Config) -> Iterator[Host]:
    host = Host(conf)
    yield host
    host.close()


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Threads switch every microsecond (Python's default: 5 ms), so that two threads
    interleave inside the few lines a waiter's registration takes."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_waiters_from_many_threads_while_events_arrive(host: Host, fast_switching: None) -> None:
    domain_uuid = str(uuid.uuid4())
    domain = host.get_connection().defineXML(DOMAIN.format(uuid=domain_uuid))
    errors: list[BaseException] = []
    done = threading.Event()

    def register_and_drop() -> None:
        try:
            for _ in range(ROUNDS):
                with host.lifecycle_waiter(domain_uuid):
                    pass
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    def events() -> None:
        # Start and stop the domain: each is a lifecycle event on the loop thread.
        while not done.is_set():
            domain.create()
            domain.destroy()

    workers = [threading.Thread(target=register_and_drop) for _ in range(THREADS)]
    toggler = threading.Thread(target=events)
    toggler.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    toggler.join()

    assert errors == []
    # The registry is whole afterwards: a new waiter still hears the next event.
    with host.lifecycle_waiter(domain_uuid) as changed:
        domain.create()
        assert changed.wait(10), "no lifecycle event reached the waiter"
    domain.destroy()
    domain.undefine()
    with pytest.raises(libvirt.libvirtError):
        host.get_connection().lookupByUUIDString(domain_uuid)
