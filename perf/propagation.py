"""Propagation through the mesh, measured end to end on loopback.

- register → the instance is in a sidecar's DNS answer, and in an LB's endpoint set
  (``/clusters``), over ``--count`` registrations: p50 and p99;
- a peer's death (SIGKILL under steady traffic) → the LB stops routing to it (ejected or
  gone from ``/clusters``), and → it is gone from DNS (the demo mesh: checks every 2 s, fall 2).

    .venv/bin/python -m perf.propagation [--count 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode

from mesh import runtime
from mesh.config import format_host_port
from mesh.devmode import Child, DevMesh
from mesh.embedded_db import EmbeddedDB
from registry.model import Instance
from registry.store import RegistryStore

POLL = 0.002  # s between looks; small against the figures measured


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _in_dns(server: tuple[str, int], name: str) -> bool:
    q = dns.message.make_query(name, "A")
    r = await dns.asyncquery.udp(q, server[0], port=server[1], timeout=1)
    return r.rcode() == dns.rcode.NOERROR and bool(r.answer)


async def _in_lb(session: aiohttp.ClientSession, admin: str, port: int) -> bool:
    async with session.get(admin + "/clusters") as resp:
        data = await resp.json()
    return any(ep["port"] == port and ep["usable"] for c in data["clusters"] for ep in c["endpoints"])


async def _until(check, since: float, timeout: float = 10.0) -> float:
    """Seconds from ``since`` (a perf_counter reading) until ``check()`` is true."""
    while not await check():
        if time.perf_counter() - since > timeout:
            raise TimeoutError
        await asyncio.sleep(POLL)
    return time.perf_counter() - since


async def registration(count: int) -> dict[str, float]:
    db = EmbeddedDB()
    url = await asyncio.to_thread(db.start)
    work = Path(tempfile.mkdtemp(prefix="mesh-perf-"))
    mesh = [sys.executable, "-m", "mesh"]
    sidecar = Child("sidecar", [*mesh, "sidecar", "--service", "anchor", "--port", "1", "--check", "none",
                                "--address", "127.0.0.1", "--dns-listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", "none",
                                "--mongo-url", url], work)  # fmt: skip
    lb = Child("lb", [*mesh, "lb", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--service", "prop",
                      "--mongo-url", url], work)  # fmt: skip
    store = RegistryStore.from_url(url)
    try:
        await asyncio.to_thread(sidecar.start, ["dns"])
        await asyncio.to_thread(lb.start, ["http", "admin"])
        dns_addr = sidecar.listening["dns"]
        admin = f"http://{format_host_port(lb.listening['admin'])}"
        to_dns, to_lb = [], []
        async with aiohttp.ClientSession() as session:
            for i in range(count):
                port = 20000 + i
                inst = Instance(service="prop", instance=f"p-{i}", address="127.0.0.1", port=port)
                name = f"p-{i}.prop.service.mesh"
                t0 = time.perf_counter()  # the clock starts before the write
                await store.register(inst, 60)
                dns_t, lb_t = await asyncio.gather(
                    _until(lambda n=name: _in_dns(dns_addr, n), t0),
                    _until(lambda p=port: _in_lb(session, admin, p), t0),
                )
                to_dns.append(dns_t)
                to_lb.append(lb_t)
        return {
            "register_to_dns_p50_ms": 1000 * statistics.median(to_dns),
            "register_to_dns_p99_ms": 1000 * _pct(to_dns, 0.99),
            "register_to_lb_p50_ms": 1000 * statistics.median(to_lb),
            "register_to_lb_p99_ms": 1000 * _pct(to_lb, 0.99),
        }
    finally:
        await store.close()
        await asyncio.to_thread(lb.terminate)
        await asyncio.to_thread(sidecar.terminate)
        await asyncio.to_thread(db.close)


async def death() -> dict[str, float]:
    """SIGKILL one of three peers under steady traffic; sidecars run their default checks."""
    mesh = DevMesh(peers=3, check_interval=2.0)
    await mesh.start()
    try:
        admin = f"http://{format_host_port(mesh.lb_admin)}"
        url = f"http://{format_host_port(mesh.lb_http)}/"
        victim = mesh.members[-1]
        stop = asyncio.Event()

        async def traffic(session: aiohttp.ClientSession) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                async with session.get(url, headers={"x-user": f"u{n % 300}"}) as r:
                    await r.read()

        async with aiohttp.ClientSession() as session:
            drivers = [asyncio.create_task(traffic(session)) for _ in range(4)]
            await asyncio.sleep(1.0)
            t0 = time.perf_counter()
            mesh.kill_peer(len(mesh.members) - 1)

            async def out_of_lb() -> bool:
                return not await _in_lb(session, admin, victim.port)

            async def out_of_dns() -> bool:
                return not await _in_dns(mesh.members[0].dns, f"{victim.name}.peer.service.mesh")

            lb_t = await _until(out_of_lb, t0, 30)
            dns_t = await _until(out_of_dns, t0, 60)
            stop.set()
            await asyncio.gather(*drivers, return_exceptions=True)
        return {"death_to_lb_out_ms": 1000 * lb_t, "death_to_dns_out_ms": 1000 * dns_t}
    finally:
        await mesh.stop()


async def run_all(count: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out.update(await registration(count))
    out.update(await death())
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=100)
    a = p.parse_args()
    for k, v in runtime.run(run_all(a.count)).items():
        print(f"{k:28} {v:10.1f}")


if __name__ == "__main__":
    main()
