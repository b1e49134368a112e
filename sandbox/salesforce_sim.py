"""Protocol-faithful simulator of the Salesforce REST API v63.0 (Starlette ASGI; serve it over TLS).

Covers what Syncline uses: the client-credentials token endpoint on My Domain, sObject CRUD and upsert by
External ID, sObject Collections (create/update/upsert/delete with per-record results), SOQL queries (a real
subset parser) with `nextRecordsUrl` paging, Bulk API 2.0 ingest jobs, the daily request allocation with
`Sforce-Limit-Info`, expired sessions, and Change Data Capture events (Pub/Sub-shaped JSON).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import secrets
import threading
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

API_VERSION = "63.0"
API_PREFIX = f"/services/data/v{API_VERSION}/"
QUERY_BATCH = 2000
COLLECTION_LIMIT = 200

DEFAULT_CLIENT_ID = "3MVG9sim.Syncline.Connected.App"
DEFAULT_CLIENT_SECRET = "sim-sf-secret-0123456789ABCDEF"  # a fixed test secret
ORG_ID = "00D5g00000SyncAAA"
RUN_AS_USER_ID = "0055g00000SyncAAA"
UI_USER_ID = "0055g00000OfficAAA"

KEY_PREFIX = {"Account": "001", "Contact": "003", "Opportunity": "006", "Product2": "01t"}
SYSTEM_FIELDS = ("Id", "CreatedDate", "LastModifiedDate", "SystemModstamp", "IsDeleted")
SCHEMAS: dict[str, dict[str, str]] = {
    "Account": {"Name": "string", "AccountNumber": "string", "Type": "picklist", "Industry": "picklist",
                "BillingCity": "string", "BillingCountry": "string", "Phone": "phone",
                "AnnualRevenue": "currency", "NumberOfEmployees": "int", "Dynamics_Account__c": "string",
                "CurrencyIsoCode": "picklist"},
    "Contact": {"FirstName": "string", "LastName": "string", "Email": "email", "AccountId": "reference",
                "Dynamics_Contact__c": "string"},
    "Product2": {"Name": "string", "ProductCode": "string", "Family": "picklist", "IsActive": "boolean",
                 "Dynamics_Item__c": "string"},
    "Opportunity": {"Name": "string", "StageName": "picklist", "CloseDate": "date", "Amount": "currency",
                    "AccountId": "reference", "Dynamics_Opportunity__c": "string"},
}
EXTERNAL_IDS: dict[str, frozenset[str]] = {
    "Account": frozenset({"Dynamics_Account__c"}),
    "Contact": frozenset({"Dynamics_Contact__c"}),
    "Product2": frozenset({"Dynamics_Item__c"}),
    "Opportunity": frozenset({"Dynamics_Opportunity__c"}),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "Account": ("Name",), "Contact": ("LastName",), "Product2": ("Name",),
    "Opportunity": ("Name", "StageName", "CloseDate"),
}


def to_18(id15: str) -> str:
    """Salesforce's case-safe 18-character id: three checksum characters from the capital letters."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
    suffix = ""
    for chunk in (id15[0:5], id15[5:10], id15[10:15]):
        bits = sum(1 << i for i, ch in enumerate(chunk) if "A" <= ch <= "Z")
        suffix += alphabet[bits]
    return id15 + suffix


def sf_datetime(moment: datetime) -> str:
    """Salesforce's REST datetime format: `2024-05-01T10:00:00.000+0000`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


class SalesforceFault(Exception):
    """An error answered as Salesforce's JSON error array."""

    def __init__(self, status: int, code: str, message: str, fields: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, list(fields or [])

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
        tokens.append(_Tok(kind, value, text))
        pos = match.end()
    return tokens


Predicate = Callable[[Mapping[str, Any]], bool]


@dataclass
class Soql:
    fields: list[str]
    sobject: str
    where: Predicate | None
    order: tuple[str, bool] | None
    limit: int | None


class _SoqlParser:
    def __init__(self, soql: str) -> None:
        self.tokens = _tokenize(soql)
        self.pos = 0

    def _peek(self) -> _Tok | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _kw(self, word: str) -> bool:
        tok = self._peek()
        if tok is not None and tok.kind == "word" and tok.text.upper() == word:
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

    def parse(self) -> Soql:
        self._expect("word", "SELECT")
        fields = [self._expect("word").text]
        while self._peek() is not None and self._peek().kind == "punct" and self._peek().text == ",":  # type: ignore[union-attr]
            self.pos += 1
            fields.append(self._expect("word").text)
        self._expect("word", "FROM")
        sobject = self._expect("word").text
        where = self._or() if self._kw("WHERE") else None
        order = None
        if self._kw("ORDER"):
            self._expect("word", "BY")
            name = self._expect("word").text
            desc = self._kw("DESC")
            if not desc:
                self._kw("ASC")
            order = (name, desc)
        limit = int(self._expect("num").value) if self._kw("LIMIT") else None
        if self._peek() is not None:
            raise SalesforceFault(400, "MALFORMED_QUERY", f"unexpected token: '{self._peek().text}'")  # type: ignore[union-attr]
        return Soql(fields, sobject, where, order, limit)

    def _or(self) -> Predicate:
        left = self._and()
        while self._kw("OR"):
            right = self._and()
            left = (lambda a, b: lambda r: a(r) or b(r))(left, right)
        return left

    def _and(self) -> Predicate:
        left = self._atom()
        while self._kw("AND"):
            right = self._atom()
            left = (lambda a, b: lambda r: a(r) and b(r))(left, right)
        return left

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

    def _atom(self) -> Predicate:
        if self._kw("NOT"):
            inner = self._atom()
            return lambda r: not inner(r)
        tok = self._peek()
        if tok is not None and tok.kind == "punct" and tok.text == "(":
            self.pos += 1
            inner = self._or()
            self._expect("punct")
            return inner
        name = self._expect("word").text
        negate = self._kw("NOT")
        if self._kw("IN"):
            self._expect("punct")
            values = [self._literal()]
            while self._peek() is not None and self._peek().text == ",":  # type: ignore[union-attr]
                self.pos += 1
                values.append(self._literal())
            self._expect("punct")
            return lambda r: (_cmp_eq_any(r.get(name), values)) != negate
        if negate:
            raise SalesforceFault(400, "MALFORMED_QUERY", "NOT must be followed by IN")
        if self._kw("LIKE"):
            pattern = self._literal()
            regex = _like_regex(str(pattern))
            return lambda r: r.get(name) is not None and regex.fullmatch(str(r.get(name))) is not None
        op = self._expect("op").text
        value = self._literal()
        return lambda r: _compare(r.get(name), op, value)


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


def parse_soql(soql: str) -> Soql:
    return _SoqlParser(soql).parse()


# ============================================================================================ state


@dataclass
class Limits:
    daily_max: int = 100_000
    used: int = 0


@dataclass
class Faults:
    expired: set[str] = field(default_factory=set)
    sim: SalesforceSimulator | None = None
    reject_sessions: bool = False
    """Every API call answers 401 INVALID_SESSION_ID, even with a fresh token (e.g. the run-as user was frozen)."""

    def expire_tokens(self) -> None:
        """Every token issued so far answers 401 INVALID_SESSION_ID from now on."""
        assert self.sim is not None
        with self.sim._lock:
            self.expired.update(self.sim._tokens)


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
            Route(API_PREFIX + "{rest:path}", self._api, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
        ])

    # ------------------------------------------------------------------------------------ control

    def reset(self) -> None:
        with self._lock:
            self.records: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in SCHEMAS}
            self._tokens: set[str] = set()
            self.faults.expired = set()
            self.faults.reject_sessions = False
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
        body = secrets.token_hex(6).upper()[:12]
        return to_18(KEY_PREFIX[sobject] + body)

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

    def ui_change(self, sobject: str, record_id: str, values: Mapping[str, Any]) -> None:
        """An edit a user makes in the Lightning UI (changeOrigin without our client id)."""
        with self._lock:
            self._update(sobject, record_id, dict(values), origin="com/salesforce/ui", user=UI_USER_ID)

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

    def _check_fields(self, sobject: str, values: Mapping[str, Any]) -> None:
        for name in values:
            if name not in SCHEMAS[sobject] and name not in ("Id",):
                raise SalesforceFault(400, "INVALID_FIELD",
                                      f"No such column '{name}' on sobject of type {sobject}", [name])

    def _record_event(self, sobject: str, ids: list[str], change_type: str, changed: list[str],
                      values: Mapping[str, Any], origin: str, user: str, when: datetime) -> None:
        header = {
            "entityName": sobject, "recordIds": ids, "changeType": change_type, "changeOrigin": origin,
            "transactionKey": str(uuid.uuid4()), "sequenceNumber": next(self._seq),
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

    def _create(self, sobject: str, values: dict[str, Any], *, origin: str, user: str) -> str:
        self._check_fields(sobject, values)
        missing = [f for f in REQUIRED[sobject] if values.get(f) in (None, "")]
        if missing:
            raise SalesforceFault(400, "REQUIRED_FIELD_MISSING",
                                  f"Required fields are missing: [{', '.join(missing)}]", missing)
        now = self._now()
        rid = self._new_id(sobject)
        stamp = sf_datetime(now)
        record: dict[str, Any] = dict.fromkeys(SCHEMAS[sobject])
        record.update(values)
        record.update(Id=rid, CreatedDate=stamp, LastModifiedDate=stamp, SystemModstamp=stamp, IsDeleted=False)
        self.records[sobject][rid] = record
        self._record_event(sobject, [rid], "CREATE", sorted(values), record, origin, user, now)
        return rid

    def _update(self, sobject: str, rid: str, values: dict[str, Any], *, origin: str, user: str) -> None:
        self._check_fields(sobject, values)
        record = self.records[sobject].get(rid)
        if record is None:
            raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
        merged = {**record, **values}
        missing = [f for f in REQUIRED[sobject] if merged.get(f) in (None, "")]
        if missing:
            raise SalesforceFault(400, "REQUIRED_FIELD_MISSING",
                                  f"Required fields are missing: [{', '.join(missing)}]", missing)
        changed = sorted(k for k, v in values.items() if record.get(k) != v)
        now = self._now()
        record.update(values)
        record["LastModifiedDate"] = record["SystemModstamp"] = sf_datetime(now)
        self._record_event(sobject, [rid], "UPDATE", [*changed, "LastModifiedDate"], record, origin, user, now)

    def _delete(self, rid: str, *, origin: str, user: str) -> None:
        for sobject, table in self.records.items():
            if rid in table:
                record = table.pop(rid)
                self._record_event(sobject, [rid], "DELETE", [], record, origin, user, self._now())
                return
        raise SalesforceFault(404, "ENTITY_IS_DELETED", "entity is deleted")

    def _upsert(self, sobject: str, ext_field: str, ext_value: str, values: dict[str, Any], *, origin: str,
                user: str) -> tuple[str, bool]:
        if ext_field not in EXTERNAL_IDS.get(sobject, frozenset()) and ext_field != "Id":
            raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
        values = {k: v for k, v in values.items() if k != ext_field}
        matches = [r for r in self.records[sobject].values()
                   if r.get(ext_field) is not None and str(r.get(ext_field)).lower() == str(ext_value).lower()]
        if len(matches) > 1:
            raise SalesforceFault(300, "MULTIPLE_CHOICES", f"Multiple records with {ext_field} = {ext_value}",
                                  [f"{API_PREFIX}sobjects/{sobject}/{r['Id']}" for r in matches])
        if matches:
            self._update(sobject, matches[0]["Id"], values, origin=origin, user=user)
            return matches[0]["Id"], False
        return self._create(sobject, {**values, ext_field: ext_value}, origin=origin, user=user), True

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

    async def _api(self, request: Request) -> Response:
        rest = request.path_params["rest"].strip("/")
        body = await request.body()
        with self._lock:
            self.request_count += 1
            self.requests.append((request.method, rest, dict(request.headers)))
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
            try:
                return self._dispatch(request, rest, body, origin, client)
            except SalesforceFault as fault:
                if fault.status == 300:
                    return self._json(fault.fields, 300)
                return self._json(fault.body(), fault.status)

    def _dispatch(self, request: Request, rest: str, body: bytes, origin: str, client: str | None) -> Response:
        method = request.method
        parts = rest.split("/")
        data: Any = None
        if body and request.headers.get("content-type", "").startswith("application/json"):
            try:
                data = json.loads(body)
            except json.JSONDecodeError as exc:
                raise SalesforceFault(400, "JSON_PARSER_ERROR", f"Unexpected character: {exc}") from exc
        user = RUN_AS_USER_ID
        if parts[0] in ("query", "queryAll"):
            if len(parts) == 2:
                return self._query_more(parts[1])
            return self._query(request.query_params.get("q", ""))
        if parts[0] == "limits":
            return self._json({"DailyApiRequests": {"Max": self.limits.daily_max,
                                                    "Remaining": self.limits.daily_max - self.limits.used}})
        if parts[0] == "composite" and len(parts) >= 2 and parts[1] == "sobjects":
            return self._collections(method, parts[2:], data, request, origin, user)
        if parts[0] == "jobs" and len(parts) >= 2 and parts[1] == "ingest":
            return self._bulk(method, parts[2:], data, body, origin, client)
        if parts[0] == "sobjects" and len(parts) >= 2:
            sobject = parts[1]
            if sobject not in SCHEMAS:
                raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
            if len(parts) == 3 and parts[2] == "describe" and method == "GET":
                return self._json(self._describe(sobject))
            if len(parts) == 2 and method == "POST":
                rid = self._create(sobject, dict(data or {}), origin=origin, user=user)
                return self._json({"id": rid, "success": True, "errors": []}, 201)
            if len(parts) == 3:
                rid = parts[2]
                if method == "GET":
                    rec = self.records[sobject].get(rid)
                    if rec is None:
                        raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
                    return self._json(self._present(sobject, rec, list(rec)))
                if method == "PATCH":
                    self._update(sobject, rid, dict(data or {}), origin=origin, user=user)
                    return Response(status_code=204, headers=self._limit_header())
                if method == "DELETE":
                    self._delete(rid, origin=origin, user=user)
                    return Response(status_code=204, headers=self._limit_header())
            if len(parts) == 4 and method == "PATCH":
                rid, created = self._upsert(sobject, parts[2], parts[3], dict(data or {}), origin=origin, user=user)
                return self._json({"id": rid, "errors": [], "success": True, "created": created},
                                  201 if created else 200)
        raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")

    def _describe(self, sobject: str) -> dict[str, Any]:
        fields = [{"name": n, "type": "id" if n == "Id" else "datetime" if n.endswith("Date") or n ==
                   "SystemModstamp" else "boolean" if n == "IsDeleted" else "string", "externalId": False}
                  for n in SYSTEM_FIELDS]
        fields += [{"name": n, "type": t, "externalId": n in EXTERNAL_IDS[sobject]}
                   for n, t in SCHEMAS[sobject].items()]
        return {"name": sobject, "keyPrefix": KEY_PREFIX[sobject], "fields": fields}

    @staticmethod
    def _present(sobject: str, rec: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"attributes": {"type": sobject, "url": f"{API_PREFIX}sobjects/{sobject}/{rec['Id']}"}}
        for name in fields:
            out[name] = rec.get(name)
        return out

    # ---------------------------------------------------------------------------------- collections

    def _collections(self, method: str, rest: list[str], data: Any, request: Request, origin: str,
                     user: str) -> Response:
        if method == "DELETE":
            ids = [i for i in request.query_params.get("ids", "").split(",") if i]
            if not ids or len(ids) > COLLECTION_LIMIT:
                raise SalesforceFault(400, "EXCEEDED_ID_LIMIT", "record limit reached. cannot submit more than 200 "
                                      "records into this call")
            results = []
            for rid in ids:
                try:
                    self._delete(rid, origin=origin, user=user)
                    results.append({"id": rid, "success": True, "errors": []})
                except SalesforceFault as fault:
                    results.append({"id": rid, "success": False, "errors": [fault.record_error()]})
            return self._json(results)
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise SalesforceFault(400, "JSON_PARSER_ERROR", "Expected a request body with records")
        records = data["records"]
        if len(records) > COLLECTION_LIMIT:
            raise SalesforceFault(400, "EXCEEDED_ID_LIMIT",
                                  "record limit reached. cannot submit more than 200 records into this call")
        if data.get("allOrNone"):
            raise SalesforceFault(400, "INVALID_INPUT", "allOrNone=true is not simulated")
        results = []
        for raw in records:
            rec = dict(raw)
            sobject = (rec.pop("attributes", None) or {}).get("type")
            try:
                if sobject not in SCHEMAS:
                    raise SalesforceFault(400, "INVALID_TYPE", f"sObject type '{sobject}' is not supported.")
                if method == "POST" and not rest:
                    rid, created = self._create(sobject, rec, origin=origin, user=user), True
                    results.append({"id": rid, "success": True, "errors": []})
                elif method == "PATCH" and not rest:
                    rid = str(rec.pop("Id", "") or "")
                    if not rid:
                        raise SalesforceFault(400, "MISSING_ARGUMENT", "Id not specified in an update call", ["Id"])
                    self._update(sobject, rid, rec, origin=origin, user=user)
                    results.append({"id": rid, "success": True, "errors": []})
                elif method == "PATCH" and len(rest) == 2:
                    if sobject != rest[0]:
                        raise SalesforceFault(400, "INVALID_TYPE", f"record type {sobject} does not match {rest[0]}")
                    ext = rec.get(rest[1])
                    if ext in (None, ""):
                        raise SalesforceFault(400, "MISSING_ARGUMENT",
                                              f"{rest[1]} not specified in an upsert call", [rest[1]])
                    rid, created = self._upsert(sobject, rest[1], str(ext), rec, origin=origin, user=user)
                    results.append({"id": rid, "success": True, "errors": [], "created": created})
                else:
                    raise SalesforceFault(405, "METHOD_NOT_ALLOWED", "HTTP Method not allowed")
            except SalesforceFault as fault:
                if fault.status == 405:
                    raise
                if fault.status == 300:
                    matches = ", ".join(url.rsplit("/", 1)[-1] for url in fault.fields)
                    fault = SalesforceFault(400, "DUPLICATE_EXTERNAL_ID",
                                            f"{rest[-1]}: more than one record found for external id field: "
                                            f"[{matches}]",
                                            [rest[-1]])
                if fault.status == 404 and fault.code == "NOT_FOUND" and len(rest) == 2:
                    raise  # unknown external id field: the whole call fails
                results.append({"success": False, "errors": [fault.record_error()]})
        return self._json(results)

    # ---------------------------------------------------------------------------------- query

    def _query(self, soql: str) -> Response:
        parsed = parse_soql(soql)
        if parsed.sobject not in SCHEMAS:
            raise SalesforceFault(400, "INVALID_TYPE", f"sObject type '{parsed.sobject}' is not supported.")
        known = set(SCHEMAS[parsed.sobject]) | set(SYSTEM_FIELDS)
        for name in parsed.fields:
            if name not in known:
                raise SalesforceFault(400, "INVALID_FIELD",
                                      f"No such column '{name}' on entity '{parsed.sobject}'.")
        rows = list(self.records[parsed.sobject].values())
        if parsed.where is not None:
            rows = [r for r in rows if parsed.where(r)]
        if parsed.order is not None:
            name, desc = parsed.order
            rows.sort(key=lambda r: (r.get(name) is None, _norm(r.get(name)) if r.get(name) is not None else 0),
                      reverse=desc)
        if parsed.limit is not None:
            rows = rows[: parsed.limit]
        presented = [self._present(parsed.sobject, r, parsed.fields) for r in rows]
        cursor = "01g" + secrets.token_hex(8).upper()[:15]
        self._cursors[cursor] = presented
        return self._page(cursor, 0)

    def _query_more(self, token: str) -> Response:
        cursor, _, offset = token.rpartition("-")
        if cursor not in self._cursors or not offset.isdigit():
            raise SalesforceFault(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        return self._page(cursor, int(offset))

    def _page(self, cursor: str, offset: int) -> Response:
        rows = self._cursors[cursor]
        page = rows[offset: offset + QUERY_BATCH]
        done = offset + QUERY_BATCH >= len(rows)
        body: dict[str, Any] = {"totalSize": len(rows), "done": done, "records": page}
        if not done:
            body["nextRecordsUrl"] = f"{API_PREFIX}query/{cursor}-{offset + QUERY_BATCH}"
        else:
            self._cursors.pop(cursor, None)
        return self._json(body)

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


def _csv_value(sobject: str, name: str, value: str) -> Any:
    kind = SCHEMAS.get(sobject, {}).get(name)
    if kind == "boolean":
        return value.lower() == "true"
    if kind in ("currency", "int"):
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
    origin = "com/salesforce/ui"
    with sim._lock:
        for i in range(accounts):
            name = "O'Brien Machining" if i == 1 else f"Equipment Customer {i + 1:03d}"
            values = {"Name": name, "AccountNumber": f"AC-{1000 + i}",
                      "Type": "Customer - Direct", "Industry": "Manufacturing",
                      "BillingCity": cities[i % len(cities)], "BillingCountry": "" if i == accounts - 1 else "FR",
                      "NumberOfEmployees": 50 + 10 * i}
            made["Account"].append(sim._create("Account", values, origin=origin, user=UI_USER_ID))
        for i, (name, family) in enumerate([("Hydraulic press HP-200", "Presses"), ("Conveyor CV-12", "Conveyors"),
                                            ("Spare seal kit", "Spares")]):
            made["Product2"].append(sim._create("Product2", {"Name": name, "ProductCode": f"EQ-{i:03d}",
                                                             "Family": family, "IsActive": True},
                                                origin=origin, user=UI_USER_ID))
        for i in range(opportunities):
            account = made["Account"][i % max(1, len(made["Account"]))] if made["Account"] else None
            made["Opportunity"].append(sim._create(
                "Opportunity", {"Name": f"Line retrofit {i + 1}", "StageName": "Prospecting",
                                "CloseDate": f"2026-{(i % 12) + 1:02d}-15",
                                "Amount": None if i == opportunities - 1 else 25000.0 + 5000 * i,
                                "AccountId": account}, origin=origin, user=UI_USER_ID))
    return made
