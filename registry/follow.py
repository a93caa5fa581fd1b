"""Follow the registry for a long-running reader (sidecar DNS, LB endpoints).

Static stability: when the database goes away the reader keeps its last snapshot, retries
with capped exponential backoff and jitter, and logs once per state change, not per retry.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from registry.backoff import Backoff
from registry.errors import RegistryError, RegistryUnavailable
from registry.model import Snapshot
from registry.store import RegistryStore, mask_url

log = logging.getLogger(__name__)


class Follower:
    """Feed every new snapshot to ``on_snapshot``; say when the registry is up or down.

    ``connected`` is False from the first failure until a snapshot arrives again; the
    callers show it in their metrics (``mesh_registry_connected``).
    """

    def __init__(
        self,
        store: RegistryStore,
        on_snapshot: Callable[[Snapshot], Awaitable[None] | None],
        *,
        name: str = "registry",
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._on_snapshot = on_snapshot
        self._name = name
        self._backoff = backoff or Backoff(base=0.1, cap=5.0, rng=rng or random.Random())
        self.connected = False
        self.snapshot: Snapshot | None = None
        self.snapshots = 0
        self.failures = 0
        self.first = asyncio.Event()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<Follower {self._name} {state} snapshots={self.snapshots} failures={self.failures}>"

    async def run(self) -> None:
        """Run until cancelled."""
        down_since_logged = False
        while True:
            try:
                async for snap in self._store.watch():
                    if not self.connected:
                        if down_since_logged:
                            log.info("%s: registry %s is back", self._name, mask_url(self._store.url))
                        down_since_logged = False
                    self.connected = True
                    self._backoff.reset()
                    self.snapshot = snap
                    self.snapshots += 1
                    result = self._on_snapshot(snap)
                    if result is not None:
                        await result
                    self.first.set()
            except RegistryUnavailable as exc:
                self.failures += 1
                if self.connected or not down_since_logged:
                    log.warning("%s: %s; serving the last known state", self._name, exc)
                    down_since_logged = True
                self.connected = False
            except RegistryError as exc:
                self.failures += 1
                self.connected = False
                log.error("%s: %s", self._name, exc)
            await asyncio.sleep(self._backoff.next_delay())
