"""Cascades are finished when the parent's change comes back in sync, and cost nothing once they are complete."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from shared.core.errors import TransientError
from shared.core.ports import SourceRecord, WriteOp, WriteResult
from tests.fakes import FakeSystem
from tests.unit.test_engine import SIGN_ID, T0, env, sign_payload, world  # noqa: F401 - the fixture is used by name

WO = "0a1b2c3d-0000-4000-8000-000000000001"
TASKS = ["0a1b2c3d-0000-4000-8000-0000000000a1", "0a1b2c3d-0000-4000-8000-0000000000a2"]


def work_order(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"dot_workorderid": WO, "dot_name": "WO-1", "dot_worktype": 100000002,
                               "dot_status": 100000000, "dot_latitude": 38.0, "dot_longitude": -78.0,
                               "dot_signassetid": SIGN_ID}
    base.update(over)
    return base


def task(key: str, seq: int) -> dict[str, object]:
    return {"dot_workordertaskid": key, "dot_name": f"WO-1 #{seq}", "dot_sequence": seq, "dot_tasktype": 100000000,
            "dot_status": 100000000, "dot_workorderid": WO, "_dot_workorderid_value": WO}


class Counting:
    """Counts select calls of a fake system, and fails updates of chosen keys (a retriable 503)."""

    def __init__(self, system: FakeSystem) -> None:
        self.selects = 0
        self.fail_keys: set[str] = set()
        real_select, real_write = system.select, system.write

        async def select(table: str, *, equals: Mapping[str, Any],
                         not_in: Mapping[str, Sequence[Any]] | None = None) -> list[SourceRecord]:
            self.selects += 1
            return await real_select(table, equals=equals, not_in=not_in)

        async def write(ops: Sequence[WriteOp]) -> list[WriteResult]:
            failing = [op for op in ops if op.key in self.fail_keys]
            results = await real_write([op for op in ops if op.key not in self.fail_keys])
            return results + [WriteResult(op.op_id, False, error=TransientError("HTTP 503")) for op in failing]

        system.select = select  # type: ignore[method-assign]
        system.write = write  # type: ignore[method-assign]


async def test_a_half_applied_cascade_fails_its_parent_and_the_redelivery_finishes_it(world):  # noqa: F811
    engine, dv, ag, _state = world
    [sign] = await engine.process([env("sign_assets_to_field", SIGN_ID, sign_payload())])
    assert sign.status == "written", sign.error
    [wo] = await engine.process([env("work_orders_to_field", WO, work_order(), table="dot_workorders")])
    assert wo.status == "written", wo.error
    tasks = await engine.process([env("work_order_tasks_to_field", k, task(k, i), table="dot_workordertasks")
                                  for i, k in enumerate(TASKS, 1)])
    assert [t.status for t in tasks] == ["written", "written"], [t.error for t in tasks]
    ag_task = {t.envelope.source_key: t.target_key for t in tasks}
    ag_counter, dv_counter = Counting(ag), Counting(dv)
    ag_counter.fail_keys = {ag_task[TASKS[1]]}  # ArcGIS refuses the second task's update, this once

    closed = env("work_orders_to_field", WO, work_order(dot_status=100000003), table="dot_workorders",
                 modified=T0 + timedelta(minutes=5))
    [first] = await engine.process([closed])
    assert ag.tables["WorkOrders"][wo.target_key]["STATUS"] == "CLOSED"  # the parent was written
    assert ag.tables["WorkOrderTasks"][ag_task[TASKS[0]]]["STATUS"] == "CLOSED"
    assert ag.tables["WorkOrderTasks"][ag_task[TASKS[1]]]["STATUS"] == "OPEN"
    assert first.status == "failed"  # so its message is retried instead of completed
    assert first.error is not None
    assert first.error.retriable
    assert ag_task[TASKS[1]] in first.error.detail

    ag_counter.fail_keys = set()
    [again] = await engine.process([closed])  # the redelivery: the parent is in sync now
    assert again.status in ("skipped_echo", "skipped_noop"), again.error
    assert ag.tables["WorkOrderTasks"][ag_task[TASKS[1]]]["STATUS"] == "CLOSED"
    assert all(dv.tables["dot_workordertasks"][k]["dot_status"] == 100000003 for k in TASKS)

    # Complete now: more echoes of the closed parent (redeliveries, ArcGIS reporting it back) query nothing.
    before = ag_counter.selects + dv_counter.selects
    await engine.process([closed])
    feature = dict(ag.tables["WorkOrders"][wo.target_key])
    [echo] = await engine.process([env("work_orders_from_field", wo.target_key, feature, system="arcgis",
                                       table="WorkOrders", modified=T0 + timedelta(minutes=6))])
    assert echo.status in ("skipped_echo", "skipped_noop"), echo.error
    assert ag_counter.selects + dv_counter.selects == before

    # Reopened and closed again: a new state, so its cascade runs again.
    await engine.process([env("work_orders_to_field", WO, work_order(dot_status=100000000), table="dot_workorders",
                              modified=T0 + timedelta(minutes=7))])
    [reclosed] = await engine.process([env("work_orders_to_field", WO, work_order(dot_status=100000003),
                                           table="dot_workorders", modified=T0 + timedelta(minutes=8))])
    assert reclosed.status == "written"
    assert ag_counter.selects + dv_counter.selects > before
