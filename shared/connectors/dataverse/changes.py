"""Dataverse changes: change-tracking polls and full scans, webhook bodies (RemoteExecutionContext) -> changes."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

from shared.connectors.dataverse.client import DataverseHttp
from shared.connectors.dataverse.codecs import SYSTEM, check_guid, is_guid, parse_datetime, utc_text
from shared.core.dates import is_wcf_date, parse_wcf_date
from shared.core.errors import EnvelopeError, RejectedError, TransientError
from shared.core.ports import SourceRecord
from shared.payloads import DataverseContext, DataverseEntity, bad_values, validate

log = logging.getLogger("shared.connectors.dataverse")


class DataverseChanges(DataverseHttp):
    """The `ChangeSource` reads: scans, change-tracking pages and note attachments."""

    async def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        """Every record of a table, page by page (`Prefer: odata.maxpagesize`, nextLink followed verbatim)."""
        info = await self._table(table)
        url: str | None = self.api_root + info.entity_set
        while url is not None:
            data = await self._get_json(url, what=f"scan of {table}", prefer=f"odata.maxpagesize={self._page_size}")
            yield [self._record(info, row) for row in data.get("value") or []]
            link = data.get("@odata.nextLink")
            url = self._follow(link) if link else None

    async def changes_since(self, table: str, checkpoint: str | None) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """Change tracking: pages of changed records (deletes flagged), each with the checkpoint valid after it.

        `checkpoint=None` starts a full tracked read. The checkpoint is the URL to read next: a nextLink while
        a read is in progress, then the @odata.deltaLink (opaque; store it as-is).
        """
        info = await self._table(table)
        url = self._follow(checkpoint) if checkpoint else self.api_root + info.entity_set
        prefer = f"odata.track-changes,odata.maxpagesize={self._page_size}"
        while True:
            data = await self._get_json(url, what=f"changes of {table}", prefer=prefer)
            records: list[SourceRecord] = []
            for row in data.get("value") or []:
                context = str(row.get("@odata.context") or "")
                if context.endswith("/$deletedEntity") or ("id" in row and row.get("reason") == "deleted"):
                    records.append(SourceRecord(key=str(row["id"]).lower(), values={}, deleted=True))
                else:
                    records.append(self._record(info, row))
            next_link, delta_link = data.get("@odata.nextLink"), data.get("@odata.deltaLink")
            if next_link:
                yield records, str(next_link)
                url = self._follow(next_link)
                continue
            if not delta_link:
                raise TransientError(f"{SYSTEM} changes of {table}: response has neither @odata.nextLink nor "
                                     "@odata.deltaLink (is change tracking enabled on the table?)")
            yield records, str(delta_link)
            return

    async def fetch_attachment(self, table: str, key: str, attachment_id: str) -> bytes:
        """Download a note's (annotation's) document body; it must belong to record `key`."""
        record_key = check_guid(key, f"{table} key")
        note_id = check_guid(attachment_id, "attachment id")
        what = f"attachment {note_id} of {table}({record_key})"
        response = await self._send("GET", f"{self.api_root}annotations({note_id})", what=what,
                                    params={"$select": "documentbody,filename,_objectid_value"})
        if response.status_code == 404:
            raise RejectedError(f"{SYSTEM}: {what} does not exist")
        self._raise_for(response, what)
        data = response.json()
        owner = str(data.get("_objectid_value") or "").lower()
        if owner != record_key:
            raise RejectedError(f"{SYSTEM}: note {note_id} belongs to record {owner or 'none'}, not {record_key}")
        try:
            return base64.b64decode(data.get("documentbody") or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RejectedError(f"{SYSTEM}: {what} has an invalid base64 documentbody") from exc


@dataclass(frozen=True)
class DataverseWebhookChange:
    """One change delivered by a Dataverse webhook (a RemoteExecutionContext), in canonical form."""

    message_name: Literal["Create", "Update", "Delete"]
    entity: str
    """Logical name of the table (PrimaryEntityName)."""
    key: str
    record: SourceRecord
    """Canonical values: Target merged with the post-image (full state); for Delete the pre-image."""
    correlation_id: str
    operation_created_on: datetime
    depth: int
    initiating_user_id: str
    """The user who started the operation: Syncline's application user for its own writes (echo check)."""
    user_id: str | None = None
    shared_variables: dict[str, Any] = field(default_factory=dict)


def _kv(value: Any, where: str) -> dict[str, Any]:
    """DataContract `[{key, value}]` list -> dict."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, list):
        raise EnvelopeError(f"webhook body: {where} must be a list of {{key, value}} pairs, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for item in value:
        if not isinstance(item, Mapping) or "key" not in item:
            raise EnvelopeError(f"webhook body: {where} has an entry without a 'key': {item!r}"[:300])
        out[str(item["key"])] = item.get("value")
    return out


def _wcf_date(value: Any, where: str) -> datetime:
    moment = parse_wcf_date(value)
    if moment is None:
        raise EnvelopeError(f"webhook body: {where} is not a /Date(ms)/ value in range (years 1-9999): "
                            f"{value!r}"[:300])
    return moment


def _canonical(name: str, value: Any, where: str, date_only: Collection[str]) -> tuple[bool, Any]:
    """(keep, canonical value) for one DataContract attribute value."""
    if value is None:
        return True, None
    if isinstance(value, str):
        if value.startswith(("/Date(", "\\/Date(")):
            if not is_wcf_date(value):
                raise EnvelopeError(f"webhook body: {where} attribute {name!r} is not a /Date(ms)/ value: "
                                    f"{value!r}"[:300])
            moment = parse_wcf_date(value)
            if moment is None:
                # A well-formed date out of range (year 0, 99999) is this record's problem, not the body's: it
                # is kept raw, and a flow that maps the column dead-letters the record with the column named.
                return True, value
            return True, moment.date().isoformat() if name in date_only else utc_text(moment)
        return True, value
    if isinstance(value, bool | int | float):
        return True, value
    if isinstance(value, Mapping):
        type_name = str(value.get("__type") or "").split(":", 1)[0]
        if type_name == "EntityReference" or (not type_name and "LogicalName" in value and "Id" in value):
            ref = value.get("Id")
            if not is_guid(ref):
                raise EnvelopeError(f"webhook body: {where} attribute {name!r} has an EntityReference without a "
                                    f"GUID Id: {ref!r}")
            return True, str(ref).lower()
        if type_name in ("OptionSetValue", "Money", "BooleanManagedProperty") or (not type_name and "Value" in value):
            raw = value.get("Value")
            if type_name == "OptionSetValue":
                if isinstance(raw, bool) or not isinstance(raw, int):
                    raise EnvelopeError(f"webhook body: {where} attribute {name!r} OptionSetValue has no integer Value")
                return True, raw
            if type_name == "Money":
                if isinstance(raw, bool) or not isinstance(raw, int | float):
                    raise EnvelopeError(f"webhook body: {where} attribute {name!r} Money has no numeric Value")
                return True, float(raw)
            return True, raw
        if type_name == "OptionSetValueCollection":
            items = value.get("Values") or []
            codes = [v.get("Value") for v in items if isinstance(v, Mapping)] if isinstance(items, list) else None
            if codes is None or any(isinstance(c, bool) or not isinstance(c, int) for c in codes):
                raise EnvelopeError(f"webhook body: {where} attribute {name!r} OptionSetValueCollection must hold "
                                    "integer Values")
            return True, codes
        log.debug("webhook: skipping %s attribute %r of unsupported type %r", where, name, type_name)
        return False, None
    if isinstance(value, list):
        return True, value
    return False, None


def _entity_values(entity: Any, where: str, date_only: Collection[str], primary_id: str) -> dict[str, Any]:
    if not isinstance(entity, Mapping) or "Attributes" not in entity:
        raise EnvelopeError(f"webhook body: {where} is not an Entity (no Attributes)")
    validate(DataverseEntity, entity, f"webhook body: {where}")
    values: dict[str, Any] = {}
    for name, raw in _kv(entity.get("Attributes"), f"{where}.Attributes").items():
        keep, value = _canonical(name, raw, where, date_only)
        if keep:
            values[name] = value.lower() if name == primary_id and isinstance(value, str) else value
    return values


def _first_image(images: Any, where: str) -> Mapping[str, Any] | None:
    found = _kv(images, where)
    for image in found.values():
        if isinstance(image, Mapping):
            return image
    return None


def parse_remote_execution_context(
    body: Mapping[str, Any], *, date_only: Collection[str] = ()
) -> DataverseWebhookChange:
    """Parse a Dataverse webhook body (serialized RemoteExecutionContext) into a canonical change.

    Args:
        body: The decoded JSON body.
        date_only: Date-only columns; the wire carries them as midnight `/Date(ms)/` values like datetimes,
            so name them to get "YYYY-MM-DD" (as reads through the Web API give).

    Raises:
        EnvelopeError: naming what is wrong (missing MessageName, unknown message, no Target, bad date...).
    """
    if not isinstance(body, Mapping):
        raise EnvelopeError("webhook body is not a JSON object (expected a RemoteExecutionContext)")
    validate(DataverseContext, body, "webhook body")
    with bad_values("webhook body"):
        return _parse_context(body, date_only)


def _parse_context(body: Mapping[str, Any], date_only: Collection[str]) -> DataverseWebhookChange:
    message = body.get("MessageName")
    if not message:
        raise EnvelopeError("webhook body has no MessageName (is this a Dataverse RemoteExecutionContext?)")
    if message not in ("Create", "Update", "Delete"):
        raise EnvelopeError(f"webhook body has unknown MessageName {message!r}; only Create, Update and Delete are "
                            "synced (check the step registration)")
    entity = body.get("PrimaryEntityName")
    if not isinstance(entity, str) or not entity:
        raise EnvelopeError("webhook body has no PrimaryEntityName")
    primary_id = f"{entity}id"
    inputs = _kv(body.get("InputParameters"), "InputParameters")
    target = inputs.get("Target")
    if not isinstance(target, Mapping):
        raise EnvelopeError(f"webhook body ({message} of {entity}) has no Target in InputParameters")
    key_raw = body.get("PrimaryEntityId") or target.get("Id")
    if not is_guid(key_raw):
        raise EnvelopeError(f"webhook body ({message} of {entity}) has no GUID PrimaryEntityId / Target.Id: "
                            f"{key_raw!r}")
    key = str(key_raw).lower()
    correlation_id = body.get("CorrelationId")
    if not isinstance(correlation_id, str) or not correlation_id:
        raise EnvelopeError(f"webhook body ({message} of {entity}) has no CorrelationId")
    initiating = body.get("InitiatingUserId")
    if not is_guid(initiating):
        raise EnvelopeError(f"webhook body ({message} of {entity}) has no GUID InitiatingUserId: {initiating!r}")
    created_on = _wcf_date(body.get("OperationCreatedOn"), "OperationCreatedOn")
    depth = body.get("Depth", 1)
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise EnvelopeError(f"webhook body ({message} of {entity}): Depth must be an integer, got {depth!r}")

    pre = _first_image(body.get("PreEntityImages"), "PreEntityImages")
    post = _first_image(body.get("PostEntityImages"), "PostEntityImages")
    version: Any = None
    if message == "Delete":
        values = _entity_values(pre, "PreEntityImages", date_only, primary_id) if pre is not None else {}
        version = pre.get("RowVersion") if pre is not None else None
    else:
        values = _entity_values(target, "Target", date_only, primary_id)
        if post is not None:
            values.update(_entity_values(post, "PostEntityImages", date_only, primary_id))
            version = post.get("RowVersion")
        version = version or target.get("RowVersion")
    modified = parse_datetime(values.get("modifiedon"))
    record = SourceRecord(key=key, values=values, modified=modified,
                          version=str(version) if version is not None else None, deleted=message == "Delete")
    user_id = body.get("UserId")
    return DataverseWebhookChange(
        message_name=cast(Literal["Create", "Update", "Delete"], message),
        entity=entity,
        key=key,
        record=record,
        correlation_id=correlation_id,
        operation_created_on=created_on,
        depth=depth,
        initiating_user_id=str(initiating).lower(),
        user_id=str(user_id).lower() if is_guid(user_id) else None,
        shared_variables=_kv(body.get("SharedVariables"), "SharedVariables"),
    )
