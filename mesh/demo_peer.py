"""A small demo peer: answers every request with its instance name, and ``/healthz``.

    python -m mesh.demo_peer --name peer-1 [--host 127.0.0.1] [--port 0]

Prints ``listening http=HOST:PORT`` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys

from aiohttp import web


def make_app(name: str) -> web.Application:
    served = 0

    async def hello(request: web.Request) -> web.Response:
        nonlocal served
        served += 1
        body = {"instance": name, "path": request.path, "key": request.headers.get("x-user")}
        return web.Response(text=json.dumps(body) + "\n", content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"instance": name, "served": served, "pid": os.getpid()})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/stats", stats)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


async def serve(name: str, host: str, port: int) -> None:
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    runner = web.AppRunner(make_app(name), access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    bound = sock.getsockname()
    print(f"{name}: listening http={bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(prog="mesh-demo-peer")
    p.add_argument("--name", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    from mesh import runtime

    try:
        runtime.run(serve(a.name, a.host, a.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
