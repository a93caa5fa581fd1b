"""Instructions per proxied request in mesh lb, counted exactly by callgrind.

    .venv/bin/python -m perf.lb_callgrind [--checkout DIR] [--requests N]

``mesh lb`` (Maglev on the ``x-user`` header, three nginx backends on keep-alive, as
``perf.lb_bench`` runs it) is started under ``valgrind --tool=callgrind`` twice, and
proxies N and then 2N keep-alive GETs sent one at a time on one connection, each with its
own key; the difference of the two totals over N is what one request costs in user space
(start-up cancelled out). Each request is then one read on each side: the fast path.
Kernel work is not counted (callgrind sees user space only); ``perf.lb_bench`` gives the
kernel's share.

``--checkout`` measures another checkout of mesh (its own ``.venv``), for example an older
commit in a ``git worktree``, so that two versions of the data path compare on one machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from perf.callgrind import counted
from perf.lb_bench import LB_CORE, LOAD_CORE, ensure_tools, free_port, start_backends

ROOT = Path(__file__).resolve().parent.parent


def wait_proxying(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mesh lb on {port} did not answer within {timeout:.0f} s")


def send(port: int, requests: int) -> int:
    """``requests`` GETs on one keep-alive connection, each sent when the last is answered."""
    done = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        for n in range(requests):
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nX-User: user%d\r\n\r\n" % (n % 1000))
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += s.recv(4096)
            head, _, body = buf.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            while len(body) < length:
                body += s.recv(4096)
            done += head.startswith(b"HTTP/1.1 200")
    return done


def total_instructions(checkout: Path, backends: list[int], requests: int) -> tuple[int, int]:
    """(instructions in all, requests answered 200)."""
    port = free_port()
    argv = [
        str(checkout / ".venv/bin/python"), "-m", "mesh", "--log-level", "warning", "lb",
        "--listen", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0",
        "--endpoints", ",".join(f"127.0.0.1:{b}" for b in backends),
        "--hash-on", "header:x-user",
    ]  # fmt: skip

    def drive() -> int:
        wait_proxying(port, timeout=300)
        return send(port, requests)

    return counted(argv, drive, cwd=checkout, core=LB_CORE)


def per_request(checkout: Path, requests: int) -> float:
    work = Path(tempfile.mkdtemp(prefix="mesh-backends-"))
    backend, ports = start_backends(work)
    try:
        ir1, done1 = total_instructions(checkout, ports, requests)
        ir2, done2 = total_instructions(checkout, ports, 2 * requests)
    finally:
        os.killpg(backend.pid, signal.SIGTERM)
        backend.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    if done1 != requests or done2 != 2 * requests:
        raise RuntimeError(f"answered {done1}/{requests} and {done2}/{2 * requests} with 200")
    return (ir2 - ir1) / requests


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m perf.lb_callgrind")
    p.add_argument("--checkout", type=Path, default=ROOT, help="a mesh checkout with its .venv")
    p.add_argument("--requests", type=int, default=5000)
    a = p.parse_args()
    if not shutil.which("valgrind"):
        print("perf.lb_callgrind: valgrind is not installed", file=sys.stderr)
        return 2
    if not (a.checkout / ".venv/bin/python").exists():
        print(f"perf.lb_callgrind: {a.checkout} has no .venv (run make there)", file=sys.stderr)
        return 2
    ensure_tools()
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # the client side; the LB is pinned to LB_CORE
    ir = per_request(a.checkout.resolve(), a.requests)
    print(f"{a.checkout}: {ir:,.0f} instructions per request (keep-alive GET, Maglev on x-user)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
