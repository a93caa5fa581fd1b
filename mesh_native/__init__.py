"""mesh's native core: the Rust crate in ``native/``, built by maturin into ``mesh_native._core``.

It holds what runs per request and per query; Python drives it and keeps the control plane.
Today: the consistent-hash tables (Maglev, ketama ring), the key hash, and the request path's
HTTP/1.1 reader (httparse, the framing and smuggling rules, the upstream head).
"""

from __future__ import annotations


class BadRequest(Exception):
    """The request cannot be served; answer ``status`` and close the connection."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


try:
    from mesh_native._core import (
        MAGLEV_DEFAULT_SIZE,
        MaglevTable,
        RequestHead,
        RequestReader,
        RingTable,
        is_prime,
        key_hash,
    )
except ImportError as exc:  # an install without the compiled module: say so, never run slow
    raise ImportError(
        f"mesh's native core is not built ({exc}): install mesh with pip, which compiles "
        "native/ with maturin (Rust toolchain needed), or run `make test` / `make demo`"
    ) from exc

__all__ = [
    "MAGLEV_DEFAULT_SIZE",
    "BadRequest",
    "MaglevTable",
    "RequestHead",
    "RequestReader",
    "RingTable",
    "is_prime",
    "key_hash",
]
