"""SAP S/4HANA OData v2 connector (API_BUSINESS_PARTNER, API_SALES_ORDER_SRV): RecordSink + ChangeSource on httpx.

Addressing
    Tables are entity sets; the service is chosen per set (`ENTITY_SETS`): `A_BusinessPartner` (with its
    addresses, roles and customer / sales-area data) in API_BUSINESS_PARTNER, `A_SalesOrder` (with `to_Item`)
    and `A_SalesOrderItem` in API_SALES_ORDER_SRV, under `{base_url}/sap/opu/odata/sap/<service>/`. Keys are
    SAP's numbers as strings (`17100001`, `4000043`); composite keys join their parts with `|`
    (`A_SalesOrderItem` `4000043|10`). `sap_client` adds `sap-client=<n>` to every request (on-premise).

Auth and sessions
    `BasicAuth` (communication user) or `OAuthClientCredentials` (token URL, client id / secret; one refresh and
    replay on 401). Before the first write a GET of the service root with `x-csrf-token: Fetch` returns the CSRF
    token and session cookies; both go on every modifying request. A 403 answered `x-csrf-token: Required`
    (expired session or token) fetches a new token once and replays; a second one is an AuthError.

Reads
    `Accept: application/json`, collections `{"d": {"results", "__next"}}`: `$top`/`$skip` windows of
    `page_size`, inside which server paging (`__next`, rebased onto our host so credentials never leave it) is
    followed. `$filter` literals are escaped (strings with `''` doubling, `datetime'...'`, `datetimeoffset'...'`
    for Edm.DateTimeOffset fields, `time'PT..'`, decimals `1.5M`); OData v2 has no `in`, so a list in `equals`
    becomes an `or` chain and `not_in` an `and` chain of `ne`.
    Values come back as SAP sends them except: `\\/Date(ms)\\/` -> ISO-8601 (`2026-01-05` for a date at
    midnight, `2026-01-05T14:30:05Z` otherwise), Edm.Time `PT14H30M05S` -> `14:30:05`, `__metadata` and
    unexpanded navigation dropped; `version` is `__metadata.etag`.

Nested values (reads and writes use the same shape)
    A_BusinessPartner: `to_BusinessPartnerAddress` = list of address dicts, `to_BusinessPartnerRole` = list of
    role dicts (or role codes such as "FLCU01" on writes), `to_Customer` = a dict of A_Customer fields with
    `to_CustomerSalesArea` = list of sales-area dicts. A_SalesOrder: `to_Item` = list of item dicts.

Writes
    Every number is sent as a string (the written entities' numeric fields are Edm.Decimal, which OData v2
    JSON carries as strings); dates as `\\/Date(ms)\\/`. SAP has no upsert, so an op is located first (by
    key, else by one `$filter` on its `match` fields), then:
    - A_SalesOrder create: ONE deep-insert POST with `to_Item: {"results": [...]}` (item numbers 10, 20, ...
      unless given; each item carries its `LineWrite.match` field). Update: header PATCH with
      `If-Match: <etag>` when a field differs (412: re-read, re-diff, retry once), then each line is found by
      its match field and PATCHed when different, or POSTed to `A_SalesOrder('<n>')/to_Item`. The item match
      field is whatever the flow's `link_field` names; `ITEM_MATCH_FIELD` (`PurchaseOrderByCustomer`, which
      A_SalesOrderItem has as a writable CHAR 35) is the recommended one: `ExternalItemID` is read-only and
      `UnderlyingPurchaseOrderItem` is only 6 characters, too short for source line ids.
    - A_BusinessPartner create: one deep-insert POST with addresses, roles and customer data (role FLCU01 is
      added when `to_Customer` is given without roles). Update: header PATCH with If-Match, addresses paired
      by `AddressID` (else by position) PATCHed or POSTed, missing roles POSTed (FLCU01 creates the customer),
      customer fields PATCHed, sales areas (by org / channel / division) PATCHed or POSTed.
      `PARTNER_MATCH_FIELD` (`BusinessPartnerIDByExtSystem`, CHAR 20, "business partner number in external
      system") is the recommended match field. Business partners cannot be deleted through the API.
    - delete: A_SalesOrder DELETE with If-Match (404 = already gone).
    The match values are written into the created record, so a replay finds it and creates nothing. A create
    whose answer is lost (read timeout, dropped connection) is re-located by its match before it is reported
    as AmbiguousWriteError.

Errors
    The Gateway body `{"error": {"code", "message": {"value"}, "innererror": {"errordetails": [...]}}}` becomes
    `RejectedError("SAP rejected A_SalesOrder create (op ..): V1/320: Sales organization 9999 is not defined
    (field SalesOrganization)")`; lock messages (`LOCK_MESSAGES`) and 5xx are TransientError, 401/403
    AuthError, a write answered 504 AmbiguousWriteError. 429 and 503 are retried in-call honouring
    Retry-After (writes too: SAP refused them before processing); when they persist, or ask for more than
    `RetryPolicy.max_retry_after`, they become ThrottledError (429) / TransientError (503).

Change detection (`changes_since`)
    A_SalesOrder: `LastChangeDateTime ge datetimeoffset'<checkpoint>'` (UTC; set on create and every change).
    A_BusinessPartner has no such timestamp: it has `LastChangeDate` + `LastChangeTime` (empty until the first
    change) and `CreationDate` + `CreationTime`, kept in the system time zone (`system_time_zone`, UTC in
    S/4HANA Cloud), so the filter compares date and time pairs of both. The checkpoint is the newest change
    time seen (`2026-01-05T14:30:05.123Z`), followed by `;` and the keys changed at exactly that time, which
    the next poll (`ge`) skips; intermediate pages carry the previous checkpoint (a crash replays, never skips).
    Deletions are not visible. SAP event-mesh CloudEvents are parsed by `parse_event`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import ssl
import time as _time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlencode, urlsplit
from zoneinfo import ZoneInfo

import httpx

from shared.connectors._http import RetryPolicy, send_with_retry
from shared.connectors._odata import json_object, rebase_link
from shared.core.errors import (
    AmbiguousWriteError,
    AuthError,
    EnvelopeError,
    MappingError,
    RejectedError,
    RetriableError,
    SyncError,
    ThrottledError,
    TransientError,
)
from shared.core.ports import Lines, LineWrite, SourceRecord, WriteOp, WriteResult

log = logging.getLogger(__name__)

SYSTEM = "sap"
SERVICE_PATH = "/sap/opu/odata/sap/"
BP_SERVICE = "API_BUSINESS_PARTNER"
SO_SERVICE = "API_SALES_ORDER_SRV"
ITEM_MATCH_FIELD = "PurchaseOrderByCustomer"
"""Recommended A_SalesOrderItem field for `LineWrite.match` (writable, CHAR 35)."""
PARTNER_MATCH_FIELD = "BusinessPartnerIDByExtSystem"
"""Recommended A_BusinessPartner field for `WriteOp.match` (writable, CHAR 20)."""
ADDRESSES = "to_BusinessPartnerAddress"
ROLES = "to_BusinessPartnerRole"
CUSTOMER = "to_Customer"
SALES_AREAS = "to_CustomerSalesArea"
ITEMS = "to_Item"
CUSTOMER_ROLE = "FLCU01"
LOCK_MESSAGES = frozenset({"V1/042", "MC/601", "R11/019"})
"""Gateway message codes meaning "the document is locked by another user": retried later, not rejected."""


@dataclass(frozen=True)
class EntitySet:
    """How one entity set is addressed and read."""

    service: str
    keys: tuple[str, ...]
    expand: str | None = None
    """Navigation read with every record (the nested values convention)."""
    changes: Literal["order", "partner"] | None = None


ENTITY_SETS: dict[str, EntitySet] = {
    "A_BusinessPartner": EntitySet(BP_SERVICE, ("BusinessPartner",),
                                   f"{ADDRESSES},{ROLES},{CUSTOMER}/{SALES_AREAS}", "partner"),
    "A_SalesOrder": EntitySet(SO_SERVICE, ("SalesOrder",), ITEMS, "order"),
    "A_SalesOrderItem": EntitySet(SO_SERVICE, ("SalesOrder", "SalesOrderItem")),
    "A_BusinessPartnerAddress": EntitySet(BP_SERVICE, ("BusinessPartner", "AddressID")),
    "A_Customer": EntitySet(BP_SERVICE, ("Customer",), SALES_AREAS),
    "A_CustomerSalesArea": EntitySet(BP_SERVICE, ("Customer", "SalesOrganization", "DistributionChannel",
                                                  "Division")),
}

DATETIMEOFFSET_FIELDS = frozenset({"LastChangeDateTime", "ExternalDocLastChangeDateTime", "ValidFrom", "ValidTo"})
"""Edm.DateTimeOffset fields: filtered with `datetimeoffset'...'`, written as `/Date(ms+0000)/`."""
DATE_FIELDS = frozenset({
    "CustomerPurchaseOrderDate", "SalesOrderDate", "RequestedDeliveryDate", "PricingDate", "BillingDocumentDate",
    "ServicesRenderedDate", "FixedValueDate", "ValidityStartDate", "ValidityEndDate", "BirthDate", "CreationDate",
    "LastChangeDate", "OrganizationFoundationDate", "OrganizationLiquidationDate"})
"""Edm.DateTime fields: an ISO date string written to one is sent as `/Date(ms)/`."""
DECIMAL_FIELDS = frozenset({
    "RequestedQuantity", "NetAmount", "TotalNetAmount", "ItemGrossWeight", "ItemNetWeight", "ItemVolume",
    "TaxAmount", "CostAmount", "ConfdDelivQtyInOrderQtyUnit", "PriceDetnExchangeRate", "AccountingExchangeRate"})
"""Edm.Decimal fields: compared numerically ("2" equals SAP's "2.000")."""

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DATE_RE = re.compile(r"^/Date\((?P<ms>-?\d+)(?P<off>[+-]\d{4})?\)/$")
_TIME_RE = re.compile(r"^PT(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+)(?:\.\d+)?S)?$")
_ISO_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?$")
_RETRIABLE_READ = frozenset({408, 429, 500, 502, 503, 504})
_RETRIABLE_WRITE = frozenset({429, 503})
"""A write answered 429/503 was refused before processing; anything else may have run in the backend."""
_AMBIGUOUS_NETWORK = (httpx.ReadTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
"""Failures after the request may have reached SAP: a create is not replayed blindly."""
_FETCH_CHUNK = 40
"""Keys per `fetch` query (an `or` chain; keeps the URL well under Gateway's limits)."""


# ============================================================================================ keys and literals


def _ident(name: str, what: str) -> str:
    if not isinstance(name, str) or not _IDENT_RE.match(name):
        raise RejectedError(f"{SYSTEM}: {what} {name!r} is not a valid OData property name")
    return name


def _entity(table: str) -> EntitySet:
    definition = ENTITY_SETS.get(table)
    if definition is None:
        raise RejectedError(f"{SYSTEM}: entity set {table!r} is not supported (known: "
                            f"{', '.join(sorted(ENTITY_SETS))})")
    return definition


def format_key(table: str, values: Mapping[str, Any]) -> str:
    """Canonical key: the key fields' values joined by `|` (`|` and `\\` inside a value escaped)."""
    parts = []
    for name in _entity(table).keys:
        value = values.get(name)
        if value is None or value == "":
            raise RejectedError(f"{SYSTEM}: {table} key field {name!r} is missing")
        parts.append(str(value).replace("\\", "\\\\").replace("|", "\\|"))
    return "|".join(parts)


def parse_key(table: str, key: str) -> dict[str, str]:
    """Inverse of `format_key`."""
    fields = _entity(table).keys
    parts: list[str] = []
    current: list[str] = []
    chars = iter(key)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == "|":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    if len(parts) != len(fields) or any(p == "" for p in parts):
        raise RejectedError(f"{SYSTEM}: {table} key {key!r} must give {'|'.join(fields)}")
    return dict(zip(fields, parts, strict=True))


def quote_string(value: str) -> str:
    """An OData string literal: single quotes doubled, so a value can never end the literal."""
    return "'" + value.replace("'", "''") + "'"


def key_path(table: str, key: Mapping[str, str]) -> str:
    """`A_SalesOrder('4000043')`, `A_SalesOrderItem(SalesOrder='4000043',SalesOrderItem='10')`, URL-encoded."""
    fields = _entity(table).keys
    if len(fields) == 1:
        predicate = quote(quote_string(str(key[fields[0]])), safe="'")
    else:
        predicate = ",".join(f"{k}={quote(quote_string(str(key[k])), safe=chr(39))}" for k in fields)
    return f"{table}({predicate})"


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def filter_literal(value: Any, field_name: str = "value") -> str:
    """An escaped OData v2 literal for `field_name` (datetimes as datetimeoffset'' for Edm.DateTimeOffset fields)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | Decimal):
        if not math.isfinite(float(value)):
            raise RejectedError(f"{SYSTEM}: cannot filter {field_name} on non-finite number {value}")
        return f"{Decimal(str(value)):f}M"
    if isinstance(value, datetime):
        moment = _utc(value)
        if field_name in DATETIMEOFFSET_FIELDS:
            return f"datetimeoffset'{moment.strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3]}Z'"
        return f"datetime'{moment.strftime('%Y-%m-%dT%H:%M:%S')}'"
    if isinstance(value, date):
        return f"datetime'{value.isoformat()}T00:00:00'"
    if isinstance(value, time):
        return f"time'PT{value.hour:02d}H{value.minute:02d}M{value.second:02d}S'"
    if isinstance(value, str):
        return quote_string(value)
    raise RejectedError(f"{SYSTEM}: cannot filter {field_name} on a {type(value).__name__} value")


def build_filter(equals: Mapping[str, Any], not_in: Mapping[str, Sequence[Any]] | None = None) -> str:
    """`$filter` for `select`: lists in `equals` become `(F eq a or F eq b)` (OData v2 has no `in`)."""
    clauses: list[str] = []
    for name, value in equals.items():
        _ident(name, "filter field")
        if isinstance(value, list | tuple | set | frozenset):
            items = list(value)
            if not items:
                clauses.append("false")
                continue
            chain = " or ".join(f"{name} eq {filter_literal(v, name)}" for v in items)
            clauses.append(f"({chain})" if len(items) > 1 else chain)
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


# ============================================================================================ values


def _parse_sap_datetime(value: Any) -> datetime | None:
    """`/Date(ms)/`, `/Date(ms+0000)/` or ISO-8601 text as an aware UTC datetime."""
    if not isinstance(value, str) or not value:
        return None
    m = _DATE_RE.match(value)
    if m:
        return datetime.fromtimestamp(int(m.group("ms")) / 1000, tz=UTC)
    try:
        parsed = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return _utc(parsed)


def _parse_sap_time(value: Any) -> time | None:
    if not isinstance(value, str):
        return None
    m = _TIME_RE.match(value)
    if m is None or value == "PT":
        if re.fullmatch(r"\d{2}:\d{2}:\d{2}", value):
            return time.fromisoformat(value)
        return None
    return time(int(m.group("h") or 0), int(m.group("m") or 0), int(m.group("s") or 0))


def plain_value(value: Any) -> Any:
    """A value as read from SAP, in the connector's representation (dates ISO, navigation as lists/dicts)."""
    if isinstance(value, str):
        m = _DATE_RE.match(value)
        if m:
            moment = datetime.fromtimestamp(int(m.group("ms")) / 1000, tz=UTC)
            if m.group("off") is None and moment.time() == time(0):
                return moment.date().isoformat()
            return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{moment.microsecond // 1000:03d}"
                                                           if moment.microsecond else "") + "Z"
        if value.startswith("PT") and _TIME_RE.match(value) and value != "PT":
            parsed = _parse_sap_time(value)
            return parsed.isoformat() if parsed is not None else value
        return value
    if isinstance(value, list):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        if "results" in value and isinstance(value["results"], list):
            return [plain_value(v) for v in value["results"]]
        return _plain_row(value)
    return value


def _plain_row(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in row.items():
        if name == "__metadata" or (isinstance(value, dict) and "__deferred" in value):
            continue
        out[name] = plain_value(value)
    return out


def _ms(moment: datetime) -> int:
    return int(_utc(moment).timestamp() * 1000)


def wire_value(name: str, value: Any) -> Any:
    """A value as OData v2 JSON must carry it: numbers as strings, dates as `/Date(ms)/`, times as `PT..`."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float | Decimal):
        if isinstance(value, float) and not math.isfinite(value):
            raise MappingError(f"{SYSTEM}: {name} = {value} is not a number SAP can store")
        return f"{Decimal(str(value)):f}"
    if isinstance(value, datetime):
        return f"/Date({_ms(value)}+0000)/" if name in DATETIMEOFFSET_FIELDS else f"/Date({_ms(value)})/"
    if isinstance(value, date):
        return f"/Date({_ms(datetime.combine(value, time(), UTC))})/"
    if isinstance(value, time):
        return f"PT{value.hour:02d}H{value.minute:02d}M{value.second:02d}S"
    if isinstance(value, str) and (name in DATE_FIELDS or name in DATETIMEOFFSET_FIELDS) \
            and _ISO_DATE_RE.match(value):
        moment = _parse_sap_datetime(value if "T" in value else value + "T00:00:00Z")
        if moment is None:
            raise MappingError(f"{SYSTEM}: {name} = {value!r} is not a valid date")
        return wire_value(name, moment)
    if isinstance(value, Mapping):
        return {k: wire_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [wire_value(name, v) for v in value]
    return value


def _normal(name: str, value: Any, numeric: bool) -> Any:
    if value is None or value == "":
        return None
    if numeric:
        try:
            return Decimal(str(value))
        except InvalidOperation:
            return str(value)
    if isinstance(value, datetime | date):
        return _parse_sap_datetime(wire_value(name, value))
    if isinstance(value, str):
        if _DATE_RE.match(value):
            return _parse_sap_datetime(value)
        if (name in DATE_FIELDS or name in DATETIMEOFFSET_FIELDS) and _ISO_DATE_RE.match(value):
            return _parse_sap_datetime(value if "T" in value else value + "T00:00:00Z") or value
        if value.startswith("PT"):
            return _parse_sap_time(value) or value
    return value


def same_value(name: str, current: Any, wanted: Any) -> bool:
    """Whether SAP's current value already equals the wanted one (decimals numerically, dates as instants)."""
    numeric = name in DECIMAL_FIELDS or (isinstance(wanted, int | float | Decimal) and not isinstance(wanted, bool))
    return bool(_normal(name, current, numeric) == _normal(name, wanted, numeric))


def _diff(current: Mapping[str, Any], wanted: Mapping[str, Any], skip: frozenset[str] | set[str]) -> dict[str, Any]:
    return {k: v for k, v in wanted.items()
            if k not in skip and not isinstance(v, dict | list) and not same_value(k, current.get(k), v)}


# ============================================================================================ errors


def gateway_error(body: bytes) -> tuple[str, str, list[tuple[str, str, str]]]:
    """(code, message, [(code, message, target)]) of an SAP Gateway error body (text bodies: message only)."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return "", re.sub(r"<[^>]+>", " ", text).strip()[:300], []
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return "", text.strip()[:300], []
    message = err.get("message")
    value = message.get("value") if isinstance(message, dict) else message
    inner = err.get("innererror") if isinstance(err.get("innererror"), dict) else {}
    details: list[tuple[str, str, str]] = []
    for item in (inner or {}).get("errordetails") or []:
        if isinstance(item, dict) and str(item.get("severity") or "error").lower() == "error":
            details.append((str(item.get("code") or ""), str(item.get("message") or ""), str(item.get("target") or "")))
    return str(err.get("code") or ""), str(value or "").strip(), details


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def error_for(response: httpx.Response, what: str, *, write: bool = False) -> SyncError:
    """The Syncline error for a failed SAP response, quoting SAP's message code and text."""
    status = response.status_code
    code, message, details = gateway_error(response.content)
    target = next((t for c, m, t in details if c == code and t), "")
    text = f"{code}: {message}" if code else (message or f"HTTP {status}")
    if target:
        text += f" (field {target})"
    extra = [f"{c}: {m}" + (f" (field {t})" if t else "") for c, m, t in details if m and m != message]
    if extra:
        text += "; " + "; ".join(extra)
    codes = {code, *(c for c, _, _ in details)}
    if status == 429 or (status == 503 and response.headers.get("Retry-After")):
        return ThrottledError(f"{SYSTEM} {what}: throttled (HTTP {status}): {text}", retry_after=_retry_after(response))
    if codes & LOCK_MESSAGES:
        return TransientError(f"{SYSTEM} {what}: the record is locked in SAP, retrying later: {text}")
    if status == 401:
        return AuthError(f"{SYSTEM} {what}: HTTP 401: {text}; check the communication user's password or the OAuth "
                         "client")
    if status == 403:
        return AuthError(f"{SYSTEM} {what}: not authorized (HTTP 403): {text}; check that the communication "
                         "arrangement grants this service to the communication user")
    if status == 504 and write:
        return AmbiguousWriteError(f"{SYSTEM} {what}: HTTP 504 (the write may have been applied): {text}")
    if status >= 500 or status == 408:
        return TransientError(f"{SYSTEM} {what}: HTTP {status}: {text}")
    return RejectedError(f"SAP rejected {what}: {text}")


def _rewrap(exc: RetriableError, context: str) -> RetriableError:
    detail = f"{context}: {exc.detail}"
    if isinstance(exc, ThrottledError):
        return ThrottledError(detail, retry_after=exc.retry_after)
    if isinstance(exc, AmbiguousWriteError):
        return AmbiguousWriteError(detail)
    return TransientError(detail)


# ============================================================================================ auth


class SapAuth(Protocol):
    """Produces the Authorization header; `refreshable` auth gets one refresh-and-replay on 401."""

    refreshable: bool

    async def authorization(self, http: httpx.AsyncClient, *, force_refresh: bool = False) -> str:
        ...


@dataclass
class BasicAuth:
    """Basic authentication of a communication user."""

    user: str
    password: str = field(repr=False)
    refreshable: bool = False

    async def authorization(self, http: httpx.AsyncClient, *, force_refresh: bool = False) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()


class OAuthClientCredentials:
    """OAuth 2.0 client credentials against SAP's token endpoint (`/sap/bc/sec/oauth2/token` or XSUAA)."""

    refreshable = True

    def __init__(self, token_url: str, client_id: str, client_secret: str, *, scope: str | None = None,
                 refresh_margin: float = 60.0, clock: Callable[[], float] = _time.monotonic) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self._margin = refresh_margin
        self._clock = clock
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def authorization(self, http: httpx.AsyncClient, *, force_refresh: bool = False) -> str:
        async with self._lock:
            if force_refresh or self._token is None or self._clock() >= self._expires:
                await self._fetch(http)
            assert self._token is not None
            return f"Bearer {self._token}"

    async def _fetch(self, http: httpx.AsyncClient) -> None:
        form = {"grant_type": "client_credentials", **({"scope": self.scope} if self.scope else {})}
        try:
            response = await http.post(self.token_url, data=form, auth=(self.client_id, self._secret),
                                       headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise TransientError(f"{SYSTEM}: token request to {self.token_url} failed ({type(exc).__name__})") from exc
        self.fetches += 1
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 500 or response.status_code == 429:
            raise TransientError(f"{SYSTEM}: token endpoint answered HTTP {response.status_code}")
        if not response.is_success or not isinstance(body, dict) or not body.get("access_token"):
            reason = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
            raise AuthError(f"{SYSTEM}: OAuth client {self.client_id} was refused by {self.token_url} "
                            f"(HTTP {response.status_code}: {reason or response.text[:200]}); check the client id "
                            "and secret of the communication arrangement")
        self._token = str(body["access_token"])
        self._expires = self._clock() + max(0.0, float(body.get("expires_in") or 600) - self._margin)


# ============================================================================================ events


@dataclass(frozen=True)
class SapEvent:
    """One SAP business event (event-mesh CloudEvent) and the record it is about."""

    event_type: str
    event_id: str
    source: str
    time: datetime | None
    entity_set: str
    key: str
    operation: str
    """Created, Changed, Deleted ... (the type's last but one part)."""
    data: dict[str, Any] = field(default_factory=dict)


EVENT_OBJECTS: dict[str, tuple[str, str]] = {
    "sap.s4.beh.salesorder.v1.SalesOrder": ("A_SalesOrder", "SalesOrder"),
    "sap.s4.beh.businesspartner.v1.BusinessPartner": ("A_BusinessPartner", "BusinessPartner"),
}
"""Event type prefix -> (entity set, data field holding the key)."""


def parse_event(body: bytes | str | Mapping[str, Any]) -> SapEvent:
    """Parse a CloudEvent such as `sap.s4.beh.salesorder.v1.SalesOrder.Changed.v1` (EnvelopeError when malformed)."""
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise EnvelopeError(f"{SYSTEM} event: body is not JSON ({exc})") from exc
    else:
        data = dict(body)
    if not isinstance(data, dict):
        raise EnvelopeError(f"{SYSTEM} event: expected a JSON object, got {type(data).__name__}")
    event_type = data.get("type")
    if not isinstance(event_type, str) or event_type.count(".") < 2:
        raise EnvelopeError(f"{SYSTEM} event: 'type' is missing or malformed ({event_type!r})")
    prefix, operation, _version = event_type.rsplit(".", 2)
    known = EVENT_OBJECTS.get(prefix)
    if known is None:
        raise EnvelopeError(f"{SYSTEM} event: unknown event type {event_type!r} (known: "
                            f"{', '.join(p + '.<Operation>.v1' for p in sorted(EVENT_OBJECTS))})")
    payload = data.get("data")
    if not isinstance(payload, dict):
        raise EnvelopeError(f"{SYSTEM} event {event_type}: 'data' must be an object")
    entity_set, key_field = known
    key = payload.get(key_field)
    if not isinstance(key, str) or not key:
        raise EnvelopeError(f"{SYSTEM} event {event_type}: data.{key_field} is missing")
    event_id = data.get("id")
    if not isinstance(event_id, str) or not event_id:
        raise EnvelopeError(f"{SYSTEM} event {event_type}: 'id' is missing")
    return SapEvent(event_type, event_id, str(data.get("source") or ""), _parse_sap_datetime(data.get("time")),
                    entity_set, key, operation, dict(payload))


# ============================================================================================ client


@dataclass
class _Checkpoint:
    at: datetime | None
    keys: set[str]

    @classmethod
    def parse(cls, text: str | None, table: str) -> _Checkpoint:
        if not text:
            return cls(None, set())
        stamp, _, keys = text.partition(";")
        at = _parse_sap_datetime(stamp)
        if at is None:
            raise EnvelopeError(f"{SYSTEM}: checkpoint {text!r} for {table} is not '<ISO time>[;keys]'")
        return cls(at, {k for k in keys.split(",") if k})

    def text(self) -> str:
        if self.at is None:
            return ""
        stamp = self.at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return stamp + (";" + ",".join(sorted(self.keys)) if self.keys else "")


class SapClient:
    """SAP S/4HANA OData v2 client implementing `RecordSink` and `ChangeSource` (see the module docstring)."""

    system = SYSTEM

    def __init__(
        self,
        base_url: str,
        auth: SapAuth,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        http: httpx.AsyncClient | None = None,
        verify: ssl.SSLContext | str | bool = True,
        sap_client: str | None = None,
        policy: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass, safe as a default
        page_size: int = 1000,
        max_concurrency: int = 4,
        system_time_zone: str = "UTC",
        timeout: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        parsed = urlsplit(base_url.rstrip("/"))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be the S/4HANA host, e.g. https://my300000-api.s4hana.cloud.sap, got "
                             f"{base_url!r}")
        prefix = parsed.path.rstrip("/")
        if prefix.endswith(SERVICE_PATH.rstrip("/")):
            prefix = prefix[: -len(SERVICE_PATH.rstrip("/"))]
        self.origin = f"{parsed.scheme}://{parsed.netloc}"
        self.odata_root = self.origin + prefix + SERVICE_PATH
        self._path_prefix = prefix + SERVICE_PATH
        self._auth = auth
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(transport=transport, verify=verify, timeout=timeout,
                                               trust_env=False)
        self._sap_client = sap_client
        self._policy = policy
        self._page_size = page_size
        self._max_concurrency = max_concurrency
        self._tz = ZoneInfo(system_time_zone)
        self._sleep = sleep
        self._csrf: str | None = None
        self._csrf_lock = asyncio.Lock()
        self._cookies: dict[str, str] = {}
        self.csrf_fetches = 0
        """CSRF tokens fetched so far (a session needs one; an expired session one more)."""

    async def aclose(self) -> None:
        """Close the HTTP client when this connector created it."""
        if self._own_http:
            await self._http.aclose()

    def service_root(self, table: str) -> str:
        return f"{self.odata_root}{_entity(table).service}/"

    # ------------------------------------------------------------------------------------ HTTP core

    def _absorb_cookies(self, response: httpx.Response) -> None:
        for cookie in response.cookies.jar:
            if cookie.value is not None:
                self._cookies[cookie.name] = cookie.value

    async def _send(self, method: str, url: str, *, what: str, params: Mapping[str, str] | None = None,
                    body: Any = None, headers: Mapping[str, str] | None = None, write: bool = False,
                    create: bool = False, service_root: str | None = None) -> httpx.Response:
        """Auth (one refresh on 401), CSRF for writes (one re-fetch on 403 Required), short retries."""
        refreshed = False
        csrf_retried = False
        content = json.dumps(body).encode() if body is not None else None
        query = dict(params or {})
        if self._sap_client and "sap-client=" not in url:
            query["sap-client"] = self._sap_client
        # OData expects %20, not the form encoding's "+", between the words of $filter.
        target = url + (("&" if "?" in url else "?") + urlencode(query, quote_via=quote, safe="$',()/:*")
                        if query else "")
        while True:
            all_headers = {"Accept": "application/json",
                           "Authorization": await self._auth.authorization(self._http, force_refresh=refreshed)}
            token: str | None = None
            if write:
                token = await self._csrf_token(service_root or url, what=what)
                all_headers["x-csrf-token"] = token
            if content is not None:
                all_headers["Content-Type"] = "application/json"
            if self._cookies:
                all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self._cookies.items())
            all_headers.update(headers or {})


            async def attempt(h: dict[str, str] = all_headers) -> httpx.Response:
                try:
                    return await self._http.request(method, target, content=content, headers=h)
                except _AMBIGUOUS_NETWORK as exc:
                    if create:
                        raise AmbiguousWriteError(f"{SYSTEM} {what}: no answer after the request was sent "
                                                  f"({type(exc).__name__}); it may have been applied") from exc
                    raise

            try:
                response = await send_with_retry(attempt, system=SYSTEM, policy=self._policy, sleep=self._sleep,
                                                  retriable_status=_RETRIABLE_WRITE if write else _RETRIABLE_READ)
            except AmbiguousWriteError:
                raise
            except RetriableError as exc:
                raise _rewrap(exc, f"{SYSTEM} {what}") from exc
            self._absorb_cookies(response)
            if response.status_code == 401 and self._auth.refreshable and not refreshed:
                log.info("%s %s: HTTP 401, refreshing the token once and replaying", SYSTEM, what)
                refreshed = True
                continue
            if response.status_code == 403 and write and \
                    response.headers.get("x-csrf-token", "").lower() == "required":
                if csrf_retried:
                    raise AuthError(f"{SYSTEM} {what}: CSRF token validation failed even with a freshly fetched "
                                    "token; check that the session cookies reach SAP (no proxy stripping them)")
                log.info("%s %s: CSRF token rejected (expired session), fetching a new one once", SYSTEM, what)
                csrf_retried = True
                await self._csrf_token(service_root or url, what=what, stale=token)
                continue
            return response

    async def _csrf_token(self, service_root: str, *, what: str, stale: str | None = None) -> str:
        async with self._csrf_lock:
            if self._csrf is not None and (stale is None or self._csrf != stale):
                return self._csrf
            # A rejected token means the session is gone: start a new one rather than resend its cookies.
            self._cookies.clear()
            response = await self._send("GET", service_root, what=f"CSRF token fetch for {what}",
                                        headers={"x-csrf-token": "Fetch"})
            token = str(response.headers.get("x-csrf-token") or "")
            if not response.is_success or not token or token.lower() == "required":
                if not response.is_success:
                    raise error_for(response, f"CSRF token fetch for {what}")
                raise AuthError(f"{SYSTEM} {what}: SAP returned no CSRF token for {service_root}")
            self._csrf = token
            self.csrf_fetches += 1
            return token

    async def _get_json(self, url: str, *, what: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        response = await self._send("GET", url, what=what, params=params)
        if not response.is_success:
            raise error_for(response, what)
        return json_object(response, system=SYSTEM, what=what)

    async def _get_row(self, table: str, key: Mapping[str, str], *, what: str,
                       expand: str | None = None) -> dict[str, Any] | None:
        """One entity as SAP sends it (with `__metadata`), or None when it does not exist."""
        params = {"$expand": expand} if expand else {}
        url = self.service_root(table) + key_path(table, key)
        response = await self._send("GET", url, what=what, params=params)
        if response.status_code == 404:
            return None
        if not response.is_success:
            raise error_for(response, what)
        data = json_object(response, system=SYSTEM, what=what).get("d")
        if not isinstance(data, dict):
            raise TransientError(f"{SYSTEM} {what}: response has no 'd' object")
        return data

    def _follow(self, link: str) -> str:
        return rebase_link(link, base_url=self.origin, path_prefix=self._path_prefix, system=SYSTEM)

    async def _raw_pages(self, table: str, params: Mapping[str, str] | None, what: str
                         ) -> AsyncIterator[list[dict[str, Any]]]:
        """Rows page by page: `$top`/`$skip` windows, `__next` followed inside each window."""
        definition = _entity(table)
        base = dict(params or {})
        base.setdefault("$orderby", ",".join(f"{k} asc" for k in definition.keys))
        if definition.expand and "$expand" not in base:
            base["$expand"] = definition.expand
        skip = 0
        while True:
            url: str | None = self.service_root(table) + table
            query: dict[str, str] | None = {**base, "$top": str(self._page_size), "$skip": str(skip)}
            count = 0
            while url is not None:
                data = await self._get_json(url, what=what, params=query)
                body = data.get("d")
                if isinstance(body, list):
                    rows, link = body, None
                elif isinstance(body, dict) and isinstance(body.get("results"), list):
                    rows, link = body["results"], body.get("__next")
                else:
                    raise TransientError(f"{SYSTEM} {what}: response has no d.results")
                count += len(rows)
                yield [r for r in rows if isinstance(r, dict)]
                url, query = (self._follow(str(link)), None) if link else (None, None)
            if count < self._page_size:
                return
            skip += self._page_size

    def _record(self, table: str, row: Mapping[str, Any]) -> SourceRecord:
        meta = row.get("__metadata")
        etag = meta.get("etag") if isinstance(meta, dict) else None
        return SourceRecord(key=format_key(table, row), values=_plain_row(row), modified=self._modified(table, row),
                            version=str(etag) if etag is not None else None)

    def _local(self, day: Any, clock: Any) -> datetime | None:
        moment = _parse_sap_datetime(day)
        if moment is None:
            return None
        at = _parse_sap_time(clock) or time(0)
        return datetime.combine(moment.date(), at, self._tz).astimezone(UTC)

    def _modified(self, table: str, row: Mapping[str, Any]) -> datetime | None:
        kind = _entity(table).changes
        if kind == "order":
            return _parse_sap_datetime(row.get("LastChangeDateTime"))
        if kind == "partner":
            stamps = [s for s in (self._local(row.get("LastChangeDate"), row.get("LastChangeTime")),
                                  self._local(row.get("CreationDate"), row.get("CreationTime"))) if s is not None]
            return max(stamps) if stamps else None
        return None

    async def _pages(self, table: str, params: Mapping[str, str] | None, what: str
                     ) -> AsyncIterator[list[SourceRecord]]:
        async for rows in self._raw_pages(table, params, what):
            yield [self._record(table, r) for r in rows]

    # ------------------------------------------------------------------------------------ reads

    async def select(self, table: str, *, equals: Mapping[str, Any],
                     not_in: Mapping[str, Sequence[Any]] | None = None) -> list[SourceRecord]:
        """Records matching escaped equality filters (lists are `or` chains), with the table's nested values."""
        text = build_filter(equals, not_in)
        return [r async for page in self._pages(table, {"$filter": text} if text else None, f"select from {table}")
                for r in page]

    async def get(self, table: str, key: str) -> SourceRecord | None:
        """One record by canonical key, with its nested values, or None."""
        row = await self._get_row(table, parse_key(table, key), what=f"read {table} {key}",
                                  expand=_entity(table).expand)
        return self._record(table, row) if row is not None else None

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        """Read records by canonical key (`or` chains of up to 40 keys per query); missing keys are absent."""
        wanted = list(dict.fromkeys(keys))
        fields = _entity(table).keys
        found: dict[str, SourceRecord] = {}
        for start in range(0, len(wanted), _FETCH_CHUNK):
            chunk = [parse_key(table, k) for k in wanted[start:start + _FETCH_CHUNK]]
            clauses = [" and ".join(f"{f} eq {filter_literal(k[f], f)}" for f in fields) for k in chunk]
            text = " or ".join(f"({c})" if len(fields) > 1 else c for c in clauses)
            async for page in self._pages(table, {"$filter": text}, f"fetch from {table}"):
                found.update((r.key, r) for r in page)
        return found

    # ------------------------------------------------------------------------------------ ChangeSource

    async def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        """Every record of a table, page by page."""
        async for page in self._pages(table, None, f"scan of {table}"):
            yield page

    def _change_filter(self, table: str, since: datetime) -> str:
        if _entity(table).changes == "order":
            return f"LastChangeDateTime ge {filter_literal(since, 'LastChangeDateTime')}"
        local = since.astimezone(self._tz)
        day = f"datetime'{local.date().isoformat()}T00:00:00'"
        clock = f"time'PT{local.hour:02d}H{local.minute:02d}M{local.second:02d}S'"
        parts = [f"{d} gt {day} or ({d} eq {day} and {t} ge {clock})"
                 for d, t in (("LastChangeDate", "LastChangeTime"), ("CreationDate", "CreationTime"))]
        return " or ".join(f"({p})" for p in parts)

    async def changes_since(self, table: str, checkpoint: str | None) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """Records changed since the checkpoint (see the module docstring), with the checkpoint after each page."""
        if _entity(table).changes is None:
            raise RejectedError(f"{SYSTEM}: {table} has no change timestamp; read its records through their parent "
                                "(A_SalesOrder / A_BusinessPartner) or scan it")
        previous = _Checkpoint.parse(checkpoint, table)
        params = {"$filter": self._change_filter(table, previous.at)} if previous.at is not None else {}
        newest = _Checkpoint(previous.at, set(previous.keys))
        pending: list[SourceRecord] | None = None
        async for page in self._pages(table, params, f"changes of {table}"):
            if pending is not None:
                yield pending, previous.text()
            kept: list[SourceRecord] = []
            for record in page:
                moment = record.modified
                if previous.at is not None and moment is not None and (
                        moment < previous.at or (moment == previous.at and record.key in previous.keys)):
                    continue
                kept.append(record)
                if moment is None:
                    continue
                if newest.at is None or moment > newest.at:
                    newest = _Checkpoint(moment, {record.key})
                elif moment == newest.at:
                    newest.keys.add(record.key)
            pending = kept
        yield pending or [], newest.text()

    async def fetch_attachment(self, table: str, key: str, attachment_id: str) -> bytes:
        """SAP attachments (API_CV_ATTACHMENT_SRV) are not synced by Syncline."""
        raise RejectedError(f"{SYSTEM}: attachments are not supported for {table} ({key}, {attachment_id})")

    # ------------------------------------------------------------------------------------ RecordSink

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

    async def _write_one(self, op: WriteOp) -> WriteResult:
        if op.table == "A_SalesOrder":
            return await self._write_order(op)
        if op.table == "A_BusinessPartner":
            return await self._write_partner(op)
        raise RejectedError(f"{SYSTEM}: writes go to A_SalesOrder (with to_Item) or A_BusinessPartner (with "
                            f"addresses and customer data), not {op.table}")

    async def _locate(self, op: WriteOp) -> dict[str, Any] | None:
        """The op's target as SAP sends it (nested values expanded), or None."""
        if op.key:
            return await self._get_row(op.table, parse_key(op.table, op.key), what=f"read {op.table} {op.key}",
                                       expand=_entity(op.table).expand)
        if not op.match:
            raise RejectedError(f"{SYSTEM}: op {op.op_id} on {op.table} has neither key nor match")
        found: list[dict[str, Any]] = []
        params = {"$filter": build_filter(op.match)}
        async for rows in self._raw_pages(op.table, params, f"find {op.table} by {', '.join(op.match)}"):
            found.extend(rows)
        if len(found) > 1:
            numbers = ", ".join(format_key(op.table, r) for r in found[:5])
            raise RejectedError(f"{SYSTEM}: match {op.match} finds {len(found)} {op.table} records ({numbers}); "
                                "make the match field unique in SAP or give the key")
        return found[0] if found else None

    async def _patch(self, table: str, key: Mapping[str, str], wanted: Mapping[str, Any], current: Mapping[str, Any],
                     *, what: str, service_root: str, reread: Callable[[], Awaitable[Mapping[str, Any] | None]],
                     skip: frozenset[str] | set[str] = frozenset()) -> bool:
        """PATCH the fields of `wanted` that differ, with If-Match; on 412 re-read, re-diff and retry once."""
        url = self.service_root(table) + key_path(table, key)
        skip = set(skip) | set(_entity(table).keys)
        for attempt in (1, 2):
            changes = _diff(current, wanted, skip)
            if not changes:
                return attempt > 1
            meta = current.get("__metadata")
            etag = meta.get("etag") if isinstance(meta, dict) else None
            response = await self._send("PATCH", url, what=what, body=wire_value("", changes),
                                        headers={"If-Match": str(etag or "*")}, write=True, service_root=service_root)
            if response.status_code == 412 and attempt == 1:
                log.info("%s %s: ETag is stale (changed in SAP meanwhile), re-reading and retrying once", SYSTEM, what)
                fresh = await reread()
                if fresh is None:
                    raise RejectedError(f"SAP rejected {what}: {table} {'|'.join(key.values())} was deleted in SAP "
                                        "while it was being updated")
                current = fresh
                continue
            if response.status_code == 412:
                raise TransientError(f"{SYSTEM} {what}: {table} {'|'.join(key.values())} changed in SAP again "
                                     "between read and update (HTTP 412 twice); retrying later")
            if not response.is_success:
                raise error_for(response, what, write=True)
            return True
        return True

    async def _create(self, op: WriteOp, body: Mapping[str, Any], what: str) -> WriteResult:
        url = self.service_root(op.table) + op.table
        try:
            response = await self._send("POST", url, what=what, body=body, write=True, create=True,
                                        service_root=self.service_root(op.table))
            if response.status_code == 504:
                raise error_for(response, what, write=True)
        except AmbiguousWriteError:
            if not op.match:
                raise
            found = await self._locate(WriteOp(op.op_id, op.action, op.table, match=op.match))
            if found is None:
                raise
            log.info("%s %s: the create's answer was lost but SAP has the record (%s)", SYSTEM, what,
                     format_key(op.table, found))
            return WriteResult(op.op_id, True, key=format_key(op.table, found), created=True)
        if not response.is_success:
            raise error_for(response, what, write=True)
        created = json_object(response, system=SYSTEM, what=what).get("d")
        if not isinstance(created, dict):
            raise AmbiguousWriteError(f"{SYSTEM} {what}: HTTP {response.status_code} without the created entity")
        return WriteResult(op.op_id, True, key=format_key(op.table, created), created=True)

    async def _delete(self, op: WriteOp, current: Mapping[str, Any] | None, what: str) -> WriteResult:
        if current is None:
            return WriteResult(op.op_id, True, key=op.key)
        key = format_key(op.table, current)
        meta = current.get("__metadata")
        etag = meta.get("etag") if isinstance(meta, dict) else None
        url = self.service_root(op.table) + key_path(op.table, parse_key(op.table, key))
        response = await self._send("DELETE", url, what=what, headers={"If-Match": str(etag or "*")}, write=True,
                                    service_root=self.service_root(op.table))
        if response.status_code not in (200, 204, 404):
            raise error_for(response, what, write=True)
        return WriteResult(op.op_id, True, key=key)

    # ------------------------------------------------------------------------------------ sales orders

    @staticmethod
    def _line_values(line: LineWrite, lines: Lines, header: Mapping[str, Any]) -> dict[str, Any]:
        values = {k: v for k, v in line.values.items() if k != "SalesOrder"}
        values.update(line.match)
        for line_field, header_field in lines.parent_fields.items():
            if header.get(header_field) not in (None, ""):
                values[line_field] = header[header_field]
        return values

    async def _write_order(self, op: WriteOp) -> WriteResult:
        what = f"A_SalesOrder create (op {op.op_id})"
        if op.lines is not None and op.lines.table != ITEMS:
            raise RejectedError(f"{SYSTEM}: order lines are written through the navigation property {ITEMS}, not "
                                f"{op.lines.table!r}; fix lines.target_table in the flow spec")
        current = await self._locate(op)
        if op.action == "delete":
            return await self._delete(op, current, f"A_SalesOrder delete (op {op.op_id})")
        header = {k: v for k, v in op.values.items() if k not in ("SalesOrder", ITEMS)}
        if current is None:
            if op.action == "update":
                raise RejectedError(f"SAP rejected A_SalesOrder update (op {op.op_id}): sales order "
                                    f"{op.key or op.match} does not exist (use 'upsert' to create it)")
            body: dict[str, Any] = {**header, **(op.match or {})}
            if op.lines is not None:
                items = []
                for n, line in enumerate(op.lines.items, start=1):
                    item = self._line_values(line, op.lines, body)
                    item.setdefault("SalesOrderItem", str(n * 10))
                    items.append(item)
                body[ITEMS] = {"results": items}
            return await self._create(op, wire_value("", body), what)
        key = parse_key("A_SalesOrder", format_key("A_SalesOrder", current))
        what = f"A_SalesOrder {key['SalesOrder']} update (op {op.op_id})"
        root = self.service_root("A_SalesOrder")

        async def reread() -> dict[str, Any] | None:
            return await self._get_row("A_SalesOrder", key, what=f"re-read for {what}", expand=ITEMS)

        await self._patch("A_SalesOrder", key, header, current, what=what, service_root=root, reread=reread)
        if op.lines is not None:
            await self._write_items(key["SalesOrder"], op.lines, {**_plain_row(current), **header}, current,
                                    what=what, reread=reread)
        return WriteResult(op.op_id, True, key=key["SalesOrder"])

    async def _write_items(self, number: str, lines: Lines, header: Mapping[str, Any], order: Mapping[str, Any], *,
                           what: str, reread: Callable[[], Awaitable[dict[str, Any] | None]]) -> None:
        items = _nav_rows(order.get(ITEMS))
        root = self.service_root("A_SalesOrder")
        next_number = max((int(str(i.get("SalesOrderItem") or 0)) for i in items
                           if str(i.get("SalesOrderItem") or "").isdigit()), default=0)
        for line in lines.items:
            if not line.match:
                raise RejectedError(f"{SYSTEM} {what}: line {line.source_key} has no match field, so it cannot be "
                                    "found again and would be added twice; set lines.link_field in the flow spec "
                                    f"(e.g. {ITEM_MATCH_FIELD})")
            wanted = self._line_values(line, lines, header)
            existing = _find_item(items, line.match)
            item_what = f"{what}, item for line {line.source_key}"
            if existing is None:
                next_number = (next_number // 10 + 1) * 10
                body = {**wanted, "SalesOrderItem": wanted.get("SalesOrderItem") or str(next_number)}
                await self._post_child("A_SalesOrder", {"SalesOrder": number}, ITEMS, body, what=item_what)
                continue
            item_key = {"SalesOrder": number, "SalesOrderItem": str(existing["SalesOrderItem"])}

            async def reread_item(match: Mapping[str, str] = line.match) -> dict[str, Any] | None:
                fresh = await reread()
                return _find_item(_nav_rows(fresh.get(ITEMS)), match) if fresh is not None else None

            await self._patch("A_SalesOrderItem", item_key, {k: v for k, v in wanted.items() if k != "SalesOrderItem"},
                              existing, what=item_what, service_root=root, reread=reread_item)

    # ------------------------------------------------------------------------------------ business partners

    async def _write_partner(self, op: WriteOp) -> WriteResult:
        what = f"A_BusinessPartner create (op {op.op_id})"
        if op.action == "delete":
            raise RejectedError(f"{SYSTEM}: business partners cannot be deleted through API_BUSINESS_PARTNER "
                                f"(op {op.op_id}); block it (BusinessPartnerIsBlocked) or mark it for archiving "
                                "(IsMarkedForArchiving) instead")
        current = await self._locate(op)
        values = dict(op.values)
        addresses = [dict(a) for a in _as_list(values.pop(ADDRESSES, None), ADDRESSES)]
        roles = [r if isinstance(r, dict) else {"BusinessPartnerRole": str(r)}
                 for r in _as_list(values.pop(ROLES, None), ROLES, allow_scalars=True)]
        customer_raw = values.pop(CUSTOMER, None)
        if customer_raw is not None and not isinstance(customer_raw, Mapping):
            raise MappingError(f"{SYSTEM}: {CUSTOMER} must be a dict of A_Customer fields (op {op.op_id})")
        customer = dict(customer_raw) if customer_raw is not None else None
        areas = [dict(a) for a in _as_list(customer.pop(SALES_AREAS, None), SALES_AREAS)] if customer else []
        values.pop("BusinessPartner", None)
        if current is None:
            if op.action == "update":
                raise RejectedError(f"SAP rejected A_BusinessPartner update (op {op.op_id}): business partner "
                                    f"{op.key or op.match} does not exist (use 'upsert' to create it)")
            body: dict[str, Any] = {**values, **(op.match or {})}
            if addresses:
                body[ADDRESSES] = {"results": addresses}
            if customer is not None and not roles:
                roles = [{"BusinessPartnerRole": CUSTOMER_ROLE}]
            if roles:
                body[ROLES] = {"results": roles}
            if customer is not None:
                body[CUSTOMER] = {**customer, **({SALES_AREAS: {"results": areas}} if areas else {})}
            return await self._create(op, wire_value("", body), what)
        number = str(current["BusinessPartner"])
        what = f"A_BusinessPartner {number} update (op {op.op_id})"
        root = self.service_root("A_BusinessPartner")
        key = {"BusinessPartner": number}
        expand = _entity("A_BusinessPartner").expand

        async def reread() -> dict[str, Any] | None:
            return await self._get_row("A_BusinessPartner", key, what=f"re-read for {what}", expand=expand)

        await self._patch("A_BusinessPartner", key, values, current, what=what, service_root=root, reread=reread)
        await self._write_addresses(number, addresses, _nav_rows(current.get(ADDRESSES)), what=what)
        current_roles = {str(r.get("BusinessPartnerRole")) for r in _nav_rows(current.get(ROLES))}
        if customer is not None and not current.get(CUSTOMER) and not roles and \
                not current_roles & {"FLCU00", CUSTOMER_ROLE}:
            roles = [{"BusinessPartnerRole": CUSTOMER_ROLE}]
        for role in roles:
            if str(role.get("BusinessPartnerRole")) in current_roles:
                continue
            await self._post_child("A_BusinessPartner", key, ROLES, role, what=f"{what}, role "
                                   f"{role.get('BusinessPartnerRole')}")
        if customer is not None:
            await self._write_customer(number, customer, areas, current, what=what, reread=reread)
        return WriteResult(op.op_id, True, key=number)

    async def _post_child(self, table: str, key: Mapping[str, str], nav: str, values: Mapping[str, Any], *,
                          what: str) -> None:
        root = self.service_root(table)
        url = f"{root}{key_path(table, key)}/{nav}"
        response = await self._send("POST", url, what=what, body=wire_value("", dict(values)), write=True,
                                    create=True, service_root=root)
        if not response.is_success:
            raise error_for(response, what, write=True)

    async def _write_addresses(self, number: str, wanted: list[dict[str, Any]], current: list[dict[str, Any]], *,
                               what: str) -> None:
        root = self.service_root("A_BusinessPartner")
        ordered = sorted(current, key=lambda a: str(a.get("AddressID") or ""))
        for index, address in enumerate(wanted):
            address_id = address.get("AddressID")
            target = next((a for a in ordered if str(a.get("AddressID")) == str(address_id)), None) if address_id \
                else (ordered[index] if index < len(ordered) else None)
            if target is None:
                await self._post_child("A_BusinessPartner", {"BusinessPartner": number}, ADDRESSES,
                                       {k: v for k, v in address.items() if k not in ("AddressID", "BusinessPartner")},
                                       what=f"{what}, new address")
                continue
            address_key = {"BusinessPartner": number, "AddressID": str(target["AddressID"])}

            async def no_reread() -> None:
                return None

            await self._patch("A_BusinessPartnerAddress", address_key, address, target, service_root=root,
                              what=f"{what}, address {target['AddressID']}", reread=no_reread)

    async def _write_customer(self, number: str, customer: Mapping[str, Any], areas: list[dict[str, Any]],
                              current: Mapping[str, Any], *, what: str,
                              reread: Callable[[], Awaitable[dict[str, Any] | None]]) -> None:
        root = self.service_root("A_BusinessPartner")
        existing = current.get(CUSTOMER)
        if not isinstance(existing, dict):
            # The customer role was added just now: SAP created the customer, read it back.
            fresh = await reread()
            existing = fresh.get(CUSTOMER) if fresh is not None else None
            if not isinstance(existing, dict):
                raise RejectedError(f"SAP rejected {what}: business partner {number} has no customer data after "
                                    f"adding role {CUSTOMER_ROLE}; check the partner's roles in SAP")
        customer_key = {"Customer": str(existing.get("Customer") or number)}

        async def no_reread() -> None:
            return None

        await self._patch("A_Customer", customer_key, customer, existing, what=f"{what}, customer data",
                          service_root=root, reread=no_reread)
        current_areas = _nav_rows(existing.get(SALES_AREAS))
        for area in areas:
            area_id = {f: str(area.get(f) or "") for f in ("SalesOrganization", "DistributionChannel", "Division")}
            target = next((a for a in current_areas if all(str(a.get(f)) == v for f, v in area_id.items())), None)
            label = "/".join(area_id.values())
            if target is None:
                await self._post_child("A_Customer", customer_key, SALES_AREAS, area,
                                       what=f"{what}, sales area {label}")
                continue
            await self._patch("A_CustomerSalesArea", {**customer_key, **area_id}, area, target, service_root=root,
                              what=f"{what}, sales area {label}", reread=no_reread)


# ============================================================================================ helpers


def _nav_rows(value: Any) -> list[dict[str, Any]]:
    """Rows of an expanded to-many navigation (`{"results": [...]}` or a list)."""
    if isinstance(value, dict):
        value = value.get("results")
    return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []


def _find_item(items: list[dict[str, Any]], match: Mapping[str, str]) -> dict[str, Any] | None:
    if not match:
        return None
    for item in items:
        if all(str(item.get(f) or "") == str(v) for f, v in match.items()):
            return item
    return None


def _as_list(value: Any, name: str, *, allow_scalars: bool = False) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        if "results" in value:
            value = value["results"]
        else:
            return [value]
    if not isinstance(value, list | tuple):
        raise MappingError(f"{SYSTEM}: {name} must be a list of dicts (or one dict), got {type(value).__name__}")
    for item in value:
        if not isinstance(item, Mapping) and not (allow_scalars and isinstance(item, str)):
            raise MappingError(f"{SYSTEM}: every entry of {name} must be a dict of SAP fields, got {item!r}")
    return list(value)

