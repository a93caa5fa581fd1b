"""The floor of an asyncio proxy: uvloop and httptools moving bytes, nothing else (not mesh).

Each client connection gets one upstream connection to one fixed port; bytes go through
unchanged in both directions and httptools parses both streams, as a real proxy must to
find where messages end. No routing, no header rewriting, no pool, no health, no stats.
``perf/lb_bench.py`` runs it beside mesh lb and nginx so that mesh's CPU per request splits
into what the platform costs (this) and what mesh's own per-request work costs (the rest).

    python -m perf.bare_proxy LISTEN_PORT UPSTREAM_PORT [WORK]

WORK (default 0) adds that many iterations of a pure-Python loop to each request, a
stand-in for a proxy's own per-request logic: ``lb_bench.py --floor-work`` uses it to show
what each µs of Python per request costs against nginx.
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop


def _python_work(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i
    return total


class _Up(asyncio.Protocol):
    def __init__(self, down: _Down) -> None:
        self.down = down
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.down.transport.write(data)
        self.parser.feed_data(data)

    def connection_lost(self, exc) -> None:
        self.down.transport.close()

    def on_message_complete(self) -> None:
        pass


class _Down(asyncio.Protocol):
    def __init__(self, upstream_port: int, work: int = 0) -> None:
        self.upstream_port = upstream_port
        self.work = work
        self.transport: asyncio.Transport | None = None
        self.up: _Up | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.waiting: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.up = await loop.create_connection(
            lambda: _Up(self), "127.0.0.1", self.upstream_port
        )
        for data in self.waiting:
            self.up.transport.write(data)
        self.waiting = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.work:
            _python_work(self.work)
        if self.up is None:
            self.waiting.append(data)
        else:
            self.up.transport.write(data)

    def connection_lost(self, exc) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        pass


async def _serve(listen_port: int, upstream_port: int, work: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Down(upstream_port, work), "127.0.0.1", listen_port)
    await server.serve_forever()


def main() -> int:
    listen_port, upstream_port = (int(a) for a in sys.argv[1:3])
    work = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    uvloop.run(_serve(listen_port, upstream_port, work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
