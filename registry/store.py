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
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
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
REVISION_ID = "instances"
DEFAULT_POLL_INTERVAL = 0.1  # s; the revision counter is one small read
MAX_SKIPPED_REMEMBERED = 10_000  # bad documents logged once each; a bound on the memory
MAX_UPDATE_TRIES = 16  # compare-and-swap retries; one instance has one writer, its sidecar
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
    ) -> None:
        self._client = client
        self._db = client[database]
        self._col = self._db[COLLECTION]
        self._counters = self._db[COUNTERS]
        self.poll_interval = poll_interval
        self._clock = clock
        self.url = url
        self._change_streams: bool | None = None
        self._skipped: set[tuple[str, str, str]] = set()

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

    async def deregister(self, instance_id: str) -> bool:
        async with self._errors("deregister"):
            await self._next_revision()
            result = await self._col.delete_one({"_id": instance_id})
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
        out = []
        for doc in docs:
            try:
                inst = from_document(doc)
            except InvalidDocument as exc:
                self._skip(doc, exc)
                continue
            # The server compared with our clock already; check again so that a slow answer
            # never resurrects a lease that ran out while it was in flight.
            if leases.is_live(inst.lease_expires_at, self._clock()):
                out.append(inst)
        out.sort(key=lambda i: i.id)
        return out

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

    async def snapshot(self) -> Snapshot:
        revision = await self.revision()
        return Snapshot.of(await self.list(), revision)

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

    def _sleep_for(self, snap: Snapshot, ceiling: float) -> float:
        now = self._clock()
        nxt = leases.next_expiry((i.lease_expires_at for i in snap.instances), now)
        if nxt is None:
            return ceiling
        return max(0.0, min(ceiling, (nxt - now).total_seconds() + 0.001))

    async def _watch_polling(self) -> AsyncIterator[Snapshot]:
        last: Snapshot | None = None
        seen_revision = -1
        loop = asyncio.get_running_loop()
        next_read = 0.0  # loop time of the next full read forced by a lease running out
        while True:
            revision = await self.revision()
            if revision != seen_revision or loop.time() >= next_read:
                snap = Snapshot.of(await self.list(), revision)
                seen_revision = revision
                next_read = loop.time() + self._sleep_for(snap, 3600.0)
                if not snap.same_view(last):
                    last = snap
                    yield snap
            await asyncio.sleep(min(self.poll_interval, max(0.0, next_read - loop.time())))

    async def _watch_change_stream(self) -> AsyncIterator[Snapshot]:
        # Each event means "re-read": the snapshot is rebuilt from a full read, which keeps
        # one code path for decoding and liveness. Events arriving together are coalesced.
        last: Snapshot | None = None
        async with self._errors("watch"):
            stream = await self._col.watch(full_document="updateLookup")
        try:
            snap = await self.snapshot()
            last = snap
            yield snap
            while True:
                timeout = self._sleep_for(last, 3600.0)
                try:
                    async with asyncio.timeout(timeout), self._errors("watch"):
                        await stream.next()
                        while await stream.try_next() is not None:
                            pass
                except TimeoutError:
                    pass
                snap = await self.snapshot()
                if not snap.same_view(last):
                    last = snap
                    yield snap
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


def _as_utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _short(exc: BaseException) -> str:
    text = str(exc).split(", Timeout:")[0].split(", Topology Description")[0]
    return text[:200]
