"""``mesh sidecar``: register the local app, probe it, and answer DNS for the mesh."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import re
import socket
import sys
from typing import Any

import dns.exception
import dns.name

from mesh import runtime
from mesh.cli import Command
from mesh.config import (
    ConfigError,
    Option,
    choice,
    format_host_port,
    host_port,
    integer,
    number,
    text,
)
from registry.errors import InvalidInstance
from registry.model import DEFAULT_WEIGHT, MAX_WEIGHT, Instance, check_label
from registry.store import CHANGE_FEEDS, DEFAULT_URL, RegistryStore
from sidecar import admin
from sidecar.addresses import advertise_address
from sidecar.agent import EXIT_ABORTED, Agent, AgentConfig
from sidecar.dns_answer import ZoneConfig
from sidecar.dns_server import DnsServer, resolv_conf_upstream
from sidecar.probe import Check, Kind

EXIT_USAGE = 2
log = logging.getLogger("sidecar")


def _label(what: str):
    def parse(value: Any) -> str:
        try:
            return check_label(value, what)
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    return parse


def _address(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValueError(f"must be an IPv4 or IPv6 address, got {value!r}") from None


def _meta(value: Any) -> tuple[str, str]:
    key, sep, val = str(value).partition("=")
    if not sep or not key:
        raise ValueError(f"must be KEY=VALUE, got {value!r}")
    return key, val


def _check(value: Any) -> Check:
    return value if isinstance(value, Check) else Check.parse(str(value))


MAX_DOMAIN_OCTETS = 128  # of 255 for a whole name (RFC 1035 §2.3.4)


def _domain(value: Any) -> str:
    try:
        name = dns.name.from_text(text(value))
    except dns.exception.DNSException as exc:
        raise ValueError(f"must be a DNS name, got {value!r}: {exc}") from None
    if name == dns.name.root:
        raise ValueError("must not be the root")
    # The zone's own names (its SOA's `postmaster.<domain>`) and a service's names must fit
    # in 255 octets: leave room for `<instance>.<service>.service.` of ordinary length.
    octets = len(name.to_wire())
    if octets > MAX_DOMAIN_OCTETS:
        raise ValueError(
            f"must be at most {MAX_DOMAIN_OCTETS} octets long in wire form, got {octets}"
        )
    return name.to_text(omit_final_dot=True).lower()


def _upstream(value: Any) -> tuple[str, int] | str:
    if value == "none":
        return "none"
    return host_port(value)


OPTIONS = (
    Option("service", _label("service name"), None, "service name (required)", metavar="NAME"),
    Option("port", integer(1, 65535), None, "the app's port (required)", metavar="PORT"),
    Option("instance", _label("instance name"), None, "instance name (default: from the hostname)", metavar="ID"),
    Option("address", _address, None, "address to advertise (default: the source address of the route to the registry)", metavar="IP"),
    Option("tag", _label("tag"), (), "tag (repeatable)", repeat=True, metavar="T"),
    Option("weight", integer(1, MAX_WEIGHT), DEFAULT_WEIGHT, "SRV and LB weight", metavar="N"),
    Option("meta", _meta, (), "metadata (repeatable)", repeat=True, metavar="K=V"),
    Option("check", _check, Check(Kind.TCP), "health check: http:/PATH, tcp or none", metavar="CHECK"),
    Option("check-interval", number(0.05, 3600), 2.0, "seconds between checks", metavar="S"),
    Option("check-timeout", number(0.01, 600), 1.0, "seconds a check may take", metavar="S"),
    Option("rise", integer(1, 100), 2, "passes in a row to become passing", metavar="N"),
    Option("fall", integer(1, 100), 3, "failures in a row to become critical", metavar="N"),
    Option("lease-ttl", number(1, 86400), 10.0, "registry lease, renewed every ttl/3", metavar="S"),
    Option("drain", number(0, 3600), 5.0, "seconds in draining before deregistering", metavar="S"),
    Option("dns-listen", host_port, (("127.0.0.1", 53),), "DNS listen address, UDP and TCP (repeatable)", repeat=True, metavar="HOST:PORT"),
    Option("domain", _domain, "mesh", "DNS domain of the mesh", metavar="D"),
    Option("dns-ttl", integer(0, 86400), 5, "TTL of DNS answers", metavar="S"),
    Option("upstream", _upstream, None, "resolver for names outside the domain, or none (default: the first nameserver of /etc/resolv.conf that is not this sidecar)", metavar="HOST:PORT"),
    Option("admin", host_port, ("127.0.0.1", 9902), "admin address: /healthz /metrics /dns", metavar="HOST:PORT"),
    Option("mongo-url", text, DEFAULT_URL, "registry MongoDB URL", metavar="URL"),
    Option("change-feed", choice(*CHANGE_FEEDS), "auto", "how registry changes reach this process: change streams (replica set), polling the revision counter, or auto"),
)  # fmt: skip


def hostname_label(hostname: str) -> str:
    """A DNS label from a hostname: first part, lower case, other characters as '-'."""
    label = re.sub(r"[^a-z0-9-]+", "-", hostname.split(".")[0].lower()).strip("-")
    return label[:63].rstrip("-") or "instance"


def build_instance(values: dict[str, Any], address: str) -> Instance:
    try:
        return Instance(
            service=values["service"],
            instance=values["instance"] or hostname_label(socket.gethostname()),
            address=address,
            port=values["port"],
            tags=values["tag"],
            meta=dict(values["meta"]),
            weight=values["weight"],
        )
    except InvalidInstance as exc:
        raise ConfigError(str(exc)) from None


def _check_values(values: dict[str, Any]) -> None:
    for key in ("service", "port"):
        if values[key] is None:
            raise ConfigError(f"--{key} is required (or MESH_{key.upper()})")


def run(values: dict[str, Any], ns: argparse.Namespace) -> int:
    _check_values(values)
    address = values["address"] or advertise_address(values["mongo_url"])
    if address is None:
        raise ConfigError("no address to advertise was found; give one with --address")
    instance = build_instance(values, address)
    upstream = values["upstream"]
    if upstream is None:
        upstream = resolv_conf_upstream(values["dns_listen"])
    elif upstream == "none":
        upstream = None
    config = AgentConfig(
        instance=instance,
        check=values["check"],
        check_interval=values["check_interval"],
        # A probe never outlasts the interval: the next one would start before it ended.
        check_timeout=min(values["check_timeout"], values["check_interval"]),
        rise=values["rise"],
        fall=values["fall"],
        lease_ttl=values["lease_ttl"],
        drain=values["drain"],
    )
    zone = ZoneConfig(domain=values["domain"], ttl=values["dns_ttl"])
    return runtime.run(_main(config, zone, values, upstream))


async def _main(
    config: AgentConfig, zone: ZoneConfig, values: dict[str, Any], upstream: tuple[str, int] | None
) -> int:
    store = RegistryStore.from_url(values["mongo_url"], change_feed=values["change_feed"])
    server = DnsServer(zone, upstream=upstream)
    try:
        try:
            await server.start(values["dns_listen"])
        except OSError as exc:
            where = ", ".join(format_host_port(a) for a in values["dns_listen"])
            print(
                f"mesh sidecar: error: --dns-listen {where}: {exc.strerror or exc}", file=sys.stderr
            )
            return EXIT_USAGE
        if upstream is None:
            log.info("names outside %s. are refused (no upstream)", zone.domain)
        else:
            log.info("names outside %s. go to upstream=%s", zone.domain, format_host_port(upstream))
        try:
            admin_sock = admin.bind(*values["admin"])
        except OSError as exc:
            where = format_host_port(values["admin"])
            print(f"mesh sidecar: error: --admin {where}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
        agent = Agent(store, config, dns=server)
        runner = await admin.start_admin(admin.make_app(agent, server), admin_sock)
        log.info("listening admin=%s", format_host_port(admin_sock.getsockname()[:2]))
        try:
            code = await agent.run()
        finally:
            await runner.cleanup()
        if code == EXIT_ABORTED:
            # A second signal: leave now, without waiting for anything (the lease runs out).
            sys.stderr.flush()
            os._exit(code)
        return code
    finally:
        await server.close()
        await asyncio.shield(store.close())


COMMAND = Command(
    "sidecar", "register and probe the local app, and answer DNS for the mesh", OPTIONS, run
)
