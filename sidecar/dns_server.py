"""The DNS responder's I/O shell: UDP and TCP servers over a swappable answer table.

On UDP each wake-up is one call into the native core, which reads the waiting queries with
``recvmmsg``, answers those the table holds whole and sends them with ``sendmmsg``; the rest
come back to :meth:`Answers.answer` one by one. The table
is rebuilt in a worker thread when a new snapshot arrives and swapped in whole; queries keep
being answered from the old table while the new one renders.

Names outside the zone go to the upstream resolver: UDP first, then TCP when the upstream's
UDP reply is truncated and the client itself came over TCP (a UDP client gets the TC reply
and retries over TCP by itself, RFC 7766 §5). Every forward has a deadline; failure or
timeout is SERVFAIL, never silence.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable, Sequence

from mesh_native import DnsUdp
from registry.model import Snapshot
from sidecar.dns_answer import FORWARD, Answers, ZoneConfig, build, empty, servfail

log = logging.getLogger(__name__)

# Limits, each with its reason.
TCP_IDLE_TIMEOUT = 10.0  # s; RFC 7766 §6.2.3 asks for seconds, not minutes (Unbound: 30 s)
MAX_TCP_CONNECTIONS = 512  # beyond this new connections are closed at once
MAX_TCP_PENDING = 16  # forwarded queries in flight per TCP connection (RFC 7766 pipelining)
MAX_FORWARDS = 512  # forwarded queries in flight in all; more get SERVFAIL at once
FORWARD_UDP_TIMEOUT = 2.0  # s; Consul's recursor_timeout is 2 s
FORWARD_DEADLINE = 4.0  # s for UDP plus the TCP retry; Docker's embedded DNS waits 4 s
ERROR_LOG_INTERVAL = 1.0  # s; at most one log line per interval for answering errors
UDP_BATCH = 64  # datagrams per recvmmsg
UDP_ROUNDS = 4  # recvmmsg calls per wake-up at most, before other callbacks get a turn
BIND_TRIES = 8  # port 0: TCP and UDP must get the same number; retry if UDP's is taken


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ErrorLog:
    """One log line per interval for errors while answering; the rest are counted."""

    def __init__(self) -> None:
        self.count = 0
        self._next = 0.0
        self._quiet = 0

    def report(self, exc: BaseException, peer: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now < self._next:
            self._quiet += 1
            return
        more = f" ({self._quiet} more since the last line)" if self._quiet else ""
        log.error("dns: answering a query from %s failed: %r; sent SERVFAIL%s", peer, exc, more)
        self._quiet = 0
        self._next = now + ERROR_LOG_INTERVAL


def question_type(data: bytes) -> int | None:
    """The question's type as the fast path reads it: the two bytes after the first zero
    byte past the header (None when the datagram ends first)."""
    end = data.find(0, 12)
    return None if end < 0 or end + 3 > len(data) else (data[end + 1] << 8) | data[end + 2]


# Question types counted by name; any other is counted as "other" (a peer choosing the
# type must not choose how many series the metrics have).
COUNTED_TYPES = frozenset({1, 2, 5, 6, 12, 13, 15, 16, 28, 33, 64, 65, 252, 255})
OTHER_TYPE = -1


class QueryCounts:
    """What the responder did with the queries answered in Python (the native path counts
    its own): answered by (transport, type, rcode), and forwarded, dropped, truncated and
    unsent (the socket would not take the reply) by transport."""

    def __init__(self) -> None:
        self.answered: Counter[tuple[str, int | None, int]] = Counter()
        self.forwarded: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.truncated: Counter[str] = Counter()
        self.unsent: Counter[str] = Counter()

    def record(self, transport: str, data: bytes, reply: bytes | str | None) -> None:
        if reply is None:
            self.dropped[transport] += 1
        elif reply is FORWARD:
            self.forwarded[transport] += 1
        elif len(reply) >= 4:
            qtype = question_type(data)
            if qtype is not None and qtype not in COUNTED_TYPES:
                qtype = OTHER_TYPE
            self.answered[(transport, qtype, reply[3] & 0x0F)] += 1  # type: ignore[index]
            if reply[2] & 0x02:
                self.truncated[transport] += 1


class Forwarder:
    """Send one query to the upstream resolver and return its reply, or SERVFAIL."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        udp_timeout: float = FORWARD_UDP_TIMEOUT,
        deadline: float = FORWARD_DEADLINE,
        rng: random.Random | None = None,
    ) -> None:
        self.upstream = upstream
        self.udp_timeout = udp_timeout
        self.deadline = deadline
        self._rng = rng or random.SystemRandom()
        self.inflight = 0
        self.failures = 0
        self.loops = 0
        # ID + question of every query we have out: one that comes back to us is a loop
        # (an upstream configured to forward to this sidecar), answered SERVFAIL at once.
        self._out: set[bytes] = set()

    def __repr__(self) -> str:
        return f"<Forwarder {format_addr(*self.upstream)} inflight={self.inflight}>"

    async def forward(self, query: bytes, *, tcp: bool) -> bytes:
        """The upstream's reply with the client's ID, or SERVFAIL. Never raises."""
        if self.inflight >= MAX_FORWARDS:
            return servfail(query)
        if _loop_key(query) in self._out:
            self.loops += 1
            if self.loops == 1:
                log.warning(
                    "dns: upstream %s sends our own queries back (a forwarding loop); "
                    "answering them SERVFAIL",
                    format_addr(*self.upstream),
                )
            return servfail(query)
        self.inflight += 1
        try:
            async with asyncio.timeout(self.deadline):
                return await self._forward(query, tcp=tcp)
        except (OSError, TimeoutError, _BadReply) as exc:
            self.failures += 1
            log.debug("dns: upstream %s failed: %r", format_addr(*self.upstream), exc)
            return servfail(query)
        finally:
            self.inflight -= 1

    async def _forward(self, query: bytes, *, tcp: bool) -> bytes:
        # Our own random ID toward the upstream: a client's ID is not ours to trust.
        qid = self._rng.getrandbits(16)
        ours = struct.pack("!H", qid) + query[2:]
        key = _loop_key(ours)
        self._out.add(key)
        try:
            try:
                async with asyncio.timeout(self.udp_timeout):
                    reply = await self._udp(ours)
            except TimeoutError:
                if not tcp:
                    raise
                reply = await self._tcp(ours)  # a lost datagram: TCP has its own retransmits
            if tcp and len(reply) > 3 and reply[2] & 0x02:
                reply = await self._tcp(ours)
        finally:
            self._out.discard(key)
        _check(ours, reply)
        return query[:2] + reply[2:]

    async def _udp(self, query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _OneReply(query[:2], done), remote_addr=self.upstream
        )
        try:
            transport.sendto(query)
            return await done
        finally:
            transport.close()

    async def _tcp(self, query: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*self.upstream)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise _BadReply("upstream closed the TCP connection") from exc
        finally:
            writer.close()


class _BadReply(Exception):
    pass


def _question_end(query: bytes) -> int:
    end = 12
    while end < len(query) and query[end]:
        end += query[end] + 1
    return end + 5


def _loop_key(query: bytes) -> bytes:
    return query[:2] + query[12 : _question_end(query)].lower()


def _check(query: bytes, reply: bytes) -> None:
    """The reply answers this query: same ID, QR set, same question (any case)."""
    if len(reply) < 12 or reply[:2] != query[:2] or not reply[2] & 0x80:
        raise _BadReply("upstream reply does not match the query")
    end = _question_end(query)
    if reply[4:6] != b"\x00\x01" or reply[12:end].lower() != query[12:end].lower():
        raise _BadReply("upstream reply is for another question")


class _OneReply(asyncio.DatagramProtocol):
    def __init__(self, qid: bytes, done: asyncio.Future[bytes]) -> None:
        self._qid = qid
        self._done = done

    def datagram_received(self, data: bytes, addr: object) -> None:
        if data[:2] == self._qid and not self._done.done():
            self._done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self._done.done():
            self._done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(exc or ConnectionError("closed"))


def resolv_conf_upstream(
    exclude: Iterable[tuple[str, int]] = (), path: str = "/etc/resolv.conf"
) -> tuple[str, int] | None:
    """The first ``nameserver`` of resolv.conf that is not one of our own listen addresses."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ours = set(exclude)
    wildcard = {port for host, port in ours if host in ("0.0.0.0", "::")}
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            host = parts[1].split("%")[0]  # drop an IPv6 zone index
            if (host, 53) in ours or (53 in wildcard and host in ("127.0.0.1", "::1")):
                continue
            return host, 53
    return None


class DnsServer:
    """UDP and TCP listeners answering from :attr:`answers`, swapped whole on each snapshot.

    ``await start(listen=[("127.0.0.1", 0)], sockets=[...])``: listen addresses get UDP and
    TCP on the same port; pre-bound sockets are served according to their type.
    """

    def __init__(
        self,
        config: ZoneConfig,
        *,
        upstream: tuple[str, int] | None = None,
        tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
    ) -> None:
        self.tcp_idle_timeout = tcp_idle_timeout
        if upstream is not None and not config.forward:
            config = ZoneConfig(config.domain, config.ttl, forward=True)
        self.config = config
        self.answers: Answers = empty(config)
        self.forwarder = Forwarder(upstream) if upstream else None
        self.addresses: list[tuple[str, int]] = []
        self.errors = _ErrorLog()
        self.rebuilds = 0
        self.rebuild_seconds = 0.0  # in all, rendering tables off the loop
        self.counts = QueryCounts()
        self.started = asyncio.Event()
        self._udp: list[_UdpDns] = []
        self._servers: list[asyncio.Server] = []
        self._tcp: set[_TcpDns] = set()
        self._tasks: set[asyncio.Task] = set()
        self._pending: Snapshot | None = None
        self._rebuilder: asyncio.Task | None = None

    def __repr__(self) -> str:
        where = ",".join(format_addr(*a) for a in self.addresses) or "not listening"
        return f"<DnsServer {where} {self.answers!r} tcp={len(self._tcp)}>"

    @property
    def tcp_connections(self) -> int:
        """TCP connections open and counted against ``MAX_TCP_CONNECTIONS``."""
        return len(self._tcp)

    def query_counts(self) -> QueryCounts:
        """Every query's outcome so far: the Python path's and each UDP socket's native one."""
        total = QueryCounts()
        for name, counter in vars(self.counts).items():
            getattr(total, name).update(counter)
        for udp in self._udp:
            for qtype, rcode, n in udp.native.counts():
                total.answered[("udp", qtype, rcode)] += n
            total.unsent["udp"] += udp.native.unsent
        return total

    # Snapshots

    def update(self, snapshot: Snapshot) -> None:
        """Render ``snapshot`` off the loop and swap it in; only the newest pending one."""
        self._pending = snapshot
        if self._rebuilder is None or self._rebuilder.done():
            self._rebuilder = asyncio.create_task(self._rebuild())

    async def _rebuild(self) -> None:
        while self._pending is not None:
            snapshot, self._pending = self._pending, None
            started = time.perf_counter()
            try:
                answers = await asyncio.to_thread(build, snapshot, self.config, self.answers)
            except Exception:
                log.exception("dns: could not render revision %s", snapshot.revision)
                continue
            self.rebuild_seconds += time.perf_counter() - started
            self.answers = answers
            self.rebuilds += 1

    async def wait_rebuilt(self) -> None:
        """Until the last snapshot given to :meth:`update` is being served."""
        while self._rebuilder is not None and not self._rebuilder.done():
            await asyncio.shield(self._rebuilder)

    # Listening

    async def start(
        self,
        listen: Iterable[tuple[str, int]] = (),
        *,
        sockets: Sequence[socket.socket] = (),
    ) -> None:
        for sock in sockets:
            host, port = sock.getsockname()[:2]
            if sock.type == socket.SOCK_DGRAM:
                await self._serve_udp(sock=sock)
            else:
                await self._serve_tcp(sock=sock)
            self._listening(host, port)
        for host, port in listen:
            port = await self._bind_pair(host, port)
            self._listening(host, port)
        self.started.set()

    def _listening(self, host: str, port: int) -> None:
        if (host, port) not in self.addresses:
            self.addresses.append((host, port))
            log.info("listening dns=%s", format_addr(host, port))

    async def _bind_pair(self, host: str, port: int) -> int:
        # TCP first: port 0 then picks a port free for TCP, where every client connection
        # of the machine also takes one; UDP, with far fewer sockets, is then free on the
        # same port almost always.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(BIND_TRIES):
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                tcp.bind((host, port))
                real = tcp.getsockname()[1]
                udp = socket.socket(family, socket.SOCK_DGRAM)
            except OSError:
                tcp.close()
                raise
            try:
                udp.bind((host, real))
            except OSError:
                udp.close()
                tcp.close()
                if port:
                    raise
                continue
            await self._serve_udp(sock=udp)
            await self._serve_tcp(sock=tcp)
            return real
        raise OSError(f"no port free for both UDP and TCP on {host}")

    async def _serve_udp(self, *, sock: socket.socket) -> _UdpDns:
        udp = _UdpDns(self, sock)
        self._udp.append(udp)
        return udp

    async def _serve_tcp(self, **kw) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _TcpDns(self), reuse_address=True, **kw)
        self._servers.append(server)
        return server

    async def close(self) -> None:
        """Close the listeners, then the connections, then cancel forwards in flight."""
        for udp in self._udp:
            udp.close()
        for server in self._servers:
            server.close()
        for conn in list(self._tcp):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        if self._rebuilder is not None:
            self._rebuilder.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._rebuilder is not None:
            await asyncio.gather(self._rebuilder, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._udp.clear()
        self._servers.clear()

    # Answering

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _servfail_after_error(data: bytes) -> bytes | None:
    """SERVFAIL for a query that answering failed on; None if even that cannot be built.

    Called from the socket's reader callback: nothing may escape it, or the rest of the
    batch is lost and the error lands in the loop's exception handler.
    """
    try:
        return servfail(data) or None
    except Exception:
        return None


class _UdpDns:
    """One UDP socket read straight from the loop's reader callback.

    Not an asyncio transport: each wake-up hands the socket to the native core, which reads
    up to ``UDP_BATCH`` datagrams per ``recvmmsg``, answers those the snapshot's table holds
    whole and sends those replies with one ``sendmmsg``; the rest (misses, bad packets,
    names to forward, replies to cut) come back here with their senders and are answered
    one by one. A reply that would block is dropped: UDP clients retry.
    """

    def __init__(self, server: DnsServer, sock: socket.socket) -> None:
        self._server = server
        self._sock = sock
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self.native = DnsUdp(self._fd, UDP_BATCH, UDP_ROUNDS)
        self._loop.add_reader(self._fd, self._readable)
        self.closed = False

    def _readable(self) -> None:
        server = self._server
        # Bound once per wake-up: a table swapped meanwhile is used from the next one.
        answers = server.answers
        try:
            rest = self.native.drain(answers.native)
        except Exception as exc:  # nothing may escape a reader callback
            server.errors.report(exc, None)
            return
        sendto = self._sock.sendto
        counts = server.counts
        for data, addr in rest:
            try:
                reply = answers.general(data)  # the native table declined it already
            except Exception as exc:
                server.errors.report(exc, addr)
                reply = _servfail_after_error(data)
            counts.record("udp", data, reply)
            if reply is None:
                continue
            if reply is FORWARD:
                server.spawn(self._forward(data, addr))
                continue
            try:
                sendto(reply, addr)  # type: ignore[arg-type]
            except OSError:
                counts.unsent["udp"] += 1

    async def _forward(self, data: bytes, addr) -> None:
        forwarder = self._server.forwarder
        reply = await forwarder.forward(data, tcp=False) if forwarder else servfail(data)
        if not self.closed:
            try:
                self._sock.sendto(reply, addr)
            except OSError:
                self._server.counts.unsent["udp"] += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self._fd)
            self._sock.close()


class _TcpDns(asyncio.Protocol):
    """Length-prefixed messages (RFC 1035 §4.2.2), several per connection, out-of-order
    replies for forwarded queries (RFC 7766 §6.2.1.1)."""

    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pending: set[asyncio.Task] = set()
        self._paused = False  # the client is not taking its replies: answer nothing more
        self._idle: asyncio.TimerHandle | None = None
        self._peer: object = None
        self._eof = False  # the client has sent all it will send (it may still read)

    # Connection

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._peer = transport.get_extra_info("peername")
        if len(self._server._tcp) >= MAX_TCP_CONNECTIONS:
            transport.close()
            return
        self._server._tcp.add(self)
        self._touch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._tcp.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        for task in self._pending:
            task.cancel()
        self._transport = None

    def eof_received(self) -> bool:
        # A client may half-close after its last query (RFC 7766 §6.2.4 lets it): the
        # replies still being forwarded go out first, then the connection closes.
        self._eof = True
        return self._busy()

    def _busy(self) -> bool:
        """Replies still to come: forwards in flight, or whole queries held while paused
        (a partial one left at end-of-file never completes)."""
        return bool(self._pending) or (self._paused and len(self._buffer) >= 2)

    def _finish_if_done(self, _task: object = None) -> None:
        if self._eof and not self._busy():
            self.close()

    def close(self) -> None:
        """Close after the replies already written; abort if the client is not reading them.

        ``close()`` waits for the write buffer to drain, which a client that stopped
        reading never lets happen: the connection, and its slot, would stay forever.
        """
        transport = self._transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    # Timeouts

    def _touch(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self._server.tcp_idle_timeout, self.close)

    # Flow control: a client that does not read its replies stops being read, and the
    # messages already read wait unanswered: replies can be thousands of times larger
    # than their queries, so answering a whole read of pipelined queries at once would
    # buffer megabytes for a client that takes none of it. Reading the backlog resumes
    # us, which counts as activity; a client that never reads sends no whole message
    # either, and the idle timer closes it.

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None:
            self._transport.resume_reading()
            self._touch()
            self._answer_buffered()

    # Messages

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._answer_buffered()

    def _answer_buffered(self) -> None:
        buf = self._buffer
        while len(buf) >= 2 and not self._paused:
            length = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + length:
                break
            message = bytes(buf[2 : 2 + length])
            del buf[: 2 + length]
            self._touch()
            self._handle(message)
            if self._transport is None or self._transport.is_closing():
                return
        self._finish_if_done()

    def _handle(self, data: bytes) -> None:
        server = self._server
        try:
            reply = server.answers.answer(data, udp=False)
        except Exception as exc:
            server.errors.report(exc, self._peer)
            reply = _servfail_after_error(data)
        server.counts.record("tcp", data, reply)
        if reply is None:
            return
        if reply is FORWARD:
            if len(self._pending) >= MAX_TCP_PENDING or server.forwarder is None:
                self._send(servfail(data))
                return
            task = server.spawn(self._forward(data))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            task.add_done_callback(self._finish_if_done)
            return
        self._send(reply)

    async def _forward(self, data: bytes) -> None:
        forwarder = self._server.forwarder
        assert forwarder is not None
        self._send(await forwarder.forward(data, tcp=True))

    def _send(self, reply: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(struct.pack("!H", len(reply)) + reply)


__all__ = ["DnsServer", "Forwarder", "ZoneConfig", "format_addr", "resolv_conf_upstream"]
