"""Contract of `InboundQueue` (Service Bus semantics) that every queue adapter must pass."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

import pytest

from shared.core.envelope import QueueMessage, ReceivedMessage
from shared.core.ports import InboundQueue, LockLostError, QueueDepth
from tests.contract.conftest import QueueFactory, QueueHarness


def message(n: int, *, session: str | None = None) -> QueueMessage:
    return QueueMessage(
        body=json.dumps({"n": n}).encode(),
        message_id=f"msg-{n}",
        session_id=session,
        correlation_id=f"corr-{n}",
        application_properties={"n": n, "flow": "parcels", "ratio": 0.5, "urgent": n % 2 == 0},
    )


def numbers(messages: list[ReceivedMessage]) -> list[int]:
    return [json.loads(m.body)["n"] for m in messages]


async def expire_locks(h: QueueHarness) -> None:
    await h.advance(h.lock_duration_seconds + 1)


async def settle_with(queue: InboundQueue, how: str, m: ReceivedMessage) -> None:
    if how == "complete":
        await queue.complete(m)
    elif how == "abandon":
        await queue.abandon(m)
    elif how == "dead_letter":
        await queue.dead_letter(m, reason="TARGET_REJECTED", description="refused")
    else:
        await queue.renew_lock(m)


SETTLEMENTS = ["complete", "abandon", "dead_letter", "renew_lock"]


# ------------------------------------------------------------------------------------------ peek-lock


async def test_receive_peek_locks_in_sequence_order_and_keeps_the_message_intact(
    queue_factory: QueueFactory,
) -> None:
    h = await queue_factory()
    sent = [message(1), message(2), message(3)]
    sent[1] = sent[1].model_copy(update={"content_type": "text/plain", "session_id": "s-2"})
    await h.queue.send(sent)

    got = await h.queue.receive(10)

    assert [m.message_id for m in got] == ["msg-1", "msg-2", "msg-3"]
    assert got[0].sequence_number < got[1].sequence_number < got[2].sequence_number
    for received, original in zip(got, sent, strict=True):
        assert received.body == original.body
        assert received.session_id == original.session_id
        assert received.correlation_id == original.correlation_id
        assert received.content_type == original.content_type
        assert received.application_properties == original.application_properties
        assert received.delivery_count == 1
        assert received.dead_letter_reason is None
        assert received.locked_until is not None
        assert h.now() < received.locked_until <= h.now() + timedelta(seconds=h.lock_duration_seconds + 1)
    assert len({m.lock_token for m in got}) == 3
    assert all(m.lock_token for m in got)
    assert await h.queue.receive(10) == []  # all three are locked


async def test_receive_returns_at_most_max_messages(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    await h.queue.send([message(n) for n in range(5)])

    assert numbers(await h.queue.receive(2)) == [0, 1]
    assert numbers(await h.queue.receive(2)) == [2, 3]
    assert numbers(await h.queue.receive(2)) == [4]


async def test_sequence_numbers_increase_across_sends(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    await h.queue.send([message(1)])
    first = await h.queue.receive(1)
    await h.queue.complete(first[0])
    await h.queue.send([message(2), message(3)])

    later = await h.queue.receive(10)

    assert first[0].sequence_number < later[0].sequence_number < later[1].sequence_number


async def test_complete_removes_the_message_for_good(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    await h.queue.send([message(1), message(2)])
    first, _ = await h.queue.receive(10)

    await h.queue.complete(first)
    await expire_locks(h)

    assert numbers(await h.queue.receive(10)) == [2]
    assert (await h.queue.depth()).active == 1
    with pytest.raises(LockLostError):
        await h.queue.complete(first)  # settled already


async def test_abandon_redelivers_at_once_with_a_higher_delivery_count(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    await h.queue.send([message(1)])
    [first] = await h.queue.receive(1)

    await h.queue.abandon(first)
    [again] = await h.queue.receive(1)

    assert again.sequence_number == first.sequence_number
    assert again.body == first.body
    assert again.delivery_count == 2
    assert again.lock_token != first.lock_token


async def test_an_abandon_costs_one_delivery_even_when_the_receive_asked_for_more(queue_factory: QueueFactory) -> None:
    # A receive that got fewer messages than it asked for leaves its link with credit: an abandoned message must
    # not be handed straight back to that link (locked and counted once more while nobody reads it).
    h = await queue_factory(max_delivery_count=10)
    await h.queue.send([message(1, session="s-1"), message(2, session="s-1"), message(3)])
    first, second, third = await h.queue.receive(10)

    await h.queue.abandon(first)
    await h.queue.complete(second)
    await h.queue.abandon(third)
    again = await h.queue.receive(10)

    assert sorted((numbers([m])[0], m.delivery_count) for m in again) == [(1, 2), (3, 2)]

async def test_an_expired_lock_counts_as_an_abandon(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    await h.queue.send([message(1)])
    [first] = await h.queue.receive(1)

    # 5 s short of expiry, not 1: on the broker the clock is wall time plus an offset, and a loaded machine can
    # spend a second between the advance and the receive.
    await h.advance(h.lock_duration_seconds - 5)
    assert await h.queue.receive(1) == []  # still locked
    await h.advance(6)
    [again] = await h.queue.receive(1)

    assert again.sequence_number == first.sequence_number
    assert again.delivery_count == 2
    with pytest.raises(LockLostError):
        await h.queue.complete(first)
    await h.queue.complete(again)
    assert (await h.queue.depth()).active == 0


@pytest.mark.parametrize("how", SETTLEMENTS)
async def test_settling_after_the_lock_expired_raises_and_changes_nothing(
    queue_factory: QueueFactory, how: str
) -> None:
    h = await queue_factory()
    await h.queue.send([message(1)])
    [first] = await h.queue.receive(1)
    await expire_locks(h)

    with pytest.raises(LockLostError):
        await settle_with(h.queue, how, first)

    assert await h.queue.depth() == QueueDepth(active=1, scheduled=0, dead_letter=0)
    [again] = await h.queue.receive(1)
    assert again.delivery_count == 2


@pytest.mark.parametrize("how", SETTLEMENTS)
async def test_a_stale_lock_token_raises_and_changes_nothing(queue_factory: QueueFactory, how: str) -> None:
    h = await queue_factory()
    await h.queue.send([message(1)])
    [stale] = await h.queue.receive(1)
    await h.queue.abandon(stale)
    [current] = await h.queue.receive(1)

    with pytest.raises(LockLostError):
        await settle_with(h.queue, how, stale)

    assert await h.queue.receive(1) == []  # the current lock still holds
    assert (await h.queue.depth()).dead_letter == 0
    await h.queue.complete(current)
    assert (await h.queue.depth()).active == 0


async def test_renew_lock_extends_the_lock(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    await h.queue.send([message(1)])
    [m] = await h.queue.receive(1)
    assert m.locked_until is not None
    original = m.locked_until

    await h.advance(h.lock_duration_seconds * 0.75)
    renewed = await h.queue.renew_lock(m)
    await h.advance(h.lock_duration_seconds * 0.5)  # past the original expiry, within the renewed one

    assert renewed > original
    assert renewed > h.now()
    assert await h.queue.receive(1) == []
    await h.queue.complete(m)


# ------------------------------------------------------------------------------------ delivery count


@pytest.mark.parametrize("release", ["abandon", "lock expiry"])
async def test_exceeding_the_max_delivery_count_dead_letters_instead_of_delivering(
    queue_factory: QueueFactory, release: str
) -> None:
    h = await queue_factory(max_delivery_count=3)
    sent = message(7, session="rec-7")
    await h.queue.send([sent])

    for attempt in (1, 2, 3):
        [m] = await h.queue.receive(1)
        assert m.delivery_count == attempt
        if release == "abandon":
            await h.queue.abandon(m)
        else:
            await expire_locks(h)

    assert await h.queue.receive(10) == []
    assert await h.queue.depth() == QueueDepth(active=0, scheduled=0, dead_letter=1)
    [dead] = await h.queue.peek_dead_letters()
    assert dead.dead_letter_reason == "MAX_DELIVERY_EXCEEDED"
    assert dead.dead_letter_description is not None
    assert "3" in dead.dead_letter_description
    assert dead.body == sent.body
    assert dead.message_id == sent.message_id
    assert dead.session_id == sent.session_id
    assert dead.application_properties == sent.application_properties


async def test_a_message_dead_lettered_on_receive_does_not_hold_back_its_session(
    queue_factory: QueueFactory,
) -> None:
    h = await queue_factory(max_delivery_count=1)
    await h.queue.send([message(1, session="a"), message(2, session="a")])
    [first] = await h.queue.receive(1)
    await h.queue.abandon(first)

    got = await h.queue.receive(10)

    assert numbers(got) == [2]
    assert [m.message_id for m in await h.queue.peek_dead_letters()] == ["msg-1"]


# ------------------------------------------------------------------------------------- dead-lettering


async def test_dead_letter_keeps_body_properties_reason_and_description(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    sent = message(4, session="rec-4")
    await h.queue.send([sent])
    [m] = await h.queue.receive(1)

    await h.queue.dead_letter(m, reason="UNMAPPED_CHOICE", description="status 9 has no entry in the value map")

    assert await h.queue.receive(10) == []
    await expire_locks(h)
    assert await h.queue.receive(10) == []
    assert await h.queue.depth() == QueueDepth(active=0, scheduled=0, dead_letter=1)
    [dead] = await h.queue.peek_dead_letters()
    assert dead.dead_letter_reason == "UNMAPPED_CHOICE"
    assert dead.dead_letter_description == "status 9 has no entry in the value map"
    assert dead.lock_token == ""
    assert dead.body == sent.body
    assert dead.message_id == sent.message_id
    assert dead.session_id == sent.session_id
    assert dead.correlation_id == sent.correlation_id
    assert dead.content_type == sent.content_type
    assert dead.application_properties == sent.application_properties
    assert dead.sequence_number == m.sequence_number


async def test_dead_letter_queue_peek_receive_and_complete(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    await h.queue.send([message(1), message(2), message(3)])
    for m in await h.queue.receive(2):
        await h.queue.dead_letter(m, reason="TARGET_REJECTED", description=f"bad {m.message_id}")

    peeked = await h.queue.peek_dead_letters(10)
    assert [m.message_id for m in peeked] == ["msg-1", "msg-2"]
    assert [m.message_id for m in await h.queue.peek_dead_letters(10)] == ["msg-1", "msg-2"]  # no lock
    assert [m.message_id for m in await h.queue.peek_dead_letters(1)] == ["msg-1"]

    [locked] = await h.queue.receive_dead_letters(1)
    assert locked.message_id == "msg-1"
    assert locked.lock_token
    assert locked.dead_letter_reason == "TARGET_REJECTED"
    assert locked.dead_letter_description == "bad msg-1"
    assert [m.message_id for m in await h.queue.receive_dead_letters(10)] == ["msg-2"]  # msg-1 is locked
    assert len(await h.queue.peek_dead_letters(10)) == 2  # browsing sees locked messages too

    await h.queue.complete(locked)

    assert [m.message_id for m in await h.queue.peek_dead_letters(10)] == ["msg-2"]
    assert await h.queue.depth() == QueueDepth(active=1, scheduled=0, dead_letter=1)
    assert numbers(await h.queue.receive(10)) == [3]  # completing in the DLQ left the main queue alone


async def test_dead_letter_queue_abandon_and_lock_expiry_redeliver(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    await h.queue.send([message(1)])
    [m] = await h.queue.receive(1)
    await h.queue.dead_letter(m, reason="TARGET_REJECTED", description="refused")

    [first] = await h.queue.receive_dead_letters(10)
    await h.queue.abandon(first)
    [second] = await h.queue.receive_dead_letters(10)
    await expire_locks(h)
    [third] = await h.queue.receive_dead_letters(10)

    assert second.delivery_count == first.delivery_count + 1
    assert third.delivery_count == second.delivery_count + 1
    with pytest.raises(LockLostError):
        await h.queue.complete(second)
    await h.queue.complete(third)
    assert (await h.queue.depth()).dead_letter == 0


async def test_the_dead_letter_queue_never_dead_letters(queue_factory: QueueFactory) -> None:
    h = await queue_factory(max_delivery_count=2)
    await h.queue.send([message(1)])
    [m] = await h.queue.receive(1)
    await h.queue.dead_letter(m, reason="TARGET_REJECTED", description="refused")

    for _ in range(5):
        [dead] = await h.queue.receive_dead_letters(1)
        await h.queue.abandon(dead)

    assert dead.delivery_count > h.queue.max_delivery_count
    [still] = await h.queue.peek_dead_letters()
    assert still.dead_letter_reason == "TARGET_REJECTED"
    assert (await h.queue.depth()).dead_letter == 1


# ------------------------------------------------------------------------------------------ scheduling


async def test_a_scheduled_message_is_invisible_until_due(queue_factory: QueueFactory) -> None:
    h = await queue_factory(lock_duration_seconds=300)  # msg-2 stays locked throughout
    await h.queue.send([message(1)], scheduled_at=h.now() + timedelta(seconds=60))
    await h.queue.send([message(2)])

    assert numbers(await h.queue.receive(10)) == [2]
    assert await h.queue.depth() == QueueDepth(active=1, scheduled=1, dead_letter=0)
    await h.advance(50)
    assert await h.queue.receive(10) == []

    await h.advance(11)

    [due] = await h.queue.receive(10)
    assert numbers([due]) == [1]
    assert due.delivery_count == 1
    assert await h.queue.depth() == QueueDepth(active=2, scheduled=0, dead_letter=0)


async def test_a_schedule_in_the_past_is_visible_at_once(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    await h.queue.send([message(1)], scheduled_at=h.now() - timedelta(minutes=5))

    assert numbers(await h.queue.receive(10)) == [1]


# ------------------------------------------------------------------------------------------- sessions


async def test_a_locked_message_holds_back_the_rest_of_its_session_only(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    await h.queue.send([message(1, session="a"), message(2, session="b"), message(3, session="a")])

    [a1] = await h.queue.receive(1)
    assert numbers(await h.queue.receive(10)) == [2]  # a-3 waits for a-1
    assert await h.queue.receive(10) == []

    await h.queue.complete(a1)

    assert numbers(await h.queue.receive(10)) == [3]


async def test_one_receive_may_return_several_messages_of_a_session_in_order(
    queue_factory: QueueFactory,
) -> None:
    h = await queue_factory()
    await h.queue.send([
        message(1, session="a"), message(2, session="a"), message(3, session="b"),
        message(4, session="a"), message(5),
    ])

    assert numbers(await h.queue.receive(10)) == [1, 2, 3, 4, 5]


async def test_a_released_session_head_comes_back_before_later_messages(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    await h.queue.send([message(1, session="a"), message(2, session="a")])

    [a1] = await h.queue.receive(1)
    await h.queue.abandon(a1)
    assert numbers(await h.queue.receive(1)) == [1]

    await expire_locks(h)
    again = await h.queue.receive(10)
    assert numbers(again) == [1, 2]
    assert again[0].delivery_count == 3


async def test_a_session_never_skips_an_undelivered_earlier_message(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    await h.queue.send([message(1, session="a"), message(2, session="a"), message(3, session="a")])
    a1, a2 = await h.queue.receive(2)

    await h.queue.complete(a2)
    assert await h.queue.receive(10) == []  # a-1 is still locked, so a-3 must wait

    await h.queue.abandon(a1)
    assert numbers(await h.queue.receive(10)) == [1, 3]


async def test_messages_without_a_session_are_not_ordered_against_each_other(
    queue_factory: QueueFactory,
) -> None:
    h = await queue_factory()
    await h.queue.send([message(1), message(2), message(3)])

    [first] = await h.queue.receive(1)

    assert numbers(await h.queue.receive(10)) == [2, 3]
    await h.queue.abandon(first)
    assert numbers(await h.queue.receive(10)) == [1]


# ---------------------------------------------------------------------------------------------- depth


async def test_depth_counts_active_scheduled_and_dead_lettered(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    assert await h.queue.depth() == QueueDepth(active=0, scheduled=0, dead_letter=0)
    await h.queue.send([message(1), message(2), message(3)])
    await h.queue.send([message(4), message(5)], scheduled_at=h.now() + timedelta(hours=1))
    first, second = await h.queue.receive(2)
    await h.queue.dead_letter(first, reason="TARGET_REJECTED", description="refused")

    # `second` is locked: still active
    assert await h.queue.depth() == QueueDepth(active=2, scheduled=2, dead_letter=1)
    await h.queue.complete(second)
    assert await h.queue.depth() == QueueDepth(active=1, scheduled=2, dead_letter=1)


async def test_peek_messages_browses_active_locked_and_scheduled_messages_without_locking(
    queue_factory: QueueFactory,
) -> None:
    h = await queue_factory()
    assert await h.queue.peek_messages(10) == []
    await h.queue.send([message(1), message(2)])
    due = h.now() + timedelta(hours=1)
    await h.queue.send([message(3)], scheduled_at=due)
    [locked] = await h.queue.receive(1)
    await h.queue.send([message(4)])
    [dead] = await h.queue.receive(1)
    await h.queue.dead_letter(dead, reason="TARGET_REJECTED", description="refused")

    peeked = await h.queue.peek_messages(10)

    assert [m.message_id for m in peeked] == ["msg-1", "msg-3", "msg-4"]  # the dead letter is not in the main queue
    assert [m.lock_token for m in peeked] == ["", "", ""]
    assert peeked[0].application_properties["flow"] == "parcels"
    assert peeked[0].correlation_id == "corr-1"
    assert peeked[0].scheduled_at is None
    assert peeked[2].scheduled_at is None
    assert peeked[1].scheduled_at is not None
    assert abs(peeked[1].scheduled_at - due) < timedelta(seconds=1)
    assert [m.message_id for m in await h.queue.peek_messages(1)] == ["msg-1"]
    await h.queue.complete(locked)  # browsing took no lock and changed nothing
    assert numbers(await h.queue.receive(10)) == [4]


# ------------------------------------------------------------------------------------------- waiting


async def test_receive_waits_up_to_max_wait_when_nothing_is_deliverable(queue_factory: QueueFactory) -> None:
    h = await queue_factory()
    started = time.monotonic()

    assert await h.queue.receive(1, max_wait_seconds=0.3) == []

    assert time.monotonic() - started >= 0.25


async def test_receive_returns_as_soon_as_a_message_arrives_during_the_wait(
    queue_factory: QueueFactory,
) -> None:
    h = await queue_factory()

    async def send_later() -> None:
        await asyncio.sleep(0.15)
        await h.queue.send([message(1)])

    started = time.monotonic()
    got, _ = await asyncio.gather(h.queue.receive(5, max_wait_seconds=10.0), send_later())

    assert numbers(got) == [1]
    assert time.monotonic() - started < 5.0


# ------------------------------------------------------------------------------- lone surrogates (#12)


async def test_lone_surrogates_reach_the_queue_body_exactly_and_the_metadata_as_valid_text(
    queue_factory: QueueFactory,
) -> None:
    from shared.core.envelope import ChangeEnvelope

    h = await queue_factory()
    change = ChangeEnvelope(flow="parcels", operation="upsert", source_system="dataverse", source_table="account",
                            source_key="k-\ud800", payload={"name": "caf\udce9", "tags": ["\udfff"]})
    sent = change.to_message()  # a PydanticSerializationError before: the body could not be made
    sent = QueueMessage(body=sent.body, message_id=sent.message_id, session_id=sent.session_id,
                        correlation_id="corr-\ud800", application_properties={**sent.application_properties,
                                                                              "note\udc00": "x\ud800"})
    await h.queue.send([sent])  # a UnicodeEncodeError on both queues before

    [got] = await h.queue.receive(1)
    assert ChangeEnvelope.from_body(got.body) == change
    assert got.session_id == "dataverse:account:k-\\ud800"
    assert got.correlation_id == "corr-\\ud800"
    assert got.application_properties["key"] == "k-\\ud800"
    assert got.application_properties["note\\udc00"] == "x\\ud800"

    await h.queue.dead_letter(got, reason="MAPPING_FAILED", description="field name: value 'caf\udce9' is bad")
    [dead] = await h.queue.peek_dead_letters()
    assert dead.dead_letter_description == "field name: value 'caf\\udce9' is bad"
    assert ChangeEnvelope.from_body(dead.body) == change
