"""A change that fails on every delivery ends in the dead-letter queue with its reason; after the fix a replay
writes it exactly once."""

from __future__ import annotations

from shared.bootstrap import build_services
from shared.ops import initial_load, replay_dead_letters
from shared.settings import Settings


async def test_failing_on_every_delivery_then_fixed_and_replayed(seeded, monkeypatch):
    box, _summary, services = seeded
    await initial_load(services)
    await services.aclose()
    monkeypatch.setenv("SYNCLINE_MAX_DELIVERY_COUNT", "3")
    services = build_services(Settings())
    try:
        feature = box.ag.all("SignAssets")[0]
        dv_id = feature["DV_ID"]
        box.ag.field_edit("SignAssets", feature["GlobalID"], {"CONDITION": "DAMAGED"}, user="crew1")
        # Dataverse keeps failing every write to this one record (a stuck plug-in, say): 503 each time.
        box.dv.faults.fail_next(1000, 503, path_contains=dv_id)
        before = box.dv.get("dot_signassets", dv_id)["dot_condition"]
        reports = [await services.controller.run_cycle(poll=(i == 0)) for i in range(4)]
        assert sum(r.retried for r in reports) >= 1
        # (the seed's two bad signs are dead-lettered too, for their own reasons)
        [dead] = [m for m in await services.queue.peek_dead_letters()
                  if m.application_properties["key"] == feature["GlobalID"]]
        assert dead.dead_letter_reason == "MAX_DELIVERY_EXCEEDED"
        assert "TRANSIENT" in (dead.dead_letter_description or "")
        assert dead.application_properties["key"] == feature["GlobalID"]
        assert box.dv.get("dot_signassets", dv_id)["dot_condition"] == before

        box.dv.faults.clear()  # the cause is fixed
        assert await replay_dead_letters(services, message_id=dead.message_id) == [dead.message_id]
        await services.controller.run_cycle(poll=False)
        assert box.dv.get("dot_signassets", dv_id)["dot_condition"] == 100000003
        writes = [a for a in await services.state.read_audit(limit=1000, decision="written") if a.key == dv_id]
        assert len(writes) == 1
        assert dead.message_id not in {m.message_id for m in await services.queue.peek_dead_letters()}
        # A second replay attempt of that message finds nothing and writes nothing.
        assert await replay_dead_letters(services, message_id=dead.message_id) == []
    finally:
        await services.aclose()
