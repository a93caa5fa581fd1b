"""Consistent-hashing figures: balance and key movement for mesh's Maglev and ring hash,
beside uhashring's ketama and the ideal 1/N.

    .venv/bin/python -m perf.hashing [--keys 100000] [--sizes 3,10,50]
"""

from __future__ import annotations

import argparse
from collections import Counter

from uhashring import HashRing

from lb.endpoints import Endpoint, EndpointSet
from lb.ring import Maglev, RingHash, hash_key


def _endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.{i // 250}.{i % 250 + 1}", 8080) for i in range(n)]


def _owners_mesh(kind: str, eps: list[Endpoint], hashes: list[int]) -> list[str]:
    es = EndpointSet.of(eps)
    table = Maglev.build(es) if kind == "maglev" else RingHash.build(es)
    return [es[table.lookup(h)].key for h in hashes]


def _owners_ketama(eps: list[Endpoint], keys: list[str]) -> list[str]:
    ring = HashRing(nodes=[e.key for e in eps], hash_fn="ketama")
    return [ring.get_node(k) for k in keys]


def _balance(owners: list[str], n: int) -> float:
    counts = Counter(owners)
    return max(counts.values()) / (len(owners) / n)


def _moved(a: list[str], b: list[str]) -> float:
    return sum(1 for x, y in zip(a, b, strict=True) if x != y) / len(a)


def figures(n: int, keys: int) -> dict[str, dict[str, float]]:
    names = [f"user-{i}" for i in range(keys)]
    hashes = [hash_key(k.encode()) for k in names]
    eps = _endpoints(n + 1)
    base, grown = eps[:n], eps
    removed = base[: n // 2] + base[n // 2 + 1 :]
    out: dict[str, dict[str, float]] = {}
    for kind in ("maglev", "ring_hash", "ketama"):
        if kind == "ketama":
            owners = {
                k: _owners_ketama(v, names)
                for k, v in (("base", base), ("rm", removed), ("add", grown))
            }
        else:
            owners = {
                k: _owners_mesh(kind, v, hashes)
                for k, v in (("base", base), ("rm", removed), ("add", grown))
            }
        out[kind] = {
            "max_avg": _balance(owners["base"], n),
            "moved_remove": _moved(owners["base"], owners["rm"]),
            "moved_add": _moved(owners["base"], owners["add"]),
        }
    out["ideal"] = {"max_avg": 1.0, "moved_remove": 1 / n, "moved_add": 1 / (n + 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--sizes", default="3,10,50")
    a = p.parse_args()
    print(
        "| N | table | max/avg | moved, one leaves (ideal 1/N) | moved, one joins (ideal 1/(N+1)) |"
    )
    print("|---|---|---|---|---|")
    for n in (int(s) for s in a.sizes.split(",")):
        f = figures(n, a.keys)
        for kind in ("maglev", "ring_hash", "ketama", "ideal"):
            r = f[kind]
            print(
                f"| {n} | {kind} | {r['max_avg']:.3f} | {r['moved_remove']:.4f} | {r['moved_add']:.4f} |"
            )


if __name__ == "__main__":
    main()
