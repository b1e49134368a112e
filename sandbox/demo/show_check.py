"""The demo's choice-domain drift scene: a new Dataverse option is caught by `syncline check` before any record
carries it, and the check is clean again once the option is gone."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from sandbox.demo.box import Sandbox
from shared.bootstrap import Services
from shared.ops.check import field_uses, run_check
from shared.ops.check_view import findings_table

ENTITY_SET, COLUMN = "dot_signassets", "dot_signtype"
NEW_VALUE, NEW_LABEL = 100000005, "Temporary"
"""What a maker adds in the portal: a sign type "Temporary" that value map sign_type does not know."""


def _flows(services: Services) -> list[str]:
    # The flows that read or write the column: the check of this scene looks at nothing else.
    return sorted({u.flow for u in field_uses(services.flowset)
                   if (u.system, u.table, u.field) == ("dataverse", ENTITY_SET, COLUMN)})


async def show_check(console: Console, services: Services, box: Sandbox) -> dict[str, Any]:
    """Add the option (as an admin would), run the check, print what it catches, remove the option, check again."""
    started = time.monotonic()
    flows = _flows(services)
    before = await run_check(services, flows=flows)
    console.print(f"check of {', '.join(flows)}: exit {before.exit_code}, {len(before.errors)} errors")
    box.dv.set_choice_option(ENTITY_SET, COLUMN, NEW_VALUE, NEW_LABEL)
    try:
        console.print(f"a maker adds option {NEW_VALUE} \"{NEW_LABEL}\" to {ENTITY_SET}.{COLUMN} in Dataverse")
        drifted = await run_check(services, flows=flows)
        carrying = sum(1 for r in box.dv.all(ENTITY_SET) if r.get(COLUMN) == NEW_VALUE)
        console.print(findings_table(drifted))
        console.print(f"records carrying {NEW_VALUE} so far: {carrying}; exit code {drifted.exit_code} "
                      "(the first sign saved with it would dead-letter with UNMAPPED_CHOICE)")
    finally:
        box.dv.remove_choice_option(ENTITY_SET, COLUMN, NEW_VALUE)
    after = await run_check(services, flows=flows)
    console.print(f"option removed again: exit {after.exit_code}, "
                  f"{'no drift' if after.exit_code == 0 else f'{len(after.errors)} errors'}")
    caught = [f"{f.system} {f.table}.{f.field} {f.value} ({f.label}): {f.problem}" for f in drifted.errors]
    return {"caught": caught, "clean_before": before.exit_code == 0, "clean_after": after.exit_code == 0,
            "records_carrying": carrying, "flows": flows, "seconds": round(time.monotonic() - started, 2)}
