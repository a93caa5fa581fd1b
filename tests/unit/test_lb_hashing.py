"""Hash-key extraction, fallback chains, endpoint choice, bounded loads, panic."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lb.balancer import Picker, bounded_limit, panic_state
from lb.endpoints import Endpoint, EndpointSet
from lb.hashing import HashSource, extract
from lb.ring import Maglev, hash_key

H = [(b"host", b"a"), (b"x-user", b"alice"), (b"cookie", b"a=1; sid=xyz; b=2")]


def _chain(*specs):
    return [HashSource.parse(s) for s in specs]


def test_each_source():
    def get(spec, url=b"/p/q?x=1&y=two+words&x=3"):
        found = extract(_chain(spec), headers=H, url=url, client_ip="10.1.1.1")
        return found and found[1]

    assert get("header:X-User") == b"alice"
    assert get("cookie:sid") == b"xyz"
    assert get("query:y") == b"two words"
    assert get("query:x") == b"1"
    assert get("path") == b"/p/q"
    assert get("ip") == b"10.1.1.1"
    assert get("header:missing") is None
    assert get("cookie:nope") is None
    assert get("query:z") is None


def test_fallback_chain_first_present_wins():
    chain = _chain("header:x-session", "cookie:sid", "ip")
    src, key = extract(chain, headers=H, url=b"/", client_ip="10.0.0.9")
    assert (str(src), key) == ("cookie:sid", b"xyz")
    src, key = extract(chain, headers=[(b"x-session", b"s1")] + H, url=b"/", client_ip="")
    assert (str(src), key) == ("header:x-session", b"s1")
    assert (
        extract(_chain("header:x-session"), headers=[(b"x-session", b"")], url=b"/", client_ip="")
        is None
    )


@pytest.mark.parametrize("bad", ["header", "header:", "cookie:a b", "path:x", "nope", "ip:1"])
def test_bad_sources(bad):
    with pytest.raises(ValueError):
        HashSource.parse(bad)


EPS = EndpointSet.of(Endpoint(f"10.0.0.{i}", 80) for i in range(1, 6))
TABLE = Maglev.build(EPS, table_size=1009)


def test_hashed_pick_is_home_then_next_and_skips_unusable():
    p = Picker("maglev")
    h = hash_key(b"alice")
    pick = p.pick(TABLE, h, [True] * 5, [0] * 5, tries=3)
    # Only the home is computed up front; the rest of the order when a retry needs it.
    assert pick.partial and pick.order == (TABLE.lookup(h),) and not pick.spilled
    full = p.rest(TABLE, pick, [True] * 5, 3)
    assert full == tuple(TABLE.candidates(h, 3))
    usable = [True] * 5
    usable[full[0]] = False
    pick2 = p.pick(TABLE, h, usable, [0] * 5, tries=3)
    assert pick2.order[0] == full[1] and not pick2.spilled and not pick2.partial
    assert pick2.order == full[1:] + (pick2.order[2],)


def test_no_key_is_a_random_home():
    p = Picker("maglev", rng=random.Random(1))
    homes = Counter(p.pick(TABLE, None, [True] * 5, [0] * 5, tries=1).order[0] for _ in range(500))
    assert len(homes) == 5


def test_bounded_loads_spill_to_next_in_hash_order():
    p = Picker("maglev", balance_factor=125)
    h = hash_key(b"hot")
    home, nxt = TABLE.candidates(h, 2)
    active = [0] * 5
    active[home] = 10  # limit = ceil(1.25 * 11 / 5) = 3
    assert bounded_limit(10, 5, 125) == 3
    pick = p.pick(TABLE, h, [True] * 5, active, tries=2)
    assert pick.spilled and pick.order[0] == nxt and pick.order[1] == home


def test_round_robin_and_least_request():
    rr = Picker("round_robin")
    firsts = [
        rr.pick(None, None, [True, True, False], [0, 0, 0], tries=1).order[0] for _ in range(6)
    ]
    assert set(firsts) == {0, 1}
    lr = Picker("least_request", rng=random.Random(3))
    picks = Counter(
        lr.pick(None, None, [True] * 3, [9, 0, 9], tries=1).order[0] for _ in range(300)
    )
    assert picks[1] > picks[0] and picks[1] > picks[2]


def test_panic_threshold():
    assert panic_state([True, False, False], 50)
    assert not panic_state([True, True, False], 50)
    assert not panic_state([False, False], 0)
    pick = Picker("maglev").pick(TABLE, 1, [False] * 5, [0] * 5, tries=2)
    assert pick.panic and pick.order == (TABLE.lookup(1),)


def test_weights_steer_round_robin_random_and_least_request():
    w = [100, 300, 100]
    rr = Picker("round_robin")
    firsts = [
        rr.pick(None, None, [True] * 3, [0] * 3, tries=1, weights=w).order[0] for _ in range(50)
    ]
    assert Counter(firsts) == {0: 10, 1: 30, 2: 10}
    assert firsts[:5] != [1, 1, 1, 0, 2]  # smooth: the heavy one is spread out
    rnd = Picker("random", rng=random.Random(5))
    counts = Counter(
        rnd.pick(None, None, [True] * 3, [0] * 3, tries=1, weights=w).order[0] for _ in range(5000)
    )
    assert 0.55 < counts[1] / 5000 < 0.65
    lr = Picker("least_request", rng=random.Random(2))
    # Endpoint 1 has three times the weight: 3 active there is as loaded as 1 elsewhere.
    picks = Counter(
        lr.pick(None, None, [True] * 3, [1, 2, 1], tries=1, weights=w).order[0] for _ in range(3000)
    )
    assert picks[1] > picks[0] and picks[1] > picks[2]
