"""`syncline check` against every simulator: the connectors' metadata reads, drift made through the simulators'
stores, labels remembered run to run (both runtimes), a system down, and the CLI's table, JSON and exit codes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sandbox.demo import Sandbox, environment, start_sandbox
from shared.bootstrap import Services, build_services
from shared.connectors._choices import ChoiceDomain
from shared.core.errors import RejectedError
from shared.ops.check import CHECK_LAST, run_check
from shared.ops.status import health
from shared.settings import Settings
from tests.contract.adapters import STATE_BUILDERS

DOT_FLOWS = ["sign_assets_to_field", "sign_assets_from_field"]

# What the seeded sandbox has on purpose: options and picklist values the flows do not map, so that the demo's
# records carrying them dead-letter (sandbox/dataverse/schema.py SAP_UNMAPPED_OPTIONS, sandbox/salesforce/seed.py
# UNMAPPED_*), Salesforce's standard Account.Type values beyond the two customer groups, and F&O's SalesStatus
# member None, which fulfillment_status does not map.
KNOWN_GAPS = {
    # The seeds' deliberate gaps: each is a value a seeded record carries so that the demo dead-letters it.
    ("dataverse", "salesorderdetails", "syn_plant", 100000002),
    ("dataverse", "salesorderdetails", "syn_unit", 100000003),
    ("dataverse", "salesorders", "syn_salesorg", 100000001),
    ("salesforce", "Account", "CurrencyIsoCode", "JPY"), ("salesforce", "Account", "Legal_Entity__c", "BR01"),
    ("salesforce", "Account", "Payment_Terms__c", "Net 90"),
    ("salesforce", "Opportunity", "CurrencyIsoCode", "JPY"), ("salesforce", "Opportunity", "Legal_Entity__c", "BR01"),
    ("salesforce", "Order", "CurrencyIsoCode", "JPY"), ("salesforce", "Order", "Legal_Entity__c", "BR01"),
}


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    sandbox = start_sandbox(tmp_path_factory.mktemp("check") / "sandbox", sales=True, sap=True)
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture
def env(box: Sandbox, tmp_path: Path) -> Iterator[dict[str, str]]:
    values = {**box.env, "SYNCLINE_STATE_DIR": str(tmp_path / "state")}
    with environment(values):
        yield values


@pytest.fixture
async def services(env: dict[str, str]) -> AsyncIterator[Services]:
    made = build_services(Settings())  # type: ignore[call-arg]
    try:
        yield made
    finally:
        await made.aclose()


def gaps(report: Any) -> set[tuple[Any, ...]]:
    return {(f.system, f.table, f.field, f.value) for f in report.findings if f.problem == "unmapped"}


async def test_the_seeded_sandbox_shows_only_its_deliberate_gaps(services: Services):
    report = await run_check(services)
    assert gaps(report) == KNOWN_GAPS
    assert [f for f in report.findings if f.problem != "unmapped"] == []
    assert {s: i["status"] for s, i in report.systems.items()} == {
        "arcgis": "ok", "dataverse": "ok", "fno": "ok", "salesforce": "ok", "sap": "skipped"}
    assert "no flow maps a SAP enumeration" in report.systems["sap"]["reason"]
    assert report.exit_code == 1
    # Text-valued maps (ISO currency codes, F&O customer groups) are reported as not checked, never as drift.
    unchecked = {(u["system"], u["table"], u["field"]) for u in report.unchecked}
    assert ("dataverse", "accounts", "syn_currencycode") in unchecked
    assert ("fno", "CustomersV3", "CustomerGroupId") in unchecked
    # The flows of the DOT programme and of the customer 360 are clean.
    assert (await run_check(services, flows=[*DOT_FLOWS, "crm_accounts_to_salesforce"])).exit_code == 0


async def test_each_connector_reads_its_systems_domain(services: Services):
    dv, ag, sf, fno = (services.sinks[s] for s in ("dataverse", "arcgis", "salesforce", "fno"))
    sign_type = await dv.choice_domain("dot_signassets", "dot_signtype")  # type: ignore[attr-defined]
    assert isinstance(sign_type, ChoiceDomain)
    assert sign_type.values == {100000000: "Regulatory", 100000001: "Warning", 100000002: "Guide",
                                100000003: "Directional", 100000004: "Route marker"}
    assert await dv.choice_domain("accounts", "syn_currencycode") is None  # type: ignore[attr-defined]
    state = await dv.choice_domain("salesorders", "statecode")  # type: ignore[attr-defined]
    assert state.source == "option set salesorder_statecode"  # read through StateAttributeMetadata
    assert 0 in state.values
    with pytest.raises(RejectedError, match="no column 'dot_nope'"):
        await dv.choice_domain("dot_signassets", "dot_nope")  # type: ignore[attr-defined]
    status = await ag.choice_domain("WorkOrders", "STATUS")  # type: ignore[attr-defined]
    assert status.values["IN_PROGRESS"] == "In progress"
    assert (await ag.choice_domain("WorkOrders", "PRIORITY")).values == {  # type: ignore[attr-defined]
        1: "Low", 2: "Normal", 3: "High", 4: "Emergency"}
    assert await ag.choice_domain("WorkOrders", "DESCRIPTION") is None  # type: ignore[attr-defined]
    with pytest.raises(RejectedError, match="no field 'NOPE'"):
        await ag.choice_domain("WorkOrders", "NOPE")  # type: ignore[attr-defined]
    legal = await sf.choice_domain("Account", "Legal_Entity__c")  # type: ignore[attr-defined]
    assert set(legal.values) == {"US01", "DE01", "BR01"}
    assert legal.source == "restricted picklist Legal_Entity__c"
    assert await sf.choice_domain("Account", "Name") is None  # type: ignore[attr-defined]
    with pytest.raises(RejectedError, match="no field 'Nope__c'"):
        await sf.choice_domain("Account", "Nope__c")  # type: ignore[attr-defined]
    sales_status = await fno.choice_domain("SalesOrderHeadersV2", "SalesOrderStatus")  # type: ignore[attr-defined]
    assert list(sales_status.values) == ["None", "Backorder", "Delivered", "Invoiced", "Canceled"]
    assert sales_status.source == "enum SalesStatus"
    assert await fno.choice_domain("CustomersV3", "SalesCurrencyCode") is None  # type: ignore[attr-defined]
    with pytest.raises(RejectedError, match="NoSuchEntities"):
        await fno.choice_domain("NoSuchEntities", "X")  # type: ignore[attr-defined]


def problems(report: Any) -> set[tuple[Any, ...]]:
    return {(f.system, f.field, f.value, f.problem) for f in report.findings}


async def test_a_global_choice_is_read_from_the_global_option_set(services: Services, box: Sandbox):
    dv = services.sinks["dataverse"]
    saved = box.dv.schema["dot_workorders"].choices["dot_worktype"]
    box.dv.use_global_option_set("dot_workorders", "dot_worktype", "dot_worktype")
    box.dv.set_choice_option("dot_workorders", "dot_worktype", 100000005, "Survey")
    try:
        domain = await dv.choice_domain("dot_workorders", "dot_worktype")  # type: ignore[attr-defined]
        assert domain.source == "global option set dot_worktype"
        assert domain.values[100000005] == "Survey"
        assert (await dv.global_option_set("dot_worktype")).values == domain.values  # type: ignore[attr-defined]
        with pytest.raises(RejectedError, match="no global option set named 'dot_nope'"):
            await dv.global_option_set("dot_nope")  # type: ignore[attr-defined]
        report = await run_check(services, flows=["work_orders_to_field"])
        assert problems(report) == {("dataverse", "dot_worktype", 100000005, "unmapped")}
    finally:
        box.dv.schema["dot_workorders"].choices["dot_worktype"] = saved
        box.dv.global_option_sets.clear()


async def test_an_arcgis_subtype_domain_counts_as_values_of_the_field(services: Services, box: Sandbox):
    subtype_domain = {"type": "codedValue", "name": "SignTypeTemporary",
                      "codedValues": [{"name": "Regulatory", "code": "REG"}, {"name": "Temporary", "code": "TMP"}]}
    box.ag.set_subtypes("SignAssets", "SIGN_TYPE", [
        {"id": "TMP", "name": "Temporary signs", "domains": {"SIGN_TYPE": subtype_domain,
                                                             "CONDITION": {"type": "inherited"}}}])
    try:
        domain = await services.sinks["arcgis"].choice_domain("SignAssets", "SIGN_TYPE")  # type: ignore[attr-defined]
        assert domain.values["TMP"] == "Temporary"
        assert domain.source == "domain SignType, SignTypeTemporary (subtype Temporary signs)"
        report = await run_check(services, flows=DOT_FLOWS)
        assert problems(report) == {("arcgis", "SIGN_TYPE", "TMP", "unmapped")}
        assert next(iter(report.findings)).flows == ("sign_assets_from_field",)
    finally:
        box.ag.set_subtypes("SignAssets", None, [])


async def test_drift_made_in_each_system_is_caught_and_clears_when_undone(services: Services, box: Sandbox):
    flows = [*DOT_FLOWS, "work_orders_to_field", "order_status_to_opportunity", "crm_accounts_from_salesforce"]
    baseline = await run_check(services, flows=flows)
    assert problems(baseline) == {("salesforce", "Payment_Terms__c", "Net 90", "unmapped")}  # a known gap
    # A member outside the flows' scope (`when`) is no drift: F&O's None status is not synced at all.
    assert not [f for f in baseline.findings if f.system == "fno"]
    box.dv.set_choice_option("dot_signassets", "dot_signtype", 100000005, "Temporary")
    box.ag.remove_coded_value("WorkOrders", "PRIORITY", 4)
    box.sf.set_picklist_value("Account", "Payment_Terms__c", "Net 60", active=False)
    box.fno.remove_enum_member("SalesStatus", "Canceled")  # the last member: re-added with the same value
    try:
        report = await run_check(services, flows=flows)
        assert problems(report) - problems(baseline) == {
            ("dataverse", "dot_signtype", 100000005, "unmapped"),
            ("arcgis", "PRIORITY", 4, "missing"),
            ("salesforce", "Payment_Terms__c", "Net 60", "inactive"),
            ("fno", "SalesOrderStatus", "Canceled", "missing"),
        }
        new_type = next(f for f in report.findings if f.value == 100000005)
        assert new_type.flows == ("sign_assets_to_field",)
        assert new_type.label == "Temporary"
        assert report.exit_code == 1
    finally:
        box.dv.remove_choice_option("dot_signassets", "dot_signtype", 100000005)
        box.ag.set_coded_value("WorkOrders", "PRIORITY", 4, "Emergency")
        box.sf.set_picklist_value("Account", "Payment_Terms__c", "Net 60")
        box.fno.add_enum_member("SalesStatus", "Canceled")
    assert problems(await run_check(services, flows=flows)) == problems(baseline)


@pytest.fixture(params=["embedded", "azure-tables"])
async def state_services(request: pytest.FixtureRequest, services: Services, tmp_path: Path,
                         ) -> AsyncIterator[Services]:
    async with STATE_BUILDERS[request.param](request, tmp_path / "adapter") as make:
        yield dataclasses.replace(services, state=await make())


async def test_a_label_change_is_a_warning_once_and_the_last_check_is_stored(state_services: Services,
                                                                              box: Sandbox):
    flows = ["work_orders_to_field"]
    first = await run_check(state_services, flows=flows)
    assert first.findings == []
    box.dv.set_choice_option("dot_workorders", "dot_priority", 100000003, "Critical")
    try:
        second = await run_check(state_services, flows=flows)
        [changed] = [f for f in second.findings if f.problem == "label_changed"]
        assert (changed.system, changed.table, changed.field, changed.value) == (
            "dataverse", "dot_workorders", "dot_priority", 100000003)
        assert "'Emergency' to 'Critical'" in changed.detail
        assert changed.severity == "warning"
        assert second.exit_code == 0  # warnings do not fail the check
        third = await run_check(state_services, flows=flows)
        assert [f.problem for f in third.findings] == ["label_differs"]  # remembered; still unlike the map
    finally:
        box.dv.set_choice_option("dot_workorders", "dot_priority", 100000003, "Emergency")
    stored = await state_services.state.get_checkpoint(CHECK_LAST)
    assert stored is not None
    assert json.loads(stored.value)["warnings"] == 1
    status = await health(state_services)
    assert status["last_check"]["exit_code"] == 0
    assert status["last_check"]["warnings"] == 1


async def test_a_system_down_is_reported_unreachable_and_the_others_are_still_checked(services: Services,
                                                                                       box: Sandbox):
    box.ag.faults.fail_next(1000, 503, as_http_200_error=False)
    try:
        report = await run_check(services, systems=["arcgis", "dataverse"], flows=DOT_FLOWS)
    finally:
        box.ag.faults.clear()
    assert report.systems["arcgis"]["status"] == "unreachable"
    assert "503" in report.systems["arcgis"]["error"]
    assert report.systems["dataverse"] == {"status": "ok", "fields": 2}
    assert report.findings == []
    assert report.exit_code == 2


runner = CliRunner()


def cli(*args: str) -> Any:
    from shared.cli import app

    return runner.invoke(app, ["check", *args], env={"COLUMNS": "200"})


def test_cli_clean_prints_no_drift_and_exits_0(env: dict[str, str]):
    result = cli("--flow", "sign_assets_to_field", "--flow", "sign_assets_from_field")
    assert result.exit_code == 0, result.output
    assert "no drift: arcgis (2 fields), dataverse (2 fields)" in result.output


def test_cli_drift_prints_the_table_and_exits_1(env: dict[str, str], box: Sandbox):
    box.dv.set_choice_option("dot_signassets", "dot_condition", 100000005, "Leaning")
    try:
        result = cli("--system", "dataverse", "--flow", "sign_assets_to_field")
    finally:
        box.dv.remove_choice_option("dot_signassets", "dot_condition", 100000005)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert "choice-domain drift (1 errors, 0 warnings)" in result.output
    header = next(line for line in lines if "system" in line and "problem" in line)
    assert [h.strip() for h in header.strip("┃ ").split("┃")] == ["system", "table", "field", "value", "label",
                                                                  "problem", "flows"]
    [row] = [line for line in lines if "100000005" in line]
    assert [c.strip() for c in row.strip("│ ").split("│")] == [
        "dataverse", "dot_signassets", "dot_condition", "100000005", "Leaning", "unmapped", "sign_assets_to_field"]
    assert "checked: dataverse (2 fields)" in result.output


def test_cli_json_has_the_report_shape(env: dict[str, str]):
    result = cli("--json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert set(data) == {"checked_at", "exit_code", "errors", "warnings", "unreachable", "systems", "findings",
                         "unchecked"}
    assert (data["exit_code"], data["errors"], data["unreachable"]) == (1, len(KNOWN_GAPS), [])
    first = data["findings"][0]
    assert set(first) == {"system", "table", "field", "value", "problem", "detail", "flows", "label", "severity"}
    assert {(f["system"], f["table"], f["field"], f["value"]) for f in data["findings"]} == KNOWN_GAPS


def test_cli_system_down_is_named_with_its_error_and_exits_2(env: dict[str, str], box: Sandbox):
    box.ag.faults.fail_next(1000, 503, as_http_200_error=False)
    try:
        result = cli("--system", "arcgis")
    finally:
        box.ag.faults.clear()
    assert result.exit_code == 2, result.output
    assert "unreachable arcgis:" in result.output
    assert "503" in result.output
    assert "Traceback" not in result.output


def test_cli_unknown_system_or_flow_is_one_line_and_exit_2(env: dict[str, str]):
    result = cli("--system", "sharepoint")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "configuration error unknown system sharepoint; known: arcgis, dataverse, fno, salesforce, sap"]
    result = cli("--flow", "no_such_flow")
    assert result.exit_code == 2
    assert "unknown flow no_such_flow" in result.output
    assert len(result.output.strip().splitlines()) == 1


async def test_the_demo_scene_catches_the_new_option_before_any_record_and_ends_clean(services: Services,
                                                                                      box: Sandbox):
    from rich.console import Console

    from sandbox.demo.show_check import show_check

    console = Console(record=True, width=80)  # a newcomer's terminal: every value whole, folded not cut
    figures = await show_check(console, services, box)
    assert figures["caught"] == ["dataverse dot_signassets.dot_signtype 100000005 (Temporary): unmapped"]
    assert figures["clean_before"] is True
    assert figures["clean_after"] is True
    assert figures["records_carrying"] == 0
    assert figures["flows"] == ["sign_assets_from_field", "sign_assets_to_field"]
    text = console.export_text()
    assert "choice-domain drift (1 errors, 0 warnings)" in text
    assert "Temporary" in text
    assert "…" not in text
    assert "100000005" in text
    assert "option removed again: exit 0, no drift" in text
    assert 100000005 not in box.dv.schema["dot_signassets"].choices["dot_signtype"].options


def test_cli_a_system_asked_for_but_not_configured_exits_2_and_nothing_configured_is_said_plainly(
        box: Sandbox, tmp_path: Path):
    no_salesforce = {k: v for k, v in box.env.items() if not k.startswith("SALESFORCE__")}
    with environment({**no_salesforce, "SYNCLINE_STATE_DIR": str(tmp_path / "a")}):
        result = cli("--system", "salesforce", "--system", "arcgis")
    assert result.exit_code == 2, result.output
    assert "not configured salesforce" in result.output
    assert "checked: arcgis (10 fields)" in result.output
    bare = {k: v for k, v in box.env.items() if k.startswith("SYNCLINE_")}
    with environment({**bare, "SYNCLINE_STATE_DIR": str(tmp_path / "b")}):
        result = cli()
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        "nothing to check: no flow of a configured system maps values (configure a system's settings)")


async def test_fno_metadata_is_read_once_per_check(services: Services, box: Sandbox):
    def metadata_reads() -> int:
        return sum(1 for method, path in box.fno.requests if method == "GET" and path.endswith("$metadata"))

    before = metadata_reads()
    report = await run_check(services, systems=["fno"])
    assert report.systems["fno"] == {"status": "ok", "fields": 7}
    assert metadata_reads() == before + 1
    await run_check(services, systems=["fno"])
    assert metadata_reads() == before + 2  # each check reads it afresh
