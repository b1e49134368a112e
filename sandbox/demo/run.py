"""The demo run: seed, initial load, activity, controller cycles, reconciliation, then the report and summary."""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sandbox.demo.box import environment, start_host, start_sandbox
from sandbox.demo.next_steps import leave_settings, next_commands, print_next_steps, serve_until_stopped
from sandbox.demo.scenario import (
    SALES_CUSTOMERS,
    SALES_FLOWS,
    SAP_FLOWS,
    customer360_activity,
    expected_bad,
    field_activity,
    flush,
    fulfilment_activity,
    lead_to_cash_activity,
    lead_to_cash_figures,
    office_activity,
    sales_activity,
    sap_figures,
    sap_fulfilment_activity,
    sap_order_activity,
    seed_sales_side,
    seed_sap_side,
    settle,
)
from sandbox.demo.show_reconcile import show_reconcile
from sandbox.demo.toolkit import tour
from shared.progress import progress_bar


async def run_demo(console: Console, *, report_path: Path, signs: int = 2000, work_orders: int = 500,
                   workdir: Path = Path(".syncline/demo"), runtime: str = "embedded", quiet_logs: bool = True,
                   sales: bool = True, customers: int = SALES_CUSTOMERS, opportunities: int = 300,
                   sap: bool = True, sap_orders: int = 40, serve: bool = False) -> bool:
    """The whole demo; returns True when both directions synced with zero drift and exactly the bad records
    ended in the dead-letter queue. `quiet_logs=False` leaves logger levels alone (tests capturing logs).
    `serve=True` keeps the simulators and the functions host up after the report until SIGINT/SIGTERM."""
    levels = {name: logging.getLogger(name).level for name in ("shared", "asyncio")}
    if quiet_logs:
        # Dead-letter warnings are the point of the demo's last table; keep the console for the summary.
        logging.getLogger("shared").setLevel(logging.ERROR)
        # The loopback host's clients live as long as its process would; their "unclosed" notes at exit are noise.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        return await _run_demo(console, report_path=report_path, signs=signs, work_orders=work_orders,
                               workdir=workdir, runtime=runtime, sales=sales, customers=customers,
                               opportunities=opportunities, sap=sap, sap_orders=sap_orders, serve=serve)
    finally:
        # The caller's logging as it was: a test process runs more after the demo, and captures warnings.
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


async def _run_demo(console: Console, *, report_path: Path, signs: int, work_orders: int, workdir: Path,
                    runtime: str, sales: bool, customers: int, opportunities: int, sap: bool, sap_orders: int,
                    serve: bool) -> bool:
    from sandbox.dataverse import seed_dataverse
    from shared.bootstrap import build_services
    from shared.ops import initial_load
    from shared.settings import Settings

    started = time.monotonic()
    rng = random.Random(2026)
    activity: Counter[str] = Counter()
    console.rule("[bold]Syncline demo[/bold]: Dynamics 365 (Dataverse) <-> ArcGIS Online, on simulators")
    box = start_sandbox(workdir, runtime=runtime, sales=sales, sap=sap)
    if runtime == "azure":
        console.print("runtime: azure (Table Storage on Azurite, Service Bus on the local AMQP test broker)")
    try:
        with environment(box.env):
            seeded = seed_dataverse(box.dv, signs=signs, work_orders=work_orders)
            console.print(f"seeded Dataverse: {seeded['dot_signassets']} signs (2 deliberately bad), "
                          f"{seeded['dot_workorders']} work orders, {seeded['dot_workordertasks']} tasks, "
                          f"{seeded['dot_fieldassignments']} field assignments")
            if box.fno is not None:
                seed_sales_side(box, customers)
                console.print(f"seeded F&O: {len(box.fno.all('CustomersV3'))} customers and "
                              f"{len(box.fno.all('ReleasedProductsV2'))} released products in two legal entities; "
                              f"Dynamics 365 Sales: {len(box.sales['crm']['accounts'])} accounts, "
                              f"{len(box.sales['crm']['contacts'])} contacts; Salesforce: "
                              f"{len(box.sales['c360']['accounts']) + 1} accounts, "
                              f"{len(box.sales['c360']['contacts'])} contacts")
            if box.sap is not None:
                seed_sap_side(box)
                console.print(f"seeded SAP: {len(box.sap.all('A_BusinessPartner'))} business partners, "
                              f"{len(box.sap.customizing.materials)} materials, {len(box.sap.all('A_SalesOrder'))} "
                              f"sales orders; Dynamics: {len(box.sales['sap_accounts']['accounts']) + 1} ERP "
                              "customer accounts")
            start_host(box)
            leave_settings(workdir, box.env)
            services = build_services(Settings())
            try:
                with progress_bar(console) as progress:
                    task = progress.add_task("initial load to ArcGIS", total=seeded["dot_signassets"]
                                             + seeded["dot_workorders"] + seeded["dot_workordertasks"]
                                             + seeded["dot_fieldassignments"])
                    load = await initial_load(services, progress=lambda _f, n: progress.advance(task, n))
                console.print(f"initial load: {load.written} records written (ArcGIS, Salesforce), "
                              f"{load.queued} queued")
                await flush(box)
                office_activity(box, rng, activity)
                await flush(box)
                field_activity(box, rng, activity)
                await flush(box)
                cycles: list[Any] = []
                if box.fno is not None:
                    # Parents a child waits for are minutes away in production; the demo compresses time.
                    services.controller.parent_wait_seconds = 0.2
                    await settle(services, box, cycles)  # loads F&O into Salesforce, Customer 360 both ways
                    sales_activity(box, activity)
                    lead_to_cash_activity(box, activity, opportunities)
                    await flush(box)
                    await settle(services, box, cycles)  # new customers, won deals and orders into F&O
                    fulfilment_activity(box, rng, activity)
                    customer360_activity(box, rng, activity)
                    await flush(box)
                if box.sap is not None:
                    services.controller.parent_wait_seconds = 0.2
                    await settle(services, box, cycles)  # partners and products from SAP, accounts to SAP
                    sap_order_activity(box, activity, sap_orders)
                    await flush(box)
                    await settle(services, box, cycles)
                    sap_fulfilment_activity(box, rng, activity)
                    await flush(box)
                await settle(services, box, cycles)
                dead = await services.queue.peek_dead_letters(1000)
                console.rule("reconciliation: both sides of every linked pair, page by page (syncline reconcile)")
                recon = await show_reconcile(console, services, box)  # dead-lettered records are left out
                written = await services.state.read_audit(limit=1_000_000, decision="written")
                echoes = await services.state.read_audit(limit=1_000_000, decision="skipped_echo")
                conflicts = await services.state.read_audit(limit=1_000_000, decision="conflict_resolved")
                cascaded = await services.state.read_audit(limit=1_000_000, decision="cascaded")
                depth = await services.queue.depth()
                toolkit = await tour(console, services, box)
            finally:
                await services.aclose()
        per_flow = Counter(a.flow for a in written)
        dead_rows = [{"message_id": m.message_id, "flow": m.application_properties.get("flow"),
                      "key": m.application_properties.get("key"), "reason": m.dead_letter_reason,
                      "description": m.dead_letter_description} for m in dead]
        # Per record, not per message: a bad record changed again (say, by another flow's id write-back) is a
        # new change and dead-letters again; it is still one record to fix.
        got_bad = Counter((flow, reason) for flow, _key, reason in
                          {(str(d["flow"]), str(d["key"]), str(d["reason"])) for d in dead_rows})
        total_drift = int(recon["total_drift"])
        directions = {f.name: f"{f.source.system} -> {f.target.system}" for f in services.flowset.flows}
        ok = (total_drift == 0 and recon["status"] == "complete" and not box.dv.webhook_failures
              and got_bad == expected_bad(box)
              and depth.active == 0
              and any(per_flow[f] for f in per_flow if directions[f].startswith("arcgis"))
              and any(per_flow[f] for f in per_flow if directions[f].startswith("dataverse"))
              and all(per_flow[f] for f in SALES_FLOWS if box.fno is not None)
              and all(per_flow[f] for f in SAP_FLOWS if box.sap is not None)
              and not sap_figures(box).get("orders_whose_items_differ")
              and (box.sap is None or sap_figures(box).get("migrated_account_made_partner_by_its_order") == 1)
              and not lead_to_cash_figures(box).get("orders_whose_lines_differ")
              and not any("error" in part for part in toolkit.values()))
        report_doc = {
            "ok": ok,
            "generated_at": datetime.now(UTC).isoformat(),
            "duration_seconds": round(time.monotonic() - started, 1),
            "seed": {k: v for k, v in seeded.items() if k != "bad_signs"},
            "activity": dict(activity),
            "written_per_flow": {f: {"direction": directions[f], "records": n} for f, n in sorted(per_flow.items())},
            "echoes_suppressed": len(echoes),
            "conflicts_resolved": len(conflicts),
            "cascaded_updates": len(cascaded),
            "api_calls": {"dataverse": box.dv.request_count, "arcgis": sum(box.ag.request_count.values()),
                          **({"fno": box.fno.request_count, "salesforce": box.sf.request_count}
                             if box.fno is not None else {}),
                          **({"sap": box.sap.request_count} if box.sap is not None else {})},
            "lead_to_cash": lead_to_cash_figures(box),
            "order_to_sap": sap_figures(box),
            "controller_cycles": [c.__dict__ for c in cycles],
            "dead_letters": dead_rows,
            "webhook_failures": [
                *({"from": "dataverse", "url": f.url.split("?")[0], "status": f.status, "error": f.error[:300]}
                  for f in box.dv.webhook_failures),
                *({"from": "arcgis", "url": d.url.split("?")[0], "status": d.status, "error": d.error[:300]}
                  for d in box.ag.webhook_deliveries if d.status is None or d.status >= 300),
            ],
            "queue": {"active": depth.active, "scheduled": depth.scheduled, "dead_letter": depth.dead_letter},
            "reconciliation": recon,
            "toolkit": toolkit,
        }
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report_doc, indent=2, default=str))
        _print_summary(console, report_doc)
        console.print(f"report written to {report_path}")
        console.print("[bold green]demo OK[/bold green]: both directions synced, zero drift, bad records "
                      "dead-lettered" if ok else "[bold red]demo FAILED[/bold red]: see the report")
        sources = {f.name: f.source.system for f in services.flowset.flows}
        print_next_steps(console, next_commands(workdir, dead_rows, sources), serving=serve, runtime=runtime)
        if serve:
            await serve_until_stopped()
        return ok
    finally:
        box.stop()


def _print_summary(console: Console, doc: dict[str, Any]) -> None:
    flows = Table("flow", "direction", "records written", title="written per flow")
    for name, row in doc["written_per_flow"].items():
        flows.add_row(name, row["direction"], str(row["records"]))
    console.print(flows)
    dead = Table("flow", "key", "reason", "description", title=f"dead letters ({len(doc['dead_letters'])})")
    for d in doc["dead_letters"]:
        dead.add_row(str(d["flow"]), str(d["key"]), str(d["reason"]), str(d["description"])[:90])
    console.print(dead)
    if doc.get("lead_to_cash"):
        console.print(f"lead to cash: {doc['lead_to_cash']}")
    if doc.get("order_to_sap"):
        console.print(f"order to SAP: {doc['order_to_sap']}")
    console.print(f"API calls: {doc['api_calls']}; echoes suppressed: {doc['echoes_suppressed']}; "
                  f"conflicts resolved: {doc['conflicts_resolved']}; cascaded updates: {doc['cascaded_updates']}; "
                  f"queue: {doc['queue']}; {doc['duration_seconds']}s")
