"""The Functions app: registration, and each trigger invoked through azure-functions with real requests."""

from __future__ import annotations

import json

import azure.functions as func
from azure.functions.timer import TimerRequest

from shared.core.envelope import ChangeEnvelope


def test_functions_are_registered_with_the_expected_triggers(functions):
    assert set(functions) == {"dataverse_webhook", "arcgis_webhook", "fno_webhook", "salesforce_webhook",
                              "sap_webhook", "sync_controller", "health", "admin_load", "reconcile",
                              "choice_check"}
    timer = functions["sync_controller"].get_trigger().get_dict_repr()
    assert timer["type"] == "timerTrigger"
    assert timer["schedule"] == "%SYNCLINE_SCHEDULE%"
    routes = {n: functions[n].get_trigger().get_dict_repr() for n in ("dataverse_webhook", "arcgis_webhook", "health")}
    assert routes["dataverse_webhook"]["route"] == "webhooks/dataverse"
    assert [str(getattr(m, "value", m)).upper() for m in routes["dataverse_webhook"]["methods"]] == ["POST"]
    assert routes["arcgis_webhook"]["route"] == "webhooks/arcgis"
    assert routes["health"]["route"] == "health"
    assert all(str(getattr(r["authLevel"], "value", r["authLevel"])).upper() == "FUNCTION" for r in routes.values())


def post(route: str, body: bytes, headers: dict[str, str] | None = None) -> func.HttpRequest:
    return func.HttpRequest(method="POST", url=f"http://localhost/api/{route}", headers=headers or {}, params={},
                            route_params={}, body=body)


async def test_dataverse_webhook_without_the_shared_secret_is_401_and_writes_nothing(user_function, bare_services):
    resp = await user_function("dataverse_webhook")(post("webhooks/dataverse", b"{}", {"x-syncline-key": "wrong"}))
    assert resp.status_code == 401
    assert (await bare_services.queue.depth()).active == 0


async def test_dataverse_webhook_with_a_malformed_body_is_400_with_a_specific_message(user_function, bare_services):
    headers = {"x-syncline-key": "s3cret-webhook-key"}
    resp = await user_function("dataverse_webhook")(post("webhooks/dataverse", b"{not json", headers))
    assert resp.status_code == 400
    body = json.loads(resp.get_body())
    assert body["error"] == "ENVELOPE_INVALID"
    assert "not valid JSON" in body["detail"]
    resp = await user_function("dataverse_webhook")(post("webhooks/dataverse", b'{"MessageName": "Update"}', headers))
    assert resp.status_code == 400
    assert json.loads(resp.get_body())["error"] == "ENVELOPE_INVALID"
    depth = await bare_services.queue.depth()
    assert (depth.active, depth.dead_letter) == (0, 0)


async def test_arcgis_webhook_rejects_wrong_secret_and_malformed_bodies(user_function, bare_services):
    fn = user_function("arcgis_webhook")
    assert (await fn(post("webhooks/arcgis", b"[]", {"x-syncline-key": "nope"}))).status_code == 401
    resp = await fn(post("webhooks/arcgis", b"{\"hello\": 1}", {"x-syncline-key": "s3cret-webhook-key",
                                                                 "content-type": "application/json"}))
    assert resp.status_code == 400
    assert (await bare_services.queue.depth()).active == 0


async def test_timer_runs_a_cycle_and_health_reports_it(user_function, bare_services):
    env = ChangeEnvelope(flow="no_such_flow", operation="update", source_system="arcgis", source_table="X",
                         source_key="{A}", payload={})
    await bare_services.queue.send([env.to_message()])
    await user_function("sync_controller")(TimerRequest(past_due=False))
    depth = await bare_services.queue.depth()
    assert (depth.active, depth.dead_letter) == (0, 1)
    [dead] = await bare_services.queue.peek_dead_letters()
    assert dead.dead_letter_reason == "UNKNOWN_FLOW"
    req = func.HttpRequest(method="GET", url="http://localhost/api/health", headers={}, params={}, route_params={},
                           body=b"")
    resp = await user_function("health")(req)
    report = json.loads(resp.get_body())
    # No system is configured here: said plainly, and not "healthy" (such an app syncs nothing).
    assert resp.status_code == 503
    assert report["status"] == "unconfigured"
    assert report["message"].startswith("no system is configured: set at least one system's settings")
    assert report["queue"]["dead_letter"] == 1
    assert report["last_cycle"]["outcome"] == "ok"
    assert report["last_cycle"]["dead_lettered"] == {"UNKNOWN_FLOW": 1}


async def test_sap_webhook_without_sap_configured_is_a_clear_400_and_queues_nothing(user_function, bare_services):
    event = {"type": "sap.s4.beh.salesorder.v1.SalesOrder.Changed.v1", "id": "e-1", "source": "/default/s4",
             "data": {"SalesOrder": "4000001"}}
    resp = await user_function("sap_webhook")(post("webhooks/sap", json.dumps(event).encode(),
                                                   {"x-syncline-key": "s3cret-webhook-key"}))
    assert resp.status_code == 400
    assert "SAP__BASE_URL" in resp.get_body().decode()
    assert (await bare_services.queue.depth()).active == 0


async def test_sap_webhook_with_an_unknown_event_type_names_the_known_ones(user_function, bare_services):
    event = {"type": "sap.s4.beh.purchaseorder.v1.PurchaseOrder.Changed.v1", "id": "e-2", "data": {}}
    resp = await user_function("sap_webhook")(post("webhooks/sap", json.dumps(event).encode(),
                                                   {"x-syncline-key": "s3cret-webhook-key"}))
    assert resp.status_code == 400
    assert "sap.s4.beh.salesorder.v1.SalesOrder" in resp.get_body().decode()
