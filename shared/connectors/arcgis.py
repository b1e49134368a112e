"""ArcGIS Online feature-service connector over the REST API (httpx): query, edits, changes, attachments, webhooks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

import httpx

from shared.connectors._http import RETRIABLE_STATUS, RetryPolicy, send_with_retry
from shared.core.dates import from_epoch_ms
from shared.core.errors import (
    AmbiguousWriteError,
    AuthError,
    EnvelopeError,
    MappingError,
    RejectedError,
    SpecError,
    SyncError,
    ThrottledError,
    TransientError,
    ValidationError,
)
from shared.core.ports import (
    ATTACHMENTS_KEY,
    GEOMETRY_KEY,
    Attachment,
    AttachmentRef,
    SourceRecord,
    WriteOp,
    WriteResult,
)
from shared.payloads import (
    MAX_BODY_BYTES,
    MAX_JSON_DEPTH,
    ArcGISLayerChange,
    SurveyWebhook,
    bad_values,
    read_json,
    validate,
)

log = logging.getLogger(__name__)

SYSTEM = "arcgis"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_GUID_RE = re.compile(r"^\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?$")
_BRACED_GUID_RE = re.compile(r"^\{[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}$")
_SERVICE_NAME_RE = re.compile(r"/services/([^/]+)/FeatureServer", re.IGNORECASE)
_TOKEN_ERRORS = frozenset({498, 499})
_MISSING_CODES = frozenset({1011, 1019})
"""Edit-result codes the service uses for "object is missing" (1011 per the code list, 1019 seen on updates)."""
_DUPLICATE_CODE = 1022
_WHERE_CHUNK = 200
"""Values per `IN (...)` list: keeps where clauses far below URL/form limits."""
_OID_CACHE_LIMIT = 200_000
"""Per-layer objectId -> GlobalID entries kept to resolve bare `deleteIds` (bounded memory)."""
_NUMERIC_TYPES = frozenset({"esriFieldTypeOID", "esriFieldTypeInteger", "esriFieldTypeSmallInteger",
                            "esriFieldTypeDouble", "esriFieldTypeSingle", "esriFieldTypeBigInteger"})
_GUID_TYPES = frozenset({"esriFieldTypeGUID", "esriFieldTypeGlobalID"})
DEFAULT_POLICY = RetryPolicy()


# ============================================================================================ values


def canonical_guid(value: Any) -> str | None:
    """A GlobalID/GUID as Syncline keeps it, `{XXXXXXXX-XXXX-...}` upper case; None if `value` is not a GUID."""
    if not isinstance(value, str):
        return None
    m = _GUID_RE.match(value.strip())
    return "{" + m.group(1).upper() + "}" if m else None


def epoch_ms_to_datetime(ms: int | float) -> datetime | None:
    """ArcGIS date (epoch milliseconds, UTC) -> aware datetime, without float rounding; None if out of range.

    A feature whose edit date is out of range keeps its raw value and `modified=None`: its page still reads.
    """
    return from_epoch_ms(int(ms) if isinstance(ms, float) and math.isfinite(ms) else ms)


def _datetime_to_ms(value: datetime | date) -> int:
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return (aware - _EPOCH) // timedelta(milliseconds=1)
    return (datetime(value.year, value.month, value.day, tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)


def _timestamp_literal(ms: int) -> str:
    moment = epoch_ms_to_datetime(ms)
    if moment is None:
        raise MappingError(f"arcgis: {ms} is not a date in range (epoch milliseconds of years 1-9999)")
    return f"TIMESTAMP '{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d}'"


# ============================================================================================ auth


@runtime_checkable
class ArcGISAuth(Protocol):
    """Supplies the token sent with every request (as `X-Esri-Authorization: Bearer <token>`).

    An implementation whose token cannot be renewed sets `refreshable = False`: a rejected token is then
    an AuthError at once instead of a refresh-and-replay.
    """

    async def token(self, force_refresh: bool = False) -> str:
        """A valid token; `force_refresh=True` after the service rejected the current one (498/499)."""
        ...


class ApiKeyAuth:
    """An ArcGIS API key (long-lived access token): nothing to refresh, so a rejected key is an AuthError."""

    refreshable = False

    def __init__(self, key: str) -> None:
        if not key:
            raise ValueError("an ArcGIS API key is required")
        self._key = key

    async def token(self, force_refresh: bool = False) -> str:
        return self._key


class AppCredentialsAuth:
    """OAuth2 client credentials (`POST {portal}/sharing/rest/oauth2/token`); the token is cached until expiry."""

    refreshable = True

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        http: httpx.AsyncClient,
        *,
        policy: RetryPolicy = DEFAULT_POLICY,
        expiration_minutes: int | None = None,
        refresh_margin_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._http = http
        self._policy = policy
        self._expiration_minutes = expiration_minutes
        self._margin = refresh_margin_seconds
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0
        """Tokens obtained so far (observability and tests)."""

    async def token(self, force_refresh: bool = False) -> str:
        async with self._lock:
            if not force_refresh and self._token is not None and self._clock() < self._expires_at:
                return self._token
            self._token, self._expires_at = await self._fetch()
            return self._token

    async def _fetch(self) -> tuple[str, float]:
        if not self._client_id or not self._client_secret:
            raise AuthError("arcgis: app credentials are not configured (set ARCGIS__CLIENT_ID and "
                            "ARCGIS__CLIENT_SECRET, or ARCGIS__API_KEY)")
        form = {"client_id": self._client_id, "client_secret": self._client_secret,
                "grant_type": "client_credentials", "f": "json"}
        if self._expiration_minutes:
            form["expiration"] = str(self._expiration_minutes)
        response = await send_with_retry(lambda: self._http.post(self.token_url, data=form), system=SYSTEM,
                                         policy=self._policy)
        body = _json_body(response)
        error = body.get("error") if isinstance(body, dict) else None
        if response.status_code >= 400 or not isinstance(body, dict) or error is not None:
            what = _error_text(error) if isinstance(error, Mapping) else f"HTTP {response.status_code}"
            raise AuthError(f"arcgis: the token endpoint {self.token_url} refused client {self._client_id!r}: {what}; "
                            f"check ARCGIS__CLIENT_ID / ARCGIS__CLIENT_SECRET and that the app is registered")
        token = body.get("access_token") or body.get("token")
        if not isinstance(token, str) or not token:
            raise AuthError(f"arcgis: the token endpoint {self.token_url} answered without an access_token")
        now = self._clock()
        if isinstance(body.get("expires_in"), int | float):
            lifetime = float(body["expires_in"])
        elif isinstance(body.get("expires"), int | float):  # generateToken style: epoch milliseconds
            lifetime = float(body["expires"]) / 1000 - time.time()
        else:
            lifetime = 3600.0
        self.fetches += 1
        # Refresh ahead of expiry so a token never dies mid-batch; short-lived tokens keep half their life.
        return token, now + max(lifetime - self._margin, lifetime / 2)


# ============================================================================================ metadata


@dataclass(frozen=True)
class FieldInfo:
    """One field of a layer (from the layer resource)."""

    name: str
    type: str
    nullable: bool = True
    editable: bool = True
    length: int | None = None
    domain: Mapping[str, Any] | None = None

    @property
    def kind(self) -> str:
        """num, date, guid or str: how values of this field are written in a where clause."""
        if self.type in _NUMERIC_TYPES:
            return "num"
        if self.type == "esriFieldTypeDate":
            return "date"
        if self.type in _GUID_TYPES:
            return "guid"
        return "str"


@dataclass(frozen=True)
class LayerInfo:
    """What Syncline needs from a layer/table definition."""

    id: int
    name: str
    is_table: bool
    object_id_field: str
    global_id_field: str
    fields: Mapping[str, FieldInfo]
    """Lower-cased field name -> field."""
    max_record_count: int
    capabilities: frozenset[str]
    edit_fields: Mapping[str, str]
    has_attachments: bool
    supports_query_attachments: bool
    spatial_reference: Mapping[str, Any] | None

    def field(self, name: str) -> FieldInfo | None:
        return self.fields.get(name.lower())

    def require(self, name: str) -> FieldInfo:
        """The field called `name` (any case), or a SpecError naming the layer's fields."""
        found = self.field(name)
        if found is None:
            known = ", ".join(f.name for f in self.fields.values())
            raise SpecError(f"arcgis: field {name!r} does not exist in layer {self.name!r} (fields: {known}); "
                            f"fix the flow spec or the layer schema")
        return found

    @property
    def edit_date_field(self) -> str | None:
        return self.edit_fields.get("editDateField") or None

    @property
    def server_fields(self) -> frozenset[str]:
        """Fields the service maintains itself (never written by Syncline)."""
        return frozenset({self.object_id_field, self.global_id_field, *self.edit_fields.values()})


@dataclass(frozen=True)
class ServiceInfo:
    """What Syncline needs from the FeatureServer resource."""

    layer_ids: Mapping[str, int]
    """Lower-cased layer/table name -> id."""
    names: Mapping[int, str]
    change_tracking: bool
    spatial_reference: Mapping[str, Any] | None
    capabilities: frozenset[str] = frozenset()
    """The service's capabilities (Query, Editing, ChangeTracking, ...)."""


_LAYER_NAMES: dict[str, dict[int, str]] = {}
"""Process-wide layer names per service name, learnt by clients from service definitions; lets the pure
`parse_webhook` name the layer of a feature-service webhook (whose payload carries only its id)."""


def _service_name(service_url: str) -> str:
    m = _SERVICE_NAME_RE.search(service_url)
    return m.group(1).lower() if m else service_url.rstrip("/").lower()


# ============================================================================================ client


@dataclass
class _Pending:
    """One op of an applyEdits batch, prepared for the wire."""

    index: int
    op: WriteOp
    attributes: dict[str, Any]
    geometry: Any
    has_geometry: bool
    gid: str | None = None
    created: bool = False
    oid: int | None = None


_CHECKPOINT_EDITDATE = "editdate:"
_CHECKPOINT_SCAN = "scan:"


class ArcGISFeatureServiceClient:
    """RecordSink + ChangeSource over one hosted feature service; layers are addressed by name.

    Canonical records: field names as in the layer, dates as epoch milliseconds, GlobalID and GUID fields
    as braced upper-case strings, geometry under `GEOMETRY_KEY` as ArcGIS JSON in the layer's spatial
    reference (None for a null geometry and for tables), key = GlobalID, modified/version = EditDate.

    Change feed checkpoints (opaque strings stored by the controller):
    - `"<serverGen>"`: extractChanges cursor (services with ChangeTracking);
    - `"scan:<serverGen>:<objectId>"`: first read of a change-tracked layer in progress (a keyset scan by
      objectId, then extractChanges from the serverGen read before the scan began);
    - `"editdate:<ms>:<oid,oid,...>"`: editor-tracking fallback. The next read asks `EditDate >= ms`
      (>= so features edited in the same millisecond as the last one seen are not lost) and drops the
      listed objectIds at exactly `ms` (already emitted). Deletes are not visible in this mode.
    """

    system = SYSTEM

    def __init__(
        self,
        service_url: str,
        http: httpx.AsyncClient,
        auth: ArcGISAuth,
        *,
        batch_size: int = 250,
        policy: RetryPolicy = DEFAULT_POLICY,
        max_concurrency: int = 2,
        page_size: int | None = None,
        include_attachments: bool = True,
        out_sr: int | None = None,
    ) -> None:
        if batch_size < 1 or max_concurrency < 1:
            raise ValueError("batch_size and max_concurrency must be >= 1")
        self.service_url = service_url.rstrip("/")
        self.http = http
        self.auth = auth
        self.batch_size = batch_size
        self.policy = policy
        self.page_size = page_size
        """Rows per query page (default: the layer's maxRecordCount)."""
        self.include_attachments = include_attachments
        """Attach AttachmentRefs to records read from layers that have attachments (one extra call per page)."""
        self.out_sr = out_sr
        """Spatial reference of geometries read (default: the layer's own)."""
        self._write_slots = asyncio.Semaphore(max_concurrency)
        self._info_lock = asyncio.Lock()
        self._refresh_lock = asyncio.Lock()
        self._service_info: ServiceInfo | None = None
        self._layers: dict[int, LayerInfo] = {}
        self._oids: dict[tuple[int, str], int] = {}
        self._gids_by_oid: dict[int, dict[int, str]] = {}

    # ------------------------------------------------------------------------------------ metadata

    async def service_info(self, *, fresh: bool = False) -> ServiceInfo:
        """The service definition (cached; `fresh=True` re-reads it)."""
        async with self._info_lock:
            if self._service_info is None or fresh:
                body = await self._request("GET", self.service_url, params={"f": "json"},
                                           what="read the feature service definition")
                self._service_info = self._parse_service(body)
            return self._service_info

    async def layer_info(self, table: str) -> LayerInfo:
        """The definition of the layer or table called `table` (or with that numeric id); cached."""
        svc = await self.service_info()
        text = str(table).strip()
        layer_id = int(text) if text.isdigit() and int(text) in svc.names else svc.layer_ids.get(text.lower())
        if layer_id is None:
            raise SpecError(f"arcgis: no layer or table named {table!r} in {self.service_url} "
                            f"(it has: {', '.join(svc.names.values())}); fix the flow spec's table")
        cached = self._layers.get(layer_id)
        if cached is not None:
            return cached
        body = await self._request("GET", f"{self.service_url}/{layer_id}", params={"f": "json"},
                                   what=f"read the definition of layer {table}")
        info = self._parse_layer(layer_id, body, svc)
        self._layers[layer_id] = info
        return info

    async def layer_name(self, layer_id: int) -> str | None:
        """Name of a layer id (e.g. from a feature-service webhook), or None."""
        return (await self.service_info()).names.get(layer_id)

    async def tables_for(self, hook: ArcGISWebhook) -> list[str]:
        """Layer names a webhook is about, resolving the layer ids that `parse_webhook` could not name."""
        if hook.kind == "survey123":
            return [hook.table] if hook.table else []
        names: list[str] = []
        for change in hook.changes:
            name = change.table or await self.layer_name(change.layer_id)
            if name and name not in names:
                names.append(name)
        return names

    async def ping(self) -> None:
        """Health check: authenticate and read the service definition (raises a SyncError on failure)."""
        await self.service_info(fresh=True)

    async def coded_values(self, table: str, field_name: str) -> dict[Any, str]:
        """Code -> name of a field's coded-value domain ({} when the field has no coded domain)."""
        f = (await self.layer_info(table)).require(field_name)
        if not f.domain or f.domain.get("type") != "codedValue":
            return {}
        return {c.get("code"): str(c.get("name")) for c in f.domain.get("codedValues") or []}

    def _parse_service(self, body: Any) -> ServiceInfo:
        if not isinstance(body, Mapping) or not isinstance(body.get("layers", []), list):
            raise TransientError(f"arcgis: {self.service_url} did not answer a FeatureServer definition")
        ids: dict[str, int] = {}
        names: dict[int, str] = {}
        for entry in [*(body.get("layers") or []), *(body.get("tables") or [])]:
            if isinstance(entry, Mapping) and isinstance(entry.get("id"), int) and entry.get("name"):
                ids[str(entry["name"]).lower()] = int(entry["id"])
                names[int(entry["id"])] = str(entry["name"])
        caps = {c.strip() for c in str(body.get("capabilities") or "").split(",")}
        _LAYER_NAMES[_service_name(self.service_url)] = dict(names)
        return ServiceInfo(ids, names, "ChangeTracking" in caps, body.get("spatialReference"),
                           frozenset(c for c in caps if c))

    @staticmethod
    def _parse_layer(layer_id: int, body: Any, svc: ServiceInfo) -> LayerInfo:
        if not isinstance(body, Mapping) or not isinstance(body.get("fields"), list):
            raise TransientError(f"arcgis: layer {layer_id} did not answer a layer definition")
        fields: dict[str, FieldInfo] = {}
        for raw in body["fields"]:
            if isinstance(raw, Mapping) and raw.get("name"):
                length = raw.get("length")
                fields[str(raw["name"]).lower()] = FieldInfo(
                    str(raw["name"]), str(raw.get("type") or ""), bool(raw.get("nullable", True)),
                    bool(raw.get("editable", True)), int(length) if isinstance(length, int) else None,
                    raw.get("domain") if isinstance(raw.get("domain"), Mapping) else None)
        oid = body.get("objectIdField") or next((f.name for f in fields.values() if f.type == "esriFieldTypeOID"), "")
        gid = body.get("globalIdField") or next(
            (f.name for f in fields.values() if f.type == "esriFieldTypeGlobalID"), "")
        name = str(body.get("name") or svc.names.get(layer_id) or layer_id)
        if not oid or not gid:
            raise SpecError(f"arcgis: layer {name!r} has no {'ObjectID' if not oid else 'GlobalID'} field; "
                            f"Syncline keys ArcGIS records on GlobalIDs: enable them on the layer")
        extent = _mapping(body.get("extent"))
        advanced = _mapping(body.get("advancedQueryCapabilities"))
        return LayerInfo(
            id=layer_id, name=name,
            is_table=body.get("type") == "Table" or not body.get("geometryType"),
            object_id_field=str(oid), global_id_field=str(gid), fields=fields,
            max_record_count=int(body.get("maxRecordCount") or 1000),
            capabilities=frozenset(c.strip() for c in str(body.get("capabilities") or "").split(",") if c.strip()),
            edit_fields={k: str(v) for k, v in (body.get("editFieldsInfo") or {}).items() if isinstance(v, str) and v},
            has_attachments=bool(body.get("hasAttachments")),
            supports_query_attachments=bool(advanced.get("supportsQueryAttachments", True)),
            spatial_reference=extent.get("spatialReference") or svc.spatial_reference,
        )

    def _layer_url(self, layer: LayerInfo) -> str:
        return f"{self.service_url}/{layer.id}"

    def _page_size(self, layer: LayerInfo) -> int:
        return max(1, min(self.page_size or layer.max_record_count, layer.max_record_count))

    # ------------------------------------------------------------------------------------ transport

    async def _request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
        write: bool = False,
        raw: bool = False,
    ) -> Any:
        """Send with the token, short retries and the error mapping; the parsed JSON (or bytes when `raw`).

        Errors come back as HTTP 200 `{"error": ...}` bodies: 498/499 refresh the token once and replay,
        429/5xx in a body are retried like the HTTP statuses, and a 504 on a write is ambiguous.
        """
        token = await self.auth.token()
        for attempt in (1, 2):
            response = await self._send(method, url, token, params, data, files, write)
            problem = _token_problem(response)
            if problem is None:
                return self._interpret(response, what=what, write=write, raw=raw)
            if attempt == 2 or not getattr(self.auth, "refreshable", True):
                raise AuthError(f"arcgis: {what}: the token was rejected ({problem}) "
                                f"{'even after a refresh' if attempt == 2 else 'and an API key cannot be refreshed'}; "
                                f"check the credentials and their access to {self.service_url}")
            log.info("arcgis: %s: token rejected (%s); refreshing it once", what, problem)
            token = await self._refresh(token)
        raise AssertionError("unreachable")

    async def _refresh(self, rejected: str) -> str:
        # Concurrent requests that all saw the same stale token share one refresh.
        async with self._refresh_lock:
            current = await self.auth.token()
            if current != rejected:
                return current
            return await self.auth.token(force_refresh=True)

    async def _send(self, method: str, url: str, token: str, params: Mapping[str, str] | None,
                    data: Mapping[str, str] | None, files: Mapping[str, tuple[str, bytes, str]] | None,
                    write: bool) -> httpx.Response:
        headers = {"X-Esri-Authorization": f"Bearer {token}"}

        async def attempt() -> httpx.Response:
            response = await self.http.request(method, url, params=params, data=data, files=files, headers=headers)
            code = _body_error_code(response)
            if code is not None and (code == 429 or 500 <= code < 600):
                # Retriable errors reported inside an HTTP 200 body: let the retry loop see them as statuses.
                return httpx.Response(code, headers=response.headers, content=response.content,
                                      request=response.request)
            return response

        # A 504 on a write means "maybe applied": it is reported (AmbiguousWriteError), never blindly re-sent.
        retriable = RETRIABLE_STATUS - {504} if write else RETRIABLE_STATUS
        return await send_with_retry(attempt, system=SYSTEM, policy=self.policy, retriable_status=retriable)

    def _interpret(self, response: httpx.Response, *, what: str, write: bool, raw: bool) -> Any:
        status = response.status_code
        body = _json_body(response)
        error = body.get("error") if isinstance(body, dict) else None
        if status == 504 and write:
            raise AmbiguousWriteError(f"arcgis: {what}: gateway timeout (HTTP 504); the edits may have been applied. "
                                      f"A retry looks the records up again (GlobalID / match field) before writing")
        if isinstance(error, Mapping):
            raise _error_from_body(error, what, write)
        if status in (401, 403):
            raise AuthError(f"arcgis: {what}: HTTP {status}; the credentials lack access to {self.service_url}")
        if status >= 500:
            raise TransientError(f"arcgis: {what}: HTTP {status} from the service")
        if status >= 400:
            raise RejectedError(f"arcgis: {what}: HTTP {status}: {response.text[:300]}")
        if raw:
            return response.content
        if body is None:
            raise TransientError(f"arcgis: {what}: expected JSON but got {response.headers.get('content-type')!r} "
                                 f"(HTTP {status}); check that {self.service_url} is a FeatureServer URL")
        return body

    # ------------------------------------------------------------------------------------ query helpers

    async def _query_pages(self, layer: LayerInfo, where: str, *, out_fields: str = "*",
                           order_by: str | None = None, geometry: bool = True,
                           ) -> AsyncIterator[tuple[list[Mapping[str, Any]], Mapping[str, Any] | None]]:
        """resultOffset paging, ordered (by objectId unless told), until exceededTransferLimit is false."""
        size = self._page_size(layer)
        offset = 0
        while True:
            form = {"f": "json", "where": where, "outFields": out_fields,
                    "returnGeometry": "true" if geometry and not layer.is_table else "false",
                    "orderByFields": order_by or f"{layer.object_id_field} ASC",
                    "resultOffset": str(offset), "resultRecordCount": str(size)}
            if self.out_sr:
                form["outSR"] = str(self.out_sr)
            body = await self._request("POST", f"{self._layer_url(layer)}/query", data=form,
                                       what=f"query {layer.name}")
            features = body.get("features") if isinstance(body, Mapping) else None
            if not isinstance(features, list):
                raise TransientError(f"arcgis: query {layer.name}: the answer has no features array")
            yield features, body.get("spatialReference") or layer.spatial_reference
            if not features or not _exceeded(body):
                return
            offset += len(features)

    def _record(self, layer: LayerInfo, feature: Mapping[str, Any], sr: Mapping[str, Any] | None) -> SourceRecord:
        raw = _mapping(feature.get("attributes"))
        values: dict[str, Any] = {}
        for name, value in raw.items():
            f = layer.field(name)
            values[f.name if f else name] = _canonical_value(f, value)
        values[GEOMETRY_KEY] = None if layer.is_table else _geometry_value(feature.get("geometry"), sr)
        key = canonical_guid(values.get(layer.global_id_field))
        if key is None:
            raise TransientError(f"arcgis: {layer.name}: a feature came back without a GlobalID "
                                 f"({layer.object_id_field}={values.get(layer.object_id_field)}); "
                                 f"outFields must include {layer.global_id_field}")
        oid = values.get(layer.object_id_field)
        if isinstance(oid, int):
            self._remember_oid(layer, oid, key)
        edit_field = layer.edit_date_field
        edited = values.get(edit_field) if edit_field else None
        modified = epoch_ms_to_datetime(edited) if isinstance(edited, int) else None
        return SourceRecord(key, values, modified, str(edited) if isinstance(edited, int) else None)

    def _remember_oid(self, layer: LayerInfo, oid: int, gid: str) -> None:
        self._oids[(layer.id, gid)] = oid
        cache = self._gids_by_oid.setdefault(layer.id, {})
        if len(cache) < _OID_CACHE_LIMIT or oid in cache:
            cache[oid] = gid

    def _literal(self, f: FieldInfo, value: Any, layer: LayerInfo) -> str:
        """A where-clause literal for `value` compared with field `f`: escaped, typed, never raw text."""
        where = f"{layer.name}.{f.name}"
        kind = f.kind
        if kind == "num":
            if isinstance(value, bool):
                return "1" if value else "0"
            if isinstance(value, int):
                return str(value)
            if isinstance(value, float) and math.isfinite(value):
                return repr(value)
            raise MappingError(f"arcgis: {where} is numeric; {value!r} cannot be used in a query")
        if kind == "date":
            if isinstance(value, datetime | date):
                return _timestamp_literal(_datetime_to_ms(value))
            if isinstance(value, int) and not isinstance(value, bool):
                return _timestamp_literal(value)
            raise MappingError(f"arcgis: {where} is a date; {value!r} is neither a datetime nor epoch ms")
        if kind == "guid":
            guid = canonical_guid(value)
            if guid is None:
                raise MappingError(f"arcgis: {where} holds GUIDs; {value!r} is not a GUID")
            return f"'{guid}'"
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise MappingError(f"arcgis: {where} is text; {value!r} cannot be used in a query")
        text = str(value)
        if "\x00" in text:
            raise MappingError(f"arcgis: {where}: a NUL character cannot be used in a query")
        return "'" + text.replace("'", "''") + "'"

    async def _with_attachments(self, layer: LayerInfo, records: Sequence[SourceRecord]) -> None:
        """Fill `attachments` of records of a layer with attachments (queryAttachments, one call per chunk)."""
        if not self.include_attachments or not layer.has_attachments:
            return
        by_oid = {r.values.get(layer.object_id_field): r for r in records if not r.deleted}
        oids = [oid for oid in by_oid if isinstance(oid, int)]
        if not layer.supports_query_attachments:
            for oid in oids:
                by_oid[oid].attachments = await self._attachment_refs(layer, oid)
            return
        for start in range(0, len(oids), _WHERE_CHUNK):
            chunk = oids[start:start + _WHERE_CHUNK]
            body = await self._request("POST", f"{self._layer_url(layer)}/queryAttachments",
                                       data={"f": "json", "objectIds": ",".join(map(str, chunk)),
                                             "returnUrl": "false"},
                                       what=f"query attachments of {layer.name}")
            for group in body.get("attachmentGroups") or []:
                record = by_oid.get(group.get("parentObjectId"))
                if record is not None:
                    record.attachments = sorted((_attachment_ref(a) for a in group.get("attachmentInfos") or []),
                                                key=lambda a: (len(a.id), a.id))

    async def _attachment_refs(self, layer: LayerInfo, oid: int) -> list[AttachmentRef]:
        body = await self._request("GET", f"{self._layer_url(layer)}/{oid}/attachments", params={"f": "json"},
                                   what=f"list attachments of {layer.name} {oid}")
        return [_attachment_ref(a) for a in body.get("attachmentInfos") or []]

    async def _oid_for(self, layer: LayerInfo, key: str) -> int:
        gid = canonical_guid(key)
        if gid is None:
            raise MappingError(f"arcgis: {key!r} is not a GlobalID")
        cached = self._oids.get((layer.id, gid))
        if cached is not None:
            return cached
        where = f"{layer.global_id_field} = '{gid}'"
        async for features, _ in self._query_pages(layer, where, geometry=False,
                                                   out_fields=f"{layer.object_id_field},{layer.global_id_field}"):
            for feat in features:
                attrs = feat.get("attributes") or {}
                oid = next((v for k, v in attrs.items() if k.lower() == layer.object_id_field.lower()), None)
                if isinstance(oid, int):
                    self._remember_oid(layer, oid, gid)
                    return oid
        raise RejectedError(f"arcgis: {layer.name} has no feature with GlobalID {gid} (deleted in ArcGIS?)")

    # ------------------------------------------------------------------------------------ RecordSink

    async def select(self, table: str, *, equals: Mapping[str, Any],
                     not_in: Mapping[str, Sequence[Any]] | None = None) -> list[SourceRecord]:
        """Features whose fields equal `equals` and are not in `not_in`; every value escaped and typed."""
        layer = await self.layer_info(table)
        clauses: list[str] = []
        for name, value in equals.items():
            f = layer.require(name)
            clauses.append(f"{f.name} IS NULL" if value is None else f"{f.name} = {self._literal(f, value, layer)}")
        for name, excluded in (not_in or {}).items():
            f = layer.require(name)
            values = [v for v in excluded if v is not None]
            not_null = len(values) != len(excluded)
            in_list = f"{f.name} NOT IN ({', '.join(self._literal(f, v, layer) for v in values)})" if values else ""
            if values and not_null:
                clauses.append(f"({f.name} IS NOT NULL AND {in_list})")
            elif not_null:
                clauses.append(f"{f.name} IS NOT NULL")
            elif values:
                clauses.append(f"({f.name} IS NULL OR {in_list})")  # SQL NOT IN drops NULLs; Syncline keeps them
        where = " AND ".join(clauses) or "1=1"
        out: list[SourceRecord] = []
        async for features, sr in self._query_pages(layer, where):
            out.extend(self._record(layer, feat, sr) for feat in features)
        return out

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        """Features by GlobalID (any case, braces optional); missing or malformed keys are absent."""
        layer = await self.layer_info(table)
        wanted = list(dict.fromkeys(g for g in (canonical_guid(k) for k in keys) if g is not None))
        found: dict[str, SourceRecord] = {}
        for start in range(0, len(wanted), _WHERE_CHUNK):
            chunk = wanted[start:start + _WHERE_CHUNK]
            where = f"{layer.global_id_field} IN ({', '.join(repr_guid(g) for g in chunk)})"
            async for features, sr in self._query_pages(layer, where):
                records = [self._record(layer, feat, sr) for feat in features]
                await self._with_attachments(layer, records)
                found.update((r.key, r) for r in records)
        return {k: found[g] for k in keys if (g := canonical_guid(k)) is not None and g in found}

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """applyEdits per layer in batches (one POST each, up to `max_concurrency` in flight), one result per op.

        upsert+key / update -> update by GlobalID; upsert+match -> one query per batch for the match values,
        then update the features found and add the rest with a client-made GlobalID (so a replay after a
        lost answer finds them); delete -> delete by GlobalID (already gone = success). Attachments are
        uploaded after their feature exists, skipping names already there.
        """
        results: dict[int, WriteResult] = {}
        by_table: dict[str, list[int]] = {}
        for index, op in enumerate(ops):
            by_table.setdefault(op.table, []).append(index)
        await asyncio.gather(*(self._write_table(table, [(i, ops[i]) for i in indexes], results)
                               for table, indexes in by_table.items()))
        out = [results.get(i) or WriteResult(op.op_id, False, error=TransientError("arcgis: no result for the op"))
               for i, op in enumerate(ops)]
        errors = [r.error for r in out if not r.ok]
        if out and len(errors) == len(out) and all(isinstance(e, AuthError | ThrottledError) for e in errors):
            raise errors[0]  # type: ignore[misc]  # the whole call failed: auth or throttling
        return out

    async def _write_table(self, table: str, items: list[tuple[int, WriteOp]], results: dict[int, WriteResult]) -> None:
        try:
            layer = await self.layer_info(table)
        except SyncError as exc:
            for index, op in items:
                results[index] = WriteResult(op.op_id, False, error=exc)
            return
        pending: list[_Pending] = []
        for index, op in items:
            try:
                pending.append(self._prepare(layer, index, op))
            except SyncError as exc:
                results[index] = WriteResult(op.op_id, False, key=op.key, error=exc)
        for round_ in _rounds(pending):
            batches = [round_[i:i + self.batch_size] for i in range(0, len(round_), self.batch_size)]
            await asyncio.gather(*(self._write_batch(layer, batch, results) for batch in batches))

    def _prepare(self, layer: LayerInfo, index: int, op: WriteOp) -> _Pending:
        if op.action not in ("upsert", "update", "delete"):
            raise ValidationError(f"arcgis: unknown write action {op.action!r}", reason="TARGET_REJECTED")
        if op.key is None and not op.match:
            raise ValidationError(f"arcgis: {op.action} on {layer.name} needs a key (GlobalID) or a match field",
                                  reason="TARGET_REJECTED")
        if op.key is not None and canonical_guid(op.key) is None:
            raise MappingError(f"arcgis: {op.key!r} is not a GlobalID ({layer.name}, op {op.op_id})")
        attributes: dict[str, Any] = {}
        geometry: Any = None
        has_geometry = False
        server = {n.lower() for n in layer.server_fields}
        for name, value in op.values.items():
            if name == GEOMETRY_KEY:
                geometry, has_geometry = value, not layer.is_table
                continue
            if name == ATTACHMENTS_KEY:
                continue
            f = layer.require(name)
            if f.name.lower() in server:
                continue  # server-maintained; the service would ignore it anyway
            attributes[f.name] = _wire_value(f, value, layer)
        for name, value in (op.match or {}).items():
            f = layer.require(name)
            attributes.setdefault(f.name, _wire_value(f, value, layer))  # adds must carry the match field
        if has_geometry and geometry is not None and (
                not isinstance(geometry, Mapping) or not {"x", "y"} <= set(geometry)):
            raise MappingError(f"arcgis: {layer.name}: geometry must be an ArcGIS point {{x, y, "
                               f"spatialReference}}, got {geometry!r}")
        return _Pending(index, op, attributes, geometry, has_geometry,
                        gid=canonical_guid(op.key) if op.key else None)

    async def _write_batch(self, layer: LayerInfo, batch: list[_Pending], results: dict[int, WriteResult]) -> None:
        async with self._write_slots:
            try:
                await self._apply_batch(layer, batch, results)
            except SyncError as exc:
                for p in batch:
                    if p.index not in results:
                        results[p.index] = WriteResult(p.op.op_id, False, key=p.gid, error=exc)

    async def _apply_batch(self, layer: LayerInfo, batch: list[_Pending], results: dict[int, WriteResult]) -> None:
        matched = await self._lookup_matches(layer, [p for p in batch if p.gid is None])
        adds: list[_Pending] = []
        updates: list[_Pending] = []
        deletes: list[_Pending] = []
        for p in batch:
            if p.gid is None:
                p.gid = matched.get(_match_identity(layer, p.op.match or {}))
            if p.op.action == "delete":
                if p.gid is None:
                    results[p.index] = WriteResult(p.op.op_id, True)  # nothing matches: already deleted
                else:
                    deletes.append(p)
            elif p.gid is not None:
                updates.append(p)
            elif p.op.action == "update":
                results[p.index] = WriteResult(p.op.op_id, False, error=RejectedError(
                    f"arcgis: {layer.name}: no feature matches {p.op.match} (object is missing); "
                    f"nothing to update (op {p.op.op_id})"))
            else:
                # Client-made GlobalID, derived from the match: the key is known even if the answer is lost
                # (replays find it), and two processes creating the same record at once pick the same GlobalID,
                # so the second add is refused as a duplicate (1022) and becomes an update, never a twin.
                p.gid, p.created = _globalid_for(layer, p.op.match), True
                adds.append(p)
        if adds or updates or deletes:
            await self._apply_edits(layer, adds, updates, deletes, results)
        for p in batch:
            if p.op.attachments and p.index in results and results[p.index].ok and p.op.action != "delete":
                try:
                    await self._upload_attachments(layer, p)
                except SyncError as exc:
                    results[p.index] = WriteResult(p.op.op_id, False, key=p.gid, error=exc)

    async def _lookup_matches(self, layer: LayerInfo, pending: list[_Pending]) -> dict[tuple[Any, ...], str]:
        """One query for every match of the batch: {match identity: GlobalID} of the features that exist."""
        matches = [p.op.match for p in pending if p.op.match]
        if not matches:
            return {}
        fields = sorted({layer.require(n).name for m in matches for n in m})
        single = len(fields) == 1 and all(len(m) == 1 for m in matches)
        found: dict[tuple[Any, ...], str] = {}
        for start in range(0, len(matches), _WHERE_CHUNK):
            chunk = matches[start:start + _WHERE_CHUNK]
            if single:
                f = layer.require(fields[0])
                literals = dict.fromkeys(self._literal(f, next(iter(m.values())), layer) for m in chunk)
                where = f"{f.name} IN ({', '.join(literals)})"
            else:
                where = " OR ".join(
                    "(" + " AND ".join(f"{layer.require(n).name} = {self._literal(layer.require(n), v, layer)}"
                                       for n, v in m.items()) + ")" for m in chunk)
            out_fields = ",".join([layer.object_id_field, layer.global_id_field, *fields])
            async for features, _ in self._query_pages(layer, where, out_fields=out_fields, geometry=False):
                for feat in features:
                    attrs = {k.lower(): v for k, v in (feat.get("attributes") or {}).items()}
                    gid = canonical_guid(attrs.get(layer.global_id_field.lower()))
                    if gid is None:
                        continue
                    for m in chunk:
                        ident = _match_identity(layer, m)
                        if all(_same(attrs.get(layer.require(n).name.lower()), v) for n, v in m.items()):
                            if ident in found and found[ident] != gid:
                                log.warning("arcgis: %s: several features match %s; updating the oldest (%s)",
                                            layer.name, m, found[ident])
                                continue
                            found[ident] = gid
                    oid = attrs.get(layer.object_id_field.lower())
                    if isinstance(oid, int):
                        self._remember_oid(layer, oid, gid)
        return found

    async def _apply_edits(self, layer: LayerInfo, adds: list[_Pending], updates: list[_Pending],
                           deletes: list[_Pending], results: dict[int, WriteResult]) -> None:
        form = {"f": "json", "useGlobalIds": "true", "rollbackOnFailure": "false"}
        if adds:
            form["adds"] = json.dumps([_feature_json(layer, p) for p in adds])
        if updates:
            form["updates"] = json.dumps([_feature_json(layer, p) for p in updates])
        if deletes:
            form["deletes"] = json.dumps([p.gid for p in deletes])
        what = (f"applyEdits on {layer.name} ({len(adds)} adds, {len(updates)} updates, "
                f"{len(deletes)} deletes)")
        body = await self._request("POST", f"{self._layer_url(layer)}/applyEdits", data=form, what=what, write=True)
        sections = (("addResults", adds, "add"), ("updateResults", updates, "update"),
                    ("deleteResults", deletes, "delete"))
        duplicates: list[_Pending] = []
        for key, items, verb in sections:
            answers = body.get(key) if isinstance(body, Mapping) else None
            answers = answers if isinstance(answers, list) else []
            if len(answers) != len(items):
                raise AmbiguousWriteError(f"arcgis: {what}: {len(answers)} {key} for {len(items)} edits; "
                                          f"the outcome is unknown and is re-checked on retry")
            for p, answer in zip(items, answers, strict=True):
                if isinstance(answer, Mapping) and answer.get("success") is True:
                    if isinstance(answer.get("objectId"), int) and answer["objectId"] >= 0:
                        p.oid = int(answer["objectId"])
                        self._remember_oid(layer, p.oid, p.gid or "")
                    results[p.index] = WriteResult(p.op.op_id, True, key=p.gid, created=p.created)
                    continue
                error = answer.get("error") if isinstance(answer, Mapping) else None
                code = error.get("code") if isinstance(error, Mapping) else None
                description = str(error.get("description") or "") if isinstance(error, Mapping) else ""
                missing = code in _MISSING_CODES or "object is missing" in description.lower()
                if verb == "delete" and missing:
                    results[p.index] = WriteResult(p.op.op_id, True, key=p.gid)  # already gone: the goal holds
                elif verb == "add" and code == _DUPLICATE_CODE:
                    duplicates.append(p)  # our GlobalID is already there: an earlier attempt landed
                else:
                    detail = (f"arcgis: {layer.name}: {verb} of feature {p.gid} (op {p.op.op_id}"
                              f"{f', match {p.op.match}' if p.op.match else ''}) rejected: error {code}: "
                              f"{description or 'no description'}")
                    if missing:
                        detail += " (object is missing: deleted in ArcGIS?)"
                    results[p.index] = WriteResult(p.op.op_id, False, key=p.gid, error=RejectedError(detail))
        if duplicates:
            present = await self.fetch(layer.name, [p.gid for p in duplicates if p.gid])
            for p in duplicates:
                if p.gid in present:
                    results[p.index] = WriteResult(p.op.op_id, True, key=p.gid, created=True)
                else:
                    results[p.index] = WriteResult(p.op.op_id, False, key=p.gid, error=RejectedError(
                        f"arcgis: {layer.name}: add of {p.gid} (op {p.op.op_id}) hit a unique constraint (1022)"))

    async def _upload_attachments(self, layer: LayerInfo, p: _Pending) -> None:
        names = [a.name for a in p.op.attachments]
        if not layer.has_attachments:
            raise RejectedError(f"arcgis: layer {layer.name} has attachments disabled; cannot attach {names} to "
                                f"{p.gid}: enable attachments or disable them in the flow")
        oid = p.oid if p.oid is not None else await self._oid_for(layer, p.gid or "")
        existing = {a.name for a in await self._attachment_refs(layer, oid)}
        for att in p.op.attachments:
            name = attachment_file_name(att)
            if name in existing:
                continue
            body = await self._request(
                "POST", f"{self._layer_url(layer)}/{oid}/addAttachment", data={"f": "json"},
                files={"attachment": (name, att.data, att.content_type)}, write=True,
                what=f"add attachment {name} to {layer.name} {p.gid}")
            outcome = body.get("addAttachmentResult") if isinstance(body, Mapping) else None
            if not isinstance(outcome, Mapping) or outcome.get("success") is not True:
                error = outcome.get("error") if isinstance(outcome, Mapping) else None
                raise RejectedError(f"arcgis: {layer.name} {p.gid}: attachment {name} ({att.content_type}, "
                                    f"{len(att.data)} bytes) rejected: {_edit_error_text(error)}")
            existing.add(name)

    # ------------------------------------------------------------------------------------ ChangeSource

    async def changes_since(self, table: str, checkpoint: str | None) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """Pages of changed records since `checkpoint` (see the class docstring for the cursor forms)."""
        layer = await self.layer_info(table)
        svc = await self.service_info()
        text = (checkpoint or "").strip()
        if svc.change_tracking:
            if text.isdigit():
                async for page in self._extract_changes(layer, int(text)):
                    yield page
                return
            if text and not text.startswith(_CHECKPOINT_SCAN):
                log.warning("arcgis: %s: checkpoint %r is not a serverGen (change tracking was enabled "
                            "since?); reading the layer from the start", layer.name, text)
                text = ""
            async for page in self._initial_read(layer, text):
                yield page
            return
        if text and not text.startswith(_CHECKPOINT_EDITDATE):
            log.warning("arcgis: %s: checkpoint %r is not an EditDate cursor (change tracking was disabled "
                        "since?); reading the layer from the start", layer.name, text)
            text = ""
        async for page in self._edit_date_changes(layer, text):
            yield page

    async def _initial_read(self, layer: LayerInfo, checkpoint: str) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """First read of a change-tracked layer: keyset scan by objectId, then changes since the scan began."""
        if checkpoint.startswith(_CHECKPOINT_SCAN):
            _, gen_text, oid_text = checkpoint.split(":", 2)
            start_gen, last_oid = int(gen_text), int(oid_text)
        else:
            start_gen, last_oid = await self._current_server_gen(layer), -1
        oid_field = layer.object_id_field
        while True:
            where = f"{oid_field} > {last_oid}"
            form = {"f": "json", "where": where, "outFields": "*", "orderByFields": f"{oid_field} ASC",
                    "returnGeometry": "false" if layer.is_table else "true",
                    "resultRecordCount": str(self._page_size(layer))}
            if self.out_sr:
                form["outSR"] = str(self.out_sr)
            body = await self._request("POST", f"{self._layer_url(layer)}/query", data=form,
                                       what=f"initial read of {layer.name}")
            features = body.get("features") or []
            sr = body.get("spatialReference") or layer.spatial_reference
            records = [self._record(layer, feat, sr) for feat in features]
            if not records:
                break
            await self._with_attachments(layer, records)
            last_oid = max(int(r.values[oid_field]) for r in records)
            more = _exceeded(body)
            yield records, f"{_CHECKPOINT_SCAN}{start_gen}:{last_oid}" if more else str(start_gen)
            if not more:
                return
        async for page in self._extract_changes(layer, start_gen):
            yield page

    async def _current_server_gen(self, layer: LayerInfo) -> int:
        body = await self._request("GET", self.service_url, params={"f": "json"},
                                   what="read the service's change tracking info")
        info = body.get("changeTrackingInfo") if isinstance(body, Mapping) else None
        for entry in (info or {}).get("layerServerGens") or []:
            if entry.get("id") == layer.id and isinstance(entry.get("serverGen"), int):
                return int(entry["serverGen"])
        return 0

    async def _extract_changes(self, layer: LayerInfo, since: int) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        form = {
            "f": "json", "layers": json.dumps([layer.id]),
            "layerServerGens": json.dumps([{"id": layer.id, "serverGen": since}]),
            "returnInserts": "true", "returnUpdates": "true", "returnDeletes": "true",
            "returnDeletedFeatures": "true", "returnIdsOnly": "false",
            "returnAttachments": "true" if layer.has_attachments else "false",
            "dataFormat": "json", "transportType": "esriTransportTypeEmbedded", "async": "false",
        }
        if self.out_sr:
            form["outSR"] = str(self.out_sr)
        what = f"extractChanges for {layer.name} since serverGen {since}"
        body = await self._request("POST", f"{self.service_url}/extractChanges", data=form, what=what)
        if isinstance(body, Mapping) and isinstance(body.get("statusUrl"), str):
            body = await self._await_job(str(body["statusUrl"]), what)
        new_gen = next((int(g["serverGen"]) for g in body.get("layerServerGens") or []
                        if g.get("id") == layer.id and isinstance(g.get("serverGen"), int)), None)
        if new_gen is None:
            raise TransientError(f"arcgis: {what}: the answer has no serverGen for layer {layer.id}")
        entry: Mapping[str, Any] = next((e for e in body.get("edits") or [] if e.get("id") == layer.id), {})
        features = entry.get("features") or {}
        sr = entry.get("spatialReference") or layer.spatial_reference
        records = [self._record(layer, f, sr) for f in [*(features.get("adds") or []),
                                                         *(features.get("updates") or [])]]
        records.extend(self._deleted(layer, features))
        seen = {r.key for r in records}
        # Attachment-only changes (a photo added later) surface as an update of the parent feature.
        parents = [canonical_guid(a.get("parentGlobalId")) for a in
                   [*((entry.get("attachments") or {}).get("adds") or []),
                    *((entry.get("attachments") or {}).get("updates") or [])]]
        extra = [g for g in dict.fromkeys(p for p in parents if p) if g not in seen]
        if extra:
            records.extend((await self.fetch(layer.name, extra)).values())
        await self._with_attachments(layer, [r for r in records if not r.attachments])
        size = self._page_size(layer)
        if not records:
            if new_gen != since:
                yield [], str(new_gen)
            return
        for start in range(0, len(records), size):
            last = start + size >= len(records)
            # Only the last page moves the cursor: a crash mid-way re-reads the whole window.
            yield records[start:start + size], str(new_gen) if last else str(since)

    def _deleted(self, layer: LayerInfo, features: Mapping[str, Any]) -> list[SourceRecord]:
        out: list[SourceRecord] = []
        described: set[Any] = set()
        edit_field = layer.edit_date_field
        for feat in features.get("deletes") or []:
            attrs = {k.lower(): v for k, v in (feat.get("attributes") or {}).items()}
            gid = canonical_guid(attrs.get(layer.global_id_field.lower()))
            if gid is None:
                continue
            described.add(attrs.get(layer.object_id_field.lower()))
            described.add(gid)
            edited = attrs.get(edit_field.lower()) if edit_field else None
            out.append(SourceRecord(gid, {layer.global_id_field: gid}, epoch_ms_to_datetime(edited)
                                    if isinstance(edited, int) else None, None, deleted=True))
        known = self._gids_by_oid.get(layer.id, {})
        for ident in features.get("deleteIds") or []:
            if ident in described:
                continue
            gid = canonical_guid(ident) if isinstance(ident, str) else known.get(ident) if isinstance(ident, int) \
                else None
            if gid is None:
                log.warning("arcgis: %s: deleted objectId %s cannot be mapped to a GlobalID (the service did not "
                            "return deleted features); reconciliation will catch it", layer.name, ident)
                continue
            if gid not in described:
                out.append(SourceRecord(gid, {layer.global_id_field: gid}, None, None, deleted=True))
        return out

    async def _await_job(self, status_url: str, what: str, timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            status = await self._request("GET", status_url, params={"f": "json"}, what=f"{what} (job status)")
            state = str(status.get("status") or "").lower()
            if state in ("completed", "esrijobsucceeded") and status.get("resultUrl"):
                return await self._request("GET", str(status["resultUrl"]), params={"f": "json"},
                                           what=f"{what} (job result)")
            if state in ("failed", "esrijobfailed"):
                raise TransientError(f"arcgis: {what}: the asynchronous job failed: {status}")
            if time.monotonic() > deadline:
                raise TransientError(f"arcgis: {what}: the asynchronous job did not finish in {timeout:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _edit_date_changes(self, layer: LayerInfo,
                                 checkpoint: str) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """Editor-tracking fallback: keyset pages ordered by (EditDate, objectId) from the last watermark."""
        ed = layer.edit_date_field
        if not ed:
            raise SpecError(f"arcgis: layer {layer.name} has neither ChangeTracking nor editor tracking (EditDate); "
                            f"enable 'Keep track of changes' or editor tracking on the layer")
        oid_field = layer.object_id_field
        since, emitted = _parse_edit_date_checkpoint(checkpoint)
        watermark, boundary = since, set(emitted)
        cursor: tuple[int | None, int] | None = None
        last_yielded = checkpoint
        size = self._page_size(layer)
        while True:
            if cursor is None:
                where = f"{ed} >= {_timestamp_literal(since)}" if since is not None else "1=1"
            elif cursor[0] is None:
                where = f"({ed} IS NULL AND {oid_field} > {cursor[1]}) OR {ed} IS NOT NULL"
            else:
                stamp = _timestamp_literal(cursor[0])
                where = f"({ed} = {stamp} AND {oid_field} > {cursor[1]}) OR {ed} > {stamp}"
            form = {"f": "json", "where": where, "outFields": "*", "orderByFields": f"{ed} ASC, {oid_field} ASC",
                    "returnGeometry": "false" if layer.is_table else "true", "resultRecordCount": str(size)}
            if self.out_sr:
                form["outSR"] = str(self.out_sr)
            body = await self._request("POST", f"{self._layer_url(layer)}/query", data=form,
                                       what=f"read {layer.name} edited since {since}")
            features = body.get("features") or []
            sr = body.get("spatialReference") or layer.spatial_reference
            records: list[SourceRecord] = []
            for feat in features:
                record = self._record(layer, feat, sr)
                edited, oid = record.values.get(ed), int(record.values[oid_field])
                cursor = (edited if isinstance(edited, int) else None, oid)
                if isinstance(edited, int) and edited == since and oid in emitted:
                    continue  # emitted by the previous read (same millisecond as its watermark)
                records.append(record)
                if isinstance(edited, int):
                    if watermark is None or edited > watermark:
                        watermark, boundary = edited, {oid}
                    elif edited == watermark:
                        boundary.add(oid)
            if not features:
                return
            await self._with_attachments(layer, records)
            position = _edit_date_checkpoint(watermark, boundary)
            if records or position != last_yielded:  # a page of already-sent rows moves nothing
                yield records, position
                last_yielded = position
            if not _exceeded(body):
                return

    async def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        """Every feature of a layer, page by page (resultOffset paging ordered by objectId)."""
        layer = await self.layer_info(table)
        async for features, sr in self._query_pages(layer, "1=1"):
            records = [self._record(layer, feat, sr) for feat in features]
            await self._with_attachments(layer, records)
            if records:
                yield records

    async def list_attachments(self, table: str, key: str) -> list[AttachmentRef]:
        """The attachments of the feature with GlobalID `key`."""
        layer = await self.layer_info(table)
        return await self._attachment_refs(layer, await self._oid_for(layer, key))

    async def fetch_attachment(self, table: str, key: str, attachment_id: str) -> bytes:
        """Download one attachment of the feature with GlobalID `key`."""
        layer = await self.layer_info(table)
        if not str(attachment_id).isdigit():
            raise MappingError(f"arcgis: attachment id {attachment_id!r} is not a number")
        oid = await self._oid_for(layer, key)
        data = await self._request("GET", f"{self._layer_url(layer)}/{oid}/attachments/{int(attachment_id)}",
                                   what=f"download attachment {attachment_id} of {layer.name} {key}", raw=True)
        return bytes(data)

    # ------------------------------------------------------------------------------------ webhooks (admin API)

    @property
    def admin_url(self) -> str:
        """The service's admin resource (ArcGIS Online: `.../rest/admin/services/<Service>/FeatureServer`)."""
        m = re.search(r"/rest/services/", self.service_url, re.IGNORECASE)
        if m is None:
            raise SpecError(f"arcgis: {self.service_url} is not a '.../rest/services/<Service>/FeatureServer' URL; "
                            "cannot derive its admin URL for webhooks")
        return f"{self.service_url[:m.start()]}/rest/admin/services/{self.service_url[m.end():]}"

    async def list_webhooks(self) -> list[dict[str, Any]]:
        """The service's webhooks (`{admin}/WebHooks?f=json`), active or not; signature keys are never logged."""
        body = await self._request("GET", f"{self.admin_url}/WebHooks", params={"f": "json"},
                                   what="list the feature service's webhooks")
        # ArcGIS Online answers a bare array; ArcGIS Enterprise wraps it in {"webhooks": [...]}.
        items = body.get("webhooks") if isinstance(body, Mapping) else body
        if not isinstance(items, list):
            raise TransientError("arcgis: list the feature service's webhooks: the answer is not a list of webhooks")
        return [dict(item) for item in items if isinstance(item, Mapping)]

    async def create_webhook(self, params: Mapping[str, str]) -> dict[str, Any]:
        """`{admin}/WebHooks/create` with form `params` (name, changeTypes, hookUrl, signatureKey, active, ...)."""
        body = await self._request("POST", f"{self.admin_url}/WebHooks/create", data={**params, "f": "json"},
                                   what=f"create webhook {params.get('name')!r}", write=True)
        return dict(body) if isinstance(body, Mapping) else {}

    async def edit_webhook(self, webhook_id: str, params: Mapping[str, str]) -> dict[str, Any]:
        """`{admin}/WebHooks/<id>/edit` with the full set of form `params` (edit replaces the configuration)."""
        body = await self._request("POST", f"{self.admin_url}/WebHooks/{webhook_id}/edit",
                                   data={**params, "f": "json"}, what=f"edit webhook {webhook_id}", write=True)
        return dict(body) if isinstance(body, Mapping) else {}

    async def delete_webhook(self, webhook_id: str) -> None:
        """`{admin}/WebHooks/<id>/delete`."""
        await self._request("POST", f"{self.admin_url}/WebHooks/{webhook_id}/delete", data={"f": "json"},
                            what=f"delete webhook {webhook_id}", write=True)


# ============================================================================================ helpers


def repr_guid(guid: str) -> str:
    """A canonical GUID as a where-clause literal."""
    return f"'{guid}'"


def attachment_file_name(att: Attachment) -> str:
    """`<source_id>__<name>`: the source id in the uploaded name makes re-sending an attachment idempotent."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", str(att.source_id))[:64]
    name = re.sub(r"[\\/:*?\"<>|\x00-\x1f]", "_", att.name).strip() or "attachment"
    return name if name.startswith(f"{prefix}__") else f"{prefix}__{name}"


def _canonical_value(f: FieldInfo | None, value: Any) -> Any:
    if f is None or value is None:
        return value
    if f.kind == "guid":
        return canonical_guid(value) or value
    if f.kind == "date" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _geometry_value(geometry: Any, sr: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(geometry, Mapping):
        return None
    x, y = geometry.get("x"), geometry.get("y")
    if not isinstance(x, int | float) or not isinstance(y, int | float) or math.isnan(x) or math.isnan(y):
        return None  # null / empty point ("NaN" from some servers)
    ref = geometry.get("spatialReference") or sr or {}
    return {"x": float(x), "y": float(y), "spatialReference": dict(ref)}


def _wire_value(f: FieldInfo, value: Any, layer: LayerInfo) -> Any:
    """A canonical value as applyEdits wants it (dates in epoch ms, GUIDs braced upper case)."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        raise MappingError(f"arcgis: {layer.name}.{f.name}: {value!r} is not a number ArcGIS can store")
    if f.kind == "date":
        if isinstance(value, datetime | date):
            return _datetime_to_ms(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
        raise MappingError(f"arcgis: {layer.name}.{f.name} is a date: expected epoch ms or a datetime, "
                           f"got {value!r}")
    if f.kind == "guid":
        guid = canonical_guid(value)
        if guid is None:
            raise MappingError(f"arcgis: {layer.name}.{f.name} holds GUIDs: {value!r} is not one")
        return guid
    _check_domain(f, value, layer)
    return value


def _check_domain(f: FieldInfo, value: Any, layer: LayerInfo) -> None:
    """Refuse a value outside the field's coded-value domain: the hosted layer itself would store it as is.

    applyEdits does not enforce domains (Esri/arcgis-python-api#818; Esri technical article 000014410), so a
    wrong code would reach every map and form as an unlabelled value; here it dead-letters with the field named.
    """
    if not f.domain or f.domain.get("type") != "codedValue":
        return
    codes = [c.get("code") for c in f.domain.get("codedValues") or [] if isinstance(c, Mapping)]
    if any(value == code and isinstance(value, str) == isinstance(code, str) for code in codes):
        return
    shown = ", ".join(repr(c) for c in codes[:12]) + (", ..." if len(codes) > 12 else "")
    raise MappingError(f"arcgis: {layer.name}.{f.name}: {value!r} is not a code of the field's domain "
                       f"'{f.domain.get('name')}' ({shown}); the layer would store it unlabelled: map it in the "
                       "flow's value_maps")


def _feature_json(layer: LayerInfo, p: _Pending) -> dict[str, Any]:
    feature: dict[str, Any] = {"attributes": {**p.attributes, layer.global_id_field: p.gid}}
    if p.has_geometry:
        feature["geometry"] = p.geometry
    return feature


_GLOBALID_NAMESPACE = uuid.UUID("6f1c7a52-3a0e-4c1b-9a51-5e2f0d9b7c11")
"""Namespace of the name-based (UUID v5) GlobalIDs Syncline gives the features it creates."""


def _globalid_for(layer: LayerInfo, match: Mapping[str, Any] | None) -> str:
    """A GlobalID that is a function of the layer and the record's match (random when there is no match)."""
    if not match:
        return "{" + str(uuid.uuid4()).upper() + "}"
    name = layer.name + "|" + "|".join(f"{k.lower()}={v}" for k, v in sorted(match.items()))
    return "{" + str(uuid.uuid5(_GLOBALID_NAMESPACE, name)).upper() + "}"


def _match_identity(layer: LayerInfo, match: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted((layer.require(n).name.lower(), _norm(v)) for n, v in match.items()))


def _norm(value: Any) -> Any:
    # The hosted data's collation is case-insensitive and GUIDs compare regardless of case and braces.
    if isinstance(value, str):
        return canonical_guid(value) or value.casefold()
    return value


def _same(stored: Any, wanted: Any) -> bool:
    return stored is not None and _norm(stored) == _norm(wanted)


def _rounds(pending: list[_Pending]) -> list[list[_Pending]]:
    """Split ops so one applyEdits never touches a record twice; later ops on a record go in later rounds."""
    rounds: list[list[_Pending]] = []
    seen: list[set[Any]] = []
    for p in pending:
        ident = ("key", p.gid) if p.gid else ("match", tuple(sorted((k.lower(), _norm(v))
                                                                   for k, v in (p.op.match or {}).items())))
        last = max((i for i, s in enumerate(seen) if ident in s), default=-1)
        while len(rounds) <= last + 1:
            rounds.append([])
            seen.append(set())
        rounds[last + 1].append(p)
        seen[last + 1].add(ident)
    return rounds


def _attachment_ref(info: Mapping[str, Any]) -> AttachmentRef:
    return AttachmentRef(str(info.get("id")), str(info.get("name") or info.get("id")),
                         str(info.get("contentType") or "application/octet-stream"), int(info.get("size") or 0))


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _exceeded(body: Any) -> bool:
    if not isinstance(body, Mapping):
        return False
    props = _mapping(body.get("properties"))
    return bool(body.get("exceededTransferLimit") or props.get("exceededTransferLimit"))


def _json_body(response: httpx.Response) -> Any:
    content = response.content.lstrip()
    if content[:1] not in (b"{", b"["):
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None


def _body_error_code(response: httpx.Response) -> int | None:
    # Only error bodies are parsed here: they open with an "error" key, big result pages never do.
    head = response.content.lstrip()[:64]
    if response.status_code != 200 or not head.startswith(b"{") or b'"error"' not in head:
        return None
    body = _json_body(response)
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, Mapping) else None
    return int(code) if isinstance(code, int) or (isinstance(code, str) and code.isdigit()) else None


def _token_problem(response: httpx.Response) -> str | None:
    if response.status_code in (401, *_TOKEN_ERRORS):
        return f"HTTP {response.status_code}"
    code = _body_error_code(response)
    if code in _TOKEN_ERRORS:
        body = _json_body(response)
        return f"{code} {body['error'].get('message') or ''}".strip()
    return None


def _error_text(error: Mapping[str, Any]) -> str:
    message = str(error.get("message") or error.get("error_description") or error.get("error") or "")
    details = [str(d) for d in error.get("details") or [] if d and str(d) != message]
    return f"{error.get('code')} {message}".strip() + (f" ({'; '.join(details)})" if details else "")


def _edit_error_text(error: Any) -> str:
    if not isinstance(error, Mapping):
        return "no error description"
    return f"error {error.get('code')}: {error.get('description') or error.get('message') or ''}".strip()


def _error_from_body(error: Mapping[str, Any], what: str, write: bool) -> SyncError:
    raw = error.get("code")
    code = int(raw) if isinstance(raw, int) or (isinstance(raw, str) and raw.isdigit()) else 0
    text = f"arcgis: {what}: error {_error_text(error)}"
    if code in _TOKEN_ERRORS:
        return AuthError(text)
    if code == 403:
        return AuthError(f"{text}; the app or API key lacks privileges on this service")
    if code == 429:
        return ThrottledError(text)
    if code == 504 and write:
        return AmbiguousWriteError(f"{text}; the edits may have been applied and are re-checked on retry")
    if 500 <= code < 600:
        return TransientError(text)
    return RejectedError(text)


def _parse_edit_date_checkpoint(text: str) -> tuple[int | None, frozenset[int]]:
    if not text.startswith(_CHECKPOINT_EDITDATE):
        return None, frozenset()
    _, ms, oids = [*text.split(":", 2), "", ""][:3]
    try:
        return (int(ms) if ms else None), frozenset(int(o) for o in oids.split(",") if o)
    except ValueError as exc:
        raise EnvelopeError(f"arcgis: malformed EditDate checkpoint {text!r}") from exc


def _edit_date_checkpoint(watermark: int | None, boundary: Iterable[int]) -> str:
    if watermark is None:
        return _CHECKPOINT_EDITDATE
    return f"{_CHECKPOINT_EDITDATE}{watermark}:{','.join(str(o) for o in sorted(boundary))}"


# ============================================================================================ webhooks


@dataclass(frozen=True)
class LayerChange:
    """One entry of a feature-service webhook payload: edits happened in one layer."""

    layer_id: int
    table: str | None
    """The layer's name when known (see `parse_webhook`), else None."""
    events: tuple[str, ...]
    changes_url: str
    server_gens: tuple[int, int] | None
    last_updated: datetime | None
    webhook_name: str
    service_name: str
    org_id: str


@dataclass(frozen=True)
class ArcGISWebhook:
    """A parsed ArcGIS webhook: which layers changed, and for Survey123 the submitted record itself."""

    kind: Literal["feature_service", "survey123"]
    changes: tuple[LayerChange, ...] = ()
    table: str | None = None
    """Survey123: the layer the record was written to."""
    record: SourceRecord | None = None
    """Survey123: the submitted record in the canonical convention (key = feature.result.globalId)."""
    event_type: str | None = None
    service_url: str | None = None
    layer_id: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tables(self) -> list[str]:
        """Names of the layers that changed; a layer whose name is unknown appears as its id ("0")."""
        if self.kind == "survey123":
            return [self.table] if self.table else []
        return list(dict.fromkeys(c.table or str(c.layer_id) for c in self.changes))

    def describe(self) -> str:
        """One line for logs and poll hints."""
        if self.kind == "survey123":
            key = self.record.key if self.record else "?"
            return f"Survey123 {self.event_type} on {self.table} ({key})"
        parts = [f"layer {c.layer_id}{f' ({c.table})' if c.table else ''}: {', '.join(c.events)}"
                 + (f" serverGens {list(c.server_gens)}" if c.server_gens else "") for c in self.changes]
        return f"feature-service webhook {self.changes[0].webhook_name!r}: " + "; ".join(parts)


def parse_webhook(body: bytes, content_type: str, *, layer_names: Mapping[int, str] | None = None,
                  max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH) -> ArcGISWebhook:
    """Parse a feature-service webhook (JSON array, or form-encoded `payload=[...]`) or a Survey123 webhook.

    Feature-service payloads carry layer ids only: names come from `layer_names`, else from the service
    definitions clients in this process have read, else stay None (see `ArcGISFeatureServiceClient.tables_for`).
    The JSON (a form's `payload` field too) is read within `max_bytes` and `max_depth`.
    Raises EnvelopeError naming the problem.
    """
    media = content_type.split(";")[0].strip().lower()
    if len(body) > max_bytes:
        raise EnvelopeError(f"ArcGIS webhook body is too large: {len(body)} bytes (the limit is {max_bytes})")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"ArcGIS webhook body is not UTF-8: {exc}") from exc
    if media == "application/x-www-form-urlencoded":
        try:
            form = parse_qs(text, keep_blank_values=True, strict_parsing=False, errors="strict", max_num_fields=100)
        except ValueError as exc:
            raise EnvelopeError(f"form-encoded ArcGIS webhook is malformed: {exc}"[:300]) from exc
        if "payload" not in form:
            raise EnvelopeError(f"form-encoded ArcGIS webhook has no 'payload' field (fields: {sorted(form)})"[:300])
        text = form["payload"][0]
    data = read_json(text.encode("utf-8", "surrogatepass"), "ArcGIS webhook body", max_bytes=max_bytes,
                     max_depth=max_depth)
    with bad_values("ArcGIS webhook body"):
        if isinstance(data, list):
            return _feature_service_hook(data, layer_names)
        if isinstance(data, Mapping) and "eventType" in data and "feature" in data:
            return _survey123_hook(data)
    raise EnvelopeError("ArcGIS webhook body is neither a feature-service payload (a JSON array of layer "
                        "changes) nor a Survey123 body (eventType + feature)")


def _feature_service_hook(entries: list[Any], layer_names: Mapping[int, str] | None) -> ArcGISWebhook:
    if not entries:
        raise EnvelopeError("feature-service webhook payload is an empty array")
    changes: list[LayerChange] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise EnvelopeError(f"feature-service webhook entry {index} is not an object")
        validate(ArcGISLayerChange, entry, f"feature-service webhook entry {index}")
        layer_id = entry.get("layerId")
        if isinstance(layer_id, str) and layer_id.isascii() and layer_id.isdigit() and len(layer_id) < 10:
            layer_id = int(layer_id)
        if not isinstance(layer_id, int) or isinstance(layer_id, bool) or not 0 <= layer_id < 2**31:
            raise EnvelopeError(f"feature-service webhook entry {index}: layerId {layer_id!r} is not a layer id"[:300])
        events = entry.get("events")
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise EnvelopeError(f"feature-service webhook entry {index}: events must be a list of strings")
        url = entry.get("changesUrl")
        if not isinstance(url, str) or not url:
            raise EnvelopeError(f"feature-service webhook entry {index}: changesUrl is missing")
        service = str(entry.get("serviceName") or "")
        names = layer_names if layer_names is not None else _LAYER_NAMES.get(service.lower(), {})
        updated = entry.get("lastUpdatedTime")
        changes.append(LayerChange(
            layer_id=layer_id, table=names.get(layer_id), events=tuple(events), changes_url=url,
            server_gens=_server_gens(url),
            last_updated=_webhook_time(updated, f"feature-service webhook entry {index}: lastUpdatedTime"),
            webhook_name=str(entry.get("name") or ""), service_name=service, org_id=str(entry.get("orgId") or "")))
    return ArcGISWebhook("feature_service", changes=tuple(changes))


def _server_gens(url: str) -> tuple[int, int] | None:
    raw = parse_qs(urlsplit(url).query).get("serverGens")
    if not raw:
        return None
    try:
        low, high = read_json(raw[0], "serverGens")
        return int(low), int(high)
    except (EnvelopeError, ValueError, TypeError, OverflowError):
        return None


def _webhook_time(value: Any, where: str) -> datetime | None:
    """Epoch milliseconds of a webhook field; EnvelopeError when outside the years 1-9999."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    moment = epoch_ms_to_datetime(value)
    if moment is None:
        raise EnvelopeError(f"{where}: {value!r} is not a time (epoch milliseconds in range, years 1-9999)"[:300])
    return moment


def _survey123_hook(data: Mapping[str, Any]) -> ArcGISWebhook:
    validate(SurveyWebhook, data, "Survey123 webhook")
    event = data.get("eventType")
    if event not in ("addData", "editData"):
        raise EnvelopeError(f"Survey123 webhook eventType {event!r} is not addData or editData")
    feature = data.get("feature")
    if not isinstance(feature, Mapping):
        raise EnvelopeError("Survey123 webhook has no feature object")
    attrs = feature.get("attributes")
    if not isinstance(attrs, Mapping):
        raise EnvelopeError("Survey123 webhook feature has no attributes object")
    info = _mapping(feature.get("layerInfo"))
    table = info.get("name")
    if not isinstance(table, str) or not table:
        raise EnvelopeError("Survey123 webhook feature.layerInfo.name is missing (which layer was written?)")
    gid_field = str(info.get("globalIdField") or "globalid")
    result = _mapping(feature.get("result"))
    key = canonical_guid(result.get("globalId")) or canonical_guid(
        next((v for k, v in attrs.items() if k.lower() == gid_field.lower()), None))
    if key is None:
        raise EnvelopeError("Survey123 webhook feature.result.globalId is missing or not a GUID")
    values: dict[str, Any] = {}
    for name, value in attrs.items():
        # Without the layer schema only braced GUIDs are recognisable as GUIDs (a DV_ID text stays as is).
        values[name] = canonical_guid(value) if isinstance(value, str) and _BRACED_GUID_RE.match(value) else value
    values[next((k for k in attrs if k.lower() == gid_field.lower()), gid_field)] = key
    if info.get("type") != "Table":
        geometry = feature.get("geometry")
        # Survey123 submits WGS84 unless the geometry says otherwise.
        values[GEOMETRY_KEY] = _geometry_value(geometry, {"wkid": 4326}) if geometry else None
    refs: list[AttachmentRef] = []
    groups = feature.get("attachments")
    if isinstance(groups, Mapping):
        for items in groups.values():
            for item in items or []:
                if isinstance(item, Mapping) and item.get("id") is not None:
                    refs.append(_attachment_ref(item))
    edited = next((v for k, v in attrs.items() if k.lower() == "editdate"), None)
    edited = edited if isinstance(edited, int) and not isinstance(edited, bool) else None
    record = SourceRecord(key, values, _webhook_time(edited, "Survey123 webhook feature.attributes.EditDate"),
                          str(edited) if edited is not None else None, attachments=refs)
    survey = _mapping(data.get("surveyInfo"))
    layer_id = info.get("id")
    return ArcGISWebhook("survey123", table=table, record=record, event_type=str(event),
                         service_url=str(survey.get("serviceUrl")) if survey.get("serviceUrl") else None,
                         layer_id=layer_id if isinstance(layer_id, int) else None,
                         extra={"username": _mapping(data.get("userInfo")).get("username")})


def verify_signature(body: bytes, signature_header: str | None, key: str) -> bool:
    """True when `x-esriHook-Signature` is the HMAC-SHA256 hex of the raw body under `key` (`sha256=` optional)."""
    if not signature_header or not key:
        return False
    presented = signature_header.strip()
    if presented.lower().startswith("sha256="):
        presented = presented[7:]
    expected = hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
    # Bytes, not text: compare_digest refuses non-ASCII text, and a header can hold anything.
    return hmac.compare_digest(expected.encode(), presented.strip().lower().encode("utf-8", "surrogatepass"))
