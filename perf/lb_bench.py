"""Benchmark: mesh lb vs nginx vs HAProxy on one pinned core (not a test).

Three identical backends (one nginx answering a fixed body on three ports), then each LB
configured the same way (consistent hash on the X-User header, keep-alive upstreams),
each pinned to the same core, driven by wrk on the other core at c50 and c200 in
interleaved rounds. Prints req/s, p50/p99 latency and the LB's CPU µs per request (from
/proc/PID/stat, all of the LB's processes), split into user and kernel time, and the
ratios to nginx.

Beside them runs ``perf/bare_proxy.py``, uvloop and httptools forwarding bytes with no
proxy logic at all: the floor of an asyncio proxy. mesh's CPU per request minus the
floor's is what mesh's own per-request work costs.

    sudo .venv/bin/python perf/lb_bench.py [--rounds 3] [--duration 10] [--floor-work 300,600]

``python -m perf`` takes its rows from :func:`rows` (``--quick``: one 3 s round at c50).

nginx, HAProxy and wrk are installed with apt when missing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LB_CORE = "0"
LOAD_CORE = "1"
TICK = os.sysconf("SC_CLK_TCK")

WRK_LUA = """
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, {["X-User"] = "user" .. (n % 1000)})
end
"""


def ensure_tools() -> None:
    missing = [t for t in ("nginx", "haproxy", "wrk", "taskset") if not shutil.which(t)]
    pkgs = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "taskset": "util-linux"}
    if missing:
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *{pkgs[m] for m in missing}], check=True)


def free_port() -> int:
    # Only for the third-party servers, which cannot take a pre-bound socket.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(user, kernel) clock ticks of ``pids``."""
    user = kernel = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        user += int(fields[11])
        kernel += int(fields[12])
    return user, kernel


def tree(pid: int) -> list[int]:
    out = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += tree(int(child))
    return out


class Proc:
    def __init__(self, name: str, argv: list[str], port: int, cwd: Path) -> None:
        self.name, self.port = name, port
        with open(cwd / f"{name}.log", "w") as log:
            self.p = subprocess.Popen(
                ["taskset", "-c", LB_CORE, *argv], stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO, start_new_session=True,
            )  # fmt: skip
        try:
            wait_port(port)
        except RuntimeError:
            self.stop()
            raise

    def pids(self) -> list[int]:
        return tree(self.p.pid)

    def stop(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            self.p.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.p.pid, signal.SIGKILL)


def start_backends(work: Path) -> tuple[subprocess.Popen, list[int]]:
    ports = [free_port() for _ in range(3)]
    servers = "\n".join(
        f"server {{ listen 127.0.0.1:{p}; keepalive_requests 100000; location / {{ return 200 'hello from {i}\\n'; }} }}"
        for i, p in enumerate(ports)
    )
    conf = work / "backends.conf"
    conf.write_text(
        f"daemon off; worker_processes 1; pid {work}/backends.pid; error_log {work}/backends.err;\n"
        f"events {{ worker_connections 4096; }}\n"
        f"http {{ access_log off; {servers} }}\n"
    )
    p = subprocess.Popen(
        ["taskset", "-c", LOAD_CORE, "nginx", "-c", str(conf), "-p", str(work)],
        start_new_session=True,
    )
    for port in ports:
        wait_port(port)
    return p, ports


def start_lbs(
    work: Path, backends: list[int], lbs: list[Proc], floor_work: tuple[int, ...] = ()
) -> None:
    port = free_port()
    ups = "\n".join(f"server 127.0.0.1:{b};" for b in backends)
    conf = work / "nginx-lb.conf"
    conf.write_text(
        f"daemon off; worker_processes 1; pid {work}/nginx-lb.pid; error_log {work}/nginx-lb.err;\n"
        f"events {{ worker_connections 4096; }}\n"
        f"http {{ access_log off; upstream app {{ hash $http_x_user consistent; {ups} keepalive 64; }}\n"
        f"server {{ listen 127.0.0.1:{port}; keepalive_requests 100000; location / {{\n"
        f"  proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection '';\n"
        f"  proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }} }}\n"
    )
    lbs.append(Proc("nginx", ["nginx", "-c", str(conf), "-p", str(work)], port, work))
    port = free_port()
    servers = "\n".join(f"  server b{i} 127.0.0.1:{b}" for i, b in enumerate(backends))
    conf = work / "haproxy.cfg"
    conf.write_text(
        "global\n  nbthread 1\n  maxconn 4000\n"
        "defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 30s\n"
        "  option http-keep-alive\n  http-reuse always\n  option forwardfor\n"
        f"frontend fe\n  bind 127.0.0.1:{port}\n  default_backend app\n"
        f"backend app\n  balance hdr(x-user)\n  hash-type consistent\n{servers}\n"
    )
    lbs.append(Proc("haproxy", ["haproxy", "-f", str(conf)], port, work))
    port = free_port()
    eps = ",".join(f"127.0.0.1:{b}" for b in backends)
    lbs.append(
        Proc(
            "mesh",
            [
                sys.executable,
                "-m",
                "mesh",
                "--log-level",
                "warning",
                "lb",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin",
                "127.0.0.1:0",
                "--endpoints",
                eps,
                "--hash-on",
                "header:x-user",
            ],
            port,
            work,
        )  # fmt: skip
    )
    port = free_port()
    argv = [sys.executable, "-m", "perf.bare_proxy", str(port), str(backends[0])]
    lbs.append(Proc("floor", argv, port, work))
    for n in floor_work:  # the floor plus n loop iterations of Python per request
        port = free_port()
        lbs.append(
            Proc(f"floor+{n}", [*argv[:-2], str(port), str(backends[0]), str(n)], port, work)
        )
    return lbs


def parse_latency(text: str, label: str) -> float:
    m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\b", text, re.M)
    if not m:
        return float("nan")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return float(m.group(1)) * scale


def run_wrk(
    port: int, conns: int, duration: int, lua: Path
) -> tuple[int, float, float, float, str]:
    out = subprocess.run(
        ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency",
         "-s", str(lua), f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_err = re.search(r"Socket errors: (.*)", out)
    note = (f"non2xx={errors.group(1)} " if errors else "") + (
        socket_err.group(1) if socket_err else ""
    )
    return requests, rps, parse_latency(out, "50"), parse_latency(out, "99"), note


# Per (LB, connections), one tuple per round:
# (requests, req/s, p50 ms, p99 ms, CPU µs per request, user µs, kernel µs).
Results = dict[tuple[str, int], list[tuple[int, float, float, float, float, float, float]]]


def bench(
    *,
    rounds: int,
    duration: int,
    conns: tuple[int, ...],
    warmup: int = 2,
    echo: bool = True,
    floor_work: tuple[int, ...] = (),
) -> Results:
    """Run every LB at each concurrency in interleaved rounds (see ``Results``)."""
    work = Path(tempfile.mkdtemp(prefix="lb-bench-"))
    lua = work / "keys.lua"
    lua.write_text(WRK_LUA)
    backend, ports = start_backends(work)
    lbs: list[Proc] = []
    results: Results = {}
    try:
        start_lbs(work, ports, lbs, floor_work)
        for lb in lbs:  # warm up: connections, pools, caches
            run_wrk(lb.port, 50, warmup, lua)
        for r in range(rounds):
            for c in conns:
                for lb in lbs:
                    u0, k0 = cpu_ticks(lb.pids())
                    n, rps, p50, p99, note = run_wrk(lb.port, c, duration, lua)
                    u1, k1 = cpu_ticks(lb.pids())
                    per = 1e6 / TICK / max(1, n)
                    user_us, kernel_us = (u1 - u0) * per, (k1 - k0) * per
                    results.setdefault((lb.name, c), []).append(
                        (n, rps, p50, p99, user_us + kernel_us, user_us, kernel_us)
                    )
                    if echo:
                        print(
                            f"round {r + 1} c{c:<4} {lb.name:8} {rps:9.0f} req/s  p50 {p50:6.2f} ms"
                            f"  p99 {p99:6.2f} ms  cpu {user_us + kernel_us:5.1f} µs/req ({user_us:.1f} user) {note}",
                            flush=True,
                        )
    finally:
        for lb in lbs:
            lb.stop()
        os.killpg(backend.pid, signal.SIGTERM)
        backend.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return results


def medians(results: Results, name: str, conns: int) -> tuple[float, ...]:
    """Median over rounds of (req/s, p50 ms, p99 ms, CPU µs, user µs, kernel µs) per request."""
    rows = results[(name, conns)]
    med = [sorted(col)[len(col) // 2] for col in zip(*rows, strict=True)]
    return tuple(med[1:])


def rows(quick: bool) -> list:
    """Rows for ``python -m perf``: mesh beside nginx at c50 (and c200 in a full run)."""
    from perf.__main__ import Row

    conns = (50,) if quick else (50, 200)
    missing = [t for t in ("nginx", "haproxy", "wrk", "taskset") if not shutil.which(t)]
    if missing:
        note = f"skipped: {', '.join(missing)} not installed"
        return [Row("LB req/s, one core, c50 (wrk)", None, None, "nginx", "≥ 0.9×", note=note)]
    rounds, duration, warmup = (1, 3, 1) if quick else (3, 10, 2)
    results = bench(rounds=rounds, duration=duration, conns=conns, warmup=warmup, echo=False)
    out = []
    for c in conns:
        rps, _, p99, cpu, user, kernel = medians(results, "mesh", c)
        n_rps, _, n_p99, n_cpu, n_user, n_kernel = medians(results, "nginx", c)
        h_rps, _, _, h_cpu, _, _ = medians(results, "haproxy", c)
        f_cpu, f_user = medians(results, "floor", c)[3:5]
        note = f"median of {rounds} interleaved rounds of {duration} s"
        out += [
            Row(f"LB req/s, one core, c{c} (wrk)", rps, n_rps, "nginx", "≥ 0.9×", "req/s", note),
            Row(f"LB CPU per request, c{c} (user + system)", cpu, n_cpu, "nginx", "≤ 1.0×", "µs"),
            Row(f"LB p99 latency, c{c}", p99, n_p99, "nginx", "", "ms"),
            Row(f"LB CPU per request, c{c}: user space", user, n_user, "nginx", "", "µs"),
            Row(f"LB CPU per request, c{c}: kernel", kernel, n_kernel, "nginx", "", "µs"),
            Row(
                f"asyncio floor CPU per request, c{c} (uvloop + httptools, no proxy logic)",
                f_cpu,
                n_cpu,
                "nginx",
                "",
                "µs",
                "perf/bare_proxy.py",
            ),
            Row(
                f"LB user-space CPU per request over the floor, c{c}",
                user - f_user,
                n_user,
                "nginx",
                "",
                "µs",
                "mesh's own per-request work",
            ),
            Row(f"LB CPU per request, c{c}, vs HAProxy", cpu, h_cpu, "haproxy", "", "µs"),
            Row(f"LB req/s, one core, c{c}, vs HAProxy", rps, h_rps, "haproxy", "", "req/s"),
        ]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--conns", default="50,200")
    ap.add_argument(
        "--floor-work",
        default="",
        help="also run the floor with these many Python loop iterations per request (e.g. 300,600)",
    )
    args = ap.parse_args()
    ensure_tools()
    conns = tuple(map(int, args.conns.split(",")))
    floor_work = tuple(int(n) for n in args.floor_work.split(",") if n)
    results = bench(rounds=args.rounds, duration=args.duration, conns=conns, floor_work=floor_work)
    print(
        "\nmedian over rounds      req/s    p50 ms   p99 ms  cpu µs/req (user + kernel)"
        "  vs nginx (cpu, req/s)"
    )
    for c in conns:
        base = medians(results, "nginx", c)
        for name in ("nginx", "haproxy", "mesh", "floor", *(f"floor+{n}" for n in floor_work)):
            rps, p50, p99, cpu, user, kernel = medians(results, name, c)
            print(
                f"c{c:<4} {name:10} {rps:10.0f} {p50:8.2f} {p99:8.2f} {cpu:6.1f} ({user:4.1f} + "
                f"{kernel:4.1f})   {cpu / base[3]:.2f}x, {rps / base[0]:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
