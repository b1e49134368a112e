"""Webhook registration through the Dataverse Web API and the ArcGIS admin API, against both simulators."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from typer.testing import CliRunner

from sandbox.demo import FUNCTION_KEY, SIGNATURE_KEY, WEBHOOK_SECRET, Sandbox
from sandbox.server import RunningServer
from shared.bootstrap import Services, build_services, set_services
from shared.cli import app
from shared.connectors.arcgis import ArcGISFeatureServiceClient, verify_signature
from shared.connectors.dataverse import DataverseClient, parse_remote_execution_context
from shared.core.errors import RejectedError
from shared.core.ports import Bind, WriteOp
from shared.mapping.spec import FlowSet, parse_spec
from shared.ops import (
    mapped_columns,
    register_arcgis_webhook,
    register_dataverse_webhook,
)
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "flows" / "dot-signs.yaml"
SECRET = "reg-test-header-secret-4e1f"
SIGN = {"dot_name": "Stop ahead, VA-7 MP 12.3", "dot_assettag": "REG-0001", "dot_mutcdcode": "W3-1",
        "dot_signtype": 100000001, "dot_condition": 100000000, "dot_route": "VA-7", "dot_milepost": 12.345,
        "dot_mountheightft": 7.0, "dot_installdate": "2019-06-14", "dot_latitude": 39.11, "dot_longitude": -77.56}
DV_TABLES = ("dot_signasset", "dot_workorder", "dot_workordertask", "dot_fieldassignment")


@dataclass
class Receiver:
    """A webhook endpoint on loopback that records headers, query and body of every POST."""

    posts: list[tuple[dict[str, str], dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    async def endpoint(self, request: Request) -> Response:
        body = await request.body()
        with self.lock:
            self.posts.append(({k.lower(): v for k, v in request.headers.items()}, dict(request.query_params), body))
        return Response(status_code=200)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    server = RunningServer(Starlette(routes=[Route("/hook", rec.endpoint, methods=["POST"])])).start()
    rec.url = f"{server.url}/hook"
    try:
        yield rec
    finally:
        server.stop()


@pytest.fixture
async def services(sandbox: Sandbox) -> AsyncIterator[Services]:
    built = build_services(Settings())
    try:
        yield built
    finally:
        await built.aclose()


def dataverse(services: Services) -> DataverseClient:
    client = services.sinks["dataverse"]
    assert isinstance(client, DataverseClient)
    return client


def arcgis(services: Services) -> ArcGISFeatureServiceClient:
    client = services.sinks["arcgis"]
    assert isinstance(client, ArcGISFeatureServiceClient)
    return client


def image_attributes(body: dict[str, Any], which: str) -> dict[str, dict[str, Any]]:
    """alias -> {attribute: value} of the PreEntityImages / PostEntityImages of a RemoteExecutionContext."""
    return {img["key"]: {a["key"]: a["value"] for a in img["value"]["Attributes"]} for img in body[which]}


def without_dot_route(spec_text: str) -> FlowSet:
    line = "      - {source: dot_route, target: ROUTE, owner: dataverse}\n"
    assert line in spec_text
    return parse_spec(spec_text.replace(line, "", 1), source="dot-signs (no dot_route)")


# ============================================================================================ Dataverse


async def test_dataverse_registration_is_idempotent(sandbox: Sandbox, services: Services, caplog):
    caplog.set_level(logging.DEBUG)
    first = await register_dataverse_webhook(services, endpoint_url=f"https://fn.example.org/api/webhooks/dataverse"
                                             f"?code={FUNCTION_KEY}", auth="header", secret=SECRET)
    # One endpoint, then a step and an image per message for each table a flow reads from Dataverse.
    assert first.counts() == {"created": 1 + 2 * 3 * len(DV_TABLES), "updated": 0, "unchanged": 0}
    before = sandbox.dv.registrations()

    second = await register_dataverse_webhook(services, endpoint_url=f"https://fn.example.org/api/webhooks/dataverse"
                                              f"?code={FUNCTION_KEY}", auth="header", secret=SECRET)
    assert second.counts() == {"created": 0, "updated": 0, "unchanged": len(first.items)}
    assert [(i.kind, i.name) for i in second.items] == [(i.kind, i.name) for i in first.items]
    assert sandbox.dv.registrations() == before  # not even a modifiedon moved

    [endpoint] = before["serviceendpoints"]
    assert (endpoint["name"], endpoint["contract"], endpoint["authtype"]) == ("Syncline", 8, 5)
    assert endpoint["authvalue"] == f'<settings><setting name="x-syncline-key" value="{SECRET}" /></settings>'
    steps = {s["name"]: s for s in before["sdkmessageprocessingsteps"]}
    assert sorted(steps) == sorted(f"Syncline: {m} of {t}" for t in DV_TABLES for m in ("Create", "Update", "Delete"))
    update = steps["Syncline: Update of dot_signasset"]
    assert (update["mode"], update["stage"], update["asyncautodelete"]) == (1, 40, True)
    assert update["eventhandler"] == endpoint["serviceendpointid"]
    assert "dot_route" in update["filteringattributes"].split(",")
    assert "modifiedon" not in update["filteringattributes"].split(",")
    images = {(i["sdkmessageprocessingstepid"], i["entityalias"]): i for i in before["sdkmessageprocessingstepimages"]}
    image = images[(update["sdkmessageprocessingstepid"], "PostImage")]
    assert image["imagetype"] == 1
    assert image["attributes"].split(",") == mapped_columns(services.flowset, "dot_signassets")
    delete = steps["Syncline: Delete of dot_workorder"]
    assert images[(delete["sdkmessageprocessingstepid"], "PreImage")]["imagetype"] == 0

    # authvalue is write-only in the Web API, and no secret reaches a report or a log line.
    [read] = await dataverse(services).select("serviceendpoints", equals={"name": "Syncline"})
    assert "authvalue" not in read.values
    for text in (json.dumps(first.as_dict()), json.dumps(second.as_dict()), caplog.text):
        assert SECRET not in text
        assert FUNCTION_KEY not in text


async def test_registered_steps_deliver_with_the_header_and_exactly_the_mapped_columns(
        sandbox: Sandbox, services: Services, receiver: Receiver):
    await register_dataverse_webhook(services, endpoint_url=receiver.url, auth="header", secret=SECRET)
    mapped = set(mapped_columns(services.flowset, "dot_signassets"))

    key = sandbox.dv.apply_change("dot_signassets", SIGN)
    sandbox.dv.apply_change("dot_signassets", {"dot_route": "VA-7 BUS"}, key=key)
    sandbox.dv.apply_change("dot_signassets", {"dot_name": "renamed"}, key=key)  # not mapped: filtered out
    sandbox.dv.apply_change("dot_signassets", key=key, delete=True)
    await sandbox.dv.flush_webhooks()

    assert not sandbox.dv.webhook_failures
    messages = [h["x-ms-dynamics-request-name"] for h, _q, _b in receiver.posts]
    assert sorted(messages) == ["Create", "Delete", "Update"]
    for headers, query, raw in receiver.posts:
        assert headers["x-syncline-key"] == SECRET
        assert headers["x-ms-dynamics-entity-name"] == "dot_signasset"
        assert query == {}
        body = json.loads(raw)
        assert body["Mode"] == 1
        assert body["Stage"] == 40
        [(alias, attributes)] = image_attributes(
            body, "PreEntityImages" if body["MessageName"] == "Delete" else "PostEntityImages").items()
        assert alias == ("PreImage" if body["MessageName"] == "Delete" else "PostImage")
        assert set(attributes) <= mapped
        assert "dot_name" not in attributes  # written, but not a mapped column
        assert {"dot_assettag", "dot_mutcdcode", "dot_latitude", "dot_longitude", "dot_signassetid"} <= set(attributes)
        change = parse_remote_execution_context(body)
        assert change.key == key
        if body["MessageName"] == "Update":
            assert change.record.values["dot_route"] == "VA-7 BUS"
            assert change.record.values["dot_assettag"] == "REG-0001"  # from the post-image, not the Target
            step_id = body["OwningExtension"]["Id"]
            [step] = [s for s in sandbox.dv.registrations()["sdkmessageprocessingsteps"]
                      if s["sdkmessageprocessingstepid"] == step_id]
            assert step["name"] == "Syncline: Update of dot_signasset"


async def test_webhookkey_and_querystring_auth_and_a_rotated_secret(
        sandbox: Sandbox, services: Services, receiver: Receiver):
    report = await register_dataverse_webhook(services, endpoint_url=receiver.url, auth="webhookkey",
                                              secret="function-key-1")
    assert report.counts()["created"] == len(report.items)
    key = sandbox.dv.apply_change("dot_workorders", {"dot_name": "WO-1", "dot_worktype": 100000000,
                                                     "dot_status": 100000000})
    await sandbox.dv.flush_webhooks()
    [(headers, query, _body)] = receiver.posts
    assert query == {"code": "function-key-1"}
    assert "x-syncline-key" not in headers

    # Same name, other auth: the endpoint is updated in place; the steps and images stay as they are.
    report = await register_dataverse_webhook(services, endpoint_url=receiver.url, auth="querystring",
                                              secret="function-key-2")
    endpoint, *rest = report.items
    assert (endpoint.kind, endpoint.action) == ("service endpoint", "updated")
    assert "auth type" in endpoint.detail
    assert "auth value" in endpoint.detail
    assert "function-key-2" not in json.dumps(report.as_dict())
    assert {i.action for i in rest} == {"unchanged"}
    receiver.posts.clear()
    sandbox.dv.apply_change("dot_workorders", {"dot_status": 100000001}, key=key)
    await sandbox.dv.flush_webhooks()
    [(_headers, query, _body)] = receiver.posts
    assert query == {"code": "function-key-2"}

    # Only the secret rotates: the fingerprint in the description notices (authvalue cannot be read back).
    report = await register_dataverse_webhook(services, endpoint_url=receiver.url, auth="querystring",
                                              secret="function-key-3")
    assert report.items[0].action == "updated"
    assert report.items[0].detail.startswith("auth value changed")
    again = await register_dataverse_webhook(services, endpoint_url=receiver.url, auth="querystring",
                                             secret="function-key-3")
    assert again.counts()["unchanged"] == len(again.items)


async def test_changing_the_mapped_columns_updates_the_images(sandbox: Sandbox, services: Services,
                                                              receiver: Receiver):
    await register_dataverse_webhook(services, endpoint_url=receiver.url, auth="header", secret=SECRET)
    narrower = without_dot_route(SPEC.read_text(encoding="utf-8"))
    assert "dot_route" not in mapped_columns(narrower, "dot_signassets")

    report = await register_dataverse_webhook(services, narrower, endpoint_url=receiver.url, auth="header",
                                              secret=SECRET)
    changed = {(i.kind, i.name): i for i in report.items if i.action != "unchanged"}
    assert sorted(changed) == [
        ("image", "Syncline: Create of dot_signasset / PostImage"),
        ("image", "Syncline: Delete of dot_signasset / PreImage"),
        ("image", "Syncline: Update of dot_signasset / PostImage"),
        ("step", "Syncline: Update of dot_signasset"),  # its filtering attributes follow the mapped columns
    ]
    assert all(i.action == "updated" for i in changed.values())
    assert changed[("image", "Syncline: Update of dot_signasset / PostImage")].detail == "attributes -dot_route"
    images = sandbox.dv.registrations()["sdkmessageprocessingstepimages"]
    assert len(images) == 3 * len(DV_TABLES)  # updated in place, nothing added
    assert all("dot_route" not in i["attributes"].split(",") for i in images)

    key = sandbox.dv.apply_change("dot_signassets", SIGN)
    sandbox.dv.apply_change("dot_signassets", {"dot_route": "US-29"}, key=key)  # no longer a filtering attribute
    sandbox.dv.apply_change("dot_signassets", {"dot_milepost": 13.0}, key=key)
    await sandbox.dv.flush_webhooks()
    bodies = [json.loads(raw) for _h, _q, raw in receiver.posts]
    assert sorted(b["MessageName"] for b in bodies) == ["Create", "Update"]  # delivered in parallel
    for body in bodies:
        [attributes] = image_attributes(body, "PostEntityImages").values()
        assert "dot_route" not in attributes
        assert "dot_milepost" in attributes

    back = await register_dataverse_webhook(services, endpoint_url=receiver.url, auth="header", secret=SECRET)
    assert {i.name for i in back.items if i.action == "updated"} == {n for _k, n in changed}


async def test_a_disabled_step_stops_deliveries_until_registration_enables_it(
        sandbox: Sandbox, services: Services, receiver: Receiver):
    await register_dataverse_webhook(services, endpoint_url=receiver.url, auth="header", secret=SECRET)
    [step] = await dataverse(services).select("sdkmessageprocessingsteps",
                                              equals={"name": "Syncline: Create of dot_workorder"})
    [disabled] = await dataverse(services).write([WriteOp("disable", "update", "sdkmessageprocessingsteps",
                                                          key=step.key, values={"statecode": 1, "statuscode": 2})])
    assert disabled.ok
    work_order = {"dot_name": "WO-2", "dot_worktype": 100000000, "dot_status": 100000000}
    sandbox.dv.apply_change("dot_workorders", work_order)
    await sandbox.dv.flush_webhooks()
    assert receiver.posts == []

    report = await register_dataverse_webhook(services, endpoint_url=receiver.url, auth="header", secret=SECRET)
    [(name, detail)] = [(i.name, i.detail) for i in report.items if i.action != "unchanged"]
    assert (name, detail) == ("Syncline: Create of dot_workorder", "enabled changed")
    sandbox.dv.apply_change("dot_workorders", {**work_order, "dot_name": "WO-3"})
    await sandbox.dv.flush_webhooks()
    assert len(receiver.posts) == 1


async def test_the_simulator_refuses_registrations_dataverse_would_refuse(sandbox: Sandbox, services: Services):
    client = dataverse(services)
    await register_dataverse_webhook(services, endpoint_url="https://fn.example.org/x", auth="header", secret=SECRET)
    [step] = await client.select("sdkmessageprocessingsteps", equals={"name": "Syncline: Create of dot_signasset"})

    async def refused(op: WriteOp) -> str:
        [result] = await client.write([op])
        assert not result.ok
        assert result.error is not None
        return result.error.detail

    assert "settings" in await refused(WriteOp("e", "upsert", "serviceendpoints", key=str(uuid.uuid4()), values={
        "name": "bad", "contract": 8, "url": "https://fn.example.org/y", "authtype": 5, "authvalue": "k=v"}))
    assert "post-operation" in await refused(WriteOp("s", "update", "sdkmessageprocessingsteps", key=step.key,
                                                     values={"stage": 20}))
    image = {"name": "Pre", "entityalias": "Pre", "imagetype": 0, "messagepropertyname": "Id", "attributes": ""}
    bind = {"sdkmessageprocessingstepid": Bind("sdkmessageprocessingsteps", step.key)}
    assert "only have a PostImage" in await refused(WriteOp("i", "upsert", "sdkmessageprocessingstepimages",
                                                            key=str(uuid.uuid4()), values=image, binds=bind))
    assert "'dot_nosuchcolumn' is not an attribute" in await refused(WriteOp(
        "i", "upsert", "sdkmessageprocessingstepimages", key=str(uuid.uuid4()),
        values={**image, "imagetype": 1, "attributes": "dot_assettag,dot_nosuchcolumn"}, binds=bind))


async def test_dataverse_registration_refuses_bad_input(services: Services):
    with pytest.raises(ValueError, match="absolute"):
        await register_dataverse_webhook(services, endpoint_url="/api/webhooks/dataverse", auth="header",
                                         secret=SECRET)
    with pytest.raises(ValueError, match="code="):
        await register_dataverse_webhook(services, endpoint_url="https://fn.example.org/x?code=k",
                                         auth="webhookkey", secret=SECRET)
    with pytest.raises(ValueError, match="empty"):
        await register_dataverse_webhook(services, endpoint_url="https://fn.example.org/x", auth="header",
                                         secret="")


async def test_a_registered_step_drives_the_function_end_to_end(sandbox: Sandbox, services: Services):
    """Dataverse -> Syncline's own HTTP trigger (x-syncline-key + function key) -> ArcGIS, no helper webhook."""
    from sandbox.funchost import build_app

    set_services(None)  # the host builds its own services on its own loop, from the sandbox settings
    host = RunningServer(build_app(function_key=FUNCTION_KEY)).start()
    try:
        await register_dataverse_webhook(
            services, endpoint_url=f"{host.url}/api/webhooks/dataverse?code={FUNCTION_KEY}", auth="header",
            secret=WEBHOOK_SECRET)
        await register_arcgis_webhook(arcgis(services), hook_url=f"{host.url}/api/webhooks/arcgis?code={FUNCTION_KEY}",
                                      signature_key=SIGNATURE_KEY)
        key = sandbox.dv.apply_change("dot_signassets", SIGN)
        await sandbox.dv.flush_webhooks()
        assert not sandbox.dv.webhook_failures
        [feature] = [f for f in sandbox.ag.all("SignAssets") if f.get("DV_ID") == key]
        assert (feature["ASSET_TAG"], feature["MUTCD_CODE"], feature["ROUTE"]) == ("REG-0001", "W3-1", "VA-7")
        await sandbox.ag.flush_webhooks()  # our own write comes back from ArcGIS, signed

        sandbox.ag.field_edit("SignAssets", feature["GlobalID"], {"CONDITION": "POOR"})
        await sandbox.ag.flush_webhooks()
        deliveries = [d for d in sandbox.ag.webhook_deliveries if d.kind == "feature-service"]
        assert deliveries
        assert {d.status for d in deliveries} == {202}  # the signature verified
        depth = await services.queue.depth()
        assert depth.active >= 1  # a poll hint for SignAssets waits for the controller
    finally:
        host.stop()
        set_services(None)


# ============================================================================================ ArcGIS


def snapshot(box: Sandbox) -> list[dict[str, Any]]:
    return [dataclasses.asdict(reg) for reg in box.ag.webhooks()]


async def test_arcgis_registration_is_idempotent_and_delivers_signed(sandbox: Sandbox, services: Services,
                                                                     receiver: Receiver, caplog):
    caplog.set_level(logging.DEBUG)
    client = arcgis(services)
    first = await register_arcgis_webhook(client, hook_url=receiver.url, signature_key=SIGNATURE_KEY)
    assert [(i.kind, i.name, i.action) for i in first.items] == [("webhook", "Syncline", "created")]
    before = snapshot(sandbox)
    second = await register_arcgis_webhook(client, hook_url=receiver.url, signature_key=SIGNATURE_KEY)
    assert [i.action for i in second.items] == ["unchanged"]
    assert snapshot(sandbox) == before

    [listed] = await client.list_webhooks()
    assert listed["name"] == "Syncline"
    assert listed["active"] is True
    assert set(listed["changeTypes"]) == {"FeaturesCreated", "FeaturesUpdated", "FeaturesDeleted",
                                          "AttachmentsCreated"}
    for text in (json.dumps(first.as_dict()), json.dumps(second.as_dict()), caplog.text):
        assert SIGNATURE_KEY not in text

    gid = sandbox.ag.field_add("SignAssets", {"ASSET_TAG": "REG-2", "MUTCD_CODE": "R1-1", "SIGN_TYPE": "REG"})
    await sandbox.ag.flush_webhooks()
    [(headers, _query, body)] = receiver.posts
    assert verify_signature(body, headers["x-esrihook-signature"], SIGNATURE_KEY)
    [entry] = json.loads(body)
    assert (entry["name"], entry["events"]) == ("Syncline", ["FeaturesCreated"])

    # A new key, fewer events and a deactivated hook are all brought back by one edit.
    third = await register_arcgis_webhook(client, hook_url=receiver.url, signature_key="rotated-key-9",
                                          change_types=("FeaturesCreated",))
    assert third.items[0].action == "updated"
    assert third.items[0].detail.startswith("change types, signature key changed")
    await client.edit_webhook(str(listed["id"]), {"active": "false"})
    receiver.posts.clear()
    sandbox.ag.field_add("SignAssets", {"ASSET_TAG": "REG-3", "MUTCD_CODE": "R1-1", "SIGN_TYPE": "REG"})
    await sandbox.ag.flush_webhooks()
    assert receiver.posts == []  # inactive: nothing delivered
    fourth = await register_arcgis_webhook(client, hook_url=receiver.url, signature_key="rotated-key-9",
                                           change_types=("FeaturesCreated",))
    assert fourth.items[0].detail.startswith("active changed")
    sandbox.ag.field_edit("SignAssets", gid, {"ROUTE": "I-64"})  # an update: no longer subscribed
    sandbox.ag.field_add("SignAssets", {"ASSET_TAG": "REG-4", "MUTCD_CODE": "R1-1", "SIGN_TYPE": "REG"})
    await sandbox.ag.flush_webhooks()
    [(headers, _query, body)] = receiver.posts
    assert verify_signature(body, headers["x-esrihook-signature"], "rotated-key-9")
    assert len(sandbox.ag.webhooks()) == 1


async def test_arcgis_refuses_a_sixth_webhook(sandbox: Sandbox, services: Services, receiver: Receiver):
    for n in range(5):
        sandbox.ag.register_webhook(f"https://hooks.example.org/{n}", name=f"other-{n}")
    client = arcgis(services)
    with pytest.raises(RejectedError, match="maximum of 5") as err:
        await register_arcgis_webhook(client, hook_url=receiver.url, signature_key=SIGNATURE_KEY)
    assert "other-0" in err.value.detail
    # The service enforces it too (the admin API, not just the helper's pre-check).
    with pytest.raises(RejectedError, match="A maximum of 5 webhooks"):
        await client.create_webhook({"name": "sixth", "hookUrl": receiver.url, "changeTypes": "*"})
    # An existing webhook of the name is still edited: the limit is about new ones.
    report = await register_arcgis_webhook(client, hook_url=receiver.url, signature_key=SIGNATURE_KEY,
                                           name="other-3")
    assert report.items[0].action == "updated"
    assert len(sandbox.ag.webhooks()) == 5


async def test_arcgis_refuses_a_service_without_change_tracking(sandbox: Sandbox, services: Services,
                                                                receiver: Receiver):
    sandbox.ag.change_tracking = False
    client = arcgis(services)
    with pytest.raises(RejectedError, match="lacks the ChangeTracking capability"):
        await register_arcgis_webhook(client, hook_url=receiver.url, signature_key=SIGNATURE_KEY)
    with pytest.raises(RejectedError, match="ChangeTracking"):
        await client.create_webhook({"name": "x", "hookUrl": receiver.url})
    assert sandbox.ag.webhooks() == []


# ============================================================================================ CLI


def test_cli_register_webhook_both_systems(sandbox: Sandbox):
    runner = CliRunner()
    env = {"COLUMNS": "220", "REG_FUNCTION_KEY": "cli-function-key-77"}
    dv_url = "https://fn.example.org/api/webhooks/dataverse"
    args = ["dataverse", "register-webhook", "--endpoint-url", f"{dv_url}?code={FUNCTION_KEY}"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "25 created, 0 updated, 0 unchanged" in result.output
    assert "Syncline: Update of dot_signasset" in result.output
    assert WEBHOOK_SECRET not in result.output  # the default secret: the SYNCLINE_WEBHOOK_SECRET setting
    assert FUNCTION_KEY not in result.output
    [endpoint] = sandbox.dv.registrations()["serviceendpoints"]
    assert WEBHOOK_SECRET in endpoint["authvalue"]

    again = runner.invoke(app, args, env=env)
    assert again.exit_code == 0, again.output
    assert "0 created, 0 updated, 25 unchanged" in again.output

    switched = runner.invoke(app, ["dataverse", "register-webhook", "--endpoint-url", dv_url, "--auth", "webhookkey",
                                   "--secret-from-env", "REG_FUNCTION_KEY"], env=env)
    assert switched.exit_code == 0, switched.output
    assert "0 created, 1 updated, 24 unchanged" in switched.output
    assert "SYNCLINE_WEBHOOK_SECRET is set" in switched.output  # the function would still want the header
    [endpoint] = sandbox.dv.registrations()["serviceendpoints"]
    assert (endpoint["authtype"], endpoint["authvalue"]) == (4, "cli-function-key-77")

    ag_args = ["arcgis", "register-webhook", "--endpoint-url", "https://fn.example.org/api/webhooks/arcgis"]
    result = runner.invoke(app, ag_args, env=env)
    assert result.exit_code == 0, result.output
    assert "1 created, 0 updated, 0 unchanged" in result.output
    assert SIGNATURE_KEY not in result.output
    [hook] = sandbox.ag.webhooks()
    assert hook.signature_key == SIGNATURE_KEY  # ARCGIS__WEBHOOK_SIGNATURE_KEY by default
    assert runner.invoke(app, ag_args, env=env).output.count("unchanged") >= 1


def test_cli_register_webhook_fails_with_one_line_and_exit_2(sandbox: Sandbox):
    runner = CliRunner()
    env = {"COLUMNS": "220"}
    missing = runner.invoke(app, ["dataverse", "register-webhook", "--endpoint-url", "https://fn.example.org/x",
                                  "--secret-from-env", "REG_NOT_SET"], env=env)
    assert missing.exit_code == 2
    assert missing.output.strip().count("\n") == 0
    assert "REG_NOT_SET" in missing.output

    no_key = runner.invoke(app, ["dataverse", "register-webhook", "--endpoint-url", "https://fn.example.org/x",
                                 "--auth", "webhookkey"], env=env)
    assert no_key.exit_code == 2
    assert "--secret-from-env" in no_key.output

    for n in range(5):
        sandbox.ag.register_webhook(f"https://hooks.example.org/{n}", name=f"other-{n}")
    full = runner.invoke(app, ["arcgis", "register-webhook", "--endpoint-url", "https://fn.example.org/y"], env=env)
    assert full.exit_code == 2
    assert full.output.strip().count("\n") == 0
    assert "maximum of 5" in full.output
    assert SIGNATURE_KEY not in full.output

