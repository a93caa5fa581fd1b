"""The admin port (aiohttp, off the data path): /healthz, /clusters, /metrics, /ring.

With ``--workers N`` the admin port is served by the first worker, which asks the others
for their figures on each request (see :mod:`lb.workers`): counters and histograms are
summed, the data each worker holds on its own (panic, ejections, registry link) is shown
per worker with a ``worker`` label.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from lb.cluster import LATENCY_BUCKETS, Cluster
from lb.ring import hash_key
from lb.server import Server

Gauges = Callable[[], dict[str, float]]
# Prometheus families as plain data, so that workers can send theirs to the admin worker:
# (name, type, help, [(sample name, labels, value), …]).
Sample = tuple[str, dict[str, str], float]
Family = tuple[str, str, str, list[Sample]]
# What the other workers report: each one's families and /clusters, or None when it did
# not answer in time.
Peers = Callable[[], Awaitable[list[dict | None]]]
# Gauges that describe one worker's own state: shown per worker, never summed.
PER_WORKER = frozenset(
    {
        "mesh_lb_panic",
        "mesh_lb_endpoint_ejected",
        "mesh_lb_endpoints",
        "mesh_registry_connected",
        "mesh_registry_snapshots",
    }
)
# Per-endpoint figures of /clusters that add up across workers.
SUMMED_ENDPOINT_FIELDS = (
    "active_requests",
    "requests",
    "responses_5xx",
    "failures",
    "spills",
    "idle_connections",
)


def _wall(monotonic_at: float) -> float:
    return round(time.time() + (monotonic_at - time.monotonic()), 3)


def cluster_json(c: Cluster) -> dict:
    view = c.view
    det = c.detector
    hc = c.health
    endpoints = []
    for i, st in enumerate(view.states):
        ep = st.endpoint
        m = det.monitors.get(ep.key)
        ejection = None
        if m is not None and m.ejected_until is not None:
            ejection = {
                "reason": m.ejected_reason,
                "until": _wall(m.ejected_until),
                "ejections": m.ejections,
            }
        health = "unchecked" if hc is None else "healthy" if hc.is_healthy(ep.key) else "unhealthy"
        endpoints.append(
            {
                "address": ep.key,
                "host": ep.host,
                "port": ep.port,
                "name": ep.name,
                "weight": ep.weight,
                "health": health,
                "ejected": ejection is not None,
                "ejection": ejection,
                "usable": c.usable[i] if i < len(c.usable) else False,
                "active_requests": st.active,
                "requests": st.requests,
                "responses_5xx": st.responses_5xx,
                "failures": st.failures,
                "spills": st.spills,
                # The detector's EWMA: successful responses since the last restore.
                "latency_ewma_seconds": None
                if m is None or m.latency_ewma is None
                else round(m.latency_ewma, 6),
                "idle_connections": len(st.idle),
            }
        )
    table = None
    if view.table is not None:
        stats = view.table.stats()
        table = {
            "kind": view.table.kind,
            "size": view.table.size,
            "entries_min": stats.min,
            "entries_max": stats.max,
        }
    cfg = c.config
    return {
        "name": cfg.name,
        "policy": cfg.policy,
        "hash_on": [str(s) for s in cfg.hash_on],
        "hash_balance_factor": cfg.balance_factor or None,
        "panic": c.panic,
        "panic_mode": cfg.panic_mode,
        "panic_threshold": cfg.panic_threshold,
        "endpoints_total": len(view.states),
        "endpoints_usable": sum(c.usable),
        "table": table,
        "table_builds": c.builds,
        "table_building": c.building,
        "endpoints": endpoints,
    }


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(server: Server, gauges: Gauges | None = None) -> str:
    return render_metrics(metric_families(server, gauges))


def render_metrics(families: list[Family]) -> str:
    """The Prometheus text exposition format."""
    out: list[str] = []
    for name, kind, help_, samples in families:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for sname, labels, value in samples:
            lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            out.append(f"{sname}{{{lab}}} {value}" if lab else f"{sname} {value}")
    return "\n".join(out) + "\n"


def merge_families(per_worker: list[list[Family]]) -> list[Family]:
    """One worker's families from all of theirs (``per_worker[w]`` is worker w's): values
    of the same sample and labels are summed, except the PER_WORKER gauges, which get a
    ``worker`` label."""
    merged: dict[str, tuple[str, str, dict[tuple, float]]] = {}
    for w, families in enumerate(per_worker):
        for name, kind, help_, samples in families:
            acc = merged.setdefault(name, (kind, help_, {}))[2]
            for sname, labels, value in samples:
                if name in PER_WORKER:
                    labels = {**labels, "worker": str(w)}
                key = (sname, tuple(labels.items()))
                acc[key] = acc.get(key, 0) + value
    return [
        (name, kind, help_, [(sname, dict(labels), v) for (sname, labels), v in acc.items()])
        for name, (kind, help_, acc) in merged.items()
    ]


def merge_clusters(per_worker: list[list[dict]]) -> list[dict]:
    """/clusters from every worker's: the first worker's view (health, ejections, tables)
    with the per-endpoint counters summed over all of them."""
    first = per_worker[0]
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for clusters in per_worker[1:]:
        for c in clusters:
            for ep in c["endpoints"]:
                t = totals.setdefault((c["name"], ep["address"]), {})
                for field in SUMMED_ENDPOINT_FIELDS:
                    t[field] = t.get(field, 0) + ep[field]
    for c in first:
        for ep in c["endpoints"]:
            for field, value in totals.get((c["name"], ep["address"]), {}).items():
                ep[field] += value
    return first


def metric_families(server: Server, gauges: Gauges | None = None) -> list[Family]:
    out: list[Family] = []

    def family(name: str, kind: str, help_: str) -> None:
        out.append((name, kind, help_, []))

    def sample(name: str, labels: dict[str, str], value: float) -> None:
        out[-1][3].append((name, labels, value))

    clusters = server.clusters
    family("mesh_lb_requests_total", "counter", "Responses sent to clients, by code class.")
    for c in clusters:
        classes = dict(c.stats.responses)
        for status, n in c.stats.local.items():
            classes[f"{status // 100}xx"] = classes.get(f"{status // 100}xx", 0) + n
        for cls, n in classes.items():
            sample("mesh_lb_requests_total", {"cluster": c.config.name, "code_class": cls}, n)
    family("mesh_lb_local_responses_total", "counter", "Responses the LB made itself, by status.")
    for status, n in sorted(server.stats.local.items()):
        sample("mesh_lb_local_responses_total", {"code": str(status)}, n)
    family(
        "mesh_lb_upstream_latency_seconds",
        "histogram",
        "Time from sending a request upstream to its first response byte.",
    )
    for c in clusters:
        s = c.stats
        cum = 0
        for bound, n in zip(LATENCY_BUCKETS, s.latency_counts, strict=False):
            cum += n
            sample(
                "mesh_lb_upstream_latency_seconds_bucket",
                {"cluster": c.config.name, "le": repr(bound)},
                cum,
            )
        sample(
            "mesh_lb_upstream_latency_seconds_bucket",
            {"cluster": c.config.name, "le": "+Inf"},
            s.latency_n,
        )
        sample("mesh_lb_upstream_latency_seconds_sum", {"cluster": c.config.name}, s.latency_sum)
        sample("mesh_lb_upstream_latency_seconds_count", {"cluster": c.config.name}, s.latency_n)
    family("mesh_lb_ejections_total", "counter", "Outlier ejections, by reason.")
    for c in clusters:
        for reason in ("consecutive_5xx", "consecutive_gateway_failure", "latency"):
            sample(
                "mesh_lb_ejections_total",
                {"cluster": c.config.name, "reason": reason},
                c.stats.ejections.get(reason, 0),
            )
    family("mesh_lb_retries_total", "counter", "Retries on another endpoint.")
    for c in clusters:
        sample("mesh_lb_retries_total", {"cluster": c.config.name}, c.stats.retries)
    family("mesh_lb_retries_denied_total", "counter", "Retries the retry budget refused.")
    for c in clusters:
        sample("mesh_lb_retries_denied_total", {"cluster": c.config.name}, c.stats.retries_denied)
    family(
        "mesh_lb_random_picks_total",
        "counter",
        "Hashed requests with no hash key: random endpoint.",
    )
    for c in clusters:
        sample("mesh_lb_random_picks_total", {"cluster": c.config.name}, c.stats.random_picks)
    family("mesh_lb_panic", "gauge", "1 while too few endpoints are usable (panic mode).")
    for c in clusters:
        sample("mesh_lb_panic", {"cluster": c.config.name}, int(c.panic))
    family("mesh_lb_panic_picks_total", "counter", "Requests routed while in panic (fail-open).")
    for c in clusters:
        sample("mesh_lb_panic_picks_total", {"cluster": c.config.name}, c.stats.panic_picks)
    family("mesh_lb_endpoints", "gauge", "Endpoints, by state.")
    for c in clusters:
        sample("mesh_lb_endpoints", {"cluster": c.config.name, "state": "total"}, len(c.usable))
        sample("mesh_lb_endpoints", {"cluster": c.config.name, "state": "usable"}, sum(c.usable))
    per_endpoint = (
        (
            "mesh_lb_spills_total",
            "counter",
            "Requests sent off their home endpoint by bounded loads.",
            "spills",
        ),
        (
            "mesh_lb_endpoint_active_requests",
            "gauge",
            "Requests in flight to an endpoint.",
            "active",
        ),
        ("mesh_lb_endpoint_requests_total", "counter", "Tries sent to an endpoint.", "requests"),
    )
    for name, kind, help_, attr in per_endpoint:
        family(name, kind, help_)
        for c in clusters:
            for st in c.view.states:
                labels = {"cluster": c.config.name, "endpoint": st.endpoint.key}
                sample(name, labels, getattr(st, attr))
    family("mesh_lb_endpoint_ejected", "gauge", "1 while an endpoint is ejected.")
    for c in clusters:
        for st in c.view.states:
            labels = {"cluster": c.config.name, "endpoint": st.endpoint.key}
            sample("mesh_lb_endpoint_ejected", labels, int(c.detector.is_ejected(st.endpoint.key)))
    family("mesh_lb_active_connections", "gauge", "Open client connections.")
    sample("mesh_lb_active_connections", {}, len(server.connections))
    family("mesh_lb_client_connections", "gauge", "Open client connections (as above).")
    sample("mesh_lb_client_connections", {}, len(server.connections))
    family(
        "mesh_lb_connections_refused_total",
        "counter",
        "Client connections closed at once: --max-connections were open.",
    )
    sample("mesh_lb_connections_refused_total", {}, server.stats.connections_refused)
    family(
        "mesh_lb_idle_connections_reaped_total",
        "counter",
        "Idle keep-alive client connections closed to admit a new one at --max-connections.",
    )
    sample("mesh_lb_idle_connections_reaped_total", {}, server.stats.idle_reaped)
    family(
        "mesh_lb_header_timeouts_total",
        "counter",
        "Client connections answered 408: the request head took longer than --header-timeout.",
    )
    sample("mesh_lb_header_timeouts_total", {}, server.stats.header_timeouts)
    family("mesh_lb_connections_total", "counter", "Client connections accepted.")
    sample("mesh_lb_connections_total", {}, server.stats.connections_total)
    family("mesh_lb_upgrades_total", "counter", "Connections upgraded (WebSocket) and tunnelled.")
    sample("mesh_lb_upgrades_total", {}, server.stats.upgrades)
    for name, value in (gauges() if gauges else {}).items():
        family(name, "gauge", name.replace("_", " "))
        sample(name, {}, value)
    return out


def ring_json(c: Cluster, key: str) -> dict:
    view = c.view
    h = hash_key(key.encode())
    out: dict = {
        "cluster": c.config.name,
        "key": key,
        "hash_input": f"the key, as the value of {c.config.hash_on[0]}"
        if c.config.hash_on
        else "the key",
        "hash_on": [str(s) for s in c.config.hash_on],
        "key_hash": h,
        "policy": c.config.policy,
    }
    if view.table is None or not view.states:
        out.update(home=None, endpoint=None, next=[])
        return out
    order = view.table.candidates(h, len(view.states))
    usable = c.usable if not c.panic else [True] * len(view.states)
    home = view.endpoints[order[0]].key
    first_usable = next((i for i in order if usable[i]), None)
    out["slot"] = h % view.table.size if c.config.policy == "maglev" else None
    out["home"] = home
    out["endpoint"] = None if first_usable is None else view.endpoints[first_usable].key
    out["reason"] = (
        "home"
        if first_usable == order[0]
        else "home unusable (ejected or failing checks): next in hash order"
    )
    out["next"] = [
        {"address": view.endpoints[i].key, "usable": usable[i]}
        for i in order[1 : 1 + 1 + c.config.retries]
    ]
    return out


def make_app(
    server: Server,
    *,
    gauges: Gauges | None = None,
    ready: Callable[[], bool] | None = None,
    peers: Peers | None = None,
) -> web.Application:
    """``peers``: with several workers, asks the others for their report (see lb.workers)."""
    app = web.Application()

    async def reports() -> list[dict | None]:
        return await peers() if peers is not None else []

    async def healthz(request: web.Request) -> web.Response:
        ok = not server.draining and (ready() if ready else True)
        return web.json_response({"ok": ok, "draining": server.draining}, status=200 if ok else 503)

    async def clusters(request: web.Request) -> web.Response:
        own = [cluster_json(c) for c in server.clusters]
        others = [r["clusters"] for r in await reports() if r is not None]
        return web.json_response({"clusters": merge_clusters([own, *others])})

    async def metrics(request: web.Request) -> web.Response:
        families = metric_families(server, gauges)
        if peers is not None:
            got = await reports()
            families = merge_families([families, *(r["metrics"] for r in got if r is not None)])
            families.append(
                (
                    "mesh_lb_workers",
                    "gauge",
                    "Worker processes, by whether they answered the admin worker in time.",
                    [
                        ("mesh_lb_workers", {"state": "reporting"}, 1 + sum(r is not None for r in got)),
                        ("mesh_lb_workers", {"state": "silent"}, sum(r is None for r in got)),
                    ],
                )
            )
        return web.Response(
            text=render_metrics(families),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def ring(request: web.Request) -> web.Response:
        key = request.query.get("key")
        if key is None:
            return web.json_response({"error": "missing ?key="}, status=400)
        name = request.query.get("cluster")
        cands = [c for c in server.clusters if name is None or c.config.name == name]
        if not cands:
            return web.json_response({"error": f"no cluster {name!r}"}, status=404)
        return web.json_response(ring_json(cands[0], key))

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/clusters", clusters)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ring", ring)
    return app


async def start_admin(app: web.Application, sock) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    return runner
