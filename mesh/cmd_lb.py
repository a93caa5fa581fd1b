"""``mesh lb``: the load balancer.

Endpoints come from the registry (``--service``), a static list (``--endpoints``) or
``[[route]]`` tables in the ``--config`` file (by Host and/or path prefix, each with its
own service or endpoints and policy settings).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import signal
import socket
import sys
from typing import Any

from lb.balancer import POLICIES
from lb.cluster import Cluster, ClusterConfig
from lb.endpoints import EndpointSet, parse_endpoint
from lb.hashing import HashSource
from lb.health import HealthConfig
from lb.outlier import OutlierConfig
from lb.proxy import Downstream
from lb.ring import MAGLEV_TABLE_SIZE, is_prime
from lb.server import HEADER_TIMEOUT, MAX_CONNECTIONS, Route, Server, bind
from mesh.cli import Command
from mesh.config import (
    ConfigError,
    Option,
    boolean,
    choice,
    format_host_port,
    host_port,
    integer,
    number,
    text,
)
from registry.model import check_label
from registry.store import CHANGE_FEEDS, DEFAULT_URL

log = logging.getLogger("mesh.lb")


def _service(value: Any) -> str:
    try:
        return check_label(value, "service name")
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def _endpoints(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    out = []
    for item in items:
        if not str(item).strip():
            continue
        parse_endpoint(str(item))  # raises ValueError with the reason
        out.append(str(item).strip())
    if not out:
        raise ValueError("needs at least one HOST:PORT")
    return tuple(out)


def _hash_source(value: Any) -> HashSource:
    return HashSource.parse(str(value))


def _prime(value: Any) -> int:
    n = integer(251, 5_000_011)(value)
    if not is_prime(n):
        raise ValueError(f"must be a prime number, got {n}")
    return n


def _statuses(value: Any) -> tuple[int, int]:
    lo, sep, hi = str(value).partition("-")
    try:
        a, b = int(lo), int(hi if sep else lo)
    except ValueError:
        raise ValueError(f"must be a status or a range like 200-399, got {value!r}") from None
    if not 100 <= a <= b <= 599:
        raise ValueError(f"must be a range within 100-599, got {value!r}")
    return a, b


def _seconds(lo: float, hi: float):
    return number(lo, hi)


OPTIONS = (
    Option("listen", host_port, (("0.0.0.0", 8080),), "address to serve HTTP on", repeat=True, metavar="HOST:PORT"),
    Option("service", _service, None, "route to this registry service's healthy instances", metavar="NAME"),
    Option("endpoints", _endpoints, None, "static endpoints HOST:PORT[@WEIGHT],...", metavar="LIST"),
    Option("mongo-url", text, DEFAULT_URL, "registry MongoDB URL", metavar="URL"),
    Option("change-feed", choice(*CHANGE_FEEDS), "auto", "how registry changes reach this process: change streams (replica set), polling the revision counter, or auto"),
    Option("policy", choice(*POLICIES), "maglev", "load-balancing policy"),
    Option("hash-on", _hash_source, (), "hash key source, repeat for a fallback chain: header:NAME, cookie:NAME, query:NAME, path, ip", repeat=True, metavar="SOURCE"),
    Option("hash-balance-factor", integer(100, 100_000), None, "bounded loads: an endpoint takes at most this percent of the average load (e.g. 125)", metavar="PERCENT"),
    Option("maglev-table-size", _prime, MAGLEV_TABLE_SIZE, "Maglev table size (prime)"),
    Option("health-path", text, None, "active HTTP health check path (off when unset)", metavar="PATH"),
    Option("health-interval", _seconds(0.05, 3600), 5.0, "seconds between active checks"),
    Option("health-timeout", _seconds(0.01, 600), 1.0, "active check timeout, seconds"),
    Option("healthy-threshold", integer(1, 100), 2, "passing checks in a row to mark an endpoint healthy"),
    Option("unhealthy-threshold", integer(1, 100), 3, "failing checks in a row to mark it unhealthy"),
    Option("health-jitter", number(0, 1), 0.1, "random extra wait, as a fraction of the interval"),
    Option("health-statuses", _statuses, "200-399", "passing statuses, e.g. 200-399", metavar="RANGE"),
    Option("consecutive-5xx", integer(0, 1000), 5, "consecutive 5xx that eject an endpoint (0: off)"),
    Option("consecutive-gateway-failure", integer(0, 1000), 3, "consecutive gateway/connect failures that eject (0: off)"),
    Option("latency-factor", number(0, 1000), 3.0, "eject an endpoint whose latency is this many times its peers' median (0: off)"),
    Option("latency-min-requests", integer(1, 1_000_000), 20, "requests per interval before latency counts"),
    Option("base-ejection-time", _seconds(0.01, 86400), 30.0, "ejection time, multiplied by the number of ejections"),
    Option("max-ejection-time", _seconds(0.01, 86400), 300.0, "cap on one ejection's length"),
    Option("max-ejection-percent", number(0, 100), 50.0, "at most this percent of endpoints ejected (one of two or more always may be)"),
    Option("outlier-interval", _seconds(0.05, 3600), 10.0, "latency sweep and ejection-count decay interval, seconds"),
    Option("panic-threshold", number(0, 100), 50.0, "panic when fewer than this percent of endpoints are usable (0: never)"),
    Option("panic", choice("fail-open", "fail-closed"), "fail-open", "in panic route to all endpoints, or answer 503"),
    Option("retries", integer(0, 10), 2, "retries on the next endpoint"),
    Option("per-try-timeout", _seconds(0, 3600), 0.0, "timeout of one try, seconds (0: only --request-timeout)"),
    Option("retry-budget", number(0, 100), 20.0, "retries as a percent of requests over the last 10 s (plus 10/s)"),
    Option("connect-timeout", _seconds(0.01, 600), 2.0, "upstream connect timeout, seconds"),
    Option("request-timeout", _seconds(0.01, 86400), 30.0, "whole exchange timeout, seconds (a request body still arriving then is answered 408)"),
    Option("idle-timeout", _seconds(0, 86400), 60.0, "client keep-alive idle timeout, seconds (0: none)"),
    Option("header-timeout", _seconds(0, 3600), HEADER_TIMEOUT, "a request head must be complete this long after the connection opens (later requests: after their first byte), else 408; seconds (0: none)"),
    Option("max-connections", integer(1, 10_000_000), MAX_CONNECTIONS, "open client connections; at the limit the longest-idle keep-alive one is closed for a new one, else the new one is closed at once"),
    Option("pool-max-idle", integer(0, 100_000), 64, "idle upstream connections kept per endpoint"),
    Option("pool-idle-timeout", _seconds(0.1, 86400), 30.0, "idle upstream connections expire after this, seconds"),
    Option("drain-timeout", _seconds(0, 3600), 30.0, "on SIGTERM, how long requests in flight may take"),
    Option("workers", integer(1, 256), 1, "processes sharing the listen sockets (SO_REUSEPORT)"),
    Option("access-log", boolean, False, "log one line per request (costs CPU per request)"),
    Option("admin", host_port, ("127.0.0.1", 9901), "admin address: /healthz /clusters /metrics /ring", metavar="HOST:PORT"),
)  # fmt: skip

# Keys a [[route]] table may set for its own cluster.
ROUTE_KEYS = {
    "policy", "hash_on", "hash_balance_factor", "maglev_table_size", "health_path",
    "health_interval", "health_timeout", "healthy_threshold", "unhealthy_threshold",
    "health_jitter", "health_statuses", "consecutive_5xx", "consecutive_gateway_failure",
    "latency_factor", "latency_min_requests", "base_ejection_time", "max_ejection_time",
    "max_ejection_percent", "outlier_interval", "panic_threshold", "panic", "retries",
    "per_try_timeout", "retry_budget", "connect_timeout", "request_timeout",
    "pool_max_idle", "pool_idle_timeout",
}  # fmt: skip


def cluster_config(name: str, v: dict[str, Any]) -> ClusterConfig:
    return ClusterConfig(
        name=name,
        policy=v["policy"],
        hash_on=tuple(v["hash_on"]),
        balance_factor=v["hash_balance_factor"] or 0,
        table_size=v["maglev_table_size"],
        retries=v["retries"],
        connect_timeout=v["connect_timeout"],
        request_timeout=v["request_timeout"],
        per_try_timeout=v["per_try_timeout"],
        panic_threshold=v["panic_threshold"],
        panic_mode=v["panic"],
        retry_budget_percent=v["retry_budget"],
        pool_max_idle=v["pool_max_idle"],
        pool_idle_expiry=v["pool_idle_timeout"],
        outlier=OutlierConfig(
            consecutive_5xx=v["consecutive_5xx"],
            consecutive_gateway=v["consecutive_gateway_failure"],
            base_ejection_time=v["base_ejection_time"],
            max_ejection_time=v["max_ejection_time"],
            max_ejection_percent=v["max_ejection_percent"],
            interval=v["outlier_interval"],
            latency_factor=v["latency_factor"],
            latency_min_requests=v["latency_min_requests"],
        ),
        health=HealthConfig(
            path=v["health_path"] or "",
            interval=v["health_interval"],
            timeout=v["health_timeout"],
            healthy_threshold=v["healthy_threshold"],
            unhealthy_threshold=v["unhealthy_threshold"],
            jitter=v["health_jitter"],
            statuses=_statuses(v["health_statuses"])
            if isinstance(v["health_statuses"], str)
            else v["health_statuses"],
        ),
    )


class Plan:
    """What to build: (cluster config, host, prefix, service or static endpoints) per route."""

    def __init__(self) -> None:
        self.routes: list[tuple[ClusterConfig, bytes, bytes, str | None, EndpointSet | None]] = []


def plan(values: dict[str, Any], file: dict[str, Any]) -> Plan:
    """Check the sources of endpoints and build the route plan. Raises ConfigError."""
    p = Plan()
    tables = file.get("route") or []
    sources = sum(bool(x) for x in (values["service"], values["endpoints"], tables))
    if sources != 1:
        raise ConfigError(
            "give exactly one of --service, --endpoints or [[route]] tables in --config"
        )
    if values["hash_on"] and values["policy"] not in ("maglev", "ring_hash"):
        raise ConfigError(f"--hash-on needs --policy maglev or ring_hash, not {values['policy']}")
    if values["max_ejection_time"] < values["base_ejection_time"]:
        raise ConfigError("--max-ejection-time must be at least --base-ejection-time")
    if values["service"]:
        p.routes.append(
            (cluster_config(values["service"], values), b"", b"/", values["service"], None)
        )
    elif values["endpoints"]:
        eps = EndpointSet.of(parse_endpoint(e) for e in values["endpoints"])
        p.routes.append((cluster_config("static", values), b"", b"/", None, eps))
    else:
        if not isinstance(tables, list):
            raise ConfigError("config file: route must be an array of tables ([[route]])")
        for n, t in enumerate(tables, 1):
            p.routes.append(_route(n, t, values))
    return p


def _route(n: int, t: Any, values: dict[str, Any]):
    where = f"config file: route #{n}"
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: must be a table")
    t = {k.replace("-", "_"): v for k, v in t.items()}
    known = ROUTE_KEYS | {"host", "prefix", "service", "endpoints", "name"}
    for k in t:
        if k not in known:
            raise ConfigError(f"{where}: unknown key {k!r}")
    if bool(t.get("service")) == bool(t.get("endpoints")):
        raise ConfigError(f"{where}: give exactly one of service or endpoints")
    v = dict(values)
    by_key = {o.key: o for o in OPTIONS}
    for k in ROUTE_KEYS & t.keys():
        opt = by_key[k]
        try:
            raw = t[k]
            v[k] = (
                tuple(opt.parse(x) for x in (raw if isinstance(raw, list) else [raw]))
                if opt.repeat
                else opt.parse(raw)
            )
        except ValueError as exc:
            raise ConfigError(f"{where}: {k}: {exc}") from None
    host = str(t.get("host", "")).lower().encode()
    prefix = str(t.get("prefix", "/")).encode()
    if not prefix.startswith(b"/"):
        raise ConfigError(f"{where}: prefix must start with '/'")
    service = None
    eps = None
    try:
        if t.get("service"):
            service = _service(t["service"])
        else:
            eps = EndpointSet.of(parse_endpoint(e) for e in _endpoints(t["endpoints"]))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    name = str(t.get("name") or service or f"route{n}")
    return cluster_config(name, v), host, prefix, service, eps


# Running


def run(values: dict[str, Any], ns: argparse.Namespace) -> int:
    p = plan(values, getattr(ns, "config_file", None) or {})
    workers = values["workers"]
    try:
        socks = [bind(h, port, reuse_port=workers > 1) for h, port in values["listen"]]
        admin_sock = bind(*values["admin"])
    except OSError as exc:
        print(f"mesh lb: error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 2
    children: list[int] = []
    worker = 0
    # Worker 0 serves the admin port and asks the others for their figures (lb.workers).
    links: list[socket.socket] = []
    if workers > 1:
        from lb.workers import socket_pairs

        pairs = socket_pairs(workers)
        links = [first for first, _ in pairs]
        addrs = [s.getsockname()[:2] for s in socks]
        for w in range(1, workers):
            pid = os.fork()
            if pid == 0:
                worker = w
                for s in socks:
                    s.close()
                admin_sock.close()
                admin_sock = None
                socks = [bind(h, port, reuse_port=True) for h, port in addrs]
                children = []
                for i, (first, other) in enumerate(pairs):
                    first.close()
                    if i != w - 1:
                        other.close()
                links = [pairs[w - 1][1]]
                break
            children.append(pid)
        if worker == 0:
            for _, other in pairs:
                other.close()
    from mesh import runtime

    try:
        return runtime.run(_main(values, p, socks, admin_sock, worker, children, links))
    except KeyboardInterrupt:
        return 130


async def _main(
    values, p: Plan, socks, admin_sock, worker: int, children: list[int], links: list
) -> int:
    from lb import workers as worker_link
    from lb.admin import cluster_json, make_app, metric_families, start_admin

    routes = []
    feeds = []
    service_clusters = []
    for cfg, host, prefix, service, eps in p.routes:
        cluster = Cluster(cfg)
        routes.append(Route(cluster, host, prefix))
        if service:
            service_clusters.append((service, cluster))
        else:
            await cluster.set_endpoints(eps)
    server = Server(
        routes,
        protocol=Downstream,
        idle_timeout=values["idle_timeout"],
        header_timeout=values["header_timeout"],
        max_connections=values["max_connections"],
        access_log=values["access_log"],
    )
    _check_files(values["max_connections"])
    store = feed = None
    feed_task = None
    if service_clusters:
        from mesh.lb_feed import RegistryFeed
        from registry.errors import RegistryError
        from registry.store import RegistryStore, mask_url

        try:
            store = RegistryStore.from_url(values["mongo_url"], change_feed=values["change_feed"])
        except RegistryError as exc:
            print(f"mesh lb: error: {exc}", file=sys.stderr)
            return 2
        feed = RegistryFeed(store, service_clusters)
        feeds.append(feed)
        feed_task = asyncio.create_task(feed.follower.run())
        try:
            async with asyncio.timeout(5.0):
                await feed.wait_ready()
        except TimeoutError:
            log.warning(
                "registry %s has not answered yet; serving 503 until it does",
                mask_url(values["mongo_url"]),
            )
    for sock in socks:
        host, port = await server.listen(sock)
        if worker == 0:
            log.info("listening http=%s", format_host_port((host, port)))
    server.start()
    runner = None
    gauges = feed.gauges if feed else None
    answer_task = None
    if worker > 0:

        def report() -> dict:
            return {
                "metrics": metric_families(server, gauges),
                "clusters": [cluster_json(c) for c in server.clusters],
            }

        answer_task = asyncio.create_task(worker_link.answer(links[0], report))
    if admin_sock is not None:
        peers = [worker_link.Peer(sock, w) for w, sock in enumerate(links, start=1)]
        app = make_app(
            server,
            gauges=gauges,
            ready=lambda: all(c.ready.is_set() for c in server.clusters),
            peers=(lambda: worker_link.ask_all(peers)) if peers else None,
        )
        runner = await start_admin(app, admin_sock)
        log.info("listening admin=%s", format_host_port(admin_sock.getsockname()[:2]))
    # The data path allocates many short-lived objects and keeps few: move what startup
    # built out of the collector's way and collect the young generation less often.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    log.info("draining: %d connections", len(server.connections))
    clean = await server.drain(values["drain_timeout"])
    # Drained: a repeated signal must not kill the process halfway through its clean exit
    # (the loop restores the default handlers when it closes).
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    log.info("drained%s", "" if clean else " (some connections cut at the drain timeout)")
    if runner is not None:
        await runner.cleanup()
    if answer_task is not None:
        answer_task.cancel()
        await asyncio.gather(answer_task, return_exceptions=True)
    if feed_task is not None:
        feed_task.cancel()
        try:
            await feed_task
        except asyncio.CancelledError:
            pass
    if store is not None:
        await store.close()
    for pid in children:
        await asyncio.to_thread(_reap, pid)
    return 0


def _check_files(max_connections: int) -> None:
    """Raise the open-file limit to its hard cap, and say when --max-connections cannot fit
    in it (each client connection may hold an upstream one too): past the limit, accepts
    fail with EMFILE and the loop retries them later instead of serving."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and max_connections * 2 + 64 > soft:
        log.warning(
            "open-file limit %d is low for --max-connections %d (each may hold an upstream"
            " connection too): past it, new connections wait in the listen queue",
            soft,
            max_connections,
        )


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


COMMAND = Command(
    "lb",
    "the HTTP load balancer (consistent hashing, health checks, outlier ejection)",
    OPTIONS,
    run,
    extra_file_keys=("route",),
)
