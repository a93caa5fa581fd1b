"""Upstream and process faults the LB must absorb with nothing lost: a peer that hangs, a
peer ten times slower than its siblings, SIGTERM under load.

Each scenario asserts what the clients saw (every request answered 200, or refused at
connect once the listener closed). Loads are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from lb.endpoints import Endpoint
from lb.outlier import REASON_GATEWAY, OutlierConfig
from lb.server import DEADLINE_TICK
from tests.integration.test_lb_support import (
    BackendProcess,
    LBProcess,
    StreamPeer,
    backends,
    lb_in_process,
    read_response,
)


class HangingPeer(StreamPeer):
    """Accepts connections and reads requests, never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.bytes = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                self.bytes += len(data)
        writer.close()


@dataclass
class Results:
    statuses: Counter = field(default_factory=Counter)
    backends: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def get_many(port: int, keys: list[str], *, concurrency: int = 10) -> Results:
    """One GET per key over keep-alive connections, ``concurrency`` at a time."""
    res = Results()
    queue = list(reversed(keys))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                key = queue.pop()
                t0 = time.monotonic()
                writer.write(b"GET /f HTTP/1.1\r\nHost: a\r\nX-User: %s\r\n\r\n" % key.encode())
                try:
                    async with asyncio.timeout(10):
                        status, _, body = await read_response(reader)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    res.errors.append(f"{key}: {exc!r}")
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                res.latencies.append(time.monotonic() - t0)
                res.statuses[status] += 1
                if status == 200:
                    res.backends[body.split(b'"backend": "')[1].split(b'"')[0].decode()] += 1
        finally:
            writer.close()

    async with asyncio.timeout(60):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return res


PER_TRY = 0.3


async def test_hanging_peer_is_timed_out_per_try_retried_and_ejected():
    """A peer that accepts and never answers: each try at it ends at the per-try timeout and
    the request goes on to the next endpoint; after three it is ejected; no client sees a
    failure, and none waits longer than one per-try timeout."""
    hang = await HangingPeer().start()
    try:
        async with (
            backends(2) as bs,
            lb_in_process([*bs, hang], per_try_timeout=PER_TRY, retries=2) as lb,
        ):
            keys = [f"user{i}" for i in range(300)]
            res = await get_many(lb.port, keys)
            print(
                f"hanging peer: {sum(res.statuses.values())} requests, {len(res.errors)} failed,"
                f" {hang.connections} connections to it, retries {lb.cluster.stats.retries},"
                f" max latency {max(res.latencies) * 1000:.0f} ms"
            )
            assert res.errors == [] and res.statuses == Counter({200: 300})
            assert set(res.backends) == {"b0", "b1"}
            assert lb.cluster.detector.is_ejected(hang.key)
            assert lb.cluster.stats.ejections == {REASON_GATEWAY: 1}
            # Three timed-out tries eject it, but the requests already sent to it by then
            # (one per client at most) time out too; each was retried elsewhere.
            tried = hang.connections
            assert 3 <= tried <= 3 + 10 and lb.cluster.stats.retries == tried
            assert max(res.latencies) < PER_TRY + 2 * DEADLINE_TICK + 0.5
            assert sorted(res.latencies)[-tried - 1] < PER_TRY  # only those waited for it
    finally:
        await hang.stop()


async def test_a_retry_after_the_set_changed_goes_to_the_new_set():
    """Requests wait on a peer that never answers; while they wait, the registry removes
    another endpoint. Each one's retry is routed on the set as it is now, to an endpoint it
    has not tried: every client gets its 200 (before, a retry across a set change was not
    made, and the client got the 504)."""
    from lb.endpoints import EndpointSet
    from lb.ring import hash_key

    hang = await HangingPeer().start()
    try:
        async with (
            backends(3) as bs,
            lb_in_process([*bs, hang], per_try_timeout=1.0, retries=2) as lb,
        ):
            view = lb.cluster.view
            at = [st.endpoint.key for st in view.states].index(hang.key)
            keys = [k for k in (f"user{i}" for i in range(200))
                    if view.table.lookup(hash_key(k.encode())) == at][:2]  # fmt: skip
            waiting = asyncio.create_task(get_many(lb.port, keys, concurrency=2))
            async with asyncio.timeout(5):
                while hang.connections < len(keys):
                    await asyncio.sleep(0.01)
            await lb.cluster.set_endpoints(EndpointSet.of([b.endpoint for b in (*bs[1:], hang)]))
            res = await waiting
            print(f"retried across a set change: {res.statuses}, backends {res.backends}")
            assert res.errors == [] and res.statuses == Counter({200: len(keys)})
            assert set(res.backends) <= {"b1", "b2"}
    finally:
        await hang.stop()


async def test_ten_times_slower_peer_loses_its_traffic():
    """Siblings answer in 10 ms, one peer in 100 ms: latency ejection takes it out, and the
    keys it was home to are served by the others."""
    outlier = OutlierConfig(interval=0.5, latency_factor=3, latency_min_requests=5)
    async with backends(3) as bs, lb_in_process(bs, outlier=outlier) as lb:
        bs[0].delay = bs[1].delay = 0.01
        bs[2].delay = 0.1
        keys = [f"user{i}" for i in range(150)]
        before = await get_many(lb.port, keys)
        async with asyncio.timeout(30):
            while not lb.cluster.detector.is_ejected(bs[2].key):
                await get_many(lb.port, keys[:60])
        after = await get_many(lb.port, keys)
        share_before = before.backends["b2"] / 150
        share_after = after.backends["b2"] / 150
        print(
            f"slow peer: share {share_before:.0%} before ejection, {share_after:.0%} after;"
            f" failed {len(before.errors) + len(after.errors)}"
        )
        assert before.statuses == after.statuses == Counter({200: 150})
        assert share_before > 0.15  # it was home to its part of the keys
        assert share_after == 0
        assert lb.cluster.stats.ejections == {"latency": 1}


STREAM_BYTES = 20_000_000


@pytest.mark.one_loop
@pytest.mark.timeout(120)
async def test_sigterm_mid_stream_completes_in_flight_then_refuses():
    """SIGTERM while eight clients are each part-way through a 20 MB response: every
    response completes in full, each connection is then closed, and new connections are
    refused; the LB exits 0."""
    procs = [await BackendProcess(f"p{i}").start() for i in range(2)]
    try:
        lb = await LBProcess(
            "--endpoints", ",".join(p.key for p in procs), "--drain-timeout", "60"
        ).start()
        heads = asyncio.Semaphore(0)
        signalled = asyncio.Event()

        async def client(w: int) -> tuple[int, int, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.http_port)
            writer.write(b"GET /stream/%d?c=%d HTTP/1.1\r\nHost: a\r\n\r\n" % (STREAM_BYTES, w))
            head = await reader.readuntil(b"\r\n\r\n")
            heads.release()
            await signalled.wait()  # the rest of the body is read after the signal
            n = 0
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
                n += size
            rest = await reader.read()  # the LB closes the connection after the response
            writer.close()
            return int(head.split(b" ")[1]), n, rest

        async with asyncio.timeout(90):  # 160 MB through the LB on a loaded machine
            clients = [asyncio.create_task(client(w)) for w in range(8)]
            for _ in range(8):
                await heads.acquire()
            lb.proc.send_signal(15)
            await asyncio.sleep(0.2)  # the listener closes at once; the drain waits
            signalled.set()
            results = await asyncio.gather(*clients)
            refused = 0
            for _ in range(20):
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", lb.http_port)
                    w.close()
                except ConnectionRefusedError:
                    refused += 1
            rc = await lb.stop()
        print(
            f"SIGTERM mid-stream: {len(results)} responses of {STREAM_BYTES} bytes, {refused}/20 refused after"
        )
        assert results == [(200, STREAM_BYTES, b"")] * 8
        assert refused == 20
        assert rc == 0 and any("drained" in line for line in lb.log)
    finally:
        for p in procs:
            await p.kill()


async def test_upstream_closing_idle_connections_under_reuse_fails_nothing():
    """Peers that close a keep-alive connection after 50 ms idle, while clients send a
    request every 40-60 ms: pooled connections die as they are reused. A try that meets a
    closed connection before any response byte is retried (any method: the peer got no
    complete request), so no GET or POST fails and none is sent twice."""
    served = 0
    idle_closes = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served, idle_closes
        try:
            while True:
                try:
                    async with asyncio.timeout(0.05):
                        head = await reader.readuntil(b"\r\n\r\n")
                except TimeoutError:
                    idle_closes += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                served += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    servers = [
        await asyncio.start_server(handle, sock=socket.create_server(("127.0.0.1", 0)))
        for _ in range(2)
    ]
    eps = [Endpoint("127.0.0.1", s.sockets[0].getsockname()[1]) for s in servers]
    failures: list[tuple[int, int, int]] = []
    rng = random.Random(3)
    try:
        async with lb_in_process(eps) as lb:

            async def client(c: int) -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
                for i in range(50):
                    method = b"POST" if i % 2 else b"GET"
                    writer.write(
                        b"%s /x HTTP/1.1\r\nHost: a\r\nX-User: u%d\r\nContent-Length: 2\r\n\r\nhi"
                        % (method, c)
                    )
                    async with asyncio.timeout(10):
                        status, _, _ = await read_response(reader)
                    if status != 200:
                        failures.append((c, i, status))
                    await asyncio.sleep(rng.uniform(0.04, 0.06))
                writer.close()

            await asyncio.gather(*(client(c) for c in range(8)))
            retries = lb.cluster.stats.retries
        print(
            f"stale pool: 400 requests, {len(failures)} failed, {idle_closes} idle closes"
            f" by the peers, {retries} retries"
        )
        assert failures == []
        assert served == 400  # each request reached a peer exactly once
        assert idle_closes > 0
    finally:
        for s in servers:
            s.close()
            await s.wait_closed()
