"""Circuit breakers against the simulators on both runtimes (SQLite, and Service Bus + Table Storage): an ArcGIS
outage (503s from its fault knobs) opens the breaker, changes wait scheduled (never dead-lettered), polls and
health leave ArcGIS alone, the probe after the cool-down re-opens it while the outage lasts and closes it after,
and two instances racing for the probe send one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sandbox.dataverse import seed_dataverse
from sandbox.demo import Sandbox, environment, start_sandbox
from shared.bootstrap import Services, build_services
from shared.core.breaker import BREAKER_PREFIX, Breaker
from shared.core.controller import envelopes_for
from shared.ops import health, initial_load
from shared.ops.writes import enqueue
from shared.settings import Settings

COOLS = {"embedded": 2.0, "azure": 8.0}
"""The test's cool-down per runtime (seconds, real time: the Service Bus broker schedules by its own clock; the
azure runtime's round trips must fit in it, or the checks below meet a probe already due)."""
OUTAGE = 100_000


@pytest.fixture(params=["embedded", "azure"])
def box(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sandbox]:
    sandbox = start_sandbox(tmp_path / "sandbox", runtime=request.param)
    try:
        with environment(sandbox.env):
            seed_dataverse(sandbox.dv, signs=8, work_orders=1)
            yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture
async def services(box: Sandbox) -> AsyncIterator[Services]:
    services = build_services(Settings())
    try:
        await initial_load(services)  # every good sign linked to its feature
        await services.controller.run_cycle()  # the two bad seeds dead-lettered: the queue starts empty
        assert (await services.queue.depth()).active == 0
        tune(services)
        yield services
    finally:
        await services.aclose()


def cool(services: Services) -> float:
    return COOLS[services.settings.syncline_runtime]


def tune(services: Services) -> None:
    breakers = services.controller.breakers
    breakers.policy = replace(breakers.policy, consecutive_failures=2, cooldown_seconds=cool(services),
                              probe_lease_seconds=cool(services))


def arcgis_calls(box: Sandbox) -> int:
    return sum(box.ag.request_count.values())


async def office_edits(box: Sandbox, services: Services, n: int, route: str) -> list[dict[str, Any]]:
    """Office users edit `n` linked signs; their changes as envelopes of the direct flow (webhook origin)."""
    signs = sorted((s for s in box.dv.all("dot_signassets") if s.get("dot_arcgisglobalid")),
                   key=lambda s: s["dot_signassetid"])[:n]
    for sign in signs:
        box.dv.apply_change("dot_signassets", {"dot_route": route}, key=sign["dot_signassetid"])
    return signs


async def envelopes(services: Services, signs: list[dict[str, Any]]) -> list[Any]:
    records = await services.sources["dataverse"].fetch("dot_signassets",  # type: ignore[attr-defined]
                                                        [s["dot_signassetid"] for s in signs])
    return envelopes_for(services.flowset, "dataverse", "dot_signassets", list(records.values()), origin="webhook",
                         mode="direct")


def routes_in_arcgis(box: Sandbox, signs: list[dict[str, Any]]) -> list[str]:
    features = {f["GlobalID"]: f for f in box.ag.all("SignAssets")}
    return [str(features[s["dot_arcgisglobalid"]].get("ROUTE")) for s in signs]


async def until_probe(services: Services) -> None:
    breaker = await services.controller.breakers.get("arcgis")
    assert breaker.probe_at is not None
    wait = (breaker.probe_at - services.controller.clock()).total_seconds()
    await asyncio.sleep(max(wait, 0) + 0.3)


async def cycles_until(services: Services, done: Any, *, limit: float = 20.0) -> list[Any]:
    """Cycles until `done()` (a broker hands out a message that just became due a moment later)."""
    reports = []
    deadline = time.monotonic() + limit
    while True:
        reports.append(await services.controller.run_cycle(poll=False))
        if done() or time.monotonic() > deadline:
            return reports
        await asyncio.sleep(0.3)


async def test_an_outage_opens_the_breaker_changes_wait_scheduled_and_the_probe_closes_it(box: Sandbox,
                                                                                        services: Services, caplog):
    started = datetime.now(UTC)
    signs = await office_edits(box, services, 4, "US-29 OUTAGE")
    await enqueue(services, await envelopes(services, signs))
    box.ag.faults.fail_next(OUTAGE, 503, as_http_200_error=False)  # ArcGIS is down

    # Two failed cycles in a row open it (SYNCLINE_BREAKER_FAILURES, 2 here); the second's changes are parked.
    first = await services.controller.run_cycle(poll=False)
    assert first.retried == 4
    second = await cycles_until(services, lambda: False, limit=0)
    assert second[-1].held == 4, second[-1]
    assert "arcgis" in second[-1].paused
    breaker = await services.controller.breakers.get("arcgis")
    assert breaker.state == "open"
    assert breaker.cause.startswith("2 consecutive failures; last: TRANSIENT: arcgis")
    assert "circuit breaker of arcgis opened until" in caplog.text
    depth = await services.queue.depth()
    assert (depth.active, depth.scheduled) == (0, 4)
    assert {m.dead_letter_reason for m in await services.queue.peek_dead_letters()} == {
        "UNMAPPED_CHOICE", "REQUIRED_FIELD_MISSING"}  # only the bad seeds: nothing dead-lettered for the outage

    # While open: a cycle with polls does not call ArcGIS, nor does the health check.
    calls = arcgis_calls(box)
    polled = await services.controller.run_cycle(poll=True)
    assert polled.outcome == "ok", polled.error
    assert polled.paused["arcgis"] == breaker.probe_at.isoformat()  # type: ignore[union-attr]
    status = await health(services)
    assert arcgis_calls(box) == calls
    assert status["status"] == "degraded"
    assert status["systems"]["arcgis"] == {"reachable": None, "paused_until": breaker.probe_at.isoformat()}  # type: ignore[union-attr]
    assert status["breakers"]["arcgis"]["state"] == "open"
    assert status["breakers"]["arcgis"]["probe_at"] == breaker.probe_at.isoformat()  # type: ignore[union-attr]
    assert status["breakers"]["dataverse"]["state"] == "closed"
    assert status["queue"]["scheduled"] == 4

    # The cool-down passes, the outage does not: one probe (the ping and its in-call retries), re-opened for longer.
    await until_probe(services)
    calls, pings = arcgis_calls(box), box.ag.request_count["service"]
    reports = await cycles_until(services, lambda: box.ag.request_count["service"] > pings)
    probes = box.ag.request_count["service"] - pings
    assert 1 <= probes <= 4
    assert arcgis_calls(box) - calls == probes  # nothing but the probe reached ArcGIS
    again = await services.controller.breakers.get("arcgis")
    assert again.state == "open"
    assert again.cause.startswith("probe failed")
    assert again.cooldown_seconds == 2 * cool(services)
    assert sum(r.held for r in reports) == 4
    assert (await services.queue.depth()).scheduled == 4

    # The outage ends: after the cool-down the probe closes it and the parked changes are written, once.
    box.ag.faults.clear()
    await until_probe(services)
    await cycles_until(services, lambda: routes_in_arcgis(box, signs) == ["US-29 OUTAGE"] * 4)
    assert routes_in_arcgis(box, signs) == ["US-29 OUTAGE"] * 4
    assert (await services.controller.breakers.get("arcgis")).state == "closed"
    depth = await services.queue.depth()
    assert (depth.active, depth.scheduled) == (0, 0)
    assert depth.dead_letter == 2
    # Each parked change is written once (the audit ledger of the writes since the outage began).
    keys = {s["dot_signassetid"] for s in signs} | {s["dot_arcgisglobalid"] for s in signs}
    written = [a for a in await services.state.read_audit(limit=1000, decision="written")
               if a.key in keys and a.at >= started]
    assert len(written) == 4, written
    status = await health(services)
    assert status["breakers"]["arcgis"]["state"] == "closed"
    assert status["systems"]["arcgis"] == {"reachable": True}


async def test_two_instances_race_for_the_probe_and_one_probes(box: Sandbox, services: Services):
    other = build_services(Settings())  # a second function instance: same state store, own process memory
    try:
        tune(other)
        await services.controller.breakers.trip("arcgis", "outage (test)")
        assert await other.controller.paused_until("arcgis") is not None
        await until_probe(services)
        before = box.ag.request_count["service"]
        answers = await asyncio.gather(services.controller.paused_until("arcgis"),
                                       other.controller.paused_until("arcgis"))
        assert box.ag.request_count["service"] - before == 1  # one ping, from the winner of the compare-and-set
        assert sorted(a is None for a in answers) == [False, True]
        point = await services.state.get_checkpoint(BREAKER_PREFIX + "arcgis")
        assert point is not None
        assert Breaker.from_json(point.value).state == "closed"
        assert await other.controller.paused_until("arcgis") is None
    finally:
        await other.aclose()
