"""Leases apart from instances, against the embedded server: a renewal takes no revision and
reaches no watcher, a lapse reaches every watcher within 1.5 s of its expiry, in both change
feeds, and every process judges leases on the database's clock."""

from __future__ import annotations

import asyncio
import glob
import itertools
import signal
import time
from datetime import timedelta

import pytest

from registry.model import Instance
from registry.store import RegistryStore
from tests.integration.mesh_proc import LISTENING, Proc

FEEDS = ("poll", "changestream")
LAPSE_CONTRACT = 1.5  # s after its expiry, at most, until every watcher drops an instance
CLOCK_ERROR = 0.05  # s; two processes' estimates of the database's clock differ this much


def inst(name: str) -> Instance:
    return Instance(service="web", instance=name, address="10.0.0.5", port=8080)


class Watcher:
    """One watcher as the LB and the sidecar run it; every snapshot kept with the time it
    arrived on the database's clock (as ``clock`` measures it)."""

    def __init__(self, db_url: str, feed: str, clock: RegistryStore) -> None:
        self.store = RegistryStore.from_url(db_url, change_feed=feed)
        self.clock = clock
        self.seen: list[tuple[float, set[str]]] = []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for snap in self.store.watch():
            self.seen.append((self.clock.now().timestamp(), {i.id for i in snap.instances}))
            self._new.set()

    async def until(self, want: set[str], timeout: float, after: float = 0.0) -> float:
        """The database time at which a view of exactly ``want`` arrived (``after`` then)."""
        async with asyncio.timeout(timeout):
            while True:
                for at, ids in self.seen:
                    if ids == want and at >= after:
                        return at
                self._new.clear()
                await self._new.wait()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.store.close()


@pytest.mark.parametrize("feed", FEEDS)
async def test_renewals_take_no_revision_and_no_watcher_reads_them(db_url, feed):
    """200 instances renewing every second for 6 s: the revision counter does not move, the
    watcher shows nothing new and reads at most one document a second."""
    writer = RegistryStore.from_url(db_url)
    await writer.start()
    watcher = Watcher(db_url, feed, writer)
    names = {f"web/r{i}" for i in range(200)}
    try:
        for i in range(200):
            await writer.register(inst(f"r{i}"), 10)
        await watcher.until(names, 15)
        assert watcher.store.change_streams is (feed == "changestream")
        await asyncio.sleep(1.5)  # past the lag: the reads that follow the registrations
        revision, reads, shown = (
            await writer.revision(),
            watcher.store.watch_reads,
            len(watcher.seen),
        )
        t0 = time.monotonic()
        for _ in range(6):
            renewed = await asyncio.gather(*(writer.renew(n, 10) for n in names))
            assert all(renewed)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0) % 1.0))
        elapsed = time.monotonic() - t0
        assert await writer.revision() == revision
        assert len(watcher.seen) == shown, "a renewal reached the watcher"
        read = watcher.store.watch_reads - reads
        assert read <= elapsed, f"{read} documents read in {elapsed:.1f} s of renewals"
        assert watcher.seen[-1][1] == names
        assert {i.id for i in await writer.list()} == names
    finally:
        await watcher.close()
        await writer.close()


@pytest.mark.parametrize("feed", FEEDS)
async def test_a_lapse_reaches_every_watcher_within_its_contract(db_url, feed):
    """Three watchers; one instance stops renewing while another changes its status ten
    times a second (so the watchers read all along): each drops it no sooner than its
    expiry (within the error of a clock measured over a round trip) and at most 1.5 s after
    it, while the other instance stays."""
    writer = RegistryStore.from_url(db_url)
    await writer.start()
    watchers = [Watcher(db_url, feed, writer) for _ in range(3)]
    try:
        await writer.register(inst("stays"), 60)
        lapsing = await writer.register(inst("lapses"), 2)
        assert lapsing.lease_expires_at is not None
        expiry = lapsing.lease_expires_at.timestamp()
        both = [await w.until({"web/stays", "web/lapses"}, 5) for w in watchers]

        async def churn() -> None:
            for n in itertools.count():
                await writer.set_status("web/stays", "warning" if n % 2 else "passing")
                await asyncio.sleep(0.1)

        churning = asyncio.create_task(churn())
        try:
            for w, since in zip(watchers, both, strict=True):
                dropped = await w.until({"web/stays"}, 6, after=since) - expiry
                assert -CLOCK_ERROR <= dropped <= LAPSE_CONTRACT, f"dropped {dropped:+.2f} s"
        finally:
            churning.cancel()
            await asyncio.gather(churning, return_exceptions=True)
        assert [i.id for i in await writer.list()] == ["web/stays"]
        assert not await writer.renew("web/lapses", 2), "a lapsed lease is registered again"
    finally:
        for w in watchers:
            await w.close()
        await writer.close()


@pytest.mark.parametrize("feed", FEEDS)
async def test_a_watcher_that_judged_a_lease_lapsed_too_soon_takes_it_back(db_url, feed):
    """A watcher whose estimate of the database's clock is 2.5 s ahead (a measurement over
    a slow round trip can be that far off) sees a 3 s lease renewed every second as lapsed
    before each renewal lands. The renewal takes no revision, so only the lapse check can
    bring the instance back: it does, each time, and the instance is there at the end."""
    writer = RegistryStore.from_url(db_url)
    await writer.start()
    watcher = Watcher(db_url, feed, writer)
    try:
        await writer.register(inst("renewed"), 3)
        since = await watcher.until({"web/renewed"}, 5)
        assert watcher.store._db_time is not None
        watcher.store._db_time += timedelta(seconds=2.5)
        for _ in range(5):
            await asyncio.sleep(1)
            assert await writer.renew("web/renewed", 3)
        gone = await watcher.until(set(), 1, after=since)
        back = await watcher.until({"web/renewed"}, 1, after=gone)
        print(f"judged lapsed {gone - since:.1f} s in, taken back {back - gone:.2f} s later")
    finally:
        await watcher.close()
        await writer.close()


async def test_a_clock_measured_over_a_slow_trip_gives_way_to_a_surer_one(db_url, monkeypatch):
    """Hellos answered 0.4 s late (a loaded server): a store that measured the clock over a
    quick trip keeps that measurement; one that could only measure over slow trips measures
    again after CLOCK_RETRY_INTERVAL (5 s, shortened here), not 60 s, and takes the surer
    one."""
    import registry.store as store_module

    monkeypatch.setattr(store_module, "CLOCK_RETRY_INTERVAL", 0.2)
    sure, unsure = RegistryStore.from_url(db_url), RegistryStore.from_url(db_url)
    await sure.start()
    assert sure.clock_error() < 0.05

    database = type(sure._client.admin)
    command = database.command
    late: set[int] = set()  # the clients whose hellos come back late

    async def maybe_late(self, *args, **kwargs):
        if id(self.client) in late:
            await asyncio.sleep(0.4)
        return await command(self, *args, **kwargs)

    monkeypatch.setattr(database, "command", maybe_late)
    try:
        offset = sure.clock_offset
        late.add(id(sure._client))
        await sure._measure_clock()
        assert sure.clock_offset == offset and sure.clock_error() < 0.05

        late.add(id(unsure._client))
        await unsure.start()
        assert unsure.clock_error() >= 0.2  # half of a 0.4 s trip at least
        late.clear()
        await asyncio.sleep(0.3)
        await unsure._now()
        assert unsure.clock_error() < 0.05
        assert abs(unsure.clock_offset - sure.clock_offset) < 2 * CLOCK_ERROR
    finally:
        await sure.close()
        await unsure.close()


async def test_a_watcher_polls_less_often_while_the_server_answers_slowly(db_url, monkeypatch):
    """Counter reads answered 0.2 s late: the watcher waits ten times that between polls
    (2 s, not the 0.1 s interval), and polls every 0.1 s again once answers are quick."""
    watcher = RegistryStore.from_url(db_url, change_feed="poll")
    await watcher.start()
    collection = type(watcher._counters)
    find_one = collection.find_one
    slow = [True]

    async def maybe_late(self, *args, **kwargs):
        if slow[0] and self is watcher._counters:
            await asyncio.sleep(0.2)
        return await find_one(self, *args, **kwargs)

    monkeypatch.setattr(collection, "find_one", maybe_late)
    first = asyncio.Event()

    async def follow() -> None:
        async for _ in watcher.watch():
            first.set()

    watching = asyncio.create_task(follow())
    try:
        await asyncio.wait_for(first.wait(), 5)
        before = watcher.watch_polls
        await asyncio.sleep(4.5)
        during = watcher.watch_polls - before
        slow[0] = False
        await asyncio.sleep(2.5)  # the pause already begun ends first
        before = watcher.watch_polls
        await asyncio.sleep(1.0)
        after = watcher.watch_polls - before
        print(f"polls: {during} in 4.5 s while slow, {after} in 1 s after")
        assert 1 <= during <= 3 and after >= 5
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await watcher.close()


async def test_a_renewal_near_the_end_of_its_lease_is_refused(store):
    """Too close to the end a watcher may already have judged it lapsed: the renewal is
    refused and the sidecar registers again, a change every watcher reads."""
    await store.register(inst("late"), 1)
    await asyncio.sleep(0.85)
    assert not await store.renew("web/late", 1)
    before = await store.revision()
    again = await store.register(inst("late"), 2)
    assert again.revision > before
    assert await store.renew("web/late", 2)


@pytest.mark.parametrize("skew", ["+5s", "-5s"])
async def test_a_sidecar_whose_clock_is_off_neither_flaps_nor_lingers(db_url, skew):
    """A real sidecar under libfaketime, its clock 5 s off, lease 2 s: the watcher (true clock)
    shows it without a gap for 6 s, and drops it within the lease and 1.5 s once it is
    killed (no deregistration: only the lease ends it)."""
    clock = RegistryStore.from_url(db_url)
    await clock.start()
    watcher = Watcher(db_url, "poll", clock)
    args = [
        "sidecar", "--service", "web", "--port", "8080", "--instance", "skewed",
        "--address", "127.0.0.1", "--check", "none", "--dns-listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--upstream", "none", "--lease-ttl", "2", "--mongo-url", db_url,
    ]  # fmt: skip
    # libfaketime preloaded into the sidecar itself (the faketime command would fork, and a
    # kill would reach it, not the sidecar).
    libs = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    assert libs, "libfaketime is missing: make test-tools installs it (Debian package faketime)"
    proc = await Proc.start(*args, env={"LD_PRELOAD": libs[0], "FAKETIME": skew})
    try:
        await proc.wait_line(LISTENING)
        shown_at = await watcher.until({"web/skewed"}, 10)
        await asyncio.sleep(6)
        after = [ids for at, ids in watcher.seen if at >= shown_at]
        assert all(ids == {"web/skewed"} for ids in after), f"flapped: {after}"
        proc.proc.send_signal(signal.SIGKILL)
        killed = clock.now().timestamp()
        gone = await watcher.until(set(), 2 + LAPSE_CONTRACT + 3, after=shown_at) - killed
        assert gone <= 2 + LAPSE_CONTRACT, f"lingered {gone:.2f} s after the kill"
    finally:
        await proc.stop()
        await watcher.close()
        await clock.close()
