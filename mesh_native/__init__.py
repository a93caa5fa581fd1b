"""mesh's native core: the Rust crate in ``native/``, built by maturin into ``mesh_native._core``.

It holds what runs per request and per query; Python drives it and keeps the control plane.
Today: the consistent-hash tables (Maglev, ketama ring), the key hash, and HTTP/1.1 both ways:
the request reader and the upstream head, the response reader and relay (the client's head and body)
(httparse, and the framing and smuggling rules on top of it), and the per-endpoint and
per-cluster counters and latency histograms the admin port reads; and the sidecar's DNS
reply table with its batched UDP path (``recvmmsg``, answer, ``sendmmsg``).
"""

from __future__ import annotations


class BadRequest(Exception):
    """The request cannot be served; answer ``status`` and close the connection."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class BadResponse(Exception):
    """A peer's response must not reach the client. ``gateway``: a well-formed head the
    proxy will not forward (the peer failed as a gateway); otherwise the bytes are not a
    response, or its framing is broken."""

    def __init__(self, gateway: bool, detail: str) -> None:
        super().__init__(detail)
        self.gateway = gateway
        self.detail = detail


try:
    from mesh_native._core import (
        END_CLIENT_CLOSE,
        END_COMPLETE,
        END_REUSABLE,
        END_UPGRADED,
        LATENCY_BUCKETS,
        MAGLEV_DEFAULT_SIZE,
        Counters,
        DnsTable,
        DnsUdp,
        MaglevTable,
        RequestHead,
        RequestReader,
        ResponseReader,
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
    "END_CLIENT_CLOSE",
    "END_COMPLETE",
    "END_REUSABLE",
    "END_UPGRADED",
    "LATENCY_BUCKETS",
    "MAGLEV_DEFAULT_SIZE",
    "BadRequest",
    "BadResponse",
    "Counters",
    "DnsTable",
    "DnsUdp",
    "MaglevTable",
    "RequestHead",
    "RequestReader",
    "ResponseReader",
    "RingTable",
    "is_prime",
    "key_hash",
]
