"""The engine leases the records of a batch in the state store: one writer per record across processes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from shared.core.engine import SyncEngine
from shared.core.ports import WriteOp, WriteResult
from shared.runtime.embedded import SqliteStateStore
from tests.fakes import FakeSystem
from tests.unit.test_engine import SIGN_ID, SPEC, env, sign_payload

OTHER_ID = "0b1d4c6e-0f9f-e711-8122-000d3aa2331c"


class SlowSystem(FakeSystem):
    def __init__(self, system: str, delay: float, **kwargs: str) -> None:
        super().__init__(system, **kwargs)
        self.delay = delay

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        await asyncio.sleep(self.delay)
        return await super().write(ops)


def record(key: str) -> str:
    return f"dataverse:dot_signassets:{key}"


async def engine_on(tmp_path, ag: FakeSystem, **kwargs: float) -> tuple[SyncEngine, SqliteStateStore]:
    dv = FakeSystem("dataverse")
    for key in (SIGN_ID, OTHER_ID):
        dv.put("dot_signassets", key, sign_payload(dot_signassetid=key))
    state = SqliteStateStore(tmp_path / "state.db")
    systems = {"dataverse": dv, "arcgis": ag}
    return SyncEngine(SPEC, sinks=systems, sources=systems, state=state, **kwargs), state


async def test_a_record_leased_elsewhere_is_busy_and_the_rest_of_the_batch_goes_on(tmp_path):
    ag = FakeSystem("arcgis", key_style="globalid")
    engine, state = await engine_on(tmp_path, ag)
    other = SqliteStateStore(tmp_path / "state.db")  # another process on the same state
    try:
        assert await other.acquire_leases([record(SIGN_ID)], "webhook-in-another-process", 60)
        busy, written = await engine.process([
            env("sign_assets_to_field", SIGN_ID, sign_payload()),
            env("sign_assets_to_field", OTHER_ID, sign_payload(dot_signassetid=OTHER_ID)),
        ])
        assert busy.envelope.source_key == SIGN_ID  # outcomes in input order
        assert busy.status == "failed"
        assert busy.error is not None
        assert busy.error.reason == "RECORD_BUSY"
        assert busy.error.retriable
        assert written.status == "written"
        assert [r["DV_ID"] for r in ag.tables["SignAssets"].values()] == [OTHER_ID]  # the busy one untouched
        [audit] = [a for a in await state.read_audit(limit=20) if a.reason == "RECORD_BUSY"]
        assert (audit.decision, audit.key) == ("retry_scheduled", SIGN_ID)
        # the engine released its own lease, and left the other process's alone
        assert await other.acquire_leases([record(OTHER_ID)], "someone", 60) == {record(OTHER_ID)}
        assert await state.acquire_leases([record(SIGN_ID)], "someone-else", 60) == set()
    finally:
        await other.close()
        await state.close()


async def test_leases_are_renewed_while_a_long_batch_runs_and_released_after(tmp_path):
    engine, state = await engine_on(tmp_path, SlowSystem("arcgis", 1.2, key_style="globalid"), lease_seconds=0.3)
    other = SqliteStateStore(tmp_path / "state.db")
    try:
        work = asyncio.create_task(engine.process([env("sign_assets_to_field", SIGN_ID, sign_payload())]))
        for _ in range(5):  # well past the 0.3 s lease: it is renewed, never free
            await asyncio.sleep(0.2)
            assert await other.acquire_leases([record(SIGN_ID)], "intruder", 60) == set()
        [outcome] = await work
        assert outcome.status == "written"
        assert await other.acquire_leases([record(SIGN_ID)], "intruder", 60) == {record(SIGN_ID)}
    finally:
        await other.close()
        await state.close()


async def test_leases_are_released_when_the_batch_crashes(tmp_path):
    class Broken(FakeSystem):
        async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
            raise RuntimeError("a bug")

    engine, state = await engine_on(tmp_path, Broken("arcgis"))
    try:
        # An unexpected exception fails its flow group as retriable (logged); the lease must not outlive it.
        outcomes = await engine.process([env("sign_assets_to_field", SIGN_ID, sign_payload())])
        assert [o.status for o in outcomes] == ["failed"]
        assert outcomes[0].error is not None
        assert outcomes[0].error.retriable
        assert await state.acquire_leases([record(SIGN_ID)], "next", 60) == {record(SIGN_ID)}
    finally:
        await state.close()


async def test_concurrent_calls_in_one_process_wait_for_each_other_instead_of_being_busy(tmp_path):
    ag = SlowSystem("arcgis", 0.2, key_style="globalid")
    engine, state = await engine_on(tmp_path, ag)
    try:
        first, second = await asyncio.gather(
            engine.process([env("sign_assets_to_field", SIGN_ID, sign_payload())]),
            engine.process([env("sign_assets_to_field", SIGN_ID, sign_payload(dot_route="US-250"))]),
        )
        assert [o.status for o in (*first, *second)] == ["written", "written"]
        assert len(ag.tables["SignAssets"]) == 1
    finally:
        await state.close()
