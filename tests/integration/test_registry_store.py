"""The registry store against the embedded MongoDB wire-protocol server, over a socket."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from mesh.embedded_db import EmbeddedDB
from registry import leases
from registry.codec import to_document
from registry.errors import InvalidInstance, RegistryUnavailable
from registry.model import Instance
from registry.store import RegistryStore, mask_url


def inst(name: str = "web-1", service: str = "web", **kw) -> Instance:
    kw.setdefault("address", "10.0.0.5")
    kw.setdefault("port", 8080)
    return Instance(service=service, instance=name, **kw)


async def next_snapshot(it, timeout: float):
    return await asyncio.wait_for(anext(it), timeout)


async def test_register_list_renew_and_expiry_without_a_write(store):
    registered = await store.register(inst(), lease_ttl=2.5)
    assert registered.lease_expires_at is not None and registered.revision > 0
    [listed] = await store.list("web")
    assert listed.id == "web/web-1" and listed.address == "10.0.0.5"

    await asyncio.sleep(0.6)
    assert await store.renew("web/web-1", lease_ttl=2.5)
    [renewed] = await store.list()
    assert renewed.lease_expires_at > listed.lease_expires_at
    assert renewed.registered_at == listed.registered_at

    watch = store.watch()
    first = await next_snapshot(watch, 2)
    assert [i.id for i in first.instances] == ["web/web-1"]
    t0 = time.monotonic()
    # No write from here on: the lease alone makes the instance disappear.
    gone = await next_snapshot(watch, 2.5 + store.poll_interval + 1.0)
    assert gone.instances == ()
    assert time.monotonic() - t0 <= 2.5 + store.poll_interval + 1.0
    assert await store.list() == []
    assert not await store.renew("web/web-1", lease_ttl=2.5), "an expired lease cannot be renewed"
    await watch.aclose()


async def test_watch_sees_register_status_and_deregister_quickly(store):
    watch = store.watch()
    assert (await next_snapshot(watch, 2)).instances == ()

    async def timed(action):
        t0 = time.monotonic()
        await action
        snap = await next_snapshot(watch, 0.3)
        return snap, time.monotonic() - t0

    snap, _ = await timed(store.register(inst(), lease_ttl=30))
    assert [i.status for i in snap.instances] == ["passing"]
    snap, _ = await timed(store.set_status("web/web-1", "critical"))
    assert [i.status for i in snap.instances] == ["critical"]
    assert await store.list(healthy_only=True) == []
    snap, _ = await timed(store.deregister("web/web-1"))
    assert snap.instances == ()
    await watch.aclose()


async def test_list_filters_and_services(store):
    await store.register(inst("a-1", "alpha"), lease_ttl=30)
    await store.register(inst("b-1", "beta", status="critical"), lease_ttl=30)
    await store.register(inst("b-2", "beta", tags=("blue",)), lease_ttl=30)
    assert await store.services() == ["alpha", "beta"]
    assert [i.instance for i in await store.list("beta")] == ["b-1", "b-2"]
    assert [i.instance for i in await store.list("beta", healthy_only=True)] == ["b-2"]
    assert not await store.set_status("beta/nope", "passing")
    assert not await store.deregister("beta/nope")


async def test_concurrent_writers_lose_nothing_and_revisions_increase(store):
    writers, rounds = 50, 6

    async def writer(n: int) -> list[int]:
        revs = []
        name = f"w-{n}"
        got = await store.register(inst(name), lease_ttl=30)
        revs.append(got.revision)
        for r in range(rounds):
            await store.set_status(f"web/{name}", "critical" if r % 2 == 0 else "passing")
            assert await store.renew(f"web/{name}", lease_ttl=30)
        return revs

    await asyncio.gather(*(writer(n) for n in range(writers)))
    listed = await store.list("web")
    assert len(listed) == writers
    assert all(i.status == "passing" for i in listed)  # each writer's last update stuck
    revisions = [i.revision for i in listed]
    assert len(set(revisions)) == writers, "two writes got the same revision"
    # A registration and each status change take a revision; a renewal takes none.
    assert await store.revision() == writers * (1 + rounds)


async def test_register_refuses_invalid_input_before_the_database(db_url):
    # An unreachable URL proves nothing is sent: validation happens in the model.
    store = RegistryStore.from_url("mongodb://127.0.0.1:1/mesh")
    with pytest.raises(InvalidInstance, match="service name"):
        await store.register(inst(service="Bad Name"), lease_ttl=5)
    with pytest.raises(InvalidInstance, match="port"):
        await store.register(inst(port=0), lease_ttl=5)
    with pytest.raises(ValueError, match="lease TTL"):
        await store.register(inst(), lease_ttl=0)
    await store.close()


@pytest.mark.timeout(60)
async def test_database_killed_and_restarted(tmp_path):
    db = EmbeddedDB(data=str(tmp_path / "reg.db"))
    await asyncio.to_thread(db.start)
    store = RegistryStore.from_url(db.url, poll_interval=0.05)
    try:
        await store.start()
        await store.register(inst(), lease_ttl=60)
        await asyncio.to_thread(db.kill)
        with pytest.raises(RegistryUnavailable, match="unreachable"):
            await store.list()
        with pytest.raises(RegistryUnavailable):
            await store.register(inst("web-2"), lease_ttl=60)
        await asyncio.to_thread(db.start)  # same port, same file
        deadline = time.monotonic() + 20
        while True:
            try:
                listed = await store.list()
                break
            except RegistryUnavailable:
                assert time.monotonic() < deadline, "store did not recover"
                await asyncio.sleep(0.2)
        assert [i.id for i in listed] == ["web/web-1"]
        await store.register(inst("web-2"), lease_ttl=60)
        assert len(await store.list()) == 2
    finally:
        await store.close()
        await asyncio.to_thread(db.close)


def test_mask_url_hides_the_password():
    assert mask_url("mongodb://u:secret@h:1/db?tls=true") == "mongodb://u:****@h:1/db?tls=true"
    assert mask_url("mongodb://h:1/db") == "mongodb://h:1/db"


# pymongo closes a socket it was connecting on timeouts and errors but not on cancellation;
# the garbage collector closes it. That is pymongo's to fix, and not what this test checks.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)
@pytest.mark.timeout(90)
async def test_a_cancelled_reader_always_stops(db_url):
    """Cancel a busy watcher at random moments, hundreds of times: it stops every time.

    Python 3.11's wait_for, inside pymongo's socket reads, loses a cancel that lands as a
    read completes; a watcher that lost one would poll forever and hang its shutdown.
    """
    store = RegistryStore.from_url(db_url, poll_interval=0.002)
    rng = random.Random(7)
    try:
        await store.register(Instance(service="web", instance="a", address="10.0.0.1", port=80), 600)

        async def follow() -> None:
            async for _ in store.watch():
                pass

        lost = 0
        for _ in range(300):
            task = asyncio.create_task(follow())
            await asyncio.sleep(rng.random() * 0.02)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2)
            if not done:
                lost += 1
                task.cancel()
                await asyncio.wait([task], timeout=2)
        assert lost == 0, f"{lost} of 300 cancelled watchers kept running"
    finally:
        await store.close()


class _Watching:
    """A watcher that keeps reading, as the LB and the sidecar do, into a queue."""

    def __init__(self, store: RegistryStore) -> None:
        self.snapshots: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(store))

    async def _run(self, store: RegistryStore) -> None:
        async for snap in store.watch():
            self.snapshots.put_nowait(snap)

    async def until(self, want: set[str], timeout: float) -> float:
        """Seconds until a snapshot holding exactly ``want`` arrives."""
        t0 = time.monotonic()
        async with asyncio.timeout(timeout):
            while {i.id for i in (await self.snapshots.get()).instances} != want:
                pass
        return time.monotonic() - t0

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _land(store: RegistryStore, instance: Instance, revision: int) -> None:
    """Write a document the way a writer that took ``revision`` earlier finally lands it."""
    now = store.now()
    lease = {"_id": instance.id, "expires_at": leases.expiry(now, 60)}
    await store._leases.replace_one({"_id": instance.id}, lease, upsert=True)
    doc = to_document(instance)
    doc.update(updated_at=now, registered_at=now, revision=revision)
    await store._col.replace_one({"_id": instance.id}, doc, upsert=True)


async def test_a_watcher_reads_only_what_changed(db_url):
    """With 200 instances, one registration costs the watcher a few documents, not 200."""
    store = RegistryStore.from_url(db_url, poll_interval=0.02, watch_lag=0.2)
    watch = _Watching(store)
    try:
        names = {f"web/w{i}" for i in range(200)}
        for i in range(200):
            await store.register(inst(f"w{i}"), 60)
        await watch.until(names, 10)
        await asyncio.sleep(0.5)  # past the lag: the next read starts above these writes
        before = store.watch_reads
        await store.register(inst("new"), 60)
        await watch.until(names | {"web/new"}, 5)
        assert store.watch_reads - before < 20
        await store.deregister("web/w0")
        await watch.until((names | {"web/new"}) - {"web/w0"}, 5)
        assert store.watch_reads - before < 40
    finally:
        await watch.close()
        await store.close()


async def test_a_write_that_lands_after_a_newer_one_is_still_seen(db_url):
    """A writer takes its revision, another write lands and is read, then the first lands:
    the watcher reads back over the lag and sees it, long before a resync.

    The slow write must land within the lag of its revision (a watcher that read later than
    that no longer looks back to it): with a 0.5 s lag, a loaded machine failed this test in
    about one run of sixteen, when the fast write took that long to be read. 2 s leaves room."""
    store = RegistryStore.from_url(db_url, poll_interval=0.02, watch_lag=2.0, resync_interval=60)
    watch = _Watching(store)
    try:
        await watch.until(set(), 5)
        await asyncio.sleep(2.2)
        taken = await store._next_revision()  # the slow writer's revision
        await store.register(inst("fast"), 60)
        await watch.until({"web/fast"}, 5)
        await _land(store, inst("slow"), taken)
        assert await watch.until({"web/fast", "web/slow"}, 8) < 4
    finally:
        await watch.close()
        await store.close()


async def test_a_write_older_than_the_lag_is_seen_at_the_resync(db_url):
    store = RegistryStore.from_url(db_url, poll_interval=0.02, watch_lag=0.1, resync_interval=1.5)
    watch = _Watching(store)
    try:
        await store.register(inst("a"), 60)
        await watch.until({"web/a"}, 5)
        await asyncio.sleep(0.5)
        await store.register(inst("b"), 60)
        await watch.until({"web/a", "web/b"}, 5)
        await asyncio.sleep(0.3)
        await _land(store, inst("stalled"), 0)  # below everything read: only a resync finds it
        await watch.until({"web/a", "web/b", "web/stalled"}, 5)
    finally:
        await watch.close()
        await store.close()


async def test_a_write_seen_taken_before_it_lands_is_read_as_soon_as_it_lands(db_url):
    """The watcher sees the counter move before the document lands: it keeps reading at
    each poll until the document shows up, instead of waiting for the lag to end."""
    store = RegistryStore.from_url(db_url, poll_interval=0.02, watch_lag=3.0, resync_interval=60)
    watch = _Watching(store)
    try:
        await watch.until(set(), 5)
        await asyncio.sleep(3.2)  # reads are incremental from here
        taken = await store._next_revision()
        await asyncio.sleep(0.3)  # the watcher has read, and found nothing yet
        await _land(store, inst("late"), taken)
        assert await watch.until({"web/late"}, 5) < 1.0
    finally:
        await watch.close()
        await store.close()


async def _polls_in(store: RegistryStore, seconds: float) -> int:
    before = store.watch_polls
    await asyncio.sleep(seconds)
    return store.watch_polls - before


async def test_a_revision_that_never_lands_costs_one_poll_per_interval(db_url):
    """A revision taken and never written (a compare-and-swap that lost): the watcher reads
    again at each poll for the lag, then waits as before; it never polls in a loop."""
    store = RegistryStore.from_url(db_url, poll_interval=0.05, watch_lag=0.5)
    watch = _Watching(store)
    try:
        await store.register(inst("a"), 60)
        await watch.until({"web/a"}, 5)
        await store._next_revision()
        assert await _polls_in(store, 1.0) < 30  # 20 at one per 50 ms
        assert not await store.deregister("web/never-registered")
        assert await _polls_in(store, 1.0) < 30
    finally:
        await watch.close()
        await store.close()


async def test_a_watcher_started_after_a_removal_or_an_expiry_polls_at_its_interval(db_url):
    """The newest revision belongs to a removal or to a lease that ran out, which a full
    read does not return: the watcher must not take it for a write still on its way."""
    writer = RegistryStore.from_url(db_url)
    try:
        await writer.register(inst("a"), 60)
        await writer.register(inst("b"), 60)
        await writer.deregister("web/b")
        for last in ("removal", "expiry"):
            if last == "expiry":
                await writer.register(inst("brief"), 1)
                await asyncio.sleep(1.2)
            store = RegistryStore.from_url(db_url, poll_interval=0.05, watch_lag=0.5)
            watch = _Watching(store)
            try:
                await watch.until({"web/a"}, 5)
                assert await _polls_in(store, 1.0) < 30, last
            finally:
                await watch.close()
                await store.close()
    finally:
        await writer.close()


async def test_deregistering_an_unknown_instance_takes_no_revision(store):
    before = await store.revision()
    assert not await store.deregister("web/nobody")
    assert await store.revision() == before
