"""Idempotent webhook registration: Dataverse service endpoint, steps and images; ArcGIS feature-service webhooks."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import quoteattr

from shared.core.errors import RejectedError
from shared.core.ports import Bind, SourceRecord, WriteOp
from shared.mapping.spec import FlowSet

if TYPE_CHECKING:
    from shared.bootstrap import Services
    from shared.connectors.arcgis import ArcGISFeatureServiceClient
    from shared.connectors.dataverse import DataverseClient

log = logging.getLogger(__name__)

Action = Literal["created", "updated", "unchanged"]
DataverseAuth = Literal["header", "webhookkey", "querystring"]

AUTH_TYPES: dict[str, int] = {"webhookkey": 4, "header": 5, "querystring": 6}
"""serviceendpoint.authtype per auth option: WebhookKey 4, HttpHeader 5, HttpQueryString 6."""
HEADER_NAME = "x-syncline-key"
"""The header `shared.ops.intake.check_shared_secret` reads (HttpHeader auth)."""
QUERY_NAME = "code"
"""The Functions host's function-key parameter (HttpQueryString auth; WebhookKey always uses `code`)."""
CONTRACT_WEBHOOK = 8
MODE_ASYNC, STAGE_POST_OPERATION = 1, 40
IMAGE_PRE, IMAGE_POST = 0, 1
MESSAGES = ("Create", "Update", "Delete")
IMAGE_FOR_MESSAGE: dict[str, tuple[int, str, str]] = {
    # (imagetype, entityalias, messagepropertyname): Create has only a post-image (taken from the new "Id"),
    # Delete only a pre-image (the record is gone afterwards); Update gets the full state after the change.
    "Create": (IMAGE_POST, "PostImage", "Id"),
    "Update": (IMAGE_POST, "PostImage", "Target"),
    "Delete": (IMAGE_PRE, "PreImage", "Target"),
}
DEFAULT_CHANGE_TYPES = ("FeaturesCreated", "FeaturesUpdated", "FeaturesDeleted", "AttachmentsCreated")
MAX_ARCGIS_WEBHOOKS = 5
"""ArcGIS Online allows at most 5 webhooks per feature service."""

_FINGERPRINT_RE = re.compile(r"auth-fingerprint: (scrypt\$[0-9a-f]{16}\$[0-9a-f]{32})")


# ============================================================================================ report


@dataclass(frozen=True)
class RegistrationItem:
    """One registration object and what this run did to it (never carries a secret)."""

    system: str
    kind: str
    """"service endpoint", "step", "image" (Dataverse) or "webhook" (ArcGIS)."""
    name: str
    action: Action
    detail: str = ""


@dataclass
class RegistrationReport:
    """Everything a registration run looked at, in order: created, updated or unchanged."""

    system: str
    items: list[RegistrationItem] = field(default_factory=list)

    def add(self, kind: str, name: str, action: Action, detail: str = "") -> None:
        self.items.append(RegistrationItem(self.system, kind, name, action, detail))
        log.info("%s %s %r: %s%s", self.system, kind, name, action, f" ({detail})" if detail else "")

    @property
    def changed(self) -> bool:
        """Whether the run created or updated anything."""
        return any(item.action != "unchanged" for item in self.items)

    def counts(self) -> dict[str, int]:
        """Items per action."""
        out = {"created": 0, "updated": 0, "unchanged": 0}
        for item in self.items:
            out[item.action] += 1
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"system": self.system, "counts": self.counts(),
                "items": [{"kind": i.kind, "name": i.name, "action": i.action, "detail": i.detail}
                          for i in self.items]}


def redact_url(url: str) -> str:
    """The URL with every query value masked: a function key in `?code=` must not reach a report or a log."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = "&".join(f"{k}=***" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return parts._replace(query=query).geturl()


# ============================================================================================ Dataverse


def mapped_columns(flowset: FlowSet, table: str) -> list[str]:
    """The Dataverse columns Syncline reads from a table: what its webhook images must carry.

    Every source field of the flows reading the table, their lookups, geometry latitude/longitude, key and
    modified fields, the link's write-back and origin columns (the engine recovers a lost cross-reference from
    them) and match column, the scope (`when`) columns, the lines' roll-up column and the fields cascades test
    on this side.
    """
    flows = flowset.flows_from("dataverse", table)
    cols: set[str] = set()
    for flow in flows:
        cols |= {fm.source for fm in flow.fields}
        cols |= {lk.source for lk in flow.lookups}
        if flow.geometry is not None:
            cols |= {flow.geometry.latitude, flow.geometry.longitude}
        cols.add(flow.source.key_field)
        if flow.source.modified_field:
            cols.add(flow.source.modified_field)
        cols |= {c for c in (flow.link.write_back, flow.link.origin_field) if c}
        if flow.link.match_source:
            cols.add(flow.link.match_source)  # the value that finds the record in the target
        cols |= {c.field for c in flow.when}  # a record entering the flow's scope is a change to deliver
        if flow.lines is not None and flow.lines.rollup_field:
            cols.add(flow.lines.rollup_field)  # a line change shows on the header through its roll-up
    entities = {flow.entity for flow in flows}
    for cascade in flowset.cascades:
        if cascade.parent_entity in entities:
            cols |= set(cascade.when.get("dataverse", {}))
        if cascade.child_entity in entities:
            cols |= set(cascade.unless.get("dataverse", {}))
            parent_field = cascade.child_parent_field.get("dataverse")
            if parent_field:
                m = re.fullmatch(r"_(.+)_value", parent_field)  # Web API name of a lookup -> its column
                cols.add(m.group(1) if m else parent_field)
    return sorted(cols)


def _filtering_attributes(flowset: FlowSet, table: str) -> list[str]:
    """Columns whose change makes an Update worth a webhook: mapped ones, except the ones every write touches
    (key, modified) and the write-back column only Syncline itself sets."""
    skip: set[str] = set()
    for flow in flowset.flows_from("dataverse", table):
        skip.add(flow.source.key_field)
        skip |= {c for c in (flow.source.modified_field, flow.link.write_back, flow.link.origin_field) if c}
    return [c for c in mapped_columns(flowset, table) if c not in skip]


def dataverse_tables(flowset: FlowSet) -> list[str]:
    """Entity sets that are the source of a flow, in spec order."""
    out: list[str] = []
    for flow in flowset.flows:
        if flow.source.system == "dataverse" and flow.source.table not in out:
            out.append(flow.source.table)
    return out


def _auth_value(auth: str, secret: str, header_name: str, query_name: str) -> str:
    if auth == "webhookkey":
        return secret
    setting_name = header_name if auth == "header" else query_name
    return f"<settings><setting name={quoteattr(setting_name)} value={quoteattr(secret)} /></settings>"


def _fingerprint(auth_value: str, salt: str | None = None) -> str:
    """A salted scrypt digest of the auth value: Dataverse never returns authvalue, so this is how a re-run
    tells "same secret" from "rotated" without keeping the secret anywhere readable."""
    salt = salt or secrets.token_hex(8)
    digest = hashlib.scrypt(auth_value.encode(), salt=bytes.fromhex(salt), n=2**14, r=8, p=1, dklen=16)
    return f"scrypt${salt}${digest.hex()}"


def _fingerprint_matches(description: Any, auth_value: str) -> bool:
    m = _FINGERPRINT_RE.search(str(description or ""))
    if m is None:
        return False
    salt = m.group(1).split("$")[1]
    return hmac.compare_digest(m.group(1), _fingerprint(auth_value, salt))


def _csv_set(value: Any) -> set[str]:
    return {n.strip() for n in str(value or "").split(",") if n.strip()}


def _dataverse_client(services_or_client: Services | DataverseClient) -> DataverseClient:
    from shared.connectors.dataverse import DataverseClient

    if isinstance(services_or_client, DataverseClient):
        return services_or_client
    client = services_or_client.sinks.get("dataverse")
    if not isinstance(client, DataverseClient):
        raise ValueError("Dataverse is not configured (DATAVERSE__URL is empty)")
    return client


async def _write(client: DataverseClient, op: WriteOp) -> str:
    """One write through the connector's $batch machinery; a failure raises its (secret-free) error."""
    [result] = await client.write([op])
    if not result.ok:
        raise result.error or RejectedError(f"dataverse {op.action} {op.table}: failed without detail")
    return str(result.key or op.key)


async def _only(client: DataverseClient, table: str, equals: Mapping[str, Any], what: str) -> SourceRecord:
    rows = await client.select(table, equals=equals)
    if len(rows) != 1:
        raise RejectedError(f"dataverse: expected exactly one {what}, found {len(rows)}")
    return rows[0]


class _DataverseRegistrar:
    """One registration run: the endpoint, then steps and images per table and message."""

    def __init__(self, client: DataverseClient, flowset: FlowSet, *, endpoint_url: str, auth: str, secret: str,
                 name: str, header_name: str, query_name: str) -> None:
        self.client = client
        self.flowset = flowset
        self.endpoint_url = endpoint_url
        self.auth = auth
        self.auth_value = _auth_value(auth, secret, header_name, query_name)
        self.name = name
        self.report = RegistrationReport("dataverse")

    async def run(self) -> RegistrationReport:
        endpoint_id = await self.endpoint()
        messages = {m: (await _only(self.client, "sdkmessages", {"name": m}, f"SDK message {m!r}")).key
                    for m in MESSAGES}
        for table in dataverse_tables(self.flowset):
            logical = await self.client.logical_name_for(table)
            for message in MESSAGES:
                step_id = await self.step(table, logical, message, messages[message], endpoint_id)
                await self.image(table, logical, message, step_id)
        return self.report

    async def endpoint(self) -> str:
        rows = await self.client.select("serviceendpoints", equals={"name": self.name})
        if len(rows) > 1:
            raise RejectedError(f"dataverse: {len(rows)} service endpoints are named {self.name!r}; delete the "
                                "duplicates (Plug-in Registration tool) and run again")
        desired = {"name": self.name, "contract": CONTRACT_WEBHOOK, "url": self.endpoint_url,
                   "authtype": AUTH_TYPES[self.auth], "messageformat": 2}
        shown = f"{redact_url(self.endpoint_url)}, auth {self.auth}"
        if not rows:
            key = await _write(self.client, WriteOp(
                "register:serviceendpoint", "upsert", "serviceendpoints", key=str(uuid.uuid4()),
                values={**desired, "authvalue": self.auth_value, "description": self._description()}))
            self.report.add("service endpoint", self.name, "created", shown)
            return key
        row = rows[0]
        changes = [label for label, col in (("url", "url"), ("contract", "contract"), ("auth type", "authtype"))
                   if row.values.get(col) != desired[col]]
        if not _fingerprint_matches(row.values.get("description"), self.auth_value):
            changes.append("auth value")
        if not changes:
            self.report.add("service endpoint", self.name, "unchanged", shown)
            return row.key
        await _write(self.client, WriteOp(
            "register:serviceendpoint", "update", "serviceendpoints", key=row.key,
            values={**desired, "authvalue": self.auth_value, "description": self._description()}))
        self.report.add("service endpoint", self.name, "updated", f"{', '.join(changes)} changed; {shown}")
        return row.key

    def _description(self) -> str:
        return (f"Syncline webhook endpoint, managed by `syncline dataverse register-webhook`. "
                f"auth-fingerprint: {_fingerprint(self.auth_value)}")

    async def step(self, table: str, logical: str, message: str, message_id: str, endpoint_id: str) -> str:
        filters = await self.client.select("sdkmessagefilters", equals={
            "primaryobjecttypecode": logical, "_sdkmessageid_value": message_id})
        # Several filters can exist per message and table (secondary entities); the plain one names "none".
        filters.sort(key=lambda r: str(r.values.get("secondaryobjecttypecode") or "none") != "none")
        if not filters:
            raise RejectedError(f"dataverse: table {logical!r} ({table}) has no {message} message filter; "
                                "steps cannot be registered for it")
        filter_id = filters[0].key
        step_name = f"{self.name}: {message} of {logical}"
        filtering = ",".join(_filtering_attributes(self.flowset, table)) if message == "Update" else None
        desired: dict[str, Any] = {
            "name": step_name, "mode": MODE_ASYNC, "stage": STAGE_POST_OPERATION, "rank": 1,
            "asyncautodelete": True, "supporteddeployment": 0, "filteringattributes": filtering or None,
            "description": f"{message} of {logical} to the {self.name} webhook (managed by Syncline)",
        }
        existing = await self.client.select("sdkmessageprocessingsteps", equals={
            "_eventhandler_value": endpoint_id, "_sdkmessagefilterid_value": filter_id})
        existing.sort(key=lambda r: r.values.get("name") != step_name)
        if not existing:
            key = await _write(self.client, WriteOp(
                f"register:step:{logical}:{message}", "upsert", "sdkmessageprocessingsteps", key=str(uuid.uuid4()),
                values=desired, binds={
                    "sdkmessageid": Bind("sdkmessages", message_id),
                    "sdkmessagefilterid": Bind("sdkmessagefilters", filter_id),
                    "eventhandler_serviceendpoint": Bind("serviceendpoints", endpoint_id)}))
            self.report.add("step", step_name, "created", "asynchronous, post-operation")
            return key
        row = existing[0]
        changes = [col for col, want in desired.items() if col not in ("filteringattributes", "description")
                   and row.values.get(col) != want]
        if _csv_set(row.values.get("filteringattributes")) != _csv_set(filtering):
            changes.append("filteringattributes")
        values = dict(desired)
        if row.values.get("statecode") not in (0, None):
            changes.append("enabled")
            values.update(statecode=0, statuscode=1)  # someone disabled it: deliveries would silently stop
        if not changes:
            self.report.add("step", step_name, "unchanged")
            return row.key
        await _write(self.client, WriteOp(
            f"register:step:{logical}:{message}", "update", "sdkmessageprocessingsteps", key=row.key,
            values=values))
        self.report.add("step", step_name, "updated", f"{', '.join(changes)} changed")
        return row.key

    async def image(self, table: str, logical: str, message: str, step_id: str) -> None:
        image_type, alias, prop = IMAGE_FOR_MESSAGE[message]
        columns = mapped_columns(self.flowset, table)
        desired: dict[str, Any] = {"name": alias, "entityalias": alias, "imagetype": image_type,
                                   "messagepropertyname": prop, "attributes": ",".join(columns)}
        label = f"{self.name}: {message} of {logical} / {alias}"
        images = await self.client.select("sdkmessageprocessingstepimages",
                                          equals={"_sdkmessageprocessingstepid_value": step_id})
        row = next((r for r in images if str(r.values.get("entityalias") or "").lower() == alias.lower()), None)
        if row is None:
            await _write(self.client, WriteOp(
                f"register:image:{logical}:{message}", "upsert", "sdkmessageprocessingstepimages",
                key=str(uuid.uuid4()), values=desired,
                binds={"sdkmessageprocessingstepid": Bind("sdkmessageprocessingsteps", step_id)}))
            self.report.add("image", label, "created", f"{len(columns)} columns")
            return
        changes = [col for col in ("name", "imagetype") if row.values.get(col) != desired[col]]
        if str(row.values.get("messagepropertyname") or "").lower() != prop.lower():
            changes.append("messagepropertyname")
        have = _csv_set(row.values.get("attributes"))
        if have != set(columns):
            added, removed = sorted(set(columns) - have), sorted(have - set(columns))
            changes.append("attributes" + "".join(f" +{c}" for c in added) + "".join(f" -{c}" for c in removed))
        if not changes:
            self.report.add("image", label, "unchanged", f"{len(columns)} columns")
            return
        await _write(self.client, WriteOp(
            f"register:image:{logical}:{message}", "update", "sdkmessageprocessingstepimages", key=row.key,
            values=desired))
        self.report.add("image", label, "updated", "; ".join(changes))


async def register_dataverse_webhook(
    services_or_client: Services | DataverseClient,
    flowset: FlowSet | None = None,
    *,
    endpoint_url: str,
    auth: DataverseAuth,
    secret: str,
    name: str = "Syncline",
    header_name: str = HEADER_NAME,
    query_name: str = QUERY_NAME,
) -> RegistrationReport:
    """Find or create the webhook service endpoint and, per source table, its Create/Update/Delete steps and images.

    Everything goes through the Dataverse Web API (the connector): `serviceendpoints` (contract 8), one
    asynchronous post-operation `sdkmessageprocessingsteps` row per message and table (Update filtered on
    the mapped columns), and a PostImage (Create, Update) or PreImage (Delete) carrying the mapped columns.
    Idempotent: a second run reports every item unchanged. Dataverse never returns `authvalue`, so the
    endpoint's description keeps a salted scrypt fingerprint of it to notice a rotated secret.

    Args:
        services_or_client: `Services` (its Dataverse connector and flow set) or a `DataverseClient`.
        flowset: The flows (default: the services' flow set).
        endpoint_url: The function URL including the route (a `?code=` function key is never reported).
        auth: "header" (HttpHeader `x-syncline-key: <secret>`, the SYNCLINE_WEBHOOK_SECRET check),
            "webhookkey" (WebhookKey: `?code=<secret>`) or "querystring" (HttpQueryString `?code=<secret>`).
        secret: The header value or key; never logged nor reported.
        name: Service endpoint name and step name prefix ("Syncline: Update of dot_signasset").
    """
    from shared.connectors.dataverse import DataverseClient

    client = _dataverse_client(services_or_client)
    if flowset is None:
        if isinstance(services_or_client, DataverseClient):
            raise ValueError("register_dataverse_webhook needs a flow set when given a DataverseClient")
        flowset = services_or_client.flowset
    if auth not in AUTH_TYPES:
        raise ValueError(f"auth must be one of {', '.join(AUTH_TYPES)}, not {auth!r}")
    parts = urlsplit(endpoint_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the endpoint URL must be an absolute http(s) URL, got {redact_url(endpoint_url)!r}")
    if auth != "header" and any(k == QUERY_NAME for k, _ in parse_qsl(parts.query)):
        raise ValueError(f"with --auth {auth} Dataverse appends ?code=<secret> itself; remove code= from the URL")
    if not secret:
        raise ValueError("the webhook secret is empty")
    if not name.strip():
        raise ValueError("the registration name is empty")
    if not dataverse_tables(flowset):
        raise ValueError(f"no flow of {flowset.name!r} reads from Dataverse; nothing to register")
    registrar = _DataverseRegistrar(client, flowset, endpoint_url=endpoint_url, auth=auth, secret=secret,
                                    name=name.strip(), header_name=header_name, query_name=query_name)
    return await registrar.run()


# ============================================================================================ ArcGIS


def _types(value: Any) -> set[str]:
    """Change types as a set; "All" (how ArcGIS Online lists the wildcard) is "*"."""
    items: Iterable[Any] = value if isinstance(value, list | tuple | set) else str(value or "").split(",")
    return {"*" if str(t).strip() == "All" else str(t).strip() for t in items if str(t).strip()}


async def register_arcgis_webhook(
    arcgis_client: ArcGISFeatureServiceClient,
    *,
    hook_url: str,
    signature_key: str,
    name: str = "Syncline",
    change_types: Sequence[str] = DEFAULT_CHANGE_TYPES,
) -> RegistrationReport:
    """Find, create or edit the feature service's webhook called `name` through the admin API.

    Lists `{admin}/WebHooks`; creates one (`WebHooks/create`) when none has the name, edits it
    (`WebHooks/<id>/edit`) when its URL, change types, signature key or active flag differ, and leaves it
    alone when equal. Refuses (RejectedError) a service without Editing + ChangeTracking, or one that
    already has the maximum of 5 webhooks.
    """
    parts = urlsplit(hook_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the hook URL must be an absolute http(s) URL, got {redact_url(hook_url)!r}")
    if not signature_key:
        raise ValueError("the webhook signature key is empty (Syncline verifies x-esriHook-Signature)")
    if not change_types:
        raise ValueError("at least one change type is needed")
    name = name.strip()
    if not name:
        raise ValueError("the registration name is empty")
    report = RegistrationReport("arcgis")
    service = await arcgis_client.service_info(fresh=True)
    missing = sorted({"Editing", "ChangeTracking"} - set(service.capabilities))
    if missing:
        raise RejectedError(f"arcgis: {arcgis_client.service_url} lacks the {' and '.join(missing)} "
                            "capabilit" + ("ies" if len(missing) > 1 else "y") + "; feature-service webhooks need "
                            "both (enable 'Keep track of changes' and editing in the layer's settings)")
    hooks = await arcgis_client.list_webhooks()
    params = {"name": name, "hookUrl": hook_url, "changeTypes": ",".join(change_types),
              "signatureKey": signature_key, "active": "true", "contentType": "application/json",
              "payloadFormat": "json"}
    shown = f"{redact_url(hook_url)}, {', '.join(change_types)}"
    mine = [h for h in hooks if h.get("name") == name]
    if not mine:
        if len(hooks) >= MAX_ARCGIS_WEBHOOKS:
            names = ", ".join(repr(str(h.get("name"))) for h in hooks)
            raise RejectedError(f"arcgis: the feature service already has {len(hooks)} webhooks ({names}), the "
                                f"maximum of {MAX_ARCGIS_WEBHOOKS}; delete one or register under one of these names")
        await arcgis_client.create_webhook(params)
        report.add("webhook", name, "created", shown)
        return report
    hook = mine[0]
    changes = []
    if hook.get("hookUrl") != hook_url:
        changes.append("hook URL")
    if _types(hook.get("changeTypes")) != _types(list(change_types)):
        changes.append("change types")
    listed_key = hook.get("signatureKey")
    # A service that does not echo the key back (empty) cannot prove it is current: set it again.
    if not isinstance(listed_key, str) or not hmac.compare_digest(listed_key.encode(), signature_key.encode()):
        changes.append("signature key")
    if hook.get("active") is not True:
        changes.append("active")
    if str(hook.get("contentType") or "application/json") != "application/json":
        changes.append("content type")
    if not changes:
        report.add("webhook", name, "unchanged", shown)
        return report
    await arcgis_client.edit_webhook(str(hook.get("id")), params)
    report.add("webhook", name, "updated", f"{', '.join(changes)} changed; {shown}")
    return report


__all__ = [
    "AUTH_TYPES", "DEFAULT_CHANGE_TYPES", "HEADER_NAME", "MAX_ARCGIS_WEBHOOKS", "QUERY_NAME", "RegistrationItem",
    "RegistrationReport", "dataverse_tables", "mapped_columns", "redact_url", "register_arcgis_webhook",
    "register_dataverse_webhook",
]
