"""The sidecar's loop: probe the app, drive the lifecycle, feed DNS from the registry.

Three tasks share one store:

- the probe task runs the local check every interval and tells the lifecycle when the
  rise/fall verdict changes;
- the lifecycle task asks :class:`Lifecycle` what to do next, does that one registry write
  (each with a deadline), and reports the outcome back;
- the follower (``registry.follow.Follower``) feeds every new snapshot to the DNS server,
  which keeps answering from the last one while the registry is away.

SIGTERM or SIGINT starts the drain (``draining`` at once, deregister after ``drain``
seconds, exit 0); a second signal exits at once. A drain asked for on the admin port (a
pod's ``preStop``) does the same but keeps the process, and its DNS, until a signal comes:
the app still resolves names while it shuts down, and the signal then exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
from collections import Counter
from dataclasses import dataclass

from registry.errors import RegistryError, RegistryUnavailable
from registry.follow import Follower
from registry.model import Instance
from registry.store import RegistryStore
from sidecar.dns_server import DnsServer
from sidecar.lifecycle import Action, Do, Lifecycle, Outcome
from sidecar.probe import Check, Prober, Thresholds

log = logging.getLogger(__name__)

OP_TIMEOUT = 5.0  # s per registry write: a hung write must not hold up the drain
EXIT_ABORTED = 1  # a second signal: exit at once, the lease runs out by itself


@dataclass(frozen=True, slots=True)
class AgentConfig:
    instance: Instance  # what to register; its status is set from the probe
    check: Check
    check_interval: float = 2.0
    check_timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    lease_ttl: float = 10.0
    drain: float = 5.0


class Agent:
    def __init__(
        self,
        store: RegistryStore,
        config: AgentConfig,
        *,
        dns: DnsServer | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.dns = dns
        self.instance = config.instance
        self.prober = Prober(
            config.check, self.instance.address, self.instance.port, timeout=config.check_timeout
        )
        self.thresholds = Thresholds(config.rise, config.fall)
        self.follower = Follower(store, dns.update, name="sidecar dns") if dns else None
        self.lifecycle: Lifecycle | None = None
        self.signals = 0
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._abort = asyncio.Event()
        self._drain_requested = False
        self._hold = False  # drained on request: stay up (DNS) until a signal
        self._released = asyncio.Event()
        self._last_error = ""
        # What the admin port counts: renewals by outcome, probes by result.
        self.renewals: Counter[str] = Counter()
        self.probes: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<Agent {self.instance.id} {self.lifecycle!r} {self.thresholds!r}>"

    # Signals

    def request_stop(self) -> None:
        """First call: drain (unless draining already) and exit. Second call: exit at once."""
        self.signals += 1
        if self.signals == 1:
            self._hold = False
            self._released.set()
            if not self._drain_requested:
                log.info("%s: stopping: draining for %g s", self.instance.id, self.config.drain)
                self._begin_drain()
        else:
            log.warning("%s: second signal: exiting now", self.instance.id)
            self._abort.set()

    def request_drain(self) -> bool:
        """Drain, deregister, and keep serving until a signal. False if already draining."""
        if self._drain_requested:
            return False
        log.info(
            "%s: drain requested: draining for %g s, then serving DNS until stopped",
            self.instance.id,
            self.config.drain,
        )
        self._hold = True
        self._begin_drain()
        return True

    def _begin_drain(self) -> None:
        self._drain_requested = True
        if self.lifecycle is not None:
            self.lifecycle.drain(asyncio.get_running_loop().time())
        self._wake.set()

    # The loop

    async def run(self, *, handle_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        installed = []
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
        tasks: list[asyncio.Task] = []
        try:
            if self.follower is not None:
                tasks.append(asyncio.create_task(self.follower.run(), name="follower"))
            first = await self.prober.probe()
            self.probes["pass" if first.ok else "fail"] += 1
            status = self.thresholds.record(first.ok)
            assert status is not None
            self._log_probe(status, first.reason)
            self.lifecycle = Lifecycle(
                lease_ttl=self.config.lease_ttl,
                drain=self.config.drain,
                status=status,
                now=loop.time(),
                rng=self._rng,
            )
            if self._drain_requested:
                self.lifecycle.drain(loop.time())
            tasks.append(asyncio.create_task(self._probe_loop(), name="probe"))
            life = asyncio.create_task(self._lifecycle_loop(), name="lifecycle")
            abort = asyncio.create_task(self._abort.wait(), name="abort")
            tasks += [life, abort]
            await asyncio.wait((life, abort), return_when=asyncio.FIRST_COMPLETED)
            if life.done():
                life.result()
                if self._hold:  # gone from the registry; the process waits for its signal
                    released = asyncio.create_task(self._released.wait(), name="released")
                    tasks.append(released)
                    await asyncio.wait((released, abort), return_when=asyncio.FIRST_COMPLETED)
                    if abort.done():
                        return EXIT_ABORTED
                return 0
            return EXIT_ABORTED
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await cancel_all(tasks)
            await self.prober.close()

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.check_interval
        while True:
            started = loop.time()
            await asyncio.sleep(max(0.0, started + interval - loop.time()))
            result = await self.prober.probe()
            self.probes["pass" if result.ok else "fail"] += 1
            changed = self.thresholds.record(result.ok)
            if changed is not None and self.lifecycle is not None:
                self._log_probe(changed, result.reason)
                self.lifecycle.set_status(changed)
                self._wake.set()

    def _log_probe(self, status: str, reason: str) -> None:
        why = f" ({reason})" if reason else ""
        log.info("%s: check %s: %s%s", self.instance.id, self.config.check, status, why)

    async def _lifecycle_loop(self) -> None:
        lc = self.lifecycle
        assert lc is not None
        loop = asyncio.get_running_loop()
        while not self._abort.is_set():
            self._wake.clear()
            action = lc.next_action(loop.time())
            if action.do is Do.EXIT:
                return
            if action.do is Do.WAIT:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, action.at - loop.time())):
                        await self._wake.wait()
                continue
            outcome = await self._do(action)
            if action.do is Do.RENEW:
                self.renewals[outcome.value] += 1
            for event in lc.done(action, outcome, loop.time()):
                self._log_event(event)

    async def _do(self, action: Action) -> Outcome:
        """One registry write; failures come back as values."""
        store, inst, ttl = self.store, self.instance, self.config.lease_ttl
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                if action.do is Do.REGISTER:
                    await store.register(dataclasses.replace(inst, status=action.status), ttl)
                    return Outcome.OK
                if action.do is Do.RENEW:
                    ok = await store.renew(inst.id, ttl)
                elif action.do in (Do.PUBLISH, Do.SET_DRAINING):
                    ok = await store.set_status(inst.id, action.status)
                else:
                    ok = await store.deregister(inst.id)
                return Outcome.OK if ok else Outcome.LOST
        except (RegistryUnavailable, TimeoutError) as exc:
            self._last_error = str(exc) or f"no answer within {OP_TIMEOUT:g} s"
            return Outcome.UNAVAILABLE
        except RegistryError as exc:
            self._last_error = str(exc)
            log.error("%s: %s: %s", inst.id, action.do.value, exc)
            return Outcome.ERROR

    def _log_event(self, event: str) -> None:
        inst = self.instance
        if event in ("registered", "registered again"):
            assert self.lifecycle is not None
            log.info(
                "%s: %s at %s:%d (%s, lease %g s)",
                inst.id, event, inst.address, inst.port, self.lifecycle.published,
                self.config.lease_ttl,
            )  # fmt: skip
        elif event == "registry unavailable":
            log.warning("%s: %s; will retry, DNS serves the last state", inst.id, self._last_error)
        elif event == "lease lost":
            log.warning("%s: the lease ran out; registering again", inst.id)
        else:
            log.info("%s: %s", inst.id, event)


CANCEL_ROUNDS = 20  # × 0.1 s: how long cancelled tasks get to finish
CANCEL_ROUND = 0.1


async def cancel_all(tasks: list[asyncio.Task]) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again while any is still running.

    pymongo's async client can swallow a cancellation that lands mid-operation; a second
    cancel then lands on the next await. Bounded: after ~2 s the rest is left behind.
    """
    pending = {t for t in tasks if not t.done()}
    for _ in range(CANCEL_ROUNDS):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_ROUND)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", task.get_name(), task.exception())
