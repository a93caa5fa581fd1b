"""The admin port (aiohttp, off the data path): /healthz, /clusters, /metrics, /ring.

With ``--workers N`` the admin port is served by the first worker, which asks the others
for their figures on each request (see :mod:`lb.workers`): counters and histograms are
summed, the data each worker holds on its own (panic, ejections, registry link) is shown
per worker with a ``worker`` label.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lb.balancer import bounded_limit
from lb.cluster import Cluster
from lb.ring import hash_key
from lb.server import Server
from mesh_native import LATENCY_BUCKETS

Gauges = Callable[[], dict[str, float]]
# Prometheus families as plain data, so that workers can send theirs to the admin worker:
# (name, type, help, [(sample name, labels, value), …]), as prometheus_client names them
# (a counter's family name without ``_total``, its samples with it).
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
        "mesh_registry_snapshot_age_seconds",
        "mesh_registry_change_streams",
    }
)
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")  # the order of a native snapshot's responses
GAUGE_HELP = {
    "mesh_registry_change_streams": "1 when registry changes come by change stream, 0 when polled.",
    "mesh_registry_snapshot_age_seconds": "Seconds since the last registry snapshot arrived.",
    "mesh_lb_active_connections": "Open client connections.",
    "mesh_lb_client_connections": "Open client connections (as above).",
}
# Per-endpoint figures of /clusters that add up across workers.
SUMMED_ENDPOINT_FIELDS = (
    "active_requests",
    "requests",
    "responses_5xx",
    "failures",
    "spills",
    "idle_connections",
    "latency_buckets",
)


def _wall(monotonic_at: float) -> float:
    return round(time.time() + (monotonic_at - time.monotonic()), 3)


def cluster_json(c: Cluster) -> dict:
    view = c.view
    det = c.detector
    hc = c.health
    endpoints = []
    counts = view.table.stats().entries if view.table is not None else ()
    slots = sum(counts) or 1
    weights = sum(st.endpoint.weight for st in view.states) or 1
    factor = c.config.balance_factor
    # Bounded loads: what each endpoint may still take before the next request spills.
    limit = (
        bounded_limit(sum(st.active for st in view.states), sum(c.usable), factor) if factor else 0
    )
    for i, st in enumerate(view.states):
        ep = st.endpoint
        snap = st.counters.snapshot()
        m = det.monitors.get(ep.key)
        ejection = None
        if m is not None and m.ejected_until is not None:
            ejection = {
                "reason": m.ejected_reason,
                "until": _wall(m.ejected_until),
                "ejections": m.ejections,
            }
        health = "unchecked" if hc is None else "healthy" if hc.is_healthy(ep.key) else "unhealthy"
        check = None
        host = hc.hosts.get(ep.key) if hc is not None else None
        if host is not None and hc is not None:
            check = {
                "ok": host.last_ok,
                "at": _wall(host.last_at) if host.last_ok is not None else None,
                "error": host.last_error,
                "checks": host.checks,
                "rise": host.rise,
                "rise_needed": hc.config.healthy_threshold,
                "fall": host.fall,
                "fall_needed": hc.config.unhealthy_threshold,
            }
        endpoints.append(
            {
                "address": ep.key,
                "host": ep.host,
                "port": ep.port,
                "name": ep.name,
                "weight": ep.weight,
                "health": health,
                "check": check,
                "ejected": ejection is not None,
                "ejection": ejection,
                "usable": c.usable[i] if i < len(c.usable) else False,
                "active_requests": st.active,
                "requests": snap["tries"],
                "responses_5xx": snap["responses"][4],
                "failures": snap["failures"],
                "spills": snap["spills"],
                # The detector's EWMA: successful responses since the last restore.
                "latency_ewma_seconds": None
                if m is None or m.latency_ewma is None
                else round(m.latency_ewma, 6),
                "idle_connections": len(st.idle),
                "table_share": round(counts[i] / slots, 4) if i < len(counts) else None,
                "weight_share": round(ep.weight / weights, 4),
                "headroom": max(0, limit - st.active) if factor else None,
                "latency_buckets": snap["latency_buckets"],
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
                    t[field] = _plus(t[field], ep[field]) if field in t else ep[field]
    for c in first:
        for ep in c["endpoints"]:
            for field, value in totals.get((c["name"], ep["address"]), {}).items():
                ep[field] = _plus(ep[field], value)
    return first


def _plus(a, b):
    """A counter summed, or a histogram's buckets summed bucket by bucket."""
    return [x + y for x, y in zip(a, b, strict=True)] if isinstance(a, list) else a + b


class LbCollector(Collector):
    """One worker's figures as Prometheus families (prometheus_client's custom collector).

    Every value is read when the admin port is asked: the per-try counters from the
    native ``Counters`` snapshots, the rest from the clusters and the server."""

    def __init__(self, server: Server, gauges: Gauges | None = None) -> None:
        self.server = server
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        server = self.server
        clusters = server.clusters
        snaps = [(c, c.counters.snapshot()) for c in clusters]
        ep_snaps = [(c, st, st.counters.snapshot()) for c in clusters for st in c.view.states]

        m = CounterMetricFamily(
            "mesh_lb_requests", "Responses sent to clients, by code class.",
            labels=("cluster", "code_class"),
        )  # fmt: skip
        for c, snap in snaps:
            classes = dict(zip(CLASSES, snap["responses"], strict=True))
            for status, n in c.stats.local.items():
                cls = f"{status // 100}xx"
                classes[cls] = classes.get(cls, 0) + n
            for cls, n in classes.items():
                m.add_metric((c.config.name, cls), n)
        yield m
        m = CounterMetricFamily(
            "mesh_lb_local_responses", "Responses the LB made itself, by status.", labels=("code",)
        )
        for status, n in sorted(server.stats.local.items()):
            m.add_metric((str(status),), n)
        yield m
        m = HistogramMetricFamily(
            "mesh_lb_upstream_latency_seconds",
            "Time from sending a request upstream to its first response byte.",
            labels=("cluster",),
        )
        for c, snap in snaps:
            m.add_metric((c.config.name,), _buckets(snap), snap["latency_sum"])
        yield m
        m = HistogramMetricFamily(
            "mesh_lb_endpoint_upstream_latency_seconds",
            "Time from sending a request to an endpoint to its first response byte.",
            labels=("cluster", "endpoint"),
        )
        for c, st, snap in ep_snaps:
            m.add_metric((c.config.name, st.endpoint.key), _buckets(snap), snap["latency_sum"])
        yield m

        m = CounterMetricFamily(
            "mesh_lb_ejections", "Outlier ejections, by reason.", labels=("cluster", "reason")
        )
        for c in clusters:
            for reason in ("consecutive_5xx", "consecutive_gateway_failure", "latency"):
                m.add_metric((c.config.name, reason), c.stats.ejections.get(reason, 0))
        yield m
        for name, help_, value in (
            ("mesh_lb_upstream_requests", "Tries sent upstream (counted as they end).",
             lambda c, snap: snap["tries"]),
            ("mesh_lb_upstream_failures", "Tries that failed: no response, or a 5xx.",
             lambda c, snap: snap["failures"]),
            ("mesh_lb_retries", "Retries on another endpoint.", lambda c, snap: c.stats.retries),
            ("mesh_lb_retries_denied", "Retries the retry budget refused.",
             lambda c, snap: c.stats.retries_denied),
            ("mesh_lb_random_picks", "Hashed requests with no hash key: random endpoint.",
             lambda c, snap: c.stats.random_picks),
            ("mesh_lb_panic_picks", "Requests routed while in panic (fail-open).",
             lambda c, snap: c.stats.panic_picks),
        ):  # fmt: skip
            m = CounterMetricFamily(name, help_, labels=("cluster",))
            for c, snap in snaps:
                m.add_metric((c.config.name,), value(c, snap))
            yield m
        m = GaugeMetricFamily(
            "mesh_lb_panic",
            "1 while too few endpoints are usable (panic mode).",
            labels=("cluster",),
        )
        for c in clusters:
            m.add_metric((c.config.name,), int(c.panic))
        yield m
        m = GaugeMetricFamily(
            "mesh_lb_endpoints", "Endpoints, by state.", labels=("cluster", "state")
        )
        for c in clusters:
            m.add_metric((c.config.name, "total"), len(c.usable))
            m.add_metric((c.config.name, "usable"), sum(c.usable))
        yield m

        def per_endpoint(name: str, help_: str, value, gauge=False):
            fam = (GaugeMetricFamily if gauge else CounterMetricFamily)(
                name, help_, labels=("cluster", "endpoint")
            )
            for c, st, snap in ep_snaps:
                fam.add_metric((c.config.name, st.endpoint.key), value(c, st, snap))
            return fam

        for name, help_, field in (
            ("mesh_lb_spills", "Requests sent off their home endpoint by bounded loads.", "spills"),
            (
                "mesh_lb_endpoint_requests",
                "Tries sent to an endpoint (counted as they end).",
                "tries",
            ),
            ("mesh_lb_endpoint_failures", "Tries that failed: no response, or a 5xx.", "failures"),
        ):
            yield per_endpoint(name, help_, lambda c, st, snap, field=field: snap[field])
        yield per_endpoint(
            "mesh_lb_endpoint_active_requests", "Requests in flight to an endpoint.",
            lambda c, st, snap: st.active, gauge=True,
        )  # fmt: skip
        m = CounterMetricFamily(
            "mesh_lb_endpoint_responses", "Responses an endpoint gave, by code class.",
            labels=("cluster", "endpoint", "code_class"),
        )  # fmt: skip
        for c, st, snap in ep_snaps:
            for cls, n in zip(CLASSES, snap["responses"], strict=True):
                m.add_metric((c.config.name, st.endpoint.key, cls), n)
        yield m
        yield per_endpoint(
            "mesh_lb_endpoint_ejected", "1 while an endpoint is ejected.",
            lambda c, st, snap: int(c.detector.is_ejected(st.endpoint.key)), gauge=True,
        )  # fmt: skip

        stats = server.stats
        for name, help_, value in (
            ("mesh_lb_connections_refused",
             "Client connections closed at once: --max-connections were open.",
             stats.connections_refused),
            ("mesh_lb_idle_connections_reaped",
             "Idle keep-alive client connections closed to admit a new one at --max-connections.",
             stats.idle_reaped),
            ("mesh_lb_header_timeouts",
             "Client connections answered 408: the request head took longer than --header-timeout.",
             stats.header_timeouts),
            ("mesh_lb_connections", "Client connections accepted.", stats.connections_total),
            ("mesh_lb_upgrades", "Connections upgraded (WebSocket) and tunnelled.", stats.upgrades),
        ):  # fmt: skip
            yield CounterMetricFamily(name, help_, value=value)
        gauges = {
            "mesh_lb_active_connections": len(server.connections),
            "mesh_lb_client_connections": len(server.connections),
            **(self.gauges() if self.gauges else {}),
        }
        for name, value in gauges.items():
            yield GaugeMetricFamily(name, GAUGE_HELP.get(name, name.replace("_", " ")), value=value)


def _buckets(snap: dict) -> list[tuple[str, float]]:
    """A native histogram snapshot as prometheus_client's cumulative buckets."""
    out = []
    cum = 0
    for bound, n in zip((*LATENCY_BUCKETS, math.inf), snap["latency_buckets"], strict=True):
        cum += n
        out.append((floatToGoString(bound), cum))
    return out


def metric_families(server: Server, gauges: Gauges | None = None) -> list[Family]:
    """One worker's families as plain data (what a worker sends the admin worker)."""
    return [
        (m.name, m.type, m.documentation, [(s.name, s.labels, s.value) for s in m.samples])
        for m in LbCollector(server, gauges).collect()
    ]


class _Families(Collector):
    """Plain families (merged from every worker) as prometheus_client metrics."""

    def __init__(self, families: list[Family]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for name, kind, help_, samples in self.families:
            m = Metric(name, help_, kind)
            for sname, labels, value in samples:
                m.add_sample(sname, labels, value)
            yield m


def render_metrics(families: list[Family]) -> str:
    """The Prometheus text exposition format (prometheus_client's)."""
    return generate_latest(_Families(families)).decode()


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
                        (
                            "mesh_lb_workers",
                            {"state": "reporting"},
                            1 + sum(r is not None for r in got),
                        ),
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

    async def page(request: web.Request) -> web.Response:
        return _static("index.html", "text/html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kind = WEB_ASSETS.get(name)
        if kind is None:
            raise web.HTTPNotFound()
        return _static(name, kind)

    async def state() -> dict:
        own = [cluster_json(c) for c in server.clusters]
        got = await reports()
        others = [r["clusters"] for r in got if r is not None]
        # With --workers N, each worker's own view of every endpoint (its ejections and
        # checks are its own), taken before the counters are summed into the first's.
        mine: dict[tuple[str, str], list[dict]] = {}
        if got:
            every = [(0, own)] + [(w, r["clusters"]) for w, r in enumerate(got, 1) if r]
            for worker, clusters in every:
                for c in clusters:
                    for ep in c["endpoints"]:
                        mine.setdefault((c["name"], ep["address"]), []).append(
                            {
                                "worker": worker,
                                "usable": ep["usable"],
                                "ejected": ep["ejected"],
                                "health": ep["health"],
                            }
                        )
        merged = merge_clusters([own, *others])
        for c in merged:
            for ep in c["endpoints"]:
                ep["workers"] = mine.get((c["name"], ep["address"]))
        return {
            "time": round(time.time(), 3),
            "draining": server.draining,
            "registry": gauges() if gauges else None,
            "routes": [
                {
                    "host": r.host.decode(errors="replace"),
                    "prefix": r.prefix.decode(errors="replace"),
                    "cluster": r.cluster.config.name,
                }
                for r in server.routes
            ],
            "workers": 1 + len(got),
            "workers_silent": sum(r is None for r in got),
            "clusters": merged,
        }

    def held_events(after: dict[str, int]) -> list[dict]:
        out = [e for c in server.clusters for e in c.events.since(after.get(c.config.name, 0))]
        out.sort(key=lambda e: (e.at, e.cluster, e.seq))
        return [e.json() for e in out]

    async def events(request: web.Request) -> web.StreamResponse:
        if request.query.get("format") == "json":
            return web.json_response({"events": held_events({})})
        if streams[0] >= MAX_EVENT_STREAMS:
            return web.json_response({"error": "too many event streams open"}, status=503)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        streams[0] += 1
        try:
            await resp.prepare(request)
            after: dict[str, int] = {}
            while True:
                await resp.write(_sse("state", await state()))
                for e in held_events(after):
                    after[e["cluster"]] = e["seq"]
                    await resp.write(_sse("log", e))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closing.wait(), EVENT_INTERVAL)
                if closing.is_set():
                    break  # the admin port is closing: streams end, so shutdown waits for none
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        finally:
            streams[0] -= 1
        return resp

    async def favicon(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def end_streams(app: web.Application) -> None:
        closing.set()

    streams = [0]
    closing = asyncio.Event()
    app.on_shutdown.append(end_streams)
    app.router.add_get("/", page)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/ui/{name}", asset)
    app.router.add_get("/events", events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/clusters", clusters)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ring", ring)
    return app


# The web page: files of the package, no build step; nothing it loads leaves this port.
WEB = Path(__file__).parent / "web"
WEB_ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
EVENT_INTERVAL = 0.5  # s between state events on /events
MAX_EVENT_STREAMS = 32  # open /events streams at once; more get 503


def _static(name: str, kind: str) -> web.Response:
    return web.Response(
        body=(WEB / name).read_bytes(), content_type=kind, charset="utf-8", headers=PAGE_HEADERS
    )


def _sse(event: str, data: object) -> bytes:
    """One server-sent event; JSON never holds a raw newline, so one data line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def start_admin(app: web.Application, sock) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    return runner
