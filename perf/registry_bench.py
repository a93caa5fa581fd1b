"""Registry figures on the embedded database.

    .venv/bin/python -m perf.registry_bench [--instances N] [--seconds S] [--writers W]
    .venv/bin/python -m perf.registry_bench --watchers W [--instances N] [--seconds S]

Without ``--watchers``: lease renewals per second from W concurrent renewers, list() and
watch latency. With it, a simulated fleet: N instances renewing their 10 s leases every
ttl/3, W watchers following the registry as sidecars and LBs do; it reports renewals/s
achieved against needed, database operations/s by kind, documents read per watcher per
second, status change → every watcher, lapse → every watcher, and the database process's
CPU. Every figure comes from the run; nothing is modelled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from mesh import runtime
from mesh.embedded_db import EmbeddedDB
from registry import leases
from registry.model import Instance
from registry.store import RegistryStore


async def bench(instances: int, seconds: float, writers: int) -> dict[str, float]:
    db = EmbeddedDB()
    url = await asyncio.to_thread(db.start)
    store = RegistryStore.from_url(url)
    try:
        await store.start()
        for n in range(instances):
            await store.register(
                Instance(
                    service="bench", instance=f"i-{n}", address="127.0.0.1", port=10000 + n % 50000
                ),
                lease_ttl=600,
            )
        done = 0
        stop = time.monotonic() + seconds

        async def renewer(k: int) -> None:
            nonlocal done
            n = k
            while time.monotonic() < stop:
                assert await store.renew(f"bench/i-{n % instances}", 600)
                done += 1
                n += writers

        t0 = time.monotonic()
        await asyncio.gather(*(renewer(k) for k in range(writers)))
        renewals = done / (time.monotonic() - t0)

        watcher = RegistryStore.from_url(url)
        watch = watcher.watch()
        await anext(watch)
        lat = []
        for n in range(20):
            t = time.monotonic()
            await store.set_status(f"bench/i-{n}", "critical")
            await anext(watch)
            lat.append((time.monotonic() - t) * 1000)
        await watch.aclose()
        await watcher.close()
        t = time.monotonic()
        for _ in range(5):
            await store.list()
        list_ms = (time.monotonic() - t) / 5 * 1000
        return {
            "renewals_per_s": renewals,
            "watch_p50_ms": statistics.median(lat),
            "watch_max_ms": max(lat),
            "list_ms": list_ms,
        }
    finally:
        await store.close()
        await asyncio.to_thread(db.close)


TTL = 10.0
RENEWERS = 50  # concurrent renewal loops (the sidecars' renewals, spread over the interval)
STATUS_CHANGES = 10
LAPSES = 5
LAPSE_TTL = 2.0
SYNC_TIMEOUT = 300.0  # s for every watcher's first full read (W × 2N documents)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _inst(name: str, n: int) -> Instance:
    return Instance(service="fleet", instance=name, address="127.0.0.1", port=10000 + n % 50000)


class _Watcher:
    def __init__(self, url: str) -> None:
        self.store = RegistryStore.from_url(url)
        self.view: dict[str, Instance] = {}
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for snap in self.store.watch():
            self.view = {i.id: i for i in snap.instances}
            self.changed.set()

    async def until(self, ok, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not ok(self.view):
                self.changed.clear()
                await self.changed.wait()


async def fleet(instances: int, watchers: int, seconds: float) -> dict[str, float]:
    db = EmbeddedDB()
    url = await asyncio.to_thread(db.start)
    assert db.pid is not None
    writer = RegistryStore.from_url(url)
    ws: list[_Watcher] = []
    try:
        await writer.start()
        names = [f"fleet/i-{n}" for n in range(instances)]
        sem = asyncio.Semaphore(RENEWERS)

        async def register(n: int) -> None:
            async with sem:
                await writer.register(_inst(f"i-{n}", n), TTL)

        await asyncio.gather(*(register(n) for n in range(instances)))
        synced = time.monotonic()
        ws = [_Watcher(url) for _ in range(watchers)]
        for w in ws:
            await w.until(lambda v: len(v) == instances, SYNC_TIMEOUT)
        synced = time.monotonic() - synced

        renewed = lost = 0
        late = 0.0  # s the latest round of renewals started behind its schedule
        interval = leases.renew_interval(TTL)
        rounds = max(1, round(seconds / interval))

        async def renewer(k: int) -> None:
            # Renewer k's rounds are due at k/RENEWERS of the interval, then every interval:
            # the fleet's renewals spread evenly, as independent sidecars' are.
            nonlocal renewed, lost, late
            mine = names[k::RENEWERS]
            start = time.monotonic() + interval * k / RENEWERS
            for r in range(rounds):
                await asyncio.sleep(max(0.0, start + r * interval - time.monotonic()))
                late = max(late, time.monotonic() - (start + r * interval))
                for name in mine:
                    if await writer.renew(name, TTL):
                        renewed += 1
                    else:
                        lost += 1

        def totals() -> tuple[int, int, int, int, int]:
            return (
                sum(w.store.watch_polls for w in ws),
                sum(w.store.lapse_reads for w in ws),
                sum(w.store.lapse_checks for w in ws),
                sum(w.store.watch_reads for w in ws),
                sum(w.store.full_reads for w in ws),
            )

        await asyncio.sleep(2.0)  # past the lag after the registrations
        before, cpu0, t0 = totals(), _cpu_seconds(db.pid), time.monotonic()
        renewing = [asyncio.create_task(renewer(k)) for k in range(RENEWERS)]
        await asyncio.gather(*renewing)
        elapsed = max(time.monotonic() - t0, rounds * interval)
        cpu = (_cpu_seconds(db.pid) - cpu0) / elapsed
        after = totals()
        polls, lapse_reads, lapse_checks, reads, full = (
            a - b for a, b in zip(after, before, strict=True)
        )

        # A status change, until every watcher shows it.
        status_ms = []
        for k in range(STATUS_CHANGES):
            name = names[k]
            t = time.monotonic()
            await writer.set_status(name, "critical")
            for w in ws:
                await w.until(lambda v, name=name: v[name].status == "critical")
            status_ms.append((time.monotonic() - t) * 1000)

        # A lapse, from the lease's expiry until every watcher dropped it (database clock).
        lapse_ms = []
        for k in range(LAPSES):
            got = await writer.register(_inst(f"lapse-{k}", k), LAPSE_TTL)
            for w in ws:
                await w.until(lambda v, got=got: got.id in v)
            assert got.lease_expires_at is not None
            waits = []
            for w in ws:
                await w.until(lambda v, got=got: got.id not in v)
                waits.append((writer.now() - got.lease_expires_at).total_seconds() * 1000)
            lapse_ms.append(max(waits))

        return {
            "instances": instances,
            "watchers": watchers,
            "first_sync_all_watchers_s": synced,
            "renewals_needed_per_s": instances / interval,
            "renewals_per_s": renewed / elapsed,
            "renewals_lost": lost,
            "renewal_round_late_max_s": late,
            "counter_polls_per_s": polls / elapsed,
            "lapse_checks_per_s": lapse_checks / elapsed,
            "docs_read_per_watcher_s": reads / elapsed / watchers,
            "of_which_lapse_window_s": lapse_reads / elapsed / watchers,
            "full_reads": full,
            "status_p50_ms": statistics.median(status_ms),
            "status_max_ms": max(status_ms),
            "lapse_max_ms": max(lapse_ms),
            "db_cpu": cpu,
        }
    finally:
        for w in ws:
            w.task.cancel()
        await asyncio.gather(*(w.task for w in ws), return_exceptions=True)
        for w in ws:
            await w.store.close()
        await writer.close()
        await asyncio.to_thread(db.close)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--writers", type=int, default=10)
    p.add_argument("--watchers", type=int, default=0, help="run the fleet with this many")
    a = p.parse_args()
    if a.watchers:
        out = runtime.run(fleet(a.instances, a.watchers, a.seconds))
    else:
        out = runtime.run(bench(a.instances, a.seconds, a.writers))
    for k, v in out.items():
        print(f"{k:26} {v:12,.1f}")


if __name__ == "__main__":
    main()
