"""``mesh up``: the demo mesh, left running until Ctrl-C, for trying it with curl and dig."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from mesh import runtime
from mesh.cli import Command
from mesh.config import Option, format_host_port, integer, text
from mesh.devmode import HASH_HEADER, SERVICE, DevMesh, DevModeError

OPTIONS = (
    Option("peers", integer(1, 20), 3, "number of demo peers (each with a sidecar)"),
    Option("lb-port", integer(0, 65535), 8080, "LB port on 127.0.0.1 (0: any free port)"),
    Option("dns-port", integer(0, 65535), 5353, "DNS port of the first sidecar on 127.0.0.1 (0: any)"),
    Option("admin-port", integer(0, 65535), 9901, "LB admin port on 127.0.0.1 (0: any)"),
    Option("mongo-url", text, None, "use this MongoDB instead of the embedded database", metavar="URL"),
)


async def _up(values: dict[str, Any]) -> int:
    mesh = DevMesh(
        peers=values["peers"],
        mongo_url=values["mongo_url"],
        lb_port=values["lb_port"],
        dns_port=values["dns_port"],
        admin_port=values["admin_port"],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await mesh.start()
        lb = format_host_port(mesh.lb_http)
        dns_host, dns_port = mesh.members[0].dns
        print(
            f"mesh is up: {len(mesh.members)} peers, each with a sidecar, behind one LB\n"
            f"  LB:       curl -H '{HASH_HEADER}: alice' http://{lb}/\n"
            f"  DNS:      dig @{dns_host} -p {dns_port} SRV _{SERVICE}._tcp.service.mesh\n"
            f"  page:     http://{format_host_port(mesh.lb_admin)}/ (the LB, live, in a browser)\n"
            f"  admin:    curl http://{format_host_port(mesh.lb_admin)}/clusters\n"
            f"  sidecar:  curl http://{format_host_port(mesh.members[0].admin)}/dns\n"
            f"  registry: mesh ls --mongo-url {mesh.url}\n"
            f"Ctrl-C stops everything.",
            flush=True,
        )
        await stop.wait()
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        await mesh.stop()
    return 0


def run(values: dict[str, Any], ns: argparse.Namespace) -> int:
    try:
        return runtime.run(_up(values))
    except DevModeError as exc:
        print(f"mesh up: error: {exc}", file=sys.stderr)
        return 1


COMMAND = Command("up", "run the demo mesh until Ctrl-C (try it with curl and dig)", OPTIONS, run)
