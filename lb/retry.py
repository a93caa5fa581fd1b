"""The retry decision and the retry budget.

A try may be retried on the next endpoint when the connection failed or was reset before
any response byte (any method: the upstream saw no complete request), and, for idempotent
methods (RFC 9110 §9.2.2), also on a 502, 503 or 504 response or a per-try timeout.
Nothing is retried once a response byte has reached the client.
"""

from __future__ import annotations

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
    """At most ``percent`` % of the active requests may be retries (Envoy's retry budget,
    20 % with a floor of 3 concurrent retries), so retries cannot multiply an overload."""

    __slots__ = ("percent", "min_concurrency", "active_requests", "active_retries")

    def __init__(self, percent: float = 20.0, min_concurrency: int = 3) -> None:
        self.percent = percent
        self.min_concurrency = min_concurrency
        self.active_requests = 0
        self.active_retries = 0

    def try_acquire(self) -> bool:
        limit = max(self.min_concurrency, int(self.active_requests * self.percent / 100))
        if self.active_retries >= limit:
            return False
        self.active_retries += 1
        return True

    def release(self) -> None:
        self.active_retries -= 1

    def __repr__(self) -> str:
        return f"<RetryBudget retries={self.active_retries} requests={self.active_requests}>"
