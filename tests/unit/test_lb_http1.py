"""HTTP/1.1 framing core (the native reader): bytes in, heads and body out, limits, the
upstream head."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import http1
from lb.http1 import BadRequest, RequestReader


class Sink:
    def __init__(self) -> None:
        self.heads: list[http1.RequestHead] = []
        self.body = b""
        self.ends = 0

    def on_request(self, head, ended: bool) -> None:
        self.heads.append(head)
        self.ends += ended

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_request_end(self) -> None:
        self.ends += 1


def _feed(data: bytes, *, step: int | None = None, wanted=frozenset()) -> Sink:
    sink = Sink()
    reader = RequestReader(sink, wanted)
    if step is None:
        reader.feed(data)
    else:
        for i in range(0, len(data), step):
            reader.feed(data[i : i + step])
    return sink


POST = (
    b"POST /up?x=1 HTTP/1.1\r\nHost: app.example\r\nX-User: alice\r\n"
    b"Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nX-Forwarded-For: 203.0.113.9\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
)


def test_chunked_request_and_upstream_head():
    sink = _feed(POST, wanted=frozenset({b"x-user"}))
    [head] = sink.heads
    assert sink.body == b"hello world" and sink.ends == 1
    assert head.chunked and head.host == b"app.example" and head.picked == [(b"x-user", b"alice")]
    up = head.upstream_head(b"10.0.0.7").decode()
    lines = up.split("\r\n")
    assert lines[0] == "POST /up?x=1 HTTP/1.1"
    assert "Host: app.example" in lines and "X-User: alice" in lines
    assert "X-Forwarded-For: 203.0.113.9, 10.0.0.7" in lines
    assert "X-Forwarded-Proto: http" in lines and "X-Forwarded-Host: app.example" in lines
    assert "Via: 1.1 mesh" in lines and "Transfer-Encoding: chunked" in lines
    assert "X-Hop" not in up and "Connection" not in up and "X-Trailer" not in up
    assert up.endswith("\r\n\r\n")


@given(step=st.integers(min_value=1, max_value=len(POST)))
@settings(max_examples=60, deadline=None)
def test_any_split_gives_the_same_request(step):
    whole, split = _feed(POST), _feed(POST, step=step)
    assert split.body == whole.body and split.ends == 1
    assert split.heads[0].upstream_head(b"1.2.3.4") == whole.heads[0].upstream_head(b"1.2.3.4")


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_garbage_raises_only_bad_request(data):
    try:
        _feed(data)
    except BadRequest as exc:
        assert exc.status in (400, 414, 431, 501)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    ],
)
def test_limits(data, status):
    for step in (None, 7):
        with pytest.raises(BadRequest) as exc:
            _feed(data, step=step)
        assert exc.value.status == status


def test_http10_without_host_gets_the_upstream_address():
    sink = _feed(b"GET /x HTTP/1.0\r\n\r\n")
    head = sink.heads[0]
    assert not head.keep_alive
    up = head.upstream_head(b"1.2.3.4", default_host=b"10.0.0.1:80")
    assert b"Host: 10.0.0.1:80\r\n" in up and b"X-Forwarded-Host" not in up


def test_upgrade_only_when_connection_names_it():
    sink = _feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
    assert sink.heads[0].upgrade is None
    sink = Sink()
    offset = RequestReader(sink).feed(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nXYZ"
    )
    head = sink.heads[0]
    assert head.upgrade == b"websocket" and offset is not None
    up = head.upstream_head(b"1.2.3.4", upgrade=True)
    assert up.endswith(b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n")


def test_error_response_is_small_and_closes():
    out = http1.error_response(503, headers=(b"Retry-After: 1",))
    assert out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close\r\n" in out and b"Retry-After: 1\r\n" in out and len(out) < 200
