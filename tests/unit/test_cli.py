"""The ``minidriver`` command, in-process, against the contract of issue 4.

Every test has its own test-driver node file and ONE Host on it, shared by every
``main()`` call of the test: each ``test:///file`` connection has its own state, so the
shared Host is what makes a boot visible to the next command. Images are small real
qcow2 files; only the faults (a domain that never runs, a Ctrl-C) are injected.

The table holds valid and invalid invocations of every command; after it come the
deadlines (exit code 3), delete's partial failures and state-dir isolation,
``--print-xml`` / ``--dry-run`` / ``explain``, the power states and the console.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
from conftest import TEST_DRIVER_NODE, TIMING_KEYS
from lxml import etree
from pytest_mock import MockerFixture

from minidriver import __version__, process
from minidriver.cli import main
from minidriver.config import load_config
from minidriver.host import Host

GiB = 1024**3
MiB = 1024**2
SOURCE_VIRTUAL = 64 * MiB
UNREACHABLE = "qemu+unix:///system?socket=/nonexistent"
CONSOLE_TEXT = "SeaBIOS\nminidriver-guest: ready\nlogin: \n"
DISK_KEYS = {"path", "format", "virtual_size", "actual_size", "backing_file"}
# What boot, show and list report of an instance (boot adds cache_hit and timings).
INSTANCE_KEYS = {"uuid", "name", "display_name", "state", "virt_type", "instance_dir", "disks"}
IMAGE_KEYS = {
    "id",
    "name",
    "disk_format",
    "container_format",
    "size",
    "virtual_size",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "status",
    "properties",
}
FLAVOR_KEYS = {"name", "vcpus", "memory_mb", "root_gb", "ephemeral_gb", "swap"}
HOST_CHECK_KEYS = {
    "uri",
    "libvirt_version",
    "qemu_version",
    "virt_type",
    "virt_type_reason",
    "instances_path",
    "free_bytes",
    "problems",
}


# -- running the command ------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One ``main()`` call: its exit code and what it wrote."""

    code: int
    out: str
    err: str

    def doc(self) -> Any:
        """stdout as exactly one JSON document (json.loads refuses anything more)."""
        return json.loads(self.out)


class Cli:
    """``main(argv, host=...)`` on this test's state dir and its one Host."""

    def __init__(self, host: Host, state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.host = host
        self.state_dir = state_dir
        self.capsys = capsys

    @property
    def instances_path(self) -> Path:
        return self.state_dir / "instances"

    @property
    def base_dir(self) -> Path:
        return self.instances_path / "_base"

    def run(self, *argv: str, state_dir: Path | None = None, injected: bool = True) -> Run:
        """``--state-dir`` goes first unless argv places one itself; ``injected=False``
        lets main() open its own connection (``--connect``)."""
        args = list(argv)
        if "--state-dir" not in args:
            args = ["--state-dir", str(state_dir or self.state_dir), *args]
        self.capsys.readouterr()  # drop what earlier calls left
        try:
            code = main(args, host=self.host if injected else None)
        except SystemExit as exc:
            assert isinstance(exc.code, int | None), exc.code
            code = exc.code or 0
        captured = self.capsys.readouterr()
        return Run(code, captured.out, captured.err)

    def ok(self, *argv: str, state_dir: Path | None = None) -> Run:
        result = self.run(*argv, state_dir=state_dir)
        assert result.code == 0, result
        return result

    def json(self, *argv: str, state_dir: Path | None = None) -> Any:
        return self.ok("--json", *argv, state_dir=state_dir).doc()

    def instances(self, state_dir: Path | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.json("list", state_dir=state_dir)
        return found

    def state_of(self, ref: str) -> str:
        state: str = self.json("show", ref)["state"]
        return state

    def image_names(self) -> list[str]:
        return sorted(image["name"] for image in self.json("image", "list"))

    def domains(self) -> list[str]:
        """Every domain on the connection, whichever state dir defined it."""
        return sorted(d.name() for d in self.host.get_connection().listAllDomains())

    def instance_dirs(self) -> list[Path]:
        if not self.instances_path.exists():
            return []
        return sorted(p for p in self.instances_path.iterdir() if p.name not in ("_base", "locks"))

    def boot(self, name: str, image: str = "cirros", flavor: str = "t1.nano") -> dict[str, Any]:
        booted: dict[str, Any] = self.json(
            "boot", "--image", image, "--flavor", flavor, "--name", name
        )
        return booted


# -- fixtures -----------------------------------------------------------------------


def qcow2(path: Path, virtual_size: int, *, data: bool) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(virtual_size)], check=True)
    if data:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", path],
            check=True,
            capture_output=True,
        )
    return path


@pytest.fixture(scope="session")
def source_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 MiB virtual, 1 MiB of 0xab at its start."""
    return qcow2(tmp_path_factory.mktemp("src") / "cirros.qcow2", SOURCE_VIRTUAL, data=True)


@pytest.fixture(scope="session")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 GiB virtual: too big for m1.tiny's 1 GB root."""
    return qcow2(tmp_path_factory.mktemp("big") / "big.qcow2", 2 * GiB, data=False)


@pytest.fixture(scope="session")
def raw_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "disk.img"
    path.write_bytes(bytes(MiB))
    return path


def new_host(tmp_path: Path) -> Host:
    node = tmp_path / "testdriver.xml"
    node.write_text(TEST_DRIVER_NODE)
    conf = load_config(None, state_dir=tmp_path / "state", environ={}).with_libvirt(
        connection_uri=f"test://{node}", virt_type="qemu"
    )
    return Host(conf)


@pytest.fixture
def cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cli]:
    # main() reads the environment; the user's own config must not leak in.
    monkeypatch.delenv("MINIDRIVER_CONFIG", raising=False)
    monkeypatch.delenv("MINIDRIVER_STATE_DIR", raising=False)
    host = new_host(tmp_path)
    yield Cli(host, tmp_path / "state", capsys)
    host.close()


@pytest.fixture
def image_id(cli: Cli, source_image: Path) -> str:
    """The source image, added through the command as ``cirros`` (a Linux: os_type)."""
    added: dict[str, Any] = cli.json(
        "image", "add", str(source_image), "--name", "cirros", "--disk-format", "qcow2",
        "--property", "os_type=linux",
    )  # fmt: skip
    image: str = added["id"]
    return image


@dataclass
class World:
    """What a table row runs in; ``subs`` fills the ``{placeholders}`` of its argv."""

    cli: Cli
    subs: dict[str, str] = field(default_factory=dict)

    def argv(self, template: str) -> list[str]:
        return shlex.split(template.format_map({k: shlex.quote(v) for k, v in self.subs.items()}))


@pytest.fixture
def images(
    cli: Cli, image_id: str, source_image: Path, big_image: Path, raw_file: Path, tmp_path: Path
) -> World:
    """Images cirros, big (2 GiB virtual) and two named dup-image; no instance."""
    cli.ok("image", "add", str(big_image), "--name", "big")
    cli.ok("image", "add", str(source_image), "--name", "dup-image")
    cli.ok("image", "add", str(source_image), "--name", "dup-image")
    bad_option = tmp_path / "bad-option.conf"
    bad_option.write_text("[DEFAULT]\nno_such_option = 1\n")
    bad_section = tmp_path / "bad-section.conf"
    bad_section.write_text("[nova]\nvirt_type = kvm\n")
    return World(
        cli,
        {
            "source": str(source_image),
            "md5": hashlib.md5(source_image.read_bytes()).hexdigest(),
            "sha256": hashlib.sha256(source_image.read_bytes()).hexdigest(),
            "unreachable": UNREACHABLE,
            "big": str(big_image),
            "raw": str(raw_file),
            "missing": str(tmp_path / "missing.qcow2"),
            "cirros": image_id,
            "cirros_prefix": image_id[:8],
            "absent_conf": str(tmp_path / "absent.conf"),
            "dir_conf": str(tmp_path),
            "bad_option": str(bad_option),
            "bad_section": str(bad_section),
        },
    )


@pytest.fixture
def instances(images: World) -> World:
    """The images, and instances web (console written) and twin, twin (one name)."""
    cli = images.cli
    web = cli.boot("web")
    twins = [cli.boot("twin")["uuid"], cli.boot("twin")["uuid"]]
    (Path(web["instance_dir"]) / "console.log").write_text(CONSOLE_TEXT)
    images.subs.update(
        web=web["uuid"],
        web_prefix=web["uuid"][:8],
        web_name=web["name"],
        twin_a=twins[0],
        twin_b=twins[1],
    )
    return images


# -- checks for the table -------------------------------------------------------------

Check = Callable[[Run, World], None]


def out_has(*texts: str) -> Check:
    def check(r: Run, w: World) -> None:
        for text in texts:
            assert text.format_map(w.subs) in r.out, r.out

    return check


def err_has(*texts: str) -> Check:
    def check(r: Run, w: World) -> None:
        for text in texts:
            assert text.format_map(w.subs) in r.err, r.err

    return check


def doc(shape: Callable[[Any, World], None]) -> Check:
    def check(r: Run, w: World) -> None:
        shape(r.doc(), w)

    return check


def then(*checks: Check) -> Check:
    def check(r: Run, w: World) -> None:
        for c in checks:
            c(r, w)

    return check


def images_are(*names: str) -> Check:
    def check(_r: Run, w: World) -> None:
        assert w.cli.image_names() == sorted(names)

    return check


def instances_are(*names: str) -> Check:
    def check(_r: Run, w: World) -> None:
        assert sorted(i["display_name"] for i in w.cli.instances()) == sorted(names)
        assert len(w.cli.domains()) == len(names)

    return check


def state_is(ref: str, state: str) -> Check:
    def check(_r: Run, w: World) -> None:
        assert w.cli.state_of(ref.format_map(w.subs)) == state

    return check


def nothing(_r: Run, _w: World) -> None:
    """No check beyond the exit code and the stream rules every row gets."""


# -- JSON shapes --------------------------------------------------------------------


def disk_shape(disk: Any) -> None:
    assert set(disk) >= DISK_KEYS, disk
    assert isinstance(disk["path"], str)
    assert isinstance(disk["format"], str)
    assert isinstance(disk["virtual_size"], int)
    assert isinstance(disk["actual_size"], int)
    assert disk["backing_file"] is None or isinstance(disk["backing_file"], str)


def instance_shape(d: Any, *, boot: bool = False) -> None:
    assert isinstance(d, dict)
    assert set(d) >= INSTANCE_KEYS, sorted(d)
    for key in ("uuid", "name", "display_name", "state", "instance_dir"):
        assert isinstance(d[key], str), key
    assert d["virt_type"] == "qemu"
    assert re.fullmatch(r"instance-[0-9a-f]{8}", d["name"]), d["name"]
    assert set(d["disks"]) == {"disk", "disk.local", "disk.swap"}  # every row is a t1.nano
    for disk in d["disks"].values():
        disk_shape(disk)
    if boot:
        assert isinstance(d["cache_hit"], bool)
        assert set(d["timings"]) >= TIMING_KEYS
        assert all(isinstance(v, float) for v in d["timings"].values()), d["timings"]
    else:
        assert "timings" not in d
        assert "cache_hit" not in d


def boot_shape(d: Any, _w: World) -> None:
    instance_shape(d, boot=True)
    assert d["state"] == "running"


def show_shape(uuid_key: str) -> Callable[[Any, World], None]:
    def shape(d: Any, w: World) -> None:
        instance_shape(d)
        assert d["uuid"] == w.subs[uuid_key]

    return shape


def list_shape(d: Any, w: World) -> None:
    assert isinstance(d, list)
    assert sorted(i["uuid"] for i in d) == sorted(w.subs[k] for k in ("web", "twin_a", "twin_b"))
    for item in d:
        instance_shape(item)
        assert item["state"] == "running"


def image_shape(d: Any) -> None:
    assert isinstance(d, dict)
    assert set(d) >= IMAGE_KEYS, sorted(d)
    for key in ("id", "name", "disk_format", "container_format", "status", "os_hash_algo"):
        assert isinstance(d[key], str), key
    assert isinstance(d["size"], int)
    assert d["virtual_size"] is None or isinstance(d["virtual_size"], int)
    assert re.fullmatch(r"[0-9a-f]{32}", d["checksum"]), d["checksum"]
    assert d["os_hash_algo"] == "sha512"
    assert re.fullmatch(r"[0-9a-f]{128}", d["os_hash_value"])
    assert d["status"] == "active"
    assert isinstance(d["properties"], dict)


def image_list_shape(d: Any, _w: World) -> None:
    assert isinstance(d, list)
    assert sorted(i["name"] for i in d) == ["big", "cirros", "dup-image", "dup-image"]
    for image in d:
        image_shape(image)


def cirros_shape(d: Any, w: World) -> None:
    image_shape(d)
    assert (d["id"], d["name"], d["disk_format"]) == (w.subs["cirros"], "cirros", "qcow2")
    assert d["virtual_size"] == SOURCE_VIRTUAL
    assert d["checksum"] == w.subs["md5"]
    assert d["size"] == Path(w.subs["source"]).stat().st_size


def added_shape(d: Any, w: World) -> None:
    image_shape(d)
    assert d["name"] == "added"
    assert d["checksum"] == w.subs["md5"]
    assert d["properties"] == {"os_distro": "cirros", "note": "a=b"}


def flavor_shape(d: Any, _w: World) -> None:
    assert isinstance(d, list)
    for flavor in d:
        assert set(flavor) >= FLAVOR_KEYS
        assert isinstance(flavor["name"], str)
        assert all(isinstance(flavor[k], int) for k in FLAVOR_KEYS - {"name"})
    by_name = {f["name"]: f for f in d}
    assert by_name["m1.tiny"]["root_gb"] == 1
    assert (by_name["t1.nano"]["ephemeral_gb"], by_name["t1.nano"]["swap"]) == (1, 64)


def nova_plan_shape(d: Any, w: World) -> None:
    plan_shape(d, w)
    steps = d["nova"]
    assert [s["step"] for s in steps][:3] == [
        "the steps in order",
        "buses and device names",
        "instance dir, root disk",
    ]
    assert steps[2]["nova"] == (
        "nova/virt/libvirt/driver.py:_create_image, _create_and_inject_local_root"
    )
    assert all(set(s) == {"operation", "step", "nova", "minidriver", "differs"} for s in steps)
    # Beside each file, the Nova function that makes it.
    nova_of = {Path(f["path"]).name: f["nova"] for f in d["files"]}
    cache = "nova/virt/libvirt/imagebackend.py:Image.cache, Qcow2.create_image"
    assert nova_of["disk"].startswith(cache)
    assert nova_of["disk.local"].startswith(cache)
    assert nova_of["ephemeral_1_40d1d2c"] == "nova/virt/libvirt/driver.py:_create_ephemeral"
    assert nova_of["swap_64"] == "nova/virt/libvirt/driver.py:_create_swap"
    assert all(f["nova"] and f["nova"].startswith("nova/") for f in d["files"])


def plan_shape(d: Any, w: World) -> None:
    assert isinstance(d, dict)
    assert d["image"] == w.subs["cirros"]
    assert isinstance(d["xml"], str)
    etree.fromstring(d["xml"].encode())
    assert d["files"]
    for f in d["files"]:
        assert isinstance(f["path"], str)
        assert isinstance(f["exists"], bool)
        assert isinstance(f["commands"], list)
        assert all(
            isinstance(c, list) and all(isinstance(a, str) for a in c) for c in f["commands"]
        )


def dry_run_shape(d: Any, w: World) -> None:
    assert d["dry_run"] is True
    plan_shape(d, w)


def host_check_shape(d: Any, _w: World) -> None:
    # The test driver may report problems: only the keys and their types count here.
    assert set(d) >= HOST_CHECK_KEYS
    assert isinstance(d["problems"], list)
    assert isinstance(d["free_bytes"], int)
    assert d["uri"].startswith("test://")
    assert d["connection_reason"] == f"connection_uri = {d['uri']} (the config or --connect)"
    assert d["virt_type"] == "qemu"


def xml_shape(d: Any, _w: World) -> None:
    assert set(d) == {"xml"}
    assert etree.fromstring(d["xml"].encode()).tag == "domain"


def xml_out(r: Run, _w: World) -> None:
    assert etree.fromstring(r.out.encode()).tag == "domain"


def test_boot_reports_the_disks_it_made_without_qemu_img_on_them(
    cli: Cli, image_id: str, mocker: MockerFixture
) -> None:
    qemu_img_runs = mocker.patch("minidriver.images.qemu_img.run", wraps=process.run)
    booted = cli.boot("quiet")
    text = cli.ok("boot", "--image", "cirros", "--flavor", "t1.nano", "--name", "quiet-text")

    infos = [call.args[0] for call in qemu_img_runs.call_args_list if call.args[0][1] == "info"]
    instance_dirs = (booted["instance_dir"], cli.json("show", "quiet-text")["instance_dir"])
    assert [c for c in infos if any(str(a).startswith(instance_dirs) for a in c)] == []
    # show (as another process would: no spawn to go by) asks qemu-img; the same report.
    assert cli.json("show", "quiet")["disks"] == booted["disks"]

    def chain(out: str) -> list[str]:
        return [line for line in out.splitlines() if line.startswith("disk")]

    assert chain(text.out) == chain(cli.ok("show", "quiet-text").out)
    assert len(chain(text.out)) == 3


# -- 1, 2: every command, valid and invalid -------------------------------------------


@dataclass(frozen=True)
class Case:
    argv: str  # shell words; {placeholders} are filled (quoted) from the world's subs
    code: int
    check: Check
    world: str  # the fixture that prepares the state: images or instances
    injected: bool  # False: main() opens its own connection (--connect)

    @property
    def as_json(self) -> bool:
        return "--json" in shlex.split(self.argv)


def case(
    argv: str,
    code: int,
    check: Check = nothing,
    *,
    world: str = "images",
    injected: bool = True,
) -> Case:
    return Case(argv, code, check, world, injected)


def on_instances(argv: str, code: int, check: Check = nothing, **kw: Any) -> Case:
    return case(argv, code, check, world="instances", **kw)


def equal(expected: Callable[[World], Any]) -> Check:
    """The JSON document is exactly ``expected(world)``."""

    def check(r: Run, w: World) -> None:
        assert r.doc() == expected(w)

    return check


NO_NEW_IMAGE = images_are("big", "cirros", "dup-image", "dup-image")
NO_INSTANCE = instances_are()
UNTOUCHED = instances_are("web", "twin", "twin")
PROPS = "--property os_distro=cirros --property note=a=b"
ZEROS = "md5:" + "0" * 32

CASES = [
    # global options and usage
    case("", 2, err_has("usage:")),
    case("nonsense", 2, err_has("invalid choice: 'nonsense'")),
    case("--version", 0, out_has(f"minidriver {__version__}")),
    case("--config {absent_conf} list", 1, err_has("cannot read config file")),
    case("list --config {dir_conf}", 1, err_has("cannot read config file")),
    case("--config {bad_option} list", 1, err_has("unknown option [DEFAULT] no_such_option")),
    case("--json --config {bad_section} flavor list", 1, err_has("unknown section [nova]")),
    # host check
    case("host check", 0, out_has("virt_type", "qemu")),
    case("--json host check", 0, doc(host_check_shape)),
    case("host check --json", 0, doc(host_check_shape)),
    case("host", 2, err_has("usage:")),
    case("--connect {unreachable} host check", 1, err_has("cannot connect"), injected=False),
    case("host check --json --connect {unreachable}", 1, err_has(UNREACHABLE), injected=False),
    case(
        "boot --image cirros --flavor t1.nano --connect {unreachable}",
        1,
        then(err_has("cannot connect to libvirt"), NO_INSTANCE),
        injected=False,
    ),
    # image add
    case(f"image add {{source}} --name added {PROPS}", 0, out_has("added image added")),
    case(f"--json image add {{source}} --name added {PROPS}", 0, doc(added_shape)),
    case(f"image add {{source}} --name added --json {PROPS}", 0, doc(added_shape)),
    case(
        f"image add {{source}} --name added --checksum md5:{{md5}} --json {PROPS}",
        0,
        doc(added_shape),
    ),
    case("image add {source} --name added --checksum sha256:{sha256}", 0, out_has("added image")),
    case(
        "image add {source} --name x --property os",
        1,
        then(err_has("'os': expected K=V"), NO_NEW_IMAGE),
    ),
    case("image add {source} --name x --property =v", 1, then(err_has("K=V"), NO_NEW_IMAGE)),
    case(
        "image add {missing} --name x",
        1,
        then(err_has("missing.qcow2 does not exist"), NO_NEW_IMAGE),
    ),
    case(
        "image add {raw} --name x --disk-format qcow2",
        1,
        then(err_has("declared qcow2, detected raw"), NO_NEW_IMAGE),
    ),
    case(
        f"image add {{source}} --name x --checksum {ZEROS}", 1, then(err_has("{md5}"), NO_NEW_IMAGE)
    ),
    case(f"--json image add {{source}} --name x --checksum {ZEROS}", 1, NO_NEW_IMAGE),
    case("image add {source} --name x --checksum crc32:12", 1, err_has("is not ALGO:HEX")),
    case("image add {source} --name x --disk-format floppy", 2, err_has("choice: 'floppy'")),
    case("image add {source}", 2, err_has("required: --name")),
    case("image add --name x", 2, err_has("required: source")),
    # image list, show, delete
    case("image list", 0, out_has("cirros", "big", "dup-image", "64 MiB", "2 GiB")),
    case("--json image list", 0, doc(image_list_shape)),
    case("image list --json", 0, doc(image_list_shape)),
    case("image show cirros", 0, out_has("{cirros}", "qcow2")),
    case("--json image show {cirros_prefix}", 0, doc(cirros_shape)),
    case("image show {cirros} --json", 0, doc(cirros_shape)),
    case("image show nope", 1, err_has("no image matches 'nope'")),
    case("image show dup-image --json", 1, err_has("'dup-image' matches 2 images")),
    case("image show", 2, err_has("required: image")),
    case(
        "image delete big",
        0,
        then(out_has("deleted image big"), images_are("cirros", "dup-image", "dup-image")),
    ),
    case("--json image delete cirros", 0, equal(lambda w: {"deleted": w.subs["cirros"]})),
    case("image delete nope", 1, then(err_has("no image matches 'nope'"), NO_NEW_IMAGE)),
    case("image", 2, err_has("usage:")),
    case("image resize cirros", 2, err_has("invalid choice: 'resize'")),
    # flavor list
    case("flavor list", 0, out_has("t1.nano", "m1.tiny", "root_gb")),
    case("--json flavor list", 0, doc(flavor_shape)),
    case("flavor list --json", 0, doc(flavor_shape)),
    case("flavor show m1.tiny", 2, err_has("invalid choice: 'show'")),
    # boot
    case("boot --image cirros --flavor t1.nano --name new", 0, instances_are("new")),
    case(
        "--json boot --image cirros --flavor t1.nano",
        0,
        then(doc(boot_shape), instances_are("cirros")),
    ),
    case("boot --image {cirros_prefix} --flavor t1.nano --json --no-wait", 0, doc(boot_shape)),
    case("boot --image nope --flavor t1.nano", 1, then(err_has("no image matches"), NO_INSTANCE)),
    case("boot --image cirros --flavor nope --json", 1, then(err_has("no flavor"), NO_INSTANCE)),
    case("boot --image dup-image --flavor t1.nano", 1, err_has("'dup-image' matches 2 images")),
    case(
        "boot --image big --flavor m1.tiny",
        1,
        then(err_has("m1.tiny's root disk (1 GB) is smaller than image big"), NO_INSTANCE),
    ),
    case("--json boot --image big --flavor m1.tiny", 1, NO_INSTANCE),
    case(
        "boot --image cirros --flavor t1.nano --wait-for '('",
        1,
        then(err_has("--wait-for '(' is not a valid regex"), NO_INSTANCE),
    ),
    case("boot --image cirros --flavor t1.nano --timeout soon", 2, err_has("float value: 'soon'")),
    case("boot --image cirros", 2, err_has("required: --flavor")),
    case("boot --flavor t1.nano", 2, err_has("required: --image")),
    case("boot --image cirros --flavor t1.nano --print-xml", 0, then(xml_out, NO_INSTANCE)),
    case("boot --image cirros --flavor t1.nano --print-xml --json", 0, doc(xml_shape)),
    case("boot --image cirros --flavor t1.nano --dry-run", 0, out_has("nothing was done")),
    case("--json boot --image cirros --flavor t1.nano --dry-run", 0, doc(dry_run_shape)),
    case("boot --image big --flavor m1.tiny --dry-run", 1, err_has("smaller than")),
    # explain
    case("explain --image cirros --flavor t1.nano", 0, out_has("-F raw -b", "<domain")),
    case("--json explain --image cirros --flavor t1.nano", 0, doc(plan_shape)),
    case("explain --image cirros --flavor m1.tiny --json", 0, doc(plan_shape)),
    case("explain --image big --flavor m1.tiny", 1, err_has("smaller than")),
    case("explain --image nope --flavor t1.nano", 1, err_has("no image matches 'nope'")),
    case("explain --image cirros --flavor nope", 1, err_has("no flavor named 'nope'", "t1.nano")),
    case("explain --image cirros", 2, err_has("required: --flavor")),
    case(
        "explain --image cirros --flavor t1.nano --nova",
        0,
        out_has(
            "nova/virt/libvirt/driver.py:_create_image",
            "nova/virt/libvirt/blockinfo.py:get_disk_info",
            "differs: a deadline",
            "    nova: nova/virt/images.py:fetch_to_raw",
            "    nova: nova/virt/libvirt/driver.py:_create_ephemeral\n",
            "    nova: nova/virt/libvirt/driver.py:_create_swap\n",
        ),
    ),
    case("--json explain --image cirros --flavor t1.nano --nova", 0, doc(nova_plan_shape)),
    case("explain --template nope --nova", 2, err_has("--nova maps a spawn's steps")),
    # demo: a real boot of the test guest is the integration tests' business
    case("demo --timeout soon", 2, err_has("invalid float value")),
    case("demo now", 2, err_has("unrecognized arguments: now")),
    # list
    case("--json list", 0, equal(lambda _w: [])),
    on_instances("list", 0, out_has("{web}", "web", "twin", "running")),
    on_instances("--json list", 0, doc(list_shape)),
    on_instances("list --json", 0, doc(list_shape)),
    on_instances("list everything", 2, err_has("unrecognized arguments: everything")),
    # show, by every kind of reference
    on_instances("show web", 0, out_has("{web}", "{web_name}", "disk.local", "_base/")),
    on_instances("--json show web", 0, doc(show_shape("web"))),
    on_instances("show {web} --json", 0, doc(show_shape("web"))),
    on_instances("show {web_prefix} --json", 0, doc(show_shape("web"))),
    on_instances("show {web_name} --json", 0, doc(show_shape("web"))),
    on_instances("show {twin_a} --json", 0, doc(show_shape("twin_a"))),
    on_instances("show nope", 1, err_has("no instance matches 'nope'")),
    on_instances("show twin", 1, err_has("'twin' matches 2 instances", "{twin_a}", "{twin_b}")),
    on_instances("--json show twin", 1, err_has("{twin_a}", "{twin_b}")),
    case("show", 2, err_has("required: instance")),
    # console
    on_instances("console web", 0, out_has(CONSOLE_TEXT)),
    on_instances(
        "console {web_prefix} --json",
        0,
        equal(lambda w: {"uuid": w.subs["web"], "console": CONSOLE_TEXT}),
    ),
    on_instances("console twin", 1, err_has("matches 2 instances")),
    on_instances("console nope --follow", 1, err_has("no instance matches 'nope'")),
    case("console", 2, err_has("required: instance")),
    # delete
    on_instances("delete web", 0, then(out_has("deleted web"), instances_are("twin", "twin"))),
    on_instances(
        "--json delete {web_name}",
        0,
        then(
            equal(lambda w: {"deleted": [w.subs["web"]], "failed": []}),
            instances_are("twin", "twin"),
        ),
    ),
    on_instances("delete {twin_a} {twin_b}", 0, instances_are("web")),
    on_instances("delete --all", 0, NO_INSTANCE),
    on_instances("delete twin", 1, then(err_has("matches 2 instances"), UNTOUCHED)),
    on_instances("delete nope", 1, then(err_has("'nope'"), UNTOUCHED)),
    on_instances("delete", 2, then(err_has("give INSTANCE... or --all"), UNTOUCHED)),
    on_instances("delete web --all", 2, then(err_has("not both"), UNTOUCHED)),
    # stop, start, reboot
    on_instances(
        "stop web",
        0,
        then(
            out_has("shut down cleanly"),
            state_is("web", "shutoff"),
            state_is("{twin_a}", "running"),
        ),
    ),
    on_instances(
        "stop web --force --timeout 5", 0, then(out_has("stopped hard"), state_is("web", "shutoff"))
    ),
    on_instances(
        "--json stop web",
        0,
        equal(lambda w: {"uuid": w.subs["web"], "state": "shutoff", "clean": True}),
    ),
    on_instances("stop nope", 1, err_has("no instance matches 'nope'")),
    on_instances(
        "stop twin", 1, then(err_has("matches 2 instances"), state_is("{twin_a}", "running"))
    ),
    on_instances("stop web --timeout never", 2, err_has("invalid float value")),
    case("stop", 2, err_has("required: instance")),
    on_instances(
        "start web --json", 0, equal(lambda w: {"uuid": w.subs["web"], "state": "running"})
    ),
    on_instances("start nope", 1, err_has("no instance matches 'nope'")),
    case("start", 2, err_has("required: instance")),
    on_instances("reboot web", 0, then(out_has("soft reboot"), state_is("web", "running"))),
    on_instances(
        "reboot --hard web --json",
        0,
        equal(
            lambda w: {"uuid": w.subs["web"], "state": "running", "reboot": "hard", "done": "hard"}
        ),
    ),
    on_instances("reboot nope --hard", 1, err_has("no instance matches 'nope'")),
    case("reboot --hard", 2, err_has("required: instance")),
]


def run_case(request: pytest.FixtureRequest, c: Case) -> tuple[Run, World]:
    world: World = request.getfixturevalue(c.world)
    return world.cli.run(*world.argv(c.argv), injected=c.injected), world


@pytest.mark.parametrize("c", CASES, ids=[c.argv or "(nothing)" for c in CASES])
def test_command(request: pytest.FixtureRequest, c: Case) -> None:
    r, world = run_case(request, c)

    assert r.code == c.code, r
    assert "Traceback" not in r.err
    if c.code == 0:
        assert r.err == ""
    if c.as_json and c.code != 2:  # argparse refuses before it knows of --json
        document = r.doc()
        if c.code != 0:
            assert set(document) == {"error", "hint"}
            assert f"minidriver: error: {document['error']}" in r.err
    if c.code == 1:
        # One line and a hint, nothing more.
        lines = r.err.splitlines()
        assert lines[0].startswith("minidriver: "), r.err
        # Every clear error says what to do about it.
        assert len(lines) == 2, r.err
        assert lines[1].startswith("hint: "), r.err
    c.check(r, world)


def test_debug_adds_the_traceback(images: World, caplog: pytest.LogCaptureFixture) -> None:
    cli = images.cli

    quiet = cli.run("show", "nope")
    assert not [rec for rec in caplog.records if rec.exc_info]
    loud = cli.run("show", "nope", "--debug")

    assert quiet.code == loud.code == 1
    assert [rec.getMessage() for rec in caplog.records if rec.exc_info] == ["failed"]


def test_a_caller_of_main_keeps_its_garbage_collector(images: World) -> None:
    """Only the command's own process freezes its imports out of the collector: a
    program (or a test) that calls ``main`` with its arguments finds it as it was."""
    frozen = gc.get_freeze_count()

    assert images.cli.run("list").code == 0

    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen


# -- 3: deadlines ----------------------------------------------------------------------


def start_paused(domain: libvirt.virDomain, *, pause: bool = False) -> None:
    # The test driver refuses VIR_DOMAIN_START_PAUSED; start and suspend instead.
    domain.create()
    domain.suspend()


def test_boot_that_never_runs_ends_at_the_deadline_and_is_deleted(
    cli: Cli, image_id: str, mocker: MockerFixture
) -> None:
    mocker.patch.object(cli.host, "launch", side_effect=start_paused)

    r = cli.run("boot", "--image", "cirros", "--flavor", "t1.nano", "--timeout", "1")

    assert r.code == 3, r
    lines = r.err.splitlines()
    assert lines[0].startswith("minidriver: error: spawn of cirros failed at wait_for_running")
    assert lines[1].startswith("hint: raise --timeout")
    assert cli.instances() == []
    assert cli.domains() == []
    assert cli.instance_dirs() == []


def test_keep_on_timeout_keeps_the_instance_until_delete(
    cli: Cli, image_id: str, mocker: MockerFixture
) -> None:
    mocker.patch.object(cli.host, "launch", side_effect=start_paused)

    r = cli.run(
        "boot", "--image", "cirros", "--flavor", "t1.nano", "--timeout", "1", "--keep-on-timeout"
    )
    r_json = cli.run(
        "--json",
        *("boot", "--image", "cirros", "--flavor", "t1.nano", "--name", "kept-too"),
        *("--timeout", "1", "--keep-on-timeout"),
    )

    assert (r.code, r_json.code) == (3, 3)
    error = r_json.doc()
    assert set(error) == {"error", "hint"}
    assert "wait_for_running" in error["error"]
    kept = cli.instances()
    assert sorted((i["display_name"], i["state"]) for i in kept) == [
        ("cirros", "paused"),
        ("kept-too", "paused"),
    ]
    assert cli.domains() == sorted(i["name"] for i in kept)
    assert len(cli.instance_dirs()) == 2

    assert cli.run("delete", *(i["uuid"] for i in kept)).code == 0

    assert cli.instances() == []
    assert cli.domains() == []
    assert cli.instance_dirs() == []


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_console_that_never_matches_ends_at_the_deadline(
    cli: Cli, image_id: str, as_json: bool
) -> None:
    # The test driver runs no guest: its console log stays empty.
    r = cli.run(
        *(["--json"] if as_json else []),
        *("boot", "--image", "cirros", "--flavor", "t1.nano"),
        *("--wait-for", "^login:", "--timeout", "1"),
    )

    assert r.code == 3, r
    # An empty tail adds no line: the message, then the hint.
    [message, hint] = r.err.splitlines()
    assert message.startswith("minidriver: error: the console did not match '^login:' within 1 s")
    assert hint.startswith("hint: ")
    if as_json:
        assert r.doc() == {"error": message.removeprefix("minidriver: error: "), "hint": hint[6:]}
    assert cli.instances() == []
    assert cli.domains() == []
    assert cli.instance_dirs() == []


# -- 4: delete ------------------------------------------------------------------------


def test_delete_goes_on_past_an_unknown_instance(cli: Cli, image_id: str) -> None:
    a, c = cli.boot("a"), cli.boot("c")

    # "b" could be a prefix of a or c's uuid and name it; "nope" never can.
    r = cli.run("delete", "a", "nope", "c")

    assert r.code == 1, r
    assert r.out.splitlines() == [
        f"deleted a ({a['uuid']})",
        f"deleted c ({c['uuid']})",
    ]
    assert r.err.splitlines() == [
        "minidriver: error: nope: no instance matches 'nope'",
        "hint: give a uuid, a unique uuid prefix, a display name or a domain name",
    ]
    assert cli.instances() == []
    assert cli.domains() == []
    assert cli.instance_dirs() == []


def test_delete_all_spares_another_state_dir_on_the_same_host(
    cli: Cli, image_id: str, source_image: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-state"
    cli.ok("image", "add", str(source_image), "--name", "cirros", state_dir=other)
    mine = [cli.boot("mine-1"), cli.boot("mine-2")]
    theirs = cli.json("boot", "--image", "cirros", "--flavor", "t1.nano", state_dir=other)
    assert theirs["name"] not in {m["name"] for m in mine}  # one daemon, distinct names

    r = cli.run("delete", "--all")

    assert r.code == 0, r
    assert cli.instances() == []
    assert [i["uuid"] for i in cli.instances(state_dir=other)] == [theirs["uuid"]]
    assert cli.domains() == [theirs["name"]]
    assert cli.json("show", theirs["uuid"], state_dir=other)["state"] == "running"
    assert Path(theirs["instance_dir"]).is_dir()


# -- 5: --print-xml, --dry-run, explain ---------------------------------------------


def test_print_xml_defines_and_starts_on_the_test_driver(cli: Cli, image_id: str) -> None:
    r = cli.run("boot", "--image", "cirros", "--flavor", "t1.nano", "--print-xml")

    assert r.code == 0, r
    tree = etree.fromstring(r.out.encode())
    assert tree.tag == "domain"
    assert cli.domains() == []  # printed, not defined
    conn = cli.host.get_connection()
    domain = conn.defineXMLFlags(r.out, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        assert domain.name() == tree.findtext("name")
        domain.create()
        assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        domain.destroy()
    finally:
        domain.undefine()
    assert cli.instances() == []
    assert cli.instance_dirs() == []


def test_dry_run_creates_nothing(cli: Cli, image_id: str) -> None:
    r = cli.run("boot", "--image", "cirros", "--flavor", "t1.nano", "--dry-run")

    assert r.code == 0, r
    assert r.out.startswith("dry run: image, flavor and host check out; nothing was done")
    assert cli.instance_dirs() == []
    assert cli.instances() == []
    assert cli.domains() == []
    assert not cli.base_dir.exists() or not any(cli.base_dir.iterdir())


def test_explain_lists_the_chain_and_its_commands(cli: Cli, image_id: str) -> None:
    base = cli.base_dir / hashlib.sha1(image_id.encode()).hexdigest()
    ephemeral = cli.base_dir / f"ephemeral_1_{hashlib.md5(b'ext4').hexdigest()[:7]}"
    swap = cli.base_dir / "swap_64"

    text = cli.ok("explain", "--image", "cirros", "--flavor", "t1.nano").out
    plan = cli.json("explain", "--image", "cirros", "--flavor", "t1.nano")

    paths = [Path(f["path"]) for f in plan["files"]]
    instance_dir = paths[-1].parent  # a uuid of its own, given for the explanation only
    assert instance_dir.parent == cli.instances_path
    assert paths == [
        base.with_name(base.name + ".part"),
        base,
        instance_dir / "disk",
        ephemeral,
        instance_dir / "disk.local",
        swap,
        instance_dir / "disk.swap",
    ]
    commands = {Path(f["path"]).name: f["commands"] for f in plan["files"]}
    part, converted = (base.with_name(base.name + suffix) for suffix in (".part", ".converted"))
    disk = instance_dir / "disk"
    assert commands["disk"] == [
        ["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", str(base), str(disk), str(GiB)]
    ]
    assert commands[base.name] == [
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(part), str(converted)]
    ]
    assert all(commands[name] for name in ("disk.local", "disk.swap", ephemeral.name, swap.name))
    # The text shows the same files; the disk's line exactly as it would run.
    disk_dirs = re.findall(
        rf"^    \$ qemu-img create -f qcow2 -F raw -b {re.escape(str(base))}"
        rf" ({re.escape(str(cli.instances_path))}/[0-9a-f-]{{36}})/disk {GiB}$",
        text,
        re.MULTILINE,
    )
    assert len(disk_dirs) == 1, text
    for path in paths[:2] + paths[3:4] + paths[5:6]:
        assert re.search(rf"^{re.escape(str(path))}$", text, re.MULTILINE), path
    for name in ("disk", "disk.local", "disk.swap"):
        assert re.search(rf"^{re.escape(disk_dirs[0])}/{re.escape(name)}$", text, re.MULTILINE)
    # Explaining made nothing either.
    assert cli.instance_dirs() == []
    assert cli.domains() == []


# -- 6: power ------------------------------------------------------------------------


def test_stop_start_reboot_change_the_domain_state(cli: Cli, image_id: str) -> None:
    web = cli.boot("web")
    domain = cli.host.get_connection().lookupByName(web["name"])

    def states() -> tuple[str, int]:
        [listed] = cli.instances()
        return listed["state"], domain.state()[0]

    assert states() == ("running", libvirt.VIR_DOMAIN_RUNNING)
    cli.ok("stop", "web")
    assert states() == ("shutoff", libvirt.VIR_DOMAIN_SHUTOFF)
    cli.ok("start", "web")
    assert states() == ("running", libvirt.VIR_DOMAIN_RUNNING)
    cli.ok("stop", "web", "--force")
    assert states() == ("shutoff", libvirt.VIR_DOMAIN_SHUTOFF)
    cli.ok("reboot", "--hard", "web")  # a hard reboot starts a stopped instance
    assert states() == ("running", libvirt.VIR_DOMAIN_RUNNING)
    cli.ok("reboot", "web")
    assert states() == ("running", libvirt.VIR_DOMAIN_RUNNING)


# -- 7: global options after the command -----------------------------------------------


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("--json --state-dir {state} list", "list --json --state-dir {state}"),
        ("--state-dir {state} list", "list --state-dir {state}"),
        ("--json --state-dir {state} show web", "show web --state-dir {state} --json"),
        ("--state-dir {state} show web", "show --state-dir {state} web"),
        ("--json --state-dir {state} image list", "image list --state-dir {state} --json"),
        ("--json --state-dir {state} image list", "image --json list --state-dir {state}"),
        ("--json --state-dir {state} flavor list", "flavor list --json --state-dir {state}"),
        ("--json --state-dir {state} show nope", "show nope --json --state-dir {state}"),
        ("--config {conf} --state-dir {state} list", "list --state-dir {state} --config {conf}"),
    ],
)
def test_global_options_after_the_command(
    cli: Cli, image_id: str, tmp_path: Path, before: str, after: str
) -> None:
    cli.boot("web")
    conf = tmp_path / "bad.conf"
    conf.write_text("[DEFAULT]\nno_such_option = 1\n")
    subs = {"state": str(cli.state_dir), "conf": str(conf)}

    first = cli.run(*shlex.split(before.format_map(subs)))
    second = cli.run(*shlex.split(after.format_map(subs)))

    assert first == second
    if "--json" in before:
        assert second.doc() == first.doc()


# -- 8: console -----------------------------------------------------------------------


def test_console_prints_the_log(cli: Cli, image_id: str) -> None:
    web = cli.boot("web")
    assert cli.ok("console", "web").out == ""  # nothing logged yet
    (Path(web["instance_dir"]) / "console.log").write_text(CONSOLE_TEXT)

    assert cli.ok("console", "web").out == CONSOLE_TEXT
    assert cli.json("console", web["uuid"]) == {"uuid": web["uuid"], "console": CONSOLE_TEXT}
    # --follow has nothing to stream under --json: one document, and done.
    assert cli.json("console", "web", "--follow") == {"uuid": web["uuid"], "console": CONSOLE_TEXT}


def test_console_follow_streams_what_is_appended(
    cli: Cli, image_id: str, mocker: MockerFixture
) -> None:
    web = cli.boot("web")
    log = Path(web["instance_dir"]) / "console.log"
    log.write_text(CONSOLE_TEXT)
    polls: list[float] = []

    def guest_writes_then_user_interrupts(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 1:
            with log.open("a") as fh:
                fh.write("minidriver-guest: more\n")
        else:
            raise KeyboardInterrupt

    mocker.patch(
        "minidriver.cli.instances.time.sleep", side_effect=guest_writes_then_user_interrupts
    )

    r = cli.run("console", "web", "--follow")

    assert r.code == 0, r
    assert r.out == CONSOLE_TEXT + "minidriver-guest: more\n"


# What a warm `boot` must not import: each is paid by the commands that use it only.
# A boot's whole process is measured against virt-install's (scripts/bench --only
# peer), and the volume code once crept back onto its path unnoticed.
NOT_IMPORTED_BY_BOOT = (
    "lxml",  # a boot reads no XML back: expat checks what it renders
    "oslo_utils",  # the format inspector: a trusted base is not inspected again
    "minidriver.block_device",  # volumes, for a boot from a volume only
    "minidriver.volume.api",
    "minidriver.serial_console",
    "minidriver.imagecache",
    "minidriver.snapshot",
    "minidriver.ssh",
)


def test_a_warm_boot_imports_only_what_it_uses(tmp_path: Path, source_image: Path) -> None:
    """`minidriver boot` as a user runs it, each command its own process; the third
    boot (warm: its base cached, and trusted since the second) lists the modules it
    loaded."""
    node = tmp_path / "testdriver.xml"
    node.write_text(TEST_DRIVER_NODE)
    config_file = tmp_path / "minidriver.conf"
    config_file.write_text(f"[libvirt]\nport_reservations_path = {tmp_path / 'ports'}\n")
    loaded = tmp_path / "modules.txt"
    run_and_list = (
        "import sys; from minidriver.cli import main; rc = main(sys.argv[2:]);"
        " open(sys.argv[1], 'w').write('\\n'.join(sys.modules)); sys.exit(rc)"
    )
    common = ["--config", str(config_file), "--state-dir", str(tmp_path / "state"),
              "--connect", f"test://{node}", "--json"]  # fmt: skip

    def minidriver(*args: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-c", run_and_list, str(loaded), *common, *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def boot(name: str) -> dict[str, Any]:
        return minidriver("boot", "--image", "cirros", "--flavor", "t1.nano", "--name", name)

    minidriver("image", "add", str(source_image), "--name", "cirros")
    assert boot("cold")["cache_hit"] is False
    boot("checked")  # the base re-checked in full once, its verdict kept
    warm = boot("warm")

    assert warm["cache_hit"] is True
    assert warm["volumes"] == []
    assert sorted(warm["disks"]) == ["disk", "disk.local", "disk.swap"]
    modules = set(loaded.read_text().split("\n"))
    assert {"minidriver.driver", "libvirt", "jinja2"} <= modules  # it did boot
    assert [m for m in NOT_IMPORTED_BY_BOOT if m in modules] == []


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    """`minidriver ... | head`: stdout closed before the command writes; no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "minidriver", "--state-dir", str(tmp_path), "--json",
         "flavor", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert err == ""
