"""Local app health: one probe (HTTP GET or TCP connect) and rise/fall thresholds.

The sidecar is the only component that probes its own app (one probe per app, not one per
load balancer); the registry status it publishes is what DNS and the LB act on.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

import aiohttp

from registry.model import CRITICAL, PASSING

MAX_REASON = 200  # characters of an error kept for the log


class Kind(enum.Enum):
    HTTP = "http"
    TCP = "tcp"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Check:
    kind: Kind
    path: str = "/"

    @classmethod
    def parse(cls, text: str) -> Check:
        """``http:/PATH``, ``tcp`` or ``none``."""
        if text in ("tcp", "none"):
            return cls(Kind(text))
        if text.startswith("http:/") and " " not in text:
            return cls(Kind.HTTP, text[len("http:") :])
        raise ValueError(f"must be http:/PATH, tcp or none, got {text!r}")

    def __str__(self) -> str:
        return f"http:{self.path}" if self.kind is Kind.HTTP else self.kind.value


@dataclass(frozen=True, slots=True)
class Result:
    ok: bool
    reason: str = ""


class Prober:
    """Runs one kind of probe against ``host:port``; owns its HTTP session."""

    def __init__(self, check: Check, host: str, port: int, *, timeout: float) -> None:
        self.check = check
        self.host = host
        self.port = port
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.url = f"http://{netloc}{check.path}"

    def __repr__(self) -> str:
        return f"<Prober {self.check} {self.host}:{self.port} timeout={self.timeout:g}s>"

    async def probe(self) -> Result:
        """Never raises: every failure is a Result with a reason."""
        try:
            async with asyncio.timeout(self.timeout):
                if self.check.kind is Kind.NONE:
                    return Result(True)
                if self.check.kind is Kind.TCP:
                    return await self._tcp()
                return await self._http()
        except TimeoutError:
            return Result(False, f"no answer within {self.timeout:g} s")
        except (OSError, aiohttp.ClientError) as exc:
            return Result(False, (str(exc) or type(exc).__name__)[:MAX_REASON])

    async def _tcp(self) -> Result:
        _, writer = await asyncio.open_connection(self.host, self.port)
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return Result(True)

    async def _http(self) -> Result:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                headers={"User-Agent": "mesh-sidecar"},
            )
        async with self._session.get(self.url, allow_redirects=False) as resp:
            await resp.read()
            if 200 <= resp.status < 400:
                return Result(True)
            return Result(False, f"HTTP {resp.status}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Thresholds:
    """Rise/fall counting (HAProxy's rise 2 / fall 3): the status flips only after ``rise``
    passes in a row, or ``fall`` failures in a row.

    The first result decides at once (as Envoy does at startup): a sidecar that starts beside
    a working app is in DNS after one probe, not after ``rise`` intervals.
    """

    def __init__(self, rise: int, fall: int) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.status: str | None = None
        self._streak = 0  # consecutive results that disagree with the status

    def __repr__(self) -> str:
        return f"<Thresholds {self.status} streak={self._streak} rise={self.rise} fall={self.fall}>"

    def record(self, ok: bool) -> str | None:
        """Count one result; return the new status when it changes, else None."""
        if self.status is None:
            self.status = PASSING if ok else CRITICAL
            return self.status
        if ok == (self.status == PASSING):
            self._streak = 0
            return None
        self._streak += 1
        if self._streak >= (self.rise if ok else self.fall):
            self._streak = 0
            self.status = PASSING if ok else CRITICAL
            return self.status
        return None
