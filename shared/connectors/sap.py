"""SAP S/4HANA OData v2 connector (business partners, sales orders, product read model): RecordSink + ChangeSource.

Addressing
    Tables are entity sets; the service is chosen per set (`ENTITY_SETS`): `A_BusinessPartner` (with its
    addresses, their phone numbers and e-mail addresses, roles and customer / sales-area data) in
    API_BUSINESS_PARTNER, `A_SalesOrder` (with `to_Item`) and `A_SalesOrderItem` in API_SALES_ORDER_SRV,
    `A_Product` in API_PRODUCT_SRV, the PR00 condition records in API_SLSPRICINGCONDITIONRECORD_SRV, all under
    `{base_url}/sap/opu/odata/sap/<service>/`; plus the composed `ProductAvailability` (below). Keys are SAP's
    numbers as strings (`17100001`, `4000043`); composite keys join their parts with `|` (`A_SalesOrderItem`
    `4000043|10`). `sap_client` adds `sap-client=<n>` to every request (on-premise).

Auth and sessions
    `BasicAuth` (communication user) or `OAuthClientCredentials` (token URL, client id / secret; one refresh and
    replay on 401). Before the first write (or $batch) a GET of the service root with `x-csrf-token: Fetch`
    returns the CSRF token and session cookies; both go on every modifying request and every $batch. A 403
    answered `x-csrf-token: Required` (expired session or token) fetches a new token once and replays; a second
    one is an AuthError.

Reads
    `Accept: application/json`, collections `{"d": {"results", "__next"}}`: `$top`/`$skip` windows of
    `page_size`, inside which server paging (`__next`, rebased onto our host so credentials never leave it) is
    followed. `$filter` literals are escaped (strings with `''` doubling, `datetime'...'`, `datetimeoffset'...'`
    for Edm.DateTimeOffset fields, `time'PT..'`, decimals `1.5M`); OData v2 has no `in`, so a list in `equals`
    becomes an `or` chain and `not_in` an `and` chain of `ne`.
    Values are converted so that a value written and read back compares equal: `\\/Date(ms)\\/` -> ISO-8601
    (`2026-01-05` for a date at midnight, `2026-01-05T14:30:05Z` otherwise), Edm.Time `PT14H30M05S` ->
    `14:30:05`, Edm.Decimal text (`DECIMAL_FIELDS`) -> float (`"4.000"` -> 4.0); `__metadata` and unexpanded
    navigation are dropped; `version` is `__metadata.etag`.

Nested values and dotted paths (reads and writes use the same names)
    Nested: A_BusinessPartner `to_BusinessPartnerAddress` = list of address dicts (each with `to_PhoneNumber`
    / `to_EmailAddress` lists of A_AddressPhoneNumber / A_AddressEmailAddress dicts), `to_BusinessPartnerRole`
    = list of role dicts (or role codes such as "FLCU01" on writes), `to_Customer` = a dict of A_Customer
    fields with `to_CustomerSalesArea` = list of sales-area dicts. A_SalesOrder: `to_Item` = list of item dicts.
    Dotted: a flat key `to_X.to_Y.Field` addresses Field of the FIRST entry of each collection on the way
    (`to_Customer` is a single entity): `to_BusinessPartnerAddress.CityName`,
    `to_BusinessPartnerAddress.to_PhoneNumber.PhoneNumber`, `to_Customer.OrderIsBlockedForCustomer`,
    `to_Customer.to_CustomerSalesArea.CustomerPaymentTerms`. Reads of A_BusinessPartner (scan, fetch, select,
    changes_since) expand every navigation and add the dotted names of the first entries next to the nested
    values. Writes turn dotted keys into the nested form (`nest_dotted`): on create the entries are made in
    the deep insert (an entry whose values are all empty is not created); on update the first existing entry
    is PATCHed, or created when there is none. A sales area given with organisation, channel and division is
    the one with that key; one without them (a dotted path) is the first.

Writes
    Every number is sent as a string (Edm.Decimal travels as text in OData v2 JSON); ISO dates of Edm.DateTime
    fields (`DATE_FIELDS`, e.g. RequestedDeliveryDate "2026-12-15") as `\\/Date(ms)\\/`. SAP has no upsert, so an
    op is located first (by key, else by its `match` fields) and planned from what SAP holds:
    - A_SalesOrder create: ONE deep-insert POST with `to_Item: {"results": [...]}` (item numbers 10, 20, ...
      unless given; each item carries its `LineWrite.match` field). Update: header PATCH with
      `If-Match: <etag>` when a field differs, then each line found by its match field is PATCHed when
      different, or POSTed to `A_SalesOrder('<n>')/to_Item`. The item match field is whatever the flow's
      `link_field` names; `ITEM_MATCH_FIELD` (`PurchaseOrderByCustomer`, a writable CHAR 35 of
      A_SalesOrderItem) is the recommended one: `ExternalItemID` is read-only and `UnderlyingPurchaseOrderItem`
      is only 6 characters, too short for source line ids.
    - A_BusinessPartner create: one deep-insert POST with addresses (and their phone numbers / e-mail
      addresses), roles and customer data (role FLCU01 is added when `to_Customer` is given without roles).
      Update: only the entities with a differing field are PATCHed (each with its ETag as If-Match): header,
      addresses paired by `AddressID` (else by position), phone numbers / e-mail addresses by position,
      customer, sales areas; missing entries are POSTed to their parent's navigation, missing roles too
      (FLCU01 creates the customer, whose data follows after a re-read). `PARTNER_MATCH_FIELD`
      (`BusinessPartnerIDByExtSystem`, CHAR 20) is the recommended match field. Partners cannot be deleted.
    - delete: A_SalesOrder DELETE with If-Match (404 = already gone).
    A 412 (changed in SAP since it was read) re-reads, re-plans and retries once. The match values are written
    into the created record, so a replay finds it and creates nothing. A create whose answer is lost (read
    timeout, dropped connection) is re-located by its match before it is reported as AmbiguousWriteError.

$batch (`batch_size`, default 100)
    When one `write()` call has two or more ops for the same service and `batch_size` > 1: the targets are
    looked up with one `$filter` per 40 ops (`PurchaseOrderByCustomer eq 'a' or ...`), sent as retrieve parts
    of one `POST <service>/$batch` when there are several such queries; then every op's requests form ONE
    changeset (an order create is its single deep insert; a partner update its PATCHes and POSTs, atomic in
    SAP), `batch_size` changesets per $batch call, the calls `max_concurrency` at a time. A failed changeset
    fails only its op, with the Gateway message of the failing request; a changeset answered 412 and a plan
    that needs SAP's reaction first (a new customer role) run again on their own, request by request. A $batch
    whose answer is lost re-locates its creates by match (found = created; the rest AmbiguousWriteError).
    10,000 new orders written 100 per `write()` take 100 look-up $batch calls (3 queries each) and 100 write
    $batch calls (plus one CSRF fetch).
    `batch_size=1` sends every request on its own: per op one look-up GET and one deep-insert POST.

ProductAvailability (read model, table `PRODUCT_AVAILABILITY`, key `Product`)
    Fields: Product, ProductDescription (language `product_language`, EN), BaseUnit, NetPrice (float, PR00
    rate per condition quantity valid today in `price_sales_organization` / `price_distribution_channel`, None
    without a price), Currency (the condition currency), AvailableQuantity (float, sum over
    `availability_plants`, default "1710" alone, of the plants the product is maintained in; 0.0 in none).
    Calls per read (scan, fetch, changes_since): ceil(P / page_size) A_Product pages (`$expand=to_Description,
    to_Plant`), ceil(V / page_size) pages of PR00 validities (`A_SlsPrcgCndnRecdValidity` filtered by condition
    type, sales area and today, `$expand=to_SlsPrcgConditionRecord`), and one `DetermineAvailabilityAt`
    (API_PRODUCT_AVAILY_INFO_BASIC, SupplyingPlant / Material / ATPCheckingRule / RequestedUTCDateTime) per
    product and plant, sent as retrieve parts of ceil(P x plants / batch_size) $batch calls (alone with
    `batch_size=1`). fetch reads 40 products per round. A product SAP refuses availability for is left out.

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
    Deletions are not visible. ProductAvailability has no change time at all: every poll reads it whole and
    reports the products whose content hash differs from the checkpoint's (and the ones gone); see
    `_HashCheckpoint` for its size bound. SAP event-mesh CloudEvents are parsed by `parse_event`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import logging
import math
import re
import ssl
import time as _time
import uuid
import zlib
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
from shared.core.dates import from_epoch_ms, iso_z, parse_duration_time, parse_iso, to_epoch_ms, utc
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
from shared.core.ports import Lines, LineWrite, SourceRecord, WriteOp, WriteResult, join_key, split_key
from shared.payloads import SapCloudEvent, bad_values, read_json, validate

log = logging.getLogger(__name__)

SYSTEM = "sap"
SERVICE_PATH = "/sap/opu/odata/sap/"
BP_SERVICE = "API_BUSINESS_PARTNER"
SO_SERVICE = "API_SALES_ORDER_SRV"
PRODUCT_SERVICE = "API_PRODUCT_SRV"
PRICING_SERVICE = "API_SLSPRICINGCONDITIONRECORD_SRV"
AVAILABILITY_SERVICE = "API_PRODUCT_AVAILY_INFO_BASIC"
"""Technical name of API_PRODUCT_AVAILABILITY_INFO_BASIC (SAP cuts service names to 30 characters)."""
AVAILABILITY_FUNCTION = "DetermineAvailabilityAt"
PRODUCT_AVAILABILITY = "ProductAvailability"
"""The composed product read model (see the module docstring); not an SAP entity set."""
ITEM_MATCH_FIELD = "PurchaseOrderByCustomer"
"""Recommended A_SalesOrderItem field for `LineWrite.match` (writable, CHAR 35)."""
PARTNER_MATCH_FIELD = "BusinessPartnerIDByExtSystem"
"""Recommended A_BusinessPartner field for `WriteOp.match` (writable, CHAR 20)."""
ADDRESSES = "to_BusinessPartnerAddress"
ROLES = "to_BusinessPartnerRole"
CUSTOMER = "to_Customer"
SALES_AREAS = "to_CustomerSalesArea"
ITEMS = "to_Item"
PHONES = "to_PhoneNumber"
EMAILS = "to_EmailAddress"
COMMUNICATION = {PHONES: "A_AddressPhoneNumber", EMAILS: "A_AddressEmailAddress"}
"""Address navigation -> entity set of the address's phone numbers and e-mail addresses."""
TO_ONE_NAVS = frozenset({CUSTOMER, "to_Supplier", "to_SlsPrcgConditionRecord"})
"""Navigation properties to one entity; every other `to_*` is a collection (a dotted path takes its first entry)."""
AREA_KEYS = ("SalesOrganization", "DistributionChannel", "Division")
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
    changes: Literal["order", "partner", "hash"] | None = None
    flatten: bool = False
    """Reads add dotted names for the first entry of every expanded navigation."""
    blank_keys: tuple[str, ...] = ()
    """Key fields that may be empty (the `Person` of an organization's address communication)."""


_PARTNER_EXPAND = ",".join((ADDRESSES, f"{ADDRESSES}/{PHONES}", f"{ADDRESSES}/{EMAILS}", ROLES,
                            f"{CUSTOMER}/{SALES_AREAS}"))
_COMM_KEYS = ("AddressID", "Person", "OrdinalNumber")
ENTITY_SETS: dict[str, EntitySet] = {
    "A_BusinessPartner": EntitySet(BP_SERVICE, ("BusinessPartner",), _PARTNER_EXPAND, "partner", flatten=True),
    "A_SalesOrder": EntitySet(SO_SERVICE, ("SalesOrder",), ITEMS, "order"),
    "A_SalesOrderItem": EntitySet(SO_SERVICE, ("SalesOrder", "SalesOrderItem")),
    "A_BusinessPartnerAddress": EntitySet(BP_SERVICE, ("BusinessPartner", "AddressID"), f"{PHONES},{EMAILS}",
                                          flatten=True),
    "A_AddressPhoneNumber": EntitySet(BP_SERVICE, _COMM_KEYS, blank_keys=("Person",)),
    "A_AddressEmailAddress": EntitySet(BP_SERVICE, _COMM_KEYS, blank_keys=("Person",)),
    "A_Customer": EntitySet(BP_SERVICE, ("Customer",), SALES_AREAS, flatten=True),
    "A_CustomerSalesArea": EntitySet(BP_SERVICE, ("Customer", *AREA_KEYS)),
    "A_Product": EntitySet(PRODUCT_SERVICE, ("Product",), "to_Description,to_Plant"),
    "A_SlsPrcgConditionRecord": EntitySet(PRICING_SERVICE, ("ConditionRecord",), "to_SlsPrcgCndnRecdValidity"),
    "A_SlsPrcgCndnRecdValidity": EntitySet(PRICING_SERVICE, ("ConditionRecord", "ConditionValidityEndDate"),
                                           "to_SlsPrcgConditionRecord"),
    PRODUCT_AVAILABILITY: EntitySet(PRODUCT_SERVICE, ("Product",), changes="hash"),
}
WRITABLE = frozenset({"A_SalesOrder", "A_BusinessPartner"})

DATETIMEOFFSET_FIELDS = frozenset({"LastChangeDateTime", "ExternalDocLastChangeDateTime", "ValidFrom", "ValidTo"})
"""Edm.DateTimeOffset fields: filtered with `datetimeoffset'...'`, written as `/Date(ms+0000)/`."""
DATE_FIELDS = frozenset({
    "CustomerPurchaseOrderDate", "SalesOrderDate", "RequestedDeliveryDate", "PricingDate", "BillingDocumentDate",
    "ServicesRenderedDate", "FixedValueDate", "ValidityStartDate", "ValidityEndDate", "BirthDate", "CreationDate",
    "LastChangeDate", "OrganizationFoundationDate", "OrganizationLiquidationDate", "ConditionValidityStartDate",
    "ConditionValidityEndDate"})
"""Edm.DateTime fields: an ISO date string written to one is sent as `/Date(ms)/`."""
DECIMAL_FIELDS = frozenset({
    "RequestedQuantity", "NetAmount", "TotalNetAmount", "ItemGrossWeight", "ItemNetWeight", "ItemVolume",
    "TaxAmount", "CostAmount", "ConfdDelivQtyInOrderQtyUnit", "PriceDetnExchangeRate", "AccountingExchangeRate",
    "ConditionRateValue", "ConditionQuantity", "AvailableQuantityInBaseUnit", "GrossWeight", "NetWeight"})
"""Edm.Decimal fields: compared numerically ("2" equals SAP's "2.000") and read as floats."""

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Bounded digits: int() of a 5,000-digit text raises (Python's int/str conversion limit).
_DATE_RE = re.compile(r"^/Date\((?P<ms>-?\d{1,30})(?P<off>[+-]\d{4})?\)/$")
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
    definition = _entity(table)
    for name in definition.keys:
        value = values.get(name)
        if (value is None or value == "") and name not in definition.blank_keys:
            raise RejectedError(f"{SYSTEM}: {table} key field {name!r} is missing")
        parts.append("" if value is None else str(value))
    return join_key(parts)


def parse_key(table: str, key: str) -> dict[str, str]:
    """Inverse of `format_key`."""
    definition = _entity(table)
    fields = definition.keys
    try:
        parts = split_key(key)
    except ValueError:
        raise RejectedError(f"{SYSTEM}: {table} key {key!r} must give {'|'.join(fields)}") from None
    if len(parts) != len(fields) or any(p == "" and f not in definition.blank_keys
                                        for p, f in zip(parts, fields, strict=False)):
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
    moment = utc(value)
    if moment is None:
        raise MappingError(f"{SYSTEM}: {value!r} is out of range once in UTC (years 1-9999)")
    return moment


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
            return f"datetimeoffset'{iso_z(moment, millis=True)}'"
        return f"datetime'{iso_z(moment)[:-1]}'"
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
    """`/Date(ms)/`, `/Date(ms+0000)/` or ISO-8601 text as an aware UTC datetime; None if not one in range."""
    if not isinstance(value, str) or not value:
        return None
    m = _DATE_RE.match(value)
    if m:
        return from_epoch_ms(int(m.group("ms")))
    return parse_iso(value)


def _parse_sap_time(value: Any) -> time | None:
    """`PT12H30M00S` (Edm.Time) or `12:30:00`; None if not a time of day (`PT25H`, `PT99M`)."""
    return parse_duration_time(value)


def plain_value(value: Any) -> Any:
    """A value as read from SAP, in the connector's representation (dates ISO, navigation as lists/dicts)."""
    if isinstance(value, str):
        m = _DATE_RE.match(value)
        if m:
            moment = from_epoch_ms(int(m.group("ms")))
            if moment is None:
                # Out of any datetime's range: the row keeps the raw value (and the rest of its page reads on);
                # a flow that maps the field fails this record alone.
                return value
            if m.group("off") is None and moment.time() == time(0):
                return moment.date().isoformat()
            return iso_z(moment, millis=bool(moment.microsecond))
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
        if name in DECIMAL_FIELDS and isinstance(value, str) and value:
            # OData v2 carries Edm.Decimal as text; the engine compares numbers ("4.000" is the 4.0 written).
            try:
                out[name] = float(Decimal(value))
                continue
            except InvalidOperation:
                pass
        out[name] = plain_value(value)
    return out


def flatten_nested(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted names for the fields of the first entry of every navigation in `values`, recursively.

    `{"to_BusinessPartnerAddress": [{"CityName": "Denver", "to_PhoneNumber": [{"PhoneNumber": "+1 .."}]}]}`
    gives `to_BusinessPartnerAddress.CityName` and `to_BusinessPartnerAddress.to_PhoneNumber.PhoneNumber`.
    """
    out: dict[str, Any] = {}
    for name, value in values.items():
        if not name.startswith("to_"):
            continue
        entry = value[0] if isinstance(value, list) and value else value
        if not isinstance(entry, Mapping):
            continue
        path = f"{prefix}{name}."
        out.update((path + k, v) for k, v in entry.items()
                   if not k.startswith("to_") and not isinstance(v, dict | list))
        out.update(flatten_nested(entry, path))
    return out


def nest_dotted(values: Mapping[str, Any]) -> dict[str, Any]:
    """The write form of dotted names: `to_X.to_Y.Field` becomes `{"to_X": [{"to_Y": [{"Field": v}]}]}`.

    A collection navigation gets (or keeps) one entry, its first; a to-one navigation (`TO_ONE_NAVS`) a dict.
    Nested values given as such are kept and merged with the dotted ones (which win). `values` is not changed.
    """
    out = copy.deepcopy({k: v for k, v in values.items() if "." not in k})
    for name, value in values.items():
        if "." not in name:
            continue
        *path, leaf = name.split(".")
        node = out
        for segment in path:
            if not segment.startswith("to_") or not _IDENT_RE.match(segment):
                raise MappingError(f"{SYSTEM}: {name!r}: {segment!r} is not a navigation property (dotted paths go "
                                   "through to_* navigations, e.g. to_BusinessPartnerAddress.CityName)")
            existing = node.get(segment)
            if segment in TO_ONE_NAVS:
                if existing is not None and not isinstance(existing, Mapping):
                    raise MappingError(f"{SYSTEM}: {name!r}: {segment} must be a dict of fields")
                child = dict(existing or {})
                node[segment] = child
            else:
                entries = list(_as_list(existing, segment))
                if not entries:
                    entries = [{}]
                if not isinstance(entries[0], Mapping):
                    raise MappingError(f"{SYSTEM}: {name!r}: the first entry of {segment} is not a dict of fields")
                child = dict(entries[0])
                entries[0] = child
                node[segment] = entries
            node = child
        node[_ident(leaf, "field")] = value
    return out


def _blank(value: Any) -> bool:
    """No content: None, "", or only such values (an empty phone entry is not created)."""
    if isinstance(value, Mapping):
        return all(_blank(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_blank(v) for v in value)
    return value is None or (isinstance(value, str) and not value.strip())


def _ms(moment: datetime) -> int:
    return to_epoch_ms(_utc(moment))


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
            and value.strip() and not _DATE_RE.match(value):
        moment = _parse_sap_datetime(value if "T" in value else value + "T00:00:00Z")
        if moment is None:
            raise MappingError(f"{SYSTEM}: {name} = {value!r} is not a date in range (ISO-8601, years 1-9999)")
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
            return _parse_sap_datetime(value) or value
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
    data = read_json(body, f"{SYSTEM} event: body") if isinstance(body, bytes | str) else body
    if not isinstance(data, Mapping):
        raise EnvelopeError(f"{SYSTEM} event: expected a JSON object, got {type(data).__name__}")
    validate(SapCloudEvent, data, f"{SYSTEM} event")
    with bad_values(f"{SYSTEM} event"):
        return _checked_event(dict(data))


def _checked_event(data: dict[str, Any]) -> SapEvent:
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
    raw_time = data.get("time")
    when = _parse_sap_datetime(raw_time)
    if when is None and raw_time not in (None, ""):
        raise EnvelopeError(f"{SYSTEM} event {event_type}: time {str(raw_time)[:40]!r} is not a date/time in range "
                            "(years 1-9999)")
    return SapEvent(event_type, event_id, str(data.get("source") or ""), when, entity_set, key, operation,
                    dict(payload))


# ============================================================================================ $batch


@dataclass
class _Req:
    """One request of a write plan; `path` is relative to the service root."""

    method: str
    path: str
    what: str
    body: dict[str, Any] | None = None
    etag: str | None = None
    """If-Match value (None: no precondition)."""


@dataclass
class _Plan:
    """The requests that bring one op's target to the wanted state, computed from its current state."""

    table: str
    what: str
    key: str | None
    requests: list[_Req] = field(default_factory=list)
    create: bool = False
    delete: bool = False
    incomplete: bool = False
    """More changes follow once SAP has reacted to these (a new customer role creates the customer): re-read."""


@dataclass
class _Part:
    """One answer inside a $batch response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def response(self) -> httpx.Response:
        return httpx.Response(self.status, headers=self.headers, content=self.body)

    def json(self, what: str) -> dict[str, Any]:
        return json_object(self.response(), system=SYSTEM, what=what)


@dataclass
class _Answer:
    """The answer to one batch item: a retrieve, or a changeset (committed: one part per request)."""

    ok: bool
    parts: list[_Part]


def _query(params: Mapping[str, str]) -> str:
    # OData expects %20, not the form encoding's "+", between the words of $filter.
    return urlencode(params, quote_via=quote, safe="$',()/:*")


def _encode_request(req: _Req, content_id: str | None = None) -> bytes:
    mime = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        mime.append(f"Content-ID: {content_id}")
    body = json.dumps(req.body).encode() if req.body is not None else b""
    lines = [f"{req.method} {req.path} HTTP/1.1", "Accept: application/json"]
    if req.etag is not None:
        lines.append(f"If-Match: {req.etag}")
    if req.body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(mime) + "\r\n\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode() + body


def encode_batch(items: Sequence[_Req | Sequence[_Req]], boundary: str) -> bytes:
    """A multipart/mixed $batch body: a `_Req` is a retrieve part, a sequence of them one changeset."""
    out: list[bytes] = []
    for number, item in enumerate(items, start=1):
        out.append(f"--{boundary}\r\n".encode())
        if isinstance(item, _Req):
            out.append(_encode_request(item) + b"\r\n")
            continue
        changeset = f"changeset_{boundary[6:]}_{number}"
        out.append(f"Content-Type: multipart/mixed; boundary={changeset}\r\n\r\n".encode())
        for position, req in enumerate(item, start=1):
            out.append(f"--{changeset}\r\n".encode() + _encode_request(req, str(position)) + b"\r\n")
        out.append(f"--{changeset}--\r\n".encode())
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def _boundary(content_type: str) -> str | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    return m.group(1).strip() if m else None


def _multipart(body: bytes, boundary: str) -> list[bytes]:
    parts: list[bytes] = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk[1:] if chunk.startswith(b"\n") else chunk
        chunk = chunk[:-2] if chunk.endswith(b"\r\n") else chunk[:-1] if chunk.endswith(b"\n") else chunk
        parts.append(chunk)
    return parts


def _head(blob: bytes) -> tuple[dict[str, str], bytes]:
    cuts = [(at, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (at := blob.find(sep)) >= 0]
    head, rest = (blob[:min(cuts)[0]], blob[min(cuts)[0] + min(cuts)[1]:]) if cuts else (blob, b"")
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers, rest


def _decode_part(blob: bytes) -> _Part:
    """An application/http part: MIME headers, status line, headers, body."""
    _, rest = _head(blob)
    line, _, tail = rest.partition(b"\n")
    fields = line.decode("utf-8", "replace").split()
    try:
        status = int(fields[1])
    except (IndexError, ValueError):
        raise TransientError(f"{SYSTEM}: malformed $batch answer part {line[:80]!r}") from None
    headers, body = _head(tail) if tail.strip() else ({}, b"")
    return _Part(status, headers, body)


def decode_batch(response: httpx.Response, items: Sequence[_Req | Sequence[_Req]], what: str) -> list[_Answer]:
    """One answer per item of the request, in order (a failed changeset is answered by its one error part)."""
    boundary = _boundary(response.headers.get("content-type", ""))
    if boundary is None:
        raise TransientError(f"{SYSTEM} {what}: $batch answer is not multipart/mixed "
                             f"({response.headers.get('content-type')!r})")
    answers: list[_Answer] = []
    for blob in _multipart(response.content, boundary):
        headers, body = _head(blob)
        inner = _boundary(headers.get("content-type", "")) \
            if headers.get("content-type", "").lower().startswith("multipart/mixed") else None
        if inner is not None:
            answers.append(_Answer(True, [_decode_part(p) for p in _multipart(body, inner)]))
        else:
            part = _decode_part(blob)
            answers.append(_Answer(part.status < 400, [part]))
    if len(answers) != len(items):
        raise TransientError(f"{SYSTEM} {what}: $batch answered {len(answers)} parts for {len(items)} requests")
    return answers


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
        stamp = iso_z(self.at, millis=True)  # four-digit years: a year-500 stamp must parse back
        return stamp + (";" + ",".join(sorted(self.keys)) if self.keys else "")


_HASH_TEXT_LIMIT = 30_000
"""Longest exact content-hash checkpoint (an Azure Table string property holds 32K UTF-16 units)."""
_HASH_BUCKETS = 2048


def _bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % _HASH_BUCKETS


@dataclass
class _HashCheckpoint:
    """Content hashes of a table without change timestamps: `v1:` + base64 of zlib'd JSON.

    Exact (`hashes`: key -> hash) while that fits `_HASH_TEXT_LIMIT` (about 2,500 records); beyond that
    `buckets` holds one digest per hash bucket of keys, and every record of a bucket that changed is
    reported (the engine drops those whose mapped values did not change as echoes).
    """

    generation: int
    hashes: dict[str, str] = field(default_factory=dict)
    buckets: list[str] | None = None

    @classmethod
    def parse(cls, text: str | None, table: str) -> _HashCheckpoint:
        if not text:
            return cls(0)
        try:
            if not text.startswith("v1:"):
                raise ValueError("unknown version")
            data = json.loads(zlib.decompress(base64.b64decode(text[3:])))
            buckets = data.get("b")
            return cls(int(data["g"]), {str(k): str(v) for k, v in dict(data.get("h") or {}).items()},
                       [str(b) for b in buckets] if isinstance(buckets, list) else None)
        except (ValueError, KeyError, TypeError, AttributeError, zlib.error) as exc:
            raise EnvelopeError(f"{SYSTEM}: checkpoint for {table} is not a content-hash checkpoint ({exc})") from exc

    @classmethod
    def of(cls, generation: int, hashes: Mapping[str, str]) -> _HashCheckpoint:
        exact = cls(generation, dict(hashes))
        if len(exact.text()) <= _HASH_TEXT_LIMIT:
            return exact
        members: list[list[str]] = [[] for _ in range(_HASH_BUCKETS)]
        for key in sorted(hashes):
            members[_bucket(key)].append(f"{key}={hashes[key]}")
        return cls(generation, {}, [hashlib.sha256("\n".join(m).encode()).hexdigest()[:12] for m in members])

    def changed(self, hashes: Mapping[str, str], now: _HashCheckpoint) -> tuple[list[str], list[str]]:
        """(changed or new keys, keys gone) from this checkpoint to `hashes` (whose checkpoint is `now`)."""
        if self.buckets is None:
            return ([k for k, h in hashes.items() if self.hashes.get(k) != h],
                    [k for k in self.hashes if k not in hashes])
        if now.buckets is None:
            now = _HashCheckpoint(now.generation, {}, _HashCheckpoint.of(now.generation, hashes).buckets)
        moved = {n for n, (a, b) in enumerate(zip(self.buckets, now.buckets or [], strict=False)) if a != b}
        # A bucket digest cannot say which key left it: deletions go unreported in this mode.
        return [k for k in hashes if _bucket(k) in moved], []

    def text(self) -> str:
        data: dict[str, Any] = {"g": self.generation}
        if self.buckets is not None:
            data["b"] = self.buckets
        else:
            data["h"] = dict(sorted(self.hashes.items()))
        return "v1:" + base64.b64encode(zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 9)).decode()


class _StaleError(Exception):
    """A request of a plan was answered 412: the target changed since it was read."""


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
        batch_size: int = 100,
        availability_plants: str | Sequence[str] = "1710",
        price_sales_organization: str = "1710",
        price_distribution_channel: str = "10",
        atp_checking_rule: str = "A",
        product_language: str = "EN",
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1 (1 sends every request alone)")
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
        self.batch_size = batch_size
        """Changesets (or retrieve parts) per $batch; 1 sends every request on its own."""
        self.availability_plants = (availability_plants,) if isinstance(availability_plants, str) \
            else tuple(availability_plants)
        self.price_sales_organization = price_sales_organization
        self.price_distribution_channel = price_distribution_channel
        self.atp_checking_rule = atp_checking_rule
        self.product_language = product_language
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

    def _root_of(self, service: str) -> str:
        return f"{self.odata_root}{service}/"

    # ------------------------------------------------------------------------------------ HTTP core

    def _absorb_cookies(self, response: httpx.Response) -> None:
        for cookie in response.cookies.jar:
            if cookie.value is not None:
                self._cookies[cookie.name] = cookie.value

    async def _send(self, method: str, url: str, *, what: str, params: Mapping[str, str] | None = None,
                    body: Any = None, headers: Mapping[str, str] | None = None, write: bool = False,
                    create: bool = False, service_root: str | None = None, raw: bytes | None = None,
                    content_type: str | None = None) -> httpx.Response:
        """Auth (one refresh on 401), CSRF for writes (one re-fetch on 403 Required), short retries."""
        refreshed = False
        csrf_retried = False
        content = raw if raw is not None else json.dumps(body).encode() if body is not None else None
        query = dict(params or {})
        if self._sap_client and "sap-client=" not in url:
            query["sap-client"] = self._sap_client
        target = url + (("&" if "?" in url else "?") + _query(query) if query else "")
        while True:
            all_headers = {"Accept": "application/json",
                           "Authorization": await self._auth.authorization(self._http, force_refresh=refreshed)}
            token: str | None = None
            if write:
                token = await self._csrf_token(service_root or url, what=what)
                all_headers["x-csrf-token"] = token
            if content is not None:
                all_headers["Content-Type"] = content_type or "application/json"
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

    async def _batch(self, root: str, items: Sequence[_Req | Sequence[_Req]], *, what: str) -> list[_Answer]:
        """POST one $batch to the service at `root` (CSRF and session as for any write); one answer per item."""
        boundary = f"batch_{uuid.uuid4()}"
        writes = any(not isinstance(item, _Req) for item in items)
        creates = any(r.method == "POST" for item in items if not isinstance(item, _Req) for r in item)
        response = await self._send("POST", root + "$batch", what=what, raw=encode_batch(items, boundary),
                                    content_type=f"multipart/mixed; boundary={boundary}", write=True,
                                    create=creates, service_root=root,
                                    headers={"Accept": "multipart/mixed"})
        if response.status_code == 504 and writes:
            raise AmbiguousWriteError(f"{SYSTEM} {what}: HTTP 504 (some changesets may have been applied)")
        if response.status_code not in (200, 202):
            raise error_for(response, what, write=writes)
        return decode_batch(response, items, what)

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

    @staticmethod
    def _collection(data: Mapping[str, Any], what: str) -> tuple[list[dict[str, Any]], str | None]:
        body = data.get("d")
        if isinstance(body, list):
            return [r for r in body if isinstance(r, dict)], None
        if isinstance(body, dict) and isinstance(body.get("results"), list):
            link = body.get("__next")
            return [r for r in body["results"] if isinstance(r, dict)], str(link) if link else None
        raise TransientError(f"{SYSTEM} {what}: response has no d.results")

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
                rows, link = self._collection(await self._get_json(url, what=what, params=query), what)
                count += len(rows)
                yield rows
                url, query = (self._follow(link), None) if link else (None, None)
            if count < self._page_size:
                return
            skip += self._page_size

    async def _queries(self, table: str, filters: Sequence[str], *, what: str
                       ) -> list[list[dict[str, Any]] | SyncError]:
        """The rows of several filtered queries on one table: alone, or as retrieve parts of $batch calls.

        Each query is small (at most `_FETCH_CHUNK` keys), so it has no `$top`; a server page limit is
        followed through `__next` with plain GETs. A query answered with an error gives that error.
        """
        definition = _entity(table)

        def params(text: str) -> dict[str, str]:
            out = {"$filter": text, "$orderby": ",".join(f"{k} asc" for k in definition.keys)}
            if definition.expand:
                out["$expand"] = definition.expand
            return out

        results: list[list[dict[str, Any]] | SyncError] = []
        if self.batch_size <= 1 or len(filters) <= 1:
            for text in filters:
                rows: list[dict[str, Any]] = []
                async for page in self._raw_pages(table, {"$filter": text}, what):
                    rows.extend(page)
                results.append(rows)
            return results
        for start in range(0, len(filters), self.batch_size):
            chunk = filters[start:start + self.batch_size]
            items = [_Req("GET", f"{table}?{_query(params(t))}", what) for t in chunk]
            answers = await self._batch(self.service_root(table), items, what=f"{what} ($batch of {len(items)})")
            for answer in answers:
                part = answer.parts[0]
                if not answer.ok:
                    results.append(error_for(part.response(), what))
                    continue
                rows, link = self._collection(part.json(what), what)
                while link:
                    more, link = self._collection(await self._get_json(self._follow(link), what=what), what)
                    rows.extend(more)
                results.append(rows)
        return results

    def _record(self, table: str, row: Mapping[str, Any]) -> SourceRecord:
        meta = row.get("__metadata")
        etag = meta.get("etag") if isinstance(meta, dict) else None
        values = _plain_row(row)
        if _entity(table).flatten:
            values.update(flatten_nested(values))
        return SourceRecord(key=format_key(table, row), values=values, modified=self._modified(table, row),
                            version=str(etag) if etag is not None else None)

    def _local(self, day: Any, clock: Any) -> datetime | None:
        moment = _parse_sap_datetime(day)
        if moment is None:
            return None
        at = _parse_sap_time(clock) or time(0)
        return utc(datetime.combine(moment.date(), at, self._tz))  # None past 9999-12-31 in UTC

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
        if table == PRODUCT_AVAILABILITY:
            return await self._select_products(equals, not_in)
        text = build_filter(equals, not_in)
        return [r async for page in self._pages(table, {"$filter": text} if text else None, f"select from {table}")
                for r in page]

    async def get(self, table: str, key: str) -> SourceRecord | None:
        """One record by canonical key, with its nested values, or None."""
        if table == PRODUCT_AVAILABILITY:
            return (await self.fetch(table, [key])).get(key)
        row = await self._get_row(table, parse_key(table, key), what=f"read {table} {key}",
                                  expand=_entity(table).expand)
        return self._record(table, row) if row is not None else None

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        """Read records by canonical key (`or` chains of up to 40 keys per query); missing keys are absent."""
        wanted = list(dict.fromkeys(keys))
        if table == PRODUCT_AVAILABILITY:
            found: dict[str, SourceRecord] = {}
            for start in range(0, len(wanted), _FETCH_CHUNK):
                async for page in self._product_pages(wanted[start:start + _FETCH_CHUNK]):
                    found.update((r.key, r) for r in page)
            return found
        fields = _entity(table).keys
        found = {}
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
        if table == PRODUCT_AVAILABILITY:
            async for page in self._product_pages(None):
                yield page
            return
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
        kind = _entity(table).changes
        if kind is None:
            raise RejectedError(f"{SYSTEM}: {table} has no change timestamp; read its records through their parent "
                                "(A_SalesOrder / A_BusinessPartner) or scan it")
        if kind == "hash":
            async for batch in self._hash_changes(table, checkpoint):
                yield batch
            return
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

    async def _hash_changes(self, table: str, checkpoint: str | None
                            ) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """Records whose content hash differs from the checkpoint's, and deletions (keys no longer there).

        Everything is read first (the hashes of all records make the next checkpoint); the changed records
        follow in pages of `page_size`, the earlier pages with the previous checkpoint. Versions are
        `<hash>.<generation>`: a replayed poll repeats its message ids, a record that returns to an earlier
        state is still a new change.
        """
        previous = _HashCheckpoint.parse(checkpoint, table)
        unread: set[str] = set()
        records = {r.key: r async for page in self._product_pages(None, unread) for r in page}
        hashes = {k: r.version or "" for k, r in records.items()}
        # A product SAP did not answer for this time keeps its last known state.
        hashes.update((k, previous.hashes[k]) for k in unread if k in previous.hashes)
        generation = previous.generation + 1
        now = _HashCheckpoint.of(generation, hashes)
        changed, gone = previous.changed(hashes, now)
        changed = [k for k in changed if k in records]
        if not changed and not gone:
            yield [], checkpoint or now.text()
            return
        key_field = _entity(table).keys[0]
        out = [SourceRecord(k, records[k].values, None, f"{hashes[k]}.{generation}") for k in sorted(changed)]
        out += [SourceRecord(k, {key_field: k}, None, f"deleted.{generation}", deleted=True) for k in sorted(gone)]
        pages = [out[n:n + self._page_size] for n in range(0, len(out), self._page_size)]
        for page in pages[:-1]:
            yield page, checkpoint or ""
        yield pages[-1], now.text()

    async def fetch_attachment(self, table: str, key: str, attachment_id: str) -> bytes:
        """SAP attachments (API_CV_ATTACHMENT_SRV) are not synced by Syncline."""
        raise RejectedError(f"{SYSTEM}: attachments are not supported for {table} ({key}, {attachment_id})")

    # ------------------------------------------------------------------------------------ products

    async def _product_pages(self, products: Sequence[str] | None, unread: set[str] | None = None
                             ) -> AsyncIterator[list[SourceRecord]]:
        """ProductAvailability records: A_Product pages joined with PR00 prices and availability per plant.

        Products whose availability SAP refused are left out and added to `unread`.
        """
        what = "read of ProductAvailability"
        prices = await self._prices(products)
        params: dict[str, str] = {}
        if products is not None:
            params["$filter"] = " or ".join(f"Product eq {filter_literal(p, 'Product')}" for p in products)
        async for rows in self._raw_pages("A_Product", params, what):
            live = [r for r in rows if not r.get("IsMarkedForDeletion") and r.get("Product")]
            available = await self._availability(live)
            page: list[SourceRecord] = []
            for row in live:
                product = str(row["Product"])
                if product not in available:
                    if unread is not None:
                        unread.add(product)
                    continue
                price = prices.get(product)
                values = {
                    "Product": product, "ProductDescription": self._description(row),
                    "BaseUnit": row.get("BaseUnit"), "NetPrice": price[0] if price else None,
                    "Currency": price[1] if price else None, "AvailableQuantity": available[product]}
                digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]
                page.append(SourceRecord(product, values, None, digest))
            yield page

    def _description(self, row: Mapping[str, Any]) -> str | None:
        texts = _nav_rows(row.get("to_Description"))
        chosen = next((t for t in texts if t.get("Language") == self.product_language), texts[0] if texts else None)
        return str(chosen.get("ProductDescription") or "") or None if chosen else None

    async def _prices(self, products: Sequence[str] | None) -> dict[str, tuple[float, str | None]]:
        """Material -> (PR00 price per base unit, currency) valid today in the pricing sales area."""
        today = datetime.now(UTC).date()
        text = (f"ConditionType eq 'PR00' and SalesOrganization eq "
                f"{filter_literal(self.price_sales_organization)} and DistributionChannel eq "
                f"{filter_literal(self.price_distribution_channel)} and ConditionValidityStartDate le "
                f"{filter_literal(today)} and ConditionValidityEndDate ge {filter_literal(today)}")
        if products is not None:
            text += " and (" + " or ".join(f"Material eq {filter_literal(p)}" for p in products) + ")"
        best: dict[str, tuple[str, float, str | None]] = {}
        async for rows in self._raw_pages("A_SlsPrcgCndnRecdValidity", {"$filter": text}, "read of PR00 prices"):
            for validity in rows:
                record = validity.get("to_SlsPrcgConditionRecord")
                material = str(validity.get("Material") or "")
                if not isinstance(record, dict) or not material or record.get("ConditionIsDeleted"):
                    continue
                try:
                    rate = Decimal(str(record.get("ConditionRateValue") or "0"))
                    per = Decimal(str(record.get("ConditionQuantity") or "1")) or Decimal(1)
                except InvalidOperation:
                    log.warning("%s: PR00 record %s has no readable rate", SYSTEM, record.get("ConditionRecord"))
                    continue
                start = str(plain_value(validity.get("ConditionValidityStartDate")) or "")
                # Several valid records: the one that started last is the one pricing uses.
                if material not in best or start > best[material][0]:
                    best[material] = (start, float(rate / per), record.get("ConditionCurrency") or None)
        return {m: (price, currency) for m, (_, price, currency) in best.items()}

    async def _availability(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Product -> available quantity summed over `availability_plants` the product is maintained in.

        Products that SAP refuses to answer for are left out (and kept as they were by change detection).
        """
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S") + "Z"
        pairs: list[tuple[str, str]] = []
        totals: dict[str, float] = {}
        for row in rows:
            product = str(row["Product"])
            totals[product] = 0.0
            plants = {str(p.get("Plant")) for p in _nav_rows(row.get("to_Plant")) if not p.get("IsMarkedForDeletion")}
            pairs += [(product, plant) for plant in self.availability_plants if plant in plants]
        if not pairs:
            return totals

        def request(product: str, plant: str) -> _Req:
            params = {"SupplyingPlant": quote_string(plant), "Material": quote_string(product),
                      "ATPCheckingRule": quote_string(self.atp_checking_rule),
                      "RequestedUTCDateTime": f"datetimeoffset'{now}'"}
            return _Req("GET", f"{AVAILABILITY_FUNCTION}?{_query(params)}", f"availability of {product} in {plant}")

        root = self._root_of(AVAILABILITY_SERVICE)
        answers: list[_Part] = []
        if self.batch_size > 1 and len(pairs) > 1:
            for start in range(0, len(pairs), self.batch_size):
                chunk = [request(*pair) for pair in pairs[start:start + self.batch_size]]
                answers += [a.parts[0] for a in await self._batch(root, chunk, what="availability read")]
        else:
            for pair in pairs:
                req = request(*pair)
                response = await self._send("GET", root + req.path, what=req.what)
                answers.append(_Part(response.status_code, dict(response.headers), response.content))
        for (product, plant), part in zip(pairs, answers, strict=True):
            what = f"availability of {product} in plant {plant}"
            if part.status >= 400:
                error = error_for(part.response(), what)
                if error.retriable or isinstance(error, AuthError):
                    raise error
                log.warning("%s %s", SYSTEM, error)
                totals.pop(product, None)
                continue
            data = part.json(what).get("d")
            record = data.get(AVAILABILITY_FUNCTION, data) if isinstance(data, dict) else None
            quantity = record.get("AvailableQuantityInBaseUnit") if isinstance(record, dict) else None
            if product in totals:
                try:
                    totals[product] += float(Decimal(str(quantity)))
                except InvalidOperation:
                    raise TransientError(f"{SYSTEM} {what}: no AvailableQuantityInBaseUnit in the answer") from None
        return totals

    async def _select_products(self, equals: Mapping[str, Any],
                               not_in: Mapping[str, Sequence[Any]] | None) -> list[SourceRecord]:
        def accepts(record: SourceRecord) -> bool:
            for name, value in equals.items():
                allowed = value if isinstance(value, list | tuple | set | frozenset) else [value]
                if not any(same_value(name, record.values.get(name), v) for v in allowed):
                    return False
            return not any(any(same_value(name, record.values.get(name), v) for v in values)
                           for name, values in (not_in or {}).items())

        wanted = equals.get("Product")
        if wanted is not None:
            keys = [str(k) for k in (wanted if isinstance(wanted, list | tuple | set | frozenset) else [wanted])]
            records = list((await self.fetch(PRODUCT_AVAILABILITY, keys)).values())
        else:
            records = [r async for page in self.scan(PRODUCT_AVAILABILITY) for r in page]
        return [r for r in records if accepts(r)]

    # ------------------------------------------------------------------------------------ RecordSink

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """Apply ops; one result per op, in order (see "Writes" and "$batch" in the module docstring).

        Auth failures and throttling that outlived the in-call retries fail the whole call; every other
        failure fails only its op.
        """
        results: list[WriteResult | None] = [None] * len(ops)
        by_service: dict[str, list[int]] = {}
        alone: list[int] = []
        for i, op in enumerate(ops):
            if self.batch_size > 1 and op.table in WRITABLE:
                by_service.setdefault(_entity(op.table).service, []).append(i)
            else:
                alone.append(i)
        jobs: list[Awaitable[None]] = []
        for indexes in by_service.values():
            if len(indexes) > 1:
                jobs.append(self._write_batched(ops, indexes, results))
            else:
                alone += indexes
        if alone:
            jobs.append(self._write_alone(ops, sorted(alone), results))
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [r for r in results if r is not None]

    @staticmethod
    def _groups(ops: Sequence[WriteOp], indexes: Sequence[int]) -> list[list[int]]:
        """Ops on the same record, in order (they must not run concurrently or share one read)."""
        groups: dict[tuple[str, str], list[int]] = {}
        for i in indexes:
            op = ops[i]
            ident = op.key or json.dumps(op.match or {}, sort_keys=True, default=str) or op.op_id
            groups.setdefault((op.table, ident), []).append(i)
        return list(groups.values())

    @staticmethod
    def _failed(op: WriteOp, exc: SyncError) -> WriteResult:
        log.warning("%s: op %s failed: %s", SYSTEM, op.op_id, exc)
        return WriteResult(op.op_id, False, key=op.key, error=exc)

    async def _write_alone(self, ops: Sequence[WriteOp], indexes: Sequence[int],
                           results: list[WriteResult | None]) -> None:
        """Every request on its own, ops with bounded concurrency (ops on the same record in order)."""
        semaphore = asyncio.Semaphore(self._max_concurrency)

        async def run(group: list[int]) -> None:
            for i in group:
                op = ops[i]
                async with semaphore:
                    try:
                        results[i] = await self._write_one(op)
                    except (AuthError, ThrottledError):
                        raise
                    except SyncError as exc:
                        results[i] = self._failed(op, exc)

        outcomes = await asyncio.gather(*(run(g) for g in self._groups(ops, indexes)), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _write_batched(self, ops: Sequence[WriteOp], indexes: Sequence[int],
                             results: list[WriteResult | None]) -> None:
        """Ops of one service: batched look-ups, then one changeset per op in $batch calls of `batch_size`."""
        groups = self._groups(ops, indexes)
        rounds = max(len(g) for g in groups)
        for number in range(rounds):
            # The n-th op of every record in one round: a later op on a record plans from a fresh read.
            todo = [g[number] for g in groups if len(g) > number]
            await self._batch_round(ops, todo, results)

    async def _batch_round(self, ops: Sequence[WriteOp], indexes: Sequence[int],
                           results: list[WriteResult | None]) -> None:
        try:
            located = await self._locate_many([ops[i] for i in indexes])
        except (AuthError, ThrottledError):
            raise
        except SyncError as exc:
            for i in indexes:
                results[i] = self._failed(ops[i], exc)
            return
        planned: list[tuple[int, _Plan]] = []
        again: list[int] = []
        for i, found in zip(indexes, located, strict=True):
            op = ops[i]
            if isinstance(found, SyncError):
                results[i] = self._failed(op, found)
                continue
            try:
                plan = self._plan(op, found)
            except SyncError as exc:
                results[i] = self._failed(op, exc)
                continue
            if plan.incomplete:
                again.append(i)
            elif not plan.requests:
                results[i] = WriteResult(op.op_id, True, key=plan.key)
            else:
                planned.append((i, plan))
        root = self.service_root(ops[indexes[0]].table)
        semaphore = asyncio.Semaphore(self._max_concurrency)

        async def send(chunk: list[tuple[int, _Plan]]) -> None:
            async with semaphore:
                what = f"$batch of {len(chunk)} {ops[chunk[0][0]].table} changesets"
                try:
                    answers = await self._batch(root, [p.requests for _, p in chunk], what=what)
                except AmbiguousWriteError as exc:
                    await self._settle_lost(ops, chunk, exc, results)
                    return
                except (AuthError, ThrottledError):
                    raise
                except SyncError as exc:
                    for i, _ in chunk:
                        results[i] = self._failed(ops[i], exc)
                    return
            for (i, plan), answer in zip(chunk, answers, strict=True):
                op = ops[i]
                if answer.ok:
                    results[i] = self._planned_result(op, plan, answer.parts[0])
                    continue
                part = answer.parts[0]
                if part.status == 412:
                    log.info("%s %s: ETag is stale (changed in SAP meanwhile), redoing it on its own", SYSTEM,
                             plan.what)
                    again.append(i)
                elif plan.delete and part.status == 404:
                    results[i] = WriteResult(op.op_id, True, key=plan.key)
                else:
                    results[i] = self._failed(op, error_for(part.response(), plan.what, write=True))

        chunks = [planned[s:s + self.batch_size] for s in range(0, len(planned), self.batch_size)]
        outcomes = await asyncio.gather(*(send(c) for c in chunks), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if again:
            await self._write_alone(ops, sorted(again), results)

    def _planned_result(self, op: WriteOp, plan: _Plan, first: _Part) -> WriteResult:
        if not plan.create:
            return WriteResult(op.op_id, True, key=plan.key)
        created = first.json(plan.what).get("d")
        if not isinstance(created, dict):
            return self._failed(op, AmbiguousWriteError(f"{SYSTEM} {plan.what}: HTTP {first.status} without the "
                                                        "created entity"))
        return WriteResult(op.op_id, True, key=format_key(op.table, created), created=True)

    async def _settle_lost(self, ops: Sequence[WriteOp], chunk: Sequence[tuple[int, _Plan]],
                           exc: AmbiguousWriteError, results: list[WriteResult | None]) -> None:
        """A $batch whose answer was lost: creates found by their match did happen; the rest stays ambiguous."""
        creates = [(i, p) for i, p in chunk if p.create and ops[i].match]
        found = await self._locate_many([WriteOp(ops[i].op_id, "upsert", ops[i].table, match=ops[i].match)
                                         for i, _ in creates]) if creates else []
        made = {i: row for (i, _), row in zip(creates, found, strict=True) if isinstance(row, dict)}
        for i, _ in chunk:
            op = ops[i]
            if i in made:
                log.info("%s op %s: the $batch answer was lost but SAP has the record", SYSTEM, op.op_id)
                results[i] = WriteResult(op.op_id, True, key=format_key(op.table, made[i]), created=True)
            else:
                results[i] = self._failed(op, exc)

    async def _locate_many(self, ops: Sequence[WriteOp]) -> list[dict[str, Any] | SyncError | None]:
        """Each op's target as SAP sends it (or None), read with one filtered query per 40 ops.

        Several queries go to SAP as retrieve parts of one $batch (`batch_size` parts per call).
        """
        out: list[dict[str, Any] | SyncError | None] = [None] * len(ops)
        buckets: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for n, op in enumerate(ops):
            if op.key:
                buckets.setdefault((op.table, ()), []).append(n)
            elif op.match:
                buckets.setdefault((op.table, tuple(sorted(op.match))), []).append(n)
            else:
                out[n] = RejectedError(f"{SYSTEM}: op {op.op_id} on {op.table} has neither key nor match")
        plans: dict[str, list[tuple[str, list[int]]]] = {}
        for (table, fields), members in buckets.items():
            for start in range(0, len(members), _FETCH_CHUNK):
                chunk = members[start:start + _FETCH_CHUNK]
                try:
                    if not fields:
                        keys = [parse_key(table, str(ops[n].key)) for n in chunk]
                        names = _entity(table).keys
                    else:
                        keys = [{f: str((ops[n].match or {})[f]) for f in fields} for n in chunk]
                        names = fields
                except SyncError as exc:
                    for n in chunk:
                        out[n] = exc
                    continue
                clauses = list(dict.fromkeys(" and ".join(f"{f} eq {filter_literal(k[f], f)}" for f in names)
                                             for k in keys))
                text = " or ".join(f"({c})" if len(names) > 1 else c for c in clauses)
                plans.setdefault(table, []).append((text, chunk))
        for table, queries in plans.items():
            answers = await self._queries(table, [q for q, _ in queries], what=f"find {table} records")
            for (_, chunk), rows in zip(queries, answers, strict=True):
                for n in chunk:
                    out[n] = rows if isinstance(rows, SyncError) else self._pick(ops[n], rows)
        return out

    @staticmethod
    def _pick(op: WriteOp, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | SyncError | None:
        if op.key:
            return next((r for r in rows if format_key(op.table, r) == op.key), None)
        match = op.match or {}
        found = [r for r in rows if all(str(r.get(f) if r.get(f) is not None else "") == str(v)
                                        for f, v in match.items())]
        if len(found) > 1:
            numbers = ", ".join(format_key(op.table, r) for r in found[:5])
            return RejectedError(f"{SYSTEM}: match {match} finds {len(found)} {op.table} records ({numbers}); "
                                 "make the match field unique in SAP or give the key")
        return found[0] if found else None

    # ------------------------------------------------------------------------------------ one op alone

    async def _write_one(self, op: WriteOp) -> WriteResult:
        return await self._apply(op, await self._locate(op))

    async def _locate(self, op: WriteOp) -> dict[str, Any] | None:
        """The op's target as SAP sends it (nested values expanded), or None."""
        _writable(op)
        if op.key:
            return await self._get_row(op.table, parse_key(op.table, op.key), what=f"read {op.table} {op.key}",
                                       expand=_entity(op.table).expand)
        if not op.match:
            raise RejectedError(f"{SYSTEM}: op {op.op_id} on {op.table} has neither key nor match")
        found: list[dict[str, Any]] = []
        params = {"$filter": build_filter(op.match)}
        async for rows in self._raw_pages(op.table, params, f"find {op.table} by {', '.join(op.match)}"):
            found.extend(rows)
        picked = self._pick(WriteOp(op.op_id, op.action, op.table, match=op.match), found)
        if isinstance(picked, SyncError):
            raise picked
        return picked

    async def _apply(self, op: WriteOp, current: dict[str, Any] | None) -> WriteResult:
        """Plan, send request by request; a 412 re-reads and re-plans once, an incomplete plan re-reads."""
        stale = False
        for _ in range(4):
            plan = self._plan(op, current)
            if plan.create:
                return await self._create(op, plan)
            try:
                for req in plan.requests:
                    await self._run(plan.table, req)
            except _StaleError:
                if stale:
                    raise TransientError(f"{SYSTEM} {plan.what}: {plan.table} {plan.key} changed in SAP again "
                                         "between read and update (HTTP 412 twice); retrying later") from None
                stale = True
                log.info("%s %s: ETag is stale (changed in SAP meanwhile), re-reading and retrying once", SYSTEM,
                         plan.what)
                current = await self._reread(plan)
                continue
            if plan.delete or not plan.incomplete:
                return WriteResult(op.op_id, True, key=plan.key)
            current = await self._reread(plan)
        raise TransientError(f"{SYSTEM} {op.table} write (op {op.op_id}): SAP did not settle after several rounds "
                             "of changes; retrying later")

    async def _reread(self, plan: _Plan) -> dict[str, Any]:
        assert plan.key is not None
        fresh = await self._get_row(plan.table, parse_key(plan.table, plan.key), what=f"re-read for {plan.what}",
                                    expand=_entity(plan.table).expand)
        if fresh is None:
            raise RejectedError(f"SAP rejected {plan.what}: {plan.table} {plan.key} was deleted in SAP while it was "
                                "being updated")
        return fresh

    async def _run(self, table: str, req: _Req) -> None:
        root = self.service_root(table)
        headers = {"If-Match": req.etag} if req.etag is not None else None
        response = await self._send(req.method, root + req.path, what=req.what, body=req.body, headers=headers,
                                    write=True, create=req.method == "POST", service_root=root)
        if response.status_code == 412:
            raise _StaleError(req.what)
        if req.method == "DELETE" and response.status_code == 404:
            return
        if not response.is_success:
            raise error_for(response, req.what, write=True)

    async def _create(self, op: WriteOp, plan: _Plan) -> WriteResult:
        root = self.service_root(op.table)
        req = plan.requests[0]
        try:
            response = await self._send("POST", root + req.path, what=req.what, body=req.body, write=True,
                                        create=True, service_root=root)
            if response.status_code == 504:
                raise error_for(response, req.what, write=True)
        except AmbiguousWriteError:
            if not op.match:
                raise
            found = await self._locate(WriteOp(op.op_id, op.action, op.table, match=op.match))
            if found is None:
                raise
            log.info("%s %s: the create's answer was lost but SAP has the record (%s)", SYSTEM, req.what,
                     format_key(op.table, found))
            return WriteResult(op.op_id, True, key=format_key(op.table, found), created=True)
        if not response.is_success:
            raise error_for(response, req.what, write=True)
        created = json_object(response, system=SYSTEM, what=req.what).get("d")
        if not isinstance(created, dict):
            raise AmbiguousWriteError(f"{SYSTEM} {req.what}: HTTP {response.status_code} without the created entity")
        return WriteResult(op.op_id, True, key=format_key(op.table, created), created=True)

    # ------------------------------------------------------------------------------------ plans

    def _plan(self, op: WriteOp, current: dict[str, Any] | None) -> _Plan:
        _writable(op)
        if op.table == "A_SalesOrder":
            return self._plan_order(op, current)
        return self._plan_partner(op, current)

    @staticmethod
    def _patch(table: str, key: Mapping[str, str], wanted: Mapping[str, Any], current: Mapping[str, Any],
               what: str) -> list[_Req]:
        """A PATCH of the fields of `wanted` that differ (none: no request), with the current ETag as If-Match."""
        changes = _diff(current, wanted, set(_entity(table).keys))
        if not changes:
            return []
        meta = current.get("__metadata")
        etag = meta.get("etag") if isinstance(meta, dict) else None
        return [_Req("PATCH", key_path(table, key), what, wire_value("", changes), str(etag or "*"))]

    @staticmethod
    def _line_values(line: LineWrite, lines: Lines, header: Mapping[str, Any]) -> dict[str, Any]:
        values = {k: v for k, v in line.values.items() if k != "SalesOrder"}
        values.update(line.match)
        for line_field, header_field in lines.parent_fields.items():
            if header.get(header_field) not in (None, ""):
                values[line_field] = header[header_field]
        return values

    def _plan_order(self, op: WriteOp, current: dict[str, Any] | None) -> _Plan:
        what = f"A_SalesOrder create (op {op.op_id})"
        if op.lines is not None and op.lines.table != ITEMS:
            raise RejectedError(f"{SYSTEM}: order lines are written through the navigation property {ITEMS}, not "
                                f"{op.lines.table!r}; fix lines.target_table in the flow spec")
        dotted = sorted(k for k in op.values if "." in k)
        if dotted:
            raise RejectedError(f"{SYSTEM}: A_SalesOrder takes no dotted paths ({', '.join(dotted)}); items come "
                                f"as lines through {ITEMS}")
        if op.action == "delete":
            if current is None:
                return _Plan("A_SalesOrder", f"A_SalesOrder delete (op {op.op_id})", op.key, delete=True)
            number = format_key("A_SalesOrder", current)
            meta = current.get("__metadata")
            etag = meta.get("etag") if isinstance(meta, dict) else None
            what = f"A_SalesOrder {number} delete (op {op.op_id})"
            return _Plan("A_SalesOrder", what, number, [_Req("DELETE", key_path("A_SalesOrder", {"SalesOrder": number}),
                                                             what, etag=str(etag or "*"))], delete=True)
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
            return _Plan("A_SalesOrder", what, None, [_Req("POST", "A_SalesOrder", what, wire_value("", body))],
                         create=True)
        number = format_key("A_SalesOrder", current)
        what = f"A_SalesOrder {number} update (op {op.op_id})"
        requests = self._patch("A_SalesOrder", {"SalesOrder": number}, header, current, what)
        if op.lines is not None:
            requests += self._plan_items(number, op.lines, {**_plain_row(current), **header}, current, what)
        return _Plan("A_SalesOrder", what, number, requests)

    def _plan_items(self, number: str, lines: Lines, header: Mapping[str, Any], order: Mapping[str, Any],
                    what: str) -> list[_Req]:
        items = _nav_rows(order.get(ITEMS))
        next_number = max((int(str(i.get("SalesOrderItem") or 0)) for i in items
                           if str(i.get("SalesOrderItem") or "").isdigit()), default=0)
        requests: list[_Req] = []
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
                requests.append(_Req("POST", f"{key_path('A_SalesOrder', {'SalesOrder': number})}/{ITEMS}",
                                     item_what, wire_value("", body)))
                continue
            key = {"SalesOrder": number, "SalesOrderItem": str(existing["SalesOrderItem"])}
            requests += self._patch("A_SalesOrderItem", key, {k: v for k, v in wanted.items()
                                                              if k != "SalesOrderItem"}, existing, item_what)
        return requests

    @staticmethod
    def _partner_values(op: WriteOp) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]],
                                                dict[str, Any] | None, list[dict[str, Any]]]:
        """(header fields, addresses, roles, customer fields, sales areas) of a partner op, dotted paths nested."""
        values = nest_dotted(op.values)
        addresses = [dict(a) for a in _as_list(values.pop(ADDRESSES, None), ADDRESSES)]
        roles = [dict(r) if isinstance(r, Mapping) else {"BusinessPartnerRole": str(r)}
                 for r in _as_list(values.pop(ROLES, None), ROLES, allow_scalars=True)]
        customer_raw = values.pop(CUSTOMER, None)
        if customer_raw is not None and not isinstance(customer_raw, Mapping):
            raise MappingError(f"{SYSTEM}: {CUSTOMER} must be a dict of A_Customer fields (op {op.op_id})")
        customer = dict(customer_raw) if customer_raw is not None else None
        areas = [dict(a) for a in _as_list(customer.pop(SALES_AREAS, None), SALES_AREAS)] if customer else []
        values.pop("BusinessPartner", None)
        for name in [k for k in values if k.startswith("to_")]:
            raise RejectedError(f"{SYSTEM}: navigation {name} of A_BusinessPartner is not written by Syncline (op "
                                f"{op.op_id}); addresses, roles and customer data are")
        return values, addresses, roles, customer, areas

    @staticmethod
    def _address_body(address: Mapping[str, Any]) -> dict[str, Any]:
        """An address for a deep insert: its phone numbers and e-mail addresses as `{"results": [...]}`."""
        body: dict[str, Any] = {}
        for name, value in address.items():
            if name in COMMUNICATION:
                entries = [dict(e) for e in _as_list(value, name) if not _blank(e)]
                if entries:
                    body[name] = {"results": entries}
            elif name.startswith("to_"):
                raise RejectedError(f"{SYSTEM}: address navigation {name} is not written by Syncline (known: "
                                    f"{', '.join(COMMUNICATION)})")
            else:
                body[name] = value
        return body

    def _plan_partner(self, op: WriteOp, current: dict[str, Any] | None) -> _Plan:
        what = f"A_BusinessPartner create (op {op.op_id})"
        if op.action == "delete":
            raise RejectedError(f"{SYSTEM}: business partners cannot be deleted through API_BUSINESS_PARTNER "
                                f"(op {op.op_id}); block it (BusinessPartnerIsBlocked) or mark it for archiving "
                                "(IsMarkedForArchiving) instead")
        values, addresses, roles, customer, areas = self._partner_values(op)
        if current is None:
            if op.action == "update":
                raise RejectedError(f"SAP rejected A_BusinessPartner update (op {op.op_id}): business partner "
                                    f"{op.key or op.match} does not exist (use 'upsert' to create it)")
            body: dict[str, Any] = {**values, **(op.match or {})}
            bodies = [self._address_body(a) for a in addresses if not _blank(a)]
            if bodies:
                body[ADDRESSES] = {"results": bodies}
            if customer is not None and not roles:
                roles = [{"BusinessPartnerRole": CUSTOMER_ROLE}]
            if roles:
                body[ROLES] = {"results": roles}
            if customer is not None:
                wanted_areas = [a for a in areas if not _blank(a)]
                body[CUSTOMER] = {**customer, **({SALES_AREAS: {"results": wanted_areas}} if wanted_areas else {})}
            return _Plan("A_BusinessPartner", what, None,
                         [_Req("POST", "A_BusinessPartner", what, wire_value("", body))], create=True)
        number = str(current["BusinessPartner"])
        what = f"A_BusinessPartner {number} update (op {op.op_id})"
        key = {"BusinessPartner": number}
        plan = _Plan("A_BusinessPartner", what, number,
                     self._patch("A_BusinessPartner", key, values, current, what))
        plan.requests += self._plan_addresses(number, addresses, _nav_rows(current.get(ADDRESSES)), what)
        current_roles = {str(r.get("BusinessPartnerRole")) for r in _nav_rows(current.get(ROLES))}
        existing = current.get(CUSTOMER)
        if customer is not None and not isinstance(existing, dict) and not roles and \
                not current_roles & {"FLCU00", CUSTOMER_ROLE}:
            roles = [{"BusinessPartnerRole": CUSTOMER_ROLE}]
        added: set[str] = set()
        for role in roles:
            name = str(role.get("BusinessPartnerRole"))
            if name in current_roles or name in added:
                continue
            added.add(name)
            plan.requests.append(_Req("POST", f"{key_path('A_BusinessPartner', key)}/{ROLES}",
                                      f"{what}, role {name}", wire_value("", role)))
        if customer is None:
            return plan
        if not isinstance(existing, dict):
            if added & {"FLCU00", CUSTOMER_ROLE}:
                # SAP creates the customer when the role arrives: its data follows after a re-read.
                plan.incomplete = True
                return plan
            raise RejectedError(f"SAP rejected {what}: business partner {number} has no customer data although it "
                                f"has a customer role; check the partner's roles in SAP")
        customer_key = {"Customer": str(existing.get("Customer") or number)}
        plan.requests += self._patch("A_Customer", customer_key, customer, existing, f"{what}, customer data")
        current_areas = _nav_rows(existing.get(SALES_AREAS))
        for index, area in enumerate(areas):
            if all(area.get(f) not in (None, "") for f in AREA_KEYS):
                area_id = {f: str(area[f]) for f in AREA_KEYS}
                target = next((a for a in current_areas if all(str(a.get(f)) == v for f, v in area_id.items())),
                              None)
            else:
                # A dotted path names no sales area: it means the first one.
                target = current_areas[index] if index < len(current_areas) else None
            label = "/".join(str(area.get(f) or (target or {}).get(f) or "?") for f in AREA_KEYS)
            if target is None:
                if not _blank(area):
                    plan.requests.append(_Req("POST", f"{key_path('A_Customer', customer_key)}/{SALES_AREAS}",
                                              f"{what}, sales area {label}", wire_value("", area)))
                continue
            target_key = {**customer_key, **{f: str(target.get(f)) for f in AREA_KEYS}}
            plan.requests += self._patch("A_CustomerSalesArea", target_key, area, target,
                                         f"{what}, sales area {label}")
        return plan

    def _plan_addresses(self, number: str, wanted: list[dict[str, Any]], current: list[dict[str, Any]],
                        what: str) -> list[_Req]:
        """Addresses paired by AddressID, else by position (a dotted path is the first address)."""
        requests: list[_Req] = []
        for index, address in enumerate(wanted):
            address_id = address.get("AddressID")
            target = next((a for a in current if str(a.get("AddressID")) == str(address_id)), None) if address_id \
                else (current[index] if index < len(current) else None)
            if target is None:
                if not _blank(address):
                    body = self._address_body({k: v for k, v in address.items()
                                               if k not in ("AddressID", "BusinessPartner")})
                    requests.append(_Req("POST", f"{key_path('A_BusinessPartner', {'BusinessPartner': number})}/"
                                                 f"{ADDRESSES}", f"{what}, new address", wire_value("", body)))
                continue
            address_key = {"BusinessPartner": number, "AddressID": str(target["AddressID"])}
            address_what = f"{what}, address {target['AddressID']}"
            fields = {k: v for k, v in address.items() if not k.startswith("to_")}
            requests += self._patch("A_BusinessPartnerAddress", address_key, fields, target, address_what)
            for nav in (k for k in address if k.startswith("to_")):
                if nav not in COMMUNICATION:
                    raise RejectedError(f"{SYSTEM}: address navigation {nav} is not written by Syncline (known: "
                                        f"{', '.join(COMMUNICATION)})")
                entity = COMMUNICATION[nav]
                existing = _nav_rows(target.get(nav))
                for position, entry in enumerate(_as_list(address[nav], nav)):
                    entry_what = f"{address_what}, {nav} {position + 1}"
                    if position >= len(existing):
                        if not _blank(entry):
                            requests.append(_Req("POST", f"{key_path('A_BusinessPartnerAddress', address_key)}/{nav}",
                                                 entry_what, wire_value("", dict(entry))))
                        continue
                    row = existing[position]
                    entry_key = {f: str(row.get(f) if row.get(f) is not None else "") for f in _COMM_KEYS}
                    requests += self._patch(entity, entry_key, dict(entry), row, entry_what)
        return requests


def _writable(op: WriteOp) -> None:
    if op.table not in WRITABLE:
        raise RejectedError(f"{SYSTEM}: writes go to A_SalesOrder (with to_Item) or A_BusinessPartner (with "
                            f"addresses and customer data), not {op.table}")


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

