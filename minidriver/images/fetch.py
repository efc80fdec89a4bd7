"""Nova's ``images.fetch_to_raw``: an image from the store into ``_base``, safely.

Nova's order: fetch the image to ``<base>.part``, inspect it (the format inspector and
``qemu-img info`` under resource limits must agree on its format), then, with
``force_raw_images``, convert into ``<base>.converted``. Ours besides (Nova's
``fetch_to_raw`` does none of these): the data hashed while copied and checked
against the store's ``os_hash_value`` and size, ``qemu-img info`` given the format it
must find, and the virtual size under a ceiling and within ``_base``'s free space.
Each file is fsynced and
renamed into place, so a base under its final name is always whole, and a failure (a
full disk included) leaves no ``.part`` or ``.converted``. Kernels and ramdisks (aki,
ari) are size-checked and hashed only: their base is the file as is, never shown to
qemu-img. The caller holds the base file's lock: any ``.part``/``.converted`` found
is stale.

A big image in the file store that is to be converted is not copied first: its file
is already local and whole, and the copy was 0.60 s of a 1.37 s cold spawn of 300 MiB
of data (scripts/bench). The fetch step checks the store's file in place (its size,
the inspector, ``qemu-img info``, the ceiling); the convert step reads it straight
into ``<base>.converted`` while a thread reads it again for the hash, and the base is
published only once both the conversion and the hash passed; a wrong hash removes the
``.converted``. Below :data:`COPY_BELOW`, and for data read through the store's
``open_data`` (an rbd snapshot), the checked copy stays: there qemu-img never reads a
byte whose hash was not checked first.

``recheck_base`` is the cheap check of a cached base before each use (``BaseRecheck``
runs it under the base's lock; ``TrustedBases`` remembers its verdict while the base
is unchanged).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType

from minidriver import fileutils
from minidriver.exception import ImageNotFound, ImageUnacceptable
from minidriver.fileutils import (
    PRIVATE_DIR,
    create_private,
    ensure_free_space,
    make_dir,
    out_of_space_is_clear,
    publish,
    removed_on_error,
    write_private,
)
from minidriver.images import inspect, qemu_img
from minidriver.images.inspect import Readable
from minidriver.images.store import Image
from minidriver.process import ResourceLimits
from minidriver.steps import Step, StepTimer

CHUNK = 1024 * 1024
# Store files at least this big are converted in place (see above). Below it the copy
# costs tens of ms (the 13 MB test guest's fetch: 0.03 s, scripts/bench) and buys the
# stronger order: the hash checked before qemu-img reads anything.
COPY_BELOW = 32 * 1024 * 1024
# Callers know these as fetch's; they live in fileutils, where the store reaches them too.
InsufficientSpace = fileutils.InsufficientSpace
free_bytes = fileutils.free_bytes
# (bytes done, bytes total) while copying, for a progress bar.
Progress = Callable[[int, int], None]
# The image's data, for reading: its file, or its rbd snapshot (ImageService.open_data).
OpenData = Callable[[Image], AbstractContextManager[Readable]]


def open_file(image: Image) -> AbstractContextManager[Readable]:
    return open(image.path, "rb")


def _describe(image: Image) -> str:
    return f"image {image.name} ({image.id})"


def _check_read(image: Image, done: int, digest: str) -> None:
    """What was read of the image's data must be its record's size and hash."""
    if done != image.size:
        raise ImageUnacceptable(
            f"{_describe(image)}: the store's file is {done} bytes, its record says {image.size}",
            hint="the stored file changed or is truncated: delete the image and add it again",
        )
    if image.os_hash_value and digest != image.os_hash_value:
        raise ImageUnacceptable(
            f"{_describe(image)}: {image.os_hash_algo} of the data read"
            " does not match the store's record",
            hint="the stored file changed or is corrupt: delete the image and add it again",
        )


def download(
    image: Image,
    dest: Path,
    progress: Progress | None = None,
    open_data: OpenData = open_file,
) -> None:
    """Copy the image's data to ``dest``, verifying Glance's multihash and the size
    on the way."""
    hasher = hashlib.new(image.os_hash_algo or "sha512")
    done = 0
    with open_data(image) as src, create_private(dest) as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            hasher.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, image.size)
    _check_read(image, done, hasher.hexdigest())


class HashCheck:
    """The store's file of ``image`` read and hashed on a thread of its own, beside the
    conversion: hashlib and file reads release the GIL and qemu-img is a process of
    its own, so the two share the machine's cores. :meth:`wait` raises what
    :func:`download` raises for a wrong size or hash. Leaving the ``with`` block stops
    the thread and waits for it, whatever happened meanwhile.
    """

    def __init__(self, image: Image, path: Path, progress: Progress | None = None) -> None:
        self.image = image
        self.path = path
        self.progress = progress
        self._stop = threading.Event()
        self._done = 0
        self._digest = ""
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, name=f"hash {image.id}", daemon=True)

    def __enter__(self) -> HashCheck:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _read(self) -> None:
        try:
            hasher = hashlib.new(self.image.os_hash_algo or "sha512")
            with open(self.path, "rb") as src:
                while not self._stop.is_set() and (chunk := src.read(CHUNK)):
                    hasher.update(chunk)
                    self._done += len(chunk)
                    if self.progress:
                        self.progress(self._done, self.image.size)
            self._digest = hasher.hexdigest()
        except BaseException as exc:  # raised again in the waiting thread
            self._error = exc

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error
        _check_read(self.image, self._done, self._digest)


def store_file(image: Image) -> Path | None:
    """The file in the store that holds ``image``'s data, as ``ImageService.open_data``
    would open it; None when its data is elsewhere (an rbd snapshot)."""
    if image.rbd_location is not None:
        return None
    try:
        return image.path
    except ImageNotFound:
        return None


def verify(
    path: Path, image: Image, limits: ResourceLimits | None = qemu_img.DEFAULT_LIMITS
) -> int:
    """The inspector, the declared format and qemu-img must all agree on ``path``;
    returns its virtual size.

    Kernels and ramdisks (aki, ari) are no disks: never inspected, never shown to
    qemu-img. ``download`` has checked their size and hash, and that is all.
    """
    if image.disk_format in inspect.UNINSPECTED:
        return path.stat().st_size
    return inspect.agree(f"{image.name} ({image.id})", path, image.disk_format, limits)


def check_virtual_size(image: Image, virtual_size: int, max_virtual_size: int) -> None:
    """``[libvirt] images_max_virtual_size`` (0: no ceiling; the flavor bounds it)."""
    if max_virtual_size and virtual_size > max_virtual_size:
        raise ImageUnacceptable(
            f"{_describe(image)} is refused: its virtual size ({virtual_size} bytes) is"
            f" over images_max_virtual_size ({max_virtual_size} bytes)",
            hint="use a smaller image, or raise [libvirt] images_max_virtual_size",
        )


# qemu-img's name of a base's format -> Glance's, for the inspector (vpc is vhd).
_GLANCE_FORMATS = {
    qemu: glance for glance, qemu in qemu_img.QEMU_FORMATS.items() if glance != "iso"
}


def recheck_base(
    base: Path,
    base_format: str,
    *,
    limits: ResourceLimits | None = qemu_img.DEFAULT_LIMITS,
    disk_format: str = "",
) -> int | None:
    """Check a cached image base again before an instance disk is made on it; returns
    its virtual size (None: no base yet).

    The base passed every check when it was made; this catches one changed since (by
    hand, or left by an older minidriver). It runs on every warm spawn, so its cost
    is bounded (a few ms for any base): the inspector reads only the first MiB
    (:func:`inspect.check_image_head`: headers sit at the start, so a raw base that
    now parses as qcow2 or vmdk, or whose partition table went bad, is caught, and
    no content can make it read a multi-GB base to the end), and ``qemu-img info``,
    format pinned and under the limits, reads only metadata. A missing base is fine:
    the fetch makes it and checks it in full. Disks minidriver makes itself
    (ephemeral, swap) are never passed here. ``disk_format``: the image's own; an ISO
    is cached as it is (raw to qemu-img), and the inspector still sees an ISO in it.
    """
    if not base.exists():
        return None
    return BaseRecheck(base_format, limits=limits, disk_format=disk_format).check(base)


class TrustedBases:
    """The re-check's verdicts, one record per base in ``records_dir``, each kept for
    as long as its base is the very file that was checked.

    The format inspector costs a warm spawn ~50 ms (oslo.utils' import compiles
    hundreds of patterns), more than all the rest of minidriver's own work there. A
    record holds the base's path, device, inode, size, mtime and ctime (ns) as
    they were once minidriver last used it, and what the inspector found: while
    they all match, the inspector's verdict stands; any write to the base changes
    its mtime and ctime (and resetting the mtime by hand changes the ctime), so a
    changed base is inspected again. ``qemu-img info`` still runs on every use (see
    :class:`BaseRecheck`). A record that cannot be read is no record.
    """

    def __init__(self, records_dir: Path) -> None:
        self.records_dir = records_dir

    def _record(self, base: Path) -> Path:
        return self.records_dir / base.name

    @staticmethod
    def _stamp(base: Path) -> list[int | str]:
        st = base.stat()
        return [os.fspath(base), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def verdict(self, base: Path, checked_as: str) -> inspect.DetectedImage | None:
        """What the inspector found in ``base`` as ``checked_as``, if the record says
        so of the file as it is now."""
        try:
            data = json.loads(self._record(base).read_text())
            if data["stamp"] != self._stamp(base) or data["checked_as"] != checked_as:
                return None
            return inspect.DetectedImage(str(data["format"]), int(data["virtual_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remember(self, base: Path, checked_as: str, detected: inspect.DetectedImage) -> None:
        """Record the verdict on ``base`` as it is now: after its last write, our touch."""
        make_dir(self.records_dir, PRIVATE_DIR)
        record = {
            "stamp": self._stamp(base),
            "checked_as": checked_as,
            "format": detected.format,
            "virtual_size": detected.virtual_size,
        }
        write_private(self._record(base), json.dumps(record))

    def forget(self, base: Path) -> None:
        self._record(base).unlink(missing_ok=True)

    def prune(self) -> list[str]:
        """Remove the records whose base is gone (removed by the image cache manager
        or by hand) and those that cannot be read; return their names.

        A record is written only once its base exists, so a spawn that is making one
        meanwhile never loses it.
        """
        pruned = []
        try:
            records = list(self.records_dir.iterdir())
        except FileNotFoundError:
            return []
        for record in records:
            try:
                base = Path(json.loads(record.read_text())["stamp"][0])
                if base.exists():
                    continue
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                pass
            record.unlink(missing_ok=True)
            pruned.append(record.name)
        return pruned


class BaseRecheck:
    """:func:`recheck_base` of the one cached base a spawn uses, run by
    ``Image.cache`` under the base's lock, so the file checked is the file the
    overlay is made on, and its ``qemu-img info`` is the only one of the base in a
    warm spawn (its virtual size serves the flavor's size check too).

    With ``trusted``, the inspector is skipped while a record says the base is
    unchanged since it last passed; ``qemu-img info`` (format pinned, limits) runs
    all the same, and must still agree with the recorded verdict. ``touched`` records
    the verdict once the cache has marked the base in use (which changes its times).
    """

    def __init__(
        self,
        base_format: str,
        *,
        limits: ResourceLimits | None = qemu_img.DEFAULT_LIMITS,
        disk_format: str = "",
        trusted: TrustedBases | None = None,
    ) -> None:
        self.base_format = base_format
        self.limits = limits
        self.trusted = trusted
        self.checked_as = (
            "iso" if disk_format == "iso" else _GLANCE_FORMATS.get(base_format, base_format)
        )
        self._passed: inspect.DetectedImage | None = None

    def check(self, base: Path) -> int:
        """The base's virtual size, once it passed; raises ImageUnacceptable."""
        self._passed = None
        trusted = self.trusted
        try:
            detected = trusted.verdict(base, self.checked_as) if trusted else None
            if detected is None:
                detected = inspect.check_image_head(base, self.checked_as)
            info = qemu_img.info(base, self.base_format, self.limits)
            virtual_size = inspect.agree_info(base.name, detected, info)
        except (ImageUnacceptable, qemu_img.QemuImgError) as exc:
            if trusted:
                trusted.forget(base)
            raise ImageUnacceptable(
                f"cached base {base} failed its re-check: {exc}",
                hint=f"remove {base} (it is not in use once no instance runs on it): the next"
                " spawn fetches and checks the image again",
            ) from exc
        self._passed = detected
        return virtual_size

    def touched(self, base: Path) -> None:
        # Between our touch and this stat only a writer that ignores the base's lock
        # could slip in; such a writer could as well write after any re-check.
        if self.trusted and self._passed is not None:
            self.trusted.remember(base, self.checked_as, self._passed)


def fetch_to_raw(
    image: Image,
    target: Path,
    *,
    force_raw: bool,
    timer: StepTimer,
    progress: Progress | None = None,
    limits: ResourceLimits | None = qemu_img.DEFAULT_LIMITS,
    max_virtual_size: int = 0,
    open_data: OpenData = open_file,
    copy_below: int = COPY_BELOW,
) -> str:
    """Bring ``image`` into ``target``; returns the base's format (raw, or the image's).

    ``limits`` bound ``qemu-img info``; ``max_virtual_size`` (bytes, 0: none) is the
    ceiling of an image's virtual size. Everything that can refuse the image does so
    before any conversion: the size, the inspector, ``qemu-img info``, the ceiling and
    the free space of ``_base``; and the hash, before the conversion when the data is
    copied, before the base is published when a store file of ``copy_below`` bytes or
    more is converted in place. Kernels and ramdisks are published as they are.
    """
    part = target.with_name(target.name + ".part")
    converted = target.with_name(target.name + ".converted")
    part.unlink(missing_ok=True)
    converted.unlink(missing_ok=True)
    base_dir = target.parent
    kernel = image.disk_format in inspect.UNINSPECTED
    # Whether it will be converted, from the declared format; qemu-img's name for it
    # once verify has passed it (the inspector says best why a format is refused).
    convert = force_raw and not kernel and qemu_img.QEMU_FORMATS.get(image.disk_format) != "raw"
    source = store_file(image) if convert and image.size >= copy_below else None
    if source is not None:
        return _convert_in_place(
            image,
            source,
            target,
            timer=timer,
            progress=progress,
            limits=limits,
            max_virtual_size=max_virtual_size,
        )
    fetching = f"fetching {_describe(image)}"
    with removed_on_error(part, converted):
        with timer.step(Step.FETCH):
            # A conversion needs room for the raw result next to the download: when
            # the record knows the virtual size, refuse now rather than after it.
            needed = image.size + ((image.virtual_size or 0) if convert else 0)
            ensure_free_space(base_dir, needed, fetching)
            with out_of_space_is_clear(base_dir, fetching):
                download(image, part, progress, open_data)
            virtual_size = verify(part, image, limits)
            if kernel:
                fmt = image.disk_format
            else:
                fmt = qemu_img.qemu_format(image.disk_format)
                check_virtual_size(image, virtual_size, max_virtual_size)
        if convert:
            with timer.step(Step.CONVERT):
                _convert(image, part, fmt, virtual_size, target)
                part.unlink()
            return "raw"
        with out_of_space_is_clear(base_dir, fetching):
            publish(part, target)
        return fmt


def _convert(
    image: Image,
    source: Path,
    fmt: str,
    virtual_size: int,
    target: Path,
    *,
    before_publish: Callable[[], None] = lambda: None,
) -> None:
    """``source`` to raw in ``<target>.converted``, checked, then ``before_publish()``
    and renamed to ``target``. The caller removes ``.converted`` on an error."""
    converted = target.with_name(target.name + ".converted")
    base_dir = target.parent
    converting = f"converting {_describe(image)} to raw"
    # qemu-img leaves holes for zeros, but a hostile image's data need not be zeros (a
    # compressed qcow2 of a repeated pattern): only the whole virtual size is a bound
    # that holds.
    ensure_free_space(base_dir, virtual_size, converting)
    with out_of_space_is_clear(base_dir, converting):
        qemu_img.convert(source, fmt, converted, "raw")
        # The raw result is re-checked (Nova asks qemu-img info whether it is raw; we
        # ask the format inspector, stricter): a raw file that now parses as something
        # else (say a qcow2 header inside a disk, or a partition table with tricks) is
        # refused.
        inspect.check_image(converted, "raw", label=f"{image.name} ({image.id}) as raw")
        before_publish()
        publish(converted, target)


def _convert_in_place(
    image: Image,
    source: Path,
    target: Path,
    *,
    timer: StepTimer,
    progress: Progress | None,
    limits: ResourceLimits | None,
    max_virtual_size: int,
) -> str:
    """``fetch_to_raw`` of a big store file: no copy; its hash checked on a thread
    while it is checked and converted, and before the base is published."""
    converted = target.with_name(target.name + ".converted")
    fetching = f"fetching {_describe(image)}"
    with removed_on_error(converted), HashCheck(image, source, progress) as hashing:
        with timer.step(Step.FETCH):
            # Nothing is written before the conversion: only its raw result needs room.
            ensure_free_space(target.parent, image.virtual_size or 0, fetching)
            # A file of the wrong size is refused before qemu-img reads it; a changed
            # one of the right size, by the hash.
            size = source.stat().st_size
            if size != image.size:
                _check_read(image, size, "")
            virtual_size = verify(source, image, limits)
            check_virtual_size(image, virtual_size, max_virtual_size)
        with timer.step(Step.CONVERT):
            fmt = qemu_img.qemu_format(image.disk_format)
            _convert(image, source, fmt, virtual_size, target, before_publish=hashing.wait)
    return "raw"
