"""``mesh demo``: the mesh on one machine with nothing but the package installed.

For now it starts the embedded database, registers a few instances, shows the registry's
watch delivering changes and a lease running out, and stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from mesh import runtime
from mesh.cli import Command
from mesh.config import Option, integer, number
from mesh.embedded_db import EmbeddedDB
from registry.model import Instance
from registry.store import RegistryStore

OPTIONS = (
    Option("peers", integer(1, 50), 3, "number of demo peers"),
    Option("duration", number(1, 3600), 20.0, "seconds to run"),
)


async def _demo(values: dict[str, Any]) -> int:
    db = EmbeddedDB()
    print("starting the embedded database ...", flush=True)
    url = await asyncio.to_thread(db.start)
    print(f"database: {url}", flush=True)
    store = RegistryStore.from_url(url)
    try:
        await store.start()
        watch = store.watch()
        await anext(watch)
        for n in range(values["peers"]):
            t0 = time.monotonic()
            await store.register(
                Instance(
                    service="peer", instance=f"peer-{n + 1}", address="127.0.0.1", port=9000 + n
                ),
                lease_ttl=2.0 if n == 0 else 30.0,
            )
            snap = await anext(watch)
            print(
                f"registered peer-{n + 1}; watch saw {len(snap.instances)} instances after "
                f"{(time.monotonic() - t0) * 1000:.0f} ms",
                flush=True,
            )
        for inst in await store.list():
            print(f"  {inst.id:<16} {inst.address}:{inst.port:<6} {inst.status}", flush=True)
        t0 = time.monotonic()
        snap = await asyncio.wait_for(anext(watch), 10)
        print(
            f"peer-1 stopped renewing: gone from the registry after {time.monotonic() - t0:.2f} s "
            f"with no write ({len(snap.instances)} left)",
            flush=True,
        )
        await watch.aclose()
    finally:
        await store.close()
        await asyncio.to_thread(db.close)
    return 0


def run(values: dict[str, Any], ns: argparse.Namespace) -> int:
    return runtime.run(_demo(values))


COMMAND = Command("demo", "run the whole mesh on this machine and show it working", OPTIONS, run)
