"""The DNS responder under hostile input, on loopback: fuzzed datagrams, broken names,
broken TCP framing, connection floods, and the policies that keep it from being abused
(no recursion for outside names, no amplification through ANY).

Every reply is checked by what a client sees: the ID echoed, QR set, a well-formed message
(dnspython parses it), no larger than the client may receive (512 bytes without EDNS0, the
advertised size within 512..1232 with it), and the question echoed as sent. A valid query
follows every window of hostile packets and must get the right answer.

The UDP exchanges are lockstep by window: a window of packets, then one valid query. The
responder answers a socket's datagrams in order, so the replies before the valid query's
are the hostile packets' replies, in order; a packet the responder must drop (shorter than
a header, or a response) has none. A count that does not match fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import struct
import time

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.model import Instance, Snapshot
from sidecar.dns_server import (
    FORWARD_DEADLINE,
    MAX_TCP_CONNECTIONS,
    TCP_IDLE_TIMEOUT,
    DnsServer,
    ZoneConfig,
)
from tests.integration.mesh_proc import LISTENING, Proc

# The zone: a service big enough to truncate, tags, IPv6, a second service.
WEB = [
    Instance(
        service="web",
        instance=f"i{n:02d}",
        address=f"127.0.2.{n}",
        port=9000 + n,
        tags=("blue",) if n % 2 else ("green",),
    )
    for n in range(1, 41)
]
V6 = [Instance(service="v6", instance=f"x{n}", address=f"fd00::{n}", port=80) for n in (1, 2, 3)]
DB = [Instance(service="db", instance="main", address="127.0.3.1", port=5432)]
SNAP = Snapshot.of([*WEB, *V6, *DB], revision=7)

WEB_ADDRESSES = {i.address for i in WEB}
WEB_SRV = {f"1 100 {i.port} {i.instance}.web.service.mesh." for i in WEB}

# Bounds of the long run: whichever comes first.
LONG_RUN_PACKETS = 100_000
LONG_RUN_SECONDS = 45.0
WINDOW = 32  # hostile datagrams between two valid queries
REPLY_TIMEOUT = 5.0  # s; generous: loopback answers in well under a millisecond
ANY_OVERHEAD = 32  # bytes an ANY reply may add to its query: one short HINFO record
SIDECAR_BURST = 3_200  # hostile datagrams at the real sidecar process
PIPELINED_BIG = 4_000  # pipelined queries with ~2.3 KB replies each


# Real queries: what fuzzing mutates.


def _corpus() -> list[bytes]:
    rng = random.Random(2024)
    names = [
        "web.service.mesh.",
        "WeB.SeRvIcE.mEsH.",
        "_web._tcp.service.mesh.",
        "_web._tcp.mesh.",
        "blue.web.service.mesh.",
        "_web._green.service.mesh.",
        "i07.web.service.mesh.",
        "x2.v6.service.mesh.",
        "nope.service.mesh.",
        "service.mesh.",
        "mesh.",
        "example.com.",
        ".",
    ]
    types = ["A", "AAAA", "SRV", "ANY", "SOA", "TXT", "NS", "AXFR"]
    options = [
        {},
        {"use_edns": 0, "payload": 1232},
        {"use_edns": 0, "payload": 4096, "want_dnssec": True},
        {"use_edns": 0, "payload": 600},
        {"use_edns": 0, "payload": 100},
    ]
    out = []
    for name in names:
        for rdtype in types:
            for kw in options:
                q = dns.message.make_query(name, rdtype, **kw)
                q.id = rng.getrandbits(16)
                out.append(q.to_wire())
    return out


CORPUS = _corpus()


def mutate(rng: random.Random, wire: bytes, *, edits: int = 4) -> bytes:
    """One to ``edits`` edits of a real query: flipped bits, cuts, inserted, duplicated bytes."""
    q = bytearray(wire)
    for _ in range(rng.randint(1, edits)):
        op = rng.randrange(7)
        if op == 0 and q:  # flip one bit
            bit = rng.randrange(len(q) * 8)
            q[bit // 8] ^= 1 << (bit % 8)
        elif op == 1 and q:  # truncate
            del q[rng.randrange(len(q)) :]
        elif op == 2:  # insert random bytes
            at = rng.randrange(len(q) + 1)
            q[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and q:  # duplicate a slice in place
            a = rng.randrange(len(q))
            b = rng.randrange(a, min(len(q), a + 64) + 1)
            q[a:a] = q[a:b]
        elif op == 4 and q:  # overwrite one byte
            q[rng.randrange(len(q))] = rng.randrange(256)
        elif op == 5 and len(q) >= 12:  # a section count set to something else
            at = rng.choice((4, 6, 8, 10))
            q[at : at + 2] = struct.pack("!H", rng.choice((0, 1, 2, 255, 65535)))
        elif op == 6:  # spliced with another real query
            other = rng.choice(CORPUS)
            cut = rng.randrange(len(q) + 1)
            q[cut:] = other[rng.randrange(len(other)) :]
    return bytes(q)


def fuzz_packet(rng: random.Random) -> bytes:
    """A random datagram (one in four) or a mutated real query."""
    if rng.random() < 0.25:
        return rng.randbytes(rng.randrange(0, 600))
    return mutate(rng, rng.choice(CORPUS))


# What a client may expect.


def expects_reply(packet: bytes) -> bool:
    """The responder answers everything but fragments shorter than a header and responses."""
    return len(packet) >= 12 and not packet[2] & 0x80


def udp_limit(query: bytes) -> int:
    """The largest reply the client may receive over UDP (RFC 1035 §4.2.1, RFC 6891 §6.2.5)."""
    if query[10:12] == b"\x00\x00":
        return 512
    try:
        parsed = dns.message.from_wire(query, ignore_trailing=True)
    except Exception:
        return 1232  # unreadable here: at least never above the cap
    if parsed.edns < 0:
        return 512
    return min(max(parsed.payload, 512), 1232)


def _question_end(wire: bytes) -> int | None:
    i = 12
    while i < len(wire):
        if wire[i] == 0:
            return i + 5 if i + 5 <= len(wire) else None
        if wire[i] > 63:
            return None
        i += wire[i] + 1
    return None


def check_reply(query: bytes, reply: bytes, *, udp: bool = True) -> dns.message.Message:
    """Everything a client may rely on in any reply; returns the parsed reply."""
    assert len(reply) >= 12, reply.hex()
    assert reply[:2] == query[:2], "the reply must carry the query's ID"
    assert reply[2] & 0x80, "QR must be set"
    if udp:
        limit = udp_limit(query)
        assert len(reply) <= limit, f"{len(reply)} bytes > {limit} for {query.hex()}"
    parsed = dns.message.from_wire(reply)  # well-formed, or this raises
    if parsed.question:
        end = _question_end(reply)
        assert end is not None
        assert reply[12:end] == query[12:end], "the question must be echoed as sent"
    return parsed


# Valid queries with the right answers, taken from the snapshot (not from the responder).


def _addresses(reply: dns.message.Message, rdtype: int) -> set[str]:
    return {r.address for rrset in reply.answer if rrset.rdtype == rdtype for r in rrset}


def _expect_one_web(reply, udp=True):
    assert reply.rcode() == dns.rcode.NOERROR
    assert _addresses(reply, dns.rdatatype.A) == {"127.0.2.7"}


def _expect_all_web(reply, udp=True):
    assert reply.rcode() == dns.rcode.NOERROR and not reply.flags & dns.flags.TC
    assert _addresses(reply, dns.rdatatype.A) == WEB_ADDRESSES
    assert reply.question[0].name.to_text() == "WEB.Service.mesh."


def _expect_srv(reply, udp=True):
    """Over UDP without EDNS0 a part with TC set; over TCP every instance."""
    assert reply.rcode() == dns.rcode.NOERROR
    got = {r.to_text() for rrset in reply.answer for r in rrset}
    if udp:
        assert reply.flags & dns.flags.TC and got and got <= WEB_SRV
    else:
        assert not reply.flags & dns.flags.TC and got == WEB_SRV


def _expect_v6(reply, udp=True):
    assert _addresses(reply, dns.rdatatype.AAAA) == {"fd00::2"}


def _expect_nxdomain(reply, udp=True):
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.authority and reply.authority[0].rdtype == dns.rdatatype.SOA


def _expect_refused(reply, udp=True):
    assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
    assert not reply.flags & dns.flags.RA


SENTINELS = [
    (("i07.web.service.mesh.", "A"), {}, _expect_one_web),
    (("WEB.Service.mesh.", "A"), {"use_edns": 0, "payload": 1232}, _expect_all_web),
    (("_web._tcp.service.mesh.", "SRV"), {}, _expect_srv),
    (("x2.v6.service.mesh.", "AAAA"), {"use_edns": 0, "payload": 512}, _expect_v6),
    (("nope.service.mesh.", "A"), {}, _expect_nxdomain),
    (("example.com.", "A"), {}, _expect_refused),
]


class Sentinels:
    """An endless round of valid queries, each with a fresh ID and its expected answer."""

    def __init__(self) -> None:
        self._n = 0
        self.checked = 0

    def next(self) -> tuple[bytes, object]:
        args, kw, expect = SENTINELS[self._n % len(SENTINELS)]
        query = dns.message.make_query(*args, **kw)
        query.id = self._n % 65536
        self._n += 1
        return query.to_wire(), expect

    def check(self, wire: bytes, reply: bytes, expect, *, udp: bool = True) -> None:
        expect(check_reply(wire, reply, udp=udp), udp=udp)
        self.checked += 1


# Clients.


class UdpClient(asyncio.DatagramProtocol):
    """A connected UDP socket whose replies queue up in arrival order."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    @classmethod
    async def open(cls, addr: tuple[str, int]) -> UdpClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_datagram_endpoint(cls, remote_addr=addr)
        return client

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.replies.put_nowait(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, packets: list[bytes], sentinels: Sentinels) -> list[bytes]:
        """Send ``packets`` and a valid query; check every reply; the hostile ones' replies,
        in the order of ``packets``.

        UDP keeps no order, and the responder does not either: replies it sends from its
        table go out before those it had to work out. So each reply is paired with its
        query by ID (and question, when IDs repeat), as a client pairs them.
        """
        assert self.transport is not None
        for packet in packets:
            self.transport.sendto(packet)
        wire, expect = sentinels.next()
        self.transport.sendto(wire)
        expected = [p for p in packets if expects_reply(p)]
        replies = []
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                for _ in range(len(expected) + 1):
                    replies.append(await self.replies.get())
        except TimeoutError:
            raise AssertionError(
                f"{len(replies)} replies for {len(expected)} answerable packets and a valid "
                f"query: a reply went missing ({[p.hex() for p in packets]})"
            ) from None

        def fits(query: bytes, reply: bytes) -> bool:
            try:
                parsed = check_reply(query, reply)
                if query is wire:
                    expect(parsed, udp=True)
            except Exception:
                return False
            return True

        paired = pair_replies([*expected, wire], replies, fits)
        sentinels.check(wire, paired[-1], expect)
        for packet, reply in zip(expected, paired[:-1], strict=True):
            check_reply(packet, reply)
        return paired[:-1]


def pair_replies(queries: list[bytes], replies: list[bytes], fits) -> list[bytes]:
    """Each query's reply, as a client pairs them: a one-to-one matching in which every
    reply ``fits`` its query (its ID, and everything check_reply asks). When there is none,
    the pairing by ID alone, so that the checks after it say what is wrong."""
    ok = [[fits(q, r) for r in replies] for q in queries]
    owner: dict[int, int] = {}  # reply index -> query index

    def augment(qi: int, seen: set[int]) -> bool:  # Kuhn's augmenting path
        for ri in range(len(replies)):
            if ok[qi][ri] and ri not in seen:
                seen.add(ri)
                if ri not in owner or augment(owner[ri], seen):
                    owner[ri] = qi
                    return True
        return False

    if all(augment(qi, set()) for qi in range(len(queries))):
        by_query = {qi: ri for ri, qi in owner.items()}
        return [replies[by_query[qi]] for qi in range(len(queries))]
    left = list(replies)
    paired = []
    for query in queries:
        reply = next((r for r in left if r[:2] == query[:2]), left[0])
        left.remove(reply)
        paired.append(reply)
    return paired


class TcpClient:
    """One TCP connection: length-prefixed messages out, replies in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, addr: tuple[str, int]) -> TcpClient:
        return cls(*await asyncio.open_connection(*addr))

    async def send(self, *messages: bytes) -> None:
        self.writer.write(b"".join(struct.pack("!H", len(m)) + m for m in messages))
        await self.writer.drain()

    async def reply(self) -> bytes:
        async with asyncio.timeout(REPLY_TIMEOUT):
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            return await self.reader.readexactly(length)

    async def closed_by_peer(self, timeout: float) -> bool:
        """True if the responder closes the connection (EOF or reset) within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read(65536) == b""
        except (ConnectionError, OSError):
            return True

    async def ask(self, sentinels: Sentinels) -> None:
        wire, expect = sentinels.next()
        await self.send(wire)
        sentinels.check(wire, await self.reply(), expect, udp=False)

    def close(self) -> None:
        self.writer.close()


# The responder.


async def serve(**kw) -> DnsServer:
    server = DnsServer(ZoneConfig(), **kw)
    await server.start([("127.0.0.1", 0)])
    server.update(SNAP)
    await server.wait_rebuilt()
    return server


@pytest.fixture
async def responder(caplog):
    caplog.set_level(logging.WARNING, logger="sidecar")
    server = await serve(tcp_idle_timeout=1.0)
    yield server
    await server.close()
    # Nothing raised while answering: the server's own count and its log agree.
    assert server.errors.count == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# Fuzzing over UDP


@st.composite
def hostile(draw) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=700))
    return mutate(draw(st.randoms(use_true_random=False)), draw(st.sampled_from(CORPUS)))


@pytest.mark.one_loop
@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(packets=st.lists(hostile(), min_size=1, max_size=4))
async def test_fuzzed_datagrams_get_well_formed_replies_and_valid_queries_keep_answers(
    responder, packets
):
    client = await UdpClient.open(responder.addresses[0])
    try:
        await client.exchange(packets, Sentinels())
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.one_loop
async def test_long_run_of_random_and_mutated_datagrams(responder, record_property):
    seed = int(os.environ.get("MESH_FUZZ_SEED", "1"))
    rng = random.Random(seed)
    sentinels = Sentinels()
    client = await UdpClient.open(responder.addresses[0])
    sent = answered = 0
    started = time.monotonic()
    try:
        while sent < LONG_RUN_PACKETS and time.monotonic() - started < LONG_RUN_SECONDS:
            window = [fuzz_packet(rng) for _ in range(min(WINDOW, LONG_RUN_PACKETS - sent))]
            answered += len(await client.exchange(window, sentinels))
            sent += len(window)
        # After the run: the same answers from a fresh socket, over both transports.
        fresh = await UdpClient.open(responder.addresses[0])
        try:
            await fresh.exchange([], sentinels)
        finally:
            fresh.close()
        tcp = await TcpClient.open(responder.addresses[0])
        try:
            await tcp.ask(sentinels)
        finally:
            tcp.close()
    finally:
        client.close()
    record_property("datagrams_fuzzed", sent)
    record_property("valid_queries_checked", sentinels.checked)
    print(
        f"\nDNS fuzz (seed {seed}): {sent} hostile datagrams, {answered} replies checked, "
        f"{sentinels.checked} valid queries answered correctly in "
        f"{time.monotonic() - started:.1f} s"
    )
    assert sent >= 5_000, "too few packets for the run to mean anything"
    assert sentinels.checked >= sent // WINDOW


@pytest.mark.one_loop
async def test_fuzzed_messages_over_one_tcp_connection(responder):
    rng = random.Random(5)
    sentinels = Sentinels()
    tcp = await TcpClient.open(responder.addresses[0])
    try:
        for _ in range(40):
            window = [fuzz_packet(rng) for _ in range(WINDOW)]
            wire, expect = sentinels.next()
            await tcp.send(*window, wire)
            for packet in filter(expects_reply, window):
                check_reply(packet, await tcp.reply(), udp=False)
            sentinels.check(wire, await tcp.reply(), expect, udp=False)
    finally:
        tcp.close()


async def test_random_byte_streams_over_tcp(responder):
    rng = random.Random(11)
    for _ in range(50):
        tcp = await TcpClient.open(responder.addresses[0])
        tcp.writer.write(rng.randbytes(rng.randrange(1, 3000)))
        with contextlib.suppress(ConnectionError):
            await tcp.writer.drain()
        tcp.close()
    sentinels = Sentinels()
    tcp = await TcpClient.open(responder.addresses[0])
    try:
        for _ in SENTINELS:
            await tcp.ask(sentinels)
    finally:
        tcp.close()


# Hostile names and headers, each over UDP and over TCP.


def header(*, qid=0x1234, flags=0x0100, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def name_of(wire_length: int, suffix: bytes = b"\x04mesh\x00") -> bytes:
    """A name in the zone whose wire form is exactly ``wire_length`` bytes."""
    room = wire_length - len(suffix)
    labels = b""
    while room:
        size = min(room, 64)
        if room - size == 1:  # a one-byte remainder cannot be a label
            size -= 1
        labels += bytes([size - 1]) + b"a" * (size - 1)
        room -= size
    return labels + suffix


A_IN = b"\x00\x01\x00\x01"
WEB_Q = b"\x03web\x07service\x04mesh\x00" + A_IN
I07_Q = b"\x03i07" + WEB_Q
OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"  # root, OPT, 1232, v0, no options
FORMERR, NOTIMP, REFUSED, NXDOMAIN, NOERROR = 1, 4, 5, 3, 0
DROPPED = None

HOSTILE = {
    "self-pointing pointer": (header() + b"\xc0\x0c" + A_IN, FORMERR),
    "two-pointer cycle": (header() + b"\xc0\x0e\xc0\x0c" + A_IN, FORMERR),
    "label then a pointer back": (header() + b"\x03web\xc0\x0c" + A_IN, FORMERR),
    "forward pointer": (header() + b"\xc0\x12" + A_IN + WEB_Q, FORMERR),
    "label of 64": (header() + b"\x40" + b"a" * 64 + b"\x00" + A_IN, FORMERR),
    "label type 0b01": (header() + b"\x41" + b"a" * 65 + b"\x00" + A_IN, FORMERR),
    "label type 0b10": (header() + b"\x80" + b"a" * 128 + b"\x00" + A_IN, FORMERR),
    "label longer than the packet": (header() + b"\x3f" + b"a" * 10, FORMERR),
    "name of 256 bytes": (header() + name_of(256) + A_IN, FORMERR),
    "name of 255 bytes": (header() + name_of(255) + A_IN, NXDOMAIN),
    "127 one-byte labels": (header() + b"\x01a" * 122 + b"\x04mesh\x00" + A_IN, NXDOMAIN),
    "128 one-byte labels": (header() + b"\x01a" * 128 + b"\x00" + A_IN, FORMERR),
    "no terminating root": (header() + b"\x03web" * 40, FORMERR),
    "qdcount 0 with a question": (header(qd=0) + WEB_Q, FORMERR),
    "qdcount 0, header only": (header(qd=0), FORMERR),
    "qdcount 2": (header(qd=2) + WEB_Q + WEB_Q, FORMERR),
    "qdcount 65535": (header(qd=65535) + WEB_Q, FORMERR),
    "answer records in a query": (header(an=1) + WEB_Q, FORMERR),
    "question cut in its type": (header() + WEB_Q[:-3], FORMERR),
    "arcount 65535, one OPT": (header(ar=65535) + WEB_Q + OPT, FORMERR),
    "two OPT records": (header(ar=2) + WEB_Q + OPT + OPT, FORMERR),
    "OPT owned by a pointer loop": (header(ar=1) + WEB_Q + b"\xc0\x1e" + OPT[1:], FORMERR),
    "OPT with rdlen past the end": (header(ar=1) + WEB_Q + OPT[:-2] + b"\xff\xff", FORMERR),
    "opcode IQUERY": (header(flags=0x0800) + WEB_Q, NOTIMP),
    "opcode UPDATE": (header(flags=0x2800) + WEB_Q, NOTIMP),
    "a response": (header(flags=0x8180) + WEB_Q, DROPPED),
    "eleven bytes": (header()[:11], DROPPED),
    "empty": (b"", DROPPED),
    "class CHAOS version.bind": (
        header() + b"\x07version\x04bind\x00\x00\x10\x00\x03",
        REFUSED,
    ),
    "zone transfer": (header() + b"\x04mesh\x00\x00\xfc\x00\x01", REFUSED),
    "trailing garbage after the question": (header() + I07_Q + os.urandom(200), NOERROR),
}


@pytest.mark.parametrize(("packet", "rcode"), HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_packet(responder, packet, rcode):
    sentinels = Sentinels()
    client = await UdpClient.open(responder.addresses[0])
    try:
        replies = await client.exchange([packet], sentinels)
    finally:
        client.close()
    tcp = await TcpClient.open(responder.addresses[0])
    try:
        wire, expect = sentinels.next()
        await tcp.send(packet, wire)
        if rcode is not DROPPED:
            replies.append(await tcp.reply())
            check_reply(packet, replies[-1], udp=False)
        sentinels.check(wire, await tcp.reply(), expect, udp=False)
    finally:
        tcp.close()
    if rcode is DROPPED:
        assert replies == []
        return
    for reply in replies:
        assert dns.message.from_wire(reply).rcode() == rcode
        if rcode == NOERROR:
            assert _addresses(dns.message.from_wire(reply), dns.rdatatype.A) == {"127.0.2.7"}


async def test_unknown_edns_version_gets_badvers(responder):
    packet = header(ar=1) + WEB_Q + OPT[:6] + b"\x01" + OPT[7:]
    client = await UdpClient.open(responder.addresses[0])
    try:
        (reply,) = await client.exchange([packet], Sentinels())
    finally:
        client.close()
    assert dns.message.from_wire(reply).rcode() == dns.rcode.BADVERS


# TCP framing


async def test_zero_length_tcp_message_is_skipped(responder):
    sentinels = Sentinels()
    tcp = await TcpClient.open(responder.addresses[0])
    try:
        tcp.writer.write(b"\x00\x00" * 3)
        await tcp.ask(sentinels)
        await tcp.ask(sentinels)
    finally:
        tcp.close()


async def test_64k_tcp_messages(responder):
    sentinels = Sentinels()
    query = dns.message.make_query("web.service.mesh.", "A").to_wire()
    padded = query + b"\x00" * (65535 - len(query))  # one query, then padding
    assert len(padded) == 65535
    junk = header(ar=0xFFFF) + WEB_Q + b"\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00" * 5955
    junk = junk[:65535]
    tcp = await TcpClient.open(responder.addresses[0])
    try:
        await tcp.send(padded)
        reply = check_reply(padded, await tcp.reply(), udp=False)
        assert _addresses(reply, dns.rdatatype.A) == WEB_ADDRESSES
        await tcp.send(junk)  # thousands of additional records, cut mid-record
        assert check_reply(junk, await tcp.reply(), udp=False).rcode() == FORMERR
        noise = bytearray(random.Random(13).randbytes(65535))
        noise[2] &= 0x7F  # a query, not a response: it gets a reply of some kind
        await tcp.send(bytes(noise))
        check_reply(bytes(noise), await tcp.reply(), udp=False)
        await tcp.ask(sentinels)
    finally:
        tcp.close()


async def test_64k_udp_datagram(responder):
    query = dns.message.make_query("i07.web.service.mesh.", "A").to_wire()
    client = await UdpClient.open(responder.addresses[0])
    try:
        (reply,) = await client.exchange([query + b"\x00" * (65507 - len(query))], Sentinels())
    finally:
        client.close()
    assert _addresses(dns.message.from_wire(reply), dns.rdatatype.A) == {"127.0.2.7"}


async def wait_connections(server: DnsServer, at_most: int) -> None:
    async with asyncio.timeout(REPLY_TIMEOUT):
        while server.tcp_connections > at_most:
            await asyncio.sleep(0.01)


async def test_truncated_length_prefixes_then_close(responder):
    starts = [b"\x00", b"\xff", b"\x00\x30", b"\x00\x30" + WEB_Q[:10], b"\x00\x1d" + header()]
    for start in starts:
        tcp = await TcpClient.open(responder.addresses[0])
        tcp.writer.write(start)
        await tcp.writer.drain()
        tcp.close()
        await tcp.writer.wait_closed()
    await wait_connections(responder, 0)
    sentinels = Sentinels()
    tcp = await TcpClient.open(responder.addresses[0])
    try:
        await tcp.ask(sentinels)
    finally:
        tcp.close()


async def test_a_message_that_never_completes_is_closed_by_the_idle_timeout(responder):
    tcp = await TcpClient.open(responder.addresses[0])
    try:
        tcp.writer.write(b"\xff\xff" + WEB_Q)  # promises 65535 bytes
        # Trickling more of it does not keep the connection: only whole messages do.
        for _ in range(5):
            tcp.writer.write(b"a")
            await tcp.writer.drain()
            await asyncio.sleep(0.1)
        assert await tcp.closed_by_peer(responder.tcp_idle_timeout + REPLY_TIMEOUT)
    finally:
        tcp.close()
    await wait_connections(responder, 0)


@pytest.mark.one_loop
async def test_connections_past_the_limit_are_closed_and_old_ones_still_answered(responder):
    addr = responder.addresses[0]
    sentinels = Sentinels()
    responder.tcp_idle_timeout = 60.0  # the scenario holds its connections for a while
    held: list[TcpClient] = []
    try:
        for _ in range(0, MAX_TCP_CONNECTIONS, 64):
            batch = await asyncio.gather(*(TcpClient.open(addr) for _ in range(64)))
            held.extend(batch)
            await asyncio.gather(*(c.ask(sentinels) for c in batch))
        assert responder.tcp_connections == MAX_TCP_CONNECTIONS
        # Past the limit: closed at once, with no answer.
        extra = await asyncio.gather(*(TcpClient.open(addr) for _ in range(64)))
        for client in extra:
            with contextlib.suppress(ConnectionError):
                await client.send(dns.message.make_query("web.service.mesh.", "A").to_wire())
        closed = await asyncio.gather(*(c.closed_by_peer(REPLY_TIMEOUT) for c in extra))
        for client in extra:
            client.close()
        assert all(closed)
        # The ones already open are still answered, all of them.
        await asyncio.gather(*(c.ask(sentinels) for c in held))
        # UDP does not depend on TCP slots.
        udp = await UdpClient.open(addr)
        await udp.exchange([], sentinels)
        udp.close()
        # Room again once some close.
        for client in held[:8]:
            client.close()
        await wait_connections(responder, MAX_TCP_CONNECTIONS - 8)
        fresh = await asyncio.gather(*(TcpClient.open(addr) for _ in range(8)))
        held.extend(fresh)
        await asyncio.gather(*(c.ask(sentinels) for c in fresh))
    finally:
        for client in held:
            client.close()
    await wait_connections(responder, 0)


async def test_pipelined_queries_are_answered_in_order(responder):
    rng = random.Random(3)
    sentinels = Sentinels()
    batch = []
    for _ in range(600):
        kind = rng.randrange(4)
        if kind == 0:
            batch.append((*sentinels.next(), True))
        else:
            packet = rng.choice([p for p, rcode in HOSTILE.values()])
            batch.append((packet, None, expects_reply(packet)))
    blob = b"".join(struct.pack("!H", len(p)) + p for p, _, _ in batch)
    tcp = await TcpClient.open(responder.addresses[0])
    try:

        async def write():
            # Cut at random places: messages and length prefixes split across writes.
            at = 0
            while at < len(blob):
                step = rng.choice((1, 2, 3, 100, 4000))
                tcp.writer.write(blob[at : at + step])
                at += step
                await tcp.writer.drain()

        writer = asyncio.create_task(write())
        for packet, expect, answered in batch:
            if not answered:
                continue
            reply = await tcp.reply()
            if expect is None:
                check_reply(packet, reply, udp=False)
            else:
                sentinels.check(packet, reply, expect, udp=False)
        await writer
    finally:
        tcp.close()


@pytest.mark.one_loop
async def test_a_client_that_stops_reading_for_a_while_gets_every_reply(responder):
    # Megabytes of replies, far past the socket buffers: the responder stops reading and
    # answering until the client takes its replies, then carries on where it stopped.
    responder.tcp_idle_timeout = TCP_IDLE_TIMEOUT
    query = dns.message.make_query("_web._tcp.service.mesh.", "SRV")
    wires = []
    for n in range(PIPELINED_BIG):
        query.id = n
        wires.append(query.to_wire())
    tcp = await TcpClient.open(responder.addresses[0])
    try:
        writer = asyncio.create_task(tcp.send(*wires))
        await asyncio.sleep(0.5)  # the scenario: a client that does not read for a while
        first = await tcp.reply()
        assert len(first) * PIPELINED_BIG > 8 * 1024 * 1024
        _expect_srv(check_reply(wires[0], first, udp=False), udp=False)
        for n, wire in enumerate(wires[1:], 1):
            reply = await tcp.reply()
            assert reply[:2] == wire[:2] and reply[2:12] == first[2:12]
            assert len(reply) == len(first)  # the whole answer every time
            if n % 200 == 0:
                _expect_srv(check_reply(wire, reply, udp=False), udp=False)
        await writer
    finally:
        tcp.close()


@pytest.mark.one_loop
async def test_a_client_that_never_reads_is_closed_by_the_idle_timeout(responder):
    sentinels = Sentinels()
    tcp = await TcpClient.open(responder.addresses[0])
    blob = b"".join(
        struct.pack("!H", len(w)) + w for w, _ in (sentinels.next() for _ in range(5000))
    )
    try:
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(responder.tcp_idle_timeout + REPLY_TIMEOUT):
                while True:  # until our writes block for good, then until the close
                    tcp.writer.write(blob)
                    await tcp.writer.drain()
        await wait_connections(responder, 0)
    finally:
        tcp.close()


# Policy, against the real ``mesh sidecar`` process.

OUTSIDE = [
    ("example.com.", "A"),
    (".", "NS"),
    ("com.", "ANY"),
    ("1.0.0.127.in-addr.arpa.", "PTR"),
    ("mesh.example.", "A"),
    ("meshx.", "A"),
    ("version.bind.", "TXT"),
]
ANY_NAMES = [
    "web.service.mesh.",
    "_web._tcp.service.mesh.",
    "_web._tcp.mesh.",
    "blue.web.service.mesh.",
    "_web._green.service.mesh.",
    "i01.web.service.mesh.",
]


async def _ask_udp(addr, query: bytes) -> bytes:
    client = await UdpClient.open(addr)
    try:
        client.transport.sendto(query)
        async with asyncio.timeout(REPLY_TIMEOUT):
            return await client.replies.get()
    finally:
        client.close()


async def _ask_tcp(addr, query: bytes) -> bytes:
    tcp = await TcpClient.open(addr)
    try:
        await tcp.send(query)
        return await tcp.reply()
    finally:
        tcp.close()


@pytest.mark.one_loop
async def test_sidecar_without_upstream_refuses_outside_names_and_never_amplifies(db_url, store):
    for instance in [*WEB, *V6]:
        await store.register(instance, 120)
    args = [
        "sidecar", "--service", "db", "--instance", "main", "--address", "127.0.3.1",
        "--port", "5432", "--check", "none", "--dns-listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--upstream", "none", "--mongo-url", db_url,
    ]  # fmt: skip
    proc = await Proc.start(*args)
    try:
        match = await proc.wait_line(LISTENING)
        addr = (match.group(1), int(match.group(2)))
        await proc.wait_line("db/main: registered")
        await _wait_for_zone(addr)
        await _outside_names_are_refused(addr)
        await _any_is_answered_minimally(addr)

        # A burst of hostile datagrams at the process: it keeps answering, logs no error.
        rng = random.Random(17)
        sentinels = Sentinels()
        client = await UdpClient.open(addr)
        try:
            for _ in range(SIDECAR_BURST // WINDOW):
                await client.exchange([fuzz_packet(rng) for _ in range(WINDOW)], sentinels)
        finally:
            client.close()
        assert proc.proc.returncode is None
        assert not [line for line in proc.lines if re.search(r"ERROR|Traceback", line)]
    finally:
        await proc.stop()


async def _wait_for_zone(addr) -> None:
    """Until the sidecar's cache holds every instance written to the registry."""
    srv = dns.message.make_query("_web._tcp.service.mesh.", "SRV").to_wire()
    v6 = dns.message.make_query("v6.service.mesh.", "AAAA").to_wire()
    async with asyncio.timeout(15):
        while True:
            web = dns.message.from_wire(await _ask_tcp(addr, srv))
            six = dns.message.from_wire(await _ask_tcp(addr, v6))
            if web.answer and len(web.answer[0]) == len(WEB) and six.answer:
                return
            await asyncio.sleep(0.05)


async def _outside_names_are_refused(addr) -> None:
    for name, rdtype in OUTSIDE:
        for kw in ({}, {"use_edns": 0}):
            query = dns.message.make_query(name, rdtype, **kw).to_wire()  # RD set
            for ask, udp in ((_ask_udp, True), (_ask_tcp, False)):
                raw = await ask(addr, query)
                reply = check_reply(query, raw, udp=udp)
                _expect_refused(reply)
                assert reply.flags & dns.flags.RD  # echoed, and still no recursion
                assert len(raw) <= len(query)


async def _any_is_answered_minimally(addr) -> None:
    full = dns.message.make_query("web.service.mesh.", "A").to_wire()
    assert len(await _ask_tcp(addr, full)) > 600  # a full answer here would amplify
    for name in ANY_NAMES:
        for kw in ({}, {"use_edns": 0, "payload": 4096}):
            query = dns.message.make_query(name, "ANY", **kw).to_wire()
            for ask, udp in ((_ask_udp, True), (_ask_tcp, False)):
                raw = await ask(addr, query)
                reply = check_reply(query, raw, udp=udp)
                assert reply.rcode() == dns.rcode.NOERROR and not reply.flags & dns.flags.TC
                records = [r.to_text() for rrset in reply.answer for r in rrset]
                assert records == ['"RFC8482" ""'] and not reply.additional
                assert len(raw) <= len(query) + ANY_OVERHEAD


# A bug in answering costs one reply, never the loop.


class _Faulty:
    """The answer table with a bug: the query for ``poison.mesh.`` raises."""

    def __init__(self, answers) -> None:
        self._answers = answers
        self.native = answers.native  # the poison is in no table: it reaches general()

    def answer(self, data: bytes, *, udp: bool = True):
        if b"\x06poison" in data:
            raise RuntimeError("a bug")
        return self._answers.answer(data, udp=udp)

    def general(self, data: bytes, udp: bool = True):  # what the UDP path asks after the table
        return self.answer(data, udp=udp)


@pytest.mark.parametrize("servfail_too", [False, True], ids=["servfail", "nothing"])
async def test_an_answering_bug_costs_one_reply(monkeypatch, caplog, servfail_too):
    caplog.set_level(logging.ERROR, logger="sidecar.dns_server")
    server = await serve()
    server.answers = _Faulty(server.answers)
    if servfail_too:  # the error reply cannot be built either

        def broken(data, ra=0):
            raise RuntimeError("another bug")

        monkeypatch.setattr("sidecar.dns_server.servfail", broken)
    poison = dns.message.make_query("poison.mesh.", "A").to_wire()
    good = dns.message.make_query("i07.web.service.mesh.", "A").to_wire()
    sentinels = Sentinels()
    try:
        client = await UdpClient.open(server.addresses[0])
        try:
            if servfail_too:  # no reply for it; the batch goes on after it
                client.transport.sendto(poison)
                await client.exchange([good, good], sentinels)
            else:
                replies = await client.exchange([poison, good, good], sentinels)
                assert dns.message.from_wire(replies[0]).rcode() == dns.rcode.SERVFAIL
        finally:
            client.close()
        tcp = await TcpClient.open(server.addresses[0])
        try:
            await tcp.send(poison)
            if not servfail_too:
                assert dns.message.from_wire(await tcp.reply()).rcode() == dns.rcode.SERVFAIL
            await tcp.ask(sentinels)
        finally:
            tcp.close()
    finally:
        await server.close()
    assert server.errors.count == 2
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["dns"]  # one line a second


# The forwarding path under fuzzing: names outside the zone go to an upstream.

FAR = Snapshot.of(
    Instance(service="far", instance=f"f{n:02d}", address=f"127.0.4.{n}", port=7000 + n)
    for n in range(1, 41)
)


def _forward_corpus() -> list[bytes]:
    names = ["f01.far.service.up.test.", "_far._tcp.service.up.test.", "nope.up.test."]
    types = ["A", "SRV", "ANY", "TXT"]
    options = [{}, {"use_edns": 0, "payload": 1232}, {"use_edns": 0, "payload": 700}]
    return [
        dns.message.make_query(name, rdtype, **kw).to_wire()
        for name in names
        for rdtype in types
        for kw in options
    ] + CORPUS[::7]


FORWARD_CORPUS = _forward_corpus()
FORWARD_WINDOWS = 120  # windows of 16 datagrams, each answered within the forward deadline


@pytest.mark.one_loop
async def test_fuzzed_datagrams_through_the_forwarder(caplog):
    caplog.set_level(logging.WARNING, logger="sidecar")
    upstream = DnsServer(ZoneConfig(domain="up.test"))
    await upstream.start([("127.0.0.1", 0)])
    upstream.update(FAR)
    await upstream.wait_rebuilt()
    server = await serve(upstream=upstream.addresses[0])
    client = await UdpClient.open(server.addresses[0])
    rng = random.Random(23)
    sent = 0
    try:
        for w in range(FORWARD_WINDOWS):
            # Forwarded replies come back out of order: each datagram gets its own ID.
            window = {}
            for k in range(16):
                packet = bytearray(mutate(rng, rng.choice(FORWARD_CORPUS), edits=1))
                packet[:2] = struct.pack("!H", w * 16 + k)
                window[bytes(packet[:2])] = bytes(packet)
            for packet in window.values():
                client.transport.sendto(packet)
            sent += len(window)
            expected = {qid: p for qid, p in window.items() if expects_reply(p)}
            async with asyncio.timeout(FORWARD_DEADLINE + REPLY_TIMEOUT):
                while expected:
                    reply = await client.replies.get()
                    check_reply(expected.pop(reply[:2]), reply)
        # Both zones still answered correctly, the upstream's through the sidecar.
        far = dns.message.make_query("f07.far.service.up.test.", "A").to_wire()
        client.transport.sendto(far)
        async with asyncio.timeout(REPLY_TIMEOUT):
            reply = check_reply(far, await client.replies.get())
        assert _addresses(reply, dns.rdatatype.A) == {"127.0.4.7"}
        await client.exchange([], Sentinels())
    finally:
        client.close()
        await server.close()
        await upstream.close()
    assert sent == FORWARD_WINDOWS * 16
    assert server.errors.count == upstream.errors.count == 0
    assert server.forwarder.inflight == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
