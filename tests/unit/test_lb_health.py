"""Active health-check scheduler and the retry decision."""

from __future__ import annotations

import random

from lb.health import HealthChecker, HealthConfig
from lb.outlier import Outcome
from lb.retry import RetryBudget, should_retry


def test_thresholds_and_schedule():
    hc = HealthChecker(HealthConfig(path="/h", interval=5, jitter=0.2), rng=random.Random(7))
    hc.set_endpoints(["a", "b"], now=0.0)
    assert all(0 <= h.next_at <= 5 for h in hc.hosts.values())
    assert sorted(hc.due(5.0)) == ["a", "b"]
    assert hc.due(5.0) == []  # in flight
    assert hc.on_result("a", False, 5.0) == []
    assert 10.0 <= hc.hosts["a"].next_at <= 11.0
    hc.on_result("a", False, 11.0)
    [ch] = hc.on_result("a", False, 17.0)
    assert (ch.key, ch.healthy) == ("a", False) and not hc.is_healthy("a")
    assert hc.on_result("a", True, 23.0) == []
    [ch] = hc.on_result("a", True, 29.0)
    assert ch.healthy and hc.is_healthy("a")


def test_jitter_is_seeded():
    def waits(seed):
        hc = HealthChecker(HealthConfig(interval=2, jitter=0.5), rng=random.Random(seed))
        hc.set_endpoints(["a"], 0.0)
        out = []
        for i in range(5):
            hc.hosts["a"].in_flight = True
            hc.on_result("a", True, float(i))
            out.append(hc.hosts["a"].next_at - i)
        return out

    assert waits(1) == waits(1) != waits(2)
    assert all(2.0 <= w <= 3.0 for w in waits(3))


def test_statuses_and_removed_endpoints():
    cfg = HealthConfig()
    assert cfg.passing(200) and cfg.passing(399) and not cfg.passing(404)
    hc = HealthChecker(cfg, rng=random.Random(0))
    hc.set_endpoints(["a"], 0.0)
    hc.set_endpoints([], 0.0)
    assert hc.on_result("a", False, 1.0) == []


def test_retry_decision():
    assert should_retry(Outcome.CONNECT_FAILED, method=b"POST", attempt=1, max_retries=2)
    assert should_retry(Outcome.RESET, method=b"POST", attempt=2, max_retries=2)
    assert not should_retry(Outcome.RESET, method=b"GET", attempt=3, max_retries=2)
    assert should_retry(Outcome.GATEWAY, method=b"GET", status=503, attempt=1, max_retries=2)
    assert not should_retry(Outcome.GATEWAY, method=b"POST", status=503, attempt=1, max_retries=2)
    assert not should_retry(Outcome.HTTP_5XX, method=b"GET", status=500, attempt=1, max_retries=2)
    assert should_retry(Outcome.TIMEOUT, method=b"GET", attempt=1, max_retries=1)
    assert not should_retry(
        Outcome.CONNECT_FAILED, method=b"GET", attempt=1, max_retries=2, replayable=False
    )


def test_retry_budget():
    b = RetryBudget(percent=20, min_per_second=1, ttl=10)
    for _ in range(100):
        b.on_request(0.5)
    # 20 % of 100 requests + a floor of 1/s over 10 s = 30 retries.
    assert [b.try_acquire(1.0) for _ in range(31)] == [True] * 30 + [False]
    # Ten seconds later the window has moved past all of it.
    assert b.try_acquire(11.5)
    assert RetryBudget(percent=0, min_per_second=0).try_acquire(0.0) is False
