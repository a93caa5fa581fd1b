"""The sidecar's admin port, on a real ``mesh sidecar`` process: /healthz through the
lifecycle, /metrics parsed by prometheus_client's own parser after real queries, /dns."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import struct
import sys

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

from registry.model import Instance
from tests.integration.mesh_proc import LISTENING, Proc

ADMIN = re.compile(r"listening admin=(\S+):(\d+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def sidecar(db_url: str, *extra: str):
    proc = await Proc.start(
        "sidecar", "--service", "web", "--port", "8080", "--instance", "one",
        "--address", "127.0.0.1", "--check", "none", "--dns-listen", "127.0.0.1:0",
        "--admin", "127.0.0.1:0", "--upstream", "none", "--lease-ttl", "3",
        "--mongo-url", db_url, *extra,
    )  # fmt: skip
    try:
        dns_at = await proc.wait_line(LISTENING, timeout=30)
        admin_at = await proc.wait_line(ADMIN, timeout=30)
        yield (
            proc,
            (dns_at.group(1), int(dns_at.group(2))),
            f"http://{admin_at.group(1)}:{admin_at.group(2)}",
        )
    finally:
        await proc.stop()


async def get(session: aiohttp.ClientSession, url: str, **kw) -> tuple[int, str, dict]:
    async with session.get(url, **kw) as r:
        return r.status, await r.text(), dict(r.headers)


async def healthz_until(session, url: str, status: int, timeout: float) -> dict:
    """Poll /healthz until it gives ``status``; its JSON body then."""
    async with asyncio.timeout(timeout):
        while True:
            async with session.get(f"{url}/healthz") as r:
                if r.status == status:
                    return await r.json()
            await asyncio.sleep(0.05)


@pytest.mark.one_loop
async def test_healthz_is_503_while_registering_200_when_registered_503_while_draining():
    port = free_port()
    url = f"mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=500"
    async with aiohttp.ClientSession() as session, sidecar(url, "--drain", "3") as (proc, _, admin):
        # No registry yet: the sidecar answers DNS but cannot register.
        status, body, _ = await get(session, f"{admin}/healthz")
        assert status == 503, body
        assert json.loads(body) == {"ok": False, "state": "registering", "dns": True}
        db = await Proc.start("db", "--host", "127.0.0.1", "--port", str(port), "--data", "memory")
        try:
            registered = await healthz_until(session, admin, 200, timeout=30)
            assert registered == {"ok": True, "state": "registered", "dns": True}
            proc.proc.send_signal(signal.SIGTERM)
            draining = await healthz_until(session, admin, 503, timeout=5)
            assert draining["state"] == "draining"
            assert await asyncio.wait_for(proc.proc.wait(), 15) == 0
        finally:
            await db.stop()


async def udp(query: dns.message.Message, where) -> dns.message.Message:
    return await dns.asyncquery.udp(query, where[0], port=where[1], timeout=2)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.one_loop
async def test_metrics_count_what_the_queries_got(db_url, store):
    await store.register(
        Instance(service="web", instance="two", address="127.0.0.2", port=8080), 30
    )
    async with aiohttp.ClientSession() as session, sidecar(db_url) as (_, dns_at, admin):
        await healthz_until(session, admin, 200, timeout=20)
        srv = dns.message.make_query("_web._tcp.service.mesh.", "SRV")
        async with asyncio.timeout(10):  # until both instances are in the table
            while len((await udp(srv, dns_at)).answer[0]) < 2:
                await asyncio.sleep(0.05)
        status, text, headers = await get(session, f"{admin}/metrics")
        before = samples(text)
        for _ in range(20):
            assert (await udp(srv, dns_at)).rcode() == dns.rcode.NOERROR
        for _ in range(5):
            q = dns.message.make_query("nope.service.mesh.", "A")
            assert (await udp(q, dns_at)).rcode() == dns.rcode.NXDOMAIN
        for _ in range(3):
            q = dns.message.make_query("example.com.", "A")  # no upstream: REFUSED
            assert (await udp(q, dns_at)).rcode() == dns.rcode.REFUSED
        tcp = await dns.asyncquery.tcp(srv, dns_at[0], port=dns_at[1], timeout=2)
        assert tcp.rcode() == dns.rcode.NOERROR
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:  # no header: no reply
            for _ in range(4):
                raw.sendto(struct.pack("!H", 7), dns_at)
        async with asyncio.timeout(5):  # the dropped datagrams are read after our queries
            while True:
                status, text, headers = await get(session, f"{admin}/metrics")
                after = samples(text)
                if after[("mesh_dns_dropped_total", (("transport", "udp"),))] >= 4:
                    break
                await asyncio.sleep(0.05)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    queries = "mesh_dns_queries_total"
    assert grew(queries, transport="udp", type="SRV", rcode="NOERROR") == 20
    assert grew(queries, transport="udp", type="A", rcode="NXDOMAIN") == 5
    assert grew(queries, transport="udp", type="A", rcode="REFUSED") == 3
    assert grew(queries, transport="tcp", type="SRV", rcode="NOERROR") == 1
    assert grew("mesh_dns_dropped_total", transport="udp") == 4
    assert after[("mesh_dns_forwarded_total", (("transport", "udp"),))] == 0
    assert after[("mesh_dns_unsent_total", (("transport", "udp"),))] == 0
    assert after[("mesh_dns_answer_entries", ())] > 0
    assert after[("mesh_dns_table_rebuild_seconds_count", ())] >= 1
    assert after[("mesh_registry_connected", ())] == 1
    assert after[("mesh_registry_snapshot_age_seconds", ())] < 60
    assert after[("mesh_sidecar_state", (("state", "registered"),))] == 1
    assert after[("mesh_sidecar_state", (("state", "draining"),))] == 0
    assert after[("mesh_sidecar_status", (("status", "passing"),))] == 1
    assert after[("mesh_sidecar_probes_total", (("result", "pass"),))] >= 1
    assert after[("mesh_sidecar_lease_renewals_total", (("result", "lost"),))] == 0


@pytest.mark.one_loop
async def test_dns_view_shows_the_answers_given_now(db_url, store):
    await store.register(
        Instance(service="db", instance="main", address="fd00::5", port=5432, weight=7), 30
    )
    async with aiohttp.ClientSession() as session, sidecar(db_url) as (_, dns_at, admin):
        await healthz_until(session, admin, 200, timeout=20)
        async with asyncio.timeout(10):
            while True:
                status, body, headers = await get(session, f"{admin}/dns")
                if '"web"' in body and '"db"' in body:
                    break
                await asyncio.sleep(0.05)
        async with session.get(f"{admin}/dns") as r:
            view = await r.json()
        assert view["domain"] == "mesh"
        assert view["services"]["web"]["srv"] == ["1 100 8080 one.web.service.mesh."]
        assert view["services"]["web"]["addresses"] == ["127.0.0.1"]
        assert view["services"]["db"]["srv"] == ["1 7 5432 main.db.service.mesh."]
        assert view["services"]["db"]["addresses"] == ["fd00::5"]
        # The same as a resolver is told.
        reply = await udp(dns.message.make_query("_db._tcp.service.mesh.", "SRV"), dns_at)
        assert [r.to_text() for r in reply.answer[0]] == view["services"]["db"]["srv"]
        status, page, headers = await get(session, f"{admin}/dns", headers={"Accept": "text/html"})
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert "<script" not in page
        assert "1 7 5432 main.db.service.mesh." in page and "fd00::5" in page


async def mesh_admin(*args: str) -> tuple[int, str, str]:
    """``mesh admin ARGS``: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "admin", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.one_loop
async def test_mesh_admin_exits_0_while_healthz_is_200_and_1_otherwise():
    """The command a compose healthcheck or a Kubernetes exec probe runs beside a sidecar."""
    port = free_port()
    url = f"mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=500"
    async with sidecar(url, "--drain", "30") as (proc, _, admin):
        where = admin.removeprefix("http://")
        code, out, err = await mesh_admin("--admin", where)  # no registry: 503 registering
        assert code == 1
        assert json.loads(out)["state"] == "registering"
        assert err.strip() == f"mesh admin: {where}/healthz: 503 Service Unavailable"
        db = await Proc.start("db", "--host", "127.0.0.1", "--port", str(port), "--data", "memory")
        try:
            async with asyncio.timeout(30):
                while (code := (await mesh_admin("--admin", where))[0]) != 0:
                    await asyncio.sleep(0.2)
            code, out, err = await mesh_admin("--admin", where, "/dns")
            assert code == 0 and err == ""
            assert "web" in json.loads(out)["services"]
            proc.proc.send_signal(signal.SIGTERM)  # draining: not ready any more
            async with asyncio.timeout(10):
                while (await mesh_admin("--admin", where))[0] != 1:
                    await asyncio.sleep(0.2)
        finally:
            await db.stop()
    code, out, err = await mesh_admin("--admin", where)  # nothing listens
    assert (code, out) == (1, "")
    assert err.startswith(f"mesh admin: {where}/healthz: ") and err.count("\n") == 1
    code, _, err = await mesh_admin("healthz")
    assert code == 2 and err.count("\n") == 1 and "PATH must start with /" in err


@pytest.mark.one_loop
async def test_drain_on_request_deregisters_but_keeps_dns_until_the_signal(db_url, store):
    """A pod's preStop, ``mesh admin --post /drain``: out of DNS and the registry while the
    app still runs and still resolves names through the sidecar; SIGTERM then exits."""
    async with (
        aiohttp.ClientSession() as session,
        sidecar(db_url, "--drain", "1") as (
            proc,
            dns_at,
            admin,
        ),
    ):
        await healthz_until(session, admin, 200, timeout=20)
        assert [i.instance for i in await store.list("web")] == ["one"]
        where = admin.removeprefix("http://")
        async with session.post(f"{admin}/drain", headers={"Origin": "http://evil.test"}) as r:
            assert r.status == 403  # a browser's request, from any page: refused
        assert (await get(session, f"{admin}/healthz"))[0] == 200
        code, out, err = await mesh_admin("--admin", where, "--post", "/drain")
        assert (code, err) == (0, "")
        assert json.loads(out)["drain_started"] is True
        gone = await healthz_until(session, admin, 503, timeout=5)
        assert gone["state"] in ("draining", "gone")
        async with asyncio.timeout(10):  # deregistered after the drain time
            while json.loads((await get(session, f"{admin}/healthz"))[1])["state"] != "gone":
                await asyncio.sleep(0.1)
        assert await store.list("web") == []
        assert proc.proc.returncode is None  # still up
        reply = await udp(dns.message.make_query("_web._tcp.service.mesh.", "SRV"), dns_at)
        assert reply.rcode() == dns.rcode.NXDOMAIN  # answered: the table no longer has it
        code, out, _ = await mesh_admin("--admin", where, "--post", "/drain")
        assert code == 0 and json.loads(out)["drain_started"] is False
        proc.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.proc.wait(), 5) == 0
