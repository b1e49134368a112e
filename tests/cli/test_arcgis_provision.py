"""`syncline arcgis provision` against the ArcGIS simulator over TLS, through Esri's `arcgis` package (admin extra).

The command reads and changes layer definitions only (no state store, no queue), so it is the same on both runtimes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from sandbox.arcgis import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, ArcGISSimulator, LayerDef, coded_domain, dot_layers
from sandbox.server import RunningServer, free_port
from sandbox.server import TestCA as SandboxCA
from shared.cli import app
from shared.ops.provision import ADMIN_EXTRA_MISSING

pytestmark = [
    pytest.mark.integration,
    # The package fetches client-credentials tokens with verify=False (see tests/conformance/test_arcgis_package.py).
    pytest.mark.filterwarnings("ignore:Unverified HTTPS request:urllib3.exceptions.InsecureRequestWarning"),
]

runner = CliRunner()
FLOWS = "flows/dot-signs.yaml"
WORK_ORDERS, ASSIGNMENTS, INSPECTIONS = 1, 3, 4


def drifted_layers() -> list[LayerDef]:
    """The DOT service after drift: Inspections lost NOTES; WorkOrders.STATUS lacks CANCELLED and has ON_HOLD."""
    layers = dot_layers()
    inspections = layers[INSPECTIONS]
    inspections.fields = [f for f in inspections.fields if f.name != "NOTES"]
    orders = layers[WORK_ORDERS]
    status = coded_domain("WorkOrderStatus", [("OPEN", "Open"), ("IN_PROGRESS", "In progress"),
                                              ("COMPLETED", "Completed"), ("CLOSED", "Closed"), ("ON_HOLD", "On hold")])
    orders.fields = [dataclasses.replace(f, domain=status) if f.name == "STATUS" else f for f in orders.fields]
    return layers


class Sandbox:
    def __init__(self, sim: ArcGISSimulator, server: RunningServer, ca: SandboxCA) -> None:
        self.sim, self.server, self.ca = sim, server, ca

    def fields(self, layer: int) -> dict[str, dict[str, Any]]:
        """The layer's fields as `GET <layer>?f=json` serves them (a plain client, not the package)."""
        token = httpx.post(self.sim.token_url(self.server.url), verify=str(self.ca.ca_path), data={
            "client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET,
            "grant_type": "client_credentials", "f": "json"}).json()["access_token"]
        body = httpx.get(f"{self.sim.service_url(self.server.url)}/{layer}", verify=str(self.ca.ca_path),
                         params={"f": "json", "token": token}).json()
        return {f["name"]: f for f in body["fields"]}

    def codes(self, layer: int, field: str) -> list[Any]:
        return [c["code"] for c in self.fields(layer)[field]["domain"]["codedValues"]]


@pytest.fixture
def arcgis(sandbox_ca: SandboxCA, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Sandbox]]:
    started: list[tuple[ArcGISSimulator, RunningServer]] = []

    def start(layers: list[LayerDef] | None = None) -> Sandbox:
        sim = ArcGISSimulator(drifted_layers() if layers is None else layers)
        server = RunningServer(sim.app, ca=sandbox_ca).start()
        sim.base_url = server.url
        started.append((sim, server))
        for name, value in {"ARCGIS__SERVICE_URL": sim.service_url(server.url),
                            "ARCGIS__TOKEN_URL": sim.token_url(server.url), "ARCGIS__CLIENT_ID": DEFAULT_CLIENT_ID,
                            "ARCGIS__CLIENT_SECRET": DEFAULT_CLIENT_SECRET, "ARCGIS__API_KEY": "",
                            "SYNCLINE_CA_BUNDLE": str(sandbox_ca.ca_path), "COLUMNS": "200"}.items():
            monkeypatch.setenv(name, value)
        return Sandbox(sim, server, sandbox_ca)

    try:
        yield start
    finally:
        for sim, server in started:
            server.stop()
            sim.close()


def provision(*args: str, answer: str | None = None) -> Any:
    result = runner.invoke(app, ["arcgis", "provision", "--flows", FLOWS, *args], input=answer)
    assert "Traceback" not in result.output
    assert DEFAULT_CLIENT_SECRET not in result.output
    return result


def plan_rows(output: str) -> list[tuple[str, ...]]:
    """(layer, field, action, values) of each row of the printed plan table."""
    out = []
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 5 and cells[0] and cells[0] != "layer":
            out.append(tuple(cells[:4]))
    return out


EXPECTED_PLAN = [
    ("WorkOrders", "STATUS", "add values", "CANCELLED Cancelled"),
    ("WorkOrders", "STATUS", "keep values", "ON_HOLD On hold"),
    ("Assignments", "priority", "create domain", "1 Low, 2 Normal, 3 High, 4 Emergency"),
    ("Inspections", "NOTES", "add field", "-"),
]


def test_the_plan_is_shown_and_declining_changes_nothing(arcgis: Callable[..., Sandbox]) -> None:
    box = arcgis()
    before = {i: box.fields(i) for i in (WORK_ORDERS, ASSIGNMENTS, INSPECTIONS)}
    result = provision(answer="n\n")
    assert result.exit_code == 1, result.output
    assert "ArcGIS provisioning plan: 3 change(s) on 3 layer(s)" in result.output
    assert plan_rows(result.output) == EXPECTED_PLAN
    assert "String(2000): truncate to 2000" in result.output
    assert "in no value map: kept, records may hold them (--prune removes them)" in result.output
    assert "Apply 3 change(s) to" in result.output
    assert result.output.rstrip().endswith("cancelled: nothing changed")
    assert {i: box.fields(i) for i in before} == before
    assert box.sim.request_count["admin.addToDefinition"] + box.sim.request_count["admin.updateDefinition"] == 0


def test_yes_applies_the_plan_and_a_second_run_is_up_to_date(arcgis: Callable[..., Sandbox]) -> None:
    box = arcgis()
    result = provision("--yes")
    assert result.exit_code == 0, result.output
    assert plan_rows(result.output) == EXPECTED_PLAN
    assert "applied 3 change(s) to 3 layer(s)" in result.output
    notes = box.fields(INSPECTIONS)["NOTES"]
    assert (notes["type"], notes["length"], notes["nullable"]) == ("esriFieldTypeString", 2000, True)
    assert box.codes(WORK_ORDERS, "STATUS") == ["OPEN", "IN_PROGRESS", "COMPLETED", "CLOSED", "ON_HOLD", "CANCELLED"]
    priority = box.fields(ASSIGNMENTS)["priority"]["domain"]
    assert (priority["name"], [(c["code"], c["name"]) for c in priority["codedValues"]]) == \
        ("Priority", [(1, "Low"), (2, "Normal"), (3, "High"), (4, "Emergency")])

    again = provision()
    assert again.exit_code == 0, again.output
    assert plan_rows(again.output) == [("WorkOrders", "STATUS", "keep values", "ON_HOLD On hold")]
    assert again.output.rstrip().endswith("layers are up to date")

    pruned = provision("--prune", "--yes")
    assert pruned.exit_code == 0, pruned.output
    assert plan_rows(pruned.output) == [("WorkOrders", "STATUS", "remove values", "ON_HOLD On hold")]
    assert box.codes(WORK_ORDERS, "STATUS") == ["OPEN", "IN_PROGRESS", "COMPLETED", "CLOSED", "CANCELLED"]
    last = provision()
    assert (last.exit_code, last.output.strip()) == (0, "layers are up to date")


def test_json_dry_run_prints_the_plan_and_changes_nothing(arcgis: Callable[..., Sandbox]) -> None:
    box = arcgis()
    result = provision("--json", "--dry-run")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["outcome"], report["applied"], report["plan"]["changes"]) == ("dry_run", [], 3)
    assert [(s["layer"], s["field"], s["action"]) for s in report["plan"]["steps"]] == \
        [row[:3] for row in EXPECTED_PLAN]
    assert report["plan"]["steps"][2]["values"][0] == {"code": 1, "label": "Low"}
    assert "NOTES" not in box.fields(INSPECTIONS)

    applied = json.loads(provision("--json", "--yes").output)
    assert (applied["outcome"], applied["applied"]) == ("applied", [WORK_ORDERS, ASSIGNMENTS, INSPECTIONS])
    assert json.loads(provision("--json", "--yes").output)["outcome"] == "up_to_date"

    prompt = provision("--json")
    assert prompt.exit_code == 2
    assert "--json needs --yes or --dry-run" in prompt.output


def test_a_field_that_cannot_hold_the_codes_is_reported_and_exits_1(arcgis: Callable[..., Sandbox]) -> None:
    layers = dot_layers()
    layers[WORK_ORDERS].fields = [dataclasses.replace(f, length=4, domain=None) if f.name == "WORK_TYPE" else f
                                  for f in layers[WORK_ORDERS].fields]
    box = arcgis(layers)
    result = provision("--yes")
    assert result.exit_code == 1, result.output
    assert "cannot provision WorkOrders.WORK_TYPE: a String(4) field cannot hold the codes INSTALL, REPLACE, REPAIR, " \
           "REMOVE, INSPECT of work_type: fix the field or the value map" in result.output
    assert plan_rows(result.output) == [("Assignments", "priority", "create domain",
                                         "1 Low, 2 Normal, 3 High, 4 Emergency")]
    assert box.fields(WORK_ORDERS)["WORK_TYPE"]["domain"] is None
    assert box.codes(ASSIGNMENTS, "priority") == [1, 2, 3, 4]  # what can be done is done


def test_without_the_admin_extra_it_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None in sys.modules makes `import arcgis...` raise ImportError, as on a machine without the package.
    for name in ("arcgis", "arcgis.gis", "arcgis.features"):
        monkeypatch.setitem(sys.modules, name, None)
    result = provision("--dry-run")
    assert result.exit_code == 2
    assert result.output.strip() == f"error {ADMIN_EXTRA_MISSING}"


def test_arcgis_unreachable_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nothing listens there
    monkeypatch.setenv("ARCGIS__SERVICE_URL", f"https://127.0.0.1:{port}/org/arcgis/rest/services/S/FeatureServer")
    monkeypatch.setenv("ARCGIS__TOKEN_URL", f"https://127.0.0.1:{port}/sharing/rest/oauth2/token")
    monkeypatch.setenv("ARCGIS__CLIENT_ID", DEFAULT_CLIENT_ID)
    monkeypatch.setenv("ARCGIS__CLIENT_SECRET", DEFAULT_CLIENT_SECRET)
    result = provision("--dry-run")
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error ArcGIS: could not sign in to https://127.0.0.1:{port}: ")
    assert len(result.output.strip().splitlines()) == 1


def test_a_wrong_secret_or_no_service_is_a_clear_error(arcgis: Callable[..., Sandbox],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    arcgis()
    monkeypatch.setenv("ARCGIS__CLIENT_SECRET", "not-the-secret")
    wrong = provision("--dry-run")
    assert wrong.exit_code == 2
    assert "could not sign in" in wrong.output
    assert "Invalid client_secret" in wrong.output
    assert "not-the-secret" not in wrong.output
    monkeypatch.setenv("ARCGIS__SERVICE_URL", "")
    missing = provision("--dry-run")
    assert (missing.exit_code, missing.output.strip()) == (2, "error ArcGIS is not configured (ARCGIS__SERVICE_URL "
                                                              "is empty)")


def test_an_api_key_signs_in_instead_of_app_credentials(arcgis: Callable[..., Sandbox],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.arcgis import DEFAULT_API_KEY

    arcgis()
    monkeypatch.setenv("ARCGIS__CLIENT_ID", "")
    monkeypatch.setenv("ARCGIS__CLIENT_SECRET", "")
    monkeypatch.setenv("ARCGIS__API_KEY", DEFAULT_API_KEY)
    result = provision("--dry-run")
    assert result.exit_code == 0, result.output
    assert plan_rows(result.output) == EXPECTED_PLAN
    assert DEFAULT_API_KEY not in result.output


def test_a_broken_flow_spec_is_one_line_and_exit_2(arcgis: Callable[..., Sandbox], tmp_path: Any) -> None:
    arcgis()
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec_version: 1\nname: x\n")
    result = runner.invoke(app, ["arcgis", "provision", "--flows", str(bad), "--dry-run"])
    assert result.exit_code == 2
    assert result.output.startswith("error SPEC_INVALID: ")
    assert "Traceback" not in result.output
