"""The sidecar's admin port (aiohttp, off the DNS path): /healthz, /metrics, /dns.

- ``/healthz``: 200 once the instance is registered and DNS is answering; 503 while it
  registers (again), drains or has left, with the state in the JSON body: what a
  container's health check or a pod's startup probe asks.
- ``/metrics``: the Prometheus text format, from prometheus_client's custom collector: DNS
  queries by transport, type and rcode, forwarded, dropped and truncated; the answer table
  (entries, rebuilds and their time); the registry link; lease renewals and probe results by
  outcome; the instance's lifecycle state and published status.
- ``/dns``: the SRV and address answers this sidecar gives right now, per service, read
  through the same table that answers queries: JSON, or a small page when a browser asks.
- ``POST /drain``: start the drain a signal would (out of DNS and the LB, deregistered after
  the drain time) but keep serving DNS until the signal comes: a pod's ``preStop``
  (``mesh admin --post /drain``). 202 with the state; a request carrying ``Origin`` (a
  browser's, from whatever page) gets 403.
"""

from __future__ import annotations

import html
import socket
import time
from collections.abc import Iterator

import dns.message
import dns.rcode
import dns.rdatatype
from aiohttp import web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from registry.model import STATUSES
from sidecar.agent import Agent
from sidecar.dns_server import OTHER_TYPE, DnsServer
from sidecar.lifecycle import Outcome, State


def _type(qtype: int | None) -> str:
    if qtype is None:
        return "none"  # the datagram ended before a question did
    return "other" if qtype == OTHER_TYPE else dns.rdatatype.to_text(qtype)


def health(agent: Agent, server: DnsServer) -> tuple[bool, dict]:
    lc = agent.lifecycle
    state = lc.state.value if lc is not None else "starting"
    answering = server.started.is_set() and bool(server.addresses)
    ok = answering and lc is not None and lc.state is State.REGISTERED
    return ok, {"ok": ok, "state": state, "dns": answering}


class SidecarCollector(Collector):
    """Every figure read when the admin port is asked; nothing is done per query here."""

    def __init__(self, agent: Agent, server: DnsServer) -> None:
        self.agent = agent
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server, agent = self.server, self.agent
        counts = server.query_counts()
        m = CounterMetricFamily(
            "mesh_dns_queries",
            "Queries answered here, by transport, question type and rcode (REFUSED: outside "
            "the zone with no upstream, another class, a zone transfer).",
            labels=("transport", "type", "rcode"),
        )
        for (transport, qtype, rcode), n in sorted(counts.answered.items(), key=str):
            m.add_metric((transport, _type(qtype), dns.rcode.to_text(rcode)), n)
        yield m
        for name, help_, by in (
            ("mesh_dns_forwarded", "Queries passed to the upstream resolver.", counts.forwarded),
            ("mesh_dns_dropped", "Datagrams given no reply (shorter than a header, or a response).", counts.dropped),
            ("mesh_dns_truncated", "Replies cut to fit the client's UDP size, with TC set.", counts.truncated),
            ("mesh_dns_unsent", "Replies the socket would not take (its send buffer full): lost, UDP clients retry.", counts.unsent),
        ):  # fmt: skip
            m = CounterMetricFamily(name, help_, labels=("transport",))
            for transport in ("udp", "tcp"):
                m.add_metric((transport,), by.get(transport, 0))
            yield m
        yield GaugeMetricFamily(
            "mesh_dns_answer_entries", "Replies in the answer table.", value=len(server.answers)
        )
        yield SummaryMetricFamily(
            "mesh_dns_table_rebuild_seconds",
            "Renderings of the answer table from a registry snapshot.",
            count_value=server.rebuilds,
            sum_value=server.rebuild_seconds,
        )
        yield GaugeMetricFamily(
            "mesh_dns_tcp_connections", "Open DNS TCP connections.", value=server.tcp_connections
        )
        follower = agent.follower
        if follower is not None:
            yield GaugeMetricFamily(
                "mesh_registry_connected",
                "1 while the registry answers this sidecar's watch.",
                value=float(follower.connected),
            )
            yield CounterMetricFamily(
                "mesh_registry_snapshots", "Registry snapshots received.", value=follower.snapshots
            )
            if follower.snapshot_at is not None:
                yield GaugeMetricFamily(
                    "mesh_registry_snapshot_age_seconds",
                    "Seconds since the last registry snapshot reached DNS.",
                    value=time.monotonic() - follower.snapshot_at,
                )
        m = CounterMetricFamily(
            "mesh_sidecar_lease_renewals",
            "Lease renewals, by outcome (lost: the lease had run out; registered again).",
            labels=("result",),
        )
        for outcome in Outcome:
            m.add_metric((outcome.value,), agent.renewals.get(outcome.value, 0))
        yield m
        m = CounterMetricFamily(
            "mesh_sidecar_probes", "Health checks of the app, by result.", labels=("result",)
        )
        for result in ("pass", "fail"):
            m.add_metric((result,), agent.probes.get(result, 0))
        yield m
        lc = agent.lifecycle
        m = GaugeMetricFamily(
            "mesh_sidecar_state",
            "The registration's state (1 for the current one).",
            labels=("state",),
        )
        for state in State:
            m.add_metric((state.value,), float(lc is not None and lc.state is state))
        yield m
        m = GaugeMetricFamily(
            "mesh_sidecar_status",
            "The status published in the registry (1 for the current one; none before the first).",
            labels=("status",),
        )
        published = lc.published if lc is not None else None
        for status in STATUSES:
            m.add_metric((status,), float(published == status))
        yield m


def dns_view(server: DnsServer) -> dict:
    """What this sidecar answers now for each service with a healthy instance."""
    answers = server.answers
    domain = answers.config.domain
    out = {}
    for service in sorted(answers.services):
        srv_name = f"_{service}._tcp.service.{domain}."
        addr_name = f"{service}.service.{domain}."
        srv = _records(answers, srv_name, "SRV")
        addresses = _records(answers, addr_name, "A") + _records(answers, addr_name, "AAAA")
        out[service] = {"srv_name": srv_name, "srv": srv, "name": addr_name, "addresses": addresses}
    return {"domain": domain, "revision": answers.revision, "services": out}


def _records(answers, name: str, rdtype: str) -> list[str]:
    query = dns.message.make_query(name, rdtype)
    wire = answers.answer(query.to_wire(), udp=False)
    if not isinstance(wire, bytes):  # FORWARD, or nothing: no name of the zone
        return []
    reply = dns.message.from_wire(wire)
    return sorted(r.to_text() for rrset in reply.answer for r in rrset)


def dns_page(view: dict) -> str:
    """The /dns view as a small page: every value escaped, no script."""
    e = html.escape
    rows = []
    for service, v in view["services"].items():
        srv = "<br>".join(e(r) for r in v["srv"]) or "&mdash;"
        addresses = "<br>".join(e(a) for a in v["addresses"]) or "&mdash;"
        rows.append(
            f"<tr><td>{e(service)}</td><td><code>{e(v['srv_name'])}</code><br>{srv}</td>"
            f"<td><code>{e(v['name'])}</code><br>{addresses}</td></tr>"
        )
    body = "\n".join(rows) or '<tr><td colspan="3">no service has a healthy instance</td></tr>'
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>mesh sidecar DNS</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.4em .8em;text-align:left;vertical-align:top}"
        "</style></head><body>"
        f"<h1>DNS answers of this sidecar</h1><p>domain <code>{e(view['domain'])}</code>, "
        f"registry revision {int(view['revision'])}</p>"
        "<table><tr><th>service</th><th>SRV</th><th>A / AAAA</th></tr>"
        f"{body}</table></body></html>"
    )


def make_app(agent: Agent, server: DnsServer) -> web.Application:
    app = web.Application()
    collector = SidecarCollector(agent, server)
    headers = {"X-Content-Type-Options": "nosniff"}

    async def healthz(request: web.Request) -> web.Response:
        ok, body = health(agent, server)
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(collector),
            headers={**headers, "Content-Type": CONTENT_TYPE_LATEST},
        )

    async def dns_answers(request: web.Request) -> web.Response:
        view = dns_view(server)
        if "text/html" in request.headers.get("Accept", ""):
            return web.Response(
                text=dns_page(view),
                content_type="text/html",
                headers={
                    **headers,
                    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
                },
            )
        return web.json_response(view, headers=headers)

    async def drain(request: web.Request) -> web.Response:
        if "Origin" in request.headers:
            return web.json_response({"error": "cross-origin request"}, status=403)
        started = agent.request_drain()
        _, body = health(agent, server)
        return web.json_response({**body, "drain_started": started}, status=202)

    app.router.add_get("/healthz", healthz)
    app.router.add_post("/drain", drain)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/dns", dns_answers)
    return app


def bind(host: str, port: int) -> socket.socket:
    """The admin port's listening socket (OSError when the address is taken or not ours)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


async def start_admin(app: web.Application, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner
