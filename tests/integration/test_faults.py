"""Faults the mesh must survive with nothing lost, on the dev-mode mesh (every part a real
process on loopback). Loads are bounded in count and time."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from mesh.cmd_demo import resolve_srv
from mesh.config import format_host_port
from mesh.devmode import DevMesh
from registry.store import RegistryStore


class Load:
    """A steady stream of GETs through the LB: ``workers`` in flight, at most ``limit``."""

    def __init__(self, url: str, *, workers: int = 4, limit: int = 200_000) -> None:
        self.url = url
        self.workers = workers
        self.limit = limit
        self.sent = 0
        self.failed: list[str] = []
        self.by_peer: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set() and self.sent < self.limit:
            self.sent += 1
            key = f"user-{self.sent % 500}"
            try:
                async with session.get(self.url, headers={"x-user": key}) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status != 200:
                        self.failed.append(f"{key}: HTTP {resp.status}")
                    else:
                        self.by_peer[body["instance"]] = self.by_peer.get(body["instance"], 0) + 1
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self.failed.append(f"{key}: {type(exc).__name__} {exc}")
            await asyncio.sleep(0.002)

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=35))
        self._tasks = [
            asyncio.create_task(self._worker(self._session)) for _ in range(self.workers)
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()


async def _until(check, timeout: float, step: float = 0.05) -> float:
    t0 = time.monotonic()
    while not await check():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        await asyncio.sleep(step)
    return time.monotonic() - t0


@pytest.mark.one_loop
@pytest.mark.timeout(120)
async def test_sigkill_one_of_three_peers_under_load_fails_no_request():
    mesh = DevMesh(peers=3, check_interval=0.5)
    await mesh.start()
    try:
        dns = mesh.members[0].dns
        await _until(lambda: _srv_count(dns, 3), 20)
        url = f"http://{format_host_port(mesh.lb_http)}/"
        async with Load(url) as load:
            await asyncio.sleep(2)
            victim = mesh.kill_peer(2)
            killed = time.monotonic()
            # fall (2) × interval (0.5 s) + 1 s
            await _until(lambda: _srv_count(dns, 2), 2 * 0.5 + 1 + 1)
            dns_gone = time.monotonic() - killed
            await asyncio.sleep(2)
        assert load.failed == [], load.failed[:5]
        assert load.sent > 500
        assert victim.name in load.by_peer and len(load.by_peer) == 3
        assert dns_gone <= 2 * 0.5 + 1, dns_gone
    finally:
        await mesh.stop()


async def _srv_count(dns: tuple[str, int], n: int) -> bool:
    return len(await resolve_srv(dns)) == n


async def _lb_ports(admin: str) -> set[int]:
    async with aiohttp.ClientSession() as s, s.get(admin + "/clusters") as r:
        data = await r.json()
    return {ep["port"] for c in data["clusters"] for ep in c["endpoints"]}


@pytest.mark.slow
@pytest.mark.one_loop
@pytest.mark.timeout(240)
async def test_registry_down_60s_under_load_fails_no_request(tmp_path):
    mesh = DevMesh(peers=3, check_interval=0.5, data=str(tmp_path / "registry.db"))
    await mesh.start()
    store = None
    try:
        assert mesh.db is not None
        dns = mesh.members[0].dns
        admin = f"http://{format_host_port(mesh.lb_admin)}"
        ports = {p.port for p in mesh.members}
        await _until(lambda: _srv_count(dns, 3), 20)
        url = f"http://{format_host_port(mesh.lb_http)}/"
        async with Load(url, workers=2) as load:
            await asyncio.sleep(1)
            await asyncio.to_thread(mesh.db.kill)
            down_until = time.monotonic() + 60
            while time.monotonic() < down_until:
                assert await _srv_count(dns, 3), "sidecar DNS lost the last known state"
                await asyncio.sleep(1)
            assert await _lb_ports(admin) == ports
            await asyncio.to_thread(mesh.db.start)
            back = time.monotonic()
            store = RegistryStore.from_url(mesh.url)

            async def registered() -> bool:
                return {i.port for i in await store.list("peer", healthy_only=True)} == ports

            await _until(registered, 30)
            rereg = time.monotonic() - back
            # The LB's view matches the registry within 1 s of the registry being whole again.
            t = time.monotonic()
            await _until(lambda: _same_view(admin, ports), 5, step=0.02)
            assert time.monotonic() - t <= 1.0
            await asyncio.sleep(2)
        assert load.failed == [], load.failed[:5]
        assert load.sent > 1000
        assert rereg < 30
    finally:
        if store is not None:
            await store.close()
        await mesh.stop()


async def _same_view(admin: str, ports: set[int]) -> bool:
    return await _lb_ports(admin) == ports
