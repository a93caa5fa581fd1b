"""HTTP/1.1 correctness through the LB, checked with curl, raw sockets and what the
backend received."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from lb.endpoints import Endpoint
from tests.integration.test_lb_support import (
    Backend,
    backends,
    curl,
    lb_in_process,
    raw_exchange,
    read_response,
)


async def test_forwarded_headers_host_and_hop_by_hop():
    async with backends(1) as bs, lb_in_process(bs) as lb:
        rc, out, err = await curl(
            "-i", lb.url + "/p?q=1",
            "-H", "Host: app.example:8443",
            "-H", "Connection: keep-alive, X-Secret",
            "-H", "X-Secret: s", "-H", "Keep-Alive: timeout=5", "-H", "TE: trailers",
            "-H", "Proxy-Connection: keep-alive", "-H", "Upgrade-Insecure-Requests: 1",
            "-H", "X-Forwarded-For: 203.0.113.7", "-H", "Via: 1.0 edge",
        )  # fmt: skip
        assert rc == 0, err
        assert out.startswith("HTTP/1.1 200")
        assert "via: 1.1 mesh" in out.lower()
        seen = bs[0].seen[-1].headers
        assert seen["host"] == "app.example:8443"
        assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-host"] == "app.example:8443"
        assert seen["via"] == "1.0 edge, 1.1 mesh"
        for gone in ("x-secret", "keep-alive", "te", "proxy-connection", "connection"):
            assert gone not in seen, gone
        assert seen["upgrade-insecure-requests"] == "1"
        assert bs[0].seen[-1].path == "/p?q=1"


async def test_keep_alive_both_sides():
    async with backends(1) as bs, lb_in_process(bs) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        for i in range(20):
            writer.write(b"GET /k%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            status, headers, body = await read_response(reader)
            assert status == 200 and json.loads(body)["path"] == f"/k{i}"
            assert "connection" not in headers
        writer.close()
        await writer.wait_closed()
        # One upstream connection carried all twenty requests.
        state = lb.cluster.view.states[0]
        assert state.connections == 1 and len(state.idle) == 1


async def test_http10_client_and_head():
    async with backends(1) as bs, lb_in_process(bs) as lb:
        out = await raw_exchange(lb.port, b"GET /old HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200") and b'"/old"' in out
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length:" in head
        writer.write(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, body = await read_response(reader)  # no stray HEAD body in between
        assert status == 200 and b"/after" in body
        writer.close()
        await writer.wait_closed()


async def test_chunked_both_ways(tmp_path):
    payload = tmp_path / "up.bin"
    payload.write_bytes(b"z" * 300_000)
    async with backends(1) as bs, lb_in_process(bs) as lb:
        rc, out, err = await curl(
            "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{payload}", lb.url + "/up"
        )
        assert rc == 0, err
        assert json.loads(out)["body_len"] == 300_000
        assert bs[0].seen[-1].headers.get("transfer-encoding") == "chunked"
        rc, out, err = await curl("-i", "--raw", lb.url + "/stream/200000")
        head, _, _ = out.partition("\r\n\r\n")
        assert "transfer-encoding: chunked" in head.lower()
        rc, out, _ = await curl(lb.url + "/stream/200000")
        assert len(out) == 200_000


async def test_expect_100_continue():
    async with backends(1) as bs, lb_in_process(bs) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(
            b"POST /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        status, _, body = await read_response(reader)
        assert status == 200 and json.loads(body)["body_len"] == 5
        assert "expect" not in bs[0].seen[-1].headers
        writer.close()
        await writer.wait_closed()
        # And with curl, which waits for the 100 before sending the body.
        rc, out, err = await curl("-H", "Expect: 100-continue", "-d", "x" * 2000, lb.url + "/c")
        assert json.loads(out)["body_len"] == 2000, err


async def test_websocket_echo():
    async with backends(1) as bs, lb_in_process(bs) as lb:
        async with aiohttp.ClientSession() as s, s.ws_connect(lb.url + "/ws") as ws:
            for i in range(5):
                await ws.send_str(f"m{i}")
                assert (await ws.receive_str()) == f"b0:m{i}"
            await ws.send_bytes(b"\x00" * 100_000)
            assert await ws.receive_bytes() == b"\x00" * 100_000
        assert lb.server.stats.upgrades == 1


async def test_a_busy_websocket_outlives_the_idle_timeout_and_a_quiet_one_does_not():
    """Like nginx and Envoy, a tunnel is closed when it has been quiet for the idle
    timeout, never while traffic flows."""
    async with (
        backends(1) as bs,
        lb_in_process(bs, idle_timeout=0.6) as lb,
        aiohttp.ClientSession() as s,
        s.ws_connect(lb.url + "/ws") as ws,
    ):
        for i in range(10):  # 1.5 s of traffic, more than twice the idle timeout
            await ws.send_str(f"m{i}")
            assert (await ws.receive_str()) == f"b0:m{i}"
            await asyncio.sleep(0.15)
        async with asyncio.timeout(5):
            msg = await ws.receive()  # now quiet: closed after the idle timeout
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


REJECTIONS = [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"a" * 8000 + b"\r\n" * 0 + b"\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 8000) for i in range(9)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n", 400),
    (b"GET /\r\n\r\n", 400),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
]  # fmt: skip


@pytest.mark.parametrize(("data", "status"), REJECTIONS, ids=[
    "cl+te", "cl-differ", "te-gzip", "te-gzip-chunked", "bad-chunk", "head-64k", "101-headers",
    "line-8k", "obs-fold", "space-colon", "http09", "garbage", "te-http10",
])  # fmt: skip
async def test_rejections_answer_and_close(data, status):
    async with backends(1) as bs, lb_in_process(bs) as lb:
        out = await raw_exchange(lb.port, data)  # returns once the LB closed the connection
        assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
        head, _, body = out.partition(b"\r\n\r\n")
        assert b"Connection: close" in head and len(out) < 400
        assert bs[0].seen == []
        assert lb.server.stats.local[status] >= 1


async def test_upstream_refused_is_502_after_retries():
    import socket

    dead = []
    for _ in range(3):
        s = socket.create_server(("127.0.0.1", 0))
        dead.append(Endpoint("127.0.0.1", s.getsockname()[1]))
        s.close()  # nothing listens there now: connections are refused
    async with lb_in_process(dead, retries=2) as lb:
        rc, out, err = await curl("-i", lb.url + "/")
        assert out.startswith("HTTP/1.1 502"), out
        assert lb.cluster.stats.retries == 2


async def test_upstream_timeout_is_504():
    async with backends(1) as bs, lb_in_process(bs, request_timeout=0.3, retries=0) as lb:
        bs[0].delay = 2.0
        rc, out, _ = await curl("-i", lb.url + "/slow")
        assert out.startswith("HTTP/1.1 504"), out


async def test_no_endpoints_is_503_with_retry_after():
    async with lb_in_process([]) as lb:
        rc, out, _ = await curl("-i", lb.url + "/")
        assert out.startswith("HTTP/1.1 503") and "retry-after: 1" in out.lower()


async def test_upstream_5xx_is_passed_through_for_post():
    async with backends(2) as bs, lb_in_process(bs) as lb:
        for b in bs:
            b.fail_status = 503
        rc, out, _ = await curl("-i", "-d", "x", lb.url + "/")
        assert out.startswith("HTTP/1.1 503")
        assert sum(len(b.seen) for b in bs) == 1  # POST: not retried on a 503


async def test_big_body_streams_both_ways():
    size = 64 * 1024 * 1024
    async with backends(1) as bs, lb_in_process(bs) as lb:

        async def gen():
            block = b"u" * 65536
            for _ in range(size // 65536):
                yield block

        async with (
            aiohttp.ClientSession() as s,
            s.post(lb.url + "/stream/" + str(size), data=gen()) as r,
        ):
            assert r.headers["X-Body-Len"] == str(size)
            n = 0
            async for chunk in r.content.iter_any():
                n += len(chunk)
        assert n == size


async def test_pipelined_requests_answered_in_order():
    async with backends(1) as bs, lb_in_process(bs) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(5)))
        for i in range(5):
            status, _, body = await read_response(reader)
            assert json.loads(body)["path"] == f"/p{i}"
        writer.close()
        await writer.wait_closed()


async def test_backend_dying_mid_body_cuts_the_client():
    """A response cut short upstream must not look complete downstream."""

    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 10)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with lb_in_process([Endpoint("127.0.0.1", port)]) as lb:
        rc, out, err = await curl(lb.url + "/")
        assert rc != 0  # curl: transfer closed with outstanding read data remaining
    srv.close()
    await srv.wait_closed()


async def test_misbehaving_backend_garbage_is_502():
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with lb_in_process([Endpoint("127.0.0.1", port)], retries=0) as lb:
        rc, out, _ = await curl("-i", lb.url + "/")
        assert out.startswith("HTTP/1.1 502"), out
    srv.close()
    await srv.wait_closed()


def test_backend_helper_is_importable():
    assert Backend("x").key == "127.0.0.1:0"


async def test_response_hop_by_hop_and_connection_named_fields_removed():
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nX-Private: p\r\nConnection: X-Private\r\nKeep-Alive: timeout=5\r\n"
            b"Content-Length: 2\r\nX-Kept: k\r\n\r\nok"
        )
        await writer.drain()
        await reader.read()  # until the LB closes its pooled connection
        writer.close()

    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with lb_in_process([Endpoint("127.0.0.1", port)]) as lb:
        rc, out, _ = await curl("-i", lb.url + "/")
        head = out.partition("\r\n\r\n")[0].lower()
        assert "x-kept: k" in head and "via: 1.1 mesh" in head
        assert "x-private" not in head and "keep-alive" not in head
    srv.close()
    await srv.wait_closed()


async def test_per_try_timeout_retries_next_endpoint():
    async with backends(2) as bs, lb_in_process(bs, per_try_timeout=0.3, retries=1) as lb:
        key = None
        view = lb.cluster.view
        from lb.ring import hash_key

        for i in range(1000):
            if view.endpoints[view.table.lookup(hash_key(f"k{i}".encode()))].key == bs[0].key:
                key = f"k{i}"
                break
        bs[0].delay = 3.0
        async with aiohttp.ClientSession() as s, s.get(lb.url + "/", headers={"X-User": key}) as r:
            assert r.status == 200
            assert (await r.json())["backend"] == "b1"
        assert lb.cluster.stats.retries == 1


async def test_client_idle_timeout_and_upstream_pool_expiry():
    async with backends(1) as bs, lb_in_process(bs, idle_timeout=0.3, pool_idle_expiry=1.0) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"GET /i HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == 200
        state = lb.cluster.view.states[0]
        assert len(state.idle) == 1
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # the LB closed the idle client connection
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(5):  # the idle upstream connection expires
            while state.idle or state.connections:
                await asyncio.sleep(0.05)


async def test_client_leaving_mid_request_does_not_count_against_the_endpoint():
    async with backends(2) as bs, lb_in_process(bs, request_timeout=10) as lb:
        for b in bs:
            b.delay = 1.0
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
            writer.write(b"GET /gone HTTP/1.1\r\nHost: a\r\nX-User: x\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(5):
                while not any(b.seen for b in bs):
                    await asyncio.sleep(0.01)
            writer.close()
            await writer.wait_closed()
            for b in bs:
                b.seen.clear()
        await asyncio.sleep(0.1)
        assert not any(lb.cluster.detector.is_ejected(b.key) for b in bs)
        assert all(st.counters.snapshot()["failures"] == 0 for st in lb.cluster.view.states)


async def test_post_timeout_is_not_retried():
    async with backends(2) as bs, lb_in_process(bs, per_try_timeout=0.3, retries=2) as lb:
        for b in bs:
            b.delay = 2.0
        rc, out, _ = await curl("-i", "-d", "once", lb.url + "/pay")
        assert out.startswith("HTTP/1.1 504"), out
        assert sum(len(b.seen) for b in bs) == 1
        assert lb.cluster.stats.retries == 0
