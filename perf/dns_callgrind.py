"""Instructions per DNS query in the sidecar's responder, counted exactly by callgrind.

    .venv/bin/python -m perf.dns_callgrind [--checkout DIR] [--queries N] [--inflight Q ...]

The responder (``perf.dns_bench --serve``, the same server the benchmark runs) is started
under ``valgrind --tool=callgrind`` twice per load, and answers N and then 2N queries sent
by dnsperf with Q in flight; the difference of the two totals over N is what one query
costs in user space, start-up and the table's rendering cancelled out. Kernel work is not
counted (callgrind sees user space only); ``perf.dns_bench`` gives the kernel's share.

``--checkout`` measures another checkout of mesh (its own ``.venv``), for example an older
commit in a ``git worktree``, so that two versions of the hot path compare on one machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from perf.callgrind import counted
from perf.dns_bench import COMPLETED, QUERIES, _free_udp_port, _pin, wait_answering

ROOT = Path(__file__).resolve().parent.parent


def total_instructions(checkout: Path, queries: int, inflight: int, qtype: str) -> tuple[int, int]:
    """(instructions in all, queries answered)."""
    with tempfile.TemporaryDirectory(prefix="mesh-queries-") as work:
        queryfile = Path(work) / "queries"
        queryfile.write_text(QUERIES[qtype] + "\n")
        sock = _free_udp_port()
        port, fd = sock.getsockname()[1], sock.fileno()
        argv = [
            str(checkout / ".venv/bin/python"), "-m", "perf.dns_bench", "--serve", str(fd),
            "--instances", "3",
        ]  # fmt: skip

        def drive() -> int:
            sock.close()  # the server holds it now
            # wait_answering's own few queries are about the same in both runs.
            wait_answering(port, timeout=300)
            if inflight == 1:
                return one_at_a_time(port, qtype, queries)
            return with_dnsperf(port, queryfile, queries, inflight)

        return counted(argv, drive, cwd=checkout, core="0", pass_fds=(fd,))


def with_dnsperf(port: int, queryfile: Path, queries: int, inflight: int) -> int:
    argv = [
        "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queryfile),
        "-n", str(queries), "-c", "1", "-q", str(inflight), "-t", "10",
    ]  # fmt: skip
    report = subprocess.run(_pin(argv, "1"), check=True, capture_output=True, text=True).stdout
    done = COMPLETED.search(report)
    if not done:
        raise RuntimeError(f"dnsperf printed no count:\n{report[-1000:]}")
    return int(done.group(1))


def one_at_a_time(port: int, qtype: str, queries: int) -> int:
    """Each query sent when the last one is answered, so that each wake-up reads one (dnsperf
    paces itself far below that at one query in flight)."""
    import dns.message

    name, rdtype = QUERIES[qtype].split()
    wire = bytearray(dns.message.make_query(name, rdtype).to_wire())
    done = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        sock.settimeout(5)
        for n in range(queries):
            wire[:2] = (n % 65536).to_bytes(2, "big")
            sock.send(wire)
            try:
                while sock.recv(4096)[:2] != wire[:2]:
                    pass
            except TimeoutError:
                continue
            done += 1
    return done


def per_query(checkout: Path, queries: int, inflight: int, qtype: str) -> float:
    ir1, done1 = total_instructions(checkout, queries, inflight, qtype)
    ir2, done2 = total_instructions(checkout, 2 * queries, inflight, qtype)
    return (ir2 - ir1) / max(1, done2 - done1)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m perf.dns_callgrind")
    p.add_argument("--checkout", type=Path, default=ROOT, help="a mesh checkout with its .venv")
    p.add_argument("--queries", type=int, default=20000)
    p.add_argument(
        "--inflight", type=int, action="append", help="queries in flight (default 1 and 200)"
    )
    p.add_argument("--type", choices=sorted(QUERIES), default="SRV")
    a = p.parse_args()
    if not shutil.which("valgrind"):
        print("perf.dns_callgrind: valgrind is not installed", file=sys.stderr)
        return 2
    if not (a.checkout / ".venv/bin/python").exists():
        print(f"perf.dns_callgrind: {a.checkout} has no .venv (run make there)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {1})  # the client side; the server is pinned to core 0
    for inflight in a.inflight or [1, 200]:
        ir = per_query(a.checkout.resolve(), a.queries, inflight, a.type)
        print(f"{a.checkout}: {a.type}, {inflight} in flight: {ir:,.0f} instructions per query")
    return 0


if __name__ == "__main__":
    sys.exit(main())
