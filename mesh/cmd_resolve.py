"""``mesh resolve NAME``: look a name up through DNS with c-ares (aiodns) and print it.

SRV answers print as ``priority weight port target [address...]`` with the targets'
addresses from the additional section; A and AAAA answers print one address per line.
Exit status: 0 with answers, 1 for a name with no answer, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import aiodns

from mesh.cli import Command
from mesh.config import Option, choice, format_host_port, host_port, number

OPTIONS = (
    Option("type", choice("SRV", "A", "AAAA"), None, "record type (default: SRV for names starting with '_', else A)", metavar="TYPE"),
    Option("server", host_port, ("127.0.0.1", 53), "DNS server to ask (the local sidecar)", metavar="HOST:PORT"),
    Option("timeout", number(0.1, 60), 3.0, "seconds to wait for the answer", metavar="S"),
)  # fmt: skip


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the name, e.g. _web._tcp.service.mesh")


async def query(name: str, rdtype: str, server: tuple[str, int], timeout: float) -> Any:
    """One lookup through ``server`` with c-ares; raises ``aiodns.error.DNSError``."""
    resolver = aiodns.DNSResolver(
        nameservers=[format_host_port(server)], timeout=timeout, tries=2, rotate=False
    )
    try:
        return await resolver.query_dns(name, rdtype)
    finally:
        await resolver.close()


async def lookup(name: str, rdtype: str, server: tuple[str, int], timeout: float) -> list[str]:
    result = await query(name, rdtype, server, timeout)
    glue: dict[str, list[str]] = {}
    for rr in result.additional:
        addr = getattr(rr.data, "addr", None)
        if addr:
            glue.setdefault(rr.name.rstrip(".").lower(), []).append(addr)
    lines = []
    for rr in result.answer:
        data = rr.data
        if rdtype == "SRV" and hasattr(data, "target"):
            target = data.target.rstrip(".")
            extra = " ".join(glue.get(target.lower(), []))
            lines.append(f"{data.priority} {data.weight} {data.port} {target} {extra}".rstrip())
        elif hasattr(data, "addr"):
            lines.append(data.addr)
    return sorted(lines)


def run(values: dict[str, Any], ns: argparse.Namespace) -> int:
    name = ns.name.rstrip(".")
    rdtype = values["type"] or ("SRV" if name.startswith("_") else "A")
    try:
        lines = asyncio.run(lookup(name, rdtype, values["server"], values["timeout"]))
    except aiodns.error.DNSError as exc:
        reason = exc.args[1] if len(exc.args) > 1 else str(exc)
        print(f"mesh resolve: {name} {rdtype}: {reason}", file=sys.stderr)
        return 1
    if not lines:
        print(f"mesh resolve: {name} {rdtype}: no records", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


COMMAND = Command(
    "resolve",
    "look a service up through DNS (c-ares)",
    OPTIONS,
    run,
    setup=_setup,
    config_file=False,
)
