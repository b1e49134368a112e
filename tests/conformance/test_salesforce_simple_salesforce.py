"""Salesforce simulator driven by simple-salesforce, an independent client (Syncline's connector is not involved).

simple-salesforce in "direct" mode (session_id + instance_url, a custom requests.Session trusting the test CA) builds
every URL itself from the REST API's layout; its exceptions map status codes (400 -> SalesforceMalformedRequest,
300 -> SalesforceMoreThanOneRecord, 404 -> SalesforceResourceNotFound).
"""

from __future__ import annotations

import pytest
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceMalformedRequest, SalesforceResourceNotFound

from tests.conformance import _salesforce_fixtures as fx
from tests.conformance._salesforce_fixtures import VERSION, Rest, SalesforceOrg

pytestmark = pytest.mark.integration

sf_org, rest = fx.sf_org, fx.rest


@pytest.fixture
def sf(rest: Rest) -> Salesforce:
    return Salesforce(instance_url=rest.instance_url, session_id=rest.token, version=VERSION, session=rest.session)


def test_query_on_an_undeployed_custom_field_raises_instead_of_matching_nothing(sf: Salesforce) -> None:
    sf.Account.create({"Name": "Ridgeway Tooling", "Dynamics_Account__c": "ACC-1"})
    assert sf.query("SELECT Id FROM Account WHERE Dynamics_Account__c = 'ACC-1'")["totalSize"] == 1
    with pytest.raises(SalesforceMalformedRequest) as caught:
        sf.query("SELECT Id FROM Account WHERE Dynamics_Acount__c = 'ACC-1'")
    assert caught.value.status == 400
    [error] = caught.value.content
    assert error["errorCode"] == "INVALID_FIELD"
    assert "No such column 'Dynamics_Acount__c' on entity 'Account'" in error["message"]


def test_describe_and_writes_agree(sf: Salesforce) -> None:
    names = {o["name"] for o in sf.describe()["sobjects"]}
    assert {"Account", "Contact", "Opportunity", "Order", "OrderItem"} <= names
    fields = {f["name"]: f for f in sf.Account.describe()["fields"]}
    ext = [n for n, f in fields.items() if f["externalId"]]
    assert sorted(ext) == ["Dynamics_Account__c", "Dynamics_CRM_Id__c"]
    assert sf.Account.metadata()["objectDescribe"]["name"] == "Account"
    created = sf.Account.create({"Name": "Keystone Automation", "Phone": "+1 412 555 0101"})
    assert created["success"] is True
    assert sf.Account.get(created["id"])["Phone"] == "+1 412 555 0101"
    with pytest.raises(SalesforceMalformedRequest) as caught:
        sf.Account.update(created["id"], {"Phone_Number__c": "x"})
    assert caught.value.content[0]["errorCode"] == "INVALID_FIELD"
    with pytest.raises(SalesforceResourceNotFound):
        sf.Account.upsert("Name/Keystone", {"Phone": "x"})  # Name is not an External ID


def test_upsert_by_external_id_then_query_all_pages(sf: Salesforce, sf_org: SalesforceOrg) -> None:
    assert sf.Account.upsert("Dynamics_Account__c/ACC-9", {"Name": "Summit Fabrication"}) == 201
    assert sf.Account.upsert("Dynamics_Account__c/ACC-9", {"Name": "Summit Fabrication Inc."}) == 200
    for i in range(2100):
        sf_org.sim.ui_create("Account", {"Name": f"Bulk {i:04d}"})
    everything = sf.query_all("SELECT Id, Name FROM Account")  # follows nextRecordsUrl (2,000 a page)
    assert everything["totalSize"] == 2101
    assert len(everything["records"]) == 2101


def test_composite_and_collections_through_restful(sf: Salesforce) -> None:
    out = sf.restful("composite", method="POST", json={"allOrNone": True, "compositeRequest": [
        {"method": "POST", "url": f"/services/data/v{VERSION}/sobjects/Account", "referenceId": "acct",
         "body": {"Name": "Harbor Point Machine Works"}},
        {"method": "POST", "url": f"/services/data/v{VERSION}/sobjects/Contact", "referenceId": "person",
         "body": {"LastName": "Okafor", "AccountId": "@{acct.id}"}}]})
    assert [r["httpStatusCode"] for r in out["compositeResponse"]] == [201, 201]
    results = sf.restful("composite/sobjects", method="POST", json={"allOrNone": True, "records": [
        {"attributes": {"type": "Contact"}, "LastName": "Novak"},
        {"attributes": {"type": "Contact"}}]})  # no LastName: the whole call is rolled back
    assert [r["success"] for r in results] == [False, False]
    assert results[1]["errors"][0]["statusCode"] == "REQUIRED_FIELD_MISSING"
    assert sf.query("SELECT Id FROM Contact")["totalSize"] == 1
