"""The local probe against real sockets: HTTP statuses, TCP connects, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
from aiohttp import web

from sidecar.probe import Check, Prober


@pytest.fixture
async def app():
    async def status(request):
        code = int(request.match_info["code"])
        if 300 <= code < 400:
            raise web.HTTPFound("/elsewhere") if code == 302 else web.HTTPNotModified()
        return web.Response(status=code, text="x")

    application = web.Application()
    application.router.add_get("/status/{code}", status)
    runner = web.AppRunner(application)
    await runner.setup()
    site = web.SockSite(runner, socket.create_server(("127.0.0.1", 0)))
    await site.start()
    yield site._sock.getsockname()[1]
    await runner.cleanup()


@pytest.mark.parametrize(("code", "ok"), [(200, True), (204, True), (302, True), (304, True), (404, False), (500, False), (503, False)])  # fmt: skip
async def test_http_2xx_and_3xx_pass(app, code, ok):
    prober = Prober(Check.parse(f"http:/status/{code}"), "127.0.0.1", app, timeout=2)
    try:
        result = await prober.probe()
    finally:
        await prober.close()
    assert result.ok is ok
    if not ok:
        assert result.reason == f"HTTP {code}"


async def test_tcp_connect_and_refused(app):
    up = Prober(Check.parse("tcp"), "127.0.0.1", app, timeout=1)
    assert (await up.probe()).ok
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    for check in ("tcp", "http:/"):
        down = Prober(Check.parse(check), "127.0.0.1", port, timeout=1)
        result = await down.probe()
        await down.close()
        assert not result.ok and result.reason


async def test_a_silent_app_times_out():
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never answers
    conns = []

    async def hold(reader, writer):
        conns.append(writer)
        await asyncio.sleep(30)

    server = await asyncio.start_server(hold, sock=silent)
    try:
        prober = Prober(Check.parse("http:/"), "127.0.0.1", silent.getsockname()[1], timeout=0.3)
        result = await prober.probe()
        await prober.close()
        assert not result.ok and "0.3" in result.reason
    finally:
        for w in conns:
            w.close()
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


async def test_none_always_passes():
    prober = Prober(Check.parse("none"), "127.0.0.1", 9, timeout=0.1)
    assert (await prober.probe()).ok
