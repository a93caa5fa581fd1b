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
import itertools
import multiprocessing
import os
import statistics
import sys
import time

from mesh import runtime
from mesh.embedded_db import EmbeddedDB
from registry import leases
from registry.errors import RegistryUnavailable
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


async def _renew_fleet(url: str, instances: int, counts, ready) -> None:
    """The fleet's sidecars: register every instance, then renew each lease every ttl/3
    until stopped (a lapsed one registers again, a real change). Counts go to ``counts``
    (renewed, lost, seconds the latest round started late, database errors)."""
    writer = RegistryStore.from_url(url)
    await writer.start()
    sem = asyncio.Semaphore(RENEWERS)

    async def register(n: int) -> None:
        async with sem:
            await writer.register(_inst(f"i-{n}", n), TTL)

    await asyncio.gather(*(register(n) for n in range(instances)))
    ready.set()
    interval = leases.renew_interval(TTL)

    async def renewer(k: int) -> None:
        # Renewer k's rounds are due at k/RENEWERS of the interval, then every interval:
        # the fleet's renewals spread evenly, as independent sidecars' are.
        start = time.monotonic() + interval * k / RENEWERS
        for r in itertools.count():
            await asyncio.sleep(max(0.0, start + r * interval - time.monotonic()))
            counts[2] = max(counts[2], time.monotonic() - (start + r * interval))
            for n in range(k, instances, RENEWERS):
                try:
                    if await writer.renew(f"fleet/i-{n}", TTL):
                        counts[0] += 1
                    else:
                        counts[1] += 1
                        await writer.register(_inst(f"i-{n}", n), TTL)
                except RegistryUnavailable:  # as a sidecar does: keep going, a bit later
                    counts[3] += 1
                    await asyncio.sleep(1.0)

    await asyncio.gather(*(renewer(k) for k in range(RENEWERS)))


def _renewals_main(url: str, instances: int, counts, ready) -> None:
    runtime.run(_renew_fleet(url, instances, counts, ready))


async def _progress(ws: list[_Watcher], instances: int, counts) -> None:
    """Every 10 s of a slow first sync, a line on stderr: how far the watchers are."""
    t0 = time.monotonic()
    while True:
        await asyncio.sleep(10)
        synced = sum(len(w.view) == instances for w in ws)
        smallest = min(len(w.view) for w in ws)
        print(
            f"{time.monotonic() - t0:4.0f} s: {synced}/{len(ws)} watchers synced, the least"
            f" holds {smallest}; renewals {counts[0]:.0f} done, {counts[1]:.0f} lapsed,"
            f" latest round {counts[2]:.1f} s late, {counts[3]:.0f} database errors",
            file=sys.stderr,
        )


async def fleet(instances: int, watchers: int, seconds: float) -> dict[str, float]:
    """The renewals run in a process of their own, from registration to the end, as the
    sidecars' do; the watchers share this one."""
    db = EmbeddedDB()
    url = await asyncio.to_thread(db.start)
    assert db.pid is not None
    writer = RegistryStore.from_url(url)
    ws: list[_Watcher] = []
    mp = multiprocessing.get_context("spawn")
    counts, ready = mp.Array("d", 4, lock=False), mp.Event()
    fleet_proc = mp.Process(target=_renewals_main, args=(url, instances, counts, ready))
    try:
        await writer.start()
        names = [f"fleet/i-{n}" for n in range(instances)]
        interval = leases.renew_interval(TTL)
        fleet_proc.start()
        if not await asyncio.to_thread(ready.wait, SYNC_TIMEOUT):
            raise TimeoutError("the fleet did not register in time")
        synced = time.monotonic()
        ws = [_Watcher(url) for _ in range(watchers)]
        progress = asyncio.create_task(_progress(ws, instances, counts))
        try:
            for w in ws:
                await w.until(lambda v: len(v) == instances, SYNC_TIMEOUT)
        finally:
            progress.cancel()
        synced = time.monotonic() - synced

        def totals() -> tuple[int, ...]:
            return (
                int(counts[0]),
                int(counts[1]),
                int(counts[3]),
                sum(w.store.watch_polls for w in ws),
                sum(w.store.lapse_reads for w in ws),
                sum(w.store.lapse_checks for w in ws),
                sum(w.store.watch_reads for w in ws),
                sum(w.store.full_reads for w in ws),
            )

        # Past the lag after the registrations and the full reads that follow a first one
        # that early: until no watcher has read everything again for 3 s (60 s at most).
        for _ in range(20):
            full = sum(w.store.full_reads for w in ws)
            await asyncio.sleep(3.0)
            if sum(w.store.full_reads for w in ws) == full:
                break
        counts[2] = 0.0
        before, cpu0, t0 = totals(), _cpu_seconds(db.pid), time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - t0
        cpu = (_cpu_seconds(db.pid) - cpu0) / elapsed
        after = totals()
        done, failed, errors, polls, lapse_reads, lapse_checks, reads, full = (
            a - b for a, b in zip(after, before, strict=True)
        )
        late_in_window = counts[2]

        # A status change, until every watcher shows it.
        status_ms = []
        for k in range(STATUS_CHANGES):
            name = names[k]
            t = time.monotonic()
            await writer.set_status(name, "critical")
            for w in ws:
                await w.until(lambda v, name=name: name in v and v[name].status == "critical")
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
            "renewals_per_s": done / elapsed,
            "renewals_lost": failed,
            "renewal_errors": errors,
            "renewal_round_late_max_s": late_in_window,
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
        if fleet_proc.is_alive():
            fleet_proc.terminate()
            fleet_proc.join()
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
