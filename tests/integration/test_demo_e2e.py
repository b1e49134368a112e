"""The demo end to end at small scale: webhooks over loopback into the functions, cycles, zero drift."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from sandbox.demo import run_demo


def why(report: dict) -> str:
    """The parts of a failed demo report that say why (the whole report is too long to read in a failure)."""
    return json.dumps({
        "drift": [e for e in report["reconciliation"]["entities"] if e["drift"]],
        "dead_letters": sorted({(d["flow"], d["key"], d["reason"], d["description"][:160])
                                for d in report["dead_letters"]}),
        "written_per_flow": {f: r["records"] for f, r in report["written_per_flow"].items()},
        "webhook_failures": report["webhook_failures"], "queue": report["queue"],
        "lead_to_cash": report.get("lead_to_cash"), "order_to_sap": report.get("order_to_sap"),
    }, indent=1, default=str)


def assert_toolkit_shown(report: dict, out: str) -> None:
    """The tour after the sync: a trace, a drift caught by check, a breaker opening and closing (issue 17)."""
    tour = report["toolkit"]
    assert not [name for name, part in tour.items() if "error" in part], tour
    first = report["dead_letters"][0]
    assert tour["trace"]["traced"].endswith(first["key"])
    assert tour["trace"]["hops"] >= 2  # its way into the queue, then the dead letter
    assert tour["check"]["caught"] == ["dataverse dot_signassets.dot_signtype 100000005 (Temporary): unmapped"]
    assert tour["check"]["records_carrying"] == 0
    assert (tour["breaker"]["opened"], tour["breaker"]["closed"]) == (True, True)
    assert tour["breaker"]["synced"] == tour["breaker"]["edits"] > 0
    assert "breaker arcgis OPEN" in out
    assert "breaker arcgis CLOSED" in out
    assert f"syncline trace {tour['trace']['traced']}" in out
    assert "--state" in out  # and the demo ends with the next commands to try


async def test_demo_syncs_both_ways_with_zero_drift_and_dead_letters_only_the_bad_records(tmp_path):
    report_path = tmp_path / "report.json"
    ok = await run_demo(Console(file=open(tmp_path / "out.txt", "w")), report_path=report_path,  # noqa: SIM115
                        signs=40, work_orders=10, workdir=tmp_path / "demo", customers=20, opportunities=25,
                        sap_orders=10)
    report = json.loads(report_path.read_text())
    assert ok, why(report)
    assert report["reconciliation"]["total_drift"] == 0
    assert_toolkit_shown(report, (tmp_path / "out.txt").read_text())
    directions = {row["direction"] for row in report["written_per_flow"].values() if row["records"] > 0}
    assert directions == {"dataverse -> arcgis", "arcgis -> dataverse", "fno -> salesforce", "salesforce -> fno",
                          "dataverse -> salesforce", "salesforce -> dataverse", "dataverse -> sap", "sap -> dataverse"}
    # one dead-lettered record per deliberately bad seed row (a record may carry more than one message)
    records = {(d["flow"], d["key"], d["reason"]) for d in report["dead_letters"]}
    assert sorted((flow, reason) for flow, _key, reason in records) == sorted(
        [("accounts_to_fno", "UNMAPPED_CHOICE"), ("crm_accounts_from_salesforce", "UNMAPPED_CHOICE")]
        + [("customers_to_salesforce", "UNMAPPED_CHOICE")] * 2
        + [("inspections_from_field", "REQUIRED_FIELD_MISSING")]
        + [("opportunities_to_fno", "UNMAPPED_CHOICE")] * 2
        + [("orders_to_fno", "UNMAPPED_CHOICE")]
        + [("products_to_salesforce", "REQUIRED_FIELD_MISSING")] * 2
        + [("sign_assets_to_field", "REQUIRED_FIELD_MISSING"), ("sign_assets_to_field", "UNMAPPED_CHOICE")]
        + [("accounts_to_sap", "UNMAPPED_CHOICE"), ("partners_to_dynamics", "REQUIRED_FIELD_MISSING"),
           ("partners_to_dynamics", "UNMAPPED_CHOICE")]
        + [("orders_to_sap", "UNMAPPED_CHOICE")] * 3)  # unmapped sales organisation, plant and unit
    entities = {e["entity"]: e for e in report["reconciliation"]["entities"]}
    assert entities["customer"]["linked"] > 0  # F&O customers reached Salesforce
    assert entities["product"]["linked"] > 0
    assert entities["opportunity_order"]["linked"] > 0  # closed-won deals became F&O sales orders
    assert entities["opportunity_order"]["out_of_scope"] > 0  # open deals stayed in Salesforce
    assert entities["order_sales_order"]["linked"] > 0
    assert entities["crm_account"]["linked"] > 0
    assert entities["crm_contact"]["linked"] > 0
    l2c = report["lead_to_cash"]
    assert l2c["fno_order_lines_from_salesforce"] >= l2c["fno_sales_orders_from_salesforce"] > 0
    assert l2c["orders_whose_lines_differ"] == 0
    assert l2c["fno_customers_from_salesforce"] > 0
    assert l2c["salesforce_headers_shipped_or_invoiced"] > 0  # fulfilment status came back
    sap = report["order_to_sap"]
    assert sap["sap_orders_from_dynamics"] > 0
    assert sap["orders_whose_items_differ"] == 0  # every order's lines arrived with it
    assert sap["migrated_account_made_partner_by_its_order"] == 1  # a missing partner is created first
    assert sap["dynamics_orders_with_sap_status"] > 0  # delivery status came back
    assert sap["dynamics_products_from_sap"] > 0
    assert entities["sap_partner"]["linked"] > 0
    assert entities["sap_order"]["linked"] > 0
    assert all(d["description"] for d in report["dead_letters"])
    assert report["echoes_suppressed"] > 0  # our own writes came back and were dropped
    assert report["cascaded_updates"] > 0   # completed work orders closed their open tasks
    assert report["queue"]["active"] == 0
    assert report["queue"]["scheduled"] == 0
    assert report["api_calls"]["dataverse"] > 0
    assert report["api_calls"]["arcgis"] > 0
    assert report["api_calls"]["salesforce"] > 0


async def test_demo_on_the_azure_runtime_azurite_and_the_service_bus_test_broker(tmp_path):
    report_path = tmp_path / "report.json"
    ok = await run_demo(Console(file=open(tmp_path / "out.txt", "w")), report_path=report_path,  # noqa: SIM115
                        signs=12, work_orders=3, workdir=tmp_path / "demo", runtime="azure", sales=False, sap=False)
    report = json.loads(report_path.read_text())
    assert ok, why(report)
    assert report["reconciliation"]["total_drift"] == 0
    assert_toolkit_shown(report, (tmp_path / "out.txt").read_text())
    assert report["webhook_failures"] == []
    assert sorted(d["reason"] for d in report["dead_letters"]) == [
        "REQUIRED_FIELD_MISSING", "REQUIRED_FIELD_MISSING", "UNMAPPED_CHOICE"]


async def test_a_flush_waits_while_deliveries_make_progress_and_fails_only_when_they_stall(monkeypatch):
    """The demo's flush is bounded by a stall, not a fixed time: at the default sizes on the Azure runtime the
    initial load's Dataverse webhooks take minutes (each a direct write through Table Storage)."""
    from types import SimpleNamespace

    from sandbox.demo import scenario as demo

    monkeypatch.setattr(demo, "STALL_SECONDS", 0.01)
    box = SimpleNamespace(dv=SimpleNamespace(request_count=0), ag=SimpleNamespace(request_count={}),
                          fno=None, sf=None, sap=None)
    rounds = []

    async def busy(timeout: float) -> None:  # times out three times, serving requests all along, then is done
        rounds.append(timeout)
        if len(rounds) <= 3:
            box.dv.request_count += 5
            raise TimeoutError("still delivering")

    await demo._until_delivered(box, busy)
    assert len(rounds) == 4

    async def stalled(timeout: float) -> None:
        raise TimeoutError("nothing moves")

    with pytest.raises(TimeoutError, match="nothing moves"):
        await demo._until_delivered(box, stalled)
