"""The benchmarks' synthetic image: a 1 GiB qcow2 holding 300 MiB of data.

Not bootable: spawns of it are measured to RUNNING. It stands for a real image's
weight in the cache's fetch and conversion, which the 13 MB test guest does not
have. Made once by qemu-img and qemu-io, kept in the work dir (default
``build/bench``) between runs. (No Nova counterpart: tooling.)
"""

from __future__ import annotations

import os
from pathlib import Path

from minidriver.bench.harness import Log
from minidriver.images import qemu_img
from minidriver.objects import GiB, MiB
from minidriver.process import run

# The synthetic image: written by qemu-io in 4 MiB chunks spread over the disk, each
# chunk a different non-zero byte (qemu-img convert skips only zeros, so all of it is
# copied). The name changes whenever what is written does.
SYNTHETIC_NAME = "synthetic-1g-300m-v1.qcow2"
SYNTHETIC_VIRTUAL = GiB
SYNTHETIC_CHUNK = 4 * MiB
SYNTHETIC_CHUNKS = 75  # 300 MiB


def synthetic_writes(
    virtual: int = SYNTHETIC_VIRTUAL, chunk: int = SYNTHETIC_CHUNK, count: int = SYNTHETIC_CHUNKS
) -> list[str]:
    """qemu-io commands: ``count`` chunks spread evenly, each of its own non-zero byte."""
    stride = (virtual // count) // MiB * MiB
    if stride < chunk:
        raise ValueError(f"{count} chunks of {chunk} bytes do not fit in {virtual}")
    return [f"write -P {(i * 37) % 255 + 1} {i * stride} {chunk}" for i in range(count)]


def synthetic_image(work_dir: Path, log: Log) -> Path:
    """The synthetic qcow2, made once and kept in ``work_dir``."""
    out = work_dir / SYNTHETIC_NAME
    if out.exists():
        return out
    work_dir.mkdir(parents=True, exist_ok=True)
    log(f"writing {out} ({SYNTHETIC_CHUNKS * SYNTHETIC_CHUNK // MiB} MiB of data)")
    temp = out.with_name(f".{out.name}.{os.getpid()}")
    try:
        qemu_img.create(temp, "qcow2", SYNTHETIC_VIRTUAL)
        commands = [arg for write in synthetic_writes() for arg in ("-c", write)]
        run(["qemu-io", "-f", "qcow2", *commands, temp])
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    return out
