"""The LB and three peers in their own network namespaces, endpoints from the registry.

Host 0 runs the registry and the LB; hosts 1-3 each run an HTTP app and its sidecar,
which registers it. Clients run inside host 0 and talk to the LB at host 0's address.
Setting a peer's link down must eject it while traffic carries on without errors.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

from tests.system.netns import Host, Topology

DB_PORT = 27017
APP_PORT = 8080
LB_PORT = 8000
DEADLINE = 30.0

CLIENT = """
import asyncio, json, sys
import aiohttp

async def main(url, n):
    counts = {}
    sem = asyncio.Semaphore(10)
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async def one(i):
            async with sem:
                try:
                    async with s.get(url, headers={"X-User": f"u{i}"}) as r:
                        await r.read()
                        key = str(r.status)
                except Exception as exc:
                    key = type(exc).__name__
                counts[key] = counts.get(key, 0) + 1
        await asyncio.gather(*(one(i) for i in range(n)))
    print(json.dumps(counts))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""

ADMIN = """
import json, sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:9901/clusters", timeout=2).read().decode())
"""


def mesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesh", *args]


def drive(host: Host, n: int) -> dict[str, int]:
    out = host.run(
        [sys.executable, "-c", CLIENT, f"http://{host.address}:{LB_PORT}/", str(n)], timeout=120
    )
    return json.loads(out.stdout)


def clusters(host: Host) -> dict:
    return json.loads(host.run([sys.executable, "-c", ADMIN]).stdout)["clusters"][0]


def wait_for(what: str, check) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_peer_link_down_is_ejected_and_traffic_continues(tmp_path):
    procs: list[subprocess.Popen] = []
    logs: list[tuple[str, object]] = []

    def start(host: Host, argv: list[str], label: str) -> subprocess.Popen:
        log = open(tmp_path / f"{label}.log", "wb")  # noqa: SIM115 - closed below
        logs.append((label, log))
        proc = host.popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    with Topology(4) as topo:
        try:
            lb_host, peers = topo.hosts[0], topo.hosts[1:]
            url = f"mongodb://{lb_host.address}:{DB_PORT}/mesh"
            start(lb_host, mesh("db", "--host", lb_host.address, "--port", str(DB_PORT)), "db")
            for i, host in enumerate(peers):
                app = [sys.executable, "-m", "http.server", str(APP_PORT), "--bind", host.address]
                start(host, app, f"app{i}")
                start(
                    host,
                    mesh(
                        "sidecar",
                        "--service",
                        "web",
                        "--port",
                        str(APP_PORT),
                        "--instance",
                        f"peer{i}",
                        "--check",
                        "http:/",
                        "--check-interval",
                        "0.5",
                        "--drain",
                        "0.5",
                        "--dns-listen",
                        "127.0.0.1:53",
                        "--upstream",
                        "none",
                        "--mongo-url",
                        url,
                    ),  # fmt: skip
                    f"sidecar{i}",
                )
            start(
                lb_host,
                mesh(
                    "lb",
                    "--listen",
                    f"{lb_host.address}:{LB_PORT}",
                    "--admin",
                    "127.0.0.1:9901",
                    "--service",
                    "web",
                    "--mongo-url",
                    url,
                    "--hash-on",
                    "header:x-user",
                    "--connect-timeout",
                    "0.5",
                    "--per-try-timeout",
                    "1",
                ),  # fmt: skip
                "lb",
            )

            def three_endpoints() -> bool:
                try:
                    return len(clusters(lb_host)["endpoints"]) == 3
                except (subprocess.CalledProcessError, json.JSONDecodeError, KeyError):
                    return False

            wait_for("three registered peers in the LB", three_endpoints)
            assert drive(lb_host, 150) == {"200": 150}
            down = peers[1]
            down.link(False)
            assert drive(lb_host, 300) == {"200": 300}
            c = clusters(lb_host)
            entry = [e for e in c["endpoints"] if e["host"] == down.address]
            # Ejected by the LB, or already gone from the registry (its lease ran out).
            assert entry == [] or entry[0]["ejected"], entry
            assert drive(lb_host, 150) == {"200": 150}
        except BaseException:
            for label, log in logs:
                log.flush()
                tail = (tmp_path / f"{label}.log").read_text(errors="replace")[-1500:]
                print(f"--- {label}\n{tail}")
            raise
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            for proc in procs:
                proc.wait(timeout=10)
            for _, log in logs:
                log.close()
