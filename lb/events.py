"""What happened to a cluster, for people: ejections, restorations, health flips, panic in
and out, endpoint set changes, table builds. A bounded buffer per cluster, read by the admin
port's ``/events`` (the web page's live log, and JSON); nothing here runs per request."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass

MAX_EVENTS = 500  # per cluster; the oldest go first


@dataclass(frozen=True, slots=True)
class Event:
    seq: int  # grows by one per event, per log: a reader asks for what came after its last
    at: float  # wall clock, seconds
    kind: str  # eject, restore, healthy, unhealthy, panic, panic-over, endpoints
    cluster: str
    endpoint: str  # "" for the cluster as a whole
    detail: str

    def json(self) -> dict:
        return asdict(self)


class EventLog:
    def __init__(self, cluster: str, size: int = MAX_EVENTS) -> None:
        self.cluster = cluster
        self.events: deque[Event] = deque(maxlen=size)
        self.seq = 0

    def add(self, kind: str, detail: str, endpoint: str = "") -> Event:
        self.seq += 1
        event = Event(self.seq, round(time.time(), 3), kind, self.cluster, endpoint, detail)
        self.events.append(event)
        return event

    def since(self, seq: int) -> list[Event]:
        """The events after ``seq`` still held (all of them for 0)."""
        if not self.events or self.events[-1].seq <= seq:
            return []
        return [e for e in self.events if e.seq > seq]
