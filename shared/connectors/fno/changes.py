"""F&O change detection: business events, modified-time polls and full-scan comparison -> change envelopes."""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared.connectors.fno.client import FinOpsHttp
from shared.connectors.fno.codecs import (
    ENTITY_KEYS,
    MODIFIED_FIELDS,
    SYSTEM,
    _parse_datetime,
    _utc_text_precise,
    format_key,
)
from shared.core.dates import parse_wcf_date
from shared.core.errors import EnvelopeError, RejectedError
from shared.core.ports import SourceRecord
from shared.payloads import FinOpsEvent, bad_values, read_json, validate

STANDARD_EVENT_FIELDS = frozenset({
    "BusinessEventId", "BusinessEventLegalEntity", "ContextRecordSubject", "ControlNumber", "EventId", "EventTime",
    "EventTimeIso8601", "InitiatingUserAADObjectId", "MajorVersion", "MinorVersion", "ParentContextRecordSubjects",
    "LegalEntity",
})
LEGAL_ENTITY = "@legal_entity"
"""Marker in `BUSINESS_EVENTS`: the key field takes the event's legal entity."""

BUSINESS_EVENTS: dict[str, tuple[str, dict[str, str]]] = {
    "FFYCustomerChangedBusinessEvent": ("CustomersV3", {"dataAreaId": LEGAL_ENTITY, "CustomerAccount": "Account"}),
    "CustCustomerChangedBusinessEvent": ("CustomersV3", {"dataAreaId": LEGAL_ENTITY, "CustomerAccount": "Account"}),
    "SalesOrderStatusChangedBusinessEvent": (
        "SalesOrderHeadersV2", {"dataAreaId": LEGAL_ENTITY, "SalesOrderNumber": "SalesOrderNumber"}),
    # Fulfilment documents posted against a sales order: the order header (its status) is what changed.
    "SalesPackingSlipPostedBusinessEvent": (
        "SalesOrderHeadersV2", {"dataAreaId": LEGAL_ENTITY, "SalesOrderNumber": "SalesOrderId"}),
    "SalesInvoicePostedBusinessEvent": (
        "SalesOrderHeadersV2", {"dataAreaId": LEGAL_ENTITY, "SalesOrderNumber": "SalesOrderId"}),
}
"""Known business event ids -> (entity set, {key field: event field}) to fetch the full record."""


@dataclass(frozen=True)
class FinOpsBusinessEvent:
    """One F&O business event and the record it is about."""

    business_event_id: str
    legal_entity: str
    control_number: int
    """Upward-increasing, not sequential: the de-duplication / ordering token."""
    event_id: str
    event_time: datetime
    entity_set: str
    key: dict[str, str]
    record_key: str
    """Canonical key of the record (`usmf|US-001`)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """The event contract's own fields (everything but the standard envelope fields)."""


def _wcf_date(value: Any) -> datetime | None:
    return parse_wcf_date(value)  # None also for `/Date(99999999999999999)/`: out of any datetime's range


def _one_event(obj: Any, where: str) -> FinOpsBusinessEvent:
    if not isinstance(obj, dict):
        raise EnvelopeError(f"{SYSTEM} business event{where}: expected a JSON object, got {type(obj).__name__}")
    validate(FinOpsEvent, obj, f"{SYSTEM} business event{where}")
    with bad_values(f"{SYSTEM} business event{where}"):
        return _checked_event(obj, where)


def _checked_event(obj: dict[str, Any], where: str) -> FinOpsBusinessEvent:
    event_id_name = obj.get("BusinessEventId")
    if not isinstance(event_id_name, str) or not event_id_name:
        raise EnvelopeError(f"{SYSTEM} business event{where}: BusinessEventId is missing")
    known = BUSINESS_EVENTS.get(event_id_name)
    if known is None:
        raise EnvelopeError(f"{SYSTEM} business event{where}: unknown BusinessEventId {event_id_name!r} (known: "
                            f"{', '.join(sorted(BUSINESS_EVENTS))})")
    control = obj.get("ControlNumber")
    if isinstance(control, bool) or not isinstance(control, int) or control < 0:
        raise EnvelopeError(f"{SYSTEM} business event{where}: ControlNumber must be a non-negative integer, "
                            f"got {control!r}")
    legal = obj.get("LegalEntity") or obj.get("BusinessEventLegalEntity")
    if not isinstance(legal, str) or not legal:
        raise EnvelopeError(f"{SYSTEM} business event{where}: LegalEntity / BusinessEventLegalEntity is missing")
    raw_time = obj.get("EventTime")
    when = _wcf_date(raw_time) if raw_time not in (None, "") else None
    if when is None and raw_time not in (None, ""):
        raise EnvelopeError(f"{SYSTEM} business event{where}: EventTime {str(raw_time)[:40]!r} is not a "
                            "'/Date(ms)/' value in range (years 1-9999)")
    when = when or _parse_datetime(obj.get("EventTimeIso8601"))
    if when is None:
        raise EnvelopeError(f"{SYSTEM} business event{where}: EventTime {obj.get('EventTime')!r} is not "
                            "'/Date(ms)/' and EventTimeIso8601 is not ISO-8601")
    event_guid = obj.get("EventId")
    if not isinstance(event_guid, str) or not event_guid:
        raise EnvelopeError(f"{SYSTEM} business event{where}: EventId is missing")
    entity_set, mapping = known
    key: dict[str, str] = {}
    for key_field, source in mapping.items():
        value = legal if source == LEGAL_ENTITY else obj.get(source)
        if value is None or value == "":
            raise EnvelopeError(f"{SYSTEM} business event{where}: {event_id_name} lacks field {source!r} "
                                f"(needed for {entity_set}.{key_field})")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise EnvelopeError(f"{SYSTEM} business event{where}: {source}: must be text or an integer (it is "
                                f"the key field {entity_set}.{key_field}), got {type(value).__name__}")
        key[key_field] = str(value)
    key = {name: key[name] for name in ENTITY_KEYS[entity_set]}
    fields = {k: v for k, v in obj.items() if k not in STANDARD_EVENT_FIELDS}
    return FinOpsBusinessEvent(event_id_name, legal, control, event_guid, when, entity_set, key,
                               format_key(entity_set, key), fields)


def _load(body: bytes | str | Mapping[str, Any] | Sequence[Any]) -> Any:
    if isinstance(body, bytes | str):
        return read_json(body, f"{SYSTEM} business event: body")
    return body


def parse_business_events(body: bytes | str | Mapping[str, Any] | Sequence[Any]) -> list[FinOpsBusinessEvent]:
    """Parse a business event delivery: a single flat event object or an array of them."""
    data = _load(body)
    if isinstance(data, list):
        if not data:
            raise EnvelopeError(f"{SYSTEM} business event: the array is empty")
        return [_one_event(item, f" [{i}]") for i, item in enumerate(data)]
    return [_one_event(data, "")]


def parse_business_event(body: bytes | str | Mapping[str, Any] | Sequence[Any]) -> FinOpsBusinessEvent:
    """Parse one business event (an object, or an array holding exactly one)."""
    events = parse_business_events(body)
    if len(events) != 1:
        raise EnvelopeError(f"{SYSTEM} business event: expected one event, got {len(events)}")
    return events[0]


def _row_hash(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _encode_scan_checkpoint(hashes: Mapping[str, str]) -> str:
    return "scan:" + base64.urlsafe_b64encode(zlib.compress(json.dumps(hashes, sort_keys=True).encode())).decode()


def _decode_scan_checkpoint(checkpoint: str) -> dict[str, str]:
    try:
        data = json.loads(zlib.decompress(base64.urlsafe_b64decode(checkpoint[len("scan:"):])))
    except (ValueError, zlib.error) as exc:
        raise EnvelopeError(f"{SYSTEM}: scan checkpoint is corrupt ({exc})") from exc
    if not isinstance(data, dict):
        raise EnvelopeError(f"{SYSTEM}: scan checkpoint is corrupt (not a map)")
    return {str(k): str(v) for k, v in data.items()}


class FinOpsChanges(FinOpsHttp):
    """`read_event_record`, `scan` and `changes_since` (ChangeSource)."""

    async def read_event_record(self, event: FinOpsBusinessEvent) -> SourceRecord:
        """The full record a business event is about (RejectedError when it no longer exists)."""
        record = await self.get(event.entity_set, event.key)
        if record is None:
            raise RejectedError(f"{SYSTEM}: {event.entity_set} {event.record_key} of business event "
                                f"{event.business_event_id} (ControlNumber {event.control_number}) no longer exists")
        return record

    async def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        """Every record of every company, page by page (server-driven paging, nextLink followed)."""
        async for page in self._pages(table, None, f"scan of {table}"):
            yield page

    async def changes_since(self, table: str, checkpoint: str | None) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """Modified-time polling for `MODIFIED_FIELDS` entities, full-scan comparison for the others.

        Polling: intermediate pages carry the previous checkpoint (a crash replays, never skips), the last page
        the newest `ModifiedDateTime` seen. Scan comparison: one result with every new/changed row and deleted
        keys flagged, and the new hash-map checkpoint.
        """
        modified_field = MODIFIED_FIELDS.get(table)
        if modified_field is not None:
            since = _parse_datetime(checkpoint) if checkpoint else None
            if checkpoint and since is None:
                raise EnvelopeError(f"{SYSTEM}: checkpoint {checkpoint!r} for {table} is not an ISO timestamp")
            params = {"$orderby": f"{modified_field} asc"}
            if since is not None:
                params["$filter"] = f"{modified_field} gt {_utc_text_precise(since)}"
            newest = since
            pending: list[SourceRecord] | None = None
            async for page in self._pages(table, params, f"changes of {table}"):
                if pending is not None:
                    yield pending, checkpoint or ""
                for record in page:
                    if record.modified is not None and (newest is None or record.modified > newest):
                        newest = record.modified
                pending = page
            yield pending or [], _utc_text_precise(newest) if newest is not None else ""
            return
        previous = _decode_scan_checkpoint(checkpoint) if checkpoint else {}
        current: dict[str, str] = {}
        changed: list[SourceRecord] = []
        async for page in self._pages(table, None, f"changes (scan) of {table}"):
            for record in page:
                digest = _row_hash(record.values)
                current[record.key] = digest
                if previous.get(record.key) != digest:
                    changed.append(record)
        changed.extend(SourceRecord(key=k, values={}, deleted=True) for k in previous if k not in current)
        yield changed, _encode_scan_checkpoint(current)
