"""Dynamics 365 Finance & Operations OData v4 (`/data`) connector: RecordSink + ChangeSource, business events.

Addressing
    Tables are entity set names (`CustomersV3`, `ReleasedProductsV2`, `SalesOrderHeadersV2`, `SalesOrderLines`).
    Every key is fully specified, `dataAreaId` included; the key fields per entity live in `ENTITY_KEYS`.

Canonical key (`SourceRecord.key`, `WriteOp.key`, `WriteResult.key`)
    The key field values in `ENTITY_KEYS` order joined with `|`, e.g. `usmf|US-001` for
    (dataAreaId, CustomerAccount). A `|` or `\\` inside a value is escaped as `\\|` / `\\\\`, so the format is
    reversible (`format_key` / `parse_key`). `dataAreaId` is kept as F&O returns it (lower case).

Reads
    Always `cross-company=true` (a `dataAreaId` filter narrows to one company when asked); `$filter` literals
    are escaped (strings quoted with `''` doubling, numbers literal, datetimes ISO-8601 UTC, `bool` and
    `FinOpsEnum` as enum literals such as `Microsoft.Dynamics.DataEntities.NoYes'Yes'`); server-driven paging
    follows `@odata.nextLink` verbatim, rebased onto our environment host so the token never goes elsewhere.

Writes
    F&O has no upsert: `upsert` reads by key (or `match`) and PATCHes (`If-Match: *`) when found, else POSTs
    (201 returns the entity, whose key fields give the canonical key). A replayed create therefore finds the
    record and PATCHes it. `delete` -> DELETE (404 = already gone). Validation failures come back as HTTP 500
    with an `AxODataWriteException` innererror: mapped to RejectedError carrying the infolog text; any other
    5xx is TransientError. Key fields left out of a create (CustomerAccount, SalesOrderNumber, InventoryLotId)
    are assigned by F&O's number sequences and come back in the 201 body.

Document lines (`WriteOp.lines`)
    After the header is written, its lines are read with one query (the `parent_fields`, e.g. dataAreaId and
    SalesOrderNumber) and each item is matched locally by its `match` field: PATCHed when a value differs,
    POSTed (with the parent fields copied from the header row) when absent. A failed line fails the op with
    the header's key, so the retry finds the header by `match` and adds only what is missing.

Change detection (`changes_since`)
    Entities in `MODIFIED_FIELDS` are polled with `ModifiedDateTime gt <checkpoint>` ordered ascending; the
    checkpoint is the ISO timestamp of the newest change seen (deletes are not visible to this mode). Other
    entities (ReleasedProductsV2, SalesOrderLines) are compared by full scan: the checkpoint is a compressed map
    of key -> row hash, changed/new rows are yielded and vanished keys come back flagged `deleted`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from shared.connectors._http import RetryPolicy, send_with_retry
from shared.connectors._odata import json_object, rebase_link
from shared.connectors.dataverse import TokenProvider
from shared.core.dates import iso_z, parse_iso, parse_wcf_date
from shared.core.errors import (
    AmbiguousWriteError,
    AuthError,
    EnvelopeError,
    RejectedError,
    RetriableError,
    SyncError,
    ThrottledError,
    TransientError,
)
from shared.core.ports import LineWrite, SourceRecord, WriteOp, WriteResult, join_key, split_key
from shared.payloads import FinOpsEvent, bad_values, read_json, validate

log = logging.getLogger(__name__)

SYSTEM = "fno"
DATA_PATH = "/data/"
MAX_PAGE_SIZE = 10000
"""F&O server-driven paging returns at most 10,000 rows per page."""
ENUM_NAMESPACE = "Microsoft.Dynamics.DataEntities"
WRITE_EXCEPTION = "AxODataWriteException"

ENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "CustomersV3": ("dataAreaId", "CustomerAccount"),
    "ReleasedProductsV2": ("dataAreaId", "ItemNumber"),
    "SalesOrderHeadersV2": ("dataAreaId", "SalesOrderNumber"),
    "SalesOrderLines": ("dataAreaId", "InventoryLotId"),
}
"""Key fields per entity set, in canonical-key order."""

MODIFIED_FIELDS: dict[str, str] = {
    "CustomersV3": "ModifiedDateTime",
    "SalesOrderHeadersV2": "ModifiedDateTime",
}
"""Entities polled by modification time; the others are change-detected by full-scan comparison."""

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RETRIABLE_READ = frozenset({408, 429, 500, 502, 503, 504})
_RETRIABLE_WRITE = frozenset({408, 429, 502, 503})
"""A write answered 500 may be a validation failure (not worth retrying); 504 may have been applied."""


# ============================================================================================ keys


def format_key(entity: str, values: Mapping[str, Any]) -> str:
    """Canonical key of a row (or key dict): key field values in `ENTITY_KEYS` order joined by `|`."""
    fields = _key_fields(entity)
    parts = []
    for name in fields:
        value = values.get(name)
        if value is None or value == "":
            raise RejectedError(f"{SYSTEM}: {entity} key field {name!r} is missing (keys are {', '.join(fields)})")
        parts.append(str(value))
    return join_key(parts)


def parse_key(entity: str, key: str) -> dict[str, str]:
    """Inverse of `format_key`: {key field: value} in `ENTITY_KEYS` order; every field must be present."""
    fields = _key_fields(entity)
    try:
        parts = split_key(key)
    except ValueError:
        raise RejectedError(f"{SYSTEM}: {entity} key {key!r} has a dangling escape") from None
    if len(parts) != len(fields) or any(p == "" for p in parts):
        raise RejectedError(f"{SYSTEM}: {entity} key {key!r} must give {len(fields)} non-empty parts "
                            f"({'|'.join(fields)}), e.g. 'usmf|US-001'")
    return dict(zip(fields, parts, strict=True))


def _key_fields(entity: str) -> tuple[str, ...]:
    fields = ENTITY_KEYS.get(entity)
    if fields is None:
        raise RejectedError(f"{SYSTEM}: entity set {entity!r} has no key definition (known: "
                            f"{', '.join(sorted(ENTITY_KEYS))})")
    return fields


def _quote_text(value: str) -> str:
    """An OData string literal: single quotes doubled (a value can never close the literal)."""
    return "'" + value.replace("'", "''") + "'"


def key_path(entity: str, key: Mapping[str, Any]) -> str:
    """`CustomersV3(dataAreaId='usmf',CustomerAccount='US-001')`, every key field given, literals URL-encoded."""
    fields = _key_fields(entity)
    parts = []
    for name in fields:
        value = key.get(name)
        if value is None or value == "":
            raise RejectedError(f"{SYSTEM}: {entity} key field {name!r} is missing; F&O needs every key field")
        literal = str(value) if isinstance(value, int) and not isinstance(value, bool) else _quote_text(str(value))
        parts.append(f"{name}={quote(literal, safe=chr(39))}")
    return f"{entity}({','.join(parts)})"


# ============================================================================================ literals


@dataclass(frozen=True)
class FinOpsEnum:
    """An enum value for `$filter`: `FinOpsEnum("NoYes", "Yes")` -> `Microsoft.Dynamics.DataEntities.NoYes'Yes'`."""

    enum_type: str
    member: str


def _ident(name: str, what: str) -> str:
    if not isinstance(name, str) or not _IDENT_RE.match(name):
        raise RejectedError(f"{SYSTEM}: {what} {name!r} is not a valid F&O field name (letters, digits, '_')")
    return name


def _utc_text(value: datetime) -> str:
    return iso_z(value)


def filter_literal(value: Any, field_name: str = "value") -> str:
    """An escaped OData literal. `bool` is an F&O NoYes enum (F&O entities have no Edm.Boolean fields)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{ENUM_NAMESPACE}.NoYes'{'Yes' if value else 'No'}'"
    if isinstance(value, FinOpsEnum):
        _ident(value.enum_type, "enum type")
        _ident(value.member, "enum member")
        return f"{ENUM_NAMESPACE}.{value.enum_type}'{value.member}'"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | Decimal):
        if not math.isfinite(float(value)):
            raise RejectedError(f"{SYSTEM}: cannot filter {field_name} on non-finite number {value}")
        return str(value) if isinstance(value, Decimal) else repr(value)
    if isinstance(value, datetime):
        return _utc_text(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        return _quote_text(value)
    raise RejectedError(f"{SYSTEM}: cannot filter {field_name} on a {type(value).__name__} value")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return _utc_text(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, FinOpsEnum):
        return value.member
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return value


def _parse_datetime(value: Any) -> datetime | None:
    """ISO-8601 text (F&O sends 7 fraction digits) as aware UTC; None when absent, malformed or out of range.

    A row whose modified time cannot be read keeps its raw value and `modified=None`: it still syncs (or
    fails alone when a mapping needs the value), and never fails the page it came in.
    """
    return parse_iso(value)


# ============================================================================================ errors


def _error_parts(body: bytes) -> tuple[str, str, str]:
    """(message, innererror type, innererror message) of an F&O OData error body."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500], "", ""
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return text.strip()[:500], "", ""
    inner = err.get("innererror") if isinstance(err.get("innererror"), dict) else {}
    assert isinstance(inner, dict)
    return str(err.get("message") or "").strip(), str(inner.get("type") or ""), str(inner.get("message") or "")


def _error_for(response: httpx.Response, what: str) -> SyncError:
    status = response.status_code
    message, inner_type, inner_message = _error_parts(response.content)
    if status == 500 and inner_type.endswith(WRITE_EXCEPTION):
        return RejectedError(f"{SYSTEM} {what}: F&O refused the write: {inner_message or message}")
    detail = f"{SYSTEM} {what}: HTTP {status}: {inner_message or message}"
    if status == 429:
        raw = response.headers.get("Retry-After")
        try:
            retry = max(0.0, float(raw)) if raw is not None else None
        except ValueError:
            retry = None
        return ThrottledError(detail, retry_after=retry)
    if status == 504:
        return AmbiguousWriteError(detail)
    if status >= 500 or status == 408:
        return TransientError(detail)
    if status in (401, 403):
        return AuthError(detail)
    return RejectedError(detail)


def _with_detail(exc: SyncError, detail: str) -> SyncError:
    """The same kind of error (class, reason, Retry-After) with a fuller message."""
    if isinstance(exc, ThrottledError):
        return ThrottledError(detail, retry_after=exc.retry_after, reason=exc.reason)
    return type(exc)(detail, reason=exc.reason)


def _same_value(current: Any, wanted: Any) -> bool:
    """Does F&O already hold `wanted`? Numbers compare by value (F&O returns 2 for 2.0), the rest as JSON."""
    wanted = _jsonable(wanted)
    numbers = (int, float)
    if isinstance(current, numbers) and isinstance(wanted, numbers) \
            and not isinstance(current, bool) and not isinstance(wanted, bool):
        return math.isclose(float(current), float(wanted), rel_tol=0.0, abs_tol=1e-9)
    return bool(current == wanted)


def _rewrap(exc: RetriableError, context: str) -> RetriableError:
    detail = f"{context}: {exc.detail}"
    if isinstance(exc, ThrottledError):
        return ThrottledError(detail, retry_after=exc.retry_after)
    return TransientError(detail)


# ============================================================================================ business events

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


# ============================================================================================ client


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


class FinOpsClient:
    """F&O OData v4 client implementing `RecordSink` and `ChangeSource` (see the module docstring).

    `SourceRecord.values` are the entity's fields as F&O returns them (enums as member names); `version` is the
    `@odata.etag`; `modified` the `ModifiedDateTime` when the entity has it.
    """

    system = SYSTEM

    def __init__(
        self,
        environment_url: str,
        http: httpx.AsyncClient,
        token_provider: TokenProvider,
        *,
        policy: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass, safe as a default
        max_concurrency: int = 4,
        page_size: int = MAX_PAGE_SIZE,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        parsed = urlsplit(environment_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("environment_url must be the environment URL, e.g. "
                             f"https://contoso.operations.dynamics.com, got {environment_url!r}")
        self.base_url = f"{parsed.scheme}://{parsed.netloc}"
        self.data_root = self.base_url + DATA_PATH
        self._http = http
        self._tokens = token_provider
        self._policy = policy
        self._max_concurrency = max_concurrency
        self._page_size = page_size
        self._sleep = sleep

    # ------------------------------------------------------------------------------------ HTTP core

    async def _send(self, method: str, url: str, *, what: str, params: Mapping[str, str] | None = None,
                    body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None,
                    write: bool = False) -> httpx.Response:
        """Bearer auth (one refresh-and-replay on 401) and short retries honouring Retry-After."""
        refreshed = False
        content = json.dumps({k: _jsonable(v) for k, v in body.items()}).encode() if body is not None else None
        while True:
            token = await self._tokens.get_token(force_refresh=refreshed)
            all_headers = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0",
                           "Authorization": f"Bearer {token}"}
            if content is not None:
                all_headers["Content-Type"] = "application/json"
            all_headers.update(headers or {})

            async def attempt(h: dict[str, str] = all_headers) -> httpx.Response:
                return await self._http.request(method, url, params=params, content=content, headers=h)

            try:
                response = await send_with_retry(attempt, system=SYSTEM, policy=self._policy, sleep=self._sleep,
                                                  retriable_status=_RETRIABLE_WRITE if write else _RETRIABLE_READ)
            except RetriableError as exc:
                raise _rewrap(exc, f"{SYSTEM} {what}") from exc
            if response.status_code == 401:
                if refreshed:
                    raise AuthError(f"{SYSTEM} {what}: HTTP 401 even after a token refresh "
                                    f"({response.headers.get('WWW-Authenticate') or 'no challenge'}); check that the "
                                    "app is registered in F&O 'Microsoft Entra applications' with a user")
                log.info("%s %s: HTTP 401, refreshing the token once and replaying", SYSTEM, what)
                refreshed = True
                continue
            return response

    async def _get_json(self, url: str, *, what: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        response = await self._send("GET", url, what=what, params=params,
                                    headers={"Prefer": f"odata.maxpagesize={self._page_size}"})
        if not response.is_success:
            raise _error_for(response, what)
        return json_object(response, system=SYSTEM, what=what)

    def _follow(self, link: str) -> str:
        return rebase_link(link, base_url=self.base_url, path_prefix=DATA_PATH, system=SYSTEM)

    def _record(self, entity: str, row: Mapping[str, Any]) -> SourceRecord:
        values = {k: v for k, v in row.items() if "@" not in k}
        etag = row.get("@odata.etag")
        modified_field = MODIFIED_FIELDS.get(entity)
        return SourceRecord(key=format_key(entity, values), values=values,
                            modified=_parse_datetime(values.get(modified_field)) if modified_field else None,
                            version=str(etag) if etag is not None else None)

    async def _pages(self, entity: str, params: Mapping[str, str] | None, what: str
                     ) -> AsyncIterator[list[SourceRecord]]:
        _key_fields(entity)
        _ident(entity, "entity set")
        url: str | None = self.data_root + entity
        query: dict[str, str] | None = {"cross-company": "true", **(params or {})}
        while url is not None:
            data = await self._get_json(url, what=what, params=query)
            yield [self._record(entity, row) for row in data.get("value") or []]
            link = data.get("@odata.nextLink")
            url, query = (self._follow(str(link)), None) if link else (None, None)

    async def _query(self, entity: str, params: Mapping[str, str] | None, what: str) -> list[SourceRecord]:
        return [r async for page in self._pages(entity, params, what) for r in page]

    # ------------------------------------------------------------------------------------ reads

    @staticmethod
    def build_filter(equals: Mapping[str, Any], not_in: Mapping[str, Sequence[Any]] | None = None) -> str:
        """The `$filter` for `select`. F&O supports neither `in` nor `has`: a list in `equals` becomes
        `(F eq 'a' or F eq 'b')`, a `not_in` list `(F ne 'a' and F ne 'b')`."""
        clauses: list[str] = []
        for name, value in equals.items():
            _ident(name, "filter field")
            if isinstance(value, list | tuple):
                literals = list(dict.fromkeys(filter_literal(v, name) for v in value))
                if not literals:
                    raise RejectedError(f"{SYSTEM}: equals[{name!r}] is an empty list (nothing can match)")
                clauses.append("(" + " or ".join(f"{name} eq {literal}" for literal in literals) + ")")
            else:
                clauses.append(f"{name} eq {filter_literal(value, name)}")
        for name, values in (not_in or {}).items():
            _ident(name, "filter field")
            if isinstance(values, str | bytes):
                raise RejectedError(f"{SYSTEM}: not_in[{name!r}] must be a list of values, not a string")
            items = [v for v in values if v is not None]
            if items:
                clauses.append("(" + " and ".join(f"{name} ne {filter_literal(v, name)}" for v in items) + ")")
        return " and ".join(clauses)

    async def select(self, table: str, *, equals: Mapping[str, Any],
                     not_in: Mapping[str, Sequence[Any]] | None = None) -> list[SourceRecord]:
        """Records (across companies, or one when `equals` has `dataAreaId`) matching escaped equality filters;
        a list value matches any of its values, an empty list nothing (answered without a request)."""
        if any(isinstance(v, list | tuple) and not v for v in equals.values()):
            return []
        text = self.build_filter(equals, not_in)
        return await self._query(table, {"$filter": text} if text else None, f"select from {table}")

    async def get(self, table: str, key: Mapping[str, Any]) -> SourceRecord | None:
        """One record by its full key, or None."""
        path = key_path(table, key)
        response = await self._send("GET", self.data_root + path, what=f"read {path}",
                                    params={"cross-company": "true"})
        if response.status_code == 404:
            return None
        if not response.is_success:
            raise _error_for(response, f"read {path}")
        return self._record(table, response.json())

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        """Read records by canonical key (one key URL each, bounded concurrency); missing keys are absent."""
        wanted = {k: parse_key(table, k) for k in dict.fromkeys(keys)}
        semaphore = asyncio.Semaphore(self._max_concurrency)

        async def one(key: dict[str, str]) -> SourceRecord | None:
            async with semaphore:
                return await self.get(table, key)

        found = await asyncio.gather(*(one(k) for k in wanted.values()))
        return {r.key: r for r in found if r is not None}

    async def read_event_record(self, event: FinOpsBusinessEvent) -> SourceRecord:
        """The full record a business event is about (RejectedError when it no longer exists)."""
        record = await self.get(event.entity_set, event.key)
        if record is None:
            raise RejectedError(f"{SYSTEM}: {event.entity_set} {event.record_key} of business event "
                                f"{event.business_event_id} (ControlNumber {event.control_number}) no longer exists")
        return record

    # ------------------------------------------------------------------------------------ ChangeSource

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

    async def fetch_attachment(self, table: str, key: str, attachment_id: str) -> bytes:
        """F&O document attachments are not synced by Syncline."""
        raise RejectedError(f"{SYSTEM}: attachments are not supported for {table} ({key}, {attachment_id})")

    # ------------------------------------------------------------------------------------ RecordSink

    async def _locate(self, op: WriteOp) -> tuple[dict[str, str] | None, SourceRecord | None]:
        """(key fields, current record) of the op's target; key None when a `match` finds nothing."""
        fields = _key_fields(op.table)
        if op.key:
            key = parse_key(op.table, op.key)
            return key, await self.get(op.table, key)
        if not op.match:
            raise RejectedError(f"{SYSTEM}: op {op.op_id} on {op.table} has neither key nor match")
        if all(op.match.get(f) for f in fields):
            key = {f: str(op.match[f]) for f in fields}
            return key, await self.get(op.table, key)
        found = await self.select(op.table, equals=op.match)
        if len(found) > 1:
            raise RejectedError(f"{SYSTEM}: match {op.match} finds {len(found)} {op.table} records "
                                f"({', '.join(r.key for r in found[:5])}); add dataAreaId or a key field")
        if not found:
            return None, None
        return parse_key(op.table, found[0].key), found[0]

    async def _write_one(self, op: WriteOp, *, retried: bool = False) -> WriteResult:
        what = f"{op.action} {op.table} (op {op.op_id})"
        key, current = await self._locate(op)
        fields = _key_fields(op.table)
        if op.action == "delete":
            if key is None or current is None:
                return WriteResult(op.op_id, True, key=format_key(op.table, key) if key else None)
            path = key_path(op.table, key)
            response = await self._send("DELETE", self.data_root + path, what=what, headers={"If-Match": "*"},
                                        write=True)
            if response.status_code not in (200, 204, 404):
                raise _error_for(response, what)
            return WriteResult(op.op_id, True, key=format_key(op.table, key))
        values = {k: v for k, v in op.values.items() if k not in fields}
        if current is not None and key is not None:
            path = key_path(op.table, key)
            response = await self._send("PATCH", self.data_root + path, what=what, body=values,
                                        headers={"If-Match": "*"}, write=True)
            if not response.is_success:
                raise _error_for(response, what)
            return await self._finish(op, {**current.values, **values, **key}, created=False)
        if op.action == "update":
            raise RejectedError(f"{SYSTEM} {what}: the record does not exist (F&O has no upsert; use 'upsert')")
        body: dict[str, Any] = {**(op.match or {}), **op.values, **(key or {})}
        response = await self._send("POST", self.data_root + op.table, what=what, body=body, write=True)
        if not response.is_success:
            error = _error_for(response, what)
            if isinstance(error, RejectedError) and "already exists" in error.detail and not retried:
                # A concurrent or replayed create won the race: the record is there now, so update it.
                return await self._write_one(op, retried=True)
            raise error
        try:
            created = response.json()
        except ValueError:
            created = body
        return await self._finish(op, created if isinstance(created, dict) else body, created=True)

    async def _finish(self, op: WriteOp, header: Mapping[str, Any], *, created: bool) -> WriteResult:
        """The op's result once its record is written: then its lines, if it has any."""
        key = format_key(op.table, header)
        if op.lines is None:
            return WriteResult(op.op_id, True, key=key, created=created)
        try:
            error = await self._write_lines(op, key, header, created=created)
        except (AuthError, ThrottledError):
            raise
        except SyncError as exc:
            error = _with_detail(exc, f"{SYSTEM}: {op.table} {key} is written, but its lines could not be: "
                                      f"{exc.detail}")
        if error is not None:
            log.warning("%s: op %s: %s", SYSTEM, op.op_id, error)
            # The header key goes back with the failure so the retry (found again by `match`) adds only the
            # missing lines.
            return WriteResult(op.op_id, False, key=key, created=created, error=error)
        return WriteResult(op.op_id, True, key=key, created=created)

    async def _write_lines(self, op: WriteOp, header_key: str, header: Mapping[str, Any], *,
                           created: bool) -> SyncError | None:
        """Make every line of `op.lines` exist once under the header; the failed lines' errors, combined."""
        lines = op.lines
        assert lines is not None
        _key_fields(lines.table)
        _ident(lines.table, "entity set")
        parent: dict[str, Any] = {}
        for line_field, header_field in lines.parent_fields.items():
            value = header.get(header_field)
            if value is None or value == "":
                raise RejectedError(f"{SYSTEM}: {op.table} {header_key} has no {header_field} to copy onto its "
                                    f"{lines.table}.{line_field}")
            parent[_ident(line_field, "line field")] = value
        if not parent:
            raise RejectedError(f"{SYSTEM}: op {op.op_id}: lines of {lines.table} need parent_fields to tie them "
                                f"to {op.table} {header_key}")
        # A header created by this very op has no lines yet; otherwise one query reads them all, and every
        # item is matched locally (no query per line).
        existing = [] if created else await self.select(lines.table, equals=parent)
        failures: list[SyncError] = []
        for item in lines.items:
            try:
                await self._write_line(lines.table, item, parent, existing, op.op_id)
            except (AuthError, ThrottledError):
                raise
            except SyncError as exc:
                failures.append(exc)
        if not failures:
            return None
        # A permanent failure decides the outcome: retrying cannot fix it, and the operator needs its reason.
        first = next((e for e in failures if not e.retriable), failures[0])
        return _with_detail(first, f"{SYSTEM}: {op.table} {header_key} is written, but {len(failures)} of "
                                   f"{len(lines.items)} {lines.table} lines failed (a retry adds only the "
                                   "missing ones): " + "; ".join(e.detail for e in failures))

    async def _write_line(self, table: str, item: LineWrite, parent: Mapping[str, Any],
                          existing: list[SourceRecord], op_id: str) -> None:
        """Create the line, or PATCH the one its `match` finds (only the fields that differ); `existing` learns
        the created line, so an item repeated in the same op is not created twice."""
        what = f"{table} line for source line {item.source_key} (op {op_id})"
        if not item.match:
            raise RejectedError(f"{SYSTEM} {what}: the line has no match field, so a replay would duplicate it")
        found = [r for r in existing if all(str(r.values.get(f, "")) == str(v) for f, v in item.match.items())]
        if len(found) > 1:
            raise RejectedError(f"{SYSTEM} {what}: {len(found)} lines already match {item.match} "
                                f"({', '.join(r.key for r in found[:5])}); remove the duplicates in F&O")
        if found:
            line = found[0]
            wanted = {k: v for k, v in {**item.values, **item.match}.items() if k not in _key_fields(table)}
            changes = {k: v for k, v in wanted.items() if not _same_value(line.values.get(k), v)}
            if not changes:
                return
            path = key_path(table, parse_key(table, line.key))
            response = await self._send("PATCH", self.data_root + path, what=f"update {what}", body=changes,
                                        headers={"If-Match": "*"}, write=True)
            if not response.is_success:
                raise _error_for(response, f"update {what}")
            line.values.update({k: _jsonable(v) for k, v in changes.items()})
            return
        body = {**item.values, **item.match, **parent}
        response = await self._send("POST", self.data_root + table, what=f"create {what}", body=body, write=True)
        if not response.is_success:
            raise _error_for(response, f"create {what}")
        try:
            row = response.json()
        except ValueError:
            row = None
        values = row if isinstance(row, dict) else {k: _jsonable(v) for k, v in body.items()}
        try:
            existing.append(self._record(table, values))
        except RejectedError:
            existing.append(SourceRecord(key="", values=dict(values)))

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """Apply ops with bounded concurrency (ops on the same record run in order); one result per op.

        Auth failures and throttling that outlived the in-call retries fail the whole call; every other
        failure fails only its op.
        """
        semaphore = asyncio.Semaphore(self._max_concurrency)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, op in enumerate(ops):
            ident = op.key or json.dumps(op.match or {}, sort_keys=True, default=str) or op.op_id
            groups.setdefault((op.table, ident), []).append(i)
        results: list[WriteResult | None] = [None] * len(ops)

        async def run(indexes: list[int]) -> None:
            for i in indexes:
                op = ops[i]
                async with semaphore:
                    try:
                        results[i] = await self._write_one(op)
                    except (AuthError, ThrottledError):
                        raise
                    except SyncError as exc:
                        log.warning("%s: op %s failed: %s", SYSTEM, op.op_id, exc)
                        results[i] = WriteResult(op.op_id, False, key=op.key, error=exc)

        outcomes = await asyncio.gather(*(run(ix) for ix in groups.values()), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [r for r in results if r is not None]


def _utc_text_precise(value: datetime) -> str:
    """ISO-8601 UTC with milliseconds (checkpoints must not lose sub-second ordering)."""
    return iso_z(value, millis=True)
