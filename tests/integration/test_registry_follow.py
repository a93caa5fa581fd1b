import asyncio

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


@pytest.mark.timeout(60)
async def test_follower_keeps_last_snapshot_through_an_outage(tmp_path):
    db = EmbeddedDB(data=str(tmp_path / "f.db"))
    await asyncio.to_thread(db.start)
    store = RegistryStore.from_url(db.url, poll_interval=0.05)
    seen: list = []
    follower = Follower(store, seen.append, name="test")
    task = asyncio.create_task(follower.run())
    try:
        await asyncio.wait_for(follower.first.wait(), 10)
        await store.register(Instance(service="web", instance="a", address="10.0.0.1", port=80), 60)
        await _until(
            lambda: follower.snapshot and follower.snapshot.instances, 5, "first seen", follower
        )
        await asyncio.to_thread(db.kill)
        await _until(lambda: not follower.connected, 15, "outage noticed", follower)
        assert [i.id for i in follower.snapshot.instances] == ["web/a"], "last state kept"
        await asyncio.to_thread(db.start)
        await _until(lambda: follower.connected, 20, "reconnected", follower)
        assert follower.failures >= 1
        assert [i.id for i in follower.snapshot.instances] == ["web/a"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        await asyncio.to_thread(db.close)


@pytest.mark.timeout(60)
async def test_after_an_outage_expired_instances_are_held_for_the_grace(tmp_path):
    db = EmbeddedDB(data=str(tmp_path / "g.db"))
    await asyncio.to_thread(db.start)
    store = RegistryStore.from_url(db.url, poll_interval=0.05)
    follower = Follower(store, lambda s: None, name="test", reconnect_grace=2.0)
    task = asyncio.create_task(follower.run())
    loop = asyncio.get_running_loop()
    lease = 3.0  # long enough to be seen on a loaded machine, short enough to run out below
    try:
        await _until(follower.first.is_set, 10, "first snapshot", follower)
        registered = loop.time()
        await store.register(
            Instance(service="web", instance="a", address="10.0.0.1", port=80), lease
        )
        await _until(
            lambda: follower.snapshot and follower.snapshot.instances, lease, "seen", follower
        )
        await asyncio.to_thread(db.kill)
        await _until(lambda: not follower.connected, 15, "outage noticed", follower)
        # The lease runs out while the database is away.
        await asyncio.sleep(max(0.0, registered + lease + 0.3 - loop.time()))
        await asyncio.to_thread(db.start)
        await _until(lambda: follower.connected, 20, "reconnected", follower)
        back = loop.time()
        assert [i.id for i in follower.snapshot.instances] == ["web/a"], "held during the grace"
        await _until(lambda: not follower.snapshot.instances, 10, "dropped after", follower)
        assert loop.time() - back >= 1.5, "dropped before the grace ended"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        await asyncio.to_thread(db.close)


def _ids(follower: Follower) -> list[str]:
    return sorted(i.id for i in follower.snapshot.instances) if follower.snapshot else []


@pytest.mark.timeout(90)
async def test_the_grace_holds_expired_instances_never_deregistered_ones(tmp_path):
    """During the outage b's lease runs out (its sidecar could not renew: hold it) and a is
    deregistered (scaled down: it must go at once, not after the grace)."""
    db = EmbeddedDB(data=str(tmp_path / "h.db"))
    await asyncio.to_thread(db.start)
    store = RegistryStore.from_url(db.url, poll_interval=0.05)
    writer = RegistryStore.from_url(db.url)
    follower = Follower(store, lambda s: None, name="test", reconnect_grace=6.0)
    task = asyncio.create_task(follower.run())
    loop = asyncio.get_running_loop()
    try:
        await _until(follower.first.is_set, 10, "first snapshot", follower)
        await writer.register(
            Instance(service="web", instance="a", address="10.0.0.1", port=80), 60
        )
        registered = loop.time()
        await writer.register(Instance(service="web", instance="b", address="10.0.0.2", port=80), 3)
        await _until(lambda: _ids(follower) == ["web/a", "web/b"], 3, "both seen", follower)
        await asyncio.to_thread(db.kill)
        await _until(lambda: not follower.connected, 15, "outage noticed", follower)
        await asyncio.sleep(max(0.0, registered + 3.3 - loop.time()))  # b's lease ran out
        await asyncio.to_thread(db.start)
        assert await writer.deregister("web/a")
        await _until(lambda: follower.connected, 20, "reconnected", follower)
        back = loop.time()
        await _until(lambda: _ids(follower) == ["web/b"], 3, "a gone, b held", follower)
        assert loop.time() - back < 3.0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        await writer.close()
        await asyncio.to_thread(db.close)


@pytest.mark.timeout(90)
async def test_an_outage_during_the_grace_keeps_the_held_state(tmp_path):
    """The registry goes away again before the grace ends: the follower goes on serving
    what it shows, through the end of the first grace, until the registry is back."""
    db = EmbeddedDB(data=str(tmp_path / "i.db"))
    await asyncio.to_thread(db.start)
    store = RegistryStore.from_url(db.url, poll_interval=0.05)
    follower = Follower(store, lambda s: None, name="test", reconnect_grace=3.0)
    task = asyncio.create_task(follower.run())
    loop = asyncio.get_running_loop()
    try:
        await _until(follower.first.is_set, 10, "first snapshot", follower)
        registered = loop.time()
        await store.register(Instance(service="web", instance="a", address="10.0.0.1", port=80), 2)
        await _until(lambda: _ids(follower) == ["web/a"], 2, "seen", follower)
        await asyncio.to_thread(db.kill)
        await _until(lambda: not follower.connected, 15, "outage noticed", follower)
        await asyncio.sleep(max(0.0, registered + 2.3 - loop.time()))  # its lease ran out
        await asyncio.to_thread(db.start)
        await _until(lambda: follower.connected, 20, "reconnected", follower)
        back = loop.time()
        assert _ids(follower) == ["web/a"], "held during the grace"
        await asyncio.to_thread(db.kill)
        await _until(lambda: not follower.connected, 15, "second outage noticed", follower)
        await asyncio.sleep(max(0.0, back + 3.5 - loop.time()))  # past the first grace
        assert not follower.connected
        assert _ids(follower) == ["web/a"], "the last state is kept while away"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        await asyncio.to_thread(db.close)
