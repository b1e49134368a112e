"""Microsoft's own Dataverse SDK for Python (PowerPlatform-Dataverse-Client) against the Dataverse simulator.

The SDK is Microsoft's client of the Web API (github.com/microsoft/PowerPlatform-DataverseClient-Python); what it
sends is what Microsoft expects the service to accept. Each test names the Microsoft Learn page of the behaviour.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conformance import _dataverse_fixtures as fixtures
from tests.conformance._dataverse_fixtures import DataverseEnv

dataverse_env, dataverse, sdk = fixtures.dataverse_env, fixtures.dataverse, fixtures.sdk

pytestmark = pytest.mark.integration


def _accounts(env: DataverseEnv) -> list[dict[str, Any]]:
    return env.sim.all("accounts")


def test_sdk_create_read_update_delete(sdk: Any, dataverse: DataverseEnv) -> None:
    """learn.microsoft.com/power-apps/developer/data-platform/webapi/create-entity-web-api (204 + OData-EntityId,
    the SDK reads the id from that header), .../retrieve-entity-using-web-api, .../update-delete-entities-using-web-api.
    The SDK first resolves the entity set through EntityDefinitions?$filter=LogicalName eq 'account'."""
    rid = sdk.records.create("account", {"name": "Contoso (sdk)", "telephone1": "555-0100"})
    got = sdk.records.get("account", rid, select=["name", "telephone1"])
    assert got["name"] == "Contoso (sdk)"
    assert got["telephone1"] == "555-0100"
    sdk.records.update("account", rid, {"telephone1": "555-0199"})
    assert dataverse.sim.get("accounts", rid)["telephone1"] == "555-0199"
    sdk.records.delete("account", rid)
    assert dataverse.sim.get("accounts", rid) is None


def test_sdk_refused_unknown_column_is_a_400(sdk: Any, dataverse: DataverseEnv) -> None:
    """webapi/compose-http-requests-handle-errors: an undeclared property is a 400 with an OData error body."""
    from PowerPlatform.Dataverse.core.errors import HttpError

    with pytest.raises(HttpError) as caught:
        sdk.records.create("account", {"name": "x", "nosuchcolumn": 1})
    assert caught.value.status_code == 400
    assert "does not exist on type 'Microsoft.Dynamics.CRM.account'" in str(caught.value)
    assert _accounts(dataverse) == []


def test_sdk_create_list_uses_create_multiple(sdk: Any, dataverse: DataverseEnv) -> None:
    """webapi/reference/createmultiple: POST {set}/Microsoft.Dynamics.CRM.CreateMultiple with `Targets` typed by
    `@odata.type` answers 200 with the created `Ids` (the SDK returns them)."""
    ids = sdk.records.create("account", [{"name": f"Bulk {i}"} for i in range(5)])
    assert len(ids) == 5
    assert len(set(ids)) == 5
    stored = {a["accountid"]: a["name"] for a in _accounts(dataverse)}
    assert stored == {i: f"Bulk {n}" for n, i in enumerate(ids)}


def test_sdk_upsert_many_uses_upsert_multiple_by_alternate_key(sdk: Any, dataverse: DataverseEnv) -> None:
    """webapi/reference/upsertmultiple: items identified by `@odata.id` with an alternate key
    (`accounts(syn_salesforceid='...')`); the first call creates, the second updates the same records."""
    items = [{"alternate_key": {"syn_salesforceid": f"001SDK00000000{i}"}, "record": {"name": f"Upsert {i}"}}
             for i in range(3)]
    sdk.records.upsert("account", items)
    first = {a["syn_salesforceid"]: a["accountid"] for a in _accounts(dataverse)}
    assert len(first) == 3
    sdk.records.upsert("account", [{**item, "record": {"name": f"Renamed {i}"}} for i, item in enumerate(items)])
    after = _accounts(dataverse)
    assert {a["syn_salesforceid"]: a["accountid"] for a in after} == first  # updated, not duplicated
    assert sorted(a["name"] for a in after) == ["Renamed 0", "Renamed 1", "Renamed 2"]


def test_sdk_query_pages_with_page_size(sdk: Any, dataverse: DataverseEnv) -> None:
    """webapi/query/page-results: `Prefer: odata.maxpagesize` and `@odata.nextLink` (the SDK follows it)."""
    dataverse.sim.insert_many("accounts", [{"name": f"Paged {i:02d}"} for i in range(7)])
    pages = list(sdk.records.get("account", select=["name"], page_size=3, count=True))
    assert [len(p) for p in pages] == [3, 3, 1]


def test_sdk_table_metadata_and_alternate_keys(sdk: Any) -> None:
    """webapi/query-metadata-web-api and webapi/define-alternate-key-entity: EntityDefinitions by LogicalName and
    by MetadataId, and the table's Keys with their attributes and index status."""
    info = sdk.tables.get("account")
    assert info is not None
    keys = sdk.tables.get_alternate_keys("account")
    # The served accounts table merges the Customer 360 and SAP specs: one alternate key each.
    assert sorted(k.key_attributes for k in keys) == [["syn_salesforceid"], ["syn_sapbusinesspartner"]]
    assert all(k.status == "Active" for k in keys)
    columns = {c["LogicalName"] for c in sdk.tables.list_columns("account")}
    assert {"accountid", "name", "syn_salesforceid"} <= columns
