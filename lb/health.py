"""Active health-check scheduling: interval, jitter, timeout, healthy/unhealthy thresholds.

The scheduler decides; the shell runs the probes. ``due(now)`` returns the endpoints to
probe (and marks them in flight), ``on_result(key, ok, now)`` applies a result and
returns state changes. Endpoints start healthy (the registry or the operator said so)
and need ``unhealthy_threshold`` failures in a row to go down, ``healthy_threshold``
passes in a row to come back (HAProxy's rise 2 / fall 3).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HealthConfig:
    path: str = ""  # empty = active checks off
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    jitter: float = 0.1  # fraction of the interval added at random to each wait
    statuses: tuple[int, int] = (200, 399)  # inclusive range of passing statuses

    def passing(self, status: int) -> bool:
        return self.statuses[0] <= status <= self.statuses[1]


@dataclass(frozen=True, slots=True)
class Change:
    key: str
    healthy: bool


class _Host:
    __slots__ = (
        "healthy", "rise", "fall", "next_at", "in_flight", "checks", "last_error", "last_ok", "last_at",
    )  # fmt: skip

    def __init__(self, next_at: float) -> None:
        self.healthy = True
        self.rise = 0
        self.fall = 0
        self.next_at = next_at
        self.in_flight = False
        self.checks = 0
        self.last_error = ""
        self.last_ok: bool | None = None  # the last check's result, and when (monotonic)
        self.last_at = 0.0


class HealthChecker:
    def __init__(self, config: HealthConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()
        self.hosts: dict[str, _Host] = {}

    def _wait(self) -> float:
        cfg = self.config
        return cfg.interval + self._rng.uniform(0.0, cfg.jitter * cfg.interval)

    def set_endpoints(self, keys: Iterable[str], now: float) -> None:
        """Track these endpoints; a new one gets its first probe after a random offset
        within one interval, so N endpoints are not probed in lock step."""
        hosts = {}
        for k in keys:
            hosts[k] = self.hosts.get(k) or _Host(
                now + self._rng.uniform(0.0, self.config.interval)
            )
        self.hosts = hosts

    def is_healthy(self, key: str) -> bool:
        h = self.hosts.get(key)
        return h is None or h.healthy

    def due(self, now: float) -> list[str]:
        """Endpoints to probe now; each is marked in flight until its result arrives."""
        out = []
        for key, h in self.hosts.items():
            if not h.in_flight and now >= h.next_at:
                h.in_flight = True
                out.append(key)
        return out

    def next_due(self) -> float | None:
        return min((h.next_at for h in self.hosts.values() if not h.in_flight), default=None)

    def on_result(self, key: str, ok: bool, now: float, *, error: str = "") -> list[Change]:
        h = self.hosts.get(key)
        if h is None:
            return []  # removed while the probe ran
        h.in_flight = False
        h.checks += 1
        h.next_at = now + self._wait()
        h.last_error = "" if ok else error
        h.last_ok, h.last_at = ok, now
        cfg = self.config
        if ok:
            h.fall = 0
            h.rise += 1
            if not h.healthy and h.rise >= cfg.healthy_threshold:
                h.healthy = True
                return [Change(key, True)]
        else:
            h.rise = 0
            h.fall += 1
            if h.healthy and h.fall >= cfg.unhealthy_threshold:
                h.healthy = False
                return [Change(key, False)]
        return []
