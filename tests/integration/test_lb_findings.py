"""Peers and clients that misbehave in ways the abuse suite found: each case is what the LB
must do instead (late response bytes, endless response heads, slow request bodies, a
drain that meets a fresh connection, a full connection table)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from lb.endpoints import Endpoint
from tests.integration.test_lb_support import StreamPeer, lb_in_process, read_response

# Bytes a peer sends late


@contextlib.asynccontextmanager
async def _peer(first: bytes, late: bytes):
    """A peer that answers its first request with ``first``, then 50 ms later writes
    ``late`` on the same connection; later requests get a 5-byte ``clean``."""
    n = 0

    async def handle(reader, writer):
        nonlocal n
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                n += 1
                if n == 1:
                    writer.write(first)
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(late)
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean")
        except Exception:
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield Endpoint("127.0.0.1", srv.sockets[0].getsockname()[1])
    finally:
        srv.close()


EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"


@pytest.mark.parametrize(
    ("method", "first"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 41\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 41\r\n\r\n"),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 41\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ],
    ids=["head", "204", "304", "204-chunked"],
)
async def test_body_sent_after_a_bodiless_response_never_reaches_another_client(method, first):
    """A peer writes a body after a response that has none (HEAD, 204, 304), in a later
    segment: the next client reusing the connection must not get it as its response."""
    async with _peer(first, EVIL) as ep, lb_in_process([ep], retries=0, hash_on=()) as lb:
        r, w = await asyncio.open_connection("127.0.0.1", lb.port)
        w.write(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await r.readuntil(b"\r\n\r\n")
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", lb.port)
        w.write(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        got = await read_response(r)
        w.close()
    assert got[2] == b"clean", got
    if b" 204 " in first:
        assert b"content-length" not in head.lower(), head  # RFC 9110 §8.6


async def test_head_response_with_its_length_is_forwarded_as_declared():
    """A HEAD response's Content-Length is the GET's and reaches the client as it came."""
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 41\r\n\r\n"
    async with _peer(first, b"") as ep, lb_in_process([ep], retries=0, hash_on=()) as lb:
        r, w = await asyncio.open_connection("127.0.0.1", lb.port)
        w.write(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await r.readuntil(b"\r\n\r\n")
        got = await read_response(r)
        w.close()
    assert b"Content-Length: 41\r\n" in head and got[2] == b"clean", (head, got)


# Response heads over the limits


async def _endless_head_peer(prefix: bytes, filler: bytes, closed: asyncio.Event):
    """A peer that answers every request with ``prefix`` then ``filler`` until it has sent
    16 MiB or the LB closes the connection (``closed`` is set then)."""

    async def handle(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(prefix)
            for _ in range(16 * 1024 * 1024 // len(filler)):
                writer.write(filler)
                await writer.drain()
        except (ConnectionError, OSError):
            closed.set()
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("prefix", "filler"),
    [
        (b"HTTP/1.1 200 OK\r\nX-A: ", b"a" * 65536),  # one field that never ends
        (b"HTTP/1.1 200 OK\r\n", b"X-B: b\r\n" * 8192),  # fields without end
        (b"HTTP/1.1 200 OK\r\n" + b"X-C: c\r\n" * 150 + b"\r\n", b"x" * 8192),  # too many
    ],
    ids=["endless-field", "endless-head", "too-many-fields"],
)
async def test_response_head_over_the_limits_is_a_502(prefix, filler):
    """A peer's response head is bounded like a request head: 502 to the client, a gateway
    failure of the endpoint, the connection closed (not held until the request timeout)."""
    closed = asyncio.Event()
    srv = await _endless_head_peer(prefix, filler, closed)
    ep = Endpoint("127.0.0.1", srv.sockets[0].getsockname()[1])
    try:
        async with lb_in_process([ep], retries=0, hash_on=()) as lb:
            r, w = await asyncio.open_connection("127.0.0.1", lb.port)
            w.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            async with asyncio.timeout(10):
                status, _, _ = await read_response(r)
                await closed.wait()
            w.close()
            [state] = lb.cluster.view.states
            assert status == 502 and state.counters.snapshot()["failures"] == 1
            m = lb.cluster.detector.monitors[ep.key]
            assert m.consecutive_gateway == 1
    finally:
        srv.close()


# Slow request bodies


async def test_slow_request_body_is_a_408_and_does_not_eject_the_endpoint():
    """Clients that send part of a body and stop: the request timeout answers 408 (the
    client was slow, not the peer) and records nothing against the endpoint, so a few such
    clients cannot eject a healthy peer."""
    from lb.outlier import OutlierConfig
    from tests.integration.test_lb_support import backends

    outlier = OutlierConfig(latency_factor=0)
    async with (
        backends(2) as bs,
        lb_in_process(bs, request_timeout=1.0, outlier=outlier) as lb,
    ):
        conns = []
        for _ in range(3):
            r, w = await asyncio.open_connection("127.0.0.1", lb.port)
            w.write(b"POST /up HTTP/1.1\r\nHost: a\r\nX-User: u\r\nContent-Length: 100\r\n\r\n")
            w.write(b"0123456789")
            conns.append((r, w))
        answers = []
        for r, w in conns:
            async with asyncio.timeout(5):
                answers.append((await r.read())[:12])
            w.close()
        assert answers == [b"HTTP/1.1 408"] * 3
        assert not any(lb.cluster.detector.is_ejected(b.key) for b in bs)
        assert sum(s.counters.snapshot()["failures"] for s in lb.cluster.view.states) == 0
        assert lb.server.stats.local.get(408) == 3
        # The endpoint still serves a whole request.
        r, w = await asyncio.open_connection("127.0.0.1", lb.port)
        w.write(b"POST /up HTTP/1.1\r\nHost: a\r\nX-User: u\r\nContent-Length: 2\r\n\r\nok")
        async with asyncio.timeout(5):
            status, _, _ = await read_response(r)
        w.close()
        assert status == 200


# Drain


async def test_sigterm_serves_a_connection_accepted_before_it():
    """A connection accepted before SIGTERM whose request arrives during the drain is served
    once, with Connection: close; the drain then ends clean."""
    from tests.integration.test_lb_support import LBProcess, backends

    async with backends(1) as bs:
        lb = await LBProcess("--endpoints", bs[0].key, "--drain-timeout", "5").start()
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.http_port)
        try:
            await asyncio.sleep(0.2)  # accepted by the LB, request not sent yet
            lb.proc.send_signal(15)
            await asyncio.sleep(0.1)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            async with asyncio.timeout(5):
                status, headers, _ = await read_response(reader)
                rest = await reader.read()
                rc = await lb.proc.wait()
        finally:
            writer.close()
            await lb.stop()
        assert status == 200 and headers.get("connection") == "close" and rest == b""
        assert rc == 0 and any("drained" in line and "cut" not in line for line in lb.log)


# The connection limit


async def test_idle_keepalive_connections_make_room_for_new_clients():
    """At the connection limit, served keep-alive connections idle between requests do not
    keep new clients out: the longest-idle one is closed to admit the new client."""
    from tests.integration.test_lb_support import backends

    async with backends(1) as bs, lb_in_process(bs, max_connections=20, hash_on=()) as lb:
        held = []
        try:
            for _ in range(20):
                r, w = await asyncio.open_connection("127.0.0.1", lb.port)
                held.append((r, w))
                w.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                status, _, _ = await read_response(r)
                assert status == 200  # served; now idle, kept alive
            r, w = await asyncio.open_connection("127.0.0.1", lb.port)
            held.append((r, w))
            w.write(b"GET /new HTTP/1.1\r\nHost: a\r\n\r\n")
            async with asyncio.timeout(5):
                status, _, _ = await read_response(r)
                # One of the idle ones (the longest idle; the loop clock may tie them) closed.
                while sum(hr.at_eof() for hr, _ in held[:20]) != 1:
                    await asyncio.sleep(0.01)
            assert status == 200
            assert lb.server.stats.idle_reaped == 1
            assert lb.server.stats.connections_refused == 0
        finally:
            for _, w in held:
                w.close()


async def test_head_503_dropped_for_a_retry_does_not_wait_for_its_declared_length():
    """A 503 to a HEAD, dropped so the request is retried elsewhere, has no body whatever
    its Content-Length says: the retry follows at once (no wait for the request timeout)."""

    async def handle(reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\n\r\n")
        except Exception:
            pass
        finally:
            writer.close()

    srvs = [await asyncio.start_server(handle, "127.0.0.1", 0) for _ in range(2)]
    eps = [Endpoint("127.0.0.1", s.sockets[0].getsockname()[1]) for s in srvs]
    try:
        async with lb_in_process(eps, retries=1, hash_on=(), request_timeout=3.0) as lb:
            r, w = await asyncio.open_connection("127.0.0.1", lb.port)
            w.write(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
            head = await r.readuntil(b"\r\n\r\n")
            w.close()
            assert head.startswith(b"HTTP/1.1 503 "), head  # the second try's, not a 504
            assert lb.cluster.stats.retries == 1
    finally:
        for s in srvs:
            s.close()


@contextlib.asynccontextmanager
async def _lb_before(peer: StreamPeer, **cfg):
    """An in-process LB whose one endpoint is ``peer`` (started here), with no retries."""
    await peer.start()
    try:
        async with lb_in_process([peer.endpoint], retries=0, hash_on=(), **cfg) as lb:
            yield lb
    finally:
        await peer.stop()


# A client that lags behind its response


class _TailPeer(StreamPeer):
    """Answers GET /big with 300 kB at once and its last 100 kB 0.3 s later, so the end of
    the response arrives while the LB is still writing to a slow client; anything else
    with a small 200."""

    async def _handle(self, reader, writer) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /big"):
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 400000\r\n\r\n" + b"x" * 300000
                    )
                    await writer.drain()
                    await asyncio.sleep(0.3)
                    writer.write(b"y" * 100000)
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()


async def _slow_download(port: int, path: bytes) -> int:
    """GET ``path`` through 4 KiB socket buffers, 4 KiB every 2 ms; returns the body size."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    async with asyncio.timeout(20):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        got = 0
        while got < length:
            got += len(await reader.read(4096))
            await asyncio.sleep(0.002)
    writer.close()
    return got


async def test_a_connection_pooled_while_its_client_lagged_reads_the_next_response():
    """A slow client's buffer is full as its response ends: the LB had stopped reading the
    upstream for it (back-pressure), and the response completed in that state. The
    connection goes back to the pool reading again, so the next request on it, from any
    client, is answered at once instead of waiting unread for its 504."""
    async with _lb_before(_TailPeer(), request_timeout=3) as lb:
        state = lb.cluster.view.states[0]
        for _ in range(2):
            task = asyncio.create_task(_slow_download(lb.port, b"/big"))
            async with asyncio.timeout(5):
                while not lb.server.connections:
                    await asyncio.sleep(0.001)
            for down in lb.server.connections:  # a small kernel buffer toward the client
                sock = down.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            assert await task == 400000
            assert state.idle and all(conn.transport.is_reading() for conn, _ in state.idle)
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
            writer.write(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
            async with asyncio.timeout(2):
                status, _, _ = await read_response(reader)
            assert status == 200
            writer.close()


# A switch of protocols nobody asked for


class _SwitchingPeer(StreamPeer):
    """Answers every request with 101, then echoes whatever comes as raw bytes."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []

    async def _handle(self, reader, writer) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
            )
            while data := await reader.read(65536):
                self.raw.append(data)
                writer.write(data)


async def test_a_101_to_a_request_that_asked_for_no_upgrade_is_a_502():
    """Tunnelling it would hand the client's next requests to that peer unparsed: no
    routing, no limits, no X-Forwarded-For of ours. Envoy answers 502 as well."""
    peer = _SwitchingPeer()
    async with _lb_before(peer) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
        async with asyncio.timeout(5):
            status, _, _ = await read_response(reader)
        assert status == 502
        # The connection is still HTTP: the next request is parsed and routed again.
        writer.write(b"GET /admin HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        async with asyncio.timeout(5):
            status, _, _ = await read_response(reader)
        assert status == 502 and not peer.raw
        writer.close()


# Chunk extensions and trailers without end


@pytest.mark.parametrize(
    "tail",
    [b"0\r\nX-T: " + b"a" * 200000, b"5;" + b"e" * 200000],
    ids=["trailer", "chunk-extension"],
)
async def test_a_request_trailer_or_chunk_extension_over_64k_is_a_431(tail):
    """httptools grows a trailer field by concatenation: unbounded, one request could cost
    the LB quadratic time and memory. Bounded like a head: 431, and the connection ends.
    The client is still sending when the LB answers: the LB reads and drops the rest
    (lingering close), so the client gets the 431, not a reset."""
    from tests.integration.test_lb_support import backends

    async with backends(1) as bs, lb_in_process(bs, retries=0) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )

        # The client sends all it has before it reads, as curl does with a request body.
        for k in range(0, len(tail), 8192):  # in separate reads, as over a network
            writer.write(tail[k : k + 8192])
            await writer.drain()  # no reset while the LB drops what comes after its answer
            await asyncio.sleep(0.001)
        out = b""
        async with asyncio.timeout(5):  # the LB ends the stream: it does not wait for more
            while data := await reader.read(65536):
                out += data
        assert out.startswith(b"HTTP/1.1 431 "), out[:100]
        assert lb.server.stats.local[431] == 1
        writer.close()


class _TrailerPeer(StreamPeer):
    """Answers with a chunked body whose trailer field never ends (200 kB)."""

    async def _handle(self, reader, writer) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: "
            )
            for _ in range(25):
                writer.write(b"a" * 8192)
                await writer.drain()
            await reader.read()


async def test_a_response_trailer_over_64k_cuts_the_response():
    async with _lb_before(_TrailerPeer()) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        out = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(5):
                while data := await reader.read(65536):
                    out += data
        assert out.startswith(b"HTTP/1.1 200 ") and b"hello" in out
        assert not out.endswith(b"0\r\n\r\n")  # cut short: the client sees an error
        writer.close()


class _CodedPeer(StreamPeer):
    """Answers with a transfer coding other than chunked, its body ending at the close."""

    def __init__(self, coding: bytes) -> None:
        self.coding = coding

    async def _handle(self, reader, writer) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + self.coding + b"\r\n\r\nbody")
            await writer.drain()
        writer.close()


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"chunked, chunked"])
async def test_a_response_with_a_transfer_coding_other_than_chunked_is_a_502(coding):
    """Forwarded re-chunked, the client would get the coded bytes with nothing saying how
    they are coded. Like nginx and Envoy, the LB refuses the response."""
    async with _lb_before(_CodedPeer(coding)) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        async with asyncio.timeout(5):
            status, _, _ = await read_response(reader)
        assert status == 502
        writer.close()
