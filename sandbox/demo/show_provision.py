"""The demo's ArcGIS provisioning plan: what `syncline arcgis provision --dry-run` shows against the demo's service."""

from __future__ import annotations

import asyncio
from typing import Any

from rich.console import Console
from rich.markup import escape

from sandbox.demo.box import Sandbox
from shared.bootstrap import Services
from shared.ops.provision import Plan, ProvisionError, provisioning
from shared.provision_view import print_plan
from shared.settings import Settings


def _dry_run(settings: Settings) -> Plan:
    with provisioning(None, prune=False, settings=settings) as (_, plan):
        return plan


async def show_provision(console: Console, services: Services, box: Sandbox) -> dict[str, Any]:
    """Plan (never apply) the domains and fields the flows need, through Esri's `arcgis` package; the plan's JSON.

    The package is synchronous: it runs on a worker thread so the demo's loop (and its host) keeps serving. Without
    the admin extra the demo goes on and says so. `box` is unused: the plan reads the service like production.
    """
    console.print("[bold]ArcGIS provisioning[/bold] (syncline arcgis provision --dry-run)")
    try:
        plan = await asyncio.to_thread(_dry_run, services.settings)
    except ProvisionError as exc:
        console.print(f"skipped: {escape(str(exc))}")
        return {"skipped": str(exc)}
    print_plan(console, plan)
    if not plan.changes:
        console.print("layers are up to date")
    return plan.to_json()
