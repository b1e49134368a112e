"""ArcGIS feature-service simulator driven by raw REST calls written from Esri's ArcGIS REST API reference.

Esri's `arcgis` Python package drives the same simulator in test_arcgis_package.py; these requests pin the wire
format that the package hides (error objects, per-edit result codes, domains as served).

Sources (developers.arcgis.com/rest/services-reference/enterprise/):
- "Layer (Feature Service)" (layer-feature-service): `fields[]` with name, type, alias, sqlType, nullable, editable,
  domain, defaultValue, length; "Domain objects" (domain-objects): `{"type": "codedValue", "name",
  "codedValues": [{"name", "code"}]}`.
- "Apply Edits (Feature Service/Layer)" (apply-edits-feature-service-layer) and "Feature service error codes"
  (feature-service-error-codes): 1000 non-specific, 1001 not nullable, 1016 setting of value failed, ...
- Coded-value domains are not enforced by applyEdits: a hosted ArcGIS Online layer answered `success: true` and
  stored a value outside the field's coded-value domain (Esri/arcgis-python-api#818, `edit_features`, which posts
  applyEdits); Esri technical article 000014410 ("Are values beyond a range domain allowed in an attribute table?":
  yes, by design, domains are checked by validation, not on write); ArcGIS Pro's Data Reviewer "Domain check"
  exists because "features may exist that violate both range and coded value domains".
- Errors are HTTP 200 bodies `{"error": {"code", "message", "details"}}` (498 invalid token, 499 token required).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sandbox.arcgis import dot_layers
from tests.conformance import _arcgis_fixtures as fx
from tests.conformance._arcgis_fixtures import FeatureService

pytestmark = pytest.mark.integration

service = fx.service  # a fresh simulator and a raw REST client per test

POINT = {"x": -93.0936, "y": 44.9537, "spatialReference": {"wkid": 4326}}


def add(service: FeatureService, layer: int, attributes: dict[str, Any], **form: Any) -> dict[str, Any]:
    feature = {"attributes": attributes, "geometry": POINT}
    body = service.apply_edits(layer, adds=json.dumps([feature]), **form)
    assert "error" not in body, body
    [result] = body["addResults"]
    return dict(result)


def stored(service: FeatureService, layer: int, object_id: int, field: str) -> Any:
    body = service.query(layer, objectIds=object_id, outFields=field, returnGeometry="false")
    [feature] = body["features"]
    return feature["attributes"][field]


# ------------------------------------------------------------------------------------------- schema


def test_layer_fields_and_domains_are_the_declared_schema(service: FeatureService) -> None:
    for declared in dot_layers():
        body = service.layer(declared.id)
        assert body["name"] == declared.name
        assert body["type"] == ("Table" if declared.geometry_type is None else "Feature Layer")
        fields = {f["name"]: f for f in body["fields"]}
        system = {body["objectIdField"], body["globalIdField"], *body["editFieldsInfo"].values()}
        assert set(fields) == {f.name for f in declared.fields} | system
        for f in declared.fields:
            served = fields[f.name]
            assert {"name", "type", "alias", "sqlType", "nullable", "editable", "domain", "defaultValue"} <= set(served)
            assert (served["type"], served["nullable"], served.get("length")) == (f.type, f.nullable, f.length)
            assert served["domain"] == (dict(f.domain) if f.domain else None)
            if served["domain"] is not None:
                assert served["domain"]["type"] == "codedValue"
                assert all(set(c) == {"name", "code"} for c in served["domain"]["codedValues"])
        assert fields[body["objectIdField"]]["type"] == "esriFieldTypeOID"
        assert fields[body["globalIdField"]]["type"] == "esriFieldTypeGlobalID"


# ------------------------------------------------------------------------------------------- domains


def test_apply_edits_stores_a_value_outside_a_coded_value_domain(service: FeatureService) -> None:
    # SIGN_TYPE has the coded-value domain SignType (REG, WRN, GDE, DIR, RTM); rollbackOnFailure is true by default
    result = add(service, 0, {"ASSET_TAG": "T-1", "SIGN_TYPE": "XYZ", "CONDITION": "BROKEN"})
    assert result["success"] is True
    oid = result["objectId"]
    assert stored(service, 0, oid, "SIGN_TYPE") == "XYZ"
    assert stored(service, 0, oid, "CONDITION") == "BROKEN"
    updated = service.apply_edits(0, updates=json.dumps([{"attributes": {"OBJECTID": oid, "CONDITION": "GONE"}}]),
                                  rollbackOnFailure="true")
    assert updated["updateResults"] == [{"objectId": oid, "uniqueId": oid, "globalId": result["globalId"],
                                         "success": True}]
    assert stored(service, 0, oid, "CONDITION") == "GONE"
    # a numeric coded domain (WorkPriority 1..4) takes 9 just the same
    order = add(service, 1, {"WO_NUMBER": "WO-1", "PRIORITY": 9})
    assert order["success"] is True
    assert stored(service, 1, order["objectId"], "PRIORITY") == 9


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=10))
def test_any_text_of_the_field_length_round_trips_through_a_domain_field(service: FeatureService, value: str) -> None:
    result = add(service, 0, {"ASSET_TAG": "T-h", "CONDITION": value})  # CONDITION: length 10, domain SignCondition
    assert result["success"] is True
    assert stored(service, 0, result["objectId"], "CONDITION") == value


# ------------------------------------------------------------------------------------------- refusals


def test_apply_edits_refuses_what_the_service_refuses(service: FeatureService) -> None:
    edits = [{"attributes": {"ASSET_TAG": None}, "geometry": POINT},  # not nullable
             {"attributes": {"ASSET_TAG": "T-2", "MILEPOST": "far"}, "geometry": POINT},  # a double
             {"attributes": {"ASSET_TAG": "T-3", "SIGN_TYPE": "LONGER"}, "geometry": POINT},  # length 3
             {"attributes": {"ASSET_TAG": "T-4", "NO_SUCH_FIELD": 1}, "geometry": POINT},
             {"attributes": {"ASSET_TAG": "T-5"}, "geometry": POINT}]
    partial = service.apply_edits(0, adds=json.dumps(edits), rollbackOnFailure="false")
    results = partial["addResults"]
    assert [r["success"] for r in results] == [False, False, False, False, True]
    assert [r["error"]["code"] for r in results[:4]] == [1001, 1016, 1016, 1000]
    assert all(r["objectId"] == -1 and r["error"]["description"] for r in results[:4])
    # with rollbackOnFailure=true (the default) one failure applies nothing; the answer is an error object
    rolled = service.apply_edits(0, adds=json.dumps(edits))
    assert rolled["error"]["code"] == 400
    assert service.query(0, where="1=1", returnCountOnly="true") == {"count": 1}


def test_errors_are_http_200_error_objects(service: FeatureService) -> None:
    answer = service.http.post(f"{service.url}/0/query", data={"f": "json", "token": service.token,
                                                               "where": "NO_SUCH_FIELD = 1"})
    assert answer.status_code == 200
    assert answer.json()["error"]["code"] == 400
    expired = service.http.post(f"{service.url}/0/query", data={"f": "json", "token": "nope", "where": "1=1"})
    assert (expired.status_code, expired.json()["error"]["code"]) == (200, 498)
    missing = service.http.post(f"{service.url}/0/query", data={"f": "json", "where": "1=1"})
    assert missing.json()["error"]["code"] == 499


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["attributes", "geometry", "ASSET_TAG", "SIGN_TYPE", "MILEPOST",
                                                "GlobalID", "OBJECTID", "x", "y", "spatialReference", "wkid"]),
                               inner, max_size=4), max_leaves=10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(part=st.sampled_from(["adds", "updates", "deletes"]), value=json_values | st.text(max_size=30),
       global_ids=st.booleans(), rollback=st.booleans())
# found by CI: `[Infinity]` (Python's json.dumps of inf) made int() overflow in the simulator
@example(part="deletes", value=[float("inf")], global_ids=False, rollback=False)
@example(part="deletes", value="[1e400]", global_ids=False, rollback=False)
@example(part="deletes", value=[1.5], global_ids=False, rollback=True)
@example(part="adds", value='[{"attributes": {"MILEPOST": NaN}}]', global_ids=False, rollback=False)
def test_whatever_a_client_posts_to_apply_edits_is_an_answer_not_a_crash(
        service: FeatureService, part: str, value: object, global_ids: bool, rollback: bool) -> None:
    raw = value if isinstance(value, str) else json.dumps(value)
    answer = service.http.post(f"{service.url}/0/applyEdits", data={
        "f": "json", "token": service.token, part: raw, "useGlobalIds": str(global_ids).lower(),
        "rollbackOnFailure": str(rollback).lower()})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert "error" in body or {"addResults", "updateResults", "deleteResults"} <= set(body)


@pytest.mark.parametrize("raw", ["[Infinity]", "[-Infinity]", "[NaN]", "[1e400]"])
def test_a_number_json_cannot_hold_is_invalid_json_and_deletes_nothing(service: FeatureService, raw: str) -> None:
    """RFC 8259 §6: NaN and infinities are not JSON numbers; Python's json module reads them, ArcGIS does not."""
    before = service.sim.all(0)
    body = service.apply_edits(0, deletes=raw)
    assert body["error"]["code"] == 400
    assert body["error"]["details"] == ["Invalid JSON in 'deletes'."]
    assert service.sim.all(0) == before


def test_a_fractional_object_id_is_a_failed_delete_not_a_rounded_one(service: FeatureService) -> None:
    oid = add(service, 0, {"ASSET_TAG": "T-1", "SIGN_TYPE": "REG"})["objectId"]
    whole = service.apply_edits(0, deletes=json.dumps([oid + 0.5]))
    assert whole["error"]["details"] == [f"Invalid OBJECTID value {oid + 0.5}. (error 1000)"]
    body = service.apply_edits(0, deletes=json.dumps([oid + 0.5]), rollbackOnFailure="false")
    assert body["deleteResults"][0]["success"] is False
    assert body["deleteResults"][0]["error"]["code"] == 1000
    assert any(f["OBJECTID"] == oid for f in service.sim.all(0))
