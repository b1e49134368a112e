"""Webhooks of the simulated service: registrations, the admin API, payloads, signatures and delivery."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from sandbox.arcgis.codecs import _bool
from sandbox.arcgis.errors import RestError, _bad_request
from sandbox.arcgis.store import FeatureStore, _Change
from sandbox.webhook_delivery import Deliverer
from shared.payloads import strict_loads

MAX_WEBHOOKS = 5
"""AGOL caps feature-service webhooks at 5 per service."""
CHANGE_TYPES = frozenset({
    "*", "FeaturesCreated", "FeaturesUpdated", "FeaturesDeleted", "FeaturesEdited", "AttachmentsCreated",
    "AttachmentsUpdated", "AttachmentsDeleted", "LayerSchemaChanged", "LayerDefinitionChanged",
    "FeatureServiceDefinitionChanged",
})
_FEATURE_EVENTS = frozenset({"FeaturesCreated", "FeaturesUpdated", "FeaturesDeleted"})


@dataclass
class WebhookRegistration:
    """A feature-service webhook (`{service}/WebHooks/create` or the `register_webhook` helper)."""

    url: str
    name: str
    signature_key: str | None
    change_types: frozenset[str]
    content_type: str
    headers: dict[str, str]
    id: int = 0
    """Admin-API id (`WebHooks/<id>/edit`); assigned when the webhook is stored."""
    global_id: str = ""
    active: bool = True
    """Inactive webhooks are kept (and listed) but deliver nothing."""
    owner: str = ""
    schedule_info: dict[str, Any] | None = None
    payload_format: str = "json"
    created: int = 0
    modified: int = 0
    server_gen: int = 0

    def wants(self, events: Iterable[str]) -> list[str]:
        types = self.change_types
        out = []
        for event in events:
            if "*" in types or "All" in types or event in types or (
                    event in _FEATURE_EVENTS and "FeaturesEdited" in types):
                out.append(event)
        return sorted(out)

    def expanded(self) -> frozenset[str]:
        """The concrete events this webhook fires on (for the overlapping-events check)."""
        if "*" in self.change_types or "All" in self.change_types:
            return frozenset(CHANGE_TYPES - {"*"})
        out = set(self.change_types)
        if "FeaturesEdited" in out:
            out |= _FEATURE_EVENTS
        return frozenset(out)


@dataclass
class WebhookDelivery:
    """One POST the simulator made to a hook URL (delivered or not)."""

    url: str
    kind: str
    """"feature-service" or "survey123"."""
    body: bytes
    headers: dict[str, str]
    status: int | None
    error: str = ""


class SimWebhooks(FeatureStore):
    """Feature-service webhooks: the admin API, the register helper, payloads and their delivery."""

    org_id: str
    service_name: str
    app_username: str
    change_tracking: bool
    webhook_deliveries: list[WebhookDelivery]
    _webhooks: list[WebhookRegistration]
    _webhook_ids: Iterator[int]
    _survey_hooks: list[tuple[str, dict[str, str]]]
    _deliveries: Deliverer

    def register_webhook(self, url: str, *, signature_key: str | None = None,
                         change_types: Sequence[str] = ("*",), name: str = "syncline",
                         content_type: str = "application/json",
                         headers: Mapping[str, str] | None = None) -> WebhookRegistration:
        """Create a feature-service webhook: every edit batch POSTs the payload array to `url`.

        `content_type` "application/json" or "application/x-www-form-urlencoded" (`payload=[...]`). With a
        `signature_key`, the body's HMAC-SHA256 hex goes in `x-esriHook-Signature`. `headers` are extra
        headers for the sandbox's own plumbing (e.g. a function key); the real service sends none.
        """
        unknown = set(change_types) - CHANGE_TYPES
        if unknown:
            raise ValueError(f"unknown changeTypes {sorted(unknown)}")
        if content_type not in ("application/json", "application/x-www-form-urlencoded"):
            raise ValueError("contentType must be application/json or application/x-www-form-urlencoded")
        if len(self._webhooks) >= MAX_WEBHOOKS:
            raise ValueError(f"a feature service has at most {MAX_WEBHOOKS} webhooks")
        reg = WebhookRegistration(url, name, signature_key, frozenset(change_types), content_type,
                                  dict(headers or {}), owner=self.app_username)
        with self._lock:
            self._store_webhook(reg)
        return reg

    def webhooks(self) -> list[WebhookRegistration]:
        """The registered webhooks (helper and admin API alike), oldest first."""
        with self._lock:
            return list(self._webhooks)

    def _store_webhook(self, reg: WebhookRegistration) -> None:
        now = self.clock()
        reg.id = next(self._webhook_ids)
        reg.global_id = str(uuid.uuid4())
        reg.created = reg.modified = now
        reg.server_gen = self._gen
        self._webhooks.append(reg)

    async def flush_webhooks(self, timeout: float = 10.0) -> None:
        """Wait until every queued webhook delivery has finished (delivered or failed)."""
        await self._deliveries.flush(timeout)

    def close(self) -> None:
        """Stop the webhook delivery thread."""
        self._deliveries.close()

    def register_survey123_webhook(self, url: str, *, headers: Mapping[str, str] | None = None) -> None:
        """Configure a Survey123 form webhook: `survey123_submit` without `hook_url` POSTs its body here."""
        self._survey_hooks.append((url, dict(headers or {})))

    def _emit(self, changes: Iterable[_Change]) -> None:
        changes = list(changes)
        if not changes or not self._webhooks:
            return
        for reg in list(self._webhooks):
            if not reg.active:
                continue
            entries = []
            for change in changes:
                events = reg.wants(change.events)
                if not events:
                    continue
                flags = {
                    "returnInserts": "FeaturesCreated" in change.events,
                    "returnUpdates": "FeaturesUpdated" in change.events,
                    "returnDeletes": "FeaturesDeleted" in change.events,
                    "returnAttachments": any(e.startswith("Attachments") for e in change.events),
                }
                query = "&".join(f"{k}={'true' if v else 'false'}" for k, v in flags.items())
                entries.append({
                    "name": reg.name, "layerId": change.layer_id, "orgId": self.org_id,
                    "serviceName": self.service_name, "lastUpdatedTime": change.at,
                    "changesUrl": f"{self._public_base()}{self.service_path}/extractChanges?serverGens="
                                  f"[{change.gen_before},{change.gen_after}]&async=true&{query}",
                    "events": events,
                })
            if not entries:
                continue
            payload = json.dumps(entries)
            if reg.content_type == "application/json":
                body = payload.encode()
            else:
                body = urlencode({"payload": payload}).encode()
            headers = {"Content-Type": reg.content_type, **reg.headers}
            if reg.signature_key:
                headers["x-esriHook-Signature"] = hmac.new(reg.signature_key.encode(), body,
                                                           hashlib.sha256).hexdigest()
            self._send(reg.url, "feature-service", body, headers)

    def _send(self, url: str, kind: str, body: bytes, headers: dict[str, str]) -> None:
        self._deliveries.submit(lambda client: self._deliver(client, url, kind, body, headers))

    async def _deliver(self, client: httpx.AsyncClient, url: str, kind: str, body: bytes,
                       headers: dict[str, str]) -> None:
        try:
            resp = await client.post(url, content=body, headers=headers)
            record = WebhookDelivery(url, kind, body, headers, resp.status_code,
                                     "" if resp.is_success else resp.text[:500])
        except httpx.HTTPError as exc:
            record = WebhookDelivery(url, kind, body, headers, None, f"{type(exc).__name__}: {exc}")
        self.webhook_deliveries.append(record)

    # ------------------------------------------------------------------------------------ admin: webhooks

    def _dispatch_admin(self, method: str, rest: list[str], params: Mapping[str, str], user: str) -> Any:
        """`{admin}/WebHooks`, `WebHooks/create`, `WebHooks/<id>`, `WebHooks/<id>/edit`, `WebHooks/<id>/delete`."""
        if not rest or rest[0].lower() != "webhooks":
            raise RestError(400, "Invalid URL", ["Invalid URL"])
        tail = rest[1:]
        if not tail:
            return [self._webhook_json(reg) for reg in self._webhooks]
        if method != "POST" and tail[-1] in ("create", "edit", "delete"):
            raise RestError(400, "Unable to complete operation.", ["This operation is only supported via POST."])
        if tail == ["create"]:
            return self._create_webhook(params, user)
        reg = next((r for r in self._webhooks if tail[0].isdigit() and r.id == int(tail[0])), None)
        if reg is None:
            raise RestError(404, "Webhook not found.", [f"Webhook '{tail[0]}' does not exist."])
        if len(tail) == 1:
            return self._webhook_json(reg)
        if tail[1:] == ["edit"]:
            return self._edit_webhook(reg, params)
        if tail[1:] == ["delete"]:
            self._webhooks.remove(reg)
            return {"success": True}
        raise RestError(400, "Invalid URL", ["Invalid URL"])

    def _webhook_json(self, reg: WebhookRegistration) -> dict[str, Any]:
        # The list shape of the ArcGIS Online "Web Hooks (Feature Service)" resource.
        return {
            "name": reg.name, "owner": reg.owner, "id": reg.id, "globalId": reg.global_id,
            "tenantId": self.org_id, "serviceId": 560100, "active": reg.active, "hookUrl": reg.url,
            "serviceUrl": f"{self._public_base()}{self.service_path}", "signatureKey": reg.signature_key or "",
            "format": reg.payload_format, "contentType": reg.content_type, "serverGen": reg.server_gen,
            "createdTime": reg.created, "lastUpdatedTime": reg.modified,
            "changeTypes": sorted(reg.change_types), "scheduleInfo": reg.schedule_info or {},
        }

    def _webhook_settings(self, p: Mapping[str, str], current: WebhookRegistration | None) -> dict[str, Any]:
        """Validated create/edit parameters; on edit an absent parameter keeps its current value."""
        def given(name: str) -> bool:
            return name in p and p[name] != ""

        name = p["name"].strip() if given("name") else (current.name if current else "")
        if not name:
            raise _bad_request("'name' is required.")
        url = p["hookUrl"].strip() if given("hookUrl") else (current.url if current else "")
        if not url.lower().startswith(("https://", "http://")):
            raise _bad_request("'hookUrl' must be an http(s) URL.")
        if given("changeTypes"):
            raw = p["changeTypes"].strip()
            try:
                parsed = strict_loads(raw) if raw.startswith("[") else [t.strip() for t in raw.split(",")]
            except ValueError as exc:
                raise _bad_request("'changeTypes' must be a JSON array or a comma-separated list.") from exc
            types = frozenset(str(t) for t in parsed if str(t))
        else:
            types = current.change_types if current else frozenset({"*"})
        unknown = sorted(types - CHANGE_TYPES - {"All"})
        if not types or unknown:
            raise _bad_request(f"Invalid changeTypes {unknown or '[]'}.")
        content_type = p["contentType"] if given("contentType") else (
            current.content_type if current else "application/json")
        if content_type not in ("application/json", "application/x-www-form-urlencoded"):
            raise _bad_request("'contentType' must be application/json or application/x-www-form-urlencoded.")
        active = _bool(p, "active", current.active if current else False)
        key = p.get("signatureKey", current.signature_key if current else None)
        schedule: dict[str, Any] | None = current.schedule_info if current else None
        if given("scheduleInfo"):
            try:
                schedule = strict_loads(p["scheduleInfo"])
            except ValueError as exc:
                raise _bad_request("'scheduleInfo' must be a JSON object.") from exc
        for other in self._webhooks:
            if other is not current and other.url == url and other.expanded() & WebhookRegistration(
                    url, name, None, types, content_type, {}).expanded():
                raise _bad_request(f"The webhook '{other.name}' already sends overlapping events to this hookUrl.")
        return {"name": name, "url": url, "change_types": types, "content_type": content_type, "active": active,
                "signature_key": key or None, "schedule_info": schedule,
                "payload_format": p.get("payloadFormat") or (current.payload_format if current else "json")}

    def _create_webhook(self, p: Mapping[str, str], user: str) -> dict[str, Any]:
        # Webhooks need change tracking (they report serverGens) and a service that can be edited.
        if not self.change_tracking:
            raise RestError(400, "Unable to create webhook.", [
                "Webhooks require the Editing and ChangeTracking capabilities on the feature service."])
        if len(self._webhooks) >= MAX_WEBHOOKS:
            raise RestError(400, "Unable to create webhook.", [
                f"A maximum of {MAX_WEBHOOKS} webhooks can be created for a feature service."])
        settings = self._webhook_settings(p, None)
        reg = WebhookRegistration(settings["url"], settings["name"], settings["signature_key"],
                                  settings["change_types"], settings["content_type"], {}, owner=user,
                                  active=settings["active"], schedule_info=settings["schedule_info"],
                                  payload_format=settings["payload_format"])
        self._store_webhook(reg)
        return self._webhook_json(reg)

    def _edit_webhook(self, reg: WebhookRegistration, p: Mapping[str, str]) -> dict[str, Any]:
        settings = self._webhook_settings(p, reg)
        reg.name, reg.url, reg.change_types = settings["name"], settings["url"], settings["change_types"]
        reg.content_type, reg.active, reg.signature_key = (settings["content_type"], settings["active"],
                                                           settings["signature_key"])
        reg.schedule_info, reg.payload_format = settings["schedule_info"], settings["payload_format"]
        reg.modified = self.clock()
        return self._webhook_json(reg)
