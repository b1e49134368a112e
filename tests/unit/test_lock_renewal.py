"""Locks outlive slow work: the controller renews a batch's locks three times per lock period, and the wiring
derives the attempts, the queue's backstop and the record lease period from the settings."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from shared.bootstrap import build_services
from shared.core.controller import Controller
from shared.core.engine import SyncEngine
from shared.core.envelope import ChangeEnvelope
from shared.core.ports import WriteOp, WriteResult
from shared.runtime.embedded import SqliteQueue, SqliteStateStore
from shared.settings import Settings
from tests.fakes import FakeSystem
from tests.unit.test_engine import SIGN_ID, SPEC, T0, sign_payload


class SlowArcGIS(FakeSystem):
    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        await asyncio.sleep(2.5)
        return await super().write(ops)


def test_the_wiring_renews_three_times_per_lock_and_keeps_the_queue_count_a_backstop(tmp_path: Path):
    settings = Settings(syncline_state_dir=str(tmp_path), syncline_lock_seconds=1.0, syncline_max_delivery_count=4,
                        dataverse={"url": ""}, arcgis={"service_url": ""}, salesforce={"my_domain_url": ""},
                        fno={"environment_url": ""}, sap={"base_url": ""})
    services = build_services(settings)
    try:
        assert services.controller.lock_renew_seconds <= 1.0 / 3
        assert services.controller.max_attempts == 4
        assert services.queue.max_delivery_count == 40
        assert services.engine.lease_seconds == 1.0
    finally:
        asyncio.run(services.aclose())


async def test_a_batch_slower_than_the_lock_is_processed_once(tmp_path: Path):
    state = SqliteStateStore(tmp_path / "state.db")
    queue = SqliteQueue(tmp_path / "queue.db", lock_duration_seconds=1.0, max_delivery_count=30)
    dv, ag = FakeSystem("dataverse"), SlowArcGIS("arcgis", key_style="globalid")
    dv.put("dot_signassets", SIGN_ID, sign_payload())
    systems = {"dataverse": dv, "arcgis": ag}
    controller = Controller(SPEC, engine=SyncEngine(SPEC, sinks=systems, sources=systems, state=state), queue=queue,
                            state=state, sources=systems, lock_renew_seconds=1.0 / 3, max_attempts=3)
    try:
        await queue.send([ChangeEnvelope(flow="sign_assets_to_field", operation="upsert", source_system="dataverse",
                                         source_table="dot_signassets", source_key=SIGN_ID, source_modified=T0,
                                         payload=sign_payload()).to_message()])
        report = await controller.drain()
        assert report.statuses == {"written": 1}
        assert report.received == 1
        assert ag.write_calls == 1  # the lock never ran out under it: no second delivery, no second write
        assert (await queue.depth()).active == 0
    finally:
        await queue.close()
        await state.close()
