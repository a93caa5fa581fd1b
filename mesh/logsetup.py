"""One log format for every mesh process."""

from __future__ import annotations

import logging
import os
import sys


def setup(level: str | None = None) -> None:
    level = (level or os.environ.get("MESH_LOG_LEVEL") or "info").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pymongo logs every heartbeat failure at length; our stores log one line per state change.
    logging.getLogger("pymongo").setLevel(logging.WARNING)
