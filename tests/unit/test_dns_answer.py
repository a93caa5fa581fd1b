"""The answer table: query bytes in, response bytes out, checked with dnspython's parser."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.model import Instance, Snapshot
from sidecar.dns_answer import FORWARD, ZoneConfig, build, empty, servfail


def inst(name, address, port=8080, *, service="web", tags=(), weight=100, status="passing"):
    return Instance(
        service=service,
        instance=name,
        address=address,
        port=port,
        tags=tags,
        weight=weight,
        status=status,
    )


SNAP = Snapshot.of(
    [
        inst("a", "10.0.0.1", 8001, tags=("blue",), weight=10),
        inst("b", "10.0.0.2", 8002, tags=("green",), weight=20),
        inst("c", "fd00::3", 8003, tags=("blue",)),
        inst("sick", "10.0.0.9", 8009, status="critical"),
        inst("gone", "10.0.0.8", 8008, status="draining"),
        inst("x", "10.9.0.1", 5432, service="db", status="critical"),
    ],
    revision=42,
)
ANSWERS = build(SNAP, ZoneConfig())


def ask(name, rdtype="A", *, answers=ANSWERS, udp=True, **kw) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    wire = answers.answer(query.to_wire(), udp=udp)
    assert isinstance(wire, bytes), wire
    reply = dns.message.from_wire(wire)
    assert reply.id == query.id
    return reply


def rdatas(reply, rdtype):
    return sorted(r.to_text() for rrset in reply.answer if rrset.rdtype == rdtype for r in rrset)


def additional(reply):
    return sorted((rrset.name.to_text(), r.to_text()) for rrset in reply.additional for r in rrset)


# Record kinds


@pytest.mark.parametrize("name", ["_web._tcp.service.mesh.", "_web._tcp.mesh."])
def test_srv_lists_passing_instances_with_registry_weights_and_glue(name):
    reply = ask(name, "SRV")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.AA
    assert rdatas(reply, dns.rdatatype.SRV) == [
        "1 10 8001 a.web.service.mesh.",
        "1 100 8003 c.web.service.mesh.",
        "1 20 8002 b.web.service.mesh.",
    ]
    assert additional(reply) == [
        ("a.web.service.mesh.", "10.0.0.1"),
        ("b.web.service.mesh.", "10.0.0.2"),
        ("c.web.service.mesh.", "fd00::3"),
    ]
    assert all(rrset.ttl == 5 for rrset in reply.answer)


def test_service_a_and_aaaa():
    assert rdatas(ask("web.service.mesh."), dns.rdatatype.A) == ["10.0.0.1", "10.0.0.2"]
    assert rdatas(ask("web.service.mesh.", "AAAA"), dns.rdatatype.AAAA) == ["fd00::3"]


def test_tag_filtered_names():
    assert rdatas(ask("blue.web.service.mesh."), dns.rdatatype.A) == ["10.0.0.1"]
    assert rdatas(ask("blue.web.service.mesh.", "AAAA"), dns.rdatatype.AAAA) == ["fd00::3"]
    srv = rdatas(ask("_web._green.service.mesh.", "SRV"), dns.rdatatype.SRV)
    assert srv == ["1 20 8002 b.web.service.mesh."]
    srv = rdatas(ask("blue.web.service.mesh.", "SRV"), dns.rdatatype.SRV)
    assert srv == ["1 10 8001 a.web.service.mesh.", "1 100 8003 c.web.service.mesh."]


def test_instance_names():
    assert rdatas(ask("a.web.service.mesh."), dns.rdatatype.A) == ["10.0.0.1"]
    assert rdatas(ask("c.web.service.mesh.", "AAAA"), dns.rdatatype.AAAA) == ["fd00::3"]


def test_case_is_echoed_and_matched_insensitively():
    reply = ask("_WEB._Tcp.SeRvIcE.MESH.", "SRV")
    assert reply.question[0].name.to_text() == "_WEB._Tcp.SeRvIcE.MESH."
    assert reply.answer[0].name.to_text() == "_WEB._Tcp.SeRvIcE.MESH."
    assert len(rdatas(reply, dns.rdatatype.SRV)) == 3
    assert rdatas(ask("A.Web.SERVICE.mesh."), dns.rdatatype.A) == ["10.0.0.1"]


def test_custom_domain_and_ttl():
    answers = build(SNAP, ZoneConfig(domain="corp.example", ttl=30))
    reply = ask("web.service.corp.example.", answers=answers)
    assert rdatas(reply, dns.rdatatype.A) == ["10.0.0.1", "10.0.0.2"]
    assert reply.answer[0].ttl == 30
    assert ask("web.service.mesh.", answers=answers).rcode() == dns.rcode.REFUSED


# Negative answers


@pytest.mark.parametrize(
    "name",
    [
        "nope.service.mesh.",
        "sick.web.service.mesh.",  # critical
        "gone.web.service.mesh.",  # draining
        "db.service.mesh.",  # a service with no healthy instance
        "_db._tcp.service.mesh.",
        "a.b.c.web.service.mesh.",
    ],
)
def test_nxdomain_with_soa(name):
    reply = ask(name, "SRV" if name.startswith("_") else "A")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.flags & dns.flags.AA
    assert not reply.answer
    (soa,) = reply.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == "mesh."
    assert soa[0].serial == 42 and soa[0].minimum == 5


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("a.web.service.mesh.", "AAAA"),  # exists, only IPv4
        ("web.service.mesh.", "TXT"),
        ("_web._tcp.service.mesh.", "A"),
        ("service.mesh.", "A"),  # an empty non-terminal (RFC 8020)
        ("mesh.", "NS"),
    ],
)
def test_nodata_with_soa(name, rdtype):
    reply = ask(name, rdtype)
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.answer
    assert reply.authority[0].rdtype == dns.rdatatype.SOA


def test_apex_soa():
    reply = ask("MESH.", "SOA")
    assert reply.answer[0].rdtype == dns.rdatatype.SOA
    assert reply.answer[0][0].mname.to_text().lower() == "ns.mesh."


def test_empty_registry_is_all_nxdomain():
    assert ask("web.service.mesh.", answers=empty(ZoneConfig())).rcode() == dns.rcode.NXDOMAIN


# Outside the zone


def test_outside_names_are_refused_without_upstream():
    for name in ("example.com.", "xmesh.", "mesh.example.", "."):
        reply = ask(name)
        assert reply.rcode() == dns.rcode.REFUSED
        assert not reply.flags & dns.flags.AA


def test_outside_names_are_forwarded_with_upstream():
    answers = build(SNAP, ZoneConfig(forward=True))
    query = dns.message.make_query("example.com.", "A")
    assert answers.answer(query.to_wire()) == FORWARD
    reply = ask("web.service.mesh.", answers=answers)
    assert reply.flags & dns.flags.RA  # the sidecar is the container's resolver


def test_other_classes_and_zone_transfers_are_refused():
    assert ask("web.service.mesh.", rdclass="CH").rcode() == dns.rcode.REFUSED
    assert ask("mesh.", "AXFR", udp=False).rcode() == dns.rcode.REFUSED
    assert ask("mesh.", "IXFR", udp=False).rcode() == dns.rcode.REFUSED


def test_any_is_answered_minimally():
    reply = ask("_web._tcp.service.mesh.", "ANY")
    assert [r.to_text() for rrset in reply.answer for r in rrset] == ['"RFC8482" ""']
    assert not reply.additional
    apex = ask("mesh.", "ANY")  # the apex has a record of its own to give: its SOA
    assert [rrset.rdtype for rrset in apex.answer] == [dns.rdatatype.SOA]


# EDNS0 and truncation

BIG = build(
    Snapshot.of(
        inst(f"instance-{n:02d}", f"10.1.0.{n}", 9000 + n, tags=("t",)) for n in range(1, 41)
    ),
    ZoneConfig(),
)


def test_udp_without_edns_is_truncated_at_512_with_tc():
    query = dns.message.make_query("_web._tcp.service.mesh.", "SRV")
    wire = BIG.answer(query.to_wire())
    assert len(wire) <= 512
    reply = dns.message.from_wire(wire)
    assert reply.flags & dns.flags.TC
    assert 0 < len(rdatas(reply, dns.rdatatype.SRV)) < 40
    assert not reply.additional


def test_tcp_gets_the_whole_answer():
    reply = ask("_web._tcp.service.mesh.", "SRV", answers=BIG, udp=False)
    assert not reply.flags & dns.flags.TC
    assert len(rdatas(reply, dns.rdatatype.SRV)) == 40
    assert len(additional(reply)) == 40


@pytest.mark.parametrize("payload", [512, 700, 1000, 1232])
def test_edns_size_is_honoured_and_opt_echoed(payload):
    query = dns.message.make_query("_web._tcp.service.mesh.", "SRV", use_edns=0, payload=payload)
    wire = BIG.answer(query.to_wire())
    assert len(wire) <= payload
    reply = dns.message.from_wire(wire)
    assert reply.edns == 0 and reply.payload >= 512
    assert reply.flags & dns.flags.TC
    assert len(rdatas(reply, dns.rdatatype.SRV)) > (payload - 100) // 60


def test_large_edns_size_is_capped_at_our_payload():
    query = dns.message.make_query("_web._tcp.service.mesh.", "SRV", use_edns=0, payload=65000)
    assert len(BIG.answer(query.to_wire())) <= 1232


def test_edns_size_below_512_counts_as_512():
    query = dns.message.make_query("web.service.mesh.", "A", use_edns=0, payload=100)
    assert len(BIG.answer(query.to_wire())) > 100


def test_dropping_only_glue_does_not_set_tc():
    # Some sizes fit every SRV record in 512 bytes but not all their A records: the reply
    # then keeps every SRV record, loses glue, and has no TC (RFC 2181 §9).
    trimmed = 0
    for n in range(5, 16):
        snap = Snapshot.of(inst(f"i{k:02d}", f"10.2.0.{k}", 9000 + k) for k in range(n))
        query = dns.message.make_query("_web._tcp.mesh.", "SRV")
        reply = dns.message.from_wire(build(snap, ZoneConfig()).answer(query.to_wire()))
        if reply.flags & dns.flags.TC:
            assert len(rdatas(reply, dns.rdatatype.SRV)) < n
            continue
        assert len(rdatas(reply, dns.rdatatype.SRV)) == n
        trimmed += len(reply.additional) < n
    assert trimmed


def test_do_bit_is_echoed():
    reply = ask("web.service.mesh.", use_edns=0, want_dnssec=True)
    assert reply.ednsflags & dns.flags.DO


def test_unknown_edns_version_gets_badvers():
    reply = ask("web.service.mesh.", use_edns=1)
    assert reply.rcode() == dns.rcode.BADVERS


def test_rd_is_echoed():
    assert ask("web.service.mesh.").flags & dns.flags.RD
    query = dns.message.make_query("web.service.mesh.", "A")
    query.flags &= ~dns.flags.RD
    reply = dns.message.from_wire(ANSWERS.answer(query.to_wire()))
    assert not reply.flags & dns.flags.RD


# Bad packets

QUERY = dns.message.make_query("web.service.mesh.", "A").to_wire()


def test_short_packets_and_responses_are_dropped():
    assert ANSWERS.answer(b"") is None
    assert ANSWERS.answer(QUERY[:11]) is None
    response = bytes([QUERY[0], QUERY[1], QUERY[2] | 0x80]) + QUERY[3:]
    assert ANSWERS.answer(response) is None


def rcode_of(wire):
    return wire[3] & 0x0F


def test_formerr_for_malformed_questions():
    assert rcode_of(ANSWERS.answer(QUERY[:12])) == dns.rcode.FORMERR  # no question
    assert rcode_of(ANSWERS.answer(QUERY[:-2])) == dns.rcode.FORMERR  # cut qclass
    two = QUERY[:4] + b"\x00\x02" + QUERY[6:] + QUERY[12:]
    assert rcode_of(ANSWERS.answer(two)) == dns.rcode.FORMERR
    loop = QUERY[:12] + b"\xc0\x0c" + b"\x00\x01\x00\x01"  # a pointer to itself
    assert rcode_of(ANSWERS.answer(loop)) == dns.rcode.FORMERR
    labels = QUERY[:12] + b"\x01a" * 200 + b"\x00\x00\x01\x00\x01"  # too long a name
    assert rcode_of(ANSWERS.answer(labels)) == dns.rcode.FORMERR
    bad_opt = QUERY[:10] + b"\x00\x01" + QUERY[12:] + b"\x00\x00\x29\x04"
    assert rcode_of(ANSWERS.answer(bad_opt)) == dns.rcode.FORMERR


def test_notimp_for_other_opcodes():
    query = dns.message.make_query("web.service.mesh.", "A")
    query.set_opcode(dns.opcode.NOTIFY)
    reply = dns.message.from_wire(ANSWERS.answer(query.to_wire()))
    assert reply.rcode() == dns.rcode.NOTIMP and reply.opcode() == dns.opcode.NOTIFY


def test_servfail_echoes_the_question():
    reply = dns.message.from_wire(servfail(QUERY))
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.question[0].name.to_text() == "web.service.mesh."
    assert struct.unpack("!H", servfail(b"\x12\x34" + b"\x00" * 10)[:2]) == (0x1234,)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    reply = ANSWERS.answer(data)
    assert reply is None or isinstance(reply, bytes)
    if isinstance(reply, bytes):
        assert reply[:2] == data[:2]


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=12, max_value=len(QUERY)), st.binary(max_size=40))
def test_mangled_queries_never_raise(cut, tail):
    reply = ANSWERS.answer(QUERY[:cut] + tail)
    assert reply is None or isinstance(reply, bytes)


NAMES = [
    "_web._tcp.service.mesh.",
    "WEB.service.mesh.",
    "a.web.service.mesh.",
    "blue.web.service.mesh.",
    "nope.mesh.",
    "example.com.",
    "mesh.",
]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(NAMES),
    st.sampled_from(["A", "AAAA", "SRV", "TXT", "ANY", "SOA"]),
    st.sampled_from([None, 0, 1]),
    st.integers(min_value=0, max_value=4096),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_fast_path_and_general_path_agree(name, rdtype, edns, payload, dnssec, rd, udp):
    for answers in (ANSWERS, BIG):
        kw = {} if edns is None else {"use_edns": edns, "payload": payload, "want_dnssec": dnssec}
        query = dns.message.make_query(name, rdtype, **kw)
        if not rd:
            query.flags &= ~dns.flags.RD
        wire = query.to_wire()
        fast, general = answers.answer(wire, udp=udp), answers.general(wire, udp)
        if isinstance(fast, bytes) and isinstance(general, bytes):
            # Address replies rotate their records: the same records, maybe in another order.
            assert len(fast) == len(general)
            assert dns.message.from_wire(fast) == dns.message.from_wire(general)
        else:
            assert fast == general


FORWARDING = build(SNAP, ZoneConfig(forward=True))  # RA set in every reply


def _with_rotations(general: bytes, question: bytes, rotations) -> set[bytes]:
    """``general`` (which carries the first record order) in each record order."""
    start = 12 + len(question)
    end = start + len(rotations[0])
    return {general[:start] + rest + general[end:] for rest in rotations}


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_the_native_table_sends_what_the_general_path_would_byte_for_byte(data):
    """Any query for a name the table holds, in any letter case, with any header bits, any
    OPT (or a broken one) and trailing bytes: what the native core sends is what the
    general path renders, byte for byte (in one of its record orders); what it declines,
    the general path answers."""
    answers = data.draw(st.sampled_from([ANSWERS, BIG, FORWARDING]))
    key = data.draw(st.sampled_from(sorted(answers._entries)))
    name = bytes(b ^ 0x20 if chr(b).isalpha() and data.draw(st.booleans()) else b for b in key[:-4])
    question = name + key[-4:]
    flags = data.draw(st.sampled_from([0x0000, 0x0100, 0x0120, 0x0110, 0x0730, 0x8100, 0x2800]))
    flags |= data.draw(st.integers(0, 0xFF))  # RA, Z, AD, CD, rcode bits of the query
    opt = b""
    arcount = data.draw(st.sampled_from([0, 1, 1, 1, 2]))
    if arcount:
        rdata = data.draw(st.binary(max_size=12))
        rdlen = len(rdata) + data.draw(st.sampled_from([0, 0, 0, 1]))  # or one byte short
        opt = (
            b"\x00"
            + struct.pack("!HH", 41, data.draw(st.integers(0, 65535)))
            + bytes(
                [0, data.draw(st.sampled_from([0, 0, 1])), data.draw(st.sampled_from([0, 0x80])), 0]
            )
            + struct.pack("!H", rdlen)
            + rdata
        )
    tail = data.draw(st.sampled_from([b"", b"", b"\x00" * 3, b"junk"]))
    qid = data.draw(st.binary(min_size=2, max_size=2))
    wire = qid + struct.pack("!HHHHH", flags, 1, 0, 0, arcount) + question + opt + tail
    udp = data.draw(st.booleans())
    native = answers.native.answer(wire, udp)
    general = answers.general(wire, udp)
    if native is not None:
        assert isinstance(general, bytes)
        assert native in _with_rotations(general, question, answers._entries[key].rotations)


def test_every_entry_is_answered_by_the_native_table():
    for answers in (ANSWERS, BIG, FORWARDING):
        assert len(answers.native) == len(answers._entries)
        for key in answers._entries:
            wire = b"\x12\x34\x01\x00" + struct.pack("!HHHH", 1, 0, 0, 0) + key
            native = answers.native.answer(wire, False)
            assert native is not None, key
            assert native in _with_rotations(
                answers.general(wire, False), key, answers._entries[key].rotations
            )


def test_address_replies_rotate():
    firsts = set()
    for _ in range(40):
        reply = ask("web.service.mesh.", answers=BIG, udp=False)
        assert len(rdatas(reply, dns.rdatatype.A)) == 40
        firsts.add(reply.answer[0][0].address)
    assert len(firsts) == 16  # every rendered order comes round


def test_rebuild_from_the_previous_table_equals_a_fresh_build():
    base = [
        inst(f"i{n}", f"10.3.0.{n}", 9000 + n, service=f"s{n % 4}", tags=("t",)) for n in range(12)
    ]
    before = build(Snapshot.of(base, revision=1), ZoneConfig())
    changed = [*base[1:], inst("new", "10.3.1.1", 9100, service="s1")]
    changed[3] = inst(changed[3].instance, changed[3].address, 9999, service=changed[3].service)
    snap = Snapshot.of(changed, revision=2)
    incremental, fresh = build(snap, ZoneConfig(), before), build(snap, ZoneConfig())
    assert incremental.services["s2"] is before.services["s2"]  # unchanged: reused
    assert incremental.services["s1"] is not before.services["s1"]
    for name in ("s0", "s1", "s2", "s3"):
        for rdtype in ("A", "SRV", "TXT"):
            for qname in (f"{name}.service.mesh.", f"_{name}._tcp.mesh.", "i5.s1.service.mesh."):
                a = ask(qname, rdtype, answers=incremental, udp=False)
                b = ask(qname, rdtype, answers=fresh, udp=False)
                assert (a.rcode(), a.answer, a.authority, a.additional) == (
                    b.rcode(),
                    b.answer,
                    b.authority,
                    b.additional,
                )
    assert ask("i0.s0.service.mesh.", answers=incremental).rcode() == dns.rcode.NXDOMAIN
    assert ask("nope.mesh.", answers=incremental).authority[0][0].serial == 2


def test_rebuild_keeps_unchanged_instances_names_and_renders_changed_ones():
    base = [inst(f"i{n}", f"10.4.0.{n}", 9000 + n) for n in range(1, 6)]
    before = build(Snapshot.of(base, revision=1), ZoneConfig())
    moved = inst("i2", "10.4.9.9", 9002)
    snap = Snapshot.of([base[0], moved, *base[2:], inst("i9", "10.4.0.9", 9009)], revision=2)
    after = build(snap, ZoneConfig(), before)
    own_before, own_after = before.services["web"].own, after.services["web"].own
    assert own_after[base[0].visible_key()] is own_before[base[0].visible_key()]
    assert rdatas(ask("i2.web.service.mesh.", answers=after), dns.rdatatype.A) == ["10.4.9.9"]
    assert rdatas(ask("i9.web.service.mesh.", answers=after), dns.rdatatype.A) == ["10.4.0.9"]
    assert (
        ask("i2.web.service.mesh.", answers=after).answer
        == ask("i2.web.service.mesh.", answers=build(snap, ZoneConfig())).answer
    )


def test_an_instance_named_like_a_tag_shares_that_name():
    snap = Snapshot.of(
        [inst("blue", "10.5.0.1"), inst("a", "10.5.0.2", tags=("blue",))], revision=3
    )
    answers = build(snap, ZoneConfig())
    assert rdatas(ask("blue.web.service.mesh.", answers=answers), dns.rdatatype.A) == [
        "10.5.0.1",
        "10.5.0.2",
    ]
    srv = ask("blue.web.service.mesh.", "SRV", answers=answers)
    assert [r.target.to_text() for rrset in srv.answer for r in rrset] == ["a.web.service.mesh."]


def test_srv_replies_rotate_and_stay_well_formed():
    firsts = set()
    full = ask("_web._tcp.service.mesh.", "SRV", answers=BIG, udp=False)
    for _ in range(20):
        reply = ask("_web._tcp.service.mesh.", "SRV", answers=BIG, udp=False)
        assert rdatas(reply, dns.rdatatype.SRV) == rdatas(full, dns.rdatatype.SRV)
        assert additional(reply) == additional(full)
        firsts.add(reply.answer[0][0].target.to_text())
    assert len(firsts) == 16


def test_names_that_cannot_exist_are_left_out_and_the_rest_served():
    """A 63-character service or tag is valid, but `_<it>` is a 64-octet label: those SRV
    names cannot exist. Everything else, that service included, is served."""
    long_service, long_tag = "s" * 63, "t" * 63
    snap = Snapshot.of(
        [
            inst("a", "10.6.0.1"),
            inst("b", "10.6.0.2", service=long_service),
            inst("c", "10.6.0.3", service="api", tags=(long_tag,)),
        ],
        revision=4,
    )
    answers = build(snap, ZoneConfig())
    assert rdatas(ask("web.service.mesh.", answers=answers), dns.rdatatype.A) == ["10.6.0.1"]
    assert rdatas(ask(f"{long_service}.service.mesh.", answers=answers), dns.rdatatype.A) == [
        "10.6.0.2"
    ]
    assert rdatas(ask(f"{long_tag}.api.service.mesh.", answers=answers), dns.rdatatype.A) == [
        "10.6.0.3"
    ]
    srv = ask("_api._tcp.service.mesh.", "SRV", answers=answers)
    assert [r.target.to_text() for rrset in srv.answer for r in rrset] == ["c.api.service.mesh."]
