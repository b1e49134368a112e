"""Health of the configured systems, the queue and the last controller cycle (GET /api/health, `syncline status`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from shared.bootstrap import Services
from shared.core.controller import LAST_CYCLE
from shared.core.errors import SyncError
from shared.ops.check import last_check

NOT_CONFIGURED = (
    "no system is configured: set at least one system's settings (DATAVERSE__URL, ARCGIS__SERVICE_URL, "
    "SALESFORCE__MY_DOMAIN_URL, FNO__ENVIRONMENT_URL or SAP__BASE_URL with their credentials; README, "
    "Configuration), or look at what the demo left: syncline --state .syncline/demo status")
"""What `status` and /api/health say when no system is configured (the embedded default state of a fresh clone)."""


async def health(services: Services) -> dict[str, Any]:
    """Reachability of each configured system, queue and dead-letter depth, the last cycle.

    A system whose circuit breaker is open (it is down, or its API allocation is spent) is reported with the
    time of its probe and is not pinged: health must not hammer a system that is down, nor spend the allocation
    the breaker is saving. Past the cool-down, the check takes the probe (one ping) like any caller.
    `breakers` shows every system's breaker: state, since, cause, failures, probe time.
    """
    systems: dict[str, Any] = {}
    paused: dict[str, str] = {}
    for name, sink in services.sinks.items():
        until = await services.controller.paused_until(name)
        if until is not None:
            paused[name] = until.isoformat()
            systems[name] = {"reachable": None, "paused_until": until.isoformat()}
            continue
        ping = getattr(sink, "ping", None)
        try:
            if ping is not None:
                await asyncio.wait_for(ping(), timeout=10)
            systems[name] = {"reachable": True}
        except (SyncError, TimeoutError) as exc:
            systems[name] = {"reachable": False, "error": str(exc)}
    breakers = await services.controller.breakers.snapshot(sorted(services.sinks))
    depth = await services.queue.depth()
    last = await services.state.get_checkpoint(LAST_CYCLE)
    last_cycle = json.loads(last.value) if last else None
    check = await last_check(services.state)
    healthy = (all(s["reachable"] for s in systems.values() if "paused_until" not in s) and not paused
               and (last_cycle is None or last_cycle["outcome"] == "ok"))
    report: dict[str, Any] = {}
    if not services.sinks:
        # Not "healthy": an app that reaches no system syncs nothing, and a newcomer must not read it as fine.
        report = {"status": "unconfigured", "message": NOT_CONFIGURED}
    return report | {
        "status": report.get("status") or ("healthy" if healthy else "degraded"),
        "systems": systems,
        "queue": {"active": depth.active, "scheduled": depth.scheduled, "dead_letter": depth.dead_letter},
        "last_cycle": last_cycle,
        "last_reconciliation": await _last_reconciliation(services),
        # The last choice-domain drift check (`syncline check`, the daily timer); informative, not health.
        "last_check": None if check is None else {k: check.get(k) for k in
                                                  ("checked_at", "exit_code", "errors", "warnings", "unreachable")},
        "breakers": breakers,
    }


async def _last_reconciliation(services: Services) -> dict[str, Any] | None:
    """When the last reconciliation ran, whether it was complete, and the drift it found (issue 17 item 2)."""
    from shared.ops.reconcile_run import last_reconciliation

    last = await last_reconciliation(services)
    if last is None:
        return None
    return {"when": last["when"], "status": last["status"], "total_drift": last["total_drift"],
            "drift": {flow: c["drift"] for flow, c in last["flows"].items() if c["drift"]}}
