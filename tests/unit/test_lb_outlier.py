"""Outlier detector state machine: thresholds, backoff, cap, max-percent, latency."""

from __future__ import annotations

from lb.outlier import Detector, Outcome, OutlierConfig

KEYS = ["a:1", "b:1", "c:1", "d:1"]


def _fail(d, key, outcome, n, now=0.0):
    events = []
    for _ in range(n):
        events += d.record(key, outcome, now)
    return events


def test_five_consecutive_5xx_eject_and_success_resets():
    d = Detector(OutlierConfig(), KEYS)
    assert _fail(d, "a:1", Outcome.HTTP_5XX, 4) == []
    d.record("a:1", Outcome.OK, 0.0)
    assert _fail(d, "a:1", Outcome.HTTP_5XX, 4) == []
    [ev] = _fail(d, "a:1", Outcome.HTTP_5XX, 1, now=100.0)
    assert (ev.kind, ev.reason, ev.until) == ("eject", "consecutive_5xx", 130.0)
    assert d.is_ejected("a:1")


def test_three_gateway_failures_eject():
    d = Detector(OutlierConfig(), KEYS)
    _fail(d, "b:1", Outcome.CONNECT_FAILED, 1)
    _fail(d, "b:1", Outcome.GATEWAY, 1)
    [ev] = _fail(d, "b:1", Outcome.TIMEOUT, 1)
    assert ev.reason == "consecutive_gateway_failure"


def test_backoff_multiplies_and_caps_and_decays():
    cfg = OutlierConfig(base_ejection_time=30, max_ejection_time=100, interval=10)
    d = Detector(cfg, KEYS)
    now = 0.0
    untils = []
    for _ in range(4):
        [ev] = _fail(d, "a:1", Outcome.RESET, 3, now=now)
        untils.append(ev.until - now)
        assert d.tick(ev.until - 0.001) == []
        [back] = d.tick(ev.until)
        assert back.kind == "restore"
        now = ev.until
    assert untils == [30, 60, 90, 100]
    # Healthy for four intervals: the multiplier decays back to zero.
    for i in range(1, 6):
        d.tick(now + 10 * i)
    assert d.monitors["a:1"].ejections == 0


def test_max_ejection_percent_but_always_one():
    d = Detector(OutlierConfig(max_ejection_percent=10), KEYS)
    assert _fail(d, "a:1", Outcome.RESET, 3)  # 10 % of 4 rounds to 0, but one is allowed
    assert _fail(d, "b:1", Outcome.RESET, 3) == []
    d2 = Detector(OutlierConfig(), KEYS)
    assert _fail(d2, "a:1", Outcome.RESET, 3) and _fail(d2, "b:1", Outcome.RESET, 3)
    assert _fail(d2, "c:1", Outcome.RESET, 3) == []  # 50 % of 4
    lone = Detector(OutlierConfig(), ["a:1"])
    assert _fail(lone, "a:1", Outcome.RESET, 10) == []


def test_active_check_restores_early():
    d = Detector(OutlierConfig(), KEYS)
    _fail(d, "c:1", Outcome.RESET, 3)
    [ev] = d.restore("c:1", 1.0)
    assert ev.kind == "restore" and not d.is_ejected("c:1")
    assert d.restore("c:1", 2.0) == []


def test_latency_ejection():
    cfg = OutlierConfig(latency_factor=3, latency_min_requests=20)
    d = Detector(cfg, KEYS)
    for _ in range(30):
        for k in ("a:1", "b:1", "c:1"):
            d.record(k, Outcome.OK, 0.0, latency=0.020)
        d.record("d:1", Outcome.OK, 0.0, latency=0.200)
    [ev] = d.sweep(10.0)
    assert (ev.key, ev.reason) == ("d:1", "latency")
    # Too few requests since the last sweep: no verdict.
    d2 = Detector(cfg, KEYS)
    for k in KEYS:
        d2.record(k, Outcome.OK, 0.0, latency=0.5 if k == "a:1" else 0.01)
    assert d2.sweep(10.0) == []


def test_latency_needs_absolute_gap():
    d = Detector(OutlierConfig(latency_factor=3, latency_min_requests=1), KEYS)
    for k in KEYS:
        d.record(k, Outcome.OK, 0.0, latency=0.004 if k == "a:1" else 0.0005)
    assert d.sweep(10.0) == []


def test_endpoint_set_changes_keep_state():
    d = Detector(OutlierConfig(), KEYS)
    _fail(d, "a:1", Outcome.RESET, 3)
    d.set_endpoints(["a:1", "z:1"])
    assert d.is_ejected("a:1") and not d.is_ejected("z:1")
    assert d.record("gone:1", Outcome.RESET, 0.0) == []
    assert "ejected=consecutive_gateway_failure" in repr(d.monitors["a:1"])
