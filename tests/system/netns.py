"""Several "hosts" on one machine: network namespaces on a bridge, built with pyroute2.

The bridge lives in a hub namespace of its own, so no interface of the topology is in the
root namespace and nothing there can route to a host address by mistake (the root
namespace's default route leads off the machine). Tests talk to the hosts only from inside
them: ``Host.run`` / ``Host.popen`` run a command in the host's namespace.

    with Topology(3) as topo:
        a = topo.hosts[0]
        a.run(["ip", "-br", "addr"])

Everything is removed on exit, also when the test fails.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from pyroute2 import NetNS, netns


def available() -> str | None:
    """None if namespaces can be built here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if subprocess.run(["ip", "-V"], capture_output=True).returncode != 0:
        return "iproute2 (ip) is not installed"
    return None


@dataclass
class Host:
    name: str  # namespace name
    address: str  # IPv4 address on the bridge
    ifname: str = "eth0"

    def cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 30, check: bool = True, **kw
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.cmd(argv), capture_output=True, text=True, timeout=timeout, check=check, **kw
        )

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(argv), **kw)

    def link(self, up: bool) -> None:
        """Set the host's interface down (a network partition) or up again."""
        with NetNS(self.name) as ns:
            idx = ns.link_lookup(ifname=self.ifname)[0]
            ns.link("set", index=idx, state="up" if up else "down")


class Topology:
    """``n`` hosts on one bridge, subnet 10.<a>.<b>.0/24 picked at random per topology."""

    def __init__(self, n: int, *, prefix: str = "mesh") -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(1000):03d}"
        self._hub = f"{prefix}hub{tag}"
        self._prefix = f"{prefix}{tag}"
        a, b = random.randrange(100, 250), random.randrange(1, 250)
        self.subnet = f"10.{a}.{b}.0/24"
        self.hosts = [Host(f"{self._prefix}h{i}", f"10.{a}.{b}.{i + 10}") for i in range(n)]
        self._created: list[str] = []

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        netns.create(self._hub)
        self._created.append(self._hub)
        with NetNS(self._hub) as hub:
            hub.link("add", ifname="br0", kind="bridge")
            br = hub.link_lookup(ifname="br0")[0]
            hub.link("set", index=br, state="up")
            lo = hub.link_lookup(ifname="lo")[0]
            hub.link("set", index=lo, state="up")
            for i, host in enumerate(self.hosts):
                netns.create(host.name)
                self._created.append(host.name)
                # Create the pair inside the hub, then move one end into the host.
                hub.link(
                    "add",
                    ifname=f"v{i}",
                    kind="veth",
                    peer={"ifname": host.ifname, "net_ns_fd": host.name},
                )
                v = hub.link_lookup(ifname=f"v{i}")[0]
                hub.link("set", index=v, master=br, state="up")
                with NetNS(host.name) as ns:
                    idx = ns.link_lookup(ifname=host.ifname)[0]
                    ns.addr("add", index=idx, address=host.address, prefixlen=24)
                    ns.link("set", index=idx, state="up")
                    ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")

    def close(self) -> None:
        for name in reversed(self._created):
            try:
                netns.remove(name)
            except OSError:
                pass
        self._created.clear()


# GETs from inside a host to a list of URLs in turn: 10 at a time, an x-user key each, each
# client pausing `gap` after each answer, until `count` answers or `seconds` pass. Prints
# the statuses (or exceptions' names) counted, and when each answering body (a peer's name)
# was last seen (wall clock).
LOAD = """
import asyncio, json, sys, time
import aiohttp

async def main(count, seconds, gap, urls):
    counts, last = {}, {}
    deadline = time.monotonic() + seconds
    sent = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        async def one():
            nonlocal sent
            while sent < count and time.monotonic() < deadline:
                sent += 1
                url = urls[sent % len(urls)]
                try:
                    async with s.get(url, headers={"x-user": f"u{sent}"}) as r:
                        body = (await r.text()).strip()
                        key = str(r.status)
                        if r.status == 200:
                            last[body] = time.time()
                except Exception as exc:
                    key = type(exc).__name__
                counts[key] = counts.get(key, 0) + 1
                await asyncio.sleep(gap)
        await asyncio.gather(*(one() for _ in range(10)))
    print(json.dumps({"counts": counts, "last": last}))

asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]))
"""


def start_load(
    host: Host, urls: Sequence[str], count: int, seconds: float, gap: float = 0.01
) -> subprocess.Popen:
    """The LOAD client in ``host``, bounded by ``count`` requests and ``seconds``."""
    import sys

    return host.popen(
        [sys.executable, "-c", LOAD, str(count), str(seconds), str(gap), *urls],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def load_result(proc: subprocess.Popen, timeout: float = 120) -> dict:
    """``{"counts": {status: n}, "last": {body: wall clock}}`` of a finished load."""
    import json

    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out)


def drive(host: Host, port: int, n: int, gap: float = 0.0) -> dict[str, int]:
    """``n`` GETs from inside ``host`` to its own address at ``port`` (the LOAD client):
    how many got each status, or each exception's name."""
    load = start_load(host, [f"http://{host.address}:{port}/"], n, seconds=110, gap=gap)
    return load_result(load)["counts"]


def wait_for(what: str, check, deadline: float = 40.0) -> float:
    """Seconds until ``check()`` holds, polled every 0.2 s; AssertionError after ``deadline``."""
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline:
        if check():
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def mesh(*args: str) -> list[str]:
    """The ``mesh`` command as a user runs it, for ``Host.popen``."""
    import sys

    return [sys.executable, "-m", "mesh", *args]


class Processes:
    """Processes started inside hosts, each logging to a file; on a failure the tail of every
    log is printed, and everything is killed on exit.

        with Processes(tmp_path) as procs:
            procs.start(host, mesh("db", ...), "db")
    """

    def __init__(self, logdir) -> None:
        from pathlib import Path

        self._dir = Path(logdir)
        self._procs: list[subprocess.Popen] = []
        self._logs: list[tuple[str, object]] = []

    def start(self, host: Host, argv: Sequence[str], label: str) -> subprocess.Popen:
        log = open(self._dir / f"{label}.log", "wb")  # noqa: SIM115 - closed in __exit__
        self._logs.append((label, log))
        proc = host.popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self._procs.append(proc)
        return proc

    def start_web_peer(
        self,
        host: Host,
        index: int,
        *,
        mongo_url: str,
        app_port: int,
        dns: str = "127.0.0.1:53",
        extra: Sequence[str] = (),
    ) -> subprocess.Popen:
        """An HTTP app on ``host`` and its sidecar (service ``web``, instance ``peer<index>``,
        DNS at ``dns`` in the host, address found by the sidecar, ``extra`` flags). Returns
        the sidecar."""
        import sys

        self.start(
            host,
            [sys.executable, "-m", "http.server", str(app_port), "--bind", host.address],
            f"app{index}",
        )
        return self.start(
            host,
            mesh(
                "sidecar", "--service", "web", "--port", str(app_port), "--instance", f"peer{index}",
                "--check", "http:/", "--check-interval", "0.5", "--drain", "0.5",
                "--dns-listen", dns, "--admin", "127.0.0.1:0", "--upstream", "none", "--mongo-url", mongo_url, *extra,
            ),
            f"sidecar{index}",
        )  # fmt: skip

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import contextlib

        if exc_type is not None:
            for label, log in self._logs:
                log.flush()
                tail = (self._dir / f"{label}.log").read_text(errors="replace")[-1500:]
                print(f"--- {label}\n{tail}")
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in self._procs:
            proc.wait(timeout=10)
        for _, log in self._logs:
            log.close()
