"""deploy/kubernetes's pods as network namespaces (tests/system/k8s_run.py): the example
app's three pods, each with its native sidecar, and the LB's two, on one pod network, with
their manifests' commands, env and DNS settings. Clients run inside pods."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest

from tests.system.k8s_run import Cluster, Pod
from tests.system.netns import load_result, start_load, wait_for

pytestmark = pytest.mark.timeout(300)

SRV = "_peer._tcp.service.mesh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("k8s")) as k:
        k.up()
        yield k


def peers(k: Cluster) -> list[Pod]:
    return [p for p in k.pods.values() if p.workload["metadata"]["name"] == "peer"]


def lbs(k: Cluster) -> list[Pod]:
    return [p for p in k.pods.values() if p.workload["metadata"]["name"] == "mesh-lb"]


def srv_targets(k: Cluster, pod: Pod) -> set[str]:
    """The SRV targets pod's resolver gets (c-ares, through its sidecar: mesh resolve)."""
    out = k.exec(pod, "peer", ["mesh", "resolve", SRV], check=False).stdout
    return {line.split()[3].split(".")[0] for line in out.splitlines() if len(line.split()) >= 4}


def usable(k: Cluster, lb: Pod) -> set[str]:
    out = k.exec(lb, "lb", ["mesh", "admin", "--admin", "127.0.0.1:9901", "/clusters"]).stdout
    return {e["host"] for e in json.loads(out)["clusters"][0]["endpoints"] if e["usable"]}


def test_each_pod_finds_the_others_through_its_own_sidecar(cluster):
    a, *others = peers(cluster)
    names = {p.name for p in peers(cluster)}
    wait_for("all three in SRV", lambda: srv_targets(cluster, a) == names, 40)
    for p in others:
        # The C library's resolver: the full name, and the short one through the search
        # domain service.mesh.
        full = cluster.exec(a, "peer", ["getent", "hosts", f"{p.name}.peer.service.mesh"]).stdout
        assert full.split()[0] == p.ns.address
        short = cluster.exec(a, "peer", ["getent", "ahosts", f"{p.name}.peer"]).stdout
        assert short.split()[0] == p.ns.address
    # A cluster name, through the sidecar, which forwards it to the cluster's DNS (the
    # second nameserver) after the search domain of the pod's namespace.
    mongo = cluster.exec(a, "peer", ["getent", "hosts", "mongo-0.mongo"]).stdout
    assert mongo.split()[0] == cluster.mongo_host.address
    # The app itself (aiodns, c-ares) found them and called them: /peers.
    everyone = {f"{p.name}.peer.service.mesh:8000" for p in peers(cluster)}
    get = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/peers').read().decode())"

    def exchanged() -> bool:
        return all(
            set(json.loads(cluster.exec(p, "peer", [sys.executable, "-c", get]).stdout)["peers"])
            == everyone
            for p in peers(cluster)
        )

    wait_for("every peer to know all three", exchanged, 40)


def test_both_lb_replicas_route_each_key_to_the_same_of_the_three(cluster):
    addresses = {p.ns.address for p in peers(cluster)}
    for lb in lbs(cluster):
        wait_for("the LB to see three", lambda lb=lb: usable(cluster, lb) == addresses, 40)
    urls = [f"http://{lb.ns.address}:8080/" for lb in lbs(cluster)]
    script = """
import json, sys, urllib.request
out = {}
for i in range(40):
    names = set()
    for url in sys.argv[1:]:
        req = urllib.request.Request(url, headers={"x-user": f"user{i}"})
        names.add(urllib.request.urlopen(req, timeout=3).read().decode().strip())
    out[f"user{i}"] = sorted(names)
print(json.dumps(out))
"""
    seen = json.loads(cluster.client.run([sys.executable, "-c", script, *urls]).stdout)
    assert all(len(names) == 1 for names in seen.values()), seen
    assert {n[0] for n in seen.values()} == {p.name for p in peers(cluster)}


def test_deleting_a_pod_drains_it_from_dns_and_the_lbs_before_its_app_stops(cluster):
    a, _, gone = peers(cluster)
    left: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            now = time.time()
            if "dns" not in left and gone.name not in srv_targets(cluster, a):
                left["dns"] = now
            for lb in lbs(cluster):
                if lb.name not in left and gone.ns.address not in usable(cluster, lb):
                    left[lb.name] = now
            time.sleep(0.1)

    urls = [f"http://{lb.ns.address}:8080/" for lb in lbs(cluster)]
    load = start_load(cluster.client, urls, count=40000, seconds=16)
    time.sleep(1)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        cluster.delete(gone)
    finally:
        stop.set()
        watcher.join()
    result = load_result(load)
    print(f"load through the deletion: {result['counts']}")
    app = gone.container("peer")
    assert set(result["counts"]) == {"200"}, result["counts"]
    assert set(left) == {"dns", *(lb.name for lb in lbs(cluster))}, left
    assert max(left.values()) < app.term_at, (left, app.term_at)
    assert result["last"][gone.name] < app.term_at
    assert max(result["last"].values()) > app.exited_at  # the load went on past the stop
    sidecar = gone.container("mesh-sidecar")
    assert sidecar.term_at >= app.exited_at  # the sidecar last, as Kubernetes orders it
    assert sidecar.proc.returncode == 0 and app.proc.returncode == 0
