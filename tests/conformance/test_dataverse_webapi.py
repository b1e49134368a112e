"""Raw OData v4 requests written from Microsoft's Dataverse Web API guide against the Dataverse simulator.

Every request here is built by hand from the documentation (no Syncline connector, no SDK): what the guide shows
the service accepting must be accepted, and what it refuses must be refused with the same status and error shape.
"""

from __future__ import annotations

import json
import string
import xml.etree.ElementTree as ET
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox.dataverse import EDM, entity_metadata_id
from sandbox.server import RunningServer
from tests.conformance import _dataverse_fixtures as fixtures
from tests.conformance._dataverse_fixtures import DataverseEnv

dataverse_env, dataverse, web_api = fixtures.dataverse_env, fixtures.dataverse, fixtures.web_api

pytestmark = pytest.mark.integration

EDMX = "{http://docs.oasis-open.org/odata/ns/edmx}"
EDM_NS = "{http://docs.oasis-open.org/odata/ns/edm}"
SIGN = {"dot_assettag": "T-1", "dot_mutcdcode": "R1-1", "dot_signtype": 100000000}
ACCOUNT_TYPE = "Microsoft.Dynamics.CRM.account"


def _error(resp: httpx.Response) -> dict[str, Any]:
    """The Web API error shape: {"error": {"code": "0x...", "message": "..."}} (compose-http-requests-handle-errors)."""
    body = resp.json()
    assert set(body) == {"error"}
    assert {"code", "message"} <= set(body["error"])
    return dict(body["error"])


# ------------------------------------------------------------------------------------------------ $metadata


def test_metadata_is_csdl_built_from_the_table_schemas(web_api: httpx.Client, dataverse: DataverseEnv) -> None:
    """webapi/web-api-service-documents ("CSDL $metadata document"): GET /api/data/v9.2/$metadata is the CSDL XML
    of the org, namespace Microsoft.Dynamics.CRM (alias mscrm), each table an EntityType keyed on its primary id,
    lookups as `_x_value` Edm.Guid properties plus single-valued navigation properties, container `System`."""
    resp = web_api.get("$metadata", headers={"Accept": "application/xml"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(resp.content)
    assert root.tag == f"{EDMX}Edmx"
    assert root.get("Version") == "4.0"
    schema = root.find(f"{EDMX}DataServices/{EDM_NS}Schema")
    assert schema is not None
    assert schema.get("Namespace") == "Microsoft.Dynamics.CRM"
    assert schema.get("Alias") == "mscrm"
    types = {t.get("Name"): t for t in schema.findall(f"{EDM_NS}EntityType")}
    for table in dataverse.sim.schema.values():
        entity = types[table.logical_name]
        assert [r.get("Name") for r in entity.findall(f"{EDM_NS}Key/{EDM_NS}PropertyRef")] == [table.primary_id]
        props = {p.get("Name"): p.get("Type") for p in entity.findall(f"{EDM_NS}Property")}
        expected = {table.read_name(c): EDM[t] for c, t in table.columns.items() if c not in table.unreadable}
        assert props == expected
        navs = {n.get("Name"): n.get("Type") for n in entity.findall(f"{EDM_NS}NavigationProperty")}
        for lookup in table.lookups.values():
            for nav in lookup.navs:
                assert nav in navs
    account = types["account"]
    assert {p.get("Name"): p.get("Type") for p in account.findall(f"{EDM_NS}Property")}["_ownerid_value"] == "Edm.Guid"
    sets = {s.get("Name"): s.get("EntityType") for s in schema.findall(f"{EDM_NS}EntityContainer/{EDM_NS}EntitySet")}
    assert sets["accounts"] == ACCOUNT_TYPE
    assert sets["dot_signassets"] == "Microsoft.Dynamics.CRM.dot_signasset"
    actions = {a.get("Name") for a in schema.findall(f"{EDM_NS}Action")}
    assert {"CreateMultiple", "UpdateMultiple", "UpsertMultiple"} <= actions


# ------------------------------------------------------------------------------------------------ $count


def test_count_true_adds_odata_count_of_every_matching_row(web_api: httpx.Client, dataverse: DataverseEnv) -> None:
    """webapi/query/count-rows ("Use $count=true"): `@odata.count` is the number of rows matching the filter,
    whatever `$top` or the page size returns."""
    dataverse.sim.insert_many("accounts", [{"name": f"Count {i:02d}", "telephone1": "1" if i % 2 else "2"}
                                           for i in range(9)])
    resp = web_api.get("accounts", params={"$select": "name", "$filter": "telephone1 eq '1'", "$count": "true"},
                       headers={"Prefer": "odata.maxpagesize=2"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["@odata.count"] == 4
    assert len(body["value"]) == 2
    assert "@odata.nextLink" in body
    top = web_api.get("accounts", params={"$top": "3", "$count": "true"}).json()
    assert top["@odata.count"] == 9
    assert len(top["value"]) == 3
    assert "@odata.count" not in web_api.get("accounts", params={"$top": "1"}).json()
    bad = web_api.get("accounts", params={"$count": "maybe"})
    assert bad.status_code == 400
    assert _error(bad)["message"]


def test_count_caps_at_5000(web_api: httpx.Client, dataverse: DataverseEnv) -> None:
    """webapi/query/count-rows: the count is at most 5,000 for standard tables; whether it is exactly 5,000 or more
    is told by `@Microsoft.Dynamics.CRM.totalrecordcount` / `...totalrecordcountlimitexceeded`, returned only when
    `Prefer: odata.include-annotations` asks for them. `/$count` answers the number as text."""
    dataverse.sim.insert_many("dot_signassets", [{**SIGN, "dot_assettag": f"T-{i}"} for i in range(5001)])
    params = {"$select": "dot_assettag", "$count": "true"}
    body = web_api.get("dot_signassets", params=params, headers={"Prefer": "odata.maxpagesize=1"}).json()
    assert body["@odata.count"] == 5000
    assert "@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded" not in body
    asked = web_api.get("dot_signassets", params=params, headers={"Prefer": (
        'odata.maxpagesize=1,odata.include-annotations="Microsoft.Dynamics.CRM.totalrecordcount,'
        'Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"')}).json()
    assert asked["@Microsoft.Dynamics.CRM.totalrecordcount"] == 5000
    assert asked["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] is True
    dataverse.sim.insert_many("accounts", [{"name": "only"}])
    small = web_api.get("accounts", params={"$count": "true"},
                        headers={"Prefer": 'odata.include-annotations="*"'}).json()
    assert small["@odata.count"] == 1
    assert small["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] is False
    plain = web_api.get("dot_signassets/$count")
    assert plain.status_code == 200
    assert plain.text == "5000"
    few = web_api.get("dot_signassets/$count", params={"$filter": "dot_assettag eq 'T-7'"})
    assert few.text == "1"


# ------------------------------------------------------------------------------------------------ metadata ids


def test_entity_definitions_by_metadata_id_and_keys(web_api: httpx.Client) -> None:
    """webapi/retrieve-metadata-name-metadataid: a table definition is addressed by `EntityDefinitions(<MetadataId>)`
    as well as by `EntityDefinitions(LogicalName='...')`; webapi/define-alternate-key-entity: `.../Keys` lists the
    table's alternate keys (KeyAttributes, EntityKeyIndexStatus)."""
    by_name = web_api.get("EntityDefinitions(LogicalName='dot_signasset')").json()
    metadata_id = by_name["MetadataId"]
    assert metadata_id == entity_metadata_id("dot_signasset")
    by_id = web_api.get(f"EntityDefinitions({metadata_id})")
    assert by_id.status_code == 200
    assert {k: v for k, v in by_id.json().items() if not k.startswith("@")} == \
        {k: v for k, v in by_name.items() if not k.startswith("@")}
    keys = web_api.get(f"EntityDefinitions({metadata_id})/Keys").json()["value"]
    assert sorted(k["KeyAttributes"] for k in keys) == [["dot_arcgisglobalid"], ["dot_assettag"]]
    assert {k["EntityKeyIndexStatus"] for k in keys} == {"Active"}
    same = web_api.get("EntityDefinitions(LogicalName='dot_signasset')/Keys").json()["value"]
    assert same == keys
    one = web_api.get(f"EntityDefinitions({metadata_id})/Keys({keys[0]['MetadataId']})")
    assert one.status_code == 200
    assert one.json()["KeyAttributes"] == keys[0]["KeyAttributes"]
    missing = web_api.get("EntityDefinitions(00000000-0000-0000-0000-000000000001)")
    assert missing.status_code == 404
    assert _error(missing)["message"]
    attributes = web_api.get(f"EntityDefinitions({metadata_id})/Attributes").json()["value"]
    assert "dot_assettag" in {a["LogicalName"] for a in attributes}


# ------------------------------------------------------------------------------------------------ bulk messages


def _targets(*records: dict[str, Any], typ: str = ACCOUNT_TYPE) -> dict[str, Any]:
    return {"Targets": [{"@odata.type": typ, **r} for r in records]}


def test_create_multiple_answers_ids(web_api: httpx.Client, dataverse: DataverseEnv) -> None:
    """webapi/reference/createmultiple: 200 with `@odata.context ...#Microsoft.Dynamics.CRM.CreateMultipleResponse`
    and the `Ids` in order; a target may carry its own primary id."""
    own = "11111111-2222-3333-4444-555555555555"
    resp = web_api.post("accounts/Microsoft.Dynamics.CRM.CreateMultiple",
                        json=_targets({"name": "A"}, {"name": "B", "accountid": own}))
    assert resp.status_code == 200
    body = resp.json()
    assert body["@odata.context"].endswith("$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse")
    assert len(body["Ids"]) == 2
    assert body["Ids"][1] == own
    assert [dataverse.sim.get("accounts", i)["name"] for i in body["Ids"]] == ["A", "B"]


@pytest.mark.parametrize(("payload", "why"), [
    ({"Targets": [{"name": "no type"}]}, "@odata.type"),
    (_targets({"name": "A"}, typ="Microsoft.Dynamics.CRM.contact"), "same type"),
    ({"Targets": []}, "empty"),
    ({"Records": [{"@odata.type": ACCOUNT_TYPE, "name": "A"}]}, "unknown parameter"),
    (_targets({"name": "A"}, {"name": "B", "nosuchcolumn": 1}), "unknown column in the 2nd target"),
    (_targets({"name": "A"}, {"telephone1": "no name"}), "required column missing in the 2nd target"),
])
def test_create_multiple_refusals_change_nothing(web_api: httpx.Client, dataverse: DataverseEnv,
                                                 payload: dict[str, Any], why: str) -> None:
    """webapi/reference/createmultiple ("You must specify the @odata.type annotation with every item in the Targets
    parameter"; records of the same type) and bulk-operations (the operation is one transaction: a failing record
    rolls back every record of the request)."""
    resp = web_api.post("accounts/Microsoft.Dynamics.CRM.CreateMultiple", content=json.dumps(payload))
    assert resp.status_code == 400, why
    assert _error(resp)["message"]
    assert dataverse.sim.all("accounts") == []


def test_bulk_message_on_a_table_without_it_and_wrong_method(web_api: httpx.Client, dataverse: DataverseEnv) -> None:
    """Bulk messages are not available on every table (bulk-operations: "Availability"); an action is POST only."""
    typ = "Microsoft.Dynamics.CRM.serviceendpoint"
    resp = web_api.post("serviceendpoints/Microsoft.Dynamics.CRM.CreateMultiple",
                        json=_targets({"name": "x", "contract": 8}, typ=typ))
    assert resp.status_code == 400
    assert "does not support entities of type 'serviceendpoint'" in _error(resp)["message"]
    assert web_api.get("accounts/Microsoft.Dynamics.CRM.CreateMultiple").status_code == 405
    assert web_api.post("accounts/Microsoft.Dynamics.CRM.NoSuchAction", json={}).status_code == 404


def test_upsert_multiple_by_odata_id_creates_then_updates(web_api: httpx.Client, dataverse: DataverseEnv) -> None:
    """webapi/reference/upsertmultiple: items identified by `@odata.id` with an alternate key; 204 No Content
    (no response body), the same request again updates the records instead of duplicating them."""
    def body(label: str) -> dict[str, Any]:
        return _targets(*({"name": f"{label} {i}", "@odata.id": f"accounts(syn_salesforceid='001UPS00000000{i}')"}
                          for i in range(3)))

    first = web_api.post("accounts/Microsoft.Dynamics.CRM.UpsertMultiple", json=body("First"))
    assert first.status_code == 204
    assert first.content == b""
    ids = {a["syn_salesforceid"]: a["accountid"] for a in dataverse.sim.all("accounts")}
    assert len(ids) == 3
    again = web_api.post("accounts/Microsoft.Dynamics.CRM.UpsertMultiple", json=body("Second"))
    assert again.status_code == 204
    rows = dataverse.sim.all("accounts")
    assert {a["syn_salesforceid"]: a["accountid"] for a in rows} == ids
    assert sorted(a["name"] for a in rows) == ["Second 0", "Second 1", "Second 2"]
    wrong = web_api.post("accounts/Microsoft.Dynamics.CRM.UpsertMultiple",
                         json=_targets({"name": "x", "@odata.id": "accounts(nosuchkey='1')"}))
    assert wrong.status_code == 400
    assert "not valid for resource" in _error(wrong)["message"]


def test_update_multiple_needs_existing_primary_ids(web_api: httpx.Client, dataverse: DataverseEnv) -> None:
    """webapi/reference/updatemultiple: targets carry their primary id; 204; a missing record fails the request."""
    a, b = dataverse.sim.insert("accounts", {"name": "A"}), dataverse.sim.insert("accounts", {"name": "B"})
    ok = web_api.post("accounts/Microsoft.Dynamics.CRM.UpdateMultiple",
                      json=_targets({"accountid": a, "telephone1": "1"}, {"accountid": b, "telephone1": "2"}))
    assert ok.status_code == 204
    assert [dataverse.sim.get("accounts", k)["telephone1"] for k in (a, b)] == ["1", "2"]
    gone = web_api.post("accounts/Microsoft.Dynamics.CRM.UpdateMultiple", json=_targets(
        {"accountid": a, "telephone1": "3"}, {"accountid": "00000000-0000-0000-0000-00000000dead", "name": "x"}))
    assert gone.status_code == 404
    assert dataverse.sim.get("accounts", a)["telephone1"] == "1"  # rolled back with the failing target


_GOOD = st.fixed_dictionaries({"name": st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                                               min_size=1, max_size=40)},
                              optional={"telephone1": st.text(string.digits, max_size=12)})
_BAD = st.sampled_from([{"telephone1": "no name"}, {"name": "x", "nosuchcolumn": 1}, {"name": 5},
                        {"name": "x", "_ownerid_value": "00000000-0000-0000-0000-000000000001"}])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(good=st.lists(_GOOD, max_size=6), bad=st.lists(_BAD, max_size=2), at=st.integers(0, 6))
def test_create_multiple_is_all_or_nothing(web_api: httpx.Client, dataverse: DataverseEnv,
                                           good: list[dict[str, Any]], bad: list[dict[str, Any]], at: int) -> None:
    """bulk-operations: CreateMultiple runs in one transaction. Whatever the mix, either every target is created
    (200, one id each, in order) or the request is refused with a 4xx error body and nothing is created."""
    before = len(dataverse.sim.all("accounts"))
    targets = good[:at] + bad + good[at:]
    resp = web_api.post("accounts/Microsoft.Dynamics.CRM.CreateMultiple", json=_targets(*targets))
    if bad or not targets:
        assert 400 <= resp.status_code < 500, resp.text
        assert _error(resp)["message"]
        assert len(dataverse.sim.all("accounts")) == before
    else:
        assert resp.status_code == 200, resp.text
        ids = resp.json()["Ids"]
        assert [dataverse.sim.get("accounts", i)["name"] for i in ids] == [t["name"] for t in targets]
        assert len(dataverse.sim.all("accounts")) == before + len(targets)


async def test_bulk_messages_fire_the_per_record_create_and_update_steps(web_api: httpx.Client,
                                                                         dataverse: DataverseEnv) -> None:
    """bulk-operations ("Plug-ins"): steps registered on Create and Update also run for each record of
    CreateMultiple / UpsertMultiple, so a webhook subscriber sees one Create per created record and one Update
    per updated record (the remote execution context carries MessageName and the record id)."""
    bodies: list[dict[str, Any]] = []

    async def receive(request: Request) -> Response:
        bodies.append(json.loads(await request.body()))
        return Response(status_code=200)

    inbox = RunningServer(Starlette(routes=[Route("/hook", receive, methods=["POST"])])).start()
    try:
        dataverse.sim.register_webhook(f"{inbox.url}/hook", tables={"accounts"})
        created = web_api.post("accounts/Microsoft.Dynamics.CRM.CreateMultiple",
                               json=_targets({"name": "A", "syn_salesforceid": "001HOOK0000000001"}, {"name": "B"}))
        assert created.status_code == 200
        upsert = web_api.post("accounts/Microsoft.Dynamics.CRM.UpsertMultiple", json=_targets(
            {"name": "A2", "@odata.id": "accounts(syn_salesforceid='001HOOK0000000001')"},
            {"name": "C", "@odata.id": "accounts(syn_salesforceid='001HOOK0000000002')"}))
        assert upsert.status_code == 204
        await dataverse.sim.flush_webhooks()
    finally:
        inbox.stop()
    seen = sorted((b["MessageName"], b["PrimaryEntityId"]) for b in bodies)
    ids = created.json()["Ids"]
    third = next(a["accountid"] for a in dataverse.sim.all("accounts") if a["name"] == "C")
    assert seen == sorted([("Create", ids[0]), ("Create", ids[1]), ("Update", ids[0]), ("Create", third)])


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_number_json_cannot_hold_is_a_400_and_creates_nothing(web_api: httpx.Client, dataverse: DataverseEnv,
                                                               number: str) -> None:
    """RFC 8259 §6: NaN and infinities are not JSON; ODataLib refuses the payload (Python's json module reads it)."""
    resp = web_api.post("accounts", content=f'{{"name": "Not a number", "revenue": {number}}}',
                        headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert "not valid JSON" in _error(resp)["message"]
    assert dataverse.sim.all("accounts") == []
