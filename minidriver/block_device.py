"""Volumes attached to instances and detached from them (nova/virt/block_device.py's
``DriverVolumeBlockDevice``, with the libvirt driver's ``attach_volume`` and
``detach_volume`` of nova/virt/libvirt/driver.py).

Attach: the next free device by blockinfo's naming, a PCI slot clear of the
user-mode NIC's, the disk XML from ``guest`` (its template), then
``virDomainAttachDeviceFlags`` with CONFIG, and LIVE when the guest runs or is paused
(Nova's flags); the record moves available -> in-use once libvirt has the disk.

Detach, in Nova's order: the disk leaves the definition (CONFIG), then the running
guest (LIVE), asked again up to ``device_detach_attempts`` times, each time waiting
up to ``device_detach_timeout`` seconds for the guest to release it (polling the live
XML). A guest that never releases it gets the disk back in its definition, so the
definition and the running domain agree, and a clear error; the record stays in-use.

``libvirt.xml`` follows every change. A volume is not one of the instance's disks
(``disk.info``'s files, its ``<uuid>_*`` RBD images: what the image backend made and a
delete removes); ``show`` lists attached volumes from their records.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt

from minidriver import blockinfo, guest
from minidriver.config import Config
from minidriver.db import Database, InstanceRecord
from minidriver.exception import ImageNotFound, MinidriverError
from minidriver.fileutils import write_private
from minidriver.host import Host
from minidriver.images.store import ImageService
from minidriver.lockutils import external_lock, instance_lock_name
from minidriver.objects import DiskBus, DiskInfo
from minidriver.volume.api import Attachment, VolumeAPI, VolumeError, VolumeRecord

LOG = logging.getLogger(__name__)

DETACH_POLL = 0.1  # seconds between looks at the live XML while the guest lets go


class DeviceDetachFailed(MinidriverError):
    """The guest did not release a detached disk in time (Nova's DeviceDetachFailed)."""


def require_domain(host: Host, record: InstanceRecord, state_id: str) -> libvirt.virDomain:
    """The instance's domain, defined by this state dir; a clear error when it has none."""
    domain = host.owned_domain(record.uuid, state_id)
    if domain is None:
        raise MinidriverError(
            f"instance {record.display_name} ({record.uuid}) has no domain {record.name}",
            hint="delete it and boot again",
        )
    return domain


class BlockDeviceManager:
    """Attach and detach volumes of one state dir's instances."""

    def __init__(
        self,
        conf: Config,
        db: Database,
        host: Host,
        volumes: VolumeAPI,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.conf = conf
        self.db = db
        self.host = host
        self.volumes = volumes
        self.clock = clock
        self.sleep = sleep

    @contextlib.contextmanager
    def _locked(self, record: InstanceRecord, volume: VolumeRecord) -> Iterator[None]:
        # The instance's lock first, as spawn and destroy take it: no delete between.
        with (
            external_lock(self.conf.locks_dir, instance_lock_name(record.uuid)),
            self.volumes.locked(volume.id),
        ):
            yield

    def _domain(self, record: InstanceRecord) -> libvirt.virDomain:
        return require_domain(self.host, record, self.db.state_id)

    @staticmethod
    def _is_live(domain: libvirt.virDomain) -> bool:
        """Nova's test: the live domain is changed too when it runs or is paused."""
        state = domain.state()[0]
        return state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED)

    def _save_definition(self, record: InstanceRecord, domain: libvirt.virDomain) -> None:
        xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        write_private(Path(record.instance_dir) / "libvirt.xml", xml)

    # -- attach ---------------------------------------------------------------

    def attach_volume(
        self, instance_ref: str, volume_ref: str, *, device: str | None = None
    ) -> Attachment:
        record = self.db.find_instance(instance_ref)
        volume = self.volumes.get(volume_ref)
        with self._locked(record, volume):
            volume = self.volumes.get(volume.id)  # again, under the lock
            self.volumes.check_attachable(volume, record.uuid)
            domain = self._domain(record)
            live = self._is_live(domain)
            xmls = [domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)]
            if live:
                xmls.append(domain.XMLDesc(0))
            used = {dev for xml in xmls for dev in guest.disk_targets(xml)}
            dev = blockinfo.get_volume_device(used, DiskBus.VIRTIO, device)
            pci = guest.free_volume_pci_address(*xmls, machine_type=guest.machine_type_of(xmls[0]))
            # Asked before libvirt is: an unreachable cluster fails here, nothing done.
            connection = self.volumes.connection(volume)
            disk = guest.get_volume_disk(
                connection.path,
                connection.driver_format,
                network=connection.network,
                dev=dev,
                bus=DiskBus.VIRTIO.value,
                cache=guest.disk_cachemode(Path(record.instance_dir)),
                serial=volume.id,
                pci_address=pci,
            )
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
            if live:
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            LOG.debug("attaching %s to %s as %s (live: %s)", volume.id, record.name, dev, live)
            try:
                domain.attachDeviceFlags(guest.disk_to_xml(disk), flags)
            except libvirt.libvirtError as exc:
                raise VolumeError(
                    f"libvirt did not attach volume {volume.describe()} to"
                    f" {record.display_name} as {dev}: {exc.get_error_message()}",
                    hint="the volume stays available; `minidriver --debug` shows the disk XML",
                ) from exc
            attachment = Attachment(volume.id, record.uuid, dev)
            try:
                self.volumes.record_attachment(attachment)
            except BaseException:
                # No disk in the domain that no record names.
                with contextlib.suppress(libvirt.libvirtError):
                    domain.detachDeviceFlags(guest.disk_to_xml(disk), flags)
                raise
            self._save_definition(record, domain)
        return attachment

    # -- detach ---------------------------------------------------------------

    def detach_volume(self, instance_ref: str, volume_ref: str) -> VolumeRecord:
        record = self.db.find_instance(instance_ref)
        volume = self.volumes.get(volume_ref)
        with self._locked(record, volume):
            volume = self.volumes.get(volume.id)
            attachment = volume.attachment
            if attachment is None or attachment.instance_uuid != record.uuid:
                raise VolumeError(
                    f"volume {volume.describe()} is not attached to {record.display_name}",
                    hint="minidriver volume list shows where each volume is attached",
                )
            if attachment.boot_index == 0:
                raise VolumeError(
                    f"volume {volume.describe()} is the root disk of {record.display_name}",
                    hint="a root volume stays until the instance is deleted",
                )
            domain = self._domain(record)
            self._detach(domain, record, attachment.device)
            self.volumes.forget_attachment(volume.id)
            self._save_definition(record, domain)
        return self.volumes.get(volume.id)

    def _detach(self, domain: libvirt.virDomain, record: InstanceRecord, dev: str) -> None:
        """Nova's ``_detach_with_retry``: the definition first, then the live guest."""
        persistent = guest.find_disk_xml(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), dev)
        live = self._is_live(domain) and guest.find_disk_xml(domain.XMLDesc(0), dev) is not None
        if persistent is None and not live:
            LOG.warning("%s: no disk %s in the domain any more", record.name, dev)
            return
        if persistent is not None:
            domain.detachDeviceFlags(persistent, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if not live:
            return
        try:
            self._detach_live(domain, record, dev)
        except BaseException:
            if persistent is not None:
                # The guest still has the disk: so has its definition again.
                domain.attachDeviceFlags(persistent, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            raise

    def _detach_live(self, domain: libvirt.virDomain, record: InstanceRecord, dev: str) -> None:
        opts = self.conf.libvirt
        for attempt in range(1, opts.device_detach_attempts + 1):
            current = guest.find_disk_xml(domain.XMLDesc(0), dev)
            if current is None:
                return
            LOG.debug("detaching %s from %s (attempt %d)", dev, record.name, attempt)
            try:
                domain.detachDeviceFlags(current, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                # Asked again while the guest is still letting go: not an error yet.
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_FAILED:
                    raise
                LOG.debug("detach of %s: %s", dev, exc.get_error_message())
            deadline = self.clock() + opts.device_detach_timeout
            while self.clock() < deadline:
                if guest.find_disk_xml(domain.XMLDesc(0), dev) is None:
                    return
                self.sleep(DETACH_POLL)
        raise DeviceDetachFailed(
            f"the guest of {record.display_name} did not release {dev} within"
            f" {opts.device_detach_attempts} attempts of {opts.device_detach_timeout} s;"
            " it stays attached",
            hint="is the guest's kernel up and does it handle ACPI PCI hot-unplug? try again,"
            " or stop the instance and detach it then",
        )

    def forget_instance(self, instance_uuid: str) -> list[Attachment]:
        """A deleted instance's attachments: its volumes become available again (the
        domain is gone, so there is nothing to detach from). Returns them."""
        attachments = self.volumes.attachments_of(instance_uuid)
        for attachment in attachments:
            self.volumes.forget_attachment(attachment.volume_id)
        return attachments

    # -- boot from volume ---------------------------------------------------------

    def root_volume(
        self,
        boot_volume: str | None,
        volume_size: int | None,
        *,
        image: str,
        name: str,
        undo: contextlib.ExitStack,
    ) -> VolumeRecord | None:
        """The volume a boot puts its root on: ``boot_volume``; or, with
        ``volume_size`` (GB), a new one made from ``image`` and named ``name`` (Nova's
        source=image, dest=volume), which ``undo`` deletes again; None for neither."""
        if volume_size is None:
            return self.volumes.get(boot_volume) if boot_volume is not None else None
        if boot_volume is not None:
            raise MinidriverError(
                "give --boot-volume or --volume-size, not both",
                hint="--volume-size makes a new volume from --image",
            )
        volume = self.volumes.create(volume_size, image=image, name=name)
        undo.callback(self.volumes.delete, volume.id)
        return volume

    @staticmethod
    def image_of_volume(volume: VolumeRecord, images: ImageService) -> str:
        """The image a volume was made from: its properties decide the buses, the
        kernel and the config drive, as Nova reads a volume's image metadata."""
        if not volume.image_id:
            raise MinidriverError(
                f"volume {volume.describe()} was not made from an image: nothing to boot",
                hint="make a bootable one: minidriver volume create --size GB --image IMAGE",
            )
        try:
            return images.get(volume.image_id).id
        except ImageNotFound:
            raise MinidriverError(
                f"image {volume.image_id}, which volume {volume.describe()} was made from,"
                " is gone: its properties (disk bus, kernel) are not known any more",
                hint="boot a volume made from an image that still exists",
            ) from None

    def claim_root_volume(
        self,
        instance_uuid: str,
        volume: VolumeRecord | None,
        disk_info: DiskInfo,
        session: contextlib.ExitStack,
        undo: contextlib.ExitStack,
    ) -> dict[str, guest.GuestVolume]:
        """A spawn's root volume, locked for the spawn (``session``), recorded in-use
        as the instance's root (boot index 0); ``undo`` makes it available again. By
        disk_info name; none when the root is no volume."""
        if volume is None:
            return {}
        session.enter_context(self.volumes.locked(volume.id))
        volume = self.volumes.get(volume.id)
        self.volumes.check_attachable(volume, instance_uuid)
        name = f"volume-{volume.id}"
        connection = self.volumes.connection(volume)
        self.volumes.record_attachment(
            Attachment(volume.id, instance_uuid, disk_info[name].dev, boot_index=0)
        )
        undo.callback(self.volumes.forget_attachment, volume.id)
        return {name: guest.GuestVolume(connection.path, connection.network, volume.id)}
