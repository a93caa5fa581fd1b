"""Several hosts: three on a bridge, each with two peers (their sidecars answering DNS on
127.0.0.1:53 and 127.0.0.2:53) and its own LB, the registry on a fourth.

Every LB routes the same keys to the same peers without talking to the others. One host's
link goes down: its peers leave every other LB and every other sidecar's DNS within the
lease and 2 s, and the other LBs' clients see no failed request; the link comes back: the
peers return everywhere.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

from tests.system.netns import Host, Processes, Topology, drive, mesh, wait_for

DB_PORT = 27017
LB_PORT = 8000
ADMIN = "127.0.0.1:9901"
LEASE = 3.0  # s; the sidecars' lease, so that a lapse is quick to see
DNS = ("127.0.0.1:53", "127.0.0.2:53")  # the two peers' sidecars on each host
APP_PORTS = (8080, 8081)

ROUTES = """
import json, sys, urllib.request
out = {}
for i in range(int(sys.argv[1])):
    url = f"http://%s/ring?key=user-{i}" % sys.argv[2]
    out[i] = json.loads(urllib.request.urlopen(url, timeout=5).read())["endpoint"]
print(json.dumps(out))
"""


def endpoints(host: Host) -> set[str]:
    """The hosts of the endpoints this host's LB has from the registry."""
    code = (
        "import json, urllib.request; print(urllib.request.urlopen("
        f"'http://{ADMIN}/clusters', timeout=2).read().decode())"
    )
    out = host.run([sys.executable, "-c", code], check=False)
    if out.returncode != 0:
        return set()
    [cluster] = json.loads(out.stdout)["clusters"]
    return {f"{e['host']}:{e['port']}" for e in cluster["endpoints"]}


def stats(host: Host) -> dict[str, float]:
    """The LB's retry, failure and ejection counters that are not 0, from its /metrics."""
    code = (
        "import urllib.request; print(urllib.request.urlopen("
        f"'http://{ADMIN}/metrics', timeout=2).read().decode())"
    )
    out = {}
    for line in host.run([sys.executable, "-c", code]).stdout.splitlines():
        name = line.split(" ", 1)[0]
        if name.startswith(WATCHED) and not line.endswith(" 0.0"):
            out[name.removeprefix("mesh_lb_")] = float(line.rsplit(" ", 1)[1])
    return out


WATCHED = (
    "mesh_lb_retries_total", "mesh_lb_retries_denied_total", "mesh_lb_local_responses_total",
    "mesh_lb_endpoint_failures_total", "mesh_lb_ejections_total",
)  # fmt: skip


def srv(host: Host, server: str) -> set[str]:
    """The SRV records a sidecar answers, asked with dig (a poll costs milliseconds)."""
    address, port = server.rsplit(":", 1)
    argv = ["dig", "+short", "+time=1", "+tries=1", f"@{address}", "-p", port]
    out = host.run([*argv, "SRV", "_web._tcp.service.mesh"], check=False)
    return set(out.stdout.split("\n")) - {""} if out.returncode == 0 else set()


def test_three_hosts_route_alike_and_a_partitioned_host_leaves_everywhere(tmp_path):
    with Topology(4) as topo, Processes(tmp_path) as procs:
        registry, hosts = topo.hosts[0], topo.hosts[1:]
        url = f"mongodb://{registry.address}:{DB_PORT}/mesh"
        procs.start(registry, mesh("db", "--host", registry.address, "--port", str(DB_PORT)), "db")
        peers: dict[str, set[str]] = {}
        for h, host in enumerate(hosts):
            for p, (dns, port) in enumerate(zip(DNS, APP_PORTS, strict=True)):
                procs.start_web_peer(
                    host, h * 2 + p, mongo_url=url, app_port=port, dns=dns,
                    extra=("--lease-ttl", str(LEASE)),
                )  # fmt: skip
            peers[host.name] = {f"{host.address}:{port}" for port in APP_PORTS}
            procs.start(
                host,
                mesh(
                    "lb", "--listen", f"{host.address}:{LB_PORT}", "--admin", ADMIN,
                    "--service", "web", "--mongo-url", url, "--hash-on", "header:x-user",
                    "--connect-timeout", "0.5", "--per-try-timeout", "1",
                ),
                f"lb{h}",
            )  # fmt: skip
        everyone = set().union(*peers.values())
        for host in hosts:
            wait_for(
                f"six peers in {host.name}'s LB", lambda host=host: endpoints(host) == everyone
            )
            for server in DNS:
                wait_for(
                    f"six SRV records at {host.name} {server}",
                    lambda h=host, s=server: len(srv(h, s)) == 6,
                )

        # The same keys to the same peers from every LB, with no word between them.
        routes = [
            json.loads(host.run([sys.executable, "-c", ROUTES, "1000", ADMIN]).stdout)
            for host in hosts
        ]
        assert routes[0] == routes[1] == routes[2]
        assert set(routes[0].values()) == everyone  # and every peer has a share

        cut, others = hosts[0], hosts[1:]
        for host in others:
            assert drive(host, LB_PORT, 100) == {"200": 100}
        # Clients keep going through the cut: 600 requests over about 6 s on each other LB.
        # Every LB and every sidecar is watched at once, each by its own thread, so each
        # figure is when that one saw the peers go (a poll's time late at most).
        watches = {
            f"{h.name} LB": lambda h=h: endpoints(h) == everyone - peers[cut.name] for h in others
        }
        for h in others:
            for server in DNS:
                watches[f"{h.name} DNS {server}"] = lambda h=h, s=server: len(srv(h, s)) == 4
        with ThreadPoolExecutor(len(others) + len(watches)) as pool:
            during = [pool.submit(drive, host, LB_PORT, 600, 0.1) for host in others]
            cut.link(False)
            seen = {label: pool.submit(wait_for, label, check) for label, check in watches.items()}
            left = {label: f.result() for label, f in seen.items()}
            answers = [f.result() for f in during]
        print(f"partition → out of the other LBs and DNS, seconds after the cut: {left}")
        assert max(left.values()) <= LEASE + 2, left
        counters = [stats(h) for h in others]
        print(
            f"answers through the other LBs during the cut: {answers}; their counters: {counters}"
        )
        assert answers == [{"200": 600}] * len(others), (answers, counters)

        cut.link(True)
        for host in others:
            wait_for(
                "the healed host's peers back in the LB",
                lambda host=host: endpoints(host) == everyone,
            )
            for server in DNS:
                wait_for(
                    "the healed host's peers back in DNS",
                    lambda h=host, s=server: len(srv(h, s)) == 6,
                )
            assert drive(host, LB_PORT, 100) == {"200": 100}
