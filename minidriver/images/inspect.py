"""Image format safety, with oslo.utils' format_inspector (as Nova and Glance do).

An image's declared ``disk_format`` decides how qemu-img and QEMU read it, so it must
be what the bytes are: a qcow2 registered as raw hands the guest the qcow2 header, and
a qcow2 with a backing file or an external data file makes QEMU open a host path the
image's author chose. As Nova's ``do_image_deep_inspection``: detect the format from
the content, run the inspector's safety checks, and refuse any mismatch.

The inspector is used as is; never a parser of our own.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, NoReturn, Protocol, cast

from minidriver.exception import ImageNotFound, ImageUnacceptable
from minidriver.images import qemu_img
from minidriver.process import ResourceLimits

if TYPE_CHECKING:
    from oslo_utils.imageutils import format_inspector

AUTO: Final = "auto"

# Glance's disk_format -> the inspector's NAME. Mostly the same word, spelled out so
# the accepted names are in one place. (qemu-img says "vpc" for vhd; the inspector
# says "vhd", as Glance does.)
GLANCE_TO_INSPECTOR: Final[Mapping[str, str]] = {
    "raw": "raw",
    "qcow2": "qcow2",
    "vmdk": "vmdk",
    "vhd": "vhd",
    "vhdx": "vhdx",
    "vdi": "vdi",
    "iso": "iso",
    "qed": "qed",
}

# The inspector's NAME -> Glance's disk_format. The inspector calls a raw disk with a
# partition table (MBR or GPT; one inspector covers both) "gpt"; to Glance and Nova
# it is still raw.
INSPECTOR_TO_GLANCE: Final[Mapping[str, str]] = {
    **{inspector: glance for glance, inspector in GLANCE_TO_INSPECTOR.items()},
    "gpt": "raw",
}

# Kernels and ramdisks are not disks: never inspected. oslo.utils 10.2 takes Debian's
# cloud vmlinuz for a GPT disk with a broken partition table and would refuse it.
UNINSPECTED: Final = ("aki", "ari")

# Every disk_format an image may declare.
DISK_FORMATS: Final = (*GLANCE_TO_INSPECTOR, "ami", *UNINSPECTED)

# Why a failed check matters, for the checks users meet.
_REASONS: Final[Mapping[str, str]] = {
    "backing_file": "it has a backing file, which would make QEMU open a host file",
    "data_file": "it has an external data file, which would make QEMU open a host file",
    "banned": "the format is not allowed",
}
# Checks whose own words say what part failed: a lead-in says why that matters. Any
# other check keeps the inspector's words alone.
_LEAD_INS: Final[Mapping[str, str]] = {
    "unknown_features": "it sets qcow2 incompatible feature bits QEMU may read differently",
    "descriptor": "its VMDK descriptor is not one self-contained sparse disk",
    "footer": "its VMDK footer disagrees with its header",
    "mbr": "its partition table is malformed",
}
# What the user can do, by the check that failed.
_HINTS: Final[Mapping[str, str]] = {
    "backing_file": "flatten it where it was made: qemu-img convert -f qcow2 -O qcow2 SOURCE FLAT",
    "data_file": "make it one file where it was made: qemu-img convert -f qcow2 -O qcow2"
    " SOURCE FLAT",
    "unknown_features": "convert it to a plain qcow2 with the QEMU that made it",
    "descriptor": "only single-file monolithicSparse and streamOptimized VMDKs are taken;"
    " convert it to qcow2 where it was made",
    "footer": "convert it to qcow2 where it was made",
    "banned": "convert it to qcow2 where it was made",
    "mbr": "a kernel or ramdisk is no disk: declare it as aki or ari; a disk needs a valid"
    " partition table",
}
_SEVERAL_HINT: Final = (
    "a file that reads as two formats can hide one in the other: rebuild the image in one"
)

# How much of a file :func:`check_image_head` reads. Every detection region of the
# inspectors for raw, gpt (MBR at 0), qcow2 and qed (512-byte headers), vhd and vdi
# (512 bytes) and iso (its volume descriptor at 32 KiB) lies in it; the same offsets
# are all QEMU's probes look at.
HEAD_BYTES: Final = 1024 * 1024
# Formats whose every check is decided within HEAD_BYTES. A file declared vmdk (a
# footer at the end) or vhdx (a metadata region anywhere) is read in full instead.
_HEAD_FORMATS: Final = frozenset({"raw", "gpt", "qcow2", "qed", "vhd", "vdi", "iso"})


@dataclass(frozen=True)
class DetectedImage:
    """What the content of an image file is, once it passed the checks."""

    format: str  # Glance's name (a partitioned raw disk is "raw")
    virtual_size: int  # bytes; 0 if the format does not say


def _load_inspector() -> None:
    """Import the inspector where an image is read: oslo.utils' imageutils costs ~40 ms
    (strutils compiles its patterns), which commands that read no image never pay."""
    global format_inspector  # noqa: PLW0603
    from oslo_utils.imageutils import format_inspector  # noqa: PLC0415


def validate_disk_format(declared_format: str) -> str:
    """``declared_format`` if it is ``auto`` or a disk format this module checks."""
    if declared_format != AUTO and declared_format not in DISK_FORMATS:
        raise ImageUnacceptable(
            f"disk format {declared_format!r} is not one minidriver can check",
            hint=f"disk formats: {', '.join((AUTO, *DISK_FORMATS))}",
        )
    return declared_format


def _refuse(
    label: str, declared: str, detected: str, reason: str, hint: str | None = None
) -> NoReturn:
    raise ImageUnacceptable(
        f"image {label} is refused: {reason} (declared {declared}, detected {detected})",
        hint=hint,
    )


def _failure(name: str, failure: object) -> str:
    if name in _REASONS:
        return _REASONS[name]
    if name in _LEAD_INS:
        return f"{_LEAD_INS[name]} ({failure})"
    return str(failure)


def _safety_reason(detected: str, exc: Exception) -> str:
    if isinstance(exc, format_inspector.SafetyCheckFailed):
        reasons = [_failure(name, failure) for name, failure in exc.failures.items()]
        return f"{detected} safety check failed: {'; '.join(reasons)}"
    return f"{detected} cannot be checked: {exc}"


def _judge(
    inspector: format_inspector.FileInspector | None, declared: str, label: str, size: int
) -> DetectedImage:
    """Nova's rules, applied to what the inspector found; ``size`` is the file's."""
    if inspector is None:
        _refuse(label, declared, "nothing", "its format could not be determined")
    name = str(inspector)
    try:
        inspector.safety_check()
    except (format_inspector.SafetyCheckFailed, format_inspector.ImageFormatError) as exc:
        failed = list(exc.failures) if isinstance(exc, format_inspector.SafetyCheckFailed) else []
        hint = next((_HINTS[check] for check in failed if check in _HINTS), None)
        _refuse(label, declared, name, _safety_reason(name, exc), hint)
    detected = INSPECTOR_TO_GLANCE.get(name)
    if detected is None:
        _refuse(label, declared, name, f"minidriver does not take {name} images")
    # An AMI is a raw disk by definition; Nova lets it be anything, but we never
    # probe formats later, so it must really be raw.
    wanted = "raw" if declared == "ami" else declared
    if declared != AUTO and detected != wanted:
        _refuse(
            label,
            declared,
            name,
            "its content does not match the declared disk format",
            hint=f"if the file is meant to be {detected}, declare it as {detected}",
        )
    # A raw file's virtual size is its size; the inspectors only count what they read.
    virtual_size = size if detected == "raw" else inspector.virtual_size
    return DetectedImage(format=detected, virtual_size=virtual_size)


def _multiple(label: str, declared: str, exc: Exception) -> NoReturn:
    # Two headers in one file: one format hiding another. (A hybrid ISO, iso + gpt,
    # lands here too; the inspector cannot tell it from an attack.)
    _refuse(label, declared, "several formats", str(exc), _SEVERAL_HINT)


def check_image(path: Path, declared_format: str, *, label: str | None = None) -> DetectedImage:
    """Check that ``path`` is a safe image of ``declared_format`` (or ``auto``).

    Raises :class:`ImageUnacceptable` naming the image (``label``, else the file's
    name), both formats and the reason.
    """
    declared = validate_disk_format(declared_format)
    label = label or path.name
    try:
        size = path.stat().st_size
        if declared in UNINSPECTED:
            return DetectedImage(format=declared, virtual_size=size)
        _load_inspector()
        try:
            inspector = format_inspector.detect_file_format(os.fspath(path))
        except format_inspector.ImageFormatError as exc:
            _multiple(label, declared, exc)
    except FileNotFoundError:
        raise ImageNotFound(f"image file {path} does not exist") from None
    except OSError as exc:
        raise ImageUnacceptable(f"image {path} cannot be read: {exc.strerror}") from exc
    return _judge(inspector, declared, label, size)


def check_image_head(
    path: Path, declared_format: str, *, label: str | None = None, head: int = HEAD_BYTES
) -> DetectedImage:
    """:func:`check_image`'s verdict from the first ``head`` bytes of ``path``.

    For a file that passed :func:`check_image` once (a cached base), on every use.
    The full check stops once every inspector has decided, about 256 KiB into an
    ordinary raw file, but the content decides when: a VMDK header that puts its
    footer at the end keeps it reading to EOF (20 s for a sparse 2 GiB base here).
    Reading the head only makes the cost fixed, whatever the file holds. Headers sit
    at the start, so a file that has since become something else (a qcow2 or vmdk
    header written over a raw base, a partition table gone bad) is caught here. A
    declared format whose checks look further in (vmdk, vhdx) gets the full read.
    """
    declared = validate_disk_format(declared_format)
    label = label or path.name
    try:
        size = path.stat().st_size
        if declared in UNINSPECTED or size <= head:
            return check_image(path, declared, label=label)
        with open(path, "rb") as fh:
            data = fh.read(head)
    except FileNotFoundError:
        raise ImageNotFound(f"image file {path} does not exist") from None
    except OSError as exc:
        raise ImageUnacceptable(f"image {path} cannot be read: {exc.strerror}") from exc
    _load_inspector()
    wrapper = format_inspector.InspectWrapper(io.BytesIO(data))
    while wrapper.read(64 * 1024):
        pass
    wrapper.close()
    try:
        inspector = wrapper.format
    except format_inspector.ImageFormatError as exc:
        _multiple(label, declared, exc)
    name = str(inspector) if inspector is not None else "nothing"
    wanted = "raw" if declared == "ami" else declared
    if name not in _HEAD_FORMATS and (declared == AUTO or INSPECTOR_TO_GLANCE.get(name) == wanted):
        return check_image(path, declared, label=label)
    return _judge(inspector, declared, label, size)


def detect_format(path: Path) -> str:
    """The Glance disk_format of ``path``'s content (for ``--disk-format auto``).

    Detection only: :func:`check_image` still has to pass.
    """
    _load_inspector()
    try:
        inspector = format_inspector.detect_file_format(os.fspath(path))
    except format_inspector.ImageFormatError as exc:
        _multiple(path.name, AUTO, exc)
    except FileNotFoundError:
        raise ImageNotFound(f"image file {path} does not exist") from None
    except OSError as exc:
        raise ImageUnacceptable(f"image {path} cannot be read: {exc.strerror}") from exc
    name = str(inspector) if inspector is not None else "nothing"
    detected = INSPECTOR_TO_GLANCE.get(name)
    if detected is None:
        _refuse(path.name, AUTO, name, f"minidriver does not take {name} images")
    return detected


def agree(label: str, path: Path, glance_format: str, limits: ResourceLimits | None) -> int:
    """The format inspector passes ``path`` as ``glance_format``; then qemu-img, reading
    it with that format pinned and under ``limits``, must see the same: no backing or
    data file, the same virtual size. Returns that size."""
    detected = check_image(path, glance_format, label=label)
    info = qemu_img.info(path, qemu_img.qemu_format(glance_format), limits)
    return agree_info(label, detected, info)


def agree_info(label: str, detected: DetectedImage, info: qemu_img.QemuImgInfo) -> int:
    """What the inspector found against what ``qemu-img info`` says (:func:`agree`)."""
    if info.backing_file or info.data_file:
        raise ImageUnacceptable(
            f"image {label} is refused: qemu-img reports a"
            f" {'backing' if info.backing_file else 'data'} file"
        )
    if info.virtual_size != detected.virtual_size:
        raise ImageUnacceptable(
            f"image {label} is refused: qemu-img says {info.virtual_size} bytes, the format"
            f" inspector {detected.virtual_size}"
        )
    return info.virtual_size


class Readable(Protocol):
    """A byte stream: an open file, or an HTTP body."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class InspectingReader:
    """Reads a stream while every format inspector looks at it, so that a copy reads
    the source once. After the last ``read``, :meth:`check` applies the rules of
    :func:`check_image`.

    Wraps the inspector's ``InspectWrapper``, which feeds each chunk to all the
    inspectors. ``check`` closes the source, as ``InspectWrapper.close`` does.
    """

    def __init__(self, source: Readable, declared_format: str, *, label: str) -> None:
        self.declared = validate_disk_format(declared_format)
        self.label = label
        self.bytes_read = 0
        self._source = source
        self._wrapper: format_inspector.InspectWrapper | None = None
        if self.declared not in UNINSPECTED:
            # No expected_format: stopping at the first mismatch would not say what the
            # content is, and the message must.
            # InspectWrapper only calls read() and close(), which any Readable has.
            _load_inspector()
            self._wrapper = format_inspector.InspectWrapper(cast(IO[bytes], source))

    def read(self, size: int) -> bytes:
        chunk = self._source.read(size) if self._wrapper is None else self._wrapper.read(size)
        self.bytes_read += len(chunk)
        return chunk

    def check(self) -> DetectedImage:
        if self._wrapper is None:
            self._source.close()
            return DetectedImage(format=self.declared, virtual_size=self.bytes_read)
        self._wrapper.close()
        try:
            inspector = self._wrapper.format
        except format_inspector.ImageFormatError as exc:
            _multiple(self.label, self.declared, exc)
        return _judge(inspector, self.declared, self.label, self.bytes_read)
