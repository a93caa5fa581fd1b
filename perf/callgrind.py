"""Run a server under ``valgrind --tool=callgrind`` while a client drives it, and read the
instructions it executed (user space only: callgrind does not see the kernel). The
per-request and per-query figures (``perf.lb_callgrind``, ``perf.dns_callgrind``) are the
difference of two such runs, N and 2N, over N: start-up cancels out."""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)
T = TypeVar("T")


def counted(
    argv: Sequence[str],
    drive: Callable[[], T],
    *,
    cwd: Path,
    core: str,
    pass_fds: Sequence[int] = (),
) -> tuple[int, T]:
    """(instructions ``argv`` executed, what ``drive`` returned): ``argv`` runs under
    callgrind pinned to ``core``, ``drive()`` runs meanwhile, then the server gets SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="mesh-callgrind-") as work:
        out = Path(work) / "callgrind.out"
        proc = subprocess.Popen(
            ["taskset", "-c", core, "valgrind", "--tool=callgrind",
             f"--callgrind-out-file={out}", "--dump-instr=no", *argv],
            pass_fds=pass_fds, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            result = drive()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(300)
        found = TOTALS.search(out.read_text())
        if not found:
            raise RuntimeError("callgrind wrote no totals")
        return int(found.group(1)), result
