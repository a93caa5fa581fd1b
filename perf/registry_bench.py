"""Registry figures on the embedded database: lease renewals per second and watch latency.

.venv/bin/python -m perf.registry_bench [--instances N] [--seconds S] [--writers W]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from mesh import runtime
from mesh.embedded_db import EmbeddedDB
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--writers", type=int, default=10)
    a = p.parse_args()
    out = runtime.run(bench(a.instances, a.seconds, a.writers))
    for k, v in out.items():
        print(f"{k:16} {v:10.1f}")


if __name__ == "__main__":
    main()
