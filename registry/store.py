"""The async registry store over pymongo's native ``AsyncMongoClient``.

Liveness is decided on read: every query carries ``lease_expires_at > now``, so an instance
whose lease ran out is gone for every reader at once. The TTL index only collects garbage
on real MongoDB (its monitor runs about once a minute).

Every write bumps one global counter (``counters/instances``) with ``$inc`` and stores the
new value on the changed document. ``watch()`` uses change streams where the server has them
(replica set or mongos) and polls that counter where it has not.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
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
COUNTERS = "counters"
# What deregister removed, with the revision it took: watchers read removals as they read
# changed documents. Kept REMOVALS_KEPT seconds (a TTL index, and pruned by deregister on
# servers without TTL); a watcher away longer reads everything when it comes back.
REMOVALS = "removals"
REMOVALS_KEPT = 600
REVISION_ID = "instances"
DEFAULT_POLL_INTERVAL = 0.1  # s; the revision counter is one small read
MAX_SKIPPED_REMEMBERED = 10_000  # bad documents logged once each; a bound on the memory
MAX_UPDATE_TRIES = 16  # compare-and-swap retries; one instance has one writer, its sidecar
# A watcher reads only the documents written since its last read (by revision). A writer
# takes its revision before its write lands, so a read goes back to the revision counter
# as it stood WATCH_LAG seconds before the previous read: every write that had taken its
# revision by then has landed. A full read every RESYNC_INTERVAL is the backstop for a
# write slower than that.
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


class RegistryStore:
    """Register, renew, publish status, deregister, list and watch service instances."""

    def __init__(
        self,
        client: AsyncMongoClient,
        *,
        database: str = DEFAULT_DATABASE,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        clock: Callable[[], datetime] = leases.utcnow,
        url: str = "",
        watch_lag: float = WATCH_LAG,
        resync_interval: float = RESYNC_INTERVAL,
    ) -> None:
        self._client = client
        self._db = client[database]
        self._col = self._db[COLLECTION]
        self._counters = self._db[COUNTERS]
        self._removals = self._db[REMOVALS]
        self.poll_interval = poll_interval
        self._clock = clock
        self.url = url
        self._change_streams: bool | None = None
        self._skipped: set[tuple[str, str, str]] = set()
        self.watch_lag = watch_lag
        self.resync_interval = resync_interval
        self.watch_reads = 0  # documents read by watchers: their cost on the database
        self.watch_polls = 0  # revision counter reads by polling watchers

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
        """Create indexes (idempotent) and learn whether the server has change streams."""
        async with self._errors("start"):
            await self._col.create_index([("service", ASCENDING), ("status", ASCENDING)])
            await self._col.create_index("lease_expires_at", expireAfterSeconds=0)
            await self._col.create_index("revision")
            await self._removals.create_index("revision")
            await self._removals.create_index("at", expireAfterSeconds=REMOVALS_KEPT)
            hello = await self._client.admin.command("hello")
        self._change_streams = bool(hello.get("setName")) or hello.get("msg") == "isdbgrid"

    @property
    def change_streams(self) -> bool | None:
        return self._change_streams

    # Writes

    async def register(self, instance: Instance, lease_ttl: float) -> Instance:
        """Insert or replace ``instance`` with a fresh lease; keeps ``registered_at`` if live."""
        now = self._clock()
        expires = leases.expiry(now, lease_ttl)
        async with self._errors("register"):
            revision = await self._next_revision()
            doc = to_document(instance)
            doc.update(
                lease_expires_at=expires, updated_at=now, revision=revision, registered_at=now
            )
            # An upsert with $setOnInsert is not portable to every wire server, so keep
            # registered_at by reading the previous document first.
            prev = await self._col.find_one(
                {"_id": instance.id, "lease_expires_at": {"$gt": now}}, {"registered_at": 1}
            )
            if prev and prev.get("registered_at"):
                doc["registered_at"] = prev["registered_at"]
            await self._col.replace_one({"_id": instance.id}, doc, upsert=True)
        return from_document(doc)

    async def renew(self, instance_id: str, lease_ttl: float) -> bool:
        """Extend a live lease. False if the instance is gone or its lease already ran out."""
        now = self._clock()
        expires = leases.expiry(now, lease_ttl)
        return await self._update(instance_id, now, "renew", lease_expires_at=expires)

    async def set_status(self, instance_id: str, status: str) -> bool:
        """Publish a health status. False if the instance is gone."""
        check_status(status)
        return await self._update(instance_id, self._clock(), "set_status", status=status)

    async def _update(self, instance_id: str, now: datetime, op: str, **fields: Any) -> bool:
        """Read, change, and replace only if nobody wrote in between (compare-and-swap on
        ``revision``). Whole-document replaces keep dates as BSON dates on every wire server;
        some store a ``$set`` date as a string."""
        async with self._errors(op):
            for _ in range(MAX_UPDATE_TRIES):
                doc = await self._col.find_one(
                    {"_id": instance_id, "lease_expires_at": {"$gt": now}}
                )
                if doc is None or not leases.is_live(_as_utc(doc.get("lease_expires_at")), now):
                    return False
                seen = doc.get("revision")
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

    async def deregister(self, instance_id: str) -> bool:
        """Delete the instance, and record the removal for watchers (see REMOVALS)."""
        now = self._clock()
        async with self._errors("deregister"):
            result = await self._col.delete_one({"_id": instance_id})
            if result.deleted_count:
                # Taken after the delete, so the removal is newer than any write to the
                # document, and taken only when there is a removal to land.
                revision = await self._next_revision()
                removal = {"_id": instance_id, "revision": revision, "at": now}
                await self._removals.replace_one({"_id": instance_id}, removal, upsert=True)
                # The TTL index does this on MongoDB; not every wire server runs one.
                cutoff = now - timedelta(seconds=REMOVALS_KEPT)
                await self._removals.delete_many({"at": {"$lt": cutoff}})
        return result.deleted_count == 1

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
        now = self._clock()
        query: dict[str, Any] = {"lease_expires_at": {"$gt": now}}
        if service is not None:
            query["service"] = service
        if healthy_only:
            query["status"] = "passing"
        async with self._errors("list"):
            docs = await self._col.find(query).to_list(None)
        # The server compared with our clock already; check again so that a slow answer
        # never resurrects a lease that ran out while it was in flight.
        now = self._clock()
        out = [
            inst
            for inst in map(self._decode, docs)
            if inst is not None and leases.is_live(inst.lease_expires_at, now)
        ]
        out.sort(key=lambda i: i.id)
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

        A lease running out produces a snapshot with no write at all: the watcher sleeps
        until the earliest lease in its current view and reads again then.
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

    async def _watch_polling(self) -> AsyncIterator[Snapshot]:
        view = _WatchView(self)
        loop = asyncio.get_running_loop()
        while True:
            revision = await self.revision()
            self.watch_polls += 1
            view.observed(revision, loop.time())
            if view.due(revision, loop.time()):
                snap = await view.read(revision)
                if snap is not None:
                    yield snap
            await asyncio.sleep(min(self.poll_interval, view.wait(loop.time())))

    async def _watch_change_stream(self) -> AsyncIterator[Snapshot]:
        # Each event means "read what changed"; events arriving together are coalesced.
        view = _WatchView(self)
        loop = asyncio.get_running_loop()
        async with self._errors("watch"):
            stream = await self._col.watch()
        try:
            while True:
                revision = await self.revision()
                view.observed(revision, loop.time())
                snap = await view.read(revision)
                if snap is not None:
                    yield snap
                try:
                    # Also wake when a lease runs out, and after the lag, so that a write
                    # whose event came before its document is read again.
                    async with asyncio.timeout(view.wait(loop.time())), self._errors("watch"):
                        await stream.next()
                        while await stream.try_next() is not None:
                            pass
                except TimeoutError:
                    pass
        finally:
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
    applies them in revision order. The first read, and one every RESYNC_INTERVAL, read
    everything.
    """

    def __init__(self, store: RegistryStore) -> None:
        self._store = store
        self._loop = asyncio.get_running_loop()
        self.instances: dict[str, Instance] = {}
        self.low: int | None = None  # None: the next read is a full one
        self._history: deque[tuple[float, int]] = deque()  # (loop time, counter) seen
        self._read_revision = -1
        self._next_expiry = float("inf")  # loop time of the earliest lease to run out
        self._resync_at = 0.0
        self._catch_up_at = 0.0  # when writes taken before the last read have all landed
        self._landed = 0  # the newest revision read (0: none; writes start at 1)
        # Since when the newest revision taken has not been read: its write is on its way.
        self._missing_since: float | None = None
        self._missing_revision = 0
        self._last: Snapshot | None = None

    def observed(self, revision: int, now: float) -> None:
        history = self._history
        if not history or history[-1][1] != revision:
            history.append((now, revision))

    def due(self, revision: int, now: float) -> bool:
        """Whether a read is needed now (polling): a write, a lease running out, a
        resync, or the lag after the last read is over while writes it saw taken may
        have landed after it (one read more, not one per poll)."""
        return (
            revision != self._read_revision
            or now >= self._next_expiry
            or now >= self._resync_at
            or (self._behind() and now >= self._catch_up_at)
            or self._awaiting(now)
        )

    def _awaiting(self, now: float) -> bool:
        """The newest revision taken has not shown up yet, and the lag is not over: its
        write may be on its way (a revision can also be taken and never written)."""
        return self._missing_since is not None and now < self._missing_since + self._store.watch_lag

    def _behind(self) -> bool:
        """Revisions the last read saw taken may have landed after it."""
        return self.low is not None and self.low < self._read_revision

    def wait(self, now: float) -> float:
        """Seconds until a read is due with no new write."""
        until = min(self._next_expiry, self._resync_at)
        if self._behind():
            until = min(until, self._catch_up_at)
        if self._awaiting(now):
            until = min(until, now + self._store.poll_interval)  # read again at the next poll
        return max(0.0, until - now)

    async def read(self, revision: int) -> Snapshot | None:
        """Read what changed; the new snapshot, or None when readers would see no change."""
        store = self._store
        began = self._loop.time()
        if self.low is None or began >= self._resync_at:
            insts = await store.list()
            store.watch_reads += len(insts)
            self.instances = {i.id: i for i in insts}
            self._resync_at = began + store.resync_interval
            # What landed also counts removals and leases that ran out, which list() skips.
            landed = max(max((i.revision for i in insts), default=0), await store._newest())
            changed = True
        else:
            since = {"revision": {"$gt": self.low}}
            async with store._errors("watch"):
                docs = await store._col.find(since).to_list(None)
                removed = await store._removals.find(since).to_list(None)
            store.watch_reads += len(docs) + len(removed)
            # (revision, id, instance or None to remove); a removal and a registration
            # again of the same id: the later one wins.
            changes = [(_revision_of(d), str(d.get("_id")), store._decode(d)) for d in docs]
            changes += [(_revision_of(d), str(d.get("_id")), None) for d in removed]
            changes.sort(key=lambda c: c[0])
            landed = changes[-1][0] if changes else 0
            changed = False
            for _, key, inst in changes:
                if inst is None:
                    changed |= self.instances.pop(key, None) is not None
                elif self.instances.get(key) != inst:
                    self.instances[key] = inst
                    changed = True
        self._read_revision = revision
        self.low = self._low_before(began - store.watch_lag)
        self._catch_up_at = began + store.watch_lag
        # A poll can see the counter move before the write that moved it lands: read again
        # at each poll until it shows up, for at most the lag (a revision can also be taken
        # and never written, by a compare-and-swap that lost).
        self._landed = max(self._landed, landed)
        if self._landed >= revision:
            self._missing_since = None
        elif self._missing_revision != revision:
            self._missing_since = began
            self._missing_revision = revision
        # Nothing new and no lease running out: the view, and when it next changes, stand.
        if changed or began >= self._next_expiry:
            return self._snapshot(revision)
        return None

    def _low_before(self, t: float) -> int | None:
        """The counter as it stood at ``t``: the last value seen at or before it."""
        history = self._history
        while len(history) > 1 and history[1][0] <= t:
            history.popleft()
        if history and history[0][0] <= t:
            return history[0][1] if self.low is None else max(self.low, history[0][1])
        return self.low

    def _snapshot(self, revision: int) -> Snapshot | None:
        store = self._store
        now = store._clock()
        live = []
        expired = []
        for inst in self.instances.values():
            if leases.is_live(inst.lease_expires_at, now):
                live.append(inst)
            else:
                expired.append(inst.id)
        for key in expired:
            del self.instances[key]  # a lease that ran out is renewed only by a new write
        nxt = leases.next_expiry((i.lease_expires_at for i in live), now)
        self._next_expiry = (
            float("inf") if nxt is None else self._loop.time() + (nxt - now).total_seconds() + 0.001
        )
        snap = Snapshot.of(live, revision)
        if snap.same_view(self._last):
            return None
        self._last = snap
        return snap


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
