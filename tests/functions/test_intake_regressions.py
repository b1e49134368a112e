"""Regression examples of issue 12 at the webhook edge (defects 1, 2, 3, 6, 7), through azure-functions."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from typing import Any

import azure.functions as func
import pytest

from sandbox.demo import WEBHOOK_SECRET, Sandbox
from shared.triggers._common import error_response
from tests import payload_samples as samples
from tests.functions.harness import Harness

pytestmark = pytest.mark.integration

ROUTES = {"dataverse_webhook": "webhooks/dataverse", "arcgis_webhook": "webhooks/arcgis", "fno_webhook": "webhooks/fno",
          "salesforce_webhook": "webhooks/salesforce", "sap_webhook": "webhooks/sap"}


def post(name: str, body: Any, content_type: str = "application/json") -> func.HttpRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return func.HttpRequest(method="POST", url=f"http://localhost/api/{ROUTES[name]}", params={}, route_params={},
                            headers={"x-syncline-key": WEBHOOK_SECRET, "content-type": content_type}, body=raw)


def refused(h: Harness, name: str, req: func.HttpRequest, status: int = 400) -> dict[str, Any]:
    """Send; assert the status and that nothing changed (queue, state, simulators); the answer's JSON."""
    before = h.fingerprint()
    resp = h.call(name, req)
    answer: dict[str, Any] = json.loads(resp.get_body())
    assert resp.status_code == status, answer
    assert h.fingerprint() == before
    return answer


def accepted(h: Harness, name: str, req: func.HttpRequest) -> dict[str, Any]:
    resp = h.call(name, req)
    answer: dict[str, Any] = json.loads(resp.get_body())
    assert resp.status_code in (200, 202), answer
    return answer


def queued_ids(h: Harness) -> list[str]:
    return [mid for mid, _ in h.fingerprint()["queue"]]


# --------------------------------------------------------------------------------- defect 1: deep JSON


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(("name", "body", "content_type"), [
    ("dataverse_webhook", DEEP.encode(), "application/json"),
    ("fno_webhook", DEEP.encode(), "application/json"),
    ("salesforce_webhook", DEEP.encode(), "application/json"),
    ("sap_webhook", DEEP.encode(), "application/json"),
    ("arcgis_webhook", DEEP.encode(), "application/json"),
    ("arcgis_webhook", samples.form_encoded(DEEP), "application/x-www-form-urlencoded"),
    ("sap_webhook", ('{"a":' * 100_000 + "1" + "}" * 100_000).encode(), "application/json"),
], ids=["dataverse", "fno", "salesforce", "sap", "arcgis", "arcgis-form", "sap-objects"])
def test_deeply_nested_json_is_a_400_naming_the_limit(harness: Harness, name: str, body: bytes,
                                                      content_type: str) -> None:
    answer = refused(harness, name, post(name, body, content_type))
    assert answer["error"] == "ENVELOPE_INVALID"
    assert "deeper than 64 levels" in answer["detail"]


def test_a_body_over_the_size_limit_is_a_400(harness: Harness) -> None:
    body = json.dumps(["x" * (4 * 1024 * 1024)]).encode()
    for name in ROUTES:
        answer = refused(harness, name, post(name, body))
        assert "too large" in answer["detail"], name


# ---------------------------------------------------------------------------- defect 2: wrong JSON types


def _dataverse_with(attribute: dict[str, Any]) -> dict[str, Any]:
    body = samples.dataverse_body()
    body["InputParameters"][0]["value"]["Attributes"].append(attribute)
    return body


OPTION_SETS = "OptionSetValueCollection:http://schemas.microsoft.com/xrm/2011/Contracts"


@pytest.mark.parametrize(("name", "body", "field"), [
    ("sap_webhook", [7], "[0]: expected a JSON object"),
    ("sap_webhook", [samples.sap_event(), None], "[1]: expected a JSON object"),
    ("sap_webhook", {**samples.sap_event(), "source": {"not": "text"}}, "source"),
    ("dataverse_webhook", _dataverse_with({"key": "dot_codes", "value": {"__type": OPTION_SETS, "Values": 5}}),
     "'dot_codes' OptionSetValueCollection"),
    ("dataverse_webhook", _dataverse_with({"key": "dot_codes", "value": {"__type": OPTION_SETS,
                                                                          "Values": [{"Value": "x"}]}}),
     "'dot_codes' OptionSetValueCollection"),
    ("dataverse_webhook", {**samples.dataverse_body(), "CorrelationId": ["a"]}, "CorrelationId"),
    ("fno_webhook", {**samples.fno_event(), "Account": {"id": "US-001"}}, "Account"),
    ("fno_webhook", {**samples.fno_event(), "EventTime": 1697470966000}, "EventTime"),
    ("salesforce_webhook", [{"payload": {"ChangeEventHeader": {**samples.salesforce_event()["payload"][
        "ChangeEventHeader"], "commitTimestamp": [1]}}}], "commitTimestamp"),
    ("salesforce_webhook", {**samples.salesforce_event(), "payload": [1]}, "payload"),
], ids=["sap-number", "sap-null", "sap-source", "dv-codes-number", "dv-codes-text", "dv-correlation", "fno-account",
        "fno-event-time", "sf-commit-time", "sf-payload"])
def test_a_wrong_json_type_is_a_400_naming_the_field(harness: Harness, name: str, body: Any, field: str) -> None:
    answer = refused(harness, name, post(name, body))
    assert answer["error"] == "ENVELOPE_INVALID"
    assert field in answer["detail"]


@pytest.mark.parametrize(("name", "body", "field"), [
    ("salesforce_webhook", {**samples.salesforce_event(), "payload": {"ChangeEventHeader": {
        **samples.salesforce_event()["payload"]["ChangeEventHeader"], "commitTimestamp": 10**20}}}, "in range"),
    ("fno_webhook", {**samples.fno_event(), "EventTime": "/Date(99999999999999999)/"}, "in range"),
    ("dataverse_webhook", {**samples.dataverse_body(), "OperationCreatedOn": "/Date(99999999999999999)/"},
     "in range"),
    ("sap_webhook", {**samples.sap_event(), "time": "/Date(99999999999999999)/"}, "in range"),
    ("dataverse_webhook", b'{"MessageName": NaN}', "not valid JSON"),
    ("sap_webhook", b'{"type": "\\ud800"}', "lone UTF-16 surrogate"),
], ids=["sf-commit-time", "fno-event-time", "dv-created-on", "sap-time", "nan", "lone-surrogate"])
def test_a_value_out_of_range_is_a_400(harness: Harness, name: str, body: Any, field: str) -> None:
    answer = refused(harness, name, post(name, body))
    assert field in answer["detail"]


# ------------------------------------------------------------------------------ defect 3: ArcGIS values


def _survey(**feature: Any) -> dict[str, Any]:
    body = samples.survey123_body()
    body["feature"].update(feature)
    return body


@pytest.mark.parametrize(("body", "field"), [
    ([{**samples.feature_service_body()[0], "lastUpdatedTime": 10**20}], "lastUpdatedTime"),
    ([{**samples.feature_service_body()[0], "layerId": "9" * 400}], "layerId"),
    ({**samples.survey123_body(), "userInfo": "surveyor1"}, "userInfo"),
    (_survey(geometry={"x": 1.0, "y": 2.0, "spatialReference": 4326}), "geometry.spatialReference"),
    (_survey(geometry="POINT (1 2)"), "geometry"),
    (_survey(attachments={"photo": 5}), "attachments.photo"),
    (_survey(attachments={"photo": [{"id": 1, "size": "big"}]}), "size"),
    (_survey(attributes={"GlobalID": "{8A1B2C3D-0000-4000-8000-000000000001}", "EditDate": 10**20}), "EditDate"),
], ids=["last-updated", "layer-id", "user-info", "spatial-reference", "geometry-text", "attachments", "size",
        "edit-date"])
def test_arcgis_webhook_values_are_a_400_naming_the_field(harness: Harness, body: Any, field: str) -> None:
    answer = refused(harness, "arcgis_webhook", post("arcgis_webhook", body))
    assert answer["error"] == "ENVELOPE_INVALID"
    assert field in answer["detail"]


def test_a_malformed_point_is_accepted_without_a_geometry(harness: Harness) -> None:
    # x/y that are not numbers (null or "NaN" points from some clients) are harmless: no geometry.
    answer = accepted(harness, "arcgis_webhook", post("arcgis_webhook", _survey(geometry={"x": None, "y": None})))
    assert answer["queued"] == 1


# --------------------------------------------------------------------- defect 6: dedup after the enqueue


def test_fno_event_refused_on_a_failed_read_is_processed_on_the_retry(harness: Harness) -> None:
    event = samples.fno_event("US-001", control=4242)
    harness.box.fno.faults.fail_next(4, 503, "CustomersV3")  # every in-call retry fails
    answer = refused(harness, "fno_webhook", post("fno_webhook", event), 503)
    assert answer["error"] == "TRANSIENT"
    harness.box.fno.faults.clear()
    answer = accepted(harness, "fno_webhook", post("fno_webhook", event))
    assert (answer["accepted"], answer["queued"], answer["skipped"]) == (1, 1, 0)
    again = accepted(harness, "fno_webhook", post("fno_webhook", event))  # a duplicate after success is dropped
    assert (again["skipped"], again["queued"]) == (1, 0)


def test_fno_event_for_a_record_not_readable_yet_is_processed_on_the_retry(harness: Harness) -> None:
    event = samples.fno_event("US-002", control=4343)
    harness.box.fno.faults.fail_next(1, 404, "CustomersV3")
    refused(harness, "fno_webhook", post("fno_webhook", event), 400)
    assert accepted(harness, "fno_webhook", post("fno_webhook", event))["queued"] == 1


def test_fno_delivery_with_one_unreadable_event_changes_nothing(harness: Harness) -> None:
    events = [samples.fno_event("US-001", control=4444), samples.fno_event("NO-SUCH", control=4445)]
    refused(harness, "fno_webhook", post("fno_webhook", events), 400)
    assert accepted(harness, "fno_webhook", post("fno_webhook", events[:1]))["queued"] == 1


def test_sap_event_refused_on_a_failed_read_is_processed_on_the_retry(harness: Harness) -> None:
    event = samples.sap_event("4000001")
    harness.box.sap.faults.fail_next(4, 503, path_contains="A_SalesOrder")
    refused(harness, "sap_webhook", post("sap_webhook", event), 503)
    harness.box.sap.faults.clear()
    answer = accepted(harness, "sap_webhook", post("sap_webhook", event))
    assert (answer["accepted"], answer["queued"]) == (1, 1)
    assert accepted(harness, "sap_webhook", post("sap_webhook", event))["skipped"] == 1


def test_sap_event_for_a_record_not_readable_is_refused_and_remembered_nowhere(harness: Harness) -> None:
    event = samples.sap_event("4999999")
    answer = refused(harness, "sap_webhook", post("sap_webhook", event), 400)
    assert "cannot be read" in answer["detail"]


def test_salesforce_event_refused_for_our_credentials_is_processed_on_the_retry(
        harness: Harness, box: tuple[Sandbox, dict[str, Any]]) -> None:
    event = samples.salesforce_event(box[1]["salesforce"]["Account"][0], replay=777)
    harness.box.sf.faults.reject_sessions = True
    try:
        answer = refused(harness, "salesforce_webhook", post("salesforce_webhook", event), 503)
    finally:
        harness.box.sf.faults.reject_sessions = False
    assert answer["error"] == "AUTH_FAILED"
    answer = accepted(harness, "salesforce_webhook", post("salesforce_webhook", event))
    assert answer["accepted"] == 1
    assert answer["queued"] == 2  # the Account feeds two flows (Customer 360, lead-to-cash)


def test_a_queue_that_cannot_take_the_event_is_a_503_and_nothing_is_remembered(harness: Harness) -> None:
    harness.loop.run_until_complete(harness.services.queue.close())  # the queue is down
    refused(harness, "fno_webhook", post("fno_webhook", samples.fno_event(control=4646)), 503)


# -------------------------------------------------------------- defect 7: direct writes never refused


def _sign_change(h: Harness, name: str) -> dict[str, Any]:
    row = next(r for r in h.box.dv.all("dot_signassets") if r["dot_mutcdcode"])
    values = {**samples.sign_values(row), "dot_name": name, "modifiedon": "/Date(1796625339291)/"}
    return samples.dataverse_body(key=row["dot_signassetid"], values=values)


def test_direct_write_refused_for_credentials_is_queued_with_a_delay_not_refused(harness: Harness) -> None:
    harness.box.ag.faults.fail_next(2, 498, "applyEdits")  # the token is rejected, and again after a refresh
    answer = accepted(harness, "dataverse_webhook", post("dataverse_webhook", _sign_change(harness, "auth trouble")))
    assert answer["queued"] == 1
    assert answer["statuses"] == {"failed": 1}
    depth = harness.loop.run_until_complete(harness.services.queue.depth())
    assert (depth.active, depth.scheduled) == (0, 1)  # retried later with a delay, not dead-lettered now


def test_dataverse_metadata_refused_for_credentials_still_takes_the_change(harness: Harness) -> None:
    harness.box.dv.faults.fail_next(2, 401, "EntityDefinitions")
    answer = accepted(harness, "dataverse_webhook", post("dataverse_webhook", _sign_change(harness, "metadata 401")))
    assert answer["written"] + answer["queued"] == 1


def test_direct_write_with_the_queue_down_is_a_503(harness: Harness) -> None:
    harness.box.ag.faults.fail_next(2, 498, "applyEdits")
    harness.loop.run_until_complete(harness.services.queue.close())
    answer = json.loads(harness.call("dataverse_webhook", post("dataverse_webhook", _sign_change(
        harness, "queue down"))).get_body())
    assert answer["error"] == "TRANSIENT"
    assert "inbound queue is unavailable" in answer["detail"]


def test_a_fault_of_ours_is_a_500_with_a_correlation_id_in_the_body_and_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="syncline.triggers"):
        resp = error_response(RuntimeError("boom"))
    assert resp.status_code == 500
    correlation_id = json.loads(resp.get_body())["correlation_id"]
    assert correlation_id
    assert any(correlation_id in r.getMessage() for r in caplog.records)


def test_a_long_event_id_is_deduplicated_by_its_digest(harness: Harness) -> None:
    event = samples.sap_event("4000001", event_id="e" * 5000)  # state stores bound their key sizes (Azure: 1 KiB)
    assert accepted(harness, "sap_webhook", post("sap_webhook", event))["accepted"] == 1
    assert accepted(harness, "sap_webhook", post("sap_webhook", event))["skipped"] == 1
    with sqlite3.connect(harness.state_dir / "state.db") as conn:
        keys = [k for (k,) in conn.execute("SELECT key FROM dedup WHERE namespace = 'sap-event'")]
    assert keys == ["sha256:" + hashlib.sha256(b"e" * 5000).hexdigest()]


@pytest.mark.parametrize(("name", "header", "value"), [
    ("fno_webhook", "x-syncline-key", "\ud800"),
    ("arcgis_webhook", "x-esriHook-Signature", "sha256=é"),
], ids=["lone-surrogate-secret", "non-ascii-signature"])
def test_odd_credentials_are_a_401(harness: Harness, name: str, header: str, value: str) -> None:
    req = post(name, samples.fno_event() if name == "fno_webhook" else samples.feature_service_body())
    headers = {k: v for k, v in req.headers.items() if k != "x-syncline-key"}
    odd = func.HttpRequest(method="POST", url=req.url, headers={**headers, header: value}, params={},
                           route_params={}, body=req.get_body())
    refused(harness, name, odd, 401)
