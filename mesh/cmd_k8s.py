"""``mesh k8s inject [FILE|-] --service NAME --port PORT [-- SIDECAR FLAGS]``: the Kubernetes
workloads of FILE (or stdin) with the mesh sidecar added (see ``mesh/k8s.py``), as YAML on
stdout, like ``linkerd inject --manual``. Flags after ``--`` are the sidecar's own
(``--check http:/healthz``, ``--tag``, ``--drain``...), checked by its parser. A workload it
cannot inject is one line on stderr and exit 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from mesh import __version__
from mesh.cli import Command
from mesh.config import ConfigError, Option, format_host_port, integer, ip_address, text
from mesh.k8s import RESERVED, InjectError, Settings, inject_documents


def _secret(value: Any) -> tuple[str, str]:
    name, _, key = str(value).partition(":")
    if not name:
        raise ValueError(f"must be NAME or NAME:KEY, got {value!r}")
    return name, key or "mongo-url"


OPTIONS = (
    Option("service", text, None, "service name the sidecar registers (required)", metavar="NAME"),
    Option("port", integer(1, 65535), None, "the app's port (required)", metavar="PORT"),
    Option("image", text, f"mesh:{__version__}", "the sidecar's image", metavar="IMAGE"),
    Option("mongo-url-secret", _secret, ("mesh-registry", "mongo-url"), "Secret (in the workload's namespace) holding the registry URL, NAME[:KEY]", metavar="NAME[:KEY]"),
    Option("cluster-dns", ip_address, "10.96.0.10", "the cluster DNS Service's IP, the pod's second nameserver (kubectl -n kube-system get svc kube-dns)", metavar="IP"),
)  # fmt: skip


class _Dumper(yaml.SafeDumper):
    """Block YAML with sequences indented under their key, as kubectl and yamllint write it."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def dump(docs: list[Any]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["inject"], help="inject: add the sidecar")
    p.add_argument("file", nargs="?", default="-", metavar="FILE", help="YAML file, or - for stdin")
    p.epilog = "Flags after -- are the sidecar's own (mesh sidecar --help)."


def settings(values: dict[str, Any], flags: list[str]) -> Settings:
    """The injection settings; the sidecar flags are checked by ``mesh sidecar``'s parser."""
    from mesh.cli import parse

    for flag in flags:
        reason = RESERVED.get(flag.split("=", 1)[0])
        if reason:
            raise ConfigError(f"sidecar flag {flag.split('=', 1)[0]}: not given here: {reason}")
    if values["service"] is None or values["port"] is None:
        raise ConfigError("--service and --port are required")
    argv = ["sidecar", "--service", values["service"], "--port", str(values["port"]), *flags]
    _, sidecar, _ = parse(argv, env={})
    secret, key = values["mongo_url_secret"]
    return Settings(
        service=sidecar["service"],
        port=sidecar["port"],
        image=values["image"],
        secret=secret,
        secret_key=key,
        cluster_dns=values["cluster_dns"],
        sidecar_flags=tuple(flags),
        domain=sidecar["domain"],
        drain=sidecar["drain"],
        dns_ttl=sidecar["dns_ttl"],
        admin=format_host_port(sidecar["admin"]),
    )


def run(values: dict[str, Any], ns: argparse.Namespace) -> int:
    s = settings(values, ns.passthrough)
    try:
        if ns.file == "-":
            source = sys.stdin.read()
        else:
            with open(ns.file, encoding="utf-8") as f:
                source = f.read()
    except OSError as exc:
        print(f"mesh k8s inject: error: {ns.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        docs = list(yaml.safe_load_all(source))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        print(f"mesh k8s inject: error: {ns.file}: not YAML{at}: {problem}", file=sys.stderr)
        return 2
    try:
        out = inject_documents(docs, s)
    except InjectError as exc:
        print(f"mesh k8s inject: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(dump(out))
    return 0


COMMAND = Command(
    "k8s",
    "Kubernetes: inject the sidecar into Deployments, StatefulSets and DaemonSets",
    OPTIONS,
    run,
    setup=_setup,
    config_file=False,
    passthrough=True,
)
