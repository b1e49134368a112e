"""`trace_record` over a real cycle against the simulators: an ArcGIS field edit found by the poll, written to
Dataverse, closing the work order's tasks on both sides (the cascades show on the parent's trace)."""

from __future__ import annotations

from shared.ops import initial_load
from shared.ops.trace import trace_record
from tests.integration.test_cascade_repair import work_order_with_open_tasks


async def test_a_polled_field_edit_with_its_cascades_traces_from_the_globalid(seeded):
    box, _summary, services = seeded
    await initial_load(services)
    wo, ag_tasks, dv_tasks = work_order_with_open_tasks(box)
    box.ag.field_edit("WorkOrders", wo["GlobalID"], {"STATUS": "COMPLETED"}, user="crew1")
    report = await services.controller.run_cycle()
    assert report.outcome == "ok"

    trace = await trace_record(services.state, services.queue, services.flowset, "arcgis",
                               wo["GlobalID"].strip("{}").lower())

    assert trace.records[:2] == [("arcgis", wo["GlobalID"]), ("dataverse", wo["DV_ID"])]
    decisions = [(h.decision, h.system, h.origin) for h in trace.hops]
    assert ("enqueued", "arcgis", "poll") in decisions
    assert ("written", "dataverse", "poll") in decisions
    written = next(h for h in trace.hops if h.decision == "written" and h.system == "dataverse")
    assert written.key == wo["DV_ID"]
    assert "dot_status" in written.detail  # the field the edit changed is named
    cascades = [h for h in trace.hops if h.decision == "cascade_triggered"]
    assert {h.system for h in cascades} == {"arcgis", "dataverse"}
    assert all(h.key in (wo["GlobalID"], wo["DV_ID"]) for h in cascades)
    on_dv = next(h for h in cascades if h.system == "dataverse")
    assert f"on {len(dv_tasks)} child(ren) in dot_workordertasks" in on_dv.detail
    on_ag = next(h for h in cascades if h.system == "arcgis")
    assert ag_tasks[0]["GlobalID"] in on_ag.detail or f"+{len(ag_tasks) - 5} more" in on_ag.detail
    assert trace.now == []
    assert any(link.entity == "work_order" for link in trace.links)
