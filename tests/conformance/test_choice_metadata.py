"""The simulators' choice metadata read by clients that are not ours, with the real services' URL shapes: raw
Web API (Dataverse), the layer resource (ArcGIS), simple_salesforce's describe, raw `$metadata` (F&O)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceMalformedRequest, SalesforceResourceNotFound

from tests.conformance import _arcgis_fixtures as afx
from tests.conformance import _dataverse_fixtures as dfx
from tests.conformance import _fno_fixtures as ffx
from tests.conformance import _salesforce_fixtures as sfx
from tests.conformance._arcgis_fixtures import FeatureService
from tests.conformance._dataverse_fixtures import DataverseEnv
from tests.conformance._fno_fixtures import FnoEnv
from tests.conformance._salesforce_fixtures import VERSION, Rest, SalesforceOrg

dataverse_env, dataverse, web_api = dfx.dataverse_env, dfx.dataverse, dfx.web_api
sf_org, rest = sfx.sf_org, sfx.rest
service = afx.service
fno, fno_http = ffx.fno, ffx.fno_http

pytestmark = pytest.mark.integration

PICKLIST = "Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
EXPAND = {"$select": "LogicalName", "$expand": "OptionSet($select=Options),GlobalOptionSet($select=Options)"}
EDM = "{http://docs.oasis-open.org/odata/ns/edm}"


def options(body: dict[str, Any]) -> dict[int, str]:
    return {o["Value"]: o["Label"]["UserLocalizedLabel"]["Label"] for o in body["OptionSet"]["Options"]}


# ------------------------------------------------------------------------------------------------ Dataverse


def test_dataverse_picklist_metadata_follows_an_option_added_relabelled_and_removed(
        web_api: httpx.Client, dataverse: DataverseEnv):
    url = f"EntityDefinitions(LogicalName='dot_signasset')/Attributes(LogicalName='dot_condition')/{PICKLIST}"
    before = web_api.get(url, params=EXPAND)
    assert before.status_code == 200
    body = before.json()
    assert body["LogicalName"] == "dot_condition"
    assert body["GlobalOptionSet"] is None
    assert body["OptionSet"]["IsGlobal"] is False
    option = body["OptionSet"]["Options"][0]
    assert option["Label"]["LocalizedLabels"][0]["LanguageCode"] == 1033
    assert options(body)[100000003] == "Damaged"
    sim = dataverse.sim
    sim.set_choice_option("dot_signassets", "dot_condition", 100000005, "Leaning")
    sim.set_choice_option("dot_signassets", "dot_condition", 100000003, "Vandalised")
    try:
        after = options(web_api.get(url, params=EXPAND).json())
        assert after[100000005] == "Leaning"
        assert after[100000003] == "Vandalised"
        sim.remove_choice_option("dot_signassets", "dot_condition", 100000005)
        assert 100000005 not in options(web_api.get(url, params=EXPAND).json())
        # A record can carry the new option only while it exists.
        sim.set_choice_option("dot_signassets", "dot_condition", 100000006, "Bent")
        created = web_api.post("dot_signassets", json={"dot_assettag": "T-9", "dot_mutcdcode": "R1-1",
                                                      "dot_signtype": 100000000, "dot_condition": 100000006})
        assert created.status_code == 204, created.text
    finally:
        sim.set_choice_option("dot_signassets", "dot_condition", 100000003, "Damaged")
        sim.schema["dot_signassets"].choices["dot_condition"].options.pop(100000006, None)


def test_dataverse_metadata_errors_have_the_web_api_shape(web_api: httpx.Client):
    unknown_entity = web_api.get(f"EntityDefinitions(LogicalName='nope')/Attributes(LogicalName='x')/{PICKLIST}")
    assert unknown_entity.status_code == 404
    assert unknown_entity.json()["error"]["code"] == "0x80040217"
    unknown_attr = web_api.get(f"EntityDefinitions(LogicalName='account')/Attributes(LogicalName='nope')/{PICKLIST}")
    assert unknown_attr.status_code == 404
    assert set(unknown_attr.json()) == {"error"}
    wrong_cast = web_api.get(f"EntityDefinitions(LogicalName='account')/Attributes(LogicalName='name')/{PICKLIST}")
    assert wrong_cast.status_code == 400
    assert "cannot be cast" in wrong_cast.json()["error"]["message"]
    missing = web_api.get("GlobalOptionSetDefinitions(Name='syn_nope')")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "Could not find optionset with name 'syn_nope'."


def test_dataverse_status_columns_cast_to_their_own_metadata_type_and_global_sets_by_name(
        web_api: httpx.Client, dataverse: DataverseEnv):
    attr = web_api.get("EntityDefinitions(LogicalName='salesorder')/Attributes(LogicalName='statecode')",
                       params={"$select": "LogicalName,AttributeType"})
    assert attr.json()["AttributeType"] == "State"
    state = web_api.get("EntityDefinitions(LogicalName='salesorder')/Attributes(LogicalName='statecode')/"
                        "Microsoft.Dynamics.CRM.StateAttributeMetadata", params=EXPAND)
    assert state.status_code == 200
    assert state.json()["OptionSet"]["OptionSetType"] == "State"
    assert web_api.get("EntityDefinitions(LogicalName='salesorder')/Attributes(LogicalName='statecode')/"
                       f"{PICKLIST}").status_code == 400
    sim = dataverse.sim
    saved = sim.schema["dot_workorders"].choices["dot_priority"]
    sim.use_global_option_set("dot_workorders", "dot_priority", "dot_priority")
    try:
        sim.set_choice_option("dot_workorders", "dot_priority", 100000004, "Deferred")
        found = web_api.get("GlobalOptionSetDefinitions(Name='dot_priority')")
        assert found.status_code == 200
        assert found.json()["IsGlobal"] is True
        assert {o["Value"]: o["Label"]["UserLocalizedLabel"]["Label"] for o in found.json()["Options"]} == {
            100000000: "Low", 100000001: "Normal", 100000002: "High", 100000003: "Emergency", 100000004: "Deferred"}
        column = web_api.get("EntityDefinitions(LogicalName='dot_workorder')/Attributes(LogicalName='dot_priority')/"
                             f"{PICKLIST}", params=EXPAND).json()
        assert column["GlobalOptionSet"]["Name"] == "dot_priority"
        assert column["GlobalOptionSet"]["IsGlobal"] is True
        assert options(column)[100000004] == "Deferred"
    finally:
        sim.schema["dot_workorders"].choices["dot_priority"] = saved
        sim.global_option_sets.clear()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=30), cast=st.sampled_from(
    ["", "/" + PICKLIST, "/Microsoft.Dynamics.CRM.StatusAttributeMetadata", "/Microsoft.Dynamics.CRM.Nope"]))
def test_any_metadata_url_is_answered_2xx_or_4xx(web_api: httpx.Client, text: str, cast: str):
    # Percent-encoded as a client sends it (the URL itself must be valid); the simulator decodes it.
    quoted = quote(text.replace("'", "''"), safe="")
    text = quote(text, safe="")
    for path in (f"GlobalOptionSetDefinitions(Name='{quoted}')", f"GlobalOptionSetDefinitions({text})",
                 f"EntityDefinitions(LogicalName='account')/Attributes(LogicalName='{quoted}'){cast}",
                 f"EntityDefinitions(LogicalName='{quoted}')/Attributes(LogicalName='name'){cast}"):
        resp = web_api.get(path, params=EXPAND)
        assert resp.status_code < 500, (path, resp.text)


# ------------------------------------------------------------------------------------------------ ArcGIS


def test_arcgis_layer_resource_shows_coded_values_as_changed(service: FeatureService):
    layer_id = service.sim._layer("WorkOrders").d.id

    def codes() -> dict[Any, str]:
        [status] = [f for f in service.layer(layer_id)["fields"] if f["name"] == "STATUS"]
        assert status["domain"]["type"] == "codedValue"
        return {c["code"]: c["name"] for c in status["domain"]["codedValues"]}

    assert codes()["CLOSED"] == "Closed"
    service.sim.set_coded_value("WorkOrders", "STATUS", "ON_HOLD", "On hold")
    service.sim.set_coded_value("WorkOrders", "STATUS", "CLOSED", "Archived")
    service.sim.remove_coded_value("WorkOrders", "STATUS", "CANCELLED")
    after = codes()
    assert after["ON_HOLD"] == "On hold"
    assert after["CLOSED"] == "Archived"
    assert "CANCELLED" not in after


def test_arcgis_unknown_layer_is_the_services_error(service: FeatureService):
    body = service.http.get(f"{service.url}/99", params={"f": "json", "token": service.token}).json()
    assert body["error"]["code"] in (400, 404)


# ------------------------------------------------------------------------------------------------ Salesforce


def test_simple_salesforce_describe_shows_picklist_values_as_changed_in_setup(rest: Rest, sf_org: SalesforceOrg):
    sf = Salesforce(instance_url=rest.instance_url, session_id=rest.token, version=VERSION, session=rest.session)

    def picklist(name: str) -> list[dict[str, Any]]:
        [field] = [f for f in sf.Account.describe()["fields"] if f["name"] == name]
        return list(field["picklistValues"])

    assert [p["value"] for p in picklist("Legal_Entity__c")] == ["US01", "DE01", "BR01"]
    sf_org.sim.set_picklist_value("Account", "Legal_Entity__c", "FR01", "Contoso France")
    sf_org.sim.set_picklist_value("Account", "Legal_Entity__c", "BR01", active=False)
    sf_org.sim.remove_picklist_value("Account", "Legal_Entity__c", "DE01")
    values = {p["value"]: (p["label"], p["active"]) for p in picklist("Legal_Entity__c")}
    assert values == {"US01": ("US01", True), "BR01": ("BR01", False), "FR01": ("Contoso France", True)}
    with pytest.raises(SalesforceResourceNotFound):
        sf.NoSuchObject__c.describe()
    # The restricted picklist takes the new value and refuses the deactivated one, as the org does.
    assert sf.Account.create({"Name": "Contoso SAS", "Legal_Entity__c": "FR01"})["success"] is True
    with pytest.raises(SalesforceMalformedRequest) as refused:
        sf.Account.create({"Name": "Contoso Ltda", "Legal_Entity__c": "BR01"})
    assert refused.value.content[0]["errorCode"] == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"


# ------------------------------------------------------------------------------------------------ F&O


def test_fno_metadata_lists_enum_members_as_deployed(fno_http: httpx.Client, fno: FnoEnv):
    def members() -> list[tuple[str, str]]:
        root = ET.fromstring(fno_http.get("$metadata").text)
        [enum] = [e for e in root.iter(f"{EDM}EnumType") if e.get("Name") == "SalesStatus"]
        return [(str(m.get("Name")), str(m.get("Value"))) for m in enum.iter(f"{EDM}Member")]

    assert members() == [("None", "0"), ("Backorder", "1"), ("Delivered", "2"), ("Invoiced", "3"), ("Canceled", "4")]
    fno.sim.add_enum_member("SalesStatus", "Returned")
    fno.sim.remove_enum_member("SalesStatus", "None")
    assert members() == [("Backorder", "1"), ("Delivered", "2"), ("Invoiced", "3"), ("Canceled", "4"),
                         ("Returned", "5")]
