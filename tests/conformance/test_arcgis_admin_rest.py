"""The simulator's layer admin API (addToDefinition, updateDefinition) driven by raw REST calls from Esri's reference.

Sources (developers.arcgis.com/rest/services-reference/online/): "Add To Definition (Feature Layer)" and "Update
Definition (Feature Layer)": POST `https://<host>/<org>/ArcGIS/rest/admin/services/<service>/FeatureServer/<layer>/
addToDefinition` (or `/updateDefinition`) with the JSON in the parameter of the same name and `f=json`; answers
`{"success": true}`, or HTTP 200 `{"error": {"code": 400, "message", "details": ["Unable to add feature service layer
definition."]}}` ("Unable to update feature service layer definition." for updates). Example six of Update Definition
sets a field's domain and alias with `{"fields": [{"name": ..., "domain": {...}, "alias": ...}]}`.
Esri's `arcgis` package drives the same endpoints in test_arcgis_package_admin.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.arcgis.definitions import ADD_FAILED, UPDATE_FAILED
from tests.conformance import _arcgis_fixtures as fx
from tests.conformance._arcgis_fixtures import FeatureService

pytestmark = pytest.mark.integration

service = fx.service

WORK_ORDERS, ASSIGNMENTS = 1, 3
POINT = {"x": -93.0936, "y": 44.9537, "spatialReference": {"wkid": 4326}}
PRIORITY = {"type": "codedValue", "name": "Priority",
            "codedValues": [{"name": "Low", "code": 1}, {"name": "Normal", "code": 2}]}


def admin_url(service: FeatureService, layer: int, op: str = "") -> str:
    base = service.url.replace("/rest/services/", "/rest/admin/services/")
    return f"{base}/{layer}" + (f"/{op}" if op else "")


def admin(service: FeatureService, layer: int, op: str, definition: Any) -> dict[str, Any]:
    text = definition if isinstance(definition, str) else json.dumps(definition)
    answer = service.http.post(admin_url(service, layer, op), data={op: text, "f": "json", "token": service.token})
    assert answer.status_code == 200  # the service answers refusals with HTTP 200 and an error body
    body: dict[str, Any] = answer.json()
    return body


def field(service: FeatureService, layer: int, name: str) -> dict[str, Any] | None:
    return next((f for f in service.layer(layer)["fields"] if f["name"] == name), None)


def test_admin_layer_resource_is_the_definition_with_admin_layer_info(service: FeatureService) -> None:
    body = service.http.get(admin_url(service, ASSIGNMENTS), params={"f": "json", "token": service.token}).json()
    assert body["name"] == "Assignments"
    assert body["adminLayerInfo"]["geometryField"]["name"] == "Shape"
    assert [f["name"] for f in body["fields"]] == [f["name"] for f in service.layer(ASSIGNMENTS)["fields"]]
    root = service.url.replace("/rest/services/", "/rest/admin/services/")
    assert service.http.get(root, params={"f": "json", "token": service.token}).json()["adminServiceInfo"] == \
        {"name": "DOT_Signs", "type": "FeatureServer", "status": "Started"}


def test_add_to_definition_adds_a_field_that_the_layer_serves_and_stores(service: FeatureService) -> None:
    new = {"name": "CREW_NOTE", "type": "esriFieldTypeString", "alias": "Crew note", "length": 120,
           "nullable": True, "editable": True}
    assert admin(service, ASSIGNMENTS, "addToDefinition", {"fields": [new]}) == {"success": True}
    served = field(service, ASSIGNMENTS, "CREW_NOTE")
    assert served is not None
    assert (served["type"], served["alias"], served["length"], served["domain"]) == \
        ("esriFieldTypeString", "Crew note", 120, None)
    body = service.apply_edits(ASSIGNMENTS, adds=json.dumps([{"attributes": {"CREW_NOTE": "bring a ladder"},
                                                              "geometry": POINT}]))
    [added] = body["addResults"]
    assert added["success"] is True
    rows = service.query(ASSIGNMENTS, where="CREW_NOTE = 'bring a ladder'", outFields="CREW_NOTE")["features"]
    assert [r["attributes"]["CREW_NOTE"] for r in rows] == ["bring a ladder"]


@pytest.mark.parametrize(("fields", "detail"), [
    ([{"name": "status", "type": "esriFieldTypeInteger"}], "Field 'status' already exists in layer 'Assignments'."),
    ([{"name": "STATUS", "type": "esriFieldTypeInteger"}], "Field 'STATUS' already exists in layer 'Assignments'."),
    ([{"name": "A1", "type": "esriFieldTypeString"}, {"name": "a1", "type": "esriFieldTypeString"}],
     "Field 'a1' already exists in layer 'Assignments'."),
    ([{"name": "1BAD", "type": "esriFieldTypeString"}], "Invalid field name '1BAD'."),
    ([{"name": "OK1", "type": "esriFieldTypeOID"}], "Field 'OK1': field type 'esriFieldTypeOID' cannot be added."),
    ([{"name": "OK2", "type": "esriFieldTypeString", "length": 0}], "Field 'OK2': invalid length 0."),
    ([{"name": "OK3", "type": "esriFieldTypeInteger",
       "domain": {"type": "codedValue", "name": "D", "codedValues": [{"name": "x", "code": "X"}]}}],
     "Field 'OK3' of type esriFieldTypeInteger: code 'X' does not match the field type."),
])
def test_add_to_definition_refuses_a_bad_field_and_adds_nothing(service: FeatureService, fields: list[Any],
                                                                detail: str) -> None:
    before = service.layer(ASSIGNMENTS)["fields"]
    good = {"name": "FIRST_GOOD", "type": "esriFieldTypeDouble"}
    body = admin(service, ASSIGNMENTS, "addToDefinition", {"fields": [good, *fields]})
    assert body == {"error": {"code": 400, "message": ADD_FAILED, "details": [detail]}}
    assert service.layer(ASSIGNMENTS)["fields"] == before  # all or nothing: FIRST_GOOD was not added either


def test_update_definition_sets_a_domain_and_alias_that_persist(service: FeatureService) -> None:
    assert field(service, ASSIGNMENTS, "priority")["domain"] is None  # type: ignore[index]
    body = admin(service, ASSIGNMENTS, "updateDefinition",
                 {"fields": [{"name": "priority", "alias": "Crew priority", "domain": PRIORITY}]})
    assert body == {"success": True}
    served = field(service, ASSIGNMENTS, "priority")
    assert served is not None
    assert served["alias"] == "Crew priority"
    assert served["domain"]["name"] == "Priority"
    assert served["domain"]["codedValues"] == PRIORITY["codedValues"]
    # Adding values is a new domain with more codes; a later update replaces the earlier one.
    more = {**PRIORITY, "codedValues": [*PRIORITY["codedValues"], {"name": "High", "code": 3}]}
    assert admin(service, ASSIGNMENTS, "updateDefinition", {"fields": [{"name": "priority", "domain": more}]}) == \
        {"success": True}
    assert [c["code"] for c in field(service, ASSIGNMENTS, "priority")["domain"]["codedValues"]] == [1, 2, 3]  # type: ignore[index]
    assert admin(service, ASSIGNMENTS, "updateDefinition", {"fields": [{"name": "priority", "domain": None}]}) == \
        {"success": True}
    assert field(service, ASSIGNMENTS, "priority")["domain"] is None  # type: ignore[index]


def test_a_value_outside_a_new_domain_is_still_stored_as_the_hosted_service_does(service: FeatureService) -> None:
    # Domains are not enforced by applyEdits on hosted layers (see test_arcgis_rest.py's sources): provisioning a
    # domain does not make the layer refuse a code outside it.
    admin(service, ASSIGNMENTS, "updateDefinition", {"fields": [{"name": "priority", "domain": PRIORITY}]})
    body = service.apply_edits(ASSIGNMENTS, adds=json.dumps([{"attributes": {"priority": 9}, "geometry": POINT}]))
    assert body["addResults"][0]["success"] is True


@pytest.mark.parametrize(("update", "detail"), [
    ({"name": "NO_SUCH", "domain": PRIORITY}, "Field 'NO_SUCH' does not exist in layer 'Assignments'."),
    ({"name": "workerid", "domain": PRIORITY},
     "Field 'workerid' of type esriFieldTypeString: code 1 does not match the field type."),
    ({"name": "priority", "domain": {**PRIORITY, "codedValues": [{"name": "Low", "code": "LOW"}]}},
     "Field 'priority' of type esriFieldTypeInteger: code 'LOW' does not match the field type."),
    ({"name": "priority", "domain": {**PRIORITY, "codedValues": [{"name": "Big", "code": 2**40}]}},
     "Field 'priority' of type esriFieldTypeInteger: code 1099511627776 does not match the field type."),
    ({"name": "duedate", "domain": PRIORITY}, "Field 'duedate' of type esriFieldTypeDate cannot have a domain."),
    ({"name": "GlobalID", "domain": PRIORITY}, "Field 'GlobalID' of type esriFieldTypeGlobalID cannot have a domain."),
    ({"name": "priority", "domain": {**PRIORITY, "codedValues": [{"name": "a", "code": 1}, {"name": "b", "code": 1}]}},
     "Field 'priority': duplicate code 1."),
    ({"name": "priority", "type": "esriFieldTypeString"}, "Field 'priority': the field type cannot be changed."),
    ({"name": "priority", "length": 10}, "Field 'priority': cannot update length."),
])
def test_update_definition_refuses_what_the_field_cannot_take_and_changes_nothing(
        service: FeatureService, update: dict[str, Any], detail: str) -> None:
    before = service.layer(ASSIGNMENTS)["fields"]
    ok = {"name": "status", "alias": "Changed first"}
    body = admin(service, ASSIGNMENTS, "updateDefinition", {"fields": [ok, update]})
    assert body == {"error": {"code": 400, "message": UPDATE_FAILED, "details": [detail]}}
    assert service.layer(ASSIGNMENTS)["fields"] == before


def test_a_text_code_longer_than_the_field_is_refused(service: FeatureService) -> None:
    # WorkOrders.WORK_TYPE is a String(10).
    domain = {"type": "codedValue", "name": "WorkType", "codedValues": [{"name": "x", "code": "MUCH_TOO_LONG"}]}
    body = admin(service, WORK_ORDERS, "updateDefinition", {"fields": [{"name": "WORK_TYPE", "domain": domain}]})
    assert body["error"]["details"] == ["Field 'WORK_TYPE' of type esriFieldTypeString: code 'MUCH_TOO_LONG' does "
                                        "not match the field type."]


def test_admin_operations_need_post_a_token_and_a_known_layer(service: FeatureService) -> None:
    url = admin_url(service, ASSIGNMENTS, "updateDefinition")
    got = service.http.get(url, params={"f": "json", "token": service.token,
                                        "updateDefinition": json.dumps({"fields": []})}).json()
    assert got["error"]["details"] == ["This operation is only supported via POST."]
    anonymous = service.http.post(url, data={"f": "json", "updateDefinition": "{}"}).json()
    assert anonymous["error"]["code"] == 499
    unknown = service.http.post(admin_url(service, 77, "updateDefinition"),
                                data={"f": "json", "token": service.token, "updateDefinition": "{}"}).json()
    assert unknown["error"]["message"] == "Invalid URL"
    refresh = service.http.post(admin_url(service, ASSIGNMENTS, "refresh"), data={"f": "json", "token": service.token})
    assert refresh.json() == {"success": True}


@pytest.mark.parametrize(("text", "detail"), [
    ("", "'updateDefinition' parameter is required."),
    ("{not json", "Invalid JSON in 'updateDefinition'."),
    ("[]", "'updateDefinition' must be a JSON object."),
    ('{"fields": []}', "'fields' must be a non-empty array."),
    ('{"drawingInfo": {}}', "Definition property not supported by the simulator: drawingInfo."),
])
def test_malformed_definitions_are_400_bodies(service: FeatureService, text: str, detail: str) -> None:
    assert admin(service, ASSIGNMENTS, "updateDefinition", text) == \
        {"error": {"code": 400, "message": UPDATE_FAILED, "details": [detail]}}


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3), max_leaves=12)
field_entries = st.fixed_dictionaries({"name": st.sampled_from(["priority", "status", "workerid", "NEW_F", "x"])},
                                      optional={"type": st.sampled_from(["esriFieldTypeString", "esriFieldTypeInteger",
                                                                         "esriFieldTypeDate", "bogus"]),
                                                "domain": json_values, "alias": json_values, "length": json_values})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["addToDefinition", "updateDefinition"]),
       definition=st.fixed_dictionaries({"fields": st.lists(field_entries, max_size=3)}) | json_values)
def test_any_definition_gets_success_or_an_error_body_never_a_500(service: FeatureService, op: str,
                                                                   definition: Any) -> None:
    body = admin(service, ASSIGNMENTS, op, definition)
    assert body == {"success": True} or (body["error"]["code"] == 400 and body["error"]["details"])
    layer = service.layer(ASSIGNMENTS)
    assert len({f["name"].lower() for f in layer["fields"]}) == len(layer["fields"])  # never a duplicate name


segments = st.lists(st.sampled_from(["3", "0", "77", "²", "٣", "updateDefinition", "addToDefinition", "refresh",
                                     "WebHooks", "x"]) | st.text(min_size=1, max_size=6), min_size=0, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=segments, post=st.booleans())
def test_any_admin_path_answers_json_never_a_500(service: FeatureService, parts: list[str], post: bool) -> None:
    from urllib.parse import quote

    root = service.url.replace("/rest/services/", "/rest/admin/services/")
    url = "/".join([root, *(quote(p, safe="") for p in parts)])
    form = {"f": "json", "token": service.token, "updateDefinition": '{"fields": [{"name": "status"}]}'}
    answer = service.http.post(url, data=form) if post else service.http.get(url, params=form)
    assert answer.status_code == 200
    assert isinstance(answer.json(), dict | list)
