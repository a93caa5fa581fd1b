"""Run a compose file the way Docker would, as far as one machine without an engine allows.

- Each service gets a network namespace on a bridge that stands for the compose network;
  ``network_mode: "service:X"`` puts a service in X's namespace (the sidecar pattern). A
  ``host`` namespace on the same bridge stands for the Docker host: published ports are
  relayed from its addresses (docker-proxy), and the tests' clients run there.
- Every namespace gets Docker's resolver at 127.0.0.11 (``compose_net.py dns``): it answers
  the service names and forwards the rest to the servers in the service's ``dns:``. Its
  ``resolv.conf`` is Docker's (``nameserver 127.0.0.11``, ``ndots:0``) and its ``hosts`` file
  names only itself, both through ``/etc/netns/<namespace>/``, which ``ip netns exec``
  mounts over ``/etc``. ``net.ipv4.ip_unprivileged_port_start`` is 0, as Docker sets it.
- ``command``/``entrypoint`` run as written, with ``environment``, for the image this
  repository builds (entrypoint ``mesh``, ``/examples`` and ``/opt/mesh/bin`` mapped onto
  this tree). They run with no capabilities, as the image's non-root user would.
- ``depends_on`` conditions are waited for (started, healthy, completed successfully);
  ``healthcheck`` commands run in the service's namespace as written, first after one
  ``interval``. ``stop`` is compose's: dependents first, SIGTERM, ``stop_grace_period``
  (10 s), SIGKILL.
- MongoDB is the one part that cannot run as itself. Its image is replaced, in
  ``_mongo_override`` and nowhere else, by the embedded server listening at the service's
  name and port, and every MongoDB URL loses its ``replicaSet`` option (the embedded server
  is standalone). The runner prints each override it applies.

Not done: restart policies, volumes, hostnames (UTS namespaces), IPv6 on the network.

    python -m tests.system.compose_run [compose.yaml]      # as root; Ctrl-C to stop
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml

from tests.system.netns import Host, Topology, wait_for

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
NET_HELPER = Path(__file__).with_name("compose_net.py")
NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
STOP_GRACE = 10.0  # s, Docker's default stop timeout
DOCKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # python:3.11-slim


class ComposeError(Exception):
    """What ``docker compose up`` would refuse or report as failed."""


@dataclass
class Image:
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    paths: dict[str, str]  # path in the image -> path here


# The image this repository's Dockerfile builds.
MESH_IMAGE = Image(
    entrypoint=["mesh"],
    cmd=["--help"],
    env={"PATH": f"{VENV_BIN}:{DOCKER_PATH}", "PYTHONUNBUFFERED": "1"},
    paths={"/examples/": f"{REPO}/examples/", "/opt/mesh/bin/": f"{VENV_BIN}/"},
)


def duration(value: str | int | float | None, default: float) -> float:
    """Compose's durations: ``5s``, ``1m30s``, ``500ms``, or a number of seconds."""
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ComposeError(f"bad duration {value!r}")
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def _strip_replica_set(url: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "replicaSet"]
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass
class Service:
    name: str
    spec: dict
    ns: Host | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    health_argv: list[str] | None = None
    proc: subprocess.Popen | None = None
    health: str | None = None  # None (no healthcheck), starting, healthy, unhealthy
    term_at: float | None = None  # wall clock of the SIGTERM that stopped it
    exited_at: float | None = None
    log: Path | None = None
    proxies: list[subprocess.Popen] = field(default_factory=list)

    @property
    def depends_on(self) -> dict[str, str]:
        deps = self.spec.get("depends_on") or {}
        if isinstance(deps, list):
            return {d: "service_started" for d in deps}
        return {d: (v or {}).get("condition", "service_started") for d, v in deps.items()}

    @property
    def shares(self) -> str | None:
        mode = self.spec.get("network_mode")
        if mode is None:
            return None
        if not mode.startswith("service:"):
            raise ComposeError(f"{self.name}: network_mode {mode!r} is not run here")
        return mode.removeprefix("service:")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Compose:
    """One compose file, up in namespaces. ``with Compose(file, logdir) as c: c.up()``."""

    def __init__(
        self, file: Path, logdir: Path, *, project: str = "mesh", say: Callable[[str], None] = print
    ) -> None:
        self.file = Path(file)
        self.logdir = Path(logdir)
        self.project = project
        self._say = say
        doc = yaml.safe_load(self.file.read_text())
        self.services = {n: Service(n, s or {}) for n, s in doc["services"].items()}
        self._topology: Topology | None = None
        self.host: Host | None = None
        self._helpers: list[subprocess.Popen] = []
        self._etc: list[Path] = []
        self._said: set[str] = set()
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def say(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            self._say(f"compose: {line}")
            with open(self.logdir / "compose.log", "a") as f:
                f.write(line + "\n")

    # Building

    def __enter__(self) -> Compose:
        try:
            self._plan()
            self._network()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.print_logs()
        self.close()

    def _plan(self) -> None:
        for svc in self.services.values():
            if svc.shares is not None and svc.shares not in self.services:
                raise ComposeError(f"{svc.name}: network_mode names unknown service {svc.shares}")
            for dep in svc.depends_on:
                if dep not in self.services:
                    raise ComposeError(f"{svc.name}: depends on unknown service {dep}")
            image = svc.spec.get("image", "")
            if image.startswith("mongo:"):
                self._mongo_override(svc)
            elif image == "mesh":
                self._mesh_image(svc)
            else:
                raise ComposeError(f"{svc.name}: image {image!r} cannot run here")
        self.order = self._topological()

    def _mesh_image(self, svc: Service) -> None:
        img = MESH_IMAGE
        entry = svc.spec.get("entrypoint", img.entrypoint)
        cmd = svc.spec.get("command", img.cmd if "entrypoint" not in svc.spec else [])
        entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
        cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        svc.argv = [self._image_path(a) for a in entry + cmd]
        env = svc.spec.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, os.environ.get(e, "")) for e in env)
        svc.env = {**img.env, **{k: str(v) for k, v in env.items()}}
        svc.argv = [self._url_override(a) for a in svc.argv]
        svc.env = {k: self._url_override(v) for k, v in svc.env.items()}
        check = svc.spec.get("healthcheck")
        if check and not check.get("disable"):
            test = check["test"]
            if isinstance(test, str):
                test = ["CMD-SHELL", test]
            if test[0] == "CMD":
                svc.health_argv = [self._image_path(a) for a in test[1:]]
            elif test[0] == "CMD-SHELL":
                svc.health_argv = ["/bin/sh", "-c", test[1]]
            elif test[0] != "NONE":
                raise ComposeError(f"{svc.name}: healthcheck test {test[0]!r}")
        self.say(f"image mesh: {', '.join(f'{k} is {v}' for k, v in img.paths.items())}")

    def _image_path(self, arg: str) -> str:
        for inside, here in MESH_IMAGE.paths.items():
            if arg.startswith(inside):
                return here + arg.removeprefix(inside)
        return arg

    def _url_override(self, value: str) -> str:
        if not value.startswith("mongodb://") or "replicaSet=" not in value:
            return value
        new = _strip_replica_set(value)
        self.say(f"override: {value} -> {new} (the embedded server is standalone)")
        return new

    def _mongo_override(self, svc: Service) -> None:
        """The one part that cannot run as itself: MongoDB (and its mongosh one-shots)."""
        cmd = svc.spec.get("command") or []
        cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        svc.env = dict(MESH_IMAGE.env)
        if cmd and cmd[0] == "mongosh":
            host = cmd[cmd.index("--host") + 1] if "--host" in cmd else "127.0.0.1"
            url = f"mongodb://{host}" if ":" in host else f"mongodb://{host}:27017"
            svc.argv = [sys.executable, "-c", _PING.format(url=url)]
            self.say(
                f"override: {svc.name} ({svc.spec['image']}: {shlex.join(cmd[:1])} ...) is replaced"
                f" by a ping of {url}: the embedded server has no replica set to initiate"
            )
            return
        port = int(cmd[cmd.index("--port") + 1]) if "--port" in cmd else 27017
        svc.argv = [sys.executable, "-m", "mesh", "db", "--host", "0.0.0.0", "--port", str(port)]
        svc.health_argv = [sys.executable, "-c", _PING.format(url=f"mongodb://127.0.0.1:{port}")]
        self.say(
            f"override: {svc.name} ({svc.spec['image']}) is replaced by the embedded MongoDB"
            f" wire-protocol server (mesh db) on port {port}; its healthcheck by a ping"
        )

    def _topological(self) -> list[str]:
        done: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in done:
                return
            if name in visiting:
                raise ComposeError(f"dependency cycle through {name}")
            visiting.add(name)
            svc = self.services[name]
            for dep in [*svc.depends_on, *([svc.shares] if svc.shares else [])]:
                visit(dep)
            visiting.discard(name)
            done.append(name)

        for name in self.services:
            visit(name)
        return done

    def _network(self) -> None:
        own = [s for s in self.services.values() if s.shares is None]
        self._topology = Topology(1 + len(own), prefix="cmp").__enter__()
        self.host = self._topology.hosts[0]
        for svc, ns in zip(own, self._topology.hosts[1:], strict=True):
            svc.ns = ns
        for svc in self.services.values():
            if svc.shares is not None:
                svc.ns = self.services[svc.shares].ns
        names: dict[str, str] = {}
        for svc in own:
            names[svc.name] = svc.ns.address
            names[f"{self.project}-{svc.name}-1"] = svc.ns.address
        (self.logdir / "names.json").write_text(json.dumps(names))
        self.say("each namespace: net.ipv4.ip_unprivileged_port_start=0 (as Docker sets it)")
        self.say("commands run with no capabilities, as the image's non-root user")
        for svc in own:
            etc = Path("/etc/netns") / svc.ns.name
            etc.mkdir(parents=True, exist_ok=True)
            self._etc.append(etc)
            (etc / "resolv.conf").write_text("nameserver 127.0.0.11\noptions ndots:0\n")
            (etc / "hosts").write_text(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                f"{svc.ns.address}\t{self.project}-{svc.name}-1\n"
            )
            svc.ns.run(["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"])
            for key, value in (svc.spec.get("sysctls") or {}).items():
                svc.ns.run(["sysctl", "-qw", f"{key}={value}"])
            forward = svc.spec.get("dns") or []
            forward = [forward] if isinstance(forward, str) else [str(f) for f in forward]
            argv = [
                sys.executable,
                str(NET_HELPER),
                "dns",
                "--names",
                str(self.logdir / "names.json"),
            ]
            argv += [a for f in forward for a in ("--forward", f)]
            self._helpers.append(self._spawn(svc.ns, argv, f"dns-{svc.name}", caps=True))
        for svc in own:
            wait_for(
                f"Docker's resolver in {svc.name}",
                lambda svc=svc: (
                    svc.ns.run(["getent", "hosts", svc.name], check=False).returncode == 0
                ),
                10,
            )

    def _spawn(
        self, ns: Host, argv: Sequence[str], label: str, *, env=None, caps: bool = False
    ) -> subprocess.Popen:
        return spawn(ns, argv, self.logdir / f"{label}.log", env=env, caps=caps)

    # Running

    def up(self, timeout: float = 90.0) -> None:
        """``docker compose up --wait``: start in dependency order; return when every
        service is running (and healthy, if it has a healthcheck) or has completed."""
        deadline = time.monotonic() + timeout
        for name in self.order:
            svc = self.services[name]
            for dep, cond in svc.depends_on.items():
                self._wait_condition(svc, self.services[dep], cond, deadline)
            self._start(svc)
        for svc in self.services.values():
            if svc.health_argv is not None:
                self._wait_condition(svc, svc, "service_healthy", deadline)

    def _wait_condition(self, svc: Service, dep: Service, cond: str, deadline: float) -> None:
        def met() -> bool:
            if cond == "service_started":
                return dep.proc is not None
            if cond == "service_healthy":
                if dep.health == "unhealthy":
                    raise ComposeError(f"{dep.name} is unhealthy ({svc.name} waits for it)")
                if dep.health is None:
                    raise ComposeError(f"{dep.name} has no healthcheck ({svc.name} waits for it)")
                return dep.health == "healthy"
            if cond == "service_completed_successfully":
                code = dep.proc.poll() if dep.proc else None
                if code not in (None, 0):
                    raise ComposeError(f"{dep.name} exited with {code} ({svc.name} waits for it)")
                return code == 0
            raise ComposeError(f"{svc.name}: depends_on condition {cond!r}")

        if svc is not dep:
            self.say(f"{svc.name} waits for {dep.name}: {cond}")
        while not met():
            if time.monotonic() > deadline:
                raise ComposeError(f"{svc.name}: {dep.name} not {cond} in time")
            if (
                dep.proc is not None
                and dep.proc.poll() is not None
                and cond != ("service_completed_successfully")
            ):
                raise ComposeError(f"{dep.name} exited with {dep.proc.returncode}")
            time.sleep(0.1)

    def _start(self, svc: Service) -> None:
        self.say(f"start {svc.name}: {shlex.join(svc.argv)}")
        svc.log = self.logdir / f"{svc.name}.log"
        svc.proc = self._spawn(svc.ns, svc.argv, svc.name, env=svc.env)
        for port in svc.spec.get("ports") or []:
            svc.proxies.append(self._publish(svc, port))
        if svc.health_argv is not None:
            svc.health = "starting"
            threading.Thread(target=self._health, args=(svc,), daemon=True).start()

    def _publish(self, svc: Service, port) -> subprocess.Popen:
        if not isinstance(port, str) or port.endswith("/udp"):
            raise ComposeError(f"{svc.name}: ports entry {port!r} is not run here")
        parts = port.removesuffix("/tcp").split(":")
        if len(parts) == 2:
            parts = ["0.0.0.0", *parts]
        if len(parts) != 3:
            raise ComposeError(f"{svc.name}: ports entry {port!r} is not run here")
        ip, host_port, inside = parts
        self.say(f"publish {svc.name}: host {ip}:{host_port} -> {svc.ns.address}:{inside}")
        argv = [sys.executable, str(NET_HELPER), "proxy", "--listen", f"{ip}:{host_port}"]
        argv += ["--to", f"{svc.ns.address}:{inside}"]
        proc = self._spawn(self.host, argv, f"proxy-{svc.name}-{host_port}", caps=True)
        self._helpers.append(proc)
        return proc

    def _health(self, svc: Service) -> None:
        check = svc.spec.get("healthcheck") or {}
        interval = duration(check.get("interval"), 30.0)
        timeout = duration(check.get("timeout"), 30.0)
        retries = int(check.get("retries", 3))
        failures = 0
        while not self._stopping.wait(interval) and svc.running:
            try:
                ok = self.exec(svc.name, svc.health_argv, timeout=timeout, check=False)
                passed = ok.returncode == 0
            except subprocess.TimeoutExpired:
                passed = False
            if not svc.running:
                return
            failures = 0 if passed else failures + 1
            new = "healthy" if passed else ("unhealthy" if failures >= retries else svc.health)
            if new != svc.health:
                self.say(f"{svc.name}: {new}")
                svc.health = new

    def exec(
        self, name: str, argv: Sequence[str], *, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess:
        """``docker compose exec``: ``argv`` in the service's namespace with its env."""
        svc = self.services[name]
        return svc.ns.run(
            [*NO_CAPS, *argv], timeout=timeout, check=check, env=svc.env or MESH_IMAGE.env
        )

    def on_host(self, argv: Sequence[str], *, timeout: float = 30, check: bool = True):
        """A command on the Docker host (where the published ports are)."""
        return self.host.run(list(argv), timeout=timeout, check=check)

    def stop(self, *names: str) -> None:
        """``docker compose stop``: dependents first; SIGTERM, the grace period, SIGKILL."""
        for name in reversed(self.order):
            svc = self.services[name]
            if name not in names or not svc.running:
                continue
            grace = duration(svc.spec.get("stop_grace_period"), STOP_GRACE)
            self.say(f"stop {name}: SIGTERM, SIGKILL after {grace:g} s")
            svc.term_at = time.time()
            svc.proc.send_signal(signal.SIGTERM)
            try:
                svc.proc.wait(grace)
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait()
            self._exited(svc)

    def kill(self, *names: str, sig: int = signal.SIGKILL) -> None:
        """``docker compose kill``."""
        for name in names:
            svc = self.services[name]
            if svc.running:
                self.say(f"kill {name}: {signal.Signals(sig).name}")
                svc.proc.send_signal(sig)
                svc.proc.wait(10)
                self._exited(svc)

    def _exited(self, svc: Service) -> None:
        svc.exited_at = time.time()
        for proxy in svc.proxies:  # the published ports go with the container
            proxy.kill()
        self.say(f"{svc.name} exited with {svc.proc.returncode}")

    def print_logs(self) -> None:
        print_logs(self.logdir)

    def close(self) -> None:
        self._stopping.set()
        procs = [s.proc for s in self.services.values() if s.proc is not None] + self._helpers
        tear_down(procs, self._topology, self._etc)
        self._topology = None


def print_logs(logdir: Path, tail: int = 2000) -> None:
    for log in sorted(logdir.glob("*.log")):
        print(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}")


def tear_down(procs: list[subprocess.Popen], topology: Topology | None, etc: list[Path]) -> None:
    """Kill ``procs``, remove the namespaces and their /etc/netns files."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    if topology is not None:
        topology.close()
    for d in etc:
        shutil.rmtree(d, ignore_errors=True)
    etc.clear()


def spawn(
    ns: Host, argv: Sequence[str], log: Path, *, env=None, caps: bool = False
) -> subprocess.Popen:
    """``argv`` in namespace ``ns``, its output appended to ``log``; with no capabilities
    unless ``caps`` (the engine's own helpers keep theirs)."""
    with open(log, "ab") as out:
        return ns.popen(
            [*([] if caps else NO_CAPS), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )


_PING = (
    "import pymongo; pymongo.MongoClient({url!r}, serverSelectionTimeoutMS=3000)"
    ".admin.command('ping')"
)


def main(argv: Sequence[str] = sys.argv[1:]) -> int:
    import tempfile

    file = Path(argv[0]) if argv else REPO / "compose.yaml"
    logdir = Path(tempfile.mkdtemp(prefix="compose-"))
    try:
        with Compose(file, logdir) as compose:
            compose.up()
            print(f"compose: up; logs in {logdir}; the host is namespace {compose.host.name}")
            print(f"compose: try  ip netns exec {compose.host.name} curl 127.0.0.1:8080/")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except ComposeError as exc:
        print(f"compose: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
