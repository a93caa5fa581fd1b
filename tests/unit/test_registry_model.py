from datetime import UTC, datetime, timedelta

import pytest

from registry import leases
from registry.backoff import Backoff
from registry.codec import from_document, to_document
from registry.errors import InvalidDocument, InvalidInstance
from registry.model import Instance, Snapshot

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def make(**kw) -> Instance:
    base = dict(service="web", instance="web-1", address="10.0.0.5", port=8080)
    base.update(kw)
    return Instance(**base)


def test_codec_round_trip_keeps_every_field():
    inst = make(
        tags=("blue", "v2"),
        meta={"zone": "a"},
        weight=7,
        status="critical",
        registered_at=T0 - timedelta(seconds=5),
        updated_at=T0,
        revision=42,
    )
    doc = to_document(inst)
    assert doc["_id"] == "web/web-1"
    assert "lease_expires_at" not in doc  # the lease lives in its own collection
    back = from_document(doc)
    assert back == inst
    assert back.meta["zone"] == "a" and back.tags == ("blue", "v2")


def test_codec_ignores_unknown_fields_and_accepts_naive_dates():
    doc = to_document(make(registered_at=T0))
    doc["written_by"] = "someone else"
    doc["registered_at"] = T0.replace(tzinfo=None)
    assert from_document(doc).registered_at == T0


@pytest.mark.parametrize(
    "change",
    [
        {"service": "Bad_Name"},
        {"port": 70000},
        {"port": "80"},
        {"address": "not-an-ip"},
        {"status": "sleeping"},
        {"_id": "other/id"},
        {"registered_at": "tomorrow"},
    ],
)
def test_codec_rejects_bad_documents(change):
    doc = to_document(make(registered_at=T0))
    doc.update(change)
    with pytest.raises(InvalidDocument):
        from_document(doc)


def test_codec_rejects_missing_fields():
    doc = to_document(make())
    del doc["address"]
    with pytest.raises(InvalidDocument, match="address"):
        from_document(doc)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"service": "-web"}, "service name"),
        ({"service": "a" * 64}, "service name"),
        ({"service": "Web"}, "service name"),
        ({"instance": ""}, "instance name"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": True}, "port"),
        ({"weight": 0}, "weight"),
        ({"weight": 65536}, "weight"),
        ({"address": "10.0.0.300"}, "address"),
        ({"tags": ("ok", "NOT OK")}, "tag"),
        ({"meta": {"k": "x" * 600}}, "meta value"),
        ({"meta": {f"k{i}": "v" for i in range(65)}}, "meta has"),
        ({"meta": {"$where": "1"}}, "meta key"),
    ],
)
def test_instance_validation_names_the_field(kw, message):
    with pytest.raises(InvalidInstance, match=message):
        make(**kw)


def test_instance_canonicalises_ipv6_and_dedups_tags():
    inst = make(address="2001:DB8:0:0::1", tags=("a", "b", "a"))
    assert inst.address == "2001:db8::1" and inst.ipv6
    assert inst.tags == ("a", "b")


def test_leases_are_decided_by_now():
    exp = leases.expiry(T0, 10)
    assert exp == T0 + timedelta(seconds=10)
    assert leases.is_live(exp, T0 + timedelta(seconds=9.999))
    assert not leases.is_live(exp, exp)  # expiry is exclusive: at the instant it is gone
    assert not leases.is_live(None, T0)
    assert leases.remaining(exp, T0 + timedelta(seconds=4)) == 6
    assert leases.remaining(exp, T0 + timedelta(seconds=40)) == 0
    assert leases.renew_interval(9) == 3


def test_lease_expiry_keeps_millisecond_precision_like_bson():
    t = T0.replace(microsecond=123456)
    assert leases.expiry(t, 1.0009).microsecond % 1000 == 0


@pytest.mark.parametrize("ttl", [0, 0.5, 10**6])
def test_lease_ttl_bounds(ttl):
    with pytest.raises(ValueError, match="lease TTL"):
        leases.expiry(T0, ttl)


def test_snapshot_same_view_ignores_leases():
    a = Snapshot.of([make(lease_expires_at=T0, revision=1)], 1)
    b = Snapshot.of([make(lease_expires_at=T0 + timedelta(seconds=5), revision=2)], 2)
    c = Snapshot.of([make(status="critical")], 3)
    assert a.same_view(b)
    assert not a.same_view(c)
    assert not a.same_view(None)
    assert a.services() == {"web": a.instances}


def test_backoff_is_capped_and_jittered():
    import random

    b = Backoff(base=0.1, cap=2.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(20)]
    assert all(0.05 <= d <= 2.0 for d in delays)
    assert max(delays[10:]) > 1.0  # grew toward the cap
    b.reset()
    assert b.next_delay() <= 0.1


def test_hold_missing_keeps_what_the_fresh_snapshot_lacks():
    from registry.follow import hold_missing

    a, b, c = make(instance="a"), make(instance="b"), make(instance="c", status="critical")
    held = Snapshot.of([a, b], 5)
    fresh = Snapshot.of([make(instance="b", status="critical"), c], 9)
    merged = hold_missing(held, fresh)
    assert [(i.instance, i.status) for i in merged.instances] == [
        ("a", "passing"),  # kept as it was
        ("b", "critical"),  # the fresh state wins where both have it
        ("c", "critical"),
    ]
    assert merged.revision == 9
    assert hold_missing(None, fresh) is fresh
    assert hold_missing(Snapshot.of([c]), fresh) is fresh
