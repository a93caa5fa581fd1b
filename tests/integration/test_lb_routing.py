"""Routing behaviour a user sees: stickiness, ejection and return, failover under load,
panic mode, active health checks, latency ejection."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import pytest

from lb.outlier import OutlierConfig
from lb.ring import hash_key
from tests.integration.test_lb_support import BackendProcess, backends, lb_in_process

CONCURRENCY = 20


async def _get_many(url: str, n: int, *, headers_for=lambda i: {}, deadline: float = 60.0):
    """n GETs with bounded concurrency; returns [(status, backend or None)]."""
    results: list[tuple[int, str | None]] = []
    sem = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> None:
            async with sem:
                try:
                    async with s.get(url, headers=headers_for(i)) as r:
                        body = await r.json(content_type=None) if r.status == 200 else None
                        results.append((r.status, body and body["backend"]))
                except aiohttp.ClientError as exc:
                    results.append((0, repr(exc)))

        async with asyncio.timeout(deadline):
            await asyncio.gather(*(one(i) for i in range(n)))
    return results


async def test_same_key_same_backend_over_1000_requests():
    async with backends(3) as bs, lb_in_process(bs) as lb:
        res = await _get_many(lb.url + "/", 1000, headers_for=lambda i: {"X-User": "alice"})
        assert Counter(r for r in res) == Counter({(200, res[0][1]): 1000})
        # Many keys spread over all three backends.
        res = await _get_many(lb.url + "/", 300, headers_for=lambda i: {"X-User": f"u{i}"})
        assert {b for _, b in res} == {"b0", "b1", "b2"}


async def _key_homed_on(lb, backend_key: str) -> str:
    view = lb.cluster.view
    for i in range(10_000):
        k = f"user{i}"
        if view.endpoints[view.table.lookup(hash_key(k.encode()))].key == backend_key:
            return k
    raise AssertionError("no key maps to the backend")


async def test_500s_ejected_after_five_and_back_after_ejection_time():
    outlier = OutlierConfig(base_ejection_time=1.0, latency_factor=0)
    async with backends(3) as bs, lb_in_process(bs, outlier=outlier) as lb:
        bad = bs[0]
        key = await _key_homed_on(lb, bad.key)
        bad.fail_status = 500
        statuses = []
        async with aiohttp.ClientSession() as s:
            for _ in range(8):
                async with s.get(lb.url + "/", headers={"X-User": key}) as r:
                    statuses.append(r.status)
            assert statuses == [500] * 5 + [200] * 3
            assert len(bad.seen) == 5
            assert lb.cluster.detector.is_ejected(bad.key)
            assert lb.cluster.stats.ejections == {"consecutive_5xx": 1}
            bad.fail_status = 0
            async with asyncio.timeout(10):
                while lb.cluster.detector.is_ejected(bad.key):
                    await asyncio.sleep(0.1)
            async with s.get(lb.url + "/", headers={"X-User": key}) as r:
                assert (await r.json())["backend"] == "b0"


@pytest.mark.one_loop
async def test_killed_backend_under_load_no_failed_gets():
    procs = [await BackendProcess(f"p{i}").start() for i in range(3)]
    try:
        async with lb_in_process(procs, retries=2) as lb:
            results: list[tuple[int, str | None]] = []
            stop_at = time.monotonic() + 30

            async def load() -> None:
                async with aiohttp.ClientSession() as s:
                    for i in range(150):
                        if time.monotonic() > stop_at:
                            return
                        try:
                            async with s.get(lb.url + "/", headers={"X-User": f"k{i}"}) as r:
                                await r.read()
                                results.append((r.status, None))
                        except aiohttp.ClientError as exc:
                            results.append((0, repr(exc)))

            clients = [asyncio.create_task(load()) for _ in range(10)]
            while len(results) < 300:
                await asyncio.sleep(0.01)
            await procs[1].kill()
            await asyncio.gather(*clients)
            assert len(results) == 1500
            assert Counter(s for s, _ in results) == Counter({200: 1500}), [
                vars(lb.cluster.stats)
            ] + [r for r in results if r[0] != 200][:5]
            assert lb.cluster.detector.is_ejected(procs[1].key)
    finally:
        for p in procs:
            await p.kill()


async def test_panic_fail_closed_and_fail_open():
    outlier = OutlierConfig(consecutive_gateway=1, max_ejection_percent=100, latency_factor=0)
    for mode, expect in (("fail-closed", 503), ("fail-open", 200)):
        async with backends(2) as bs, lb_in_process(bs, outlier=outlier, panic_mode=mode) as lb:
            # Eject one of two: 50 % usable is not below the 50 % threshold.
            lb.cluster.record(lb.cluster.view.states[0], _reset(), time.monotonic(), None)
            assert not lb.cluster.panic
            lb.cluster.record(lb.cluster.view.states[1], _reset(), time.monotonic(), None)
            assert lb.cluster.panic
            async with aiohttp.ClientSession() as s, s.get(lb.url + "/") as r:
                assert r.status == expect
                if expect == 503:
                    assert r.headers["Retry-After"] == "1"


def _usable(lb) -> dict[str, bool]:
    return dict(zip(lb.cluster.view.endpoints.keys, lb.cluster.usable, strict=True))


def _reset():
    from lb.outlier import Outcome

    return Outcome.RESET


async def test_active_health_checks_take_out_and_bring_back():
    from lb.health import HealthConfig

    health = HealthConfig(path="/health", interval=0.1, timeout=1, jitter=0.1)
    async with backends(2) as bs, lb_in_process(bs, health=health) as lb:
        bs[1].fail_status = 500  # its /health answers 503
        async with asyncio.timeout(10):
            while _usable(lb) != {bs[0].key: True, bs[1].key: False}:
                await asyncio.sleep(0.05)
        res = await _get_many(lb.url + "/", 50, headers_for=lambda i: {"X-User": f"h{i}"})
        assert {b for _, b in res} == {bs[0].name}
        bs[1].fail_status = 0
        async with asyncio.timeout(10):
            while _usable(lb) != {bs[0].key: True, bs[1].key: True}:
                await asyncio.sleep(0.05)


async def test_latency_ejection():
    outlier = OutlierConfig(interval=0.5, latency_factor=3, latency_min_requests=5)
    async with (
        backends(3) as bs,
        lb_in_process(bs, outlier=outlier, policy="round_robin", hash_on=()) as lb,
    ):
        bs[2].delay = 0.08
        async with asyncio.timeout(30):
            while not lb.cluster.detector.is_ejected(bs[2].key):
                await _get_many(lb.url + "/", 30)
        assert lb.cluster.stats.ejections == {"latency": 1}


async def test_bounded_loads_spill_counted():
    async with backends(3) as bs, lb_in_process(bs, balance_factor=125) as lb:
        bs[0].delay = bs[1].delay = bs[2].delay = 0.05
        res = await _get_many(lb.url + "/", 60, headers_for=lambda i: {"X-User": "hot"})
        assert all(s == 200 for s, _ in res)
        assert len({b for _, b in res}) > 1  # the hot key overflowed its home
        assert sum(st.counters.snapshot()["spills"] for st in lb.cluster.view.states) > 0


async def test_endpoint_removed_mid_request_leaves_no_pooled_connection():
    from lb.endpoints import EndpointSet

    async with backends(2) as bs, lb_in_process(bs) as lb:
        bs[0].delay = bs[1].delay = 0.5
        headers = lambda i: {"X-User": f"r{i}"}  # noqa: E731
        task = asyncio.create_task(_get_many(lb.url + "/", 10, headers_for=headers))
        await asyncio.sleep(0.2)
        old = list(lb.cluster.view.states)
        await lb.cluster.set_endpoints(EndpointSet.of([bs[1].endpoint]))
        res = await task
        assert all(st == 200 for st, _ in res)
        gone = next(st for st in old if st.endpoint.key == bs[0].key)
        assert gone.removed and not gone.idle
        async with asyncio.timeout(5):
            while gone.connections:
                await asyncio.sleep(0.02)


async def test_sets_offered_while_a_table_builds_newest_wins_and_traffic_goes_on():
    """A registry change never waits for a table build: sets offered during one replace
    the set waiting, the old table routes meanwhile, and the newest set is routed to as
    soon as the build in progress ends and its own is built."""
    from lb.endpoints import EndpointSet
    from lb.ring import Maglev

    async with backends(3) as bs, lb_in_process(bs[:2]) as lb:
        cluster = lb.cluster
        builds = cluster.builds
        sets = [EndpointSet.of([b.endpoint for b in group]) for group in (bs, bs[1:], bs[::2])]
        cluster.offer(sets[0])
        await asyncio.sleep(0)  # its build starts in a thread (a 65537-slot table)
        cluster.offer(sets[1])
        cluster.offer(sets[2])  # replaces sets[1], which is never built
        assert cluster.building
        during = await _get_many(lb.url + "/", 20, headers_for=lambda i: {"X-User": f"b{i}"})
        assert [st for st, _ in during] == [200] * 20
        async with asyncio.timeout(10):
            await cluster.wait_built()
        assert not cluster.building
        assert cluster.view.endpoints.keys == sets[2].keys
        assert cluster.builds == builds + 2
        table = Maglev.build(sets[2])
        name_of = {b.key: b.name for b in bs}
        async with aiohttp.ClientSession() as s:
            for i in range(30):
                async with s.get(lb.url + "/", headers={"X-User": f"k{i}"}) as r:
                    got = (await r.json())["backend"]
                home = sets[2].keys[table.lookup(hash_key(f"k{i}".encode()))]
                assert got == name_of[home], i


async def test_5xx_from_home_on_a_pooled_connection_retried_in_hash_order():
    """The fast path (an idle connection to the key's home) lists only the home; a retry
    after its 503 goes on in the key's hash order, the same endpoint every time."""
    no_ejection = OutlierConfig(consecutive_5xx=0, consecutive_gateway=0, latency_factor=0)
    async with backends(3) as bs, lb_in_process(bs, outlier=no_ejection) as lb:
        view = lb.cluster.view
        order = view.table.candidates(hash_key(b"u1"), 3)
        home = bs[[b.key for b in bs].index(view.endpoints.keys[order[0]])]
        second = view.endpoints.keys[order[1]]
        home.fail_status = 503
        async with aiohttp.ClientSession() as s:
            for _ in range(4):  # the first connects; the rest find the home's pooled connection
                async with s.get(lb.url + "/r", headers={"X-User": "u1"}) as r:
                    assert r.status == 200
                    assert (await r.json())["backend"] == bs[[b.key for b in bs].index(second)].name
        assert len(home.seen) == 4
        assert lb.cluster.stats.retries == 4
        assert view.states[order[0]].idle  # the home's connection went back to the pool
