"""Renders a reconciliation report as rich tables (the CLI and the demo; rich is not in the function runtime)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table


def print_reconciliation(console: Console, report: dict[str, Any], *, keys: int = 5) -> None:
    """One row per flow with its counts, then the first `keys` keys of each drift category, then the status."""
    # Ten columns must fit 80: the flow goes under its entity, the counts get short headers and never wrap.
    table = Table(title="reconciliation", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True, caption="src/tgt: records read; link: pairs compared; miss: not in the "
                  "target; orph: target records linked to nothing; diff: fields differ; DLQ: dead-lettered, left out")
    width = max((len(e["flow"]) + (10 if e["partial"] else 0) for e in report["entities"]), default=6)
    table.add_column("entity / compared via", overflow="fold", min_width=min(width, 27))
    for header in ("src", "tgt", "link", "miss", "orph", "diff", "DLQ", "drift"):
        table.add_column(header, justify="right", no_wrap=True)
    for e in report["entities"]:
        c = e["counts"]
        table.add_row(f"{e['entity']}\n[dim]{e['flow']}{' (partial)' if e['partial'] else ''}[/dim]",
                      str(c["source"]), str(c["target"]), str(c["linked"]), str(c["missing"]), str(c["orphaned"]),
                      str(c["drifted"] + c["cascade_incomplete"]), str(c["excluded"]),
                      f"[red]{c['drift']}[/red]" if c["drift"] else "0")
    console.print(table)
    for e in report["entities"]:
        for label, found in (("missing in target", e["missing_in_target"]), ("orphaned", e["orphans_in_target"]),
                             ("drifted", [f"{k} ({'; '.join(v)})" for k, v in e["field_drift"].items()]),
                             (f"drifted, owned by {e['reverse_flow']}",
                              [f"{k} ({'; '.join(v)})" for k, v in e["reverse_field_drift"].items()]),
                             ("cascade incomplete", e["cascade_incomplete"])):
            if found:
                more = len(found) - keys
                console.print(f"  {e['flow']} {label}: " + ", ".join(str(k) for k in found[:keys])
                              + (f" and {more} more listed" if more > 0 else ""), markup=False, highlight=False)
    status = report["status"]
    console.print(f"{status}: total drift {report['total_drift']}"
                  + (f", {report['enqueued']} record(s) re-enqueued for repair" if report.get("enqueued") else "")
                  + f"; API calls {report['calls'] or {}}", markup=False, highlight=False)
    for reason in report["reasons"]:
        console.print(f"  partial: {reason}", markup=False, highlight=False)
