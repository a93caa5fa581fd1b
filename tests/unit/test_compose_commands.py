"""Every mesh command in compose.yaml parses with mesh's own argument parser."""

from pathlib import Path

import yaml

from mesh.cli import parse

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"


def test_every_mesh_command_parses_with_meshs_own_parser():
    compose = yaml.safe_load(COMPOSE.read_text())
    checked = 0
    for name, svc in compose["services"].items():
        if svc.get("image") != "mesh" or "entrypoint" in svc:
            continue
        argv = svc["command"]
        cmd, values, _ = parse(argv, env={})
        assert cmd.name == argv[0], name
        checked += 1
    assert checked >= 4


def test_every_mesh_healthcheck_parses_with_meshs_own_parser():
    compose = yaml.safe_load(COMPOSE.read_text())
    checked = 0
    for name, svc in compose["services"].items():
        test = (svc.get("healthcheck") or {}).get("test") or []
        if svc.get("image") == "mesh" and test[:2] == ["CMD", "mesh"]:
            cmd, _, _ = parse(test[2:], env={})
            assert cmd.name == test[2], name
            checked += 1
    assert checked >= 3
