"""A ``mesh`` command run as a subprocess, its stderr read line by line as it comes."""

from __future__ import annotations

import asyncio
import os
import re
import sys

LISTENING = re.compile(r"listening dns=(\S+):(\d+)$")


class Proc:
    """A ``mesh`` subprocess whose stderr lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str, env: dict | None = None) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
        )  # fmt: skip
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_line(self, pattern: re.Pattern | str, timeout: float = 15) -> re.Match:
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        async with asyncio.timeout(timeout):
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    match = pattern.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self.proc.returncode is not None and self._reader.done():
                    raise AssertionError(f"exited {self.proc.returncode}: {self.lines[-5:]}")
                self._changed.clear()
                await self._changed.wait()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        await asyncio.gather(self._reader, return_exceptions=True)
