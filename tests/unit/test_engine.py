"""Unit tests of the sync engine on the shipped dot-signs spec, with in-memory systems and real SQLite state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.core.engine import SyncEngine
from shared.core.envelope import ChangeEnvelope
from shared.core.ports import GEOMETRY_KEY
from shared.mapping.spec import load_spec
from shared.runtime.embedded import SqliteStateStore
from tests.fakes import FakeSystem

SPEC = load_spec(Path(__file__).resolve().parents[2] / "flows" / "dot-signs.yaml")
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
SIGN_ID = "6d81597f-0f9f-e711-8122-000d3aa2331c"


def sign_payload(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "dot_signassetid": SIGN_ID, "dot_assettag": "SGN-000001", "dot_mutcdcode": "r1-1",
        "dot_signtype": 100000000, "dot_condition": 100000000, "dot_route": "US-29", "dot_milepost": 12.3456,
        "dot_mountheightft": 7.0, "dot_installdate": "2019-05-01", "dot_latitude": 38.0293, "dot_longitude": -78.4767,
    }
    base.update(over)
    return base


def env(flow: str, key: str, payload: dict[str, object], *, system: str = "dataverse", table: str = "dot_signassets",
        op: str = "upsert", modified: datetime = T0, waits: int = 0) -> ChangeEnvelope:
    return ChangeEnvelope(flow=flow, operation=op, source_system=system, source_table=table,  # type: ignore[arg-type]
                          source_key=key, source_modified=modified, payload=payload, waits=waits)


class _Recording(SyncEngine):
    """The engine, with every Dataverse-sourced record also present in the fake Dataverse (as in reality)."""

    dv: FakeSystem

    async def process(self, envelopes):  # type: ignore[override]
        for e in envelopes:
            if e.source_system == "dataverse" and e.operation != "delete":
                row = self.dv.tables.setdefault(e.source_table, {}).setdefault(e.source_key, {})
                row.update(e.payload)
        return await super().process(envelopes)


@pytest.fixture
async def world():
    dv, ag = FakeSystem("dataverse"), FakeSystem("arcgis", key_style="globalid")
    state = SqliteStateStore(":memory:")
    engine = _Recording(SPEC, sinks={"dataverse": dv, "arcgis": ag}, sources={"dataverse": dv, "arcgis": ag},
                        state=state, clock=lambda: T0)
    engine.dv = dv
    yield engine, dv, ag, state
    await state.close()


async def test_create_translates_values_geometry_and_propagates_the_new_id(world):
    engine, dv, ag, state = world
    dv.put("dot_signassets", SIGN_ID, sign_payload())
    [outcome] = await engine.process([env("sign_assets_to_field", SIGN_ID, sign_payload())])
    assert outcome.status == "written"
    assert outcome.created
    feature = ag.tables["SignAssets"][outcome.target_key]
    assert feature["SIGN_TYPE"] == "REG"
    assert feature["MUTCD_CODE"] == "R1-1"
    assert feature["MOUNT_HEIGHT_M"] == pytest.approx(2.134, abs=1e-3)
    assert feature["DV_ID"] == SIGN_ID
    assert feature["INSTALL_DATE"] == int(datetime(2019, 5, 1, tzinfo=UTC).timestamp() * 1000)
    assert feature[GEOMETRY_KEY]["x"] == pytest.approx(-8735986.28, abs=0.05)  # -78.4767 deg * 111319.49 m/°
    # identifier propagation: the GlobalID is written back to the Dataverse record
    assert dv.tables["dot_signassets"][SIGN_ID]["dot_arcgisglobalid"] == outcome.target_key
    links = await state.get_links("sign_asset", "dataverse", [SIGN_ID], "arcgis")
    assert links == {SIGN_ID: outcome.target_key}
    decisions = {a.decision for a in await state.read_audit(limit=10)}
    assert {"written", "id_propagated"} <= decisions


async def test_echo_of_our_own_write_is_dropped_in_both_directions(world):
    engine, dv, ag, _ = world
    [out] = await engine.process([env("sign_assets_to_field", SIGN_ID, sign_payload())])
    writes_before = len(ag.writes) + len(dv.writes)
    # ArcGIS reports the feature we just created: it must not come back to Dataverse.
    feature = dict(ag.tables["SignAssets"][out.target_key])
    feature["EditDate"] = 1_800_000_000_000
    [back] = await engine.process([env("sign_assets_from_field", out.target_key, feature, system="arcgis",
                                       table="SignAssets", modified=T0 + timedelta(seconds=5))])
    assert back.status == "skipped_echo"
    # Dataverse reports the write-back of the GlobalID: not a mapped change, so no write to ArcGIS either.
    [again] = await engine.process([env("sign_assets_to_field", SIGN_ID,
                                        sign_payload(dot_arcgisglobalid=out.target_key))])
    assert again.status == "skipped_echo"
    assert len(ag.writes) + len(dv.writes) == writes_before


async def test_unmapped_choice_is_permanent_with_an_actionable_reason(world):
    engine, _, ag, _ = world
    [out] = await engine.process([env("sign_assets_to_field", SIGN_ID, sign_payload(dot_signtype=100000009))])
    assert out.status == "failed"
    assert out.error is not None
    assert out.error.reason == "UNMAPPED_CHOICE"
    assert not out.error.retriable
    assert "100000009" in out.error.detail
    assert "value_maps.sign_type" in out.error.detail
    assert ag.writes == []


async def test_missing_required_field_fails_only_that_record(world):
    engine, _, ag, _ = world
    other = "11111111-2222-3333-4444-555555555555"
    outs = await engine.process([
        env("sign_assets_to_field", SIGN_ID, sign_payload(dot_mutcdcode="")),
        env("sign_assets_to_field", other, sign_payload(dot_signassetid=other, dot_assettag="SGN-2")),
    ])
    assert [o.status for o in outs] == ["failed", "written"]
    assert outs[0].error is not None
    assert outs[0].error.reason == "REQUIRED_FIELD_MISSING"
    assert "dot_mutcdcode" in outs[0].error.detail
    assert len(ag.tables["SignAssets"]) == 1


async def test_child_waits_for_parent_and_parents_go_first_in_a_batch(world):
    engine, _, ag, _ = world
    wo_id = "aaaaaaaa-0000-0000-0000-000000000001"
    wo = {"dot_workorderid": wo_id, "dot_name": "WO-1", "dot_worktype": 100000001, "dot_status": 100000000,
          "dot_signassetid": SIGN_ID, "dot_latitude": 38.0, "dot_longitude": -78.0}
    # Alone, the work order must wait for its sign.
    [waiting] = await engine.process([env("work_orders_to_field", wo_id, wo, table="dot_workorders")])
    assert waiting.status == "deferred"
    assert waiting.error is not None
    assert waiting.error.reason == "PARENT_PENDING"
    # Child listed before its parent in one batch: the parent is written first, then the child binds to it.
    outs = await engine.process([
        env("work_orders_to_field", wo_id, wo, table="dot_workorders"),
        env("sign_assets_to_field", SIGN_ID, sign_payload()),
    ])
    assert [o.status for o in outs] == ["written", "written"]
    assert ag.tables["WorkOrders"][outs[0].target_key]["ASSET_GUID"] == outs[1].target_key


async def test_parent_that_never_arrives_ends_as_parent_missing(world):
    engine, _, _, _ = world
    wo = {"dot_workorderid": "w1", "dot_name": "WO-1", "dot_worktype": 100000001, "dot_status": 100000000,
          "dot_signassetid": SIGN_ID}
    [out] = await engine.process([env("work_orders_to_field", "w1", wo, table="dot_workorders",
                                      waits=engine.max_parent_waits)])
    assert out.status == "failed"
    assert out.error is not None
    assert out.error.reason == "PARENT_MISSING"


async def test_ownership_then_last_writer_wins(world):
    engine, dv, ag, state = world
    [out] = await engine.process([env("sign_assets_to_field", SIGN_ID, sign_payload())])
    gid = out.target_key
    # Field crew changes condition (ArcGIS owns it) and moves the sign (shared) at T0+10min.
    ag.tables["SignAssets"][gid].update(
        CONDITION="DAMAGED", **{GEOMETRY_KEY: {"x": -8735000.0, "y": 4584000.0, "spatialReference": {"wkid": 102100}}})
    field_change = dict(ag.tables["SignAssets"][gid])
    [inbound] = await engine.process([env("sign_assets_from_field", gid, field_change, system="arcgis",
                                          table="SignAssets", modified=T0 + timedelta(minutes=10))])
    assert inbound.status == "written"
    assert dv.tables["dot_signassets"][SIGN_ID]["dot_condition"] == 100000003
    # A late office edit made at T0+5min arrives afterwards: it tries to set condition (owned by ArcGIS)
    # and an older location (shared, but ArcGIS is newer) — neither may overwrite the field's values.
    late = sign_payload(dot_condition=100000001, dot_latitude=38.5, dot_route="US-250")
    [outbound] = await engine.process([env("sign_assets_to_field", SIGN_ID, late, modified=T0 + timedelta(minutes=5))])
    assert outbound.status == "written"
    feature = ag.tables["SignAssets"][gid]
    assert feature["CONDITION"] == "DAMAGED"
    assert feature[GEOMETRY_KEY]["x"] == -8735000.0
    assert feature["ROUTE"] == "US-250"  # office-owned field still flows
    conflicts = await state.read_audit(decision="conflict_resolved")
    assert conflicts
    assert "geometry" in conflicts[0].detail


async def test_closing_a_work_order_closes_open_tasks_on_both_sides(world):
    engine, dv, ag, _ = world
    wo_id = "aaaaaaaa-0000-0000-0000-000000000001"
    wo = {"dot_workorderid": wo_id, "dot_name": "WO-1", "dot_worktype": 100000001, "dot_status": 100000000,
          "dot_signassetid": SIGN_ID, "dot_latitude": 38.0, "dot_longitude": -78.0}
    tasks = [(f"bbbbbbbb-0000-0000-0000-00000000000{i}", status) for i, status in ((1, 100000000), (2, 100000001))]
    batch = [env("sign_assets_to_field", SIGN_ID, sign_payload()),
             env("work_orders_to_field", wo_id, wo, table="dot_workorders")]
    for tid, status in tasks:
        payload = {"dot_workordertaskid": tid, "dot_name": "t", "dot_tasktype": 100000002, "dot_status": status,
                   "dot_workorderid": wo_id}
        batch.append(env("work_order_tasks_to_field", tid, payload, table="dot_workordertasks"))
    outs = await engine.process(batch)
    assert all(o.status == "written" for o in outs)
    for tid, _ in tasks:  # Dataverse exposes the lookup as _x_value on reads
        dv.tables["dot_workordertasks"][tid]["_dot_workorderid_value"] = wo_id
    wo_gid = outs[1].target_key
    # The crew completes the work order in ArcGIS.
    ag.tables["WorkOrders"][wo_gid]["STATUS"] = "COMPLETED"
    done = dict(ag.tables["WorkOrders"][wo_gid])
    [out] = await engine.process([env("work_orders_from_field", wo_gid, done, system="arcgis", table="WorkOrders",
                                      modified=T0 + timedelta(hours=1))])
    assert out.status == "written"
    assert dv.tables["dot_workorders"][wo_id]["dot_status"] == 100000002
    dv_status = {tid: dv.tables["dot_workordertasks"][tid]["dot_status"] for tid, _ in tasks}
    assert dv_status == {tasks[0][0]: 100000003, tasks[1][0]: 100000001}  # the Done task is left alone
    ag_status = sorted(r["STATUS"] for r in ag.tables["WorkOrderTasks"].values())
    assert ag_status == ["CLOSED", "DONE"]


async def test_delete_removes_the_linked_target_record(world):
    engine, _, ag, _ = world
    [out] = await engine.process([env("sign_assets_to_field", SIGN_ID, sign_payload())])
    [gone] = await engine.process([env("sign_assets_to_field", SIGN_ID, {}, op="delete")])
    assert gone.status == "deleted"
    assert out.target_key not in ag.tables["SignAssets"]
    [never] = await engine.process([env("sign_assets_to_field", "ffffffff-0000-0000-0000-000000000000", {},
                                        op="delete")])
    assert never.status == "skipped_noop"


async def test_replaying_a_create_after_lost_state_updates_instead_of_duplicating(world):
    engine, dv, ag, _ = world
    await engine.process([env("sign_assets_to_field", SIGN_ID, sign_payload())])
    fresh_state = SqliteStateStore(":memory:")
    amnesiac = _Recording(SPEC, sinks={"dataverse": dv, "arcgis": ag}, state=fresh_state, clock=lambda: T0)
    amnesiac.dv = dv
    [again] = await amnesiac.process([env("sign_assets_to_field", SIGN_ID, sign_payload(dot_route="US-33"))])
    await fresh_state.close()
    assert again.status == "written"
    assert len(ag.tables["SignAssets"]) == 1
    assert next(iter(ag.tables["SignAssets"].values()))["ROUTE"] == "US-33"


async def test_an_older_change_retried_after_a_newer_one_is_not_applied(world):
    engine, _, ag, _ = world
    older = env("sign_assets_to_field", SIGN_ID, sign_payload(dot_route="OLD"), modified=T0)
    newer = env("sign_assets_to_field", SIGN_ID, sign_payload(dot_route="NEW"), modified=T0 + timedelta(minutes=1))
    await engine.process([newer])
    [late] = await engine.process([older])
    assert late.status == "skipped_noop"
    assert "older than" in late.detail
    assert next(iter(ag.tables["SignAssets"].values()))["ROUTE"] == "NEW"
