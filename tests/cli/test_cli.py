"""The `syncline` CLI: validate, run, status and the dead-letter commands, with clear errors and exit codes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from shared.bootstrap import build_services
from shared.cli import app
from shared.core.envelope import ChangeEnvelope
from shared.settings import Settings

runner = CliRunner()


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNCLINE_STATE_DIR", str(tmp_path / "state"))
    for name in ("DATAVERSE__URL", "ARCGIS__SERVICE_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "state"


def test_validate_reports_flows_and_broken_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich would abbreviate the table on a narrow terminal
    ok = runner.invoke(app, ["validate", "flows"])
    assert ok.exit_code == 0
    assert "sign_assets_to_field" in ok.output
    data = yaml.safe_load(Path("flows/dot-signs.yaml").read_text())
    data["flows"][0]["fields"][0]["transform"] = "no_such_transform"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert "unknown transform 'no_such_transform'" in result.output


def test_run_status_and_dead_letter_commands(state_dir):
    async def poison() -> None:
        services = build_services(Settings())
        env = ChangeEnvelope(flow="nope", operation="update", source_system="arcgis", source_table="X",
                             source_key="{K}", payload={})
        await services.queue.send([env.to_message()])
        await services.aclose()

    asyncio.run(poison())
    run = runner.invoke(app, ["run"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["dead_lettered"] == {"UNKNOWN_FLOW": 1}
    listed = runner.invoke(app, ["dlq", "list"])
    assert listed.exit_code == 0
    assert "UNKNOWN_FLOW" in listed.output
    status = runner.invoke(app, ["status"])
    assert json.loads(status.output)["queue"]["dead_letter"] == 1
    assert runner.invoke(app, ["dlq", "replay"]).exit_code == 2  # neither an id nor --all
    missing = runner.invoke(app, ["dlq", "replay", "no-such-id"])
    assert missing.exit_code == 2
    assert "no dead-lettered message" in missing.output
    replayed = runner.invoke(app, ["dlq", "replay", "--all"])
    assert replayed.exit_code == 0
    assert "replayed 1 message" in replayed.output
    status = runner.invoke(app, ["status"])
    assert json.loads(status.output)["queue"] == {"active": 1, "scheduled": 0, "dead_letter": 0}
    # This state has no system configured: status says so rather than "healthy".
    assert json.loads(status.output)["status"] == "unconfigured"
    assert "syncline --state .syncline/demo status" in json.loads(status.output)["message"]


def test_bad_configuration_is_one_line_not_a_traceback(state_dir, monkeypatch):
    monkeypatch.setenv("DATAVERSE__BATCH_SIZE", "5000")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2
    assert "configuration error" in result.output
    assert "Traceback" not in result.output


def test_status_shows_an_open_breaker_without_calling_its_system(state_dir, monkeypatch):
    # ArcGIS configured at an address nothing answers: an open breaker means the status does not even try it.
    monkeypatch.setenv("ARCGIS__SERVICE_URL", "https://arcgis.invalid/arcgis/rest/services/Signs/FeatureServer")
    monkeypatch.setenv("ARCGIS__API_KEY", "not-a-real-key")

    async def outage() -> str:
        services = build_services(Settings())
        probe_at = await services.controller.breakers.trip("arcgis", "5 consecutive failures; last: TRANSIENT: 503")
        await services.aclose()
        return probe_at.isoformat()

    probe_at = asyncio.run(outage())
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["status"] == "degraded"
    assert status["systems"] == {"arcgis": {"reachable": None, "paused_until": probe_at}}
    breaker = status["breakers"]["arcgis"]
    assert (breaker["state"], breaker["probe_at"], breaker["failures"]) == ("open", probe_at, 0)
    assert breaker["cause"] == "5 consecutive failures; last: TRANSIENT: 503"
    assert breaker["since"] is not None
    assert "not-a-real-key" not in result.output
