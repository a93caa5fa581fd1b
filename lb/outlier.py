"""Passive outlier detection: a monitor per endpoint and a detector over all of them.

Rules (defaults after Envoy's outlier detection, plus latency ejection which Envoy,
HAProxy and nginx lack):

- ``consecutive_5xx`` (5) failures of any kind in a row eject (5xx responses and
  gateway/connect failures alike, as Envoy counts local-origin errors as 5xx);
- ``consecutive_gateway`` (3) gateway failures in a row eject (502/503/504 from the
  upstream, connect failure, reset before any response byte, timeout);
- latency: at each ``tick`` an endpoint whose latency EWMA is ``latency_factor`` × the
  median of its peers' (and at least ``latency_floor`` seconds above it), with at least
  ``latency_min_requests`` requests since the last sweep, is ejected;
- an ejection lasts ``base_ejection_time`` × the number of times the endpoint has been
  ejected, capped at ``max_ejection_time``; the count decays by one per sweep interval
  the endpoint spends un-ejected;
- at most ``max_ejection_percent`` of endpoints are ejected at once, but one endpoint of
  two or more may always be ejected (the PR 34796 semantics, made the default);
- a successful active health check restores an ejected endpoint early.

The detector records outcomes with an explicit ``now`` and returns events; the caller
logs and counts them.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class Outcome(enum.Enum):
    OK = "ok"  # any response below 500 (a 4xx is the client's fault, not the endpoint's)
    HTTP_5XX = "5xx"  # 500, 501, 505…
    GATEWAY = "gateway"  # 502, 503, 504 from the upstream
    CONNECT_FAILED = "connect_failed"
    RESET = "reset"  # the connection closed or reset before a complete response
    TIMEOUT = "timeout"
    # The client did not send its whole request in time: nobody's failure upstream, never
    # recorded against an endpoint (answered 408).
    CLIENT_TIMEOUT = "client_timeout"

    @classmethod
    def from_status(cls, status: int) -> Outcome:
        if status < 500:
            return cls.OK
        return cls.GATEWAY if status in (502, 503, 504) else cls.HTTP_5XX


_NO_EVENTS: tuple[Event, ...] = ()

GATEWAY_OUTCOMES = frozenset(
    {Outcome.GATEWAY, Outcome.CONNECT_FAILED, Outcome.RESET, Outcome.TIMEOUT}
)

REASON_5XX = "consecutive_5xx"
REASON_GATEWAY = "consecutive_gateway_failure"
REASON_LATENCY = "latency"
REASONS = (REASON_5XX, REASON_GATEWAY, REASON_LATENCY)

EWMA_ALPHA = 0.2  # weight of the newest latency sample


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    consecutive_5xx: int = 5
    consecutive_gateway: int = 3
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 50.0
    interval: float = 10.0  # the sweep: latency evaluation and ejection-count decay
    latency_factor: float = 0.0  # 0 = latency ejection off
    latency_min_requests: int = 20
    latency_floor: float = 0.010


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "eject" or "restore"
    key: str
    reason: str
    until: float = 0.0
    ejections: int = 0


class Monitor:
    """What the detector knows about one endpoint."""

    __slots__ = (
        "key",
        "consecutive_5xx",
        "consecutive_gateway",
        "ejected_until",
        "ejected_reason",
        "ejections",
        "decay_at",
        "latency_ewma",
        "window_requests",
        "requests",
        "failures",
    )

    def __init__(self, key: str) -> None:
        self.key = key
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.ejected_until: float | None = None
        self.ejected_reason = ""
        self.ejections = 0  # the backoff multiplier
        self.decay_at = 0.0
        self.latency_ewma: float | None = None
        self.window_requests = 0
        self.requests = 0
        self.failures = 0

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    def __repr__(self) -> str:
        state = f"ejected={self.ejected_reason}" if self.ejected else "ejected=no"
        return (
            f"<Monitor {self.key} {state} 5xx={self.consecutive_5xx}"
            f" gw={self.consecutive_gateway} n={self.ejections}>"
        )


class Detector:
    def __init__(self, config: OutlierConfig | None = None, keys: Iterable[str] = ()) -> None:
        self.config = config or OutlierConfig()
        self.monitors: dict[str, Monitor] = {}
        self.set_endpoints(keys)

    def set_endpoints(self, keys: Iterable[str]) -> None:
        """Track exactly these endpoints; state survives for endpoints that stay."""
        self.monitors = {k: self.monitors.get(k) or Monitor(k) for k in keys}

    def is_ejected(self, key: str) -> bool:
        m = self.monitors.get(key)
        return m is not None and m.ejected_until is not None

    @property
    def ejected_count(self) -> int:
        return sum(1 for m in self.monitors.values() if m.ejected)

    def _may_eject(self) -> bool:
        total = len(self.monitors)
        if total < 2:
            return False  # ejecting the only endpoint helps nobody
        cap = max(1, int(total * self.config.max_ejection_percent / 100))
        return self.ejected_count < cap

    def _eject(self, m: Monitor, reason: str, now: float) -> Event | None:
        if m.ejected or not self._may_eject():
            return None
        cfg = self.config
        m.ejections += 1
        m.ejected_until = now + min(cfg.base_ejection_time * m.ejections, cfg.max_ejection_time)
        m.ejected_reason = reason
        m.consecutive_5xx = m.consecutive_gateway = 0
        return Event("eject", m.key, reason, m.ejected_until, m.ejections)

    def _restore(self, m: Monitor, reason: str, now: float) -> Event:
        m.ejected_until = None
        m.ejected_reason = ""
        m.consecutive_5xx = m.consecutive_gateway = 0
        m.latency_ewma = None
        m.window_requests = 0
        m.decay_at = now + self.config.interval
        return Event("restore", m.key, reason, 0.0, m.ejections)

    def record(
        self, key: str, outcome: Outcome, now: float, latency: float | None = None
    ) -> Sequence[Event]:
        """Record one request's outcome at one endpoint."""
        m = self.monitors.get(key)
        if m is None:
            return []
        m.requests += 1
        if latency is not None and outcome is Outcome.OK:
            m.window_requests += 1
            prev = m.latency_ewma
            m.latency_ewma = latency if prev is None else prev + EWMA_ALPHA * (latency - prev)
        if outcome is Outcome.OK:
            m.consecutive_5xx = m.consecutive_gateway = 0
            return _NO_EVENTS  # the common case: no list made
        m.failures += 1
        m.consecutive_5xx += 1
        if outcome in GATEWAY_OUTCOMES:
            m.consecutive_gateway += 1
        else:
            m.consecutive_gateway = 0
        cfg = self.config
        reason = None
        if cfg.consecutive_gateway and m.consecutive_gateway >= cfg.consecutive_gateway:
            reason = REASON_GATEWAY
        elif cfg.consecutive_5xx and m.consecutive_5xx >= cfg.consecutive_5xx:
            reason = REASON_5XX
        if reason is None:
            return []
        ev = self._eject(m, reason, now)
        return [ev] if ev else []

    def restore(self, key: str, now: float, reason: str = "active_check") -> list[Event]:
        """An active health check passed: un-eject early."""
        m = self.monitors.get(key)
        if m is None or not m.ejected:
            return []
        return [self._restore(m, reason, now)]

    def next_wakeup(self) -> float | None:
        """The earliest ejection end, for a caller that sleeps until then."""
        return min(
            (m.ejected_until for m in self.monitors.values() if m.ejected_until), default=None
        )

    def tick(self, now: float) -> list[Event]:
        """Restore endpoints whose ejection ended; decay ejection counts."""
        events = []
        for m in self.monitors.values():
            if m.ejected_until is not None and now >= m.ejected_until:
                events.append(self._restore(m, "ejection_time_elapsed", now))
            elif m.ejected_until is None and m.ejections and now >= m.decay_at:
                m.ejections -= 1
                m.decay_at = now + self.config.interval
        return events

    def sweep(self, now: float) -> list[Event]:
        """Once per ``interval``: latency ejection over the requests since the last sweep."""
        events = self.tick(now)
        cfg = self.config
        if cfg.latency_factor > 0:
            events.extend(self._latency(now))
        for m in self.monitors.values():
            m.window_requests = 0
        return events

    def _latency(self, now: float) -> list[Event]:
        cfg = self.config
        live = [
            m
            for m in self.monitors.values()
            if not m.ejected
            and m.latency_ewma is not None
            and m.window_requests >= cfg.latency_min_requests
        ]
        events = []
        for m in sorted(live, key=lambda m: m.latency_ewma or 0.0, reverse=True):
            peers = [p.latency_ewma for p in live if p is not m and p.latency_ewma is not None]
            if not peers:
                break
            median = statistics.median(peers)
            ewma = m.latency_ewma or 0.0
            if ewma > cfg.latency_factor * median and ewma - median >= cfg.latency_floor:
                ev = self._eject(m, REASON_LATENCY, now)
                if ev:
                    events.append(ev)
        return events
