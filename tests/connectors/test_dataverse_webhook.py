"""Dataverse webhooks: the simulator's RemoteExecutionContext deliveries and parse_remote_execution_context."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from sandbox.dataverse import DataverseSimulator
from sandbox.server import TestCA as SandboxCA
from shared.connectors.dataverse import DataverseClient, parse_remote_execution_context
from shared.core.errors import EnvelopeError
from shared.core.ports import Bind, WriteOp
from tests.connectors.test_dataverse import DataverseEnv, Factory, dataverse_with_hooks
from tests.served import Receiver, Recorder, tls_context

SIGN_VALUES = {"dot_mutcdcode": "W1-2", "dot_signtype": 100000001, "dot_installdate": "2019-06-14",
               "dot_lastinspectedon": "2026-02-11T15:42:05Z", "dot_milepost": 12.345, "dot_route": "VA-7"}


@pytest.fixture(scope="module")
def dataverse_webhook_env(sandbox_ca: SandboxCA) -> Iterator[tuple[DataverseEnv, Receiver, str]]:
    with dataverse_with_hooks(sandbox_ca) as env:
        yield env


@dataclass
class Hooks:
    sim: DataverseSimulator
    receiver: Receiver
    url: str
    client: DataverseClient


@pytest.fixture
async def dataverse_hooks(dataverse_webhook_env: tuple[DataverseEnv, Receiver, str]) -> AsyncIterator[Hooks]:
    env, receiver, url = dataverse_webhook_env
    env.sim.reset()
    receiver.posts.clear()
    receiver.script.clear()
    async with httpx.AsyncClient(verify=tls_context(env.ca), timeout=5.0) as http:
        factory = Factory(env, http, Recorder())
        yield Hooks(env.sim, receiver, url, factory.client())
        for provider in factory.providers:
            provider.close()


def attributes(entity: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: a["value"] for a in entity["Attributes"]}


# ============================================================================================ delivery


async def test_api_writes_deliver_remote_execution_contexts_that_parse_back(dataverse_hooks: Hooks) -> None:
    sim, receiver = dataverse_hooks.sim, dataverse_hooks.receiver
    sim.register_webhook(dataverse_hooks.url, headers={"x-syncline-key": "s3cret"}, tables={"dot_signassets"})
    dv = dataverse_hooks.client
    [created] = await dv.write([WriteOp("c", "upsert", "dot_signassets", match={"dot_assettag": "SGN-000042"},
                                        values=SIGN_VALUES)])
    [updated] = await dv.write([WriteOp("u", "update", "dot_signassets", key=created.key,
                                        values={"dot_condition": 100000003})])
    await dv.write([WriteOp("w", "upsert", "dot_workorders", key=str(uuid.uuid4()),
                            values={"dot_name": "WO-1", "dot_worktype": 100000000, "dot_status": 100000000})])
    await sim.flush_webhooks()
    assert created.ok
    assert updated.ok
    assert len(receiver.posts) == 2  # the work order's table is not registered
    headers, raw = receiver.posts[0]
    assert headers["x-ms-dynamics-entity-name"] == "dot_signasset"
    assert headers["x-ms-dynamics-request-name"] == "Create"
    assert headers["x-syncline-key"] == "s3cret"
    assert headers["x-ms-correlation-request-id"]
    assert b"\\/Date(" in raw
    assert b"http:\\/\\/schemas.microsoft.com" in raw

    create, update = receiver.bodies()
    assert (create["MessageName"], create["Stage"], create["Mode"]) == ("Create", 40, 1)
    assert create["InitiatingUserId"] == sim.app_user_id  # Syncline's own write is recognisable
    target = create["InputParameters"][0]["value"]
    assert target["__type"].startswith("Entity:")
    typed = attributes(target)
    assert typed["dot_signtype"] == {"__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts",
                                     "Value": 100000001}
    assert typed["dot_lastinspectedon"] == "/Date(1770824525000)/"

    assert update["MessageName"] == "Update"
    assert set(attributes(update["InputParameters"][0]["value"])) >= {"dot_condition", "dot_signassetid"}
    assert "dot_assettag" not in attributes(update["InputParameters"][0]["value"])  # only what changed
    assert attributes(update["PostEntityImages"][0]["value"])["dot_assettag"] == "SGN-000042"  # full state

    assert created.key is not None
    change = parse_remote_execution_context(update, date_only={"dot_installdate"})
    assert (change.message_name, change.entity, change.key) == ("Update", "dot_signasset", created.key)
    assert change.initiating_user_id == sim.app_user_id
    fetched = (await dv.fetch("dot_signassets", [created.key]))[created.key].values
    for column in ("dot_assettag", "dot_signtype", "dot_condition", "dot_installdate", "dot_lastinspectedon",
                   "dot_milepost", "dot_route", "dot_mutcdcode", "modifiedon"):
        assert change.record.values[column] == fetched[column], column
    assert change.record.modified == datetime.fromisoformat(fetched["modifiedon"].replace("Z", "+00:00"))


async def test_lookups_travel_as_entity_references(dataverse_hooks: Hooks) -> None:
    sim = dataverse_hooks.sim
    sign = sim.insert("dot_signassets", {"dot_assettag": "SGN-1", **SIGN_VALUES})
    sim.register_webhook(dataverse_hooks.url, tables={"dot_workorder"})  # logical names work too
    [wo] = await dataverse_hooks.client.write([WriteOp(
        "w", "upsert", "dot_workorders", match={"dot_arcgisglobalid": "{G-1}"},
        values={"dot_name": "WO-1", "dot_worktype": 100000000, "dot_status": 100000000},
        binds={"dot_SignAssetId": Bind("dot_signassets", sign)})])
    await sim.flush_webhooks()
    [body] = dataverse_hooks.receiver.bodies()
    ref = attributes(body["InputParameters"][0]["value"])["dot_signassetid"]
    assert ref["__type"].startswith("EntityReference:")
    assert ref["LogicalName"] == "dot_signasset"
    assert ref["Id"] == sign
    change = parse_remote_execution_context(body)
    assert change.record.values["dot_signassetid"] == sign
    assert change.key == wo.key


async def test_office_edits_and_deletes_are_attributed_to_the_office_user(dataverse_hooks: Hooks) -> None:
    sim = dataverse_hooks.sim
    key = sim.insert("dot_signassets", {"dot_assettag": "SGN-7", **SIGN_VALUES})
    sim.register_webhook(dataverse_hooks.url, tables=None)
    sim.apply_change("dot_signassets", {"dot_route": "US-29"}, key=key)
    sim.apply_change("dot_signassets", key=key, delete=True)
    await sim.flush_webhooks()
    update, delete = dataverse_hooks.receiver.bodies()
    assert update["InitiatingUserId"] == sim.office_user_id != sim.app_user_id
    assert attributes(update["PreEntityImages"][0]["value"])["dot_route"] == "VA-7"
    assert delete["MessageName"] == "Delete"
    assert delete["InputParameters"][0]["value"]["__type"].startswith("EntityReference:")
    change = parse_remote_execution_context(delete, date_only={"dot_installdate"})
    assert change.record.deleted
    assert change.record.values["dot_route"] == "US-29"  # from the pre-image
    assert change.record.values["dot_installdate"] == "2019-06-14"


async def test_delivery_is_retried_once_on_503_and_failures_are_recorded(dataverse_hooks: Hooks) -> None:
    sim, receiver = dataverse_hooks.sim, dataverse_hooks.receiver
    sim.register_webhook(dataverse_hooks.url)
    receiver.script[:] = [503]
    sim.apply_change("dot_signassets", {"dot_assettag": "SGN-1", **SIGN_VALUES})
    await sim.flush_webhooks()
    assert len(receiver.posts) == 2
    assert sim.webhook_failures == []
    assert sim.webhooks_delivered == 1

    receiver.script[:] = [500]
    sim.apply_change("dot_signassets", {"dot_assettag": "SGN-2", **SIGN_VALUES})
    await sim.flush_webhooks()
    assert len(receiver.posts) == 3  # no retry on 500
    [failure] = sim.webhook_failures
    assert (failure.status, failure.message_name, failure.entity) == (500, "Create", "dot_signasset")


# ============================================================================================ parsing


DOC_SAMPLE = r"""
{ "BusinessUnitId": "e2b9dd85-e89e-e711-8122-000d3aa2331c",
  "CorrelationId": "b374239d-4233-41a9-8b17-a86cb4f737b5", "Depth": 1,
  "InitiatingUserId": "75c2dd85-e89e-e711-8122-000d3aa2331c",
  "InputParameters": [{ "key": "Target", "value": {
      "__type": "Entity:http:\/\/schemas.microsoft.com\/xrm\/2011\/Contracts",
      "Attributes": [
        { "key": "firstname", "value": "James" },
        { "key": "contactid", "value": "6d81597f-0f9f-e711-8122-000d3aa2331c" },
        { "key": "fullname", "value": "James Glynn (sample)" },
        { "key": "modifiedon", "value": "\/Date(1506384247000)\/" },
        { "key": "modifiedby", "value": {
            "__type": "EntityReference:http:\/\/schemas.microsoft.com\/xrm\/2011\/Contracts",
            "Id": "75c2dd85-e89e-e711-8122-000d3aa2331c", "KeyAttributes": [],
            "LogicalName": "systemuser", "Name": null, "RowVersion": null } },
        { "key": "modifiedonbehalfby", "value": null } ],
      "EntityState": null, "FormattedValues": [], "Id": "6d81597f-0f9f-e711-8122-000d3aa2331c",
      "KeyAttributes": [], "LogicalName": "contact", "RelatedEntities": [], "RowVersion": null } }],
  "IsExecutingOffline": false, "IsInTransaction": false, "IsOfflinePlayback": false, "IsolationMode": 1,
  "MessageName": "Update", "Mode": 1,
  "OperationCreatedOn": "\/Date(1506409448000-0700)\/",
  "OperationId": "4af10637-4ea2-e711-8122-000d3aa2331c",
  "OrganizationId": "4ef5b371-e89e-e711-8122-000d3aa2331c", "OrganizationName": "OrgName",
  "OutputParameters": [],
  "OwningExtension": { "Id": "75417616-4ea2-e711-8122-000d3aa2331c", "KeyAttributes": [],
    "LogicalName": "sdkmessageprocessingstep", "Name": null, "RowVersion": null },
  "ParentContext": { "…": "same shape, Stage 30, InputParameters Target + SuppressDuplicateDetection" },
  "PostEntityImages": [{ "key": "AsynchronousStepPrimaryName", "value": {
      "Attributes": [ { "key": "fullname", "value": "James Glynn (sample)" },
                      { "key": "contactid", "value": "6d81597f-0f9f-e711-8122-000d3aa2331c" } ],
      "EntityState": null, "FormattedValues": [], "Id": "6d81597f-0f9f-e711-8122-000d3aa2331c",
      "KeyAttributes": [], "LogicalName": "contact", "RelatedEntities": [], "RowVersion": null } }],
  "PreEntityImages": [],
  "PrimaryEntityId": "6d81597f-0f9f-e711-8122-000d3aa2331c", "PrimaryEntityName": "contact",
  "RequestId": null, "SecondaryEntityName": "none", "SharedVariables": [],
  "Stage": 40, "UserId": "75c2dd85-e89e-e711-8122-000d3aa2331c" }
"""


def doc_sample() -> dict[str, Any]:
    return dict(json.loads(DOC_SAMPLE))


def test_parses_the_documented_update_sample() -> None:
    change = parse_remote_execution_context(doc_sample())
    assert change.message_name == "Update"
    assert change.entity == "contact"
    assert change.key == "6d81597f-0f9f-e711-8122-000d3aa2331c"
    assert change.correlation_id == "b374239d-4233-41a9-8b17-a86cb4f737b5"
    assert change.depth == 1
    assert change.initiating_user_id == "75c2dd85-e89e-e711-8122-000d3aa2331c"
    assert change.operation_created_on == datetime(2017, 9, 26, 7, 4, 8, tzinfo=UTC)  # ms are UTC; offset is info
    values = change.record.values
    assert values["firstname"] == "James"
    assert values["fullname"] == "James Glynn (sample)"
    assert values["modifiedon"] == "2017-09-26T00:04:07Z"
    assert values["modifiedby"] == "75c2dd85-e89e-e711-8122-000d3aa2331c"
    assert values["modifiedonbehalfby"] is None
    assert change.record.modified == datetime(2017, 9, 26, 0, 4, 7, tzinfo=UTC)
    assert not change.record.deleted


def test_parses_a_create_with_typed_values_and_post_image() -> None:
    body = doc_sample()
    body["MessageName"] = "Create"
    target = body["InputParameters"][0]["value"]
    target["Attributes"] = [
        {"key": "dot_inspectionid", "value": "A1B2C3D4-0000-4000-8000-00000000000F"},
        {"key": "dot_condition", "value": {"__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts",
                                           "Value": 100000002}},
        {"key": "dot_cost", "value": {"__type": "Money:http://schemas.microsoft.com/xrm/2011/Contracts",
                                      "Value": 125}},
        {"key": "dot_signassetid", "value": {
            "__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
            "Id": "5E6F7A8B-1111-4222-8333-444455556666", "LogicalName": "dot_signasset", "KeyAttributes": []}},
        {"key": "dot_inspectedon", "value": "/Date(1772443800000)/"},
        {"key": "dot_duedate", "value": "/Date(1775001600000)/"},
    ]
    body["PrimaryEntityName"] = "dot_inspection"
    body["PrimaryEntityId"] = "a1b2c3d4-0000-4000-8000-00000000000f"
    body["PostEntityImages"][0]["value"]["Attributes"] = [
        {"key": "dot_inspector", "value": "C. Ruiz"},
        {"key": "dot_condition", "value": {"__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts",
                                           "Value": 100000003}},
    ]
    body["PostEntityImages"][0]["value"]["RowVersion"] = "1234"
    change = parse_remote_execution_context(body, date_only={"dot_duedate"})
    values = change.record.values
    assert change.message_name == "Create"
    assert values["dot_inspectionid"] == "a1b2c3d4-0000-4000-8000-00000000000f"
    assert values["dot_condition"] == 100000003  # the post-image wins
    assert values["dot_cost"] == 125.0
    assert isinstance(values["dot_cost"], float)
    assert values["dot_signassetid"] == "5e6f7a8b-1111-4222-8333-444455556666"
    assert values["dot_inspectedon"] == "2026-03-02T09:30:00Z"
    assert values["dot_duedate"] == "2026-04-01"
    assert values["dot_inspector"] == "C. Ruiz"
    assert change.record.version == "1234"


def test_parses_a_delete_from_its_pre_image() -> None:
    body = doc_sample()
    body["MessageName"] = "Delete"
    body["InputParameters"] = [{"key": "Target", "value": {
        "__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
        "Id": "6d81597f-0f9f-e711-8122-000d3aa2331c", "LogicalName": "contact", "KeyAttributes": []}}]
    body["PostEntityImages"] = []
    without_image = parse_remote_execution_context(body)
    assert without_image.record.deleted
    assert without_image.record.values == {}
    body["PreEntityImages"] = [{"key": "PreImage", "value": {
        "Attributes": [{"key": "fullname", "value": "James Glynn (sample)"}], "Id": body["PrimaryEntityId"],
        "LogicalName": "contact", "RowVersion": "99"}}]
    change = parse_remote_execution_context(body)
    assert change.message_name == "Delete"
    assert change.record.deleted
    assert change.record.values == {"fullname": "James Glynn (sample)"}
    assert change.record.version == "99"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.pop("MessageName"), "no MessageName"),
        (lambda b: b.update(MessageName="Assign"), "unknown MessageName 'Assign'"),
        (lambda b: b.update(InputParameters=[]), "no Target"),
        (lambda b: b.update(InputParameters={"not": "a list"}) or b.update(InputParameters=7), "InputParameters"),
        (lambda b: b["InputParameters"][0]["value"]["Attributes"][3].update(value="/Date(soon)/"),
         "attribute 'modifiedon'"),
        (lambda b: b.update(OperationCreatedOn="2017-09-26"), "OperationCreatedOn"),
        (lambda b: b.update(PrimaryEntityId="42") or b["InputParameters"][0]["value"].update(Id=None),
         "PrimaryEntityId"),
        (lambda b: b.pop("PrimaryEntityName"), "PrimaryEntityName"),
        (lambda b: b["InputParameters"][0]["value"].pop("Attributes"), "not an Entity"),
        (lambda b: b.update(Depth="one"), "Depth"),
    ],
    ids=["no-message", "unknown-message", "no-target", "bad-inputs", "bad-date", "bad-created-on", "no-key",
         "no-entity", "no-attributes", "bad-depth"],
)
def test_malformed_bodies_are_envelope_errors_naming_the_problem(mutate: Any, message: str) -> None:
    body = doc_sample()
    mutate(body)
    with pytest.raises(EnvelopeError) as err:
        parse_remote_execution_context(body)
    assert message in err.value.detail
    assert err.value.reason == "ENVELOPE_INVALID"


def test_a_non_object_body_is_an_envelope_error() -> None:
    with pytest.raises(EnvelopeError, match="not a JSON object"):
        parse_remote_execution_context([1, 2])  # type: ignore[arg-type]
