"""Protocol-faithful simulator of Dynamics 365 F&O OData v4 (`/data`), its Entra ID token endpoint and business events.

Serve `.app` with `sandbox.server.RunningServer(sim.app, ca=TestCA...)` (MSAL needs an https authority); the
environment URL and the token authority are then both `server.url` (token scope `{server.url}/.default`). The
Entra ID endpoints are those of `DataverseSimulator`, reused by composition.
"""

from __future__ import annotations

import base64
import json
import math
import queue
import random
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.dataverse import DataverseSimulator
from sandbox.fno_schema import (
    ENTITIES,
    EXTENSION_FIELD,
    Entity,
    SchemaViolation,
    check_body,
    could_not_find_property,
    csdl,
)
from shared.payloads import strict_loads

DATA_PREFIX = "/data/"
DEFAULT_COMPANY = "usmf"
MAX_PAGE_SIZE = 10000
ENUM_NAMESPACE = "Microsoft.Dynamics.DataEntities."
WRITE_EXCEPTION = "Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException"
THROTTLE_MESSAGE = "Number of requests exeeded the limit of {limit} over the time window of {window} seconds."

ENTITY_KEYS: dict[str, tuple[str, ...]] = {e.entity_set: e.keys for e in ENTITIES.values()}
TABLE_NAMES = {e.entity_set: (e.table, e.label) for e in ENTITIES.values()}
MODIFIED = {"CustomersV3", "SalesOrderHeadersV2"}
"""Entities carrying `ModifiedDateTime` (set by the simulator on every write)."""
CUSTOMER_EVENT = "CustCustomerChangedBusinessEvent"
SALES_STATUS_EVENT = "SalesOrderStatusChangedBusinessEvent"
PACKING_SLIP_EVENT = "SalesPackingSlipPostedBusinessEvent"
"""Sent by `ship_order` (packing slip posted: the order is delivered)."""
INVOICE_EVENT = "SalesInvoicePostedBusinessEvent"
"""Sent by `invoice_order`; its contract (InvoiceAccount, InvoiceId, SalesOrderId, ...) is the one in Microsoft's
business events developer documentation."""

STRING_DEFAULTS: dict[str, tuple[str, ...]] = {
    "CustomersV3": (EXTENSION_FIELD,),
    "SalesOrderHeadersV2": (EXTENSION_FIELD, "CustomersOrderReference"),
    "SalesOrderLines": (EXTENSION_FIELD,),
}
"""String fields every row returns, "" when never set (F&O string columns are never null)."""
NUMBER_SEQUENCES: dict[str, tuple[str, str]] = {
    "CustomersV3": ("CustomerAccount", "{prefix}-C{n:05d}"),
    "SalesOrderHeadersV2": ("SalesOrderNumber", "{n:06d}"),
    "SalesOrderLines": ("InventoryLotId", "{n:06d}"),
}
"""Key field F&O fills from the company's number sequence when a create leaves it empty, and its format."""
CURRENCIES: dict[str, str] = {
    "USD": "US dollar", "EUR": "Euro", "GBP": "Pound sterling", "CHF": "Swiss franc", "JPY": "Japanese yen",
    "XAU": "Gold (troy ounce)",
}


# ============================================================================================ errors


class ODataError(Exception):
    """An OData error response (status + F&O error body)."""

    def __init__(self, status: int, message: str, *, inner: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.inner = dict(inner) if inner else None
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": "", "message": self.message}
        if self.inner is not None:
            err["innererror"] = self.inner
        return {"error": err}


def write_failed(entity: str, infolog: str) -> ODataError:
    """The HTTP 500 + AxODataWriteException shape F&O answers validation failures with."""
    table = TABLE_NAMES.get(entity, (entity, entity))[0]
    return ODataError(500, "An error has occurred.", inner={
        "message": f"Write failed for table row of type '{table}'. Infolog: {infolog}",
        "type": WRITE_EXCEPTION,
        "stacktrace": "   at Microsoft.Dynamics.Platform.Integration.Services.OData.Update.UpdateProcessor."
                      "CreateEntity_Save(...)"})


def _wcf_date(value: datetime) -> str:
    """Dates in business event payloads are serialized the WCF way, `/Date(<ms since epoch>)/`."""
    return f"/Date({int(value.timestamp() * 1000)})/"


def _line_amount(row: Mapping[str, Any]) -> float:
    qty, price = row.get("OrderedSalesQuantity"), row.get("SalesPrice")
    if isinstance(qty, bool) or isinstance(price, bool) or not isinstance(qty, int | float) \
            or not isinstance(price, int | float):
        return 0.0
    return round(float(qty) * float(price), 2)


# ============================================================================================ $filter


_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<enum>Microsoft\.Dynamics\.DataEntities\.(?P<etype>[A-Za-z_]\w*)'(?P<emember>[A-Za-z_]\w*)')
  | (?P<string>'(?:[^']|'')*')
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<paren>[()])
  | (?P<punct>[,=])
  | (?P<ident>[A-Za-z_]\w*)
""", re.VERBOSE)
_COMPARE = {"eq", "ne", "gt", "ge", "lt", "le"}


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    value: Any = None


def _parse_dt(text: str) -> datetime:
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def tokenize(text: str) -> list[_Tok]:
    """Tokens of a $filter expression (a syntax error is an ODataError 400)."""
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ODataError(400, f"Syntax error at position {pos} in '{text}'.")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind == "ws":
            continue
        raw = m.group(0)
        if kind in ("etype", "emember"):
            kind = "enum"
        if kind == "enum":
            out.append(_Tok("enum", raw, (m.group("etype"), m.group("emember"))))
        elif kind == "string":
            out.append(_Tok("string", raw, raw[1:-1].replace("''", "'")))
        elif kind == "datetime":
            out.append(_Tok("datetime", raw, _parse_dt(raw)))
        elif kind == "number":
            out.append(_Tok("number", raw, float(raw) if "." in raw else int(raw)))
        elif kind == "ident" and raw in ("true", "false", "null"):
            out.append(_Tok("literal", raw, {"true": True, "false": False, "null": None}[raw]))
        else:
            out.append(_Tok(kind, raw))
    return out


class FilterParser:
    """Recursive descent: or > and > not > comparison | (expr). Produces a tuple AST; never evaluates text."""

    def __init__(self, text: str, fields: Iterable[str], entity: str) -> None:
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.fields = set(fields)
        self.entity = entity

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise ODataError(400, f"Unexpected end of $filter '{self.text}'.")
        self.i += 1
        return tok

    def parse(self) -> tuple[Any, ...]:
        node = self.parse_or()
        if self.peek() is not None:
            raise ODataError(400, f"Syntax error: unexpected '{self.take().text}' in '{self.text}'.")
        return node

    def parse_or(self) -> tuple[Any, ...]:
        node = self.parse_and()
        while (tok := self.peek()) is not None and tok.kind == "ident" and tok.text == "or":
            self.take()
            node = ("or", node, self.parse_and())
        return node

    def parse_and(self) -> tuple[Any, ...]:
        node = self.parse_not()
        while (tok := self.peek()) is not None and tok.kind == "ident" and tok.text == "and":
            self.take()
            node = ("and", node, self.parse_not())
        return node

    def parse_not(self) -> tuple[Any, ...]:
        tok = self.peek()
        if tok is not None and tok.kind == "ident" and tok.text == "not":
            self.take()
            return ("not", self.parse_not())
        if tok is not None and tok.text == "(":
            self.take()
            node = self.parse_or()
            if self.take().text != ")":
                raise ODataError(400, f"Syntax error: ')' expected in '{self.text}'.")
            return node
        left = self.operand()
        op = self.take()
        if op.kind != "ident" or op.text not in _COMPARE:
            raise ODataError(400, f"Syntax error: comparison operator expected, got '{op.text}' in '{self.text}'.")
        return ("cmp", op.text, left, self.operand())

    def operand(self) -> tuple[Any, ...]:
        tok = self.take()
        if tok.kind == "ident":
            if tok.text not in self.fields:
                raise ODataError(400, f"Could not find a property named '{tok.text}' on type "
                                      f"'Microsoft.Dynamics.DataEntities.{self.entity}'.")
            return ("field", tok.text)
        if tok.kind in ("string", "number", "datetime", "literal", "enum"):
            return ("lit", tok.kind, tok.value)
        raise ODataError(400, f"Syntax error: operand expected, got '{tok.text}' in '{self.text}'.")


def _value(node: tuple[Any, ...], row: Mapping[str, Any], other: tuple[Any, ...]) -> Any:
    if node[0] == "field":
        value = row.get(node[1])
        if other[0] == "lit" and other[1] == "datetime" and isinstance(value, str):
            return _parse_dt(value)
        return value.lower() if isinstance(value, str) else value
    kind, value = node[1], node[2]
    if kind == "enum":
        return str(value[1]).lower()
    return value.lower() if isinstance(value, str) else value


def evaluate(node: tuple[Any, ...], row: Mapping[str, Any]) -> bool:
    """Evaluate a parsed filter against a row (strings compare case-insensitively, like SQL Server)."""
    if node[0] == "or":
        return evaluate(node[1], row) or evaluate(node[2], row)
    if node[0] == "and":
        return evaluate(node[1], row) and evaluate(node[2], row)
    if node[0] == "not":
        return not evaluate(node[1], row)
    _, op, left_node, right_node = node
    left, right = _value(left_node, row, right_node), _value(right_node, row, left_node)
    if op == "eq" and isinstance(left, str) and isinstance(right, str) and "*" in right:
        return re.fullmatch(".*".join(re.escape(p) for p in right.split("*")), left) is not None
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


# ============================================================================================ faults


DROP = 0
"""`fail_next` status meaning "the connection is dropped": the client sees a reset, not an HTTP status."""
SLOW = -1
"""Status of a `slow_next` fault: answered normally, only late."""


@dataclass
class _Fault:
    status: int
    path_contains: str | None
    method: str | None = None
    after_apply: bool = False
    delay: float = 0.0
    skip: int = 0
    """Matching requests let through untouched before this fault strikes."""


class Faults:
    """Fault knobs: failures of the next requests, token expiry."""

    def __init__(self, sim: FinOpsSimulator) -> None:
        self._sim = sim
        self._fail: list[_Fault] = []

    def fail_next(self, n: int, status: int, path_contains: str | None = None, *, method: str | None = None,
                  after_apply: bool = False, skip: int = 0) -> None:
        """The next `n` API requests (optionally only those whose path contains a text, or of one method) fail
        with `status` (`DROP`: the connection is dropped). `after_apply`: the request is applied first and only
        its answer is lost (a gateway 504 after the write, a reset after the server committed). `skip`: that many
        matching requests go through first (the fault strikes in the middle of a call)."""
        self._fail.extend(_Fault(status, path_contains, method.upper() if method else None, after_apply,
                                 skip=skip if i == 0 else 0) for i in range(n))

    def slow_next(self, n: int, seconds: float, path_contains: str | None = None, *,
                  method: str | None = None) -> None:
        """Hold the next `n` matching requests `seconds` before applying and answering them normally: a client
        with a shorter timeout gives up, and the write still lands (late), as with a real overloaded AOS."""
        self._fail.extend(_Fault(SLOW, path_contains, method.upper() if method else None, True, seconds)
                          for _ in range(n))

    def expire_tokens(self) -> None:
        """Invalidate every access token issued so far (the next API call gets 401)."""
        self._sim.entra.faults.expire_tokens()

    def clear(self) -> None:
        self._fail.clear()

    def take(self, path: str, method: str = "") -> _Fault | None:
        for i, fault in enumerate(self._fail):
            if (fault.path_contains is None or fault.path_contains in path) and \
                    (fault.method is None or fault.method == method):
                if fault.skip:
                    fault.skip -= 1
                    return None
                return self._fail.pop(i)
        return None


def _fault_response(status: int) -> Response:
    if status == DROP:
        return _Dropped()
    return JSONResponse({"error": {"code": "", "message": "An error has occurred."}}, status_code=status)


class _Dropped(Response):
    """A response that starts and never finishes: the server closes the connection mid-answer (a reset)."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        raise ConnectionAbortedError("connection dropped by the simulator's fault knob")


@dataclass
class Throttling:
    """User-based service protection: at most `limit` requests per sliding `window_seconds` (None = off)."""

    limit: int | None = None
    window_seconds: int = 300


@dataclass
class _Delivery:
    url: str
    body: bytes


# ============================================================================================ simulator


class FinOpsSimulator:
    """In-memory F&O environment: OData /data entities, Entra ID tokens, throttling, faults, business events."""

    def __init__(self, *, page_size: int = MAX_PAGE_SIZE, latency_ms: float = 0.0, event_verify: Any = True,
                 clock: Callable[[], float] = time.monotonic, event_retry_delay: float = 1.0,
                 extensions: bool = True) -> None:
        self.entities: dict[str, Entity] = dict(ENTITIES)
        self.extensions = extensions
        self.entra = DataverseSimulator(schema={})
        self.tenant_id, self.client_id, self.client_secret = (self.entra.tenant_id, self.entra.client_id,
                                                              self.entra.client_secret)
        self.page_size = page_size
        self.latency_ms = latency_ms
        self.clock = clock
        self.throttling = Throttling()
        self.faults = Faults(self)
        self.request_counts: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        """(method, raw path + query) of every API request, for tests."""
        self.event_endpoints: list[str] = []
        self.events_delivered: list[bytes] = []
        self.event_failures: list[str] = []
        self.event_retry_delay = event_retry_delay
        self._event_verify = event_verify
        self._lock = threading.RLock()
        self._tables: dict[str, dict[tuple[str, ...], dict[str, Any]]] = {e: {} for e in ENTITY_KEYS}
        self.currencies: dict[str, str] = dict(CURRENCIES)
        """The shared (not per company) currency table: code -> name."""
        self._sequences: Counter[tuple[str, str]] = Counter()
        self._documents: Counter[tuple[str, str]] = Counter()
        self._row_version = 68719479835
        self._last_modified = datetime(2000, 1, 1, tzinfo=UTC)
        self._window: deque[float] = deque()
        self._control_number = 5637144576
        self._rng = random.Random(5637)
        self._last_event: _Delivery | None = None
        self._outbox: queue.Queue[_Delivery | None] = queue.Queue()
        self._pending = 0
        self._worker: threading.Thread | None = None
        self.app = Starlette(routes=[
            Route("/{tenant}/v2.0/.well-known/openid-configuration", self.entra._openid_configuration,
                  methods=["GET"]),
            Route("/{tenant}/oauth2/v2.0/token", self.entra._token, methods=["POST"]),
            Route("/data/{rest:path}", self._api, methods=["GET", "POST", "PATCH", "DELETE"]),
        ])

    # ------------------------------------------------------------------------------------ data helpers

    @property
    def extensions(self) -> bool:
        """Whether Syncline's extension (the `SynclineSalesforceId` fields) is deployed to the environment."""
        return self._extensions

    @extensions.setter
    def extensions(self, deployed: bool) -> None:
        self._extensions = deployed
        self._fields: dict[str, set[str]] = {
            name: set(e.properties(extensions=deployed)) for name, e in self.entities.items()}
        """Entity set -> its declared properties (from the schema; $select/$filter/$orderby and writes use them)."""

    @property
    def request_count(self) -> int:
        """OData API requests received (token endpoint calls excluded)."""
        return self.request_counts["api"]

    def _now_text(self) -> str:
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        if now <= self._last_modified:
            now = self._last_modified + timedelta(milliseconds=1)
        self._last_modified = now
        return now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def _etag(self) -> str:
        self._row_version += self._rng.randint(1, 40)
        return 'W/"' + base64.b64encode(f"'1,{self._row_version}'".encode()).decode() + '"'

    def insert(self, entity: str, values: Mapping[str, Any], *, emit: bool = False) -> dict[str, Any]:
        """Add a row directly (seeding; no business validation, but F&O's defaults are filled in, and every field
        must be one the entity declares); `emit` posts the business event like a UI create."""
        with self._lock:
            check_body(self.entities[entity], values, extensions=self.extensions)
            row = dict(values)
            row.setdefault("dataAreaId", DEFAULT_COMPANY)
            row["dataAreaId"] = str(row["dataAreaId"]).lower()
            self._fill_defaults(entity, row)
            if entity in MODIFIED:
                row["ModifiedDateTime"] = self._now_text()
            row["@odata.etag"] = self._etag()
            self._tables[entity][self._key_of(entity, row)] = row
            if emit:
                self._emit(entity, row, None)
            return dict(row)

    def get(self, entity: str, *key: str) -> dict[str, Any] | None:
        """A row by key values (dataAreaId first), or None."""
        with self._lock:
            row = self._tables[entity].get(tuple(k.lower() for k in key))
            return dict(row) if row else None

    def all(self, entity: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._tables[entity].values()]

    def apply_change(self, entity: str, key: tuple[str, ...], values: Mapping[str, Any]) -> dict[str, Any]:
        """An edit made in the F&O UI: updates the row and posts its business event (declared fields only)."""
        with self._lock:
            check_body(self.entities[entity], values, extensions=self.extensions)
            row = self._tables[entity][tuple(k.lower() for k in key)]
            before = dict(row)
            row.update(values)
            if entity in MODIFIED:
                row["ModifiedDateTime"] = self._now_text()
            row["@odata.etag"] = self._etag()
            self._emit(entity, row, before)
            return dict(row)

    def _key_of(self, entity: str, row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(str(row.get(k, "")).lower() for k in ENTITY_KEYS[entity])

    def _row(self, entity: str, company: Any, value: Any) -> dict[str, Any] | None:
        """The row of a two-part key (dataAreaId, id) entity; F&O keys compare case-insensitively."""
        return self._tables[entity].get((str(company).lower(), str(value).lower()))

    def _order_lines(self, company: str, number: str) -> list[dict[str, Any]]:
        return [r for r in self._tables["SalesOrderLines"].values()
                if r["dataAreaId"] == company and str(r.get("SalesOrderNumber", "")).lower() == number.lower()]

    def _next_number(self, entity: str, company: str) -> str:
        """The next free number of the company's sequence (numbers taken by hand or by seeding are skipped)."""
        field, pattern = NUMBER_SEQUENCES[entity]
        while True:
            self._sequences[(entity, company)] += 1
            value = pattern.format(prefix=company[:2].upper(), n=self._sequences[(entity, company)])
            if self._key_of(entity, {"dataAreaId": company, field: value}) not in self._tables[entity]:
                return value

    def _fill_defaults(self, entity: str, row: dict[str, Any]) -> None:
        """What F&O fills in on create (and what seeded rows would have had)."""
        for name in STRING_DEFAULTS.get(entity, ()):
            if name in self._fields[entity] and row.get(name) is None:
                row[name] = ""
        company = row["dataAreaId"]
        if entity == "SalesOrderHeadersV2":
            row["SalesOrderStatus"] = row.get("SalesOrderStatus") or "Backorder"
            ordering = row.get("OrderingCustomerAccountNumber")
            if ordering and not row.get("InvoiceCustomerAccountNumber"):
                row["InvoiceCustomerAccountNumber"] = ordering
            customer = self._row("CustomersV3", company, ordering) if ordering else None
            if customer is not None and not row.get("CurrencyCode"):
                row["CurrencyCode"] = customer.get("SalesCurrencyCode", "")
        elif entity == "SalesOrderLines":
            if row.get("OrderedSalesQuantity") is None:
                row["OrderedSalesQuantity"] = 1.0  # the item's default sales quantity
            item = self._row("ReleasedProductsV2", company, row.get("ItemNumber"))
            if row.get("SalesPrice") is None:
                row["SalesPrice"] = float(item.get("SalesPrice") or 0.0) if item else 0.0
            if not row.get("LineNumber") and row.get("SalesOrderNumber"):
                numbers = [r.get("LineNumber") or 0 for r in self._order_lines(company, str(row["SalesOrderNumber"]))]
                row["LineNumber"] = max((int(n) for n in numbers if isinstance(n, int | float)), default=0) + 1
            if row.get("LineAmount") is None:
                row["LineAmount"] = _line_amount(row)

    # ------------------------------------------------------------------------------------ fulfilment

    def ship_order(self, company: str, number: str) -> dict[str, Any]:
        """Post the packing slip of an open order (the warehouse delivered it): SalesOrderStatus `Delivered`,
        business event `PACKING_SLIP_EVENT` with SalesOrderId, PackingSlipId, DeliveryDate, CustomerAccount."""
        with self._lock:
            row = self._fulfillable(company, number, ("Backorder",), "deliver")
            slip = f"PS-{self._next_document(row['dataAreaId'], 'packing slip'):06d}"
            self._set_status(row, "Delivered")
            self._post_event(PACKING_SLIP_EVENT, row["dataAreaId"], {
                "SalesOrderId": row["SalesOrderNumber"], "PackingSlipId": slip,
                "DeliveryDate": _wcf_date(datetime.now(UTC)),
                "CustomerAccount": row.get("OrderingCustomerAccountNumber", "")})
            return dict(row)

    def invoice_order(self, company: str, number: str) -> dict[str, Any]:
        """Post the invoice of an open or delivered order: SalesOrderStatus `Invoiced`, business event
        `INVOICE_EVENT` with the documented contract (InvoiceAccount, InvoiceId, SalesOrderId, InvoiceDate,
        InvoiceDueDate, InvoiceAmountInAccountingCurrency, InvoiceTaxAmount)."""
        with self._lock:
            row = self._fulfillable(company, number, ("Backorder", "Delivered"), "invoice")
            lines = self._order_lines(row["dataAreaId"], row["SalesOrderNumber"])
            amount = round(sum(float(r.get("LineAmount") or 0.0) for r in lines), 2)
            invoice = f"CIV-{self._next_document(row['dataAreaId'], 'invoice'):06d}"
            today = datetime.now(UTC)
            self._set_status(row, "Invoiced")
            self._post_event(INVOICE_EVENT, row["dataAreaId"], {
                "InvoiceAccount": row.get("InvoiceCustomerAccountNumber") or row.get("OrderingCustomerAccountNumber"),
                "InvoiceId": invoice, "SalesOrderId": row["SalesOrderNumber"], "InvoiceDate": _wcf_date(today),
                "InvoiceDueDate": _wcf_date(today + timedelta(days=30)),
                "InvoiceAmountInAccountingCurrency": amount, "InvoiceTaxAmount": 0.0})
            return dict(row)

    def _fulfillable(self, company: str, number: str, states: tuple[str, ...], verb: str) -> dict[str, Any]:
        row = self._row("SalesOrderHeadersV2", company, number)
        if row is None:
            raise KeyError(f"sales order {company}|{number} does not exist")
        if row.get("SalesOrderStatus") not in states:
            raise ValueError(f"cannot {verb} sales order {company}|{number}: it is {row.get('SalesOrderStatus')}")
        if not self._order_lines(row["dataAreaId"], row["SalesOrderNumber"]):
            raise ValueError(f"cannot {verb} sales order {company}|{number}: it has no lines")
        return row

    def _next_document(self, company: str, kind: str) -> int:
        self._documents[(kind, company)] += 1
        return self._documents[(kind, company)]

    def _set_status(self, row: dict[str, Any], status: str) -> None:
        row["SalesOrderStatus"] = status
        row["ModifiedDateTime"] = self._now_text()
        row["@odata.etag"] = self._etag()

    # ------------------------------------------------------------------------------------ business events

    def register_business_event_endpoint(self, url: str) -> None:
        """Activate the customer-changed and sales-order-status events to an HTTPS endpoint."""
        self.event_endpoints.append(url)

    def _emit(self, entity: str, row: Mapping[str, Any], before: Mapping[str, Any] | None) -> None:
        if entity == "CustomersV3":
            event_id, fields = CUSTOMER_EVENT, {"Account": row["CustomerAccount"],
                                                "Name": row.get("OrganizationName", "")}
        elif entity == "SalesOrderHeadersV2" and before is not None and \
                before.get("SalesOrderStatus") != row.get("SalesOrderStatus"):
            event_id, fields = SALES_STATUS_EVENT, {"SalesOrderNumber": row["SalesOrderNumber"],
                                                    "SalesOrderStatus": row.get("SalesOrderStatus", "")}
        else:
            return
        self._post_event(event_id, str(row["dataAreaId"]), fields)

    def _post_event(self, event_id: str, legal: str, fields: Mapping[str, Any]) -> None:
        if not self.event_endpoints:
            return
        self._control_number += self._rng.randint(2, 9)  # upward, with gaps
        now = datetime.now(UTC)
        body = json.dumps({
            **fields, "BusinessEventId": event_id, "BusinessEventLegalEntity": legal, "ContextRecordSubject": "",
            "ControlNumber": self._control_number, "EventId": str(uuid.uuid4()).upper(),
            "EventTime": _wcf_date(now),
            "EventTimeIso8601": now.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z",
            "InitiatingUserAADObjectId": "{C600136F-6814-41D9-8642-40CA0EC4EDD4}", "LegalEntity": legal,
            "MajorVersion": 0, "MinorVersion": 0, "ParentContextRecordSubjects": []}).encode()
        for url in self.event_endpoints:
            self._queue(_Delivery(url, body))

    def _queue(self, delivery: _Delivery) -> None:
        with self._lock:
            self._last_event = delivery
            self._pending += 1
            if self._worker is None:
                self._worker = threading.Thread(target=self._deliver_loop, name="fno-sim-events", daemon=True)
                self._worker.start()
        self._outbox.put(delivery)

    def _deliver_loop(self) -> None:
        with httpx.Client(verify=self._event_verify, timeout=30.0) as client:
            while (delivery := self._outbox.get()) is not None:
                try:
                    for attempt in range(3):  # business events retry 3 times, 1 s apart (configurable)
                        try:
                            resp = client.post(delivery.url, content=delivery.body,
                                               headers={"Content-Type": "application/json"})
                            if resp.is_success:
                                self.events_delivered.append(delivery.body)
                                break
                            error = f"HTTP {resp.status_code}"
                        except httpx.HTTPError as exc:
                            error = f"{type(exc).__name__}: {exc}"
                        if attempt == 2:
                            self.event_failures.append(f"{delivery.url}: {error}")
                        else:
                            time.sleep(self.event_retry_delay)
                finally:
                    with self._lock:
                        self._pending -= 1

    def deliver_duplicate_last_event(self) -> None:
        """Post the last event again, unchanged (endpoints receive duplicates in real life)."""
        with self._lock:
            last = self._last_event
        if last is None:
            raise RuntimeError("no business event was posted yet")
        self._queue(last)

    async def flush_events(self, timeout: float = 10.0) -> None:
        """Wait until every queued business event was delivered (or failed)."""
        import asyncio

        deadline = time.monotonic() + timeout
        while self._pending > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._pending} business events still pending")
            await asyncio.sleep(0.01)

    def close(self) -> None:
        """Stop the event delivery thread and the composed Entra simulator."""
        if self._worker is not None:
            self._outbox.put(None)
            self._worker.join(timeout=5)
            self._worker = None
        self.entra.close()

    # ------------------------------------------------------------------------------------ HTTP

    async def _api(self, request: Request) -> Response:
        import asyncio

        raw_path = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
        self.request_counts["api"] += 1
        self.requests.append((request.method, raw_path + (f"?{request.url.query}" if request.url.query else "")))
        if self.entra._authenticate({k.lower(): v for k, v in request.headers.items()}) is None:
            self.request_counts["401"] += 1
            return Response(status_code=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        throttled = self._throttle()
        if throttled is not None:
            self.request_counts["429"] += 1
            return JSONResponse(throttled.body(), status_code=429, headers=throttled.headers)
        fault = self.faults.take(raw_path, request.method)
        if fault is not None:
            self.request_counts[f"fault{fault.status}"] += 1
            if not fault.after_apply:
                return _fault_response(fault.status)
            if fault.delay:
                await request.body()  # read now: the client is gone when the delay ends, the request is not
                await asyncio.sleep(fault.delay)
            if fault.status == SLOW:
                fault = None
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        query = parse_qsl(request.url.query, keep_blank_values=True)
        body = await request.body()
        resource = unquote(raw_path[len(DATA_PREFIX):]) if raw_path.startswith(DATA_PREFIX) else ""
        if resource in ("$metadata", "") and request.method == "GET":
            return self._service_documents(resource, str(request.base_url).rstrip("/"))
        try:
            with self._lock:
                status, headers, payload = self._dispatch(request.method, unquote(raw_path[len(DATA_PREFIX):]),
                                                          dict(query), request.headers, body,
                                                          str(request.base_url).rstrip("/"))
        except ODataError as err:
            if fault is not None:
                return _fault_response(fault.status)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        if fault is not None:
            return _fault_response(fault.status)
        if payload is None:
            return Response(status_code=status, headers=headers)
        return JSONResponse(payload, status_code=status, headers=headers)

    def _service_documents(self, resource: str, base: str) -> Response:
        """`/data/$metadata` (CSDL from the schema) and the service document `/data/` (the entity sets)."""
        if resource == "$metadata":
            return Response(csdl(self.entities, extensions=self.extensions), media_type="application/xml",
                            headers={"OData-Version": "4.0"})
        return JSONResponse({"@odata.context": f"{base}/data/$metadata", "value": [
            {"name": name, "kind": "EntitySet", "url": name} for name in self.entities]},
            headers={"OData-Version": "4.0"})

    def _throttle(self) -> ODataError | None:
        limit = self.throttling.limit
        if limit is None:
            return None
        now = self.clock()
        window = self.throttling.window_seconds
        with self._lock:
            while self._window and self._window[0] <= now - window:
                self._window.popleft()
            if len(self._window) >= limit:
                retry = max(1, math.ceil(self._window[0] + window - now))
                return ODataError(429, THROTTLE_MESSAGE.format(limit=limit, window=window),
                                  headers={"Retry-After": str(retry)})
            self._window.append(now)
        return None

    def _entity_and_key(self, path: str) -> tuple[str, dict[str, str] | None]:
        m = re.fullmatch(r"(?P<entity>[A-Za-z_]\w*)(?:\((?P<key>.*)\))?", path)
        if m is None or m.group("entity") not in self._tables:
            raise ODataError(404, f"No HTTP resource was found that matches the request URI '{path}'.")
        entity = m.group("entity")
        if m.group("key") is None:
            return entity, None
        toks = tokenize(m.group("key"))
        key: dict[str, str] = {}
        i = 0
        while i < len(toks):
            if (i + 2 >= len(toks) or toks[i].kind != "ident" or toks[i + 1].text != "="
                    or toks[i + 2].kind not in ("string", "number")):
                raise ODataError(400, f"Bad key predicate in '{path}'.")
            key[toks[i].text] = str(toks[i + 2].value)
            i += 3
            if i < len(toks):
                if toks[i].text != ",":
                    raise ODataError(400, f"Bad key predicate in '{path}'.")
                i += 1
        wanted = ENTITY_KEYS[entity]
        if set(key) != set(wanted):
            raise ODataError(400, f"The number of keys specified in the URI does not match number of key properties "
                                  f"for the resource '{entity}'. Expected: {', '.join(wanted)}; got: "
                                  f"{', '.join(key) or 'none'}.")
        return entity, key

    def _public(self, entity: str, row: Mapping[str, Any], base: str, select: list[str] | None) -> dict[str, Any]:
        out = {"@odata.etag": row["@odata.etag"]}
        out.update({k: v for k, v in row.items() if "@" not in k and (select is None or k in select)})
        return out

    def _dispatch(self, method: str, path: str, query: dict[str, str], headers: Mapping[str, str], body: bytes,
                  base: str) -> tuple[int, dict[str, str], Any]:
        entity, key = self._entity_and_key(path)
        cross = query.get("cross-company", "").lower() == "true"
        table = self._tables[entity]
        select = [s.strip() for s in query["$select"].split(",")] if query.get("$select") else None
        for name in select or []:
            if name not in self._fields[entity]:
                raise ODataError(400, could_not_find_property(self.entities[entity], name))
        if key is not None:
            ktuple = tuple(key[k].lower() for k in ENTITY_KEYS[entity])
            row = table.get(ktuple)
            if method == "GET" and row is not None and not cross and row["dataAreaId"] != DEFAULT_COMPANY:
                row = None  # another company is only visible with cross-company=true
            if row is None:
                raise ODataError(404, f"Resource not found for the segment '{entity}'.")
            if method == "GET":
                return 200, {"ETag": row["@odata.etag"]}, {
                    "@odata.context": f"{base}/data/$metadata#{entity}/$entity", **self._public(entity, row, base,
                                                                                                 select)}
            match = headers.get("if-match")
            if match not in (None, "*") and match != row["@odata.etag"]:
                raise ODataError(412, "The ETag value in the request header does not match with the current "
                                      "ETag value of the object.")
            if method == "DELETE":
                del table[ktuple]
                return 204, {}, None
            if method == "PATCH":
                changes = self._json(body)
                self._check_body(entity, changes)
                for name in ENTITY_KEYS[entity]:
                    if name in changes and str(changes[name]).lower() != str(row[name]).lower():
                        raise ODataError(400, f"Key property '{name}' cannot be changed.")
                merged = {**row, **changes}
                if entity == "SalesOrderLines" and "LineAmount" not in changes and \
                        {"OrderedSalesQuantity", "SalesPrice"} & set(changes):
                    changes["LineAmount"] = merged["LineAmount"] = _line_amount(merged)
                self._validate(entity, merged, creating=False)
                before = dict(row)
                row.update(changes)
                if entity in MODIFIED:
                    row["ModifiedDateTime"] = self._now_text()
                row["@odata.etag"] = self._etag()
                self._emit(entity, row, before)
                return 204, {"ETag": row["@odata.etag"]}, None
            raise ODataError(405, f"The HTTP method '{method}' is not allowed on a key URL.")
        if method == "POST":
            values = self._json(body)
            self._check_body(entity, values)
            values.setdefault("dataAreaId", DEFAULT_COMPANY)
            values["dataAreaId"] = str(values["dataAreaId"]).lower()
            self._fill_defaults(entity, values)
            self._validate(entity, values, creating=True)
            sequence = NUMBER_SEQUENCES.get(entity)
            if sequence is not None and not values.get(sequence[0]):
                values[sequence[0]] = self._next_number(entity, values["dataAreaId"])
            missing = [k for k in ENTITY_KEYS[entity] if not values.get(k)]
            if missing:
                raise write_failed(entity, f"Error: Field '{missing[0]}' must be filled in.")
            ktuple = self._key_of(entity, values)
            if ktuple in table:
                label = TABLE_NAMES[entity][1]
                raise write_failed(entity, f"Cannot create a record in {label}. The record already exists.; "
                                           f"Key: {', '.join(ktuple)}")
            row = self.insert(entity, values)
            self._emit(entity, row, None)
            stored = table[ktuple]
            location = f"{base}/data/{entity}(" + ",".join(
                f"{k}='{quote(str(stored[k]).replace(chr(39), chr(39) * 2))}'" for k in ENTITY_KEYS[entity]) + ")"
            return 201, {"ETag": stored["@odata.etag"], "Location": location}, {
                "@odata.context": f"{base}/data/$metadata#{entity}/$entity", **self._public(entity, stored, base,
                                                                                             None)}
        if method != "GET":
            raise ODataError(405, f"The HTTP method '{method}' is not allowed on an entity set.")
        rows = [r for r in table.values() if cross or r["dataAreaId"] == DEFAULT_COMPANY]
        if query.get("$filter"):
            node = FilterParser(query["$filter"], self._fields[entity], self.entities[entity].type_name).parse()
            rows = [r for r in rows if evaluate(node, r)]
        rows.sort(key=lambda r: self._key_of(entity, r))
        for part in reversed([p.strip() for p in query.get("$orderby", "").split(",") if p.strip()]):
            name, _, direction = part.partition(" ")
            if name not in self._fields[entity]:
                raise ODataError(400, could_not_find_property(self.entities[entity], name))
            def order(r: dict[str, Any], n: str = name) -> tuple[bool, str]:
                return r.get(n) is not None, str(r.get(n) or "")

            rows.sort(key=order, reverse=direction.strip().lower() == "desc")
        try:
            top = int(query["$top"]) if "$top" in query else None
            skip = int(query.get("$skip", "0"))
        except ValueError as exc:
            raise ODataError(400, "Invalid $top / $skip value.") from exc
        if top is not None:
            rows = rows[:top]
        size = self.page_size
        prefer = re.search(r"odata\.maxpagesize=(\d+)", headers.get("prefer", ""))
        if prefer:
            size = min(size, int(prefer.group(1)))
        page = rows[skip:skip + size]
        payload: dict[str, Any] = {"@odata.context": f"{base}/data/$metadata#{entity}",
                                   "value": [self._public(entity, r, base, select) for r in page]}
        if skip + size < len(rows):
            params = [(k, v) for k, v in query.items() if k != "$skip"] + [("$skip", str(skip + size))]
            payload["@odata.nextLink"] = f"{base}/data/{entity}?{urlencode(params, quote_via=quote)}"
        return 200, {}, payload

    def _check_body(self, entity: str, body: Mapping[str, Any]) -> None:
        """ODataLib reads the body against the entity type before F&O sees it: an undeclared property (a typo, an
        extension that is not deployed) or a value of the wrong type is a 400, and nothing is written."""
        try:
            check_body(self.entities[entity], body, extensions=self.extensions)
        except SchemaViolation as exc:
            raise ODataError(400, "An error has occurred.", inner={
                "message": str(exc), "type": "Microsoft.OData.ODataException", "stacktrace": ""}) from exc

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        try:
            data = strict_loads(body or b"{}")
        except ValueError as exc:
            raise ODataError(400, "The request body is not valid JSON.") from exc
        if not isinstance(data, dict):
            raise ODataError(400, "The request body must be a JSON object.")
        return {k: v for k, v in data.items() if "@" not in k}

    def _validate(self, entity: str, row: Mapping[str, Any], *, creating: bool) -> None:
        """F&O's validateField / validateWrite: mandatory fields on create, relations, ranges."""
        table = TABLE_NAMES[entity][0] if entity in TABLE_NAMES else entity
        company = str(row["dataAreaId"]).lower()

        def mandatory(name: str, label: str) -> None:
            if creating and (row.get(name) is None or row.get(name) == ""):
                raise write_failed(entity, f"Error: Field '{label}' must be filled in.")

        def related(name: str, label: str, other: str, other_label: str) -> None:
            value = row.get(name)
            if value is None or value == "":
                return
            if other == "Currency":
                found = str(value).upper() in self.currencies
            else:
                found = self._row(other, company, value) is not None
            if not found:
                raise write_failed(entity, f"Warning: The value '{value}' in field '{label}' is not found in the "
                                           f"related table '{other_label}'.; Warning: validateField failed on field "
                                           f"'{table}.{name}'.")

        if entity == "CustomersV3":
            mandatory("CustomerGroupId", "Customer group")
            related("CustomerGroupId", "Customer group", "CustomerGroups", "Customer groups")
            related("SalesCurrencyCode", "Currency", "Currency", "Currency")
        elif entity == "SalesOrderHeadersV2":
            mandatory("OrderingCustomerAccountNumber", "Customer account")
            account = row.get("OrderingCustomerAccountNumber")
            if account and self._row("CustomersV3", company, account) is None:
                raise write_failed(entity, f"Warning: Customer {account} does not exist.")
            related("InvoiceCustomerAccountNumber", "Invoice account", "CustomersV3", "Customers")
            related("CurrencyCode", "Currency", "Currency", "Currency")
            shipping = row.get("RequestedShippingDate")
            if shipping not in (None, "") and not _is_date(shipping):
                raise ODataError(400, f"Cannot convert the literal '{shipping}' to the expected type "
                                      "'Edm.DateTimeOffset'.")
        elif entity == "SalesOrderLines":
            mandatory("SalesOrderNumber", "Sales order")
            mandatory("ItemNumber", "Item number")
            related("SalesOrderNumber", "Sales order", "SalesOrderHeadersV2", "Sales orders")
            related("ItemNumber", "Item number", "ReleasedProductsV2", "Released products")
            qty = row.get("OrderedSalesQuantity")
            if isinstance(qty, bool) or not isinstance(qty, int | float) or not qty > 0:
                raise write_failed(entity, f"Error: The quantity {qty} is not valid: the ordered quantity must be "
                                           "greater than zero.; Warning: validateField failed on field "
                                           f"'{table}.OrderedSalesQuantity'.")


def _is_date(value: Any) -> bool:
    """A date (`2026-11-02`) or a date-time with offset, as OData accepts for F&O date fields."""
    if not isinstance(value, str):
        return False
    try:
        if len(value) == 10:
            date.fromisoformat(value)
        else:
            _parse_dt(value)
    except ValueError:
        return False
    return True


# ============================================================================================ seed

_CITIES = [("Chicago", "IL", "USA"), ("Houston", "TX", "USA"), ("Detroit", "MI", "USA"), ("Pittsburgh", "PA", "USA"),
           ("Munich", "BY", "DEU"), ("Stuttgart", "BW", "DEU"), ("Hamburg", "HH", "DEU"), ("Cologne", "NW", "DEU")]
_NAMES = ["Atlas Fabrication", "Keystone Mining", "Northwind Hydraulics", "Granite Construction", "Prairie Agri",
          "Summit Steelworks", "Harbor Logistics", "Ridge Energy", "Blue River Paper", "Ironclad Foundry",
          "Cascade Utilities", "Vulcan Forge"]
_PRODUCTS = ["Hydraulic pump", "Gearbox", "Conveyor drive", "Industrial compressor", "Boom cylinder", "Control valve",
             "Track roller", "Hydraulic hose kit", "Excavator bucket", "PLC control cabinet"]
UNMAPPED_CURRENCY = "XAU"
"""Currency of the deliberately bad customer (no currency map entry in any flow)."""


def seed_fno(sim: FinOpsSimulator, *, customers: int = 40, products: int = 30,
             companies: tuple[str, ...] = ("usmf", "demf")) -> None:
    """Deterministic data of a mid-sized industrial equipment maker, plus a couple of deliberately bad rows.

    Bad rows: customer `<company>|<PREFIX>-BAD1` uses currency `UNMAPPED_CURRENCY`; product `<company>|P-BAD1`
    has no name.
    """
    rng = random.Random(42)
    for company in companies:
        prefix = company[:2].upper()
        currency = "USD" if company.startswith("us") else "EUR"
        for gid, desc in (("10", "Wholesale customers"), ("20", "Major accounts"), ("30", "Dealers"),
                          ("90", "Intercompany")):
            sim.insert("CustomerGroups", {"dataAreaId": company, "CustomerGroupId": gid, "Description": desc,
                                          "PaymentTermId": "Net30"})
        for i in range(1, customers + 1):
            city, state, country = _CITIES[(i + (4 if currency == "EUR" else 0)) % len(_CITIES)]
            name = f"{_NAMES[i % len(_NAMES)]} {i:03d}"
            sim.insert("CustomersV3", {
                "dataAreaId": company, "CustomerAccount": f"{prefix}-{i:03d}", "OrganizationName": name,
                "CustomerGroupId": rng.choice(["10", "20", "30"]), "SalesCurrencyCode": currency,
                "AddressCity": city, "AddressState": state, "AddressCountryRegionId": country,
                "CreditLimit": float(rng.randrange(10, 500) * 1000), "IsCustomerOnHold": "No",
                "PrimaryContactEmail": f"ap{i:03d}@{name.split()[0].lower()}.example"})
        sim.insert("CustomersV3", {
            "dataAreaId": company, "CustomerAccount": f"{prefix}-BAD1", "OrganizationName": "Goldleaf Trading",
            "CustomerGroupId": "10", "SalesCurrencyCode": UNMAPPED_CURRENCY, "AddressCity": "Zurich",
            "AddressState": "", "AddressCountryRegionId": "CHE", "CreditLimit": 0.0, "IsCustomerOnHold": "Yes",
            "PrimaryContactEmail": ""})
        for i in range(1, products + 1):
            sim.insert("ReleasedProductsV2", {
                "dataAreaId": company, "ItemNumber": f"P-{1000 + i}",
                "ProductName": f"{_PRODUCTS[i % len(_PRODUCTS)]} {chr(65 + i % 26)}{i}",
                "ProductType": "Item", "ItemModelGroupId": "FIFO", "SalesPrice": float(rng.randrange(50, 9000)),
                "IsPhantom": "No"})
        sim.insert("ReleasedProductsV2", {"dataAreaId": company, "ItemNumber": "P-BAD1", "ProductName": "",
                                          "ProductType": "Item", "ItemModelGroupId": "", "SalesPrice": 0.0,
                                          "IsPhantom": "No"})
        lot = 0
        for o in range(1, 6):
            number = f"{prefix}SO-{o:05d}"
            sim.insert("SalesOrderHeadersV2", {
                "dataAreaId": company, "SalesOrderNumber": number, "CurrencyCode": currency,
                "OrderingCustomerAccountNumber": f"{prefix}-{o:03d}", "SalesOrderStatus": "Backorder"})
            for line in range(1, 3):
                lot += 1
                sim.insert("SalesOrderLines", {
                    "dataAreaId": company, "InventoryLotId": f"{prefix}L{lot:06d}", "SalesOrderNumber": number,
                    "ItemNumber": f"P-{1000 + line + o}", "OrderedSalesQuantity": float(line * o),
                    "SalesPrice": float(rng.randrange(50, 900)), "LineNumber": line})


