"""The sidecar's DNS responder beside dnsmasq and unbound: queries/s, CPU and p99 per query.

    .venv/bin/python -m perf.dns_bench [--quick] [--rounds N] [--seconds S] [--instances N]

Each server serves the same records (``_web._tcp.service.mesh`` SRV with the targets' A
records, and each target's A) and is pinned to the same core (``taskset -c 0``); dnsperf
runs on the other core. unbound serves them as a local zone (``local-data``). Every round
starts the three servers and runs each query type at each load (queries in flight) against
each of them in turn, so that drift on the machine hits all alike; a figure is the median of
the rounds. CPU per query is the server process's user and system time over the queries
it answered; p99 comes from a second, shorter dnsperf run that reports every query's
latency (``-v``), which slows dnsperf, so that run's rate is not used.

Run by ``python -m perf`` as the ``dns`` section (``rows(quick)``), or alone. Needs root for
apt (dnsmasq-base, unbound, dnsperf) when they are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVER_CORE = "0"
CLIENT_CORE = "1"
QPS = re.compile(r"Queries per second:\s+([\d.]+)")
LOST = re.compile(r"Queries lost:\s+(\d+)")
COMPLETED = re.compile(r"Queries completed:\s+(\d+)")
NAME = "_web._tcp.service.mesh"
QUERIES = {"SRV": f"{NAME} SRV", "A": "w1.web.service.mesh A"}
LOADS = (10, 200)  # queries in flight
SERVERS = ("mesh", "dnsmasq", "unbound")
TOOLS = {"dnsmasq": "dnsmasq-base", "unbound": "unbound", "dnsperf": "dnsperf"}
LATENCY_SECONDS = 2.0


def ensure_tools() -> None:
    missing = [t for t in TOOLS if not _which(t)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *(TOOLS[t] for t in missing)],
            check=False, capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )  # fmt: skip
    still = [t for t in TOOLS if not _which(t)]
    if still:
        raise SystemExit(f"perf.dns_bench: {', '.join(still)} not installed (needs root and apt)")


def _which(tool: str) -> str | None:
    return shutil.which(tool) or (
        f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
    )


def _instances(n: int) -> list[tuple[str, str, int]]:
    return [(f"w{i}", f"127.0.1.{i}", 8000 + i) for i in range(1, n + 1)]


def _free_udp_port() -> socket.socket:
    """A bound UDP socket whose port number is free for TCP too; the child server gets it
    (mesh) or binds that number itself (dnsmasq binds UDP and TCP)."""
    for _ in range(50):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind(("127.0.0.1", sock.getsockname()[1]))
            return sock
        except OSError:
            sock.close()
        finally:
            probe.close()
    raise RuntimeError("no port free for both UDP and TCP")


# The servers


def _pin(argv: list[str], core: str) -> list[str]:
    return ["taskset", "-c", core, *argv] if shutil.which("taskset") else argv


def start_mesh(n: int, sock: socket.socket) -> subprocess.Popen:
    fd = sock.fileno()
    argv = [sys.executable, "-m", "perf.dns_bench", "--serve", str(fd), "--instances", str(n)]
    return subprocess.Popen(
        _pin(argv, SERVER_CORE), pass_fds=(fd,), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip


def start_dnsmasq(n: int, port: int, workdir: Path) -> subprocess.Popen:
    conf = workdir / "dnsmasq.conf"
    lines = [
        "no-resolv", "no-hosts", "no-daemon", "bind-interfaces", "listen-address=127.0.0.1",
        f"port={port}", "auth-ttl=5", "local-ttl=5", "log-facility=/dev/null",
        "local=/mesh/",  # the zone is answered here, never forwarded
    ]  # fmt: skip
    for name, address, p in _instances(n):
        target = f"{name}.web.service.mesh"
        lines.append(f"srv-host={NAME},{target},{p},1,100")
        lines.append(f"host-record={target},{address}")
    return _spawn("dnsmasq", conf, lines, [f"--conf-file={conf}", "--user=root"])


def start_unbound(n: int, port: int, workdir: Path) -> subprocess.Popen:
    conf = workdir / "unbound.conf"
    lines = [
        "server:",
        f"  interface: 127.0.0.1@{port}", "  port: " + str(port), "  num-threads: 1",
        "  do-ip6: no", "  do-daemonize: no", "  username: \"\"", "  chroot: \"\"",
        "  pidfile: \"\"", "  use-syslog: no", "  logfile: \"\"", "  verbosity: 0",
        "  access-control: 127.0.0.0/8 allow", "  so-reuseport: no",
        "  local-zone: \"mesh.\" static",  # answered here, never recursed
    ]  # fmt: skip
    for name, address, p in _instances(n):
        target = f"{name}.web.service.mesh."
        lines.append(f'  local-data: "{NAME}. 5 IN SRV 1 100 {p} {target}"')
        lines.append(f'  local-data: "{target} 5 IN A {address}"')
    return _spawn("unbound", conf, lines, ["-d", "-c", str(conf)])


def _spawn(tool: str, conf: Path, lines: list[str], args: list[str]) -> subprocess.Popen:
    """Write ``conf`` and start ``tool`` with it on the server core."""
    conf.write_text("\n".join(lines) + "\n")
    exe = _which(tool)
    assert exe
    return subprocess.Popen(
        _pin([exe, *args], SERVER_CORE), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def wait_answering(port: int, timeout: float = 10.0) -> None:
    import dns.message
    import dns.query

    deadline = time.monotonic() + timeout
    query = dns.message.make_query(NAME, "SRV")
    while time.monotonic() < deadline:
        try:
            reply = dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
            if reply.answer:
                return
        except (OSError, dns.exception.Timeout):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no DNS answer on port {port}")


@dataclass
class Run:
    """One dnsperf run against one server: its rate and the server's CPU over it."""

    qps: float
    lost: int
    user_us: float  # per answered query
    sys_us: float


@dataclass
class Figures:
    runs: list[Run] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)

    def median(self, what: str) -> float:
        if what == "p99_ms":
            return statistics.median(self.p99_ms)
        return statistics.median(getattr(r, what) for r in self.runs)

    def cpu_us(self) -> float:
        return statistics.median(r.user_us + r.sys_us for r in self.runs)


def dnsperf(
    port: int, seconds: float, queryfile: Path, inflight: int, *, verbose: bool = False
) -> tuple[str, float, int, int]:
    argv = [
        "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queryfile),
        "-l", str(seconds), "-c", "8" if inflight >= 8 else "1", "-q", str(inflight), "-t", "2",
    ]  # fmt: skip
    if verbose:
        argv.append("-v")
    out = subprocess.run(_pin(argv, CLIENT_CORE), capture_output=True, text=True, check=True).stdout
    qps, lost, done = QPS.search(out), LOST.search(out), COMPLETED.search(out)
    if not qps or not done:
        raise RuntimeError(f"dnsperf printed no rate:\n{out[-2000:]}")
    return out, float(qps.group(1)), int(lost.group(1)) if lost else 0, int(done.group(1))


def measure(pid: int, port: int, seconds: float, queryfile: Path, inflight: int) -> Run:
    u0, s0 = _cpu_seconds(pid)
    _, qps, lost, done = dnsperf(port, seconds, queryfile, inflight)
    u1, s1 = _cpu_seconds(pid)
    per = 1e6 / max(1, done)
    return Run(qps, lost, (u1 - u0) * per, (s1 - s0) * per)


def p99_ms(port: int, queryfile: Path, inflight: int, seconds: float) -> float:
    out, *_ = dnsperf(port, seconds, queryfile, inflight, verbose=True)
    latencies = sorted(_latency(line) for line in out.splitlines() if line.startswith("> "))
    if not latencies:
        raise RuntimeError("dnsperf -v reported no latency")
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3


def _latency(line: str) -> float:
    """``> NOERROR name TYPE 0.000123``; a query that timed out (``> T name TYPE``) counts as
    dnsperf's timeout."""
    try:
        return float(line.rsplit(None, 1)[1])
    except ValueError:
        return 2.0


def _start(kind: str, instances: int, work: Path) -> tuple[subprocess.Popen, int]:
    sock = _free_udp_port()
    port = sock.getsockname()[1]
    if kind == "mesh":
        proc = start_mesh(instances, sock)
        sock.close()
    else:
        sock.close()  # the server binds by itself; the port was free a moment ago
        start = start_dnsmasq if kind == "dnsmasq" else start_unbound
        proc = start(instances, port, work)
    try:
        wait_answering(port)
    except RuntimeError:
        proc.kill()
        err = proc.communicate()[1] or b""
        raise RuntimeError(f"{kind} did not answer: {err.decode()[-500:]}") from None
    return proc, port


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench(*, rounds: int, seconds: float, instances: int) -> dict[tuple[str, str, int], Figures]:
    """Figures by (server, query type, queries in flight)."""
    ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="mesh-dnsbench-"))
    files = {}
    for qtype, line in QUERIES.items():
        files[qtype] = work / f"queries-{qtype}"
        files[qtype].write_text(line + "\n")
    figures: dict[tuple[str, str, int], Figures] = {}
    try:
        for _ in range(rounds):
            servers = {}
            try:
                for kind in SERVERS:
                    servers[kind] = _start(kind, instances, work)
                for qtype, queryfile in files.items():
                    for inflight in LOADS:
                        for kind, (proc, port) in servers.items():
                            fig = figures.setdefault((kind, qtype, inflight), Figures())
                            run = measure(proc.pid, port, seconds, queryfile, inflight)
                            fig.runs.append(run)
                            fig.p99_ms.append(p99_ms(port, queryfile, inflight, LATENCY_SECONDS))
                            print(
                                f"dns_bench: {kind:8s} {qtype:3s} {inflight:3d} in flight "
                                f"{run.qps:9,.0f} q/s  {run.user_us:5.2f} user + "
                                f"{run.sys_us:5.2f} sys µs/query  p99 {fig.p99_ms[-1]:.3f} ms "
                                f"(lost {run.lost})",
                                file=sys.stderr,
                            )
            finally:
                for proc, _ in servers.values():
                    _stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figures


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process (taskset execs the server: same pid)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


# The mesh side: the sidecar's DNS server alone, on the socket it was handed.


async def serve(fd: int, n: int) -> None:
    from registry.model import Instance, Snapshot
    from sidecar.dns_server import DnsServer, ZoneConfig

    sock = socket.socket(fileno=fd)
    server = DnsServer(ZoneConfig(ttl=5))
    await server.start(sockets=[sock])
    server.update(
        Snapshot.of(
            Instance(service="web", instance=name, address=address, port=port)
            for name, address, port in _instances(n)
        )
    )
    await server.wait_rebuilt()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.close()


def rows(quick: bool) -> list:
    from perf.__main__ import Row

    rounds = 1 if quick else 3
    figs = bench(rounds=rounds, seconds=2 if quick else 5, instances=3)
    out = []
    for qtype in QUERIES:
        for inflight in LOADS:
            mesh = figs[("mesh", qtype, inflight)]
            what = f"DNS {qtype}, {inflight} in flight"
            for peer in ("dnsmasq", "unbound"):
                other = figs[(peer, qtype, inflight)]
                target = peer == "dnsmasq"
                # With few queries in flight dnsperf sends far slower than the servers'
                # latency allows (at 1 in flight: 10 to 34 q/s, at 0.2 to 0.5 ms each), so
                # the rate there is the load generator's; CPU per query and p99 are the
                # servers'.
                paced = " (dnsperf's pace, not the server's)" if inflight < 100 else ""
                out += [
                    Row(f"{what}: queries/s (dnsperf)", mesh.median("qps"), other.median("qps"), peer,
                        "≥ 1.0×" if target and not paced else "", "q/s",
                        note=f"median of {rounds} rounds{paced}"),
                    Row(f"{what}: server CPU per query (user + system)", mesh.cpu_us(), other.cpu_us(), peer,
                        "≤ 0.75×" if target else "", "µs",
                        note=f"mesh {mesh.median('user_us'):.2f} + {mesh.median('sys_us'):.2f}, "
                        f"{peer} {other.median('user_us'):.2f} + {other.median('sys_us'):.2f}"),
                    Row(f"{what}: p99 latency", mesh.median("p99_ms"), other.median("p99_ms"), peer, "", "ms"),
                ]  # fmt: skip
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m perf.dns_bench")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve is not None:
        import uvloop

        uvloop.run(serve(a.serve, a.instances))
        return 0
    rounds, seconds = (1, 2.0) if a.quick else (a.rounds, a.seconds)
    figs = bench(rounds=rounds, seconds=seconds, instances=a.instances)
    print(
        f"{a.instances} instances, median of {rounds} rounds of {seconds:g} s, every server "
        f"on core {SERVER_CORE}, dnsperf on core {CLIENT_CORE}"
    )
    print("server   type in-flight       q/s   user µs  sys µs  CPU µs/q  p99 ms  CPU vs dnsmasq")
    for (kind, qtype, inflight), f in sorted(figs.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        base = figs[("dnsmasq", qtype, inflight)].cpu_us()
        print(
            f"{kind:8s} {qtype:4s} {inflight:9d} {f.median('qps'):9,.0f} {f.median('user_us'):9.2f} "
            f"{f.median('sys_us'):7.2f} {f.cpu_us():9.2f} {f.median('p99_ms'):7.3f} "
            f"{f.cpu_us() / base:10.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
