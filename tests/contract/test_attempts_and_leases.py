"""Dead-lettering counts a change's own failed attempts, not lost locks; a record leased elsewhere is retried
shortly. The controller and engine on each runtime's real adapters: SQLite queue + state, and Service Bus (the
local AMQP broker) + Table Storage (Azurite)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from shared.core.controller import Controller
from shared.core.engine import SyncEngine
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import TransientError
from shared.core.ports import StateStore
from shared.settings import queue_max_delivery_count
from tests.contract.adapters import RUNTIMES, runtime_adapters
from tests.contract.conftest import QueueHarness
from tests.fakes import FakeSystem
from tests.unit.test_engine import SIGN_ID, SPEC, T0, sign_payload

ATTEMPTS = 2
LOCK_SECONDS = 30.0


@dataclass
class World:
    harness: QueueHarness
    state: StateStore
    controller: Controller
    dv: FakeSystem
    ag: FakeSystem

    async def crash(self) -> int:
        """A process receives the change, then dies: its lock is never settled and runs out."""
        got = await self.harness.queue.receive(1)
        assert [m.message_id for m in got] == [message_id()]
        await self.harness.advance(LOCK_SECONDS + 1)
        return got[0].delivery_count

    async def dead(self) -> list[tuple[str | None, str | None]]:
        return [(m.dead_letter_reason, m.dead_letter_description)
                for m in await self.harness.queue.peek_dead_letters()]


def change() -> ChangeEnvelope:
    return ChangeEnvelope(flow="sign_assets_to_field", operation="upsert", source_system="dataverse",
                          source_table="dot_signassets", source_key=SIGN_ID, source_modified=T0,
                          payload=sign_payload(), origin="webhook")


def message_id() -> str:
    return change().message_id()


@pytest.fixture(params=sorted(RUNTIMES), ids=sorted(RUNTIMES))
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    # The production wiring: the queue's own count is only a backstop above the attempts.
    async with runtime_adapters(request, tmp_path, lock_duration_seconds=LOCK_SECONDS,
                                max_delivery_count=queue_max_delivery_count(ATTEMPTS)) as (harness, state):
        dv, ag = FakeSystem("dataverse"), FakeSystem("arcgis", key_style="globalid")
        dv.put("dot_signassets", SIGN_ID, sign_payload())
        systems = {"dataverse": dv, "arcgis": ag}
        engine = SyncEngine(SPEC, sinks=systems, sources=systems, state=state)
        controller = Controller(SPEC, engine=engine, queue=harness.queue, state=state, sources=systems,
                                clock=harness.now, max_attempts=ATTEMPTS, lock_renew_seconds=LOCK_SECONDS / 3)
        await harness.queue.send([change().to_message()])
        yield World(harness, state, controller, dv, ag)


async def test_locks_lost_to_crashes_spend_no_attempts(world: World) -> None:
    deliveries = [await world.crash() for _ in range(2 * ATTEMPTS)]
    assert deliveries == list(range(1, 2 * ATTEMPTS + 1))  # twice the attempts, every one of them lost

    report = await world.controller.drain()

    assert report.statuses == {"written": 1}, report
    assert await world.dead() == []
    [feature] = world.ag.tables["SignAssets"].values()
    assert feature["DV_ID"] == SIGN_ID
    assert (await world.harness.queue.depth()).active == 0


async def test_a_change_failing_every_attempt_is_dead_lettered_with_its_last_error(world: World) -> None:
    for _ in range(ATTEMPTS + 1):
        await world.crash()  # lost locks first: they must not shorten the change's own attempts
    world.ag.fail_match[SIGN_ID] = TransientError("arcgis answered 503")  # type: ignore[assignment]

    for attempt in range(1, ATTEMPTS):
        report = await world.controller.drain()
        assert report.retried == 1, (attempt, report)
        assert await world.dead() == [], f"dead-lettered after {attempt} failed attempts"

    report = await world.controller.drain()

    assert report.dead_lettered == {"MAX_DELIVERY_EXCEEDED": 1}
    [(reason, description)] = await world.dead()
    assert reason == "MAX_DELIVERY_EXCEEDED"
    assert description is not None
    assert f"failed {ATTEMPTS} attempts" in description
    assert "last error TRANSIENT: arcgis answered 503" in description
    # the counter went with the message: a replay of it starts afresh
    assert await world.state.record_failures([message_id()]) == {message_id(): 1}


async def test_a_success_after_failures_clears_the_count(world: World) -> None:
    world.ag.fail_match[SIGN_ID] = TransientError("arcgis answered 503")  # type: ignore[assignment]
    for _ in range(ATTEMPTS - 1):
        assert (await world.controller.drain()).retried == 1
    del world.ag.fail_match[SIGN_ID]

    assert (await world.controller.drain()).statuses == {"written": 1}
    assert await world.dead() == []
    assert await world.state.record_failures([message_id()]) == {message_id(): 1}


async def test_a_record_leased_elsewhere_is_retried_shortly_without_spending_an_attempt(world: World) -> None:
    record = change().record_id
    assert await world.state.acquire_leases([record], "a-webhook-elsewhere", 60) == {record}

    busy = await world.controller.drain()

    assert busy.statuses == {"failed": 1}
    assert busy.retried == 1
    assert world.ag.tables.get("SignAssets", {}) == {}
    depth = await world.harness.queue.depth()
    assert (depth.active, depth.scheduled, depth.dead_letter) == (0, 1, 0)  # a copy, due in a few seconds
    assert (await world.state.record_failures([message_id()])) == {message_id(): 1}  # none counted before
    await world.state.clear_failures([message_id()])

    await world.state.release_leases([record], "a-webhook-elsewhere")
    await world.harness.advance(world.controller.busy_retry_seconds + 1)
    report = await world.controller.drain()

    assert report.statuses == {"written": 1}, report
    assert len(world.ag.tables["SignAssets"]) == 1
    assert world.controller.busy_retry_seconds <= timedelta(seconds=10).total_seconds()
