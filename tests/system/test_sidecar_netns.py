"""Three "containers" on a bridge, each with an HTTP app and its sidecar: discovery by SRV.

Everything runs inside the namespaces: the registry in host 0, one app and one sidecar per
host (its address found with pyroute2, its DNS on the host's 127.0.0.1:53). The root
namespace only starts processes and reads their output.
"""

from __future__ import annotations

import signal
import sys
import time

from tests.system.netns import Host, Processes, Topology, mesh

DB_PORT = 27017  # a fresh namespace: the port is free by construction
APP_PORT = 8080
DEADLINE = 30.0  # s for any one wait below; each `mesh resolve` is a new process (~0.5 s)


def resolve(host: Host, name: str, rdtype: str = "SRV") -> list[str]:
    out = host.run(
        mesh("resolve", name, "--type", rdtype, "--server", "127.0.0.1:53", "--timeout", "1"),
        check=False,
    )
    return out.stdout.splitlines() if out.returncode == 0 else []


def wait_resolve(host: Host, name: str, count: int) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        lines = resolve(host, name)
        if len(lines) == count:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"{name} from {host.name}: wanted {count} records, got {lines}")


def test_srv_discovery_across_namespaces(tmp_path):
    with Topology(3) as topo, Processes(tmp_path) as procs:
        registry = topo.hosts[0]
        url = f"mongodb://{registry.address}:{DB_PORT}/mesh"
        procs.start(registry, mesh("db", "--host", registry.address, "--port", str(DB_PORT)), "db")
        sidecars = [
            procs.start_web_peer(host, i, mongo_url=url, app_port=APP_PORT)
            for i, host in enumerate(topo.hosts)
        ]
        a = topo.hosts[0]
        lines = wait_resolve(a, "_web._tcp.service.mesh", 3)
        assert lines == [
            f"1 100 {APP_PORT} peer{i}.web.service.mesh {h.address}"
            for i, h in enumerate(topo.hosts)
        ]
        # The RFC 2782 short form, from another host's own sidecar, and A records.
        assert len(wait_resolve(topo.hosts[2], "_web._tcp.mesh", 3)) == 3
        assert resolve(a, "peer1.web.service.mesh", "A") == [topo.hosts[1].address]
        # The app in A reaches every peer at the address DNS gave.
        for line in lines:
            address = line.split()[-1]
            fetch = a.run(
                [sys.executable, "-c",
                 "import sys,urllib.request as u;"
                 "print(u.urlopen(f'http://{sys.argv[1]}:{sys.argv[2]}/', timeout=2).status)",
                 address, str(APP_PORT)],
                check=False,
            )  # fmt: skip
            assert fetch.stdout.strip() == "200", fetch.stderr
        # A peer whose sidecar is stopped drains out of everyone's DNS.
        sidecars[2].send_signal(signal.SIGTERM)
        assert sidecars[2].wait(timeout=15) == 0
        lines = wait_resolve(a, "_web._tcp.service.mesh", 2)
        assert all("peer2" not in line for line in lines)
