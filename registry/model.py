"""The registry's data model: frozen instances and whole-registry snapshots.

Names are DNS labels because every service, instance and tag becomes part of a DNS
name the sidecar serves (DESIGN.md §4).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from registry.errors import InvalidInstance

# RFC 1035 §2.3.1 labels, lower case only: the registry stores the canonical form and DNS
# matching is case-insensitive.
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
DRAINING = "draining"
STATUSES = (PASSING, WARNING, CRITICAL, DRAINING)

MAX_WEIGHT = 65535  # the SRV weight field is 16 bits (RFC 2782)
DEFAULT_WEIGHT = 100
MAX_TAGS = 32
MAX_META_KEYS = 64
MAX_META_KEY_BYTES = 128
MAX_META_VALUE_BYTES = 512  # Consul's limit for a meta value
MAX_META_BYTES = 4096


def check_label(value: object, what: str) -> str:
    """Return ``value`` if it is a DNS label, else raise InvalidInstance naming ``what``."""
    if not isinstance(value, str) or not _LABEL.match(value):
        raise InvalidInstance(
            f"{what} must be a DNS label (a-z, 0-9, '-', 1-63 chars, no leading or trailing '-'),"
            f" got {value!r}"
        )
    return value


def check_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidInstance(f"port must be an integer 1-65535, got {value!r}")
    return value


def check_address(value: object) -> str:
    """An IPv4 or IPv6 address in canonical text form."""
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise InvalidInstance(f"address must be an IPv4 or IPv6 address, got {value!r}") from None


def check_weight(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WEIGHT:
        raise InvalidInstance(f"weight must be an integer 1-{MAX_WEIGHT}, got {value!r}")
    return value


def check_status(value: object) -> str:
    if value not in STATUSES:
        raise InvalidInstance(f"status must be one of {', '.join(STATUSES)}, got {value!r}")
    return str(value)


def check_meta(meta: Mapping[str, str]) -> Mapping[str, str]:
    if len(meta) > MAX_META_KEYS:
        raise InvalidInstance(f"meta has {len(meta)} keys, at most {MAX_META_KEYS} allowed")
    total = 0
    for key, value in meta.items():
        if not isinstance(key, str) or not key or len(key.encode()) > MAX_META_KEY_BYTES:
            raise InvalidInstance(
                f"meta key must be a string of 1-{MAX_META_KEY_BYTES} bytes, got {key!r}"
            )
        if key.startswith("$") or "." in key:
            raise InvalidInstance(f"meta key may not start with '$' or contain '.', got {key!r}")
        if not isinstance(value, str) or len(value.encode()) > MAX_META_VALUE_BYTES:
            raise InvalidInstance(
                f"meta value for {key!r} must be a string of at most {MAX_META_VALUE_BYTES} bytes"
            )
        total += len(key.encode()) + len(value.encode())
    if total > MAX_META_BYTES:
        raise InvalidInstance(f"meta is {total} bytes, at most {MAX_META_BYTES} allowed")
    return meta


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered replica of a service.

    The lease and bookkeeping fields (``lease_expires_at`` onwards) are set by the store;
    an instance built by a caller to register leaves them at their defaults.
    ``lease_expires_at`` is the lease as the store read it (it lives in its own collection,
    and renewals move it without any reader seeing them).
    """

    service: str
    instance: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    weight: int = DEFAULT_WEIGHT
    status: str = PASSING
    lease_expires_at: datetime | None = None
    registered_at: datetime | None = None
    updated_at: datetime | None = None
    revision: int = 0

    def __post_init__(self) -> None:
        check_label(self.service, "service name")
        check_label(self.instance, "instance name")
        object.__setattr__(self, "address", check_address(self.address))
        check_port(self.port)
        check_weight(self.weight)
        check_status(self.status)
        tags = tuple(self.tags)
        if len(tags) > MAX_TAGS:
            raise InvalidInstance(f"at most {MAX_TAGS} tags allowed, got {len(tags)}")
        for tag in tags:
            check_label(tag, "tag")
        object.__setattr__(self, "tags", tuple(dict.fromkeys(tags)))
        meta = dict(self.meta)
        check_meta(meta)
        object.__setattr__(self, "meta", MappingProxyType(meta))

    @property
    def id(self) -> str:
        return f"{self.service}/{self.instance}"

    @property
    def healthy(self) -> bool:
        return self.status == PASSING

    @property
    def ipv6(self) -> bool:
        return ":" in self.address

    def visible_key(self) -> tuple:
        """What readers see: everything but the lease and bookkeeping fields."""
        return (
            self.service,
            self.instance,
            self.address,
            self.port,
            self.tags,
            tuple(sorted(self.meta.items())),
            self.weight,
            self.status,
        )

    def __repr__(self) -> str:
        return f"<Instance {self.id} {self.address}:{self.port} {self.status} w={self.weight}>"

    def __hash__(self) -> int:
        return hash(self.visible_key())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Instance):
            return NotImplemented
        return self.visible_key() == other.visible_key() and (
            self.lease_expires_at,
            self.revision,
        ) == (other.lease_expires_at, other.revision)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every live instance at one moment, sorted by id. Immutable; readers swap it whole."""

    instances: tuple[Instance, ...] = ()
    revision: int = 0

    @classmethod
    def of(cls, instances: Iterable[Instance], revision: int = 0) -> Snapshot:
        return cls(tuple(sorted(instances, key=lambda i: i.id)), revision)

    def services(self) -> dict[str, tuple[Instance, ...]]:
        out: dict[str, list[Instance]] = {}
        for inst in self.instances:
            out.setdefault(inst.service, []).append(inst)
        return {name: tuple(items) for name, items in out.items()}

    def service(self, name: str, *, healthy_only: bool = False) -> tuple[Instance, ...]:
        return tuple(
            i for i in self.instances if i.service == name and (i.healthy or not healthy_only)
        )

    def same_view(self, other: Snapshot | None) -> bool:
        """True when a reader would see no difference (leases and revisions aside)."""
        if other is None or len(other.instances) != len(self.instances):
            return False
        return all(
            a.visible_key() == b.visible_key()
            for a, b in zip(self.instances, other.instances, strict=True)
        )

    def __repr__(self) -> str:
        return f"<Snapshot rev={self.revision} instances={len(self.instances)}>"
