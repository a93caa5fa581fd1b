"""What Docker's engine does for a compose network, as two small servers the compose runner
starts inside the namespaces it builds (``tests/system/compose_run.py``):

- ``dns``: the embedded resolver at 127.0.0.11. It answers the names of the services on
  the network (A records) and forwards every other question, from inside the container's
  namespace, to the servers of the service's ``dns:``, first to answer wins; with none, or
  none answering, SERVFAIL. UDP and TCP.
- ``proxy``: a published port (docker-proxy): listens on the host's address and relays each
  connection to the container's address.

    python compose_net.py dns --names names.json [--forward 127.0.0.1] ...
    python compose_net.py proxy --listen 127.0.0.1:9901 --to 10.1.2.12:9901
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

FORWARD_TIMEOUT = 2.0  # s per server (Docker's resolver: 4 s for the whole question)
TTL = 600  # Docker's embedded DNS answers container names with TTL 600


class Resolver:
    def __init__(self, names: dict[str, str], forward: list[str]) -> None:
        self.names = {n.lower().rstrip("."): ip for n, ip in names.items()}
        self.forward = forward

    async def reply(self, wire: bytes, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            return None
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        if name in self.names:
            resp = dns.message.make_response(query)
            if q.rdtype == dns.rdatatype.A:
                resp.answer.append(dns.rrset.from_text(q.name, TTL, "IN", "A", self.names[name]))
            return resp.to_wire()
        for server in self.forward:
            try:
                if tcp:
                    resp = await dns.asyncquery.tcp(query, server, timeout=FORWARD_TIMEOUT)
                else:
                    resp = await dns.asyncquery.udp(query, server, timeout=FORWARD_TIMEOUT)
                return resp.to_wire()
            except (dns.exception.DNSException, OSError):
                continue
        resp = dns.message.make_response(query)
        resp.set_rcode(dns.rcode.SERVFAIL)
        return resp.to_wire()


class Udp(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        asyncio.ensure_future(self._answer(data, addr))

    async def _answer(self, data: bytes, addr) -> None:
        reply = await self.resolver.reply(data, tcp=False)
        if reply is not None:
            self.transport.sendto(reply, addr)


async def serve_dns(args: argparse.Namespace, names: dict[str, str]) -> None:
    resolver = Resolver(names, args.forward)
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: Udp(resolver), local_addr=(args.listen, 53))

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                reply = await resolver.reply(await reader.readexactly(size), tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(tcp, args.listen, 53)
    print(f"dns: {args.listen}:53, forwarding to {args.forward or 'nothing'}", flush=True)
    await server.serve_forever()


async def serve_proxy(args: argparse.Namespace) -> None:
    to_host, to_port = args.to.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(to_host, int(to_port))
        except OSError:
            writer.close()  # nothing listens in the container: the client sees the close
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    host, port = args.listen.rsplit(":", 1)
    server = await asyncio.start_server(relay, host, int(port))
    print(f"proxy: {args.listen} -> {args.to}", flush=True)
    await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("dns")
    d.add_argument("--names", required=True, help="JSON file: name -> IPv4 address")
    d.add_argument("--forward", action="append", default=[], help="server for other names")
    d.add_argument("--listen", default="127.0.0.11")
    x = sub.add_parser("proxy")
    x.add_argument("--listen", required=True)
    x.add_argument("--to", required=True)
    args = p.parse_args()
    if args.what == "dns":
        with open(args.names) as f:
            names = json.load(f)
        asyncio.run(serve_dns(args, names))
    else:
        asyncio.run(serve_proxy(args))


if __name__ == "__main__":
    main()
