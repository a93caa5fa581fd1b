"""A cluster: one set of endpoints with its table, picker, detectors, pools and counters.

The routing state is a :class:`View` (endpoint set, table, per-endpoint state) swapped
whole when the set changes; a request in flight keeps the view it started with. Usability
(ejected, failing active checks) is kept as a precomputed list, recomputed on events only.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from lb import ring
from lb.balancer import HASHED, Pick, Picker, panic_state
from lb.endpoints import Endpoint, EndpointSet
from lb.events import EventLog
from lb.hashing import HashSource
from lb.health import HealthChecker, HealthConfig
from lb.outlier import Detector, Event, Outcome, OutlierConfig
from lb.retry import RetryBudget
from mesh_native import Counters

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str = "default"
    policy: str = "maglev"
    hash_on: tuple[HashSource, ...] = ()
    balance_factor: int = 0  # bounded loads, percent (≥ 100); 0 = off
    table_size: int = ring.MAGLEV_TABLE_SIZE
    retries: int = 2
    connect_timeout: float = 2.0
    request_timeout: float = 30.0
    per_try_timeout: float = 0.0  # 0 = only the request timeout
    panic_threshold: float = 50.0
    panic_mode: str = "fail-open"
    retry_budget_percent: float = 20.0
    pool_max_idle: int = 64  # idle keep-alive connections kept per endpoint
    pool_idle_expiry: float = 30.0  # below common upstream keep-alive timeouts (nginx 75 s)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    health: HealthConfig = field(default_factory=HealthConfig)


class EndpointState:
    """Mutable per-endpoint state: counters and the idle pool. Survives set swaps.

    ``counters`` (native) count each finished try here and in the cluster's counters at
    once; ``active`` stays a Python int, since the pickers read it per request."""

    __slots__ = (
        "endpoint",
        "active",
        "counters",
        "idle",
        "connections",
        "host_header",
        "removed",
    )

    def __init__(self, endpoint: Endpoint, cluster_counters: Counters | None = None) -> None:
        self.endpoint = endpoint
        self.active = 0
        self.counters = Counters(cluster_counters)
        self.idle: deque = deque()  # (conn, idle_since) most recent on the right
        self.connections = 0
        self.host_header = endpoint.key.encode()  # Host for requests that came without one
        self.removed = False  # no longer in the set: connections coming back are closed

    # Keep-alive pool: LIFO, so a few connections stay warm and the rest expire.

    def take_idle(self, now: float, expiry: float):
        idle = self.idle
        while idle:
            conn, since = idle.pop()
            if conn.reusable and now - since < expiry:
                return conn
            conn.close()
        return None

    def put_idle(self, conn, now: float, max_idle: int) -> None:
        if self.removed or len(self.idle) >= max_idle:
            conn.close()
            return
        self.idle.append((conn, now))

    def expire_idle(self, now: float, expiry: float) -> None:
        idle = self.idle
        while idle and (now - idle[0][1] >= expiry or not idle[0][0].reusable):
            idle.popleft()[0].close()

    def close_idle(self) -> None:
        while self.idle:
            self.idle.pop()[0].close()

    def __repr__(self) -> str:
        return f"<EndpointState {self.endpoint.key} active={self.active} idle={len(self.idle)}>"


class View:
    """What one request routes with: the set, its table and the states, aligned by index."""

    __slots__ = ("endpoints", "table", "states")

    def __init__(self, endpoints: EndpointSet, table, states: list[EndpointState]) -> None:
        self.endpoints = endpoints
        self.table = table
        self.states = states


class Stats:
    """Cluster counters of what happens off the per-try path, read by /metrics. What every
    try counts (responses, latency) is the cluster's native ``counters``."""

    def __init__(self) -> None:
        self.local = {}  # status -> count of responses the LB made itself
        self.retries = 0
        self.retries_denied = 0
        self.random_picks = 0
        self.ejections = {}  # reason -> count
        self.panic_picks = 0


class Cluster:
    def __init__(self, config: ClusterConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.picker = Picker(config.policy, balance_factor=config.balance_factor, rng=rng)
        self.detector = Detector(config.outlier)
        self.health = HealthChecker(config.health, rng=rng) if config.health.path else None
        self.budget = RetryBudget(config.retry_budget_percent)
        self.stats = Stats()
        self.events = EventLog(config.name)
        self.counters = Counters()  # every endpoint's tries, whatever set it was in
        self.view = View(EndpointSet(), None, [])
        self.usable: list[bool] = []
        self.panic = False
        self.hashed = config.policy in HASHED
        self.needs_active = config.policy == "least_request" or bool(config.balance_factor)
        # The first hash source when it is a header: looked up without the general extractor.
        first = config.hash_on[0] if config.hash_on else None
        self.hash_header = first.name if first is not None and first.kind == "header" else None
        self._states: dict[str, EndpointState] = {}
        self._zeros: list[int] = []
        self._weights: list[int] | None = None
        self._pending: EndpointSet | None = None  # offered, not yet being built
        self._builder: asyncio.Task[None] | None = None
        self.builds = 0  # tables built (shown in /clusters)
        self.ready = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<Cluster {self.config.name} {self.config.policy} endpoints={len(self.view.endpoints)}"
            f" usable={sum(self.usable)} panic={self.panic}>"
        )

    # Endpoint set changes

    def offer(self, endpoints: EndpointSet) -> None:
        """Route to ``endpoints`` as soon as their table is built; never waits.

        Tables are built one at a time, off the loop. A set offered while one builds
        replaces any set still waiting: the newest wins, and every build ends in a swap,
        so routing is at most one build behind the newest set however often sets come.
        The caller goes on meanwhile (the registry watch keeps polling, so a change that
        lands during a build is read now, not a poll interval after the build).
        """
        self._pending = endpoints
        if self._builder is None:
            self._builder = asyncio.create_task(self._rebuild())

    async def set_endpoints(self, endpoints: EndpointSet) -> None:
        """:meth:`offer`, then wait until that set (or a newer one) is routed to."""
        self.offer(endpoints)
        await self.wait_built()

    @property
    def building(self) -> bool:
        """A set offered is not routed to yet (its table, or an older one, is building)."""
        return self._builder is not None

    async def wait_built(self) -> None:
        """Until the last set offered is the one routed to."""
        while self._builder is not None:
            await asyncio.shield(self._builder)

    async def _rebuild(self) -> None:
        try:
            while self._pending is not None:
                endpoints, self._pending = self._pending, None
                if self.ready.is_set() and endpoints.same_routing(self.view.endpoints):
                    self._swap(endpoints, self.view.table)  # names or order only
                    continue
                table = None
                if self.hashed and len(endpoints):
                    started = time.perf_counter()
                    try:
                        table = await ring.build_async(
                            self.config.policy, endpoints, table_size=self.config.table_size
                        )
                    except Exception:
                        log.exception(
                            "cluster %s: no table for %d endpoints; routing stays as it was",
                            self.config.name,
                            len(endpoints),
                        )
                        continue
                    self.builds += 1
                    took = (time.perf_counter() - started) * 1000
                    self.events.add(
                        "table",
                        f"{self.config.policy} table of {len(endpoints)} built in {took:.1f} ms",
                    )
                self._swap(endpoints, table)
        finally:
            self._builder = None

    def _swap(self, endpoints: EndpointSet, table) -> None:
        old = self._states
        states = {}
        for ep in endpoints:
            st = old.get(ep.key)
            if st is None:
                st = EndpointState(ep, self.counters)
            st.endpoint = ep
            states[ep.key] = st
        for key, st in old.items():
            if key not in states:
                st.removed = True
                st.close_idle()
        added = [k for k in states if k not in old]
        removed = [k for k in old if k not in states]
        if added or removed:
            self.events.add(
                "endpoints",
                f"{len(states)} endpoints"
                + "".join(f", +{k}" for k in added[:8])
                + "".join(f", -{k}" for k in removed[:8]),
            )
        self._states = states
        self.view = View(endpoints, table, [states[k] for k in endpoints.keys])
        self._zeros = [0] * len(endpoints)
        weights = [e.weight for e in endpoints]
        self._weights = weights if len(set(weights)) > 1 else None
        self.detector.set_endpoints(endpoints.keys)
        if self.health:
            self.health.set_endpoints(endpoints.keys, time.monotonic())
        self.refresh_usable()
        self.ready.set()
        log.info(
            "cluster %s: %d endpoints%s",
            self.config.name,
            len(endpoints),
            f" ({', '.join(endpoints.keys[:8])})" if len(endpoints) else "",
        )

    def refresh_usable(self) -> None:
        det = self.detector
        hc = self.health
        self.usable = [
            not det.is_ejected(k) and (hc is None or hc.is_healthy(k))
            for k in self.view.endpoints.keys
        ]
        panic = panic_state(self.usable, self.config.panic_threshold) or (
            bool(self.usable) and not any(self.usable)
        )
        if panic != self.panic:
            self.panic = panic
            usable = f"{sum(self.usable)} of {len(self.usable)} endpoints usable"
            if panic:
                mode = "routing to all" if self.config.panic_mode == "fail-open" else "answering 503"
                self.events.add("panic", f"{usable}: {mode}")
                log.warning("cluster %s: panic: %s, %s", self.config.name, usable, mode)
            else:
                self.events.add("panic-over", usable)
                log.info("cluster %s: panic over", self.config.name)

    # Per request

    def choose(self, key_hash: int | None, tries: int) -> tuple[View, Pick] | None:
        """The view and the order to try endpoints in, or None: answer 503."""
        view = self.view
        if not view.states:
            return None
        usable: Sequence[bool] = self.usable
        if self.panic:
            if self.config.panic_mode == "fail-closed":
                return None
            usable = [True] * len(usable)
            self.stats.panic_picks += 1
        if self.hashed and key_hash is not None and not self.needs_active and not self.panic:
            # The common case, without the general picker: the key's home, if usable.
            home = view.table.lookup(key_hash)
            if home >= 0 and usable[home]:
                return view, Pick((home,), key_hash=key_hash, partial=tries > 1)
        active = [s.active for s in view.states] if self.needs_active else self._zeros
        pick = self.picker.pick(
            view.table, key_hash, usable, active, tries=tries, weights=self._weights
        )
        if not pick.order:
            return None
        if pick.spilled:
            view.states[pick.order[0]].counters.spill()
        return view, pick

    def home(self, key_hash: int) -> int:
        """The key's home index when that is the whole decision (usable, no panic, no
        bounded loads or least-request state), else -1: the caller uses :meth:`choose`.
        Builds nothing: the per-request fast path."""
        if self.panic or self.needs_active:
            return -1
        view = self.view
        if view.table is None or not view.states:
            return -1
        home = view.table.lookup(key_hash)
        return home if home >= 0 and self.usable[home] else -1

    def rest(self, view: View, pick: Pick, tries: int) -> tuple[int, ...]:
        """The whole try order of a pick that listed only its home."""
        usable = [True] * len(view.states) if self.panic else self.usable
        if len(usable) != len(view.states):
            return pick.order  # a view that is not current (callers reroute first): the home
        return self.picker.rest(view.table, pick, usable, tries)

    def reroute(
        self, view: View, order: tuple[int, ...], tried: int, key_hash: int | None, tries: int
    ) -> tuple[View, tuple[int, ...]]:
        """A retry's order when the endpoint set changed since the request was routed: the
        current view, and an order whose first ``tried`` positions are the spent ones (of
        the old view, never read again) followed by the current set's picks for the key,
        leaving out the endpoints already tried. Envoy too picks a retry's host from the
        set as it is at the retry, skipping the hosts tried before."""
        spent = {view.states[i].endpoint.key for i in order[:tried]}
        choice = self.choose(key_hash, tries + len(spent))
        if choice is None:
            return view, order[:tried]  # nothing left to try: the last outcome stands
        now, pick = choice
        full = self.rest(now, pick, tries + len(spent)) if pick.partial else pick.order
        left = [i for i in full if now.states[i].endpoint.key not in spent]
        return now, (*order[:tried], *left[: tries - tried])

    def record(self, state: EndpointState, outcome: Outcome, now: float, latency: float | None):
        events = self.detector.record(state.endpoint.key, outcome, now, latency=latency)
        if events:
            self.apply(events)

    def apply(self, events: list[Event]) -> None:
        for ev in events:
            if ev.kind == "eject":
                self.stats.ejections[ev.reason] = self.stats.ejections.get(ev.reason, 0) + 1
                self.events.add(
                    "eject",
                    f"{ev.reason} for {ev.until - time.monotonic():.0f} s, ejection #{ev.ejections}",
                    ev.key,
                )
                log.warning(
                    "cluster %s: ejected %s (%s) for %.0fs, ejection #%d",
                    self.config.name,
                    ev.key,
                    ev.reason,
                    ev.until - time.monotonic(),
                    ev.ejections,
                )
                st = self._states.get(ev.key)
                if st:
                    st.close_idle()
            else:
                self.events.add("restore", ev.reason, ev.key)
                log.info("cluster %s: restored %s (%s)", self.config.name, ev.key, ev.reason)
        self.refresh_usable()

    def maintain(self, now: float) -> None:
        """Once a second: end ejections, expire idle connections."""
        events = self.detector.tick(now)
        if events:
            self.apply(events)
        for st in self.view.states:
            if st.idle:
                st.expire_idle(now, self.config.pool_idle_expiry)

    def sweep(self, now: float) -> None:
        events = self.detector.sweep(now)
        if events:
            self.apply(events)

    def close(self) -> None:
        for st in self.view.states:
            st.close_idle()
