"""The demo's reconciliation hook prints the CLI's table and returns the report the demo's `ok` reads."""

from __future__ import annotations

import io

from rich.console import Console

from sandbox.demo.show_reconcile import show_reconcile
from shared.ops import initial_load
from shared.ops.reconcile_view import print_reconciliation


async def test_show_reconcile_prints_the_table_and_returns_the_report(seeded):
    box, _summary, services = seeded
    await initial_load(services)
    for _ in range(3):
        await services.controller.run_cycle()
    out = io.StringIO()
    report = await show_reconcile(Console(file=out, width=200), services, box)
    text = out.getvalue()
    assert "reconciliation" in text
    assert "sign_assets_to_field" in text
    assert " DLQ " in text
    assert report["status"] == "complete"
    assert report["total_drift"] == 0
    # The two bad signs of the seed are dead-lettered: excluded, not drift.
    [signs] = [e for e in report["entities"] if e["entity"] == "sign_asset"]
    assert signs["counts"]["excluded"] == 2
    assert signs["drift"] == 0
    assert "complete: total drift 0" in text
    # On an 80-column terminal nothing is cut short: every entity and flow name whole, no ellipsis.
    narrow = io.StringIO()
    print_reconciliation(Console(file=narrow, width=80), report)
    assert "…" not in narrow.getvalue()
    for e in report["entities"]:
        assert e["flow"] in narrow.getvalue()
    [row] = [line for line in narrow.getvalue().splitlines() if line.split()[:1] == ["sign_asset"]]
    assert row.split()[-2:] == ["2", "0"]  # DLQ 2, drift 0
