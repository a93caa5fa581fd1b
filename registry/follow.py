"""Follow the registry for a long-running reader (sidecar DNS, LB endpoints).

Static stability: when the database goes away the reader keeps its last snapshot, retries
with capped exponential backoff and jitter, and logs once per state change, not per retry.

When it comes back, leases may have run out during the outage although every instance is
alive: its sidecar could not renew. For ``reconnect_grace`` seconds after a reconnection
the follower keeps showing the instances it last saw and the database no longer has, so
that readers do not drop every endpoint while the sidecars register again; after the
grace, what the database says is shown as it is.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from registry.backoff import Backoff
from registry.errors import RegistryError, RegistryUnavailable
from registry.model import Snapshot
from registry.store import RegistryStore, mask_url

log = logging.getLogger(__name__)

# ≥ the default lease TTL (10 s) plus the sidecar's backoff cap (5 s) would cover every
# sidecar; 10 s covers the renewal interval (ttl/3) with a wide margin.
DEFAULT_RECONNECT_GRACE = 10.0


def hold_missing(
    held: Snapshot | None, fresh: Snapshot, removed: frozenset[str] = frozenset()
) -> Snapshot:
    """``fresh`` plus the instances of ``held`` that ``fresh`` lacks (by id), as they were,
    but for those ``removed``: deregistered, not merely unrenewed."""
    if held is None:
        return fresh
    ids = {i.id for i in fresh.instances}
    kept = [i for i in held.instances if i.id not in ids and i.id not in removed]
    if not kept:
        return fresh
    return Snapshot.of([*fresh.instances, *kept], fresh.revision)


class Follower:
    """Feed every new snapshot to ``on_snapshot``; say when the registry is up or down.

    ``connected`` is False from the first failure until a snapshot arrives again; the
    callers show it in their metrics (``mesh_registry_connected``). ``snapshot`` is what
    was last shown to ``on_snapshot``.
    """

    def __init__(
        self,
        store: RegistryStore,
        on_snapshot: Callable[[Snapshot], Awaitable[None] | None],
        *,
        name: str = "registry",
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        reconnect_grace: float = DEFAULT_RECONNECT_GRACE,
    ) -> None:
        self._store = store
        self._on_snapshot = on_snapshot
        self._name = name
        self._backoff = backoff or Backoff(base=0.1, cap=5.0, rng=rng or random.Random())
        self.reconnect_grace = reconnect_grace
        self.connected = False
        self.snapshot: Snapshot | None = None
        self.snapshots = 0
        self.snapshot_at: float | None = None  # time.monotonic() of the last one shown
        self.failures = 0
        self.first = asyncio.Event()
        self._held: Snapshot | None = None  # what was shown when the registry went away
        self._grace_until = 0.0
        self._latest: Snapshot | None = None  # what the database said last
        self._grace_task: asyncio.Task[None] | None = None
        self._down_since = datetime.now(UTC)  # when the last outage began (store clock)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return (
            f"<Follower {self._name} {state} snapshots={self.snapshots} failures={self.failures}>"
        )

    async def run(self) -> None:
        """Run until cancelled."""
        down_logged = False
        try:
            while True:
                try:
                    async for snap in self._store.watch():
                        if not self.connected:
                            if down_logged:
                                log.info(
                                    "%s: registry %s is back", self._name, mask_url(self._store.url)
                                )
                                self._grace_until = (
                                    asyncio.get_running_loop().time() + self.reconnect_grace
                                )
                            down_logged = False
                        self.connected = True
                        self._backoff.reset()
                        await self._deliver(snap)
                        self.first.set()
                except RegistryUnavailable as exc:
                    self.failures += 1
                    if self.connected or not down_logged:
                        log.warning("%s: %s; serving the last known state", self._name, exc)
                        down_logged = True
                        self._held = self.snapshot
                        self._down_since = self._store.now()
                    self.connected = False
                except RegistryError as exc:
                    self.failures += 1
                    self.connected = False
                    log.error("%s: %s", self._name, exc)
                await asyncio.sleep(self._backoff.next_delay())
        finally:
            if self._grace_task is not None:
                self._grace_task.cancel()

    async def _deliver(self, snap: Snapshot) -> None:
        self._latest = snap
        loop = asyncio.get_running_loop()
        shown = snap
        if loop.time() < self._grace_until:
            shown = hold_missing(self._held, snap, await self._removed())
            if shown is not snap and self._grace_task is None:
                self._grace_task = asyncio.create_task(self._end_grace())
        await self._show(shown)

    async def _removed(self) -> frozenset[str]:
        """Instances deregistered since the outage began (a minute of margin for clocks):
        the grace holds those whose leases ran out, never those that were removed."""
        since = self._down_since - timedelta(seconds=60)
        try:
            return frozenset(await self._store.removed_since(since))
        except RegistryError:
            return frozenset()  # the registry went again: hold them all, as before

    async def _end_grace(self) -> None:
        loop = asyncio.get_running_loop()
        while (left := self._grace_until - loop.time()) > 0:
            await asyncio.sleep(left)  # a later reconnection may have moved the end
        self._grace_task = None
        if not self.connected:
            return  # away again: keep showing what is shown; the return starts a new grace
        self._held = None
        latest = self._latest
        if latest is not None and not latest.same_view(self.snapshot):
            log.info("%s: reconnect grace over; showing the registry as it is", self._name)
            await self._show(latest)

    async def _show(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.snapshots += 1
        self.snapshot_at = time.monotonic()
        result = self._on_snapshot(snap)
        if result is not None:
            await result
