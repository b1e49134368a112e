"""The HTTP conversation with one feature service: definitions, token, retries, errors, paging, reads."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx

from shared.connectors._http import RETRIABLE_STATUS, RetryPolicy, send_with_retry
from shared.connectors.arcgis.auth import DEFAULT_POLICY, ArcGISAuth
from shared.connectors.arcgis.codecs import (
    SYSTEM,
    _attachment_ref,
    _canonical_value,
    _geometry_value,
    _mapping,
    canonical_guid,
    epoch_ms_to_datetime,
    repr_guid,
    where_literal,
)
from shared.connectors.arcgis.errors import _body_error_code, _error_from_body, _json_body, _token_problem
from shared.connectors.arcgis.schema import _LAYER_NAMES, FieldInfo, LayerInfo, ServiceInfo, _service_name
from shared.core.errors import AmbiguousWriteError, AuthError, MappingError, RejectedError, SpecError, TransientError
from shared.core.ports import GEOMETRY_KEY, AttachmentRef, SourceRecord

log = logging.getLogger(__name__)

_WHERE_CHUNK = 200
"""Values per `IN (...)` list: keeps where clauses far below URL/form limits."""
_OID_CACHE_LIMIT = 200_000
"""Per-layer objectId -> GlobalID entries kept to resolve bare `deleteIds` (bounded memory)."""


class ArcGISServiceClient:
    """Definitions, transport (token, retries, errors), paging and reads of one hosted feature service.

    The connector (`connector.ArcGISFeatureServiceClient`) adds writes, the change feed and webhooks.
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
        layer_ttl_seconds: float = 300.0,
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
        self._layers: dict[int, tuple[float, LayerInfo]] = {}
        self.layer_ttl_seconds = layer_ttl_seconds
        """How long a layer definition is trusted: its fields' coded-value domains are checked on every write, and
        an administrator may change them (syncline arcgis provision) while the app runs."""
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
        """The definition of the layer or table called `table` (or with that numeric id); cached for
        `layer_ttl_seconds`."""
        svc = await self.service_info()
        text = str(table).strip()
        layer_id = int(text) if text.isdigit() and int(text) in svc.names else svc.layer_ids.get(text.lower())
        if layer_id is None:
            raise SpecError(f"arcgis: no layer or table named {table!r} in {self.service_url} "
                            f"(it has: {', '.join(svc.names.values())}); fix the flow spec's table")
        cached = self._layers.get(layer_id)
        if cached is not None and time.monotonic() - cached[0] < self.layer_ttl_seconds:
            return cached[1]
        body = await self._request("GET", f"{self.service_url}/{layer_id}", params={"f": "json"},
                                   what=f"read the definition of layer {table}")
        info = self._parse_layer(layer_id, body, svc)
        self._layers[layer_id] = (time.monotonic(), info)
        return info

    async def layer_name(self, layer_id: int) -> str | None:
        """Name of a layer id (e.g. from a feature-service webhook), or None."""
        return (await self.service_info()).names.get(layer_id)

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
            clauses.append(f"{f.name} IS NULL" if value is None else f"{f.name} = {where_literal(f, value, layer)}")
        for name, excluded in (not_in or {}).items():
            f = layer.require(name)
            values = [v for v in excluded if v is not None]
            not_null = len(values) != len(excluded)
            in_list = f"{f.name} NOT IN ({', '.join(where_literal(f, v, layer) for v in values)})" if values else ""
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


def _exceeded(body: Any) -> bool:
    if not isinstance(body, Mapping):
        return False
    props = _mapping(body.get("properties"))
    return bool(body.get("exceededTransferLimit") or props.get("exceededTransferLimit"))
