"""How the workers of one ``mesh lb --workers N`` report to the one that serves the admin.

Each worker is a full LB with its own connections, pools, counters and outlier detector.
Before forking, the first worker makes one socket pair per other worker. When the admin
port is asked for /metrics or /clusters, the first worker sends ``report`` down each pair
and reads one line of JSON back: that worker's Prometheus families and its /clusters. A
worker that does not answer within the timeout is left out and counted as silent, so a
stuck worker never blocks the admin port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

REPORT_TIMEOUT = 1.0
MAX_REPORT_BYTES = 64 * 1024 * 1024  # every endpoint of every cluster, as JSON


def socket_pairs(workers: int) -> list[tuple[socket.socket, socket.socket]]:
    """One pair per worker after the first: ``[0]`` stays with the first worker."""
    return [socket.socketpair() for _ in range(workers - 1)]


class Peer:
    """The first worker's end of one other worker's pair.

    Questions are numbered: an answer that arrives after its question timed out is read
    and dropped by the next question, never taken for its answer.
    """

    def __init__(self, sock: socket.socket, worker: int) -> None:
        self.sock = sock
        self.worker = worker
        self.gone = False
        self._seq = 0
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def report(self, timeout: float = REPORT_TIMEOUT) -> dict | None:
        if self.gone:
            return None
        async with self._lock:  # one question at a time on the pair
            self._seq += 1
            seq = self._seq
            try:
                async with asyncio.timeout(timeout):
                    if self._streams is None:
                        self._streams = await asyncio.open_unix_connection(
                            sock=self.sock, limit=MAX_REPORT_BYTES
                        )
                    reader, writer = self._streams
                    writer.write(b"report %d\n" % seq)
                    while True:
                        line = await reader.readline()
                        if not line:
                            raise ConnectionError("the worker closed its end")
                        msg = json.loads(line)
                        if msg.get("seq") == seq:
                            return msg
            except TimeoutError:
                log.warning("worker %d did not report within %.1f s", self.worker, timeout)
                return None
            except (OSError, ValueError) as exc:
                log.warning("worker %d is gone from the admin port: %s", self.worker, exc)
                self.gone = True
                self.close()
                return None

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None
        else:
            self.sock.close()


async def ask_all(peers: list[Peer]) -> list[dict | None]:
    return list(await asyncio.gather(*(p.report() for p in peers)))


async def answer(sock: socket.socket, report: Callable[[], dict]) -> None:
    """Run in every worker but the first: answer each ``report`` with one line of JSON."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        while True:
            line = await reader.readline()
            if not line:
                return  # the first worker is gone
            word, _, seq = line.partition(b" ")
            if word == b"report" and seq.strip().isdigit():
                msg = {"seq": int(seq), **report()}
                writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
    finally:
        writer.close()
