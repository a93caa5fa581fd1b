"""``mesh demo`` and ``mesh up`` as a newcomer runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

MESH = [sys.executable, "-m", "mesh"]


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc), to prove nothing is left running."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for kid in kids.get(todo.pop(), []):
            out.add(kid)
            todo.append(kid)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(180)
def test_demo_runs_kills_a_peer_and_loses_no_request():
    out = subprocess.run(
        [*MESH, "demo", "--duration", "10", "--json"], capture_output=True, text=True, timeout=170
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 0, summary
    assert summary["requests"] > 1000
    assert summary["killed"] == "peer-3"
    assert summary["dns_removal_s"] < 5.0, "the killed peer left DNS"
    assert summary["keys_moved_fraction"] <= 1.5 * summary["ideal_moved_fraction"], summary
    assert summary["killed_keys_before"] > 0


@pytest.mark.timeout(120)
def test_up_stops_every_child_on_ctrl_c():
    proc = subprocess.Popen(
        [*MESH, "up", "--peers", "2", "--lb-port", "0", "--dns-port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C" in line or not line:
                break
        text = "".join(lines)
        assert "mesh is up" in text, text + (proc.stderr.read() if proc.poll() is not None else "")
        lb_port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", text).group(1))
        dns_port = int(re.search(r"-p (\d+) SRV", text).group(1))
        kids = _children(proc.pid)
        assert len(kids) >= 6, "database, 2 peers, 2 sidecars and the LB"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        deadline = time.monotonic() + 10
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [k for k in kids if _alive(k)], "children left running"
        for port in (lb_port, dns_port):
            import socket

            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))  # raises if anything still holds the port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
