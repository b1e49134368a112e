"""Protocol-faithful simulator of SAP S/4HANA OData v2 (business partners, sales orders, products, prices, ATP).

Serve `.app` with `sandbox.server.RunningServer(sim.app, ca=TestCA...)`; the host is then `server.url` and the
services live under `/sap/opu/odata/sap/<service>/`: API_BUSINESS_PARTNER, API_SALES_ORDER_SRV, API_PRODUCT_SRV
(A_Product, A_ProductDescription, A_ProductPlant), API_SLSPRICINGCONDITIONRECORD_SRV (A_SlsPrcgConditionRecord,
A_SlsPrcgCndnRecdValidity) and API_PRODUCT_AVAILY_INFO_BASIC (function import `DetermineAvailabilityAt`);
products and prices are read-only here. What it does, as S/4HANA does:

- Auth: Basic (communication user `sim.user` / `sim.password`) or a bearer token from the OAuth 2.0
  client-credentials endpoint `POST /sap/bc/sec/oauth2/token` (`sim.client_id` / `sim.client_secret`).
- CSRF: a GET or HEAD with `x-csrf-token: Fetch` answers the token in `x-csrf-token` and opens a session
  (`SAP_SESSIONID_S4H_100` and `sap-usercontext` cookies, set on any answer, an error too);
  POST/PUT/PATCH/MERGE/DELETE (and every $batch) without that token and its session cookie get 403
  `x-csrf-token: Required` "CSRF token validation failed".
- Schema: `sandbox.sap_schema` declares every entity set, property (Edm type, MaxLength, precision/scale,
  computed), key and navigation property; `<service>/$metadata` is the EDMX generated from it and writes are
  validated against it (unknown properties, wrong Edm types, strings over MaxLength: 400).
- Formats: Atom/XML is the default as on the Gateway (service document as AtomPub, feeds, entries, function
  results, error documents) and JSON with `$format=json` or an Accept naming JSON; `<collection>/$count`
  answers text/plain. Writes answer JSON and take JSON bodies only.
- OData v2 JSON: `{"d": {"results": [...], "__count", "__next"}}`, `{"d": {...}}`, `__metadata` (id, uri,
  type, etag), `__deferred` navigation, `\\/Date(ms)\\/` dates, `PT..H..M..S` times, decimals as strings;
  `$filter` (eq ne gt ge lt le, and or not, parentheses, string / datetime / datetimeoffset / time / decimal
  literals), `$orderby`, `$top`, `$skip`, `$select`, `$expand` (nested paths too), `$inlinecount`, server
  paging with `__next`.
- $batch (`POST <service>/$batch`, multipart/mixed): retrieve parts and changesets, answered 202 with one part
  per item; each part's URL is percent-decoded as a top-level one is; a changeset runs its requests in order,
  resolves `$<Content-ID>` references to entities created before it, and is rolled back as a whole by its
  first failing request (whose error is its only answer); its events are raised only when it commits.
- ETags: sales orders and items `W/"datetimeoffset'...'"` from their change time, business partners
  `W/"'<ETag>'"` from the `ETag` property (user + change time); header updates need `If-Match` (428 without,
  412 when stale).
- Deep insert of A_SalesOrder with `to_Item` and of A_BusinessPartner with `to_BusinessPartnerAddress` (and
  each address's `to_PhoneNumber` / `to_EmailAddress`), `to_BusinessPartnerRole`, `to_Customer` (and its
  `to_CustomerSalesArea`); internal number ranges. Phone numbers and e-mail addresses are also created through
  their address's navigation and PATCHed by key (AddressID, Person, OrdinalNumber).
- Validation against customizing (sales areas, plants, materials and their units, sold-to parties, countries,
  currencies, phone number characters, e-mail syntax) with Gateway error bodies. Message classes and numbers
  are representative, not authoritative.
- Change stamps: A_SalesOrder `LastChangeDateTime` (UTC, on create and every change); A_BusinessPartner
  `CreationDate`/`CreationTime` on create and `LastChangeDate`/`LastChangeTime` (UTC) only once changed.
- Knobs: fault injection, latency per request (`latency_ms`) and per operation (`operation_latency_ms`, paid
  once per $batch part), throttling (429/503 with Retry-After), CSRF/session and OAuth token expiry, order
  status progress (delivery, goods issue, billing), UI edits, stock (`set_stock`: what DetermineAvailabilityAt
  answers, no demand netted) and PR00 prices (`set_price`), and event-mesh style CloudEvents
  (`sap.s4.beh.salesorder.v1.SalesOrder.Changed.v1`, ...) POSTed to registered URLs in the background.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode
from xml.sax.saxutils import escape as xml_escape
from xml.sax.saxutils import quoteattr

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.sap_schema import (
    AVAILABILITY_FUNCTION,
    AVAILABILITY_SERVICE,
    BOOL,
    BP_SERVICE,
    DATA_NS,
    DEC,
    DT,
    DTO,
    ENTITIES,
    FUNCTION_IMPORTS,
    ITEM_STATUS,
    MAX_LENGTHS,
    METADATA_NS,
    ORDER_STATUS,
    PRICING_SERVICE,
    PRODUCT_SERVICE,
    SAP_NS,
    SCALES,
    SERVICE_SETS,
    SO_SERVICE,
    TM,
    TYPES,
    metadata,
)
from sandbox.webhook_delivery import Deliverer
from shared.payloads import strict_loads

SERVICE_PREFIX = "/sap/opu/odata/sap/"
TOKEN_PATH = "/sap/bc/sec/oauth2/token"
SYSTEM_ID = "S4H"
SAP_CLIENT = "100"
SESSION_COOKIE = f"SAP_SESSIONID_{SYSTEM_ID}_{SAP_CLIENT}"
EVENT_SOURCE = f"/default/sap.s4.beh/{SYSTEM_ID}CLNT{SAP_CLIENT}"
MODIFYING = frozenset({"POST", "PUT", "PATCH", "MERGE", "DELETE"})

SALES_ORDER_CHANGED = "sap.s4.beh.salesorder.v1.SalesOrder.Changed.v1"
SALES_ORDER_CREATED = "sap.s4.beh.salesorder.v1.SalesOrder.Created.v1"
PARTNER_CHANGED = "sap.s4.beh.businesspartner.v1.BusinessPartner.Changed.v1"
PARTNER_CREATED = "sap.s4.beh.businesspartner.v1.BusinessPartner.Created.v1"

# ============================================================================================ schema

# Entities, properties, Edm types and facets live in sandbox.sap_schema: requests are validated against it and
# $metadata is generated from it.
_PRODUCT_FIELDS = ENTITIES["A_Product"].fields
_ADDRESS_FIELDS = ENTITIES["A_BusinessPartnerAddress"].fields
_CUSTOMER_FIELDS = ENTITIES["A_Customer"].fields
_SALES_AREA_FIELDS = ENTITIES["A_CustomerSalesArea"].fields
_ITEM_FIELDS = ENTITIES["A_SalesOrderItem"].fields
_CONDITION_FIELDS = ENTITIES["A_SlsPrcgConditionRecord"].fields
_VALIDITY_FIELDS = ENTITIES["A_SlsPrcgCndnRecdValidity"].fields
_ORDER_STATUS = ORDER_STATUS
_ITEM_STATUS = ITEM_STATUS
IF_MATCH_REQUIRED = frozenset({"A_BusinessPartner", "A_SalesOrder"})
DELETABLE = frozenset(name for name, entity in ENTITIES.items() if entity.deletable)
READ_ONLY = frozenset(name for name, entity in ENTITIES.items() if not entity.creatable and not entity.updatable)
"""Served for reading only here (the real APIs can also maintain products and prices)."""
COMMUNICATION = {"to_PhoneNumber": "A_AddressPhoneNumber", "to_EmailAddress": "A_AddressEmailAddress"}
DIALING_CODES = {"US": "+1", "CA": "+1", "MX": "+52", "DE": "+49", "GB": "+44", "FR": "+33", "NL": "+31", "CH": "+41",
                 "JP": "+81"}


# ============================================================================================ errors


class GatewayError(Exception):
    """An SAP Gateway error response: HTTP status, message code ("V1/320") and text, optional details."""

    def __init__(self, status: int, code: str, message: str, *, target: str = "",
                 details: list[tuple[str, str]] | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.target = target
        self.details = details
        self.headers = dict(headers or {})

    def body(self, service: str) -> dict[str, Any]:
        details = self.details if self.details is not None else [(self.code, self.message)]
        now = datetime.now(UTC)
        return {"error": {
            "code": self.code, "message": {"lang": "en", "value": self.message},
            "innererror": {
                "application": {"component_id": COMPONENTS.get(service, "LO-MD-BP"),
                                "service_namespace": "/SAP/", "service_id": service, "service_version": "0001"},
                "transactionid": uuid.uuid4().hex.upper(),
                "timestamp": now.strftime("%Y%m%d%H%M%S.") + f"{now.microsecond:06d}0",
                "Error_Resolution": {
                    "SAP_Transaction": "For backend administrators: use ADT feed reader \"SAP Gateway Error Log\" "
                                       "or run transaction /IWFND/ERROR_LOG on SAP Gateway hub system and search "
                                       "for entries with the timestamp above for more details",
                    "SAP_Note": "See SAP Note 1797736 for error analysis (https://service.sap.com/sap/support/notes/"
                                "1797736)"},
                "errordetails": [{"code": c, "message": m, "longtext_url": "/sap/opu/odata/iwbep/message_text;o=LOCAL/",
                                  "propertyref": "", "severity": "error", "transition": False,
                                  "target": self.target} for c, m in details]}}}


COMPONENTS = {SO_SERVICE: "SD-SLS-API", BP_SERVICE: "LO-MD-BP", PRODUCT_SERVICE: "LO-MD-MM",
              PRICING_SERVICE: "SD-MD-CM", AVAILABILITY_SERVICE: "CA-ATP"}


def _bad(code: str, message: str, target: str = "") -> GatewayError:
    return GatewayError(400, code, message, target=target)


# ============================================================================================ values


_DATE_RE = re.compile(r"^/Date\((?P<ms>-?\d+)(?P<off>[+-]\d{4})?\)/$")
_TIME_RE = re.compile(r"^PT(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+)(?:\.\d+)?S)?$")


def _parse_iso(text: str) -> datetime:
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.strip()).replace("Z", "+00:00")
    value = datetime.fromisoformat(text)
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _parse_time(text: str) -> time:
    m = _TIME_RE.match(text)
    if m is None or text == "PT":
        raise ValueError(text)
    return time(int(m.group("h") or 0), int(m.group("m") or 0), int(m.group("s") or 0))


def to_wire(name: str, value: Any) -> Any:
    """A stored value as OData v2 JSON shows it."""
    kind = TYPES.get(name)
    if value is None:
        return None
    if kind in (DT, DTO) and isinstance(value, datetime):
        ms = int(value.timestamp() * 1000)
        return f"/Date({ms}+0000)/" if kind == DTO else f"/Date({ms})/"
    if kind == TM and isinstance(value, time):
        return f"PT{value.hour:02d}H{value.minute:02d}M{value.second:02d}S"
    return value


def _decimal_text(name: str, value: Decimal) -> str:
    return str(value.quantize(Decimal(1).scaleb(-SCALES.get(name, 3)), rounding=ROUND_HALF_UP))


def from_wire(entity: str, name: str, raw: Any) -> Any:
    """A client's JSON value as stored; a value of the wrong Edm type is a Gateway 400."""
    kind = TYPES.get(name)
    etype = ENTITIES[entity].type_name
    if raw is None:
        return None

    def wrong(expected: str) -> GatewayError:
        return _bad("/IWBEP/CM_MGW_RT/013", f"Invalid value '{raw}' for property '{name}' of type '{etype}': "
                                            f"{expected} expected", target=name)

    if kind in (DT, DTO):
        if not isinstance(raw, str):
            raise wrong("an Edm.DateTime string like '/Date(1767225600000)/'")
        m = _DATE_RE.match(raw)
        try:
            return datetime.fromtimestamp(int(m.group("ms")) / 1000, tz=UTC) if m else _parse_iso(raw)
        except ValueError:
            raise wrong("'/Date(ms)/' or ISO 8601") from None
    if kind == TM:
        try:
            return _parse_time(str(raw))
        except ValueError:
            raise wrong("an Edm.Time like 'PT14H30M00S'") from None
    if kind == DEC:
        # OData v2 JSON carries Edm.Decimal as a string; Gateway refuses a JSON number.
        if not isinstance(raw, str):
            raise wrong("Edm.Decimal as a JSON string (e.g. \"2\")")
        try:
            return _decimal_text(name, Decimal(raw))
        except InvalidOperation:
            raise wrong("a decimal number") from None
    if kind == BOOL:
        if not isinstance(raw, bool):
            raise wrong("true or false")
        return raw
    if not isinstance(raw, str):
        raise wrong("Edm.String")
    limit = MAX_LENGTHS.get((entity, name))
    if limit is not None and len(raw) > limit:
        # The Gateway checks a string against the property's MaxLength while reading the payload (SAP KBA
        # 3642265: "Property '&1' at offset '&2' has invalid value '&3'"), before the backend sees it.
        raise _bad("/IWBEP/CM_MGW_RT/013", f"Property '{name}' has invalid value '{raw}': longer than its "
                                           f"MaxLength {limit} in type '{etype}'", target=name)
    return raw


# ============================================================================================ $filter


_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<typed>(?P<tname>datetimeoffset|datetime|time|guid)'(?P<tval>[^']*)')
  | (?P<string>'(?:[^']|'')*')
  | (?P<decimal>-?\d+(?:\.\d+)?[mM])
  | (?P<number>-?\d+(?:\.\d+)?(?:[dDfFlL])?)
  | (?P<paren>[()])
  | (?P<ident>[A-Za-z_]\w*)
""", re.VERBOSE)
_COMPARE = frozenset({"eq", "ne", "gt", "ge", "lt", "le"})


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    value: Any = None


def tokenize(text: str) -> list[_Tok]:
    """Tokens of an OData v2 $filter (a syntax error is a Gateway 400)."""
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{text}' (syntax error at position {pos})")
        pos = m.end()
        kind = m.lastgroup or ""
        raw = m.group(0)
        if kind == "ws":
            continue
        if m.group("typed"):
            tname, tval = m.group("tname"), m.group("tval")
            try:
                value: Any = (_parse_iso(tval) if tname in ("datetime", "datetimeoffset")
                              else _parse_time(tval) if tname == "time" else tval)
            except ValueError:
                raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid {tname} literal '{tval}' in filter '{text}'") from None
            out.append(_Tok("lit", raw, value))
        elif kind == "string":
            out.append(_Tok("lit", raw, raw[1:-1].replace("''", "'")))
        elif kind == "decimal":
            out.append(_Tok("lit", raw, Decimal(raw[:-1])))
        elif kind == "number":
            body = raw.rstrip("dDfFlL")
            out.append(_Tok("lit", raw, Decimal(body)))
        elif kind == "ident" and raw in ("true", "false", "null"):
            out.append(_Tok("lit", raw, {"true": True, "false": False, "null": None}[raw]))
        else:
            out.append(_Tok(kind, raw))
    return out


class FilterParser:
    """Recursive descent: or > and > not > comparison | (expr). Builds a tuple AST, never evaluates text."""

    def __init__(self, text: str, entity: str) -> None:
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.entity = entity
        self.fields = set(ENTITIES[entity].fields)

    def _peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _take(self) -> _Tok:
        tok = self._peek()
        if tok is None:
            raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{self.text}' (unexpected end)")
        self.i += 1
        return tok

    def _is(self, word: str) -> bool:
        tok = self._peek()
        return tok is not None and tok.kind == "ident" and tok.text == word

    def parse(self) -> tuple[Any, ...]:
        node = self._or()
        if self._peek() is not None:
            raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{self.text}' (unexpected "
                                               f"'{self._take().text}')")
        return node

    def _or(self) -> tuple[Any, ...]:
        node = self._and()
        while self._is("or"):
            self._take()
            node = ("or", node, self._and())
        return node

    def _and(self) -> tuple[Any, ...]:
        node = self._not()
        while self._is("and"):
            self._take()
            node = ("and", node, self._not())
        return node

    def _not(self) -> tuple[Any, ...]:
        if self._is("not"):
            self._take()
            return ("not", self._not())
        tok = self._peek()
        if tok is not None and tok.text == "(":
            self._take()
            node = self._or()
            if self._take().text != ")":
                raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{self.text}' (')' expected)")
            return node
        left = self._operand()
        op = self._take()
        if op.kind != "ident" or op.text not in _COMPARE:
            raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{self.text}' (operator expected, "
                                               f"got '{op.text}')")
        return ("cmp", op.text, left, self._operand())

    def _operand(self) -> tuple[Any, ...]:
        tok = self._take()
        if tok.kind == "ident":
            if tok.text not in self.fields:
                raise _bad("/IWBEP/CM_MGW_RT/022", f"Property '{tok.text}' not found in type "
                                                   f"'{ENTITIES[self.entity].type_name}'")
            return ("field", tok.text)
        if tok.kind == "lit":
            return ("lit", tok.value)
        raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{self.text}' (operand expected, "
                                           f"got '{tok.text}')")


def _comparable(name: str | None, value: Any) -> Any:
    if value is None:
        return None
    kind = TYPES.get(name or "")
    if kind == DEC or isinstance(value, Decimal):
        try:
            return Decimal(str(value))
        except InvalidOperation:
            return str(value)
    return value


def _any_of(node: tuple[Any, ...]) -> tuple[str, set[Any]] | None:
    """(field, values) when the filter is `F eq v1 or F eq v2 ...` on one field (no nulls), else None."""
    if node[0] == "or":
        left, right = _any_of(node[1]), _any_of(node[2])
        if left is None or right is None or left[0] != right[0]:
            return None
        return left[0], left[1] | right[1]
    if node[0] != "cmp" or node[1] != "eq":
        return None
    sides = {node[2][0]: node[2][1], node[3][0]: node[3][1]}
    if set(sides) != {"field", "lit"} or sides["lit"] is None or isinstance(sides["lit"], datetime):
        return None
    name = str(sides["field"])
    try:
        return name, {_comparable(name, sides["lit"])}
    except TypeError:
        return None


def evaluate(node: tuple[Any, ...], row: Mapping[str, Any]) -> bool:
    """Evaluate a parsed filter on a stored row (ABAP compares strings case-sensitively)."""
    if node[0] == "or":
        return evaluate(node[1], row) or evaluate(node[2], row)
    if node[0] == "and":
        return evaluate(node[1], row) and evaluate(node[2], row)
    if node[0] == "not":
        return not evaluate(node[1], row)
    _, op, left_node, right_node = node
    name = left_node[1] if left_node[0] == "field" else right_node[1] if right_node[0] == "field" else None

    def value_of(n: tuple[Any, ...]) -> Any:
        return _comparable(name, row.get(n[1]) if n[0] == "field" else n[1])

    left, right = value_of(left_node), value_of(right_node)
    if isinstance(left, datetime) and isinstance(right, datetime):
        left, right = left.astimezone(UTC), right.astimezone(UTC)
    if op == "eq":
        return bool(left == right)
    if op == "ne":
        return bool(left != right)
    if left is None or right is None:
        return False
    try:
        return bool({"gt": left > right, "ge": left >= right, "lt": left < right, "le": left <= right}[op])
    except TypeError:
        return False


# ============================================================================================ knobs


_ODD = object()
"""The bucket of a value an index cannot hold (unhashable): such a row is a candidate for every probe."""


class _FieldIndex:
    """Equality index of one field of one entity set: comparable value (`_comparable`, as `evaluate` compares)
    -> row keys. It only narrows the rows a filter is evaluated on, never decides a match by itself."""

    __slots__ = ("buckets", "field", "odd", "of")

    def __init__(self, field_name: str) -> None:
        self.field = field_name
        self.buckets: dict[Any, set[tuple[str, ...]]] = {}
        self.odd: set[tuple[str, ...]] = set()
        self.of: dict[tuple[str, ...], Any] = {}
        """key -> the bucket it sits in (`_ODD` for `odd`)."""

    def put(self, key: tuple[str, ...], row: Mapping[str, Any]) -> None:
        try:
            value = _comparable(self.field, row.get(self.field))
            hash(value)
        except TypeError:
            value = _ODD
        if key in self.of:
            old = self.of[key]
            if old is not _ODD and value is not _ODD and old == value:
                return  # equal values share a bucket
            self._drop(key, old)
        self.of[key] = value
        if value is _ODD:
            self.odd.add(key)
        else:
            self.buckets.setdefault(value, set()).add(key)

    def remove(self, key: tuple[str, ...]) -> None:
        if key in self.of:
            self._drop(key, self.of.pop(key))

    def _drop(self, key: tuple[str, ...], value: Any) -> None:
        if value is _ODD:
            self.odd.discard(key)
            return
        bucket = self.buckets.get(value)
        if bucket is not None:
            bucket.discard(key)
            if not bucket:
                del self.buckets[value]

    def probe(self, value: Any) -> set[tuple[str, ...]] | None:
        """Keys of the rows whose field may equal `value` (comparable form); None if it cannot be looked up."""
        try:
            bucket = self.buckets.get(value)
        except TypeError:
            return None
        return self.odd | bucket if bucket else set(self.odd)


class _Row(dict[str, Any]):
    """A stored row that tells the entity set holding it when it changes in place (`row.update(...)`,
    `row[f] = v`), so that the set's field indexes stay in step with every write."""

    __slots__ = ("_holder",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._holder: tuple[_Rows, tuple[str, ...]] | None = None

    def _changed(self) -> None:
        holder = getattr(self, "_holder", None)
        if holder is not None:
            holder[0].reindex(holder[1], self)

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        self._changed()

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self._changed()

    def __ior__(self, other: Any) -> _Row:  # type: ignore[override,misc]
        super().update(other)
        self._changed()
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def setdefault(self, name: str, default: Any = None) -> Any:
        value = super().setdefault(name, default)
        self._changed()
        return value

    def pop(self, *args: Any) -> Any:
        value = super().pop(*args)
        self._changed()
        return value

    def popitem(self) -> tuple[str, Any]:
        item = super().popitem()
        self._changed()
        return item

    def clear(self) -> None:
        super().clear()
        self._changed()


class _Rows(dict[tuple[str, ...], dict[str, Any]]):
    """The rows of one entity set by key, indexed by the first key field: every navigation links a child to
    its parent through the child's first key field (SalesOrder of an item, AddressID of a phone number).

    Equality filters (`F eq 'a' or F eq 'b' ...`) are answered from a per-field index, built on the first such
    filter on the field and kept in step with every write after: rows stored, replaced and deleted here, and
    `_Row`s changed in place. A row that is not a `_Row` (or is held by another set) cannot report changes, so it
    is `loose`: a candidate for every filter."""

    def __init__(self, rows: Mapping[tuple[str, ...], dict[str, Any]] | None = None) -> None:
        super().__init__()
        self._by_first: dict[str, dict[tuple[str, ...], None]] = {}
        self._seq: dict[tuple[str, ...], int] = {}
        """key -> its position in the set (a dict's insertion order: an indexed answer is ordered as a scan)."""
        self._next_seq = 0
        self._indexes: dict[str, _FieldIndex] = {}
        self._loose: set[tuple[str, ...]] = set()
        for key, row in (rows or {}).items():
            self[key] = row if isinstance(row, _Row) else _Row(row)  # copies (a snapshot): nobody else holds them

    def __setitem__(self, key: tuple[str, ...], row: dict[str, Any]) -> None:
        old = self.get(key)
        if old is None:
            self._by_first.setdefault(key[0], {})[key] = None
            self._seq[key] = self._next_seq
            self._next_seq += 1
        elif old is not row:
            self._release(key, old)
        super().__setitem__(key, row)
        holder = getattr(row, "_holder", None) if isinstance(row, _Row) else None
        if isinstance(row, _Row) and (holder is None or (holder[0] is self and holder[1] == key)):
            row._holder = (self, key)
            self._loose.discard(key)
        else:
            self._loose.add(key)
        for index in self._indexes.values():
            index.put(key, row)

    def __delitem__(self, key: tuple[str, ...]) -> None:
        row = self[key]
        super().__delitem__(key)
        self._by_first.get(key[0], {}).pop(key, None)
        self._seq.pop(key, None)
        self._release(key, row)
        self._loose.discard(key)
        for index in self._indexes.values():
            index.remove(key)

    def _release(self, key: tuple[str, ...], row: dict[str, Any]) -> None:
        holder = getattr(row, "_holder", None) if isinstance(row, _Row) else None
        if holder is not None and holder[0] is self and holder[1] == key:
            row._holder = None  # type: ignore[attr-defined]

    def reindex(self, key: tuple[str, ...], row: dict[str, Any]) -> None:
        """A held row changed in place: move it in every field index."""
        if self._indexes and self.get(key) is row:
            for index in self._indexes.values():
                index.put(key, row)

    def with_first(self, value: str) -> list[dict[str, Any]]:
        return [self[k] for k in self._by_first.get(value, ())]

    def equal_to(self, name: str, value: Any) -> set[tuple[str, ...]] | None:
        """Keys of the rows whose `name` may equal `value` (comparable form), from the field's index (built now
        if this is the first look-up of `name`); None when the index cannot answer."""
        index = self._indexes.get(name)
        if index is None:
            index = self._indexes[name] = _FieldIndex(name)
            for key, row in self.items():
                index.put(key, row)
        return index.probe(value)

    def in_order(self, keys: Iterable[tuple[str, ...]]) -> list[dict[str, Any]]:
        """The rows of `keys`, and every loose row, in the set's own order (what `values()` would give)."""
        wanted = [k for k in set(keys) | self._loose if k in self._seq]
        wanted.sort(key=self._seq.__getitem__)
        return [self[k] for k in wanted]


def _candidates(node: tuple[Any, ...], table: _Rows) -> set[tuple[str, ...]] | None:
    """Keys of a superset of the rows a parsed filter matches, from field indexes; None = every row (a scan).
    Equality with a literal (not a datetime, which `evaluate` compares in UTC) seeks the field's index; `and`
    narrows to either side, `or` needs both; anything else is a scan."""
    kind = node[0]
    if kind == "and":
        left, right = _candidates(node[1], table), _candidates(node[2], table)
        if left is None or right is None:
            return left if right is None else right
        return left & right
    if kind == "or":
        left = _candidates(node[1], table)
        if left is None:
            return None
        right = _candidates(node[2], table)
        return None if right is None else left | right
    if kind != "cmp" or node[1] != "eq":
        return None
    prop, lit = node[2], node[3]
    if prop[0] == "lit":
        prop, lit = lit, prop
    if prop[0] != "field" or lit[0] != "lit" or isinstance(lit[1], datetime):
        return None
    try:
        value = _comparable(prop[1], lit[1])
    except TypeError:
        return None
    return table.equal_to(prop[1], value)


@dataclass
class _Fault:
    status: int
    path_contains: str | None
    method: str | None
    retry_after: float | None
    headers: dict[str, str]
    after_apply: bool = False


DROP = 0
"""`fail_next` status meaning "the connection is dropped": the client sees a reset, not an HTTP status."""


class _Dropped(Response):
    """A response that starts and never finishes: the server closes the connection mid-answer (a reset)."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        raise ConnectionAbortedError("connection dropped by the simulator's fault knob")


class Faults:
    """Fault knobs: the next N API requests (optionally by path text / method) fail with a status."""

    def __init__(self) -> None:
        self._fail: list[_Fault] = []
        self._lock = threading.Lock()

    def fail_next(self, n: int, status: int, *, path_contains: str | None = None, method: str | None = None,
                  retry_after: float | None = None, headers: Mapping[str, str] | None = None,
                  after_apply: bool = False) -> None:
        """Fail the next `n` matching API requests with `status` (429/503 carry `Retry-After` when given).

        `headers` go on the response, e.g. `{"x-csrf-token": "Required"}` with 403 for a CSRF rejection that
        survives a fresh token. `after_apply`: the request is served (applied) first and only its answer is
        lost: `status` replaces it (a gateway 504 after the write; `DROP`: the connection is dropped).
        """
        with self._lock:
            self._fail.extend(_Fault(status, path_contains, method.upper() if method else None, retry_after,
                                     dict(headers or {}), after_apply) for _ in range(n))

    def throttle_next(self, n: int, *, status: int = 429, retry_after: float = 1.0, method: str | None = None) -> None:
        """Answer the next `n` API requests with 429 (or 503) and `Retry-After: retry_after`."""
        self.fail_next(n, status, method=method, retry_after=retry_after)

    def clear(self) -> None:
        with self._lock:
            self._fail.clear()

    def take(self, method: str, path: str, *, after_apply: bool = False) -> _Fault | None:
        with self._lock:
            for i, fault in enumerate(self._fail):
                if (fault.path_contains is None or fault.path_contains in path) and \
                        (fault.method is None or fault.method == method) and fault.after_apply == after_apply:
                    return self._fail.pop(i)
        return None


@dataclass
class _Session:
    user: str
    token: str


@dataclass
class Material:
    """Customizing of one material: allowed sales units, plants, list price."""

    number: str
    text: str
    base_unit: str
    units: frozenset[str]
    plants: frozenset[str]
    price: Decimal
    group: str = "P001"


@dataclass
class Customizing:
    """The organisational data validation checks against."""

    sales_areas: set[tuple[str, str, str]] = field(default_factory=set)
    plants: set[str] = field(default_factory=set)
    materials: dict[str, Material] = field(default_factory=dict)
    units: set[str] = field(default_factory=lambda: {"PC", "EA", "KG", "G", "L", "M", "ST", "BOX"})
    countries: set[str] = field(default_factory=lambda: {"US", "CA", "MX", "DE", "GB", "FR", "NL", "CH", "JP"})
    currencies: set[str] = field(default_factory=lambda: {"USD", "EUR", "CAD", "MXN", "GBP", "CHF", "JPY"})
    order_types: set[str] = field(default_factory=lambda: {"OR", "TA", "CBFD"})
    groupings: set[str] = field(default_factory=lambda: {"BP01", "BP02", "BP03"})
    roles: set[str] = field(default_factory=lambda: {"FLCU00", "FLCU01", "FLVN00", "FLVN01", "BUP001", "BUP002"})


# ============================================================================================ simulator


class SapSimulator:
    """In-memory S/4HANA with the two OData v2 services, their auth, CSRF, ETags, validation and events."""

    def __init__(self, *, page_size: int = 1000, latency_ms: float = 0.0, operation_latency_ms: float = 0.0,
                 event_verify: Any = True, user: str = "SYNCLINE_COMM", password: str = "Init-Passw0rd!",
                 client_id: str = "SYNCLINE_OAUTH", client_secret: str = "oauth-s3cret") -> None:
        self.page_size = page_size
        self.latency_ms = latency_ms
        """Per HTTP request (network and Gateway overhead): a $batch pays it once."""
        self.operation_latency_ms = operation_latency_ms
        """Per operation processed (backend work): a $batch pays it once per part."""
        self.user, self.password = user, password
        self.client_id, self.client_secret = client_id, client_secret
        self.customizing = Customizing()
        self.faults = Faults()
        self.request_counts: Counter[str] = Counter()
        """"api" (OData requests), methods, "csrf_fetch", "csrf_rejected", "token", and every status code."""
        self.requests: list[tuple[str, str]] = []
        """(method, path + query) of every OData request, for tests."""
        self.batch_requests: list[tuple[str, str]] = []
        """(method, path + query) of every operation inside a $batch, for tests."""
        self.stock: dict[tuple[str, str], Decimal] = {}
        """(material, plant) -> unrestricted stock in the base unit (what DetermineAvailabilityAt answers)."""
        self._event_buffer: list[dict[str, Any]] | None = None
        self.events: list[dict[str, Any]] = []
        """Every CloudEvent raised (delivered or not)."""
        self.event_endpoints: list[str] = []
        self._endpoint_headers: dict[str, dict[str, str]] = {}
        self.event_failures: list[str] = []
        self.emit_events = True
        self._lock = threading.RLock()
        self._rows: dict[str, _Rows] = {name: _Rows() for name in ENTITIES}
        self._sessions: dict[str, _Session] = {}
        self._tokens: dict[str, str] = {}
        self._numbers = {"SalesOrder": 4000100, "BusinessPartner": 1000100, "AddressID": 28100,
                         "ConditionRecord": 2000}
        self._last_stamp = datetime(2000, 1, 1, tzinfo=UTC)
        self._deliveries = Deliverer("sap-sim-events", verify=event_verify)
        self._metadata_cache: dict[str, bytes] = {}
        methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "MERGE", "DELETE"]
        self.app = Starlette(routes=[
            Route(TOKEN_PATH, self._token, methods=["POST"]),
            Route(SERVICE_PREFIX + "{service}/", self._api, methods=methods),
            Route(SERVICE_PREFIX + "{service}/{rest:path}", self._api, methods=methods),
        ])

    # ------------------------------------------------------------------------------------ knobs

    @property
    def request_count(self) -> int:
        """OData API requests received (token endpoint calls excluded)."""
        return self.request_counts["api"]

    def expire_csrf_tokens(self) -> None:
        """End every session: its CSRF token and session cookie are no longer valid (next write gets 403)."""
        with self._lock:
            self._sessions.clear()

    def expire_oauth_tokens(self) -> None:
        """Invalidate every OAuth access token issued so far (the next API call gets 401)."""
        with self._lock:
            self._tokens.clear()

    def add_sales_area(self, sales_org: str, channel: str, division: str) -> None:
        self.customizing.sales_areas.add((sales_org, channel, division))

    def add_material(self, number: str, text: str, base_unit: str, *, units: Iterable[str] = (),
                     plants: Iterable[str], price: str | Decimal, group: str = "P001",
                     stock: Mapping[str, str | int | Decimal] | None = None) -> None:
        """Customizing of a material plus what the product, pricing and availability APIs serve for it.

        Creates the A_Product with its English (and German) description and one A_ProductPlant per plant, a
        PR00 condition record with the list price for every sales organisation / distribution channel known
        so far (1710/10 when none is), and the unrestricted stock per plant (`stock`, default 0).
        """
        plants = list(plants)
        self.customizing.plants.update(plants)
        material = Material(number, text, base_unit, frozenset({base_unit, *units}), frozenset(plants),
                            Decimal(price), group)
        with self._lock:
            self.customizing.materials[number] = material
            today = datetime.combine(datetime.now(UTC).date(), time(), UTC)
            self._rows["A_Product"][(number,)] = {
                **_blank(_PRODUCT_FIELDS), "Product": number, "ProductType": "FERT", "CrossPlantStatus": "",
                "CreationDate": today, "CreatedByUser": "CB9980000010", "LastChangeDate": today,
                "LastChangedByUser": "CB9980000010", "LastChangeDateTime": self._now(), "IsMarkedForDeletion": False,
                "GrossWeight": "0.000", "NetWeight": "0.000", "WeightUnit": "KG", "ProductGroup": group,
                "BaseUnit": base_unit, "Division": DIVISION, "ItemCategoryGroup": "NORM"}
            self._rows["A_ProductDescription"][(number, "EN")] = {"Product": number, "Language": "EN",
                                                                  "ProductDescription": text}
            self._rows["A_ProductDescription"][(number, "DE")] = {"Product": number, "Language": "DE",
                                                                  "ProductDescription": f"{text} (DE)"}
            for plant in plants:
                self._rows["A_ProductPlant"][(number, plant)] = {
                    "Product": number, "Plant": plant, "AvailabilityCheckType": "02", "MRPType": "PD",
                    "ProcurementType": "E", "ProfitCenter": f"YB{plant[:2]}0", "IsMarkedForDeletion": False}
                self.stock[(number, plant)] = Decimal(str((stock or {}).get(plant, 0)))
            areas = sorted({a[:2] for a in self.customizing.sales_areas}) or [(SALES_ORG, DISTRIBUTION_CHANNEL)]
            for org, channel in areas:
                self._set_condition(number, org, channel, material.price)

    def set_stock(self, material: str, plant: str, qty: str | int | float | Decimal) -> None:
        """Unrestricted stock of `material` in `plant` (base unit): DetermineAvailabilityAt answers it from now."""
        with self._lock:
            if material not in self.customizing.materials:
                raise KeyError(f"unknown material {material!r}")
            if plant not in self.customizing.materials[material].plants:
                raise KeyError(f"material {material} is not maintained in plant {plant}")
            self.stock[(material, plant)] = Decimal(str(qty))

    def set_price(self, material: str, price: str | int | float | Decimal, *, sales_org: str | None = None,
                  channel: str | None = None) -> None:
        """Change the PR00 list price of `material` (all its condition records, or the one of org/channel).

        Without org/channel the material's order pricing (item NetAmount) follows too, as it would in SAP.
        """
        with self._lock:
            if material not in self.customizing.materials:
                raise KeyError(f"unknown material {material!r}")
            value = Decimal(str(price))
            if sales_org is None and channel is None:
                self.customizing.materials[material].price = value
                areas = {(v["SalesOrganization"], v["DistributionChannel"])
                         for v in self._rows["A_SlsPrcgCndnRecdValidity"].values()
                         if v["Material"] == material and v["ConditionType"] == "PR00"} or \
                    {(SALES_ORG, DISTRIBUTION_CHANNEL)}
            else:
                areas = {(sales_org or SALES_ORG, channel or DISTRIBUTION_CHANNEL)}
            for org, chan in sorted(areas):
                self._set_condition(material, org, chan, value)

    def _set_condition(self, material: str, org: str, channel: str, price: Decimal) -> None:
        """The PR00 record of material/org/channel valid today: changed in place, or created."""
        for validity in self._rows["A_SlsPrcgCndnRecdValidity"].values():
            if (validity["Material"], validity["SalesOrganization"], validity["DistributionChannel"],
                    validity["ConditionType"]) == (material, org, channel, "PR00"):
                record = self._rows["A_SlsPrcgConditionRecord"][(validity["ConditionRecord"],)]
                record["ConditionRateValue"] = _decimal_text("ConditionRateValue", price)
                return
        number = f"{int(self._next_number('ConditionRecord')):010d}"
        start, end = datetime(2020, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC)
        unit = self.customizing.materials[material].base_unit
        self._rows["A_SlsPrcgConditionRecord"][(number,)] = {
            **_blank(_CONDITION_FIELDS), "ConditionRecord": number, "ConditionSequentialNumber": "01",
            "ConditionTable": "304", "ConditionApplication": "V", "ConditionType": "PR00",
            "ConditionValidityStartDate": start, "ConditionValidityEndDate": end, "CreatedByUser": "CB9980000010",
            "CreationDate": datetime(2020, 1, 1, tzinfo=UTC), "ConditionCalculationType": "C",
            "ConditionRateValue": _decimal_text("ConditionRateValue", price), "ConditionRateValueUnit": "USD",
            "ConditionQuantity": "1", "ConditionQuantityUnit": unit, "BaseUnit": unit, "ConditionIsDeleted": False,
            "ConditionCurrency": "USD"}
        self._rows["A_SlsPrcgCndnRecdValidity"][(number, str(end))] = {
            **_blank(_VALIDITY_FIELDS), "ConditionRecord": number, "ConditionValidityEndDate": end,
            "ConditionValidityStartDate": start, "ConditionApplication": "V", "ConditionType": "PR00",
            "ConditionReleaseStatus": "", "SalesOrganization": org, "DistributionChannel": channel, "Division": "",
            "Customer": "", "Material": material, "MaterialGroup": "", "Plant": ""}

    def register_event_endpoint(self, url: str, *, headers: Mapping[str, str] | None = None) -> None:
        """CloudEvents of every create/change are POSTed to `url` (like an Event Mesh webhook subscription),
        with `headers` on each delivery (the subscription's configured authentication header, say)."""
        self.event_endpoints.append(url)
        self._endpoint_headers[url] = dict(headers or {})

    async def flush_events(self, timeout: float = 10.0) -> None:
        """Wait until every queued event delivery has finished (delivered or failed)."""
        await self._deliveries.flush(timeout)

    def close(self) -> None:
        """Stop the event delivery thread."""
        self._deliveries.close()

    # ------------------------------------------------------------------------------------ data access

    def get(self, entity: str, *key: str) -> dict[str, Any] | None:
        """A stored row (internal form: dates as datetime) by key values, or None."""
        with self._lock:
            row = self._rows[entity].get(tuple(key))
            return dict(row) if row is not None else None

    def all(self, entity: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._rows[entity].values()]

    def items_of(self, sales_order: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._children("A_SalesOrder", self._rows["A_SalesOrder"][(sales_order,)],
                                                    "to_Item")]

    def insert(self, entity: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Add a row directly (seeding: no validation, no event); values in stored form."""
        definition = ENTITIES[entity]
        with self._lock:
            row = _blank(definition.fields)
            row.update(values)
            key = tuple(str(row[k]) for k in definition.keys)
            if entity == "A_SalesOrder":
                row["LastChangeDateTime"] = row.get("LastChangeDateTime") or self._now()
            if entity == "A_SalesOrderItem":
                row["_stamp"] = self._now()
            if entity == "A_BusinessPartner":
                self._bp_stamp(row, created=True)
            self._rows[entity][key] = row
            return row

    def apply_change(self, entity: str, key: tuple[str, ...], changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change a sales order or business partner as a user in the SAP UI would (stamps, ETag, event)."""
        with self._lock:
            row = self._rows[entity][key]
            row.update(changes)
            self._touch(entity, row)
            return dict(row)

    def advance_order(self, sales_order: str, stage: str) -> dict[str, Any]:
        """Move an order on: "delivered" (outbound delivery created), "goods_issued", "billed".

        Delivered: OverallDeliveryStatus and the items' DeliveryStatus become C, processing B. Goods issued:
        OverallTotalDeliveryStatus C. Billed: OverallOrdReltdBillgStatus and the items' OrderRelatedBillingStatus
        C, OverallSDProcessStatus C (completed). LastChangeDateTime moves and a Changed event is raised.
        """
        with self._lock:
            order = self._rows["A_SalesOrder"][(sales_order,)]
            items = self._children("A_SalesOrder", order, "to_Item")
            if stage == "delivered":
                order.update(OverallDeliveryStatus="C", OverallSDProcessStatus="B")
                for item in items:
                    item.update(DeliveryStatus="C", SDProcessStatus="B")
            elif stage == "goods_issued":
                order.update(OverallDeliveryStatus="C", OverallTotalDeliveryStatus="C", OverallSDProcessStatus="B")
                for item in items:
                    item.update(DeliveryStatus="C", SDProcessStatus="B")
            elif stage == "billed":
                order.update(OverallOrdReltdBillgStatus="C", OverallSDProcessStatus="C")
                for item in items:
                    item.update(OrderRelatedBillingStatus="C", SDProcessStatus="C")
            else:
                raise ValueError(f"unknown stage {stage!r} (delivered, goods_issued, billed)")
            for item in items:
                item["_stamp"] = self._now()
            self._touch("A_SalesOrder", order)
            return dict(order)

    # ------------------------------------------------------------------------------------ stamps and events

    def _now(self) -> datetime:
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        if now <= self._last_stamp:
            now = self._last_stamp + timedelta(milliseconds=1)
        self._last_stamp = now
        return now

    def _bp_stamp(self, row: dict[str, Any], *, created: bool) -> None:
        # BUT000 keeps dates and times to the second. The ETag adds the milliseconds of the (strictly increasing)
        # change clock so that two changes within one second still differ; clients treat it as opaque anyway.
        moment = self._now()
        now = moment.replace(microsecond=0)
        if created:
            row["CreationDate"] = row.get("CreationDate") or datetime.combine(now.date(), time(), UTC)
            row["CreationTime"] = row.get("CreationTime") or now.time()
            row["CreatedByUser"] = row.get("CreatedByUser") or self.user
        else:
            row["LastChangeDate"] = datetime.combine(now.date(), time(), UTC)
            row["LastChangeTime"] = now.time()
            row["LastChangedByUser"] = self.user
        by = self.user if not created else str(row.get("CreatedByUser") or self.user)
        row["ETag"] = f"{by}{moment.strftime('%Y%m%d%H%M%S')}{moment.microsecond // 1000:03d}"

    def _touch(self, entity: str, row: dict[str, Any], *, created: bool = False) -> None:
        if entity == "A_SalesOrder":
            row["LastChangeDateTime"] = self._now()
            if not created:
                row["LastChangeDate"] = datetime.combine(row["LastChangeDateTime"].date(), time(), UTC)
            self._event(SALES_ORDER_CREATED if created else SALES_ORDER_CHANGED, {
                "SalesOrder": row["SalesOrder"], "SalesOrderType": row.get("SalesOrderType"),
                "SalesOrganization": row.get("SalesOrganization"),
                "DistributionChannel": row.get("DistributionChannel"),
                "OrganizationDivision": row.get("OrganizationDivision"), "SoldToParty": row.get("SoldToParty")})
        elif entity == "A_BusinessPartner":
            self._bp_stamp(row, created=created)
            self._event(PARTNER_CREATED if created else PARTNER_CHANGED, {
                "BusinessPartner": row["BusinessPartner"],
                "BusinessPartnerCategory": row.get("BusinessPartnerCategory")})

    def _event(self, event_type: str, data: dict[str, Any]) -> None:
        if not self.emit_events:
            return
        now = datetime.now(UTC)
        event = {"type": event_type, "specversion": "1.0", "source": EVENT_SOURCE, "id": str(uuid.uuid4()),
                 "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "datacontenttype": "application/json",
                 "data": {**data, "EventRaisedDateTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
        if self._event_buffer is not None:
            # Inside a $batch changeset: raised only when the changeset commits.
            self._event_buffer.append(event)
            return
        self._raise_event(event)

    def _raise_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        body = json.dumps(event).encode()
        for url in list(self.event_endpoints):
            self._deliveries.submit(self._delivery(url, body))

    def _delivery(self, url: str, body: bytes) -> Callable[[httpx.AsyncClient], Any]:
        async def deliver(client: httpx.AsyncClient) -> None:
            try:
                response = await client.post(url, content=body, headers={
                    **self._endpoint_headers.get(url, {}), "Content-Type": "application/cloudevents+json"})
                if response.status_code >= 300:
                    self.event_failures.append(f"{url}: HTTP {response.status_code}")
            except httpx.HTTPError as exc:
                self.event_failures.append(f"{url}: {type(exc).__name__}: {exc}")

        return deliver

    # ------------------------------------------------------------------------------------ relations

    def _children(self, entity: str, parent: Mapping[str, Any], nav_name: str) -> list[dict[str, Any]]:
        nav = ENTITIES[entity].navs[nav_name]
        table = self._rows[nav.target]
        if len(nav.link) == 1 and nav.link[0][0] == ENTITIES[nav.target].keys[0]:
            value = parent.get(nav.link[0][1])
            rows = table.with_first(str(value)) if value is not None else []
        else:
            rows = [r for r in table.values()
                    if all(r.get(child) == parent.get(par) and parent.get(par) is not None for child, par in nav.link)]
        return sorted(rows, key=lambda r: _sort_key(nav.target, r))

    def _next_number(self, kind: str) -> str:
        self._numbers[kind] += 1
        return str(self._numbers[kind])

    # ------------------------------------------------------------------------------------ HTTP: auth

    def _authenticate(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                user = password = ""
            if user.upper() == self.user.upper() and password == self.password:
                return self.user
        elif scheme.lower() == "bearer":
            with self._lock:
                owner = self._tokens.get(value)
            if owner is not None:
                return owner
        raise GatewayError(401, "/IWFND/CM_CONSUMER/101", "Logon failed: user, password or token is not valid",
                           headers={"WWW-Authenticate": f'Basic realm="SAP NetWeaver Application Server '
                                                        f'[{SYSTEM_ID}/{SAP_CLIENT}]"'})

    async def _token(self, request: Request) -> Response:
        self.request_counts["token"] += 1
        form = dict(parse_qsl((await request.body()).decode()))
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                client_id, _, secret = base64.b64decode(value).decode().partition(":")
            except ValueError:
                client_id = secret = ""
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type",
                                 "error_description": "grant_type must be client_credentials"}, status_code=400)
        if client_id != self.client_id or secret != self.client_secret:
            return JSONResponse({"error": "invalid_client", "error_description": "Client authentication failed"},
                                status_code=401)
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = self.user
        return JSONResponse({"access_token": token, "token_type": "Bearer", "expires_in": 3600,
                             "scope": "API_BUSINESS_PARTNER_0001 API_SALES_ORDER_SRV_0001"})

    # ------------------------------------------------------------------------------------ HTTP: dispatch

    async def _api(self, request: Request) -> Response:
        lost = self.faults.take(request.method.upper(), request.url.path, after_apply=True)
        response = await self._serve(request)
        if lost is None:
            return response
        if lost.status == DROP:
            return _Dropped()
        text = f"Injected fault after the request was served (HTTP {lost.status})"
        return _json_response(GatewayError(lost.status, "/IWFND/CM_BEC/026", text).body(
            request.path_params["service"]), lost.status, {})

    async def _serve(self, request: Request) -> Response:
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        method = request.method.upper()
        path = request.url.path
        query_text = request.url.query
        service = request.path_params["service"]
        with self._lock:
            self.request_counts["api"] += 1
            self.request_counts[method] += 1
            self.requests.append((method, path + (f"?{query_text}" if query_text else "")))
        body = await request.body()
        out_headers: dict[str, str] = {}
        cookies: dict[str, str] | None = None
        xml = False
        try:
            fault = self.faults.take(method, path)
            if fault is not None and fault.status == DROP:
                return _Dropped()
            if fault is not None:
                extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
                extra.update(fault.headers)
                if fault.status == 403 and fault.headers.get("x-csrf-token") == "Required":
                    self.request_counts["csrf_rejected"] += 1
                    return Response("CSRF token validation failed", status_code=403, media_type="text/plain",
                                    headers=extra)
                text = {429: "Too many requests: the rate limit of the communication user was exceeded",
                        503: "Service unavailable: the backend is overloaded or under maintenance"}.get(
                            fault.status, f"Injected fault (HTTP {fault.status})")
                raise GatewayError(fault.status, "/IWFND/CM_BEC/026", text, headers=extra)
            if service not in SERVICE_SETS:
                raise GatewayError(404, "/IWFND/MED/170", f"No service found for namespace '/SAP/', name "
                                                          f"'{service}', version '0001'")
            user = self._authenticate(request)
            cookies = self._csrf(request, method, user, out_headers)
            if cookies is None:
                self.request_counts["csrf_rejected"] += 1
                self.request_counts["403"] += 1
                return Response("CSRF token validation failed", status_code=403, media_type="text/plain",
                                headers={"x-csrf-token": "Required"})
            query = dict(parse_qsl(query_text, keep_blank_values=True))
            xml = _negotiate(query.get("$format"), request.headers.get("accept", "")) and method in ("GET", "HEAD")
            base = f"{request.url.scheme}://{request.url.netloc}"
            rest = request.path_params.get("rest", "")
            if rest == "$batch":
                if method != "POST":
                    raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", "$batch is called with POST")
                with self._lock:
                    content, content_type, operations = self._batch(service, request.headers, body, base)
                if self.operation_latency_ms:
                    await asyncio.sleep(self.operation_latency_ms * operations / 1000)
                self.request_counts["202"] += 1
                return self._with_cookies(Response(content, status_code=202, media_type=content_type), cookies,
                                          request)
            if rest.strip("/") == "$metadata":
                if method not in ("GET", "HEAD"):
                    raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", "$metadata is read with GET")
                self.request_counts["200"] += 1
                return self._with_cookies(Response(self._metadata(service), media_type="application/xml",
                                                   headers={**out_headers, "dataserviceversion": "2.0"}),
                                          cookies, request)
            with self._lock:
                # HEAD is a GET without the body (RFC 9110 9.3.2); the server drops the body.
                status, headers, payload = self._dispatch(service, "GET" if method == "HEAD" else method, rest, query,
                                                          request.headers, body, base)
            if self.operation_latency_ms:
                await asyncio.sleep(self.operation_latency_ms / 1000)
            out_headers.update(headers)
        except GatewayError as exc:
            self.request_counts[str(exc.status)] += 1
            # The Gateway sets the session cookies of a CSRF fetch on any answer, an error too.
            error = _xml_error(exc, service) if xml else _json_response(exc.body(service), exc.status, {})
            error.headers.update({**out_headers, **exc.headers})
            return self._with_cookies(error, cookies, request)
        self.request_counts[str(status)] += 1
        if isinstance(payload, _Count):
            response: Response = Response(str(payload.value), status_code=status, headers=out_headers,
                                          media_type="text/plain")
        elif payload is None:
            response = Response(status_code=status, headers=out_headers)
        elif xml:
            content, media_type = _atom(service, rest, payload, base)
            response = Response(content, status_code=status if content else 204, headers=out_headers,
                                media_type=media_type)
        else:
            response = _json_response(payload, status, out_headers)
        return self._with_cookies(response, cookies, request)

    @staticmethod
    def _with_cookies(response: Response, cookies: Mapping[str, str] | None, request: Request) -> Response:
        for name, value in (cookies or {}).items():
            response.set_cookie(name, value, path="/", secure=request.url.scheme == "https", httponly=True)
        return response

    def _metadata(self, service: str) -> bytes:
        cached = self._metadata_cache.get(service)
        if cached is None:
            cached = self._metadata_cache[service] = metadata(service)
        return cached

    def _csrf(self, request: Request, method: str, user: str, out: dict[str, str]) -> dict[str, str] | None:
        """Cookies to set (empty dict: none), or None when a modifying request fails CSRF validation."""
        sid = request.cookies.get(SESSION_COOKIE)
        with self._lock:
            session = self._sessions.get(sid or "")
            if session is not None and session.user != user:
                session = None
            if method in MODIFYING:
                token = request.headers.get("x-csrf-token", "")
                if session is None or not token or not secrets.compare_digest(token, session.token):
                    return None
                return {}
            if request.headers.get("x-csrf-token", "").lower() != "fetch":
                return {}
            self.request_counts["csrf_fetch"] += 1
            cookies: dict[str, str] = {}
            if session is None:
                sid = secrets.token_urlsafe(24)
                session = _Session(user, secrets.token_urlsafe(18))
                self._sessions[sid] = session
                cookies = {SESSION_COOKIE: sid, "sap-usercontext": f"sap-client={SAP_CLIENT}"}
            out["x-csrf-token"] = session.token
            return cookies

    def _dispatch(self, service: str, method: str, rest: str, query: dict[str, str], headers: Mapping[str, str],
                  body: bytes, base: str) -> tuple[int, dict[str, str], Any]:
        if rest.rstrip("/").endswith("/$count"):
            # GET <collection>/$count: the number of entities the collection addresses after $filter, as text/plain
            # (MS-ODATA 2.2.7.2.10 RetrieveCount; $top, $skip and paging do not cut it here).
            if method not in ("GET", "HEAD"):
                raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", "$count is read with GET")
            inner = rest.rstrip("/")[:-len("/$count")]
            counting = {k: v for k, v in query.items() if k == "$filter"} | {"$inlinecount": "allpages", "$top": "0"}
            _, _, payload = self._dispatch(service, "GET", inner, counting, headers, b"", base)
            data = payload.get("d") if isinstance(payload, dict) else None
            if not isinstance(data, dict) or "results" not in data:
                return 200, {}, _Count(0 if data is None else 1)
            return 200, {}, _Count(int(data["__count"]))
        if rest.strip("/") == "":
            if method not in ("GET", "HEAD"):
                raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", "Method not allowed on the service document")
            return 200, {}, {"d": {"EntitySets": SERVICE_SETS[service]}}
        if rest.strip("/") in {f.name for f in FUNCTION_IMPORTS.get(service, ())}:
            if method != "GET":
                raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Function import {rest} is called with GET")
            return self._availability(query)
        entity, raw_key, nav = _parse_resource(rest)
        if entity not in ENTITIES or ENTITIES[entity].service != service:
            raise GatewayError(404, "/IWBEP/CM_MGW_RT/021", f"Resource not found for segment '{entity}'")
        definition = ENTITIES[entity]
        if entity in READ_ONLY and method not in ("GET", "HEAD"):
            raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Method '{entity.upper()}_{method}' not implemented in "
                                                            "data provider class (read-only in this simulator)")
        ktuple: tuple[str, ...] | None = None
        if raw_key is not None:
            named = {k: v for k, v in raw_key.items() if k is not None}
            if None in raw_key and len(definition.keys) == 1:
                named = {definition.keys[0]: raw_key[None]}
            if set(named) != set(definition.keys):
                raise _bad("/IWBEP/CM_MGW_RT/020", f"The key predicate of '{entity}' must give "
                                                   f"{', '.join(definition.keys)}")
            ktuple = tuple(named[k] for k in definition.keys)
        row = self._rows[entity].get(ktuple) if ktuple is not None else None
        if ktuple is not None and row is None:
            # As in SAP's published API_PRODUCT_SRV error sample: 404 /IWBEP/CM_MGW_RT/020 "Resource not found for
            # segment 'A_ProductType'" (the entity type's name).
            raise GatewayError(404, "/IWBEP/CM_MGW_RT/020" if entity != "A_SalesOrder" else "V1/302",
                               f"Resource not found for segment '{definition.type_name}'" if entity != "A_SalesOrder"
                               else f"SD document {ktuple[0]} is not in the database or has been archived")
        if nav is not None:
            if row is None or nav not in definition.navs:
                raise GatewayError(404, "/IWBEP/CM_MGW_RT/021", f"Resource not found for segment '{nav}'")
            target = definition.navs[nav]
            if method == "POST" and target.many:
                values = self._json(body, target.target)
                created = self._create_child(entity, row, nav, values)
                return 201, self._location(target.target, created, base), {
                    "d": self._public(target.target, created, base, None, set())}
            if method != "GET":
                raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Method {method} not allowed on '{nav}'")
            children = self._children(entity, row, nav)
            if target.many:
                return self._collection(target.target, children, query, base, rest)
            return 200, {}, {"d": self._public(target.target, children[0], base, _select(query), _expand(query))
                             if children else None}
        if row is not None:
            assert ktuple is not None
            if method in ("GET", "HEAD"):
                etag = self._etag(entity, row)
                return 200, {"etag": etag} if etag else {}, {
                    "d": self._public(entity, row, base, _select(query), _expand(query))}
            self._check_if_match(entity, row, headers)
            if method == "DELETE":
                self._delete(entity, ktuple, row)
                return 204, {}, None
            if method in ("PATCH", "MERGE", "PUT"):
                self._update(entity, row, self._json(body, entity))
                etag = self._etag(entity, row)
                return 204, {"etag": etag} if etag else {}, None
            raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Method {method} not allowed on an entity")
        if method == "POST":
            values = self._json(body, entity)
            if entity == "A_SalesOrder":
                created = self._create_order(values)
            elif entity == "A_BusinessPartner":
                created = self._create_partner(values)
            else:
                raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Create {entity} through its parent's navigation "
                                                                "property")
            return 201, self._location(entity, created, base), {
                "d": self._public(entity, created, base, None, set(definition.navs))}
        if method != "GET":
            raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Method {method} not allowed on an entity set")
        return self._collection(entity, None, query, base, rest)

    # ------------------------------------------------------------------------------------ $batch

    def _batch(self, service: str, headers: Mapping[str, str], body: bytes, base: str) -> tuple[bytes, str, int]:
        """Run an OData v2 $batch: (multipart/mixed response body, its content type, operations processed).

        Retrieve parts (GET) stand alone; every changeset is one unit of work: its requests run in order,
        `$<Content-ID>` at the start of a URL names an entity created earlier in the same changeset, and the
        first failing request rolls the whole changeset back and is its only answer. Numbers drawn by the
        rolled-back requests stay used, as SAP's buffered number ranges do.
        """
        content_type = headers.get("content-type", "")
        boundary = _boundary(content_type)
        if not content_type.lower().startswith("multipart/mixed") or not boundary:
            raise _bad("/IWBEP/CM_MGW_RT/015", "A $batch request needs Content-Type multipart/mixed with a boundary")
        self.request_counts["batch"] += 1
        out: list[bytes] = []
        operations = 0
        for part in _multipart(body, boundary):
            part_headers, part_body = _head(part)
            part_type = part_headers.get("content-type", "").lower()
            if part_type.startswith("multipart/mixed"):
                self.request_counts["batch_changesets"] += 1
                inner = _boundary(part_headers["content-type"])
                requests = [_http_request(p) for p in _multipart(part_body, inner)] if inner else []
                operations += len(requests)
                out.append(self._changeset(service, requests, base))
                continue
            operations += 1
            if not part_type.startswith("application/http"):
                out.append(_http_part(_error_answer(service, _bad(
                    "/IWBEP/CM_MGW_RT/015", f"Unexpected batch part of type {part_type or 'none'}"))))
                continue
            request = _http_request(part)
            if request.method != "GET":
                out.append(_http_part(_error_answer(service, _bad(
                    "/IWBEP/CM_MGW_RT/016", f"{request.method} is only allowed inside a changeset"))))
                continue
            out.append(_http_part(self._batch_operation(service, request, base, {})))
        answer_boundary = f"batch_{uuid.uuid4()}"
        content = b"".join(b"--" + answer_boundary.encode() + b"\r\n" + p + b"\r\n" for p in out)
        content += b"--" + answer_boundary.encode() + b"--\r\n"
        return content, f"multipart/mixed; boundary={answer_boundary}", operations

    def _changeset(self, service: str, requests: list[_BatchRequest], base: str) -> bytes:
        if not requests:
            return _http_part(_error_answer(service, _bad("/IWBEP/CM_MGW_RT/015", "Empty changeset")))
        # Single-request changesets behave as the request alone would; longer ones need a snapshot to undo.
        saved = self._snapshot(service) if len(requests) > 1 else None
        self._event_buffer = []
        created: dict[str, str] = {}
        answers: list[tuple[str | None, _Answer]] = []
        try:
            for request in requests:
                if request.method == "GET":
                    answer = _error_answer(service, _bad("/IWBEP/CM_MGW_RT/016",
                                                         "GET is not allowed inside a changeset"))
                else:
                    answer = self._batch_operation(service, request, base, created)
                if answer.status >= 400:
                    if saved is not None:
                        self._restore(saved)
                    self.request_counts["batch_changesets_failed"] += 1
                    return _http_part(answer)
                location = answer.headers.get("location")
                if request.content_id and location:
                    created[request.content_id] = location.split(f"{SERVICE_PREFIX}{service}/", 1)[-1]
                answers.append((request.content_id, answer))
            events = self._event_buffer
        finally:
            self._event_buffer = None
        for event in events:
            self._raise_event(event)
        inner = f"changeset_{uuid.uuid4()}"
        content = b"".join(b"--" + inner.encode() + b"\r\n" + _http_part(a, cid) + b"\r\n" for cid, a in answers)
        content += b"--" + inner.encode() + b"--"
        return f"Content-Type: multipart/mixed; boundary={inner}\r\n\r\n".encode() + content

    def _batch_operation(self, service: str, request: _BatchRequest, base: str, created: Mapping[str, str]) -> _Answer:
        target = request.url
        if target.startswith("$"):
            ref, _, tail = target[1:].partition("/")
            if ref not in created:
                return _error_answer(service, _bad("/IWBEP/CM_MGW_RT/017", f"Content-ID ${ref} is not defined in "
                                                                          "this changeset"))
            target = created[ref] + ("/" + tail if tail else "")
        path, _, query_text = target.partition("?")
        if path.startswith(("http://", "https://")):
            path = "/" + path.split("/", 3)[-1]
        # A part's request line is a request URI as on its own, so it is percent-decoded like a top-level one:
        # `A_BusinessPartner%28%2717100001%27%29` names A_BusinessPartner('17100001').
        path = unquote(path)
        prefix = f"{SERVICE_PREFIX}{service}/"
        if path.startswith("/"):
            if not path.startswith(prefix):
                return _error_answer(service, GatewayError(
                    400, "/IWBEP/CM_MGW_RT/018", f"Batch operation {path} is not in service {service}"))
            path = path[len(prefix):]
        self.request_counts["batch_parts"] += 1
        self.batch_requests.append((request.method, prefix + path + (f"?{query_text}" if query_text else "")))
        try:
            status, headers, payload = self._dispatch(service, request.method, path,
                                                      dict(parse_qsl(query_text, keep_blank_values=True)),
                                                      request.headers, request.body, base)
        except GatewayError as exc:
            self.request_counts[str(exc.status)] += 1
            return _error_answer(service, exc)
        self.request_counts[str(status)] += 1
        return _Answer(status, headers, _json_text(payload) if payload is not None else b"")

    def _snapshot(self, service: str) -> dict[str, dict[tuple[str, ...], dict[str, Any]]]:
        return {name: {k: dict(r) for k, r in self._rows[name].items()}
                for name, definition in ENTITIES.items() if definition.service == service}

    def _restore(self, saved: Mapping[str, dict[tuple[str, ...], dict[str, Any]]]) -> None:
        for name, rows in saved.items():
            self._rows[name] = _Rows(rows)

    # ------------------------------------------------------------------------------------ availability

    def _availability(self, query: Mapping[str, str]) -> tuple[int, dict[str, str], Any]:
        """DetermineAvailabilityAt: the unrestricted stock of a material in a plant (no demand is netted)."""
        params: dict[str, Any] = {}
        for name in ("SupplyingPlant", "Material", "ATPCheckingRule", "RequestedUTCDateTime"):
            raw = query.get(name)
            if raw is None:
                if name == "ATPCheckingRule":
                    continue
                raise _bad("/IWBEP/CM_MGW_RT/009", f"Function import parameter '{name}' is missing", name)
            toks = tokenize(raw)
            if len(toks) != 1 or toks[0].kind != "lit":
                raise _bad("/IWBEP/CM_MGW_RT/010", f"Invalid value {raw!r} for function import parameter '{name}'",
                           name)
            params[name] = toks[0].value
        material_no, plant = str(params["Material"]), str(params["SupplyingPlant"])
        requested = params["RequestedUTCDateTime"]
        if not isinstance(requested, datetime):
            raise _bad("/IWBEP/CM_MGW_RT/010", "RequestedUTCDateTime must be a datetimeoffset'...' literal",
                       "RequestedUTCDateTime")
        material = self.customizing.materials.get(material_no)
        if material is None:
            raise _bad("M3/305", f"Material {material_no} does not exist", "Material")
        if plant not in self.customizing.plants:
            raise _bad("M3/300", f"Plant {plant} does not exist", "SupplyingPlant")
        if plant not in material.plants:
            raise _bad("M3/351", f"Material {material_no} is not maintained in plant {plant}", "SupplyingPlant")
        quantity = self.stock.get((material_no, plant), Decimal(0))
        record = {"__metadata": {"type": f"{AVAILABILITY_SERVICE}.AvailabilityRecord"},
                  "PeriodStartUTCDateTime": to_wire("PeriodStartUTCDateTime", requested),
                  "PeriodStartTimeZone": "UTC",
                  "PeriodEndUTCDateTime": to_wire("PeriodEndUTCDateTime", datetime(9999, 12, 31, tzinfo=UTC)),
                  "PeriodEndTimeZone": "UTC",
                  "AvailableQuantityInBaseUnit": _decimal_text("AvailableQuantityInBaseUnit", quantity),
                  "BaseUnit": material.base_unit}
        return 200, {}, {"d": {AVAILABILITY_FUNCTION: record}}

    # ------------------------------------------------------------------------------------ reads

    def _collection(self, entity: str, rows: list[dict[str, Any]] | None, query: Mapping[str, str], base: str,
                    rest: str) -> tuple[int, dict[str, str], Any]:
        """A collection answer; `rows` None means the whole entity set (whose indexes a $filter may use)."""
        table = self._rows[entity]
        if query.get("$filter"):
            node = FilterParser(query["$filter"], entity).parse()
            if rows is None:
                # Equality filters (one field's or-chain, with and) seek the field's index for candidates; the
                # filter is still evaluated on each, in the set's order, so the answer is exactly the scan's.
                keys = _candidates(node, table)
                rows = table.in_order(keys) if keys is not None else list(table.values())
            chain = _any_of(node)
            if chain is not None:
                # "F eq a or F eq b or ...": a set look-up per row instead of walking the chain.
                name, values = chain
                rows = [r for r in rows if _comparable(name, r.get(name)) in values]
            else:
                rows = [r for r in rows if evaluate(node, r)]
        elif rows is None:
            rows = list(table.values())
        rows = sorted(rows, key=lambda r: _sort_key(entity, r))
        fields = ENTITIES[entity].fields
        for part in reversed([p.strip() for p in query.get("$orderby", "").split(",") if p.strip()]):
            name, _, direction = part.partition(" ")
            if name not in fields:
                raise _bad("/IWBEP/CM_MGW_RT/022", f"Property '{name}' not found in type "
                                                   f"'{ENTITIES[entity].type_name}'")

            def order(r: dict[str, Any], n: str = name) -> tuple[bool, Any]:
                value = _comparable(n, r.get(n))
                return value is not None, value if value is not None else ""

            rows.sort(key=order, reverse=direction.strip().lower() == "desc")
        try:
            top = int(query["$top"]) if "$top" in query else None
            skip = int(query.get("$skip", "0"))
            token = int(query.get("$skiptoken", "0"))
        except ValueError:
            raise _bad("/IWBEP/CM_MGW_RT/021", "Invalid value for $top, $skip or $skiptoken") from None
        total = len(rows)
        rows = rows[skip:]
        if top is not None:
            rows = rows[:top]
        page = rows[token:token + self.page_size]
        select, expand = _select(query), _expand(query)
        payload: dict[str, Any] = {"results": [self._public(entity, r, base, select, expand) for r in page]}
        if query.get("$inlinecount") == "allpages":
            payload["__count"] = str(total)
        if token + self.page_size < len(rows):
            params = [(k, v) for k, v in query.items() if k != "$skiptoken"] + \
                     [("$skiptoken", str(token + self.page_size))]
            payload["__next"] = f"{base}{SERVICE_PREFIX}{ENTITIES[entity].service}/{rest}?" + \
                urlencode(params, quote_via=quote, safe="$,'()")
        return 200, {}, {"d": payload}

    def _public(self, entity: str, row: Mapping[str, Any], base: str, select: list[str] | None,
                expand: set[str]) -> dict[str, Any]:
        definition = ENTITIES[entity]
        uri = self._uri(entity, row, base)
        meta: dict[str, Any] = {"id": uri, "uri": uri, "type": f"{definition.service}.{definition.type_name}"}
        etag = self._etag(entity, row)
        if etag:
            meta["etag"] = etag
        out: dict[str, Any] = {"__metadata": meta}
        for name in definition.fields:
            if select is None or name in select or name in definition.keys:
                out[name] = to_wire(name, row.get(name))
        for nav_name, nav in definition.navs.items():
            if select is not None and nav_name not in select and not any(e.split("/")[0] == nav_name for e in expand):
                continue
            if any(e.split("/")[0] == nav_name for e in expand):
                deeper = {e.split("/", 1)[1] for e in expand if e.startswith(nav_name + "/")}
                children = self._children(entity, row, nav_name)
                if nav.many:
                    out[nav_name] = {"results": [self._public(nav.target, c, base, None, deeper) for c in children]}
                else:
                    out[nav_name] = self._public(nav.target, children[0], base, None, deeper) if children else None
            else:
                out[nav_name] = {"__deferred": {"uri": f"{uri}/{nav_name}"}}
        return out

    def _uri(self, entity: str, row: Mapping[str, Any], base: str) -> str:
        definition = ENTITIES[entity]
        keys = definition.keys
        if len(keys) == 1:
            predicate = _key_literal(row[keys[0]])
        else:
            predicate = ",".join(f"{k}={_key_literal(row[k])}" for k in keys)
        return f"{base}{SERVICE_PREFIX}{definition.service}/{entity}({quote(predicate, safe=chr(39) + ',=')})"

    def _location(self, entity: str, row: Mapping[str, Any], base: str) -> dict[str, str]:
        headers = {"location": self._uri(entity, row, base)}
        etag = self._etag(entity, row)
        if etag:
            headers["etag"] = etag
        return headers

    @staticmethod
    def _etag(entity: str, row: Mapping[str, Any]) -> str | None:
        kind = ENTITIES[entity].etag
        if kind == "bp":
            return f"W/\"'{row.get('ETag') or ''}'\""
        if kind == "stamp":
            stamp = row.get("LastChangeDateTime") if entity == "A_SalesOrder" else row.get("_stamp")
            if not isinstance(stamp, datetime):
                return None
            text = stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond:06d}0Z"
            return f"W/\"datetimeoffset'{quote(text, safe='')}'\""
        return None

    def _check_if_match(self, entity: str, row: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        wanted = headers.get("if-match")
        current = self._etag(entity, row)
        if wanted is None:
            if entity in IF_MATCH_REQUIRED:
                raise GatewayError(428, "/IWBEP/CM_MGW_RT/019", f"Precondition required: send If-Match with the ETag "
                                                                f"of {entity} read before the change")
            return
        if wanted != "*" and current is not None and wanted != current:
            raise GatewayError(412, "/IWBEP/CM_MGW_RT/020", f"Precondition failed: {entity} was changed since it was "
                                                            f"read (ETag {current} does not match {wanted})")

    @staticmethod
    def _json(body: bytes, entity: str) -> dict[str, Any]:
        try:
            data = strict_loads(body or b"{}")
        except ValueError:
            raise _bad("/IWBEP/CM_MGW_RT/013", "Malformed request body: the JSON cannot be parsed") from None
        if not isinstance(data, dict):
            raise _bad("/IWBEP/CM_MGW_RT/013", f"Malformed request body: a JSON object of {entity} expected")
        return {k: v for k, v in data.items() if k != "__metadata"}

    def _fields(self, entity: str, values: Mapping[str, Any]) -> dict[str, Any]:
        definition = ENTITIES[entity]
        out: dict[str, Any] = {}
        for name, raw in values.items():
            if name in definition.navs:
                continue
            if name not in definition.fields:
                raise _bad("/IWBEP/CM_MGW_RT/022", f"Property '{name}' is invalid: it is not part of "
                                                   f"'{definition.type_name}'", target=name)
            if name in definition.computed:
                continue
            out[name] = from_wire(entity, name, raw)
        return out

    # ------------------------------------------------------------------------------------ writes: orders

    def _validate_header(self, order: Mapping[str, Any]) -> None:
        cust = self.customizing
        for name in ("SalesOrderType", "SalesOrganization", "DistributionChannel", "OrganizationDivision",
                     "SoldToParty"):
            if not order.get(name):
                raise _bad("V1/390", f"Enter a value in field {name}", target=name)
        if order["SalesOrderType"] not in cust.order_types:
            raise _bad("V1/391", f"Sales document type {order['SalesOrderType']} is not defined", "SalesOrderType")
        org, channel, division = order["SalesOrganization"], order["DistributionChannel"], order["OrganizationDivision"]
        if org not in {a[0] for a in cust.sales_areas}:
            raise _bad("V1/320", f"Sales organization {org} is not defined", "SalesOrganization")
        if (org, channel) not in {a[:2] for a in cust.sales_areas}:
            raise _bad("V1/321", f"Distribution channel {channel} is not defined for sales organization {org}",
                       "DistributionChannel")
        if (org, channel, division) not in cust.sales_areas:
            raise _bad("V1/322", f"Division {division} is not defined for sales organization {org}, distribution "
                                 f"channel {channel}", "OrganizationDivision")
        sold_to = order["SoldToParty"]
        if (sold_to,) not in self._rows["A_Customer"]:
            raise _bad("V1/302", f"Sold-to party {sold_to} does not exist", "SoldToParty")
        area = self._rows["A_CustomerSalesArea"].get((sold_to, org, channel, division))
        if area is None:
            raise _bad("VP/200", f"Sold-to party {sold_to} is not maintained for sales area {org} {channel} "
                                 f"{division}", "SoldToParty")
        if area.get("OrderIsBlockedForCustomer"):
            raise _bad("V1/462", f"Sold-to party {sold_to} is blocked for sales orders in sales area {org} "
                                 f"{channel} {division}", "SoldToParty")

    def _validate_item(self, item: dict[str, Any], order: Mapping[str, Any]) -> None:
        cust = self.customizing
        number = item.get("SalesOrderItem")
        material_no = item.get("Material")
        if not material_no:
            raise _bad("V1/123", f"Item {number}: enter a material", "Material")
        material = cust.materials.get(material_no)
        if material is None:
            raise _bad("M3/305", f"Material {material_no} does not exist (item {number})", "Material")
        unit = item.get("RequestedQuantityUnit") or material.base_unit
        if unit not in cust.units:
            raise _bad("CUNI/005", f"Unit {unit} is not defined; check your entry (item {number})",
                       "RequestedQuantityUnit")
        if unit not in material.units:
            raise _bad("M3/201", f"Unit {unit} is not defined for material {material_no} (allowed: "
                                 f"{', '.join(sorted(material.units))})", "RequestedQuantityUnit")
        item["RequestedQuantityUnit"] = unit
        plant = item.get("ProductionPlant") or sorted(material.plants)[0]
        if plant not in cust.plants:
            raise _bad("M3/300", f"Plant {plant} does not exist (item {number})", "ProductionPlant")
        if plant not in material.plants:
            raise _bad("M3/351", f"Material {material_no} is not maintained in plant {plant}", "ProductionPlant")
        item["ProductionPlant"] = plant
        quantity = Decimal(item.get("RequestedQuantity") or "0")
        if quantity <= 0:
            raise _bad("V1/455", f"Item {number}: enter a quantity greater than zero", "RequestedQuantity")
        item.setdefault("SalesOrderItemCategory", "TAN")
        item["SalesOrderItemText"] = item.get("SalesOrderItemText") or material.text
        item["MaterialGroup"] = material.group
        item["TransactionCurrency"] = order.get("TransactionCurrency")
        item["NetAmount"] = _decimal_text("NetAmount", quantity * material.price)

    def _totals(self, order: dict[str, Any]) -> None:
        items = self._children("A_SalesOrder", order, "to_Item")
        order["TotalNetAmount"] = _decimal_text("TotalNetAmount",
                                                sum((Decimal(i.get("NetAmount") or "0") for i in items), Decimal(0)))

    def _create_order(self, values: dict[str, Any]) -> dict[str, Any]:
        raw_items = values.pop("to_Item", None)
        values.pop("to_Partner", None)
        for name in list(values):
            if name in ENTITIES["A_SalesOrder"].navs:
                raise _bad("/IWBEP/CM_MGW_RT/024", f"Deep insert of '{name}' is not supported with A_SalesOrder")
        if values.get("SalesOrder"):
            raise _bad("V1/008", f"External number {values['SalesOrder']} is not allowed: sales document numbers are "
                                 "assigned internally", "SalesOrder")
        header = self._fields("A_SalesOrder", values)
        header.setdefault("SalesOrderType", "OR")
        self._validate_header(header)
        org, channel, division = header["SalesOrganization"], header["DistributionChannel"], \
            header["OrganizationDivision"]
        area = self._rows["A_CustomerSalesArea"][(header["SoldToParty"], org, channel, division)]
        header["TransactionCurrency"] = header.get("TransactionCurrency") or area.get("Currency")
        if header["TransactionCurrency"] not in self.customizing.currencies:
            raise _bad("V1/410", f"Currency {header['TransactionCurrency']} is not defined", "TransactionCurrency")
        header.setdefault("CustomerPaymentTerms", area.get("CustomerPaymentTerms"))
        header.setdefault("IncotermsClassification", area.get("IncotermsClassification"))
        items_list = raw_items.get("results") if isinstance(raw_items, dict) else raw_items
        if not isinstance(items_list, list) or not items_list:
            raise _bad("V1/555", "The sales document contains no items; send to_Item with at least one item")
        items: list[dict[str, Any]] = []
        seen: set[str] = set()
        for i, raw in enumerate(items_list, start=1):
            if not isinstance(raw, dict):
                raise _bad("/IWBEP/CM_MGW_RT/013", "Each to_Item entry must be a JSON object")
            raw = {k: v for k, v in raw.items() if k not in ("__metadata", "SalesOrder")}
            item = self._fields("A_SalesOrderItem", {k: v for k, v in raw.items()
                                                     if k not in ENTITIES["A_SalesOrderItem"].navs})
            item["SalesOrderItem"] = str(int(item.get("SalesOrderItem") or i * 10))
            if item["SalesOrderItem"] in seen:
                raise _bad("V1/047", f"Item {item['SalesOrderItem']} occurs more than once", "SalesOrderItem")
            seen.add(item["SalesOrderItem"])
            self._validate_item(item, header)
            items.append(item)
        number = self._next_number("SalesOrder")
        now = self._now()
        order = _blank(ENTITIES["A_SalesOrder"].fields)
        order.update(header, SalesOrder=number, CreationDate=datetime.combine(now.date(), time(), UTC),
                     CreatedByUser=self.user, OverallSDProcessStatus="A", OverallTotalDeliveryStatus="A",
                     OverallDeliveryStatus="A", OverallOrdReltdBillgStatus="A", TotalBlockStatus="",
                     OverallSDDocumentRejectionSts="A", TotalCreditCheckStatus="")
        order["SalesOrderDate"] = order.get("SalesOrderDate") or order["CreationDate"]
        self._rows["A_SalesOrder"][(number,)] = order
        for item in items:
            row = _blank(ENTITIES["A_SalesOrderItem"].fields)
            row.update(item, SalesOrder=number, SDProcessStatus="A", DeliveryStatus="A", OrderRelatedBillingStatus="A",
                       _stamp=self._now())
            self._rows["A_SalesOrderItem"][(number, row["SalesOrderItem"])] = row
        self._totals(order)
        self._touch("A_SalesOrder", order, created=True)
        return order

    def _update_order(self, order: dict[str, Any], values: Mapping[str, Any]) -> None:
        changes = self._fields("A_SalesOrder", values)
        if "SalesOrder" in changes and changes.pop("SalesOrder") != order["SalesOrder"]:
            raise _bad("/IWBEP/CM_MGW_RT/025", "Key property SalesOrder cannot be changed", "SalesOrder")
        for name in ("SalesOrganization", "DistributionChannel", "OrganizationDivision"):
            if name in changes and changes[name] != order.get(name):
                raise _bad("V1/041", f"{name} cannot be changed in an existing sales document ({order[name]})", name)
        merged = {**order, **changes}
        self._validate_header(merged)
        order.update(changes)

    def _item_change(self, order: dict[str, Any], item: dict[str, Any], changes: Mapping[str, Any]) -> None:
        if order.get("OverallDeliveryStatus") == "C" and any(
                k in changes for k in ("Material", "RequestedQuantity", "RequestedQuantityUnit", "ProductionPlant")):
            raise _bad("V1/036", f"Item {item['SalesOrderItem']} of sales document {order['SalesOrder']} has been "
                                 "delivered and can no longer be changed")
        merged = {**item, **changes}
        self._validate_item(merged, order)
        item.update(merged)
        item["_stamp"] = self._now()
        self._totals(order)

    # ------------------------------------------------------------------------------------ writes: partners

    def _partner_names(self, bp: dict[str, Any]) -> None:
        if bp.get("BusinessPartnerCategory") == "1":
            name = " ".join(p for p in (bp.get("FirstName"), bp.get("LastName")) if p)
        else:
            name = " ".join(p for p in (bp.get("OrganizationBPName1"), bp.get("OrganizationBPName2")) if p)
        bp["BusinessPartnerFullName"] = bp["BusinessPartnerName"] = name

    def _validate_partner(self, bp: Mapping[str, Any]) -> None:
        category = bp.get("BusinessPartnerCategory")
        if category not in ("1", "2", "3"):
            raise _bad("R11/201", f"Business partner category {category!r} is not valid (1 person, 2 organization, "
                                  "3 group)", "BusinessPartnerCategory")
        if bp.get("BusinessPartnerGrouping") not in self.customizing.groupings:
            raise _bad("R11/124", f"Grouping {bp.get('BusinessPartnerGrouping')} is not defined",
                       "BusinessPartnerGrouping")
        if category == "2" and not bp.get("OrganizationBPName1"):
            raise _bad("R11/401", "Enter a name for the organization (OrganizationBPName1)", "OrganizationBPName1")
        if category == "1" and not bp.get("LastName"):
            raise _bad("R11/402", "Enter a last name for the person", "LastName")

    def _validate_address(self, address: Mapping[str, Any]) -> None:
        country = address.get("Country")
        if not country:
            raise _bad("AM/215", "Enter a country for the address", "Country")
        if country not in self.customizing.countries:
            raise _bad("AM/216", f"Country {country} is not defined", "Country")

    def _validate_sales_area(self, area: Mapping[str, Any]) -> None:
        key = (area.get("SalesOrganization"), area.get("DistributionChannel"), area.get("Division"))
        if key not in self.customizing.sales_areas:
            raise _bad("F2/609", f"Sales area {' '.join(str(k) for k in key)} is not defined", "SalesOrganization")
        currency = area.get("Currency")
        if currency and currency not in self.customizing.currencies:
            raise _bad("F2/165", f"Currency {currency} is not defined", "Currency")

    @staticmethod
    def _nav_list(raw: Any, name: str) -> list[dict[str, Any]]:
        if raw is None:
            return []
        items = raw.get("results") if isinstance(raw, dict) and "results" in raw else raw
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise _bad("/IWBEP/CM_MGW_RT/013", f"'{name}' must be {{\"results\": [ ... ]}} of JSON objects")
        return items

    def _create_partner(self, values: dict[str, Any]) -> dict[str, Any]:
        addresses = self._nav_list(values.pop("to_BusinessPartnerAddress", None), "to_BusinessPartnerAddress")
        roles = self._nav_list(values.pop("to_BusinessPartnerRole", None), "to_BusinessPartnerRole")
        customer_raw = values.pop("to_Customer", None)
        if customer_raw is not None and not isinstance(customer_raw, dict):
            raise _bad("/IWBEP/CM_MGW_RT/013", "'to_Customer' must be a JSON object")
        if values.get("BusinessPartner"):
            raise _bad("R11/084", f"Business partner number {values['BusinessPartner']} cannot be specified: the "
                                  "grouping uses internal number assignment", "BusinessPartner")
        bp = _blank(ENTITIES["A_BusinessPartner"].fields)
        bp.update(self._fields("A_BusinessPartner", values))
        bp["BusinessPartnerGrouping"] = bp.get("BusinessPartnerGrouping") or "BP01"
        bp["BusinessPartnerIsBlocked"] = bool(bp.get("BusinessPartnerIsBlocked"))
        bp["IsMarkedForArchiving"] = bool(bp.get("IsMarkedForArchiving"))
        self._validate_partner(bp)
        self._partner_names(bp)
        parsed_addresses = []
        for raw in addresses:
            address = self._fields("A_BusinessPartnerAddress", {k: v for k, v in raw.items() if k != "__metadata"})
            self._validate_address(address)
            parsed_addresses.append((address, self._communication(raw, address)))
        role_names = []
        for raw in roles:
            role = self._fields("A_BusinessPartnerRole", {k: v for k, v in raw.items() if k != "__metadata"})
            if role.get("BusinessPartnerRole") not in self.customizing.roles:
                raise _bad("R11/657", f"Business partner role {role.get('BusinessPartnerRole')} is not defined",
                           "BusinessPartnerRole")
            role_names.append(str(role["BusinessPartnerRole"]))
        customer: dict[str, Any] | None = None
        areas: list[dict[str, Any]] = []
        if customer_raw is not None:
            if not {"FLCU00", "FLCU01"} & set(role_names):
                raise _bad("R11/658", "Customer data (to_Customer) needs business partner role FLCU01 or FLCU00 in "
                                      "to_BusinessPartnerRole", "to_BusinessPartnerRole")
            area_list = self._nav_list(customer_raw.get("to_CustomerSalesArea"), "to_CustomerSalesArea")
            customer = self._fields("A_Customer", {k: v for k, v in customer_raw.items()
                                                   if k not in ("__metadata", "to_CustomerSalesArea")})
            for raw in area_list:
                area = self._fields("A_CustomerSalesArea", {k: v for k, v in raw.items() if k != "__metadata"})
                self._validate_sales_area(area)
                areas.append(area)
        number = self._next_number("BusinessPartner")
        bp["BusinessPartner"] = number
        bp["BusinessPartnerUUID"] = str(uuid.uuid4())
        self._rows["A_BusinessPartner"][(number,)] = bp
        for address, communication in parsed_addresses:
            self._add_communication(self._add_address(number, address), communication)
        for role_name in role_names:
            self._add_role(number, role_name)
        if customer is not None:
            self._ensure_customer(bp, customer)
            for area in areas:
                self._add_sales_area(number, area)
        self._touch("A_BusinessPartner", bp, created=True)
        return bp

    def _add_address(self, partner: str, address: Mapping[str, Any]) -> dict[str, Any]:
        row = _blank(_ADDRESS_FIELDS)
        row.update(address, BusinessPartner=partner, AddressID=self._next_number("AddressID"))
        row["Language"] = row.get("Language") or "EN"
        row["ValidityStartDate"] = row.get("ValidityStartDate") or datetime(2000, 1, 1, tzinfo=UTC)
        row["ValidityEndDate"] = row.get("ValidityEndDate") or datetime(9999, 12, 31, tzinfo=UTC)
        self._rows["A_BusinessPartnerAddress"][(partner, row["AddressID"])] = row
        return row

    def _communication(self, raw: Mapping[str, Any], address: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """Phone numbers and e-mail addresses deep-inserted with an address, parsed and validated."""
        out: dict[str, list[dict[str, Any]]] = {}
        for nav, entity in COMMUNICATION.items():
            entries = []
            for item in self._nav_list(raw.get(nav), nav):
                values = self._fields(entity, {k: v for k, v in item.items()
                                               if k not in ("__metadata", "AddressID", "OrdinalNumber")})
                self._validate_communication(entity, values, address)
                entries.append(values)
            out[nav] = entries
        return out

    def _validate_communication(self, entity: str, values: dict[str, Any], address: Mapping[str, Any]) -> None:
        if entity == "A_AddressPhoneNumber":
            number = str(values.get("PhoneNumber") or "")
            if not number.strip():
                raise _bad("AM/171", "Enter a telephone number", "PhoneNumber")
            if not re.fullmatch(r"[+0-9 ()/\-]{3,30}", number):
                raise _bad("AM/172", f"Telephone number {number} contains invalid characters", "PhoneNumber")
            country = values.get("DestinationLocationCountry") or address.get("Country")
            if country and country not in self.customizing.countries:
                raise _bad("AM/216", f"Country {country} is not defined", "DestinationLocationCountry")
            values["DestinationLocationCountry"] = country
        else:
            email = str(values.get("EmailAddress") or "")
            if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email):
                raise _bad("AM/176", f"E-mail address {email!r} is not valid", "EmailAddress")

    def _add_communication(self, address: Mapping[str, Any], entries: Mapping[str, list[dict[str, Any]]]) -> None:
        for nav, items in entries.items():
            for values in items:
                self._add_comm_row(COMMUNICATION[nav], address, values)

    def _add_comm_row(self, entity: str, address: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
        existing = self._rows[entity].with_first(str(address["AddressID"]))
        row = _blank(ENTITIES[entity].fields)
        row.update(values, AddressID=address["AddressID"], Person=str(values.get("Person") or ""),
                   OrdinalNumber=str(max((int(r["OrdinalNumber"]) for r in existing), default=0) + 1))
        if entity == "A_AddressPhoneNumber":
            row["IsDefaultPhoneNumber"] = not existing or bool(values.get("IsDefaultPhoneNumber"))
            row["PhoneNumberType"] = row.get("PhoneNumberType") or "1"
            self._international(row)
        else:
            row["IsDefaultEmailAddress"] = not existing or bool(values.get("IsDefaultEmailAddress"))
            row["SearchEmailAddress"] = str(row.get("EmailAddress") or "").upper()[:20]
        self._rows[entity][(row["AddressID"], row["Person"], row["OrdinalNumber"])] = row
        return row

    @staticmethod
    def _international(row: dict[str, Any]) -> None:
        number = str(row.get("PhoneNumber") or "")
        digits = re.sub(r"[^0-9]", "", number)
        prefix = DIALING_CODES.get(str(row.get("DestinationLocationCountry") or ""), "")
        national = digits[len(prefix) - 1:] if number.startswith("+") and prefix else digits.lstrip("0")
        row["InternationalPhoneNumber"] = (prefix + national + (row.get("PhoneNumberExtension") or "")) \
            if prefix else number

    def _add_role(self, partner: str, role: str) -> dict[str, Any]:
        row = {"BusinessPartner": partner, "BusinessPartnerRole": role,
               "ValidFrom": datetime(2000, 1, 1, tzinfo=UTC), "ValidTo": datetime(9999, 12, 31, tzinfo=UTC)}
        self._rows["A_BusinessPartnerRole"][(partner, role)] = row
        bp = self._rows["A_BusinessPartner"][(partner,)]
        if role in ("FLCU00", "FLCU01"):
            self._ensure_customer(bp, {})
        return row

    def _ensure_customer(self, bp: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
        number = bp["BusinessPartner"]
        row = self._rows["A_Customer"].get((number,))
        if row is None:
            row = _blank(_CUSTOMER_FIELDS)
            row.update(Customer=number, CustomerAccountGroup="CUST", CreatedByUser=self.user,
                       CreationDate=datetime.combine(self._now().date(), time(), UTC), DeletionIndicator=False,
                       OrderIsBlockedForCustomer=False)
            self._rows["A_Customer"][(number,)] = row
            bp["Customer"] = number
        row.update(values)
        row["CustomerName"] = row.get("CustomerName") or bp.get("BusinessPartnerName")
        row["CustomerFullName"] = bp.get("BusinessPartnerFullName")
        return row

    def _add_sales_area(self, customer: str, area: Mapping[str, Any]) -> dict[str, Any]:
        row = _blank(_SALES_AREA_FIELDS)
        row.update(area, Customer=customer)
        row["DeletionIndicator"] = bool(row.get("DeletionIndicator"))
        row["OrderIsBlockedForCustomer"] = bool(row.get("OrderIsBlockedForCustomer"))
        key = (customer, str(row["SalesOrganization"]), str(row["DistributionChannel"]), str(row["Division"]))
        if key in self._rows["A_CustomerSalesArea"]:
            raise _bad("F2/610", f"Customer {customer} already exists in sales area {' '.join(key[1:])}")
        self._rows["A_CustomerSalesArea"][key] = row
        return row

    # ------------------------------------------------------------------------------------ writes: dispatch

    def _owner(self, entity: str, row: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """The document a row belongs to (its change stamps move when the row changes)."""
        if entity in ("A_SalesOrder", "A_SalesOrderItem"):
            return "A_SalesOrder", self._rows["A_SalesOrder"][(str(row["SalesOrder"]),)]
        if entity == "A_Customer" or entity == "A_CustomerSalesArea":
            return "A_BusinessPartner", self._rows["A_BusinessPartner"][(str(row["Customer"]),)]
        if entity in ("A_AddressPhoneNumber", "A_AddressEmailAddress"):
            address = next(a for a in self._rows["A_BusinessPartnerAddress"].values()
                           if a["AddressID"] == row["AddressID"])
            return "A_BusinessPartner", self._rows["A_BusinessPartner"][(str(address["BusinessPartner"]),)]
        return "A_BusinessPartner", self._rows["A_BusinessPartner"][(str(row["BusinessPartner"]),)]

    def _create_child(self, entity: str, parent: dict[str, Any], nav: str, values: dict[str, Any]) -> dict[str, Any]:
        target = ENTITIES[entity].navs[nav].target
        for child_field, parent_field in ENTITIES[entity].navs[nav].link:
            if values.get(child_field) not in (None, "", parent.get(parent_field)):
                raise _bad("/IWBEP/CM_MGW_RT/025", f"{child_field} must be {parent.get(parent_field)} (the parent)")
            values.pop(child_field, None)
        fields = self._fields(target, values)
        if target == "A_SalesOrderItem":
            existing = self._children(entity, parent, nav)
            number = str(int(fields.get("SalesOrderItem") or
                             (max((int(i["SalesOrderItem"]) for i in existing), default=0) + 10)))
            if any(i["SalesOrderItem"] == number for i in existing):
                raise _bad("V1/047", f"Item {number} already exists in sales document {parent['SalesOrder']}")
            item = _blank(_ITEM_FIELDS)
            item.update(fields, SalesOrder=parent["SalesOrder"], SalesOrderItem=number, SDProcessStatus="A",
                        DeliveryStatus="A", OrderRelatedBillingStatus="A")
            self._validate_item(item, parent)
            item["_stamp"] = self._now()
            self._rows[target][(parent["SalesOrder"], number)] = item
            self._totals(parent)
            self._touch("A_SalesOrder", parent)
            return item
        if target == "A_BusinessPartnerAddress":
            self._validate_address(fields)
            communication = self._communication(values, fields)
            row = self._add_address(parent["BusinessPartner"], fields)
            self._add_communication(row, communication)
        elif target in ("A_AddressPhoneNumber", "A_AddressEmailAddress"):
            fields.pop("OrdinalNumber", None)
            self._validate_communication(target, fields, parent)
            row = self._add_comm_row(target, parent, fields)
        elif target == "A_BusinessPartnerRole":
            if fields.get("BusinessPartnerRole") not in self.customizing.roles:
                raise _bad("R11/657", f"Business partner role {fields.get('BusinessPartnerRole')} is not defined")
            row = self._add_role(parent["BusinessPartner"], str(fields["BusinessPartnerRole"]))
        elif target == "A_CustomerSalesArea":
            self._validate_sales_area(fields)
            row = self._add_sales_area(parent["Customer"], fields)
        else:
            raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Create of {target} is not supported")
        owner_entity, owner = self._owner(target, row)
        self._touch(owner_entity, owner)
        return row

    def _update(self, entity: str, row: dict[str, Any], values: Mapping[str, Any]) -> None:
        definition = ENTITIES[entity]
        for name in definition.keys:
            if name in values and str(values[name]) != str(row[name]):
                raise _bad("/IWBEP/CM_MGW_RT/025", f"Key property {name} cannot be changed", name)
        values = {k: v for k, v in values.items() if k not in definition.keys}
        if entity == "A_SalesOrder":
            self._update_order(row, values)
            self._totals(row)
        elif entity == "A_SalesOrderItem":
            order = self._rows["A_SalesOrder"][(row["SalesOrder"],)]
            self._item_change(order, row, self._fields(entity, values))
        elif entity == "A_BusinessPartner":
            changes = self._fields(entity, values)
            if "BusinessPartnerCategory" in changes and changes["BusinessPartnerCategory"] != \
                    row["BusinessPartnerCategory"]:
                raise _bad("R11/203", "The business partner category cannot be changed", "BusinessPartnerCategory")
            merged = {**row, **changes}
            self._validate_partner(merged)
            row.update(changes)
            self._partner_names(row)
            customer = self._rows["A_Customer"].get((row["BusinessPartner"],))
            if customer is not None:
                customer["CustomerFullName"] = row["BusinessPartnerFullName"]
        elif entity == "A_BusinessPartnerAddress":
            merged = {**row, **self._fields(entity, values)}
            self._validate_address(merged)
            row.update(merged)
        elif entity == "A_CustomerSalesArea":
            merged = {**row, **self._fields(entity, values)}
            self._validate_sales_area(merged)
            row.update(merged)
        elif entity in ("A_AddressPhoneNumber", "A_AddressEmailAddress"):
            address = next(a for a in self._rows["A_BusinessPartnerAddress"].values()
                           if a["AddressID"] == row["AddressID"])
            merged = {**row, **self._fields(entity, values)}
            self._validate_communication(entity, merged, address)
            row.update(merged)
            if entity == "A_AddressPhoneNumber":
                self._international(row)
        else:
            row.update(self._fields(entity, values))
        owner_entity, owner = self._owner(entity, row)
        self._touch(owner_entity, owner)

    def _delete(self, entity: str, key: tuple[str, ...], row: dict[str, Any]) -> None:
        if entity not in DELETABLE:
            raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Method '{entity.upper()}_DELETE_ENTITY' not "
                                                            "implemented in data provider class")
        if entity == "A_SalesOrder":
            if row.get("OverallDeliveryStatus") != "A":
                raise _bad("V1/018", f"Sales document {row['SalesOrder']} has subsequent documents and cannot be "
                                     "deleted")
            for item in self._children(entity, row, "to_Item"):
                del self._rows["A_SalesOrderItem"][(item["SalesOrder"], item["SalesOrderItem"])]
            del self._rows[entity][key]
            return
        owner_entity, owner = self._owner(entity, row)
        del self._rows[entity][key]
        if entity == "A_SalesOrderItem":
            self._totals(owner)
        self._touch(owner_entity, owner)


# ============================================================================================ helpers


def _json_text(payload: Any) -> bytes:
    # Gateway writes dates as "\/Date(...)\/" (JSON's optional solidus escape); clients must decode JSON properly.
    text = json.dumps(payload, separators=(",", ":")).replace('"/Date(', '"\\/Date(').replace(')/"', ')\\/"')
    return text.encode()


def _json_response(payload: Any, status: int, headers: Mapping[str, str]) -> Response:
    return Response(_json_text(payload), status_code=status, headers=dict(headers), media_type="application/json")


# ============================================================================================ formats


@dataclass(frozen=True)
class _Count:
    """The answer of `<collection>/$count`: a bare number, served as text/plain."""

    value: int


def _negotiate(fmt: str | None, accept: str) -> bool:
    """True when the answer is Atom/XML: `$format` decides, else the Accept header; the Gateway's default (no
    `$format`, Accept without JSON, `*/*` or none) is Atom/XML as in OData v2 (MS-ODATA 2.2.5.1, [MS-ODATA]
    "Accept Request Header to Content-Type Response Header Mapping")."""
    if fmt:
        if fmt.lower() == "json":
            return False
        if fmt.lower() in ("xml", "atom"):
            return True
        raise GatewayError(406, "/IWBEP/CM_MGW_RT/031", f"Format '{fmt}' is not supported: use json, xml or atom")
    return "json" not in accept.lower()


_ATOM_NS = "http://www.w3.org/2005/Atom"
_SET_OF_TYPE = {f"{e.service}.{e.type_name}": name for name, e in ENTITIES.items()}
_WIRE_DATE_RE = re.compile(r"^/Date\((?P<ms>-?\d+)(?:[+-]\d{4})?\)/$")


def _atom_value(name: str, value: Any) -> tuple[str, str]:
    """(m:type attribute or "", literal text) of one JSON wire value, as the Atom format writes it."""
    kind = TYPES.get(name)
    if isinstance(value, bool):
        return ' m:type="Edm.Boolean"', "true" if value else "false"
    if kind in (DT, DTO) and isinstance(value, str) and (m := _WIRE_DATE_RE.match(value)):
        moment = datetime.fromtimestamp(int(m.group("ms")) / 1000, tz=UTC)
        text = moment.strftime("%Y-%m-%dT%H:%M:%S") + ("Z" if kind == DTO else "")
        return f' m:type="{kind}"', text
    if kind is not None:
        return f' m:type="{kind}"', xml_escape(str(value))
    return "", xml_escape(str(value))


def _atom_properties(names: Iterable[str], public: Mapping[str, Any]) -> str:
    out = []
    for name in names:
        if name not in public:
            continue
        value = public[name]
        if value is None:
            out.append(f'<d:{name} m:null="true"/>')
            continue
        mtype, text = _atom_value(name, value)
        out.append(f"<d:{name}{mtype}>{text}</d:{name}>")
    return "".join(out)


def _atom_entry(root: str, public: Mapping[str, Any], now: str) -> str:
    meta = public["__metadata"]
    entity = _SET_OF_TYPE[meta["type"]]
    definition = ENTITIES[entity]
    href = str(meta["uri"]).removeprefix(root)
    etag = f" m:etag={quoteattr(meta['etag'])}" if meta.get("etag") else ""
    links = [f'<link href={quoteattr(href)} rel="edit" title="{definition.type_name}"/>']
    for nav_name, nav in definition.navs.items():
        if nav_name not in public:
            continue
        value = public[nav_name]
        kind = "feed" if nav.many else "entry"
        head = (f'<link href={quoteattr(href + "/" + nav_name)} rel="{DATA_NS}/related/{nav_name}" '
                f'type="application/atom+xml;type={kind}" title="{xml_escape(nav_name)}"')
        if isinstance(value, dict) and "__deferred" in value:
            links.append(head + "/>")
        elif isinstance(value, dict) and "results" in value:
            links.append(head + "><m:inline>" + _atom_feed(root, nav.target, value, now, href + "/" + nav_name)
                         + "</m:inline></link>")
        else:
            inline = _atom_entry(root, value, now) if isinstance(value, dict) else ""
            links.append(head + f"><m:inline>{inline}</m:inline></link>")
    return (f"<entry{etag}><id>{xml_escape(str(meta['id']))}</id><title type=\"text\">{xml_escape(href)}</title>"
            f"<updated>{now}</updated><category term=\"{meta['type']}\" "
            f"scheme=\"{DATA_NS}/scheme\"/>{''.join(links)}<content type=\"application/xml\"><m:properties>"
            f"{_atom_properties(definition.fields, public)}</m:properties></content></entry>")


def _atom_feed(root: str, entity: str, data: Mapping[str, Any], now: str, href: str) -> str:
    parts = [f"<feed><id>{xml_escape(root + href)}</id><title type=\"text\">{xml_escape(entity)}</title>"
             f"<updated>{now}</updated><author><name/></author><link href={quoteattr(href)} rel=\"self\" "
             f"title={quoteattr(entity)}/>"]
    if "__count" in data:
        parts.append(f"<m:count>{data['__count']}</m:count>")
    parts.extend(_atom_entry(root, item, now) for item in data.get("results", []))
    if data.get("__next"):
        parts.append(f'<link href={quoteattr(str(data["__next"]))} rel="next"/>')
    parts.append("</feed>")
    return "".join(parts)


_ROOT_NS = f'xmlns="{_ATOM_NS}" xmlns:m="{METADATA_NS}" xmlns:d="{DATA_NS}"'


def _atom(service: str, rest: str, payload: Any, base: str) -> tuple[bytes, str]:
    """An Atom/XML answer (body, media type) for what `_dispatch` answered as OData v2 JSON: the service
    document (AtomPub), a feed, an entry, or a function import's complex value. No body for a null entity."""
    root = f"{base}{SERVICE_PREFIX}{service}/"
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    head = '<?xml version="1.0" encoding="utf-8"?>'
    data = payload.get("d") if isinstance(payload, dict) else None
    path = rest.strip("/")
    if path == "":
        collections = "".join(
            f'<app:collection sap:creatable="{str(ENTITIES[n].creatable).lower()}" '
            f'sap:updatable="{str(ENTITIES[n].updatable).lower()}" '
            f'sap:deletable="{str(ENTITIES[n].deletable).lower()}" sap:content-version="1" href="{n}">'
            f'<atom:title type="text">{n}</atom:title><sap:member-title>{xml_escape(ENTITIES[n].label or n)}'
            "</sap:member-title></app:collection>" for n in SERVICE_SETS[service])
        body = (f'{head}<app:service xml:lang="en" xml:base={quoteattr(root)} xmlns:app="http://www.w3.org/2007/app" '
                f'xmlns:atom="{_ATOM_NS}" xmlns:sap="{SAP_NS}"><app:workspace><atom:title type="text">Data'
                f"</atom:title>{collections}</app:workspace><atom:link rel=\"self\" href={quoteattr(root)}/>"
                f"<atom:link rel=\"latest-version\" href={quoteattr(root)}/></app:service>")
        return body.encode(), "application/atomsvc+xml"
    if data is None:
        return b"", "application/atom+xml"
    function = next((f for f in FUNCTION_IMPORTS.get(service, ()) if f.name == path), None)
    if function is not None:
        value = data[function.name]
        body = (f'{head}<d:{function.name} xmlns:d="{DATA_NS}" xmlns:m="{METADATA_NS}" '
                f'm:type="{service}.{function.returns}">'
                f"{_atom_properties((p.name for p in function.result), value)}</d:{function.name}>")
        return body.encode(), "application/xml"
    if "results" in data:
        entity, _, nav = _parse_resource(rest)
        target = ENTITIES[entity].navs[nav].target if nav else entity
        feed = _atom_feed(root, target, data, now, path)
        return (head + feed.replace("<feed>", f"<feed xml:base={quoteattr(root)} {_ROOT_NS}>", 1)).encode(), \
            "application/atom+xml;type=feed"
    entry = _atom_entry(root, data, now)
    return (head + entry.replace("<entry", f"<entry xml:base={quoteattr(root)} {_ROOT_NS}", 1)).encode(), \
        "application/atom+xml;type=entry"


def _xml_error(exc: GatewayError, service: str) -> Response:
    """The Gateway's error document in XML (the answer to a request that negotiated Atom/XML)."""
    error = exc.body(service)["error"]
    inner = error["innererror"]
    app = "".join(f"<{k}>{xml_escape(str(v))}</{k}>" for k, v in inner["application"].items())
    resolution = "".join(f"<{k}>{xml_escape(str(v))}</{k}>" for k, v in inner["Error_Resolution"].items())
    details = "".join(
        "<errordetail>" + "".join(f"<{k}>{xml_escape(str(v).lower() if isinstance(v, bool) else str(v))}</{k}>"
                                  for k, v in detail.items()) + "</errordetail>"
        for detail in inner["errordetails"])
    body = (f'<?xml version="1.0" encoding="utf-8"?><error xmlns="{METADATA_NS}"><code>{xml_escape(error["code"])}'
            f'</code><message xml:lang="en">{xml_escape(error["message"]["value"])}</message><innererror>'
            f"<application>{app}</application><transactionid>{inner['transactionid']}</transactionid>"
            f"<timestamp>{inner['timestamp']}</timestamp><Error_Resolution>{resolution}</Error_Resolution>"
            f"<errordetails>{details}</errordetails></innererror></error>")
    return Response(body.encode(), status_code=exc.status, media_type="application/xml")


# ============================================================================================ multipart


@dataclass
class _BatchRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    content_id: str | None = None


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes


_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            412: "Precondition Failed", 428: "Precondition Required", 500: "Internal Server Error"}


def _boundary(content_type: str) -> str | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    return m.group(1).strip() if m else None


def _multipart(body: bytes, boundary: str) -> list[bytes]:
    """The parts of a multipart body (preamble and epilogue dropped, CRLF or LF line ends)."""
    parts: list[bytes] = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        elif chunk.startswith(b"\n"):
            chunk = chunk[1:]
        if chunk.endswith(b"\r\n"):
            chunk = chunk[:-2]
        elif chunk.endswith(b"\n"):
            chunk = chunk[:-1]
        parts.append(chunk)
    return parts


def _head(blob: bytes) -> tuple[dict[str, str], bytes]:
    """Header lines (lower-cased names) up to the first empty line, and the rest."""
    cuts = [(at, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (at := blob.find(sep)) >= 0]
    if cuts:
        at, width = min(cuts)
        head, rest = blob[:at], blob[at + width:]
    else:
        head, rest = blob, b""
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers, rest


def _http_request(part: bytes) -> _BatchRequest:
    """An application/http batch part: its MIME headers, then the request line, headers and body."""
    mime, rest = _head(part)
    line, _, tail = rest.partition(b"\n")
    method, _, target = line.decode("utf-8", "replace").strip().partition(" ")
    url = target.rsplit(" HTTP/", 1)[0].strip()
    if not tail.strip():
        return _BatchRequest(method.upper(), url, {}, b"", mime.get("content-id"))
    headers, body = _head(tail)
    return _BatchRequest(method.upper(), url, headers, body, mime.get("content-id"))


def _error_answer(service: str, exc: GatewayError) -> _Answer:
    return _Answer(exc.status, {k.lower(): v for k, v in exc.headers.items()}, _json_text(exc.body(service)))


def _http_part(answer: _Answer, content_id: str | None = None) -> bytes:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id:
        lines.append(f"Content-ID: {content_id}")
    response = [f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'Status')}"]
    if answer.body:
        response.append("Content-Type: application/json")
    response += [f"{k}: {v}" for k, v in answer.headers.items() if k.lower() != "content-type"]
    response.append(f"Content-Length: {len(answer.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n" + "\r\n".join(response) + "\r\n\r\n").encode() + answer.body


def _blank(fields: Iterable[str]) -> dict[str, Any]:
    return _Row(dict.fromkeys(fields))


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _key_literal(value: Any) -> str:
    if isinstance(value, datetime):
        return f"datetime'{value.strftime('%Y-%m-%dT%H:%M:%S')}'"
    return _literal(str(value))


def _select(query: Mapping[str, str]) -> list[str] | None:
    text = query.get("$select")
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _expand(query: Mapping[str, str]) -> set[str]:
    return {s.strip() for s in query.get("$expand", "").split(",") if s.strip()}


def _sort_key(entity: str, row: Mapping[str, Any]) -> tuple[Any, ...]:
    out: list[Any] = []
    for name in ENTITIES[entity].keys:
        value = str(row.get(name) or "")
        out.append((0, int(value), "") if value.isdigit() else (1, 0, value))
    return tuple(out)


_SEGMENT_RE = re.compile(r"^(?P<set>[A-Za-z_]\w*)(?P<pred>\(.*\))?(?:/(?P<nav>[A-Za-z_]\w*))?/?$")


def _parse_resource(rest: str) -> tuple[str, dict[str | None, str] | None, str | None]:
    """`A_SalesOrder('1')/to_Item` -> ("A_SalesOrder", {None: "1"}, "to_Item"); named keys keep their names."""
    m = _SEGMENT_RE.match(rest)
    if m is None:
        raise GatewayError(404, "/IWBEP/CM_MGW_RT/021", f"Resource not found for segment '{rest}'")
    pred = m.group("pred")
    if pred is None:
        return m.group("set"), None, m.group("nav")
    inner = pred[1:-1]
    key: dict[str | None, str] = {}
    pos = 0
    while pos < len(inner):
        name_m = re.match(r"([A-Za-z_]\w*)=", inner[pos:])
        name: str | None = None
        if name_m:
            name = name_m.group(1)
            pos += name_m.end()
        lit = re.match(r"'((?:[^']|'')*)'", inner[pos:])
        if lit is None:
            raise _bad("/IWBEP/CM_MGW_RT/020", f"Invalid key predicate '{pred}': string literals in quotes expected")
        key[name] = lit.group(1).replace("''", "'")
        pos += lit.end()
        if pos < len(inner):
            if inner[pos] != ",":
                raise _bad("/IWBEP/CM_MGW_RT/020", f"Invalid key predicate '{pred}'")
            pos += 1
    if None in key and len(key) > 1:
        raise _bad("/IWBEP/CM_MGW_RT/020", f"Invalid key predicate '{pred}'")
    return m.group("set"), key, m.group("nav")


# ============================================================================================ seed

SALES_ORG = "1710"
DISTRIBUTION_CHANNEL = "10"
DIVISION = "00"
BAD_PARTNER_NO_NAME = "17100090"
"""Seeded partner without a name (OrganizationBPName1 empty)."""
BAD_PARTNER_CURRENCY = "17100091"
"""Seeded partner whose sales-area currency is XAU (no currency map entry in any flow)."""
BAD_ORDER = "4000099"
"""Seeded order with a text item that has no material."""

_CUSTOMERS = [
    ("Great Lakes Water Authority", "Detroit", "MI", "48226", "Woodward Ave", "735"),
    ("Cascade Paper Mills", "Tacoma", "WA", "98402", "Pacific Ave", "1102"),
    ("Lone Star Refining", "Houston", "TX", "77002", "Louisiana St", "909"),
    ("Appalachian Mining Co", "Pittsburgh", "PA", "15222", "Liberty Ave", "410"),
    ("Prairie Ethanol Partners", "Des Moines", "IA", "50309", "Grand Ave", "218"),
    ("Gulf Coast Chemicals", "Baton Rouge", "LA", "70801", "Florida St", "55"),
    ("Rocky Mountain Breweries", "Denver", "CO", "80202", "Blake St", "1600"),
    ("Sunbelt Municipal Utilities", "Phoenix", "AZ", "85004", "Washington St", "200"),
    ("Hudson Valley Dairy", "Albany", "NY", "12207", "State St", "75"),
    ("Bayou Pulp & Fiber", "Shreveport", "LA", "71101", "Texas St", "501"),
    ("Mojave Desalination", "Las Vegas", "NV", "89101", "Fremont St", "333"),
    ("Northwoods Timber Products", "Duluth", "MN", "55802", "Superior St", "22"),
]
_MATERIALS = [
    ("PV-PUMP-100", "Centrifugal pump CP-100", "PC", (), ("1710", "1720"), "1250.00"),
    ("PV-PUMP-250", "Centrifugal pump CP-250", "PC", (), ("1710",), "2890.00"),
    ("PV-VALVE-50", "Ball valve DN50", "EA", ("PC",), ("1710", "1720"), "185.50"),
    ("PV-SEALKIT", "Mechanical seal kit", "PC", ("BOX",), ("1710", "1720"), "42.00"),
    ("PV-GREASE", "Bearing grease, food grade", "KG", ("G",), ("1720",), "12.75"),
    ("PV-IMPELLER-8", "Impeller 8 inch, stainless", "PC", (), ("1710",), "310.00"),
    ("PV-MOTOR-7K5", "Motor 7.5 kW, IE3", "EA", ("PC",), ("1720",), "890.00"),
]


def seed_sap(sim: SapSimulator, *, partners: int = 12, orders: int = 8) -> None:
    """Deterministic data of a pump and valve manufacturer (sales org 1710), with a few deliberately bad records.

    Customizing: sales areas 1710/10/00 and 1710/20/00, plants 1710 and 1720, the materials in `_MATERIALS`
    (units PC, EA, KG ...) with their products, PR00 prices (list price in channel 10, 8% less in 20) and
    stock in every plant they are maintained in. Partners 17100001.. are organizations with one address (a
    phone number and an e-mail address on it in the US), roles FLCU00/FLCU01 and customer sales-area data in
    1710/10/00; orders 4000001.. have 1-3 items and spread over the delivery and billing statuses. Bad
    records: `BAD_PARTNER_NO_NAME`, `BAD_PARTNER_CURRENCY`, `BAD_ORDER`.
    """
    sim.add_sales_area(SALES_ORG, DISTRIBUTION_CHANNEL, DIVISION)
    sim.add_sales_area(SALES_ORG, "20", DIVISION)
    for index, (number, text, unit, units, plants, price) in enumerate(_MATERIALS):
        sim.add_material(number, text, unit, units=units, plants=plants, price=price,
                         stock={plant: (40 + 15 * index) if plant == "1710" else (12 + 4 * index) for plant in plants})
        # Dealers (channel 20) buy at a discount: a second PR00 record per material.
        sim.set_price(number, (Decimal(price) * Decimal("0.92")).quantize(Decimal("0.01")), sales_org=SALES_ORG,
                      channel="20")
    midnight = datetime(2025, 11, 3, tzinfo=UTC)
    numbers: list[str] = []
    rows = [(f"171000{i:02d}", *_CUSTOMERS[(i - 1) % len(_CUSTOMERS)]) for i in range(1, partners + 1)]
    rows += [(BAD_PARTNER_NO_NAME, "", "Chicago", "IL", "60601", "Wacker Dr", "1"),
             (BAD_PARTNER_CURRENCY, "Goldleaf Trading AG", "Zurich", "", "8001", "Bahnhofstrasse", "10")]
    for number, name, city, region, postal, street, house in rows:
        numbers.append(number)
        sim.insert("A_BusinessPartner", {
            "BusinessPartner": number, "Customer": number, "BusinessPartnerCategory": "2",
            "BusinessPartnerGrouping": "BP02", "OrganizationBPName1": name, "BusinessPartnerFullName": name,
            "BusinessPartnerName": name, "SearchTerm1": name.split(" ")[0].upper()[:20] if name else "",
            "BusinessPartnerUUID": str(uuid.UUID(int=int(number))), "Language": "EN", "CorrespondenceLanguage": "EN",
            "BusinessPartnerIsBlocked": False, "IsMarkedForArchiving": False, "Industry": "1000",
            "CreationDate": midnight, "CreationTime": time(9, 30, 0), "CreatedByUser": "CB9980000010"})
        country = "CH" if number == BAD_PARTNER_CURRENCY else "US"
        sim.insert("A_BusinessPartnerAddress", {
            "BusinessPartner": number, "AddressID": str(27000 + int(number[-2:])), "CityName": city,
            "Country": country, "Region": region, "PostalCode": postal, "StreetName": street, "HouseNumber": house,
            "Language": "EN", "AddressTimeZone": "EST" if country == "US" else "CET",
            "ValidityStartDate": datetime(2000, 1, 1, tzinfo=UTC), "ValidityEndDate": datetime(9999, 12, 31,
                                                                                               tzinfo=UTC)})
        if country == "US":
            address_id = str(27000 + int(number[-2:]))
            area_code = 200 + int(number[-2:]) * 7
            phone = {"AddressID": address_id, "Person": "", "OrdinalNumber": "1", "DestinationLocationCountry": "US",
                     "IsDefaultPhoneNumber": True, "PhoneNumber": f"+1 {area_code} 555 01{number[-2:]}",
                     "PhoneNumberExtension": "", "PhoneNumberType": "1"}
            sim._international(phone)
            sim.insert("A_AddressPhoneNumber", phone)
            domain = "".join(ch for ch in (name or "example").lower() if ch.isalnum())[:20]
            sim.insert("A_AddressEmailAddress", {
                "AddressID": address_id, "Person": "", "OrdinalNumber": "1", "IsDefaultEmailAddress": True,
                "EmailAddress": f"purchasing@{domain}.com", "SearchEmailAddress": f"PURCHASING@{domain.upper()}"[:20]})
        for role in ("FLCU00", "FLCU01"):
            sim.insert("A_BusinessPartnerRole", {"BusinessPartner": number, "BusinessPartnerRole": role,
                                                 "ValidFrom": datetime(2000, 1, 1, tzinfo=UTC),
                                                 "ValidTo": datetime(9999, 12, 31, tzinfo=UTC)})
        sim.insert("A_Customer", {"Customer": number, "CustomerAccountGroup": "CUST", "CustomerName": name,
                                  "CustomerFullName": name, "DeletionIndicator": False,
                                  "OrderIsBlockedForCustomer": False, "CreationDate": midnight,
                                  "CreatedByUser": "CB9980000010"})
        sim.insert("A_CustomerSalesArea", {
            "Customer": number, "SalesOrganization": SALES_ORG, "DistributionChannel": DISTRIBUTION_CHANNEL,
            "Division": DIVISION, "Currency": "XAU" if number == BAD_PARTNER_CURRENCY else "USD",
            "CustomerPaymentTerms": "NT30", "IncotermsClassification": "FOB", "IncotermsLocation1": "Palo Alto",
            "ShippingCondition": "01", "CustomerPricingProcedure": "01", "CustomerAccountAssignmentGroup": "01",
            "CustomerGroup": "01", "SupplyingPlant": "1710", "DeletionIndicator": False,
            "OrderIsBlockedForCustomer": False})
    stages = [("A", "A", "A", "A"), ("B", "C", "A", "A"), ("B", "C", "C", "A"), ("C", "C", "C", "C")]
    for o in range(1, orders + 1):
        number = f"40000{o:02d}"
        process, delivery, total_delivery, billing = stages[o % len(stages)]
        sold_to = numbers[(o - 1) % partners]
        sim.insert("A_SalesOrder", {
            "SalesOrder": number, "SalesOrderType": "OR", "SalesOrganization": SALES_ORG,
            "DistributionChannel": DISTRIBUTION_CHANNEL, "OrganizationDivision": DIVISION, "SoldToParty": sold_to,
            "PurchaseOrderByCustomer": f"PO-{7300 + o}", "CustomerPurchaseOrderDate": midnight,
            "SalesOrderDate": midnight, "CreationDate": midnight, "CreatedByUser": "CB9980000010",
            "TransactionCurrency": "USD", "CustomerPaymentTerms": "NT30", "IncotermsClassification": "FOB",
            "RequestedDeliveryDate": midnight + timedelta(days=14), "OverallSDProcessStatus": process,
            "OverallDeliveryStatus": delivery, "OverallTotalDeliveryStatus": total_delivery,
            "OverallOrdReltdBillgStatus": billing, "TotalBlockStatus": "", "OverallSDDocumentRejectionSts": "A",
            "TotalCreditCheckStatus": "", "CompleteDeliveryIsDefined": False})
        total = Decimal(0)
        for line in range(1, (o % 3) + 2):
            material = sim.customizing.materials[_MATERIALS[(o + line) % len(_MATERIALS)][0]]
            quantity = Decimal(line * 2 + o % 4)
            net = quantity * material.price
            total += net
            sim.insert("A_SalesOrderItem", {
                "SalesOrder": number, "SalesOrderItem": str(line * 10), "SalesOrderItemCategory": "TAN",
                "SalesOrderItemText": material.text, "Material": material.number,
                "RequestedQuantity": _decimal_text("RequestedQuantity", quantity),
                "RequestedQuantityUnit": material.base_unit, "NetAmount": _decimal_text("NetAmount", net),
                "TransactionCurrency": "USD", "MaterialGroup": material.group,
                "ProductionPlant": sorted(material.plants)[0], "PurchaseOrderByCustomer": f"PO-{7300 + o}",
                "SDProcessStatus": process, "DeliveryStatus": delivery, "OrderRelatedBillingStatus": billing})
        order = sim._rows["A_SalesOrder"][(number,)]
        order["TotalNetAmount"] = _decimal_text("TotalNetAmount", total)
    sim.insert("A_SalesOrder", {
        "SalesOrder": BAD_ORDER, "SalesOrderType": "OR", "SalesOrganization": SALES_ORG,
        "DistributionChannel": DISTRIBUTION_CHANNEL, "OrganizationDivision": DIVISION, "SoldToParty": numbers[0],
        "PurchaseOrderByCustomer": "PO-TEXT-ONLY", "SalesOrderDate": midnight, "CreationDate": midnight,
        "CreatedByUser": "CB9980000010", "TransactionCurrency": "USD", "TotalNetAmount": "0.00",
        "OverallSDProcessStatus": "A", "OverallDeliveryStatus": "A", "OverallTotalDeliveryStatus": "A",
        "OverallOrdReltdBillgStatus": "A", "OverallSDDocumentRejectionSts": "A"})
    sim.insert("A_SalesOrderItem", {
        "SalesOrder": BAD_ORDER, "SalesOrderItem": "10", "SalesOrderItemCategory": "TATX",
        "SalesOrderItemText": "Please call before delivery", "Material": "", "RequestedQuantity": "0.000",
        "RequestedQuantityUnit": "", "NetAmount": "0.00", "TransactionCurrency": "USD", "SDProcessStatus": "A",
        "DeliveryStatus": "", "OrderRelatedBillingStatus": ""})
