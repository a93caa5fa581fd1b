"""A P2P example peer: finds the other peers through DNS SRV and exchanges peer lists.

Each peer serves ``GET /peers`` (the peers it knows) and ``GET /`` (its name). Every few
seconds it looks up ``_peer._tcp.service.mesh`` SRV through its resolver (the mesh sidecar
beside it), asks each peer found for its list, and merges what it hears. No peer address is
configured anywhere.

    python p2p_peer.py --name peer1 [--port 8000] [--service peer] [--domain mesh]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

import aiodns
import aiohttp
from aiohttp import web

log = logging.getLogger("p2p")


async def discover(resolver: aiodns.DNSResolver, name: str) -> list[tuple[str, int]]:
    try:
        result = await resolver.query_dns(name, "SRV")
    except aiodns.error.DNSError:
        return []
    return sorted((r.data.target, r.data.port) for r in result.answer if r.type == 33)


async def gossip(app: web.Application, args: argparse.Namespace) -> None:
    resolver = aiodns.DNSResolver()  # the container's resolver: the sidecar
    srv = f"_{args.service}._tcp.service.{args.domain}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            for target, port in await discover(resolver, srv):
                app["known"].add(f"{target}:{port}")
                try:
                    async with session.get(f"http://{target}:{port}/peers") as resp:
                        app["known"].update(json.loads(await resp.text())["peers"])
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                    log.info("peer %s:%d did not answer: %s", target, port, exc)
            log.info("%s knows %d peers", args.name, len(app["known"]))
            await asyncio.sleep(args.interval)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--service", default="peer")
    p.add_argument("--domain", default="mesh")
    p.add_argument("--interval", type=float, default=5.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    app = web.Application()
    app["known"] = set()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=f"{args.name}\n")

    async def peers(request: web.Request) -> web.Response:
        return web.json_response({"name": args.name, "peers": sorted(app["known"])})

    async def start_gossip(app: web.Application) -> None:
        app["gossip"] = asyncio.create_task(gossip(app, args))

    app.router.add_get("/", index)
    app.router.add_get("/healthz", index)
    app.router.add_get("/peers", peers)
    app.on_startup.append(start_gossip)
    web.run_app(app, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
