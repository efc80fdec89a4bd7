"""Paths in shared places (/tmp) are used only when nobody else controls them.

Hostile layouts are made for real: directories and symlinks of another user (made as
root, then given away: these tests need root, as the README's test command has), and
world-writable parents. The checks run in this process (as root: only root's and our
own count as safe) and, for the defaults a user gets, in a child process running as a
user of its own (``setpriv``) against the real ``/tmp``.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from minidriver.config import load_config
from minidriver.host import EMBED_URI, Host
from minidriver.ports import PortReservations
from minidriver.trustedpath import UntrustedPath, trusted_dir

# Users with no account here: the one we run as in a child, and the "attacker"; one
# pair per process, so that runs at the same time do not share /tmp/minidriver-<uid>.
USER = 50000 + os.getpid() % 5000
OTHER = USER + 1


def given_to(path: Path, uid: int) -> Path:
    os.lchown(path, uid, uid)
    return path


def test_a_new_directory_under_a_sticky_world_writable_parent_is_made_private(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    made = trusted_dir(shared / "minidriver-1" / "ports")
    assert made.is_dir()
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert made.stat().st_uid == os.geteuid()
    assert trusted_dir(made) == made  # and once there, it is taken as it is


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("dir of another user", "belongs to uid {other}"),
        ("symlink of another user", "is a symlink of uid {other}"),
        ("our symlink to a dir of another user", "belongs to uid {other}"),
        ("world-writable parent", "others may write to .*not sticky"),
        ("our dir, writable by others", "others may write to .*0777"),
        ("a file", "is not a directory"),
    ],
)
def test_a_planted_path_is_refused_and_nothing_is_made_through_it(
    tmp_path: Path, layout: str, message: str
) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    theirs.chmod(0o777)
    given_to(theirs, OTHER)
    leaf = shared / "minidriver-1"
    wanted = leaf / "ports"
    if layout == "dir of another user":
        leaf.mkdir()
        given_to(leaf, OTHER)
    elif layout == "symlink of another user":
        leaf.symlink_to(theirs)
        given_to(leaf, OTHER)
    elif layout == "our symlink to a dir of another user":
        leaf.symlink_to(theirs)
    elif layout == "world-writable parent":
        shared.chmod(0o777)
    elif layout == "our dir, writable by others":
        leaf.mkdir()
        leaf.chmod(0o777)
        wanted = leaf
    else:
        leaf.write_text("")
    with pytest.raises(UntrustedPath, match=message.format(other=OTHER)) as err:
        trusted_dir(wanted, hint="use another directory")
    assert err.value.hint == "use another directory"
    assert list(theirs.iterdir()) == []


def test_symlinks_of_root_are_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to("real")
    made = trusted_dir(tmp_path / "link" / "ports")
    assert made == tmp_path / "link" / "ports"
    assert (real / "ports").is_dir()


def test_port_reservations_refuse_a_planted_directory(tmp_path: Path) -> None:
    planted = tmp_path / "ports"
    planted.mkdir()
    given_to(planted, OTHER)
    ports = PortReservations(planted, 10022, 10023)
    with pytest.raises(UntrustedPath, match="belongs to") as err:
        ports.first_free()
    assert err.value.hint is not None
    assert "port_reservations_path" in err.value.hint
    with pytest.raises(UntrustedPath):
        ports.list()


def test_the_embedded_root_refuses_a_planted_qemu_conf_directory(tmp_path: Path) -> None:
    """A root whose etc/ is another user's: their qemu.conf and domain definitions would
    run as us. Refused before libvirt opens anything there."""
    root = tmp_path / "embed"
    (root / "etc").mkdir(parents=True)
    given_to(root / "etc", OTHER)
    conf = load_config(None, state_dir=tmp_path / "state", environ={}).with_libvirt(
        connection_uri=f"qemu:///embed?root={root}"
    )
    with pytest.raises(UntrustedPath, match=f"belongs to uid {OTHER}"):
        Host(conf).get_connection()
    assert not (root / "etc" / "qemu.conf").exists()


def test_the_embedded_qemu_conf_replaces_a_symlink_instead_of_writing_through_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "embed"
    (root / "etc").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (root / "etc" / "qemu.conf").symlink_to(victim)
    host = Host(load_config(None, state_dir=tmp_path / "state", environ={}))
    host._prepare_embed_root(f"{EMBED_URI}?root={root}")
    assert victim.read_text() == "keep me\n"
    conf_file = root / "etc" / "qemu.conf"
    assert not conf_file.is_symlink()
    assert 'stdio_handler = "file"' in conf_file.read_text()
    assert stat.S_IMODE(conf_file.stat().st_mode) == 0o600


# -- as a user of its own, on the real /tmp ---------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from minidriver.config import load_config
    from minidriver.driver import LibvirtDriver
    from minidriver.exception import MinidriverError
    from minidriver.host import EMBED_URI, Host

    conf = load_config(None, state_dir=sys.argv[1], environ={})
    try:
        if sys.argv[2] == "ports":
            print(LibvirtDriver(conf).ports.first_free())
        else:
            Host(conf.with_libvirt(connection_uri="qemu:///embed")).get_connection()
    except MinidriverError as exc:
        print(f"error: {exc}\\nhint: {exc.hint}")
    """
)


@pytest.fixture
def user_tmp() -> Iterator[Path]:
    """``/tmp/minidriver-<uid>`` of the child's user: absent before, removed after."""
    path = Path(f"/tmp/minidriver-{USER}")
    for p in (path, Path(f"/tmp/theirs-{OTHER}")):
        if p.is_symlink() or p.is_file():
            p.unlink()
        shutil.rmtree(p, ignore_errors=True)
    yield path
    for p in (path, Path(f"/tmp/theirs-{OTHER}")):
        if p.is_symlink():
            p.unlink()
        shutil.rmtree(p, ignore_errors=True)


@pytest.fixture
def user_home() -> Iterator[Path]:
    """A home of the child's user where it can reach it (pytest's temp dirs are 0700)."""
    home = Path(tempfile.mkdtemp(prefix="md-user-", dir="/var/tmp"))
    home.chmod(0o755)
    os.chown(home, USER, USER)
    yield home
    shutil.rmtree(home)


def run_as_user(home: Path, what: str) -> str:
    # A state path too long for the embedded root, so that it goes to the runtime dir.
    state = home / ("state-" + "x" * 40)
    state.mkdir()
    os.chown(state, USER, USER)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    proc = subprocess.run(
        ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
         sys.executable, "-c", CHILD, state, what],
        capture_output=True, text=True, env=env, cwd="/", timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("what", ["ports", "embed"])
def test_as_a_user_a_symlink_planted_in_tmp_is_refused(
    user_home: Path, user_tmp: Path, what: str
) -> None:
    """Another user made /tmp/minidriver-<uid> first, as a symlink to a directory of
    theirs: nothing of ours goes there, and the error says what to do."""
    theirs = Path(f"/tmp/theirs-{OTHER}")
    theirs.mkdir(mode=0o777)
    theirs.chmod(0o777)
    given_to(theirs, OTHER)
    user_tmp.symlink_to(theirs)
    given_to(user_tmp, OTHER)
    out = run_as_user(user_home, what)
    assert f"error: {user_tmp}" in out
    assert f"is a symlink of uid {OTHER}" in out
    assert "hint: remove it if you did not make it" in out
    assert list(theirs.iterdir()) == []


def test_as_a_user_the_tmp_fallback_is_made_ours(user_home: Path, user_tmp: Path) -> None:
    out = run_as_user(user_home, "ports")
    assert out.strip().isdigit(), out
    ports = user_tmp / "ports"
    assert (user_tmp.stat().st_uid, ports.stat().st_uid) == (USER, USER)
    assert stat.S_IMODE(ports.stat().st_mode) & 0o022 == 0
