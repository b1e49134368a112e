"""Scheduled reconciliation against the simulators, on both runtimes: drift found, repaired from its owning side
once (a repeat enqueues nothing), fixed by the next cycle; the stored report, health, the timer and the CLI."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from azure.functions.timer import TimerRequest
from typer.testing import CliRunner

from sandbox.dataverse import seed_dataverse
from sandbox.dataverse.seed import _sign
from sandbox.demo import Sandbox, environment, start_sandbox
from sandbox.funchost import registered_functions
from shared.bootstrap import Services, build_services, set_services
from shared.cli import app
from shared.ops import health, initial_load
from shared.ops.reconcile_run import LAST_RECONCILIATION, run_reconciliation
from shared.settings import Settings


@pytest.fixture(params=["embedded", "azure"])
def box(request: pytest.FixtureRequest, tmp_path) -> Iterator[Sandbox]:
    sandbox = start_sandbox(tmp_path / "sandbox", runtime=request.param)
    try:
        with environment(sandbox.env):
            seed_dataverse(sandbox.dv, signs=12, work_orders=2)
            yield sandbox
    finally:
        sandbox.stop()


async def settled(services: Services) -> None:
    await initial_load(services)
    for _ in range(3):
        await services.controller.run_cycle()


def sign_with_route(box: Sandbox) -> dict:
    return next(f for f in box.ag.all("SignAssets") if f.get("ROUTE") and f.get("DV_ID"))


async def test_drift_is_found_repaired_once_from_its_owning_side_and_fixed_by_the_next_cycle(box):
    services = build_services(Settings())
    try:
        await settled(services)
        clean = await run_reconciliation(services)
        assert clean.total_drift == 0, clean.as_dict()
        assert not clean.partial
        sign = sign_with_route(box)
        # Behind Syncline's back: a crew edits a Dynamics-owned field in ArcGIS, the office edits the condition
        # (owned by ArcGIS) in Dynamics; nothing is synced (no webhooks registered, no cycle runs).
        box.ag.field_edit("SignAssets", sign["GlobalID"], {"ROUTE": "XX-999"}, user="crew1")
        box.dv.apply_change("dot_signassets", {"dot_condition": 100000004 if sign["CONDITION"] != "MISSING"
                                               else 100000000}, key=sign["DV_ID"])
        # And a sign created while the webhook was down (never synced).
        new_sign = box.dv.insert("dot_signassets", _sign(random.Random(5), 900, datetime(2026, 3, 2, tzinfo=UTC)))

        found = await run_reconciliation(services)
        [signs] = [e for e in found.entities if e.entity == "sign_asset"]
        assert signs.flow == "sign_assets_to_field"
        assert signs.missing_in_target == [new_sign]
        assert signs.field_drift == {sign["DV_ID"]: [f"ROUTE: expected {sign['ROUTE']!r}, found 'XX-999'"]}
        assert list(signs.reverse_field_drift) == [sign["GlobalID"]]
        assert signs.reverse_field_drift[sign["GlobalID"]][0].startswith("dot_condition: expected")
        assert found.total_drift == signs.drift == 3
        assert found.enqueued == 0  # reporting enqueues nothing
        assert (await services.queue.depth()).active == 0

        repaired = await run_reconciliation(services, repair=True)
        assert repaired.enqueued == 3  # the Dynamics signs (ROUTE, the new one), the ArcGIS sign for CONDITION
        assert (await services.queue.depth()).active == 3
        audit = await services.state.read_audit(limit=100, decision="enqueued")
        assert {(a.flow, a.key, a.detail) for a in audit if "reconcile" in a.detail} == {
            ("sign_assets_to_field", sign["DV_ID"], "origin reconcile"),
            ("sign_assets_to_field", new_sign, "origin reconcile"),
            ("sign_assets_from_field", sign["GlobalID"], "origin reconcile")}
        again = await run_reconciliation(services, repair=True)
        assert again.enqueued == 0  # the same drift is not enqueued twice
        assert again.total_drift == 3
        assert (await services.queue.depth()).active == 3

        cycle = await services.controller.run_cycle()
        assert cycle.outcome == "ok"
        assert box.ag.get("SignAssets", sign["GlobalID"])["ROUTE"] == sign["ROUTE"]
        assert [f for f in box.ag.all("SignAssets") if f.get("DV_ID") == new_sign]  # created in ArcGIS
        after = await run_reconciliation(services)
        assert after.total_drift == 0, json.dumps([e.as_dict() for e in after.entities if e.drift], default=str)

        stored = json.loads((await services.state.get_checkpoint(LAST_RECONCILIATION)).value)
        assert stored["status"] == "complete"
        assert stored["total_drift"] == 0
        assert stored["flows"]["sign_assets_to_field"]["linked"] == signs.linked + 1  # the new sign
        report = await health(services)
        assert report["last_reconciliation"]["total_drift"] == 0
        assert report["last_reconciliation"]["when"] == stored["when"]
    finally:
        await services.aclose()


async def test_the_timer_stores_the_report_and_health_shows_the_drift(box):
    services = build_services(Settings())
    set_services(services)
    try:
        await settled(services)
        sign = sign_with_route(box)
        box.ag.field_edit("SignAssets", sign["GlobalID"], {"ROUTE": "XX-999"}, user="crew1")
        timer = registered_functions()["reconcile"]
        assert timer.get_trigger().get_dict_repr()["schedule"] == "%SYNCLINE_RECONCILE_SCHEDULE%"
        await timer.get_user_function()(TimerRequest(past_due=True))
        stored = json.loads((await services.state.get_checkpoint(LAST_RECONCILIATION)).value)
        assert stored["status"] == "complete"
        assert stored["total_drift"] == 1
        assert stored["flows"]["sign_assets_to_field"]["drifted"] == 1
        assert (await services.queue.depth()).active == 0  # the timer reports; repairs are the operator's call
        report = await health(services)
        assert report["last_reconciliation"]["drift"] == {"sign_assets_to_field": 1}
    finally:
        set_services(None)
        await services.aclose()


async def test_a_tiny_api_budget_leaves_a_partial_report_naming_the_system(box, monkeypatch):
    monkeypatch.setenv("SYNCLINE_RECONCILE_DAILY_ALLOWANCES", json.dumps({"arcgis": 30}))  # 10% of 30: 3 calls
    services = build_services(Settings())
    try:
        await settled(services)
        before = services.counter.snapshot().get("arcgis", 0)
        report = await run_reconciliation(services)
        assert report.partial
        assert report.calls["arcgis"] == services.counter.snapshot()["arcgis"] - before
        assert 3 <= report.calls["arcgis"] <= 4  # the budget is checked before each request, a page may cost two
        assert any("arcgis: API budget of 3 calls reached" in r for r in report.partial_reasons)
        stored = json.loads((await services.state.get_checkpoint(LAST_RECONCILIATION)).value)
        assert stored["status"] == "partial"
        assert stored["reasons"] == report.partial_reasons
    finally:
        await services.aclose()


def test_the_cli_prints_the_table_with_the_first_keys_and_exits_by_drift(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")  # rich would abbreviate the table on a narrow terminal
    runner = CliRunner()
    sandbox = start_sandbox(tmp_path / "sandbox")
    try:
        with environment(sandbox.env):
            seed_dataverse(sandbox.dv, signs=12, work_orders=2)

            async def prepare() -> None:
                services = build_services(Settings())
                try:
                    await settled(services)
                finally:
                    await services.aclose()

            asyncio.run(prepare())
            clean = runner.invoke(app, ["reconcile"])
            assert clean.exit_code == 0, clean.output
            assert "reconciliation" in clean.output
            assert " DLQ " in clean.output
            assert "sign_assets_to_field" in clean.output
            assert "work_orders_to_field" in clean.output
            assert "complete: total drift 0" in clean.output

            sign = sign_with_route(sandbox)
            sandbox.ag.field_edit("SignAssets", sign["GlobalID"], {"ROUTE": "XX-999"}, user="crew1")
            drift = runner.invoke(app, ["reconcile", "--flow", "sign_assets_from_field"])
            assert drift.exit_code == 1, drift.output
            assert f"sign_assets_to_field drifted: {sign['DV_ID']} (ROUTE: expected {sign['ROUTE']!r}, found " \
                   "'XX-999')" in drift.output
            assert "work_orders_to_field" not in drift.output  # --flow: that flow's entity only
            assert "complete: total drift 1" in drift.output

            as_json = runner.invoke(app, ["reconcile", "--json"])
            assert as_json.exit_code == 1
            doc = json.loads(as_json.output)
            assert doc["total_drift"] == 1
            assert doc["status"] == "complete"
            assert doc["flows"]["sign_assets_to_field"]["drifted"] == 1

            unknown = runner.invoke(app, ["reconcile", "--flow", "no_such_flow"])
            assert unknown.exit_code == 2
            [line] = unknown.output.strip().splitlines()
            assert line.startswith("error UNKNOWN_FLOW: no flow named 'no_such_flow' in spec")
            assert "Traceback" not in unknown.output

            sandbox.ag.faults.fail_next(10_000, 503)  # ArcGIS is down
            down = runner.invoke(app, ["reconcile", "--flow", "sign_assets_to_field"])
            assert down.exit_code == 2, down.output
            assert len(down.output.strip().splitlines()) == 1
            assert down.output.startswith("error ")
            assert "Traceback" not in down.output
    finally:
        sandbox.stop()
