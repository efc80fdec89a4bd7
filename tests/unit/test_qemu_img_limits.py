"""``[libvirt] images_cpu_time_limit`` really stops qemu-img: a qcow2 whose snapshot
table makes ``qemu-img info`` spin for seconds of CPU, spawned under a 1 s limit.

The image is valid qcow2 (qemu-img reads it to the end given the time): one real
snapshot, made by qemu-img, copied 65536 times (qcow2's most) into a new snapshot
table, so that ``info`` lists them all. Here that takes 5 to 6 s of CPU; its address
space stays small, so only the CPU limit can stop it. Nothing is mocked: qemu-img runs
under prlimit as spawn runs it, and the error is the one a user meets, through the
Python API and through ``minidriver boot``.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_DRIVER_NODE

from minidriver.config import load_config
from minidriver.driver import LibvirtDriver, SpawnError
from minidriver.images.qemu_img import QemuImgLimitExceeded

CLUSTER = 64 * 1024
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
# qcow2 header v3: magic .. snapshots_offset (the fields this test reads and writes).
HEADER = struct.Struct(">IIQIIQIIQQIIQ")
NB_SNAPSHOTS, SNAPSHOTS_OFFSET = 11, 12
# A snapshot table entry's fixed part: l1_table_offset, l1_size, id_str_size,
# name_size, date_sec, date_nsec, vm_clock_nsec, vm_state_size, extra_data_size.
SNAPSHOT = struct.Struct(">QIHHIIQII")
# Only the CPU limit: with no address-space limit, nothing else can stop qemu-img.
LIMITS_CONF = "[libvirt]\nimages_cpu_time_limit = 1\nimages_address_space_limit = 0\n"


def snapshot_bomb(tmp: Path) -> Path:
    """A qcow2 with MAX_SNAPSHOTS snapshots, all copies of one real one."""
    path = tmp / "snapshots.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"], check=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "real", path], check=True)
    data = bytearray(path.read_bytes())
    header = list(HEADER.unpack_from(data))
    l1_offset, l1_size, *_ = SNAPSHOT.unpack_from(data, header[SNAPSHOTS_OFFSET])
    entries = []
    for i in range(MAX_SNAPSHOTS):
        sid, name = str(i + 1).encode(), f"s{i}".encode()
        entry = SNAPSHOT.pack(l1_offset, l1_size, len(sid), len(name), 0, 0, 0, 0, 16)
        entry += bytes(16) + sid + name  # 16 bytes of extra data, as QEMU 7.2 writes
        entries.append(entry + bytes(-len(entry) % 8))
    table_offset = -(-len(data) // CLUSTER) * CLUSTER
    data += bytes(table_offset - len(data)) + b"".join(entries)
    data += bytes(-len(data) % CLUSTER)
    header[NB_SNAPSHOTS], header[SNAPSHOTS_OFFSET] = MAX_SNAPSHOTS, table_offset
    HEADER.pack_into(data, 0, *header)
    path.write_bytes(data)
    return path


@pytest.fixture
def limited(tmp_path: Path, node_file: Path) -> tuple[Path, str]:
    """A config file with the 1 s CPU limit, and the test driver's URI."""
    conf = tmp_path / "minidriver.conf"
    conf.write_text(LIMITS_CONF)
    return conf, f"test://{node_file}"


def test_a_spinning_qemu_img_is_stopped_by_the_cpu_limit(
    tmp_path: Path, limited: tuple[Path, str]
) -> None:
    conf_file, uri = limited
    conf = load_config(conf_file, state_dir=tmp_path / "state", environ={}).with_libvirt(
        connection_uri=uri, virt_type="qemu"
    )
    drv = LibvirtDriver(conf)
    try:
        # The store takes it: a qcow2 with snapshots is no hostile format.
        image = drv.images.add(snapshot_bomb(tmp_path), name="spin", disk_format="qcow2")

        with pytest.raises(SpawnError) as err:
            drv.spawn("victim", image.id, "t1.nano")

        cause = err.value.cause
        assert isinstance(cause, QemuImgLimitExceeded)
        assert cause.message.startswith(
            "qemu-img info exceeded its resource limits (cpu 1 s, address space unlimited)"
        )
        # Killed by the kernel at the limit: SIGXCPU, or SIGKILL at the hard limit.
        assert cause.exit_code in (-signal.SIGXCPU, -signal.SIGKILL)
        assert cause.hint is not None
        assert "images_cpu_time_limit" in cause.hint
        assert err.value.step == "create_image"
        assert drv.db.list_instances() == []
        assert [p.name for p in conf.base_dir.iterdir()] == []
    finally:
        drv.host.close()
        drv.db.close()


def test_boot_says_which_limit_stopped_qemu_img(tmp_path: Path, limited: tuple[Path, str]) -> None:
    conf_file, uri = limited
    node = Path(uri.removeprefix("test://"))
    node.write_text(TEST_DRIVER_NODE)
    base = [sys.executable, "-m", "minidriver", "--config", str(conf_file)]
    base += ["--state-dir", str(tmp_path / "state"), "--connect", uri]
    bomb = snapshot_bomb(tmp_path)
    subprocess.run([*base, "image", "add", str(bomb), "--name", "spin"], check=True)

    boot = subprocess.run(
        [*base, "boot", "--image", "spin", "--flavor", "t1.nano", "--name", "victim"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert boot.returncode == 1, boot.stderr
    first, *rest = boot.stderr.strip().splitlines()
    assert "qemu-img info exceeded its resource limits (cpu 1 s" in first
    assert "images_cpu_time_limit" in " ".join(rest)
    assert "Traceback" not in boot.stderr
