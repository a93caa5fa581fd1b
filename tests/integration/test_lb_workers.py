"""The link between the workers of one ``mesh lb --workers N`` (lb.workers), over real
socket pairs: answers, late answers, and a worker that went away."""

from __future__ import annotations

import asyncio
import json

from lb import workers


async def test_a_worker_answers_with_its_report():
    first, other = workers.socket_pairs(2)[0]
    calls = []

    def report() -> dict:
        calls.append(1)
        return {"metrics": [], "clusters": [{"name": "web", "n": len(calls)}]}

    task = asyncio.create_task(workers.answer(other, report))
    peer = workers.Peer(first, 1)
    try:
        one = await peer.report()
        two = await peer.report()
        assert one["clusters"] == [{"name": "web", "n": 1}]
        assert two["clusters"] == [{"name": "web", "n": 2}]
    finally:
        peer.close()
        await asyncio.wait_for(task, 5)  # the answering side ends when the first worker goes


async def test_a_late_answer_is_never_taken_for_the_next_one():
    first, other = workers.socket_pairs(2)[0]

    async def slow_then_fast() -> None:
        reader, writer = await asyncio.open_unix_connection(sock=other)
        n = 0
        while line := await reader.readline():
            n += 1
            seq = int(line.split()[1])
            if n == 1:
                await asyncio.sleep(0.3)  # past the first question's timeout
            writer.write(json.dumps({"seq": seq, "answer": n}).encode() + b"\n")
            await writer.drain()
        writer.close()

    task = asyncio.create_task(slow_then_fast())
    peer = workers.Peer(first, 1)
    try:
        assert await peer.report(timeout=0.1) is None
        await asyncio.sleep(0.3)  # the late answer is now waiting on the pair
        got = await peer.report(timeout=2)
        assert got == {"seq": 2, "answer": 2}
        assert not peer.gone
    finally:
        peer.close()
        await asyncio.wait_for(task, 5)


async def test_a_worker_that_went_away_is_reported_gone_at_once():
    first, other = workers.socket_pairs(2)[0]
    other.close()
    peer = workers.Peer(first, 1)
    assert await asyncio.wait_for(peer.report(timeout=5), 2) is None
    assert peer.gone
    assert await peer.report() is None
