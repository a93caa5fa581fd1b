"""Documents written by someone else: readers skip what does not decode, with a log line,
and keep serving everything that does."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from pymongo import AsyncMongoClient

from registry import leases
from registry.model import Instance


async def test_bad_documents_are_skipped_and_logged(store, db_url, caplog):
    await store.register(Instance(service="web", instance="good", address="10.0.0.1", port=80), 30)
    later = leases.utcnow() + timedelta(seconds=30)
    client: AsyncMongoClient = AsyncMongoClient(db_url, tz_aware=True)
    col = client.get_default_database()["instances"]
    held = client.get_default_database()["leases"]
    bad = [
        {"_id": "web/no-address", "service": "web", "instance": "no-address", "port": 80},
        {"_id": "web/port", "service": "web", "instance": "port", "address": "10.0.0.2", "port": 70000},
        {"_id": "Web/Upper", "service": "Web", "instance": "Upper", "address": "10.0.0.3", "port": 80},
        {"_id": "web/meta", "service": "web", "instance": "meta", "address": "10.0.0.4", "port": 80,
         "meta": {"k": "x" * 10_000}},
        {"_id": "web/mismatch", "service": "web", "instance": "other", "address": "10.0.0.5", "port": 80},
        {"_id": "web/weight", "service": "web", "instance": "weight", "address": "10.0.0.6", "port": 80,
         "weight": "heavy"},
    ]  # fmt: skip
    # Unknown fields from a newer writer are ignored, not fatal.
    extra = {
        "_id": "web/extra", "service": "web", "instance": "extra", "address": "10.0.0.7", "port": 81,
        "future_field": {"x": 1}, "schema": 2,
    }  # fmt: skip
    for doc in [*bad, extra]:
        await held.insert_one({"_id": doc["_id"], "expires_at": later})
        await col.insert_one(doc)
    # The old layout, the lease in the instance document and none in leases: skipped too.
    old = {"_id": "web/old", "service": "web", "instance": "old", "address": "10.0.0.8", "port": 80,
           "lease_expires_at": later}  # fmt: skip
    await col.insert_one(old)
    bad.append(old)
    await client.close()

    watch = store.watch()
    with caplog.at_level(logging.WARNING, logger="registry.store"):
        listed = await store.list()
        snap = await asyncio.wait_for(anext(watch), 5)
        await store.list()
    assert [i.id for i in listed] == ["web/extra", "web/good"]
    assert [i.id for i in snap.instances] == ["web/extra", "web/good"]
    skipped = [r.getMessage() for r in caplog.records if "does not decode" in r.getMessage()]
    for doc in bad:
        lines = [line for line in skipped if repr(doc["_id"]) in line]
        assert len(lines) == 1, f"{doc['_id']}: {len(lines)} log lines, want one however often it is read"
    await watch.aclose()
