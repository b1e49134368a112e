"""The initial load's checkpoint through the StateStore port, on each runtime's real state adapter (SQLite, and
Table Storage on Azurite): a crash mid-load resumes where it stopped, two loads never run at once, an interrupt
leaves the load resumable at once, and a paused target stops it with the checkpoint saved."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.bootstrap import Services
from shared.connectors._http import CallCounter
from shared.core.controller import Controller
from shared.core.engine import SyncEngine
from shared.core.ports import SourceRecord, StateStore, WriteOp, WriteResult
from shared.ops.load import LOAD_PREFIX, LoadBusyError, load_flow
from shared.settings import Settings
from tests.contract.adapters import RUNTIMES, runtime_adapters
from tests.fakes import FakeSystem
from tests.unit.test_engine import SPEC, T0, sign_payload

SIGNS = 23
BATCH = 5
FLOW = "sign_assets_to_field"


class Killed(BaseException):
    """The process dies in the middle of a write (nothing after it runs: no except, no checkpoint)."""


class FieldMaps(FakeSystem):
    """ArcGIS that dies (or is cancelled) on its `fail_on`-th write call."""

    def __init__(self) -> None:
        super().__init__("arcgis", key_style="globalid")
        self.fail_on: int | None = None
        self.fail_with: BaseException = Killed()

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        if self.fail_on is not None and self.write_calls + 1 == self.fail_on:
            self.fail_on = None
            raise self.fail_with
        return await super().write(ops)


class Office(FakeSystem):
    """Dataverse whose scan carries each record's modifiedon as its modified time, as the connector's does."""

    async def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        yield [SourceRecord(k, dict(v), modified=datetime.fromisoformat(v["modifiedon"]))
               for k, v in self.tables.get(table, {}).items()]


@dataclass
class World:
    services: Services
    state: StateStore
    dv: FakeSystem
    ag: FieldMaps

    def loaded(self) -> list[str]:
        return sorted(row["DV_ID"] for row in self.ag.tables.get("SignAssets", {}).values())

    async def checkpoint(self) -> dict[str, object]:
        point = await self.state.get_checkpoint(LOAD_PREFIX + FLOW)
        assert point is not None
        return dict(json.loads(point.value))


@pytest.fixture(params=sorted(RUNTIMES), ids=sorted(RUNTIMES))
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    async with runtime_adapters(request, tmp_path, lock_duration_seconds=30.0, max_delivery_count=10) \
            as (harness, state):
        dv, ag = Office("dataverse"), FieldMaps()
        for n in range(SIGNS):
            key = f"5160{n:04d}-0000-0000-0000-000000000000"
            dv.put("dot_signassets", key, sign_payload(dot_signassetid=key, dot_assettag=f"SGN-{n:06d}",
                                                        modifiedon=(T0 + timedelta(days=n)).isoformat()))
        systems = {"dataverse": dv, "arcgis": ag}
        settings = Settings(syncline_batch_size=BATCH, syncline_state_dir=str(tmp_path / "unused"))
        engine = SyncEngine(SPEC, sinks=systems, sources=systems, state=state)  # type: ignore[arg-type]
        controller = Controller(SPEC, engine=engine, queue=harness.queue, state=state,
                                sources=systems)  # type: ignore[arg-type]
        services = Services(settings=settings, flowset=SPEC, state=state, queue=harness.queue, engine=engine,
                            controller=controller, sinks=systems, sources=systems,  # type: ignore[arg-type]
                            counter=CallCounter())
        yield World(services, state, dv, ag)


async def test_a_killed_load_resumes_where_it_stopped_and_loads_each_record_once(world: World):
    world.ag.fail_on = 3  # dies writing the third batch: two batches (10 records) are committed
    with pytest.raises(Killed):
        await load_flow(world.services, FLOW)
    assert len(world.loaded()) == 2 * BATCH
    point = await world.checkpoint()
    assert (point["status"], point["position"], point["loaded"]) == ("running", 2 * BATCH, 2 * BATCH)

    # The dead load's owner is this (live) process and its checkpoint is fresh: a second load refuses...
    with pytest.raises(LoadBusyError, match=f"a load of flow {FLOW} is already running"):
        await load_flow(world.services, FLOW)
    # ...until the first one is stale.
    heard: list[str] = []
    calls_before = world.ag.write_calls
    report = await load_flow(world.services, FLOW, stale_seconds=0, announce=heard.append)

    assert heard == [f"flow {FLOW}: resuming at record {2 * BATCH}"]
    assert (report.outcome, report.resumed_at, report.this_run, report.loaded) == \
        ("complete", 2 * BATCH, SIGNS - 2 * BATCH, SIGNS)
    assert world.loaded() == sorted(world.dv.tables["dot_signassets"])  # every record, each exactly once
    assert world.ag.write_calls - calls_before == 3  # 13 records in batches of 5: not from zero
    assert (await world.checkpoint())["status"] == "complete"


async def test_an_interrupted_load_is_resumable_at_once(world: World):
    world.ag.fail_on, world.ag.fail_with = 2, asyncio.CancelledError()
    with pytest.raises(asyncio.CancelledError):
        await load_flow(world.services, FLOW)
    assert (await world.checkpoint())["status"] == "stopped"
    report = await load_flow(world.services, FLOW)  # no staleness to wait for
    assert (report.outcome, report.resumed_at) == ("complete", BATCH)
    assert world.loaded() == sorted(world.dv.tables["dot_signassets"])


async def test_a_repeated_load_writes_nothing(world: World):
    first = await load_flow(world.services, FLOW)
    assert (first.outcome, first.written) == ("complete", SIGNS)
    writes = len(world.ag.writes)
    again = await load_flow(world.services, FLOW)
    assert again.outcome == "already_complete"
    assert again.message.startswith(f"flow {FLOW}: already complete at ")
    assert "use --restart" in again.message
    restarted = await load_flow(world.services, FLOW, restart=True)
    assert (restarted.outcome, restarted.written, restarted.skipped) == ("complete", 0, SIGNS)
    assert len(world.ag.writes) == writes  # the engine's snapshots make every repeated record a no-op


async def test_since_loads_only_the_records_modified_since(world: World):
    report = await load_flow(world.services, FLOW, since=(T0 + timedelta(days=20)).date().isoformat())
    assert (report.outcome, report.loaded, report.position) == ("complete", SIGNS - 20, SIGNS)
    assert len(world.loaded()) == SIGNS - 20
    nothing = await load_flow(world.services, FLOW, since="2099-01-01", restart=True)
    assert nothing.outcome == "nothing"
    assert nothing.message == f"flow {FLOW}: nothing to load (0 records since 2099-01-01T00:00:00+00:00)"


async def test_a_paused_target_stops_the_load_with_the_checkpoint_saved(world: World):
    until = datetime.now(UTC) + timedelta(hours=1)
    # ArcGIS's breaker open until then (a spent allocation's advice, or an outage's probe time).
    await world.services.controller.breakers.trip("arcgis", "allocation spent", until=until)
    report = await load_flow(world.services, FLOW)
    assert report.outcome == "paused"
    assert not report.complete
    assert report.message == (f"arcgis is paused until {until.isoformat()}; stopped at record 0; "
                              f"resume with `syncline load {FLOW}`")
    assert world.ag.write_calls == 0
    assert (await world.checkpoint())["status"] == "paused"
    await world.services.controller.breakers.close("arcgis")  # the system is back
    report = await load_flow(world.services, FLOW)
    assert report.outcome == "complete"
    assert len(world.loaded()) == SIGNS
