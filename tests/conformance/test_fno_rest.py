"""Raw OData v4 requests written from Microsoft's F&O guides against the F&O simulator (no Syncline connector).

Sources: Microsoft Learn "Open Data Protocol (OData)" for finance and operations (service root `/data/`, the
`$metadata` document, keys with dataAreaId, cross-company), the data entity reference pages (Customers V3,
Released products V2, Sales order headers V2) and the Common Data Model pages of the same AOT entities for property
names. ODataLib, which serves `/data`, refuses a property the entity type does not declare with "The property '...'
does not exist on type '...'" (HTTP 400): a typo in a mapping, or an extension field that was not deployed, fails
every write in production, so the simulator refuses it too.
"""

from __future__ import annotations

import string
import xml.etree.ElementTree as ET
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.fno import FinOpsSimulator
from sandbox.fno.schema import ENTITIES, ENUMS, EXTENSION_FIELD
from tests.conformance import _fno_fixtures as fixtures
from tests.conformance._fno_fixtures import FnoEnv, odata_client, serve

fno, fno_http = fixtures.fno, fixtures.fno_http

pytestmark = pytest.mark.integration

EDMX = "{http://docs.oasis-open.org/odata/ns/edmx}"
EDM = "{http://docs.oasis-open.org/odata/ns/edm}"
NEW_CUSTOMER = {"dataAreaId": "usmf", "CustomerAccount": "CONF-001", "OrganizationName": "Conformance Ltd",
                "CustomerGroupId": "10", "SalesCurrencyCode": "USD"}


def _refused_property(resp: httpx.Response, name: str, type_name: str) -> None:
    """400 with the OData error body naming the undeclared property and the entity type."""
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    detail = error.get("innererror", {}).get("message", "") + " " + error["message"]
    assert f"The property '{name}' does not exist on type 'Microsoft.Dynamics.DataEntities.{type_name}'" in detail


def test_post_with_an_unknown_property_is_refused_and_stores_nothing(fno: FnoEnv, fno_http: httpx.Client) -> None:
    before = len(fno.sim.all("CustomersV3"))
    resp = fno_http.post("CustomersV3", json={**NEW_CUSTOMER, "NoSuchField": "x"})
    _refused_property(resp, "NoSuchField", "CustomerV3")
    assert len(fno.sim.all("CustomersV3")) == before
    assert fno.sim.get("CustomersV3", "usmf", "CONF-001") is None


def test_patch_with_an_unknown_property_is_refused_and_changes_nothing(fno: FnoEnv, fno_http: httpx.Client) -> None:
    before = fno.sim.get("CustomersV3", "usmf", "US-001")
    assert before is not None
    resp = fno_http.patch("CustomersV3(dataAreaId='usmf',CustomerAccount='US-001')",
                          json={"OrganizationName": "Renamed", "Organisationname": "typo"})
    _refused_property(resp, "Organisationname", "CustomerV3")
    assert fno.sim.get("CustomersV3", "usmf", "US-001") == before


def test_valid_create_answers_201_with_the_entity_and_a_key_location(fno: FnoEnv, fno_http: httpx.Client) -> None:
    """Writes: POST /data/CustomersV3 -> 201 Created with the entity body, ETag and Location (the key URL)."""
    resp = fno_http.post("CustomersV3", json={**NEW_CUSTOMER, EXTENSION_FIELD: "001000000000001AAA"})
    assert resp.status_code == 201, resp.text
    assert resp.headers["Location"].endswith("/data/CustomersV3(dataAreaId='usmf',CustomerAccount='CONF-001')")
    body = resp.json()
    assert body["@odata.context"].endswith("/data/$metadata#CustomersV3/$entity")
    assert body["@odata.etag"]
    again = fno_http.get("CustomersV3(dataAreaId='usmf',CustomerAccount='CONF-001')")
    assert again.status_code == 200
    assert again.json()[EXTENSION_FIELD] == "001000000000001AAA"


def test_extension_field_is_refused_until_the_extension_is_deployed(sandbox_ca: Any) -> None:
    """`SynclineSalesforceId` is not a standard property: without Syncline's extension deployed F&O refuses every
    write that names it (the reason the installation guide makes deploying the extension a prerequisite)."""
    env = serve(FinOpsSimulator(extensions=False), sandbox_ca)
    try:
        env.sim.insert("CustomerGroups", {"dataAreaId": "usmf", "CustomerGroupId": "10"})
        with odata_client(env) as http:
            resp = http.post("CustomersV3", json={**NEW_CUSTOMER, EXTENSION_FIELD: "001000000000001AAA"})
            _refused_property(resp, EXTENSION_FIELD, "CustomerV3")
            assert env.sim.all("CustomersV3") == []
            select = http.get("CustomersV3", params={"$select": f"CustomerAccount,{EXTENSION_FIELD}"})
            assert select.status_code == 400
            assert "Could not find a property named 'SynclineSalesforceId' on type " \
                   "'Microsoft.Dynamics.DataEntities.CustomerV3'" in select.json()["error"]["message"]
            assert http.post("CustomersV3", json=NEW_CUSTOMER).status_code == 201
            metadata = ET.fromstring(http.get("$metadata").content)
            names = {p.get("Name") for p in metadata.iter(f"{EDM}Property")}
            assert EXTENSION_FIELD not in names
            assert "OrganizationName" in names
    finally:
        env.server.stop()
        env.sim.close()


@pytest.mark.parametrize(("field", "value"), [
    ("CreditLimit", "lots"), ("OrganizationName", 42), ("IsCustomerOnHold", "Maybe"), ("OnHoldStatus", True)])
def test_a_value_of_the_wrong_type_is_refused(fno: FnoEnv, fno_http: httpx.Client, field: str, value: Any) -> None:
    """ODataLib reads the body against the declared Edm types (and enum members) before F&O sees it."""
    resp = fno_http.post("CustomersV3", json={**NEW_CUSTOMER, field: value})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["innererror"]["type"] == "Microsoft.OData.ODataException"
    assert fno.sim.get("CustomersV3", "usmf", "CONF-001") is None


def test_unknown_property_in_query_options_names_the_entity_type(fno_http: httpx.Client) -> None:
    """The type in the message is the entity *type* (CustomerV3), not the entity set (CustomersV3)."""
    for params in ({"$select": "Nope"}, {"$filter": "Nope eq 'x'"}, {"$orderby": "Nope"}):
        resp = fno_http.get("CustomersV3", params=params)
        assert resp.status_code == 400
        assert "on type 'Microsoft.Dynamics.DataEntities.CustomerV3'" in resp.json()["error"]["message"]


def test_metadata_and_service_document_come_from_the_schema(fno: FnoEnv, fno_http: httpx.Client) -> None:
    """`/data/$metadata` is the CSDL of the public entities (namespace Microsoft.Dynamics.DataEntities, keys with
    dataAreaId first, enum types such as NoYes); `/data/` lists the entity sets."""
    resp = fno_http.get("$metadata", headers={"Accept": "application/xml"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(resp.content)
    schema = root.find(f"{EDMX}DataServices/{EDM}Schema")
    assert schema is not None
    assert schema.get("Namespace") == "Microsoft.Dynamics.DataEntities"
    types = {t.get("Name"): t for t in schema.findall(f"{EDM}EntityType")}
    sets = {s.get("Name"): s.get("EntityType") for s in schema.iter(f"{EDM}EntitySet")}
    for entity in ENTITIES.values():
        assert sets[entity.entity_set] == f"Microsoft.Dynamics.DataEntities.{entity.type_name}"
        declared = types[entity.type_name]
        assert tuple(r.get("Name") for r in declared.iter(f"{EDM}PropertyRef")) == entity.keys
        assert {p.get("Name"): p.get("Type") for p in declared.findall(f"{EDM}Property")} == \
            {f.name: f.edm_type for f in entity.fields.values()}
    assert types["CustomerV3"].find(f"{EDM}Property[@Name='{EXTENSION_FIELD}']") is not None
    enums = {e.get("Name"): [m.get("Name") for m in e.findall(f"{EDM}Member")]
             for e in schema.findall(f"{EDM}EnumType")}
    assert enums["NoYes"] == ["No", "Yes"]
    assert enums == {k: list(v) for k, v in ENUMS.items()}
    service = fno_http.get("").json()
    assert {v["name"] for v in service["value"]} == set(ENTITIES)


_DECLARED = {n for e in ENTITIES.values() for n in e.fields}
_UNDECLARED = st.text(string.ascii_letters + "_", min_size=1, max_size=20).filter(lambda n: n not in _DECLARED)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(_UNDECLARED, min_size=1, max_size=3, unique=True),
       value=st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.none()))
def test_any_undeclared_property_is_refused_on_every_entity(fno: FnoEnv, fno_http: httpx.Client,
                                                          names: list[str], value: Any) -> None:
    """Whatever the undeclared names and values, a POST is a 400 naming a property and nothing is stored."""
    for entity in ENTITIES.values():
        before = len(fno.sim.all(entity.entity_set))
        resp = fno_http.post(entity.entity_set, json={"dataAreaId": "usmf", **dict.fromkeys(names, value)})
        assert resp.status_code == 400, resp.text
        assert "does not exist on type" in resp.json()["error"]["innererror"]["message"]
        assert len(fno.sim.all(entity.entity_set)) == before


@pytest.mark.parametrize("number", ["NaN", "Infinity", "1e400"])
def test_a_number_json_cannot_hold_is_a_400_and_creates_nothing(fno_http: httpx.Client, fno: FnoEnv,
                                                               number: str) -> None:
    body = '{"dataAreaId": "usmf", "CustomerAccount": "CONF-NAN", "OrganizationName": "NaN Ltd", ' \
           f'"CustomerGroupId": "10", "SalesCurrencyCode": "USD", "CreditLimit": {number}}}'
    before = len(fno.sim.all("CustomersV3"))
    resp = fno_http.post("CustomersV3", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"] == "The request body is not valid JSON."
    assert len(fno.sim.all("CustomersV3")) == before
