"""Consistent-hash tables: Maglev and a ketama-compatible ring, built in the native core
(``native/src/table``), immutable, swapped whole.

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

The tables are the ones mesh's first, pure-Python implementation built, entry for entry
(checked against its fixtures by ``cargo test``), so LBs of either age route alike.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import mesh_native
from lb.endpoints import DEFAULT_WEIGHT, EndpointSet

MAGLEV_TABLE_SIZE = mesh_native.MAGLEV_DEFAULT_SIZE  # Envoy's default; must be prime
KETAMA_NAMES_PER_UNIT = 40  # libketama: 40 names × 4 points from each MD5 = 160 points
WEIGHT_UNIT = DEFAULT_WEIGHT  # weight 100 (registry default) = one unit = 160 points
BUILD_OFF_LOOP_ENTRIES = 4096  # tables bigger than this are built in a thread (without the GIL)

hash_key = mesh_native.key_hash  # the 32-bit ketama hash of a key, as uhashring
is_prime = mesh_native.is_prime


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


class Maglev:
    """A Maglev lookup table. Build with :meth:`build`; the instance never changes."""

    kind = "maglev"
    __slots__ = ("endpoints", "size", "lookup", "candidates", "_native")

    def __init__(self, endpoints: EndpointSet, native: mesh_native.MaglevTable) -> None:
        self.endpoints = endpoints
        self.size = native.size
        self._native = native
        # The native methods themselves: a lookup costs one call, no Python frame.
        self.lookup = native.lookup  # key hash → the home endpoint's index (-1: no endpoints)
        self.candidates = native.candidates  # (key hash, limit) → home, then next, distinct

    @classmethod
    def build(cls, endpoints: EndpointSet, table_size: int = MAGLEV_TABLE_SIZE) -> Maglev:
        if not is_prime(table_size):
            raise ValueError(f"Maglev table size must be prime, got {table_size}")
        native = mesh_native.MaglevTable(
            list(endpoints.keys), [ep.weight for ep in endpoints], table_size
        )
        return cls(endpoints, native)

    def entries(self) -> list[int]:
        """Every slot's endpoint index."""
        return self._native.entries()

    def stats(self) -> TableStats:
        return TableStats(tuple(self._native.counts()))

    def __repr__(self) -> str:
        return f"<Maglev M={self.size} endpoints={len(self.endpoints)}>"


class RingHash:
    """A ketama ring: sorted 32-bit points, each owned by an endpoint index."""

    kind = "ring_hash"
    __slots__ = ("endpoints", "size", "lookup", "candidates", "_native")

    def __init__(self, endpoints: EndpointSet, native: mesh_native.RingTable) -> None:
        self.endpoints = endpoints
        self.size = native.size  # points on the ring
        self._native = native
        self.lookup = native.lookup
        self.candidates = native.candidates

    @staticmethod
    def names_for(weight: int) -> int:
        """MD5 names (4 points each) for a weight: 40 per unit, at least one."""
        return max(1, round(KETAMA_NAMES_PER_UNIT * weight / WEIGHT_UNIT))

    @classmethod
    def build(cls, endpoints: EndpointSet) -> RingHash:
        native = mesh_native.RingTable(list(endpoints.keys), [ep.weight for ep in endpoints])
        return cls(endpoints, native)

    def stats(self) -> TableStats:
        return TableStats(tuple(self._native.counts()))

    def __repr__(self) -> str:
        return f"<RingHash points={self.size} endpoints={len(self.endpoints)}>"


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
