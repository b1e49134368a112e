"""A reconciliation repair stays a repair when it waits for its parent (its origin forces the write)."""

from __future__ import annotations

from shared.bootstrap import build_services
from shared.core.envelope import ChangeEnvelope
from shared.settings import Settings


async def test_a_deferred_repair_keeps_its_origin_and_a_deferred_webhook_change_becomes_a_resubmission(
        tmp_path, monkeypatch):
    monkeypatch.setenv("SYNCLINE_STATE_DIR", str(tmp_path))
    for name in ("DATAVERSE__URL", "ARCGIS__SERVICE_URL"):
        monkeypatch.delenv(name, raising=False)
    services = build_services(Settings())
    try:
        services.controller.parent_wait_seconds = 0  # due at once, so the receive below sees it
        base = {"flow": "sign_assets_to_field", "operation": "update", "source_system": "dataverse",
                "source_table": "dot_signassets", "payload": {"dot_name": "x"}}
        await services.controller._defer(ChangeEnvelope(**base, source_key="k-1", origin="reconcile",
                                                        correlation_id="reconcile:abc"))
        await services.controller._defer(ChangeEnvelope(**base, source_key="k-2", origin="webhook"))
        received = await services.queue.receive(10, max_wait_seconds=1)
        origins = {ChangeEnvelope.from_body(m.body).source_key: ChangeEnvelope.from_body(m.body).origin
                   for m in received}
        assert origins == {"k-1": "reconcile", "k-2": "resubmit"}
    finally:
        await services.aclose()
