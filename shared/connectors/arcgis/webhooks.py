"""ArcGIS webhooks: feature-service and Survey123 payloads -> ArcGISWebhook, signatures, the admin API."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from shared.connectors.arcgis.client import ArcGISServiceClient
from shared.connectors.arcgis.codecs import (
    _attachment_ref,
    _geometry_value,
    _mapping,
    canonical_guid,
    epoch_ms_to_datetime,
)
from shared.connectors.arcgis.schema import _LAYER_NAMES
from shared.core.errors import EnvelopeError, SpecError, TransientError
from shared.core.ports import GEOMETRY_KEY, AttachmentRef, SourceRecord
from shared.payloads import (
    MAX_BODY_BYTES,
    MAX_JSON_DEPTH,
    ArcGISLayerChange,
    SurveyWebhook,
    bad_values,
    read_json,
    validate,
)

_BRACED_GUID_RE = re.compile(r"^\{[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}$")


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


class ArcGISWebhookAdmin(ArcGISServiceClient):
    """The service's webhooks through its admin API, and the layers a received webhook is about."""

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
