"""ArcGIS webhooks: feature-service and Survey123 bodies delivered by the simulator over loopback, then parsed."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox.arcgis import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, ArcGISSimulator
from sandbox.server import RunningServer
from shared.connectors._http import RetryPolicy
from shared.connectors.arcgis import (
    AppCredentialsAuth,
    ArcGISFeatureServiceClient,
    parse_webhook,
    verify_signature,
)
from shared.core.errors import EnvelopeError
from shared.core.ports import GEOMETRY_KEY, WriteOp

SIGNING_KEY = "hook-signing-key-5c1e"


@dataclass
class Receiver:
    """A hook endpoint that records what it was sent."""

    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def hook(self, request: Request) -> Response:
        self.received.append(({k.lower(): v for k, v in request.headers.items()}, await request.body()))
        return Response(status_code=202)


@dataclass
class HookSandbox:
    sim: ArcGISSimulator
    server: RunningServer
    receiver: Receiver
    hook_url: str


@pytest.fixture
def arcgis_hooks() -> Iterator[HookSandbox]:
    sim = ArcGISSimulator()
    receiver = Receiver()
    server = RunningServer(sim.app).start()
    hooks = RunningServer(Starlette(routes=[Route("/hook", receiver.hook, methods=["POST"])])).start()
    sim.base_url = server.url
    try:
        yield HookSandbox(sim, server, receiver, f"{hooks.url}/hook")
    finally:
        sim.close()
        hooks.stop()
        server.stop()


@pytest.fixture
async def arcgis_client(arcgis_hooks) -> AsyncIterator[ArcGISFeatureServiceClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as http:
        policy = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)
        auth = AppCredentialsAuth(arcgis_hooks.sim.token_url(arcgis_hooks.server.url), DEFAULT_CLIENT_ID,
                                  DEFAULT_CLIENT_SECRET, http, policy=policy)
        yield ArcGISFeatureServiceClient(arcgis_hooks.sim.service_url(arcgis_hooks.server.url), http, auth,
                                         policy=policy)


async def test_feature_service_webhook_is_signed_and_names_the_layer(arcgis_hooks, arcgis_client):
    sim = arcgis_hooks.sim
    sim.register_webhook(arcgis_hooks.hook_url, signature_key=SIGNING_KEY, change_types=["FeaturesEdited"])
    [result] = await arcgis_client.write([WriteOp("1", "upsert", "WorkOrders", match={"DV_ID": "dv-wo-1"},
                                                  values={"WO_NUMBER": "WO-1", "STATUS": "OPEN"})])
    assert result.ok
    gen_after = sim.server_gen
    sim.field_edit("WorkOrders", result.key, {"STATUS": "IN_PROGRESS"})
    await sim.flush_webhooks()

    assert len(arcgis_hooks.receiver.received) == 2
    # Deliveries run in parallel (as ArcGIS Online's do), so find the update's by its content, not its order.
    [(headers, body)] = [(h, b) for h, b in arcgis_hooks.receiver.received if b"FeaturesUpdated" in b]
    assert headers["content-type"] == "application/json"
    assert verify_signature(body, headers["x-esrihook-signature"], SIGNING_KEY)
    hook = parse_webhook(body, headers["content-type"])
    assert hook.kind == "feature_service"
    assert hook.record is None
    [change] = hook.changes
    assert change.layer_id == 1
    assert change.events == ("FeaturesUpdated",)
    assert hook.tables == ["WorkOrders"]  # named from the service definition the client read
    assert change.server_gens == (gen_after, sim.server_gen)
    assert change.changes_url.startswith(arcgis_client.service_url + "/extractChanges?")
    assert "FeaturesUpdated" in hook.describe()

    # The changesUrl's serverGens are a valid cursor: the change feed from there holds exactly that edit.
    pages = [page async for page in arcgis_client.changes_since("WorkOrders", str(change.server_gens[0]))]
    [record] = [r for page, _ in pages for r in page]
    assert record.key == result.key
    assert record.values["STATUS"] == "IN_PROGRESS"
    assert record.values["Editor"] == "crew1"


async def test_form_encoded_payload_and_unknown_layer_names(arcgis_hooks, arcgis_client):
    sim = arcgis_hooks.sim
    sim.register_webhook(arcgis_hooks.hook_url, content_type="application/x-www-form-urlencoded",
                         change_types=["FeaturesCreated"])
    sim.field_edit("SignAssets", sim.field_add("SignAssets", {"ASSET_TAG": "A"}), {"ROUTE": "I-94"})
    await sim.flush_webhooks()
    [(headers, body)] = arcgis_hooks.receiver.received  # the update was not subscribed
    assert "x-esrihook-signature" not in headers
    assert body.startswith(b"payload=")
    hook = parse_webhook(body, headers["content-type"], layer_names={0: "SignAssets"})
    assert hook.tables == ["SignAssets"]
    assert hook.changes[0].events == ("FeaturesCreated",)

    anonymous = parse_webhook(body, "application/x-www-form-urlencoded", layer_names={})
    assert anonymous.tables == ["0"]  # without names the layer id stands in ...
    assert await arcgis_client.tables_for(anonymous) == ["SignAssets"]  # ... and the client resolves it


def test_signature_verification_rejects_tampering():
    body = json.dumps([{"name": "h", "layerId": 0, "changesUrl": "u", "events": ["FeaturesCreated"]}]).encode()
    good = hmac.new(SIGNING_KEY.encode(), body, hashlib.sha256).hexdigest()
    assert verify_signature(body, good, SIGNING_KEY)
    assert verify_signature(body, f"sha256={good.upper()}", SIGNING_KEY)
    assert not verify_signature(body.replace(b'"layerId": 0', b'"layerId": 3'), good, SIGNING_KEY)
    assert not verify_signature(body, good, "another-key")
    assert not verify_signature(body, None, SIGNING_KEY)
    assert not verify_signature(body, "", SIGNING_KEY)


async def test_survey123_submission_is_parsed_into_a_canonical_record(arcgis_hooks, arcgis_client):
    sim = arcgis_hooks.sim
    asset = "{6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b}"
    photo = b"\xff\xd8\xff\xe0survey photo"
    gid = sim.survey123_submit(
        {"INSPECTION_DATE": 1767312000000, "INSPECTOR": "R. Diaz", "CONDITION": "POOR", "RETRO_READING": 38.5,
         "ASSET_GUID": asset, "DV_ID": "1c7e9a0b-2d3f-4e5a-8b6c-7d8e9f0a1b2c"},
        [("photo-1.jpg", "image/jpeg", photo)], hook_url=arcgis_hooks.hook_url,
        geometry={"x": -93.26, "y": 44.98, "spatialReference": {"wkid": 4326}}, user="rdiaz")
    await sim.flush_webhooks()
    [(headers, body)] = arcgis_hooks.receiver.received
    raw = json.loads(body)
    assert raw["portalInfo"]["token"] == "<redacted>"
    assert raw["eventType"] == "addData"

    hook = parse_webhook(body, headers["content-type"])
    assert hook.kind == "survey123"
    assert hook.table == "Inspections"
    assert hook.tables == ["Inspections"]
    record = hook.record
    assert record is not None
    assert record.key == gid == raw["feature"]["result"]["globalId"].upper()
    assert record.values["INSPECTOR"] == "R. Diaz"
    assert record.values["INSPECTION_DATE"] == 1767312000000
    assert record.values["ASSET_GUID"] == asset.upper()  # braced GUIDs normalised
    assert record.values["DV_ID"] == "1c7e9a0b-2d3f-4e5a-8b6c-7d8e9f0a1b2c"  # plain text left alone
    assert record.values[GEOMETRY_KEY] == {"x": -93.26, "y": 44.98, "spatialReference": {"wkid": 4326}}
    [ref] = record.attachments
    assert ref.name == "photo-1.jpg"
    assert ref.content_type == "image/jpeg"
    assert ref.size == len(photo)
    assert await arcgis_client.fetch_attachment(hook.table, record.key, ref.id) == photo
    assert hook.service_url == arcgis_client.service_url

    sim.survey123_submit({"NOTES": "second visit"}, hook_url=arcgis_hooks.hook_url, globalid=gid)
    await sim.flush_webhooks()
    edit = parse_webhook(arcgis_hooks.receiver.received[1][1], "application/json")
    assert edit.event_type == "editData"
    assert edit.record is not None
    assert edit.record.key == gid
    assert sim.get("Inspections", gid)["NOTES"] == "second visit"


def _survey(**changes: object) -> bytes:
    body: dict[str, object] = {"eventType": "addData", "feature": {
        "attributes": {"globalid": "{B3863DFC-3E46-4A7B-8366-7B7D0BA85C0D}", "objectid": 11},
        "layerInfo": {"id": 0, "name": "survey", "globalIdField": "globalid"},
        "result": {"globalId": "{B3863DFC-3E46-4A7B-8366-7B7D0BA85C0D}", "objectId": 11, "success": True}}}
    feature = body["feature"]
    assert isinstance(feature, dict)
    for key, value in changes.items():
        if key == "eventType":
            body[key] = value
        elif value is None:
            feature.pop(key, None)
        else:
            feature[key] = value
    return json.dumps(body).encode()


def test_the_esri_sample_survey_body_parses():
    hook = parse_webhook(_survey(), "application/json; charset=utf-8")
    assert hook.record is not None
    assert hook.record.key == "{B3863DFC-3E46-4A7B-8366-7B7D0BA85C0D}"
    assert hook.record.values[GEOMETRY_KEY] is None
    assert hook.table == "survey"


@pytest.mark.parametrize(("body", "content_type", "problem"), [
    (b"{not json", "application/json", "not valid JSON"),
    (b"[]", "application/json", "empty array"),
    (b'[{"layerId": "zero", "changesUrl": "u", "events": []}]', "application/json", "layerId"),
    (b'[{"layerId": 0, "events": ["FeaturesCreated"]}]', "application/json", "changesUrl"),
    (b'[{"layerId": 0, "changesUrl": "u", "events": "FeaturesCreated"}]', "application/json", "events"),
    (b"hook=" + quote("[]").encode(), "application/x-www-form-urlencoded", "no 'payload' field"),
    (b'{"hello": "world"}', "application/json", "neither a feature-service payload"),
    (_survey(eventType="deleteData"), "application/json", "eventType"),
    (_survey(result={"success": True}, attributes={"objectid": 11}), "application/json", "globalId"),
    (_survey(layerInfo={"id": 0}), "application/json", "layerInfo.name"),
    (b"\xff\xfe", "application/json", "not UTF-8"),
], ids=["not-json", "empty", "layer-id", "changes-url", "events", "form-no-payload", "unknown-shape",
        "event-type", "no-globalid", "no-layer-name", "not-utf8"])
def test_malformed_webhooks_are_envelope_errors(body, content_type, problem):
    with pytest.raises(EnvelopeError) as err:
        parse_webhook(body, content_type)
    assert problem in err.value.detail
    assert err.value.reason == "ENVELOPE_INVALID"
    assert not err.value.retriable
