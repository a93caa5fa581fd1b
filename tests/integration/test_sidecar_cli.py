"""``mesh sidecar`` and ``mesh resolve`` as users run them: real processes, real signals."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import pytest

from registry.model import Instance
from tests.integration.mesh_proc import LISTENING, Proc


@contextlib.asynccontextmanager
async def sidecar(db_url: str, *extra: str):
    args = [
        "sidecar", "--service", "web", "--port", "8080", "--instance", "one",
        "--address", "127.0.0.1", "--check", "none", "--dns-listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--upstream", "none", "--mongo-url", db_url, *extra,
    ]  # fmt: skip
    proc = await Proc.start(*args)
    try:
        match = await proc.wait_line(LISTENING)
        yield proc, f"{match.group(1)}:{match.group(2)}"
    finally:
        await proc.stop()


async def run_mesh(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def wait_for(predicate, timeout: float):
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


@pytest.mark.one_loop
async def test_sigterm_drains_then_deregisters_and_exits_0(db_url, store):
    async with sidecar(db_url, "--drain", "1") as (proc, dns_at):
        await proc.wait_line("web/one: registered at 127.0.0.1:8080")
        await store.register(
            Instance(service="web", instance="two", address="127.0.0.2", port=8080), 30
        )

        async def both():
            code, out, _ = await run_mesh("resolve", "_web._tcp.service.mesh", "--server", dns_at)
            return code == 0 and len(out.splitlines()) == 2

        await wait_for(both, 10)
        code, out, _ = await run_mesh("resolve", "_web._tcp.service.mesh", "--server", dns_at)
        assert out.splitlines() == [
            "1 100 8080 one.web.service.mesh 127.0.0.1",
            "1 100 8080 two.web.service.mesh 127.0.0.2",
        ]
        code, out, _ = await run_mesh("resolve", "one.web.service.mesh", "--server", dns_at)
        assert (code, out) == (0, "127.0.0.1\n")

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        proc.proc.send_signal(signal.SIGTERM)

        async def draining():
            return {i.instance: i.status for i in await store.list()}.get("one") == "draining"

        await wait_for(draining, 1)
        code, out, _ = await run_mesh("resolve", "_web._tcp.service.mesh", "--server", dns_at)
        assert out.splitlines() == ["1 100 8080 two.web.service.mesh 127.0.0.2"]
        assert await asyncio.wait_for(proc.proc.wait(), 10) == 0
        assert loop.time() - t0 >= 1.0  # the drain was waited out
        assert [i.instance for i in await store.list()] == ["two"]
        await proc.wait_line("web/one: deregistered")


@pytest.mark.one_loop
async def test_second_signal_exits_at_once(db_url, store):
    async with sidecar(db_url, "--drain", "30") as (proc, _):
        await proc.wait_line("web/one: registered")
        proc.proc.send_signal(signal.SIGINT)
        await proc.wait_line("web/one: draining")
        proc.proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.proc.wait(), 5) == 1


@pytest.mark.one_loop
async def test_flags_from_env_and_dig_over_udp_and_tcp(db_url):
    env = {"MESH_TAG": "blue,canary", "MESH_WEIGHT": "7", "MESH_DNS_TTL": "9"}
    args = [
        "sidecar", "--service", "web", "--port", "8080", "--instance", "one",
        "--address", "127.0.0.1", "--check", "none", "--dns-listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--upstream", "none", "--mongo-url", db_url,
    ]  # fmt: skip
    proc = await Proc.start(*args, env=env)
    try:
        match = await proc.wait_line(LISTENING)
        port = match.group(2)
        await proc.wait_line("registered")
        for transport in ("+notcp", "+tcp"):
            answer = ""
            for _ in range(100):
                dig = await asyncio.create_subprocess_exec(
                    "dig", "@127.0.0.1", "-p", port, transport, "+short", "+time=2", "+tries=1",
                    "_web._canary.service.mesh", "SRV", stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                answer = (await dig.communicate())[0].decode().strip()
                if answer:
                    break
                await asyncio.sleep(0.05)
            assert answer == "1 7 8080 one.web.service.mesh."
    finally:
        await proc.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "80"], "--service is required"),
        (["--service", "web"], "--port is required"),
        (["--service", "web", "--port", "0"], "--port: must be an integer 1-65535"),
        (["--service", "web", "--port", "80", "--weight", "0"], "--weight"),
        (["--service", "web", "--port", "80", "--check", "udp"], "--check"),
        (["--service", "web", "--port", "80", "--meta", "novalue"], "--meta"),
        (["--service", "web", "--port", "80", "--dns-listen", "nowhere"], "--dns-listen"),
        (["--service", "web", "--port", "80", "--upstream", "x:y"], "--upstream"),
        (["--service", "web", "--port", "80", "--admin", "nowhere"], "--admin"),
        (["--service", "web", "--port", "80", "--tag", "Bad_Tag"], "--tag"),
        (["--service", "web", "--port", "80", "--domain", ".".join(["d" * 60] * 4)], "--domain"),
    ],
)
@pytest.mark.one_loop
async def test_bad_flags_get_one_line_and_exit_2(args, message):
    code, _, err = await run_mesh("sidecar", *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.one_loop
async def test_resolve_reports_a_missing_name(db_url):
    async with sidecar(db_url) as (_, dns_at):
        code, out, err = await run_mesh("resolve", "nope.service.mesh", "--server", dns_at)
        assert code == 1 and out == "" and "nope.service.mesh A" in err


@pytest.mark.one_loop
async def test_dns_port_in_use_is_one_line_and_exit_2(db_url):
    import socket

    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        code, _, err = await run_mesh(
            "sidecar", "--service", "web", "--port", "80", "--address", "127.0.0.1",
            "--dns-listen", f"127.0.0.1:{port}", "--mongo-url", db_url, "--upstream", "none",
        )  # fmt: skip
        assert code == 2
        assert err.strip().splitlines()[-1].startswith("mesh sidecar: error: --dns-listen")
    finally:
        taken.close()


@pytest.mark.one_loop
async def test_admin_port_in_use_is_one_line_and_exit_2(db_url):
    import socket

    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        code, _, err = await run_mesh(
            "sidecar", "--service", "web", "--port", "80", "--address", "127.0.0.1",
            "--dns-listen", "127.0.0.1:0", "--admin", f"127.0.0.1:{port}",
            "--mongo-url", db_url, "--upstream", "none",
        )  # fmt: skip
        assert code == 2
        assert err.strip().splitlines()[-1].startswith(f"mesh sidecar: error: --admin 127.0.0.1:{port}")
        assert "Traceback" not in err
    finally:
        taken.close()
