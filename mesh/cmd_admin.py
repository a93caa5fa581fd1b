"""``mesh admin [PATH]``: ask an admin port (the sidecar's by default) and print the answer.

It is how a container's own health reaches its orchestrator when the admin port listens on
loopback only: a compose ``healthcheck`` or a Kubernetes ``exec`` probe runs
``mesh admin /healthz`` beside the sidecar, a pod's ``preStop`` runs ``mesh admin --post
/drain``, and ``docker compose exec lb mesh admin --admin
127.0.0.1:9901 /clusters`` reads the LB's. Exit status: 0 for a 2xx answer, 1 for any other
answer or none, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import http.client
import sys
from typing import Any

from mesh.cli import Command
from mesh.config import Option, format_host_port, host_port, number

OPTIONS = (
    Option("admin", host_port, ("127.0.0.1", 9902), "admin address to ask (the sidecar's; the LB's is 127.0.0.1:9901)", metavar="HOST:PORT"),
    Option("timeout", number(0.1, 60), 2.0, "seconds to wait for the answer", metavar="S"),
)  # fmt: skip


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default="/healthz", metavar="PATH", help="default /healthz")
    p.add_argument("--post", action="store_true", help="POST (e.g. /drain), not GET")


def run(values: dict[str, Any], ns: argparse.Namespace) -> int:
    path = ns.path
    if not path.startswith("/") or any(c.isspace() for c in path):
        print(
            f"mesh admin: error: PATH must start with / and hold no spaces, got {path!r}",
            file=sys.stderr,
        )
        return 2
    host, port = values["admin"]
    where = format_host_port(values["admin"])
    conn = http.client.HTTPConnection(host, port, timeout=values["timeout"])
    try:
        conn.request("POST" if ns.post else "GET", path, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        print(f"mesh admin: {where}{path}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    sys.stdout.buffer.write(body if body.endswith(b"\n") or not body else body + b"\n")
    sys.stdout.flush()
    if not 200 <= resp.status < 300:
        print(f"mesh admin: {where}{path}: {resp.status} {resp.reason}", file=sys.stderr)
        return 1
    return 0


COMMAND = Command(
    "admin",
    "ask an admin port (/healthz by default) and print the answer: exit 0 on 2xx",
    OPTIONS,
    run,
    setup=_setup,
    config_file=False,
)
