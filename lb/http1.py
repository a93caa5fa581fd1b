"""HTTP/1.1 framing. Both ways it is the native core's (``native/src/http``): httparse for the
grammar, and on top of it every framing and smuggling rule, the chunked decoder, the head
sent upstream and the head the client gets. What remains here: the small responses and
framing pieces the proxy writes itself.

Bytes in, calls out: a :class:`RequestReader` is fed bytes and calls its sink's
``on_request(head, ended)`` (``ended``: no body follows), ``on_body(data)`` and
``on_request_end()``; it raises :class:`BadRequest` with the status to answer. A
:class:`ResponseReader` serves one upstream connection: ``start(head, …)`` returns the
request head to send upstream and readies the reader for its response; ``feed(data, …)``
returns, for each read from the peer, the bytes the client gets (one write: the head
rebuilt, the body passed on) and what ended (the ``END_*`` bits), or raises
:class:`BadResponse`.

Rejections follow nginx and Envoy (RFC 9112 §6.1, §6.3 on request smuggling):
Content-Length with Transfer-Encoding → 400; several Content-Length → 400; a
Transfer-Encoding other than ``chunked`` → 501; Transfer-Encoding in HTTP/1.0 → 400;
bad chunk → 400; obs-fold, bare LF or whitespace before the colon → 400; HTTP/0.9 or
garbage → 400. ``THREAT_MODEL.md`` lists each with its reason.
"""

from __future__ import annotations

from mesh_native import (
    END_CLIENT_CLOSE,
    END_COMPLETE,
    END_REUSABLE,
    END_UPGRADED,
    BadRequest,
    BadResponse,
    RequestHead,
    RequestReader,
    ResponseReader,
)

__all__ = [
    "END_CLIENT_CLOSE",
    "END_COMPLETE",
    "END_REUSABLE",
    "END_UPGRADED",
    "BadRequest",
    "BadResponse",
    "RequestHead",
    "RequestReader",
    "ResponseReader",
]

REASONS = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    400: b"Bad Request",
    408: b"Request Timeout",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def error_response(
    status: int, *, close: bool = True, headers: tuple[bytes, ...] = (), version: str = "1.1"
) -> bytes:
    """A small complete response the proxy itself sends (400, 502, 503, …)."""
    reason = REASONS.get(status, b"Error")
    body = b"%d %s\n" % (status, reason)
    extra = b"".join(h + b"\r\n" for h in headers)
    conn = b"Connection: close\r\n" if close else b""
    proto = b"HTTP/1.1" if version == "1.1" else b"HTTP/1.0"
    return (
        b"%s %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s%sVia: 1.1 mesh\r\n\r\n%s"
        % (proto, status, reason, len(body), conn, extra, body)
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
