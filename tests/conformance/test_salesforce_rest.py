"""Salesforce simulator driven by raw REST calls written from Salesforce's REST API Developer Guide (not Syncline).

Sources (developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/):
- "Versions" (resources_versions.htm): `GET /services/data/` lists `{label, url, version}`, no session needed.
- "Status Codes and Error Responses" (errorcodes.htm): errors are a JSON array of `{message, errorCode[, fields]}`.
- SOQL on an unknown column, as real orgs answer it (HTTP 400): mautic/mautic#13406 records
  `[{"message":"\\nselect Id, ...,SF_date__c, ... from\\n    ^\\nERROR at Row:1:Column:35\\nNo such column 'SF_date__c'
  on entity 'Lead'. If you are attempting to use a custom field, be sure to append the '__c' after the custom field
  name. Please reference your WSDL or the describe call for the appropriate names.","errorCode":"INVALID_FIELD"}]`.
- Writes with an unknown field: 400 "No such column 'RecordTypeId' on sobject of type Contact"
  (MinnPost/object-sync-for-salesforce#194).
- "sObject Collections" (resources_composite_sobjects_collections*.htm): `allOrNone` rolls every record back,
  answered HTTP 200 with `ALL_OR_NONE_OPERATION_ROLLED_BACK` on the records that were valid.
- "Composite" (resources_composite_composite_post.htm, requests_composite.htm, responses_composite.htm): up to 25
  subrequests, `@{refId.id}` references, HTTP 200 with `compositeResponse`; with allOrNone=true "all other
  subrequests return the 400 HTTP status code" (PROCESSING_HALTED, message as in salesforce-misc/ReVoman).
- "sObject Describe" (resources_sobject_describe.htm): `fields[]` with name, type, externalId, picklistValues, ...
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.salesforce import schema
from tests.conformance import _salesforce_fixtures as fx
from tests.conformance._salesforce_fixtures import Rest, SalesforceOrg

pytestmark = pytest.mark.integration

# the TLS simulator and a raw REST session per test
sf_org, rest = fx.sf_org, fx.rest

UNKNOWN_COLUMN = re.compile(
    r"^\n(?P<line>.*)\n(?P<pad> *)\^\nERROR at Row:(?P<row>\d+):Column:(?P<col>\d+)\nNo such column '(?P<name>[^']+)' "
    r"on entity '(?P<entity>\w+)'\. If you are attempting to use a custom field, be sure to append the '__c' after "
    r"the custom field name\. Please reference your WSDL or the describe call for the appropriate names\.$")


def account(rest: Rest, **values: object) -> str:
    answer = rest.send("POST", "sobjects/Account", {"Name": "Allegheny Tooling Inc.", **values})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


# ------------------------------------------------------------------------------------------- versions


def test_versions_list_needs_no_session_and_names_the_release(rest: Rest) -> None:
    answer = rest.session.get(f"{rest.instance_url}/services/data/", headers={"Authorization": ""}, timeout=10)
    assert answer.status_code == 200
    versions = answer.json()
    assert all(set(v) == {"label", "url", "version"} for v in versions)
    latest = versions[-1]
    assert latest == {"label": "Spring '25", "url": "/services/data/v63.0", "version": "63.0"}
    assert {"label": "Summer '14", "url": "/services/data/v31.0", "version": "31.0"} in versions
    # every listed version is served
    assert rest.session.get(f"{rest.instance_url}/services/data/v59.0/limits", timeout=10).status_code == 200
    assert rest.session.get(f"{rest.instance_url}/services/data/v99.0/limits", timeout=10).status_code == 404


# ------------------------------------------------------------------------------------------- SOQL


@pytest.mark.parametrize(("soql", "name", "column"), [
    ("SELECT Id, Dynamics_Nope__c FROM Account", "Dynamics_Nope__c", 12),
    # the case: an undeployed custom field in WHERE used to answer 200 with no rows
    ("SELECT Id FROM Account WHERE Dynamics_Nope__c = 'ACC-1'", "Dynamics_Nope__c", 30),
    ("SELECT Id FROM Account ORDER BY Nope ASC", "Nope", 33),
    ("SELECT Id FROM Account WHERE Name = 'x' AND Nope IN ('a', 'b')", "Nope", 45),
])
def test_soql_on_an_unknown_column_is_400_invalid_field_with_the_orgs_message(
        rest: Rest, soql: str, name: str, column: int) -> None:
    account(rest)
    answer = rest.query(soql)
    assert answer.status_code == 400
    [error] = answer.json()
    assert error["errorCode"] == "INVALID_FIELD"
    match = UNKNOWN_COLUMN.match(error["message"])
    assert match is not None, error["message"]
    assert (match["name"], match["entity"], int(match["row"]), int(match["col"])) == (name, "Account", 1, column)
    assert match["line"] == soql
    assert len(match["pad"]) == column - 1  # the caret sits under the column
    assert soql[column - 1:].startswith(name)


def test_soql_on_an_unknown_sobject_is_400_invalid_type(rest: Rest) -> None:
    answer = rest.query("SELECT Id FROM Acount")
    assert answer.status_code == 400
    [error] = answer.json()
    assert error["errorCode"] == "INVALID_TYPE"
    assert "sObject type 'Acount' is not supported." in error["message"]
    assert "ERROR at Row:1:Column:16" in error["message"]


def test_soql_names_are_case_insensitive_and_answered_with_their_api_names(rest: Rest) -> None:
    rid = account(rest, Dynamics_Account__c="ACC-7")
    answer = rest.query("select id, name from ACCOUNT where dynamics_account__c = 'acc-7' order by NAME")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["totalSize"] == 1
    assert body["done"] is True
    [record] = body["records"]
    assert record["attributes"]["type"] == "Account"
    assert record["attributes"]["url"] == f"/services/data/v63.0/sobjects/Account/{rid}"
    assert record["Id"] == rid
    assert record["Name"] == "Allegheny Tooling Inc."


def test_parent_fields_one_level_up_are_queried_and_nested(rest: Rest) -> None:
    # "Relationship Queries" (SOQL and SOSL Reference): child-to-parent paths use the relationship name
    parent = account(rest, Dynamics_Account__c="ACC-1")
    rest.send("POST", "sobjects/Contact", {"LastName": "Baker", "AccountId": parent})
    rest.send("POST", "sobjects/Contact", {"LastName": "Orphan"})
    answer = rest.query("SELECT LastName, Account.Name, account.dynamics_account__c FROM Contact "
                        "WHERE Account.Name != null ORDER BY Account.Name")
    assert answer.status_code == 200, answer.text
    [record] = answer.json()["records"]
    assert record["Account"] == {"attributes": {"type": "Account",
                                                "url": f"/services/data/v63.0/sobjects/Account/{parent}"},
                                 "Name": "Allegheny Tooling Inc.", "Dynamics_Account__c": "ACC-1"}
    orphan = rest.query("SELECT Account.Name FROM Contact WHERE LastName = 'Orphan'").json()["records"][0]
    assert orphan["Account"] is None
    for soql, code in (("SELECT Owner.Name FROM Contact", "INVALID_FIELD"),
                       ("SELECT Account.Nope__c FROM Contact", "INVALID_FIELD")):
        bad = rest.query(soql)
        assert bad.status_code == 400
        assert bad.json()[0]["errorCode"] == code
    assert "Didn't understand relationship 'Owner' in field path." in rest.query(
        "SELECT Owner.Name FROM Contact").json()[0]["message"]


field_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,30}", fullmatch=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=field_names)
def test_any_column_name_is_either_a_describe_field_or_a_400(rest: Rest, name: str) -> None:
    known = {f["name"].lower() for f in rest.get("sobjects/Contact/describe").json()["fields"]}
    keywords = {"from", "where", "order", "limit", "select", "and", "or", "not", "in", "like", "by", "asc", "desc",
                "null", "true", "false"}
    if name.lower() in keywords:
        return
    for soql in (f"SELECT Id, {name} FROM Contact", f"SELECT Id FROM Contact WHERE {name} = null"):
        answer = rest.query(soql)
        if name.lower() in known:
            assert answer.status_code == 200, answer.text
        else:
            assert answer.status_code == 400
            assert answer.json()[0]["errorCode"] == "INVALID_FIELD"


# ------------------------------------------------------------------------------------------- describe


def test_describe_is_served_from_the_declared_schema(rest: Rest) -> None:
    answer = rest.get("sobjects/Account/describe")
    assert answer.status_code == 200
    body = answer.json()
    assert (body["name"], body["keyPrefix"], body["queryable"]) == ("Account", "001", True)
    fields = {f["name"]: f for f in body["fields"]}
    declared = schema.BY_NAME["Account"]
    assert set(fields) == {*schema.SYSTEM_NAMES, *(f.name for f in declared.fields)}
    ext = fields["Dynamics_Account__c"]
    assert (ext["type"], ext["externalId"], ext["idLookup"], ext["custom"], ext["nillable"]) == (
        "string", True, True, True, True)
    name = fields["Name"]
    assert (name["type"], name["length"], name["nillable"], name["soapType"]) == ("string", 255, False, "xsd:string")
    terms = fields["Payment_Terms__c"]
    assert terms["restrictedPicklist"] is True
    assert [v["value"] for v in terms["picklistValues"]] == list(schema.PAYMENT_TERMS)
    assert fields["Id"]["createable"] is False
    line = {f["name"]: f for f in rest.get("sobjects/OpportunityLineItem/describe").json()["fields"]}
    assert (line["TotalPrice"]["calculated"], line["TotalPrice"]["createable"]) == (True, False)
    assert (line["OpportunityId"]["referenceTo"], line["OpportunityId"]["relationshipName"]) == (
        ["Opportunity"], "Opportunity")
    listed = rest.get("sobjects/").json()
    assert {o["name"] for o in listed["sobjects"]} == set(schema.BY_NAME)
    assert rest.get("sobjects/Account").json()["objectDescribe"]["keyPrefix"] == "001"


def test_every_createable_describe_field_is_writable_and_nothing_else(rest: Rest) -> None:
    fields = rest.get("sobjects/Contact/describe").json()["fields"]
    values: dict[str, object] = {"LastName": "Baker", "AccountId": account(rest)}
    for f in fields:
        if f["createable"] and f["name"] not in values:
            values[f["name"]] = {"string": "x", "email": "a@b.example", "phone": "+1 412 555 0100"}[f["type"]]
    created = rest.send("POST", "sobjects/Contact", values)
    assert created.status_code == 201, created.text
    for refused in ("Dynamics_Contact_Nope__c", "AccountNumber"):  # a typo, and a field of another sObject
        answer = rest.send("POST", "sobjects/Contact", {"LastName": "Baker", refused: "x"})
        assert answer.status_code == 400
        assert answer.json() == [{"message": f"No such column '{refused}' on sobject of type Contact",
                                  "errorCode": "INVALID_FIELD", "fields": [refused]}]
        patched = rest.send("PATCH", f"sobjects/Contact/{created.json()['id']}", {refused: "x"})
        assert patched.status_code == 400
        assert patched.json()[0]["errorCode"] == "INVALID_FIELD"
    system = rest.send("POST", "sobjects/Contact", {"LastName": "Baker", "CreatedDate": "2020-01-01T00:00:00Z"})
    assert system.status_code == 400
    assert system.json()[0]["errorCode"] == "INVALID_FIELD_FOR_INSERT_UPDATE"
    assert rest.query("SELECT COUNT_DISTINCT__c FROM Contact").status_code == 400
    assert rest.query("SELECT Id FROM Contact").json()["totalSize"] == 1  # the refused writes changed nothing


def test_values_are_checked_against_the_schema(rest: Rest) -> None:
    too_long = rest.send("POST", "sobjects/Account", {"Name": "x", "BillingCity": "C" * 41})
    assert too_long.status_code == 400
    assert too_long.json()[0]["errorCode"] == "STRING_TOO_LONG"
    assert too_long.json()[0]["fields"] == ["BillingCity"]
    restricted = rest.send("POST", "sobjects/Account", {"Name": "x", "Payment_Terms__c": "Net 120"})
    assert restricted.status_code == 400
    assert restricted.json()[0] == {"message": "Payment Terms: bad value for restricted picklist field: Net 120",
                                    "errorCode": "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                                    "fields": ["Payment_Terms__c"]}
    unrestricted = rest.send("POST", "sobjects/Account", {"Name": "x", "Industry": "Fishing"})
    assert unrestricted.status_code == 201  # a standard, unrestricted picklist takes any value through the API
    wrong_type = rest.send("POST", "sobjects/Account", {"Name": "x", "NumberOfEmployees": "many"})
    assert wrong_type.status_code == 400
    assert wrong_type.json()[0]["errorCode"] == "JSON_PARSER_ERROR"
    lower = rest.send("POST", "sobjects/Account", {"name": "lower-case names are accepted"})
    assert lower.status_code == 201
    rid = lower.json()["id"]
    assert rest.get(f"sobjects/Account/{rid}", fields="Name").json()["Name"] == "lower-case names are accepted"


# ------------------------------------------------------------------------------------------- collections


def test_collections_all_or_none_true_rolls_every_record_back(rest: Rest, sf_org: SalesforceOrg) -> None:
    records = [{"attributes": {"type": "Account"}, "Name": "Good One"},
               {"attributes": {"type": "Account"}, "Name": "Bad One", "Payment_Terms__c": "Net 120"},
               {"attributes": {"type": "Account"}, "Name": "Good Two"}]
    answer = rest.send("POST", "composite/sobjects", {"allOrNone": True, "records": records})
    assert answer.status_code == 200
    results = answer.json()
    rolled = {"statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
              "message": "Record rolled back because not all records were valid and the request was using AllOrNone "
                         "header", "fields": []}
    assert results[0] == {"success": False, "errors": [rolled]}
    assert results[2] == {"success": False, "errors": [rolled]}
    assert results[1]["success"] is False
    assert results[1]["errors"][0]["statusCode"] == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    assert rest.query("SELECT Id FROM Account").json()["totalSize"] == 0
    assert sf_org.sim.events() == []  # a rolled-back transaction publishes no change event

    partial = rest.send("POST", "composite/sobjects", {"allOrNone": False, "records": records}).json()
    assert [r["success"] for r in partial] == [True, False, True]
    assert rest.query("SELECT Id FROM Account").json()["totalSize"] == 2


def test_collections_all_or_none_on_update_and_delete_keeps_the_records(rest: Rest) -> None:
    keep = account(rest, AccountNumber="A-1")
    updates = [{"attributes": {"type": "Account"}, "Id": keep, "AccountNumber": "A-2"},
               {"attributes": {"type": "Account"}, "Id": "001000000000000AAA", "AccountNumber": "A-3"}]
    results = rest.send("PATCH", "composite/sobjects", {"allOrNone": True, "records": updates}).json()
    assert results[0]["id"] == keep
    assert results[0]["errors"][0]["statusCode"] == "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    assert rest.get(f"sobjects/Account/{keep}").json()["AccountNumber"] == "A-1"
    deleted = rest.send("DELETE", "composite/sobjects", ids=f"{keep},001000000000000AAA", allOrNone="true").json()
    assert [r["success"] for r in deleted] == [False, False]
    assert rest.get(f"sobjects/Account/{keep}").status_code == 200


# ------------------------------------------------------------------------------------------- composite


def test_composite_references_an_earlier_subrequest(rest: Rest) -> None:
    body = {"compositeRequest": [
        {"method": "POST", "url": "/services/data/v63.0/sobjects/Account", "referenceId": "refAccount",
         "body": {"Name": "Sample Account"}},
        {"method": "POST", "url": "/services/data/v63.0/sobjects/Contact", "referenceId": "refContact",
         "body": {"LastName": "Sample Contact", "AccountId": "@{refAccount.id}"}},
        {"method": "GET", "url": "/services/data/v63.0/sobjects/Account/@{refAccount.id}?fields=Name",
         "referenceId": "refRead"},
        {"method": "GET", "url": "/services/data/v63.0/query/?q=SELECT+Id+FROM+Contact+WHERE+AccountId+%3D+"
                                 "'@{refAccount.id}'", "referenceId": "refQuery"},
    ]}
    answer = rest.send("POST", "composite", body)
    assert answer.status_code == 200, answer.text
    out = answer.json()["compositeResponse"]
    assert [r["referenceId"] for r in out] == ["refAccount", "refContact", "refRead", "refQuery"]
    assert [r["httpStatusCode"] for r in out] == [201, 201, 200, 200]
    account_id = out[0]["body"]["id"]
    assert out[0]["body"] == {"id": account_id, "success": True, "errors": []}
    assert out[0]["httpHeaders"] == {"Location": f"/services/data/v63.0/sobjects/Account/{account_id}"}
    assert out[2]["body"]["Name"] == "Sample Account"
    assert [r["Id"] for r in out[3]["body"]["records"]] == [out[1]["body"]["id"]]
    contact = rest.get(f"sobjects/Contact/{out[1]['body']['id']}").json()
    assert contact["AccountId"] == account_id


def _failing_composite(all_or_none: bool) -> dict[str, object]:
    return {"allOrNone": all_or_none, "compositeRequest": [
        {"method": "POST", "url": "/services/data/v63.0/sobjects/Account", "referenceId": "refAccount",
         "body": {"Name": "Kept unless allOrNone"}},
        {"method": "POST", "url": "/services/data/v63.0/sobjects/Account", "referenceId": "refBad",
         "body": {"Name": "Bad", "No_Such__c": "x"}},
        {"method": "POST", "url": "/services/data/v63.0/sobjects/Contact", "referenceId": "refDependent",
         "body": {"LastName": "Depends on the bad one", "AccountId": "@{refBad.id}"}},
        {"method": "POST", "url": "/services/data/v63.0/sobjects/Contact", "referenceId": "refIndependent",
         "body": {"LastName": "Independent", "AccountId": "@{refAccount.id}"}},
    ]}


def test_composite_all_or_none_true_rolls_back_and_halts_the_others(rest: Rest) -> None:
    out = rest.send("POST", "composite", _failing_composite(True)).json()["compositeResponse"]
    assert [r["httpStatusCode"] for r in out] == [400, 400, 400, 400]
    assert out[1]["body"][0]["errorCode"] == "INVALID_FIELD"
    halted = [{"errorCode": "PROCESSING_HALTED",
               "message": "The transaction was rolled back since another operation in the same transaction failed."}]
    assert out[0]["body"] == halted
    assert out[3]["body"] == halted
    assert rest.query("SELECT Id FROM Account").json()["totalSize"] == 0
    assert rest.query("SELECT Id FROM Contact").json()["totalSize"] == 0


def test_composite_all_or_none_false_runs_what_does_not_depend_on_the_failure(rest: Rest) -> None:
    out = rest.send("POST", "composite", _failing_composite(False)).json()["compositeResponse"]
    assert [r["httpStatusCode"] for r in out] == [201, 400, 400, 201]
    assert out[2]["body"][0]["errorCode"] == "PROCESSING_HALTED"
    assert rest.query("SELECT Id FROM Account").json()["totalSize"] == 1
    assert rest.query("SELECT LastName FROM Contact").json()["records"][0]["LastName"] == "Independent"


def test_composite_request_errors_are_400_before_any_subrequest_runs(rest: Rest) -> None:
    sub = {"method": "POST", "url": "/services/data/v63.0/sobjects/Account", "body": {"Name": "x"}}
    too_many = {"compositeRequest": [{**sub, "referenceId": f"r{i}"} for i in range(26)]}
    missing_ref = {"compositeRequest": [sub]}
    duplicate = {"compositeRequest": [{**sub, "referenceId": "a"}, {**sub, "referenceId": "a"}]}
    for body in (too_many, missing_ref, duplicate, {"allOrNone": True}, [1, 2]):
        answer = rest.send("POST", "composite", body)
        assert answer.status_code == 400, body
        assert isinstance(answer.json(), list)
        assert answer.json()[0]["errorCode"]
    assert rest.query("SELECT Id FROM Account").json()["totalSize"] == 0


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                         max_size=4), max_leaves=12)
subrequests = st.fixed_dictionaries({
    "method": st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD"]),
    "url": st.sampled_from(["/services/data/v63.0/sobjects/Account", "/services/data/v63.0/query/?q=SELECT+Id+FROM+"
                            "Account", "/services/data/v63.0/sobjects/Account/@{a.id}", "@{a}", "/x",
                            "/services/data/v63.0/composite/sobjects"]),
    "referenceId": st.sampled_from(["a", "b", "c", ""]), "body": json_values})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["composite", "composite/sobjects", "sobjects/Account",
                             "composite/sobjects/Account/Dynamics_Account__c"]),
       method=st.sampled_from(["POST", "PATCH"]),
       body=json_values | st.fixed_dictionaries({"allOrNone": json_values, "records": st.lists(json_values)})
       | st.fixed_dictionaries({"allOrNone": st.booleans(), "compositeRequest": st.lists(subrequests, max_size=4)}))
def test_whatever_a_client_sends_is_answered_2xx_or_4xx(rest: Rest, path: str, method: str, body: object) -> None:
    answer = rest.send(method, path, body)
    assert answer.status_code < 500, answer.text
    answer.json()


@pytest.mark.parametrize("number", ["NaN", "Infinity", "1e400"])
def test_a_number_json_cannot_hold_is_json_parser_error_and_creates_nothing(rest: Rest, sf_org: SalesforceOrg,
                                                                            number: str) -> None:
    before = sf_org.sim.count("Account")
    answer = rest.session.post(rest.url("sobjects/Account"), timeout=10, headers={"Content-Type": "application/json"},
                               data=f'{{"Name": "Not a number", "AnnualRevenue": {number}}}')
    assert answer.status_code == 400
    assert answer.json()[0]["errorCode"] == "JSON_PARSER_ERROR"
    assert sf_org.sim.count("Account") == before
