"""Lease arithmetic. Every function takes ``now`` explicitly.

An instance exists while ``now < lease_expires_at``; at ``lease_expires_at`` it is gone for
every reader at once (DESIGN.md §4). MongoDB's TTL monitor, which runs about once a minute,
only collects the garbage later.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

MIN_LEASE_TTL = 1.0  # below this a renewal every ttl/3 is a write storm
MAX_LEASE_TTL = 86400.0
RENEWALS_PER_LEASE = 3  # renew at ttl/3: two renewals may fail before the lease runs out


def utcnow() -> datetime:
    """BSON dates keep milliseconds; so does this clock, so round trips compare equal."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def check_ttl(ttl: float) -> float:
    if not MIN_LEASE_TTL <= ttl <= MAX_LEASE_TTL:
        raise ValueError(f"lease TTL must be {MIN_LEASE_TTL:g}-{MAX_LEASE_TTL:g} s, got {ttl!r}")
    return float(ttl)


def expiry(now: datetime, ttl: float) -> datetime:
    """When a lease granted at ``now`` for ``ttl`` seconds runs out (millisecond precision)."""
    at = now + timedelta(seconds=check_ttl(ttl))
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def is_live(expires_at: datetime | None, now: datetime) -> bool:
    return expires_at is not None and now < expires_at


def remaining(expires_at: datetime | None, now: datetime) -> float:
    """Seconds left on a lease, never negative."""
    if expires_at is None:
        return 0.0
    return max(0.0, (expires_at - now).total_seconds())


def renew_interval(ttl: float) -> float:
    return check_ttl(ttl) / RENEWALS_PER_LEASE
