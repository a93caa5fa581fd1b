"""Run the pods of deploy/kubernetes as network namespaces, the way a kubelet would run them,
as far as one machine without a cluster allows (a pod is a network namespace).

- Each pod of the Deployments gets a namespace on one bridge (the pod network), its IP, and
  its containers' commands as written, with the manifest's env: downward-API values (the
  pod's IP, name, namespace), Secret values, and the service links Kubernetes adds
  (``<SERVICE>_SERVICE_HOST``...). They run with no capabilities (non-root, ``drop: ALL``);
  the pod's ``sysctls`` are set in its namespace.
- Its ``dnsConfig`` becomes its ``resolv.conf`` (``/etc/netns/<namespace>/``); with
  ``ClusterFirst`` it is the cluster's. The cluster DNS is a namespace of its own holding
  the Service IP the manifests name (10.96.0.10), with a route to it from every pod; it
  answers the StatefulSet members' and the Services' names (``compose_net.py dns``).
- Native sidecars (``initContainers`` with ``restartPolicy: Always``) start first, each
  waited for until its ``startupProbe`` passes; then the app containers.
- ``delete`` is the kubelet's: every container's ``preStop`` at once (``exec`` in the
  pod, ``sleep``), SIGTERM to each app container when its hook is done, the sidecars SIGTERM
  once every app container has exited, SIGKILL at the end of the grace period.
- MongoDB is the one part that cannot run as itself: the StatefulSet is replaced by one
  embedded server as ``mongo-0``, the Secret's URL by that member's (no replica set), and
  the ``rs.initiate`` Job is not run. The runner prints each override.

Not done: Services' virtual IPs (clients use pod IPs), readiness gating, restarts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.system.compose_run import (
    MESH_IMAGE,
    NET_HELPER,
    NO_CAPS,
    REPO,
    print_logs,
    spawn,
    tear_down,
)
from tests.system.netns import Host, Topology, wait_for

DEPLOY = REPO / "deploy" / "kubernetes"
GRACE = 30  # s, terminationGracePeriodSeconds's default


@dataclass
class Container:
    name: str
    spec: dict
    argv: list[str]
    env: dict[str, str]
    sidecar: bool
    proc: subprocess.Popen | None = None
    term_at: float | None = None  # wall clock of its SIGTERM
    exited_at: float | None = None


@dataclass
class Pod:
    name: str
    workload: dict
    ns: Host
    containers: list[Container] = field(default_factory=list)

    @property
    def spec(self) -> dict:
        return self.workload["spec"]["template"]["spec"]

    def container(self, name: str) -> Container:
        return next(c for c in self.containers if c.name == name)


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)``: replaced when VAR is defined, kept as written otherwise."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


class Cluster:
    """``with Cluster(logdir) as k: k.up()``: the registry, the LB pods, the app's pods."""

    def __init__(self, logdir: Path, *, say: Callable[[str], None] = print) -> None:
        self.logdir = Path(logdir)
        self._say = say
        self.docs = []
        for f in sorted(DEPLOY.glob("*.yaml")):
            if not f.name.startswith(".") and f.name != "kustomization.yaml":
                self.docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
        self.deployments = [d for d in self.docs if d["kind"] == "Deployment"]
        self.pods: dict[str, Pod] = {}
        self._topology: Topology | None = None
        self._etc: list[Path] = []
        self._helpers: list[subprocess.Popen] = []
        self._said: set[str] = set()

    def say(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            self._say(f"k8s: {line}")

    def of(self, kind: str, name: str) -> dict:
        return next(d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name)

    # Building

    def __enter__(self) -> Cluster:
        try:
            self._network()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            print_logs(self.logdir)
        self.close()

    def _network(self) -> None:
        replicas = [(d, i) for d in self.deployments for i in range(d["spec"].get("replicas", 1))]
        # The cluster DNS, the registry, each pod, and a client pod.
        self._topology = Topology(3 + len(replicas), prefix="k8s").__enter__()
        hosts = self._topology.hosts
        self.dns_host, self.mongo_host, self.client = hosts[0], hosts[1], hosts[-1]
        for (workload, i), ns in zip(replicas, hosts[2:-1], strict=True):
            name = f"{workload['metadata']['name']}-5d9c7f-{'abcdefgh'[i]}x{i}q"
            self.pods[name] = Pod(name, workload, ns)
        self.cluster_dns = self._cluster_dns_ip()
        names = {}
        sts = self.of("StatefulSet", "mongo")
        domain = f"{sts['spec']['serviceName']}.{sts['metadata']['namespace']}.svc.cluster.local"
        names[f"mongo-0.{domain}"] = self.mongo_host.address
        names[domain] = self.mongo_host.address
        (self.logdir / "cluster-names.json").write_text(json.dumps(names))
        self.registry_url = f"mongodb://mongo-0.{domain}:27017/mesh"
        self.say(
            f"override: StatefulSet mongo (mongo:7, {sts['spec']['replicas']} members) is replaced"
            f" by one embedded MongoDB wire-protocol server (mesh db) as mongo-0.{domain}"
        )
        self.say("override: Job mongo-init is not run (the embedded server has no replica set)")
        self.dns_host.run(["ip", "addr", "add", f"{self.cluster_dns}/32", "dev", "eth0"])
        for host in [self.mongo_host, self.client, *(p.ns for p in self.pods.values())]:
            host.run(["ip", "route", "add", f"{self.cluster_dns}/32", "dev", "eth0"])
        self._helpers.append(
            spawn(
                self.dns_host,
                [sys.executable, str(NET_HELPER), "dns", "--listen", self.cluster_dns,
                 "--names", str(self.logdir / "cluster-names.json")],
                self.logdir / "cluster-dns.log",
                caps=True,
            )
        )  # fmt: skip
        self._resolv(self.client, {"dnsPolicy": "ClusterFirst"}, "mesh", "client")
        self._resolv(self.mongo_host, {"dnsPolicy": "ClusterFirst"}, "mesh", "mongo-0")
        wait_for(
            "the cluster DNS",
            lambda: (
                self.client.run(["getent", "hosts", f"mongo-0.{domain}"], check=False).returncode
                == 0
            ),
            10,
        )

    def _cluster_dns_ip(self) -> str:
        for d in self.deployments:
            servers = (d["spec"]["template"]["spec"].get("dnsConfig") or {}).get("nameservers", [])
            if len(servers) > 1:
                return str(ipaddress.ip_address(servers[1]))
        raise AssertionError("no pod names the cluster DNS")

    def _resolv(self, ns: Host, pod: dict, namespace: str, hostname: str) -> None:
        etc = Path("/etc/netns") / ns.name
        etc.mkdir(parents=True, exist_ok=True)
        self._etc.append(etc)
        if pod.get("dnsPolicy") == "None":
            cfg = pod["dnsConfig"]
            lines = [f"nameserver {s}" for s in cfg["nameservers"]]
            lines.append("search " + " ".join(cfg.get("searches", [])))
            opts = [
                o["name"] + (f":{o['value']}" if "value" in o else "")
                for o in cfg.get("options", [])
            ]
            lines.append("options " + " ".join(opts))
        else:  # ClusterFirst
            lines = [
                f"nameserver {self.cluster_dns}",
                f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local",
                "options ndots:5",
            ]
        (etc / "resolv.conf").write_text("\n".join(lines) + "\n")
        (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n{ns.address}\t{hostname}\n")

    def _env(self, pod: Pod, c: dict) -> dict[str, str]:
        namespace = pod.workload["metadata"].get("namespace", "default")
        env = dict(MESH_IMAGE.env)
        # Service links: every Service with a cluster IP in the pod's namespace.
        if pod.spec.get("enableServiceLinks", True):
            for svc in (d for d in self.docs if d["kind"] == "Service"):
                if (
                    svc["metadata"].get("namespace") != namespace
                    or svc["spec"].get("clusterIP") == "None"
                ):
                    continue
                base = svc["metadata"]["name"].upper().replace("-", "_")
                port = svc["spec"]["ports"][0]["port"]
                ip = "10.96.100.1"  # a virtual IP; nothing here routes it
                env[f"{base}_SERVICE_HOST"] = ip
                env[f"{base}_SERVICE_PORT"] = str(port)
                env[f"{base}_PORT"] = f"tcp://{ip}:{port}"
        fields = {
            "status.podIP": pod.ns.address,
            "metadata.name": pod.name,
            "metadata.namespace": namespace,
        }
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = _expand(str(e["value"]), env)
            elif "fieldRef" in e["valueFrom"]:
                env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                secret = self.of("Secret", ref["name"])["stringData"][ref["key"]]
                if secret.startswith("mongodb://"):
                    self.say(f"override: Secret {ref['name']} {ref['key']} -> {self.registry_url}")
                    secret = self.registry_url
                env[e["name"]] = secret
        return env

    def _argv(self, c: dict, env: dict[str, str]) -> list[str]:
        if not c["image"].startswith("mesh:"):
            raise AssertionError(f"image {c['image']} cannot run here")
        argv = [*(c.get("command") or MESH_IMAGE.entrypoint), *(c.get("args") or [])]
        out = []
        for a in argv:
            a = _expand(a, env)
            for inside, here in MESH_IMAGE.paths.items():
                if a.startswith(inside):
                    a = here + a.removeprefix(inside)
            out.append(a)
        return out

    # Running

    def up(self) -> None:
        self.say(f"start the registry: mesh db in {self.mongo_host.address}")
        self._helpers.append(
            spawn(
                self.mongo_host,
                [sys.executable, "-m", "mesh", "db", "--host", "0.0.0.0", "--port", "27017"],
                self.logdir / "mongo-0.log",
            )
        )
        for pod in self.pods.values():
            self.start(pod)
        for pod in self.pods.values():
            self._ready(pod)

    def start(self, pod: Pod) -> None:
        spec = pod.spec
        self._resolv(pod.ns, spec, pod.workload["metadata"].get("namespace", "default"), pod.name)
        for s in (spec.get("securityContext") or {}).get("sysctls", []):
            pod.ns.run(["sysctl", "-qw", f"{s['name']}={s['value']}"])
        for c in spec.get("initContainers", []):
            if c.get("restartPolicy") != "Always":
                raise AssertionError(f"{pod.name}: init container {c['name']} is not run here")
            self._run(pod, c, sidecar=True)
            probe = c.get("startupProbe")
            if probe:
                self._probe(pod, c, probe, "startup")
        for c in spec["containers"]:
            self._run(pod, c, sidecar=False)

    def _run(self, pod: Pod, c: dict, *, sidecar: bool) -> Container:
        env = self._env(pod, c)
        argv = self._argv(c, env)
        self.say(f"{pod.name}: start {c['name']}: {shlex.join(argv)}")
        proc = spawn(pod.ns, argv, self.logdir / f"{pod.name}.{c['name']}.log", env=env)
        container = Container(c["name"], c, argv, env, sidecar, proc)
        pod.containers.append(container)
        return container

    def exec(
        self,
        pod: Pod,
        container: str,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = True,
    ):
        """``kubectl exec``: ``argv`` in the pod's namespace with the container's env."""
        env = pod.container(container).env
        return pod.ns.run([*NO_CAPS, *argv], timeout=timeout, check=check, env=env)

    def _probe(self, pod: Pod, c: dict, probe: dict, what: str) -> None:
        period = probe.get("periodSeconds", 10)
        tries = probe.get("failureThreshold", 3)
        for _ in range(tries):
            ok = self.exec(
                pod,
                c["name"],
                probe["exec"]["command"],
                timeout=probe.get("timeoutSeconds", 1) + 5,
                check=False,
            )
            if ok.returncode == 0:
                self.say(f"{pod.name}: {c['name']}: {what} probe passed")
                return
            time.sleep(period)
        raise AssertionError(f"{pod.name}: {c['name']}: {what} probe failed {tries} times")

    def _ready(self, pod: Pod, timeout: float = 60) -> None:
        for c in pod.containers:
            probe = c.spec.get("readinessProbe")
            if probe and "exec" in probe:
                wait_for(
                    f"{pod.name} {c.name} ready",
                    lambda c=c, probe=probe: (
                        self.exec(pod, c.name, probe["exec"]["command"], check=False).returncode
                        == 0
                    ),
                    timeout,
                )
            elif probe and "httpGet" in probe:
                port = probe["httpGet"]["port"]
                if isinstance(port, str):
                    port = next(p["containerPort"] for p in c.spec["ports"] if p["name"] == port)
                url = f"http://{pod.ns.address}:{port}{probe['httpGet']['path']}"
                wait_for(
                    f"{pod.name} {c.name} ready",
                    lambda url=url: (
                        pod.ns.run(["curl", "-sf", "-m", "2", url], check=False).returncode == 0
                    ),
                    timeout,
                )

    def delete(self, pod: Pod) -> None:
        """``kubectl delete pod``: every preStop at once, SIGTERM after each container's hook
        (sidecars: after every app container has exited), SIGKILL at the grace period."""
        grace = pod.spec.get("terminationGracePeriodSeconds", GRACE)
        deadline = time.monotonic() + grace
        self.say(f"delete {pod.name}: preStop hooks, then SIGTERM; grace {grace} s")
        apps = [c for c in pod.containers if not c.sidecar]
        sidecars = [c for c in pod.containers if c.sidecar]
        apps_done = threading.Event()

        def kill(c: Container) -> None:
            hook = (c.spec.get("lifecycle") or {}).get("preStop") or {}
            if "exec" in hook:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.exec(
                        pod,
                        c.name,
                        hook["exec"]["command"],
                        timeout=max(1, deadline - time.monotonic()),
                        check=False,
                    )
            elif "sleep" in hook:
                time.sleep(min(hook["sleep"]["seconds"], max(0, deadline - time.monotonic())))
            if c.sidecar:
                apps_done.wait(max(0, deadline - time.monotonic()))
            c.term_at = time.time()
            self.say(f"{pod.name}: SIGTERM {c.name}")
            c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(max(2, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{pod.name}: SIGKILL {c.name}")
                c.proc.kill()
                c.proc.wait()
            c.exited_at = time.time()
            self.say(f"{pod.name}: {c.name} exited with {c.proc.returncode}")

        app_threads = [threading.Thread(target=kill, args=(c,)) for c in apps]
        side_threads = [threading.Thread(target=kill, args=(c,)) for c in sidecars]
        for t in app_threads + side_threads:
            t.start()
        for t in app_threads:
            t.join()
        apps_done.set()
        for t in side_threads:
            t.join()

    def close(self) -> None:
        procs = [c.proc for p in self.pods.values() for c in p.containers if c.proc] + self._helpers
        tear_down(procs, self._topology, self._etc)
        self._topology = None
