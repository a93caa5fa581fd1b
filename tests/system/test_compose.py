"""compose.yaml run for real (tests/system/compose_run.py): its services as network
namespaces on one bridge, its commands as written, MongoDB replaced by the embedded server.

Clients run where a user's would: on the Docker host (the published LB port), or inside a
service's namespace (``docker compose exec``). The peers are stopped the compose way and
killed, under load through the LB.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.system.compose_run import REPO, Compose
from tests.system.netns import load_result, start_load, wait_for

pytestmark = pytest.mark.timeout(300)

PEERS = ("peer1", "peer2", "peer3")
SRV = "_peer._tcp.service.mesh"
LB = "http://127.0.0.1:8080/"  # the published port, on the Docker host

GET = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("compose")
    with Compose(REPO / "compose.yaml", logdir) as compose:
        compose.up()
        yield compose


def get(compose: Compose, service: str, url: str) -> str:
    return compose.exec(service, [sys.executable, "-c", GET, url]).stdout


def srv_targets(compose: Compose, service: str) -> set[str]:
    """The SRV targets a resolver in ``service`` gets (dig, through Docker's resolver)."""
    out = compose.exec(service, ["dig", "+short", "+time=1", "SRV", SRV], check=False).stdout
    return {line.split()[3].split(".")[0] for line in out.splitlines() if len(line.split()) == 4}


def lb_endpoints(compose: Compose) -> dict[str, dict]:
    """The LB's endpoints by address, asked on its admin port from its own namespace."""
    out = compose.exec("lb", ["mesh", "admin", "--admin", "127.0.0.1:9901", "/clusters"]).stdout
    return {e["host"]: e for e in json.loads(out)["clusters"][0]["endpoints"]}


def test_every_service_comes_up_healthy(stack):
    for name, svc in stack.services.items():
        if name == "mongo-init":
            assert svc.proc.returncode == 0  # a one-shot: completed successfully
            continue
        assert svc.running, name
        assert svc.health in (None, "healthy"), (name, svc.health)
    # The sidecars' healthcheck (`mesh admin /healthz`) passed: registered.
    assert all(stack.services[f"{p}-sidecar"].health == "healthy" for p in PEERS)


def test_peers_find_each_other_only_through_srv_at_their_sidecars(stack):
    everyone = {f"{p}.peer.service.mesh:8000" for p in PEERS}

    def exchanged() -> bool:
        return all(
            set(json.loads(get(stack, p, "http://127.0.0.1:8000/peers"))["peers"]) == everyone
            for p in PEERS
        )

    wait_for("every peer to know all three", exchanged, 40)
    for p in PEERS:
        # Each peer's own sidecar answered its SRV lookups (counted on the sidecar's admin).
        metrics = stack.exec(p, ["mesh", "admin", "/metrics"]).stdout
        srv = re.findall(r'mesh_dns_queries_total\{[^}]*type="SRV"[^}]*\} (\d+)', metrics)
        assert sum(float(n) for n in srv) > 0, p
        # The C library's resolver in the peer: mesh names through the sidecar, service
        # names through Docker's resolver.
        other = next(q for q in PEERS if q != p)
        hosts = stack.exec(p, ["getent", "hosts", f"{other}.peer.service.mesh"]).stdout
        assert hosts.split()[0] == stack.services[other].ns.address
        assert srv_targets(stack, p) == set(PEERS)
    assert stack.exec("peer1", ["getent", "hosts", "mongo"]).stdout.split()[0] == (
        stack.services["mongo"].ns.address
    )


def test_lb_on_its_published_port_serves_all_three_same_key_same_peer(stack):
    wait_for("the LB to have three endpoints", lambda: len(lb_endpoints(stack)) == 3, 30)
    script = """
import json, urllib.request
out = {}
for i in range(40):
    names = set()
    for _ in range(3):
        req = urllib.request.Request("http://127.0.0.1:8080/", headers={"x-user": f"user{i}"})
        names.add(urllib.request.urlopen(req, timeout=3).read().decode().strip())
    out[f"user{i}"] = sorted(names)
print(json.dumps(out))
"""
    seen = json.loads(stack.on_host([sys.executable, "-c", script]).stdout)
    assert all(len(names) == 1 for names in seen.values()), seen  # same key, same peer
    assert {names[0] for names in seen.values()} == set(PEERS)


def test_admin_ports_answer_only_inside_their_own_namespace(stack):
    assert len(lb_endpoints(stack)) == 3  # from the LB's own namespace
    lb = stack.services["lb"].ns.address
    refused = 7  # curl: failed to connect
    for url in ("http://lb:9901/clusters", f"http://{lb}:9901/clusters"):
        assert (
            stack.exec("peer1", ["curl", "-s", "-m", "3", url], check=False).returncode == refused
        )
    assert (
        stack.on_host(["curl", "-s", "-m", "3", "http://127.0.0.1:9901/"], check=False).returncode
        == refused
    )
    # A sidecar's admin: inside the peer's namespace only.
    assert json.loads(stack.exec("peer1", ["mesh", "admin", "/healthz"]).stdout)["state"]
    peer1 = stack.services["peer1"].ns.address
    assert (
        stack.exec(
            "lb", ["curl", "-s", "-m", "3", f"http://{peer1}:9902/healthz"], check=False
        ).returncode
        == refused
    )


def test_stopped_peer_leaves_dns_and_the_lb_before_its_app_stops(stack):
    """``docker compose stop peer3 peer3-sidecar``: the sidecar first (it depends on
    peer3), its drain takes peer3 out of DNS and the LB, then the app gets its SIGTERM."""
    wait_for("three peers in DNS", lambda: srv_targets(stack, "peer1") == set(PEERS), 30)
    left: dict[str, float] = {}
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            now = time.time()
            if "dns" not in left and "peer3" not in srv_targets(stack, "peer1"):
                left["dns"] = now
            if "lb" not in left and not any(
                e["usable"]
                for e in lb_endpoints(stack).values()
                if e["host"] == stack.services["peer3"].ns.address
            ):
                left["lb"] = now
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    load = start_load(stack.host, [LB], count=40000, seconds=14)
    time.sleep(1)
    watcher.start()
    try:
        stack.stop("peer3", "peer3-sidecar")
    finally:
        watching.set()
        watcher.join()
    result = load_result(load)
    print(f"load through the stop: {result['counts']}")
    app_term = stack.services["peer3"].term_at
    assert set(result["counts"]) == {"200"}, result["counts"]
    assert left["dns"] < app_term, (left, app_term)
    assert left["lb"] < app_term, (left, app_term)
    assert result["last"]["peer3"] < app_term  # the LB's last request to it came before
    assert min(result["last"]["peer1"], result["last"]["peer2"]) > app_term  # load went on


def test_killed_peer_is_ejected_with_no_failed_idempotent_request(stack):
    """``docker compose kill peer2 peer2-sidecar``: no drain, no deregistration. The LB
    ejects it at once and retries the GETs it was given; DNS drops it when its lease ends."""
    live = {p for p in PEERS if stack.services[p].running}
    assert "peer2" in live
    load = start_load(stack.host, [LB], count=40000, seconds=10)
    time.sleep(2)
    stack.kill("peer2", "peer2-sidecar")
    killed_at = time.time()
    result = load_result(load)
    print(f"load through the kill: {result['counts']}")
    assert set(result["counts"]) == {"200"}, result["counts"]
    assert result["last"]["peer2"] < killed_at + 0.5
    assert result["last"]["peer1"] > killed_at + 5  # the load went on
    peer2 = stack.services["peer2"].ns.address
    wait_for(
        "peer2 out of the LB", lambda: not lb_endpoints(stack).get(peer2, {}).get("usable"), 20
    )
    wait_for("peer2 out of DNS", lambda: "peer2" not in srv_targets(stack, "peer1"), 30)


def test_readme_snippet_adds_the_sidecar_to_a_service_as_printed(tmp_path):
    """README's compose snippet, pasted into a small compose file with an `app` of its own."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## With docker compose", 1)[1]
    snippet = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert "network_mode" in snippet
    base = (Path(__file__).parent / "compose_readme.yaml").read_text()
    file = tmp_path / "compose.yaml"
    file.write_text(base + snippet)
    logdir = tmp_path / "logs"
    logdir.mkdir()
    with Compose(file, logdir) as compose:
        compose.up()
        app = compose.services["app"].ns.address
        wait_for(
            "app in DNS",
            lambda: (
                compose.exec(
                    "app", ["getent", "hosts", "app.service.mesh"], check=False
                ).stdout.split()[:1]
                == [app]
            ),
            30,
        )
        # c-ares through the sidecar (mesh resolve asks 127.0.0.1:53), and dig through
        # Docker's resolver, which forwards to it.
        assert compose.exec("app", ["mesh", "resolve", "app.service.mesh"]).stdout.split() == [app]
        srv = compose.exec("app", ["dig", "+short", "SRV", "_app._tcp.service.mesh"]).stdout
        assert srv.split()[2] == "8000"
        assert srv.split()[3].startswith("app-sidecar.") or srv.split()[3].endswith(
            ".app.service.mesh."
        )
