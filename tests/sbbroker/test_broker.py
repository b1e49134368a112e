"""What the contract suite does not reach: a non-session ServiceBusQueue, and broker features used through the SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusMessage, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.exceptions import MessageLockLostError, ServiceBusError

from shared.core.envelope import QueueMessage
from shared.core.ports import QueueDepth
from shared.runtime.azure import ServiceBusQueue
from shared.runtime.embedded import MAX_DELIVERY_EXCEEDED, LockLostBatchError
from tests.sbbroker import LATENCY_VARIABLE, BrokerHandle, latency_from_environment, start_broker


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerHandle]:
    handle = start_broker({
        "plain": {"lock_duration": 30, "max_delivery_count": 2},
        "sessions": {"requires_session": True, "lock_duration": 30},
    })
    yield handle
    handle.stop()


def message(n: int) -> QueueMessage:
    return QueueMessage(body=json.dumps({"n": n}).encode(), message_id=f"msg-{n}", application_properties={"n": n})


async def test_a_non_session_queue_keeps_service_bus_semantics(broker: BrokerHandle) -> None:
    queue = ServiceBusQueue.from_connection_string(
        broker.connection_string, "plain", max_delivery_count=2, session_wait_seconds=0.1
    )
    try:
        async with asyncio.timeout(60):
            await _exercise(queue)
    finally:
        await asyncio.wait_for(queue.close(), 30)


async def _exercise(queue: ServiceBusQueue) -> None:
    await queue.send([message(1), message(2), message(3)])
    await queue.send([message(4)], scheduled_at=datetime.now(UTC) + timedelta(hours=1))

    first, second, third = await queue.receive(10)
    assert [m.message_id for m in (first, second, third)] == ["msg-1", "msg-2", "msg-3"]
    assert all(m.delivery_count == 1 and m.locked_until is not None for m in (first, second, third))
    await queue.dead_letter(second, reason="TARGET_REJECTED", description="refused")
    await queue.abandon(third)
    [again] = await queue.receive(10)
    assert (again.message_id, again.delivery_count) == ("msg-3", 2)
    await queue.abandon(again)  # its second delivery was the last one allowed

    assert await queue.depth() == QueueDepth(active=1, scheduled=1, dead_letter=2)
    dead = await queue.peek_dead_letters()
    assert [(m.message_id, m.dead_letter_reason) for m in dead] == [
        ("msg-2", "TARGET_REJECTED"), ("msg-3", MAX_DELIVERY_EXCEEDED),
    ]
    assert dead[0].application_properties == {"n": 2}  # the reason is not an application property
    with pytest.raises(LockLostBatchError) as lost:
        await queue.complete_many([first, second])
    assert lost.value.lost == (second,)
    assert (await queue.depth()).active == 0


async def test_deferral_session_state_and_cancelled_schedules_through_the_sdk(broker: BrokerHandle) -> None:
    async with asyncio.timeout(60), ServiceBusClient.from_connection_string(broker.connection_string) as client:
        async with client.get_queue_sender("sessions") as sender:
            later = datetime.now(UTC) + timedelta(hours=1)
            [cancelled] = await sender.schedule_messages(ServiceBusMessage(b"x", session_id="s"), later)
            await sender.cancel_scheduled_messages(cancelled)
            await sender.send_messages(ServiceBusMessage(b"deferred", session_id="s"))
        receiver = client.get_queue_receiver("sessions", session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1)
        async with receiver:
            assert receiver.session.session_id == "s"
            [deferred] = await receiver.receive_messages(10, max_wait_time=0.5)
            await receiver.defer_message(deferred)
            assert await receiver.receive_messages(10, max_wait_time=0.2) == []
            [back] = await receiver.receive_deferred_messages([deferred.sequence_number])
            assert str(back) == "deferred"
            await receiver.complete_message(back)
            await receiver.session.set_state(b"cursor-7")
            assert await receiver.session.get_state() == b"cursor-7"
        async with client.get_queue_receiver("sessions") as browser:
            assert await browser.peek_messages(10, sequence_number=1) == []


async def test_unknown_entities_and_sessionless_sends_to_session_queues_are_refused(broker: BrokerHandle) -> None:
    client = ServiceBusClient.from_connection_string(broker.connection_string, retry_total=0)
    async with asyncio.timeout(60), client:
        async with client.get_queue_sender("sessions") as sender:
            with pytest.raises(ServiceBusError):
                await sender.send_messages(ServiceBusMessage(b"no session"))
        with pytest.raises(ServiceBusError):
            async with client.get_queue_sender("missing") as sender:
                await sender.send_messages(ServiceBusMessage(b"x"))


LATENCY_MS = 50.0
OPERATIONS = 12


async def _timed_sends_and_completes(handle: BrokerHandle) -> tuple[float, float]:
    """Seconds taken by OPERATIONS sequential sends, then by OPERATIONS sequential completes."""
    handle.create_queue("timed", lock_duration=60)
    async with ServiceBusClient.from_connection_string(handle.connection_string) as client:
        async with client.get_queue_sender("timed") as sender:
            started = time.perf_counter()
            for n in range(OPERATIONS):
                await sender.send_messages(ServiceBusMessage(f"m{n}"))
            sent = time.perf_counter() - started
        async with client.get_queue_receiver("timed") as receiver:
            received: list[Any] = []
            while len(received) < OPERATIONS:
                received += await receiver.receive_messages(OPERATIONS, max_wait_time=5)
            started = time.perf_counter()
            for item in received:
                await receiver.complete_message(item)
            completed = time.perf_counter() - started
    return sent, completed


async def test_the_latency_knob_delays_every_operation() -> None:
    handle = start_broker(latency_ms=LATENCY_MS)
    try:
        assert handle.latency_ms == LATENCY_MS
        async with asyncio.timeout(60):
            sent, completed = await _timed_sends_and_completes(handle)
        operations = handle.operations()
    finally:
        handle.stop()
    # a lower bound only: the knob must cost at least its delay per operation (not a speed claim)
    assert sent >= OPERATIONS * LATENCY_MS / 1000
    assert completed >= OPERATIONS * LATENCY_MS / 1000
    assert operations["send"] == OPERATIONS
    assert operations["settle"] == OPERATIONS
    assert min(operations["receive"], operations["cbs"]) >= 1
    assert operations["attach"] >= 2


async def test_the_latency_knob_is_off_by_default_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(LATENCY_VARIABLE, raising=False)
    handle = start_broker()
    try:
        assert handle.latency_ms == 0.0
        async with asyncio.timeout(60):
            sent, completed = await _timed_sends_and_completes(handle)
        assert handle.operations()["send"] == OPERATIONS  # counted even without a delay
    finally:
        handle.stop()
    assert sent + completed < 2 * OPERATIONS * LATENCY_MS / 1000  # what the knob at 50 ms would cost at least

    monkeypatch.setenv(LATENCY_VARIABLE, "7.5")
    assert latency_from_environment() == 7.5
    handle = start_broker()
    try:
        assert handle.latency_ms == 7.5
        handle.latency_ms = 0
        assert handle.latency_ms == 0.0
    finally:
        handle.stop()
    monkeypatch.setenv(LATENCY_VARIABLE, "fast")
    with pytest.raises(ValueError, match=LATENCY_VARIABLE):
        start_broker()


async def test_update_disposition_settles_many_tokens_of_one_session_and_refuses_a_batch_with_any_other(
    broker: BrokerHandle,
) -> None:
    broker.create_queue("batched", requires_session=True, lock_duration=30)
    client = ServiceBusClient.from_connection_string(broker.connection_string, retry_total=0)
    async with asyncio.timeout(60), client:
        async with client.get_queue_sender("batched") as sender:
            await sender.send_messages([ServiceBusMessage(f"{s}{n}", session_id=s) for s in "ab" for n in range(3)])
        a = client.get_queue_receiver("batched", session_id="a", max_wait_time=1)
        b = client.get_queue_receiver("batched", session_id="b", max_wait_time=1)
        async with a, b:
            got_a = await a.receive_messages(10, max_wait_time=1)
            got_b = await b.receive_messages(10, max_wait_time=1)
            assert (len(got_a), len(got_b)) == (3, 3)
            before = broker.operations().get("management:update-disposition", 0)

            # a token of session b among a's: the request is refused as a lost lock, and none of it applied
            with pytest.raises(MessageLockLostError):
                await a._settle_message_via_mgmt_link("completed", [m.lock_token for m in (*got_a, got_b[0])])
            # a token settled already (lost): likewise
            tokens = [m.lock_token for m in got_a]
            await a.complete_message(got_a[0])
            with pytest.raises(MessageLockLostError):
                await a._settle_message_via_mgmt_link("completed", tokens)
            # the rest of a's in one request, link-received as they are
            await a._settle_message_via_mgmt_link("completed", tokens[1:])
            # b's dead-lettered in one request, with the reason
            await b._settle_message_via_mgmt_link(
                "suspended", [m.lock_token for m in got_b],
                dead_letter_details={"deadletter-reason": "TARGET_REJECTED", "deadletter-description": "no"})
            assert broker.operations()["management:update-disposition"] - before == 4
        async with client.get_queue_receiver("batched") as browser:
            assert await browser.peek_messages(10, sequence_number=1) == []
        async with client.get_queue_receiver("batched", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dead:
            letters = await dead.peek_messages(10, sequence_number=1)
            assert [(str(m), m.dead_letter_reason) for m in letters] == [(f"b{n}", "TARGET_REJECTED") for n in range(3)]
