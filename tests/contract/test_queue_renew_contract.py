"""Contract of the queue adapters' batch lock renewal (`renew_many`), which the controller runs while it works."""

from __future__ import annotations

import pytest

from shared.core.ports import LockLostError
from tests.contract.conftest import QueueFactory
from tests.contract.test_queue_contract import message


async def test_renew_many_keeps_every_lock_of_a_batch_past_the_lock_duration(queue_factory: QueueFactory) -> None:
    h = await queue_factory(lock_duration_seconds=30)
    await h.queue.send([message(1, session="a"), message(2, session="a"), message(3, session="b"), message(4)])
    got = await h.queue.receive(10, max_wait_seconds=1)
    assert len(got) == 4
    renew_many = h.queue.renew_many  # type: ignore[attr-defined]
    for _ in range(3):  # 60 s in all: twice the lock duration
        await h.advance(20)
        await renew_many(got)
    assert await h.queue.receive(10) == []  # nothing came back: every lock (and session) still held
    await h.queue.complete_many(got)  # type: ignore[attr-defined]
    assert (await h.queue.depth()).active == 0


async def test_renew_many_reports_the_lost_locks_and_renews_the_rest(queue_factory: QueueFactory) -> None:
    h = await queue_factory(lock_duration_seconds=30)
    await h.queue.send([message(1, session="a"), message(2, session="b")])
    first, second = await h.queue.receive(10, max_wait_seconds=1)
    await h.queue.complete(first)
    await h.advance(20)
    with pytest.raises(LockLostError) as lost:
        await h.queue.renew_many([first, second])  # type: ignore[attr-defined]
    assert [m.message_id for m in lost.value.lost] == [first.message_id]  # type: ignore[attr-defined]
    await h.advance(20)
    await h.queue.complete(second)  # renewed: still ours 40 s after the receive, past its 30 s lock
