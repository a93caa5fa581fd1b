"""Request heads the LB must not forward as sent: Host rules (RFC 9112 §3.2), absolute-form
targets (§3.2.2), Connection naming Host, and CONNECT. What the client gets and what the
upstream received."""

from __future__ import annotations

from tests.integration.test_lb_abuse import exchange, recorder_and_lb, req, settled, statuses


async def _one(data: bytes):
    async with recorder_and_lb() as (rec, lb):
        out = await exchange(lb.port, data, timeout=3)
        await settled(lb)
        return out, rec


async def test_connection_header_cannot_remove_host():
    out, rec = await _one(req(b"GET / HTTP/1.1\nHost: a\nConnection: Host, X-Drop\nX-Drop: 1\n"))
    [r] = rec.requests
    assert r.values(b"host") == [b"a"], r.headers
    assert r.values(b"x-drop") == []  # other named fields still go
    assert statuses(out) == [200]


async def test_duplicate_host_is_400_and_nothing_forwarded():
    out, rec = await _one(req(b"GET / HTTP/1.1\nHost: a\nHost: b\n"))
    assert statuses(out) == [400] and rec.requests == [], bytes(rec.raw)


async def test_absolute_form_target_authority_replaces_host():
    out, rec = await _one(req(b"GET http://other.example/x?y=1 HTTP/1.1\nHost: a\n"))
    [r] = rec.requests
    assert r.url == b"/x?y=1" and r.values(b"host") == [b"other.example"], (r.url, r.headers)
    out, rec = await _one(req(b"GET http://other.example HTTP/1.1\n"))
    [r] = rec.requests
    assert r.url == b"/" and r.values(b"host") == [b"other.example"]


async def test_bad_absolute_form_targets_are_400():
    for target in (b"ftp://x/", b"http://user@x/", b"http:///nohost", b"x.example/a"):
        out, rec = await _one(req(b"GET %s HTTP/1.1\nHost: a\n" % target))
        assert statuses(out) == [400] and rec.requests == [], target


async def test_http11_without_host_is_400_http10_is_served():
    out, rec = await _one(req(b"GET / HTTP/1.1\n"))
    assert statuses(out) == [400] and rec.requests == []
    out, rec = await _one(req(b"GET / HTTP/1.0\n"))
    assert statuses(out) == [200] and len(rec.requests) == 1


async def test_connect_is_refused_and_the_connection_closed():
    data = req(b"CONNECT other.example:443 HTTP/1.1\nHost: other.example:443\n") + req(
        b"GET /next HTTP/1.1\nHost: a\n"
    )
    out, rec = await _one(data)
    assert statuses(out) == [405] and rec.requests == [], (out, bytes(rec.raw))


async def test_bytes_after_an_upgrade_head_wait_for_the_101():
    """A peer that declines the upgrade must not read the bytes behind the head as a second
    request (request smuggling through Upgrade)."""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: internal\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
    for upgrade in (b"websocket", b"h2c"):
        head = req(b"GET /ws HTTP/1.1\nHost: a\nConnection: Upgrade\nUpgrade: %s\n" % upgrade)
        out, rec = await _one(head + smuggled)
        assert [r.url for r in rec.requests] == [b"/ws"], (upgrade, bytes(rec.raw))
        assert b"/smuggled" not in bytes(rec.raw)
