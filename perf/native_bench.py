"""The native core's figures: Maglev build times, and the per-request cost of reading a request
and building its upstream head, the native reader (what the LB runs) beside mesh's first
reader in Python on httptools (tests/reference).

    .venv/bin/python perf/native_bench.py [--requests 20000] [--reference]
    valgrind --tool=callgrind .venv/bin/python perf/native_bench.py --requests 2000

Each request is a typical keep-alive GET with a hash-key header, fed in one read, as wrk
sends it; the sink does what the LB's does with a head (keeps it, reads its key). Printed:
the time per request. Under callgrind, instructions per request are the difference between
two runs of different --requests, divided by the difference in requests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REQUEST = (
    b"GET /api/items?page=2 HTTP/1.1\r\nHost: app.example\r\nUser-Agent: wrk\r\n"
    b"Accept: */*\r\nX-User: user417\r\nX-Request-Id: 7f0e6c4a\r\n\r\n"
)


class Sink:
    __slots__ = ("head", "ends")

    def __init__(self) -> None:
        self.head = None
        self.ends = 0

    def on_request(self, head, ended: bool = False) -> None:
        self.head = head
        self.ends += ended

    def on_body(self, data: bytes) -> None:
        pass

    def on_request_end(self) -> None:
        self.ends += 1


def run(n: int, reference: bool) -> float:
    if reference:
        from tests.reference import http1_reference as mod

        def upstream(h):
            return mod.build_upstream_head(h, b"10.0.0.7", default_host=b"10.0.1.1:8080")
    else:
        from lb import http1 as mod

        def upstream(h):
            return h.upstream_head(b"10.0.0.7", default_host=b"10.0.1.1:8080")

    sink = Sink()
    reader = mod.RequestReader(sink, frozenset({b"x-user"}))
    t0 = time.perf_counter()
    for _ in range(n):
        reader.feed(REQUEST)
        head = sink.head
        for _name, _value in head.picked:
            pass
        upstream(head)
    elapsed = time.perf_counter() - t0
    assert sink.ends == n
    return elapsed


def maglev_build_ms(n: int, builds: int = 5) -> float:
    """Median time of a 65537-slot Maglev build for ``n`` endpoints."""
    from lb.endpoints import Endpoint, EndpointSet
    from lb.ring import Maglev

    eps = EndpointSet.of(
        Endpoint(f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}", 8080) for i in range(n)
    )
    times = []
    for _ in range(builds):
        t0 = time.perf_counter()
        Maglev.build(eps)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def rows(quick: bool) -> list:
    from perf.__main__ import Row

    out = [
        Row(
            f"Maglev build, 65537 slots, {n} endpoints",
            maglev_build_ms(n),
            5.0 if n == 100 else None,
            "target" if n == 100 else "",
            "≤ 5 ms" if n == 100 else "",
            "ms",
            "median of 5",
        )
        for n in (10, 100, 1000)
    ]
    n = 20_000 if quick else 200_000
    native, ref = run(n, False) / n * 1e6, run(n, True) / n * 1e6
    out.append(Row("request read and upstream head, per request", native, ref, "Python reader on httptools",
                   "", "µs", "one keep-alive GET with a hash key"))  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--reference", action="store_true", help="mesh's first reader (httptools)")
    args = ap.parse_args()
    elapsed = run(args.requests, args.reference)
    which = "reference (httptools)" if args.reference else "native"
    print(f"{which}: {elapsed / args.requests * 1e6:.2f} µs per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
