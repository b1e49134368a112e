"""Dead-lettered changes carry an actionable reason and, once the cause is fixed, replay exactly once."""

from __future__ import annotations

from shared.ops import initial_load, replay_dead_letters


async def test_fix_then_replay_writes_the_record_exactly_once(seeded):
    box, summary, services = seeded
    await initial_load(services)
    report = await services.controller.run_cycle(poll=False)
    assert report.dead_lettered == {"REQUIRED_FIELD_MISSING": 1, "UNMAPPED_CHOICE": 1}
    dead = {m.dead_letter_reason: m for m in await services.queue.peek_dead_letters()}
    missing = dead["REQUIRED_FIELD_MISSING"]
    bad_id = summary["bad_signs"]["missing_mutcd_code"]
    assert missing.application_properties["key"] == bad_id
    assert "dot_mutcdcode" in (missing.dead_letter_description or "")
    assert not [f for f in box.ag.all("SignAssets") if f.get("DV_ID") == bad_id]

    # The office fixes the record (no webhook registered: the fix only reaches ArcGIS through the replay).
    box.dv.apply_change("dot_signassets", {"dot_mutcdcode": "R2-1"}, key=bad_id)
    replayed = await replay_dead_letters(services, message_id=missing.message_id)
    assert replayed == [missing.message_id]
    await services.controller.run_cycle(poll=False)
    written = [f for f in box.ag.all("SignAssets") if f.get("DV_ID") == bad_id]
    assert len(written) == 1
    assert written[0]["MUTCD_CODE"] == "R2-1"
    assert box.dv.get("dot_signassets", bad_id)["dot_arcgisglobalid"] == written[0]["GlobalID"]

    # The original message resent unchanged (Service Bus Explorer "re-send") is stale now: nothing new is written.
    await services.queue.send([_as_message(missing)])
    await services.controller.run_cycle(poll=False)
    assert len([f for f in box.ag.all("SignAssets") if f.get("DV_ID") == bad_id]) == 1
    remaining = [m.dead_letter_reason for m in await services.queue.peek_dead_letters()]
    assert remaining == ["UNMAPPED_CHOICE"]  # its cause (the value map) is not fixed: it stays, with its reason
    audit = await services.state.read_audit(decision="replayed")
    assert audit
    assert audit[0].key == bad_id


def _as_message(received):
    from shared.core.envelope import QueueMessage

    return QueueMessage(body=received.body, message_id=received.message_id, session_id=received.session_id,
                        correlation_id=received.correlation_id,
                        application_properties=dict(received.application_properties))
