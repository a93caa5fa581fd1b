"""Helpers for the LB integration tests: real backends, an in-process LB, an LB process.

Backends are small aiohttp apps on pre-bound port-0 sockets; they record what they
received, so tests assert on what the upstream saw. (No tests in this module.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from lb.cluster import Cluster, ClusterConfig
from lb.endpoints import Endpoint, EndpointSet
from lb.hashing import HashSource
from lb.outlier import OutlierConfig
from lb.proxy import Downstream
from lb.server import Route, Server, bind

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    body_len: int


class OnLoopback:
    """A peer listening on 127.0.0.1:``port``, as an LB endpoint."""

    port: int

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"


class StreamPeer(OnLoopback):
    """A peer on raw asyncio streams: ``_handle`` serves each connection as the test needs
    (no HTTP server in between, so it can misbehave at will)."""

    port = 0
    _srv: asyncio.Server | None = None

    async def start(self):
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._open: list[asyncio.StreamWriter] = []
        self._srv = await asyncio.start_server(self._serve, sock=sock)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.append(writer)
        await self._handle(reader, writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """Close the listener and every connection still open (their handlers end)."""
        for writer in self._open:
            writer.close()
        if self._srv is not None:
            self._srv.close()
            await self._srv.wait_closed()


@dataclass
class Backend(OnLoopback):
    name: str
    port: int = 0
    fail_status: int = 0  # answer this status to everything when set
    delay: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2**31)
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/stream/{n}", self._stream)
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    def _record(self, request: web.Request, n: int) -> None:
        self.seen.append(
            Seen(
                request.method,
                request.path_qs,
                {k.lower(): v for k, v in request.headers.items()},
                [(a.decode("latin-1"), b.decode("latin-1")) for a, b in request.raw_headers],
                n,
            )
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.fail_status else 200, text="ok")

    async def _any(self, request: web.Request) -> web.StreamResponse:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        self._record(request, n)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_status:
            return web.Response(status=self.fail_status, text="failing")
        return web.json_response(
            {"backend": self.name, "path": request.path_qs, "body_len": n, "method": request.method}
        )

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Stream N bytes back chunked (and echo the request body length)."""
        total = int(request.match_info["n"])
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        self._record(request, n)
        resp = web.StreamResponse(headers={"X-Body-Len": str(n)})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        block = b"x" * 65536
        sent = 0
        while sent < total:
            piece = block[: min(65536, total - sent)]
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
        return resp

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request, 0)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(f"{self.name}:{msg.data}")
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def start(self) -> Backend:
        sock = socket.create_server(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self.runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.SockSite(self.runner, sock).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@contextlib.asynccontextmanager
async def backends(n: int = 3):
    bs = [await Backend(f"b{i}").start() for i in range(n)]
    try:
        yield bs
    finally:
        for b in bs:
            await b.stop()


@dataclass
class InProcessLB:
    server: Server
    cluster: Cluster
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def lb_in_process(
    bs: list[Backend] | list[Endpoint], *, hash_on: tuple[str, ...] = ("header:x-user",), **cfg
):
    outlier = cfg.pop("outlier", None) or OutlierConfig(latency_factor=0)
    idle_timeout = cfg.pop("idle_timeout", 60.0)
    limits = {k: cfg.pop(k) for k in ("header_timeout", "max_connections") if k in cfg}
    config = ClusterConfig(
        hash_on=tuple(HashSource.parse(h) for h in hash_on), outlier=outlier, **cfg
    )
    cluster = Cluster(config)
    eps = [b if isinstance(b, Endpoint) else b.endpoint for b in bs]
    await cluster.set_endpoints(EndpointSet.of(eps))
    server = Server([Route(cluster)], protocol=Downstream, idle_timeout=idle_timeout, **limits)
    host, port = await server.listen(bind("127.0.0.1", 0))
    server.start()
    try:
        yield InProcessLB(server, cluster, port)
    finally:
        await server.close()


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send bytes on a new connection, read until the LB closes it (or timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += chunk
        return out
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked) from a raw stream."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += data[:-2]
    return status, headers, body


async def curl(*args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", str(int(timeout)), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


_LISTEN = re.compile(r"listening (http|admin)=(\S+):(\d+)")


class LBProcess:
    """``mesh lb`` as a child process; ``start()`` waits for its ``listening`` lines."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> None:
        self.args = args
        self.env = env
        self.prefix = prefix  # a command to run it under (e.g. prlimit)
        self.proc: asyncio.subprocess.Process | None = None
        self.http_port = 0
        self.admin_port = 0
        self.log: list[str] = []
        self._pump: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self, timeout: float = 20.0) -> LBProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        self.proc = await asyncio.create_subprocess_exec(
            *self.prefix, sys.executable, "-m", "mesh", "lb", "--listen", "127.0.0.1:0",
            "--admin", "127.0.0.1:0", *self.args,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=REPO, env=env,
        )  # fmt: skip
        async with asyncio.timeout(timeout):
            while not (self.http_port and self.admin_port):
                line = (await self.proc.stderr.readline()).decode()
                if not line:
                    raise RuntimeError("mesh lb exited:\n" + "".join(self.log))
                self.log.append(line)
                m = _LISTEN.search(line)
                if m:
                    if m.group(1) == "http":
                        self.http_port = int(m.group(3))
                    else:
                        self.admin_port = int(m.group(3))
        self._pump = asyncio.create_task(self._read_rest())
        return self

    async def _read_rest(self) -> None:
        while True:
            line = await self.proc.stderr.readline()
            if not line:
                return
            self.log.append(line.decode())

    async def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                rc = await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            rc = await self.proc.wait()
        if self._pump is not None:
            await self._pump
        return rc

    async def __aenter__(self) -> LBProcess:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


# A backend in its own process, to be killed with SIGKILL mid-load.

BACKEND_MAIN = """
import asyncio, socket, sys
from aiohttp import web
sys.path.insert(0, {repo!r})
from tests.integration.test_lb_support import Backend

async def main():
    b = await Backend(sys.argv[1]).start()
    print(b.port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class BackendProcess(OnLoopback):
    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> BackendProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", BACKEND_MAIN.format(repo=REPO), self.name,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip
        async with asyncio.timeout(20):
            self.port = int((await self.proc.stdout.readline()).decode())
        return self

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
