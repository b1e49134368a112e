"""`trace_record` on each runtime's real adapters, over state and queue filled by the real engine and controller:
SQLite queue + state, and Service Bus (the local AMQP broker) + Table Storage (Azurite)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from shared.core.controller import Controller
from shared.core.engine import SyncEngine
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import RejectedError, TransientError
from shared.core.ports import StateStore
from shared.ops.trace import Trace, TraceInputError, key_variants, trace_record
from shared.ops.writes import enqueue
from shared.settings import queue_max_delivery_count
from tests.contract.adapters import RUNTIMES, runtime_adapters
from tests.contract.conftest import QueueHarness
from tests.fakes import FakeSystem
from tests.unit.test_engine import SPEC, T0, sign_payload

GOOD = "900d0000-0000-0000-0000-0000000000a1"
BAD = "bad00000-0000-0000-0000-0000000000b1"
SLOW = "51040000-0000-0000-0000-0000000000c1"
ATTEMPTS = 3


@dataclass
class World:
    harness: QueueHarness
    state: StateStore
    dv: FakeSystem
    ag: FakeSystem

    def controller(self) -> Controller:
        systems = {"dataverse": self.dv, "arcgis": self.ag}
        engine = SyncEngine(SPEC, sinks=systems, sources=systems, state=self.state)
        return Controller(SPEC, engine=engine, queue=self.harness.queue, state=self.state, sources=systems,
                          clock=self.harness.now, max_attempts=ATTEMPTS, batch_size=10)

    async def enqueue(self, envelopes: list[ChangeEnvelope]) -> None:
        services = SimpleNamespace(flowset=SPEC, state=self.state, queue=self.harness.queue)
        await enqueue(cast(Any, services), envelopes)

    async def trace(self, system: str, key: str) -> Trace:
        return await trace_record(self.state, self.harness.queue, SPEC, system, key)


def sign(key: str, tag: str, origin: str = "webhook") -> ChangeEnvelope:
    return ChangeEnvelope(flow="sign_assets_to_field", operation="upsert", source_system="dataverse",
                          source_table="dot_signassets", source_key=key, source_modified=T0,
                          payload=sign_payload(dot_signassetid=key, dot_assettag=tag), origin=origin)  # type: ignore[arg-type]


@pytest.fixture(params=sorted(RUNTIMES), ids=sorted(RUNTIMES))
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    async with runtime_adapters(request, tmp_path, lock_duration_seconds=30.0,
                                max_delivery_count=queue_max_delivery_count(ATTEMPTS)) as (harness, state):
        dv, ag = FakeSystem("dataverse"), FakeSystem("arcgis", key_style="globalid")
        ag.fail_match[BAD] = RejectedError("arcgis: SIGN_TYPE 99 is not in the coded-value domain")
        ag.fail_match[SLOW] = TransientError("arcgis answered 503")  # type: ignore[assignment]
        for n, key in enumerate((GOOD, BAD, SLOW)):  # the write-back of the new GlobalID needs the source record
            dv.put("dot_signassets", key, sign_payload(dot_signassetid=key, dot_assettag=f"SGN-{n + 1}"))
        behind = (datetime.now(UTC) - harness.now()).total_seconds()
        if behind > 60:  # the embedded queue's fake clock: bring it to the wall clock the enqueue audit uses
            await harness.advance(behind + 5)  # and past the enqueue that follows
        world = World(harness, state, dv, ag)
        await world.enqueue([sign(GOOD, "SGN-1"), sign(BAD, "SGN-2", origin="poll"), sign(SLOW, "SGN-3")])
        await world.controller().drain()
        yield world


async def test_a_written_record_traces_from_either_sides_key(world: World) -> None:
    [global_id] = world.ag.tables["SignAssets"]
    trace = await world.trace("dataverse", GOOD)

    assert trace.found
    assert trace.records == [("dataverse", GOOD), ("arcgis", global_id)]
    decisions = [(h.decision, h.system, h.key) for h in trace.hops]
    assert decisions[0] == ("enqueued", "dataverse", GOOD)  # oldest first
    assert ("written", "arcgis", global_id) in decisions
    written = next(h for h in trace.hops if h.decision == "written")
    assert written.detail.startswith(f"created arcgis:SignAssets:{global_id} (origin webhook); fields ")
    assert "ASSET_TAG" in written.detail
    assert {h.origin for h in trace.hops} == {"webhook"}
    assert len({h.correlation_id for h in trace.hops}) == 1
    assert trace.flows == ["sign_assets_to_field"]
    assert [(link.system, link.key, link.other_system, link.other_key) for link in trace.links] == [
        ("dataverse", GOOD, "arcgis", global_id)]
    assert trace.now == []

    # The ArcGIS GlobalID as an operator pastes it: lower case, without braces.
    other = await world.trace("arcgis", global_id.strip("{}").lower())
    assert other.records == [("arcgis", global_id), ("dataverse", GOOD)]
    assert [h.decision for h in other.hops] == [h.decision for h in trace.hops]
    # And the Dataverse id in upper case with braces.
    assert (await world.trace("dataverse", "{" + GOOD.upper() + "}")).records == trace.records


async def test_a_dead_lettered_record_shows_its_reason_and_where_it_is(world: World) -> None:
    trace = await world.trace("dataverse", BAD)

    assert next(h.decision for h in trace.hops) == "enqueued"
    assert trace.hops[0].origin == "poll"
    dead = [h for h in trace.hops if h.decision == "dead_lettered"]
    assert dead
    assert {h.reason for h in dead} == {"TARGET_REJECTED"}
    assert "coded-value domain" in dead[-1].detail
    [place] = trace.now
    assert (place.where, place.flow, place.system, place.key) == ("dead_letter", "sign_assets_to_field",
                                                                  "dataverse", BAD)
    assert place.reason == "TARGET_REJECTED"
    assert "coded-value domain" in (place.description or "")
    assert trace.links == []
    assert trace.to_json()["now"][0]["reason"] == "TARGET_REJECTED"


async def test_a_record_being_retried_shows_the_retry_reason_and_its_message_on_the_queue(world: World) -> None:
    trace = await world.trace("dataverse", SLOW)

    retries = [h for h in trace.hops if h.decision == "retry_scheduled"]
    assert retries
    assert retries[0].reason == "TRANSIENT"
    assert "503" in retries[0].detail
    [place] = trace.now
    assert place.where in ("active", "scheduled")
    assert place.key == SLOW
    assert place.delivery_count >= 1


async def test_an_unknown_key_is_not_found_and_an_unknown_system_is_refused(world: World) -> None:
    trace = await world.trace("arcgis", "{00000000-0000-0000-0000-000000000000}")
    assert not trace.found
    assert trace.to_json() == {"system": "arcgis", "key": "{00000000-0000-0000-0000-000000000000}", "found": False,
                               "records": [{"system": "arcgis", "key": "{00000000-0000-0000-0000-000000000000}"}],
                               "flows": [], "hops": [], "now": [], "links": [], "notes": []}
    with pytest.raises(TraceInputError, match="unknown system 'arcgsi': one of arcgis, dataverse"):
        await world.trace("arcgsi", GOOD)


def test_key_variants_cover_the_guid_spellings() -> None:
    assert key_variants("arcgis", " abc ") == ["abc"]
    assert key_variants("arcgis", "6d81597f-0f9f-e711-8122-000d3aa2331c") == [
        "6d81597f-0f9f-e711-8122-000d3aa2331c", "{6D81597F-0F9F-E711-8122-000D3AA2331C}",
        "6D81597F-0F9F-E711-8122-000D3AA2331C", "{6d81597f-0f9f-e711-8122-000d3aa2331c}"]


class RefusingBrowse:
    """The queue as Service Bus shows a session-enabled one to a non-session browse: refused."""

    def __init__(self, queue: Any) -> None:
        self._queue = queue

    async def peek_messages(self, max_messages: int = 100) -> list[Any]:
        raise RuntimeError("It is not possible for an entity that requires sessions to create a non-sessionful link")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


async def test_a_queue_that_cannot_be_browsed_is_noted_and_the_dead_letters_still_show(world: World) -> None:
    import io

    from rich.console import Console

    from shared.trace_view import render_trace

    trace = await trace_record(world.state, cast(Any, RefusingBrowse(world.harness.queue)), SPEC, "dataverse", BAD)

    assert trace.notes == ["the queue could not be browsed (RuntimeError): messages waiting on it for this record "
                           "are not shown; the dead-letter queue was browsed"]
    assert [p.where for p in trace.now] == ["dead_letter"]
    out = io.StringIO()
    render_trace(Console(file=out, width=300), trace)
    assert "now:\n  note: the queue could not be browsed (RuntimeError)" in out.getvalue()
