"""Adding the mesh sidecar to Kubernetes workloads (``mesh k8s inject``), on plain dicts.

What a pod gets:

- the sidecar as a native sidecar (first in ``initContainers``, ``restartPolicy: Always``;
  Kubernetes ≥ 1.29): ``mesh sidecar`` with the pod's IP and name from the downward API as
  the advertised address and instance name, the registry URL from a Secret, a startup probe
  that asks its own ``/healthz`` (``mesh admin``: the admin port is on loopback, where a
  kubelet probe cannot reach), and a ``preStop`` that starts the drain. Kubernetes runs every
  container's ``preStop`` when the pod starts terminating and sends a sidecar its SIGTERM only
  after the app's containers have exited, so the drain runs while the app still serves;
- each app container without a ``preStop`` of its own a ``sleep`` one, long enough for the
  drain to take the pod out of DNS and the LBs before the app gets its SIGTERM;
- ``dnsPolicy: None``: the sidecar first in ``nameservers``, the cluster's DNS second (the
  sidecar forwards the names outside the mesh to it), the mesh's search domain and the
  cluster's;
- ``net.ipv4.ip_unprivileged_port_start=53``, so that the sidecar binds port 53 as non-root
  with no capabilities.

Injecting twice gives what injecting once gave. Errors are :class:`InjectError`, raised
before anything is returned: a workload is rewritten whole or not at all.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

SIDECAR = "mesh-sidecar"
KINDS = ("Deployment", "StatefulSet", "DaemonSet")
# Kinds that run pods, which inject refuses rather than passing them through untouched.
POD_KINDS = ("Pod", "ReplicaSet", "ReplicationController", "Job", "CronJob")
UNPRIVILEGED_PORTS = "net.ipv4.ip_unprivileged_port_start"
SIDECAR_UID = 10001  # the image's user `mesh`
SLEEP_MARGIN = 2  # s past the drain (or one DNS TTL) before the app gets its SIGTERM

# Flags the injector sets itself, which the sidecar flags given to it may not.
RESERVED = {
    "--service": "give it to inject itself",
    "--port": "give it to inject itself",
    "--address": "the pod's IP (downward API)",
    "--instance": "the pod's name (downward API)",
    "--mongo-url": "it comes from the Secret (--mongo-url-secret)",
    "--dns-listen": "the pod's resolv.conf points at 127.0.0.1:53",
    "--config": "there is no config file in the container",
}


class InjectError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    service: str
    port: int
    image: str
    secret: str  # Secret name
    secret_key: str
    cluster_dns: str
    sidecar_flags: tuple[str, ...] = ()
    domain: str = "mesh"
    drain: float = 5.0
    dns_ttl: int = 5
    admin: str = "127.0.0.1:9902"


def inject_documents(docs: list[Any], s: Settings) -> list[Any]:
    """Every document injected; raises InjectError on the first one that cannot be."""
    return [_document(doc, s, f"document {i + 1}") for i, doc in enumerate(docs)]


def _document(doc: Any, s: Settings, where: str) -> Any:
    if doc is None:
        return None
    if not isinstance(doc, dict) or "kind" not in doc:
        raise InjectError(f"{where}: not a Kubernetes object")
    kind = doc["kind"]
    name = (doc.get("metadata") or {}).get("name", "?")
    here = f"{kind}/{name}"
    if kind == "List" or kind.endswith("List"):
        out = copy.deepcopy(doc)
        out["items"] = [
            _document(item, s, f"{here} item {i + 1}")
            for i, item in enumerate(doc.get("items") or [])
        ]
        return out
    if kind in POD_KINDS:
        raise InjectError(f"{here}: cannot inject a {kind} ({', '.join(KINDS)} only)")
    if kind not in KINDS:
        return doc  # no pods of its own (a Service, a ConfigMap): passed through
    out = copy.deepcopy(doc)
    template = (out.get("spec") or {}).get("template")
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        raise InjectError(f"{here}: no spec.template.spec")
    namespace = (out.get("metadata") or {}).get("namespace") or "default"
    try:
        inject_pod(template["spec"], s, namespace)
    except InjectError as exc:
        raise InjectError(f"{here}: {exc}") from None
    return out


def _is_mesh_sidecar(c: dict) -> bool:
    image = str(c.get("image", ""))
    base = image.rsplit("/", 1)[-1].split(":")[0].split("@")[0]
    argv = [*(c.get("command") or []), *(c.get("args") or [])]
    return base == "mesh" and "sidecar" in argv


def inject_pod(pod: dict, s: Settings, namespace: str) -> None:
    """Adds the sidecar to a pod spec, in place."""
    if pod.get("hostNetwork"):
        raise InjectError("a hostNetwork pod shares its node's network: no sidecar can own its DNS")
    inits = [c for c in pod.get("initContainers") or [] if c.get("name") != SIDECAR]
    mains = pod.get("containers") or []
    if not mains:
        raise InjectError("the pod has no containers")
    for c in [*inits, *mains]:
        if _is_mesh_sidecar(c):
            raise InjectError(
                f"container {c.get('name')!r} already runs mesh sidecar (injected as {SIDECAR!r}?)"
            )
        if c.get("name") == SIDECAR:
            raise InjectError(f"an app container is named {SIDECAR!r}")
    pod["initContainers"] = [sidecar_container(s), *inits]
    wait = math.ceil(max(s.drain, s.dns_ttl)) + SLEEP_MARGIN
    for c in mains:
        lifecycle = c.setdefault("lifecycle", {})
        lifecycle.setdefault("preStop", {"sleep": {"seconds": wait}})
    pod["dnsPolicy"] = "None"
    options = [
        o for o in (pod.get("dnsConfig") or {}).get("options") or [] if o.get("name") != "ndots"
    ]
    pod["dnsConfig"] = {
        "nameservers": ["127.0.0.1", s.cluster_dns],
        "searches": [
            f"service.{s.domain}",
            f"{namespace}.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
        ],
        "options": [{"name": "ndots", "value": "2"}, *options],
    }
    sc = pod.setdefault("securityContext", {})
    sysctls = [x for x in sc.get("sysctls") or [] if x.get("name") != UNPRIVILEGED_PORTS]
    sc["sysctls"] = [*sysctls, {"name": UNPRIVILEGED_PORTS, "value": "53"}]


def _field(name: str, path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def sidecar_container(s: Settings) -> dict:
    admin = [] if s.admin == "127.0.0.1:9902" else ["--admin", s.admin]
    return {
        "name": SIDECAR,
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "args": ["sidecar", "--service", s.service, "--port", str(s.port), *s.sidecar_flags],
        "env": [
            _field("POD_IP", "status.podIP"),
            _field("POD_NAME", "metadata.name"),
            _field("POD_NAMESPACE", "metadata.namespace"),
            {"name": "MESH_ADDRESS", "value": "$(POD_IP)"},
            {"name": "MESH_INSTANCE", "value": "$(POD_NAME)"},
            {"name": "MESH_META", "value": "namespace=$(POD_NAMESPACE)"},
            {
                "name": "MESH_MONGO_URL",
                "valueFrom": {"secretKeyRef": {"name": s.secret, "key": s.secret_key}},
            },
        ],
        "startupProbe": {
            "exec": {"command": ["mesh", "admin", *admin, "/healthz"]},
            "periodSeconds": 1,
            "timeoutSeconds": 3,
            "failureThreshold": 120,
        },
        "lifecycle": {
            "preStop": {"exec": {"command": ["mesh", "admin", *admin, "--post", "/drain"]}}
        },
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
