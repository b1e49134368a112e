"""Renders a choice-domain check's findings as a rich table (the CLI and the demo; rich is not in the runtime)."""

from __future__ import annotations

from rich.table import Table

from shared.ops.check import CheckReport


def findings_table(report: CheckReport) -> Table:
    """One row per finding; every cell folds rather than cuts (values and labels are what an operator maps)."""
    table = Table(title=f"choice-domain drift ({len(report.errors)} errors, {len(report.warnings)} warnings)")
    for column in ("system", "table", "field", "value", "label", "problem", "flows"):
        table.add_column(column, overflow="fold")
    for f in report.findings:
        colour = "red" if f.severity == "error" else "yellow"
        table.add_row(f.system, f.table, f.field, "" if f.value is None else str(f.value), f.label or "",
                      f"[{colour}]{f.problem}[/{colour}]", ", ".join(f.flows))
    return table
