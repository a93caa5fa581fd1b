"""``mesh lb`` as a user runs it: flags, two LB processes agreeing, the admin port,
SIGTERM drain, registry endpoints, config-file routes, workers."""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from registry.model import Instance
from tests.integration.test_lb_support import REPO, LBProcess, backends, curl

pytestmark = pytest.mark.one_loop


def _eps(bs) -> str:
    return ",".join(b.key for b in bs)


async def _backend_for(url: str, user: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/", headers={"X-User": user}) as r:
        assert r.status == 200
        return (await r.json())["backend"]


async def test_two_lb_processes_agree_and_admin_explains():
    async with backends(3) as bs:
        args = ("--endpoints", _eps(bs), "--hash-on", "header:x-user")
        async with LBProcess(*args) as a, LBProcess(*args, "--policy", "maglev") as b:
            users = [f"user-{i}" for i in range(40)]
            on_a = [await _backend_for(a.url, u) for u in users]
            on_b = [await _backend_for(b.url, u) for u in users]
            assert on_a == on_b
            assert len(set(on_a)) == 3
            by_name = {x.name: x.key for x in bs}
            async with aiohttp.ClientSession() as s:
                for u, served in zip(users[:5], on_a[:5], strict=True):
                    async with s.get(a.admin + "/ring", params={"key": u}) as r:
                        ring = await r.json()
                    assert ring["endpoint"] == by_name[served]
                    assert ring["hash_on"] == ["header:x-user"]
                    assert len(ring["next"]) == 2 and ring["home"] == ring["endpoint"]
                async with s.get(a.admin + "/healthz") as r:
                    assert r.status == 200


CLUSTERS_SCHEMA = {
    "type": "object",
    "required": ["clusters"],
    "properties": {
        "clusters": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "policy", "panic", "endpoints", "table", "endpoints_usable"],
                "properties": {
                    "policy": {"enum": ["maglev", "ring_hash", "round_robin", "least_request", "random"]},
                    "panic": {"type": "boolean"},
                    "table": {
                        "type": ["object", "null"],
                        "required": ["kind", "size", "entries_min", "entries_max"],
                    },
                    "endpoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "address", "weight", "health", "ejected", "ejection",
                                "active_requests", "requests", "responses_5xx",
                                "latency_ewma_seconds",
                            ],
                            "properties": {
                                "address": {"type": "string"},
                                "weight": {"type": "integer", "minimum": 1},
                                "health": {"enum": ["healthy", "unhealthy", "unchecked"]},
                                "ejected": {"type": "boolean"},
                                "ejection": {
                                    "type": ["object", "null"],
                                    "required": ["reason", "until", "ejections"],
                                },
                                "active_requests": {"type": "integer", "minimum": 0},
                                "requests": {"type": "integer", "minimum": 0},
                                "responses_5xx": {"type": "integer", "minimum": 0},
                                "latency_ewma_seconds": {"type": ["number", "null"]},
                            },
                        },
                    },
                },
            },
        }
    },
}  # fmt: skip


async def test_metrics_parse_and_clusters_schema():
    async with backends(2) as bs:
        bs[1].fail_status = 500
        async with (
            LBProcess(
                "--endpoints", _eps(bs), "--hash-on", "header:x-user", "--base-ejection-time", "60"
            ) as lb,
            aiohttp.ClientSession() as s,
        ):
            for i in range(30):
                async with s.get(lb.url + "/", headers={"X-User": f"m{i}"}) as r:
                    await r.read()
            async with s.get(lb.url + "/") as r:  # no key: a random pick, counted
                await r.read()
            async with s.get(lb.admin + "/metrics") as r:
                text = await r.text()
            async with s.get(lb.admin + "/clusters") as r:
                clusters = await r.json()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name in (
            "mesh_lb_requests", "mesh_lb_upstream_latency_seconds", "mesh_lb_ejections",
            "mesh_lb_retries", "mesh_lb_spills", "mesh_lb_panic", "mesh_lb_active_connections",
            "mesh_lb_random_picks",
        ):  # fmt: skip
            assert name in families, name
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families.values()
            for s in f.samples
        }
        assert (
            samples[
                ("mesh_lb_ejections_total", (("cluster", "static"), ("reason", "consecutive_5xx")))
            ]
            == 1
        )
        assert samples[("mesh_lb_random_picks_total", (("cluster", "static"),))] == 1
        assert (
            samples[("mesh_lb_requests_total", (("cluster", "static"), ("code_class", "5xx")))] == 5
        )
        jsonschema.validate(clusters, CLUSTERS_SCHEMA)
        [c] = clusters["clusters"]
        bad = next(e for e in c["endpoints"] if e["address"] == bs[1].key)
        assert bad["ejected"] and bad["ejection"]["reason"] == "consecutive_5xx"
        assert bad["responses_5xx"] == 5
        assert c["table"]["size"] == 65537
        # Each endpoint's counters and latency histogram (kept natively) agree with /clusters
        # and add up to the cluster's: 31 requests, every one answered by one endpoint.
        total = 0
        for ep in c["endpoints"]:
            labels = (("cluster", "static"), ("endpoint", ep["address"]))
            tries = samples[("mesh_lb_endpoint_requests_total", labels)]
            assert tries == ep["requests"] > 0
            assert samples[("mesh_lb_endpoint_upstream_latency_seconds_count", labels)] == tries
            inf = (*labels[:1], labels[1], ("le", "+Inf"))
            assert samples[("mesh_lb_endpoint_upstream_latency_seconds_bucket", inf)] == tries
            assert samples[("mesh_lb_endpoint_failures_total", labels)] == ep["failures"]
            total += tries
        assert total == 31
        assert samples[("mesh_lb_upstream_latency_seconds_count", (("cluster", "static"),))] == 31
        assert samples[("mesh_lb_upstream_requests_total", (("cluster", "static"),))] == 31
        failures = sum(ep["failures"] for ep in c["endpoints"])
        assert (
            samples[("mesh_lb_upstream_failures_total", (("cluster", "static"),))] == failures == 5
        )
        served = sum(v for (name, labels), v in samples.items() if name == "mesh_lb_requests_total")
        assert served == 31


async def test_sigterm_drain_loses_no_in_flight_request():
    async with backends(2) as bs:
        for b in bs:
            b.delay = 1.0
        lb = await LBProcess("--endpoints", _eps(bs), "--drain-timeout", "10").start()
        async with aiohttp.ClientSession() as s:

            async def get(i):
                async with s.get(lb.url + f"/d{i}") as r:
                    return r.status, await r.read()

            tasks = [asyncio.create_task(get(i)) for i in range(20)]
            async with asyncio.timeout(10):
                while sum(len(b.seen) for b in bs) < 20:
                    await asyncio.sleep(0.02)
            rc = await lb.stop()
            results = await asyncio.gather(*tasks)
        assert rc == 0
        assert [st for st, _ in results] == [200] * 20
        assert any("drained" in line for line in lb.log)
        # After the drain nothing listens any more.
        rc, _, _ = await curl(lb.url + "/")
        assert rc == 7  # curl: couldn't connect


async def test_service_mode_follows_registry(db_url, store):
    async with backends(3) as bs:
        for i, b in enumerate(bs):
            await store.register(Instance("web", f"w{i}", "127.0.0.1", b.port), lease_ttl=60)
        await store.register(Instance("other", "o1", "127.0.0.1", bs[0].port), lease_ttl=60)
        async with LBProcess(
            "--service", "web", "--mongo-url", db_url, "--hash-on", "header:x-user"
        ) as lb:
            seen = {await _backend_for(lb.url, f"s{i}") for i in range(30)}
            assert seen == {"b0", "b1", "b2"}
            await store.set_status("web/w1", "critical")
            async with asyncio.timeout(15):
                while True:
                    got = {await _backend_for(lb.url, f"s{i}") for i in range(30)}
                    if got == {"b0", "b2"}:
                        break
                    await asyncio.sleep(0.1)
            async with aiohttp.ClientSession() as s, s.get(lb.admin + "/metrics") as r:
                assert "mesh_registry_connected 1.0" in await r.text()
            async with aiohttp.ClientSession() as s, s.get(lb.admin + "/clusters") as r:
                [c] = (await r.json())["clusters"]
            assert c["name"] == "web" and len(c["endpoints"]) == 2
            assert {e["name"] for e in c["endpoints"]} == {"web/w0", "web/w2"}


async def test_config_file_routes_by_host_and_prefix(tmp_path):
    async with backends(3) as bs:
        cfg = tmp_path / "lb.toml"
        cfg.write_text(
            f"""
retries = 1
[[route]]
host = "api.example"
endpoints = ["{bs[0].key}"]
[[route]]
prefix = "/static"
endpoints = ["{bs[1].key}"]
policy = "round_robin"
[[route]]
name = "rest"
endpoints = ["{bs[2].key}"]
hash_on = ["cookie:sid"]
"""
        )
        async with LBProcess("--config", str(cfg)) as lb:

            async def who(path, host="x.example"):
                rc, out, err = await curl("-H", f"Host: {host}", lb.url + path)
                return json.loads(out)["backend"]

            assert await who("/a", "api.example") == "b0"
            assert await who("/static/x", "API.example:80") == "b0"  # host wins over prefix
            assert await who("/static/x") == "b1"
            assert await who("/other") == "b2"
            async with aiohttp.ClientSession() as s, s.get(lb.admin + "/clusters") as r:
                names = [c["name"] for c in (await r.json())["clusters"]]
            assert names == ["route1", "route2", "rest"]


async def test_workers_share_the_port():
    async with backends(2) as bs:
        async with LBProcess(
            "--endpoints", _eps(bs), "--workers", "2", "--hash-on", "header:x-user"
        ) as lb:
            results = [await _backend_for(lb.url, "w") for _ in range(20)]
            assert set(results) == {results[0]}
        assert lb.proc.returncode == 0


def _samples(text: str, name: str) -> list:
    return [
        smp
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
        if smp.name == name
    ]


async def test_workers_admin_port_counts_every_worker():
    """With --workers 2 the admin port reports both workers: each of 40 new connections
    lands on either (SO_REUSEPORT), and /metrics and /clusters count all 40 requests."""
    n = 40
    async with backends(2) as bs:
        async with LBProcess("--endpoints", _eps(bs), "--workers", "2") as lb:
            connector = aiohttp.TCPConnector(force_close=True)  # one connection per request
            async with aiohttp.ClientSession(connector=connector) as s:
                for i in range(n):
                    async with s.get(lb.url + "/", headers={"X-User": f"u{i}"}) as r:
                        assert r.status == 200
                        await r.read()
            async with aiohttp.ClientSession() as s:
                async with s.get(lb.admin + "/metrics") as r:
                    text = await r.text()
                async with s.get(lb.admin + "/clusters") as r:
                    clusters = (await r.json())["clusters"]
        assert lb.proc.returncode == 0
    served = _samples(text, "mesh_lb_requests_total")
    assert sum(x.value for x in served if x.labels["code_class"] == "2xx") == n
    workers = {x.labels["state"]: x.value for x in _samples(text, "mesh_lb_workers")}
    assert workers == {"reporting": 2, "silent": 0}
    # A worker's own state is shown per worker, never summed.
    panic = {x.labels["worker"]: x.value for x in _samples(text, "mesh_lb_panic")}
    assert panic == {"0": 0, "1": 0}
    assert sum(ep["requests"] for ep in clusters[0]["endpoints"]) == n


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--endpoints", "1.2.3.4"), "--endpoints"),
        (("--endpoints", "127.0.0.1:1", "--policy", "best"), "--policy"),
        (("--endpoints", "127.0.0.1:1", "--hash-on", "body"), "--hash-on"),
        (("--endpoints", "127.0.0.1:1", "--maglev-table-size", "65536"), "prime"),
        (("--endpoints", "127.0.0.1:1", "--hash-balance-factor", "50"), "--hash-balance-factor"),
        (("--endpoints", "127.0.0.1:1", "--service", "web"), "exactly one"),
        ((), "exactly one"),
        (("--endpoints", "127.0.0.1:1", "--panic", "maybe"), "--panic"),
    ],
)
async def test_bad_flags_one_line_exit_2(args, needle):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "lb", "--listen", "127.0.0.1:0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def _rss_peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_big_upload_and_download_keep_memory_flat():
    """1 GiB up and 1 GiB down through the LB (one request): its peak memory barely moves."""
    size = 1024 * 1024 * 1024
    async with backends(1) as bs, LBProcess("--endpoints", _eps(bs)) as lb:
        async with aiohttp.ClientSession() as s, s.get(lb.url + "/warm") as r:
            await r.read()
        before = _rss_peak_kib(lb.proc.pid)

        async def gen():
            block = b"u" * 65536
            for _ in range(size // 65536):
                yield block

        async with (
            aiohttp.ClientSession() as s,
            s.post(lb.url + f"/stream/{size}", data=gen()) as r,
        ):
            assert r.headers["X-Body-Len"] == str(size)
            n = 0
            async for chunk in r.content.iter_any():
                n += len(chunk)
        assert n == size
        grew_mib = (_rss_peak_kib(lb.proc.pid) - before) / 1024
        print(f"peak RSS grew {grew_mib:.1f} MiB")
        assert grew_mib < 32, f"peak RSS grew {grew_mib:.0f} MiB"


async def test_access_log_when_asked():
    async with backends(1) as bs, LBProcess("--endpoints", _eps(bs), "--access-log", "true") as lb:
        rc, out, _ = await curl(lb.url + "/al?x=1")
        assert rc == 0
        async with asyncio.timeout(5):
            while not any('"GET /al?x=1 HTTP/1.1" 200 ' + bs[0].key in line for line in lb.log):
                await asyncio.sleep(0.05)
