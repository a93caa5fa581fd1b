"""``make perf``: mesh measured beside nginx, HAProxy, dnsmasq and unbound, one table of ratios.

    .venv/bin/python -m perf [--quick] [--out perf/RESULTS.md]

Each section returns rows (figure, mesh, peer, ratio, target). Tools missing on the machine
are installed from the Debian packages when running as root; otherwise their rows say
what was skipped. ``--quick`` runs a reduced version in under a minute, to check that the
harness itself works (CI asserts only that it completes and produced every row).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mesh import runtime

DEBIAN_TOOLS = {"nginx": "nginx-light", "haproxy": "haproxy", "dnsmasq": "dnsmasq-base", "unbound": "unbound", "wrk": "wrk", "dnsperf": "dnsperf"}


@dataclass
class Row:
    figure: str
    mesh: float | None
    peer: float | None
    peer_name: str
    target: str
    unit: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.mesh is None or self.peer in (None, 0):
            return None
        return self.mesh / self.peer

    def cells(self) -> list[str]:
        def fmt(v: float | None) -> str:
            if v is None:
                return "skipped"
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"

        ratio = "" if self.ratio is None else f"{self.ratio:.2f}×"
        peer = f"{fmt(self.peer)} ({self.peer_name})" if self.peer_name else fmt(self.peer)
        figure = f"{self.figure} [{self.unit}]" if self.unit else self.figure
        if self.note:
            figure += f" — {self.note}"
        return [figure, fmt(self.mesh), peer if self.peer is not None or self.peer_name else "", ratio, self.target]


def ensure_tools() -> list[str]:
    """Install the comparison tools when root and missing; return what is still missing."""
    missing = [t for t in DEBIAN_TOOLS if not shutil.which(t) and not Path(f"/usr/sbin/{t}").exists()]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        pkgs = [DEBIAN_TOOLS[t] for t in missing]
        print(f"perf: installing {' '.join(pkgs)} ...", file=sys.stderr, flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], check=False, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
        missing = [t for t in DEBIAN_TOOLS if not shutil.which(t) and not Path(f"/usr/sbin/{t}").exists()]
    for tool in missing:
        print(f"perf: {tool} is not installed (not root or no apt): its rows are skipped", file=sys.stderr)
    return missing


# Sections


def hashing_rows(quick: bool) -> list[Row]:
    from perf.hashing import figures

    keys = 20_000 if quick else 100_000
    rows = []
    for n in (3, 10, 50):
        f = figures(n, keys)
        rows.append(Row(f"Maglev max/avg load, N={n}", f["maglev"]["max_avg"], f["ketama"]["max_avg"],
                        "uhashring ketama", "≤ 1.05"))  # fmt: skip
        rows.append(Row(f"ring hash max/avg load, N={n}", f["ring_hash"]["max_avg"], f["ketama"]["max_avg"],
                        "uhashring ketama", "same keys as ketama"))  # fmt: skip
        for kind in ("maglev", "ring_hash"):
            rows.append(Row(f"{kind} keys moved when one of {n} leaves", f[kind]["moved_remove"],
                            f["ideal"]["moved_remove"], "ideal 1/N", "≤ 1.1× ideal"))  # fmt: skip
            rows.append(Row(f"{kind} keys moved when one joins {n}", f[kind]["moved_add"],
                            f["ideal"]["moved_add"], "ideal 1/(N+1)", "≤ 1.1× ideal"))  # fmt: skip
    return rows


def registry_rows(quick: bool) -> list[Row]:
    from perf.registry_bench import bench, fleet

    n = 1000 if quick else 10_000
    out = runtime.run(bench(n, 2.0 if quick else 10.0, 50))
    rows = [
        Row(f"registry lease renewals/s ({n:,} instances, 50 renewers)", out["renewals_per_s"], None, "", "≥ 1,000/s", "1/s"),
        Row(f"registry list() of {n:,} instances", out["list_ms"], None, "", "", "ms"),
        Row("registry watch latency p50 (write → snapshot)", out["watch_p50_ms"], None, "", "≤ 300 ms", "ms"),
    ]
    # 3,000 instances with 100 watchers is past what the embedded server serves (its
    # renewals fall behind and leases lapse): run by hand, see README's registry section.
    fleets = [(100, 3)] if quick else [(1000, 20), (1000, 100), (3000, 20)]
    for instances, watchers in fleets:
        at = f"N={instances:,} W={watchers}"
        try:
            f = runtime.run(fleet(instances, watchers, 4.0 if quick else 20.0))
        except TimeoutError:
            # Past the embedded server's limit a watcher can miss a change for its whole
            # 30 s wait; that is the figure, not a reason to drop the rest of the run.
            rows.append(Row(f"fleet {at}: a watcher missed a change for 30 s (embedded server saturated)", None, None, "", "", ""))
            continue
        rows += [
            Row(f"fleet {at}: renewals/s done (needed {f['renewals_needed_per_s']:,.0f})", f["renewals_per_s"], None, "", "= needed", "1/s"),
            Row(f"fleet {at}: leases that lapsed while renewing (registered again)", f["renewals_lost"], None, "", "0", ""),
            Row(f"fleet {at}: first sync of every watcher", f["first_sync_all_watchers_s"], None, "", "", "s"),
            Row(f"fleet {at}: documents read per watcher per second while renewing", f["docs_read_per_watcher_s"], None, "", "≤ 1", "1/s",
                note=f"{f['full_reads']:,.0f} full reads in the window"),
            Row(f"fleet {at}: database operations/s while renewing (renewals + counter polls + lapse checks)", f["renewals_per_s"] + f["counter_polls_per_s"] + f["lapse_checks_per_s"], None, "", "", "1/s",
                note=f"{f['renewals_per_s']:,.0f} + {f['counter_polls_per_s']:,.0f} + {f['lapse_checks_per_s']:,.0f}"),
            Row(f"fleet {at}: status change → every watcher, p50", f["status_p50_ms"], None, "", "", "ms"),
            Row(f"fleet {at}: status change → every watcher, max of 10", f["status_max_ms"], None, "", "", "ms"),
            Row(f"fleet {at}: lapse → every watcher, max of 5", f["lapse_max_ms"], None, "", "≤ 1,500 ms", "ms"),
            Row(f"fleet {at}: database process CPU while renewing", f["db_cpu"] * 100, None, "", "", "% of a core"),
        ]
    return rows


def propagation_rows(quick: bool) -> list[Row]:
    from perf.propagation import run_all

    out = runtime.run(run_all(10 if quick else 100))
    return [
        Row("register → sidecar DNS answer, p50", out["register_to_dns_p50_ms"], None, "", "", "ms"),
        Row("register → sidecar DNS answer, p99", out["register_to_dns_p99_ms"], 200.0, "target", "≤ 200 ms", "ms"),
        Row("register → LB endpoint set, p50", out["register_to_lb_p50_ms"], None, "", "", "ms"),
        Row("register → LB endpoint set, p99", out["register_to_lb_p99_ms"], 200.0, "target", "≤ 200 ms", "ms"),
        Row("peer death → out of LB routing", out["death_to_lb_out_ms"], 1000.0, "target", "≤ 1 s", "ms"),
        Row("peer death → out of DNS (check every 2 s, fall 2)", out["death_to_dns_out_ms"], None, "", "", "ms"),
    ]


SECTIONS: dict[str, Callable[[bool], list[Row]]] = {
    "hashing": hashing_rows,
    "registry": registry_rows,
    "propagation": propagation_rows,
}


def _optional_sections() -> None:
    """LB and DNS benchmarks live in their own modules; each exposes ``rows(quick)``."""
    for name, module in (
        ("native", "perf.native_bench"),
        ("lb", "perf.lb_bench"),
        ("dns", "perf.dns_bench"),
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        if hasattr(mod, "rows"):
            SECTIONS[name] = mod.rows


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for pkg in ("uvloop", "httptools", "dnspython", "pymongo", "nx-27017"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    for tool, flag in (("nginx", "-v"), ("haproxy", "-v"), ("dnsmasq", "--version"), ("unbound", "-V"), ("wrk", "--version")):
        exe = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
        if exe:
            out = subprocess.run([exe, flag], capture_output=True, text=True)
            first = (out.stdout or out.stderr).strip().splitlines()
            if first:
                line = first[0].strip()
                versions.append(line if tool in line.lower() else f"{tool} {line}")
    return (
        f"{os.cpu_count()} cores, {model or platform.processor()}, Linux {platform.release()}, "
        f"Python {platform.python_version()}\n\nVersions: {'; '.join(versions)}"
    )


def render(rows: list[Row], quick: bool) -> str:
    head = ["figure", "mesh", "peer", "ratio", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    kind = "quick run (reduced; not for comparison)" if quick else "full run"
    models = (Path(__file__).parent / "models.md").read_text()
    return (
        f"# mesh performance\n\n{when}, {kind}. Machine: {machine()}\n\n"
        + "\n".join(lines)
        + "\n\n"
        + models
    )


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m perf")
    p.add_argument("--quick", action="store_true", help="reduced run, under a minute")
    p.add_argument("--only", action="append", help="run only these sections")
    p.add_argument("--out", default=None, help="markdown file to write (default: perf/RESULTS.md, not with --quick)")
    a = p.parse_args()
    ensure_tools()
    _optional_sections()
    rows: list[Row] = []
    for name, section in SECTIONS.items():
        if a.only and name not in a.only:
            continue
        print(f"perf: {name} ...", file=sys.stderr, flush=True)
        rows.extend(section(a.quick))
    table = render(rows, a.quick)
    print(table)
    out = a.out or (None if a.quick else str(Path(__file__).parent / "RESULTS.md"))
    if out:
        Path(out).write_text(table)
        print(f"perf: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
