"""The retry decision and the retry budget.

A try may be retried on the next endpoint when the connection failed or was reset before
any response byte (any method: the upstream saw no complete request), and, for idempotent
methods (RFC 9110 §9.2.2), also on a 502, 503 or 504 response or a per-try timeout.
Nothing is retried once a response byte has reached the client.
"""

from __future__ import annotations

from collections import deque

from lb.outlier import Outcome

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
RETRY_STATUSES = frozenset({502, 503, 504})


def should_retry(
    outcome: Outcome,
    *,
    method: bytes,
    status: int = 0,
    attempt: int,
    max_retries: int,
    replayable: bool = True,
) -> bool:
    """``attempt`` counts tries made so far (1 after the first). ``replayable``: the request
    body is still held, so it can be sent again."""
    if attempt > max_retries or not replayable:
        return False
    if outcome in (Outcome.CONNECT_FAILED, Outcome.RESET):
        return True
    if method not in IDEMPOTENT:
        return False
    if outcome is Outcome.TIMEOUT:
        return True
    return outcome is Outcome.GATEWAY and status in RETRY_STATUSES


class RetryBudget:
    """Retries may add at most ``percent`` % to the load over the last ``ttl`` seconds, plus
    a floor of ``min_per_second`` (Finagle's and Linkerd's retry budget: 20 %, 10/s, 10 s).

    Counted over a window rather than over requests in flight, so a burst of failures (an
    endpoint dying under load fails a third of the requests in flight at once) is retried
    from the budget earned by the requests before it, while a steady failure rate cannot
    multiply the load. Every request deposits ``percent`` / 100 of a token, every retry
    withdraws one; time is an argument.
    """

    __slots__ = (
        "percent",
        "min_per_second",
        "ttl",
        "_buckets",
        "_second",
        "_deposits",
        "_withdrawals",
    )

    def __init__(self, percent: float = 20.0, *, min_per_second: float = 10.0, ttl: float = 10.0):
        self.percent = percent
        self.min_per_second = min_per_second
        self.ttl = ttl
        self._buckets: deque[tuple[int, int, int]] = deque()  # (second, requests, retries)
        self._second = -1
        self._deposits = 0  # requests in the current second
        self._withdrawals = 0  # retries in the current second

    def _roll(self, now: float) -> None:
        second = int(now)
        if second == self._second:
            return
        if self._second >= 0:
            self._buckets.append((self._second, self._deposits, self._withdrawals))
        self._second, self._deposits, self._withdrawals = second, 0, 0
        horizon = second - self.ttl
        while self._buckets and self._buckets[0][0] <= horizon:
            self._buckets.popleft()

    def on_request(self, now: float) -> None:
        if int(now) != self._second:
            self._roll(now)
        self._deposits += 1

    def try_acquire(self, now: float) -> bool:
        """May one more retry go out now? If so, it is counted."""
        self._roll(now)
        requests = self._deposits + sum(b[1] for b in self._buckets)
        retries = self._withdrawals + sum(b[2] for b in self._buckets)
        allowed = requests * self.percent / 100 + self.min_per_second * self.ttl
        if retries + 1 > allowed:
            return False
        self._withdrawals += 1
        return True

    def __repr__(self) -> str:
        return f"<RetryBudget {self.percent:g}% window={self.ttl:g}s>"
