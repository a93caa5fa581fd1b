"""``mesh db``: the embedded MongoDB wire-protocol server in the foreground."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from mesh.cli import Command
from mesh.config import Option, integer, ip_address, text
from mesh.embedded_db import server_command

OPTIONS = (
    Option("host", ip_address, "127.0.0.1", "address to listen on", metavar="IP"),
    Option("port", integer(0, 65535), 27017, "port to listen on (0: any free port)"),
    Option("data", text, "memory", "SQLite file to keep data in, or 'memory'", metavar="PATH"),
)


def run(values: dict[str, Any], ns: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="mesh-db-"))
    data = values["data"]
    if data != "memory" and not Path(data).resolve().parent.is_dir():
        print(f"mesh db: error: --data: directory of {data} does not exist", flush=True)
        return 2
    cmd = server_command(host=values["host"], port=values["port"], data=data, workdir=workdir)
    print(f"mesh db: mongodb://{values['host']}:{values['port']}/mesh (data: {data})", flush=True)
    os.execv(cmd[0], cmd)  # foreground: signals go straight to the server


COMMAND = Command("db", "run the embedded MongoDB wire-protocol server (dev and CI)", OPTIONS, run)
