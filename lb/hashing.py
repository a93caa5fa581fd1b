"""Hash keys from a request: header, cookie, query parameter, path or source IP, as a
fallback chain (the first source present wins, like Envoy's ``terminal`` hash policies).

Pure functions over the parsed request head; no I/O, no logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

KINDS = ("header", "cookie", "query", "path", "ip")


@dataclass(frozen=True, slots=True)
class HashSource:
    """One link of the chain: ``header:NAME``, ``cookie:NAME``, ``query:NAME``, ``path``, ``ip``."""

    kind: str
    name: bytes = b""

    @classmethod
    def parse(cls, text: str) -> HashSource:
        kind, sep, name = text.strip().partition(":")
        if kind not in KINDS:
            raise ValueError(
                f"must be header:NAME, cookie:NAME, query:NAME, path or ip, got {text!r}"
            )
        if kind in ("path", "ip"):
            if sep:
                raise ValueError(f"{kind} takes no name, got {text!r}")
            return cls(kind)
        if not name or any(c in name for c in " \t\r\n:;=,"):
            raise ValueError(f"{kind} needs a name ({kind}:NAME), got {text!r}")
        # Header names are case-insensitive (RFC 9110 §5.1); cookie and query names are not.
        return cls(kind, name.lower().encode() if kind == "header" else name.encode())

    def __str__(self) -> str:
        return f"{self.kind}:{self.name.decode()}" if self.name else self.kind


def _cookie(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for hname, value in headers:
        if hname != b"cookie":
            continue
        for part in value.split(b";"):
            k, sep, v = part.strip().partition(b"=")
            if sep and k == name:
                return v.strip(b'"')
    return None


def _query(url: bytes, name: bytes) -> bytes | None:
    _, sep, query = url.partition(b"?")
    if not sep:
        return None
    query = query.partition(b"#")[0]
    for part in query.split(b"&"):
        k, _, v = part.partition(b"=")
        if unquote_to_bytes(k.replace(b"+", b" ")) == name:
            return unquote_to_bytes(v.replace(b"+", b" "))  # the first value, as Envoy
    return None


def extract(
    sources: Sequence[HashSource],
    *,
    headers: Sequence[tuple[bytes, bytes]],
    url: bytes,
    client_ip: str,
) -> tuple[HashSource, bytes] | None:
    """The first source present in the request and its key bytes, or None.

    ``headers`` are ``(lower-cased name, value)`` pairs. An empty header or cookie value
    counts as absent: hashing every empty value to one endpoint would make a hot spot.
    """
    for src in sources:
        kind = src.kind
        if kind == "header":
            for hname, value in headers:
                if hname == src.name and value:
                    return src, value
        elif kind == "cookie":
            value = _cookie(headers, src.name)
            if value:
                return src, value
        elif kind == "query":
            value = _query(url, src.name)
            if value is not None and value != b"":
                return src, value
        elif kind == "path":
            return src, url.partition(b"?")[0]
        elif kind == "ip" and client_ip:
            return src, client_ip.encode()
    return None
