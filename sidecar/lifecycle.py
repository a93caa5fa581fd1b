"""The registration lifecycle as a pure state machine, driven with explicit time.

    REGISTERING ──register ok──► REGISTERED ──drain()──► DRAINING ──deregistered──► GONE
         ▲                            │                      │
         └──── renew/publish: lease lost (False)             └─ drain deadline + grace: GONE

Rules:
- REGISTERING: register now, then again after a backoff while the registry is away.
- REGISTERED: publish the health status whenever it differs from the published one;
  renew every ``lease_ttl / 3`` (publishing does not move the renewal). A renewal that fails
  because the registry is away is retried with backoff; one that finds the lease gone
  (``False``) goes back to REGISTERING: a lease that ran out during an outage becomes a new
  registration.
- drain(): at once publish ``draining`` (out of DNS and the LB), wait ``drain`` seconds,
  deregister. A registry that is away during the drain does not hold the exit up: after the
  deadline plus a short grace the machine is GONE and the lease runs out by itself.
- A drain before the first successful registration has nothing to undo: GONE at once.

The shell asks :meth:`next_action` what to do at ``now``, does it, and reports with
:meth:`done`. Events (for the shell to log) come back from :meth:`done`, one per change of
state, never one per retry.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from registry.backoff import Backoff
from registry.model import DRAINING

DEREGISTER_GRACE = 3.0  # s after the drain deadline to keep trying to deregister
RETRY_BASE, RETRY_CAP = 0.1, 2.0  # s; registry writes retried quickly, capped low


class State(enum.Enum):
    REGISTERING = "registering"
    REGISTERED = "registered"
    DRAINING = "draining"
    GONE = "gone"


class Do(enum.Enum):
    REGISTER = "register"
    RENEW = "renew"
    PUBLISH = "publish"  # set_status(desired status)
    SET_DRAINING = "set_draining"
    DEREGISTER = "deregister"
    WAIT = "wait"
    EXIT = "exit"


class Outcome(enum.Enum):
    OK = "ok"
    LOST = "lost"  # the registry answered: no live lease for this instance
    UNAVAILABLE = "unavailable"  # the registry did not answer
    ERROR = "error"  # the registry refused (bad document, permissions...)


@dataclass(frozen=True, slots=True)
class Action:
    do: Do
    at: float = 0.0  # for WAIT: when to ask again
    status: str = ""  # for REGISTER and PUBLISH: the status to write


class Lifecycle:
    def __init__(
        self,
        *,
        lease_ttl: float,
        drain: float,
        status: str,
        now: float,
        rng: random.Random | None = None,
    ) -> None:
        self.lease_ttl = lease_ttl
        self.drain_time = drain
        self.state = State.REGISTERING
        self.desired = status
        self.published: str | None = None
        self.registry_up: bool | None = None  # None until the first answer or failure
        self.registrations = 0
        self._due = now  # next register / renew / retry
        self._drain_until = 0.0
        self._give_up = 0.0
        self._drain_published = False
        self._backoff = Backoff(RETRY_BASE, RETRY_CAP, rng=rng or random.Random())

    def __repr__(self) -> str:
        return (
            f"<Lifecycle {self.state.value} desired={self.desired} published={self.published}"
            f" registry={'up' if self.registry_up else 'down' if self.registry_up is False else '?'}>"
        )

    @property
    def renew_every(self) -> float:
        return self.lease_ttl / 3

    # Inputs

    def set_status(self, status: str) -> None:
        """The local probe's verdict changed."""
        self.desired = status

    def drain(self, now: float) -> None:
        if self.state is State.REGISTERED:
            self.state = State.DRAINING
            self._drain_until = now + self.drain_time
            self._give_up = self._drain_until + DEREGISTER_GRACE
            self._due = now  # the renewal schedule no longer matters
        elif self.state is State.REGISTERING:
            self.state = State.GONE

    # Decisions

    def next_action(self, now: float) -> Action:
        if self.state is State.GONE:
            return Action(Do.EXIT)
        if self.state is State.REGISTERING:
            if now < self._due:
                return Action(Do.WAIT, self._due)
            return Action(Do.REGISTER, status=self.desired)
        if self.state is State.DRAINING:
            if now >= self._give_up:
                self.state = State.GONE
                return Action(Do.EXIT)
            if now < self._due:
                return Action(Do.WAIT, min(self._due, self._give_up))
            if not self._drain_published and now < self._drain_until:
                return Action(Do.SET_DRAINING, status=DRAINING)
            if now < self._drain_until:
                return Action(Do.WAIT, self._drain_until)
            return Action(Do.DEREGISTER)
        # REGISTERED: a new status goes out at once, unless the registry is away (backoff).
        if self.published != self.desired:
            if self.registry_up is False and now < self._due:
                return Action(Do.WAIT, self._due)
            return Action(Do.PUBLISH, status=self.desired)
        if now < self._due:
            return Action(Do.WAIT, self._due)
        return Action(Do.RENEW)

    def done(self, action: Action, outcome: Outcome, now: float) -> list[str]:
        """Record what the I/O for ``action`` gave; return events worth one log line each."""
        events = self._registry_seen(outcome)
        do = action.do
        if outcome in (Outcome.UNAVAILABLE, Outcome.ERROR):
            self._due = now + self._backoff.next_delay()
            return events
        self._backoff.reset()
        if do is Do.REGISTER:
            self.state = State.REGISTERED
            self.published = action.status
            self.registrations += 1
            self._due = now + self.renew_every
            events.append("registered" if self.registrations == 1 else "registered again")
        elif outcome is Outcome.LOST:
            if self.state is State.DRAINING:
                self.state = State.GONE  # nothing left to deregister
                return events
            self.state = State.REGISTERING
            self.published = None
            self._due = now
            events.append("lease lost")
        elif do is Do.PUBLISH:
            # set_status does not extend the lease: the renewal schedule stays as it was.
            self.published = action.status
            events.append(f"status {action.status}")
        elif do is Do.RENEW:
            self._due = now + self.renew_every
        elif do is Do.SET_DRAINING:
            self._drain_published = True
            self._due = self._drain_until
            events.append("draining")
        elif do is Do.DEREGISTER:
            self.state = State.GONE
            events.append("deregistered")
        return events

    def _registry_seen(self, outcome: Outcome) -> list[str]:
        up = outcome is not Outcome.UNAVAILABLE
        if up == self.registry_up:
            return []
        before, self.registry_up = self.registry_up, up
        if up:
            return ["registry back"] if before is False else []
        return ["registry unavailable"]
