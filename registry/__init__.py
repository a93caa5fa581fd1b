"""The service registry: instances with leases, stored in MongoDB."""

from registry.errors import InvalidDocument, InvalidInstance, RegistryError, RegistryUnavailable
from registry.model import STATUSES, Instance, Snapshot

__all__ = [
    "STATUSES",
    "Instance",
    "InvalidDocument",
    "InvalidInstance",
    "RegistryError",
    "RegistryUnavailable",
    "Snapshot",
]
