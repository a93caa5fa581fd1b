"""The async registry store over pymongo's native ``AsyncMongoClient``.

Two collections hold an instance (DESIGN.md §4). ``instances`` changes only on a real
change (register, status, deregister) and each such write takes a revision from one global
counter (``counters/instances``, ``$inc``). ``leases`` holds ``{_id, expires_at}`` per
instance; a renewal is one conditional replace of that small document, takes no revision,
and no watcher reads it. An instance exists while its lease is in the future: ``list()``
joins the two, and a watcher learns of a lapse by asking, every LAPSE_CHECK_INTERVAL,
which leases crossed their expiry since it last asked (an indexed range that is empty
while everything renews), so a renewal never reaches it. The TTL index on ``expires_at``
only collects garbage, LEASES_KEPT after the lapse.

Every lease time is on the database's clock: the store measures it from ``hello``'s
``localTime`` and runs it forward on the monotonic clock, so a process whose own clock is
off, or steps, writes and judges leases exactly like every other.

``watch()`` uses change streams where the server has them (replica set or mongos) and polls
the revision counter where it has not; ``change_feed`` forces either.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument
from pymongo.errors import (
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)
from pymongo.uri_parser import parse_uri

from registry import leases
from registry.codec import from_document, to_document
from registry.errors import InvalidDocument, RegistryError, RegistryUnavailable
from registry.model import Instance, Snapshot, check_status

log = logging.getLogger(__name__)

DEFAULT_URL = "mongodb://127.0.0.1:27017/mesh"
DEFAULT_DATABASE = "mesh"
COLLECTION = "instances"
LEASES = "leases"
COUNTERS = "counters"
# What deregister removed, with the revision it took: watchers read removals as they read
# changed documents. Kept REMOVALS_KEPT seconds (a TTL index, and pruned by deregister on
# servers without TTL); a watcher away longer reads everything when it comes back.
REMOVALS = "removals"
REMOVALS_KEPT = 600
# A lease document outlives its lapse by this much before the TTL index collects it: a
# watcher asks for lapses in the window since it last asked, so the document must still be
# there when it does. An instance document whose lease is gone is garbage (collect_garbage).
LEASES_KEPT = 600
REVISION_ID = "instances"
CHANGE_FEEDS = ("auto", "changestream", "poll")
DEFAULT_POLL_INTERVAL = 0.1  # s; the revision counter is one small read
POLL_BACKOFF = 10  # a poll that took t waits at least 10 t before the next one
STREAM_AWAIT = 1.0  # s a change stream read waits on the server for an event
# How often a watcher asks which leases lapsed: a lapse reaches it within this plus one
# round trip (the contract is 1.5 s).
LAPSE_CHECK_INTERVAL = 0.5
# A renewal extends only a lease with more than this left, so that no watcher has judged it
# lapsed already; one closer to its end is lost, and its sidecar registers again (a real
# change every watcher reads). Far above the error of a clock measured over a round trip.
RENEW_MARGIN = timedelta(seconds=0.25)
CLOCK_CHECK_INTERVAL = 60.0  # s between measurements of the database's clock
CLOCK_SAMPLES = 4  # hellos at most per measurement
CLOCK_GOOD_TRIP = 0.005  # s; a round trip this short ends the measurement
CLOCK_FAIR_ERROR = 0.05  # s; a measurement less sure than this is tried again sooner
CLOCK_RETRY_INTERVAL = 5.0  # s; how much sooner
CLOCK_DRIFT = 1e-4  # how far two hosts' clocks may run apart per second (100 ppm)
MAX_SKIPPED_REMEMBERED = 10_000  # bad documents logged once each; a bound on the memory
MAX_UPDATE_TRIES = 16  # compare-and-swap retries; one instance has one writer, its sidecar
# A watcher reads only the documents written since its last read (by revision). A writer
# takes its revision before its write lands, so a read goes back to the revision counter
# as it stood WATCH_LAG seconds before the previous read: every write that had taken its
# revision by then has landed. Every RESYNC_INTERVAL the watcher compares the count and
# the sum of the revisions of every instance document with what it has read (one small
# aggregate), and reads everything again only if they differ: the backstop for a write
# slower than the lag, at no cost while nothing is missed.
WATCH_LAG = 1.0
RESYNC_INTERVAL = 30.0
SERVER_SELECTION_TIMEOUT_MS = 2000  # fail fast: callers keep their last snapshot and retry


def mask_url(url: str) -> str:
    """The URL with its password replaced, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    creds, _, hostpart = rest.partition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:****@{hostpart}"


def check_change_feed(value: str) -> str:
    if value not in CHANGE_FEEDS:
        raise ValueError(f"change feed must be one of {', '.join(CHANGE_FEEDS)}, got {value!r}")
    return value


class RegistryStore:
    """Register, renew, publish status, deregister, list and watch service instances."""

    def __init__(
        self,
        client: AsyncMongoClient,
        *,
        database: str = DEFAULT_DATABASE,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        url: str = "",
        watch_lag: float = WATCH_LAG,
        resync_interval: float = RESYNC_INTERVAL,
        change_feed: str = "auto",
        lapse_check_interval: float = LAPSE_CHECK_INTERVAL,
    ) -> None:
        self._client = client
        self._db = client[database]
        self._col = self._db[COLLECTION]
        self._leases = self._db[LEASES]
        self._counters = self._db[COUNTERS]
        self._removals = self._db[REMOVALS]
        self.poll_interval = poll_interval
        self.url = url
        self.change_feed = check_change_feed(change_feed)
        self._change_streams: bool | None = None
        self._skipped: set[tuple[str, str, str]] = set()
        self.watch_lag = watch_lag
        self.resync_interval = resync_interval
        self.lapse_check_interval = lapse_check_interval
        # The database's clock: its time at a monotonic instant (None: not measured yet).
        self._db_time: datetime | None = None
        self._db_time_at = 0.0
        self._clock_trip = 0.0  # s; the round trip of the measurement in use
        self.clock_offset = 0.0  # s the database's clock is ahead of ours, last measured
        self.watch_reads = 0  # documents read by watchers: their cost on the database
        self.watch_polls = 0  # revision counter reads by polling watchers
        self.lapse_checks = 0  # lapse window queries by watchers
        self.lapse_reads = 0  # lease documents those returned
        self.full_reads = 0  # reads of every document by watchers

    @classmethod
    def from_url(cls, url: str = DEFAULT_URL, **kwargs: Any) -> RegistryStore:
        try:
            parsed = parse_uri(url)
        except (PyMongoError, ValueError) as exc:
            raise RegistryError(f"bad MongoDB URL {mask_url(url)}: {exc}") from None
        client: AsyncMongoClient = AsyncMongoClient(
            url,
            serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
            connectTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
            socketTimeoutMS=10_000,
            tz_aware=True,
            connect=False,
        )
        return cls(client, database=parsed.get("database") or DEFAULT_DATABASE, url=url, **kwargs)

    def __repr__(self) -> str:
        return f"<RegistryStore {mask_url(self.url) or self._db.name}>"

    async def close(self) -> None:
        await self._client.close()

    # Setup

    async def start(self) -> None:
        """Create indexes (idempotent), measure the database's clock, and learn whether the
        server has change streams."""
        async with self._errors("start"):
            await self._col.create_index([("service", ASCENDING), ("status", ASCENDING)])
            await self._col.create_index("revision")
            await self._leases.create_index("expires_at", expireAfterSeconds=LEASES_KEPT)
            await self._removals.create_index("revision")
            await self._removals.create_index("at", expireAfterSeconds=REMOVALS_KEPT)
        hello = await self._measure_clock()
        if self.change_feed == "auto":
            self._change_streams = bool(hello.get("setName")) or hello.get("msg") == "isdbgrid"
        else:
            self._change_streams = self.change_feed == "changestream"

    @property
    def change_streams(self) -> bool | None:
        return self._change_streams

    # The clock

    def now(self) -> datetime:
        """The database's time, as last measured and run forward on the monotonic clock
        (millisecond precision, as BSON dates keep). Before the first measurement, ours."""
        if self._db_time is None:
            return leases.utcnow()
        at = self._db_time + timedelta(seconds=time.monotonic() - self._db_time_at)
        return at.replace(microsecond=at.microsecond // 1000 * 1000)

    async def _now(self) -> datetime:
        """``now()``, measuring the database's clock first when the last look is old (or
        was unsure: a loaded server answers slowly)."""
        age = time.monotonic() - self._db_time_at
        if (
            self._db_time is None
            or age > CLOCK_CHECK_INTERVAL
            or (self.clock_error() > CLOCK_FAIR_ERROR and age > CLOCK_RETRY_INTERVAL)
        ):
            await self._measure_clock()
        return self.now()

    def clock_error(self) -> float:
        """How far ``now()`` may be from the database's clock, in seconds: half the round
        trip it was measured over, plus the drift since."""
        return self._clock_trip / 2 + CLOCK_DRIFT * (time.monotonic() - self._db_time_at)

    async def _measure_clock(self) -> dict[str, Any]:
        """The server's ``localTime`` taken as the time halfway through a ``hello``'s round
        trip; of a few, the one with the shortest trip (the first also opens the connection,
        and a slow trip is an uneven one). A measurement less sure than the one in use
        (a loaded server) is dropped. Servers without it leave our own clock in use."""
        best: tuple[float, float, datetime] | None = None
        for _ in range(CLOCK_SAMPLES):
            async with self._errors("hello"):
                sent = time.monotonic()
                hello = await self._client.admin.command("hello")
                back = time.monotonic()
            server = _as_utc(hello.get("localTime"))
            if server is None:
                return hello
            if best is None or back - sent < best[0]:
                best = (back - sent, (sent + back) / 2, server)
            if best[0] < CLOCK_GOOD_TRIP:
                break
        assert best is not None
        if self._db_time is not None and best[0] / 2 > self.clock_error():
            return hello
        self._clock_trip, self._db_time_at, self._db_time = best
        ours = datetime.now(UTC) - timedelta(seconds=time.monotonic() - self._db_time_at)
        self.clock_offset = (self._db_time - ours).total_seconds()
        return hello

    # Writes

    async def register(self, instance: Instance, lease_ttl: float) -> Instance:
        """Insert or replace ``instance`` with a fresh lease; keeps ``registered_at`` if live.

        The lease is written before the instance document, so a watcher that reads the
        change finds its lease."""
        leases.check_ttl(lease_ttl)
        now = await self._now()
        expires = leases.expiry(now, lease_ttl)
        async with self._errors("register"):
            doc = to_document(instance)
            doc.update(updated_at=now, registered_at=now)
            # An upsert with $setOnInsert is not portable to every wire server, so keep
            # registered_at by reading the previous document first.
            prev = await self._col.find_one({"_id": instance.id}, {"registered_at": 1})
            if prev and prev.get("registered_at") and await self._live_lease(instance.id, now):
                doc["registered_at"] = prev["registered_at"]
            await self._leases.replace_one(
                {"_id": instance.id}, _lease(instance.id, expires), upsert=True
            )
            doc["revision"] = await self._next_revision()
            await self._col.replace_one({"_id": instance.id}, doc, upsert=True)
        return _with_lease(from_document(doc), expires)

    async def renew(self, instance_id: str, lease_ttl: float) -> bool:
        """Extend a live lease: one conditional write, no read, no revision. False if the
        lease is gone or within RENEW_MARGIN of its end (the caller registers again). The
        embedded server compares dates to the second only, which makes the condition
        stricter there, never looser: a lease within a second of its end may be refused."""
        leases.check_ttl(lease_ttl)
        now = await self._now()
        expires = leases.expiry(now, lease_ttl)
        async with self._errors("renew"):
            result = await self._leases.replace_one(
                {"_id": instance_id, "expires_at": {"$gt": now + RENEW_MARGIN}},
                _lease(instance_id, expires),
            )
        return result.matched_count == 1

    async def set_status(self, instance_id: str, status: str) -> bool:
        """Publish a health status. False if the instance is gone or its lease ran out."""
        check_status(status)
        return await self._update(instance_id, "set_status", status=status)

    async def _live_lease(self, instance_id: str, now: datetime) -> datetime | None:
        doc = await self._leases.find_one({"_id": instance_id})
        expires = _as_utc(doc.get("expires_at")) if doc else None
        return expires if leases.is_live(expires, now) else None

    async def _update(self, instance_id: str, op: str, **fields: Any) -> bool:
        """Read, change, and replace only if nobody wrote in between (compare-and-swap on
        ``revision``). Whole-document replaces keep dates as BSON dates on every wire server;
        some store a ``$set`` date as a string."""
        now = await self._now()
        async with self._errors(op):
            if await self._live_lease(instance_id, now) is None:
                return False
            for _ in range(MAX_UPDATE_TRIES):
                doc = await self._col.find_one({"_id": instance_id})
                if doc is None:
                    return False
                seen = doc.get("revision")
                doc.pop("lease_expires_at", None)  # the old layout: the lease lives apart now
                doc.update(fields, updated_at=now, revision=await self._next_revision())
                result = await self._col.replace_one({"_id": instance_id, "revision": seen}, doc)
                if result.matched_count == 1:
                    return True
        raise RegistryError(f"{op} {instance_id}: {MAX_UPDATE_TRIES} concurrent writers won")

    async def removed_since(self, since: datetime) -> set[str]:
        """Ids deregistered at or after ``since`` (kept REMOVALS_KEPT seconds)."""
        async with self._errors("removals"):
            docs = await self._removals.find({"at": {"$gte": since}}, {"_id": 1}).to_list(None)
        return {str(d["_id"]) for d in docs}

    async def _newest(self) -> int:
        """The highest revision written to an instance (live or not) or a removal."""
        newest = 0
        async with self._errors("watch"):
            for col in (self._col, self._removals):
                doc = await col.find_one({}, {"revision": 1}, sort=[("revision", -1)])
                if doc is not None:
                    newest = max(newest, _revision_of(doc))
        return newest

    async def deregister(self, instance_id: str, *, revision: int | None = None) -> bool:
        """Delete the instance and its lease, and record the removal for watchers (see
        REMOVALS). With ``revision``, only if the document is still at that revision."""
        now = await self._now()
        query: dict[str, Any] = {"_id": instance_id}
        if revision is not None:
            query["revision"] = revision
        async with self._errors("deregister"):
            result = await self._col.delete_one(query)
            if result.deleted_count:
                await self._leases.delete_one({"_id": instance_id})
                # Taken after the delete, so the removal is newer than any write to the
                # document, and taken only when there is a removal to land.
                taken = await self._next_revision()
                removal = {"_id": instance_id, "revision": taken, "at": now}
                await self._removals.replace_one({"_id": instance_id}, removal, upsert=True)
                # The TTL index does this on MongoDB; not every wire server runs one.
                cutoff = now - timedelta(seconds=REMOVALS_KEPT)
                await self._removals.delete_many({"at": {"$lt": cutoff}})
        return result.deleted_count == 1

    async def collect_garbage(self, docs: Iterable[dict[str, Any]]) -> int:
        """Remove the instance documents among ``docs`` whose lease document is gone (it
        lapsed more than LEASES_KEPT ago and the TTL index took it), each only if still at
        the revision read; a removal watchers read like a deregistration. Returns how many."""
        now = self.now()
        cutoff = now - timedelta(seconds=LEASES_KEPT)
        old = {
            str(d["_id"]): _revision_of(d)
            for d in docs
            if "lease_expires_at" not in d  # the old layout is skipped, never removed
            and isinstance(d.get("updated_at"), datetime)
            and _as_utc(d["updated_at"]) < cutoff
        }
        if not old:
            return 0
        async with self._errors("collect garbage"):
            held = await self._leases.find({"_id": {"$in": list(old)}}, {"_id": 1}).to_list(None)
        removed = 0
        for key in old.keys() - {str(d["_id"]) for d in held}:
            removed += await self.deregister(key, revision=old[key])
        return removed

    async def _next_revision(self) -> int:
        doc = await self._counters.find_one_and_update(
            {"_id": REVISION_ID},
            {"$inc": {"value": 1}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        return int(doc["value"])

    # Reads

    async def revision(self) -> int:
        async with self._errors("revision"):
            doc = await self._counters.find_one({"_id": REVISION_ID})
        return int(doc["value"]) if doc else 0

    async def list(self, service: str | None = None, healthy_only: bool = False) -> list[Instance]:
        """Live instances, sorted by id; optionally one service and only ``passing`` ones."""
        query: dict[str, Any] = {}
        if service is not None:
            query["service"] = service
        if healthy_only:
            query["status"] = "passing"
        now = await self._now()
        async with self._errors("list"):
            docs = await self._col.find(query).to_list(None)
            held = await self._leases_of([d.get("_id") for d in docs], now)
        out = self._live(docs, held, self.now())
        out.sort(key=lambda i: i.id)
        return out

    async def _leases_of(self, ids: list[Any], now: datetime) -> dict[str, datetime]:
        """The live leases of ``ids``: id → expiry. Compared here, not on the server: the
        embedded server compares dates to the second only."""
        if not ids:
            return {}
        docs = await self._leases.find({"_id": {"$in": ids}}).to_list(None)
        out = {}
        for doc in docs:
            expires = _as_utc(doc.get("expires_at"))
            if leases.is_live(expires, now):
                out[str(doc["_id"])] = expires
        return out

    def _live(
        self,
        docs: Iterable[dict[str, Any]],
        held: dict[str, datetime],
        now: datetime,
        dormant: dict[str, Instance] | None = None,
    ) -> list[Instance]:
        """The instances among ``docs`` that decode and hold a lease in the future at ``now``
        (checked again here, so a slow answer never resurrects a lease that ran out while it
        was in flight). Those that decode and hold none go into ``dormant`` if given."""
        out = []
        for doc in docs:
            expires = held.get(str(doc.get("_id")))
            if expires is None:
                if "lease_expires_at" in doc:
                    self._skip(doc, InvalidDocument(
                        f"{doc.get('_id')!r}: carries its lease (the old layout) and has none"
                        f" in {LEASES!r}; its sidecar must be upgraded"
                    ))  # fmt: skip
                elif dormant is not None and (inst := self._decode(doc)) is not None:
                    dormant[inst.id] = inst
                continue
            inst = self._decode(doc)
            if inst is None:
                continue
            if leases.is_live(expires, now):
                out.append(_with_lease(inst, expires))
            elif dormant is not None:
                dormant[inst.id] = inst
        return out

    def _decode(self, doc: dict[str, Any]) -> Instance | None:
        """The instance a document holds; None for one that does not decode."""
        try:
            return from_document(doc)
        except InvalidDocument as exc:
            self._skip(doc, exc)
            return None

    def _skip(self, doc: dict[str, Any], exc: InvalidDocument) -> None:
        """Log a document that does not decode once per version of it, not on every read."""
        key = (str(doc.get("_id")), repr(doc.get("revision")), repr(doc.get("updated_at")))
        if key in self._skipped:
            return
        if len(self._skipped) > MAX_SKIPPED_REMEMBERED:
            self._skipped.clear()
        self._skipped.add(key)
        log.warning("registry: skipping a document that does not decode: %s", exc)

    async def services(self) -> list[str]:
        return sorted({i.service for i in await self.list()})

    # Watch

    async def watch(self) -> AsyncIterator[Snapshot]:
        """Yield a full snapshot now and again whenever what readers see changes.

        A lease running out produces a snapshot with no write to any instance: the watcher
        asks for lapses every ``lapse_check_interval``.
        Raises RegistryUnavailable when the database goes away; callers keep their last
        snapshot and call ``watch()`` again after a backoff.
        """
        if self._change_streams is None:
            await self.start()
        if self._change_streams:
            async for snap in self._watch_change_stream():
                yield snap
        else:
            async for snap in self._watch_polling():
                yield snap

    def _poll_pause(self, took: float) -> float:
        """The pause before the next poll: the poll interval, or POLL_BACKOFF times what the
        last poll took when the server is slow. A watcher then keeps the server busy for
        at most 1/POLL_BACKOFF of its time, so many watchers of a loaded server slow their
        polls down instead of queueing up in front of the writes (renewals included)."""
        return max(self.poll_interval, took * POLL_BACKOFF)

    async def _watch_polling(self) -> AsyncIterator[Snapshot]:
        view = _WatchView(self)
        loop = asyncio.get_running_loop()
        next_poll = 0.0  # loop time; a lapse check alone does not read the counter
        while True:
            now = loop.time()
            revision = None
            if now >= next_poll or view.due_without_event(now):
                revision = await self.revision()
                self.watch_polls += 1
                asked, now = now, loop.time()
                view.observed(revision, now)
                next_poll = now + self._poll_pause(now - asked)
                if not view.due(revision, now):
                    revision = None
            for snap in await view.turn(revision):
                yield snap
            now = loop.time()
            await asyncio.sleep(max(0.0, min(next_poll - now, view.wait(now))))

    async def _watch_change_stream(self) -> AsyncIterator[Snapshot]:
        # Each event means only "something changed": read what changed by revision. The
        # embedded server's events carry its own ids, so nothing else in them is used. The
        # stream is followed by a task of its own, never cancelled mid-read (a cancelled
        # read can lose the events it fetched); events that come together wake one read.
        view = _WatchView(self)
        loop = asyncio.get_running_loop()
        async with self._errors("watch"):
            stream = await self._col.watch(max_await_time_ms=int(STREAM_AWAIT * 1000))
        woken = asyncio.Event()

        async def follow() -> None:
            # A server waits up to max_await_time_ms for an event before it answers empty;
            # one that answers empty at once (the embedded server) is asked again after the
            # poll interval, not in a loop.
            try:
                async with self._errors("watch"):
                    while True:
                        asked = loop.time()
                        if await stream.try_next() is not None:
                            woken.set()
                        elif (took := loop.time() - asked) < STREAM_AWAIT / 2:
                            await asyncio.sleep(self._poll_pause(took))
            finally:
                woken.set()  # an error wakes the reader, which raises it

        follower = asyncio.create_task(follow(), name="registry change stream")
        woken.set()  # the first read
        try:
            while True:
                if follower.done():
                    follower.result()
                    raise RegistryUnavailable("registry change stream ended")
                revision = None
                if woken.is_set() or view.due_without_event(loop.time()):
                    woken.clear()
                    revision = await self.revision()
                    view.observed(revision, loop.time())
                for snap in await view.turn(revision):
                    yield snap
                # Also wake to ask for lapses, and after the lag, so that a write whose
                # event came before its document is read again.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(view.wait(loop.time())):
                        await woken.wait()
        finally:
            for _ in range(20):  # pymongo can swallow a cancel mid-read; ask again
                follower.cancel()
                done, _ = await asyncio.wait([follower], timeout=0.1)
                if done:
                    break
            await stream.close()

    # Errors

    def _errors(self, op: str) -> _Translate:
        return _Translate(self, op)


class _Translate:
    """Turn pymongo's connection errors into one RegistryUnavailable naming the URL, and
    never let a cancellation be lost inside an operation.

    On Python 3.11, ``asyncio.wait_for`` returns the result when the awaited operation
    finishes in the same loop iteration as a ``cancel()`` of the caller, and the
    cancellation is gone (fixed in 3.12). pymongo's async client awaits ``wait_for``
    inside its socket reads, so about one cancel in fifty of a busy reader was lost and a
    task told to stop polled the registry forever. The task still counts the request
    (``Task.cancelling()``): an operation that returns normally while the count rose is
    turned back into the CancelledError it swallowed.
    """

    __slots__ = ("_store", "_op", "_task", "_cancelling")

    def __init__(self, store: RegistryStore, op: str) -> None:
        self._store = store
        self._op = op

    async def __aenter__(self) -> None:
        self._task = asyncio.current_task()
        self._cancelling = self._task.cancelling() if self._task is not None else 0

    async def __aexit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None:
            if self._task is not None and self._task.cancelling() > self._cancelling:
                raise asyncio.CancelledError
            return False
        where = mask_url(self._store.url) or self._store._db.name
        if isinstance(exc, ServerSelectionTimeoutError | ConnectionFailure):
            raise RegistryUnavailable(
                f"registry at {where} unreachable ({self._op}): {_short(exc)}"
            ) from exc
        if isinstance(exc, OperationFailure):
            raise RegistryError(f"registry at {where} refused {self._op}: {_short(exc)}") from exc
        if isinstance(exc, PyMongoError):
            raise RegistryUnavailable(
                f"registry at {where} failed ({self._op}): {_short(exc)}"
            ) from exc
        return False


class _WatchView:
    """What one watcher has read: every instance by id, and up to which revision.

    A read fetches only the documents and removals whose revision is above ``low``, the
    counter as it stood WATCH_LAG before the previous read began (see WATCH_LAG), and
    applies them in revision order, with the leases of those documents alone. The first
    read reads everything; so does a resync whose comparison finds something missed.

    Lapses: ``check_lapses`` asks which leases crossed their expiry in the window from the
    last look to now, on the database's clock. Each window starts where the last ended, so
    every lapse is seen once; an instance enters the view only with a lease beyond the
    window already looked at.
    """

    def __init__(self, store: RegistryStore) -> None:
        self._store = store
        self._loop = asyncio.get_running_loop()
        self.instances: dict[str, Instance] = {}
        # Instances read whose lease had run out: a renewal that lands after all (this
        # watcher's clock or its read was late) brings one back at the next lapse check.
        self._dormant: dict[str, Instance] = {}
        self._revisions: dict[str, int] = {}  # every instance document read: id → revision
        self.low: int | None = None  # None: the next read is a full one
        self._history: deque[tuple[float, int]] = deque()  # (loop time, counter) seen
        self._read_revision = -1
        self._resync_at = 0.0
        self._catch_up_at = 0.0  # when writes taken before the last read have all landed
        self._landed = 0  # the newest revision read (0: none; writes start at 1)
        # Since when the newest revision taken has not been read: its write is on its way.
        self._missing_since: float | None = None
        self._missing_revision = 0
        self._last: Snapshot | None = None
        self._lapses_until: datetime | None = None  # database time lapses were asked up to
        self.lapse_check_at = float("inf")  # loop time of the next lapse check

    def observed(self, revision: int, now: float) -> None:
        history = self._history
        if not history or history[-1][1] != revision:
            history.append((now, revision))

    def due(self, revision: int, now: float) -> bool:
        """Whether a read is needed now (polling): a write, or see ``due_without_event``."""
        return revision != self._read_revision or self.due_without_event(now)

    def due_without_event(self, now: float) -> bool:
        """A resync, or the lag after the last read is over while writes it saw taken may
        have landed after it (one read more, not one per poll), or a write seen taken and
        not landed yet."""
        return (
            now >= self._resync_at
            or (self._behind() and now >= self._catch_up_at)
            or self._awaiting(now)
        )

    def _awaiting(self, now: float) -> bool:
        """The newest revision taken has not shown up yet, and the lag is not over: its
        write may be on its way (a revision can also be taken and never written)."""
        return self._missing_since is not None and now < self._missing_since + self._store.watch_lag

    def _behind(self) -> bool:
        """Revisions the last read saw taken may have landed after it (or the counter's
        history is too young to say: a full read that early is followed by one more)."""
        return self.low is None or self.low < self._read_revision

    def wait(self, now: float) -> float:
        """Seconds until a read or a lapse check is due with no new write."""
        until = min(self._resync_at, self.lapse_check_at)
        if self._behind():
            until = min(until, self._catch_up_at)
        if self._awaiting(now):
            until = min(until, now + self._store.poll_interval)  # read again at the next poll
        return max(0.0, until - now)

    async def turn(self, revision: int | None) -> list[Snapshot]:
        """Read at ``revision`` (None: no read is due), then ask for lapses if that is due:
        the snapshots to show, in order."""
        out = [await self.read(revision)] if revision is not None else []
        if self._loop.time() >= self.lapse_check_at:
            out.append(await self.check_lapses())
        return [snap for snap in out if snap is not None]

    async def read(self, revision: int) -> Snapshot | None:
        """Read what changed; the new snapshot, or None when readers would see no change."""
        store = self._store
        began = self._loop.time()
        resync = self.low is not None and began >= self._resync_at  # a full read needs none
        if self.low is None:
            landed, changed = await self._read_all(), True
        else:
            landed, changed = await self._read_changes()
        self._read_revision = revision
        self.low = self._low_before(began - store.watch_lag)
        self._catch_up_at = began + store.watch_lag
        if resync and self.low is not None:
            self._resync_at = began + store.resync_interval
            if await self._missed_any(self.low):
                landed, changed = await self._read_all(), True
        # A poll can see the counter move before the write that moved it lands: read again
        # at each poll until it shows up, for at most the lag (a revision can also be taken
        # and never written, by a compare-and-swap that lost).
        self._landed = max(self._landed, landed)
        if self._landed >= revision:
            self._missing_since = None
        elif self._missing_revision != revision:
            self._missing_since = began
            self._missing_revision = revision
        return self._snapshot(revision) if changed else None

    async def _read_all(self) -> int:
        """Read every document and every live lease; the newest revision that landed."""
        store = self._store
        began = self._loop.time()
        now = await store._now()
        # Taken first: every revision up to it has landed, so the documents read next hold
        # it (or it is a removal). Taken after, it could count a write that landed between
        # the two reads as read.
        newest = await store._newest()
        async with store._errors("watch"):
            docs = await store._col.find({}).to_list(None)
            held = await store._leases_of([d.get("_id") for d in docs], now)
        store.watch_reads += len(docs) + len(held)
        store.full_reads += 1
        floor = self._floor()
        self._revisions = {str(d.get("_id")): _summed(d) for d in docs}
        self._dormant = {}
        self.instances = {i.id: i for i in store._live(docs, held, floor, self._dormant)}
        self._resync_at = began + store.resync_interval
        if self.lapse_check_at == float("inf"):
            self.lapse_check_at = began + store.lapse_check_interval
        await store.collect_garbage(d for d in docs if str(d.get("_id")) not in held)
        # What landed also counts removals, which the documents do not show.
        return max(max((_revision_of(d) for d in docs), default=0), newest)

    async def _read_changes(self) -> tuple[int, bool]:
        """Read the documents and removals above ``low``, and the leases of those documents;
        the newest revision read, and whether the view changed."""
        store = self._store
        since = {"revision": {"$gt": self.low}}
        now = await store._now()
        async with store._errors("watch"):
            docs = await store._col.find(since).to_list(None)
            removed = await store._removals.find(since).to_list(None)
            held = await store._leases_of([d.get("_id") for d in docs], now)
        store.watch_reads += len(docs) + len(removed) + len(held)
        floor = self._floor()
        # (revision, id, document or None to remove); a removal and a registration again of
        # the same id: the later one wins.
        changes: list[tuple[int, str, dict[str, Any] | None]] = [
            (_revision_of(d), str(d.get("_id")), d) for d in docs
        ]
        changes += [(_revision_of(d), str(d.get("_id")), None) for d in removed]
        changes.sort(key=lambda c: c[0])
        changed = False
        for _, key, doc in changes:
            self._dormant.pop(key, None)
            if doc is None:
                self._revisions.pop(key, None)
                changed |= self.instances.pop(key, None) is not None
                continue
            self._revisions[key] = _summed(doc)
            live = store._live([doc], held, floor, self._dormant)
            if not live:
                changed |= self.instances.pop(key, None) is not None
            elif self.instances.get(key) != live[0]:
                self.instances[key] = live[0]
                changed = True
        return (changes[-1][0] if changes else 0), changed

    def _floor(self) -> datetime:
        """The time a lease must be beyond to enter the view: now, or the end of the lapse
        window already looked at if that is later (a lease that ended inside a window
        already asked about would never be seen to lapse). The first read starts the
        windows at now; later reads never move them, or a lapse between the last look and
        the read would go unseen."""
        now = self._store.now()
        if self._lapses_until is None:
            self._lapses_until = now
        return max(now, self._lapses_until)

    async def _missed_any(self, low: int) -> bool:
        """Whether the instance documents at or below ``low`` (landed, by the lag) differ in
        number or in the sum of their revisions from those read: one small aggregate."""
        store = self._store
        pipeline = [
            {"$match": {"revision": {"$lte": low}}},
            {"$group": {"_id": None, "n": {"$sum": 1}, "r": {"$sum": "$revision"}}},
        ]
        async with store._errors("watch"):
            rows = await (await store._col.aggregate(pipeline)).to_list(None)
        store.watch_reads += len(rows)
        there = (rows[0].get("n", 0), rows[0].get("r", 0)) if rows else (0, 0)
        read = [r for r in self._revisions.values() if r <= low]
        if there == (len(read), sum(read)):
            return False
        log.info("registry: a write landed later than the lag; reading everything again")
        return True

    async def check_lapses(self) -> Snapshot | None:
        """Drop the instances whose lease crossed its expiry since the last look, and take
        back the dormant ones whose lease is in the future again."""
        store = self._store
        self.lapse_check_at = self._loop.time() + store.lapse_check_interval
        if self._lapses_until is None:
            return None
        now = await store._now()
        if now <= self._lapses_until:
            return None
        # A second wider on each side, then exact here: the embedded server compares dates
        # to the second only (MongoDB to the millisecond).
        since = self._lapses_until
        window: dict[str, Any] = {"expires_at": {"$gt": since - _SECOND, "$lte": now + _SECOND}}
        if self._dormant:  # their leases only if renewed: a lapsed one is not read again
            back = {"_id": {"$in": list(self._dormant)}, "expires_at": {"$gt": now - _SECOND}}
            window = {"$or": [window, back]}
        async with store._errors("watch"):
            docs = await store._leases.find(window).to_list(None)
        store.lapse_checks += 1
        store.watch_reads += len(docs)
        store.lapse_reads += len(docs)
        self._lapses_until = now
        changed = False
        for doc in docs:
            expires = _as_utc(doc.get("expires_at"))
            if expires is None:
                continue
            key = str(doc.get("_id"))
            if since < expires <= now:
                if (inst := self.instances.pop(key, None)) is not None:
                    self._dormant[key] = inst
                    changed = True
            elif expires > now and (inst := self._dormant.pop(key, None)) is not None:
                log.info("registry: %s was renewed after its lease looked run out here", key)
                self.instances[key] = _with_lease(inst, expires)
                changed = True
        return self._snapshot(self._read_revision) if changed else None

    def _low_before(self, t: float) -> int | None:
        """The counter as it stood at ``t``: the last value seen at or before it."""
        history = self._history
        while len(history) > 1 and history[1][0] <= t:
            history.popleft()
        if history and history[0][0] <= t:
            return history[0][1] if self.low is None else max(self.low, history[0][1])
        return self.low

    def _snapshot(self, revision: int) -> Snapshot | None:
        snap = Snapshot.of(self.instances.values(), revision)
        if snap.same_view(self._last):
            return None
        self._last = snap
        return snap


_SECOND = timedelta(seconds=1)


def _lease(instance_id: str, expires: datetime) -> dict[str, Any]:
    return {"_id": instance_id, "expires_at": expires}


def _with_lease(inst: Instance, expires: datetime) -> Instance:
    """The instance as read, with the lease it held then (renewals move it unseen)."""
    return dataclasses.replace(inst, lease_expires_at=expires)


def _summed(doc: dict[str, Any]) -> int:
    """A document's revision as the server's ``$sum`` counts it (anything else: 0)."""
    revision = doc.get("revision")
    return revision if type(revision) is int else 0


def _revision_of(doc: dict[str, Any]) -> int:
    revision = doc.get("revision")
    return revision if isinstance(revision, int) else -1


def _as_utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _short(exc: BaseException) -> str:
    text = str(exc).split(", Timeout:")[0].split(", Topology Description")[0]
    return text[:200]
