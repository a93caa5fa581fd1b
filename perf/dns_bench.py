"""The sidecar's DNS responder beside dnsmasq: SRV queries/s with dnsperf, same records.

    .venv/bin/python -m perf.dns_bench [--quick] [--rounds N] [--seconds S] [--instances N]

Both servers serve ``_web._tcp.service.mesh`` SRV (with the targets' A records) and are
pinned to the same core (``taskset -c 0``); dnsperf runs on the other core. Rounds
alternate mesh / dnsmasq so that drift on the machine hits both alike; the figure is the
median of the rounds. Needs root for apt (dnsmasq-base, dnsperf) when they are missing.

Run by ``python -m perf`` as the ``dns`` section (``rows(quick)``), or alone.
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
from pathlib import Path

SERVER_CORE = "0"
CLIENT_CORE = "1"
QPS = re.compile(r"Queries per second:\s+([\d.]+)")
LOST = re.compile(r"Queries lost:\s+(\d+)")
NAME = "_web._tcp.service.mesh"
TOOLS = {"dnsmasq": "dnsmasq-base", "dnsperf": "dnsperf"}


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


# The two servers


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
    conf.write_text("\n".join(lines) + "\n")
    dnsmasq = _which("dnsmasq")
    assert dnsmasq
    return subprocess.Popen(
        _pin([dnsmasq, f"--conf-file={conf}", "--user=root"], SERVER_CORE),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


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


def dnsperf(port: int, seconds: float, queryfile: Path) -> tuple[float, int]:
    argv = [
        "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queryfile),
        "-l", str(seconds), "-c", "8", "-q", "200", "-t", "2",
    ]  # fmt: skip
    out = subprocess.run(_pin(argv, CLIENT_CORE), capture_output=True, text=True, check=True).stdout
    qps = QPS.search(out)
    lost = LOST.search(out)
    if not qps:
        raise RuntimeError(f"dnsperf printed no rate:\n{out}")
    return float(qps.group(1)), int(lost.group(1)) if lost else 0


def bench(*, rounds: int, seconds: float, instances: int) -> dict[str, object]:
    ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="mesh-dnsbench-"))
    queryfile = work / "queries"
    queryfile.write_text(f"{NAME} SRV\n")
    mesh_qps: list[float] = []
    peer_qps: list[float] = []
    mesh_cpu: list[float] = []
    peer_cpu: list[float] = []
    try:
        for _ in range(rounds):
            for kind in ("mesh", "dnsmasq"):
                sock = _free_udp_port()
                port = sock.getsockname()[1]
                if kind == "mesh":
                    proc = start_mesh(instances, sock)
                    sock.close()
                else:
                    sock.close()  # dnsmasq binds by itself; the port was free a moment ago
                    proc = start_dnsmasq(instances, port, work)
                try:
                    try:
                        wait_answering(port)
                    except RuntimeError:
                        proc.kill()
                        err = proc.communicate()[1] or b""
                        raise RuntimeError(
                            f"{kind} did not answer: {err.decode()[-500:]}"
                        ) from None
                    cpu0 = _cpu_seconds(proc.pid)
                    qps, lost = dnsperf(port, seconds, queryfile)
                    cpu = (_cpu_seconds(proc.pid) - cpu0) / max(1.0, qps * seconds) * 1e6
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                (mesh_qps if kind == "mesh" else peer_qps).append(qps)
                (mesh_cpu if kind == "mesh" else peer_cpu).append(cpu)
                print(
                    f"dns_bench: {kind:8s} {qps:10,.0f} q/s  {cpu:5.2f} µs CPU/query (lost {lost})",
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mesh, peer = statistics.median(mesh_qps), statistics.median(peer_qps)
    return {
        "mesh": mesh,
        "dnsmasq": peer,
        "ratio": mesh / peer,
        "rounds": rounds,
        "mesh_cpu_us": statistics.median(mesh_cpu),
        "dnsmasq_cpu_us": statistics.median(peer_cpu),
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (taskset execs the server: same pid)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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

    out = bench(rounds=1 if quick else 5, seconds=3 if quick else 10, instances=3)
    return [
        Row(
            "DNS SRV queries/s, one core (dnsperf)",
            out["mesh"],
            out["dnsmasq"],
            "dnsmasq",
            "≥ 1.0×",
            "q/s",
            note=f"median of {out['rounds']} interleaved rounds",
        ),
        Row(
            "DNS server CPU per SRV query (user + system)",
            out["mesh_cpu_us"],
            out["dnsmasq_cpu_us"],
            "dnsmasq",
            "≤ 1.0×",
            "µs",
        ),
    ]


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m perf.dns_bench")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve is not None:
        import uvloop

        uvloop.run(serve(a.serve, a.instances))
        return 0
    rounds, seconds = (1, 3.0) if a.quick else (a.rounds, a.seconds)
    out = bench(rounds=rounds, seconds=seconds, instances=a.instances)
    print(
        f"SRV {NAME} ({a.instances} instances): mesh {out['mesh']:,.0f} q/s, "
        f"dnsmasq {out['dnsmasq']:,.0f} q/s, ratio {out['ratio']:.2f}x "
        f"(median of {out['rounds']} interleaved rounds, both on core {SERVER_CORE}); "
        f"CPU per query: mesh {out['mesh_cpu_us']:.2f} µs, dnsmasq {out['dnsmasq_cpu_us']:.2f} µs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
