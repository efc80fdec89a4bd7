"""Nova's ``images.fetch_to_raw``: an image from the store into ``_base``, safely.

``<base>.part`` receives the download (hashed while copied, checked against the
store's ``os_hash_value``); the format inspector and ``qemu-img info`` must agree on
it; with ``force_raw_images`` it is converted into ``<base>.converted``; each file is
fsynced and renamed into place, so a base under its final name is always whole. The
caller holds the base file's lock: any ``.part``/``.converted`` found is stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from minidriver.exception import ImageUnacceptable
from minidriver.images import inspect, qemu_img
from minidriver.images.store import Image
from minidriver.steps import Step, StepTimer

CHUNK = 1024 * 1024
# (bytes done, bytes total) while copying, for a progress bar.
Progress = Callable[[int, int], None]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: Path, target: Path) -> None:
    """Make ``temp`` durable and give it its final name in one atomic step."""
    with open(temp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(temp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def removed_on_error(*paths: Path) -> Iterator[None]:
    """Nova's ``remove_path_on_error``: no half-written file outlives a failure."""
    try:
        yield
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise


def download(image: Image, dest: Path, progress: Progress | None = None) -> None:
    """Copy the image's file to ``dest``, verifying Glance's multihash on the way."""
    hasher = hashlib.new(image.os_hash_algo or "sha512")
    done = 0
    with open(image.path, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            hasher.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, image.size)
    if image.os_hash_value and hasher.hexdigest() != image.os_hash_value:
        raise ImageUnacceptable(
            f"image {image.name} ({image.id}): {image.os_hash_algo} of the data read"
            " does not match the store's record",
            hint="the stored file changed or is corrupt: delete the image and add it again",
        )


def verify(path: Path, image: Image) -> qemu_img.QemuImgInfo:
    """The inspector, the declared format and qemu-img must all agree on ``path``."""
    detected = inspect.check_image(path, image.disk_format)
    fmt = qemu_img.qemu_format(image.disk_format)
    info = qemu_img.info(path, fmt)
    if info.backing_file or info.data_file:
        raise ImageUnacceptable(
            f"image {image.name} ({image.id}) is refused: qemu-img reports a"
            f" {'backing' if info.backing_file else 'data'} file"
        )
    if info.virtual_size != detected.virtual_size:
        raise ImageUnacceptable(
            f"image {image.name} ({image.id}) is refused: qemu-img says"
            f" {info.virtual_size} bytes, the format inspector {detected.virtual_size}"
        )
    return info


def fetch_to_raw(
    image: Image,
    target: Path,
    *,
    force_raw: bool,
    timer: StepTimer,
    progress: Progress | None = None,
) -> str:
    """Bring ``image`` into ``target``; returns the base's format (raw or the image's)."""
    part = target.with_name(target.name + ".part")
    converted = target.with_name(target.name + ".converted")
    part.unlink(missing_ok=True)
    converted.unlink(missing_ok=True)
    with removed_on_error(part, converted):
        with timer.step(Step.FETCH):
            download(image, part, progress)
            verify(part, image)
        fmt = qemu_img.qemu_format(image.disk_format)
        if force_raw and fmt != "raw":
            with timer.step(Step.CONVERT):
                qemu_img.convert(part, fmt, converted, "raw")
                # The raw result is re-checked as Nova does: a raw file that now parses
                # as something else (say a qcow2 header inside a disk) is refused.
                inspect.check_image(converted, "raw")
                publish(converted, target)
                part.unlink()
            return "raw"
        publish(part, target)
        return fmt
