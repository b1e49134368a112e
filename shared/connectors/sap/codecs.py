"""SAP OData v2 codecs: entity sets and keys, $filter literals, values between SAP's wire form and Syncline's."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any, Literal
from urllib.parse import quote

from shared.connectors._odata import not_in_clauses, quote_text
from shared.core.dates import from_epoch_ms, iso_z, parse_duration_time, parse_iso, to_epoch_ms, utc
from shared.core.errors import MappingError, RejectedError
from shared.core.ports import join_key, split_key

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
"""The composed product read model (see `sap/products.py`); not an SAP entity set."""
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
_FETCH_CHUNK = 40
"""Keys per `fetch` query (an `or` chain; keeps the URL well under Gateway's limits)."""


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


quote_string = quote_text
"""An OData string literal: single quotes doubled, so a value can never end the literal."""


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
    clauses += not_in_clauses(not_in, system=SYSTEM, ident=_ident, literal=filter_literal)
    return " and ".join(clauses)


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
