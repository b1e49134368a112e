"""Protocol-faithful simulator of the Salesforce REST API v63.0 (Starlette ASGI; serve it over TLS).

Covers what Syncline uses: the client-credentials token endpoint on My Domain, sObject CRUD and upsert by
External ID (indexed), sObject Collections (create/update/upsert/delete with per-record results), SOQL queries
(a real subset parser) with `nextRecordsUrl` paging, Bulk API 2.0 ingest jobs, the daily request allocation with
`Sforce-Limit-Info`, expired sessions, and Change Data Capture events (Pub/Sub-shaped JSON). Opportunity and
Order lines roll up into the header (Amount, TotalAmount) in the line's transaction, as in the org. Seeds for the
lead-to-cash and Customer 360 flows are made as a UI user, so they emit change events like people editing.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
import re
import secrets
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox import salesforce_schema as schema
from shared.payloads import strict_loads

API_VERSION = "63.0"
API_PREFIX = f"/services/data/v{API_VERSION}/"
QUERY_BATCH = 2000
COLLECTION_LIMIT = 200
COMPOSITE_LIMIT = 25
COMPOSITE_QUERY_LIMIT = 5


def _release(version: int) -> str:
    """Release name of an API version: 63.0 is Spring '25, one version back is one season back."""
    back = 63 - version
    season, year = [("Spring", 25), ("Winter", 25), ("Summer", 24)][back % 3]
    return f"{season} '{year - back // 3}"


API_VERSIONS = [(f"{v}.0", _release(v)) for v in range(31, 64)]
"""`GET /services/data/`: every version is served, all with v63.0's behaviour."""
_VERSION_NUMBERS = frozenset(v for v, _ in API_VERSIONS)
_REF_ID_RE = re.compile(r"[A-Za-z0-9_]{1,80}")
_SUB_URL_RE = re.compile(r"/services/data/v([0-9.]+)/(.*)")
_REF_RE = re.compile(r"@\{([A-Za-z0-9_]+)((?:\.[A-Za-z0-9_]+|\[\d+\])*)\}")

DEFAULT_CLIENT_ID = "3MVG9sim.Syncline.Connected.App"
DEFAULT_CLIENT_SECRET = "sim-sf-secret-0123456789ABCDEF"  # a fixed test secret
ORG_ID = "00D5g00000SyncAAA"
RUN_AS_USER_ID = "0055g00000SyncAAA"
UI_USER_ID = "0055g00000OfficAAA"

KEY_PREFIX = {o.name: o.key_prefix for o in schema.SOBJECTS}
SYSTEM_FIELDS = schema.SYSTEM_NAMES
SCHEMAS: dict[str, dict[str, str]] = {o.name: dict(schema.field_types(o)) for o in schema.SOBJECTS}
"""sObject -> field -> describe type, from `sandbox.salesforce_schema` (the one place the org's schema is declared)."""
EXTERNAL_IDS: dict[str, frozenset[str]] = {o.name: frozenset(f.name for f in o.fields if f.external_id)
                                           for o in schema.SOBJECTS}
REQUIRED: dict[str, tuple[str, ...]] = {o.name: tuple(f.name for f in o.fields if f.required) for o in schema.SOBJECTS}
REFERENCES: dict[str, str] = {f.name: f.reference_to for o in schema.SOBJECTS for f in o.fields if f.reference_to}
"""Lookup field -> the sObject it points to (the same on every object that has it)."""
CALCULATED: dict[str, frozenset[str]] = {o.name: frozenset(f.name for f in o.fields if f.calculated)
                                         for o in schema.SOBJECTS}
"""Formula / roll-up fields: computed by the org, refused on create and update."""
CREATE_ONLY: dict[str, frozenset[str]] = {
    o.name: frozenset(f.name for f in o.fields if f.createable and not f.updateable) for o in schema.SOBJECTS}
"""A line belongs to its header and product for life (master-detail; the price book entry is fixed)."""
ROLLUPS: dict[str, tuple[str, str, str]] = {"OpportunityLineItem": ("OpportunityId", "Opportunity", "Amount"),
                                           "OrderItem": ("OrderId", "Order", "TotalAmount")}
"""Line sObject -> (field holding the header id, header sObject, header field summing the lines' TotalPrice)."""
ORDER_STATUSES = ("Draft", "Activated")
UI_ORIGIN = "com/salesforce/ui"


def to_18(id15: str) -> str:
    """Salesforce's case-safe 18-character id: three checksum characters from the capital letters."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
    suffix = ""
    for chunk in (id15[0:5], id15[5:10], id15[10:15]):
        bits = sum(1 << i for i, ch in enumerate(chunk) if "A" <= ch <= "Z")
        suffix += alphabet[bits]
    return id15 + suffix


_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SF_ID_RE = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")


def _ext_key(value: Any) -> str | None:
    """Index key of an External ID value: matching is case-insensitive, and a blank value matches nothing."""
    return None if value in (None, "") else str(value).lower()


def _number(name: str, value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        raise SalesforceFault(400, "INVALID_TYPE_ON_FIELD_IN_RECORD",
                              f"{name}: value not of required type: {value}", [name]) from None


def sf_datetime(moment: datetime) -> str:
    """Salesforce's REST datetime format: `2024-05-01T10:00:00.000+0000`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


class SalesforceFault(Exception):
    """An error answered as Salesforce's JSON error array."""

    def __init__(self, status: int, code: str, message: str, fields: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, list(fields or [])

    def answer(self) -> tuple[int, Any]:
        """(HTTP status, JSON body): the error array, or the matching record URLs of a 300."""
        return (300, self.fields) if self.status == 300 else (self.status, self.body())

    def body(self) -> list[dict[str, Any]]:
        item: dict[str, Any] = {"message": self.message, "errorCode": self.code}
        if self.fields:
            item["fields"] = self.fields
        return [item]

    def record_error(self) -> dict[str, Any]:
        """The same error inside a per-record result (collections use `statusCode`)."""
        return {"statusCode": self.code, "message": self.message, "fields": self.fields}


# ================================================================================================ SOQL


_TOKEN_RE = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2}))"
    r"|(?P<date>\d{4}-\d{2}-\d{2})|(?P<num>-?\d+(?:\.\d+)?)|(?P<op><=|>=|!=|<>|=|<|>)|(?P<punct>[(),])"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_.]*))",
)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", '"': '"', "'": "'", "\\": "\\",
            "_": "\\_", "%": "\\%"}


def _unescape(raw: str) -> str:
    out, i = [], 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\":
            if i + 1 >= len(raw) or raw[i + 1] not in _ESCAPES:
                raise SalesforceFault(400, "MALFORMED_QUERY", f"Invalid string literal: bad escape in '{raw}'")
            out.append(_ESCAPES[raw[i + 1]])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _parse_dt(text: str) -> datetime:
    text = text.replace("Z", "+00:00")
    if re.search(r"[+-]\d{4}$", text):
        text = text[:-2] + ":" + text[-2:]
    return datetime.fromisoformat(text)


@dataclass
class _Tok:
    kind: str
    value: Any
    text: str
    pos: int = 0


def _tokenize(soql: str) -> list[_Tok]:
    tokens, pos = [], 0
    while pos < len(soql):
        if soql[pos:].strip() == "":
            break
        match = _TOKEN_RE.match(soql, pos)
        if not match or match.end() == pos:
            raise SalesforceFault(400, "MALFORMED_QUERY", f"unexpected token at: {soql[pos:pos + 20]!r}")
        kind = match.lastgroup or ""
        text = match.group(kind)
        value: Any = text
        if kind == "str":
            value = _unescape(text[1:-1])
        elif kind == "dt":
            value = _parse_dt(text)
        elif kind == "num":
            value = float(text) if "." in text else int(text)
        tokens.append(_Tok(kind, value, text, match.start(kind)))
        pos = match.end()
    return tokens


Predicate = Callable[[Mapping[str, Any]], bool]
Hint = tuple[str, tuple[Any, ...]]
"""`Field = v` / `Field IN (v, ...)` the whole WHERE clause requires: a match has one of the values."""


@dataclass
class Soql:
    fields: list[str]
    sobject: str
    where: Predicate | None
    order: tuple[str, bool] | None
    limit: int | None
    hints: list[Hint] = field(default_factory=list)


Resolver = Callable[[str, str, int], str]
"""(sObject, field name as written, its offset in the query) -> the field's API name, or a SalesforceFault."""


def soql_error(soql: str, pos: int, code: str, text: str) -> SalesforceFault:
    """A SOQL error the way the org reports it: the query line, a caret under the token, `ERROR at Row:r:Column:c`."""
    row = soql.count("\n", 0, pos) + 1
    line_start = soql.rfind("\n", 0, pos) + 1
    line_end = soql.find("\n", pos)
    line = soql[line_start: len(soql) if line_end < 0 else line_end]
    column = pos - line_start + 1
    return SalesforceFault(400, code, f"\n{line}\n{' ' * (column - 1)}^\nERROR at Row:{row}:Column:{column}\n{text}")


class _SoqlParser:
    def __init__(self, soql: str, resolve: Callable[[str, int], str] | None = None,
                 resolve_field: Resolver | None = None) -> None:
        self.soql = soql
        self.tokens = _tokenize(soql)
        self.pos = 0
        self.resolve_sobject = resolve or (lambda name, _pos: name)
        self.resolve_field = resolve_field or (lambda _sobject, name, _pos: name)
        self.sobject = ""

    def _peek(self) -> _Tok | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _kw(self, word: str) -> bool:
        tok = self._peek()
        if tok is not None and tok.kind == "word" and tok.text.upper() == word:
            self.pos += 1
            return True
        return False

    def _punct(self, text: str) -> bool:
        tok = self._peek()
        if tok is not None and tok.kind == "punct" and tok.text == text:
            self.pos += 1
            return True
        return False

    def _expect(self, kind: str, text: str | None = None) -> _Tok:
        tok = self._peek()
        if tok is None or tok.kind != kind or (text is not None and tok.text.upper() != text):
            got = tok.text if tok else "end of query"
            raise SalesforceFault(400, "MALFORMED_QUERY", f"unexpected token: '{got}'")
        self.pos += 1
        return tok

    def _field(self) -> str:
        tok = self._expect("word")
        return self.resolve_field(self.sobject, tok.text, tok.pos)

    def parse(self) -> Soql:
        self._expect("word", "SELECT")
        selected = [self._expect("word")]
        while self._punct(","):
            selected.append(self._expect("word"))
        self._expect("word", "FROM")
        entity = self._expect("word")
        self.sobject = sobject = self.resolve_sobject(entity.text, entity.pos)
        fields = [self.resolve_field(sobject, t.text, t.pos) for t in selected]
        where, hints = self._or() if self._kw("WHERE") else (None, [])
        order = None
        if self._kw("ORDER"):
            self._expect("word", "BY")
            name = self._field()
            desc = self._kw("DESC")
            if not desc:
                self._kw("ASC")
            order = (name, desc)
        limit = int(self._expect("num").value) if self._kw("LIMIT") else None
        tok = self._peek()
        if tok is not None:
            raise SalesforceFault(400, "MALFORMED_QUERY", f"unexpected token: '{tok.text}'")
        return Soql(fields, sobject, where, order, limit, hints)

    def _or(self) -> tuple[Predicate, list[Hint]]:
        left, hints = self._and()
        while self._kw("OR"):
            right, _ = self._and()
            left = (lambda a, b: lambda r: a(r) or b(r))(left, right)
            hints = []  # a disjunction constrains no single field
        return left, hints

    def _and(self) -> tuple[Predicate, list[Hint]]:
        left, hint = self._atom()
        hints = [hint] if hint else []
        while self._kw("AND"):
            right, hint = self._atom()
            left = (lambda a, b: lambda r: a(r) and b(r))(left, right)
            hints += [hint] if hint else []
        return left, hints

    def _literal(self) -> Any:
        tok = self._peek()
        if tok is None:
            raise SalesforceFault(400, "MALFORMED_QUERY", "unexpected end of query")
        self.pos += 1
        if tok.kind in ("str", "num", "dt"):
            return tok.value
        if tok.kind == "date":
            return tok.text
        if tok.kind == "word" and tok.text.lower() in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[tok.text.lower()]
        raise SalesforceFault(400, "MALFORMED_QUERY", f"unexpected token: '{tok.text}'")

    def _atom(self) -> tuple[Predicate, Hint | None]:
        if self._kw("NOT"):
            inner, _ = self._atom()
            return (lambda r: not inner(r)), None
        if self._punct("("):
            grouped, _ = self._or()
            self._expect("punct", ")")
            return grouped, None
        name = self._field()
        negate = self._kw("NOT")
        if self._kw("IN"):
            self._expect("punct", "(")
            values = [self._literal()]
            while self._punct(","):
                values.append(self._literal())
            self._expect("punct", ")")
            return (lambda r: _cmp_eq_any(r.get(name), values) != negate), (None if negate else (name, tuple(values)))
        if negate:
            raise SalesforceFault(400, "MALFORMED_QUERY", "NOT must be followed by IN")
        if self._kw("LIKE"):
            pattern = self._literal()
            regex = _like_regex(str(pattern))
            return (lambda r: r.get(name) is not None and regex.fullmatch(str(r.get(name))) is not None), None
        op = self._expect("op").text
        value = self._literal()
        return (lambda r: _compare(r.get(name), op, value)), ((name, (value,)) if op == "=" else None)


def _norm(value: Any) -> Any:
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}T.*", value):
        try:
            return _parse_dt(value)
        except ValueError:
            return value
    return value


def _cmp_eq_any(actual: Any, values: Sequence[Any]) -> bool:
    return any(_compare(actual, "=", v) for v in values)


def _compare(actual: Any, op: str, value: Any) -> bool:
    a, b = _norm(actual), _norm(value)
    if isinstance(a, str) and isinstance(b, str) and op in ("=", "!=", "<>"):
        a, b = a.lower(), b.lower()  # SOQL string equality is case-insensitive
    if op == "=":
        return bool(a == b)
    if op in ("!=", "<>"):
        return bool(a != b)
    if a is None or b is None:
        return False
    try:
        return bool({"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op])
    except TypeError:
        return False


def _like_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return re.compile("".join(out), re.IGNORECASE | re.DOTALL)


def parse_soql(soql: str, resolve: Callable[[str, int], str] | None = None,
               resolve_field: Resolver | None = None) -> Soql:
    """Parse a SOQL query; with resolvers, the sObject and field names are checked and made canonical."""
    return _SoqlParser(soql, resolve, resolve_field).parse()


# ============================================================================================ state


@dataclass
class Limits:
    daily_max: int = 100_000
    used: int = 0


DROP = 0
"""`fail_next` status meaning "the connection is dropped": the client sees a reset, not an HTTP status."""


@dataclass
class _Fault:
    status: int
    path_contains: str | None
    method: str | None
    after_apply: bool
    retry_after: float | None


@dataclass
class Faults:
    expired: set[str] = field(default_factory=set)
    sim: SalesforceSimulator | None = None
    reject_sessions: bool = False
    """Every API call answers 401 INVALID_SESSION_ID, even with a fresh token (e.g. the run-as user was frozen)."""
    failing: list[_Fault] = field(default_factory=list)

    def fail_next(self, n: int, status: int, path_contains: str | None = None, *, method: str | None = None,
                  after_apply: bool = False, retry_after: float | None = None) -> None:
        """The next `n` API requests (optionally whose path, relative to the API root, contains a text, or of
        one method) fail with `status` (`DROP`: the connection is dropped). `after_apply`: the request is
        applied first and only its answer is lost (a gateway 504 after the write, a reset after the commit)."""
        assert self.sim is not None
        with self.sim._lock:
            self.failing.extend(_Fault(status, path_contains, method.upper() if method else None, after_apply,
                                       retry_after) for _ in range(n))

    def take(self, method: str, path: str) -> _Fault | None:
        for i, fault in enumerate(self.failing):
            if (fault.path_contains is None or fault.path_contains in path) and \
                    (fault.method is None or fault.method == method):
                return self.failing.pop(i)
        return None

    def expire_tokens(self) -> None:
        """Every token issued so far answers 401 INVALID_SESSION_ID from now on."""
        assert self.sim is not None
        with self.sim._lock:
            self.expired.update(self.sim._tokens)


def _injected(fault: _Fault) -> Response:
    if fault.status == DROP:
        return _Dropped()
    headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
    if fault.status == 401:
        return JSONResponse([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}],
                            status_code=401)
    message = {503: "Server Unavailable", 502: "Bad Gateway", 504: "Gateway Timeout"}.get(
        fault.status, f"Injected fault (HTTP {fault.status})")
    return JSONResponse([{"message": message, "errorCode": "SERVER_UNAVAILABLE"}], status_code=fault.status,
                        headers=headers)


class _Dropped(Response):
    """A response that starts and never finishes: the server closes the connection mid-answer (a reset)."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        raise ConnectionAbortedError("connection dropped by the simulator's fault knob")


@dataclass
class _Job:
    id: str
    sobject: str
    operation: str
    external_id: str | None
    state: str = "Open"
    csv: str = ""
    success: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    client: str | None = None
    origin: str = ""


class SalesforceSimulator:
    """In-memory Salesforce org. Serve `sim.app` with `sandbox.server.RunningServer(app, ca=...)`."""

    def __init__(self, *, client_id: str = DEFAULT_CLIENT_ID, client_secret: str = DEFAULT_CLIENT_SECRET,
                 webhook_verify: Any = True) -> None:
        self.client_id, self.client_secret = client_id, client_secret
        self._lock = threading.RLock()
        self.limits = Limits()
        self.faults = Faults(sim=self)
        self.webhook_verify = webhook_verify
        self.instance_url: str | None = None
        """When set, the token endpoint answers this `instance_url` instead of its own base URL."""
        self.reset()
        self.app = Starlette(routes=[
            Route("/services/oauth2/token", self._token, methods=["POST"]),
            Route("/services/data", self._versions, methods=["GET"]),
            Route("/services/data/", self._versions, methods=["GET"]),
            Route("/services/data/v{version}/{rest:path}", self._api,
                  methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
        ])

    # ------------------------------------------------------------------------------------ control

    def reset(self) -> None:
        with self._lock:
            self.records: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in SCHEMAS}
            self._tokens: set[str] = set()
            self.faults.expired = set()
            self.faults.reject_sessions = False
            self.faults.failing = []
            self.limits.used = 0
            self.request_count = 0
            self.requests: list[tuple[str, str, dict[str, str]]] = []
            self._events: list[dict[str, Any]] = []
            self._pending: list[dict[str, Any]] = []
            self._replay = itertools.count(1000)
            self._seq = itertools.count(1)
            self._jobs: dict[str, _Job] = {}
            self._cursors: dict[str, list[dict[str, Any]]] = {}
            self._webhooks: list[tuple[str, dict[str, str]]] = []
            # (sObject, External ID field) -> lower-cased value -> ids; several ids when a user copied a value
            self._ext_index: dict[tuple[str, str], dict[str, dict[str, None]]] = {
                (name, ext): {} for name in SCHEMAS for ext in EXTERNAL_IDS[name]}
            # (line sObject, header id) -> line ids, for roll-ups and master-detail cascades
            self._children: dict[tuple[str, str], dict[str, None]] = {}
            self._id_seq = {name: itertools.count(1) for name in SCHEMAS}
            self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
            self._last_tick = datetime(2000, 1, 1, tzinfo=UTC)

    def reset_allocation(self) -> None:
        with self._lock:
            self.limits.used = 0

    def _now(self) -> datetime:
        # strictly increasing millisecond timestamps, so SystemModstamp orders changes
        now = self.clock()
        now = now.replace(microsecond=(now.microsecond // 1000) * 1000)
        if now <= self._last_tick:
            now = self._last_tick + timedelta(milliseconds=1)
        self._last_tick = now
        return now

    def _new_id(self, sobject: str) -> str:
        # like the org: key prefix, pod, reserved digit, then a base-62 counter; sequential so seeds reproduce ids
        number, digits = next(self._id_seq[sobject]), ""
        for _ in range(9):
            number, rest = divmod(number, 62)
            digits = _BASE62[rest] + digits
        return to_18(KEY_PREFIX[sobject] + "5g0" + digits)

    def events(self) -> list[dict[str, Any]]:
        """Every CDC event generated so far (Pub/Sub-shaped JSON)."""
        with self._lock:
            return [json.loads(json.dumps(e)) for e in self._events]

    def register_cdc_webhook(self, url: str, headers: Mapping[str, str] | None = None) -> None:
        """POST future change events to `url` (delivered by `flush_events`)."""
        with self._lock:
            self._webhooks.append((url, dict(headers or {})))

    def flush_events(self, timeout: float = 10.0) -> int:
        """Deliver pending events to the registered webhooks (from a background thread); returns the count."""
        with self._lock:
            pending, self._pending = self._pending, []
            hooks = list(self._webhooks)
        if not hooks or not pending:
            return 0
        errors: list[BaseException] = []

        def deliver() -> None:
            try:
                with httpx.Client(verify=self.webhook_verify, timeout=timeout) as client:
                    for event in pending:
                        for url, headers in hooks:
                            client.post(url, json=event, headers=headers).raise_for_status()
            except BaseException as exc:  # reported to the caller below
                errors.append(exc)

        thread = threading.Thread(target=deliver, name="salesforce-sim-cdc", daemon=True)
        thread.start()
        thread.join(timeout)
        if errors:
            raise errors[0]
        return len(pending)

    def ui_create(self, sobject: str, values: Mapping[str, Any]) -> str:
        """A record a user creates in the Lightning UI (changeOrigin without our client id); returns its id."""
        with self._lock:
            return self._create(sobject, dict(values), origin=UI_ORIGIN, user=UI_USER_ID)

    def ui_change(self, sobject: str, record_id: str, values: Mapping[str, Any]) -> None:
        """An edit a user makes in the Lightning UI (changeOrigin without our client id)."""
        with self._lock:
            self._update(sobject, record_id, dict(values), origin=UI_ORIGIN, user=UI_USER_ID)

    def ui_delete(self, record_id: str) -> None:
        """A record a user deletes in the Lightning UI (a header's lines go with it)."""
        with self._lock:
            self._delete(record_id, origin=UI_ORIGIN, user=UI_USER_ID)

    def get(self, sobject: str, record_id: str) -> dict[str, Any] | None:
        with self._lock:
            rec = self.records[sobject].get(record_id)
            return dict(rec) if rec else None

    def find(self, sobject: str, **equals: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.records[sobject].values()
                    if all(r.get(k) == v for k, v in equals.items())]

    def count(self, sobject: str) -> int:
        with self._lock:
            return len(self.records[sobject])

    # ------------------------------------------------------------------------------------ data ops

    @staticmethod
    def _canonical(sobject: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Field names made canonical (API names are case-insensitive) and values checked against the schema."""
        obj = schema.BY_NAME[sobject]
        out: dict[str, Any] = {}
        for name, value in values.items():
            f = obj.field(name)
            if f is None:
                raise SalesforceFault(400, "INVALID_FIELD", f"No such column '{name}' on sobject of type {sobject}",
                                      [name])
            if f.name in SYSTEM_FIELDS and f.name != "Id":
                raise SalesforceFault(400, "INVALID_FIELD_FOR_INSERT_UPDATE",
                                      f"Unable to create/update fields: {f.name}. Please check the security settings "
                                      "of this field and verify that it is read/write for your profile or permission "
                                      "set.", [f.name])
            _check_value(f, value)
            out[f.name] = value
        return out

    @staticmethod
    def _check_writable(sobject: str, values: Mapping[str, Any], record: Mapping[str, Any] | None) -> None:
        bad = sorted(n for n in values if n in CALCULATED.get(sobject, ()))
        if record is not None:
            bad += sorted(n for n in values if n in CREATE_ONLY.get(sobject, ()) and values[n] != record.get(n))
        if bad:
            raise SalesforceFault(400, "INVALID_FIELD_FOR_INSERT_UPDATE",
                                  f"Unable to create/update fields: {', '.join(bad)}. Please check the security "
                                  "settings of this field and verify that it is read/write for your profile or "
                                  "permission set.", bad)

    def _resolve_references(self, sobject: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Lookup values checked against the org and stored as 18-character ids (15-character ids are accepted)."""
        out = dict(values)
        for name, value in values.items():
            target = REFERENCES.get(name) if SCHEMAS[sobject].get(name) == "reference" else None
            if target is None:
                continue
            if value in (None, ""):
                out[name] = None
                continue
            text = str(value)
            if not _SF_ID_RE.fullmatch(text) or text[:3] != KEY_PREFIX[target]:
                raise SalesforceFault(400, "MALFORMED_ID", f"{target} ID: id value of incorrect type: {text}", [name])
            rid = to_18(text[:15])
            if rid not in self.records[target]:
                raise SalesforceFault(400, "INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [name])
            out[name] = rid
        return out

    @staticmethod
    def _derive(sobject: str, record: dict[str, Any]) -> None:
        """Formula fields: a line's TotalPrice is Quantity x UnitPrice, rounded to the currency's 2 decimals."""
        if sobject not in ROLLUPS:
            return
        quantity, price = record.get("Quantity"), record.get("UnitPrice")
        record["TotalPrice"] = (None if quantity is None or price is None
                                else round(_number("Quantity", quantity) * _number("UnitPrice", price), 2))

    def _check_rules(self, sobject: str, before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> None:
        if sobject == "Order":
            status = after.get("Status")
            if status not in ORDER_STATUSES:
                raise SalesforceFault(400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                                      f"Status: bad value for restricted picklist field: {status}", ["Status"])
            activating = status == "Activated" and (before is None or before.get("Status") != "Activated")
            # orders are activated once they have products (the usual org rule), so never created activated
            if activating and (before is None or not self._children.get(("OrderItem", str(before["Id"])))):
                raise SalesforceFault(400, "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                                      "An order needs at least one order product before it can be activated.",
                                      ["Status"])
        elif sobject == "OrderItem":
            priced = ("Quantity", "UnitPrice", "Product2Id")
            if before is None or any(before.get(n) != after.get(n) for n in priced):
                self._check_order_open(after)

    def _check_order_open(self, item: Mapping[str, Any]) -> None:
        order = self.records["Order"].get(str(item.get("OrderId") or ""))
        if order is not None and order.get("Status") == "Activated":
            raise SalesforceFault(400, "FIELD_INTEGRITY_EXCEPTION",
                                  "You can't add, change or delete order products on an activated order.", ["OrderId"])

    def _index_add(self, sobject: str, rid: str, record: Mapping[str, Any]) -> None:
        for name in EXTERNAL_IDS[sobject]:
            key = _ext_key(record.get(name))
            if key is not None:
                self._ext_index[(sobject, name)].setdefault(key, {})[rid] = None
        rollup = ROLLUPS.get(sobject)
        if rollup is not None and record.get(rollup[0]):
            self._children.setdefault((sobject, str(record[rollup[0]])), {})[rid] = None

    def _index_remove(self, sobject: str, rid: str, record: Mapping[str, Any]) -> None:
        for name in EXTERNAL_IDS[sobject]:
            key = _ext_key(record.get(name))
            holders = self._ext_index[(sobject, name)].get(key or "")
            if key is not None and holders is not None:
                holders.pop(rid, None)
                if not holders:
                    del self._ext_index[(sobject, name)][key]
        rollup = ROLLUPS.get(sobject)
        if rollup is not None and record.get(rollup[0]):
            lines = self._children.get((sobject, str(record[rollup[0]])))
            if lines is not None:
                lines.pop(rid, None)

    def _record_event(self, sobject: str, ids: list[str], change_type: str, changed: list[str],
                      values: Mapping[str, Any], origin: str, user: str, when: datetime,
                      transaction: str | None = None) -> str:
        """Append one CDC event; returns its transactionKey (pass it on for changes of the same transaction)."""
        header = {
            "entityName": sobject, "recordIds": ids, "changeType": change_type, "changeOrigin": origin,
            "transactionKey": transaction or str(uuid.uuid4()), "sequenceNumber": next(self._seq),
            "commitTimestamp": int(when.timestamp() * 1000), "commitNumber": next(self._seq) * 1000,
            "commitUser": user, "nulledFields": [k for k in changed if values.get(k) is None],
            "diffFields": [], "changedFields": changed,
        }
        payload: dict[str, Any] = {"ChangeEventHeader": header}
        for name in SCHEMAS[sobject]:
            payload[name] = values.get(name) if name in changed or change_type == "CREATE" else None
        payload["LastModifiedDate"] = header["commitTimestamp"]
        event = {"schema": f"{sobject}ChangeEvent", "replayId": next(self._replay), "payload": payload}
        self._events.append(event)
        if self._webhooks:
            self._pending.append(event)
        return str(header["transactionKey"])

    def _roll_up(self, sobject: str, line: Mapping[str, Any], *, origin: str, user: str, when: datetime,
                 transaction: str) -> None:
        """Recompute the header's total after a line change, in the line's transaction (like the platform).

        The header is touched (LastModifiedDate, SystemModstamp, an UPDATE change event attributed to the line's
        user and client) only when its total changes.
        """
        rollup = ROLLUPS.get(sobject)
        if rollup is None:
            return
        parent_field, parent_sobject, total_field = rollup
        parent = self.records[parent_sobject].get(str(line.get(parent_field) or ""))
        if parent is None:
            return
        lines = self.records[sobject]
        total = round(sum(float(lines[i]["TotalPrice"] or 0) for i in self._children.get((sobject, parent["Id"]), {})
                          if i in lines), 2)
        if parent.get(total_field) == total:
            return
        parent[total_field] = total
        parent["LastModifiedDate"] = parent["SystemModstamp"] = sf_datetime(when)
        self._record_event(parent_sobject, [parent["Id"]], "UPDATE", [total_field, "LastModifiedDate"], parent,
                           origin, user, when, transaction)

    def _create(self, sobject: str, values: dict[str, Any], *, origin: str, user: str) -> str:
        values = self._canonical(sobject, values)
        values.pop("Id", None)
        values = self._resolve_references(sobject, values)
        self._check_writable(sobject, values, None)
        record: dict[str, Any] = dict.fromkeys(SCHEMAS[sobject])
        record.update(values)
        self._derive(sobject, record)
        missing = [f for f in REQUIRED[sobject] if record.get(f) in (None, "")]
        if missing:
            raise SalesforceFault(400, "REQUIRED_FIELD_MISSING",
                                  f"Required fields are missing: [{', '.join(missing)}]", missing)
        self._check_rules(sobject, None, record)
        now = self._now()
        rid = self._new_id(sobject)
        stamp = sf_datetime(now)
        record.update(Id=rid, CreatedDate=stamp, LastModifiedDate=stamp, SystemModstamp=stamp, IsDeleted=False)
        self.records[sobject][rid] = record
        self._index_add(sobject, rid, record)
        transaction = self._record_event(sobject, [rid], "CREATE", sorted(values), record, origin, user, now)
        self._roll_up(sobject, record, origin=origin, user=user, when=now, transaction=transaction)
        return rid

    def _update(self, sobject: str, rid: str, values: dict[str, Any], *, origin: str, user: str) -> None:
        values = self._canonical(sobject, values)
        record = self.records[sobject].get(rid)
        if record is None:
            raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
        values = self._resolve_references(sobject, {k: v for k, v in values.items() if k != "Id"})
        self._check_writable(sobject, values, record)
        merged = {**record, **values}
        self._derive(sobject, merged)
        missing = [f for f in REQUIRED[sobject] if merged.get(f) in (None, "")]
        if missing:
            raise SalesforceFault(400, "REQUIRED_FIELD_MISSING",
                                  f"Required fields are missing: [{', '.join(missing)}]", missing)
        self._check_rules(sobject, record, merged)
        changed = sorted(k for k in SCHEMAS[sobject] if record.get(k) != merged.get(k))
        now = self._now()
        self._index_remove(sobject, rid, record)
        record.update(merged)
        record["LastModifiedDate"] = record["SystemModstamp"] = sf_datetime(now)
        self._index_add(sobject, rid, record)
        transaction = self._record_event(sobject, [rid], "UPDATE", [*changed, "LastModifiedDate"], record, origin,
                                         user, now)
        self._roll_up(sobject, record, origin=origin, user=user, when=now, transaction=transaction)

    def _delete(self, rid: str, *, origin: str, user: str) -> None:
        for sobject, table in self.records.items():
            if rid not in table:
                continue
            record = table[rid]
            if sobject == "OrderItem":
                self._check_order_open(record)
            now = self._now()
            transaction = str(uuid.uuid4())
            # master-detail: the header's lines are deleted with it, in the same transaction
            for line_sobject, (_, header_sobject, _) in ROLLUPS.items():
                if header_sobject != sobject:
                    continue
                for line_id in list(self._children.pop((line_sobject, rid), {})):
                    line = self.records[line_sobject].pop(line_id)
                    self._index_remove(line_sobject, line_id, line)
                    self._record_event(line_sobject, [line_id], "DELETE", [], line, origin, user, now, transaction)
            del table[rid]
            self._index_remove(sobject, rid, record)
            self._record_event(sobject, [rid], "DELETE", [], record, origin, user, now, transaction)
            self._roll_up(sobject, record, origin=origin, user=user, when=now, transaction=transaction)
            return
        raise SalesforceFault(404, "ENTITY_IS_DELETED", "entity is deleted")

    def _upsert(self, sobject: str, ext_field: str, ext_value: str, values: dict[str, Any], *, origin: str,
                user: str) -> tuple[str, bool]:
        known = schema.BY_NAME[sobject].field(ext_field)
        if known is None or not (known.external_id or known.name == "Id"):
            raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
        ext_field = known.name
        values = {k: v for k, v in values.items() if k.lower() != ext_field.lower()}
        key = _ext_key(ext_value)
        if ext_field == "Id":
            matches = self._ids_for(sobject, [ext_value])
        else:
            matches = list(self._ext_index[(sobject, ext_field)].get(key or "", {})) if key is not None else []
        if len(matches) > 1:
            raise SalesforceFault(300, "MULTIPLE_CHOICES", f"Multiple records with {ext_field} = {ext_value}",
                                  [f"{API_PREFIX}sobjects/{sobject}/{rid}" for rid in matches])
        if matches:
            self._update(sobject, matches[0], values, origin=origin, user=user)
            return matches[0], False
        return self._create(sobject, {**values, ext_field: ext_value}, origin=origin, user=user), True

    def _ids_for(self, sobject: str, values: Iterable[Any]) -> list[str]:
        """Existing record ids among `values` (15- or 18-character)."""
        table = self.records[sobject]
        found = []
        for value in values:
            text = str(value)
            if _SF_ID_RE.fullmatch(text):
                rid = text if text in table else to_18(text[:15])
                if rid in table and rid not in found:
                    found.append(rid)
        return found

    def _candidates(self, parsed: Soql) -> list[dict[str, Any]]:
        """The rows a query must look at: an index lookup when the WHERE clause pins Id or an External ID."""
        table = self.records[parsed.sobject]
        for name, values in parsed.hints:
            if any(v is None for v in values):
                continue
            if name == "Id":
                ids = self._ids_for(parsed.sobject, values)
            elif name in EXTERNAL_IDS[parsed.sobject]:
                index = self._ext_index[(parsed.sobject, name)]
                ids = list(dict.fromkeys(rid for v in values for rid in index.get(str(v).lower(), {})))
            else:
                continue
            # creation order, the order a full scan would give
            return sorted((table[i] for i in ids), key=lambda r: str(r["CreatedDate"]))
        return list(table.values())

    # ------------------------------------------------------------------------------------ HTTP

    def _limit_header(self) -> dict[str, str]:
        return {"Sforce-Limit-Info": f"api-usage={self.limits.used}/{self.limits.daily_max}"}

    def _json(self, body: Any, status: int = 200) -> Response:
        return JSONResponse(body, status_code=status, headers=self._limit_header())

    async def _token(self, request: Request) -> Response:
        form = dict(await request.form())
        client_id, secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            import base64

            client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type", "error_description": "grant type not supported"},
                                status_code=400)
        if client_id != self.client_id or secret != self.client_secret:
            return JSONResponse({"error": "invalid_client", "error_description": "invalid client credentials"},
                                status_code=400)
        token = f"{ORG_ID}!{secrets.token_urlsafe(24)}"
        with self._lock:
            self._tokens.add(token)
            self.request_count += 1
        base = self.instance_url or f"{request.url.scheme}://{request.url.netloc}"
        return JSONResponse({
            "access_token": token, "signature": secrets.token_urlsafe(16), "token_format": "opaque",
            "instance_url": base, "id": f"{base}/id/{ORG_ID}/{RUN_AS_USER_ID}", "token_type": "Bearer",
            "issued_at": str(int(datetime.now(UTC).timestamp() * 1000)), "scope": "api",
        })

    async def _versions(self, request: Request) -> Response:
        # the Versions resource needs no session (REST API Developer Guide, "Versions")
        return JSONResponse([{"label": label, "url": f"/services/data/v{version}", "version": version}
                             for version, label in API_VERSIONS])

    async def _api(self, request: Request) -> Response:
        version = request.path_params["version"]
        rest = request.path_params["rest"].strip("/")
        body = await request.body()
        with self._lock:
            self.request_count += 1
            self.requests.append((request.method, rest, dict(request.headers)))
            if version not in _VERSION_NUMBERS:
                return JSONResponse([{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}],
                                    status_code=404)
            token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if token not in self._tokens or token in self.faults.expired or self.faults.reject_sessions:
                return JSONResponse([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}],
                                    status_code=401)
            if self.limits.used >= self.limits.daily_max:
                return JSONResponse([{"message": "TotalRequests Limit exceeded.",
                                      "errorCode": "REQUEST_LIMIT_EXCEEDED"}], status_code=403,
                                    headers=self._limit_header())
            self.limits.used += 1
            options = request.headers.get("sforce-call-options", "")
            client = next((p.split("=", 1)[1].strip() for p in options.split(",") if p.strip().startswith("client=")),
                          None)
            origin = f"com/salesforce/api/rest/{API_VERSION}" + (f";client={client}" if client else "")
            injected = self.faults.take(request.method, rest)
            if injected is not None and not injected.after_apply:
                return _injected(injected)
            try:
                data = _json_body(body, request.headers.get("content-type", ""))
                answer = self._dispatch(request.method, rest, dict(request.query_params), data, body, origin, client)
            except SalesforceFault as fault:
                status, content = fault.answer()
                answer = self._json(content, status)
            return answer if injected is None else _injected(injected)

    def _dispatch(self, method: str, rest: str, params: Mapping[str, str], data: Any, body: bytes, origin: str,
                  client: str | None) -> Response:
        status, content = self._route(method, rest, params, data, body, origin, client)
        if isinstance(content, Response):
            return content
        if status == 204:
            return Response(status_code=204, headers=self._limit_header())
        return self._json(content, status)

    def _route(self, method: str, rest: str, params: Mapping[str, str], data: Any, body: bytes, origin: str,
               client: str | None) -> tuple[int, Any]:
        """One REST call: (status, JSON content), or a SalesforceFault. Composite subrequests come through here too."""
        parts = rest.split("/") if rest else []
        user = RUN_AS_USER_ID
        if not parts:
            if method == "GET":
                return 200, {name: f"{API_PREFIX}{name}" for name in ("sobjects", "query", "queryAll", "composite",
                                                                       "limits", "jobs")}
            raise SalesforceFault(405, "METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed. Allowed are GET")
        if parts[0] in ("query", "queryAll"):
            if len(parts) == 2:
                return 200, self._query_more(parts[1])
            return 200, self._query(params.get("q", ""))
        if parts[0] == "limits":
            return 200, {"DailyApiRequests": {"Max": self.limits.daily_max,
                                              "Remaining": self.limits.daily_max - self.limits.used}}
        if parts[0] == "composite" and len(parts) >= 2 and parts[1] == "sobjects":
            return 200, self._collections(method, parts[2:], data, params, origin, user)
        if parts[0] == "composite" and len(parts) == 1 and method == "POST":
            return 200, self._composite(data, origin, client)
        if parts[0] == "jobs" and len(parts) >= 2 and parts[1] == "ingest":
            return 200, self._bulk(method, parts[2:], data, body, origin, client)
        if parts[0] == "sobjects":
            if len(parts) == 1 and method == "GET":
                return 200, {"encoding": "UTF-8", "maxBatchSize": COLLECTION_LIMIT,
                             "sobjects": [schema.global_entry(o, API_VERSION) for o in schema.SOBJECTS]}
            obj = schema.sobject(parts[1]) if len(parts) >= 2 else None
            if obj is None:
                raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
            sobject = obj.name
            if len(parts) == 2 and method == "GET":
                recent = [self._present(sobject, r, ("Id", *(["Name"] if "Name" in SCHEMAS[sobject] else [])))
                          for r in list(self.records[sobject].values())[-5:]]
                return 200, {"objectDescribe": schema.global_entry(obj, API_VERSION), "recentItems": recent}
            if len(parts) == 3 and parts[2] == "describe" and method == "GET":
                return 200, schema.describe(obj, API_VERSION)
            if len(parts) == 2 and method == "POST":
                rid = self._create(sobject, _object(data), origin=origin, user=user)
                return 201, {"id": rid, "success": True, "errors": []}
            if len(parts) == 3:
                rid = parts[2]
                if method == "GET":
                    rec = self.records[sobject].get(rid) or self.records[sobject].get(to_18(rid[:15]))
                    if rec is None:
                        raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
                    names = []
                    for name in (n.strip() for n in params.get("fields", "").split(",") if n.strip()):
                        known = obj.field(name)
                        if known is None:
                            raise SalesforceFault(400, "INVALID_FIELD", f"No such column '{name}' on entity "
                                                  f"'{sobject}'.", [name])
                        names.append(known.name)
                    names = names or list(rec)
                    return 200, self._present(sobject, rec, names)
                if method == "PATCH":
                    self._update(sobject, rid, _object(data), origin=origin, user=user)
                    return 204, None
                if method == "DELETE":
                    self._delete(rid, origin=origin, user=user)
                    return 204, None
            if len(parts) == 4 and method == "PATCH":
                rid, created = self._upsert(sobject, parts[2], parts[3], _object(data), origin=origin, user=user)
                return (201 if created else 200), {"id": rid, "errors": [], "success": True, "created": created}
        raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")

    @staticmethod
    def _present(sobject: str, rec: Mapping[str, Any], fields: Iterable[str],
                 paths: Mapping[str, tuple[str, str, str]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"attributes": {"type": sobject, "url": f"{API_PREFIX}sobjects/{sobject}/{rec['Id']}"}}
        for name in fields:
            if paths and name in paths:  # a parent field nests under the relationship, null when there is no parent
                lookup, parent, leaf = paths[name]
                relation, parent_id = name.partition(".")[0], rec.get(lookup)
                if not parent_id:
                    out[relation] = None
                    continue
                nested = out.get(relation) or {
                    "attributes": {"type": parent, "url": f"{API_PREFIX}sobjects/{parent}/{parent_id}"}}
                nested[leaf] = rec.get(name)
                out[relation] = nested
            else:
                out[name] = rec.get(name)
        return out

    # ---------------------------------------------------------------------------------- transactions

    def _snapshot(self) -> tuple[Any, ...]:
        """What a rolled-back transaction must restore: records, indexes, and the change events not yet kept."""
        return ({s: {rid: dict(r) for rid, r in table.items()} for s, table in self.records.items()},
                {k: {v: dict(ids) for v, ids in index.items()} for k, index in self._ext_index.items()},
                {k: dict(v) for k, v in self._children.items()}, len(self._events), len(self._pending))

    def _restore(self, snap: tuple[Any, ...]) -> None:
        self.records, self._ext_index, self._children = snap[0], snap[1], snap[2]
        del self._events[snap[3]:]
        del self._pending[snap[4]:]

    # ---------------------------------------------------------------------------------- collections

    def _collections(self, method: str, rest: list[str], data: Any, params: Mapping[str, str], origin: str,
                     user: str) -> list[dict[str, Any]]:
        """sObject Collections; with allOrNone=true every record is rolled back when one fails (still HTTP 200)."""
        if method == "DELETE":
            ids = [i for i in params.get("ids", "").split(",") if i]
            if not ids or len(ids) > COLLECTION_LIMIT:
                raise SalesforceFault(400, "EXCEEDED_ID_LIMIT", "record limit reached. cannot submit more than 200 "
                                      "records into this call")
            all_or_none = params.get("allOrNone", "false").lower() == "true"
            records: list[Any] = [{"Id": rid} for rid in ids]
        else:
            if not isinstance(data, dict) or not isinstance(data.get("records"), list):
                raise SalesforceFault(400, "JSON_PARSER_ERROR", "Expected a request body with records")
            records = data["records"]
            if len(records) > COLLECTION_LIMIT:
                raise SalesforceFault(400, "EXCEEDED_ID_LIMIT",
                                      "record limit reached. cannot submit more than 200 records into this call")
            if not isinstance(data.get("allOrNone", False), bool):
                raise SalesforceFault(400, "JSON_PARSER_ERROR", "allOrNone must be a boolean")
            all_or_none = bool(data.get("allOrNone"))
        snap = self._snapshot() if all_or_none else None
        results = [self._collection_record(method, rest, raw, origin, user) for raw in records]
        if snap is not None and not all(r["success"] for r in results):
            self._restore(snap)
            rolled = {"statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                      "message": "Record rolled back because not all records were valid and the request was using "
                                 "AllOrNone header", "fields": []}
            for i, result in enumerate(results):
                if result["success"]:
                    given = records[i].get("Id") if isinstance(records[i], dict) else None
                    results[i] = {**({"id": given} if given else {}), "success": False, "errors": [rolled]}
        return results

    def _collection_record(self, method: str, rest: list[str], raw: Any, origin: str, user: str) -> dict[str, Any]:
        if method == "DELETE":
            rid = str(raw["Id"])
            try:
                self._delete(rid, origin=origin, user=user)
                return {"id": rid, "success": True, "errors": []}
            except SalesforceFault as fault:
                return {"id": rid, "success": False, "errors": [fault.record_error()]}
        rec = dict(raw) if isinstance(raw, dict) else {}
        attributes = rec.pop("attributes", None)
        kind = attributes.get("type") if isinstance(attributes, dict) else None
        found = schema.sobject(kind) if isinstance(kind, str) else None
        try:
            if found is None:
                raise SalesforceFault(400, "INVALID_TYPE", f"sObject type '{kind}' is not supported.")
            sobject = found.name
            if method == "POST" and not rest:
                rid = self._create(sobject, rec, origin=origin, user=user)
                return {"id": rid, "success": True, "errors": []}
            if method == "PATCH" and not rest:
                rid = str(next((v for k, v in rec.items() if k.lower() == "id"), "") or "")
                if not rid:
                    raise SalesforceFault(400, "MISSING_ARGUMENT", "Id not specified in an update call", ["Id"])
                self._update(sobject, rid, {k: v for k, v in rec.items() if k.lower() != "id"}, origin=origin,
                             user=user)
                return {"id": rid, "success": True, "errors": []}
            if method == "PATCH" and len(rest) == 2:
                target = schema.sobject(rest[0])
                if target is None or sobject != target.name:
                    raise SalesforceFault(400, "INVALID_TYPE", f"record type {sobject} does not match {rest[0]}")
                ext = next((v for k, v in rec.items() if k.lower() == rest[1].lower()), None)
                if ext in (None, ""):
                    raise SalesforceFault(400, "MISSING_ARGUMENT", f"{rest[1]} not specified in an upsert call",
                                          [rest[1]])
                rid, created = self._upsert(sobject, rest[1], str(ext), rec, origin=origin, user=user)
                return {"id": rid, "success": True, "errors": [], "created": created}
            raise SalesforceFault(405, "METHOD_NOT_ALLOWED", "HTTP Method not allowed")
        except SalesforceFault as fault:
            if fault.status == 405:
                raise
            if fault.status == 300:
                matches = ", ".join(url.rsplit("/", 1)[-1] for url in fault.fields)
                fault = SalesforceFault(400, "DUPLICATE_EXTERNAL_ID",
                                        f"{rest[-1]}: more than one record found for external id field: [{matches}]",
                                        [rest[-1]])
            if fault.status == 404 and fault.code == "NOT_FOUND" and len(rest) == 2:
                raise  # unknown external id field: the whole call fails
            return {"success": False, "errors": [fault.record_error()]}

    # ---------------------------------------------------------------------------------- composite

    def _composite(self, data: Any, origin: str, client: str | None) -> dict[str, Any]:
        """`POST /composite`: up to 25 subrequests run in order, `@{ref.path}` references resolved from earlier
        answers; allOrNone=true rolls every subrequest back when one fails (REST API Developer Guide, "Composite")."""
        if not isinstance(data, dict) or not isinstance(data.get("compositeRequest"), list):
            raise SalesforceFault(400, "JSON_PARSER_ERROR", "The request body needs a compositeRequest array")
        subrequests = data["compositeRequest"]
        if not subrequests or len(subrequests) > COMPOSITE_LIMIT:
            raise SalesforceFault(400, "INVALID_API_INPUT",
                                  f"The composite request can have from 1 to {COMPOSITE_LIMIT} subrequests")
        if not isinstance(data.get("allOrNone", False), bool):
            raise SalesforceFault(400, "JSON_PARSER_ERROR", "allOrNone must be a boolean")
        # the whole body is checked before any subrequest runs: a bad one fails the call with 400
        seen: set[str] = set()
        queries = 0
        for sub in subrequests:
            if not isinstance(sub, dict) or not all(isinstance(sub.get(k), str) and sub.get(k)
                                                    for k in ("method", "url", "referenceId")):
                raise SalesforceFault(400, "INVALID_API_INPUT",
                                      "Each subrequest needs a method, a url and a referenceId")
            ref = sub["referenceId"]
            if not _REF_ID_RE.fullmatch(ref) or ref in seen:
                raise SalesforceFault(400, "INVALID_API_INPUT", f"Invalid or duplicate referenceId: {ref}")
            seen.add(ref)
            if sub["method"].upper() not in ("GET", "POST", "PATCH", "PUT", "DELETE"):
                raise SalesforceFault(400, "INVALID_API_INPUT", f"Unsupported method {sub['method']}")
            queries += "/query" in sub["url"]
        if queries > COMPOSITE_QUERY_LIMIT:
            raise SalesforceFault(400, "INVALID_API_INPUT",
                                  f"A composite request can have at most {COMPOSITE_QUERY_LIMIT} query subrequests")
        all_or_none = bool(data.get("allOrNone"))
        snap = self._snapshot() if all_or_none else None
        answers: dict[str, Any] = {}
        failed: set[str] = set()
        out: list[dict[str, Any]] = []
        for sub in subrequests:
            ref = sub["referenceId"]
            try:
                url = str(_substitute(sub["url"], answers, failed))
                body = _substitute(sub.get("body"), answers, failed)
                method = sub["method"].upper()
                path, _, query = url.partition("?")
                match = _SUB_URL_RE.fullmatch(path)
                if match is None or match.group(1) not in _VERSION_NUMBERS:
                    raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
                if match.group(2).split("/")[0] in ("composite", "jobs"):
                    raise SalesforceFault(400, "INVALID_API_INPUT", f"{path} is not supported in a composite request")
                params = dict(urllib.parse.parse_qsl(query))
                status, content = self._route(method, match.group(2).strip("/"), params, body, b"", origin, client)
            except SalesforceFault as fault:
                status, content = fault.answer()
                failed.add(ref)
            headers: dict[str, str] = {}
            if status == 201 and isinstance(content, dict) and content.get("id"):
                headers["Location"] = f"{API_PREFIX}sobjects/{_sobject_of(str(content['id']))}/{content['id']}"
            answers[ref] = content
            out.append({"body": content, "httpHeaders": headers, "httpStatusCode": status, "referenceId": ref})
        if snap is not None and failed:
            self._restore(snap)
            halted = [{"errorCode": "PROCESSING_HALTED", "message": "The transaction was rolled back since another "
                       "operation in the same transaction failed."}]
            for item in out:
                if item["referenceId"] not in failed:
                    item.update(body=halted, httpHeaders={}, httpStatusCode=400)
        return {"compositeResponse": out}

    # ---------------------------------------------------------------------------------- query

    def _query(self, soql: str) -> dict[str, Any]:
        def resolve(name: str, pos: int) -> str:
            found = schema.sobject(name)
            if found is None:
                raise soql_error(soql, pos, "INVALID_TYPE",
                                 f"sObject type '{name}' is not supported. If you are attempting to use a custom "
                                 "object, be sure to append the '__c' after the entity name. Please reference your "
                                 "WSDL or the describe call for the appropriate names.")
            return found.name

        # parent field path the query uses ("Account.Name") -> (lookup field, parent sObject, parent field)
        paths: dict[str, tuple[str, str, str]] = {}

        def column(sobject: str, name: str, pos: int) -> str:
            found = schema.BY_NAME[sobject].field(name)
            if found is None:
                raise soql_error(soql, pos, "INVALID_FIELD",
                                 f"No such column '{name}' on entity '{sobject}'. If you are attempting to use a "
                                 "custom field, be sure to append the '__c' after the custom field name. Please "
                                 "reference your WSDL or the describe call for the appropriate names.")
            return found.name

        def resolve_field(sobject: str, name: str, pos: int) -> str:
            if "." not in name:
                return column(sobject, name, pos)
            relation, _, leaf = name.partition(".")
            lookup = next((f for f in schema.BY_NAME[sobject].fields if f.reference_to and f.name.endswith("Id")
                           and f.name[:-2].lower() == relation.lower()), None)
            if lookup is None or lookup.reference_to is None or "." in leaf:
                raise soql_error(soql, pos, "INVALID_FIELD",
                                 f"Didn't understand relationship '{relation}' in field path. If you are attempting "
                                 "to use a custom relationship, be sure to append the '__r' after the custom "
                                 "relationship name. Please reference your WSDL or the describe call for the "
                                 "appropriate names.")
            target = column(lookup.reference_to, leaf, pos + len(relation) + 1)
            path = f"{lookup.name[:-2]}.{target}"
            paths[path] = (lookup.name, lookup.reference_to, target)
            return path

        parsed = parse_soql(soql, resolve, resolve_field)
        rows = self._candidates(parsed)
        if paths:  # parent fields (one level up), read from the parent record at query time
            rows = [{**r, **{path: (self.records[parent].get(str(r.get(lookup) or "")) or {}).get(leaf)
                             for path, (lookup, parent, leaf) in paths.items()}} for r in rows]
        if parsed.where is not None:
            rows = [r for r in rows if parsed.where(r)]
        if parsed.order is not None:
            name, desc = parsed.order
            rows.sort(key=lambda r: (r.get(name) is None, _norm(r.get(name)) if r.get(name) is not None else 0),
                      reverse=desc)
        if parsed.limit is not None:
            rows = rows[: parsed.limit]
        presented = [self._present(parsed.sobject, r, parsed.fields, paths) for r in rows]
        cursor = "01g" + secrets.token_hex(8).upper()[:15]
        self._cursors[cursor] = presented
        return self._page(cursor, 0)

    def _query_more(self, token: str) -> dict[str, Any]:
        cursor, _, offset = token.rpartition("-")
        if cursor not in self._cursors or not offset.isdigit():
            raise SalesforceFault(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        return self._page(cursor, int(offset))

    def _page(self, cursor: str, offset: int) -> dict[str, Any]:
        rows = self._cursors[cursor]
        page = rows[offset: offset + QUERY_BATCH]
        done = offset + QUERY_BATCH >= len(rows)
        body: dict[str, Any] = {"totalSize": len(rows), "done": done, "records": page}
        if not done:
            body["nextRecordsUrl"] = f"{API_PREFIX}query/{cursor}-{offset + QUERY_BATCH}"
        else:
            self._cursors.pop(cursor, None)
        return body

    # ---------------------------------------------------------------------------------- Bulk API 2.0

    def _job_info(self, job: _Job) -> dict[str, Any]:
        return {"id": job.id, "operation": job.operation, "object": job.sobject, "state": job.state,
                "externalIdFieldName": job.external_id, "contentType": "CSV", "apiVersion": float(API_VERSION),
                "lineEnding": "LF", "columnDelimiter": "COMMA",
                "numberRecordsProcessed": len(job.success) + len(job.failed),
                "numberRecordsFailed": len(job.failed)}

    def _bulk(self, method: str, rest: list[str], data: Any, body: bytes, origin: str, client: str | None) -> Response:
        if not rest and method == "POST":
            if not isinstance(data, dict) or data.get("object") not in SCHEMAS:
                raise SalesforceFault(400, "INVALIDJOB", "InvalidJob : Invalid object")
            op = data.get("operation")
            if op not in ("insert", "update", "upsert", "delete"):
                raise SalesforceFault(400, "INVALIDJOB", f"InvalidJob : Invalid operation {op}")
            if op == "upsert" and data.get("externalIdFieldName") not in EXTERNAL_IDS[data["object"]]:
                raise SalesforceFault(400, "INVALIDJOB", "InvalidJob : External ID was blank or not an External ID")
            created = _Job("750" + secrets.token_hex(8).upper()[:15], data["object"], op,
                           data.get("externalIdFieldName"), client=client)
            self._jobs[created.id] = created
            return self._json(self._job_info(created))
        job = self._jobs.get(rest[0]) if rest else None
        if job is None:
            raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
        if len(rest) == 1 and method == "GET":
            # like the real service, a closed job is processed asynchronously: UploadComplete -> InProgress
            # on the first poll, JobComplete (results available) on the next one
            if job.state == "UploadComplete":
                job.state = "InProgress"
            elif job.state == "InProgress":
                self._run_job(job, job.origin)
                job.state = "JobComplete"
            return self._json(self._job_info(job))
        if len(rest) == 2 and rest[1] == "batches" and method == "PUT":
            if job.state != "Open":
                raise SalesforceFault(400, "INVALIDJOBSTATE", "Job is not open for upload")
            job.csv += body.decode("utf-8")
            return Response(status_code=201, headers=self._limit_header())
        if len(rest) == 1 and method == "PATCH":
            state = (data or {}).get("state")
            if state == "Aborted":
                job.state = "Aborted"
            elif state == "UploadComplete" and job.state == "Open":
                job.state, job.origin = "UploadComplete", origin
            else:
                raise SalesforceFault(400, "INVALIDJOBSTATE", f"Invalid state {state}")
            return self._json(self._job_info(job))
        if len(rest) == 2 and rest[1] in ("successfulResults", "failedResults") and method == "GET":
            rows = job.success if rest[1] == "successfulResults" else job.failed
            extra = ["sf__Id", "sf__Created"] if rest[1] == "successfulResults" else ["sf__Id", "sf__Error"]
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=[*extra, *job.columns], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            return Response(out.getvalue(), media_type="text/csv", headers=self._limit_header())
        raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")

    def _run_job(self, job: _Job, origin: str) -> None:
        reader = csv.DictReader(io.StringIO(job.csv))
        job.columns = list(reader.fieldnames or [])
        for row in reader:
            values: dict[str, Any] = {k: (None if v == "#N/A" else _csv_value(job.sobject, k, v))
                                      for k, v in row.items() if v != ""}
            try:
                if job.operation == "upsert":
                    assert job.external_id is not None
                    rid, created = self._upsert(job.sobject, job.external_id, str(values.get(job.external_id, "")),
                                                values, origin=origin, user=RUN_AS_USER_ID)
                elif job.operation == "insert":
                    rid, created = self._create(job.sobject, values, origin=origin, user=RUN_AS_USER_ID), True
                elif job.operation == "update":
                    rid, created = str(values.pop("Id", "")), False
                    self._update(job.sobject, rid, values, origin=origin, user=RUN_AS_USER_ID)
                else:
                    rid, created = str(values.get("Id", "")), False
                    self._delete(rid, origin=origin, user=RUN_AS_USER_ID)
                job.success.append({"sf__Id": rid, "sf__Created": str(created).lower(), **row})
            except SalesforceFault as fault:
                job.failed.append({"sf__Id": "", "sf__Error": f"{fault.code}:{fault.message}:"
                                   f"{','.join(fault.fields)} --", **row})


def _json_type_error(f: schema.SfField, value: Any) -> SalesforceFault:
    kind = {"currency": "double", "int": "int", "double": "double", "boolean": "boolean", "date": "date",
            "datetime": "datetime"}.get(f.type, "String")
    token = "VALUE_STRING" if isinstance(value, str) else "START_OBJECT" if isinstance(value, dict) else \
        "START_ARRAY" if isinstance(value, list) else "VALUE_TRUE" if value is True else \
        "VALUE_FALSE" if value is False else "VALUE_NUMBER"
    return SalesforceFault(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of {kind} from {token} value "
                           f"{value} or request may be missing a required field", [f.name])


def _check_value(f: schema.SfField, value: Any) -> None:
    """A value as the org checks it on a write: JSON type, text length, restricted picklist."""
    if value is None:
        return
    if isinstance(value, dict | list):
        raise _json_type_error(f, value)
    if f.type in schema.TEXT_TYPES or f.type in ("id", "reference"):
        text = value if isinstance(value, str) else json.dumps(value)
        if f.length and len(text) > f.length:
            raise SalesforceFault(400, "STRING_TOO_LONG", f"{f.label}: data value too large: {text[:80]} "
                                  f"(max length={f.length})", [f.name])
        if f.restricted and text not in f.picklist:
            raise SalesforceFault(400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                                  f"{f.label}: bad value for restricted picklist field: {text}", [f.name])
    elif f.type in schema.NUMBER_TYPES:
        if isinstance(value, bool):
            raise _json_type_error(f, value)
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                raise _json_type_error(f, value) from None
    else:
        bad_bool = f.type == "boolean" and not isinstance(value, bool)
        bad_date = f.type == "date" and not (isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value))
        if bad_bool or bad_date:
            raise _json_type_error(f, value)


def _json_body(body: bytes, content_type: str) -> Any:
    if not body or not content_type.startswith("application/json"):
        return None
    try:
        return strict_loads(body)
    except ValueError as exc:
        raise SalesforceFault(400, "JSON_PARSER_ERROR", f"Unexpected character: {exc}") from exc


def _object(data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SalesforceFault(400, "JSON_PARSER_ERROR", "Cannot deserialize instance of an sObject from START_ARRAY")
    return dict(data)


def _sobject_of(record_id: str) -> str:
    return next((name for name, prefix in KEY_PREFIX.items() if record_id.startswith(prefix)), "sObject")


def _substitute(value: Any, answers: Mapping[str, Any], failed: set[str]) -> Any:
    """Composite references `@{refId.path}` (dots and `[n]`) replaced by values of earlier answers."""
    def lookup(match: re.Match[str]) -> Any:
        ref, path = match.group(1), match.group(2)
        current = answers.get(ref)
        if ref in failed or ref not in answers:
            current = None
        for name, index in re.findall(r"\.([A-Za-z0-9_]+)|\[(\d+)\]", path):
            if index and isinstance(current, list) and int(index) < len(current):
                current = current[int(index)]
            elif name and isinstance(current, dict):
                current = current.get(name)
            else:
                current = None
        if current is None:
            raise SalesforceFault(400, "PROCESSING_HALTED", f"Invalid reference specified. No value for "
                                  f"{ref}{path} found in {ref}. Provided referenceId ('{ref}') must be an earlier "
                                  "subrequest that succeeded.")
        return current

    if isinstance(value, str):
        whole = _REF_RE.fullmatch(value)
        if whole is not None:
            return lookup(whole)
        return _REF_RE.sub(lambda m: str(lookup(m)), value)
    if isinstance(value, dict):
        return {k: _substitute(v, answers, failed) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, answers, failed) for v in value]
    return value


def _csv_value(sobject: str, name: str, value: str) -> Any:
    kind = SCHEMAS.get(sobject, {}).get(name)
    if kind == "boolean":
        return value.lower() == "true"
    if kind in ("currency", "double", "int"):
        try:
            return int(value) if kind == "int" else float(value)
        except ValueError:
            return value
    return value


# ================================================================================================ seed


def seed_salesforce(sim: SalesforceSimulator, *, accounts: int = 12, opportunities: int = 8) -> dict[str, list[str]]:
    """A small, deterministic org of an equipment maker, with a few bad records.

    Bad records: the last account has a blank BillingCountry, the second account's name carries a quote
    (`O'Brien Machining`, exercises SOQL escaping), and the last opportunity has no Amount.
    """
    cities = ["Lyon", "Toulouse", "Hamburg", "Torino", "Gdansk", "Porto"]
    made: dict[str, list[str]] = {"Account": [], "Opportunity": [], "Product2": []}
    with sim._lock:
        for i in range(accounts):
            name = "O'Brien Machining" if i == 1 else f"Equipment Customer {i + 1:03d}"
            values = {"Name": name, "AccountNumber": f"AC-{1000 + i}",
                      "Type": "Customer - Direct", "Industry": "Manufacturing",
                      "BillingCity": cities[i % len(cities)], "BillingCountry": "" if i == accounts - 1 else "FR",
                      "NumberOfEmployees": 50 + 10 * i}
            made["Account"].append(sim.ui_create("Account", values))
        for i, (name, family) in enumerate([("Hydraulic press HP-200", "Presses"), ("Conveyor CV-12", "Conveyors"),
                                            ("Spare seal kit", "Spares")]):
            made["Product2"].append(sim.ui_create("Product2", {"Name": name, "ProductCode": f"EQ-{i:03d}",
                                                               "Family": family, "IsActive": True}))
        for i in range(opportunities):
            account = made["Account"][i % max(1, len(made["Account"]))] if made["Account"] else None
            made["Opportunity"].append(sim.ui_create(
                "Opportunity", {"Name": f"Line retrofit {i + 1}", "StageName": "Prospecting",
                                "CloseDate": f"2026-{(i % 12) + 1:02d}-15",
                                "Amount": None if i == opportunities - 1 else 25000.0 + 5000 * i,
                                "AccountId": account}))
    return made


LEGAL_ENTITY_COMPANY = {"US01": "usmf", "DE01": "demf"}
"""Legal_Entity__c -> F&O company (the company part of Product2.Dynamics_Item__c), as flows/fno-salesforce maps it."""
LEGAL_ENTITY_HOME = {"US01": ("USD", "US"), "DE01": ("EUR", "DE")}
"""Legal entity -> (its currency, its country) for accounts sales creates."""
MAPPED_CURRENCIES = frozenset({"USD", "EUR", "GBP", "CHF"})
"""Currencies the fno-salesforce flow maps; accounts in any other one get no pipeline (they are the bad ones)."""
UNMAPPED_LEGAL_ENTITY = "BR01"
UNMAPPED_CURRENCY = "JPY"
UNMAPPED_PAYMENT_TERMS = "Net 90"
OPEN_STAGES = ("Prospecting", "Qualification", "Proposal/Price Quote", "Negotiation/Review")

_FIRMS = ("Allegheny", "Ridgeway", "Lakeshore", "Granite Valley", "Ironbridge", "Northfield", "Keystone",
          "Bluewater", "Summit", "Riverside", "Harbor Point", "Redstone")
_TRADES = ("Fabrication", "Machine Works", "Tooling", "Industrial Supply", "Precision Parts", "Automation")
_CITIES = {"US01": ("Pittsburgh", "Columbus", "Milwaukee", "Houston", "Charlotte"),
           "DE01": ("Stuttgart", "Hamburg", "Dortmund", "Leipzig", "Augsburg")}
_DEALS = ("Press line retrofit", "Conveyor expansion", "Spare parts agreement", "Robotic welding cell",
          "Hydraulic upgrade", "Packaging line", "Service kit renewal")


def _firm_name(i: int, suffix: str = "") -> str:
    """Distinct, readable company names for i < 72 (then numbered)."""
    base = f"{_FIRMS[i % len(_FIRMS)]} {_TRADES[(i // len(_FIRMS)) % len(_TRADES)]}"
    return base + (f" {i // (len(_FIRMS) * len(_TRADES)) + 1}" if i >= len(_FIRMS) * len(_TRADES) else "") + suffix


def seed_new_accounts(sim: SalesforceSimulator, n: int = 20, *, seed: int = 5) -> dict[str, list[str]]:
    """Accounts sales creates for the ERP (they become F&O customers): `n` good ones and one bad one.

    Good: Type "Customer - Direct" (about one in five "Customer - Channel"), Legal_Entity__c US01 (USD, US) or DE01
    (EUR, DE), a BillingCity, no Dynamics_Account__c yet. Bad: US01 in JPY, a currency the flow does not map.
    Returns {"good": [...], "bad_currency": [id]}.
    """
    rng = random.Random(seed)
    made: dict[str, list[str]] = {"good": [], "bad_currency": []}
    for i in range(n):
        entity = "US01" if rng.random() < 0.6 else "DE01"
        currency, country = LEGAL_ENTITY_HOME[entity]
        made["good"].append(sim.ui_create("Account", {
            "Name": _firm_name(i, " GmbH" if entity == "DE01" else " Inc."),
            "Type": "Customer - Channel" if rng.random() < 0.2 else "Customer - Direct",
            "Legal_Entity__c": entity, "CurrencyIsoCode": currency, "BillingCountry": country,
            "BillingCity": rng.choice(_CITIES[entity]), "Industry": "Manufacturing"}))
    made["bad_currency"].append(sim.ui_create("Account", {
        "Name": "Osaka Machinery Imports Inc.", "Type": "Customer - Direct", "Legal_Entity__c": "US01",
        "CurrencyIsoCode": UNMAPPED_CURRENCY, "BillingCountry": "US", "BillingCity": "Seattle",
        "Industry": "Manufacturing"}))
    return made


def _add_lines(sim: SalesforceSimulator, rng: random.Random, sobject: str, header: tuple[str, str],
               pool: Sequence[Mapping[str, Any]], count: int, prices: Mapping[str, float]) -> list[str]:
    parent_field, parent_id = header
    return [sim.ui_create(sobject, {parent_field: parent_id, "Product2Id": product["Id"],
                                    "Quantity": float(rng.randint(1, 25)), "UnitPrice": prices[str(product["Id"])]})
            for product in rng.sample(list(pool), min(count, len(pool)))]


def seed_sales_pipeline(sim: SalesforceSimulator, *, accounts: Sequence[Mapping[str, Any]],
                        products: Sequence[Mapping[str, Any]], opportunities: int = 300, orders: int = 60,
                        seed: int = 7) -> dict[str, list[str]]:
    """Sales work on existing Accounts and Product2 records, made through the UI (so it emits change events).

    `opportunities` good opportunities across the stages (40 % Closed Won), each with the account's
    Legal_Entity__c and CurrencyIsoCode and 1-4 line items of products of the same company (US01 <-> usmf,
    DE01 <-> demf, the company part of Dynamics_Item__c); closed ones are created open, given their lines, then
    closed, as a rep would. `orders` good orders with 1-3 order products, created Draft, 80 % then
    activated. Only accounts in a mapped legal entity and currency are used. On top, three bad records that sync
    and must dead-letter: a Closed Won opportunity in BR01, a Closed Won opportunity in JPY and an activated
    order in BR01.

    Returns ids under "won", "open", "lost", "activated", "draft", "bad_legal_entity", "bad_currency",
    "bad_order_legal_entity", "opportunity_line_items" and "order_items" (the bad records are only in theirs).
    """
    rng = random.Random(seed)
    by_company: dict[str, list[Mapping[str, Any]]] = {}
    for product in products:
        company = str(product.get("Dynamics_Item__c") or "").partition("|")[0].lower()
        if company:
            by_company.setdefault(company, []).append(product)
    eligible = [a for a in accounts if LEGAL_ENTITY_COMPANY.get(str(a.get("Legal_Entity__c"))) in by_company
                and a.get("CurrencyIsoCode") in MAPPED_CURRENCIES]
    if not eligible:
        raise ValueError("seed_sales_pipeline needs accounts in a mapped legal entity and currency, and products "
                         "of their company")
    prices = {str(p["Id"]): float(rng.randrange(40, 12_000)) + rng.choice((0.0, 0.5, 0.99)) for p in products}
    made: dict[str, list[str]] = {k: [] for k in (
        "won", "open", "lost", "activated", "draft", "bad_legal_entity", "bad_currency", "bad_order_legal_entity",
        "opportunity_line_items", "order_items")}

    def pool(account: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        return by_company[LEGAL_ENTITY_COMPANY[str(account["Legal_Entity__c"])]]

    def opportunity(account: Mapping[str, Any], stage: str, **override: Any) -> str:
        closed = stage.startswith("Closed")
        month, day = rng.randint(1, 12), rng.randint(1, 28)
        rid = sim.ui_create("Opportunity", {
            "Name": f"{account.get('Name') or 'Account'} - {rng.choice(_DEALS)}",
            "StageName": "Proposal/Price Quote" if closed else stage,
            "CloseDate": f"{2025 if closed else 2026}-{month:02d}-{day:02d}", "AccountId": account["Id"],
            "Legal_Entity__c": account["Legal_Entity__c"], "CurrencyIsoCode": account["CurrencyIsoCode"],
            **override})
        made["opportunity_line_items"] += _add_lines(sim, rng, "OpportunityLineItem", ("OpportunityId", rid),
                                                     pool(account), rng.randint(1, 4), prices)
        if closed:
            sim.ui_change("Opportunity", rid, {"StageName": stage})
        return rid

    def order(account: Mapping[str, Any], number: int, activate: bool, **override: Any) -> str:
        rid = sim.ui_create("Order", {
            "AccountId": account["Id"], "Status": "Draft",
            "EffectiveDate": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "Legal_Entity__c": account["Legal_Entity__c"], "CurrencyIsoCode": account["CurrencyIsoCode"],
            "OrderReferenceNumber": f"PO-{number:05d}", **override})
        made["order_items"] += _add_lines(sim, rng, "OrderItem", ("OrderId", rid), pool(account),
                                          rng.randint(1, 3), prices)
        if activate:
            sim.ui_change("Order", rid, {"Status": "Activated"})
        return rid

    # exact shares (40 % won, the rest spread over the other stages; 80 % of orders activated), shuffled
    won = round(opportunities * 0.4)
    others = (*OPEN_STAGES, "Closed Lost")
    stages = ["Closed Won"] * won + [others[i % len(others)] for i in range(opportunities - won)]
    rng.shuffle(stages)
    for stage in stages:
        kind = "won" if stage == "Closed Won" else "lost" if stage == "Closed Lost" else "open"
        made[kind].append(opportunity(rng.choice(eligible), stage))
    activated = round(orders * 0.8)
    plan = [True] * activated + [False] * (orders - activated)
    rng.shuffle(plan)
    for i, activate in enumerate(plan):
        made["activated" if activate else "draft"].append(order(rng.choice(eligible), 40_000 + i, activate))
    # the bad ones sit on an ordinary US account: a rep picked the wrong picklist value
    home = next((a for a in eligible if a["Legal_Entity__c"] == "US01"), eligible[0])
    made["bad_legal_entity"].append(opportunity(home, "Closed Won", Legal_Entity__c=UNMAPPED_LEGAL_ENTITY))
    made["bad_currency"].append(opportunity(home, "Closed Won", CurrencyIsoCode=UNMAPPED_CURRENCY))
    made["bad_order_legal_entity"].append(order(home, 49_999, True, Legal_Entity__c=UNMAPPED_LEGAL_ENTITY))
    return made


_FIRST = ("Anna", "Ben", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kara", "Luis")
_LAST = ("Baker", "Fischer", "Gomez", "Hansen", "Ivanova", "Kowalski", "Meyer", "Novak", "Okafor", "Rossi")
_TITLES = ("Purchasing Manager", "Plant Manager", "Maintenance Lead", "CFO", "Operations Director", "Buyer")
_PLACES = (("Pittsburgh", "15222", "US"), ("Cleveland", "44114", "US"), ("Lyon", "69002", "FR"),
           ("Stuttgart", "70173", "DE"), ("Leeds", "LS1 4DY", "GB"), ("Basel", "4051", "CH"))
_STREETS = ("Market Street", "Industrial Parkway", "Harbor Road", "Mill Lane", "Station Avenue")
PAYMENT_TERMS = ("Net 30", "2% 10 Net 30", "Net 45", "Net 60")
CRM_TYPES = ("Prospect", "Customer - Direct", "Customer - Channel")


def seed_customer360(sim: SalesforceSimulator, *, accounts: int = 40, contacts_per_account: int = 2,
                     seed: int = 11) -> dict[str, list[str]]:
    """Sales-owned accounts and contacts for Customer 360 (Salesforce <-> Dynamics 365 Sales), made in the UI.

    `accounts` good accounts typed Prospect / Customer - Direct / Customer - Channel with no Legal_Entity__c (they
    are not ERP customers), with phone, website, revenue, billing address, payment terms and credit limit, each with
    `contacts_per_account` contacts (one contact is an O'Connor, for SOQL escaping). One bad account more has
    Payment_Terms__c "Net 90", which the flow does not map; it has no contacts, so it is the only record that
    dead-letters. Returns ids under "accounts", "prospect", "direct", "channel", "contacts", "bad_payment_terms".
    """
    rng = random.Random(seed)
    made: dict[str, list[str]] = {k: [] for k in ("accounts", "prospect", "direct", "channel", "contacts",
                                                  "bad_payment_terms")}

    def account_values(i: int, terms: str) -> dict[str, Any]:
        city, postal, country = rng.choice(_PLACES)
        name = _firm_name(i + 24)  # other names than seed_new_accounts' first ones
        return {"Name": name, "Type": rng.choice(CRM_TYPES), "Phone": f"+1 412 555 {rng.randrange(10_000):04d}",
                "Website": "https://www." + "".join(ch for ch in name.lower() if ch.isalnum()) + ".example",
                "AnnualRevenue": float(rng.randrange(5, 500) * 100_000), "Payment_Terms__c": terms,
                "BillingStreet": f"{rng.randint(1, 999)} {rng.choice(_STREETS)}", "BillingCity": city,
                "BillingPostalCode": postal, "BillingCountry": country,
                "Credit_Limit__c": float(rng.choice((25_000, 50_000, 100_000, 250_000))),
                "Industry": "Manufacturing"}

    for i in range(accounts):
        values = account_values(i, rng.choice(PAYMENT_TERMS))
        rid = sim.ui_create("Account", values)
        made["accounts"].append(rid)
        made[{"Prospect": "prospect", "Customer - Direct": "direct"}.get(values["Type"], "channel")].append(rid)
        domain = values["Website"].removeprefix("https://www.")
        for j in range(contacts_per_account):
            first = rng.choice(_FIRST)
            last = "O'Connor" if (i, j) == (1, 0) else rng.choice(_LAST)
            made["contacts"].append(sim.ui_create("Contact", {
                "FirstName": first, "LastName": last,
                "Email": f"{first}.{last}".lower().replace("'", "") + f"@{domain}",
                "Phone": f"+1 412 555 {rng.randrange(10_000):04d}", "Title": rng.choice(_TITLES),
                "MailingCity": values["BillingCity"], "AccountId": rid}))
    bad = account_values(accounts, UNMAPPED_PAYMENT_TERMS) | {"Type": "Customer - Direct"}
    made["bad_payment_terms"].append(sim.ui_create("Account", bad))
    return made
