"""The floor of an asyncio proxy: uvloop and httptools moving bytes, nothing else (not mesh).

Each client connection gets one upstream connection to one fixed port; bytes go through
unchanged in both directions and httptools parses both streams, as a real proxy must to
find where messages end. No routing, no header rewriting, no pool, no health, no stats.
``perf/lb_bench.py`` runs it beside mesh lb and nginx so that mesh's CPU per request splits
into what the platform costs (this) and what mesh's own per-request work costs (the rest).

    python -m perf.bare_proxy LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop


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
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
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


async def _serve(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Down(upstream_port), "127.0.0.1", listen_port)
    await server.serve_forever()


def main() -> int:
    listen_port, upstream_port = (int(a) for a in sys.argv[1:3])
    uvloop.run(_serve(listen_port, upstream_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
