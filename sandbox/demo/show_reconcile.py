"""The demo's reconciliation: every flow compared page by page (dead-lettered records excluded), as `syncline
reconcile` prints it."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from sandbox.demo.box import Sandbox
from shared.bootstrap import Services
from shared.ops.reconcile_run import run_reconciliation
from shared.ops.reconcile_view import print_reconciliation


async def show_reconcile(console: Console, services: Services, box: Sandbox) -> dict[str, Any]:
    """Reconcile (no repair), print the table and the first keys per category; the full report for the JSON.

    The report is also stored (`reconcile:last`), so `syncline status` after the demo shows it. `box` is unused:
    reconciliation reads the systems through their APIs, like in production.
    """
    report = (await run_reconciliation(services)).as_dict()
    print_reconciliation(console, report)
    return report
