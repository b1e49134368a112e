"""Tests of what `SqliteQueue` adds to the queue contract: durability, batch settlement, several clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.core.envelope import QueueMessage, ReceivedMessage
from shared.core.errors import REASONS
from shared.core.ports import InboundQueue, LockLostError, QueueDepth
from shared.runtime.embedded import MAX_DELIVERY_EXCEEDED, LockLostBatchError, SqliteQueue
from tests.contract.conftest import FakeClock

LOCK = 30.0


def message(n: int, *, session: str | None = None) -> QueueMessage:
    return QueueMessage(body=json.dumps({"n": n}).encode(), message_id=f"msg-{n}", session_id=session)


def numbers(messages: list[ReceivedMessage]) -> list[int]:
    return [json.loads(m.body)["n"] for m in messages]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "queue" / "inbound.db"


@pytest.fixture
async def queue(db_path: Path, clock: FakeClock) -> AsyncIterator[SqliteQueue]:
    opened = SqliteQueue(db_path, lock_duration_seconds=LOCK, max_delivery_count=3, clock=clock)
    yield opened
    await opened.close()


def test_it_implements_the_protocol(queue: SqliteQueue) -> None:
    assert isinstance(queue, InboundQueue)
    assert queue.max_delivery_count == 3
    assert MAX_DELIVERY_EXCEEDED in REASONS


@pytest.mark.parametrize(("lock", "max_count"), [(0, 3), (-1, 3), (30, 0)])
def test_bad_settings_are_refused(tmp_path: Path, lock: float, max_count: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        SqliteQueue(tmp_path / "q.db", lock_duration_seconds=lock, max_delivery_count=max_count)


async def test_receiving_fewer_than_one_message_is_refused(queue: SqliteQueue) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        await queue.receive(0)
    with pytest.raises(ValueError, match="at least 1"):
        await queue.receive_dead_letters(0)


async def test_the_lock_lasts_the_lock_duration_from_the_receive(queue: SqliteQueue, clock: FakeClock) -> None:
    await queue.send([message(1)])
    clock.advance(5)

    [m] = await queue.receive(1)

    assert m.locked_until == clock.now + timedelta(seconds=LOCK)
    assert m.enqueued_at == clock.now - timedelta(seconds=5)
    assert m.locked_until.tzinfo == UTC


async def test_renew_lock_also_updates_the_message(queue: SqliteQueue, clock: FakeClock) -> None:
    await queue.send([message(1)])
    [m] = await queue.receive(1)
    clock.advance(10)

    renewed = await queue.renew_lock(m)

    assert renewed == clock.now + timedelta(seconds=LOCK)
    assert m.locked_until == renewed


async def test_a_scheduled_message_is_enqueued_when_due_and_naive_times_are_utc(
    queue: SqliteQueue, clock: FakeClock
) -> None:
    due = clock.now + timedelta(minutes=1)
    await queue.send([message(1)], scheduled_at=due.replace(tzinfo=None))
    assert await queue.depth() == QueueDepth(active=0, scheduled=1, dead_letter=0)

    clock.advance(60)
    [m] = await queue.receive(1)

    assert m.enqueued_at == due


async def test_sequence_numbers_are_never_reused(queue: SqliteQueue) -> None:
    await queue.send([message(1), message(2)])
    first = await queue.receive(2)
    await queue.complete_many(first)

    await queue.send([message(3)])
    [later] = await queue.receive(1)

    assert later.sequence_number > max(m.sequence_number for m in first)


async def test_the_max_delivery_description_names_the_counts(queue: SqliteQueue) -> None:
    await queue.send([message(1)])
    for _ in range(3):
        [m] = await queue.receive(1)
        await queue.abandon(m)

    assert await queue.receive(1) == []
    [dead] = await queue.peek_dead_letters()
    assert dead.dead_letter_reason == MAX_DELIVERY_EXCEEDED
    assert dead.dead_letter_description == "delivered 3 times; the max delivery count of 'syncline-inbound' is 3"
    assert dead.delivery_count == 3


async def test_exhausted_messages_do_not_use_up_the_batch(queue: SqliteQueue) -> None:
    await queue.send([message(n) for n in range(4)])
    for _ in range(3):
        exhausted = await queue.receive(2)
        await queue.abandon_many(exhausted)  # messages 0 and 1 use up their deliveries

    got = await queue.receive(2)

    assert numbers(got) == [2, 3]
    assert [m.message_id for m in await queue.peek_dead_letters()] == ["msg-0", "msg-1"]


async def test_a_message_from_the_dead_letter_queue_cannot_be_dead_lettered_again(queue: SqliteQueue) -> None:
    await queue.send([message(1)])
    [m] = await queue.receive(1)
    await queue.dead_letter(m, reason="TARGET_REJECTED", description="refused")
    [dead] = await queue.receive_dead_letters(1)

    with pytest.raises(ValueError, match="dead-letter sub-queue already"):
        await queue.dead_letter(dead, reason="MAPPING_FAILED", description="other")

    await queue.abandon(dead)  # the lock was still held: the refusal changed nothing
    [peeked] = await queue.peek_dead_letters()
    assert peeked.dead_letter_reason == "TARGET_REJECTED"


async def test_lock_lost_messages_say_why(queue: SqliteQueue, clock: FakeClock) -> None:
    await queue.send([message(1), message(2), message(3)])
    done, expired, stale = await queue.receive(3)
    await queue.complete(done)
    await queue.abandon(stale)
    await queue.receive(1)  # `stale` is delivered again under a new token

    with pytest.raises(LockLostError, match="settled already"):
        await queue.complete(done)
    with pytest.raises(LockLostError, match="stale lock token"):
        await queue.complete(stale)
    clock.advance(LOCK)
    with pytest.raises(LockLostError, match="expired at"):
        await queue.complete(expired)


# ---------------------------------------------------------------------------------- batch settlement


async def test_complete_many_settles_a_batch(queue: SqliteQueue) -> None:
    await queue.send([message(n) for n in range(5)])
    batch = await queue.receive(5)

    await queue.complete_many(batch)
    await queue.complete_many([])

    assert await queue.depth() == QueueDepth(active=0, scheduled=0, dead_letter=0)


async def test_complete_many_settles_the_rest_and_reports_lost_locks(
    queue: SqliteQueue, clock: FakeClock
) -> None:
    await queue.send([message(1)])
    [early] = await queue.receive(1)
    clock.advance(LOCK / 2)
    await queue.send([message(2), message(3)])
    later = await queue.receive(2)
    clock.advance(LOCK / 2)  # `early` has expired, `later` has not

    with pytest.raises(LockLostBatchError) as caught:
        await queue.complete_many([early, *later])

    assert isinstance(caught.value, LockLostError)
    assert caught.value.lost == (early,)
    assert str(early.sequence_number) in str(caught.value)
    [again] = await queue.receive(10)
    assert again.message_id == "msg-1"
    assert await queue.depth() == QueueDepth(active=1, scheduled=0, dead_letter=0)


async def test_abandon_many_releases_a_batch(queue: SqliteQueue) -> None:
    await queue.send([message(1, session="a"), message(2, session="a")])
    batch = await queue.receive(2)
    await queue.complete(batch[1])

    with pytest.raises(LockLostBatchError) as caught:
        await queue.abandon_many(batch)

    assert caught.value.lost == (batch[1],)
    [again] = await queue.receive(10)
    assert (again.message_id, again.delivery_count) == ("msg-1", 2)


# ------------------------------------------------------------------------------- durability & sharing


async def test_messages_and_locks_survive_a_restart(db_path: Path, clock: FakeClock) -> None:
    before = SqliteQueue(db_path, lock_duration_seconds=LOCK, clock=clock)
    await before.send([message(1), message(2)])
    [in_flight] = await before.receive(1)
    await before.close()  # as if the process died with msg-1 locked

    after = SqliteQueue(db_path, lock_duration_seconds=LOCK, clock=clock)
    [m2] = await after.receive(10)  # msg-1 is still locked by the dead process
    await after.complete(m2)
    clock.advance(LOCK)
    [redelivered] = await after.receive(10)
    await after.close()

    assert redelivered.message_id == in_flight.message_id
    assert redelivered.delivery_count == 2


async def test_two_clients_of_one_file_never_get_the_same_message(db_path: Path, clock: FakeClock) -> None:
    first = SqliteQueue(db_path, clock=clock)
    second = SqliteQueue(db_path, clock=clock)
    await first.send([message(n, session=f"s-{n % 7}") for n in range(200)])

    got: list[ReceivedMessage] = []
    while batch := [m for part in await asyncio.gather(first.receive(15), second.receive(15)) for m in part]:
        got.extend(batch)
        await first.complete_many(batch)

    assert sorted(numbers(got)) == list(range(200))
    await first.close()
    await second.close()


async def test_a_lock_held_by_another_client_holds_back_the_session(db_path: Path, clock: FakeClock) -> None:
    first = SqliteQueue(db_path, clock=clock)
    second = SqliteQueue(db_path, clock=clock)
    await first.send([message(1, session="a"), message(2, session="a")])

    [a1] = await first.receive(1)
    assert await second.receive(10) == []
    await first.complete(a1)
    assert numbers(await second.receive(10)) == [2]
    await first.close()
    await second.close()


async def test_queues_with_other_names_in_one_file_are_separate(db_path: Path, clock: FakeClock) -> None:
    inbound = SqliteQueue(db_path, clock=clock)
    other = SqliteQueue(db_path, name="other", clock=clock)
    await inbound.send([message(1)])
    await other.send([message(2)])
    [m] = await inbound.receive(10)
    await inbound.dead_letter(m, reason="TARGET_REJECTED", description="refused")

    assert await other.depth() == QueueDepth(active=1, scheduled=0, dead_letter=0)
    assert await other.peek_dead_letters() == []
    [o] = await other.receive(10)
    with pytest.raises(LockLostError):
        await inbound.complete(o)  # a message of another queue is not ours to settle
    assert numbers([o]) == [2]
    await inbound.close()
    await other.close()


async def test_the_default_clock_is_real_utc_time(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "q.db")
    before = datetime.now(UTC)
    await queue.send([message(1)])

    [m] = await queue.receive(1)

    assert before - timedelta(seconds=1) <= m.enqueued_at <= datetime.now(UTC)
    assert m.locked_until is not None
    assert m.locked_until - m.enqueued_at >= timedelta(seconds=59)
    await queue.close()
