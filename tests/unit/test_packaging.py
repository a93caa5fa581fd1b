"""compose.yaml and the Dockerfile, checked without a Docker engine: the compose schema,
the references between services, and every mesh command parsed by mesh's own parser."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
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
    assert not [p for p in published if p.endswith(("9901", "9902"))], "an admin port is published"


def test_admin_ports_listen_on_loopback_only(compose):
    """A published port reaches its container on the network address, where every other
    container on the network reaches it too: the admin ports stay on loopback."""
    checked = 0
    for name, svc in compose["services"].items():
        cmd = svc.get("command") or []
        if svc.get("image") == "mesh" and cmd and cmd[0] in ("lb", "sidecar"):
            admin = _flag(cmd, "--admin")
            assert admin is None or admin.startswith("127."), f"{name}: --admin {admin}"
            checked += 1
    assert checked >= 4


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


def test_dockerfile_final_stage_holds_no_toolchain():
    text = DOCKERFILE.read_text()
    final = text[text.rindex("\nFROM ") :]
    for tool in ("rustup", "cargo", "maturin", "gcc"):
        assert tool not in final, f"{tool} in the final stage"
    assert "COPY --from=build /opt/mesh /opt/mesh" in final


def _build_stage_copies() -> list[str]:
    text = DOCKERFILE.read_text()
    build = text[: text.rindex("\nFROM ")]
    out = []
    for line in build.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            out += shlex.split(line)[1:-1]
    return out


@pytest.mark.slow
def test_the_image_build_stage_builds_from_what_it_copies(tmp_path):
    """The build stage's `pip install .`, run on exactly the files its COPY lines take:
    a package or the crate left out of the image fails here, without a Docker engine."""
    src = tmp_path / "src"
    src.mkdir()
    for name in _build_stage_copies():
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(
                path, src / name, ignore=shutil.ignore_patterns("target", "__pycache__", "*.so")
            )
        else:
            shutil.copy(path, src / name)
    env = {**os.environ, "CARGO_TARGET_DIR": str(ROOT / "native" / "target")}  # reuse the build
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = tmp_path.glob("mesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("mesh", "registry", "sidecar", "lb", "mesh_native"):
        assert f"{package}/__init__.py" in names, f"{package} is not in the image's wheel"
    assert any(n.startswith("mesh_native/_core") and n.endswith(".so") for n in names), names
    for page in ("index.html", "app.js", "app.css"):
        assert f"lb/web/{page}" in names, f"the LB's page lacks {page} in the image's wheel"


SHIPPED = ("mesh", "registry", "sidecar", "lb", "mesh_native")


def test_every_library_the_shipped_packages_import_is_a_runtime_dependency():
    """`pip install .` (the image) installs [project].dependencies only: a module imported
    by the shipped code but listed among the test extras would fail there, not here."""
    import ast
    import importlib.metadata
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    declared = {norm(re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    dists = importlib.metadata.packages_distributions()
    missing = set()
    for package in SHIPPED:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in SHIPPED:
                        continue
                    if not {norm(d) for d in dists.get(top, [top])} & declared:
                        missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not in [project].dependencies: {sorted(missing)}"
