"""Protocol-faithful simulator of an ArcGIS Online hosted feature service and its token endpoint (Starlette ASGI)."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.arcgis.auth import SHARING_PATH, TOKEN_PATH, SimAuth
from sandbox.arcgis.changes import SimChanges
from sandbox.arcgis.codecs import WEB_MERCATOR, canonical_guid
from sandbox.arcgis.definitions import SimDefinitions
from sandbox.arcgis.edits import SimEdits
from sandbox.arcgis.errors import _MESSAGES, RestError
from sandbox.arcgis.faults import Faults, _Fault
from sandbox.arcgis.query import SimQuery
from sandbox.arcgis.schema import LayerDef, dot_layers
from sandbox.arcgis.store import EDIT_FIELDS, _Change, _Feature, _Layer
from sandbox.arcgis.webhooks import SimWebhooks, WebhookDelivery, WebhookRegistration
from sandbox.webhook_delivery import Deliverer
from shared.core.ports import GEOMETRY_KEY

DEFAULT_ORG_ID = "Sy9cL1neD0TsIgn5"
DEFAULT_SERVICE_NAME = "DOT_Signs"
DEFAULT_CLIENT_ID = "SynclineSimApp01"
DEFAULT_CLIENT_SECRET = "sim-arcgis-secret-7f3c1e9a5b2d4c6e"  # a fixed test secret
DEFAULT_APP_USERNAME = "syncline_app"
"""Editor/Creator recorded for edits made with the default app's tokens (Syncline's own writes)."""
DEFAULT_API_KEY = "AAPKsimSyncline0123456789abcdefApiKey"
DEFAULT_API_KEY_USERNAME = "syncline_apikey"


class ArcGISSimulator(SimAuth, SimWebhooks, SimQuery, SimEdits, SimChanges, SimDefinitions):
    """An in-memory ArcGIS Online org with one hosted feature service, its token endpoint, webhooks and faults.

    Serve `.app` with `sandbox.server.RunningServer(sim.app)`; then `sim.token_url(server.url)` and
    `sim.service_url(server.url)` are the URLs a client needs. What it does beyond the reference
    (marked [I] there, chosen here and kept consistent with the connector):

    - errors are HTTP 200 `{"error": ...}` bodies; a where clause outside the supported grammar, an unknown
      field or a type mismatch answers code 400 "Unable to complete operation.";
    - string comparisons are case-insensitive (hosted data's collation); GUIDs compare case-insensitively;
      a date field compares only with `TIMESTAMP '...'` / `DATE '...'` literals (standardized queries);
    - applyEdits per-feature errors: update of a missing feature 1019 "Object is missing.", delete of a
      missing one 1011, a value of the wrong type or too long 1016, a null in a non-nullable field 1001, an
      add without GlobalID under useGlobalIds 1020, a duplicate GlobalID 1022,
      an unknown field 1000. With rollbackOnFailure=true (the default) any failure rejects the whole call
      with a top-level error and nothing is applied;
    - one applyEdits (or helper edit) is one transaction: one new serverGen, one EditDate for all features;
    - extractChanges: `deleteIds` are object ids; `returnDeletedFeatures=true` adds `deletes` with the
      deleted features' last attributes (GlobalID included); `returnIdsOnly=true` answers
      `objectIds: {adds, updates, deletes}` per layer; `returnAttachments=true` lists attachment changes
      (metadata, not data); `async=true` answers a `statusUrl` job;
    - tokens: client credentials only; editor tracking records the app's username (`app_username`);
    - webhooks (admin API at `admin_path`): `WebHooks` lists a bare array of webhook objects (the ArcGIS
      Online list shape, `signatureKey` echoed as stored), `WebHooks/create` and `WebHooks/<id>/edit`
      answer the webhook object, `WebHooks/<id>/delete` `{"success": true}`. Create refuses (code 400) a
      service without ChangeTracking, a sixth webhook, and a hook URL already receiving overlapping events;
      edit keeps absent parameters. Admin-created and `register_webhook` webhooks share one list, count
      against the same limit and deliver alike; inactive ones deliver nothing. The create-time reachability
      probe of the hook URL is not simulated;
    - layer definitions (admin API, `sandbox/arcgis/definitions.py`): `<admin>/<layer>` answers the definition
      with `adminLayerInfo`; `addToDefinition` adds fields, `updateDefinition` sets a field's alias or domain
      (coded values checked against the field's type and length), `refresh` answers success. A refused change
      applies nothing and answers HTTP 200 `{"error": {"code": 400, ...}}`; accepted ones show in `<layer>?f=json`.
    """

    APP_ITEM_ID = "5f0c6d3e2b8a4e71a9d4c3b2a1f0e9d8"
    """Item id of the registered app in the portal (`appInfo.itemId`)."""

    def __init__(
        self,
        layers: Sequence[LayerDef] | None = None,
        *,
        org_id: str = DEFAULT_ORG_ID,
        service_name: str = DEFAULT_SERVICE_NAME,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        app_username: str = DEFAULT_APP_USERNAME,
        api_key: str | None = DEFAULT_API_KEY,
        api_key_username: str = DEFAULT_API_KEY_USERNAME,
        max_record_count: int = 2000,
        change_tracking: bool = True,
        guid_case: str = "upper",
        token_lifetime_seconds: int = 7200,
        latency_ms: float = 0.0,
        clock: Callable[[], int] | None = None,
        base_url: str | None = None,
    ) -> None:
        if guid_case not in ("upper", "lower", "mixed"):
            raise ValueError("guid_case must be upper, lower or mixed")
        self.org_id = org_id
        self.service_name = service_name
        self.client_id = client_id
        self.client_secret = client_secret
        """Credentials of the default app (client credentials grant); its edits are recorded as `app_username`."""
        self.app_username = app_username
        self.api_key = api_key
        """An API key accepted as a token (None: API keys disabled); its edits are recorded as `api_key_username`."""
        self.service_path = f"/{org_id}/arcgis/rest/services/{service_name}/FeatureServer"
        self.admin_path = f"/{org_id}/arcgis/rest/admin/services/{service_name}/FeatureServer"
        """The service's admin resource (ArcGIS Online's `.../rest/admin/services/<Service>/FeatureServer`)."""
        self.change_tracking = change_tracking
        self.guid_case = guid_case
        """How GUIDs are written in responses (the real service varies); stored values are canonical."""
        self.token_lifetime_seconds = token_lifetime_seconds
        self.latency_ms = latency_ms
        self.clock: Callable[[], int] = clock or (lambda: int(time.time() * 1000))
        """Epoch milliseconds for editor tracking."""
        self.base_url = base_url.rstrip("/") if base_url else None
        """Public base URL used in webhook `changesUrl`s (default: the last request's base URL)."""
        self.faults = Faults(self._expire_tokens)
        self.request_count: Counter[str] = Counter()
        """Requests per operation: token, service, layer, query, applyEdits, extractChanges, attachments, ..."""
        self.peak_in_flight: Counter[str] = Counter()
        """Most requests of one operation the simulator was serving at the same time."""
        self.webhook_deliveries: list[WebhookDelivery] = []
        self._in_flight: Counter[str] = Counter()
        self._apps: dict[str, tuple[str, str]] = {client_id: (client_secret, app_username)}
        self._api_keys: dict[str, str] = {api_key: api_key_username} if api_key else {}
        self._tokens: dict[str, tuple[str, float]] = {}
        self._token_apps: dict[str, str] = {}
        """OAuth token -> the client_id it was issued to (the portal's `appInfo`)."""
        self._lock = threading.RLock()
        self._layers: dict[int, _Layer] = {d.id: _Layer(d, max_record_count)
                                           for d in (layers if layers is not None else dot_layers())}
        self._gen = 1000
        self._min_gen = self._gen
        self._attachment_ids = itertools.count(1)
        self._jobs: dict[str, Any] = {}
        self._webhooks: list[WebhookRegistration] = []
        self._webhook_ids = itertools.count(1)
        self._survey_hooks: list[tuple[str, dict[str, str]]] = []
        self._seen_base: str | None = None
        self._deliveries = Deliverer("arcgis-sim-webhooks")
        self.app = Starlette(routes=[Route("/{path:path}", self._entry, methods=["GET", "POST"])])

    # ------------------------------------------------------------------------------------ urls & config

    def token_url(self, base: str) -> str:
        """The OAuth2 token endpoint under `base` (e.g. RunningServer.url)."""
        return base.rstrip("/") + TOKEN_PATH

    def service_url(self, base: str) -> str:
        """The FeatureServer URL under `base`."""
        return base.rstrip("/") + self.service_path

    def add_application(self, client_id: str, client_secret: str, *, username: str) -> None:
        """Register another app (client credentials) whose edits are recorded as `username`."""
        self._apps[client_id] = (client_secret, username)

    def add_api_key(self, key: str, *, username: str) -> None:
        """Accept another API key, whose edits are recorded as `username`."""
        self._api_keys[key] = username

    def set_max_record_count(self, n: int, layer: str | int | None = None) -> None:
        """Change `maxRecordCount` of one layer (or all)."""
        for lyr in self._layers.values() if layer is None else [self._layer(layer)]:
            lyr.max_record_count = n

    @property
    def server_gen(self) -> int:
        """The service's current serverGen."""
        return self._gen

    # ------------------------------------------------------------------------------------ direct helpers

    def field_add(self, layer: str | int, attrs: Mapping[str, Any], geometry: Mapping[str, Any] | None = None,
                  *, user: str = "crew1") -> str:
        """Emulate a field user adding a feature (Field Maps): validated, tracked, webhooks fired. Returns GlobalID."""
        lyr = self._layer(layer)
        result = self._helper_edit(lyr, user, adds=[{"attributes": dict(attrs), "geometry": geometry}])
        return str(result["addResults"][0]["globalId"])

    def field_edit(self, layer: str | int, globalid: str, attrs: Mapping[str, Any], *,
                   geometry: Mapping[str, Any] | None = None, user: str = "crew1") -> None:
        """Emulate a field user editing a feature: bumps serverGen and EditDate, Editor = `user`, fires webhooks."""
        lyr = self._layer(layer)
        update: dict[str, Any] = {"attributes": {**attrs, lyr.gid_field: globalid}}
        if geometry is not None:
            update["geometry"] = geometry
        self._helper_edit(lyr, user, updates=[update])

    def field_delete(self, layer: str | int, globalid: str, *, user: str = "crew1") -> None:
        """Emulate a field user deleting a feature."""
        self._helper_edit(self._layer(layer), user, deletes=[globalid])

    def field_attach(self, layer: str | int, globalid: str, name: str, content_type: str, data: bytes, *,
                     user: str = "crew1") -> int:
        """Emulate a field user adding a photo to a feature; returns the attachment id."""
        lyr = self._layer(layer)
        changes: list[_Change] = []
        with self._lock:
            oid = lyr.by_gid.get(canonical_guid(globalid) or "")
            if oid is None:
                raise KeyError(f"{lyr.d.name}: no feature {globalid}")
            att = self._add_attachment(lyr, oid, name, content_type, data, "", changes)
        self._emit(changes)
        return att.id

    def all(self, layer: str | int) -> list[dict[str, Any]]:
        """Copies of every feature's attributes (canonical values), geometry under "@geometry" (102100)."""
        lyr = self._layer(layer)
        with self._lock:
            return [self._plain(lyr, f) for f in lyr.features.values()]

    def get(self, layer: str | int, globalid: str) -> dict[str, Any] | None:
        """One feature like `all`, or None."""
        lyr = self._layer(layer)
        with self._lock:
            oid = lyr.by_gid.get(canonical_guid(globalid) or "")
            return self._plain(lyr, lyr.features[oid]) if oid is not None else None

    def attachments(self, layer: str | int, globalid: str) -> list[dict[str, Any]]:
        """A feature's attachments: id, name, contentType, size, data."""
        lyr = self._layer(layer)
        with self._lock:
            oid = lyr.by_gid.get(canonical_guid(globalid) or "")
            if oid is None:
                return []
            return [{"id": a.id, "name": a.name, "contentType": a.content_type, "size": len(a.data), "data": a.data}
                    for a in lyr.features[oid].attachments.values()]

    def _plain(self, lyr: _Layer, f: _Feature) -> dict[str, Any]:
        out = dict(f.attrs)
        if not lyr.is_table:
            out[GEOMETRY_KEY] = None if f.geometry is None else \
                {"x": f.geometry[0], "y": f.geometry[1], "spatialReference": dict(WEB_MERCATOR)}
        return out

    def _helper_edit(self, lyr: _Layer, user: str, *, adds: list[Any] | None = None,
                     updates: list[Any] | None = None, deletes: list[Any] | None = None) -> dict[str, Any]:
        changes: list[_Change] = []
        try:
            with self._lock:
                result = self._edit(lyr, adds or [], updates or [], deletes or [], use_gids=bool(updates or deletes),
                                    rollback=True, in_sr=None, user=user, changes=changes)
        except RestError as err:
            raise ValueError(f"{lyr.d.name}: edit rejected: {'; '.join(err.details) or err.message}") from err
        self._emit(changes)
        return result

    # ------------------------------------------------------------------------------------ Survey123

    def survey123_submit(
        self,
        attributes: Mapping[str, Any],
        attachments: Sequence[tuple[str, str, bytes]] = (),
        *,
        hook_url: str | None = None,
        geometry: Mapping[str, Any] | None = None,
        globalid: str | None = None,
        user: str = "surveyor1",
        layer: str | int = "Inspections",
        question: str = "photo",
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Emulate a Survey123 submission: write the feature (and photos), then POST the Survey123 webhook body.

        `attachments` are (name, content type, bytes). With `globalid` the submission edits that record
        (`eventType` editData), else it adds one (addData). The body goes to `hook_url`, or else to every
        URL given to `register_survey123_webhook` (none: only the feature-service webhooks fire). Returns
        the record's GlobalID.
        """
        lyr = self._layer(layer)
        changes: list[_Change] = []
        gid = canonical_guid(globalid) if globalid else "{" + str(uuid.uuid4()).upper() + "}"
        if gid is None:
            raise ValueError(f"{globalid!r} is not a GlobalID")
        feature: dict[str, Any] = {"attributes": {**attributes, lyr.gid_field: gid}}
        if geometry is not None:
            feature["geometry"] = dict(geometry)
        try:
            with self._lock:
                if globalid:
                    result = self._edit(lyr, [], [feature], [], use_gids=True, rollback=True, in_sr=None,
                                        user=user, changes=changes)
                    outcome = result["updateResults"][0]
                else:
                    result = self._edit(lyr, [feature], [], [], use_gids=True, rollback=True, in_sr=None,
                                        user=user, changes=changes)
                    outcome = result["addResults"][0]
                oid = int(outcome["objectId"])
                infos = []
                for name, content_type, data in attachments:
                    att = self._add_attachment(lyr, oid, name, content_type, data, question, changes)
                    infos.append({"id": att.id, "globalId": self._guid_out(att.global_id), "name": att.name,
                                  "contentType": att.content_type, "size": len(att.data), "keywords": question,
                                  "url": f"{self._public_base()}{self.service_path}/{lyr.d.id}/{oid}/attachments/"
                                         f"{att.id}", "parentGlobalId": self._guid_out(gid)})
        except RestError as err:
            raise ValueError(f"{lyr.d.name}: submission rejected: {'; '.join(err.details)}") from err
        self._emit(changes)
        gid_out = self._guid_out(gid)
        edit_key = "updates" if globalid else "adds"
        result_key = "updateResults" if globalid else "addResults"
        body = {
            "applyEdits": [{"id": lyr.d.id, edit_key: [feature]}],
            "response": [{"id": lyr.d.id, result_key: [{"objectId": oid, "uniqueId": oid, "globalId": gid_out,
                                                          "success": True}]}],
            "feature": {
                "attributes": {**attributes, lyr.gid_field: gid_out, lyr.oid_field: oid},
                "geometry": feature.get("geometry"),
                "layerInfo": {"id": lyr.d.id, "name": lyr.d.name, "type": "Table" if lyr.is_table else
                              "Feature Layer", "globalIdField": lyr.gid_field, "objectIdField": lyr.oid_field,
                              "relationships": []},
                "result": {"globalId": gid_out, "objectId": oid, "uniqueId": oid, "success": True},
                "attachments": {question: infos} if infos else None,
            },
            "eventType": "editData" if globalid else "addData",
            "portalInfo": {"url": "https://www.arcgis.com", "token": "<redacted>"},
            "userInfo": {"username": user, "firstName": user, "lastName": "", "fullName": user,
                         "email": f"{user}@example.org"},
            "surveyInfo": {"formItemId": "9300861aa41049b9bf28897ba2f48796", "formTitle": "DOT sign inspection",
                           "serviceItemId": "e2550f19c1c34f5d988080b214c47c02",
                           "serviceUrl": f"{self._public_base()}{self.service_path}"},
        }
        targets = [(hook_url, dict(headers or {}))] if hook_url else \
            [(url, {**extra, **(headers or {})}) for url, extra in self._survey_hooks]
        for url, extra in targets:
            self._send(url, "survey123", json.dumps(body).encode(), {"Content-Type": "application/json", **extra})
        return gid_out

    # ------------------------------------------------------------------------------------ http

    async def _entry(self, request: Request) -> Response:
        path = request.url.path
        params: dict[str, str] = dict(request.query_params)
        files: dict[str, tuple[str, str, bytes]] = {}
        if request.method == "POST":
            ctype = request.headers.get("content-type", "")
            if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
                async with request.form(max_part_size=16 * 1024 * 1024) as form:
                    for key, value in form.multi_items():
                        if isinstance(value, UploadFile):
                            files[key] = (value.filename or "attachment", value.content_type or
                                          "application/octet-stream", await value.read())
                        else:
                            params[key] = value
        self._seen_base = str(request.base_url).rstrip("/")
        if path == TOKEN_PATH:
            return await self._token_endpoint(request.method, path, params)
        if path.lower().startswith(SHARING_PATH + "/") or path.lower() == SHARING_PATH:
            return self._portal_endpoint(request, path, params)
        admin = path.lower().startswith(self.admin_path.lower())
        if not admin and not path.lower().startswith(self.service_path.lower()):
            return JSONResponse(RestError(400, "Invalid URL", ["Invalid URL"]).body())
        rest = [p for p in path[len(self.admin_path if admin else self.service_path):].split("/") if p]
        if not all(p.isascii() for p in rest):  # "²".isdigit() is true but int("²") fails: ids are ASCII digits
            return JSONResponse(RestError(400, "Invalid URL", ["Invalid URL"]).body())
        op = self._admin_op_name(rest) if admin else self._op_name(rest)
        self.request_count[op] += 1
        self._in_flight[op] += 1
        self.peak_in_flight[op] = max(self.peak_in_flight[op], self._in_flight[op])
        try:
            return await self._serve(request, path, rest, op, params, files)
        finally:
            self._in_flight[op] -= 1

    async def _serve(self, request: Request, path: str, rest: list[str], op: str, params: dict[str, str],
                     files: dict[str, tuple[str, str, bytes]]) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        slow = self.faults._take(self.faults._timeouts, path)
        if slow is not None:
            await asyncio.sleep(slow.seconds)
        fault = self.faults._take(self.faults._fail, path)
        if fault is not None:
            return self._fault_response(fault)
        download = len(rest) == 4 and rest[2] == "attachments"
        if not download and params.get("f", "html").lower() not in ("json", "pjson"):
            return Response("<html><body>ArcGIS REST Services Directory (use f=json)</body></html>",
                            media_type="text/html")
        changes: list[_Change] = []
        try:
            user = self._authenticate(params, headers)
            with self._lock:
                if op == "admin.service":
                    result = self._admin_service_json()
                elif op.startswith("admin.") and rest[0].isdigit():
                    result = self._dispatch_admin_layer(request.method, rest, params)
                elif op.startswith("admin."):
                    result = self._dispatch_admin(request.method, rest, params, user)
                else:
                    result = self._dispatch(request.method, rest, params, files, user, changes)
        except RestError as err:
            return JSONResponse(err.body())
        self._emit(changes)
        if request.method == "POST" and op in ("applyEdits", "addAttachment", "deleteAttachments"):
            ambiguous = self.faults._take(self.faults._ambiguous, path)
            if ambiguous is not None:
                return Response("<html><body><h1>504 Gateway Time-out</h1></body></html>", status_code=504,
                                media_type="text/html")
        if isinstance(result, Response):
            return result
        return JSONResponse(result)

    async def _token_endpoint(self, method: str, path: str, params: Mapping[str, str]) -> Response:
        self.request_count["token"] += 1
        fault = self.faults._take(self.faults._fail, path, aimed_only=True)
        if fault is not None:
            return self._fault_response(fault)
        if method != "POST":
            return JSONResponse(RestError(405, "Method not supported.", []).body())
        return JSONResponse(self._token(params))

    @staticmethod
    def _admin_op_name(rest: Sequence[str]) -> str:
        if not rest:
            return "admin.service"
        if rest[0].isdigit():  # a layer's admin resource: `<admin>/<layer>[/addToDefinition|updateDefinition|...]`
            return "admin.layer" if len(rest) == 1 else "admin." + rest[-1]
        return "admin." + (rest[-1] if not rest[-1].isdigit() else "webhook")

    @staticmethod
    def _op_name(rest: Sequence[str]) -> str:
        if not rest:
            return "service"
        if not rest[0].isdigit():
            return rest[0]
        if len(rest) == 1:
            return "layer"
        if len(rest) == 2:
            return rest[1] if not rest[1].isdigit() else "feature"
        if len(rest) == 3:
            return rest[2]
        return "attachment"

    def _fault_response(self, fault: _Fault) -> Response:
        body = RestError(fault.status, None, [_MESSAGES.get(fault.status, "Simulated failure.")]).body()
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
        return JSONResponse(body, status_code=200 if fault.as_http_200 else fault.status, headers=headers)

    def _dispatch(self, method: str, rest: list[str], params: dict[str, str],
                  files: dict[str, tuple[str, str, bytes]], user: str, changes: list[_Change]) -> Any:
        if not rest:
            return self._service_json()
        head = rest[0]
        if head == "extractChanges":
            if method != "POST":
                raise RestError(400, "Unable to complete operation.", ["This operation is only supported via POST."])
            return self._extract_changes(params)
        if head == "jobs" and len(rest) in (2, 3):
            return self._job(rest[1], result=len(rest) == 3)
        if not head.isdigit() or int(head) not in self._layers:
            raise RestError(400, "Invalid URL", ["Invalid URL"])
        lyr = self._layers[int(head)]
        tail = rest[1:]
        if not tail:
            return self._layer_json(lyr)
        if tail == ["query"]:
            return self._query(lyr, params)
        if tail == ["applyEdits"]:
            if method != "POST":
                raise RestError(400, "Unable to complete operation.", ["This operation is only supported via POST."])
            return self._apply_edits(lyr, params, user, changes)
        if tail == ["queryAttachments"]:
            return self._query_attachments(lyr, params)
        if not tail[0].isdigit():
            raise RestError(400, "Invalid URL", ["Invalid URL"])
        oid = int(tail[0])
        feat = lyr.features.get(oid)
        if feat is None:
            raise RestError(404, "Unable to complete operation.", [f"Feature {oid} not found."])
        if len(tail) == 1:
            return {"feature": self._render(lyr, feat, lyr.fields, True, 102100)}
        if tail[1:] == ["attachments"]:
            self._require_attachments(lyr)
            return {"attachmentInfos": [self._attachment_info(lyr, feat, a) for a in feat.attachments.values()]}
        if tail[1:] == ["addAttachment"] and method == "POST":
            self._require_attachments(lyr)
            upload = files.get("attachment")
            if upload is None:
                return {"addAttachmentResult": {"success": False,
                                                "error": {"code": 1008, "description": "Attachment add failed."}}}
            att = self._add_attachment(lyr, oid, upload[0], upload[1], upload[2], params.get("keywords", ""),
                                       changes, user=user)
            return {"addAttachmentResult": {"objectId": att.id, "globalId": self._guid_out(att.global_id),
                                            "success": True}}
        if tail[1:] == ["deleteAttachments"] and method == "POST":
            self._require_attachments(lyr)
            return {"deleteAttachmentResults": self._delete_attachments(lyr, oid, params.get("attachmentIds", ""),
                                                                        changes)}
        if len(tail) == 3 and tail[1] == "attachments" and tail[2].isdigit():
            found = feat.attachments.get(int(tail[2]))
            if found is None:
                raise RestError(404, "Unable to complete operation.", [f"Attachment {tail[2]} not found."])
            return Response(found.data, media_type=found.content_type,
                            headers={"Content-Disposition": f'inline; filename="{found.name}"'})
        raise RestError(400, "Invalid URL", ["Invalid URL"])

    # ------------------------------------------------------------------------------------ resources

    def _service_json(self) -> dict[str, Any]:
        layers = [lyr for lyr in self._layers.values() if not lyr.is_table]
        tables = [lyr for lyr in self._layers.values() if lyr.is_table]
        caps = "Create,Delete,Query,Update,Editing" + (",ChangeTracking" if self.change_tracking else "")
        out: dict[str, Any] = {
            "currentVersion": 11.3,
            "serviceItemId": "e2550f19c1c34f5d988080b214c47c02",
            "serviceDescription": "DOT directional signing program",
            "hasVersionedData": False,
            "supportsDisconnectedEditing": False,
            "hasStaticData": False,
            "maxRecordCount": max((lyr.max_record_count for lyr in self._layers.values()), default=2000),
            "supportedQueryFormats": "JSON",
            "capabilities": caps,
            "spatialReference": dict(WEB_MERCATOR),
            "allowGeometryUpdates": True,
            "units": "esriMeters",
            "syncEnabled": False,
            "supportsApplyEditsWithGlobalIds": True,
            "editorTrackingInfo": {"enableEditorTracking": True, "enableOwnershipAccessControl": False,
                                   "allowOthersToQuery": True, "allowOthersToUpdate": True,
                                   "allowOthersToDelete": True},
            "layers": [{"id": lyr.d.id, "name": lyr.d.name, "parentLayerId": -1, "defaultVisibility": True,
                        "subLayerIds": None, "minScale": 0, "maxScale": 0, "geometryType": lyr.d.geometry_type}
                       for lyr in layers],
            "tables": [{"id": lyr.d.id, "name": lyr.d.name} for lyr in tables],
        }
        if self.change_tracking:
            out["changeTrackingInfo"] = {
                "lastSyncDate": max((lyr.last_edit for lyr in self._layers.values()), default=0),
                "layerServerGens": [{"id": i, "minServerGen": self._min_gen, "serverGen": self._gen}
                                    for i in self._layers],
            }
            out["extractChangesCapabilities"] = {
                "supportsReturnIdsOnly": True, "supportsReturnExtentOnly": False,
                "supportsReturnAttachments": True, "supportsLayerQueries": False, "supportsGeometry": False,
                "supportsFeatureReturn": True, "supportsReturnHasGeometryUpdates": False,
                "supportsFieldsToCompare": False, "supportsServerGens": True,
                "supportsReturnDeletedFeatures": True,
            }
        return out

    def _layer_json(self, lyr: _Layer) -> dict[str, Any]:
        caps = "Create,Delete,Query,Update,Editing" + (",ChangeTracking" if self.change_tracking else "")
        out: dict[str, Any] = {
            "currentVersion": 11.3,
            "id": lyr.d.id,
            "name": lyr.d.name,
            "type": "Table" if lyr.is_table else "Feature Layer",
            "geometryType": lyr.d.geometry_type,
            "objectIdField": lyr.oid_field,
            "uniqueIdField": {"name": lyr.oid_field, "isSystemMaintained": True},
            "globalIdField": lyr.gid_field,
            "fields": [f.to_json() for f in lyr.fields],
            "typeIdField": lyr.type_id_field,
            "types": [dict(t) for t in lyr.types],
            "maxRecordCount": lyr.max_record_count,
            "standardMaxRecordCount": lyr.max_record_count,
            "capabilities": caps,
            "editFieldsInfo": dict(EDIT_FIELDS),
            "editingInfo": {"lastEditDate": lyr.last_edit},
            "hasAttachments": lyr.d.has_attachments,
            "supportsApplyEditsWithGlobalIds": True,
            "supportedQueryFormats": "JSON",
            "advancedQueryCapabilities": {"supportsPagination": True, "supportsOrderBy": True,
                                          "supportsQueryWithResultType": False, "supportsReturningQueryExtent": False,
                                          "supportsQueryAttachments": lyr.d.has_attachments},
            "relationships": [],
        }
        if not lyr.is_table:
            out["extent"] = {"xmin": -20037508.34, "ymin": -20037508.34, "xmax": 20037508.34, "ymax": 20037508.34,
                             "spatialReference": dict(WEB_MERCATOR)}
        return out
