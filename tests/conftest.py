"""Fixtures shared by every test: the embedded wire-protocol database and registry stores."""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest

from mesh.embedded_db import EmbeddedDB
from registry.store import RegistryStore

_db_names = itertools.count()


@pytest.fixture(scope="session")
def embedded_db():
    """One nx-27017 server for the session; each test gets its own database name in it."""
    db = EmbeddedDB()
    db.start()
    yield db
    db.close()


@pytest.fixture
def db_url(embedded_db) -> str:
    return f"mongodb://{embedded_db.host}:{embedded_db.port}/t{os.getpid()}_{next(_db_names)}"


@pytest.fixture
async def store(db_url):
    s = RegistryStore.from_url(db_url, poll_interval=0.05)
    await s.start()
    yield s
    await s.close()


def pytest_asyncio_loop_factories(config, item):
    """Network tests run on both loops: uvloop is the default, plain asyncio must work too.

    Pure cores (tests/unit) and tests marked ``one_loop`` need only one.
    """
    import uvloop

    if "tests/unit/" in str(item.path).replace(os.sep, "/") or item.get_closest_marker("one_loop"):
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
async def _fail_on_loop_errors():
    """Fail a test if anything reached the loop's exception handler (a leaked task error)."""
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield
    loop.set_exception_handler(None)
    assert not errors, f"unhandled exceptions in the event loop: {errors}"
