"""THE REFERENCE, not the data path: mesh's first request reader, in Python on httptools.

The LB reads requests with the native core (native/src/http). This module is kept only as
the oracle of the differential test (tests/unit/test_lb_http1_differential.py): the same
bytes through both must give the same requests, bodies, upstream heads and refusals, except
where the native reader is stricter or more exact on purpose (listed in that test).

Original description follows.

HTTP/1.1 framing on httptools (llhttp): limits, smuggling guards, head building.

Bytes in, calls out: a :class:`RequestReader` is fed bytes and calls its sink's
``on_request(head)``, ``on_body(data)``, ``on_request_end()``; it raises
:class:`BadRequest` with the status to answer. Heads to send are built here as one bytes
object each, so the shell does one ``transport.write`` per head.

Rejections follow nginx and Envoy (RFC 9112 §6.1, §6.3 on request smuggling):
Content-Length with Transfer-Encoding → 400; several Content-Length → 400; a
Transfer-Encoding other than ``chunked`` → 501; Transfer-Encoding in HTTP/1.0 → 400;
bad chunk → 400; obs-fold or whitespace before the colon → 400; HTTP/0.9 or garbage → 400.
"""

from __future__ import annotations

import httptools
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

# RFC 9110 §7.6.1 hop-by-hop fields, plus the de-facto ones (keep-alive, proxy-connection).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
CONNECTION_PLAIN = frozenset({b"close", b"keep-alive", b"upgrade"})


def drop_named(lines: list[bytes], names: frozenset[bytes]) -> list[bytes]:
    """Remove the fields a Connection header names (RFC 9110 §7.6.1); ``lines`` come in
    fours: name, ': ', value, CRLF."""
    out: list[bytes] = []
    for k in range(0, len(lines), 4):
        if lines[k].lower() not in names:
            out += lines[k : k + 4]
    return out


# Limits. Each has a reason.
MAX_HEADER_BYTES = 64 * 1024  # the whole head; Envoy 60 KiB, nginx 4 × 8 KiB, h11 16 KiB
MAX_HEADERS = 100  # Envoy's max_headers_count default
MAX_REQUEST_LINE_BYTES = 8 * 1024  # nginx large_client_header_buffers (8 KiB) → 414

# Request fields the proxy rewrites itself.
REWRITTEN = frozenset(
    {b"content-length", b"expect", b"x-forwarded-proto", b"x-forwarded-host", b"via"}
)

VIA = b"1.1 mesh"


class BadRequest(Exception):
    """The request cannot be served; answer ``status`` and close the connection."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class RequestHead:
    """A parsed request head.

    ``lines`` holds the fields to forward as they will be sent (name, ": ", value, CRLF),
    built while parsing so the upstream head is one join; hop-by-hop and rewritten fields
    are noted instead. ``picked`` holds ``(lower name, value)`` of the fields the router
    asked for (hash keys).
    """

    __slots__ = (
        "method",
        "url",
        "version",
        "lines",
        "picked",
        "n_headers",
        "content_length",
        "chunked",
        "keep_alive",
        "upgrade",
        "expect_continue",
        "host",
        "hosts",
        "xff",
        "via",
        "connection_tokens",
    )

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.version = "1.1"
        self.lines: list[bytes] = []
        self.picked: list[tuple[bytes, bytes]] = []
        self.n_headers = 0
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.upgrade: bytes | None = None
        self.expect_continue = False
        self.host = b""
        self.hosts = 0  # Host field lines seen: RFC 9112 §3.2 wants exactly one in HTTP/1.1
        self.xff = b""
        self.via = b""
        self.connection_tokens: frozenset[bytes] = frozenset()

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def __repr__(self) -> str:
        return f"<RequestHead {self.method.decode()} {self.url[:60].decode('latin-1')}>"


# Request fields not forwarded as they came: hop-by-hop ones, those the proxy rewrites,
# and the ones it reads on the way (Host is read and forwarded).
_REQ_SPECIAL = HOP_BY_HOP | REWRITTEN | {b"host", b"x-forwarded-for"}
# Fields a client's Connection header may not remove: Host is end to end and routing reads
# it (a `Connection: Host` would otherwise forward a request without one).
CONNECTION_PROTECTED = frozenset({b"host"})


class RequestReader:
    """Drive httptools for one downstream connection; call the sink; enforce limits."""

    __slots__ = (
        "_sink",
        "_parser",
        "_pending",
        "_head_bytes",
        "_fed",
        "in_head",
        "_line_done",
        "_wanted",
        "_lengths",
        "_chunked",
        "_moved",
        "_quiet",
    )

    def __init__(self, sink, wanted: frozenset[bytes] = frozenset()) -> None:
        self._sink = sink
        self._wanted = wanted
        # Lengths of the names looked at; other fields are forwarded without lower-casing.
        self._lengths = frozenset(map(len, _REQ_SPECIAL | wanted))
        self._parser = httptools.HttpRequestParser(self)
        self._pending = RequestHead()
        self._head_bytes = 0  # request line and fields parsed so far
        self._fed = 0  # bytes fed while a head was incomplete (a field may be half-parsed)
        self.in_head = False  # a head has begun and not ended
        self._line_done = False
        # In a chunked body: bytes fed since body data last came out. Chunk extensions and
        # trailer fields produce none, and httptools grows a field by concatenation:
        # unbounded, a client could make one trailer cost quadratic time and memory.
        self._chunked = False
        self._moved = False
        self._quiet = 0

    def feed(self, data: bytes) -> int | None:
        """Parse bytes. Returns None, or the offset where an upgraded stream starts."""
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            return int(exc.args[0])
        except HttpParserCallbackError as exc:
            if isinstance(exc.__context__, BadRequest):
                raise exc.__context__ from None
            raise BadRequest(400, str(exc)) from None
        except HttpParserError as exc:
            # llhttp refuses "chunked, gzip" (chunked not last) itself: still a transfer
            # coding we do not implement, so 501 as for any other.
            status = 501 if "Invalid `Transfer-Encoding`" in str(exc) else 400
            raise BadRequest(status, str(exc)) from None
        if self.in_head:
            # A head still incomplete after this read: bound what it may still grow to.
            if not self._line_done and b"\n" in data:
                self._line_done = True  # the request line ended; a field is in progress
            self._fed += len(data)
            if not self._line_done and self._fed > MAX_REQUEST_LINE_BYTES:
                raise BadRequest(414, "request line too long")
            if self._fed > MAX_HEADER_BYTES + MAX_REQUEST_LINE_BYTES:
                raise BadRequest(431, "header section too large")
        elif self._chunked:
            if self._moved:
                self._moved = False
                self._quiet = 0
            else:
                self._quiet += len(data)
                if self._quiet > MAX_HEADER_BYTES:
                    raise BadRequest(431, "chunk extensions or trailer section too large")
        return None

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.in_head = True
        self._line_done = False
        self._head_bytes = self._fed = 0
        self._pending = RequestHead()

    def on_url(self, url: bytes) -> None:
        head = self._pending
        head.url += url
        self._head_bytes += len(url)
        if len(head.url) > MAX_REQUEST_LINE_BYTES:
            raise BadRequest(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a chunked trailer: dropped (not forwarded)
        head = self._pending
        self._line_done = True
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEADER_BYTES:
            raise BadRequest(431, "header section too large")
        head.n_headers += 1
        if head.n_headers > MAX_HEADERS:
            raise BadRequest(431, "too many header fields")
        if len(name) not in self._lengths:
            head.lines += (name, b": ", value, b"\r\n")  # neither special nor wanted
            return
        lname = name.lower()
        if lname in self._wanted:
            head.picked.append((lname, value))
        if lname not in _REQ_SPECIAL:
            head.lines += (name, b": ", value, b"\r\n")
            return
        if lname == b"host":
            head.hosts += 1
            if head.hosts > 1:
                raise BadRequest(400, "several Host fields")  # RFC 9112 §3.2
            head.host = value
            head.lines += (name, b": ", value, b"\r\n")
        elif lname == b"content-length":
            if head.content_length is not None:
                raise BadRequest(400, "several Content-Length fields")
            if not value.isdigit():
                raise BadRequest(400, "bad Content-Length")
            head.content_length = int(value)
        elif lname == b"transfer-encoding":
            if head.chunked or value.strip().lower() != b"chunked":
                raise BadRequest(501, "only Transfer-Encoding: chunked is implemented")
            head.chunked = True
        elif lname == b"connection":
            head.connection_tokens = frozenset(
                t.strip().lower() for t in value.split(b",") if t.strip()
            )
        elif lname == b"upgrade":
            head.upgrade = value
        elif lname == b"expect" and value.lower() == b"100-continue":
            head.expect_continue = True
        elif lname == b"x-forwarded-for":
            head.xff = head.xff + value + b", "
        elif lname == b"via":
            head.via = head.via + value + b", "

    def on_headers_complete(self) -> None:
        head = self._pending
        p = self._parser
        head.version = p.get_http_version()
        if head.version not in ("1.1", "1.0"):
            raise BadRequest(400, f"HTTP/{head.version} is not supported")
        if head.chunked and head.content_length is not None:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        if head.chunked and head.version == "1.0":
            raise BadRequest(400, "Transfer-Encoding in HTTP/1.0")
        head.method = p.get_method()
        if head.method == b"CONNECT":
            # A reverse proxy is no tunnel: Envoy and nginx refuse it too. The bytes behind
            # it would otherwise be read as the tunnel's, and the connection would stall.
            raise BadRequest(405, "CONNECT is not served")
        if head.url[:1] != b"/" and head.url != b"*":
            _absolute_form(head)
        elif head.version == "1.1" and head.hosts == 0:
            raise BadRequest(400, "HTTP/1.1 request without Host")  # RFC 9112 §3.2
        head.keep_alive = p.should_keep_alive()
        if head.upgrade is not None and b"upgrade" not in head.connection_tokens:
            head.upgrade = None  # RFC 9110 §7.8: Upgrade counts only when Connection names it
        self.in_head = False
        self._chunked = head.chunked
        self._quiet = 0
        self._sink.on_request(head)

    def on_body(self, data: bytes) -> None:
        self._moved = True
        self._sink.on_body(data)

    def on_message_complete(self) -> None:
        self._chunked = False
        self._sink.on_request_end()


def _absolute_form(head: RequestHead) -> None:
    """RFC 9112 §3.2.2: with an absolute-form target, its authority replaces any Host field,
    and the request goes upstream in origin form."""
    scheme, sep, rest = head.url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise BadRequest(400, "request target is neither origin-form nor absolute-form")
    authority, slash, path = rest.partition(b"/")
    query = b""
    if b"?" in authority:  # http://host?q — no path, a query
        authority, _, query = authority.partition(b"?")
        query = b"?" + query
    if not authority or b"@" in authority or any(c in authority for c in b" \t"):
        raise BadRequest(400, "bad authority in the request target")
    head.url = (b"/" + path if slash else b"/") + query
    if head.hosts:
        head.lines = drop_named(head.lines, frozenset({b"host"}))
    head.host = authority
    head.hosts = 1
    head.lines += (b"Host", b": ", authority, b"\r\n")


def build_upstream_head(
    head: RequestHead, client_ip: bytes, *, upgrade: bool = False, default_host: bytes = b""
) -> bytes:
    """The request head sent upstream: hop-by-hop fields removed (and those the client's
    Connection names), X-Forwarded-* and Via added, Host kept, body framing re-declared."""
    lines = head.lines
    tokens = head.connection_tokens
    if tokens and not tokens <= CONNECTION_PLAIN:
        lines = drop_named(lines, tokens - CONNECTION_PLAIN - CONNECTION_PROTECTED)
    host = head.host
    out = [head.method, b" ", head.url, b" HTTP/1.1\r\n", *lines]
    if not host:
        # HTTP/1.0 without Host: take the authority of an absolute URL, if any.
        if head.url.startswith(b"http://"):
            host = head.url[7:].split(b"/", 1)[0]
        # HTTP/1.1 requires Host (RFC 9112 §3.2): the upstream's address, as nginx does.
        out += (b"Host: ", host or default_host, b"\r\n")
    out += (b"X-Forwarded-For: ", head.xff, client_ip, b"\r\nX-Forwarded-Proto: http\r\n")
    if host:
        out += (b"X-Forwarded-Host: ", host, b"\r\n")
    out += (b"Via: ", head.via, VIA, b"\r\n")
    if upgrade:
        out += (b"Connection: upgrade\r\nUpgrade: ", head.upgrade or b"", b"\r\n\r\n")
    elif head.chunked:
        out.append(b"Transfer-Encoding: chunked\r\n\r\n")
    elif head.content_length is not None:
        out += (b"Content-Length: ", b"%d" % head.content_length, b"\r\n\r\n")
    else:
        out.append(b"\r\n")
    return b"".join(out)
