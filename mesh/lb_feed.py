"""Registry → LB: healthy instances of a service become the cluster's endpoint set.

Only ``passing`` instances are routed to: the sidecar publishes ``warning``, ``critical``
and ``draining`` from its local probes and its shutdown, and the LB honours them. While
the registry is away the follower keeps the last snapshot, so routing keeps working.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from lb.cluster import Cluster
from lb.endpoints import Endpoint, EndpointSet
from registry.model import Snapshot
from registry.store import RegistryStore

log = logging.getLogger(__name__)


def endpoints_for(snapshot: Snapshot, service: str) -> EndpointSet:
    return EndpointSet.of(
        Endpoint(i.address, i.port, i.weight, name=i.id)
        for i in snapshot.service(service, healthy_only=True)
    )


class RegistryFeed:
    """Feed every service cluster from registry snapshots (through a ``Follower``)."""

    def __init__(self, store: RegistryStore, clusters: Iterable[tuple[str, Cluster]]) -> None:
        from registry.follow import Follower

        self.store = store
        self.clusters = list(clusters)
        self.follower = Follower(store, self._on_snapshot, name="lb")

    def _on_snapshot(self, snap: Snapshot) -> None:
        # Never waits for a table build: the watch goes on reading while tables build.
        for service, cluster in self.clusters:
            cluster.offer(endpoints_for(snap, service))

    async def wait_ready(self) -> None:
        """Until the first snapshot is read and every cluster routes to what it said."""
        await self.follower.first.wait()
        for _, cluster in self.clusters:
            await cluster.wait_built()

    def gauges(self) -> dict[str, float]:
        out = {
            "mesh_registry_connected": float(self.follower.connected),
            "mesh_registry_snapshots": float(self.follower.snapshots),
        }
        if self.store.change_streams is not None:
            out["mesh_registry_change_streams"] = float(self.store.change_streams)
        if self.follower.snapshot_at is not None:
            out["mesh_registry_snapshot_age_seconds"] = time.monotonic() - self.follower.snapshot_at
        return out
