"""The sidecar agent against the embedded database, its DNS asked over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import random

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from mesh.embedded_db import EmbeddedDB
from registry.model import Instance
from registry.store import RegistryStore
from sidecar.agent import Agent, AgentConfig
from sidecar.dns_server import DnsServer, ZoneConfig
from sidecar.probe import Check


async def start_app() -> asyncio.Server:
    """A tiny HTTP app: 200 on every request."""

    async def handle(reader, writer):
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def ask(server: DnsServer, name: str, rdtype: str = "A") -> dns.message.Message:
    host, port = server.addresses[0]
    query = dns.message.make_query(name, rdtype)
    return await dns.asyncquery.udp(query, host, port=port, timeout=2)


async def until(predicate, *, timeout: float, step: float = 0.01):
    """Poll ``predicate`` (async) until true; the time it took, or fail at ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(step)
    return loop.time() - start


async def has_address(server, name, address) -> bool:
    reply = await ask(server, name)
    return reply.rcode() == dns.rcode.NOERROR and any(
        r.address == address for rrset in reply.answer for r in rrset
    )


async def is_nxdomain(server, name) -> bool:
    return (await ask(server, name)).rcode() == dns.rcode.NXDOMAIN


class Sidecar:
    """An agent and its DNS server in this process, as ``mesh sidecar`` wires them."""

    def __init__(self, url: str, app_port: int, **kw) -> None:
        self.store = RegistryStore.from_url(url, poll_interval=0.05)
        self.dns = DnsServer(ZoneConfig())
        settings = {"check": Check.parse("tcp"), "check_interval": 0.2, "check_timeout": 0.2}
        settings.update(kw)
        instance = Instance(service="web", instance="a", address="127.0.0.1", port=app_port)
        self.agent = Agent(
            self.store,
            AgentConfig(instance=instance, **settings),
            dns=self.dns,
            rng=random.Random(3),
        )
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Sidecar:
        await self.dns.start([("127.0.0.1", 0)])
        self.task = asyncio.create_task(self.agent.run(handle_signals=False))
        return self

    async def __aexit__(self, *exc) -> None:
        if self.task is not None and not self.task.done():
            self.agent.request_stop()
            self.agent.request_stop()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.dns.close()
        await self.store.close()


async def test_registers_and_serves_itself_and_peers_in_dns(db_url, store):
    app = await start_app()
    port = app.sockets[0].getsockname()[1]
    try:
        async with Sidecar(db_url, port) as car:
            await until(lambda: has_address(car.dns, "a.web.service.mesh.", "127.0.0.1"), timeout=5)
            (inst,) = await store.list()
            assert (inst.id, inst.status, inst.port) == ("web/a", "passing", port)
            # A peer registered by someone else is in this sidecar's DNS within 300 ms.
            await store.register(
                Instance(service="web", instance="b", address="127.0.0.2", port=81), 30
            )
            took = await until(
                lambda: has_address(car.dns, "web.service.mesh.", "127.0.0.2"), timeout=0.3
            )
            assert took < 0.3
            srv = await ask(car.dns, "_web._tcp.service.mesh.", "SRV")
            assert sorted(r.port for r in srv.answer[0]) == sorted([81, port])
    finally:
        app.close()


async def test_an_app_that_stops_answering_leaves_dns(db_url, store):
    app = await start_app()
    port = app.sockets[0].getsockname()[1]
    interval, fall = 0.2, 2
    async with Sidecar(
        db_url, port, check=Check.parse("http:/health"), check_interval=interval, fall=fall
    ) as car:
        await until(lambda: has_address(car.dns, "web.service.mesh.", "127.0.0.1"), timeout=5)
        app.close()
        await app.wait_closed()
        await until(lambda: is_nxdomain(car.dns, "web.service.mesh."), timeout=fall * interval + 1)
        (inst,) = await store.list()
        assert inst.status == "critical"  # still registered, out of DNS


async def test_drain_sets_draining_then_deregisters(db_url, store):
    app = await start_app()
    port = app.sockets[0].getsockname()[1]
    try:
        async with Sidecar(db_url, port, drain=0.5) as car:
            await until(lambda: has_address(car.dns, "web.service.mesh.", "127.0.0.1"), timeout=5)
            car.agent.request_stop()

            async def draining():
                return [i.status for i in await store.list()] == ["draining"]

            await until(draining, timeout=2)
            await until(lambda: is_nxdomain(car.dns, "web.service.mesh."), timeout=1)
            assert await asyncio.wait_for(car.task, 5) == 0
            assert await store.list() == []
    finally:
        app.close()


@pytest.mark.one_loop
@pytest.mark.timeout(90)
async def test_registry_outage_keeps_dns_and_reregisters_after(tmp_path):
    db = EmbeddedDB()  # in memory: the restarted registry has forgotten everything
    url = await asyncio.to_thread(db.start)
    app = await start_app()
    port = app.sockets[0].getsockname()[1]
    try:
        async with Sidecar(url, port, lease_ttl=1.5) as car:
            await until(lambda: has_address(car.dns, "a.web.service.mesh.", "127.0.0.1"), timeout=5)
            await asyncio.to_thread(db.kill)
            # Longer than the lease: DNS keeps the last state all along.
            for _ in range(30):
                assert await has_address(car.dns, "a.web.service.mesh.", "127.0.0.1")
                await asyncio.sleep(0.1)
            assert car.agent.lifecycle.registrations == 1
            await asyncio.to_thread(db.start)
            checker = RegistryStore.from_url(url)
            try:

                async def registered_again():
                    return [i.id for i in await checker.list()] == ["web/a"]

                await until(registered_again, timeout=30, step=0.1)
            finally:
                await checker.close()
            assert car.agent.lifecycle.registrations == 2
            await until(lambda: has_address(car.dns, "a.web.service.mesh.", "127.0.0.1"), timeout=5)
    finally:
        app.close()
        await asyncio.to_thread(db.close)
