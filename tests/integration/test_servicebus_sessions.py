"""Service Bus sessions as hash buckets of the record (docs/sessions.md), on the local AMQP broker through the SDK:
record order inside a bucket, few accepts, the concurrency bound, and old-shape messages draining after an upgrade."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient

from shared.core.envelope import QueueMessage, ReceivedMessage
from shared.runtime.azure.servicebus import (
    BUCKET_PREFIX,
    SESSION_PROPERTY,
    SESSIONLESS_PREFIX,
    ServiceBusQueue,
    session_bucket,
)
from shared.runtime.azure.servicebus.holds import _buffered
from shared.runtime.embedded import LockLostBatchError
from tests.sbbroker import BrokerHandle, start_broker

WAIT = 0.1  # loopback: a free session is offered within milliseconds


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerHandle]:
    handle = start_broker()
    yield handle
    handle.stop()


class Queues:
    """Fresh session-enabled queues on the broker, each with its adapter; closed at the end of the test."""

    def __init__(self, broker: BrokerHandle) -> None:
        self.broker = broker
        self.opened: list[ServiceBusQueue] = []

    def make(self, name: str | None = None, **options: Any) -> ServiceBusQueue:
        if name is None:
            name = f"sessions-{uuid.uuid4().hex[:10]}"
            self.broker.create_queue(name, lock_duration=30, max_delivery_count=10, requires_session=True)
        queue = ServiceBusQueue.from_connection_string(self.broker.connection_string, name, max_delivery_count=10,
                                                       sessions=True, session_wait_seconds=WAIT, **options)
        self.opened.append(queue)
        return queue

    def locked_sessions(self, queue: ServiceBusQueue) -> int:
        """Sessions the broker has locked on the queue's entity right now."""
        broker = self.broker._broker  # the test broker's own state, read on its thread
        return self.broker._call(lambda: len(broker.queues[queue.name].sessions))


@pytest.fixture
async def queues(broker: BrokerHandle) -> AsyncIterator[Queues]:
    made = Queues(broker)
    try:
        yield made
    finally:
        for queue in made.opened:
            await asyncio.wait_for(queue.close(), 30)


def change(record: str, n: int) -> QueueMessage:
    return QueueMessage(body=json.dumps({"record": record, "n": n}).encode(), message_id=f"{record}-{n}",
                        session_id=record, application_properties={"n": n})


def of(message: ReceivedMessage) -> tuple[str, int]:
    body = json.loads(message.body)
    return body["record"], body["n"]


def count_accepts(queue: ServiceBusQueue) -> list[str]:
    """Record every session the queue accepts (the cost that grew with the records before)."""
    accepted: list[str] = []
    adopt = queue._adopt

    def counting(receiver: Any) -> None:
        accepted.append(str(receiver.session.session_id))
        adopt(receiver)

    queue._adopt = counting  # type: ignore[method-assign]
    return accepted


async def test_a_bucket_brings_many_records_and_keeps_each_records_changes_in_order(queues: Queues) -> None:
    queue = queues.make(session_buckets=4, max_concurrent_sessions=4)
    accepted = count_accepts(queue)
    records = [f"dataverse:dot_signassets:{n:04d}" for n in range(60)]
    for n in range(3):  # interleaved: every record's first change, then every second one, ...
        await queue.send([change(r, n) for r in records])

    seen: dict[str, list[int]] = defaultdict(list)
    async with asyncio.timeout(120):
        while batch := await queue.receive(25):
            for message in batch:
                record, n = of(message)
                assert message.session_id == record  # the record's own session id, not its bucket
                assert message.delivery_count == 1
                seen[record].append(n)
            await queue.complete_many(batch)

    assert {r: seen[r] for r in records} == {r: [0, 1, 2] for r in records}
    # one accept per bucket (a drained bucket may be accepted once more when it refills), not one per record
    assert len(accepted) <= 8, accepted
    assert all(s.startswith(BUCKET_PREFIX) for s in accepted)


async def test_a_held_change_holds_back_only_its_own_records_later_changes_in_its_bucket(queues: Queues) -> None:
    queue = queues.make(session_buckets=1)  # every record in one bucket
    await queue.send([change("a", 1), change("b", 1), change("a", 2), change("c", 1), change("a", 3),
                      change("b", 2)])

    [a1] = await queue.receive(1)
    assert of(a1) == ("a", 1)
    others: list[tuple[str, int]] = []
    async with asyncio.timeout(60):
        while batch := await queue.receive(10):  # a-1 is held (failed, kept locked to the end of the cycle)
            others.extend(of(m) for m in batch)
            await queue.complete_many(batch)
    assert others == [("b", 1), ("c", 1), ("b", 2)]  # the bucket went on; a's later changes waited

    await queue.abandon_many([a1])  # the end of the cycle releases it, with its session
    again = await queue.receive(10)
    assert [(of(m), m.delivery_count) for m in again] == [(("a", 1), 2), (("a", 2), 2), (("a", 3), 2)]
    await queue.complete_many(again)
    assert (await queue.depth()).active == 0


async def test_no_more_sessions_than_the_bound_are_read_at_once(queues: Queues) -> None:
    buckets = 6
    queue = queues.make(session_buckets=buckets, max_concurrent_sessions=2)
    accepted = count_accepts(queue)
    records: dict[str, str] = {}
    n = 0
    while len(set(records.values())) < buckets:  # records that fill every bucket
        record = f"arcgis:SignAssets:{n}"
        records.setdefault(record, session_bucket(record, buckets))
        n += 1
    keys = sorted(records)
    for round_ in range(4):
        await queue.send([change(r, round_) for r in keys])
    reading: list[int] = []
    read = queue._read

    async def watched(readers: list[Any], budget: int) -> bool:
        reading.append(len(readers))
        return await read(readers, budget)

    queue._read = watched  # type: ignore[method-assign]
    received: list[tuple[str, int]] = []
    most_locked = 0
    async with asyncio.timeout(120):
        while batch := await queue.receive(6):
            received.extend(of(m) for m in batch)
            await queue.complete_many(batch)
            await asyncio.gather(*queue._closing)  # the detaches of drained sessions
            most_locked = max(most_locked, queues.locked_sessions(queue))

    assert max(reading) == 2  # sessions read at once (in parallel, one connection each)
    assert most_locked == 2  # and held at the broker between receives
    assert sorted(received) == sorted((r, k) for r in keys for k in range(4))
    assert len(set(accepted)) == buckets


async def test_messages_sent_in_the_old_shape_drain_after_an_upgrade(queues: Queues, broker: BrokerHandle) -> None:
    queue = queues.make(session_buckets=64)
    # What releases before issue 14 sent: the record key as the Service Bus session id, no property; and
    # sessionless messages with a session of their own.
    async with ServiceBusClient.from_connection_string(broker.connection_string) as client, \
            client.get_queue_sender(queue.name) as sender:
        await sender.send_messages([
            ServiceBusMessage(json.dumps({"record": r, "n": n}), message_id=f"old-{r}-{n}", session_id=r,
                              application_properties={"n": n})
            for n in range(2) for r in ("r1", "r2", "r3")
        ])
        await sender.send_messages(ServiceBusMessage(json.dumps({"record": "-", "n": 0}), message_id="old-none",
                                                     session_id=f"{SESSIONLESS_PREFIX}{uuid.uuid4().hex}"))
    await queue.send([change(r, 2) for r in ("r1", "r2", "r4")])  # and the new shape after the upgrade

    got: list[ReceivedMessage] = []
    async with asyncio.timeout(60):
        while batch := await queue.receive(50):
            got.extend(batch)
            await queue.complete_many(batch)

    by_record: dict[str | None, list[int]] = defaultdict(list)
    for message in got:
        assert SESSION_PROPERTY not in message.application_properties
        by_record[message.session_id].append(of(message)[1])
    assert dict(by_record) == {"r1": [0, 1, 2], "r2": [0, 1, 2], "r3": [0, 1], "r4": [2], None: [0]}
    assert (await queue.depth()).active == 0


async def test_one_session_per_record_is_still_there_with_zero_buckets(queues: Queues, broker: BrokerHandle) -> None:
    queue = queues.make(session_buckets=0)
    await queue.send([change("r1", 0), change("r2", 0)])
    async with ServiceBusClient.from_connection_string(broker.connection_string) as client, \
            client.get_queue_receiver(queue.name, session_id="r1", max_wait_time=5) as receiver:
        [raw] = await receiver.receive_messages(max_wait_time=5)
        assert raw.session_id == "r1"
        assert SESSION_PROPERTY.encode() not in (raw.application_properties or {})
        await receiver.complete_message(raw)
    [other] = await queue.receive(10)
    assert other.session_id == "r2"
    await queue.complete(other)


async def test_reserved_session_ids_and_properties_are_refused(queues: Queues) -> None:
    queue = queues.make()
    with pytest.raises(ValueError, match="reserved"):
        await queue.send([QueueMessage(body=b"{}", message_id="m", session_id=f"{BUCKET_PREFIX}64:1")])
    with pytest.raises(ValueError, match="reserved"):
        await queue.send([QueueMessage(body=b"{}", message_id="m", session_id="r",
                                       application_properties={SESSION_PROPERTY: "x"})])


def test_the_bucket_of_a_record_is_stable_and_spread() -> None:
    # pinned: a different bucket for a record would be an upgrade (docs/sessions.md), never a refactoring
    assert session_bucket("dataverse:dot_signassets:0001", 64) == "syncline-bucket:64:2"
    assert session_bucket("k-\ud800", 64).startswith(f"{BUCKET_PREFIX}64:")  # lone surrogates hash too
    spread = {session_bucket(f"dataverse:dot_signassets:{n}", 64) for n in range(2000)}
    assert len(spread) == 64


async def test_a_drain_works_past_a_failing_record_in_its_bucket_and_releases_its_sessions_at_the_end(
    queues: Queues, tmp_path: Path,
) -> None:
    for max_messages in (2, None):  # a drain cut short (its session still full), then one past a failure
        await _drain_past_a_failing_record(queues, tmp_path / str(max_messages), max_messages)


async def _drain_past_a_failing_record(queues: Queues, tmp_path: Path, max_messages: int | None) -> None:
    from shared.core.controller import Controller
    from shared.core.engine import SyncEngine
    from shared.core.envelope import ChangeEnvelope
    from shared.core.errors import TransientError
    from shared.runtime.embedded import SqliteStateStore
    from tests.fakes import FakeSystem
    from tests.unit.test_engine import SPEC, T0, sign_payload

    queue = queues.make(session_buckets=1)  # the failing record shares its bucket with every other one
    tmp_path.mkdir()
    state = SqliteStateStore(tmp_path / "state.db")
    dv, ag = FakeSystem("dataverse"), FakeSystem("arcgis", key_style="globalid")
    keys = [f"5160000{n}-0000-0000-0000-000000000000" for n in range(6)]
    for n, key in enumerate(keys):
        dv.put("dot_signassets", key, sign_payload(dot_signassetid=key, dot_assettag=f"SGN-{n:06d}"))
    if max_messages is None:
        ag.fail_match[keys[0]] = TransientError("arcgis answered 503")  # type: ignore[assignment]
    systems = {"dataverse": dv, "arcgis": ag}
    controller = Controller(SPEC, engine=SyncEngine(SPEC, sinks=systems, sources=systems, state=state), queue=queue,
                            state=state, sources=systems, max_attempts=3, batch_size=2)
    try:
        for n, key in enumerate(keys):  # the failing change first, then the others behind it in the bucket
            await queue.send([ChangeEnvelope(
                flow="sign_assets_to_field", operation="upsert", source_system="dataverse",
                source_table="dot_signassets", source_key=key, source_modified=T0,
                payload=sign_payload(dot_signassetid=key, dot_assettag=f"SGN-{n:06d}")).to_message()])

        if max_messages is not None:
            report = await controller.drain(max_messages=max_messages)
            await asyncio.gather(*queue._closing)
            assert report.received == max_messages
            assert queues.locked_sessions(queue) == 0  # released at the end of the drain: any instance may take it
            await controller.drain()
            assert (await queue.depth()).active == 0
            return
        report = await controller.drain()
        await asyncio.gather(*queue._closing)

        assert report.statuses == {"written": 5, "failed": 1}, report
        assert report.retried == 1
        assert {row["DV_ID"] for row in ag.tables["SignAssets"].values()} == set(keys[1:])
        assert queues.locked_sessions(queue) == 0  # released at the end of the drain: any instance may take it
        [again] = await queue.receive(10)
        assert again.application_properties["key"] == keys[0]
        assert again.delivery_count == 2  # one delivery for the one failed attempt, none for the batch rounds
        await queue.abandon(again)
    finally:
        await state.close()


def operations_since(broker: BrokerHandle, before: dict[str, int]) -> dict[str, int]:
    now = broker.operations()
    return {kind: now[kind] - before.get(kind, 0) for kind in now if now[kind] != before.get(kind, 0)}


async def test_a_sessions_settlements_go_in_one_management_request(queues: Queues, broker: BrokerHandle) -> None:
    queue = queues.make(session_buckets=1)
    await queue.send([change(f"r{n % 10}", n) for n in range(30)])
    batch = await queue.receive(30)
    assert len(batch) == 30  # every record's changes, in order (one receive hands out several of a record)

    before = broker.operations()
    await queue.complete_many(batch[:28])
    await queue.dead_letter_many(batch[28:], reason="TARGET_REJECTED", description="refused")
    spent = operations_since(broker, before)
    assert spent.get("management:update-disposition") == 2, spent
    assert "settle" not in spent, spent

    assert [(m.message_id, m.dead_letter_reason) for m in await queue.peek_dead_letters()] == [
        (m.message_id, "TARGET_REJECTED") for m in batch[28:]]
    assert (await queue.depth()).active == 0


async def test_without_the_sdks_internal_call_each_message_is_settled_on_its_link(
    queues: Queues, broker: BrokerHandle, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from azure.servicebus.aio import ServiceBusReceiver

    monkeypatch.delattr(ServiceBusReceiver, "_settle_message_via_mgmt_link")
    queue = queues.make(session_buckets=1)
    await queue.send([change(f"r{n}", n) for n in range(5)])
    batch = await queue.receive(5)

    before = broker.operations()
    await queue.complete_many(batch)
    spent = operations_since(broker, before)
    assert spent.get("settle") == 5, spent
    assert "management:update-disposition" not in spent, spent
    assert (await queue.depth()).active == 0


async def test_a_partly_lost_batch_completes_the_rest_and_raises_exactly_the_lost_ones(
    queues: Queues, broker: BrokerHandle,
) -> None:
    queue = queues.make(session_buckets=4)
    by_bucket: dict[str, list[str]] = defaultdict(list)
    n = 0
    while sum(len(v) >= 3 for v in by_bucket.values()) < 2:  # three records in each of two buckets
        record = f"arcgis:SignAssets:{n}"
        by_bucket[session_bucket(record, 4)].append(record)
        n += 1
    lost_bucket, kept_bucket = [b for b, v in by_bucket.items() if len(v) >= 3][:2]
    keys = by_bucket[lost_bucket][:3] + by_bucket[kept_bucket][:3]
    await queue.send([change(r, 0) for r in keys])
    batch: list[ReceivedMessage] = []
    async with asyncio.timeout(30):
        while len(batch) < len(keys):
            batch += await queue.receive(len(keys) - len(batch))
    in_lost = [m for m in batch if session_bucket(m.session_id or "", 4) == lost_bucket]
    in_kept = [m for m in batch if session_bucket(m.session_id or "", 4) == kept_bucket]
    entity = broker._broker.queues[queue.name]  # the broker's own state, changed on its thread

    def lose() -> None:
        now = broker.clock.now()
        entity._lose_session(entity.sessions[lost_bucket], now)  # one session's lock runs out
        entity.settle(uuid.UUID(in_kept[0].lock_token), "complete", now)  # one message of the other is settled
    broker._call(lose)

    with pytest.raises(LockLostBatchError) as raised:
        await queue.complete_many(batch)
    assert sorted(m.message_id for m in raised.value.lost) == sorted(m.message_id for m in [*in_lost, in_kept[0]])
    # the rest were completed: only the lost session's messages come back
    again: list[ReceivedMessage] = []
    async with asyncio.timeout(30):
        while len(again) < len(in_lost):
            again += await queue.receive(10)
    assert sorted(m.message_id for m in again) == sorted(m.message_id for m in in_lost)
    await queue.complete_many(again)
    assert (await queue.depth()).active == 0


async def test_a_held_session_is_renewed_only_once_half_its_lock_has_passed(
    queues: Queues, broker: BrokerHandle,
) -> None:
    queue = queues.make(session_buckets=1)
    await queue.send([change("a", n) for n in range(6)] + [change(f"b{n}", 0) for n in range(6)])
    before = broker.operations()
    first = await queue.receive(3)  # a's first change and two b's; a's later ones wait, read (pending)
    await queue.complete_many(first)
    second = await queue.receive(3)
    await queue.complete_many(second)
    assert "management:renew-session-lock" not in operations_since(broker, before)

    for session in queue._sessions.values():
        session.renewed_at -= session.lock_span  # as if half the lock had passed meanwhile
    before = broker.operations()
    third = await queue.receive(3)
    assert operations_since(broker, before).get("management:renew-session-lock") == 1
    await queue.complete_many(third)


async def test_after_finding_no_free_session_fewer_are_probed_at_once(queues: Queues, broker: BrokerHandle) -> None:
    queue = queues.make(max_concurrent_sessions=4)
    before = broker.operations()
    assert await queue.receive(10) == []
    assert operations_since(broker, before).get("connect") == 4  # four probes at once, none found a session
    before = broker.operations()
    assert await queue.receive(10) == []
    assert operations_since(broker, before).get("connect") == 1  # then one

    await queue.send([change(f"r{n}", 0) for n in range(40)])
    got: list[ReceivedMessage] = []
    async with asyncio.timeout(60):
        while batch := await queue.receive(40):
            got += batch
            await queue.complete_many(batch)
    assert len(got) == 40
    assert queue._probe == 1  # the last receive found none again


async def test_a_batch_is_settled_in_requests_of_settle_batch_and_a_lost_session_loses_all_of_them(
    queues: Queues, broker: BrokerHandle, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shared.runtime.azure.servicebus import settlement as servicebus_queue

    monkeypatch.setattr(servicebus_queue, "SETTLE_BATCH", 2)
    queue = queues.make(session_buckets=1)
    await queue.send([change(f"r{n}", 0) for n in range(6)])
    batch = await queue.receive(6)
    before = broker.operations()
    await queue.complete_many(batch)
    assert operations_since(broker, before).get("management:update-disposition") == 3

    await queue.send([change(f"s{n}", 0) for n in range(6)])
    batch = await queue.receive(6)
    [bucket] = {session_bucket(m.session_id or "", 1) for m in batch}
    entity = broker._broker.queues[queue.name]
    broker._call(lambda: entity._lose_session(entity.sessions[bucket], broker.clock.now()))  # its lock ran out
    before = broker.operations()
    with pytest.raises(LockLostBatchError) as raised:
        await queue.complete_many(batch)
    assert [m.message_id for m in raised.value.lost] == [m.message_id for m in batch]
    # one request told the session was lost; the other chunks were not sent
    assert operations_since(broker, before).get("management:update-disposition") == 1
    again = await queue.receive(6)
    assert sorted(m.message_id for m in again) == sorted(m.message_id for m in batch)
    assert all(m.delivery_count == 2 for m in again)
    await queue.complete_many(again)


async def test_a_message_arriving_after_a_read_returned_is_kept_for_the_next_read_not_released(
        queues: Queues, broker: BrokerHandle) -> None:
    """A read's credit (its budget) stays open after the call returns. The SDK, with no prefetch, releases what
    arrives on it meanwhile (a settlement and a redelivery, a delivery counted for nothing); the adapter has it kept
    for the session's next read instead (`_keep_late_arrivals`)."""
    queue = queues.make(session_buckets=1)
    await queue.send([change("r1", 1)])
    [first] = await queue.receive(10)  # fewer than asked: the call returns with credit still open
    [session] = queue._sessions.values()
    before = broker.operations()

    await queue.send([change("r2", 2)])  # the broker sends it on that credit while no read is under way
    for _ in range(150):  # the SDK's keep-alive reads the connection every few seconds
        spent = operations_since(broker, before)
        if _buffered(session.receiver) or "settle" in spent:
            break
        await asyncio.sleep(0.1)

    assert "settle" not in operations_since(broker, before)  # not released
    assert _buffered(session.receiver) == 1
    got = await queue.receive(10)
    assert [of(m) for m in got] == [("r2", 2)]
    assert got[0].delivery_count == 1
    await queue.complete_many([first, *got])
    assert (await queue.depth()).active == 0
