"""Queue session ids: a record's root parent, found through the flows' lookups and Syncline's snapshots."""

from __future__ import annotations

from pathlib import Path

from shared.core.controller import to_messages
from shared.core.envelope import ChangeEnvelope
from shared.core.ports import Snapshot
from shared.mapping.spec import load_spec
from shared.runtime.embedded import SqliteStateStore

SPEC = load_spec(Path(__file__).resolve().parents[2] / "flows" / "dot-signs.yaml")


def env(flow: str, table: str, key: str, payload: dict) -> ChangeEnvelope:
    return ChangeEnvelope(flow=flow, operation="update", source_system="arcgis", source_table=table,
                          source_key=key, payload=payload)


async def test_task_sessions_on_its_sign_through_the_work_order_snapshot():
    state = SqliteStateStore(":memory:")
    await state.put_snapshots([Snapshot("arcgis", "WorkOrders", "{WO}", {"ASSET_GUID": "{SIGN}"}, "h", None)])
    sign, wo, task, orphan = await to_messages(SPEC, state, [
        env("sign_assets_from_field", "SignAssets", "{SIGN}", {}),
        env("work_orders_from_field", "WorkOrders", "{WO}", {"ASSET_GUID": "{SIGN}"}),
        env("work_order_tasks_from_field", "WorkOrderTasks", "{T1}", {"WO_GUID": "{WO}"}),
        env("work_order_tasks_from_field", "WorkOrderTasks", "{T2}", {"WO_GUID": "{UNSEEN}"}),
    ])
    await state.close()
    root = "arcgis:SignAssets:{SIGN}"
    assert sign.session_id == root
    assert wo.session_id == root
    assert task.session_id == root
    # A parent Syncline has never seen ends the walk: the work order itself is the session.
    assert orphan.session_id == "arcgis:WorkOrders:{UNSEEN}"
    assert task.application_properties["flow"] == "work_order_tasks_from_field"
