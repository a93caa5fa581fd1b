"""Endpoints and immutable endpoint sets.

An endpoint is named by ``host:port`` (``[v6]:port``), never by an instance id: every LB
that sees the same addresses builds the same table, so the same key lands on the same
replica from every LB without coordination.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# The registry's and SRV's default weight. One unit of weight is this many weight points;
# the ring gives a fixed number of points per unit (see ring.py).
DEFAULT_WEIGHT = 100
MAX_WEIGHT = 65535


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream address. ``name`` is informational (e.g. the registry instance id)."""

    host: str
    port: int
    weight: int = DEFAULT_WEIGHT
    name: str = ""
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if not 1 <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be 1-{MAX_WEIGHT}, got {self.weight}")
        host = self.host
        object.__setattr__(
            self, "key", f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        )

    def __repr__(self) -> str:
        return f"<Endpoint {self.key} w={self.weight}>"


@dataclass(frozen=True, slots=True)
class EndpointSet:
    """An immutable, sorted, duplicate-free tuple of endpoints; swapped whole on change."""

    endpoints: tuple[Endpoint, ...] = ()

    @classmethod
    def of(cls, endpoints: Iterable[Endpoint]) -> EndpointSet:
        by_key: dict[str, Endpoint] = {}
        for ep in endpoints:
            by_key[ep.key] = ep  # the last one with an address wins
        return cls(tuple(sorted(by_key.values(), key=lambda e: e.key)))

    def __len__(self) -> int:
        return len(self.endpoints)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self.endpoints)

    def __getitem__(self, i: int) -> Endpoint:
        return self.endpoints[i]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(e.key for e in self.endpoints)

    def same_routing(self, other: EndpointSet | None) -> bool:
        """True when a table built from ``other`` would be the same (addresses and weights)."""
        if other is None:
            return False
        return [(e.key, e.weight) for e in self] == [(e.key, e.weight) for e in other]

    def __repr__(self) -> str:
        return (
            f"<EndpointSet {len(self)}: {', '.join(self.keys[:5])}{' …' if len(self) > 5 else ''}>"
        )


def parse_endpoint(text: str, *, weight: int = DEFAULT_WEIGHT) -> Endpoint:
    """``HOST:PORT`` or ``[V6]:PORT``, optionally ``@WEIGHT``. Raises ValueError."""
    text = text.strip()
    spec, sep, w = text.partition("@")
    if sep:
        try:
            weight = int(w)
        except ValueError:
            raise ValueError(f"weight must be an integer, got {text!r}") from None
    host, sep, port = spec.rpartition(":")
    if not sep or not host:
        raise ValueError(f"endpoint must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port_n = int(port)
    except ValueError:
        raise ValueError(f"port must be an integer, got {text!r}") from None
    return Endpoint(host, port_n, weight)
