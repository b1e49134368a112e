"""Webhooks: service endpoints and plug-in steps, the RemoteExecutionContext they post, delivery."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from sandbox.dataverse.codecs import _csv, _parse_datetime, _with_query
from sandbox.dataverse.platform import (
    AUTH_HTTP_HEADER,
    AUTH_HTTP_QUERY_STRING,
    AUTH_WEBHOOK_KEY,
    CONTRACT_WEBHOOK,
    IMAGE_BOTH,
    IMAGE_POST,
    IMAGE_PRE,
    WebhookFailure,
    WebhookRegistration,
    parse_settings,
)
from sandbox.dataverse.protocol import BUSINESS_UNIT_ID, ORGANIZATION_ID, XRM_CONTRACTS, _Event
from sandbox.dataverse.schema import TableSchema
from sandbox.dataverse.state import _State


class _Webhooks(_State):
    """Who gets which change (helper registrations and Web API steps), and posting it out.

    A part of `DataverseSimulator` (app.py), which holds the state these methods use.
    """

    def register_webhook(self, url: str, *, headers: Mapping[str, str] | None = None,
                         tables: set[str] | None = None) -> None:
        """Register a service endpoint for Create/Update/Delete of `tables` (entity sets or logical names)."""
        self._webhooks.append(WebhookRegistration(url, dict(headers or {}), set(tables) if tables else None))

    async def flush_webhooks(self, timeout: float = 10.0) -> None:
        """Wait until every queued webhook delivery has finished (delivered or failed)."""
        await self._deliveries.flush(timeout)

    def close(self) -> None:
        """Stop the webhook delivery thread."""
        self._deliveries.close()

    def _emit(self, events: Iterable[_Event]) -> None:
        for event in events:
            schema = self.schema[event.entity_set]
            if schema.system:
                continue  # registering a webhook is not itself an event anybody can subscribe to
            targets = [(reg, self._remote_execution_context(event)) for reg in self._webhooks
                       if reg.tables is None or {event.entity_set, schema.logical_name} & reg.tables]
            targets += self._registered_targets(event)
            for reg, body in targets:
                self._deliveries.submit(functools.partial(self._deliver, reg=reg, event=event, body=body))

    def _registered_targets(self, event: _Event) -> list[tuple[WebhookRegistration, bytes]]:
        """Deliveries of the enabled steps registered (through the Web API) for this message and table."""
        schema = self.schema[event.entity_set]
        out: list[tuple[WebhookRegistration, bytes]] = []
        with self._lock:
            message = next((r for r in self._tables["sdkmessages"].values()
                            if r.values.get("name") == event.message), None)
            if message is None:
                return out
            message_id = message.values["sdkmessageid"]
            steps = sorted((r.values for r in self._tables["sdkmessageprocessingsteps"].values()
                            if r.values.get("sdkmessageid") == message_id and r.values.get("statecode") == 0),
                           key=lambda v: (v.get("rank") or 0, str(v.get("name"))))
            for step in steps:
                filter_row = self._tables["sdkmessagefilters"].get(str(step.get("sdkmessagefilterid") or ""))
                if filter_row is None or filter_row.values.get("primaryobjecttypecode") != schema.logical_name:
                    continue
                endpoint = self._tables["serviceendpoints"].get(str(step.get("eventhandler") or ""))
                if endpoint is None or endpoint.values.get("contract") != CONTRACT_WEBHOOK:
                    continue
                filtering = set(_csv(step.get("filteringattributes")))
                if event.message == "Update" and filtering and not filtering & set(event.target):
                    continue  # none of the step's filtering attributes is in the update
                pre: list[tuple[str, dict[str, Any]]] = []
                post: list[tuple[str, dict[str, Any]]] = []
                for image in self._tables["sdkmessageprocessingstepimages"].values():
                    img = image.values
                    if img.get("sdkmessageprocessingstepid") != step["sdkmessageprocessingstepid"]:
                        continue
                    wanted = set(_csv(img.get("attributes")))

                    def pick(values: Mapping[str, Any], wanted: set[str] = wanted) -> dict[str, Any]:
                        # No attribute list means every attribute, as in the Plug-in Registration tool.
                        return {k: v for k, v in values.items() if not wanted or k in wanted}

                    alias = str(img.get("entityalias") or "Image")
                    if img.get("imagetype") in (IMAGE_PRE, IMAGE_BOTH) and event.pre is not None:
                        pre.append((alias, pick(event.pre)))
                    if img.get("imagetype") in (IMAGE_POST, IMAGE_BOTH) and event.post is not None:
                        post.append((alias, pick(event.post)))
                body = self._remote_execution_context(event, step_id=step["sdkmessageprocessingstepid"],
                                                      mode=int(step.get("mode") or 0), pre_images=pre,
                                                      post_images=post)
                out.append((self._endpoint_target(endpoint.values), body))
        return out

    @staticmethod
    def _endpoint_target(endpoint: Mapping[str, Any]) -> WebhookRegistration:
        """Where and how a webhook service endpoint is called: its URL with the auth applied."""
        url, auth, value = str(endpoint["url"]), endpoint.get("authtype"), str(endpoint.get("authvalue") or "")
        if auth == AUTH_HTTP_HEADER:
            return WebhookRegistration(url, dict(parse_settings(value)), None)
        if auth == AUTH_WEBHOOK_KEY:
            return WebhookRegistration(_with_query(url, [("code", value)]), {}, None)
        if auth == AUTH_HTTP_QUERY_STRING:
            return WebhookRegistration(_with_query(url, parse_settings(value)), {}, None)
        return WebhookRegistration(url, {}, None)

    async def _deliver(self, client: httpx.AsyncClient, reg: WebhookRegistration, event: _Event,
                       body: bytes) -> None:
        headers = {
            "Content-Type": "application/json",
            "x-ms-dynamics-organization": self._org_host(),
            "x-ms-dynamics-entity-name": self.schema[event.entity_set].logical_name,
            "x-ms-dynamics-request-name": event.message,
            "x-ms-correlation-request-id": event.correlation_id,
            **reg.headers,
        }
        status: int | None = None
        error = ""
        for attempt in (1, 2):
            try:
                resp = await client.post(reg.url, content=body, headers=headers)
                status = resp.status_code
                error = "" if resp.is_success else resp.text[:500]
            except httpx.HTTPError as exc:
                status, error = None, f"{type(exc).__name__}: {exc}"
                break
            # The real service retries once, and only on 502/503/504.
            if status in (502, 503, 504) and attempt == 1:
                continue
            break
        if status is not None and 200 <= status < 300:
            self.webhooks_delivered += 1
        else:
            self.webhook_failures.append(WebhookFailure(
                reg.url, event.message, self.schema[event.entity_set].logical_name, event.key, status, error))

    def _org_host(self) -> str:
        return urlsplit(self.org_url).netloc if self.org_url else "syncline-sim.crm.dynamics.com"

    def _remote_execution_context(self, event: _Event, *, step_id: str | None = None, mode: int = 1,
                                  pre_images: list[tuple[str, dict[str, Any]]] | None = None,
                                  post_images: list[tuple[str, dict[str, Any]]] | None = None) -> bytes:
        """Serialise an event as Microsoft.Xrm.Sdk.RemoteExecutionContext JSON (DataContract style, `\\/`).

        Without `step_id` (the `register_webhook` helper) the images are the full row before/after under
        PreImage/PostImage; a registered step passes its own images (alias, filtered attributes).
        """
        schema = self.schema[event.entity_set]
        target: dict[str, Any]
        if event.message == "Delete":
            target = {"__type": f"EntityReference:{XRM_CONTRACTS}", "Id": event.key, "KeyAttributes": [],
                      "LogicalName": schema.logical_name, "Name": None, "RowVersion": None}
        else:
            target = {"__type": f"Entity:{XRM_CONTRACTS}",
                      **self._entity_contract(schema, event.key, event.target, event.lookup_types)}

        def image(name: str, values: dict[str, Any] | None) -> list[dict[str, Any]]:
            if values is None:
                return []
            return [{"key": name, "value": self._entity_contract(schema, event.key, values, event.lookup_types)}]

        def images(given: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
            return [{"key": alias, "value": self._entity_contract(schema, event.key, values, event.lookup_types)}
                    for alias, values in given]

        ms = int(event.at.timestamp() * 1000)
        context = {
            "BusinessUnitId": BUSINESS_UNIT_ID,
            "CorrelationId": event.correlation_id,
            "Depth": 1,
            "InitiatingUserId": event.user_id,
            "InputParameters": [{"key": "Target", "value": target}],
            "IsExecutingOffline": False,
            "IsInTransaction": False,
            "IsOfflinePlayback": False,
            "IsolationMode": 1,
            "MessageName": event.message,
            "Mode": mode,
            "OperationCreatedOn": f"/Date({ms})/",
            "OperationId": str(uuid.uuid4()),
            "OrganizationId": ORGANIZATION_ID,
            "OrganizationName": self._org_host().split(".")[0],
            "OutputParameters": ([{"key": "id", "value": event.key}] if event.message == "Create" else []),
            "OwningExtension": {"Id": step_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"step:{schema.logical_name}")),
                                "KeyAttributes": [], "LogicalName": "sdkmessageprocessingstep", "Name": None,
                                "RowVersion": None},
            "ParentContext": None,
            "PostEntityImages": images(post_images) if post_images is not None else image("PostImage", event.post),
            "PreEntityImages": images(pre_images) if pre_images is not None else image("PreImage", event.pre),
            "PrimaryEntityId": event.key,
            "PrimaryEntityName": schema.logical_name,
            "RequestId": None,
            "SecondaryEntityName": "none",
            "SharedVariables": [],
            "Stage": 40,
            "UserId": event.user_id,
        }
        # DataContractJsonSerializer escapes every '/' as '\/' ("\/Date(...)\/", "http:\/\/...").
        return json.dumps(context).replace("/", "\\/").encode()

    def _entity_contract(self, schema: TableSchema, key: str, values: Mapping[str, Any],
                         lookup_types: Mapping[str, str]) -> dict[str, Any]:
        attrs: list[dict[str, Any]] = []
        formatted: list[dict[str, Any]] = []
        version = values.get("versionnumber")
        for col, v in values.items():
            typ = schema.columns.get(col)
            if typ is None or col == "versionnumber":
                continue
            out: Any = v
            if v is not None:
                if typ == "lookup":
                    target = lookup_types.get(col) or self._target_logical(schema, col, values)
                    out = {"__type": f"EntityReference:{XRM_CONTRACTS}", "Id": v, "KeyAttributes": [],
                           "LogicalName": target, "Name": None, "RowVersion": None}
                elif typ == "choice":
                    out = {"__type": f"OptionSetValue:{XRM_CONTRACTS}", "Value": v}
                    formatted.append({"key": col, "value": schema.choices[col].options.get(v, str(v))})
                elif typ == "money":
                    out = {"__type": f"Money:{XRM_CONTRACTS}", "Value": v}
                elif typ == "datetime":
                    out = f"/Date({int(_parse_datetime(v).timestamp() * 1000)})/"
                elif typ == "date":
                    midnight = datetime.fromisoformat(v).replace(tzinfo=UTC)
                    out = f"/Date({int(midnight.timestamp() * 1000)})/"
            attrs.append({"key": col, "value": out})
        return {"Attributes": attrs, "EntityState": None, "FormattedValues": formatted, "Id": key,
                "KeyAttributes": [], "LogicalName": schema.logical_name, "RelatedEntities": [],
                "RowVersion": str(version) if version is not None else None}
