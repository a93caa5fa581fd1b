"""The mesh command as users run it: real subprocesses, real database."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymongo import MongoClient

from registry.model import Instance

MESH = [sys.executable, "-m", "mesh"]


def mesh(*args: str, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MESH, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.one_loop
async def test_ls_lists_the_registry_as_table_and_json(store, db_url):
    await store.register(
        Instance(service="web", instance="w-1", address="10.1.2.3", port=8080, tags=("blue",)), 30
    )
    await store.register(Instance(service="api", instance="a-1", address="::1", port=9000), 30)
    await store.set_status("api/a-1", "critical")
    out = mesh("ls", "--mongo-url", db_url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "SERVICE",
        "INSTANCE",
        "ADDRESS",
        "STATUS",
        "WEIGHT",
        "TAGS",
        "LEASE",
    ]
    assert lines[1].split()[:6] == ["api", "a-1", "[::1]:9000", "critical", "100", "-"]
    assert lines[2].split()[:6] == ["web", "w-1", "10.1.2.3:8080", "passing", "100", "blue"]
    out = mesh("ls", "--json", "--service", "web", "--mongo-url", db_url)
    [row] = [json.loads(line) for line in out.stdout.splitlines()]
    assert row["instance"] == "w-1" and row["tags"] == ["blue"] and 0 < row["lease_left"] <= 30


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["ls", "--mongo-url", "mongodb://127.0.0.1:1/mesh"],
            "mesh ls: error: registry at mongodb://127.0.0.1:1/mesh unreachable",
        ),
        (
            ["ls", "--mongo-url", "mongodb://u:hunter2@127.0.0.1:1/mesh"],
            "mongodb://u:****@127.0.0.1:1/mesh",
        ),
        (
            ["ls", "--service", "Not_A_Label"],
            "mesh ls: error: --service: service name must be a DNS label",
        ),
        (
            ["db", "--port", "99999"],
            "mesh db: error: --port: must be an integer 0-65535, got 99999",
        ),
        (["demo", "--peers", "x"], "mesh demo: error: --peers: must be an integer"),
        (["nope"], "mesh: error: argument COMMAND: invalid choice: 'nope'"),
        (["ls", "--bogus"], "error: unrecognized arguments: --bogus"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(args, message):
    out = mesh(*args)
    assert out.returncode == 2, out
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "hunter2" not in out.stderr


def test_env_and_config_file_layers(tmp_path):
    cfg = tmp_path / "ls.toml"
    cfg.write_text('mongo_url = "mongodb://127.0.0.1:2/mesh"\n')
    out = mesh("ls", "--config", str(cfg))
    assert out.returncode == 2 and "127.0.0.1:2/mesh" in out.stderr
    env = {"MESH_MONGO_URL": "mongodb://127.0.0.1:3/mesh", "PATH": "/usr/bin:/bin"}
    out = mesh("ls", "--config", str(cfg), env=env)
    assert "127.0.0.1:3/mesh" in out.stderr, "environment beats the file"
    out = mesh("ls", "--config", str(cfg), "--mongo-url", "mongodb://127.0.0.1:4/mesh", env=env)
    assert "127.0.0.1:4/mesh" in out.stderr, "a flag beats the environment"
    cfg.write_text("bogus = 1\n")
    out = mesh("ls", "--config", str(cfg))
    assert out.returncode == 2 and "unknown key 'bogus'" in out.stderr


def test_mesh_db_serves_the_wire_protocol(tmp_path):
    proc = subprocess.Popen([*MESH, "db", "--port", "0", "--data", str(tmp_path / "d.db")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        port = None
        deadline = time.monotonic() + 20
        assert proc.stdout is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "Listening on" in line:
                port = int(line.rsplit(":", 1)[1])
        assert port, "mesh db never said where it listens"
        client: MongoClient = MongoClient(
            f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=5000
        )
        assert client.admin.command("ping")["ok"] == 1
        client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # a loaded machine: never leave the server behind
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize(
    "args",
    [
        ["sidecar", "--service", "web", "--port", "8080", "--address", "127.0.0.1", "--check", "none",
         "--dns-listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", "none"],
        ["lb", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--service", "web"],
    ],
)  # fmt: skip
def test_registry_password_is_never_logged(args):
    """A long-running part with an unreachable registry logs the URL with the password masked."""
    url = "mongodb://mesh:hunter2@127.0.0.1:1/mesh?tls=false"
    proc = subprocess.Popen([*MESH, *args, "--mongo-url", url], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "127.0.0.1:1" in line and "****" in line:
                break
    finally:
        proc.terminate()
        try:
            rest, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
        lines.append(rest or "")
    text = "".join(lines)
    assert "mongodb://mesh:****@127.0.0.1:1/mesh" in text, text[-2000:]
    assert "hunter2" not in text


def test_an_unbuilt_native_core_is_one_line_at_start(tmp_path):
    """The package without its compiled module (a source tree nobody built): mesh says so
    in one line and stops; it never runs some slower way."""
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "mesh_native").mkdir()
    shutil.copy(root / "mesh_native" / "__init__.py", tmp_path / "mesh_native" / "__init__.py")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"}
    out = subprocess.run(
        [sys.executable, "-m", "mesh", "lb", "--help"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1, out
    assert out.stderr.startswith("mesh: error: mesh's native core is not built"), out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
