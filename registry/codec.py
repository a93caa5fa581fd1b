"""Instance ⇄ MongoDB document. The document layout is a contract (DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from registry.errors import InvalidDocument, InvalidInstance
from registry.model import Instance

SCHEMA_VERSION = 1


def instance_id(service: str, instance: str) -> str:
    return f"{service}/{instance}"


def to_document(inst: Instance) -> dict[str, Any]:
    """The instance document. Its lease is not in it: leases live in their own collection."""
    return {
        "_id": inst.id,
        "schema": SCHEMA_VERSION,
        "service": inst.service,
        "instance": inst.instance,
        "address": inst.address,
        "port": inst.port,
        "tags": list(inst.tags),
        "meta": dict(inst.meta),
        "weight": inst.weight,
        "status": inst.status,
        "registered_at": inst.registered_at,
        "updated_at": inst.updated_at,
        "revision": inst.revision,
    }


def _date(doc: Mapping[str, Any], key: str) -> datetime | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidDocument(f"{doc.get('_id')!r}: {key} is not a date")
    # pymongo hands back naive UTC datetimes unless the client is tz_aware.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def from_document(doc: Mapping[str, Any]) -> Instance:
    """Decode a stored document. Unknown fields are ignored; a bad one raises InvalidDocument."""
    try:
        inst = Instance(
            service=doc["service"],
            instance=doc["instance"],
            address=doc["address"],
            port=doc["port"],
            tags=tuple(doc.get("tags") or ()),
            meta=dict(doc.get("meta") or {}),
            weight=doc.get("weight", 100),
            status=doc.get("status", "passing"),
            registered_at=_date(doc, "registered_at"),
            updated_at=_date(doc, "updated_at"),
            revision=int(doc.get("revision") or 0),
        )
    except KeyError as exc:
        raise InvalidDocument(f"{doc.get('_id')!r}: missing field {exc.args[0]!r}") from None
    except (InvalidInstance, TypeError, ValueError) as exc:
        raise InvalidDocument(f"{doc.get('_id')!r}: {exc}") from None
    if doc.get("_id") != inst.id:
        raise InvalidDocument(f"{doc.get('_id')!r}: _id does not match {inst.id!r}")
    return inst
