"""One drain cycle works every message it can: a failing change costs one attempt and one delivery per cycle (not
per batch round) and blocks nothing behind it; work is settled per flow group, so a crash mid-batch brings back only
the changes not yet worked, with no failed attempt charged to them. On each runtime's real adapters: SQLite queue +
state, and Service Bus (the local AMQP broker) + Table Storage (Azurite)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from shared.core.controller import Controller
from shared.core.engine import SyncEngine
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import TransientError
from shared.core.ports import StateStore, WriteOp, WriteResult
from shared.settings import queue_max_delivery_count
from tests.contract.adapters import RUNTIMES, runtime_adapters
from tests.contract.conftest import QueueHarness
from tests.fakes import FakeSystem
from tests.unit.test_engine import SPEC, T0, sign_payload

ATTEMPTS = 3
LOCK_SECONDS = 30.0
BAD = ["bad00000-0000-0000-0000-000000000001", "bad00000-0000-0000-0000-000000000002"]
GOOD = [f"900d0000-0000-0000-0000-00000000000{n}" for n in range(1, 6)]
ORDERS = [f"0dde0000-0000-0000-0000-00000000000{n}" for n in range(1, 3)]


class FieldMaps(FakeSystem):
    """ArcGIS whose work-order writes can be made to hang (the process is killed while they are under way)."""

    def __init__(self) -> None:
        super().__init__("arcgis", key_style="globalid")
        self.hang = asyncio.Event()
        self.hanging = asyncio.Event()
        self.hang.set()

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        if any(op.table == "WorkOrders" for op in ops):
            self.hanging.set()
            await self.hang.wait()
        return await super().write(ops)


@dataclass
class World:
    harness: QueueHarness
    state: StateStore
    dv: FakeSystem
    ag: FieldMaps

    def controller(self, batch_size: int) -> Controller:
        systems = {"dataverse": self.dv, "arcgis": self.ag}
        engine = SyncEngine(SPEC, sinks=systems, sources=systems, state=self.state)
        return Controller(SPEC, engine=engine, queue=self.harness.queue, state=self.state, sources=systems,
                          clock=self.harness.now, max_attempts=ATTEMPTS, batch_size=batch_size,
                          lock_renew_seconds=LOCK_SECONDS / 3)

    async def send(self, envelopes: Sequence[ChangeEnvelope]) -> None:
        for envelope in envelopes:  # one by one: the queue's order is the order given
            await self.harness.queue.send([envelope.to_message()])

    async def attempts(self, envelope: ChangeEnvelope) -> int:
        """Failed attempts on record (reading the count adds one; it is taken back)."""
        mid = envelope.message_id()
        count = (await self.state.record_failures([mid]))[mid] - 1
        await self.state.clear_failures([mid])
        for _ in range(count):
            await self.state.record_failures([mid])
        return count


def sign(key: str, tag: str) -> ChangeEnvelope:
    payload = sign_payload(dot_signassetid=key, dot_assettag=tag)
    return ChangeEnvelope(flow="sign_assets_to_field", operation="upsert", source_system="dataverse",
                          source_table="dot_signassets", source_key=key, source_modified=T0, payload=payload,
                          origin="webhook")


def work_order(key: str, sign_key: str) -> ChangeEnvelope:
    payload = {"dot_workorderid": key, "dot_name": f"WO-{key[-1]}", "dot_worktype": 100000001,
               "dot_status": 100000000, "dot_signassetid": sign_key, "dot_latitude": 38.0, "dot_longitude": -78.0}
    return ChangeEnvelope(flow="work_orders_to_field", operation="upsert", source_system="dataverse",
                          source_table="dot_workorders", source_key=key, source_modified=T0, payload=payload,
                          origin="webhook")


@pytest.fixture(params=sorted(RUNTIMES), ids=sorted(RUNTIMES))
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    async with runtime_adapters(request, tmp_path, lock_duration_seconds=LOCK_SECONDS,
                                max_delivery_count=queue_max_delivery_count(ATTEMPTS)) as (harness, state):
        dv, ag = FakeSystem("dataverse"), FieldMaps()
        for n, key in enumerate([*BAD, *GOOD]):
            dv.put("dot_signassets", key, sign_payload(dot_signassetid=key, dot_assettag=f"SGN-{n:06d}"))
        for key in BAD:
            ag.fail_match[key] = TransientError("arcgis answered 503")  # type: ignore[assignment]
        yield World(harness, state, dv, ag)


async def test_failing_changes_ahead_cost_one_attempt_and_one_delivery_per_cycle_and_block_nothing(world: World):
    bad = [sign(key, f"SGN-B{n}") for n, key in enumerate(BAD)]
    good = [sign(key, f"SGN-G{n}") for n, key in enumerate(GOOD)]
    await world.send([*bad, *good])  # the failing ones first; a batch is smaller than the queue
    controller = world.controller(batch_size=2)

    report = await controller.drain()

    written = {row["DV_ID"] for row in world.ag.tables.get("SignAssets", {}).values()}
    assert written == set(GOOD), report  # every good change behind the failing ones, in this one cycle
    assert report.statuses == {"written": len(GOOD), "failed": len(BAD)}, report
    assert report.retried == len(BAD)
    assert [await world.attempts(e) for e in bad] == [1, 1]

    for cycle in range(2, ATTEMPTS):
        report = await controller.drain()
        assert report.received == len(BAD), (cycle, report)
        assert report.retried == len(BAD), (cycle, report)
        assert [await world.attempts(e) for e in bad] == [cycle, cycle]

    report = await controller.drain()

    assert report.dead_lettered == {"MAX_DELIVERY_EXCEEDED": len(BAD)}, report
    dead = await world.harness.queue.peek_dead_letters()
    assert sorted(m.application_properties["key"] for m in dead) == BAD
    for message in dead:
        # as many deliveries as attempts: no batch round and no re-receive in a cycle spent one
        assert f"failed {ATTEMPTS} attempts (SYNCLINE_MAX_DELIVERY_COUNT is {ATTEMPTS}) in {ATTEMPTS} deliveries" \
            in (message.dead_letter_description or ""), message.dead_letter_description
    depth = await world.harness.queue.depth()
    assert (depth.active, depth.scheduled) == (0, 0)


async def test_a_crash_mid_batch_returns_only_the_changes_not_yet_worked_and_charges_them_nothing(world: World):
    signs = [sign(key, f"SGN-G{n}") for n, key in enumerate(GOOD[:2])]
    orders = [work_order(key, GOOD[0]) for key in ORDERS]
    for order in orders:
        world.dv.put("dot_workorders", order.source_key, dict(order.payload))
    await world.send([*orders, *signs])  # one batch: the signs' flow goes first, then the work orders'
    world.ag.hang.clear()
    drain = asyncio.create_task(world.controller(batch_size=10).drain())
    await asyncio.wait_for(world.ag.hanging.wait(), 30)
    drain.cancel()  # the process dies while the work orders are being written
    with pytest.raises(asyncio.CancelledError):
        await drain
    world.ag.hang.set()
    await world.harness.advance(LOCK_SECONDS + 1)  # the dead process's locks run out

    back = await world.harness.queue.receive(10)

    # the signs were settled when their flow group was done; only the work orders come back, uncharged
    assert sorted(m.application_properties["key"] for m in back) == sorted(ORDERS)
    assert all(m.delivery_count == 2 for m in back)
    assert [await world.attempts(e) for e in orders] == [0, 0]
    await world.harness.advance(LOCK_SECONDS + 1)

    report = await world.controller(batch_size=10).drain()

    assert report.statuses == {"written": len(ORDERS)}, report
    assert len(world.ag.tables["WorkOrders"]) == len(ORDERS)
    assert len(world.ag.tables["SignAssets"]) == len(signs)


async def test_past_the_most_failed_changes_a_cycle_may_hold_it_ends_and_the_rest_waits_for_the_next(world: World):
    bad = [sign(key, f"SGN-B{n}") for n, key in enumerate(BAD)]
    good = [sign(key, f"SGN-G{n}") for n, key in enumerate(GOOD)]
    await world.send([*bad, *good])
    controller = world.controller(batch_size=2)
    controller.max_held = len(BAD)

    report = await controller.drain()

    assert report.received == len(BAD), report  # it stopped receiving once it held as many as it may
    assert report.statuses == {"failed": len(BAD)}, report
    assert [await world.attempts(e) for e in bad] == [1, 1]
    depth = await world.harness.queue.depth()
    assert depth.active == len(BAD) + len(GOOD)  # the held ones were released, nothing was lost or settled


async def test_what_a_drain_remembers_is_bounded_by_the_batch_not_the_backlog(world: World):
    """A drain remembers a message only until it is settled for good (the failing ones are held to the end): a
    cycle of 100,000 changes must not keep 100,000 sequence numbers (issue 14's memory target)."""
    bad = [sign(key, f"SGN-B{n}") for n, key in enumerate(BAD)]
    good = [sign(key, f"SGN-G{n}") for n, key in enumerate(GOOD)]
    await world.send([*bad, *good])
    controller = world.controller(batch_size=2)
    remembered: list[int] = []
    receive = controller.queue.receive

    async def counting_receive(max_messages: int, **kwargs: float) -> list:
        remembered.append(len(controller._seen))
        return await receive(max_messages, **kwargs)

    controller.queue.receive = counting_receive  # type: ignore[method-assign]

    report = await controller.drain()

    assert report.statuses == {"written": len(GOOD), "failed": len(BAD)}, report
    assert len(remembered) >= 4  # several receives: the backlog is several batches
    assert max(remembered) <= len(BAD) + 2, remembered  # the held failures and at most one batch in flight


async def test_a_resubmitted_child_in_the_batch_of_its_parents_cascade_is_written_as_the_cascade_left_it(world: World):
    """A resubmission is written with its source record as it is when its flow group runs, not as it was when the
    batch was received: a parent's cascade earlier in the same batch may have changed it (the demo's flake: a
    deferred task created OPEN in ArcGIS after its completed work order's cascade closed it in Dataverse)."""
    wo_id = ORDERS[0]
    task_id = "7a5c0000-0000-0000-0000-000000000001"
    order = work_order(wo_id, GOOD[0])
    world.dv.put("dot_workorders", wo_id, dict(order.payload))
    await world.send([sign(GOOD[0], "SGN-W0"), order])
    controller = world.controller(batch_size=50)
    await controller.drain()
    [wo_gid] = [k for k, row in world.ag.tables["WorkOrders"].items() if row.get("DV_ID") == wo_id]
    task = {"dot_workordertaskid": task_id, "dot_name": "Mount sign", "dot_tasktype": 100000002,
            "dot_status": 100000000, "dot_workorderid": wo_id, "_dot_workorderid_value": wo_id}
    world.dv.put("dot_workordertasks", task_id, task)  # its direct write was deferred: not in ArcGIS yet
    world.ag.tables["WorkOrders"][wo_gid]["STATUS"] = "COMPLETED"  # the crew completes the work order
    completed = ChangeEnvelope(flow="work_orders_from_field", operation="upsert", source_system="arcgis",
                               source_table="WorkOrders", source_key=wo_gid,
                               payload=dict(world.ag.tables["WorkOrders"][wo_gid]), origin="poll",
                               source_modified=T0 + timedelta(hours=1))
    resubmitted = ChangeEnvelope(flow="work_order_tasks_to_field", operation="upsert", source_system="dataverse",
                                 source_table="dot_workordertasks", source_key=task_id, payload=task,
                                 origin="resubmit", source_modified=T0)
    await world.send([completed, resubmitted])

    report = await controller.drain()

    assert report.statuses.get("written") == 2, report
    assert world.dv.tables["dot_workordertasks"][task_id]["dot_status"] == 100000003  # closed by the cascade
    [field_task] = world.ag.tables["WorkOrderTasks"].values()
    assert field_task["STATUS"] == "CLOSED", field_task


async def test_the_next_batch_is_received_while_the_current_one_is_worked(world: World):
    """A round trip to the broker per batch overlaps the batch's work instead of adding to it; the batch received
    ahead is worked next, once, with every change written and none delivered twice."""
    order = work_order(ORDERS[0], GOOD[0])
    world.dv.put("dot_workorders", order.source_key, dict(order.payload))
    first = [sign(GOOD[0], "SGN-G0"), order]  # one batch: its work order's write hangs
    ahead = [sign(key, f"SGN-G{n}") for n, key in enumerate(GOOD[1:3], start=1)]
    await world.send([*first, *ahead])
    controller = world.controller(batch_size=2)
    received: list[list[str]] = []
    receive = controller.queue.receive

    async def recording_receive(max_messages: int, **kwargs: float) -> list:
        got = await receive(max_messages, **kwargs)
        received.append(sorted(m.application_properties["key"] for m in got))
        return got

    controller.queue.receive = recording_receive  # type: ignore[method-assign]
    world.ag.hang.clear()
    drain = asyncio.create_task(controller.drain())
    await asyncio.wait_for(world.ag.hanging.wait(), 30)
    for _ in range(300):  # the receive ahead runs beside the hanging write
        if len(received) >= 2:
            break
        await asyncio.sleep(0.05)

    assert received[:2] == [sorted([GOOD[0], ORDERS[0]]), sorted(GOOD[1:3])]
    assert "SignAssets" not in world.ag.tables or not {GOOD[1], GOOD[2]} & {
        row["DV_ID"] for row in world.ag.tables["SignAssets"].values()}  # received, not worked yet

    world.ag.hang.set()
    report = await asyncio.wait_for(drain, 60)

    assert report.statuses == {"written": 4}, report
    assert report.retried == 0
    assert report.received == 4
    assert {row["DV_ID"] for row in world.ag.tables["SignAssets"].values()} == set(GOOD[:3])
    depth = await world.harness.queue.depth()
    assert (depth.active, depth.scheduled, depth.dead_letter) == (0, 0, 0)
