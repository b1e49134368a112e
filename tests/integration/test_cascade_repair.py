"""A status cascade that fails part-way (a child write, or a crash after the parent write) is completed when the
parent's message comes back, and reconciliation finds and repairs a half-applied cascade."""

from __future__ import annotations

import contextlib
from typing import Any

from shared.bootstrap import Services, build_services
from shared.core.engine import SyncEngine
from shared.ops import initial_load, reconcile
from shared.settings import Settings

DV_OPEN, DV_CLOSED = 100000000, 100000003
CASCADE_DONE_DV = {100000001, 100000002, 100000003}
CASCADE_DONE_AG = {"DONE", "CANCELLED", "CLOSED"}


def work_order_with_open_tasks(box: Any, at_least: int = 2) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                                      list[dict[str, Any]]]:
    """An ArcGIS work order, its tasks in ArcGIS and in Dataverse, with at least `at_least` open tasks."""
    for wo in box.ag.all("WorkOrders"):
        if wo.get("STATUS") != "OPEN":
            continue
        ag_tasks = [t for t in box.ag.all("WorkOrderTasks") if t.get("WO_GUID") == wo["GlobalID"]
                    and t.get("STATUS") == "OPEN"]
        dv_tasks = [t for t in box.dv.all("dot_workordertasks")
                    if t.get("dot_workorderid") == wo["DV_ID"] and t.get("dot_status") == DV_OPEN]
        if len(ag_tasks) >= at_least and len(dv_tasks) >= at_least:
            return wo, ag_tasks, dv_tasks
    raise AssertionError("the seed has no work order with enough open tasks")


def open_tasks(box: Any, wo: dict[str, Any]) -> tuple[list[str], list[str]]:
    ag = [t["GlobalID"] for t in box.ag.all("WorkOrderTasks")
          if t.get("WO_GUID") == wo["GlobalID"] and t.get("STATUS") not in CASCADE_DONE_AG]
    dv = [t["dot_workordertaskid"] for t in box.dv.all("dot_workordertasks")
          if t.get("dot_workorderid") == wo["DV_ID"] and t.get("dot_status") not in CASCADE_DONE_DV]
    return ag, dv


async def quick_lock_services(monkeypatch: Any, services: Services) -> Services:
    """Services whose queue locks expire in a second: a "crashed" controller's messages come back quickly."""
    await services.aclose()
    monkeypatch.setenv("SYNCLINE_LOCK_SECONDS", "1")
    return build_services(Settings())


async def test_cascade_with_a_failed_child_write_is_completed_on_redelivery(seeded, monkeypatch):
    box, _summary, services = seeded
    await initial_load(services)
    wo, ag_tasks, dv_tasks = work_order_with_open_tasks(box)
    services = await quick_lock_services(monkeypatch, services)
    try:
        box.ag.field_edit("WorkOrders", wo["GlobalID"], {"STATUS": "COMPLETED"}, user="crew1")
        # Dataverse refuses the update of the second task (a 503 on that record only, inside the $batch).
        second = sorted(t["dot_workordertaskid"] for t in dv_tasks)[1]
        box.dv.faults.fail_next(50, 503, path_contains=second)
        first = await services.controller.run_cycle()
        assert first.outcome == "ok"
        assert box.dv.get("dot_workorders", wo["DV_ID"])["dot_status"] == 100000002  # the parent was written
        ag_open, dv_open = open_tasks(box, wo)
        assert ag_open == []
        assert dv_open == [second]  # half-applied so far
        # ... and the parent's message is kept for another try, not completed
        retries = [a for a in await services.state.read_audit(limit=10_000, decision="retry_scheduled")
                   if a.key == wo["GlobalID"]]
        assert retries
        assert "cascade" in retries[0].detail
        assert second in retries[0].detail

        box.dv.faults.clear()
        again = await services.controller.run_cycle(poll=False)
        assert again.outcome == "ok"
        assert again.statuses.get("skipped_echo", 0) + again.statuses.get("skipped_noop", 0) >= 1
        assert open_tasks(box, wo) == ([], [])
        assert box.dv.get("dot_workordertasks", second)["dot_status"] == DV_CLOSED
        depth = await services.queue.depth()
        assert (depth.active, depth.scheduled) == (0, 0)
        assert not [m for m in await services.queue.peek_dead_letters()
                    if m.application_properties.get("key") == wo["GlobalID"]]
        cascaded = await services.state.read_audit(limit=10_000, decision="cascaded")
        assert {a.key for a in cascaded} >= {second} | {t["GlobalID"] for t in ag_tasks}
    finally:
        await services.aclose()


async def test_crash_between_parent_write_and_cascade_is_completed_on_redelivery(seeded, monkeypatch):
    box, _summary, services = seeded
    await initial_load(services)
    wo, _ag_tasks, _dv_tasks = work_order_with_open_tasks(box)
    services = await quick_lock_services(monkeypatch, services)
    original = SyncEngine._cascade_side
    crashes = []

    async def crash_once(self: SyncEngine, *args: Any, **kwargs: Any) -> Any:
        if not crashes:
            crashes.append(1)
            raise RuntimeError("simulated crash after the parent write")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(SyncEngine, "_cascade_side", crash_once)
    try:
        box.ag.field_edit("WorkOrders", wo["GlobalID"], {"STATUS": "COMPLETED"}, user="crew1")
        with contextlib.suppress(RuntimeError):  # a crash of the process is what the redelivery recovers from
            await services.controller.run_cycle()
        assert crashes == [1]
        assert box.dv.get("dot_workorders", wo["DV_ID"])["dot_status"] == 100000002  # parent written before it
        ag_open, dv_open = open_tasks(box, wo)
        assert ag_open or dv_open  # the cascade did not run

        import asyncio
        await asyncio.sleep(1.2)  # a crashed controller's locks expire
        again = await services.controller.run_cycle(poll=False)
        assert again.outcome == "ok"
        assert open_tasks(box, wo) == ([], [])
        depth = await services.queue.depth()
        assert (depth.active, depth.scheduled) == (0, 0)
    finally:
        await services.aclose()


async def test_reconcile_finds_a_half_applied_cascade_and_repair_completes_it(seeded):
    box, _summary, services = seeded
    await initial_load(services)
    wo, ag_tasks, dv_tasks = work_order_with_open_tasks(box)
    # Both sides closed by hand, nothing cascaded (as a crash before the cascade, or an edit Syncline never saw).
    box.dv.apply_change("dot_workorders", {"dot_status": DV_CLOSED}, key=wo["DV_ID"])
    box.ag.field_edit("WorkOrders", wo["GlobalID"], {"STATUS": "CLOSED"}, user="crew1")

    drift = await reconcile(services.flowset, services.sources, services.state)
    [work_orders] = [d for d in drift if d.entity == "work_order"]
    incomplete = work_orders.cascade_incomplete
    assert work_orders.drift >= len(ag_tasks) + len(dv_tasks)
    for t in ag_tasks:
        assert f"close_tasks_with_work_order arcgis: parent {wo['GlobalID']} child {t['GlobalID']}" in incomplete
    for t in dv_tasks:
        assert (f"close_tasks_with_work_order dataverse: parent {wo['DV_ID']} child {t['dot_workordertaskid']}"
                in incomplete)
    assert all(wo["GlobalID"] in e or wo["DV_ID"] in e for e in incomplete)  # only this parent's children
    assert open_tasks(box, wo) != ([], [])  # reporting changes nothing
    # A dead-lettered parent (its message key, from either side) is excluded, on both sides, like any such record.
    excluded = await reconcile(services.flowset, services.sources, services.state,
                               exclude={"work_order": {wo["GlobalID"]}})
    assert sum(len(d.cascade_incomplete) for d in excluded) == 0

    repaired = await reconcile(services.flowset, services.sources, services.state, repair=True,
                               engine=services.engine)
    [work_orders] = [d for d in repaired if d.entity == "work_order"]
    assert work_orders.cascade_incomplete == []
    assert sorted(work_orders.cascade_repaired) == sorted(incomplete)
    assert open_tasks(box, wo) == ([], [])
    cascaded = {a.key for a in await services.state.read_audit(limit=10_000, decision="cascaded")}
    assert cascaded >= {t["GlobalID"] for t in ag_tasks} | {t["dot_workordertaskid"] for t in dv_tasks}

    after = await reconcile(services.flowset, services.sources, services.state)
    assert sum(len(d.cascade_incomplete) for d in after) == 0
    [tasks] = [d for d in after if d.entity == "work_order_task"]
    assert tasks.drift == 0  # both sides' tasks closed alike
