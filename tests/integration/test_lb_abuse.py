"""Abuse of the LB's front door, checked on both sides of it.

- A request-smuggling corpus sent on raw sockets: each case is answered like nginx and
  Envoy answer it, and a raw-socket upstream that records every byte shows what was
  forwarded: nothing for a rejected request, exactly one well-framed request for an
  accepted one (never a second request hidden in the first).
- Random and mutated request bytes on thousands of connections: the LB keeps serving, its
  tasks go back to the baseline and its memory stays flat.
- Slow clients: a thousand slowloris connections are closed by the header timeout while
  normal clients keep their latency.

Every load is bounded in count and time; the only timing assertion is the slowloris
behaviour check (normal clients' p99 within 2× of an unloaded run, measured in the same
test).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field

import httptools
import pytest

from lb.endpoints import Endpoint
from tests.integration.test_lb_support import (
    LBProcess,
    StreamPeer,
    backends,
    lb_in_process,
    read_response,
)

# A raw-socket upstream that records bytes


@dataclass
class Forwarded:
    """One request as the upstream parsed it."""

    method: bytes = b""
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False

    def values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]


class _Conn:
    """httptools callbacks for one upstream connection of the recorder."""

    def __init__(self, rec: Recorder, writer: asyncio.StreamWriter) -> None:
        self.rec = rec
        self.writer = writer
        self.parser = httptools.HttpRequestParser(self)
        self.cur = Forwarded()

    def on_message_begin(self) -> None:
        self.cur = Forwarded()
        self.rec.requests.append(self.cur)

    def on_url(self, url: bytes) -> None:
        self.cur.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.cur.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.cur.method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        self.cur.body += body

    def on_message_complete(self) -> None:
        self.cur.complete = True
        self.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # A server that does not do upgrades answers the request as a plain one and
            # goes on reading requests: what a smuggled request after it would meet.
            self.cur.complete = True
            self.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            self.parser = httptools.HttpRequestParser(self)
            self.feed(data[int(exc.args[0]) :])


class Recorder(StreamPeer):
    """Upstream on a raw socket: keeps every byte and every request it parsed, answers
    ``200 ok`` to each complete request. Framing errors are recorded, never raised."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.requests: list[Forwarded] = []
        self.errors: list[str] = []
        self.connections = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = _Conn(self, writer)
        try:
            while data := await reader.read(65536):
                self.raw += data
                conn.feed(data)
        except httptools.HttpParserError as exc:
            self.errors.append(repr(exc))
        except ConnectionError:
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def recorder_and_lb(**cfg):
    rec = await Recorder().start()
    try:
        async with lb_in_process([rec.endpoint], retries=0, hash_on=(), **cfg) as lb:
            yield rec, lb
    finally:
        await rec.stop()


async def exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data``, half-close, read until the LB closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        writer.write(data)
        writer.write_eof()
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
    except ConnectionResetError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return out


def statuses(out: bytes) -> list[int]:
    """Status codes of every response in ``out`` (bodies here never hold a status line)."""
    return [int(line.split(b" ")[1]) for line in out.split(b"\r\n") if line.startswith(b"HTTP/1.")]


async def settled(lb, timeout: float = 5.0) -> None:
    """Until the LB has no client connection left (every request it took is over)."""
    async with asyncio.timeout(timeout):
        while lb.server.connections:
            await asyncio.sleep(0.01)


# The smuggling corpus


def req(head: bytes, body: bytes = b"") -> bytes:
    return head.replace(b"\n", b"\r\n") + b"\r\n" + body


CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"

# (id, bytes, status). Each is refused before anything is forwarded.
REJECTED = [
    # Both framings, either order, or framing repeated
    ("cl-te", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: 5\nTransfer-Encoding: chunked\n", CHUNKED_HELLO), 400),
    ("te-cl", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\nContent-Length: 5\n", CHUNKED_HELLO), 400),
    ("cl-duplicate-same", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: 5\nContent-Length: 5\n", b"hello"), 400),
    ("cl-conflicting", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: 5\nContent-Length: 6\n", b"hello!"), 400),
    ("cl-list", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: 5, 5\n", b"hello"), 400),
    ("cl-plus-sign", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: +5\n", b"hello"), 400),
    ("cl-negative", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: -5\n", b"hello"), 400),
    ("cl-hex", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: 0x5\n", b"hello"), 400),
    ("cl-inner-space", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: 1 0\n", b"hello"), 400),
    ("cl-vertical-tab", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: 5\x0b\n", b"hello"), 400),
    ("cl-overflow", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: 99999999999999999999999\n", b"hello"), 400),
    ("te-chunked-identity", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked, identity\n", CHUNKED_HELLO), 501),
    ("te-identity-cl", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: identity\nContent-Length: 5\n", b"hello"), 501),
    ("te-identity", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: identity\n", b"hello"), 501),
    ("te-twice", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\nTransfer-Encoding: chunked\n", CHUNKED_HELLO), 501),
    ("te-xchunked", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: xchunked\n", CHUNKED_HELLO), 501),
    ("te-trailing-comma", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked,\n", CHUNKED_HELLO), 501),
    ("te-leading-comma", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: ,chunked\n", CHUNKED_HELLO), 501),
    ("te-gzip-chunked", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: gzip, chunked\n", CHUNKED_HELLO), 501),
    # Transfer-Encoding spelled so that two parsers could disagree on it
    ("te-vertical-tab-after", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\x0b\n", CHUNKED_HELLO), 400),
    ("te-vertical-tab-before", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: \x0bchunked\n", CHUNKED_HELLO), 400),
    ("te-form-feed", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\x0c\n", CHUNKED_HELLO), 400),
    ("te-tabs", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding:\tchunked\t\n", CHUNKED_HELLO), 400),
    ("te-space-before-colon", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding : chunked\nContent-Length: 5\n", b"hello"), 400),
    ("te-obs-fold", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding:\n chunked\n", CHUNKED_HELLO), 400),
    ("te-http10", req(b"POST / HTTP/1.0\nTransfer-Encoding: chunked\n", CHUNKED_HELLO), 400),
    # Chunk framing
    ("chunk-size-overflow", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"ffffffffffffffffffff5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-17-digits", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"10000000000000005\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-negative", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"-5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-0x", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-space", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"5 \r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-not-hex", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"zz\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-bare-lf", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"5;ext\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-data-too-long", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"5\r\nhelloXX\r\n0\r\n\r\n"), 400),
    ("chunk-bare-lf", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"5\nhello\n0\n\n"), 400),
    ("chunk-trailer-bare-lf", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n"), 400),
    ("trailer-content-length", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n"), 400),
    ("trailer-transfer-encoding", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n"), 501),
    # Line endings and folding
    ("bare-lf", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare-lf-request-line", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    ("bare-cr-request-line", b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
    ("bare-cr-in-field", b"GET / HTTP/1.1\r\nHost: a\rX-A: b\r\n\r\n", 400),
    ("obs-fold-space", req(b"GET / HTTP/1.1\nHost: a\nX-A: b\n c\n"), 400),
    ("obs-fold-tab", req(b"GET / HTTP/1.1\nHost: a\nX-A: b\n\tc\n"), 400),
    # Control bytes and malformed field lines
    ("nul-in-name", req(b"GET / HTTP/1.1\nHost: a\nX-\x00A: b\n"), 400),
    ("nul-in-value", req(b"GET / HTTP/1.1\nHost: a\nX-A: b\x00c\n"), 400),
    ("soh-in-value", req(b"GET / HTTP/1.1\nHost: a\nX-A: b\x01c\n"), 400),
    ("esc-in-value", req(b"GET / HTTP/1.1\nHost: a\nX-A: b\x1bc\n"), 400),
    ("del-in-value", req(b"GET / HTTP/1.1\nHost: a\nX-A: b\x7fc\n"), 400),
    ("soh-in-name", req(b"GET / HTTP/1.1\nHost: a\nX\x01A: b\n"), 400),
    ("space-in-name", req(b"GET / HTTP/1.1\nHost: a\nX A: b\n"), 400),
    ("space-before-colon", req(b"GET / HTTP/1.1\nHost: a\nX-A : b\n"), 400),
    ("no-colon", req(b"GET / HTTP/1.1\nHost: a\nXA\n"), 400),
    ("empty-name", req(b"GET / HTTP/1.1\nHost: a\n: b\n"), 400),
    # Request line
    ("nul-in-target", req(b"GET /a\x00b HTTP/1.1\nHost: a\n"), 400),
    ("space-in-target", req(b"GET /a b HTTP/1.1\nHost: a\n"), 400),
    ("tab-in-target", req(b"GET /a\tb HTTP/1.1\nHost: a\n"), 400),
    ("lower-case-method", req(b"get / HTTP/1.1\nHost: a\n"), 400),
    ("lower-case-version", req(b"GET / http/1.1\nHost: a\n"), 400),
    ("http-1.2", req(b"GET / HTTP/1.2\nHost: a\n"), 400),
    ("http-0.9", b"GET /\r\n\r\n", 400),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("tls-hello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),
    # Sizes: a target over 8 KiB, a field line over 64 KiB, more than 100 fields
    ("target-9000", req(b"GET /" + b"a" * 9000 + b" HTTP/1.1\nHost: a\n"), 414),
    ("field-line-70000", req(b"GET / HTTP/1.1\nHost: a\nX-A: " + b"a" * 70_000 + b"\n"), 431),
    ("fields-101", req(b"GET / HTTP/1.1\n" + b"".join(b"X-%d: v\n" % i for i in range(100)) + b"Host: a\n"), 431),
    # An ambiguous request with a second one pipelined behind it, and one in front of it
    ("cl-te-then-pipelined", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: 6\nTransfer-Encoding: chunked\n", b"0\r\n\r\n" + SMUGGLED), 400),
    ("te-identity-then-pipelined", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: identity\nContent-Length: 40\n", SMUGGLED), 501),
    ("good-then-cl-te-same-read", req(b"GET /first HTTP/1.1\nHost: a\n") + req(b"POST / HTTP/1.1\nHost: a\nContent-Length: 6\nTransfer-Encoding: chunked\n", b"0\r\n\r\n" + SMUGGLED), 400),
]  # fmt: skip


@dataclass(frozen=True)
class Accepted:
    """A request the LB takes: the upstream must get exactly this one request."""

    id: str
    data: bytes
    method: bytes = b"GET"
    url: bytes = b"/"
    body: bytes = b""


ACCEPTED = [
    Accepted("te-upper-case", req(b"POST / HTTP/1.1\nHost: a\nTRANSFER-ENCODING: CHUNKED\n", CHUNKED_HELLO), b"POST", body=b"hello"),
    Accepted("te-spaces", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding:   chunked  \n", CHUNKED_HELLO), b"POST", body=b"hello"),
    Accepted("chunk-extensions", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b'5;ext=1;q="x y"\r\nhello\r\n0;last\r\n\r\n'), b"POST", body=b"hello"),
    Accepted("chunk-trailer", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"), b"POST", body=b"hello"),
    Accepted("chunk-size-upper-hex", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"A\r\nhellohello\r\n0\r\n\r\n"), b"POST", body=b"hellohello"),
    Accepted("cl-leading-zeros", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: 0005\n", b"hello"), b"POST", body=b"hello"),
    Accepted("cl-body-holds-a-request", req(b"POST / HTTP/1.1\nHost: a\nContent-Length: %d\n" % len(SMUGGLED), SMUGGLED), b"POST", body=SMUGGLED),
    Accepted("get-body-holds-a-request", req(b"GET / HTTP/1.1\nHost: a\nContent-Length: %d\n" % len(SMUGGLED), SMUGGLED), body=SMUGGLED),
    Accepted("chunked-body-holds-a-request", req(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)), b"POST", body=SMUGGLED),
    Accepted("connection-names-content-length", req(b"POST / HTTP/1.1\nHost: a\nConnection: close, Content-Length\nContent-Length: 5\n", b"hello"), b"POST", body=b"hello"),
    Accepted("connection-names-transfer-encoding", req(b"POST / HTTP/1.1\nHost: a\nConnection: Transfer-Encoding\nTransfer-Encoding: chunked\n", CHUNKED_HELLO), b"POST", body=b"hello"),
    Accepted("http10-content-length", req(b"POST / HTTP/1.0\nHost: a\nContent-Length: 5\n", b"hello"), b"POST", body=b"hello"),
    Accepted("obs-text-value", req(b"GET / HTTP/1.1\nHost: a\nX-A: caf\xc3\xa9 \xff\n")),
    Accepted("leading-empty-lines", b"\r\n\r\n" + req(b"GET / HTTP/1.1\nHost: a\n")),
    Accepted("asterisk-form", req(b"OPTIONS * HTTP/1.1\nHost: a\n"), b"OPTIONS", b"*"),
    Accepted("target-8000", req(b"GET /" + b"a" * 7999 + b" HTTP/1.1\nHost: a\n"), url=b"/" + b"a" * 7999),
    Accepted("fields-100", req(b"GET / HTTP/1.1\n" + b"".join(b"X-%d: v\n" % i for i in range(99)) + b"Host: a\n")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "status"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED]
)
async def test_smuggling_corpus_rejected_and_nothing_forwarded(data, status):
    async with recorder_and_lb() as (rec, lb):
        out = await exchange(lb.port, data)
        await settled(lb)
        assert statuses(out) == [status], out[:300]
        head = out.partition(b"\r\n\r\n")[0]
        assert b"Connection: close" in head and len(out) < 400
        assert rec.connections == 0 and bytes(rec.raw) == b"", bytes(rec.raw[:300])
        assert lb.server.stats.local == {status: 1}


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
async def test_smuggling_corpus_accepted_as_exactly_one_request(case: Accepted):
    async with recorder_and_lb() as (rec, lb):
        out = await exchange(lb.port, case.data)
        await settled(lb)
        assert statuses(out) == [200], out[:300]
        assert out.endswith(b"\r\n\r\nok")
        assert rec.errors == []
        [got] = rec.requests  # one request upstream, never a second one hidden in it
        assert got.complete
        assert (got.method, got.url, got.body) == (case.method, case.url, case.body)
        # Framed one way only, re-declared by the LB.
        cl, te = got.values(b"content-length"), got.values(b"transfer-encoding")
        assert len(cl) + len(te) <= 1, got.headers
        assert te in ([], [b"chunked"])
        if case.body:
            assert cl == [b"%d" % len(case.body)] or te == [b"chunked"]
        # Nothing after that request on the upstream connection: re-parsed from the raw
        # bytes, the stream holds one message and ends on its boundary.
        again = Recorder()
        conn = _Conn(again, _NullWriter())
        conn.feed(bytes(rec.raw))
        assert len(again.requests) == 1 and again.requests[0].complete
        assert conn.parser.get_method() == case.method  # no message begun after it


class _NullWriter:
    def write(self, data: bytes) -> None:
        pass


async def test_good_request_then_ambiguous_one_on_the_same_connection():
    """The first is served; the second, pipelined in a later read, is refused alone."""
    async with recorder_and_lb() as (rec, lb):
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(req(b"GET /first HTTP/1.1\nHost: a\n"))
        async with asyncio.timeout(5):
            status, _, body = await read_response(reader)
        assert (status, body) == (200, b"ok")
        writer.write(
            req(
                b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\nContent-Length: 6\n",
                b"0\r\n\r\n" + SMUGGLED,
            )
        )
        async with asyncio.timeout(5):
            rest = await reader.read()
        writer.close()
        await settled(lb)
        assert statuses(rest) == [400]
        assert [r.url for r in rec.requests] == [b"/first"]
        assert lb.server.stats.local == {400: 1}


def test_corpus_size():
    """The figures the suite reports: cases tried, by outcome."""
    ids = [c[0] for c in REJECTED] + [c.id for c in ACCEPTED]
    assert len(ids) == len(set(ids))
    assert len(REJECTED) >= 60 and len(ACCEPTED) >= 15


# The last case is two requests: split after the first head it is the test below.
SPLIT = [c for c in REJECTED if c[0] != "good-then-cl-te-same-read"]


@pytest.mark.one_loop
@pytest.mark.parametrize(("data", "status"), [c[1:] for c in SPLIT], ids=[c[0] for c in SPLIT])
async def test_smuggling_corpus_split_after_the_head(data, status):
    """The head in one read, the rest in another: a head that was valid may already be on
    its way upstream when the body turns out bad, but the upstream never gets a complete
    request, and the client gets the same answer."""
    cut = data.find(b"\r\n\r\n") + 4 if b"\r\n\r\n" in data else len(data) // 2
    async with recorder_and_lb() as (rec, lb):
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(data[:cut])
        await writer.drain()
        await asyncio.sleep(0.05)
        out = b""
        try:
            writer.write(data[cut:])
            writer.write_eof()
            async with asyncio.timeout(5):
                while chunk := await reader.read(65536):
                    out += chunk
        except ConnectionError:
            pass
        writer.close()
        await settled(lb)
        await asyncio.sleep(0.05)
        assert statuses(out) == [status], out[:300]
        assert not any(r.complete for r in rec.requests), bytes(rec.raw[:300])


# Random and mutated bytes

NORMAL = [
    req(b"GET /f?q=1 HTTP/1.1\nHost: a\nX-User: u1\nCookie: sid=1\n"),
    req(b"POST /f HTTP/1.1\nHost: a\nContent-Length: 5\n", b"hello"),
    req(b"POST /f HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n", CHUNKED_HELLO),
    req(b"GET /ws HTTP/1.1\nHost: a\nConnection: Upgrade\nUpgrade: websocket\n"),
    req(b"POST /f HTTP/1.1\nHost: a\nExpect: 100-continue\nContent-Length: 5\n", b"hello"),
    req(b"GET /f HTTP/1.0\n"),
    req(b"GET /a HTTP/1.1\nHost: a\n") + req(b"GET /b HTTP/1.1\nHost: a\n"),
]
SEEDS = NORMAL + [c[1] for c in REJECTED] + [c.data for c in ACCEPTED]
SPECIAL = [b"\r", b"\n", b"\r\n", b":", b" ", b"\t", b"\x00", b",", b";", b"0", b"f" * 20, b"\xff"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four random edits of a seed request."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip a byte
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1:  # insert a byte that means something to HTTP
            b[i:i] = rng.choice(SPECIAL)
        elif op == 2:  # delete a slice
            del b[i : i + rng.randint(1, 16)]
        elif op == 3:  # repeat a slice (duplicated fields, doubled framing)
            j = rng.randrange(len(b) + 1)
            lo, hi = min(i, j), max(i, j)
            b[hi:hi] = b[lo:hi][:4096]
        elif op == 4:  # splice another seed in
            other = rng.choice(SEEDS)
            b[i:] = other[rng.randrange(len(other) + 1) :]
        elif op == 5:  # truncate
            del b[i:]
        else:  # random bytes in the middle
            b[i:i] = rng.randbytes(rng.randint(1, 64))
    return bytes(b)


FIELDS = [
    b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: 99", b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: identity", b"Connection: close", b"Connection: Upgrade, Host",
    b"Connection: keep-alive", b"Upgrade: websocket", b"Expect: 100-continue", b"Host: b",
    b"Host:", b"X-User: u2", b"Cookie: sid=2", b"Via: 1.0 x", b"X-Forwarded-For: 10.0.0.1",
    b"Trailer: X-T", b"TE: trailers", b"Keep-Alive: timeout=5",
]  # fmt: skip


def mutate_lines(rng: random.Random, data: bytes) -> bytes:
    """One to three edits at the line level: the request stays close to valid, so more of
    them get past the parser and reach routing, retries and the upstream."""
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(5)
        i = rng.randrange(1, len(lines) + 1)
        if op == 0:
            lines.insert(i, rng.choice(FIELDS))
        elif op == 1 and len(lines) > 1:
            lines.insert(i, lines[rng.randrange(1, len(lines))])  # a duplicated field
        elif op == 2 and len(lines) > 1:
            del lines[rng.randrange(1, len(lines))]
        elif op == 3 and len(lines) > 1:
            k = rng.randrange(1, len(lines))
            name, colon, value = lines[k].partition(b":")
            lines[k] = (
                rng.choice([name.upper(), name.lower()])
                + colon
                + rng.choice([value, b" " + value + b" ", value + b",", b"\t" + value.strip()])
            )
        else:
            body = rng.choice([b"", b"hello", CHUNKED_HELLO, SMUGGLED, body + body])
    return b"\r\n".join(lines) + (sep or b"\r\n\r\n") + body


def fuzz_input(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.2:
        return rng.randbytes(rng.randint(1, 2048))
    if r < 0.6:
        return mutate_lines(rng, rng.choice(SEEDS))
    return mutate(rng, rng.choice(SEEDS))


@dataclass
class FuzzRun:
    connections: int = 0
    bytes_sent: int = 0
    answered: int = 0  # got at least one response
    hung: list[bytes] = field(default_factory=list)  # not closed by the LB in time
    malformed: list[bytes] = field(default_factory=list)  # a reply that is not HTTP


async def fuzz(port: int, n: int, *, seed: int, concurrency: int = 50) -> FuzzRun:
    """``n`` connections, each sent a fuzz input in one to three writes and half-closed."""
    rng = random.Random(seed)
    run = FuzzRun()
    inputs = [fuzz_input(rng) for _ in range(n)]
    splits = [sorted(rng.randrange(len(d) + 1) for _ in range(rng.randint(0, 2))) for d in inputs]
    sem = asyncio.Semaphore(concurrency)

    async def one(data: bytes, cuts: list[int]) -> None:
        async with sem:
            run.connections += 1
            run.bytes_sent += len(data)
            out = b""
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                last = 0
                for cut in [*cuts, len(data)]:
                    writer.write(data[last:cut])
                    await writer.drain()
                    last = cut
                writer.write_eof()
                async with asyncio.timeout(8):
                    while chunk := await reader.read(65536):
                        out += chunk
            except TimeoutError:
                run.hung.append(data)
            except OSError:
                pass  # the LB reset it (ECONNRESET, ENOTCONN): a refusal is an answer
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            if out:
                run.answered += 1
                if not out.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")):
                    run.malformed.append(data)

    await asyncio.gather(*(one(d, c) for d, c in zip(inputs, splits, strict=True)))
    return run


def _lb_tasks() -> list[asyncio.Task]:
    """Tasks running the LB's own code (the LB's background loops and request tasks)."""
    out = []
    for t in asyncio.all_tasks():
        code = getattr(t.get_coro(), "cr_code", None)
        if code is not None and f"{os.sep}lb{os.sep}" in code.co_filename:
            out.append(t)
    return out


async def _get_ok(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(req(b"GET /after HTTP/1.1\nHost: a\nConnection: close\n"))
    async with asyncio.timeout(5):
        status, _, _ = await read_response(reader)
    writer.close()
    assert status == 200


FUZZ_CONNECTIONS = 5000  # per loop: 10,000 over the two loops


async def test_fuzz_in_process_no_crash_no_leaked_task(caplog):
    caplog.set_level(logging.ERROR)
    async with backends(2) as bs, lb_in_process(bs, request_timeout=2.0) as lb:
        await _get_ok(lb.port)
        baseline = {t.get_coro().__qualname__ for t in _lb_tasks()}
        assert baseline == {"Server._maintain", "Server._deadlines"}
        t0 = time.monotonic()
        run = await fuzz(lb.port, FUZZ_CONNECTIONS, seed=7)
        took = time.monotonic() - t0
        await _get_ok(lb.port)
        await settled(lb)
        async with asyncio.timeout(5):
            while len(_lb_tasks()) > len(baseline):
                await asyncio.sleep(0.02)
        print(
            f"fuzz: {run.connections} connections, {run.bytes_sent} bytes, {run.answered}"
            f" answered, {len(run.hung)} hung, {sum(len(b.seen) for b in bs)} forwarded,"
            f" in {took:.1f} s; local answers"
            f" {dict(sorted(lb.server.stats.local.items()))}"
        )
        assert run.hung == [] and run.malformed == []
        assert {t.get_coro().__qualname__ for t in _lb_tasks()} == baseline
        assert all(st.active == 0 for st in lb.cluster.view.states)
        errors = [r for r in caplog.records if r.name.startswith(("lb", "mesh"))]
        assert errors == [], errors[0].getMessage()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.one_loop
async def test_fuzz_lb_process_keeps_serving_and_memory_flat():
    async with (
        backends(2) as bs,
        LBProcess("--endpoints", ",".join(b.key for b in bs), "--request-timeout", "2") as lb,
    ):
        await _get_ok(lb.http_port)
        warm = await fuzz(lb.http_port, 1000, seed=11)  # caches and free lists fill up
        before = _rss_kib(lb.proc.pid)
        run = await fuzz(lb.http_port, 5000, seed=12)
        await _get_ok(lb.http_port)
        after = _rss_kib(lb.proc.pid)
        grew_mib = (after - before) / 1024
        print(
            f"fuzz (process): {warm.connections + run.connections} connections,"
            f" {warm.bytes_sent + run.bytes_sent} bytes; RSS {before // 1024} → {after // 1024} MiB"
        )
        assert lb.proc.returncode is None
        assert run.hung == [] and run.malformed == []
        assert grew_mib < 4, f"RSS grew {grew_mib:.1f} MiB over 5,000 fuzz connections"
        assert not any("Traceback" in line for line in lb.log), "".join(lb.log)
    assert lb.proc.returncode == 0


# Slow clients


async def _timed_gets(port: int, n: int, *, workers: int = 4, gap: float = 0.025) -> list[float]:
    """``n`` GETs, each on a new connection (where slow clients would hurt: accepting and
    holding connections), ``workers`` at a time; returns each one's latency. Any failure
    raises."""
    latencies: list[float] = []
    per_worker = n // workers

    async def worker(w: int) -> None:
        for i in range(per_worker):
            t0 = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /n%d-%d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % (w, i))
            async with asyncio.timeout(10):
                status, _, _ = await read_response(reader)
            latencies.append(time.perf_counter() - t0)
            writer.close()
            assert status == 200
            await asyncio.sleep(gap)

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return latencies


def _p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


async def _metrics(admin: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    reader, writer = await asyncio.open_connection(*admin.removeprefix("http://").split(":"))
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(5):
        raw = await reader.read(-1)
    writer.close()
    text = raw.partition(b"\r\n\r\n")[2].decode()
    return {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if not s.labels
    }


SLOWLORIS = 1000
SLOW_HEAD = b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 64


@pytest.mark.slow
@pytest.mark.one_loop
async def test_slowloris_does_not_slow_normal_clients_and_is_closed_by_header_timeout():
    """1,000 connections sending one header byte every 2 s: every normal client is answered
    while they are held, none waits on a slow one (each answer comes long before the header
    timeout could have freed anything), and the header timeout (5 s) answers each slow one
    408. The latencies are printed beside the unloaded run's; their ratio is perf's to judge,
    not a test's."""
    from tests.integration.test_lb_support import BackendProcess

    loop = asyncio.get_running_loop()
    procs = [await BackendProcess(f"p{i}").start() for i in range(2)]
    slow: list[socket.socket] = []
    try:
        eps = ",".join(p.key for p in procs)
        async with LBProcess("--endpoints", eps, "--header-timeout", "5") as lb:
            await _timed_gets(lb.http_port, 40)  # warm: upstream pools, caches
            unloaded = await _timed_gets(lb.http_port, 400)
            for _ in range(SLOWLORIS):
                s = socket.socket()
                s.setblocking(False)
                await loop.sock_connect(s, ("127.0.0.1", lb.http_port))
                slow.append(s)
            opened = time.monotonic()

            async def drip() -> None:
                # Each connection sends a byte every 2 s, on its own phase as independent
                # attackers would: 20 connections every 40 ms, not all 1,000 at one instant.
                group = 20
                for i in range(len(SLOW_HEAD)):
                    for k in range(0, len(slow), group):
                        for s in slow[k : k + group]:
                            with contextlib.suppress(OSError):
                                s.send(SLOW_HEAD[i : i + 1])
                        await asyncio.sleep(2.0 * group / len(slow))

            dripper = asyncio.create_task(drip())
            try:
                async with asyncio.timeout(10):  # connected = in the backlog; accepted soon after
                    while (m := await _metrics(lb.admin))["mesh_lb_client_connections"] < SLOWLORIS:
                        await asyncio.sleep(0.05)
                loaded = await _timed_gets(lb.http_port, 400)
                measured_for = time.monotonic() - opened
                m = await _metrics(lb.admin)
                assert m["mesh_lb_header_timeouts_total"] == 0  # all still open while measured

                async def answer(s: socket.socket) -> bytes:
                    try:
                        async with asyncio.timeout(10):
                            out = b""
                            while chunk := await loop.sock_recv(s, 4096):
                                out += chunk
                        s.close()  # the LB ended the stream: the client closes, as clients do
                        return out
                    except (TimeoutError, OSError):
                        return b""

                answers = await asyncio.gather(*(answer(s) for s in slow))
                closed_after = time.monotonic() - opened
            finally:
                dripper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dripper
            async with asyncio.timeout(5):  # closed as their clients close (or lingers end)
                while (m := await _metrics(lb.admin))["mesh_lb_client_connections"] > 1:
                    await asyncio.sleep(0.05)
            closed_408 = sum(a.startswith(b"HTTP/1.1 408 ") for a in answers)
            u, l99 = _p99(unloaded), _p99(loaded)
            print(
                f"slowloris: {SLOWLORIS} held, {closed_408} closed with 408 after"
                f" {closed_after:.1f} s; normal clients p99 {u * 1000:.2f} ms unloaded,"
                f" {l99 * 1000:.2f} ms loaded ({len(loaded)} requests in {measured_for:.1f} s)"
            )
            assert closed_408 == SLOWLORIS
            assert m["mesh_lb_header_timeouts_total"] == SLOWLORIS
            assert m["mesh_lb_client_connections"] <= 1
            # A server that served normal clients only as slow ones timed out would answer
            # them after the 5 s header timeout: half of it bounds every answer (room for a
            # SYN retransmit on a loaded machine, none for waiting on a slow client).
            assert len(loaded) == 400
            assert max(loaded) < 2.5, f"slowest normal client {max(loaded):.2f} s"
            await _timed_gets(lb.http_port, 20)
    finally:
        for s in slow:
            s.close()
        for p in procs:
            await p.kill()


# Misframed responses from an upstream

POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"
# (id, the upstream's answer to the first request, what the first client gets)
RESPONSES = [
    ("extra-response-same-write", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + POISON, 200),
    ("extra-bytes-after-body", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokPOISON", 200),
    ("body-on-204", b"HTTP/1.1 204 No Content\r\nContent-Length: 6\r\n\r\nPOISON", 204),
    ("interim-100-then-200", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200),
    ("cl-te", b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" + POISON, 502),
    ("two-cl", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 8\r\n\r\nokPOISON", 502),
    ("te-identity-cl", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nokPOISON", 502),
    ("cl-plus-sign", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nokPOISON", 502),
    ("nul-in-field", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", 502),
    ("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", 502),
    ("not-http", b"NOT HTTP AT ALL\r\n\r\n", 502),
]  # fmt: skip


@pytest.mark.parametrize(
    ("answer", "status"), [c[1:] for c in RESPONSES], ids=[c[0] for c in RESPONSES]
)
async def test_misframed_response_never_poisons_the_next_client(answer, status):
    """The first request gets the upstream's misframed answer (or 502 for one that cannot be
    framed); whatever followed it on that connection never reaches anyone: the next client
    gets its own clean response."""
    first = True
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal first, connections
        connections += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(
                    answer if first else b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean"
                )
                first = False
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, sock=socket.create_server(("127.0.0.1", 0)))
    port = srv.sockets[0].getsockname()[1]
    try:
        async with lb_in_process([Endpoint("127.0.0.1", port)], retries=0, hash_on=()) as lb:
            out = await exchange(lb.port, req(b"GET /1 HTTP/1.1\nHost: a\n"))
            assert statuses(out) == [status], out
            assert b"POISON" not in out
            for i in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
                writer.write(req(b"GET /%d HTTP/1.1\nHost: a\n" % (i + 2)))
                async with asyncio.timeout(5):
                    got = await read_response(reader)
                writer.close()
                assert got[0] == 200 and got[2] == b"clean"
            # A connection that carried a bad answer or stray bytes is not pooled; a
            # well-framed one is.
            assert connections == (1 if status == 200 and b"POISON" not in answer else 2)
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.one_loop
async def test_clients_that_never_read_hold_no_memory():
    """Twenty clients ask for 200 MB each and never read: back-pressure stops the upstream
    reads, the LB's memory stays flat, and other clients are served meanwhile."""
    from tests.integration.test_lb_support import BackendProcess

    proc = await BackendProcess("p").start()
    stalled = []
    try:
        async with LBProcess("--endpoints", proc.key) as lb:
            await _get_ok(lb.http_port)
            before = _rss_kib(lb.proc.pid)
            for i in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", lb.http_port)
                writer.write(b"GET /stream/200000000?c=%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
                writer.transport.pause_reading()
                stalled.append(writer)
            await asyncio.sleep(3.0)
            await _get_ok(lb.http_port)
            grew_mib = (_rss_kib(lb.proc.pid) - before) / 1024
            print(f"never-reading clients: 20 × 200 MB asked, LB RSS grew {grew_mib:.1f} MiB")
            assert grew_mib < 32
            for w in stalled:
                w.close()  # before the LB stops: its drain would wait for them
    finally:
        for w in stalled:
            w.close()
        await proc.kill()


async def test_fuzz_upstream_gets_exactly_the_requests_clients_were_answered_for():
    """Differential check over 4,000 fuzz inputs against the recording upstream: every
    complete request it parsed is one a client got its ``200 ok`` for, and the other way
    round; every request it got is framed one way only, and its byte stream never fails to
    parse. (Upgrade and CONNECT requests open tunnels, whose bytes are not requests: they
    are left out.)"""
    rng = random.Random(5)
    inputs: list[bytes] = []
    while len(inputs) < 4000:
        data = fuzz_input(rng)
        if b"upgrade" not in data.lower() and b"connect" not in data.lower():
            inputs.append(data)
    answered = 0
    sem = asyncio.Semaphore(50)

    async def one(data: bytes) -> None:
        nonlocal answered
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
            out = b""
            try:
                writer.write(data)
                writer.write_eof()
                async with asyncio.timeout(8):
                    while chunk := await reader.read(65536):
                        out += chunk
            except OSError:
                pass
            finally:
                writer.close()
            answered += out.count(b"\r\n\r\nok")

    async with recorder_and_lb(request_timeout=2.0) as (rec, lb):
        await asyncio.gather(*(one(d) for d in inputs))
        await settled(lb)
        complete = [r for r in rec.requests if r.complete]
        print(
            f"differential fuzz: {len(inputs)} inputs, {answered} answered by the upstream,"
            f" {len(complete)} complete upstream requests,"
            f" {len(rec.requests) - len(complete)} cut short (bodies that never ended)"
        )
        assert rec.errors == []
        assert len(complete) == answered
        for r in rec.requests:
            framing = r.values(b"content-length") + r.values(b"transfer-encoding")
            assert len(framing) <= 1, r.headers
