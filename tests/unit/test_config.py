import argparse

import pytest

from mesh.config import (
    ConfigError,
    Option,
    add_options,
    choice,
    from_namespace,
    host_port,
    integer,
    number,
    resolve,
    text,
)

OPTS = (
    Option("port", integer(1, 65535), 80, "port"),
    Option("check-interval", number(0.1, 3600), 2.0, "interval"),
    Option("policy", choice("maglev", "ring_hash"), "maglev", "policy"),
    Option("tag", text, (), "tag", repeat=True),
    Option("listen", host_port, ("127.0.0.1", 53), "listen", repeat=True),
)


def test_defaults_when_nothing_is_given():
    assert resolve(OPTS) == {
        "port": 80,
        "check_interval": 2.0,
        "policy": "maglev",
        "tag": (),
        "listen": ("127.0.0.1", 53),
    }


def test_layers_in_order_file_env_flags():
    file = {"port": 81, "check-interval": 5, "policy": "ring_hash"}
    env = {"MESH_PORT": "82", "MESH_CHECK_INTERVAL": "7"}
    flags = {"port": "83"}
    out = resolve(OPTS, file=file, env=env, flags=flags)
    assert out["port"] == 83  # flag beats env beats file
    assert out["check_interval"] == 7.0  # env beats file
    assert out["policy"] == "ring_hash"  # file beats default


def test_repeatable_values_from_each_layer():
    assert resolve(OPTS, env={"MESH_TAG": "a, b"})["tag"] == ("a", "b")
    assert resolve(OPTS, file={"tag": ["x"]})["tag"] == ("x",)
    assert resolve(OPTS, file={"tag": "x"})["tag"] == ("x",)
    assert resolve(OPTS, flags={"tag": ["p", "q"]}, env={"MESH_TAG": "a"})["tag"] == ("p", "q")
    assert resolve(OPTS, flags={"listen": ["[::1]:5353"]})["listen"] == (("::1", 5353),)


def test_empty_env_counts_as_unset():
    assert resolve(OPTS, env={"MESH_PORT": ""})["port"] == 80


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"flags": {"port": "0"}}, "--port: must be an integer 1-65535, got 0"),
        ({"flags": {"port": "x"}}, "--port: must be an integer 1-65535, got 'x'"),
        ({"env": {"MESH_PORT": "99999"}}, "MESH_PORT: must be an integer 1-65535"),
        ({"file": {"port": 1.5}}, "config file: port: must be an integer"),
        ({"flags": {"policy": "rr"}}, "--policy: must be one of maglev, ring_hash, got 'rr'"),
        ({"flags": {"check_interval": "nan"}}, "--check-interval: must be a number"),
        ({"flags": {"listen": ["nohost"]}}, "--listen: must be HOST:PORT"),
        ({"flags": {"listen": ["example.com:53"]}}, "--listen: host must be an IP address"),
        ({"file": {"bogus": 1}}, "config file: unknown key 'bogus'"),
    ],
)
def test_bad_values_name_the_source(kwargs, message):
    with pytest.raises(ConfigError) as info:
        resolve(OPTS, **kwargs)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_host_port_forms():
    assert host_port("127.0.0.1:53") == ("127.0.0.1", 53)
    assert host_port("[::1]:8080") == ("::1", 8080)
    assert host_port("localhost:1") == ("127.0.0.1", 1)
    with pytest.raises(ValueError):
        host_port("127.0.0.1:65536")


def test_from_namespace_reads_a_toml_file(tmp_path):
    path = tmp_path / "mesh.toml"
    path.write_text('port = 8080\ntag = ["a"]\n')
    parser = argparse.ArgumentParser()
    add_options(parser, OPTS)
    ns = parser.parse_args(["--tag", "b"])
    values, file = from_namespace(OPTS, ns, {}, config_path=str(path))
    assert values["port"] == 8080 and values["tag"] == ("b",)
    assert file == {"port": 8080, "tag": ["a"]}


def test_from_namespace_bad_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        from_namespace(OPTS, argparse.Namespace(), {}, config_path=str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        from_namespace(OPTS, argparse.Namespace(), {}, config_path=str(tmp_path / "missing.toml"))
