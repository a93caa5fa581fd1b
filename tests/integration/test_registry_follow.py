import asyncio
import contextlib

import pytest

from mesh.embedded_db import EmbeddedDB
from registry.follow import Follower
from registry.model import Instance
from registry.store import RegistryStore


async def _until(cond, timeout: float, what: str, follower: Follower) -> None:
    """Wait for ``cond()``; on timeout, fail saying which step and the follower's state."""
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(
            f"{what}: not within {timeout:g} s; {follower!r}, showing {follower.snapshot!r}"
        ) from None


@contextlib.asynccontextmanager
async def _following(tmp_path, **kw):
    """The embedded database on a file (so it can be killed and started again), a store
    polling it every 50 ms, and a Follower of that store that has made its first read."""
    db = EmbeddedDB(data=str(tmp_path / "registry.db"))
    await asyncio.to_thread(db.start)
    store = RegistryStore.from_url(db.url, poll_interval=0.05)
    follower = Follower(store, lambda s: None, name="test", **kw)
    task = asyncio.create_task(follower.run())
    try:
        await _until(follower.first.is_set, 10, "first snapshot", follower)
        yield db, store, follower
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        await asyncio.to_thread(db.close)


async def _outage(db: EmbeddedDB, follower: Follower, what: str = "outage noticed") -> None:
    await asyncio.to_thread(db.kill)
    await _until(lambda: not follower.connected, 15, what, follower)


async def _back(db: EmbeddedDB, follower: Follower) -> None:
    await asyncio.to_thread(db.start)
    await _until(lambda: follower.connected, 20, "reconnected", follower)


def _ids(follower: Follower) -> list[str]:
    return sorted(i.id for i in follower.snapshot.instances) if follower.snapshot else []


def _inst(name: str, address: str) -> Instance:
    return Instance(service="web", instance=name, address=address, port=80)


@pytest.mark.timeout(60)
async def test_follower_keeps_last_snapshot_through_an_outage(tmp_path):
    async with _following(tmp_path) as (db, store, follower):
        await store.register(_inst("a", "10.0.0.1"), 60)
        await _until(lambda: _ids(follower) == ["web/a"], 5, "first seen", follower)
        await _outage(db, follower)
        assert _ids(follower) == ["web/a"], "last state kept"
        await _back(db, follower)
        assert follower.failures >= 1
        assert _ids(follower) == ["web/a"]


@pytest.mark.timeout(60)
async def test_after_an_outage_expired_instances_are_held_for_the_grace(tmp_path):
    loop = asyncio.get_running_loop()
    lease = 3.0  # long enough to be seen on a loaded machine, short enough to run out below
    async with _following(tmp_path, reconnect_grace=2.0) as (db, store, follower):
        registered = loop.time()
        await store.register(_inst("a", "10.0.0.1"), lease)
        await _until(lambda: _ids(follower) == ["web/a"], lease, "seen", follower)
        await _outage(db, follower)
        # The lease runs out while the database is away.
        await asyncio.sleep(max(0.0, registered + lease + 0.3 - loop.time()))
        await _back(db, follower)
        back = loop.time()
        assert _ids(follower) == ["web/a"], "held during the grace"
        await _until(lambda: not _ids(follower), 10, "dropped after", follower)
        assert loop.time() - back >= 1.5, "dropped before the grace ended"


@pytest.mark.timeout(90)
async def test_the_grace_holds_expired_instances_never_deregistered_ones(tmp_path):
    """During the outage b's lease runs out (its sidecar could not renew: hold it) and a is
    deregistered (scaled down: it must go at once, not after the grace)."""
    loop = asyncio.get_running_loop()
    async with _following(tmp_path, reconnect_grace=6.0) as (db, _, follower):
        writer = RegistryStore.from_url(db.url)
        try:
            await writer.register(_inst("a", "10.0.0.1"), 60)
            registered = loop.time()
            await writer.register(_inst("b", "10.0.0.2"), 3)
            await _until(lambda: _ids(follower) == ["web/a", "web/b"], 3, "both seen", follower)
            await _outage(db, follower)
            await asyncio.sleep(max(0.0, registered + 3.3 - loop.time()))  # b's lease ran out
            await asyncio.to_thread(db.start)
            assert await writer.deregister("web/a")
            await _until(lambda: follower.connected, 20, "reconnected", follower)
            back = loop.time()
            # a goes at once after the reconnect (a read that fails backs off and retries),
            # well before the 6 s grace would have let it go.
            await _until(lambda: _ids(follower) == ["web/b"], 5, "a gone, b held", follower)
            assert loop.time() - back < 5.0
        finally:
            await writer.close()


@pytest.mark.timeout(90)
async def test_an_outage_during_the_grace_keeps_the_held_state(tmp_path):
    """The registry goes away again before the grace ends: the follower goes on serving
    what it shows, through the end of the first grace, until the registry is back."""
    loop = asyncio.get_running_loop()
    # The grace outlasts noticing the second outage: a request to a server that went away
    # waits out server selection (2 s) before it fails.
    async with _following(tmp_path, reconnect_grace=5.0) as (db, store, follower):
        registered = loop.time()
        await store.register(_inst("a", "10.0.0.1"), 2)
        await _until(lambda: _ids(follower) == ["web/a"], 2, "seen", follower)
        await _outage(db, follower)
        await asyncio.sleep(max(0.0, registered + 2.3 - loop.time()))  # its lease ran out
        await _back(db, follower)
        back = loop.time()
        assert _ids(follower) == ["web/a"], "held during the grace"
        await _outage(db, follower, "second outage noticed")
        await asyncio.sleep(max(0.0, back + 5.5 - loop.time()))  # past the first grace
        assert not follower.connected
        assert _ids(follower) == ["web/a"], "the last state is kept while away"
        await _back(db, follower)
        await _until(lambda: not _ids(follower), 10, "dropped after the new grace", follower)
