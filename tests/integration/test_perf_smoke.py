"""``python -m perf --quick`` still works: it completes and produces every row.

A check of the harness, never of a speed: no figure is compared with anything here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

EXPECTED = (
    "Maglev max/avg load, N=50",
    "ring_hash keys moved when one of 10 leaves",
    "registry lease renewals/s",
    "fleet N=100 W=3: lapse → every watcher",
    "register → sidecar DNS answer, p99",
    "register → LB endpoint set, p99",
    "peer death → out of LB routing",
    "LB req/s, one core, c50",
    "LB CPU per request, c50",
    "DNS SRV, 200 in flight: queries/s",
    "DNS A, 10 in flight: server CPU per query",
    "Maglev build, 65537 slots, 100 endpoints",
    "request read and upstream head, per request",
)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="the harness installs nginx, haproxy, dnsmasq, unbound, wrk and dnsperf as root",
)
def test_perf_quick_produces_every_row(tmp_path):
    out = tmp_path / "quick.md"
    run = subprocess.run(
        [sys.executable, "-m", "perf", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    table = out.read_text()
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| figure")
    ]
    for figure in EXPECTED:
        assert any(figure in row for row in rows), f"no row for {figure!r}"
    skipped = [row for row in rows if "skipped" in row]
    assert not skipped, skipped
