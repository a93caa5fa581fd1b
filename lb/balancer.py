"""Endpoint choice for one request: the policy, usable endpoints, panic mode and bounded loads.

Pure and synchronous: :meth:`Picker.pick` is given the per-endpoint usability and active
request counts and returns the order to try endpoints in. The caller records the choice
(active count +1) before its first ``await``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from lb.ring import Table

POLICIES = ("maglev", "ring_hash", "round_robin", "least_request", "random")
HASHED = ("maglev", "ring_hash")
MAX_TRIES_LISTED = 8  # candidates computed per request: 1 + retries, capped


@dataclass(slots=True)
class Pick:
    """Endpoint indexes to try, in order; whether the first is not the key's home (spill);
    whether the pick ignored health (panic). Not frozen: one is made per request, and a
    frozen dataclass costs several times more to build."""

    order: tuple[int, ...]
    spilled: bool = False
    panic: bool = False
    # Only the home is listed when it is usable: the rest of the hash order is computed
    # when a retry needs it (``Picker.rest``), which most requests never do.
    key_hash: int | None = None
    partial: bool = False


def panic_state(usable: Sequence[bool], threshold_percent: float) -> bool:
    """Envoy's rule: panic when fewer than ``threshold_percent`` of endpoints are usable."""
    n = len(usable)
    if n == 0 or threshold_percent <= 0:
        return False
    return sum(usable) * 100 < threshold_percent * n


def bounded_limit(total_active: int, n_usable: int, factor_percent: int) -> int:
    """Max active requests per endpoint under bounded loads (Mirrokni et al.; Envoy's
    ``hash_balance_factor``): ceil(c × (total + 1) / n)."""
    return math.ceil(factor_percent * (total_active + 1) / (100 * max(1, n_usable)))


class Picker:
    """Choose endpoints for requests. Holds only the round-robin cursor and the RNG."""

    def __init__(self, policy: str, *, balance_factor: int = 0, rng: random.Random | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        self.policy = policy
        self.balance_factor = balance_factor
        self._rng = rng or random.Random()
        self._rr = 0
        self._current: list[float] = []  # smooth weighted round robin state (nginx's)

    def pick(
        self,
        table: Table | None,
        key_hash: int | None,
        usable: Sequence[bool],
        active: Sequence[int],
        *,
        tries: int,
        weights: Sequence[int] | None = None,
    ) -> Pick:
        """The order to try endpoints in. ``key_hash`` None = no key: a random home.

        ``weights`` (None when all are equal) steer round robin (smooth weighted round
        robin, as nginx), least request (active / weight, as Envoy) and random."""
        n = len(usable)
        if n == 0:
            return Pick(())
        tries = max(1, min(tries, n, MAX_TRIES_LISTED))
        panic = False
        if not any(usable):
            panic = True
            usable = [True] * n
        if self.policy in HASHED and table is not None:
            return self._hashed(table, key_hash, usable, active, tries, panic)
        if self.policy == "round_robin":
            first = self._smooth_wrr(weights, usable) if weights else None
            if first is None:
                first = self._rr % n
                self._rr += 1
            order = [(first + i) % n for i in range(n)]
        elif self.policy == "least_request":
            # Power of two choices (Envoy's LEAST_REQUEST default, choice_count 2).
            a, b = self._rng.randrange(n), self._rng.randrange(n)
            if weights:
                first = a if active[a] * weights[b] <= active[b] * weights[a] else b
            else:
                first = a if active[a] <= active[b] else b
            order = [first] + [i for i in range(n) if i != first]
        else:
            if weights:
                first = self._rng.choices(range(n), weights=weights)[0]
            else:
                first = self._rng.randrange(n)
            order = [(first + i) % n for i in range(n)]
        return Pick(tuple([i for i in order if usable[i]][:tries]), panic=panic)

    def _smooth_wrr(self, weights: Sequence[int], usable: Sequence[bool]) -> int | None:
        """nginx's smooth weighted round robin over the usable endpoints."""
        n = len(weights)
        if len(self._current) != n:
            self._current = [0.0] * n
        cur = self._current
        total = 0
        best = None
        for i in range(n):
            if not usable[i]:
                continue
            cur[i] += weights[i]
            total += weights[i]
            if best is None or cur[i] > cur[best]:
                best = i
        if best is not None:
            cur[best] -= total
        return best

    def _hashed(
        self,
        table: Table,
        key_hash: int | None,
        usable: Sequence[bool],
        active: Sequence[int],
        tries: int,
        panic: bool,
    ) -> Pick:
        n = len(usable)
        if key_hash is None:
            key_hash = self._rng.getrandbits(32)
        if not self.balance_factor:
            home = table.lookup(key_hash)
            if home >= 0 and usable[home]:
                return Pick((home,), panic=panic, key_hash=key_hash, partial=tries > 1)
        want = n if self.balance_factor else min(n, tries + (n - sum(usable)))
        cands = [i for i in table.candidates(key_hash, want) if usable[i]]
        if not cands:
            return Pick((), panic=panic)
        home = cands[0]
        if self.balance_factor:
            limit = bounded_limit(sum(active), len(cands), self.balance_factor)
            for pos, i in enumerate(cands):
                if active[i] + 1 <= limit:
                    if pos:
                        cands = [i] + cands[:pos] + cands[pos + 1 :]
                    break
        return Pick(tuple(cands[:tries]), spilled=cands[0] != home, panic=panic)

    @staticmethod
    def rest(table: Table, pick: Pick, usable: Sequence[bool], tries: int) -> tuple[int, ...]:
        """The full try order for a partial pick: its home, then the hash order."""
        n = len(usable)
        want = min(n, tries + (n - sum(usable)))
        cands = [i for i in table.candidates(pick.key_hash or 0, want) if usable[i]]
        if not cands or cands[0] != pick.order[0]:
            cands = [pick.order[0]] + [i for i in cands if i != pick.order[0]]
        return tuple(cands[:tries])
