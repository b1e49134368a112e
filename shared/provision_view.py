"""Rich rendering of an ArcGIS provisioning plan (`shared.ops.provision.Plan`), shared by the CLI and the demo."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.ops.provision import Plan

_COLOURS = {"add field": "green", "create domain": "green", "add values": "yellow", "remove values": "red",
            "keep values": "dim"}


def plan_table(plan: Plan) -> Table:
    """One row per step: layer, field, action, values (code and label), detail (the type and why, the domain)."""
    layers = len({s.layer for s in plan.changes})
    table = Table("layer", "field", "action", "values", "detail",
                  title=f"ArcGIS provisioning plan: {len(plan.changes)} change(s) on {layers} layer(s)")
    for step in plan.steps:
        colour = _COLOURS[step.action]
        values = ", ".join(f"{code} {label}" if str(code) != label else str(code) for code, label in step.values)
        table.add_row(escape(step.layer), escape(step.field), f"[{colour}]{step.action}[/{colour}]",
                      escape(values or "-"), escape(step.detail))
    return table


def print_plan(console: Console, plan: Plan) -> None:
    """The table (when there are steps) and a line per problem."""
    if plan.steps:
        console.print(plan_table(plan))
    for problem in plan.problems:
        console.print(f"[yellow]cannot provision[/yellow] {escape(problem)}", soft_wrap=True)
