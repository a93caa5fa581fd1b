"""compose.yaml and the Dockerfile, checked without a Docker engine: the compose schema,
the references between services, and every mesh command parsed by mesh's own parser."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_compose_matches_the_compose_spec():
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert exe, "check-jsonschema is a test dependency"
    out = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_references_name_real_services(compose):
    services = compose["services"]
    for name, svc in services.items():
        mode = svc.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.split(":", 1)[1] in services, f"{name}: network_mode names no service"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name}: depends_on {dep!r} is not a service"


def test_every_sidecar_sits_beside_an_app_of_its_service(compose):
    services = compose["services"]
    lb_service = _flag(services["lb"]["command"], "--service")
    sidecars = {n: s for n, s in services.items() if s.get("command", [None])[0] == "sidecar"}
    assert len(sidecars) >= 2
    for name, svc in sidecars.items():
        cmd = svc["command"]
        app = services[svc["network_mode"].split(":", 1)[1]]
        assert _flag(cmd, "--service") == lb_service, (
            f"{name} registers another service than the LB routes"
        )
        assert _flag(cmd, "--port") == _flag(app["command"], "--port"), (
            f"{name}: port is not its app's"
        )
        assert app.get("dns") == ["127.0.0.1"], f"{name}: the app's resolver is not the sidecar"
        assert "entrypoint" in app, f"{name}: the app runs the example, not mesh"


def test_published_ports_do_not_clash(compose):
    published = []
    for svc in compose["services"].values():
        for port in svc.get("ports", []):
            parts = str(port).split(":")
            published.append(":".join(parts[:-1]))
    assert len(published) == len(set(published)), published
    admin = [p for p in published if p.endswith("9901")]
    assert admin == ["127.0.0.1:9901"], "the admin port is published on loopback only"


def test_dockerfile_instructions():
    lines = []
    for raw in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    words = [shlex.split(line)[0].upper() for line in lines]
    assert set(words) <= INSTRUCTIONS, set(words) - INSTRUCTIONS
    froms = [line for line in lines if line.upper().startswith("FROM")]
    assert froms[-1].split()[1].startswith("python:3.11-slim")
    final = lines[lines.index(froms[-1]) :]
    assert any(line.startswith("USER") and "root" not in line for line in final), (
        "final stage runs as root"
    )
    assert not any("gcc" in line or "build-essential" in line for line in final), (
        "compilers in the final stage"
    )
    assert 'ENTRYPOINT ["mesh"]' in final
    hadolint = shutil.which("hadolint")
    if hadolint:
        out = subprocess.run(
            [hadolint, "--failure-threshold", "error", str(DOCKERFILE)],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stdout
