"""`python -m sandbox.demo` (or `syncline-demo`): the demo's options parsed, the run, its exit code."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console

from sandbox.demo.run import run_demo

console = Console()


def demo(
    report: Path = typer.Option(Path("reports/demo-report.json"), help="Where to write the JSON report."),
    signs: int = typer.Option(2000, min=10, help="Sign assets to seed."),
    work_orders: int = typer.Option(500, min=5, help="Work orders to seed."),
    runtime: str = typer.Option("embedded", help="embedded (SQLite) or azure (Azurite + local Service Bus broker)."),
    customers: int = typer.Option(1000, min=5, help="F&O customers per legal entity (products: half as many)."),
    opportunities: int = typer.Option(300, min=5, help="Salesforce opportunities (orders: a fifth as many)."),
    sap_orders: int = typer.Option(40, min=1, help="Dynamics orders for SAP."),
    sales: bool = typer.Option(True, help="Include F&O, Salesforce and Customer 360."),
    sap: bool = typer.Option(True, help="Include SAP S/4HANA."),
    serve: bool = typer.Option(False, "--serve", help="Keep the simulators up after the report (until Ctrl-C), "
                               "so `syncline --state .syncline/demo status|reconcile|check` can reach them."),
) -> None:
    """Start the simulators, seed, deliver webhooks, run controller cycles, reconcile and report."""
    if runtime not in ("embedded", "azure"):
        console.print(f"[red]error[/red] --runtime must be embedded or azure, not {runtime!r}")
        raise typer.Exit(2)
    ok = asyncio.run(run_demo(console, report_path=report, signs=signs, work_orders=work_orders, runtime=runtime,
                              customers=customers, opportunities=opportunities, sap_orders=sap_orders, sales=sales,
                              sap=sap, serve=serve))
    raise typer.Exit(0 if ok else 1)


app = typer.Typer(add_completion=False)
app.command()(demo)


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    app()
