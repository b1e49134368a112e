"""The controller leases a batch's records once for all its flow groups, and still reports records leased elsewhere
busy without touching them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from shared.core.controller import Controller
from shared.core.engine import SyncEngine
from shared.core.envelope import ChangeEnvelope
from shared.runtime.embedded import SqliteQueue, SqliteStateStore
from tests.fakes import FakeSystem
from tests.unit.test_engine import SPEC, T0, sign_payload


class CountingState(SqliteStateStore):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.acquired: list[list[str]] = []
        self.released: list[list[str]] = []

    async def acquire_leases(self, keys: Sequence[str], owner: str, ttl_seconds: float) -> set[str]:
        self.acquired.append(list(keys))
        return await super().acquire_leases(keys, owner, ttl_seconds)

    async def release_leases(self, keys: Sequence[str], owner: str) -> None:
        self.released.append(list(keys))
        await super().release_leases(keys, owner)


def sign(n: int) -> ChangeEnvelope:
    key = f"00000000-0000-4000-8000-{n:012d}"
    return ChangeEnvelope(flow="sign_assets_to_field", operation="upsert", source_system="dataverse",
                          source_table="dot_signassets", source_key=key, source_modified=T0,
                          payload=sign_payload(dot_signassetid=key, dot_assettag=f"SGN-{n:06d}"))


def work_order(n: int) -> ChangeEnvelope:
    key = f"0de00000-0000-4000-8000-{n:012d}"
    payload = {"dot_workorderid": key, "dot_name": f"WO-{n}", "dot_worktype": 100000001, "dot_status": 100000000,
               "dot_signassetid": sign(n).source_key, "dot_latitude": 38.0, "dot_longitude": -78.0}
    return ChangeEnvelope(flow="work_orders_to_field", operation="upsert", source_system="dataverse",
                          source_table="dot_workorders", source_key=key, source_modified=T0, payload=payload)


async def test_a_batch_of_two_flow_groups_takes_and_releases_its_leases_once(tmp_path: Path) -> None:
    state = CountingState(str(tmp_path / "state.db"))
    other = SqliteStateStore(str(tmp_path / "state.db"))  # another process, on the same store
    queue = SqliteQueue(tmp_path / "queue.db", lock_duration_seconds=300)
    dv, ag = FakeSystem("dataverse"), FakeSystem("arcgis", key_style="globalid")
    systems = {"dataverse": dv, "arcgis": ag}
    changes = [*(sign(n) for n in range(5)), *(work_order(n) for n in range(5))]
    for change in changes:
        dv.put(change.source_table, change.source_key, dict(change.payload))
    busy = work_order(4)
    try:
        assert await other.acquire_leases([busy.record_id], "elsewhere", 300) == {busy.record_id}
        await queue.send([c.to_message() for c in changes])
        engine = SyncEngine(SPEC, sinks=systems, sources=systems, state=state)
        controller = Controller(SPEC, engine=engine, queue=queue, state=state, sources=systems, batch_size=100,
                                busy_retry_seconds=300)

        report = await controller.drain()

        assert report.statuses == {"written": 9, "failed": 1}, report
        assert len(ag.tables["WorkOrders"]) == 4  # the busy one was not touched
        # once for the batch; the busy record is tried again by its group (and found busy again)
        assert state.acquired == [sorted(c.record_id for c in changes), [busy.record_id]], state.acquired
        assert state.released == [sorted(c.record_id for c in changes if c.record_id != busy.record_id)], state.released
    finally:
        await queue.close()
        await state.close()
        await other.close()
