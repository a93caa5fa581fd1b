"""Pure DNS answering: a registry snapshot becomes a table of pre-rendered replies.

Rendering a reply with dnspython costs ~350 µs; a DNS responder that does it per query tops
out near 2.7k queries/s. So every reply the zone can give is rendered once per snapshot
(:func:`build`), and per query :meth:`Answers.answer` only

1. reads the 12-byte header and the question,
2. looks ``lower(qname) + qtype + qclass`` up in one table,
3. joins the query's ID, the flags (RD echoed), the counts, the query's own question bytes
   (so the client's letter case comes back, RFC 4343 §4.1) and the rendered rest.

A reply that can be sent whole is answered by the native core (``mesh_native.DnsTable``,
installed with each table); this module's own reader answers the rest: misses, truncation,
EDNS versions, malformed queries.

Truncation needs no second rendering: compression pointers only point backwards, so the
first *k* records of a rendered reply are a valid reply too. Each entry keeps the byte offset
after every record; a reply that does not fit the limit (512 bytes, or the client's EDNS0
size) is cut at the last record that fits. TC is set only when the answer or authority
section lost records; dropping additional records alone does not set it (RFC 2181 §9).

Names and records follow DESIGN.md §4; only ``passing`` instances are served.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.renderer
import dns.rrset
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.IN.SRV import SRV

from mesh_native import DnsTable
from registry.model import Instance, Snapshot

# Limits, each with its reason.
HEADER_SIZE = 12
MAX_NAME_WIRE = 255  # RFC 1035 §2.3.4
MAX_LABEL = 63  # RFC 1035 §2.3.4; 0b01/0b10/0b11 prefixes are pointers or obsolete
CLASSIC_UDP_LIMIT = 512  # RFC 1035 §4.2.1, for a query without EDNS0
MAX_UDP_PAYLOAD = 1232  # DNS Flag Day 2020 and BIND 9.16+: no IP fragmentation on any path
MAX_TCP_MESSAGE = 65535  # the two-byte length prefix (RFC 1035 §4.2.2)
MAX_ROTATIONS = 16  # orders kept per reply (memory: 16 × the reply)
SRV_PRIORITY = 1  # one priority for every instance: the weight spreads the load (RFC 2782)
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 86400  # the values Consul's SOA carries

# Wire constants.
TYPE_A, TYPE_SOA, TYPE_HINFO, TYPE_AAAA, TYPE_SRV, TYPE_OPT, TYPE_ANY = 1, 6, 13, 28, 33, 41, 255
CLASS_IN = 1
QR, AA, TC, RD, RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080
OPCODE_MASK = 0x7800
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16  # RFC 6891 §6.1.3: 12 bits, the upper 8 in the OPT TTL
DO_BIT = 0x80  # first byte of the OPT flags field (RFC 3225)

_NO_TRANSFER = (b"\x00\xfb", b"\x00\xfc")  # IXFR, AXFR

FORWARD = "forward"  # a query for a name outside the zone, to pass to the upstream

_SHORT = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class Query:
    """What the hot path read from a query: enough to answer it, or to say why not."""

    qid: bytes  # the two ID bytes as received
    flags: int
    question: bytes  # qname + qtype + qclass exactly as received (client's case)
    key: bytes  # lower(qname) + qtype + qclass
    edns: bool
    payload: int  # the client's EDNS0 UDP size (0 without EDNS0)
    do: bool
    version: int


class Entry:
    """One rendered reply: the bytes after the question, and where each record ends."""

    __slots__ = ("rcode", "counts", "rest", "cuts", "full_an", "full_ns", "rotations")

    def __init__(
        self, rcode: int, rest: bytes, cuts: list[tuple[int, int, int, int]], counts: tuple
    ) -> None:
        self.rcode = rcode
        self.rest = rest
        # (offset into rest after a record, an, ns, ar) for every record boundary, ascending.
        self.cuts = cuts
        self.counts = counts  # (an, ns, ar) of the whole reply
        self.full_an, self.full_ns = counts[0], counts[1]
        # The same reply with its records in other orders (A/AAAA): same length, same cuts.
        self.rotations: tuple[bytes, ...] = (rest,)

    def __repr__(self) -> str:
        an, ns, ar = self.counts
        return f"<Entry rcode={self.rcode} an={an} ns={ns} ar={ar} bytes={len(self.rest)}>"


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


def _wire_key(name: dns.name.Name, qtype: int, qclass: int = CLASS_IN) -> bytes:
    return name.canonicalize().to_wire() + _SHORT.pack(qtype) + _SHORT.pack(qclass)


def _render(
    qname: dns.name.Name,
    qtype: int,
    *,
    rcode: int = NOERROR,
    answer: Iterable[dns.rrset.RRset] = (),
    authority: Iterable[dns.rrset.RRset] = (),
    additional: Iterable[dns.rrset.RRset] = (),
    compress: bool = True,
) -> Entry:
    """Render one reply with one record per RRset piece, noting each record's end.

    ``compress=False`` for replies shared by every question (NXDOMAIN, NODATA): their bytes
    follow questions of any length, so they may hold no pointer at all.
    """
    r = dns.renderer.Renderer(id=0, flags=0, max_size=MAX_TCP_MESSAGE)
    if not compress:
        r.compress = None
    r.add_question(qname, qtype, CLASS_IN)
    start = r.output.tell()
    cuts: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]
    counts = [0, 0, 0]
    sections = (
        (dns.renderer.ANSWER, answer),
        (dns.renderer.AUTHORITY, authority),
        (dns.renderer.ADDITIONAL, additional),
    )
    try:
        for index, (section, rrsets) in enumerate(sections):
            for rrset in rrsets:
                single = len(rrset) == 1  # already one record: rendered as it is
                for rdata in rrset:
                    one = (
                        rrset
                        if single
                        else dns.rrset.from_rdata_list(rrset.name, rrset.ttl, [rdata])
                    )
                    r.add_rrset(section, one)
                    counts[index] += 1
                    cuts.append((r.output.tell() - start, *counts))
    except dns.exception.TooBig:
        pass  # more than a TCP message holds: serve what fits (the renderer rolled back)
    wire = r.get_wire()
    return Entry(rcode, wire[start:], cuts, tuple(counts))


def _address_rrset(name: dns.name.Name, addresses: Iterable[str], ttl: int, v6: bool):
    rdtype = dns.rdatatype.AAAA if v6 else dns.rdatatype.A
    make = AAAA if v6 else A
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
    rrset.update_ttl(ttl)
    for address in addresses:
        rrset.add(make(dns.rdataclass.IN, rdtype, address))
    return rrset


@dataclass(frozen=True, slots=True)
class ZoneConfig:
    domain: str = "mesh"
    ttl: int = 5
    forward: bool = False  # an upstream is configured: RA set, outside names forwarded


class Answers:
    """Every reply of one snapshot, ready to send. Immutable; the server swaps it whole."""

    def __init__(
        self,
        config: ZoneConfig,
        entries: dict[bytes, Entry],
        names: dict[bytes, Entry],
        nxdomain: Entry,
        zone_wire: bytes,
        revision: int,
        *,
        services: dict[str, _Rendered] | None = None,
    ) -> None:
        self.config = config
        self.services = services or {}
        self._entries = entries
        self._names = names  # existing name (lower wire) -> its NODATA reply
        self._nxdomain = nxdomain
        self._zone = zone_wire
        self._ra = RA if config.forward else 0
        self.revision = revision
        # Every reply that can be sent as rendered, in the native core: the fast path of
        # every query, and the UDP socket's batched path (sidecar/dns_server.py).
        self.native = DnsTable(
            [(key, list(e.rotations), e.rcode, e.counts) for key, e in entries.items()],
            bool(self._ra),
        )

    def __repr__(self) -> str:
        return (
            f"<Answers {self.config.domain} rev={self.revision} "
            f"entries={len(self._entries)} names={len(self._names)}>"
        )

    def __len__(self) -> int:
        return len(self._entries)

    # The hot path

    def answer(self, data: bytes, *, udp: bool = True) -> bytes | str | None:
        """The reply to ``data``: bytes to send, FORWARD, or None to drop it silently."""
        # A plain query for a name with a reply that fits whole is answered by the native
        # table (native/src/dns): header, question, lookup, the rendered bytes.
        return self.native.answer(data, udp) or self.general(data, udp)

    def general(self, data: bytes, udp: bool = True) -> bytes | str | None:
        """Every query the fast path does not take: checks, misses, truncation. The UDP
        socket's batched path calls it for what the native table declined."""
        if len(data) < HEADER_SIZE:
            return None  # not even a header: nothing to answer to
        flags = (data[2] << 8) | data[3]
        if flags & QR:
            return None  # a response: answering it could start a loop between servers
        if flags & OPCODE_MASK:
            return header_only(data, NOTIMP)
        q = parse_query(data)
        if q is None:
            return header_only(data, FORMERR)
        if q.version:
            return self._badvers(q)
        entry = self._entries.get(q.key)
        if entry is None:
            qname = q.key[:-4]
            if not in_zone(qname, self._zone):
                return FORWARD if self.config.forward else refused(q, self._ra)
            if q.key[-2:] != b"\x00\x01":
                return refused(q, self._ra)  # CHAOS, HESIOD, ANY: this zone is IN only
            if q.key[-4:-2] in _NO_TRANSFER:
                return refused(q, self._ra)  # no zone transfers: the zone is every sidecar's
            entry = self._names.get(qname, self._nxdomain)
        limit = MAX_TCP_MESSAGE
        if udp:
            limit = min(max(q.payload, CLASSIC_UDP_LIMIT), MAX_UDP_PAYLOAD) if q.edns else 512
        return self.render(q, entry, limit)

    def render(self, q: Query, entry: Entry, limit: int) -> bytes:
        flags = QR | AA | self._ra | (q.flags & RD) | entry.rcode
        opt = _opt(q.do) if q.edns else b""
        head = HEADER_SIZE + len(q.question) + len(opt)
        rest = entry.rest
        an, ns, ar = entry.counts
        if head + len(rest) > limit:
            rest, an, ns, ar = _cut(entry, limit - head)
            if an < entry.full_an or ns < entry.full_ns:
                flags |= TC
        if opt:
            ar += 1
        return b"".join(
            (
                q.qid,
                _SHORT.pack(flags),
                struct.pack("!HHHH", 1, an, ns, ar),
                q.question,
                rest,
                opt,
            )
        )

    def _badvers(self, q: Query) -> bytes:
        flags = QR | self._ra | (q.flags & RD)
        opt = b"\x00" + struct.pack("!HHBBHH", TYPE_OPT, MAX_UDP_PAYLOAD, BADVERS >> 4, 0, 0, 0)
        return q.qid + struct.pack("!HHHHH", flags, 1, 0, 0, 1) + q.question + opt


def _cut(entry: Entry, room: int) -> tuple[bytes, int, int, int]:
    """The longest prefix of whole records that fits in ``room`` bytes."""
    best = entry.cuts[0]
    for cut in entry.cuts:
        if cut[0] > room:
            break
        best = cut
    offset, an, ns, ar = best
    return entry.rest[:offset], an, ns, ar


def _opt(do: bool) -> bytes:
    """Our OPT record: root owner, our UDP payload size, version 0, DO echoed (RFC 3225)."""
    return b"\x00" + struct.pack(
        "!HHBBBBH", TYPE_OPT, MAX_UDP_PAYLOAD, 0, 0, DO_BIT if do else 0, 0, 0
    )


# Parsing the query by hand


def parse_query(data: bytes) -> Query | None:
    """Header, question and EDNS0 of a query; None if it is malformed (FORMERR)."""
    if data[4:6] != b"\x00\x01" or data[6:10] != b"\x00\x00\x00\x00":
        return None  # RFC 9619: exactly one question; a query carries no answer/authority
    end = len(data)
    i = HEADER_SIZE
    while True:
        if i >= end:
            return None
        length = data[i]
        if length == 0:
            break
        if length > MAX_LABEL:
            return None  # a pointer (or an obsolete label type) in a question: refuse it
        i += length + 1
        if i - HEADER_SIZE >= MAX_NAME_WIRE:
            return None
    qend = i + 5
    if qend > end:
        return None
    question = data[HEADER_SIZE:qend]
    edns = False
    payload = version = 0
    do = False
    arcount = (data[10] << 8) | data[11]
    if arcount:
        opt = parse_opt(data, qend, arcount)
        if opt is None:
            return None
        edns, payload, version, do = opt
    return Query(
        data[:2], (data[2] << 8) | data[3], question, question.lower(), edns, payload, do, version
    )


def parse_opt(data: bytes, start: int, arcount: int) -> tuple[bool, int, int, bool] | None:
    """Walk the additional section for an OPT record: (edns, payload, version, do)."""
    i = start
    found: tuple[bool, int, int, bool] = (False, 0, 0, False)
    seen_opt = False
    for _ in range(arcount):
        j = _skip_name(data, i)
        if j is None or j + 10 > len(data):
            return None
        rtype, rclass, ext, version, dflags, rdlen = struct.unpack_from("!HHBBBxH", data, j)
        if rtype == TYPE_OPT:
            if seen_opt or j != i + 1:
                return None  # RFC 6891 §6.1.1: one OPT, owner the root
            seen_opt = True
            found = (True, rclass, version, bool(dflags & DO_BIT))
        i = j + 10 + rdlen
        if i > len(data):
            return None
    return found


def _skip_name(data: bytes, i: int) -> int | None:
    """The offset after a (possibly compressed) name; a pointer ends a name."""
    for _ in range(128):  # a name has at most 127 labels; this also stops pointer loops
        if i >= len(data):
            return None
        length = data[i]
        if length == 0:
            return i + 1
        if length & 0xC0 == 0xC0:
            return i + 2 if i + 2 <= len(data) else None
        if length > MAX_LABEL:
            return None
        i += length + 1
    return None


def in_zone(qname: bytes, zone: bytes) -> bool:
    """True if the wire name ``qname`` (lower case) is ``zone`` or below it."""
    if len(qname) < len(zone) or not qname.endswith(zone):
        return False
    target = len(qname) - len(zone)
    i = 0
    while i < target:
        i += qname[i] + 1
    return i == target


def header_only(data: bytes, rcode: int) -> bytes:
    """A reply with no question: for FORMERR, NOTIMP and SERVFAIL when the query is unreadable."""
    flags = ((data[2] << 8) | data[3]) & (OPCODE_MASK | RD)
    return data[:2] + struct.pack("!HHHHH", QR | flags | rcode, 0, 0, 0, 0)


def refused(q: Query, ra: int = 0) -> bytes:
    flags = QR | ra | (q.flags & RD) | REFUSED
    opt = _opt(q.do) if q.edns else b""
    return q.qid + struct.pack("!HHHHH", flags, 1, 0, 0, 1 if opt else 0) + q.question + opt


def servfail(data: bytes, ra: int = 0) -> bytes:
    """SERVFAIL echoing the question when it can be read, else a bare header."""
    if len(data) < HEADER_SIZE:
        return b""
    q = parse_query(data)
    if q is None:
        return header_only(data, SERVFAIL)
    flags = QR | ra | (q.flags & RD) | SERVFAIL
    return q.qid + struct.pack("!HHHHH", flags, 1, 0, 0, 0) + q.question


# Building the table


@dataclass
class _Node:
    """The records one owner name has while the table is built."""

    v4: dict[str, None]
    v6: dict[str, None]
    srv: list[_Records]


def _name_in(zone: dns.name.Name, *labels: str) -> dns.name.Name | None:
    """``labels`` under ``zone``, or None when that name cannot exist: a label over 63
    octets (``_<service>`` for a 63-character service) or a name over 255. Such a name
    gets no records; every other name of the zone is served as usual."""
    try:
        return dns.name.Name(labels).concatenate(zone)
    except dns.exception.DNSException:
        return None


def _instance_target(inst: Instance, zone: dns.name.Name) -> dns.name.Name | None:
    return _name_in(zone, inst.instance, inst.service, "service")


def build(snapshot: Snapshot, config: ZoneConfig, previous: Answers | None = None) -> Answers:
    """Render every reply the zone gives for ``snapshot``; pure, deterministic.

    With ``previous`` (the table being replaced), services whose healthy instances did not
    change keep their rendered replies: a registry of many services costs one service's
    rendering per change, not the whole zone's.
    """
    zone = _name(config.domain)
    ttl = config.ttl
    reuse = previous.services if previous is not None and previous.config == config else {}
    soa = _soa(zone, snapshot.revision, ttl)
    nodata = _render(zone, TYPE_A, authority=[soa], compress=False)  # follows any question
    entries: dict[bytes, Entry] = {
        _wire_key(zone, TYPE_SOA): _render(zone, TYPE_SOA, answer=[soa]),
        # RFC 8482 §4.1: ANY may be answered with a subset of what the name has.
        _wire_key(zone, TYPE_ANY): _render(zone, TYPE_ANY, answer=[soa]),
    }
    names: dict[bytes, Entry] = {zone.canonicalize().to_wire(): nodata}
    services: dict[str, _Rendered] = {}
    for service, instances in sorted(snapshot.services().items()):
        healthy = tuple(i for i in instances if i.healthy)
        if not healthy:
            continue  # no healthy instance: answered like a name that does not exist
        key = tuple(i.visible_key() for i in healthy)
        rendered = reuse.get(service)
        if rendered is None or rendered.key != key:
            rendered = _render_service(service, healthy, zone, ttl, key, rendered)
        services[service] = rendered
        entries.update(rendered.entries)
        names.update(dict.fromkeys(rendered.names, nodata))
    nxdomain = _render(zone, TYPE_A, rcode=NXDOMAIN, authority=[soa], compress=False)
    return Answers(
        config,
        entries,
        names,
        nxdomain,
        zone.canonicalize().to_wire(),
        snapshot.revision,
        services=services,
    )


@dataclass(frozen=True, slots=True)
class _Rendered:
    """One service's replies, kept for the next build while its instances stay the same."""

    key: tuple
    entries: dict[bytes, Entry]
    names: tuple[bytes, ...]  # every name the service makes exist, and their parents
    # Each instance's own name's replies, by Instance.visible_key(): kept for the next
    # build of the service when that instance did not change.
    own: dict[tuple, dict[bytes, Entry]]


class _Records:
    """One instance's records, made once per rendering of its service and shared by every
    owner name it appears under (the service, its SRV names, its tags)."""

    __slots__ = ("target", "srv", "address")

    def __init__(self, inst: Instance, target: dns.name.Name, ttl: int) -> None:
        self.target = target
        self.srv = SRV(
            dns.rdataclass.IN, dns.rdatatype.SRV, SRV_PRIORITY, inst.weight, inst.port, target
        )
        self.address = _address_rrset(target, [inst.address], ttl, v6=inst.ipv6)


def _render_service(
    service: str,
    healthy: tuple[Instance, ...],
    zone: dns.name.Name,
    ttl: int,
    key: tuple,
    previous: _Rendered | None = None,
) -> _Rendered:
    nodes: dict[dns.name.Name, _Node] = {}
    svc = _name_in(zone, service, "service")
    if svc is None:
        return _Rendered(key, {}, (), {})
    rfc2782 = [
        n
        for n in (
            _name_in(zone, f"_{service}", "_tcp", "service"),
            _name_in(zone, f"_{service}", "_tcp"),
        )
        if n is not None
    ]
    entries: dict[bytes, Entry] = {}
    names: dict[bytes, None] = {}
    own: dict[tuple, dict[bytes, Entry]] = {}
    kept = previous.own if previous is not None else {}
    # An instance named like a tag of the service (`blue.web.service.mesh`) shares that
    # name's records with the tag's instances; every other instance name is its own.
    tag_names = {_name_in(svc, t) for i in healthy for t in i.tags} - {None}
    for inst in healthy:
        target = _instance_target(inst, zone)
        if target is None:
            continue
        records = _Records(inst, target, ttl)
        owners = [svc, *rfc2782]
        for tag in inst.tags:
            owners.append(_name_in(svc, tag))
            if tag != "tcp":  # `_<svc>._tcp` means every instance (RFC 2782 / Consul)
                owners.append(_name_in(zone, f"_{service}", f"_{tag}", "service"))
        for owner in owners:
            if owner is None:
                continue
            n = nodes.get(owner)
            if n is None:
                n = nodes[owner] = _Node({}, {}, [])
            (n.v6 if inst.ipv6 else n.v4)[inst.address] = None
            n.srv.append(records)
        if target in tag_names:
            n = nodes.setdefault(target, _Node({}, {}, []))
            (n.v6 if inst.ipv6 else n.v4)[inst.address] = None
            continue
        # The instance's own name: its address, and nothing else.
        visible = inst.visible_key()
        mine = kept.get(visible)
        if mine is None:
            mine = _render_own(target, records.address, ttl)
        own[visible] = mine
        entries.update(mine)
        for ancestor in _ancestors(target, zone):
            names[ancestor.canonicalize().to_wire()] = None
    for name, n in nodes.items():
        for ancestor in _ancestors(name, zone):
            names[ancestor.canonicalize().to_wire()] = None
        if not name.labels[0].startswith(b"_"):  # SRV names carry SRV only
            if n.v4:
                a = _address_rrset(name, n.v4, ttl, v6=False)
                entries[_wire_key(name, TYPE_A)] = _rotating(name, TYPE_A, a)
            if n.v6:
                aaaa = _address_rrset(name, n.v6, ttl, v6=True)
                entries[_wire_key(name, TYPE_AAAA)] = _rotating(name, TYPE_AAAA, aaaa)
        if n.srv:
            entries[_wire_key(name, TYPE_SRV)] = _srv_entry(name, n.srv, ttl)
        entries[_wire_key(name, TYPE_ANY)] = _render(name, TYPE_ANY, answer=[_rfc8482(name, ttl)])
    return _Rendered(key, entries, tuple(names), own)


def _render_own(target: dns.name.Name, address: dns.rrset.RRset, ttl: int) -> dict[bytes, Entry]:
    qtype = TYPE_AAAA if address.rdtype == dns.rdatatype.AAAA else TYPE_A
    return {
        _wire_key(target, qtype): _rotating(target, qtype, address),
        _wire_key(target, TYPE_ANY): _render(target, TYPE_ANY, answer=[_rfc8482(target, ttl)]),
    }


def _rotating(name: dns.name.Name, qtype: int, rrset: dns.rrset.RRset) -> Entry:
    return _rotate(_render(name, qtype, answer=[rrset]))


def _rotate(entry: Entry) -> Entry:
    """Give ``entry`` other orders of its answer records, cut from the one rendering.

    Stub resolvers mostly take the first address, and clients that skip RFC 2782's
    weighted pick the first SRV record; so the first record changes from one reply to the
    next, as with Consul, CoreDNS's loadbalance and dnsmasq. Reordering the bytes is valid
    here: every answer owner is a pointer to the question, and SRV targets are written
    uncompressed and never become compression targets (RFC 2782), so no later record
    points into the answer section.
    """
    an = entry.counts[0]
    if an < 2:
        return entry
    offsets = [cut[0] for cut in entry.cuts[: an + 1]]
    chunks = [entry.rest[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
    tail = entry.rest[offsets[-1] :]
    k = min(an, MAX_ROTATIONS)
    entry.rotations = tuple(
        b"".join(chunks[start:] + chunks[:start]) + tail
        for start in (step * an // k for step in range(k))
    )
    return entry


def _ancestors(name: dns.name.Name, zone: dns.name.Name) -> Iterable[dns.name.Name]:
    """``name`` and every name between it and the zone: empty non-terminals exist (RFC 8020)."""
    while name.is_subdomain(zone):
        yield name
        if name == zone:
            return
        name = name.parent()


def _srv_entry(name: dns.name.Name, records: list[_Records], ttl: int) -> Entry:
    srv = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.SRV)
    srv.update_ttl(ttl)
    extra: list[dns.rrset.RRset] = []
    seen: set[dns.name.Name] = set()
    for rec in records:
        srv.add(rec.srv)
        if rec.target not in seen:
            seen.add(rec.target)
            extra.append(rec.address)
    return _rotate(_render(name, TYPE_SRV, answer=[srv], additional=extra))


def _soa(zone: dns.name.Name, revision: int, ttl: int) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(zone, dns.rdataclass.IN, dns.rdatatype.SOA)
    rrset.update_ttl(ttl)
    # The SOA minimum is the negative-caching TTL (RFC 2308 §5): as short as the answers.
    rrset.add(
        dns.rdata.from_text(
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            f"ns.{zone.to_text()} postmaster.{zone.to_text()} {revision % 2**32} "
            f"{SOA_REFRESH} {SOA_RETRY} {SOA_EXPIRE} {ttl}",
        )
    )
    return rrset


def _rfc8482(name: dns.name.Name, ttl: int) -> dns.rrset.RRset:
    """RFC 8482 §4.2: answer ANY with one synthesized HINFO, so ANY cannot amplify."""
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.HINFO)
    rrset.update_ttl(ttl)
    rrset.add(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.HINFO, '"RFC8482" ""'))
    return rrset


def empty(config: ZoneConfig) -> Answers:
    """The table before the first snapshot: every name in the zone is NXDOMAIN."""
    return build(Snapshot(), config)
