"""The namespace topology the system tests stand on: hosts reach each other, the root
namespace has no route to them, a link set down partitions a host, and nothing is left."""

import subprocess
import sys

from pyroute2 import netns

from tests.system.netns import Topology

PROBE = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1); print('ok')"


def test_hosts_reach_each_other_and_partition():
    with Topology(2) as topo:
        a, b = topo.hosts
        server = b.popen(
            [sys.executable, "-c", f"import socket,time; s=socket.create_server(({b.address!r}, 7000)); "
             "[s.accept() for _ in range(3)]; time.sleep(30)"],
        )  # fmt: skip
        try:
            reach = [sys.executable, "-c", PROBE, b.address, "7000"]
            for _ in range(50):  # the listener takes a moment to bind; bounded
                if a.run(reach, check=False).stdout.strip() == "ok":
                    break
            else:
                raise AssertionError("host a never reached host b")
            routes = subprocess.run(
                ["ip", "route", "get", b.address], capture_output=True, text=True
            )
            assert (
                "br0" not in routes.stdout
                and b.address
                not in subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout
            ), "the root namespace must not hold a topology address"
            b.link(False)
            assert a.run(reach, check=False).returncode != 0, "a partitioned host still answers"
            b.link(True)
        finally:
            server.kill()
            server.wait()
        names = [h.name for h in topo.hosts]
    left = set(names) & set(netns.listnetns())
    assert not left, f"namespaces left behind: {left}"
