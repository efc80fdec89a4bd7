from __future__ import annotations

import socket
from dataclasses import fields
from pathlib import Path

import pytest

from minidriver import config
from minidriver.config import EMBED_ROOT_MAX, load_config
from minidriver.exception import ConfigError
from minidriver.objects import Flavor


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "minidriver.conf"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    conf = load_config(None, state_dir=tmp_path, environ={})
    assert conf.instances_path == tmp_path / "instances"
    assert conf.base_dir == tmp_path / "instances" / "_base"
    assert conf.default.use_cow_images is True
    assert conf.default.force_raw_images is True
    assert conf.default.instance_build_timeout == 300
    assert conf.default.instance_name_template == "instance-%08x"
    assert conf.libvirt.virt_type == "auto"
    assert conf.libvirt.wait_interval == 0.5
    assert conf.libvirt.resized_base_copies is False
    assert conf.flavors["t1.nano"] == Flavor(
        "t1.nano", vcpus=1, memory_mb=128, root_gb=1, ephemeral_gb=1, swap=64
    )
    assert set(conf.flavors) >= {"m1.tiny", "m1.small", "m1.medium", "m1.large", "m1.xlarge"}


def test_file_options_typed_and_state_path_substituted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[DEFAULT]
state_path = {tmp_path}/state
instance_build_timeout = 42
use_cow_images = false

[libvirt]
virt_type = qemu
wait_interval = 0.25
resized_base_copies = yes

[image_cache]
subdirectory_name = cache

[flavor:lab.big]
vcpus = 4
memory_mb = 4096
root_gb = 10
swap = 512
""",
    )
    conf = load_config(path, environ={})
    assert conf.state_path == tmp_path / "state"
    assert conf.instances_path == tmp_path / "state" / "instances"
    assert conf.base_dir == tmp_path / "state" / "instances" / "cache"
    assert conf.default.instance_build_timeout == 42
    assert conf.default.use_cow_images is False
    assert conf.libvirt.virt_type == "qemu"
    assert conf.libvirt.wait_interval == 0.25
    assert conf.libvirt.resized_base_copies is True
    assert conf.flavors["lab.big"] == Flavor("lab.big", 4, 4096, 10, 0, 512)
    assert conf.source == str(path)


def test_environment_and_argument_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, f"[DEFAULT]\nstate_path = {tmp_path}/from-file\n")
    env = {"MINIDRIVER_CONFIG": str(path), "MINIDRIVER_STATE_DIR": str(tmp_path / "from-env")}
    assert load_config(None, environ=env).state_path == tmp_path / "from-env"
    assert load_config(None, state_dir=tmp_path / "arg", environ=env).state_path == (
        tmp_path / "arg"
    )
    assert load_config(None, environ={"MINIDRIVER_CONFIG": str(path)}).state_path == (
        tmp_path / "from-file"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[libvirt]\nvirt_typ = qemu\n", "unknown option [libvirt] virt_typ"),
        ("[libvirt]\nvirt_type = xen\n", "is not one of"),
        ("[DEFAULT]\ninstance_build_timeout = soon\n", "is not a valid int"),
        ("[DEFAULT]\nuse_cow_images = maybe\n", "is not a valid bool"),
        ("[nova]\nx = 1\n", "unknown section [nova]"),
        ("[flavor:x]\nvcpus = 1\n", "misses memory_mb, root_gb"),
        ("[flavor:x]\nvcpus = 0\nmemory_mb = 1\nroot_gb = 1\n", "vcpus must be at least 1"),
        ("[flavor:x]\nvcpus = 1\nmemory_mb = 1\nroot_gb = 1\ndisk = 3\n", "unknown option"),
        ("not ini at all\n", "is not valid INI"),
        ("[libvirt]\nnetwork_mode = slirp\n", "is not one of: user, network, bridge, none"),
        ("[libvirt]\nforward_port_min = 80\n", "not a port range"),
        ("[libvirt]\nforward_port_min = 3000\nforward_port_max = 2999\n", "not a port range"),
        ("[libvirt]\nforward_port_max = 70000\n", "not a port range"),
        ("[host:h2]\n", "[host:h2] misses connection_uri"),
        ("[host:h2]\nuri = qemu:///system\n", "unknown option [host:h2] uri"),
        ("[DEFAULT]\nhost = a\n[host:a]\nconnection_uri = test:///default\n", "this host"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), state_dir=tmp_path, environ={})
    assert message in str(err.value)


def test_hosts(tmp_path: Path) -> None:
    """[DEFAULT] host names this host (Nova's option, the hostname by default);
    [host:NAME] sections the others, in the file's order; for_host gives the settings
    of the driver on that host."""
    conf = load_config(None, state_dir=tmp_path, environ={})
    assert conf.default.host == socket.gethostname()
    assert conf.host_names == (socket.gethostname(),)
    path = write(
        tmp_path,
        "[DEFAULT]\nhost = one\n[libvirt]\nconnection_uri = test:///default\n"
        "[host:three]\nconnection_uri = qemu+unix:///system?socket=/x/sock\n"
        "[host:two]\nconnection_uri = test:///default\n",
    )
    conf = load_config(path, state_dir=tmp_path, environ={})
    assert conf.host_names == ("one", "three", "two")
    three = conf.for_host("three")
    assert three.default.host == "three"
    assert three.libvirt.connection_uri == "qemu+unix:///system?socket=/x/sock"
    assert three.state_path == conf.state_path
    assert conf.for_host("one") is conf
    # From another host's settings, every host is still reachable by name.
    assert three.for_host("one") is conf
    assert three.for_host("two").libvirt.connection_uri == "test:///default"
    assert three.host_names == conf.host_names
    with pytest.raises(ConfigError, match="no host 'four'"):
        conf.for_host("four")


def test_network_options(tmp_path: Path) -> None:
    conf = load_config(None, state_dir=tmp_path, environ={})
    assert conf.libvirt.network_mode == "user"
    assert conf.libvirt.network_name == "default"
    assert conf.libvirt.bridge == ""
    assert (conf.libvirt.forward_port_min, conf.libvirt.forward_port_max) == (10022, 10999)
    assert conf.default.ssh_user == "debian"
    assert conf.keypairs_path == tmp_path / "keypairs"
    assert conf.known_hosts_path == tmp_path / "known_hosts"
    # Host-wide, whatever the state dir: two state dirs see one set of reservations.
    other = load_config(None, state_dir=tmp_path / "other", environ={})
    assert conf.port_reservations_path == other.port_reservations_path
    path = write(
        tmp_path,
        "[DEFAULT]\nssh_user = root\n[libvirt]\nnetwork_mode = bridge\nbridge = br0\n"
        f"port_reservations_path = {tmp_path}/ports\n",
    )
    conf = load_config(path, state_dir=tmp_path, environ={})
    assert (conf.libvirt.network_mode, conf.libvirt.bridge) == ("bridge", "br0")
    assert conf.default.ssh_user == "root"
    assert conf.port_reservations_path == tmp_path / "ports"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.conf", environ={})


def test_embed_root_stays_short_for_long_state_paths(tmp_path: Path) -> None:
    short = load_config(None, state_dir="/var/tmp/md", environ={})
    assert short.embed_root == Path("/var/tmp/md/embed")
    deep = load_config(None, state_dir=tmp_path / ("x" * 80), environ={})
    assert len(str(deep.embed_root)) <= EMBED_ROOT_MAX
    other = load_config(None, state_dir=tmp_path / ("y" * 80), environ={})
    assert deep.embed_root != other.embed_root


def test_rbd_options_with_nova_names_and_defaults(tmp_path: Path) -> None:
    conf = load_config(None, state_dir=tmp_path, environ={})
    assert conf.libvirt.images_rbd_pool == "rbd"
    assert conf.libvirt.images_rbd_ceph_conf == ""
    assert conf.libvirt.rbd_user == ""
    assert conf.libvirt.rbd_secret_uuid == ""
    assert conf.libvirt.rbd_connect_timeout == 5
    assert conf.glance_store.rbd_store_pool == "images"

    path = write(
        tmp_path,
        """
[libvirt]
images_type = rbd
images_rbd_pool = vms
images_rbd_ceph_conf = /etc/ceph/lab.conf
rbd_user = nova
rbd_secret_uuid = 457eb676-33da-42ec-9a8c-9293d545c337
rbd_connect_timeout = 2

[glance_store]
rbd_store_pool = glance
""",
    )
    conf = load_config(path, state_dir=tmp_path, environ={})
    assert conf.libvirt.images_type == "rbd"
    assert conf.libvirt.images_rbd_pool == "vms"
    assert conf.libvirt.images_rbd_ceph_conf == "/etc/ceph/lab.conf"
    assert conf.libvirt.rbd_user == "nova"
    assert conf.libvirt.rbd_secret_uuid == "457eb676-33da-42ec-9a8c-9293d545c337"
    assert conf.libvirt.rbd_connect_timeout == 2
    assert conf.glance_store.rbd_store_pool == "glance"


@pytest.mark.parametrize(
    ("libvirt", "message"),
    [
        ("rbd_secret_uuid = 457eb676-33da-42ec-9a8c-9293d545c337", "rbd_user is not"),
        ("rbd_user = nova\nrbd_secret_uuid = not-a-uuid", "is not a uuid"),
        ("rbd_connect_timeout = 0", "at least 1 second"),
        ("images_type = ceph", "is not one of: default, qcow2, raw, flat, rbd"),
    ],
)
def test_bad_rbd_options_are_refused(tmp_path: Path, libvirt: str, message: str) -> None:
    path = write(tmp_path, f"[libvirt]\n{libvirt}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, state_dir=tmp_path, environ={})


def test_every_option_says_whose_it_is() -> None:
    """Each option of every section is Nova's, Glance's, glance_store's, Cinder's or
    ours, with where it differs; no stale entry for an option that is gone."""
    options = {(section, f.name) for section, cls in config.SECTIONS.items() for f in fields(cls)}
    options |= {(config.HOST_SECTION, f.name) for f in fields(config.HostOptions)}
    assert set(config.ORIGINS) == options
    owners = {o.owner for o in config.ORIGINS.values()}
    assert owners <= {"Nova", "Glance", "glance_store", "Cinder", "ours"}
    for key, origin in config.ORIGINS.items():
        assert (origin.owner == "ours") == (origin.source == ""), key
    for name in ("wait_interval", "resized_base_copies", "images_max_virtual_size"):
        assert config.ORIGINS["libvirt", name].owner == "ours"
    timeout = config.ORIGINS["DEFAULT", "instance_build_timeout"]
    assert timeout.owner == "Nova" and "default: 0" in timeout.differs


def test_readme_says_whose_each_option_is() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert config.origins_markdown() in readme, (
        "README.md's table 'Whose option' drifted from config.ORIGINS: paste"
        " config.origins_markdown() into the section Configuration"
    )
