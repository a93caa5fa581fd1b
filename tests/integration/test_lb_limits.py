"""Limits against slow and flooding clients: the header timeout (408) and --max-connections.

Every load here is bounded in count and time; nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_lb_support import (
    LBProcess,
    backends,
    lb_in_process,
    raw_exchange,
    read_response,
)

pytestmark = pytest.mark.one_loop  # thousands of sockets; the loop choice does not matter


async def _get(port: int, path: str = "/x") -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: a\r\nX-User: u\r\n\r\n" % path.encode())
        async with asyncio.timeout(5):
            status, _, _ = await read_response(reader)
        return status
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _metrics(admin: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(admin + "/metrics") as r:
        text = await r.text()
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if not smp.labels:
                out[smp.name] = smp.value
    return out


async def test_header_timeout_answers_408_and_closes():
    async with backends(1) as bs, lb_in_process(bs, header_timeout=0.3) as lb:
        # Nothing sent at all: timed from the connection's start.
        out = await raw_exchange(lb.port, b"", timeout=5)
        assert out.startswith(b"HTTP/1.1 408 ")
        assert b"Connection: close" in out
        # Half a head.
        out = await raw_exchange(lb.port, b"GET / HTTP/1.1\r\nHost: a\r\n", timeout=5)
        assert out.startswith(b"HTTP/1.1 408 ")
        # A keep-alive connection waits between requests on the idle timeout, not this one;
        # the second head is timed from its first byte.
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == 200
        await asyncio.sleep(0.6)
        writer.write(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == 200
        writer.write(b"GET /3 HTTP/1.1\r\n")
        async with asyncio.timeout(5):
            rest = await reader.read()
        assert rest.startswith(b"HTTP/1.1 408 ")
        writer.close()
        assert lb.server.stats.header_timeouts == 3
        assert lb.server.stats.local[408] == 3
        assert len(bs[0].seen) == 2


async def test_slowloris_closed_by_header_timeout_while_normal_clients_are_served():
    n_slow = 1000
    async with backends(1) as bs, lb_in_process(bs, header_timeout=2.5) as lb:
        slow = []
        for _ in range(n_slow):
            slow.append(await asyncio.open_connection("127.0.0.1", lb.port))
        head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Padding: " + b"x" * 64
        closed_by_lb = 0

        async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            # One header byte a second until the LB answers and closes (bounded: 10 s).
            for i in range(10):
                writer.write(head[i : i + 1])
                try:
                    async with asyncio.timeout(1.0):
                        return await reader.read()
                except TimeoutError:
                    continue
            return b""

        drips = [asyncio.create_task(drip(r, w)) for r, w in slow]
        try:
            # Meanwhile normal clients are served.
            for i in range(20):
                assert await _get(lb.port, f"/n{i}") == 200
                await asyncio.sleep(0.05)
            outs = await asyncio.gather(*drips)
        finally:
            for t in drips:
                t.cancel()
            for _, w in slow:
                w.close()
        closed_by_lb = sum(out.startswith(b"HTTP/1.1 408 ") for out in outs)
        assert closed_by_lb == n_slow
        assert lb.server.stats.header_timeouts == n_slow
        assert len(bs[0].seen) == 20
        for _ in range(100):
            if not lb.server.connections:
                break
            await asyncio.sleep(0.05)
        assert not lb.server.connections
        assert await _get(lb.port) == 200


async def _hold(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
        socks.append(s)
    return socks


async def _closed_by_peer(s: socket.socket, timeout: float = 3.0) -> bool:
    """True when the LB closed (or reset) this connection within ``timeout``."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            return await loop.sock_recv(s, 1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


async def test_connection_flood_past_max_connections_is_refused_then_recovers():
    async with (
        backends(1) as bs,
        LBProcess(
            "--endpoints", bs[0].key, "--max-connections", "50", "--header-timeout", "30"
        ) as lb,
    ):  # fmt: skip
        held = await _hold(lb.http_port, 50)
        try:
            # The admin port is not limited; one served request proves the 50 are up.
            for _ in range(100):
                m = await _metrics(lb.admin)
                if m["mesh_lb_client_connections"] == 50:
                    break
                await asyncio.sleep(0.05)
            assert m["mesh_lb_client_connections"] == 50
            extra = await _hold(lb.http_port, 150)
            refused = await asyncio.gather(*(_closed_by_peer(s) for s in extra))
            for s in extra:
                s.close()
            assert all(refused)
            m = await _metrics(lb.admin)
            assert m["mesh_lb_connections_refused_total"] == 150
            assert m["mesh_lb_client_connections"] == 50
            # The held ones still work.
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(held[0], b"GET /h HTTP/1.1\r\nHost: a\r\n\r\n")
            async with asyncio.timeout(5):
                assert (await loop.sock_recv(held[0], 65536)).startswith(b"HTTP/1.1 200")
        finally:
            for s in held:
                s.close()
        # When connections close, new ones are served again.
        for _ in range(100):
            m = await _metrics(lb.admin)
            if m["mesh_lb_client_connections"] == 0:
                break
            await asyncio.sleep(0.05)
        assert m["mesh_lb_client_connections"] == 0
        for i in range(10):
            assert await _get(lb.http_port, f"/after{i}") == 200
        assert await lb.stop() == 0


async def test_out_of_files_does_not_crash_or_spin_and_recovers():
    """Accepts failing with EMFILE (open-file limit 200, no --max-connections below it)."""
    async with (
        backends(1) as bs,
        LBProcess(
            "--endpoints", bs[0].key, "--header-timeout", "30",
            prefix=("prlimit", "--nofile=200:200"),
        ) as lb,
    ):  # fmt: skip
        held = await _hold(lb.http_port, 400)  # the listen queue takes those not accepted
        try:
            await asyncio.sleep(2.0)
            cpu0 = _cpu_seconds(lb.proc.pid)
            await asyncio.sleep(2.0)
            busy = _cpu_seconds(lb.proc.pid) - cpu0
            assert lb.proc.returncode is None
            assert busy < 1.0, f"the LB used {busy:.2f} s of CPU in 2 s while out of files"
        finally:
            for s in held:
                s.close()
        # Served again once files are free (a retry may meet the loop's accept back-off).
        status = 0
        for _ in range(50):
            try:
                status = await _get(lb.http_port)
                break
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                await asyncio.sleep(0.2)
        assert status == 200
        async with aiohttp.ClientSession() as s, s.get(lb.admin + "/clusters") as r:
            assert r.status == 200 and json.loads(await r.text())
        assert await lb.stop() == 0


def _cpu_seconds(pid: int) -> float:
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
