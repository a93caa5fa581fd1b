"""The LB and three peers in their own network namespaces, endpoints from the registry.

Host 0 runs the registry and the LB; hosts 1-3 each run an HTTP app and its sidecar,
which registers it. Clients run inside host 0 and talk to the LB at host 0's address.
Setting a peer's link down must eject it while traffic carries on without errors; setting
it up again brings it back.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.system.netns import Host, Processes, Topology, drive, mesh, wait_for

DB_PORT = 27017
APP_PORT = 8080
LB_PORT = 8000


ADMIN = """
import json, sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:9901/clusters", timeout=2).read().decode())
"""


def clusters(host: Host) -> dict:
    return json.loads(host.run([sys.executable, "-c", ADMIN]).stdout)["clusters"][0]


def test_peer_link_down_is_ejected_then_restored_and_traffic_continues(tmp_path):
    with Topology(4) as topo, Processes(tmp_path) as procs:
        lb_host, peers = topo.hosts[0], topo.hosts[1:]
        url = f"mongodb://{lb_host.address}:{DB_PORT}/mesh"
        procs.start(lb_host, mesh("db", "--host", lb_host.address, "--port", str(DB_PORT)), "db")
        for i, host in enumerate(peers):
            procs.start_web_peer(host, i, mongo_url=url, app_port=APP_PORT)
        procs.start(
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
                "--base-ejection-time",
                "2",
            ),  # fmt: skip
            "lb",
        )

        def three_endpoints() -> bool:
            try:
                return len(clusters(lb_host)["endpoints"]) == 3
            except (subprocess.CalledProcessError, json.JSONDecodeError, KeyError):
                return False

        wait_for("three registered peers in the LB", three_endpoints)
        assert drive(lb_host, LB_PORT, 150) == {"200": 150}
        down = peers[1]
        down.link(False)
        assert drive(lb_host, LB_PORT, 300) == {"200": 300}
        c = clusters(lb_host)
        entry = [e for e in c["endpoints"] if e["host"] == down.address]
        # Ejected by the LB, or already gone from the registry (its lease ran out).
        assert entry == [] or entry[0]["ejected"], entry
        assert drive(lb_host, LB_PORT, 150) == {"200": 150}

        # The partition heals: the peer is routed to again (re-registered or back from
        # its ejection) and serves its share.
        down.link(True)

        def restored() -> bool:
            drive(lb_host, LB_PORT, 30)
            found = [e for e in clusters(lb_host)["endpoints"] if e["host"] == down.address]
            return bool(found) and found[0]["usable"] and found[0]["requests"] > 0

        wait_for("the healed peer routed to again", restored)
        assert drive(lb_host, LB_PORT, 150) == {"200": 150}
