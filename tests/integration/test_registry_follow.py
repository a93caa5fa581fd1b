import asyncio

import pytest

from mesh.embedded_db import EmbeddedDB
from registry.follow import Follower
from registry.model import Instance
from registry.store import RegistryStore


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
        async with asyncio.timeout(5):
            while not (follower.snapshot and follower.snapshot.instances):
                await asyncio.sleep(0.02)
        await asyncio.to_thread(db.kill)
        async with asyncio.timeout(15):
            while follower.connected:
                await asyncio.sleep(0.05)
        assert [i.id for i in follower.snapshot.instances] == ["web/a"], "last state kept"
        await asyncio.to_thread(db.start)
        async with asyncio.timeout(20):
            while not follower.connected:
                await asyncio.sleep(0.05)
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
    try:
        await store.register(Instance(service="web", instance="a", address="10.0.0.1", port=80), 1.0)
        async with asyncio.timeout(5):
            while not (follower.snapshot and follower.snapshot.instances):
                await asyncio.sleep(0.02)
        await asyncio.to_thread(db.kill)
        async with asyncio.timeout(15):
            while follower.connected:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)  # the lease runs out while the database is away
        await asyncio.to_thread(db.start)
        async with asyncio.timeout(20):
            while not follower.connected:
                await asyncio.sleep(0.05)
        back = asyncio.get_running_loop().time()
        assert [i.id for i in follower.snapshot.instances] == ["web/a"], "held during the grace"
        async with asyncio.timeout(10):
            while follower.snapshot.instances:
                await asyncio.sleep(0.05)
        assert asyncio.get_running_loop().time() - back >= 1.5, "dropped before the grace ended"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        await asyncio.to_thread(db.close)
