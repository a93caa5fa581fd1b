"""The DNS server on loopback, asked by real clients: dig, c-ares (aiodns), dnspython."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import struct

import aiodns
import dns.asyncquery
import dns.asyncresolver
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from registry.model import Instance, Snapshot
from sidecar.dns_server import DnsServer, ZoneConfig, resolv_conf_upstream


def inst(name, address, port, **kw):
    return Instance(service="web", instance=name, address=address, port=port, **kw)


SNAP = Snapshot.of(
    [inst(f"w{n}", f"127.0.1.{n}", 8000 + n) for n in range(1, 4)]
    + [inst("v6", "fd00::7", 8007), inst("sick", "127.0.1.9", 8009, status="critical")]
)
MANY = Snapshot.of(inst(f"instance-{n:02d}", f"127.0.2.{n}", 9000 + n) for n in range(1, 41))


async def serve(snapshot=SNAP, **kw) -> DnsServer:
    server = DnsServer(ZoneConfig(), **kw)
    await server.start([("127.0.0.1", 0)])
    server.update(snapshot)
    await server.wait_rebuilt()
    return server


async def dig(server: DnsServer, *args: str) -> str:
    host, port = server.addresses[0]
    proc = await asyncio.create_subprocess_exec(
        "dig", f"@{host}", "-p", str(port), "+time=2", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def query(server, name, rdtype="A", *, tcp=False, **kw) -> dns.message.Message:
    host, port = server.addresses[0]
    q = dns.message.make_query(name, rdtype, **kw)
    if tcp:
        return await dns.asyncquery.tcp(q, host, port=port, timeout=3)
    return await dns.asyncquery.udp(q, host, port=port, timeout=3)


@pytest.fixture
async def server():
    s = await serve()
    yield s
    await s.close()


async def test_logs_the_real_port(caplog):
    caplog.set_level(logging.INFO, logger="sidecar.dns_server")
    s = await serve()
    try:
        port = s.addresses[0][1]
        assert port != 0
        assert f"listening dns=127.0.0.1:{port}" in [r.getMessage() for r in caplog.records]
    finally:
        await s.close()


async def test_dig_srv_and_a(server):
    out = await dig(server, "+short", "_web._tcp.service.mesh", "SRV")
    assert sorted(out.split("\n")[:-1]) == [
        "1 100 8001 w1.web.service.mesh.",
        "1 100 8002 w2.web.service.mesh.",
        "1 100 8003 w3.web.service.mesh.",
        "1 100 8007 v6.web.service.mesh.",
    ]
    out = await dig(server, "+short", "web.service.mesh", "A")
    assert sorted(out.split()) == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    out = await dig(server, "+short", "+tcp", "web.service.mesh", "AAAA")
    assert out.split() == ["fd00::7"]
    out = await dig(server, "nope.service.mesh")
    assert "status: NXDOMAIN" in out and "SOA" in out


async def test_dig_retries_truncated_answers_over_tcp():
    s = await serve(MANY)
    try:
        out = await dig(s, "+bufsize=512", "_web._tcp.service.mesh", "SRV")
        assert "Truncated, retrying in TCP mode" in out
        assert out.count("IN\tSRV\t1 100 ") == 40
        out = await dig(s, "+bufsize=512", "+ignore", "_web._tcp.service.mesh", "SRV")
        assert " tc " in out.split("flags:")[1].split(";")[0] + " "
        assert "MSG SIZE  rcvd: " in out
        assert int(out.split("MSG SIZE  rcvd: ")[1].split()[0]) <= 512
        out = await dig(s, "+bufsize=1000", "+ignore", "_web._tcp.service.mesh", "SRV")
        assert int(out.split("MSG SIZE  rcvd: ")[1].split()[0]) <= 1000
    finally:
        await s.close()


async def test_aiodns_gets_srv_and_a(server):
    host, port = server.addresses[0]
    resolver = aiodns.DNSResolver(nameservers=[f"{host}:{port}"], timeout=2, tries=1)
    try:
        srv = (await resolver.query_dns("_web._tcp.service.mesh", "SRV")).answer
        assert sorted((r.data.target, r.data.port, r.data.weight) for r in srv) == [
            ("v6.web.service.mesh", 8007, 100),
            ("w1.web.service.mesh", 8001, 100),
            ("w2.web.service.mesh", 8002, 100),
            ("w3.web.service.mesh", 8003, 100),
        ]
        a = (await resolver.query_dns("w2.web.service.mesh", "A")).answer
        assert [r.data.addr for r in a] == ["127.0.1.2"]
        with pytest.raises(aiodns.error.DNSError):
            await resolver.query_dns("sick.web.service.mesh", "A")
    finally:
        await resolver.close()


async def test_aiodns_follows_tc_to_tcp():
    s = await serve(MANY)
    host, port = s.addresses[0]
    resolver = aiodns.DNSResolver(nameservers=[f"{host}:{port}"], timeout=2, tries=1)
    try:
        srv = (await resolver.query_dns("_web._tcp.service.mesh", "SRV")).answer
        assert len(srv) == 40
    finally:
        await resolver.close()
        await s.close()


async def test_dnspython_resolver(server):
    host, port = server.addresses[0]
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    resolver.lifetime = 3
    answer = await resolver.resolve("_web._tcp.mesh", "SRV")
    assert sorted(r.port for r in answer) == [8001, 8002, 8003, 8007]
    answer = await resolver.resolve("WEB.SERVICE.MESH", "A")
    assert answer.rrset.name.to_text() == "WEB.SERVICE.MESH."
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("nope.service.mesh", "A")


async def test_tcp_carries_several_queries_per_connection(server):
    host, port = server.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        names = ["w1.web.service.mesh.", "w2.web.service.mesh.", "w3.web.service.mesh."]
        wires = [dns.message.make_query(n, "A").to_wire() for n in names]
        # All three in one write, the last one split across two writes.
        blob = b"".join(struct.pack("!H", len(w)) + w for w in wires)
        writer.write(blob[:-5])
        await writer.drain()
        writer.write(blob[-5:])
        got = []
        for _ in names:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            reply = dns.message.from_wire(await reader.readexactly(length))
            got.append(reply.answer[0][0].address)
        assert got == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    finally:
        writer.close()


async def test_idle_tcp_connections_are_closed():
    s = await serve(tcp_idle_timeout=0.3)
    host, port = s.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    finally:
        writer.close()
        await s.close()


async def test_new_snapshot_is_served(server):
    assert len((await query(server, "web.service.mesh.")).answer[0]) == 3
    server.update(Snapshot.of([inst("w9", "127.0.1.99", 8099)]))
    await server.wait_rebuilt()
    reply = await query(server, "web.service.mesh.")
    assert [r.address for r in reply.answer[0]] == ["127.0.1.99"]


async def test_answers_keep_flowing_during_a_big_rebuild(server):
    big = Snapshot.of(
        Instance(service=f"s{k}", instance=f"i{n}", address=f"127.3.{k}.{n}", port=80)
        for k in range(60)
        for n in range(1, 11)
    )
    server.update(big)
    answered = 0
    while server.rebuilds == 1 and answered < 10_000:
        reply = await query(server, "w1.web.service.mesh.")
        if server.rebuilds == 1:  # still the old table: the old answer, promptly
            assert reply.rcode() == dns.rcode.NOERROR
            answered += 1
    await server.wait_rebuilt()
    assert answered >= 1
    assert (await query(server, "i3.s59.service.mesh.")).answer[0][0].address == "127.3.59.3"


async def test_outside_names_refused_without_upstream(server):
    reply = await query(server, "example.com.")
    assert reply.rcode() == dns.rcode.REFUSED


async def test_forwarding_to_the_upstream_udp_and_tcp():
    upstream = DnsServer(ZoneConfig(domain="up.test"))
    await upstream.start([("127.0.0.1", 0)])
    upstream.update(
        Snapshot.of(
            Instance(service="far", instance=f"f{n:02d}", address=f"127.0.4.{n}", port=7000 + n)
            for n in range(1, 41)
        )
    )
    await upstream.wait_rebuilt()
    s = await serve(upstream=upstream.addresses[0])
    try:
        reply = await query(s, "f01.far.service.up.test.")
        assert reply.answer[0][0].address == "127.0.4.1"
        # Over UDP the client gets the upstream's TC; over TCP we retry the upstream over TCP.
        udp = await query(s, "_far._tcp.service.up.test.", "SRV")
        assert udp.flags & dns.flags.TC
        tcp = await query(s, "_far._tcp.service.up.test.", "SRV", tcp=True)
        assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 40
        nx = await query(s, "nope.up.test.")
        assert nx.rcode() == dns.rcode.NXDOMAIN
        # Our own zone is still ours, and we say we recurse.
        ours = await query(s, "web.service.mesh.")
        assert len(ours.answer[0]) == 3 and ours.flags & dns.flags.RA
    finally:
        await s.close()
        await upstream.close()


async def test_a_tcp_client_that_half_closes_still_gets_its_forwarded_replies():
    """RFC 7766 lets a client shut its sending side after its last query: the replies
    still being forwarded go out, then the connection closes."""
    upstream = DnsServer(ZoneConfig(domain="up.test"))
    await upstream.start([("127.0.0.1", 0)])
    upstream.update(
        Snapshot.of([Instance(service="far", instance="f1", address="127.0.4.1", port=1)])
    )
    await upstream.wait_rebuilt()
    s = await serve(upstream=upstream.addresses[0])
    try:
        reader, writer = await asyncio.open_connection(*s.addresses[0])
        names = ["f1.far.service.up.test.", "web.service.mesh.", "nope.up.test."]
        for name in names:
            wire = dns.message.make_query(name, "A").to_wire()
            writer.write(struct.pack("!H", len(wire)) + wire)
        writer.write_eof()
        replies = {}
        async with asyncio.timeout(5):
            for _ in names:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                reply = dns.message.from_wire(await reader.readexactly(size))
                replies[reply.question[0].name.to_text()] = reply.rcode()
            assert await reader.read() == b""  # then the server closes
        assert replies == {
            "f1.far.service.up.test.": dns.rcode.NOERROR,
            "web.service.mesh.": dns.rcode.NOERROR,
            "nope.up.test.": dns.rcode.NXDOMAIN,
        }
        writer.close()
    finally:
        await s.close()
        await upstream.close()


async def test_silent_upstream_gives_servfail_not_silence():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    s = await serve(upstream=silent.getsockname())
    s.forwarder.udp_timeout = 0.3
    s.forwarder.deadline = 1.0
    try:
        reply = await query(s, "example.com.")
        assert reply.rcode() == dns.rcode.SERVFAIL
        reply = await query(s, "example.com.", tcp=True)  # UDP times out, TCP is refused
        assert reply.rcode() == dns.rcode.SERVFAIL
    finally:
        await s.close()
        silent.close()


async def test_prebound_sockets(caplog):
    caplog.set_level(logging.INFO, logger="sidecar.dns_server")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.create_server(("127.0.0.1", 0))
    s = DnsServer(ZoneConfig())
    await s.start(sockets=[udp, tcp])
    s.update(SNAP)
    await s.wait_rebuilt()
    try:
        host, uport = udp.getsockname()
        tport = tcp.getsockname()[1]
        q = dns.message.make_query("web.service.mesh.", "A")
        r1 = await dns.asyncquery.udp(q, host, port=uport, timeout=3)
        r2 = await dns.asyncquery.tcp(q, host, port=tport, timeout=3)
        assert len(r1.answer[0]) == len(r2.answer[0]) == 3
        messages = [r.getMessage() for r in caplog.records]
        assert f"listening dns=127.0.0.1:{uport}" in messages
    finally:
        await s.close()


async def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    s = DnsServer(ZoneConfig())
    try:
        await s.start([("::1", 0)])
    except OSError:
        pytest.skip("no ::1 here")
    s.update(SNAP)
    await s.wait_rebuilt()
    try:
        q = dns.message.make_query("v6.web.service.mesh.", "AAAA")
        reply = await dns.asyncquery.udp(q, "::1", port=s.addresses[0][1], timeout=3)
        assert reply.answer[0][0].address == "fd00::7"
    finally:
        await s.close()


async def test_garbage_leaves_it_answering(server):
    host, port = server.addresses[0]
    rng = random.Random(7)
    good = dns.message.make_query("web.service.mesh.", "A").to_wire()
    garbage = [
        b"",
        b"\x00",
        good[:11],
        good[:12],
        good[:-1],
        good[:12] + b"\xc0\x0c\x00\x01\x00\x01",  # compression loop in the question
        good[:12] + b"\x01a" * 120 + b"\x00\x00\x01\x00\x01",  # huge label count
        good[:4] + b"\xff\xff" + good[6:],  # 65535 questions
        good[:2] + b"\x80\x00" + good[4:],  # a response
        os.urandom(512),
        *[rng.randbytes(rng.randrange(1, 300)) for _ in range(200)],
    ]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        for blob in garbage:
            sock.sendto(blob, (host, port))
    finally:
        sock.close()
    # TCP: a truncated length prefix, then garbage frames, then a hang-up mid-message.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x00\x05abcde" + b"\x00\x0c" + good[:12] + b"\xff\xff\x00")
    await writer.drain()
    writer.close()
    for _ in range(3):
        reply = await query(server, "web.service.mesh.")
        assert len(reply.answer[0]) == 3
        assert (await query(server, "web.service.mesh.", tcp=True)).rcode() == 0


def test_resolv_conf_upstream(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nsearch a\nnameserver 127.0.0.1\nnameserver 10.0.0.53\n")
    assert resolv_conf_upstream([("127.0.0.1", 53)], str(conf)) == ("10.0.0.53", 53)
    assert resolv_conf_upstream([("127.0.0.1", 5353)], str(conf)) == ("127.0.0.1", 53)
    assert resolv_conf_upstream([], str(tmp_path / "missing")) is None


class _Relay(asyncio.DatagramProtocol):
    """An upstream that sends every query back to the sidecar unchanged (same ID), as a
    resolver configured to forward to the sidecar does, and relays the reply."""

    def __init__(self, target):
        self.target = target
        self.transport = None
        self.tasks = set()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        task = asyncio.ensure_future(self._relay(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _relay(self, data, addr):
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        class One(asyncio.DatagramProtocol):
            def datagram_received(self, reply, _):
                if not done.done():
                    done.set_result(reply)

        transport, _ = await loop.create_datagram_endpoint(One, remote_addr=self.target)
        try:
            transport.sendto(data)
            with contextlib.suppress(TimeoutError):
                self.transport.sendto(await asyncio.wait_for(done, 3), addr)
        finally:
            transport.close()


async def test_a_forwarding_loop_is_cut_short():
    loop = asyncio.get_running_loop()
    relay_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay_sock.bind(("127.0.0.1", 0))
    s = await serve(upstream=relay_sock.getsockname())
    relay, protocol = await loop.create_datagram_endpoint(
        lambda: _Relay(s.addresses[0]), sock=relay_sock
    )
    try:
        t0 = loop.time()
        reply = await query(s, "example.com.")
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert loop.time() - t0 < s.forwarder.udp_timeout  # cut, not timed out
        assert s.forwarder.loops >= 1
    finally:
        for task in list(protocol.tasks):
            task.cancel()
        await asyncio.gather(*protocol.tasks, return_exceptions=True)
        relay.close()
        await s.close()


BURST = 100


async def test_a_batch_of_good_bad_and_forwarded_queries_gets_every_reply_right():
    """300 datagrams, sent 100 at a time before the server reads one (a burst that fits the
    default socket buffer), so they are read in batches: fast
    answers in both letter cases, with and without EDNS, names that miss, names to
    forward, and broken packets. Every query that deserves a reply gets exactly one, with
    its own ID and its own question; the broken ones get FORMERR or NOTIMP, or nothing when
    shorter than a header."""
    upstream = DnsServer(ZoneConfig(domain="up.test"))
    await upstream.start([("127.0.0.1", 0)])
    s = await serve(upstream=upstream.addresses[0])
    host, port = s.addresses[0]
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    rng = random.Random(7)
    expect: dict[int, tuple[str, str]] = {}  # id → (question text, what the reply must be)
    sent = []
    ids = rng.sample(range(1, 65536), 300)
    names = ["w1.web.service.mesh.", "W2.WEB.Service.Mesh.", "_web._tcp.service.mesh."]
    for n, qid in enumerate(ids):
        kind = n % 6
        if kind in (0, 1):  # fast, plain or with EDNS
            name = names[n % 3]
            rdtype = "SRV" if name.startswith("_") else "A"
            q = dns.message.make_query(name, rdtype, use_edns=0 if kind else False)
            q.id = qid
            wire, want = q.to_wire(), "answer"
        elif kind == 2:  # in the zone, no such name
            q = dns.message.make_query(f"n{n}.web.service.mesh.", "A")
            q.id = qid
            wire, want = q.to_wire(), "NXDOMAIN"
        elif kind == 3:  # forwarded to the upstream, which answers NXDOMAIN
            q = dns.message.make_query(f"f{n}.up.test.", "A")
            q.id = qid
            wire, want = q.to_wire(), "NXDOMAIN"
        elif kind == 4:  # a broken question, or another opcode
            wire = struct.pack("!HHHHHH", qid, 0, 1, 0, 0, 0) + b"\x05abc"
            want = "FORMERR"
            if n % 12 == 10:
                wire = struct.pack("!HHHHHH", qid, 0x1000, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01"
                want = "NOTIMP"
        else:  # shorter than a header: dropped
            wire, want = struct.pack("!H", qid) + b"\x00" * 5, "nothing"
        expect[qid] = (wire, want)
        sent.append(wire)
    try:
        replies: dict[int, list[bytes]] = {}
        loop = asyncio.get_running_loop()
        for burst in range(0, len(sent), BURST):
            # Queued before the server's reader runs, so that it reads them in batches.
            for wire in sent[burst : burst + BURST]:
                client.sendto(wire, (host, port))
            deadline = loop.time() + 1.5
            while loop.time() < deadline:
                try:
                    data = client.recv(4096)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
                    continue
                replies.setdefault(struct.unpack("!H", data[:2])[0], []).append(data)
        wrong = []
        for qid, (wire, want) in expect.items():
            got = replies.get(qid, [])
            if want == "nothing":
                if got:
                    wrong.append((qid, want, got))
                continue
            if len(got) != 1:
                wrong.append((qid, want, len(got)))
                continue
            if want in ("FORMERR", "NOTIMP"):
                code = struct.unpack("!H", got[0][2:4])[0] & 0xF
                if code != dns.rcode.from_text(want):
                    wrong.append((qid, want, code))
                continue
            q, r = dns.message.from_wire(wire), dns.message.from_wire(got[0])
            same_question = [str(x.name) for x in r.question] == [str(x.name) for x in q.question]
            ok = (
                r.rcode() == dns.rcode.NOERROR and r.answer
                if want == "answer"
                else (r.rcode() == dns.rcode.NXDOMAIN)
            )
            if not (r.id == qid and same_question and ok):
                wrong.append((qid, want, r.to_text()))
        native = sum(u.native.answered for u in s._udp)
        print(f"{len(sent)} datagrams: {len(replies)} ids answered, {native} natively")
        assert wrong == []
        assert native == sum(1 for _, want in expect.values() if want == "answer")
    finally:
        client.close()
        await s.close()
        await upstream.close()
