"""The registry's error family, translated once at the store's edge."""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every error the registry raises."""


class InvalidInstance(RegistryError, ValueError):
    """An instance that may not be registered (bad name, port, address, meta...)."""


class InvalidDocument(RegistryError):
    """A stored document that does not decode to an instance (written by someone else)."""


class RegistryUnavailable(RegistryError):
    """The database could not be reached or did not answer in time."""
