"""``mesh ls``: the registry as a table, or JSON lines."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from typing import Any

from mesh.cli import Command
from mesh.config import Option, text
from registry import leases
from registry.errors import RegistryError
from registry.model import Instance, check_label
from registry.store import DEFAULT_URL, RegistryStore


def _service(value: Any) -> str:
    try:
        return check_label(value, "service name")
    except ValueError as exc:
        raise ValueError(str(exc)) from None


OPTIONS = (
    Option("mongo-url", text, DEFAULT_URL, "registry MongoDB URL", metavar="URL"),
    Option("service", _service, None, "only this service", metavar="NAME"),
)


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _row(inst: Instance, now: Any) -> dict[str, Any]:
    return {
        "service": inst.service,
        "instance": inst.instance,
        "address": inst.address,
        "port": inst.port,
        "status": inst.status,
        "weight": inst.weight,
        "tags": list(inst.tags),
        "meta": dict(inst.meta),
        "lease_left": round(leases.remaining(inst.lease_expires_at, now), 1),
        "revision": inst.revision,
    }


async def _list(url: str, service: str | None) -> tuple[list[Instance], datetime]:
    """The live instances, and the database's time they were judged at."""
    store = RegistryStore.from_url(url)
    try:
        return await store.list(service), store.now()
    finally:
        await store.close()


def run(values: dict[str, Any], ns: argparse.Namespace) -> int:
    try:
        instances, now = asyncio.run(_list(values["mongo_url"], values["service"]))
    except RegistryError as exc:
        print(f"mesh ls: error: {exc}", file=sys.stderr)
        return 2
    rows = [_row(i, now) for i in instances]
    if ns.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    headers = ("SERVICE", "INSTANCE", "ADDRESS", "STATUS", "WEIGHT", "TAGS", "LEASE")
    table = [
        (
            r["service"],
            r["instance"],
            f"[{r['address']}]:{r['port']}"
            if ":" in r["address"]
            else f"{r['address']}:{r['port']}",
            r["status"],
            str(r["weight"]),
            ",".join(r["tags"]) or "-",
            f"{r['lease_left']:.1f}s",
        )
        for r in rows
    ]
    widths = [max([len(h)] + [len(row[i]) for row in table]) for i, h in enumerate(headers)]
    for row in (headers, *table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


COMMAND = Command("ls", "list the registry's live instances", OPTIONS, run, setup=_setup)
