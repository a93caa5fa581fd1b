"""Consistent-hash tables: Maglev and a ketama-compatible ring. Pure, immutable, swapped whole.

Both map a 32-bit key hash to an endpoint index, and both give an ordered list of the
other endpoints to try next (retries, ejected hosts, bounded-load spill), so a key whose
home is unusable moves to the same place from every LB.

- Maglev (Eisenbud et al., NSDI 2016; Envoy's weighted variant): the lookup is one index
  into a table of ``table_size`` entries. The table size must be prime; 65537 is Envoy's
  default and balances within ~1-4 % up to ~100 endpoints.
- Ring hash: ketama (libketama, nginx ``hash … consistent``, ``uhashring``): MD5 points on
  a 32-bit circle, a **fixed number of points per unit of weight** (160 per
  ``WEIGHT_UNIT``). Sizing points by total ring size / N (Envoy) moves extra keys when N
  changes; a fixed count per weight moves exactly the leaving endpoint's keys.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from hashlib import blake2b, md5
from itertools import cycle

from lb.endpoints import DEFAULT_WEIGHT, EndpointSet

try:  # CPython's own MD5: for a few bytes it is twice as fast as OpenSSL's (no context set-up)
    from _md5 import md5 as _key_md5
except ImportError:  # pragma: no cover - a build without it
    from hashlib import md5 as _key_md5

MAGLEV_TABLE_SIZE = 65537  # Envoy's default; must be prime
KETAMA_NAMES_PER_UNIT = 40  # libketama: 40 names × 4 points from each MD5 = 160 points
KETAMA_POINTS_PER_NAME = 4
WEIGHT_UNIT = DEFAULT_WEIGHT  # weight 100 (registry default) = one unit = 160 points
BUILD_OFF_LOOP_ENTRIES = 4096  # tables bigger than this are built in a thread
TAIL_MIN_SLOTS = 64  # Maglev: free slots from which the fill walks sorted lists (_populate)


def hash_key(data: bytes) -> int:
    """The 32-bit ketama hash of a key (MD5, first 4 bytes little-endian), as uhashring."""
    return int.from_bytes(_key_md5(data).digest()[:4], "little")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _walk(seq: Sequence[int], start: int, n_endpoints: int, limit: int) -> list[int]:
    """Distinct endpoint indexes met walking ``seq`` forward (wrapping) from ``start``."""
    out: list[int] = []
    seen: set[int] = set()
    size = len(seq)
    want = min(limit, n_endpoints)
    i = start
    for _ in range(size):
        idx = seq[i]
        if idx >= 0 and idx not in seen:
            seen.add(idx)
            out.append(idx)
            if len(out) >= want:
                break
        i += 1
        if i == size:
            i = 0
    return out


@dataclass(frozen=True, slots=True)
class TableStats:
    """Entries (Maglev slots or ring points) per endpoint, as Envoy reports them."""

    entries: tuple[int, ...]

    @property
    def min(self) -> int:
        return min(self.entries, default=0)

    @property
    def max(self) -> int:
        return max(self.entries, default=0)


def _turns(weights: list[int]) -> Iterator[int]:
    """The order in which endpoints take slots. Envoy's weighted fill: an endpoint of
    weight w takes a slot on every (max_w / w)-th round, so its share of the table is
    proportional to w; with equal weights, plain rounds."""
    n = len(weights)
    max_w = max(weights)
    if min(weights) == max_w:
        yield from cycle(range(n))
        return
    target = [0.0] * n
    iteration = 1
    while True:
        for i in range(n):
            if iteration * weights[i] < target[i]:
                continue
            target[i] += max_w
            yield i
        iteration += 1


def _populate(table: list[int], offsets: list[int], skips: list[int], weights: list[int]) -> None:
    """Maglev's populate step: in turn, each endpoint takes the first slot not yet taken in
    its own permutation of the table (offset, offset + skip, offset + 2·skip, … mod size).

    Done naively, the last slots cost the most: with k slots left, an endpoint probes
    size/k taken slots on average before it finds one, and the last ~size/4n fills make
    up most of the probes of the whole build. So for those, each endpoint's permutation
    is restricted to the slots still free, sorted by their place in it (the place of slot
    e is (e - offset) · skip⁻¹ mod size), and walked from there: the same slots in the
    same order as probing, at a fraction of the cost. The table is identical.
    """
    size = len(table)
    n = len(offsets)
    if n == 1:
        table[:] = [0] * size  # a permutation visits every slot once
        return
    turns = _turns(weights)
    pos = list(offsets)  # the slot each endpoint looks at next
    filled = 0
    tail = size - max(TAIL_MIN_SLOTS, size // (4 * n))
    for i in turns:
        c = pos[i]
        skip = skips[i]
        while table[c] >= 0:
            c += skip
            if c >= size:
                c -= size
        table[c] = i
        c += skip
        pos[i] = c - size if c >= size else c
        filled += 1
        if filled >= tail:
            break
    if filled == size:
        return
    free = [c for c, owner in enumerate(table) if owner < 0]
    walks = []
    for i in range(n):
        inv, off = pow(skips[i], -1, size), offsets[i]
        walks.append(
            [v % size for v in sorted([((e - off) * inv % size) * size + e for e in free])]
        )
    at = [0] * n
    left = len(free)
    for i in turns:
        walk = walks[i]
        k = at[i]
        while table[walk[k]] >= 0:
            k += 1
        table[walk[k]] = i
        at[i] = k + 1
        left -= 1
        if not left:
            return


class Maglev:
    """A Maglev lookup table. Build with :meth:`build`; the instance never changes."""

    kind = "maglev"
    __slots__ = ("endpoints", "table", "size")

    def __init__(self, endpoints: EndpointSet, table: list[int]) -> None:
        self.endpoints = endpoints
        self.table = table
        self.size = len(table)

    @classmethod
    def build(cls, endpoints: EndpointSet, table_size: int = MAGLEV_TABLE_SIZE) -> Maglev:
        if not _is_prime(table_size):
            raise ValueError(f"Maglev table size must be prime, got {table_size}")
        n = len(endpoints)
        table = [-1] * table_size
        if n == 0:
            return cls(endpoints, table)
        offsets, skips = [], []
        for ep in endpoints:
            d = blake2b(ep.key.encode(), digest_size=16).digest()
            offsets.append(int.from_bytes(d[:8], "little") % table_size)
            skips.append(int.from_bytes(d[8:], "little") % (table_size - 1) + 1)
        _populate(table, offsets, skips, [ep.weight for ep in endpoints])
        return cls(endpoints, table)

    def lookup(self, key_hash: int) -> int:
        """The home endpoint's index for a key hash (one index into the table)."""
        return self.table[key_hash % self.size]

    def candidates(self, key_hash: int, limit: int = 8) -> list[int]:
        """The home endpoint, then the endpoints to try next, in table order, distinct."""
        return _walk(self.table, key_hash % self.size, len(self.endpoints), limit)

    def stats(self) -> TableStats:
        counts = [0] * len(self.endpoints)
        for i in self.table:
            if i >= 0:
                counts[i] += 1
        return TableStats(tuple(counts))

    def __repr__(self) -> str:
        return f"<Maglev M={self.size} endpoints={len(self.endpoints)}>"


class RingHash:
    """A ketama ring: sorted 32-bit points, each owned by an endpoint index."""

    kind = "ring_hash"
    __slots__ = ("endpoints", "points", "owners")

    def __init__(self, endpoints: EndpointSet, points: list[int], owners: list[int]) -> None:
        self.endpoints = endpoints
        self.points = points
        self.owners = owners

    @staticmethod
    def names_for(weight: int) -> int:
        """MD5 names (4 points each) for a weight: 40 per unit, at least one."""
        return max(1, round(KETAMA_NAMES_PER_UNIT * weight / WEIGHT_UNIT))

    @classmethod
    def build(cls, endpoints: EndpointSet) -> RingHash:
        owner_of: dict[int, int] = {}
        for idx, ep in enumerate(endpoints):
            for w in range(cls.names_for(ep.weight)):
                d = md5(f"{ep.key}-{w}".encode(), usedforsecurity=False).digest()
                for r in range(0, 4 * KETAMA_POINTS_PER_NAME, 4):
                    # ketama: each 16-byte digest gives four little-endian 32-bit points.
                    # On a collision the later endpoint wins, as in uhashring.
                    owner_of[d[r] | d[r + 1] << 8 | d[r + 2] << 16 | d[r + 3] << 24] = idx
        points = sorted(owner_of)
        return cls(endpoints, points, [owner_of[p] for p in points])

    def _index(self, key_hash: int) -> int:
        i = bisect_right(self.points, key_hash)
        return 0 if i == len(self.points) else i

    def lookup(self, key_hash: int) -> int:
        if not self.points:
            return -1
        return self.owners[self._index(key_hash)]

    def candidates(self, key_hash: int, limit: int = 8) -> list[int]:
        if not self.points:
            return []
        return _walk(self.owners, self._index(key_hash), len(self.endpoints), limit)

    def stats(self) -> TableStats:
        counts = [0] * len(self.endpoints)
        for i in self.owners:
            counts[i] += 1
        return TableStats(tuple(counts))

    def __repr__(self) -> str:
        return f"<RingHash points={len(self.points)} endpoints={len(self.endpoints)}>"


Table = Maglev | RingHash


def build(policy: str, endpoints: EndpointSet, *, table_size: int = MAGLEV_TABLE_SIZE) -> Table:
    if policy == "ring_hash":
        return RingHash.build(endpoints)
    return Maglev.build(endpoints, table_size)


async def build_async(
    policy: str, endpoints: EndpointSet, *, table_size: int = MAGLEV_TABLE_SIZE
) -> Table:
    """Build a table, off the event loop when it is big (a Maglev table always is)."""
    small = policy == "ring_hash" and len(endpoints) * 160 <= BUILD_OFF_LOOP_ENTRIES
    if small:
        return build(policy, endpoints, table_size=table_size)
    return await asyncio.to_thread(build, policy, endpoints, table_size=table_size)
