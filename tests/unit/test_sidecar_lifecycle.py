"""The registration state machine and the probe thresholds, with time fired by hand."""

from __future__ import annotations

import random

import pytest

from sidecar.lifecycle import DEREGISTER_GRACE, Action, Do, Lifecycle, Outcome, State
from sidecar.probe import Check, Kind, Thresholds


def machine(now=0.0, **kw) -> Lifecycle:
    args = {"lease_ttl": 9.0, "drain": 5.0, "status": "passing", "now": now}
    args.update(kw)
    return Lifecycle(rng=random.Random(1), **args)


def step(lc: Lifecycle, now: float, outcome: Outcome = Outcome.OK) -> tuple[Action, list[str]]:
    action = lc.next_action(now)
    if action.do in (Do.WAIT, Do.EXIT):
        return action, []
    return action, lc.done(action, outcome, now)


def test_registers_at_once_then_renews_every_third_of_the_ttl():
    lc = machine()
    action, events = step(lc, 0.0)
    assert action == Action(Do.REGISTER, status="passing")
    assert events == ["registered"] and lc.state is State.REGISTERED
    assert lc.next_action(1.0) == Action(Do.WAIT, 3.0)
    assert step(lc, 3.0)[0].do is Do.RENEW
    assert lc.next_action(3.1) == Action(Do.WAIT, 6.0)


def test_registry_outage_at_start_retries_with_backoff_and_logs_once():
    lc = machine()
    action, events = step(lc, 0.0, Outcome.UNAVAILABLE)
    assert action.do is Do.REGISTER and events == ["registry unavailable"]
    now, logged = 0.0, []
    for _ in range(20):
        wait = lc.next_action(now)
        assert wait.do is Do.WAIT and wait.at > now
        assert wait.at - now <= 2.0  # capped backoff
        now = wait.at
        action, events = step(lc, now, Outcome.UNAVAILABLE)
        assert action.do is Do.REGISTER
        logged += events
    assert logged == []  # one line per change, not per retry
    action, events = step(lc, lc.next_action(now).at, Outcome.OK)
    assert events == ["registry back", "registered"]


def test_status_changes_are_published_at_once_without_moving_the_renewal():
    lc = machine()
    step(lc, 0.0)
    lc.set_status("critical")
    action, events = step(lc, 1.0)
    assert action == Action(Do.PUBLISH, status="critical") and events == ["status critical"]
    assert lc.next_action(1.5) == Action(Do.WAIT, 3.0)  # renewal due as before
    lc.set_status("passing")
    assert step(lc, 2.0)[0] == Action(Do.PUBLISH, status="passing")


def test_renewal_outage_then_lease_lost_reregisters_with_current_status():
    lc = machine()
    step(lc, 0.0)
    _, events = step(lc, 3.0, Outcome.UNAVAILABLE)
    assert events == ["registry unavailable"]
    lc.set_status("critical")  # the probe keeps running during the outage
    wait = lc.next_action(3.0)
    assert wait.do is Do.WAIT  # no publish storm while the registry is away
    now = wait.at
    for _ in range(50):  # the outage lasts longer than the lease
        action, _ = step(lc, now, Outcome.UNAVAILABLE)
        now = max(now, lc.next_action(now).at)
    action, events = step(lc, now, Outcome.LOST)
    assert events == ["registry back", "lease lost"]
    assert lc.state is State.REGISTERING
    action, events = step(lc, now)
    assert action == Action(Do.REGISTER, status="critical")
    assert events == ["registered again"] and lc.registrations == 2


def test_renew_finding_the_lease_gone_reregisters():
    lc = machine()
    step(lc, 0.0)
    _, events = step(lc, 3.0, Outcome.LOST)
    assert events == ["lease lost"]
    assert step(lc, 3.0)[0].do is Do.REGISTER


def test_drain_publishes_draining_waits_then_deregisters():
    lc = machine()
    step(lc, 0.0)
    lc.drain(1.0)
    action, events = step(lc, 1.0)
    assert action == Action(Do.SET_DRAINING, status="draining") and events == ["draining"]
    lc.set_status("critical")  # probes during the drain change nothing
    assert lc.next_action(2.0) == Action(Do.WAIT, 6.0)
    action, events = step(lc, 6.0)
    assert action.do is Do.DEREGISTER and events == ["deregistered"]
    assert lc.next_action(6.0).do is Do.EXIT


def test_drain_with_the_registry_away_gives_up_after_the_grace():
    lc = machine()
    step(lc, 0.0)
    lc.drain(1.0)
    now = 1.0
    for _ in range(200):
        action = lc.next_action(now)
        if action.do is Do.EXIT:
            break
        if action.do is Do.WAIT:
            now = action.at
            continue
        lc.done(action, Outcome.UNAVAILABLE, now)
    assert lc.state is State.GONE
    assert now <= 1.0 + 5.0 + DEREGISTER_GRACE


def test_drain_before_registering_exits_at_once():
    lc = machine()
    step(lc, 0.0, Outcome.UNAVAILABLE)
    lc.drain(0.5)
    assert lc.next_action(0.5).do is Do.EXIT


def test_drain_with_lease_already_gone_exits():
    lc = machine()
    step(lc, 0.0)
    lc.drain(1.0)
    step(lc, 1.0, Outcome.LOST)
    assert lc.state is State.GONE


# Thresholds


def test_first_result_decides_then_rise_and_fall_apply():
    t = Thresholds(rise=2, fall=3)
    assert t.record(True) == "passing"
    assert [t.record(False) for _ in range(3)] == [None, None, "critical"]
    assert [t.record(True), t.record(False), t.record(True), t.record(True)] == [
        None,
        None,
        None,
        "passing",
    ]


def test_a_failing_start_needs_rise_passes():
    t = Thresholds(rise=2, fall=3)
    assert t.record(False) == "critical"
    assert t.record(True) is None
    assert t.record(True) == "passing"


def test_flapping_never_flips():
    t = Thresholds(rise=2, fall=2)
    t.record(True)
    assert all(t.record(ok) is None for ok in [False, True] * 20)


@pytest.mark.parametrize(
    ("text", "kind", "path"),
    [("tcp", Kind.TCP, "/"), ("none", Kind.NONE, "/"), ("http:/healthz", Kind.HTTP, "/healthz")],
)
def test_check_parse(text, kind, path):
    check = Check.parse(text)
    assert (check.kind, check.path) == (kind, path)
    assert str(check) == text


@pytest.mark.parametrize("text", ["http", "http:healthz", "udp", "", "http:/a b"])
def test_check_parse_rejects(text):
    with pytest.raises(ValueError):
        Check.parse(text)
