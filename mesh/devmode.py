"""The embedded one-machine mesh: database, demo peers, a sidecar beside each, one LB.

Every part runs as its own child process, started the way a user starts it (``mesh
sidecar ...``, ``mesh lb ...``), all on loopback. Children bind port 0 unless told
otherwise and report the port they got on stderr as ``listening KIND=HOST:PORT``; we read
it from there, so there is no free-port guessing. Children die with us (PR_SET_PDEATHSIG)
and are stopped in order: LB, sidecars, peers, database.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mesh.embedded_db import EmbeddedDB

log = logging.getLogger(__name__)

START_TIMEOUT = 20.0  # s; a child on a loaded CI machine can take a few seconds to import
_LISTENING = re.compile(r"listening (\w+)=\[?([0-9a-fA-F.:]+?)\]?:(\d+)")
SERVICE = "peer"
HASH_HEADER = "x-user"


class DevModeError(RuntimeError):
    pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Child:
    """One child process whose stderr goes to a file we read the listening lines from."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.listening: dict[str, tuple[str, int]] = {}

    def __repr__(self) -> str:
        state = f"pid={self.proc.pid}" if self.alive else "stopped"
        return f"<Child {self.name} {state} {self.listening}>"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, expect: Sequence[str], timeout: float = START_TIMEOUT) -> dict[str, tuple[str, int]]:
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for kind, host, port in _LISTENING.findall(self.log_path.read_text(errors="replace")):
                self.listening.setdefault(kind, (host, int(port)))
            if all(k in self.listening for k in expect):
                return self.listening
            if not self.alive:
                raise DevModeError(f"{self.name} exited: {self.tail()}")
            time.sleep(0.02)
        self.kill()
        raise DevModeError(f"{self.name} did not start within {timeout:g} s: {self.tail()}")

    def tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def terminate(self, timeout: float = 5.0) -> None:
        if not self.alive:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Peer:
    name: str
    app: Child
    sidecar: Child | None = None

    @property
    def port(self) -> int:
        return self.app.listening["http"][1]

    @property
    def dns(self) -> tuple[str, int]:
        assert self.sidecar is not None
        return self.sidecar.listening["dns"]

    @property
    def admin(self) -> tuple[str, int]:
        assert self.sidecar is not None
        return self.sidecar.listening["admin"]


@dataclass
class DevMesh:
    """Start with ``await mesh.start()``; always ``await mesh.stop()``."""

    peers: int = 3
    mongo_url: str | None = None
    lb_port: int = 0
    dns_port: int = 0
    admin_port: int = 0
    check_interval: float = 0.5
    data: str = "memory"  # the embedded database's storage: "memory" or a file
    members: list[Peer] = field(default_factory=list)
    lb: Child | None = None
    db: EmbeddedDB | None = None
    url: str = ""

    def __post_init__(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="mesh-dev-"))

    def _mesh(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mesh", *args]

    @property
    def lb_http(self) -> tuple[str, int]:
        assert self.lb is not None
        return self.lb.listening["http"]

    @property
    def lb_admin(self) -> tuple[str, int]:
        assert self.lb is not None
        return self.lb.listening["admin"]

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._start)
        except BaseException:
            await self.stop()
            raise

    def _start(self) -> None:
        if self.mongo_url:
            self.url = self.mongo_url
        else:
            self.db = EmbeddedDB(data=self.data)
            self.url = self.db.start()
        for n in range(1, self.peers + 1):
            name = f"{SERVICE}-{n}"
            app = Child(name, [sys.executable, "-m", "mesh.demo_peer", "--name", name], self._workdir)
            peer = Peer(name, app)
            self.members.append(peer)
            app.start(["http"])
        for i, peer in enumerate(self.members):
            dns_port = self.dns_port if (i == 0 and self.dns_port) else 0
            peer.sidecar = Child(
                f"sidecar-{peer.name}",
                self._mesh(
                    "sidecar", "--service", SERVICE, "--port", str(peer.port),
                    "--instance", peer.name, "--address", "127.0.0.1",
                    "--check", "http:/healthz", "--check-interval", str(self.check_interval),
                    "--check-timeout", str(self.check_interval), "--rise", "1", "--fall", "2",
                    "--lease-ttl", "3", "--drain", "0", "--dns-ttl", "1",
                    "--dns-listen", f"127.0.0.1:{dns_port}", "--admin", "127.0.0.1:0", "--upstream", "none",
                    "--mongo-url", self.url,
                ),
                self._workdir,
            )  # fmt: skip
            peer.sidecar.start(["dns", "admin"])
        self.lb = Child(
            "lb",
            self._mesh(
                "lb", "--listen", f"127.0.0.1:{self.lb_port}", "--admin", f"127.0.0.1:{self.admin_port}",
                "--service", SERVICE, "--mongo-url", self.url, "--policy", "maglev",
                "--hash-on", f"header:{HASH_HEADER}", "--health-path", "/healthz", "--health-interval", "1",
                "--retries", "2",
            ),
            self._workdir,
        )  # fmt: skip
        self.lb.start(["http", "admin"])

    def kill_peer(self, index: int) -> Peer:
        """SIGKILL a peer's app (its sidecar notices through its health check)."""
        peer = self.members[index]
        peer.app.kill()
        return peer

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        if self.lb:
            self.lb.terminate()
        for peer in self.members:
            if peer.sidecar:
                peer.sidecar.terminate()
        for peer in self.members:
            peer.app.terminate()
        if self.db:
            self.db.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def children(self) -> list[Child]:
        out = [p.app for p in self.members] + [p.sidecar for p in self.members if p.sidecar]
        return out + ([self.lb] if self.lb else [])

    def pids(self) -> list[int]:
        pids = [c.proc.pid for c in self.children() if c.proc]
        if self.db and self.db.pid:
            pids.append(self.db.pid)
        return pids


