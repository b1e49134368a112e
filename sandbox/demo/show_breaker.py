"""The demo's circuit-breaker part: an ArcGIS outage opens its breaker, office edits wait, the probe closes it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from rich.console import Console
from rich.table import Table

from sandbox.demo.box import Sandbox
from sandbox.demo.scenario import flush, settle
from shared.bootstrap import Services, get_services
from shared.core.controller import envelopes_for
from shared.ops.writes import IntakeResult, write_direct

COOL_DOWN = 4.0
"""The demo's cool-down in seconds (production: SYNCLINE_BREAKER_COOLDOWN_SECONDS, 60 by default)."""
FAILURES = 1
"""Failed calls in a row that open the breaker in the demo (production: SYNCLINE_BREAKER_FAILURES, 5): each failed
call costs the connector's in-call retries (about a second), and the outage must end within the cool-down."""
EDITS = 2
"""Office edits during the outage. Webhooks that arrive together all pass the still-closed breaker and queue up
behind ArcGIS's service-definition read, each spending its in-call retries (~1.3 s): the cool-down must outlast
them, or the last one probes a system that is still down (and re-opens the breaker for twice as long)."""
ROUTE_SUFFIX = " DETOUR"


async def show_breaker(console: Console, services: Services, box: Sandbox) -> dict[str, Any]:
    """Outage of ArcGIS (its fault knobs answer 503), office edits of signs, the breaker opening and closing."""
    started = time.monotonic()
    # Every instance that writes to ArcGIS: the demo's and, when it serves webhooks, the function host's.
    instances = [services]
    if box.host_url:
        host = get_services()
        if host is not services:
            instances.append(host)
    for instance in instances:
        breakers = instance.controller.breakers
        breakers.policy = replace(breakers.policy, consecutive_failures=FAILURES, cooldown_seconds=COOL_DOWN,
                                  probe_lease_seconds=COOL_DOWN)
    signs = sorted((s for s in box.dv.all("dot_signassets") if s.get("dot_arcgisglobalid")),
                   key=lambda s: str(s["dot_signassetid"]))[:EDITS]
    routes = {s["dot_arcgisglobalid"]: f"{s.get('dot_route') or ''}{ROUTE_SUFFIX}"[:50] for s in signs}

    box.ag.faults.fail_next(1_000_000, 503, as_http_200_error=False)
    console.print(f"ArcGIS is down: every request answers 503 (demo breaker: {FAILURES} failed call(s) in a row "
                  f"open it, cool-down {COOL_DOWN:g} s)")
    for sign in signs:
        box.dv.apply_change("dot_signassets", {"dot_route": routes[sign["dot_arcgisglobalid"]]},
                            key=sign["dot_signassetid"])
    if box.host_url:
        await flush(box)  # the webhooks: direct writes fail, the breaker opens, the rest are answered 202
    else:
        records = await services.sources["dataverse"].fetch(  # type: ignore[attr-defined]
            "dot_signassets", [s["dot_signassetid"] for s in signs])
        for record in records.values():  # one webhook each, as Dataverse would send them
            await write_direct(services, envelopes_for(services.flowset, "dataverse", "dot_signassets", [record],
                                                       origin="webhook", mode="direct"), IntakeResult())
    opened = await services.controller.breakers.get("arcgis")
    depth = await services.queue.depth()
    held = depth.active + depth.scheduled  # the queue was empty: these wait for the probe (due once it is)
    console.print(f"[yellow]breaker arcgis {opened.state.upper()}[/yellow] ({opened.cause}); probe at "
                  f"{opened.probe_at.strftime('%H:%M:%S') if opened.probe_at else '-'}; "
                  f"{EDITS} office edits → {held} change(s) held on the queue for the probe, {depth.dead_letter} dead "
                  "letters")

    box.ag.faults.clear()
    console.print("ArcGIS is back; waiting for the cool-down")
    if opened.probe_at is not None:
        wait = (opened.probe_at - services.controller.clock()).total_seconds()
        await asyncio.sleep(max(wait, 0) + 0.2)
    synced = 0
    deadline = time.monotonic() + 6
    while True:
        await services.controller.run_cycle(poll=False)
        features = {f["GlobalID"]: f for f in box.ag.all("SignAssets")}
        synced = sum(1 for gid, route in routes.items() if features.get(gid, {}).get("ROUTE") == route)
        if synced == len(routes) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    closed = await services.controller.breakers.get("arcgis")
    console.print(f"[green]breaker arcgis {closed.state.upper()}[/green] ({closed.cause}); "
                  f"{synced}/{len(routes)} held changes synced")
    if box.host_url:
        await settle(services, box, [], limit=4)  # ArcGIS's webhooks about those writes (echoes): queue ends empty

    table = Table("step", "breaker", "detail", title="circuit breaker of arcgis")
    table.add_row("outage", opened.state, opened.cause)
    table.add_row("held", opened.state, f"{held} change(s) scheduled for {opened.probe_at:%H:%M:%S}"
                  if opened.probe_at else f"{held} change(s)")
    table.add_row("probe", closed.state, closed.cause)
    table.add_row("synced", closed.state, f"{synced}/{len(routes)} signs' routes in ArcGIS")
    console.print(table)
    return {"opened": opened.state == "open", "closed": closed.state == "closed", "held": held, "edits": len(routes),
            "synced": synced, "cause": opened.cause, "seconds": round(time.monotonic() - started, 1)}
