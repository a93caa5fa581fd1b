"""Start and stop the embedded MongoDB wire-protocol server (nx-27017) as a child process.

It is the dev-mode and CI database; production uses MongoDB. The server binds port 0 when
asked for no port, and we read the port it got from its log: no free-port guessing, so no
race with other processes picking the same number.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError

START_TIMEOUT = 15.0  # s; it starts in ~0.3 s on an idle machine, CI machines may be loaded
_LISTENING = re.compile(rb"Listening on (\S+):(\d+)")


class EmbeddedDBError(RuntimeError):
    pass


def server_command(*, host: str, port: int, data: str, workdir: Path) -> list[str]:
    """The nx-27017 command line. Its own log and pid files: the defaults are shared /tmp paths."""
    exe = shutil.which("nx-27017", path=os.path.dirname(sys.executable)) or shutil.which("nx-27017")
    prefix = [exe] if exe else [sys.executable, "-m", "nx_27017"]
    db = "memory" if data == "memory" else str(Path(data).resolve())
    return [
        *prefix,
        "--db", db,
        "--host", host,
        "--port", str(port),
        "--log-file", str(workdir / "nx-27017.log"),
        "--pid-file", str(workdir / "nx-27017.pid"),
    ]  # fmt: skip


class EmbeddedDB:
    """One nx-27017 child process. ``start()`` returns once ``ping`` answers."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, data: str = "memory") -> None:
        self.host = host
        self.port = port
        self.data = data
        self._workdir = Path(tempfile.mkdtemp(prefix="mesh-db-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._out = self._workdir / "stdout.log"

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self.running else "stopped"
        return f"<EmbeddedDB {self.host}:{self.port} data={self.data} {state}>"

    @property
    def url(self) -> str:
        return f"mongodb://{self.host}:{self.port}/mesh"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = START_TIMEOUT) -> str:
        if self.running:
            return self.url
        cmd = server_command(host=self.host, port=self.port, data=self.data, workdir=self._workdir)
        with open(self._out, "wb") as out:
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            self.port = self._wait_port(deadline)
            self._wait_ping(deadline)
        except BaseException:
            self.kill()
            raise
        return self.url

    def _wait_port(self, deadline: float) -> int:
        while time.monotonic() < deadline:
            text = self._out.read_bytes()  # truncated at each start, so one server's lines
            match = _LISTENING.search(text)
            if match:
                return int(match.group(2))
            if self._proc is not None and self._proc.poll() is not None:
                tail = text.decode(errors="replace").strip().splitlines()[-3:]
                raise EmbeddedDBError(f"embedded database exited: {' | '.join(tail)}")
            time.sleep(0.02)
        raise EmbeddedDBError(f"embedded database did not start within {START_TIMEOUT:g} s")

    def _wait_ping(self, deadline: float) -> None:
        while True:
            client: MongoClient = MongoClient(self.url, serverSelectionTimeoutMS=500)
            try:
                client.admin.command("ping")
                return
            except PyMongoError as exc:
                if time.monotonic() > deadline:
                    raise EmbeddedDBError(
                        f"embedded database does not answer ping: {exc}"
                    ) from None
            finally:
                client.close()
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``. Keeps the port for ``start()`` again."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: the database vanishes the way a crashed server does."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedDB:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
