"""``mesh demo``: the whole mesh on this machine, driven, shown live, and checked.

Starts the embedded database, ``--peers`` demo peers each with a sidecar, and one LB
(Maglev on the ``x-user`` header); drives traffic through the LB with many keys; resolves
``_peer._tcp.service.mesh`` SRV through a sidecar with aiodns (c-ares); halfway kills one
peer with SIGKILL; ends with a summary. Exits 1 if any client request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiodns
import aiohttp

from mesh import runtime
from mesh.cli import Command
from mesh.cmd_resolve import query
from mesh.config import Option, format_host_port, integer, number
from mesh.devmode import HASH_HEADER, SERVICE, DevMesh, DevModeError

OPTIONS = (
    Option("peers", integer(2, 20), 3, "number of demo peers (each with a sidecar)"),
    Option("duration", number(4, 3600), 20.0, "seconds of traffic; a peer is killed halfway"),
)

KEYS = 600  # distinct hash keys the client cycles through
CONCURRENCY = 8  # client requests in flight
SRV_NAME = f"_{SERVICE}._tcp.service.mesh"


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


@dataclass
class Traffic:
    """What the built-in client saw."""

    sent: int = 0
    failed: int = 0
    served: dict[str, int] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # key -> instance that answered last
    errors: list[str] = field(default_factory=list)

    def record(self, key: str, instance: str | None, error: str | None) -> None:
        self.sent += 1
        if instance is None:
            self.failed += 1
            if len(self.errors) < 5 and error:
                self.errors.append(error)
            return
        self.served[instance] = self.served.get(instance, 0) + 1
        self.owner[key] = instance


async def _request(session: aiohttp.ClientSession, url: str, key: str, traffic: Traffic) -> None:
    try:
        async with session.get(url, headers={HASH_HEADER: key}) as resp:
            body = await resp.read()
            if resp.status != 200:
                traffic.record(key, None, f"{key}: HTTP {resp.status}")
                return
            traffic.record(key, json.loads(body)["instance"], None)
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
        traffic.record(key, None, f"{key}: {type(exc).__name__}: {exc}")


async def _drive(url: str, traffic: Traffic, stop: asyncio.Event) -> None:
    timeout = aiohttp.ClientTimeout(total=35)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        counter = 0

        async def worker() -> None:
            nonlocal counter
            while not stop.is_set():
                key = f"user-{counter % KEYS}"
                counter += 1
                await _request(session, url, key, traffic)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def _key_owners(url: str) -> dict[str, str]:
    """One request per key: which peer owns it now."""
    traffic = Traffic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=35)) as session:
        for start in range(0, KEYS, 50):
            await asyncio.gather(
                *(_request(session, url, f"user-{k}", traffic) for k in range(start, min(KEYS, start + 50)))
            )
    return traffic.owner


async def resolve_srv(server: tuple[str, int], name: str = SRV_NAME) -> list[tuple[str, int]]:
    """SRV targets and ports through a sidecar, with c-ares. NXDOMAIN is an empty answer."""
    try:
        result = await query(name, "SRV", server, 1.0)
    except aiodns.error.DNSError:
        return []
    return sorted((r.data.target, r.data.port) for r in result.answer if r.type == 33)


async def _admin_json(session: aiohttp.ClientSession, base: str, path: str) -> Any:
    try:
        async with session.get(base + path) as resp:
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def _retries(session: aiohttp.ClientSession, base: str) -> float:
    """``mesh_lb_retries_total`` summed over clusters, from the LB's Prometheus text."""
    try:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith("mesh_lb_retries_total"):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _endpoint_states(clusters: Any) -> dict[int, str]:
    """port -> what the LB thinks of that endpoint, from ``/clusters``."""
    out: dict[int, str] = {}
    for cluster in (clusters or {}).get("clusters", []):
        for ep in cluster.get("endpoints", []):
            if ep.get("ejected"):
                reason = (ep.get("ejection") or {}).get("reason") or "outlier"
                out[ep["port"]] = f"[red]ejected[/red] ({reason})"
            else:
                out[ep["port"]] = "usable" if ep.get("usable") else str(ep.get("health"))
    return out


class View:
    """A live rich table on a terminal; plain progress lines otherwise."""

    def __init__(self, mesh: DevMesh, traffic: Traffic, *, live: bool) -> None:
        self.mesh = mesh
        self.traffic = traffic
        self.live = live
        self.events: list[str] = []
        self.states: dict[int, str] = {}
        self.retries = 0.0
        self.srv: list[tuple[str, int]] = []
        self._last = (0.0, 0)
        self.rate = 0.0

    def event(self, text: str) -> None:
        self.events.append(text)
        if not self.live:
            print(text, flush=True)

    def tick(self) -> None:
        now = time.monotonic()
        t, n = self._last
        if t:
            self.rate = (self.traffic.sent - n) / max(1e-6, now - t)
        self._last = (now, self.traffic.sent)

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table(title="mesh demo", expand=False)
        for col in ("peer", "port", "process", "LB view", "served", "share"):
            table.add_column(col)
        total = max(1, sum(self.traffic.served.values()))
        for p in self.mesh.members:
            served = self.traffic.served.get(p.name, 0)
            table.add_row(
                p.name, str(p.port), "running" if p.app.alive else "[red]killed[/red]",
                self.states.get(p.port, "not routed"), str(served), f"{100 * served / total:.0f} %",
            )  # fmt: skip
        totals = (
            f"LB: {self.rate:,.0f} req/s  sent {self.traffic.sent}  failed {self.traffic.failed}"
            f"  retried {self.retries:.0f}\nSRV {SRV_NAME}: "
            + (", ".join(f"{t}:{p}" for t, p in self.srv) or "(none)")
        )
        return Group(table, totals, *self.events[-6:])

    def line(self) -> str:
        shares = " ".join(f"{p.name}={self.traffic.served.get(p.name, 0)}" for p in self.mesh.members)
        return f"sent={self.traffic.sent} failed={self.traffic.failed} retried={self.retries:.0f} {shares}"


async def run_demo(peers: int, duration: float, *, live: bool) -> dict[str, Any]:
    mesh = DevMesh(peers=peers)
    traffic = Traffic()
    view = View(mesh, traffic, live=live)
    stop = asyncio.Event()
    summary: dict[str, Any] = {}
    try:
        view.event(f"starting the embedded database, {peers} peers with sidecars and the LB ...")
        await mesh.start()
        lb_url = f"http://{format_host_port(mesh.lb_http)}/"
        admin = f"http://{format_host_port(mesh.lb_admin)}"
        dns = mesh.members[0].dns
        view.event(f"LB {lb_url}  admin {admin}  DNS {dns[0]}:{dns[1]}  registry {mesh.url}")
        view.event(f"live page: {admin}/ (open it in a browser)")
        async with asyncio.timeout(30):
            while len(await resolve_srv(dns)) < peers:
                await asyncio.sleep(0.1)
        view.srv = await resolve_srv(dns)
        view.event(f"SRV {SRV_NAME} -> " + ", ".join(f"{t}:{p}" for t, p in view.srv))
        summary = await _scenario(mesh, traffic, view, stop, duration, lb_url, admin, dns)
    finally:
        stop.set()
        await mesh.stop()
    return summary


async def _scenario(
    mesh: DevMesh, traffic: Traffic, view: View, stop: asyncio.Event, duration: float,
    lb_url: str, admin: str, dns: tuple[str, int],
) -> dict[str, Any]:  # fmt: skip
    peers = len(mesh.members)
    victim = mesh.members[-1]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        before = await _key_owners(lb_url)
        driver = asyncio.create_task(_drive(lb_url, traffic, stop))
        t0 = time.monotonic()
        killed_at: float | None = None
        dns_gone_at: float | None = None
        live_ctx: Any = contextlib.nullcontext()
        if view.live:
            from rich.live import Live

            live_ctx = Live(view.render(), refresh_per_second=4, transient=False)
        with live_ctx as live:
            next_line = t0
            while (now := time.monotonic()) - t0 < duration:
                if killed_at is None and now - t0 >= duration / 2:
                    mesh.kill_peer(len(mesh.members) - 1)
                    killed_at = time.monotonic()
                    view.event(f"killed {victim.name} (SIGKILL) at t={now - t0:.1f}s")
                view.srv = await resolve_srv(dns)
                if killed_at and dns_gone_at is None and all(victim.name not in t for t, _ in view.srv):
                    dns_gone_at = time.monotonic()
                    view.event(f"{victim.name} left DNS {dns_gone_at - killed_at:.2f}s after it died")
                view.states = _endpoint_states(await _admin_json(session, admin, "/clusters"))
                view.retries = await _retries(session, admin)
                view.tick()
                if live is not None:
                    live.update(view.render())
                elif now >= next_line:
                    print(view.line(), flush=True)
                    next_line = now + 2
                await asyncio.sleep(0.25)
        stop.set()
        await driver
        if dns_gone_at is None:
            async with asyncio.timeout(15):
                while any(victim.name in t for t, _ in await resolve_srv(dns)):
                    await asyncio.sleep(0.1)
            dns_gone_at = time.monotonic()
        after = await _key_owners(lb_url)
        retries = await _retries(session, admin)
    keys = sorted(set(before) & set(after))
    moved = sum(1 for k in keys if before[k] != after[k])
    assert killed_at is not None
    return {
        "peers": peers,
        "duration_s": duration,
        "requests": traffic.sent + 2 * KEYS,
        "failed": traffic.failed + (KEYS - len(before)) + (KEYS - len(after)),
        "retried": int(retries),
        "served": dict(sorted(traffic.served.items())),
        "killed": victim.name,
        "keys": len(keys),
        "keys_moved_fraction": round(moved / max(1, len(keys)), 4),
        "ideal_moved_fraction": round(1 / peers, 4),
        "killed_keys_before": sum(1 for k in keys if before[k] == victim.name),
        "dns_removal_s": round(dns_gone_at - killed_at, 3),
        "errors": traffic.errors,
    }


def _print_summary(s: dict[str, Any]) -> None:
    print(
        f"\nrequests {s['requests']}, failed {s['failed']}, retried {s['retried']}\n"
        f"killed {s['killed']}: keys moved {s['keys_moved_fraction']:.1%} "
        f"(ideal 1/{s['peers']} = {s['ideal_moved_fraction']:.1%}), "
        f"left DNS after {s['dns_removal_s']:.2f}s\n"
        f"served per peer: " + ", ".join(f"{k}={v}" for k, v in s["served"].items())
    )
    for err in s["errors"]:
        print(f"  error: {err}")


def run(values: dict[str, Any], ns: argparse.Namespace) -> int:
    live = sys.stdout.isatty() and not ns.json
    try:
        summary = runtime.run(run_demo(values["peers"], values["duration"], live=live))
    except DevModeError as exc:
        print(f"mesh demo: error: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("mesh demo: error: the mesh did not become ready in time", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        _print_summary(summary)
    return 1 if summary["failed"] else 0


COMMAND = Command(
    "demo", "run the whole mesh on this machine, drive traffic, kill a peer, show it", OPTIONS, run, setup=_setup
)
