"""The LB process: listeners, routes to clusters, background upkeep, health checks, drain.

The server knows its connections only as what its protocol factory makes (lb.proxy's
Downstream in mesh): it routes, counts, sweeps and drains them, and never imports the
data path, which imports it."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lb import http1
from lb.cluster import Cluster

log = logging.getLogger(__name__)

MAINTAIN_INTERVAL = 1.0  # ejection ends and idle-pool expiry are checked this often
# Request and per-try timeouts on the fast path are checked this often, instead of a timer
# per request (a timer costs about as much as routing the request). Timeouts fire up to
# this late.
DEADLINE_TICK = 0.05
# A request head must be complete this long after the connection opened (first request) or
# after its first byte (later requests on a keep-alive connection; the wait between
# requests is the idle timeout's). nginx client_header_timeout 60 s from the connection's
# start, HAProxy timeout http-request, Envoy request_headers_timeout from the first byte.
# Shorter than nginx's: a slow-header client holds a connection slot and a file.
HEADER_TIMEOUT = 10.0
# Open client connections past which a new one is closed at once; below the usual
# 20000-file limit with room for upstream connections (nginx worker_connections 512,
# HAProxy maxconn from the file limit, Envoy's overload manager max connections).
MAX_CONNECTIONS = 10_000
# At the limit, the longest-idle keep-alive connection is closed to make room for a new
# one (nginx ngx_drain_connections, HAProxy and Envoy reap idle connections under
# pressure). A search that finds none is not repeated for this long: a flood of new
# connections while every one is busy costs no more than refusing them.
REAP_RETRY = 0.05


@dataclass(frozen=True, slots=True)
class Route:
    """Requests whose Host (port ignored) and path prefix match go to ``cluster``.
    ``host`` empty = any host."""

    cluster: Cluster
    host: bytes = b""
    prefix: bytes = b"/"

    def matches(self, host: bytes, url: bytes) -> bool:
        return (not self.host or host == self.host) and url.startswith(self.prefix)


def _host_only(host: bytes) -> bytes:
    host = host.lower()
    if host.startswith(b"["):
        return host.split(b"]", 1)[0] + b"]"
    return host.rsplit(b":", 1)[0] if b":" in host else host


class ServerStats:
    def __init__(self) -> None:
        self.connections_total = 0
        self.connections_refused = 0  # closed at once: over max_connections
        self.idle_reaped = 0  # idle keep-alive connections closed to admit a new one
        self.header_timeouts = 0
        self.upgrades = 0
        self.local: dict[int, int] = {}


class Server:
    """Owns the listeners and every downstream connection."""

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        protocol: Callable[[Server], asyncio.Protocol],
        idle_timeout: float = 60.0,
        header_timeout: float = HEADER_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        access_log: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.protocol = protocol  # makes one client connection's protocol
        # Most specific first: a host before any host, a longer prefix before a shorter.
        self.routes = sorted(routes, key=lambda r: (not r.host, -len(r.prefix)))
        self.clusters = list(dict.fromkeys(r.cluster for r in routes))
        self.single = (
            self.routes[0].cluster
            if len(self.routes) == 1 and not self.routes[0].host and self.routes[0].prefix == b"/"
            else None
        )
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout  # 0 = none
        self.max_connections = max_connections
        self.access_log = access_log  # one INFO line per request (costs CPU per request)
        # Request fields the parser keeps for hash keys (every cluster's header sources).
        wanted = set()
        for c in self.clusters:
            for src in c.config.hash_on:
                if src.kind == "header":
                    wanted.add(src.name)
                elif src.kind == "cookie":
                    wanted.add(b"cookie")
        self.wanted_headers = frozenset(wanted)
        # The client connections (lb.proxy.Downstream): busy, queue, head_since, tunnel,
        # transport, idle_since, check_deadline(), header_timeout(), close(), abort().
        self.connections: set[Any] = set()
        self.stats = ServerStats()
        self.draining = False
        self.servers: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task] = []
        self._empty = asyncio.Event()
        self._empty.set()
        self._reap_after = 0.0

    def __repr__(self) -> str:
        return f"<Server listeners={len(self.servers)} connections={len(self.connections)} draining={self.draining}>"

    def route(self, head: http1.RequestHead) -> Cluster | None:
        if self.single is not None:
            return self.single
        host = _host_only(head.host)
        for r in self.routes:
            if r.matches(host, head.url):
                return r.cluster
        return None

    def count_local(self, status: int) -> None:
        self.stats.local[status] = self.stats.local.get(status, 0) + 1

    def connection_opened(self, conn: Any) -> None:
        self.connections.add(conn)
        self.stats.connections_total += 1
        self._empty.clear()

    def reap_idle(self) -> bool:
        """At the connection limit: close the longest-idle keep-alive connection (served,
        between requests, nothing in progress). True when one was closed."""
        now = time.monotonic()
        if now < self._reap_after or self.draining:
            return False
        oldest = None
        for conn in self.connections:
            if (
                not conn.busy
                and not conn.queue
                and not conn.head_since
                and conn.tunnel is None
                and conn.transport is not None
                and not conn.transport.is_closing()
                and (oldest is None or conn.idle_since < oldest.idle_since)
            ):
                oldest = conn
        if oldest is None:
            self._reap_after = now + REAP_RETRY
            return False
        self.stats.idle_reaped += 1
        oldest.close()
        return True

    def connection_finished(self, conn: Any) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._empty.set()

    # Listening

    async def listen(self, sock: socket.socket) -> tuple[str, int]:
        """Serve on a bound socket; returns the real address (port 0 resolved)."""
        srv = await self.loop.create_server(lambda: self.protocol(self), sock=sock, backlog=1024)
        self.servers.append(srv)
        return sock.getsockname()[:2]

    def start(self) -> None:
        self._tasks.append(self.loop.create_task(self._maintain()))
        self._tasks.append(self.loop.create_task(self._deadlines()))
        for cluster in self.clusters:
            if cluster.health is not None:
                self._tasks.append(self.loop.create_task(_health_loop(cluster)))

    async def _deadlines(self) -> None:
        """Every DEADLINE_TICK: exchanges past their deadline, heads past the header timeout."""
        while True:
            await asyncio.sleep(DEADLINE_TICK)
            now = time.monotonic()
            # A head that began before ``late`` is overdue (never true when there is no limit).
            late = now - self.header_timeout if self.header_timeout > 0 else 0.0
            for conn in list(self.connections):
                if conn.busy:
                    conn.check_deadline(now)
                elif 0.0 < conn.head_since <= late:
                    self.stats.header_timeouts += 1
                    conn.header_timeout()

    async def _maintain(self) -> None:
        next_sweep = {id(c): time.monotonic() + c.config.outlier.interval for c in self.clusters}
        while True:
            await asyncio.sleep(MAINTAIN_INTERVAL)
            now = time.monotonic()
            for c in self.clusters:
                c.maintain(now)
                if now >= next_sweep[id(c)]:
                    next_sweep[id(c)] = now + c.config.outlier.interval
                    c.sweep(now)

    # Shutdown

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, let requests in flight finish (up to ``timeout``), close idle
        keep-alive connections, then cut what is left. True when nothing was cut."""
        self.draining = True
        for srv in self.servers:
            srv.close()
        for conn in list(self.connections):
            # Idle between requests: close. A connection whose head is awaited (accepted
            # just before the drain, or mid-head) keeps the header timeout to send it; that
            # one request is served with Connection: close (the drain timeout bounds both).
            if not conn.busy and not conn.queue and conn.tunnel is None and not conn.head_since:
                conn.close()
        try:
            async with asyncio.timeout(timeout):
                while self.connections:
                    self._empty.clear()
                    await self._empty.wait()
            clean = True
        except TimeoutError:
            clean = False
            for conn in list(self.connections):
                conn.abort()
        await self.close()
        return clean

    async def close(self) -> None:
        for srv in self.servers:
            srv.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        for conn in list(self.connections):
            conn.abort()
        for c in self.clusters:
            c.close()
        # Let transports and the connection tasks see their ends.
        for _ in range(3):
            await asyncio.sleep(0)


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6), SO_REUSEPORT when several processes share it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# Active health checks (aiohttp: not on the request path)


async def _health_loop(cluster: Cluster) -> None:
    import aiohttp

    hc = cluster.health
    assert hc is not None
    cfg = hc.config
    timeout = aiohttp.ClientTimeout(total=cfg.timeout)
    running: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)
    ) as session:
        try:
            while True:
                now = time.monotonic()
                for key in hc.due(now):
                    st = next((s for s in cluster.view.states if s.endpoint.key == key), None)
                    if st is None:
                        hc.on_result(key, True, now)
                        continue
                    t = asyncio.create_task(_probe(cluster, session, st.endpoint, cfg))
                    running.add(t)
                    t.add_done_callback(running.discard)
                nxt = hc.next_due()
                wait = 1.0 if nxt is None else min(1.0, max(0.01, nxt - time.monotonic()))
                await asyncio.sleep(wait)
        finally:
            for t in list(running):
                t.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)


async def _probe(cluster: Cluster, session, endpoint, cfg) -> None:
    import aiohttp

    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    url = f"http://{host}:{endpoint.port}{cfg.path}"
    error = ""
    try:
        async with session.get(url, allow_redirects=False) as resp:
            await resp.read()
            ok = cfg.passing(resp.status)
            if not ok:
                error = f"status {resp.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        ok = False
        error = type(exc).__name__
    now = time.monotonic()
    hc = cluster.health
    changes = hc.on_result(endpoint.key, ok, now, error=error)
    for ch in changes:
        if ch.healthy:
            cluster.events.add("healthy", "passes health checks", ch.key)
            log.info("cluster %s: %s passes health checks", cluster.config.name, ch.key)
        else:
            cluster.events.add("unhealthy", f"fails health checks ({error})", ch.key)
            log.warning(
                "cluster %s: %s fails health checks (%s)", cluster.config.name, ch.key, error
            )
    events = cluster.detector.restore(endpoint.key, now) if ok else []
    if changes or events:
        cluster.apply(events)
