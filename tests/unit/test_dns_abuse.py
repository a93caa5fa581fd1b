"""The answer table's two paths agree on hostile input.

Most queries are answered by the fast path, which reads the header and question by hand;
the rest by the general path, which parses the query fully. A malformed query must not get
an answer from one path that the other would refuse: for any bytes, the reply of
``answer`` equals the reply of the general path alone, up to the order of the records
(replies with several records rotate).
"""

from __future__ import annotations

import random
import struct

import dns.message
from hypothesis import example, given, settings
from hypothesis import strategies as st

from registry.model import Instance, Snapshot
from sidecar.dns_answer import ZoneConfig, build

SNAP = Snapshot.of(
    [
        Instance(
            service="web",
            instance=f"i{n:02d}",
            address=f"10.0.0.{n}",
            port=9000 + n,
            tags=("blue",) if n % 2 else (),
        )
        for n in range(1, 31)
    ]
    + [Instance(service="v6", instance="x", address="fd00::1", port=80)]
)
ANSWERS = build(SNAP, ZoneConfig())

QUERIES = [
    dns.message.make_query(name, rdtype, **kw).to_wire()
    for name in ("web.service.mesh.", "_web._tcp.mesh.", "i03.web.service.mesh.", "mesh.")
    for rdtype in ("A", "AAAA", "SRV", "ANY", "SOA")
    for kw in ({}, {"use_edns": 0, "payload": 1232}, {"use_edns": 0, "want_dnssec": True})
]


def mutate(rng: random.Random, wire: bytes) -> bytes:
    q = bytearray(wire)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(4)
        if op == 0 and q:
            bit = rng.randrange(len(q) * 8)
            q[bit // 8] ^= 1 << (bit % 8)
        elif op == 1 and q:
            del q[rng.randrange(len(q)) :]
        elif op == 2:
            at = rng.randrange(len(q) + 1)
            q[at:at] = rng.randbytes(rng.randint(1, 6))
        elif op == 3 and q:
            q[rng.randrange(len(q))] = rng.randrange(256)
    return bytes(q)


def normal(reply: bytes | str | None):
    """The reply with its records' order forgotten: (header, question, sections as sets)."""
    if not isinstance(reply, bytes):
        return reply
    parsed = dns.message.from_wire(reply)
    sections = [
        frozenset((rrset.name, rrset.rdtype, r.to_text()) for rrset in section for r in rrset)
        for section in (parsed.answer, parsed.authority, parsed.additional)
    ]
    return reply[:12], parsed.question, sections, parsed.edns, parsed.payload


OPT_FIXED = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00"  # root, OPT, 1232, v0; RDLENGTH next
WEB_Q = (
    struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 1)
    + b"\x03web\x07service\x04mesh\x00\x00\x01\x00\x01"
)


@settings(max_examples=3000, deadline=None)
@given(rng=st.randoms(use_true_random=False), udp=st.booleans())
@example(rng=None, udp=True)
def test_fast_and_general_paths_agree_on_mutated_queries(rng, udp):
    data = (
        WEB_Q + OPT_FIXED + b"\x00\x05"  # an OPT whose RDATA runs past the end
        if rng is None
        else mutate(rng, rng.choice(QUERIES))
    )
    assert normal(ANSWERS.answer(data, udp=udp)) == normal(ANSWERS.general(data, udp))


def test_an_opt_record_cut_short_is_formerr_on_both_paths():
    for tail in (b"\x00\x05", b"\x00\x01", b"\x00", b"", b"\x00\x06\x00\x0c\x00\x02"):
        for udp in (True, False):
            reply = ANSWERS.answer(WEB_Q + OPT_FIXED + tail, udp=udp)
            assert isinstance(reply, bytes)
            assert dns.message.from_wire(reply).rcode() == 1  # FORMERR
