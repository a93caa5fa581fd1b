"""The data path: downstream and upstream asyncio Protocols joined per request.

A request that finds an idle keep-alive connection to its endpoint runs entirely in
callbacks: parse → route → pick → write upstream, then the upstream's reads complete it.
A request that must wait (a new connection, a retry) hands over to a task for the rest;
that task owns the request and its errors and answers 502/503/504 if nothing was sent.

Bytes move in callbacks: a request body goes from the downstream protocol straight to the
upstream transport, a response from the upstream protocol straight to the downstream
transport, each direction pausing the other's reads when a write buffer fills
(``pause_writing`` → ``pause_reading``). Each head is built as one bytes object, and all
the bytes one upstream read produces for the client go out in one ``transport.write``;
nothing logs per request.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable

from lb import http1
from lb.balancer import Pick
from lb.cluster import Cluster, EndpointState
from lb.hashing import extract
from lb.outlier import Outcome
from lb.retry import should_retry
from lb.ring import hash_key
from lb.server import Server

END_UPGRADED = http1.END_UPGRADED
END_CLIENT_CLOSE = http1.END_CLIENT_CLOSE
END_REUSABLE = http1.END_REUSABLE

log = logging.getLogger(__name__)
access_log = logging.getLogger("mesh.lb.access")

REPLAY_MAX_BYTES = 64 * 1024  # request body kept for a retry; larger bodies are not retried
MAX_TUNNEL_PENDING_BYTES = 64 * 1024  # sent after an Upgrade head, before the 101
BODY_BUFFER_BYTES = 256 * 1024  # request body buffered before an upstream is attached
# After answering a malformed request, read and drop what the client still sends for this
# long before closing: closing with unread bytes makes the kernel reset the connection,
# and the client could lose the answer (nginx lingering_timeout 5 s, lingering_time 30 s).
LINGER_SECONDS = 2.0
RETRY_AFTER = (b"Retry-After: 1",)


def _write(transport: asyncio.Transport | None, data: bytes) -> None:
    """Write unless the transport is gone (the peer left while bytes were on their way)."""
    if transport is not None and not transport.is_closing():
        transport.write(data)


# Per-request state


class Request:
    """One downstream request: its head, its body as it arrives, where the body goes."""

    __slots__ = (
        "head",
        "body",
        "replay",
        "replayable",
        "ended",
        "sink",
        "buffered",
        "continue_sent",
        "tunnel_data",
        "status",
        "endpoint",
        "t0",
    )

    def __init__(self, head: http1.RequestHead) -> None:
        self.head = head
        # Lists made on the first piece: most requests have no body.
        self.body: list[bytes] | tuple = ()  # not yet sent upstream
        self.replay: list[bytes] | tuple = ()  # everything sent so far, for a retry
        self.replayable = True
        self.ended = False
        self.sink: Upstream | None = None
        self.buffered = 0
        self.continue_sent = False
        self.tunnel_data = b""
        self.status = 0  # what the client got (for the access log)
        self.endpoint = ""
        self.t0 = 0.0


# Upstream connection


class Upstream(asyncio.Protocol):
    """One upstream keep-alive connection. Carries one exchange at a time.

    Its reader (native) also relays: each read from the peer becomes the bytes of one write
    to the client, the head rebuilt, the body passed on (re-chunked when its length is
    unknown), and tells what the end of the response means for both connections.
    """

    __slots__ = (
        "transport",
        "state",
        "parser",
        "reusable",
        "down",
        "req",
        "done",
        "status",
        "started",
        "upgraded",
        "first_byte",
        "pending",
    )

    def __init__(self, state: EndpointState) -> None:
        self.transport: asyncio.Transport | None = None
        self.state = state
        self.parser = http1.ResponseReader()
        self.reusable = False
        self.down: Downstream | None = None
        self.req: Request | None = None
        self.done: Callable[[Outcome], None] | None = None
        self.pending: Outcome | None = None
        self.upgraded = False
        self.status = 0  # of the response in flight, 0 before its head
        self.started = False  # a byte of it reached the client
        self.first_byte = 0.0

    def __repr__(self) -> str:
        return f"<Upstream {self.state.endpoint.key} reusable={self.reusable} busy={self.done is not None}>"

    # asyncio callbacks

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.reusable = True
        self.state.connections += 1

    def connection_lost(self, exc) -> None:
        self.reusable = False
        self.state.connections -= 1
        down = self.down
        if self.upgraded:
            if down is not None:
                down.close()
            return
        if self.done is None:
            return
        if self.started and down is not None:
            parser = self.parser
            if not parser.close_delimited:
                down.abort()  # the body was cut short: the client must see an error, not an end
                if self.req is not None:
                    self.req.status = self.status
                self._finish(Outcome.RESET)
                return
            # The body ran to the close (no Content-Length, not chunked): a normal end.
            if parser.chunked_out:
                _write(down.transport, http1.LAST_CHUNK)
            if not parser.keep_alive_out:
                down.keep_alive = False
            self._complete_at_close()
            return
        self._finish(Outcome.RESET)

    def eof_received(self):
        return False  # close our side too

    def pause_writing(self) -> None:
        down = self.down
        if down is not None:
            down.upstream_full = True
            down.apply_flow()

    def resume_writing(self) -> None:
        down = self.down
        if down is not None:
            down.upstream_full = False
            down.apply_flow()

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            down = self.down
            if down is not None:
                down.idle_since = down.loop.time()  # a tunnel times out when quiet, not busy
                t = down.transport
                if t is not None and not t.is_closing():
                    t.write(data)
            return
        if self.done is None:
            self.close()  # bytes nobody asked for: the connection is not in a known state
            return
        if not self.first_byte:
            self.first_byte = time.monotonic()
        down = self.down
        try:
            out, self.status, self.started, end = self.parser.feed(
                data, down.keep_alive and not down.server.draining
            )
        except http1.BadResponse as exc:
            parser = self.parser
            self.status = parser.status
            self.started = parser.started
            _write(down.transport, parser.take() or b"")
            if exc.gateway:
                self._bad_head()
            else:
                log.debug("upstream %s: %s", self.state.endpoint.key, exc.detail)
                self._broken()
            return
        if out is not None:
            # Everything one read produced for the client goes out in one write: a syscall
            # costs as much as all the Python around it.
            t = down.transport
            if t is not None and not t.is_closing():
                t.write(out)
        if end:
            if end & END_UPGRADED:
                self._upgrade(data[self.parser.upgrade_at :])
            else:
                self._complete(end)
                # The response's bytes are out: now let the request go on.
                done = self.done
                self.done = None
                if done is not None:
                    done(self.pending)

    # Exchange

    def start(
        self, down: Downstream, req: Request, done: Callable[[Outcome], None], *, discard_5xx: bool
    ) -> None:
        """Send the request head (and the body so far) and wire the body stream."""
        self.down = down
        self.req = req
        self.done = done
        self.status = 0
        self.started = False
        self.first_byte = 0.0
        head = req.head
        if down.writing_paused:
            self.transport.pause_reading()  # the client still has not taken the last response
        data = self.parser.start(
            head, down.client_ip_bytes, self.state.host_header, discard_5xx=discard_5xx
        )
        upgrade = head.upgrade is not None
        if req.ended and not req.body and not req.replay and not upgrade:
            self.transport.write(data)  # no body, or none left to send: the common case
            return
        chunked = head.chunked
        parts = [data]
        for piece in req.replay:
            parts.append(http1.chunk(piece) if chunked else piece)
        pending = req.body
        if pending:
            for piece in pending:
                parts.append(http1.chunk(piece) if chunked else piece)
                self._keep(req, piece)
            req.body = ()
            req.buffered = 0
        if req.ended and chunked:
            parts.append(http1.LAST_CHUNK)
        # Bytes a client sent after an Upgrade head wait for the 101 (see _upgrade): sent
        # now, a peer that declines the upgrade would read them as a second request.
        self.transport.write(b"".join(parts) if len(parts) > 1 else data)
        if not req.ended:
            req.sink = self
            if head.expect_continue and not req.continue_sent:
                req.continue_sent = True
                _write(down.transport, http1.CONTINUE)
            down.buffer_full = False
            down.apply_flow()

    @staticmethod
    def _keep(req: Request, piece: bytes) -> None:
        if req.replayable:
            if req.replay:
                req.replay.append(piece)
            else:
                req.replay = [piece]
            if sum(map(len, req.replay)) > REPLAY_MAX_BYTES:
                req.replayable = False
                req.replay = ()

    def send_body(self, data: bytes) -> None:
        req = self.req
        _write(self.transport, http1.chunk(data) if req.head.chunked else data)
        self._keep(req, data)

    def end_body(self) -> None:
        if self.req.head.chunked:
            _write(self.transport, http1.LAST_CHUNK)

    def _finish(self, outcome: Outcome) -> None:
        """Tell the request how this exchange ended (once)."""
        done = self.done
        req = self.req
        if req is not None and req.sink is self:
            req.sink = None
        self.done = None
        if done is not None:
            done(outcome)

    def _complete(self, end: int) -> None:
        """The response ended (``end``: the reader's END_* bits): settle keep-alive, detach,
        and keep the outcome for after the flush."""
        status = self.status
        down = self.down
        req = self.req
        body_sent = req.ended
        if end & END_CLIENT_CLOSE:
            down.keep_alive = False
        if not body_sent:
            down.keep_alive = False  # the upstream answered before the body ended
        if self.started:
            req.status = status
        # Bytes no response explains (a second response in the same write, a body longer
        # than declared) mean the connection is in no known state: it is not pooled.
        self.reusable = self.reusable and body_sent and end & END_REUSABLE != 0
        if req.sink is self:
            req.sink = None
        self.down = None
        self.req = None
        self.pending = Outcome.OK if status < 500 else Outcome.from_status(status)

    def _complete_at_close(self) -> None:
        req = self.req
        if req is not None:
            req.status = self.status
            if req.sink is self:
                req.sink = None
        self.down = None
        self.req = None
        self._finish(Outcome.OK)

    def _bad_head(self) -> None:
        """A response head not to forward: the peer failed as a gateway (502, close)."""
        self.reusable = False
        self._finish(Outcome.GATEWAY)
        self.close()

    def _broken(self) -> None:
        self.reusable = False
        if self.started and self.down is not None:
            self.down.abort()
        self._finish(Outcome.RESET)
        self.close()

    def _upgrade(self, rest: bytes) -> None:
        down = self.down
        req = self.req
        req.status = 101
        pending = req.tunnel_data
        self.upgraded = True
        self.reusable = False
        self._finish(Outcome.OK)
        down.start_tunnel(self)
        if rest:
            _write(down.transport, rest)
        if pending and self.transport is not None:
            req.tunnel_data = b""
            _write(self.transport, pending)  # the new protocol's first bytes, now the peer agreed

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


# Downstream connection


class Downstream(asyncio.Protocol):
    """One client connection: parse requests, run them one at a time, keep alive.

    The common case runs without a task: the request is routed, an idle upstream
    connection taken and the head written from ``data_received``; the response completes
    from the upstream's ``data_received``. A task takes over only when the request needs
    to wait: a new upstream connection, or a retry.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.client_ip_bytes = b""
        self.reader = http1.RequestReader(self, server.wanted_headers)
        self.queue: deque[Request] = deque()
        self.current: Request | None = None
        self.keep_alive = True
        self.closed = False
        # Reading from the client pauses while either holds: the upstream's write buffer
        # is full, or we hold too much (request body with no upstream yet, pipelining).
        self.upstream_full = False
        self.buffer_full = False
        self.reading_paused = False
        self.writing_paused = False  # the client's transport asked us to stop writing
        self.upstream: Upstream | None = None
        self.tunnel: Upstream | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0
        # When the head being read began (time.monotonic()); 0 = none in progress. The
        # server's sweep answers 408 to a head that takes longer than its header timeout.
        self.head_since = 0.0
        self.busy = False
        # The exchange in flight on the fast path.
        self._x: _Exchange | None = None
        # Answered and half-closed: the client's bytes are dropped until it closes or
        # LINGER_SECONDS pass (see _linger).
        self.lingering: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<Downstream {self.client_ip} busy={self.busy} queued={len(self.queue)}>"

    # asyncio callbacks

    def connection_made(self, transport) -> None:
        self.transport = transport
        server = self.server
        if len(server.connections) >= server.max_connections and not server.reap_idle():
            # Over the limit and no idle connection to close instead: close this one at
            # once, before any state is kept for it.
            server.stats.connections_refused += 1
            self.closed = True
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.client_ip_bytes = self.client_ip.encode()
        server.connection_opened(self)
        self.head_since = time.monotonic()  # the first head is timed from the connection's start
        self._arm_idle()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.lingering is not None:
            self.lingering.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.tunnel is not None:
            self.tunnel.close()
        up = self.upstream
        if up is not None and up.done is not None:
            up.abort()  # the client left mid-exchange; the upstream connection is unusable
        if not self.busy:
            self.server.connection_finished(self)

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:
            return  # answered already: what follows is dropped
        if self.tunnel is not None:
            self.idle_since = self.loop.time()
            t = self.tunnel.transport
            if t is not None and not t.is_closing():
                t.write(data)
            return
        cur = self.current or (self.queue[-1] if self.queue else None)
        if cur is not None and cur.head.upgrade is not None and cur.ended:
            # An upgrade in progress: these bytes belong to the new protocol, and are held
            # until the peer answers 101 (never sent to a peer that may decline it).
            cur.tunnel_data += data
            if len(cur.tunnel_data) > MAX_TUNNEL_PENDING_BYTES:
                self.abort()
            return
        reader = self.reader
        try:
            offset = reader.feed(data)
        except http1.BadRequest as exc:
            self._reject(exc.status)
            return
        if reader.in_head and not self.head_since:
            self.head_since = time.monotonic()  # a later request's head began in this read
        if offset is not None:
            # The head of an Upgrade request ended: the rest is the new protocol's.
            req = self.queue[-1] if self.queue else self.current
            if req is not None:
                req.tunnel_data += data[offset:]
        if self.queue and not self.busy:
            self._next()

    def eof_received(self):
        if self.lingering is not None or (self.current is None and not self.queue):
            return False
        self.keep_alive = False
        return True  # half-close: finish the response in flight, then close

    def pause_writing(self) -> None:
        # The client is not taking its bytes: stop reading the peer that sends them. The
        # state is kept, for an exchange that starts while it lasts (Upstream.start) and
        # for a connection that goes back to the pool meanwhile (_settle).
        self.writing_paused = True
        up = self.upstream or self.tunnel
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        up = self.upstream or self.tunnel
        if up is not None and up.transport is not None and not up.transport.is_closing():
            up.transport.resume_reading()

    # Parser sink

    def on_request(self, head: http1.RequestHead, ended: bool) -> None:
        self.head_since = 0.0
        req = Request(head)
        req.ended = ended
        self.queue.append(req)
        if self.busy or len(self.queue) > 1:
            self.buffer_full = True  # pipelined: one at a time
            self.apply_flow()

    def on_body(self, data: bytes) -> None:
        req = self.queue[-1] if self.queue else self.current
        if req is None:
            return
        sink = req.sink
        if sink is not None:
            sink.send_body(data)
            return
        if req.body:
            req.body.append(data)
        else:
            req.body = [data]
        req.buffered += len(data)
        if req.buffered > BODY_BUFFER_BYTES:
            self.buffer_full = True
            self.apply_flow()

    def on_request_end(self) -> None:
        req = self.queue[-1] if self.queue else self.current
        if req is None:
            return
        req.ended = True
        sink = req.sink
        if sink is not None:
            req.sink = None
            sink.end_body()

    # Flow control

    def apply_flow(self) -> None:
        want = self.upstream_full or self.buffer_full
        if want == self.reading_paused:
            return
        t = self.transport
        if t is None or t.is_closing():
            return
        self.reading_paused = want
        if want:
            t.pause_reading()
        else:
            t.resume_reading()

    # Timers

    def _arm_idle(self) -> None:
        """One timer per connection, re-armed when it fires: no timer work per request."""
        timeout = self.server.idle_timeout
        if timeout > 0:
            self.idle_since = self.loop.time()
            self._idle_timer = self.loop.call_later(timeout, self._on_idle_timeout)

    def _on_idle_timeout(self) -> None:
        timeout = self.server.idle_timeout
        if self.busy or self.queue or self.closed:
            left = timeout
        else:
            left = self.idle_since + timeout - self.loop.time()
            if left <= 0:
                self._idle_timer = None
                self.close()
                return
        self._idle_timer = self.loop.call_later(left, self._on_idle_timeout)

    def header_timeout(self) -> None:
        """Called by the server's sweep: the head did not arrive in time. 408, close."""
        self.head_since = 0.0
        self.server.count_local(408)
        _write(self.transport, http1.error_response(408))
        self.keep_alive = False
        self._linger()  # the client may still be sending its head

    # Closing

    def _reject(self, status: int) -> None:
        """A malformed request: answer and close (the stream cannot be trusted)."""
        self.server.count_local(status)
        started = self.upstream is not None and self.upstream.started
        if self.transport is not None and not self.transport.is_closing() and not started:
            self.transport.write(http1.error_response(status))
        self.keep_alive = False
        if self.upstream is not None:
            self.upstream.abort()
        self._linger()

    def _linger(self) -> None:
        """After an error answer: send the end of the stream and drop what still comes, so
        the client reads the answer before the connection closes (see LINGER_SECONDS)."""
        t = self.transport
        if t is None or t.is_closing() or self.lingering is not None:
            return
        if not t.can_write_eof():
            self.close()
            return
        self.lingering = self.loop.call_later(LINGER_SECONDS, self._end_linger, t)
        if self.reading_paused:
            self.reading_paused = False
            t.resume_reading()  # the bytes must be read to be dropped
        t.write_eof()
        # Nothing more is written: everything that writes to the client checks for a
        # transport, and the transport itself stays with the timer (or closes at EOF).
        self.transport = None

    @staticmethod
    def _end_linger(t: asyncio.Transport) -> None:
        if not t.is_closing():
            t.close()

    def start_tunnel(self, up: Upstream) -> None:
        self.tunnel = up
        self.upstream = None
        self.server.stats.upgrades += 1
        self.buffer_full = False
        self.apply_flow()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # Running requests

    def _next(self) -> None:
        """Start the next queued request (called when idle and one is queued)."""
        while self.queue and not self.busy and not self.closed:
            req = self.queue.popleft()
            self.current = req
            self.busy = True
            try:
                self._start(req)
            except Exception:
                log.exception("request from %s failed", self.client_ip)
                self.abort()
                self._done(req)

    def _start(self, req: Request) -> None:
        head = req.head
        server = self.server
        if server.access_log:
            req.t0 = time.monotonic()
        cluster = server.single or server.route(head)
        if cluster is None:
            self._local(req, 404)
            self._done(req)
            return
        cfg = cluster.config
        key_hash = None
        if cluster.hashed:
            name = cluster.hash_header
            # The common case (a header) is one native call; the rest, the general extractor.
            key_hash = head.key_hash(name) if name is not None else None
            if key_hash is None and cfg.hash_on:
                found = extract(
                    cfg.hash_on, headers=head.picked, url=head.url, client_ip=self.client_ip
                )
                if found is not None:
                    key_hash = hash_key(found[1])
            if key_hash is None:
                cluster.stats.random_picks += 1
        tries = 1 + cfg.retries
        home = cluster.home(key_hash) if key_hash is not None else -1
        if home >= 0:
            view = cluster.view
            pick = None  # made only if a retry needs the rest of the hash order
        else:
            choice = cluster.choose(key_hash, tries)
            if choice is None:
                self._local(req, 503, cluster=cluster, headers=RETRY_AFTER)
                self._done(req)
                return
            view, pick = choice
            home = pick.order[0]
        now = time.monotonic()
        cluster.budget.on_request(now)
        x = _Exchange(cluster, view, pick, home, req, now + cfg.request_timeout, tries, key_hash)
        state = view.states[home]
        up = state.take_idle(now, cfg.pool_idle_expiry) if head.upgrade is None else None
        if up is None:
            self._spawn(x, 0)  # connect first: that waits, so a task runs it
            return
        # Fast path: an idle connection to the home endpoint. No task, no future.
        x.attempt = 1
        x.state = state
        x.up = up
        x.t0 = now
        state.active += 1
        self.upstream = up
        self._x = x
        if server.access_log:
            req.endpoint = state.endpoint.key
        # No timer per request: the server's deadline sweep (every DEADLINE_TICK) checks
        # ``try_deadline`` of the exchanges in flight.
        if cfg.per_try_timeout:
            x.try_deadline = min(x.deadline, now + cfg.per_try_timeout)
        discard = x.n_tries > 1 and head.method in _IDEMPOTENT
        up.start(self, req, self._fast_done, discard_5xx=discard)

    def check_deadline(self, now: float) -> None:
        """Called by the server's sweep: time out the exchange in flight if it is late."""
        x = self._x
        if x is not None and now >= x.try_deadline:
            self._fast_timeout(x)

    def _fast_timeout(self, x: _Exchange) -> None:
        up = x.up
        if up is None or up.done is None:
            return
        up.done = None
        self._fast_done(Outcome.TIMEOUT)

    def _fast_done(self, outcome: Outcome) -> None:
        x = self._x
        if x is None:
            return
        self._x = None
        try:
            outcome = x.outcome = self._settle(x, outcome)
            up = x.up
            self.upstream = None
            if outcome is Outcome.OK or self.closed or (up is not None and up.started):
                self._done(x.req)
                return
            self._spawn(x, x.attempt)  # a retry may follow: the task decides and waits
        except Exception:
            log.exception("request from %s failed", self.client_ip)
            self.abort()
            self._done(x.req)

    def _settle(self, x: _Exchange, outcome: Outcome) -> Outcome:
        """After a try: cancel its timer, return or close its connection, record it."""
        if x.timer is not None:
            x.timer.cancel()
            x.timer = None
        up = x.up
        state = x.state
        state.active -= 1
        now = time.monotonic()
        if outcome is Outcome.TIMEOUT:
            up.abort()
            if up.started:
                self.abort()
            req = x.req
            if not req.ended and req.head.upgrade is None and not self.upstream_full:
                # The body stopped arriving while the peer was ready to read it: the
                # client was slow, not the peer (nginx client_body_timeout → 408).
                state.counters.record(0, 0.0, False, False)
                return Outcome.CLIENT_TIMEOUT
        elif up.reusable and up.done is None and not up.upgraded:
            if self.writing_paused and up.transport is not None:
                up.transport.resume_reading()  # paused for this client, not for the next
            state.put_idle(up, now, x.cluster.config.pool_max_idle)
        elif not up.upgraded:
            up.close()
        if outcome is Outcome.OK and up.status >= 500:
            outcome = Outcome.from_status(up.status)
        return self._record(x.cluster, state, outcome, x.t0, up, now)

    def _spawn(self, x: _Exchange, tried: int) -> None:
        self.loop.create_task(self._slow(x, tried))

    async def _slow(self, x: _Exchange, tried: int) -> None:
        """The rest of a request that must wait: connects and retries."""
        try:
            await self._tries(x, tried)
        except Exception:
            log.exception("request from %s failed", self.client_ip)
            self.abort()
        finally:
            self._done(x.req)

    async def _tries(self, x: _Exchange, tried: int) -> None:
        cluster = x.cluster
        cfg = cluster.config
        req = x.req
        head = req.head
        outcome = Outcome.CONNECT_FAILED
        up = x.up
        while True:
            if tried:
                if self.closed:
                    return
                if up is not None and up.started:
                    return  # the response (a 5xx) went to the client
                outcome = x.outcome
                if time.monotonic() >= x.deadline or not should_retry(
                    outcome,
                    method=head.method,
                    status=up.status if up is not None else 0,
                    attempt=tried,
                    max_retries=cfg.retries,
                    replayable=req.replayable and head.upgrade is None,
                ):
                    break
                if x.view is not cluster.view:
                    x.view, x.order = cluster.reroute(x.view, x.order, tried, x.key_hash, x.tries)
                    x.pick = Pick(x.order, key_hash=x.key_hash)  # whole: nothing to add
                    x.n_tries = len(x.order)
                if tried >= x.n_tries:
                    break
                if tried >= len(x.order):
                    if x.pick is None:
                        x.pick = Pick(x.order, key_hash=x.key_hash, partial=True)
                    x.order = cluster.rest(x.view, x.pick, x.tries)
                    if tried >= len(x.order):
                        break
                if not cluster.budget.try_acquire(time.monotonic()):
                    cluster.stats.retries_denied += 1
                    break
                cluster.stats.retries += 1
            x.attempt = tried + 1
            state = x.view.states[x.order[tried]]
            x.outcome = await self._try(x, state)
            tried += 1
            up = x.up
            if x.outcome is Outcome.OK or self.closed:
                return
        if self.closed:
            return
        if outcome is Outcome.TIMEOUT:
            self._local(req, 504, cluster=cluster)
        elif outcome is Outcome.CLIENT_TIMEOUT:
            self._local(req, 408, cluster=cluster)
        elif outcome is Outcome.GATEWAY:
            self._local(req, 503 if up is None else (up.status or 502), cluster=cluster)
        else:
            self._local(req, 502, cluster=cluster)

    async def _try(self, x: _Exchange, state: EndpointState) -> Outcome:
        """One try at one endpoint; returns its outcome and records it."""
        cfg = x.cluster.config
        t0 = time.monotonic()
        x.up = None
        req = x.req
        up = state.take_idle(t0, cfg.pool_idle_expiry) if req.head.upgrade is None else None
        if up is None:
            state.active += 1  # a connect in progress counts as load (least_request)
            try:
                up = await self._connect(state, cfg.connect_timeout, x.deadline - t0)
            except (TimeoutError, OSError):
                return self._record(x.cluster, state, Outcome.CONNECT_FAILED, t0)
            finally:
                state.active -= 1
            if self.closed:
                up.close()
                return Outcome.RESET
        fut: asyncio.Future[Outcome] = self.loop.create_future()

        def done(outcome: Outcome) -> None:
            if not fut.done():
                fut.set_result(outcome)

        self._begin_slow(x, state, up, t0, done)
        outcome = await fut
        self.upstream = None
        return self._settle(x, outcome)

    def _begin_slow(self, x, state, up, now, done) -> None:
        cfg = x.cluster.config
        x.state = state
        x.up = up
        x.t0 = now
        state.active += 1
        self.upstream = up
        if self.server.access_log:
            x.req.endpoint = state.endpoint.key
        timeout = x.deadline - now
        if cfg.per_try_timeout:
            timeout = min(timeout, cfg.per_try_timeout)

        def expire() -> None:
            if up.done is not None:
                up.done = None
                done(Outcome.TIMEOUT)

        x.timer = self.loop.call_later(max(0.0, timeout), expire)
        discard = x.attempt < x.n_tries and x.req.head.method in _IDEMPOTENT
        up.start(self, x.req, done, discard_5xx=discard)

    def _done(self, req: Request) -> None:
        """The request is over: keep the connection for the next one, or close it."""
        if self.server.access_log:
            self._log_access(req)
        self.busy = False
        self.current = None
        self.upstream = None
        if self.tunnel is not None:
            return
        if self.closed:
            self.server.connection_finished(self)
            return
        if (
            not (self.keep_alive and req.head.keep_alive and req.ended)
            or req.head.upgrade is not None
            or self.server.draining
        ):
            # Finished only in connection_lost: the transport may still hold the end of the
            # response for a slow reader, and a draining server must not exit before it is
            # written.
            self.close()
            return
        if self.upstream_full or self.buffer_full or self.reading_paused:
            self.upstream_full = self.buffer_full = False
            self.apply_flow()
        self.idle_since = self.loop.time()
        if self.queue:
            self._next()

    def _log_access(self, req: Request) -> None:
        head = req.head
        access_log.info(
            '%s "%s %s HTTP/%s" %d %s %.1fms',
            self.client_ip,
            head.method.decode("latin-1"),
            head.url.decode("latin-1"),
            head.version,
            req.status,
            req.endpoint or "-",
            (time.monotonic() - req.t0) * 1000,
        )

    def _record(
        self,
        cluster: Cluster,
        state: EndpointState,
        outcome: Outcome,
        t0: float,
        up: Upstream | None = None,
        now: float = 0.0,
    ) -> Outcome:
        """Count a finished try (natively, one call) and tell the outlier detector."""
        if not now:
            now = time.monotonic()
        status = up.status if up is not None else 0
        latency = (up.first_byte or now) - t0 if status else None
        # The client left and we cut the upstream: a reset that is not the endpoint's fault.
        ours = self.closed and outcome is Outcome.RESET
        state.counters.record(
            status,
            latency or 0.0,
            status != 0 and up.started,
            outcome is not Outcome.OK and not ours,
        )
        if ours:
            return outcome
        events = cluster.detector.record(state.endpoint.key, outcome, now, latency)
        if events:
            cluster.apply(events)
        return outcome

    async def _connect(self, state: EndpointState, connect_timeout: float, left: float) -> Upstream:
        ep = state.endpoint
        async with asyncio.timeout(max(0.0, min(connect_timeout, left))):
            _, up = await self.loop.create_connection(lambda: Upstream(state), ep.host, ep.port)
        sock = up.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return up

    def _local(
        self,
        req: Request,
        status: int,
        *,
        cluster: Cluster | None = None,
        headers: tuple[bytes, ...] = (),
    ) -> None:
        """Answer from the LB itself. Close unless the request was fully read."""
        req.status = status
        self.server.count_local(status)
        if cluster is not None:
            cluster.stats.local[status] = cluster.stats.local.get(status, 0) + 1
        close = not req.ended or not req.head.keep_alive or self.server.draining
        if close:
            self.keep_alive = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(
                http1.error_response(status, close=close, headers=headers, version=req.head.version)
            )


class _Exchange:
    """A request's routing and progress across its tries."""

    __slots__ = (
        "cluster", "view", "pick", "req", "deadline", "tries", "n_tries", "order", "attempt",
        "state", "up", "t0", "timer", "outcome", "try_deadline", "key_hash",
    )  # fmt: skip

    def __init__(
        self, cluster, view, pick, home: int, req: Request, deadline: float, tries: int, key_hash
    ) -> None:
        self.cluster = cluster
        self.view = view
        # None: the key's usable home (Cluster.home) was the whole decision, the same as a
        # partial Pick of that one endpoint.
        self.pick = pick
        self.req = req
        self.deadline = deadline
        self.tries = tries
        self.key_hash: int | None = key_hash
        n = len(view.states)
        if pick is not None:
            self.order = pick.order
            self.n_tries = min(tries, n) if pick.partial and n > 1 else len(pick.order)
        else:
            self.order = (home,)
            self.n_tries = min(tries, n) if tries > 1 and n > 1 else 1
        self.attempt = 0
        self.state: EndpointState | None = None
        self.up: Upstream | None = None
        self.t0 = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.outcome = Outcome.CONNECT_FAILED
        self.try_deadline = deadline


_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
