"""The native request reader against its reference, mesh's first reader (Python on httptools,
tests/reference/http1_reference.py): the same byte streams, split the same ways, must give
the same requests, bodies and upstream heads, or the same refusal.

Where the two differ on purpose, the generator stays off that ground, and the mutation test
only asks that the native reader is never laxer:
- a field value's trailing whitespace is not part of it (RFC 9112 §5.1): the native reader
  drops it, llhttp keeps it;
- `Content-Length:  5 ` (OWS around the digits) is 5 to the native reader, 400 to the reference;
- tokens of several `Connection` fields all count (the reference kept only the last field's);
- `GET  / HTTP/1.1` (two spaces) is refused by the native reader, accepted by llhttp;
- an empty `Upgrade` names no protocol: no upgrade to the native reader; the reference asked
  the upstream to upgrade to nothing;
- bytes after a request that closes the connection are dropped by the native reader; the
  reference refused them with a 400, while that request's response was still to come.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lb import http1
from tests.reference import http1_reference as ref

WANTED = frozenset({b"x-user", b"cookie"})


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_request(self, head, ended: bool = False) -> None:
        # The native reader says "ended" with the head; the reference calls on_request_end.
        self.events.append(("head", head))
        if ended:
            self.events.append(("end",))

    def on_body(self, data: bytes) -> None:
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)  # pieces may split anywhere
        else:
            self.events.append(("body", data))

    def on_request_end(self) -> None:
        self.events.append(("end",))


def _run(reader_cls, error_cls, upstream, chunks: list[bytes]):
    sink = Sink()
    reader = reader_cls(sink, WANTED)
    status = offset = None
    fed = 0
    for piece in chunks:
        try:
            off = reader.feed(piece)
        except error_cls as exc:
            status = exc.status
            break
        if off is not None:
            offset = fed + off
            break
        fed += len(piece)
    closing = [e for e in sink.events if e[0] == "head" and not e[1].keep_alive]
    if closing and sink.events[-1] == ("end",) and status == 400:
        status = None  # the reference's 400 after a closing request: see above
    out = []
    for ev in sink.events:
        if ev[0] == "head":
            h = ev[1]
            out.append(
                (
                    "head", h.method, h.url, h.version, h.host, list(h.picked), h.content_length,
                    h.chunked, h.keep_alive, h.upgrade, h.expect_continue, upstream(h),
                )
            )  # fmt: skip
        else:
            out.append(ev)
    return out, status, offset


def native(chunks):
    return _run(
        http1.RequestReader, http1.BadRequest,
        lambda h: h.upstream_head(b"10.1.2.3", upgrade=h.upgrade is not None, default_host=b"up:80"),
        chunks,
    )  # fmt: skip


def reference(chunks):
    return _run(
        ref.RequestReader, ref.BadRequest,
        lambda h: ref.build_upstream_head(
            h, b"10.1.2.3", upgrade=h.upgrade is not None, default_host=b"up:80"
        ),
        chunks,
    )  # fmt: skip


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)] or [b""]


token = st.text("abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=12)
value = st.text('abcdefghijklmnopqrstuvwxyzABC0123456789 -_.,;=/"()', min_size=0, max_size=20).map(
    lambda v: v.strip()
)
field = st.one_of(
    st.tuples(token.map(lambda t: "X-" + t), value),
    st.tuples(st.sampled_from(["X-User", "x-user", "Cookie", "Via", "X-Forwarded-For"]), value),
    st.tuples(st.sampled_from(["Keep-Alive", "TE", "Trailer", "Proxy-Authorization", "X-Forwarded-Proto", "Expect"]), value),
    st.tuples(st.just("Upgrade"), token),
    st.tuples(st.just("Connection"), st.sampled_from(["close", "keep-alive", "upgrade", "x-a, close", "Keep-Alive, X-Hop", "X-User"])),
)  # fmt: skip


@st.composite
def request(draw) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH"]))
    version = draw(st.sampled_from(["1.1", "1.1", "1.0"]))
    target = draw(
        st.one_of(
            st.just("/"),
            token.map(lambda t: f"/{t}?u={t}&x=1"),
            token.map(lambda t: f"http://{t}.example:8080/p?q"),
            st.just("*"),
        )
    )
    fields = draw(st.lists(field, max_size=6))
    connections = [f for f in fields if f[0] == "Connection"]
    fields = [f for f in fields if f[0] != "Connection"] + connections[:1]
    if version == "1.1" or draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), ("Host", draw(token)))
    body = draw(st.binary(max_size=40))
    framing = draw(
        st.sampled_from(["none", "length", "chunked"] if version == "1.1" else ["none", "length"])
    )
    tail = b""
    if framing == "length":
        fields.append(("Content-Length", str(len(body))))
        tail = body
    elif framing == "chunked":
        fields.append(("Transfer-Encoding", "chunked"))
        pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
        tail = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    head = f"{method} {target} HTTP/{version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields)
    return head.encode() + b"\r\n" + tail


@given(
    st.lists(request(), min_size=1, max_size=3),
    st.lists(st.integers(0, 10_000), max_size=6),
)
@settings(max_examples=400, deadline=None)
def test_the_native_reader_reads_what_the_reference_reads(requests, cuts):
    data = b"".join(requests)
    chunks = _split(data, cuts)
    assert native(chunks) == reference(chunks)


KNOWN_LAXER = (b" \r\n", b"\t\r\n", b"Connection", b"Upgrade:")  # the differences listed above


@given(
    request(),
    st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=3)), min_size=1, max_size=4),
    st.lists(st.integers(0, 10_000), max_size=4),
)  # fmt: skip
@settings(max_examples=600, deadline=None)
def test_mutated_requests_the_native_reader_is_never_laxer(data, edits, cuts):
    for at, insert in edits:
        at %= len(data) + 1
        data = data[:at] + insert + data[at + 1 :]
    chunks = _split(data, cuts)
    got, want = native(chunks), reference(chunks)
    if got == want:
        return
    n_out, n_status, _ = got
    r_out, r_status, _ = want
    if any(k in data for k in KNOWN_LAXER):
        return
    # A request the native reader took, the reference took the same way.
    heads = [e for e in n_out if e[0] == "head"]
    assert heads == [e for e in r_out if e[0] == "head"][: len(heads)], (data, got, want)
    if n_status is None:
        assert r_status is None, (data, got, want)
