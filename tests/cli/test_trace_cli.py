"""`syncline trace` against the simulators: a written record from either side's key, a dead-lettered record, the JSON
shape, an unknown key (exit 1) and an unknown system (exit 2), on both runtimes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from sandbox.dataverse import seed_dataverse
from sandbox.demo import environment, start_sandbox
from shared.bootstrap import build_services
from shared.cli import app
from shared.ops import initial_load
from shared.settings import Settings

runner = CliRunner()
HOP_FIELDS = {"at", "decision", "flow", "system", "table", "key", "correlation_id", "origin", "detail", "reason"}
PLACE_FIELDS = {"where", "message_id", "flow", "system", "key", "correlation_id", "enqueued_at", "delivery_count",
                "scheduled_at", "reason", "description"}


@pytest.fixture(scope="module", params=["embedded", "azure"])
def synced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The simulators after an initial load and one cycle: signs written to ArcGIS, two dead-lettered."""
    box = start_sandbox(tmp_path_factory.mktemp("trace") / "sandbox", runtime=request.param)
    try:
        with environment({**box.env, "COLUMNS": "250"}):
            summary = seed_dataverse(box.dv, signs=6, work_orders=0)

            async def sync() -> None:
                services = build_services(Settings())
                try:
                    await initial_load(services)
                    await services.controller.run_cycle(poll=False)
                finally:
                    await services.aclose()

            asyncio.run(sync())
            written = next(f for f in box.ag.all("SignAssets") if f.get("DV_ID"))
            yield {"bad": summary["bad_signs"]["missing_mutcd_code"], "dv_id": written["DV_ID"],
                   "global_id": written["GlobalID"]}
    finally:
        box.stop()


def trace(*args: str) -> Any:
    return runner.invoke(app, ["trace", *args])


def test_a_written_record_shows_its_target_key_from_either_side(synced: dict[str, Any]) -> None:
    dv_id, global_id = synced["dv_id"], synced["global_id"]

    result = trace("dataverse", dv_id)

    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith(f"trace of dataverse {dv_id}: dataverse {dv_id}, arcgis {global_id}; "
                          "flows sign_assets_to_field")
    assert "hops (oldest first)" in out
    assert f"created arcgis:SignAssets:{global_id} (origin initial); fields " in out
    assert "written" in out
    assert "initial" in out  # the origin column
    assert "\nnow:\n  not on the queue nor in the dead-letter queue" in out
    assert f"\nlinks:\n  sign_asset: dataverse {dv_id} <-> arcgis {global_id}" in out \
        or f"\nlinks:\n  sign_asset: arcgis {global_id} <-> dataverse {dv_id}" in out

    # The GlobalID as pasted from a browser: no braces, lower case.
    other = trace("arcgis", global_id.strip("{}").lower())
    assert other.exit_code == 0, other.output
    assert other.output.startswith(f"trace of arcgis {global_id.strip('{}').lower()}: arcgis {global_id}, "
                                   f"dataverse {dv_id}; ")


def test_a_dead_lettered_record_shows_its_reason(synced: dict[str, Any]) -> None:
    bad = synced["bad"]

    result = trace("dataverse", bad)

    assert result.exit_code == 0, result.output
    out = result.output
    assert "dead_lettered" in out
    assert "REQUIRED_FIELD_MISSING" in out
    now = out[out.index("\nnow:\n"):out.index("\nlinks:\n")]
    assert "  dead_letter: message " in now
    assert f"(sign_assets_to_field, dataverse {bad})" in now
    assert "reason REQUIRED_FIELD_MISSING: " in now
    assert "dot_mutcdcode" in now
    assert out.rstrip().endswith("links:\n  none (the record was never written to another system)")


def test_json_is_the_documented_shape(synced: dict[str, Any]) -> None:
    result = trace("dataverse", synced["bad"], "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) == {"system", "key", "found", "records", "flows", "hops", "now", "links", "notes"}
    assert data["notes"] == []
    assert data["found"] is True
    assert data["records"] == [{"system": "dataverse", "key": synced["bad"]}]
    assert data["flows"] == ["sign_assets_to_field"]
    assert all(set(h) == HOP_FIELDS for h in data["hops"])
    assert [h["decision"] for h in data["hops"]][-1] == "dead_lettered"
    [place] = data["now"]
    assert set(place) == PLACE_FIELDS
    assert place["where"] == "dead_letter"
    assert place["reason"] == "REQUIRED_FIELD_MISSING"
    assert data["links"] == []

    written = json.loads(trace("arcgis", synced["global_id"], "--json", "--limit", "1").output)
    [hop] = written["hops"]  # --limit: the newest hop only (the id written back to Dataverse)
    assert hop["decision"] == "id_propagated"
    assert written["links"][0]["entity"] == "sign_asset"
    assert {written["links"][0]["key"], written["links"][0]["other_key"]} == {synced["dv_id"], synced["global_id"]}


def test_an_unknown_key_is_one_line_and_exit_code_1(synced: dict[str, Any]) -> None:
    result = trace("arcgis", "{00000000-0000-0000-0000-0000000000FF}")

    assert result.exit_code == 1
    assert result.output == ("nothing known of arcgis key '{00000000-0000-0000-0000-0000000000FF}': no audit entry, "
                             "no link and no message on the queue or the dead-letter queue\n")

    as_json = trace("dataverse", "00000000-0000-0000-0000-000000000042", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["found"] is False


def test_an_unknown_system_is_one_line_and_exit_code_2(synced: dict[str, Any]) -> None:
    result = trace("sharepoint", "x")

    assert result.exit_code == 2
    assert result.output.startswith("error unknown system 'sharepoint': one of arcgis, dataverse")
    assert result.output.count("\n") == 1
    assert "Traceback" not in result.output

    empty = trace("dataverse", "  ")
    assert empty.exit_code == 2
    assert empty.output == "error the key is empty\n"
