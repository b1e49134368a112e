"""Protocol-faithful simulator of an ArcGIS Online hosted feature service and its token endpoint (Starlette ASGI)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import math
import operator
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.arcgis_schema import (
    _NUMERIC,
    DATE,
    DOUBLE,
    GLOBALID,
    GUID,
    INTEGER,
    OID,
    SMALLINT,
    STRING,
    FieldDef,
    LayerDef,
    _text,
    dot_layers,
)
from sandbox.arcgis_schema import (
    coded_domain as coded_domain,
)
from sandbox.webhook_delivery import Deliverer
from shared.core.ports import GEOMETRY_KEY
from shared.payloads import strict_loads

TOKEN_PATH = "/sharing/rest/oauth2/token"
SHARING_PATH = "/sharing/rest"
"""The portal (sharing) API root: the simulator serves `info`, `portals/self` and `oauth2/token` under it."""
DEFAULT_ORG_ID = "Sy9cL1neD0TsIgn5"
DEFAULT_SERVICE_NAME = "DOT_Signs"
PORTAL_VERSION = "2025.3"
APP_PRIVILEGES = ("features:user:edit", "portal:user:viewOrgItems")
"""What the default app's item is granted in `appInfo.privileges` (feature editing, reading org items)."""
DEFAULT_CLIENT_ID = "SynclineSimApp01"
DEFAULT_CLIENT_SECRET = "sim-arcgis-secret-7f3c1e9a5b2d4c6e"  # a fixed test secret
DEFAULT_APP_USERNAME = "syncline_app"
"""Editor/Creator recorded for edits made with the default app's tokens (Syncline's own writes)."""
DEFAULT_API_KEY = "AAPKsimSyncline0123456789abcdefApiKey"
DEFAULT_API_KEY_USERNAME = "syncline_apikey"
MAX_WEBHOOKS = 5
"""AGOL caps feature-service webhooks at 5 per service."""

EARTH_RADIUS = 6378137.0
MAX_MERCATOR_LAT = 85.0511287798
WEB_MERCATOR = {"wkid": 102100, "latestWkid": 3857}
WGS84 = {"wkid": 4326, "latestWkid": 4326}
MERCATOR_WKIDS = frozenset({102100, 3857, 102113, 900913})

EDIT_FIELDS = {"creationDateField": "CreationDate", "creatorField": "Creator",
               "editDateField": "EditDate", "editorField": "Editor"}
CHANGE_TYPES = frozenset({
    "*", "FeaturesCreated", "FeaturesUpdated", "FeaturesDeleted", "FeaturesEdited", "AttachmentsCreated",
    "AttachmentsUpdated", "AttachmentsDeleted", "LayerSchemaChanged", "LayerDefinitionChanged",
    "FeatureServiceDefinitionChanged",
})
_FEATURE_EVENTS = frozenset({"FeaturesCreated", "FeaturesUpdated", "FeaturesDeleted"})
_GUID_RE = re.compile(r"^\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?$")
_MESSAGES = {
    400: "Unable to complete operation.",
    403: "You do not have permissions to access this resource or perform this operation.",
    404: "Not found.",
    429: "Too many requests. Please try again later.",
    498: "Invalid token.",
    499: "Token Required",
    500: "Internal server error.",
    502: "Bad gateway.",
    503: "Service unavailable.",
    504: "Gateway timeout.",
}


# ============================================================================================ errors


class RestError(Exception):
    """An operation error, answered as `{"error": {code, message, details}}` (with HTTP 200, like the service)."""

    def __init__(self, code: int, message: str | None = None, details: Sequence[str] = (), *,
                 message_code: str | None = None) -> None:
        super().__init__(message or _MESSAGES.get(code, "Error"))
        self.code = code
        self.message = message or _MESSAGES.get(code, "Error")
        self.details = list(details)
        self.message_code = message_code

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message, "details": self.details}
        if self.message_code:
            err["messageCode"] = self.message_code
        return {"error": err}


def _bad_request(*details: str) -> RestError:
    return RestError(400, "Unable to complete operation.", details)


class EditError(Exception):
    """A per-feature edit failure, reported inside add/update/deleteResults as `{code, description}`."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


# ============================================================================================ geometry


def lonlat_to_mercator(lon: float, lat: float) -> tuple[float, float]:
    """WGS84 degrees -> Web Mercator metres (latitude clamped to the projection's limit)."""
    lat = max(-MAX_MERCATOR_LAT, min(MAX_MERCATOR_LAT, lat))
    x = EARTH_RADIUS * math.radians(lon)
    y = EARTH_RADIUS * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))
    return x, y


def mercator_to_lonlat(x: float, y: float) -> tuple[float, float]:
    """Web Mercator metres -> WGS84 degrees."""
    lon = math.degrees(x / EARTH_RADIUS)
    lat = math.degrees(2 * math.atan(math.exp(y / EARTH_RADIUS)) - math.pi / 2)
    return lon, lat


def _wkid_of(raw: Any) -> int | None:
    """A spatial reference given as a number, '4326', or {"wkid": ...} / {"latestWkid": ...}."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, Mapping):
        value = raw.get("wkid") or raw.get("latestWkid")
        return int(value) if isinstance(value, int | float | str) and str(value).isdigit() else None
    text = str(raw).strip()
    if text.startswith("{"):
        try:
            return _wkid_of(strict_loads(text))
        except ValueError:
            return None
    return int(text) if text.isdigit() else None


def _sr_json(wkid: int) -> dict[str, int]:
    return dict(WGS84) if wkid == 4326 else dict(WEB_MERCATOR)


# ============================================================================================ values


def canonical_guid(value: Any) -> str | None:
    """'{XXXXXXXX-...}' upper case, from a GUID with or without braces in any case; None if not a GUID."""
    if not isinstance(value, str):
        return None
    m = _GUID_RE.match(value.strip())
    return "{" + m.group(1).upper() + "}" if m else None


def _field_kind(f: FieldDef) -> str:
    if f.type in _NUMERIC:
        return "num"
    if f.type == DATE:
        return "date"
    if f.type in (GUID, GLOBALID):
        return "guid"
    return "str"


# ============================================================================================ where parser


_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^']|'')*')
  | (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><>|!=|<=|>=|=|<|>)
  | (?P<punct>[(),])
  | (?P<minus>-)
""", re.VERBOSE)
_KEYWORDS = frozenset({"AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "BETWEEN", "TIMESTAMP", "DATE", "ESCAPE"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TS_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?)?$")


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise _invalid_query(f"unexpected character {text[pos]!r} at position {pos}")
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append(_Tok(kind, m.group(), pos))
        pos = m.end()
    return out


def _invalid_query(why: str) -> RestError:
    # The service says no more than this; the reason is kept for whoever debugs the simulator.
    return RestError(400, "Unable to complete operation.", ["Unable to perform query. Please check your parameters.",
                                                            f"Invalid query: {why}"])


class WhereParser:
    """A small SQL-92 subset (the standardized-queries grammar), parsed into a tuple tree: never eval'd.

    Grammar: or := and (OR and)* ; and := not (AND not)* ; not := NOT not | '(' or ')' | predicate ;
    predicate := operand (cmp operand | [NOT] IN (literals) | IS [NOT] NULL | [NOT] LIKE 'pattern'
    | [NOT] BETWEEN operand AND operand) ; operand := field | number | 'string' | TIMESTAMP '...' | DATE '...'.
    """

    def __init__(self, text: str, fields: Mapping[str, FieldDef]) -> None:
        self.text = text
        self.fields = fields
        self.toks = _tokenize(text)
        self.i = 0

    def parse(self) -> tuple[Any, ...]:
        if not self.toks:
            raise _invalid_query("empty where clause")
        node = self._or()
        if self.i != len(self.toks):
            raise _invalid_query(f"unexpected {self.toks[self.i].text!r} at position {self.toks[self.i].pos}")
        return node

    def _peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _kw(self, word: str) -> bool:
        tok = self._peek()
        if tok is not None and tok.kind == "name" and tok.text.upper() == word:
            self.i += 1
            return True
        return False

    def _expect(self, text: str) -> None:
        tok = self._peek()
        if tok is None or tok.text.upper() != text:
            raise _invalid_query(f"expected {text!r} at position {tok.pos if tok else len(self.text)}")
        self.i += 1

    def _or(self) -> tuple[Any, ...]:
        node = self._and()
        while self._kw("OR"):
            node = ("or", node, self._and())
        return node

    def _and(self) -> tuple[Any, ...]:
        node = self._not()
        while self._kw("AND"):
            node = ("and", node, self._not())
        return node

    def _not(self) -> tuple[Any, ...]:
        if self._kw("NOT"):
            return ("not", self._not())
        tok = self._peek()
        if tok is not None and tok.text == "(":
            self.i += 1
            node = self._or()
            self._expect(")")
            return node
        return self._predicate()

    def _predicate(self) -> tuple[Any, ...]:
        left = self._operand()
        tok = self._peek()
        if tok is None:
            raise _invalid_query("incomplete predicate")
        if tok.kind == "op":
            self.i += 1
            right = self._operand()
            self._check(left, right)
            return ("cmp", "<>" if tok.text == "!=" else tok.text, left, right)
        negated = self._kw("NOT")
        if self._kw("IN"):
            self._expect("(")
            items = [self._operand()]
            while self._peek() is not None and self._peek().text == ",":  # type: ignore[union-attr]
                self.i += 1
                items.append(self._operand())
            self._expect(")")
            for item in items:
                if item[0] != "lit":
                    raise _invalid_query("IN lists take literals only")
                self._check(left, item)
            return ("in", left, items, negated)
        if self._kw("LIKE"):
            pattern = self._operand()
            if pattern[0] != "lit" or pattern[2] != "str" or self._kind(left) != "str":
                raise _invalid_query("LIKE compares a text field with a string pattern")
            # Values compare casefolded (hosted data's case-insensitive collation), so the pattern must be too.
            regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern[1].casefold())
            return ("like", left, re.compile(f"^{regex}$", re.DOTALL), negated)
        if self._kw("BETWEEN"):
            low = self._operand()
            self._expect("AND")
            high = self._operand()
            self._check(left, low)
            self._check(left, high)
            return ("between", left, low, high, negated)
        if not negated and self._kw("IS"):
            is_not = self._kw("NOT")
            self._expect("NULL")
            return ("null", left, is_not)
        raise _invalid_query(f"unexpected {tok.text!r} at position {tok.pos}")

    def _operand(self) -> tuple[Any, ...]:
        tok = self._peek()
        if tok is None:
            raise _invalid_query("missing operand")
        self.i += 1
        if tok.kind == "minus":
            nxt = self._peek()
            if nxt is None or nxt.kind != "num":
                raise _invalid_query(f"unexpected '-' at position {tok.pos}")
            self.i += 1
            return ("lit", -float(nxt.text), "num")
        if tok.kind == "num":
            return ("lit", float(tok.text), "num")
        if tok.kind == "str":
            return ("lit", tok.text[1:-1].replace("''", "'"), "str")
        if tok.kind == "name":
            word = tok.text.upper()
            if word in ("TIMESTAMP", "DATE"):
                lit = self._peek()
                if lit is None or lit.kind != "str":
                    raise _invalid_query(f"{word} needs a quoted literal")
                self.i += 1
                return ("lit", _timestamp_ms(lit.text[1:-1]), "date")
            if word in _KEYWORDS:
                raise _invalid_query(f"unexpected keyword {tok.text} at position {tok.pos}")
            nxt = self._peek()
            if nxt is not None and nxt.text == "(":
                raise _invalid_query(f"function {tok.text}() is not supported")
            f = self.fields.get(tok.text.lower())
            if f is None:
                raise _invalid_query(f"Invalid field: {tok.text}")
            return ("field", f)
        raise _invalid_query(f"unexpected {tok.text!r} at position {tok.pos}")

    @staticmethod
    def _kind(node: tuple[Any, ...]) -> str:
        return _field_kind(node[1]) if node[0] == "field" else str(node[2])

    def _check(self, left: tuple[Any, ...], right: tuple[Any, ...]) -> None:
        a, b = self._kind(left), self._kind(right)
        if "guid" in (a, b):
            other = right if a == "guid" else left
            if self._kind(other) not in ("guid", "str"):
                raise _invalid_query("a GUID compares with a string")
            if other[0] == "lit" and canonical_guid(other[1]) is None:
                raise _invalid_query(f"Conversion failed when converting {other[1]!r} to uniqueidentifier")
            return
        if a != b:
            raise _invalid_query(f"cannot compare {a} with {b}")


def _timestamp_ms(text: str) -> int:
    m = _TS_RE.match(text.strip())
    if m is None:
        raise _invalid_query(f"invalid date/time literal {text!r}")
    y, mo, d, hh, mi, ss, frac = m.groups()
    try:
        moment = datetime(int(y), int(mo), int(d), int(hh or 0), int(mi or 0), int(ss or 0),
                          int((frac or "0").ljust(6, "0")), tzinfo=UTC)
    except ValueError as exc:
        raise _invalid_query(f"invalid date/time literal {text!r}") from exc
    return (moment - _EPOCH) // timedelta(milliseconds=1)  # exact: no float rounding of milliseconds


def _comparable(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "str":
        return str(value).casefold()  # hosted data uses a case-insensitive collation
    if kind == "guid":
        return canonical_guid(value) or str(value).upper()
    return value


def evaluate(node: tuple[Any, ...], attrs: Mapping[str, Any]) -> bool | None:
    """Three-valued SQL logic: True, False or None (unknown)."""
    tag = node[0]
    if tag == "or":
        a, b = evaluate(node[1], attrs), evaluate(node[2], attrs)
        return True if True in (a, b) else None if None in (a, b) else False
    if tag == "and":
        a, b = evaluate(node[1], attrs), evaluate(node[2], attrs)
        return False if False in (a, b) else None if None in (a, b) else True
    if tag == "not":
        v = evaluate(node[1], attrs)
        return None if v is None else not v
    if tag == "cmp":
        kind = _pair_kind(node[2], node[3])
        left, right = _operand_value(node[2], attrs, kind), _operand_value(node[3], attrs, kind)
        if left is None or right is None:
            return None
        return bool(_COMPARE[node[1]](left, right))
    if tag == "in":
        kind = _pair_kind(node[1], node[2][0])
        value = _operand_value(node[1], attrs, kind)
        if value is None:
            return None
        found = any(value == _operand_value(item, attrs, kind) for item in node[2])
        return not found if node[3] else found
    if tag == "null":
        is_null = _operand_value(node[1], attrs, "num") is None
        return not is_null if node[2] else is_null
    if tag == "like":
        value = _operand_value(node[1], attrs, "str")
        if value is None:
            return None
        matched = node[2].match(value) is not None
        return not matched if node[3] else matched
    if tag == "between":
        kind = _pair_kind(node[1], node[2])
        value = _operand_value(node[1], attrs, kind)
        low, high = _operand_value(node[2], attrs, kind), _operand_value(node[3], attrs, kind)
        if value is None or low is None or high is None:
            return None
        inside: bool = low <= value <= high
        return not inside if node[4] else inside
    raise AssertionError(f"unknown node {tag}")


_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq, "<>": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def _pair_kind(a: tuple[Any, ...], b: tuple[Any, ...]) -> str:
    kinds = {WhereParser._kind(a), WhereParser._kind(b)}
    return "guid" if "guid" in kinds else kinds.pop()


def _operand_value(node: tuple[Any, ...], attrs: Mapping[str, Any], kind: str) -> Any:
    if node[0] == "field":
        value = attrs.get(node[1].name)
        if kind == "str" and value is not None and _field_kind(node[1]) == "guid":
            kind = "guid"
        return _comparable(value, kind)
    return _comparable(node[1], kind)


# ============================================================================================ state


@dataclass
class _Attachment:
    id: int
    global_id: str
    name: str
    content_type: str
    data: bytes
    keywords: str
    gen: int


@dataclass
class _Feature:
    attrs: dict[str, Any]
    geometry: tuple[float, float] | None
    """Stored in Web Mercator (102100), the layer's spatial reference."""
    created_gen: int
    updated_gen: int
    attachments: dict[int, _Attachment] = field(default_factory=dict)


@dataclass
class _Tombstone:
    oid: int
    global_id: str
    attrs: dict[str, Any]
    created_gen: int
    gen: int


@dataclass
class _Change:
    """What one edit operation changed in one layer (drives webhooks)."""

    layer_id: int
    events: set[str]
    gen_before: int
    gen_after: int
    at: int


class _Layer:
    def __init__(self, d: LayerDef, max_record_count: int) -> None:
        self.d = d
        self.max_record_count = max_record_count
        self.fields: list[FieldDef] = [
            FieldDef(d.object_id_field, OID, nullable=False, editable=False),
            *d.fields,
            FieldDef(d.global_id_field, GLOBALID, length=38, nullable=False, editable=False),
            FieldDef("CreationDate", DATE, length=8, editable=False),
            _text("Creator", 128, editable=False),
            FieldDef("EditDate", DATE, length=8, editable=False),
            _text("Editor", 128, editable=False),
        ]
        self.by_lower = {f.name.lower(): f for f in self.fields}
        self.features: dict[int, _Feature] = {}
        self.by_gid: dict[str, int] = {}
        self.tombstones: list[_Tombstone] = []
        self.attachment_tombstones: list[tuple[int, str, int]] = []
        """(attachment id, parent GlobalID, serverGen)."""
        self.next_oid = 1
        self.last_edit = 0

    @property
    def oid_field(self) -> str:
        return self.d.object_id_field

    @property
    def gid_field(self) -> str:
        return self.d.global_id_field

    @property
    def is_table(self) -> bool:
        return self.d.geometry_type is None

    def field(self, name: str) -> FieldDef | None:
        return self.by_lower.get(name.lower())


@dataclass
class _Fault:
    remaining: int
    code: int = 0
    path_contains: str | None = None
    as_http_200: bool = True
    seconds: float = 0.0
    retry_after: float | None = None


class Faults:
    """Fault knobs: failures (HTTP-200 error bodies or real statuses), slow answers, applied-then-504 writes."""

    def __init__(self, sim: ArcGISSimulator) -> None:
        self._sim = sim
        self._lock = threading.Lock()
        self._fail: list[_Fault] = []
        self._timeouts: list[_Fault] = []
        self._ambiguous: list[_Fault] = []

    def fail_next(self, n: int, status_or_error_code: int, path_contains: str | None = None,
                  as_http_200_error: bool = True, retry_after: float | None = None) -> None:
        """Answer the next `n` service requests (whose path contains `path_contains`) with an error.

        `as_http_200_error=True` answers HTTP 200 with `{"error": {"code": <code>, ...}}` (what the service
        usually does); False answers with that HTTP status. Token requests are hit only when named by path.
        """
        with self._lock:
            self._fail.append(_Fault(n, status_or_error_code, path_contains, as_http_200_error,
                                     retry_after=retry_after))

    def timeout_next(self, n: int, seconds: float, path_contains: str | None = None) -> None:
        """Hold the next `n` matching requests for `seconds` before processing them (they still apply)."""
        with self._lock:
            self._timeouts.append(_Fault(n, path_contains=path_contains, seconds=seconds))

    def apply_then_504(self, n: int, path_contains: str | None = None) -> None:
        """Apply the next `n` matching write requests (applyEdits, attachments), then answer 504 Gateway Timeout."""
        with self._lock:
            self._ambiguous.append(_Fault(n, 504, path_contains))

    def expire_tokens(self) -> None:
        """Invalidate every OAuth token issued so far: the next calls get `498 Invalid token` (API keys stay valid)."""
        self._sim._expire_tokens()

    def clear(self) -> None:
        with self._lock:
            self._fail.clear()
            self._timeouts.clear()
            self._ambiguous.clear()

    def _take(self, bucket: list[_Fault], path: str, *, token_endpoint: bool = False) -> _Fault | None:
        with self._lock:
            for fault in bucket:
                wanted = fault.path_contains in path if fault.path_contains is not None else not token_endpoint
                if fault.remaining > 0 and wanted:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        bucket.remove(fault)
                    return fault
        return None


@dataclass
class WebhookRegistration:
    """A feature-service webhook (`{service}/WebHooks/create` or the `register_webhook` helper)."""

    url: str
    name: str
    signature_key: str | None
    change_types: frozenset[str]
    content_type: str
    headers: dict[str, str]
    id: int = 0
    """Admin-API id (`WebHooks/<id>/edit`); assigned when the webhook is stored."""
    global_id: str = ""
    active: bool = True
    """Inactive webhooks are kept (and listed) but deliver nothing."""
    owner: str = ""
    schedule_info: dict[str, Any] | None = None
    payload_format: str = "json"
    created: int = 0
    modified: int = 0
    server_gen: int = 0

    def wants(self, events: Iterable[str]) -> list[str]:
        types = self.change_types
        out = []
        for event in events:
            if "*" in types or "All" in types or event in types or (
                    event in _FEATURE_EVENTS and "FeaturesEdited" in types):
                out.append(event)
        return sorted(out)

    def expanded(self) -> frozenset[str]:
        """The concrete events this webhook fires on (for the overlapping-events check)."""
        if "*" in self.change_types or "All" in self.change_types:
            return frozenset(CHANGE_TYPES - {"*"})
        out = set(self.change_types)
        if "FeaturesEdited" in out:
            out |= _FEATURE_EVENTS
        return frozenset(out)


@dataclass
class WebhookDelivery:
    """One POST the simulator made to a hook URL (delivered or not)."""

    url: str
    kind: str
    """"feature-service" or "survey123"."""
    body: bytes
    headers: dict[str, str]
    status: int | None
    error: str = ""


# ============================================================================================ simulator


class ArcGISSimulator:
    """An in-memory ArcGIS Online org with one hosted feature service, its token endpoint, webhooks and faults.

    Serve `.app` with `sandbox.server.RunningServer(sim.app)`; then `sim.token_url(server.url)` and
    `sim.service_url(server.url)` are the URLs a client needs. What it does beyond the reference
    (marked [I] there, chosen here and kept consistent with the connector):

    - errors are HTTP 200 `{"error": ...}` bodies; a where clause outside the supported grammar, an unknown
      field or a type mismatch answers code 400 "Unable to complete operation.";
    - string comparisons are case-insensitive (hosted data's collation); GUIDs compare case-insensitively;
      a date field compares only with `TIMESTAMP '...'` / `DATE '...'` literals (standardized queries);
    - applyEdits per-feature errors: update of a missing feature 1019 "Object is missing.", delete of a
      missing one 1011, a value of the wrong type or too long 1016, a null in a non-nullable field 1001, an
      add without GlobalID under useGlobalIds 1020, a duplicate GlobalID 1022,
      an unknown field 1000. With rollbackOnFailure=true (the default) any failure rejects the whole call
      with a top-level error and nothing is applied;
    - one applyEdits (or helper edit) is one transaction: one new serverGen, one EditDate for all features;
    - extractChanges: `deleteIds` are object ids; `returnDeletedFeatures=true` adds `deletes` with the
      deleted features' last attributes (GlobalID included); `returnIdsOnly=true` answers
      `objectIds: {adds, updates, deletes}` per layer; `returnAttachments=true` lists attachment changes
      (metadata, not data); `async=true` answers a `statusUrl` job;
    - tokens: client credentials only; editor tracking records the app's username (`app_username`);
    - webhooks (admin API at `admin_path`): `WebHooks` lists a bare array of webhook objects (the ArcGIS
      Online list shape, `signatureKey` echoed as stored), `WebHooks/create` and `WebHooks/<id>/edit`
      answer the webhook object, `WebHooks/<id>/delete` `{"success": true}`. Create refuses (code 400) a
      service without ChangeTracking, a sixth webhook, and a hook URL already receiving overlapping events;
      edit keeps absent parameters. Admin-created and `register_webhook` webhooks share one list, count
      against the same limit and deliver alike; inactive ones deliver nothing. The create-time reachability
      probe of the hook URL is not simulated.
    """

    APP_ITEM_ID = "5f0c6d3e2b8a4e71a9d4c3b2a1f0e9d8"
    """Item id of the registered app in the portal (`appInfo.itemId`)."""

    def __init__(
        self,
        layers: Sequence[LayerDef] | None = None,
        *,
        org_id: str = DEFAULT_ORG_ID,
        service_name: str = DEFAULT_SERVICE_NAME,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        app_username: str = DEFAULT_APP_USERNAME,
        api_key: str | None = DEFAULT_API_KEY,
        api_key_username: str = DEFAULT_API_KEY_USERNAME,
        max_record_count: int = 2000,
        change_tracking: bool = True,
        guid_case: str = "upper",
        token_lifetime_seconds: int = 7200,
        latency_ms: float = 0.0,
        clock: Callable[[], int] | None = None,
        base_url: str | None = None,
    ) -> None:
        if guid_case not in ("upper", "lower", "mixed"):
            raise ValueError("guid_case must be upper, lower or mixed")
        self.org_id = org_id
        self.service_name = service_name
        self.client_id = client_id
        self.client_secret = client_secret
        """Credentials of the default app (client credentials grant); its edits are recorded as `app_username`."""
        self.app_username = app_username
        self.api_key = api_key
        """An API key accepted as a token (None: API keys disabled); its edits are recorded as `api_key_username`."""
        self.service_path = f"/{org_id}/arcgis/rest/services/{service_name}/FeatureServer"
        self.admin_path = f"/{org_id}/arcgis/rest/admin/services/{service_name}/FeatureServer"
        """The service's admin resource (ArcGIS Online's `.../rest/admin/services/<Service>/FeatureServer`)."""
        self.change_tracking = change_tracking
        self.guid_case = guid_case
        """How GUIDs are written in responses (the real service varies); stored values are canonical."""
        self.token_lifetime_seconds = token_lifetime_seconds
        self.latency_ms = latency_ms
        self.clock: Callable[[], int] = clock or (lambda: int(time.time() * 1000))
        """Epoch milliseconds for editor tracking."""
        self.base_url = base_url.rstrip("/") if base_url else None
        """Public base URL used in webhook `changesUrl`s (default: the last request's base URL)."""
        self.faults = Faults(self)
        self.request_count: Counter[str] = Counter()
        """Requests per operation: token, service, layer, query, applyEdits, extractChanges, attachments, ..."""
        self.peak_in_flight: Counter[str] = Counter()
        """Most requests of one operation the simulator was serving at the same time."""
        self.webhook_deliveries: list[WebhookDelivery] = []
        self._in_flight: Counter[str] = Counter()
        self._apps: dict[str, tuple[str, str]] = {client_id: (client_secret, app_username)}
        self._api_keys: dict[str, str] = {api_key: api_key_username} if api_key else {}
        self._tokens: dict[str, tuple[str, float]] = {}
        self._token_apps: dict[str, str] = {}
        """OAuth token -> the client_id it was issued to (the portal's `appInfo`)."""
        self._lock = threading.RLock()
        self._layers: dict[int, _Layer] = {d.id: _Layer(d, max_record_count)
                                           for d in (layers if layers is not None else dot_layers())}
        self._gen = 1000
        self._min_gen = self._gen
        self._attachment_ids = itertools.count(1)
        self._jobs: dict[str, Any] = {}
        self._webhooks: list[WebhookRegistration] = []
        self._webhook_ids = itertools.count(1)
        self._survey_hooks: list[tuple[str, dict[str, str]]] = []
        self._seen_base: str | None = None
        self._deliveries = Deliverer("arcgis-sim-webhooks")
        self.app = Starlette(routes=[Route("/{path:path}", self._entry, methods=["GET", "POST"])])

    # ------------------------------------------------------------------------------------ urls & config

    def token_url(self, base: str) -> str:
        """The OAuth2 token endpoint under `base` (e.g. RunningServer.url)."""
        return base.rstrip("/") + TOKEN_PATH

    def service_url(self, base: str) -> str:
        """The FeatureServer URL under `base`."""
        return base.rstrip("/") + self.service_path

    def add_application(self, client_id: str, client_secret: str, *, username: str) -> None:
        """Register another app (client credentials) whose edits are recorded as `username`."""
        self._apps[client_id] = (client_secret, username)

    def add_api_key(self, key: str, *, username: str) -> None:
        """Accept another API key, whose edits are recorded as `username`."""
        self._api_keys[key] = username

    def set_max_record_count(self, n: int, layer: str | int | None = None) -> None:
        """Change `maxRecordCount` of one layer (or all)."""
        for lyr in self._layers.values() if layer is None else [self._layer(layer)]:
            lyr.max_record_count = n

    @property
    def server_gen(self) -> int:
        """The service's current serverGen."""
        return self._gen

    # ------------------------------------------------------------------------------------ direct helpers

    def field_add(self, layer: str | int, attrs: Mapping[str, Any], geometry: Mapping[str, Any] | None = None,
                  *, user: str = "crew1") -> str:
        """Emulate a field user adding a feature (Field Maps): validated, tracked, webhooks fired. Returns GlobalID."""
        lyr = self._layer(layer)
        result = self._helper_edit(lyr, user, adds=[{"attributes": dict(attrs), "geometry": geometry}])
        return str(result["addResults"][0]["globalId"])

    def field_edit(self, layer: str | int, globalid: str, attrs: Mapping[str, Any], *,
                   geometry: Mapping[str, Any] | None = None, user: str = "crew1") -> None:
        """Emulate a field user editing a feature: bumps serverGen and EditDate, Editor = `user`, fires webhooks."""
        lyr = self._layer(layer)
        update: dict[str, Any] = {"attributes": {**attrs, lyr.gid_field: globalid}}
        if geometry is not None:
            update["geometry"] = geometry
        self._helper_edit(lyr, user, updates=[update])

    def field_delete(self, layer: str | int, globalid: str, *, user: str = "crew1") -> None:
        """Emulate a field user deleting a feature."""
        self._helper_edit(self._layer(layer), user, deletes=[globalid])

    def field_attach(self, layer: str | int, globalid: str, name: str, content_type: str, data: bytes, *,
                     user: str = "crew1") -> int:
        """Emulate a field user adding a photo to a feature; returns the attachment id."""
        lyr = self._layer(layer)
        changes: list[_Change] = []
        with self._lock:
            oid = lyr.by_gid.get(canonical_guid(globalid) or "")
            if oid is None:
                raise KeyError(f"{lyr.d.name}: no feature {globalid}")
            att = self._add_attachment(lyr, oid, name, content_type, data, "", changes)
        self._emit(changes)
        return att.id

    def all(self, layer: str | int) -> list[dict[str, Any]]:
        """Copies of every feature's attributes (canonical values), geometry under "@geometry" (102100)."""
        lyr = self._layer(layer)
        with self._lock:
            return [self._plain(lyr, f) for f in lyr.features.values()]

    def get(self, layer: str | int, globalid: str) -> dict[str, Any] | None:
        """One feature like `all`, or None."""
        lyr = self._layer(layer)
        with self._lock:
            oid = lyr.by_gid.get(canonical_guid(globalid) or "")
            return self._plain(lyr, lyr.features[oid]) if oid is not None else None

    def attachments(self, layer: str | int, globalid: str) -> list[dict[str, Any]]:
        """A feature's attachments: id, name, contentType, size, data."""
        lyr = self._layer(layer)
        with self._lock:
            oid = lyr.by_gid.get(canonical_guid(globalid) or "")
            if oid is None:
                return []
            return [{"id": a.id, "name": a.name, "contentType": a.content_type, "size": len(a.data), "data": a.data}
                    for a in lyr.features[oid].attachments.values()]

    def _plain(self, lyr: _Layer, f: _Feature) -> dict[str, Any]:
        out = dict(f.attrs)
        if not lyr.is_table:
            out[GEOMETRY_KEY] = None if f.geometry is None else \
                {"x": f.geometry[0], "y": f.geometry[1], "spatialReference": dict(WEB_MERCATOR)}
        return out

    def _helper_edit(self, lyr: _Layer, user: str, *, adds: list[Any] | None = None,
                     updates: list[Any] | None = None, deletes: list[Any] | None = None) -> dict[str, Any]:
        changes: list[_Change] = []
        try:
            with self._lock:
                result = self._edit(lyr, adds or [], updates or [], deletes or [], use_gids=bool(updates or deletes),
                                    rollback=True, in_sr=None, user=user, changes=changes)
        except RestError as err:
            raise ValueError(f"{lyr.d.name}: edit rejected: {'; '.join(err.details) or err.message}") from err
        self._emit(changes)
        return result

    # ------------------------------------------------------------------------------------ webhooks

    def register_webhook(self, url: str, *, signature_key: str | None = None,
                         change_types: Sequence[str] = ("*",), name: str = "syncline",
                         content_type: str = "application/json",
                         headers: Mapping[str, str] | None = None) -> WebhookRegistration:
        """Create a feature-service webhook: every edit batch POSTs the payload array to `url`.

        `content_type` "application/json" or "application/x-www-form-urlencoded" (`payload=[...]`). With a
        `signature_key`, the body's HMAC-SHA256 hex goes in `x-esriHook-Signature`. `headers` are extra
        headers for the sandbox's own plumbing (e.g. a function key); the real service sends none.
        """
        unknown = set(change_types) - CHANGE_TYPES
        if unknown:
            raise ValueError(f"unknown changeTypes {sorted(unknown)}")
        if content_type not in ("application/json", "application/x-www-form-urlencoded"):
            raise ValueError("contentType must be application/json or application/x-www-form-urlencoded")
        if len(self._webhooks) >= MAX_WEBHOOKS:
            raise ValueError(f"a feature service has at most {MAX_WEBHOOKS} webhooks")
        reg = WebhookRegistration(url, name, signature_key, frozenset(change_types), content_type,
                                  dict(headers or {}), owner=self.app_username)
        with self._lock:
            self._store_webhook(reg)
        return reg

    def webhooks(self) -> list[WebhookRegistration]:
        """The registered webhooks (helper and admin API alike), oldest first."""
        with self._lock:
            return list(self._webhooks)

    def _store_webhook(self, reg: WebhookRegistration) -> None:
        now = self.clock()
        reg.id = next(self._webhook_ids)
        reg.global_id = str(uuid.uuid4())
        reg.created = reg.modified = now
        reg.server_gen = self._gen
        self._webhooks.append(reg)

    async def flush_webhooks(self, timeout: float = 10.0) -> None:
        """Wait until every queued webhook delivery has finished (delivered or failed)."""
        await self._deliveries.flush(timeout)

    def close(self) -> None:
        """Stop the webhook delivery thread."""
        self._deliveries.close()

    def survey123_submit(
        self,
        attributes: Mapping[str, Any],
        attachments: Sequence[tuple[str, str, bytes]] = (),
        *,
        hook_url: str | None = None,
        geometry: Mapping[str, Any] | None = None,
        globalid: str | None = None,
        user: str = "surveyor1",
        layer: str | int = "Inspections",
        question: str = "photo",
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Emulate a Survey123 submission: write the feature (and photos), then POST the Survey123 webhook body.

        `attachments` are (name, content type, bytes). With `globalid` the submission edits that record
        (`eventType` editData), else it adds one (addData). The body goes to `hook_url`, or else to every
        URL given to `register_survey123_webhook` (none: only the feature-service webhooks fire). Returns
        the record's GlobalID.
        """
        lyr = self._layer(layer)
        changes: list[_Change] = []
        gid = canonical_guid(globalid) if globalid else "{" + str(uuid.uuid4()).upper() + "}"
        if gid is None:
            raise ValueError(f"{globalid!r} is not a GlobalID")
        feature: dict[str, Any] = {"attributes": {**attributes, lyr.gid_field: gid}}
        if geometry is not None:
            feature["geometry"] = dict(geometry)
        try:
            with self._lock:
                if globalid:
                    result = self._edit(lyr, [], [feature], [], use_gids=True, rollback=True, in_sr=None,
                                        user=user, changes=changes)
                    outcome = result["updateResults"][0]
                else:
                    result = self._edit(lyr, [feature], [], [], use_gids=True, rollback=True, in_sr=None,
                                        user=user, changes=changes)
                    outcome = result["addResults"][0]
                oid = int(outcome["objectId"])
                infos = []
                for name, content_type, data in attachments:
                    att = self._add_attachment(lyr, oid, name, content_type, data, question, changes)
                    infos.append({"id": att.id, "globalId": self._guid_out(att.global_id), "name": att.name,
                                  "contentType": att.content_type, "size": len(att.data), "keywords": question,
                                  "url": f"{self._public_base()}{self.service_path}/{lyr.d.id}/{oid}/attachments/"
                                         f"{att.id}", "parentGlobalId": self._guid_out(gid)})
        except RestError as err:
            raise ValueError(f"{lyr.d.name}: submission rejected: {'; '.join(err.details)}") from err
        self._emit(changes)
        gid_out = self._guid_out(gid)
        edit_key = "updates" if globalid else "adds"
        result_key = "updateResults" if globalid else "addResults"
        body = {
            "applyEdits": [{"id": lyr.d.id, edit_key: [feature]}],
            "response": [{"id": lyr.d.id, result_key: [{"objectId": oid, "uniqueId": oid, "globalId": gid_out,
                                                          "success": True}]}],
            "feature": {
                "attributes": {**attributes, lyr.gid_field: gid_out, lyr.oid_field: oid},
                "geometry": feature.get("geometry"),
                "layerInfo": {"id": lyr.d.id, "name": lyr.d.name, "type": "Table" if lyr.is_table else
                              "Feature Layer", "globalIdField": lyr.gid_field, "objectIdField": lyr.oid_field,
                              "relationships": []},
                "result": {"globalId": gid_out, "objectId": oid, "uniqueId": oid, "success": True},
                "attachments": {question: infos} if infos else None,
            },
            "eventType": "editData" if globalid else "addData",
            "portalInfo": {"url": "https://www.arcgis.com", "token": "<redacted>"},
            "userInfo": {"username": user, "firstName": user, "lastName": "", "fullName": user,
                         "email": f"{user}@example.org"},
            "surveyInfo": {"formItemId": "9300861aa41049b9bf28897ba2f48796", "formTitle": "DOT sign inspection",
                           "serviceItemId": "e2550f19c1c34f5d988080b214c47c02",
                           "serviceUrl": f"{self._public_base()}{self.service_path}"},
        }
        targets = [(hook_url, dict(headers or {}))] if hook_url else \
            [(url, {**extra, **(headers or {})}) for url, extra in self._survey_hooks]
        for url, extra in targets:
            self._send(url, "survey123", json.dumps(body).encode(), {"Content-Type": "application/json", **extra})
        return gid_out

    def register_survey123_webhook(self, url: str, *, headers: Mapping[str, str] | None = None) -> None:
        """Configure a Survey123 form webhook: `survey123_submit` without `hook_url` POSTs its body here."""
        self._survey_hooks.append((url, dict(headers or {})))

    def _public_base(self) -> str:
        return self.base_url or self._seen_base or "https://services.arcgis.com"

    def _emit(self, changes: Iterable[_Change]) -> None:
        changes = list(changes)
        if not changes or not self._webhooks:
            return
        for reg in list(self._webhooks):
            if not reg.active:
                continue
            entries = []
            for change in changes:
                events = reg.wants(change.events)
                if not events:
                    continue
                flags = {
                    "returnInserts": "FeaturesCreated" in change.events,
                    "returnUpdates": "FeaturesUpdated" in change.events,
                    "returnDeletes": "FeaturesDeleted" in change.events,
                    "returnAttachments": any(e.startswith("Attachments") for e in change.events),
                }
                query = "&".join(f"{k}={'true' if v else 'false'}" for k, v in flags.items())
                entries.append({
                    "name": reg.name, "layerId": change.layer_id, "orgId": self.org_id,
                    "serviceName": self.service_name, "lastUpdatedTime": change.at,
                    "changesUrl": f"{self._public_base()}{self.service_path}/extractChanges?serverGens="
                                  f"[{change.gen_before},{change.gen_after}]&async=true&{query}",
                    "events": events,
                })
            if not entries:
                continue
            payload = json.dumps(entries)
            if reg.content_type == "application/json":
                body = payload.encode()
            else:
                body = urlencode({"payload": payload}).encode()
            headers = {"Content-Type": reg.content_type, **reg.headers}
            if reg.signature_key:
                headers["x-esriHook-Signature"] = hmac.new(reg.signature_key.encode(), body,
                                                           hashlib.sha256).hexdigest()
            self._send(reg.url, "feature-service", body, headers)

    def _send(self, url: str, kind: str, body: bytes, headers: dict[str, str]) -> None:
        self._deliveries.submit(lambda client: self._deliver(client, url, kind, body, headers))

    async def _deliver(self, client: httpx.AsyncClient, url: str, kind: str, body: bytes,
                       headers: dict[str, str]) -> None:
        try:
            resp = await client.post(url, content=body, headers=headers)
            record = WebhookDelivery(url, kind, body, headers, resp.status_code,
                                     "" if resp.is_success else resp.text[:500])
        except httpx.HTTPError as exc:
            record = WebhookDelivery(url, kind, body, headers, None, f"{type(exc).__name__}: {exc}")
        self.webhook_deliveries.append(record)

    # ------------------------------------------------------------------------------------ auth

    def _expire_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()
            self._token_apps.clear()

    def _authenticate(self, params: Mapping[str, str], headers: Mapping[str, str]) -> str:
        token = _request_token(params, headers)
        if not token:
            raise RestError(499, "Token Required", ["Token Required"], message_code="GWM_0003")
        with self._lock:
            entry = self._tokens.get(token)
        if entry is not None and entry[1] > time.monotonic():
            return entry[0]
        if token in self._api_keys:
            return self._api_keys[token]
        raise RestError(498, "Invalid token.", [])

    def _token(self, params: Mapping[str, str]) -> dict[str, Any]:
        def fail(error: str, description: str) -> dict[str, Any]:
            return {"error": {"code": 400, "error": error, "error_description": description,
                              "message": description, "details": []}}

        if params.get("grant_type") != "client_credentials":
            return fail("unsupported_grant_type", "Unsupported grant type")
        client_id = params.get("client_id", "")
        app = self._apps.get(client_id)
        if app is None:
            return fail("invalid_request", "Invalid client_id")
        if not hmac.compare_digest(app[0], params.get("client_secret", "")):
            return fail("invalid_request", "Invalid client_secret")
        lifetime = self.token_lifetime_seconds
        raw = params.get("expiration", "")
        if raw.isdigit():
            lifetime = min(int(raw) * 60, 14 * 24 * 3600)
        token = secrets.token_urlsafe(48)
        with self._lock:
            self._tokens[token] = (app[1], time.monotonic() + lifetime)
            self._token_apps[token] = client_id
        return {"access_token": token, "expires_in": lifetime}

    # ------------------------------------------------------------------------------------ portal (sharing API)

    def _portal_endpoint(self, request: Request, path: str, params: Mapping[str, str]) -> Response:
        """The few portal resources a portal-first client (the `arcgis` package) reads before it opens a layer."""
        resource = "/".join(p for p in path[len(SHARING_PATH):].split("/") if p).lower()
        self.request_count["portal." + (resource or "root")] += 1
        if params.get("f", "html").lower() not in ("json", "pjson"):
            return Response("<html><body>ArcGIS Portal Directory (use f=json)</body></html>", media_type="text/html")
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            if resource == "":
                return JSONResponse({"currentVersion": PORTAL_VERSION})
            if resource == "info":
                return JSONResponse(self._portal_info())
            if resource == "portals/self":
                return JSONResponse(self._portal_self(self._portal_caller(params, headers)))
        except RestError as err:
            return JSONResponse(err.body())
        return JSONResponse(RestError(400, "Invalid URL", ["Invalid URL"]).body())

    def _portal_caller(self, params: Mapping[str, str], headers: Mapping[str, str]) -> tuple[str, str, str] | None:
        """(kind "app" | "apikey", client id or key, username) of the request's token; None when anonymous."""
        token = _request_token(params, headers)
        if not token:
            return None
        user = self._authenticate({"token": token}, {})
        with self._lock:
            client_id = self._token_apps.get(token)
        return ("app", client_id, user) if client_id is not None else ("apikey", token, user)

    def _portal_info(self) -> dict[str, Any]:
        # ArcGIS Online's `/sharing/rest/info` (the portal "Info" resource): token-based security, generateToken.
        base = self._public_base()
        return {"owningSystemUrl": base,
                "authInfo": {"tokenServicesUrl": f"{base}{SHARING_PATH}/generateToken", "isTokenBasedSecurity": True}}

    def _portal_self(self, caller: tuple[str, str, str] | None) -> dict[str, Any]:
        """`portals/self`: the organisation as the caller sees it; an app token adds `appInfo`, no `user`."""
        host = self._public_base().split("://", 1)[-1]
        out: dict[str, Any] = {
            "access": "private", "allSSL": True, "canSearchPublic": True, "canSharePublic": True,
            "created": 1392336986000, "culture": "en", "currentVersion": PORTAL_VERSION,
            "customBaseUrl": host, "id": self.org_id, "isPortal": False, "name": "Syncline DOT (simulated)",
            "portalHostname": host, "portalMode": "multitenant", "portalName": "ArcGIS Online",
            "region": "WO", "supportsHostedServices": True, "supportsOAuth": True, "units": "english",
            "urlKey": "syncline-dot", "useStandardizedQuery": True, "httpPort": 80, "httpsPort": 443,
            "maxTokenExpirationMinutes": -1, "helperServices": {}, "portalProperties": {},
        }
        if caller is None:
            return {key: out[key] for key in ("access", "allSSL", "currentVersion", "isPortal", "portalHostname",
                                              "portalMode", "portalName", "supportsOAuth", "culture", "region",
                                              "helperServices", "httpPort", "httpsPort")}
        kind, ident, user = caller
        out["appInfo"] = {"appId": ident if kind == "app" else "", "itemId": self.APP_ITEM_ID,
                          "appOwner": user, "orgId": self.org_id, "appTitle": "Syncline",
                          "privileges": list(APP_PRIVILEGES)}
        return out

    # ------------------------------------------------------------------------------------ http

    async def _entry(self, request: Request) -> Response:
        path = request.url.path
        params: dict[str, str] = dict(request.query_params)
        files: dict[str, tuple[str, str, bytes]] = {}
        if request.method == "POST":
            ctype = request.headers.get("content-type", "")
            if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
                async with request.form(max_part_size=16 * 1024 * 1024) as form:
                    for key, value in form.multi_items():
                        if isinstance(value, UploadFile):
                            files[key] = (value.filename or "attachment", value.content_type or
                                          "application/octet-stream", await value.read())
                        else:
                            params[key] = value
        self._seen_base = str(request.base_url).rstrip("/")
        if path == TOKEN_PATH:
            return await self._token_endpoint(request.method, path, params)
        if path.lower().startswith(SHARING_PATH + "/") or path.lower() == SHARING_PATH:
            return self._portal_endpoint(request, path, params)
        admin = path.lower().startswith(self.admin_path.lower())
        if not admin and not path.lower().startswith(self.service_path.lower()):
            return JSONResponse(RestError(400, "Invalid URL", ["Invalid URL"]).body())
        rest = [p for p in path[len(self.admin_path if admin else self.service_path):].split("/") if p]
        op = self._admin_op_name(rest) if admin else self._op_name(rest)
        self.request_count[op] += 1
        self._in_flight[op] += 1
        self.peak_in_flight[op] = max(self.peak_in_flight[op], self._in_flight[op])
        try:
            return await self._serve(request, path, rest, op, params, files)
        finally:
            self._in_flight[op] -= 1

    async def _serve(self, request: Request, path: str, rest: list[str], op: str, params: dict[str, str],
                     files: dict[str, tuple[str, str, bytes]]) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        slow = self.faults._take(self.faults._timeouts, path)
        if slow is not None:
            await asyncio.sleep(slow.seconds)
        fault = self.faults._take(self.faults._fail, path)
        if fault is not None:
            return self._fault_response(fault)
        download = len(rest) == 4 and rest[2] == "attachments"
        if not download and params.get("f", "html").lower() not in ("json", "pjson"):
            return Response("<html><body>ArcGIS REST Services Directory (use f=json)</body></html>",
                            media_type="text/html")
        changes: list[_Change] = []
        try:
            user = self._authenticate(params, headers)
            with self._lock:
                if op.startswith("admin."):
                    result = self._dispatch_admin(request.method, rest, params, user)
                else:
                    result = self._dispatch(request.method, rest, params, files, user, changes)
        except RestError as err:
            return JSONResponse(err.body())
        self._emit(changes)
        if request.method == "POST" and op in ("applyEdits", "addAttachment", "deleteAttachments"):
            ambiguous = self.faults._take(self.faults._ambiguous, path)
            if ambiguous is not None:
                return Response("<html><body><h1>504 Gateway Time-out</h1></body></html>", status_code=504,
                                media_type="text/html")
        if isinstance(result, Response):
            return result
        return JSONResponse(result)

    async def _token_endpoint(self, method: str, path: str, params: Mapping[str, str]) -> Response:
        self.request_count["token"] += 1
        fault = self.faults._take(self.faults._fail, path, token_endpoint=True)
        if fault is not None:
            return self._fault_response(fault)
        if method != "POST":
            return JSONResponse(RestError(405, "Method not supported.", []).body())
        return JSONResponse(self._token(params))

    @staticmethod
    def _admin_op_name(rest: Sequence[str]) -> str:
        if not rest:
            return "admin.service"
        return "admin." + (rest[-1] if not rest[-1].isdigit() else "webhook")

    @staticmethod
    def _op_name(rest: Sequence[str]) -> str:
        if not rest:
            return "service"
        if not rest[0].isdigit():
            return rest[0]
        if len(rest) == 1:
            return "layer"
        if len(rest) == 2:
            return rest[1] if not rest[1].isdigit() else "feature"
        if len(rest) == 3:
            return rest[2]
        return "attachment"

    def _fault_response(self, fault: _Fault) -> Response:
        body = RestError(fault.code, None, [_MESSAGES.get(fault.code, "Simulated failure.")]).body()
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
        return JSONResponse(body, status_code=200 if fault.as_http_200 else fault.code, headers=headers)

    def _dispatch(self, method: str, rest: list[str], params: dict[str, str],
                  files: dict[str, tuple[str, str, bytes]], user: str, changes: list[_Change]) -> Any:
        if not rest:
            return self._service_json()
        head = rest[0]
        if head == "extractChanges":
            if method != "POST":
                raise RestError(400, "Unable to complete operation.", ["This operation is only supported via POST."])
            return self._extract_changes(params)
        if head == "jobs" and len(rest) in (2, 3):
            return self._job(rest[1], result=len(rest) == 3)
        if not head.isdigit() or int(head) not in self._layers:
            raise RestError(400, "Invalid URL", ["Invalid URL"])
        lyr = self._layers[int(head)]
        tail = rest[1:]
        if not tail:
            return self._layer_json(lyr)
        if tail == ["query"]:
            return self._query(lyr, params)
        if tail == ["applyEdits"]:
            if method != "POST":
                raise RestError(400, "Unable to complete operation.", ["This operation is only supported via POST."])
            return self._apply_edits(lyr, params, user, changes)
        if tail == ["queryAttachments"]:
            return self._query_attachments(lyr, params)
        if not tail[0].isdigit():
            raise RestError(400, "Invalid URL", ["Invalid URL"])
        oid = int(tail[0])
        feat = lyr.features.get(oid)
        if feat is None:
            raise RestError(404, "Unable to complete operation.", [f"Feature {oid} not found."])
        if len(tail) == 1:
            return {"feature": self._render(lyr, feat, lyr.fields, True, 102100)}
        if tail[1:] == ["attachments"]:
            self._require_attachments(lyr)
            return {"attachmentInfos": [self._attachment_info(lyr, feat, a) for a in feat.attachments.values()]}
        if tail[1:] == ["addAttachment"] and method == "POST":
            self._require_attachments(lyr)
            upload = files.get("attachment")
            if upload is None:
                return {"addAttachmentResult": {"success": False,
                                                "error": {"code": 1008, "description": "Attachment add failed."}}}
            att = self._add_attachment(lyr, oid, upload[0], upload[1], upload[2], params.get("keywords", ""),
                                       changes, user=user)
            return {"addAttachmentResult": {"objectId": att.id, "globalId": self._guid_out(att.global_id),
                                            "success": True}}
        if tail[1:] == ["deleteAttachments"] and method == "POST":
            self._require_attachments(lyr)
            return {"deleteAttachmentResults": self._delete_attachments(lyr, oid, params.get("attachmentIds", ""),
                                                                        changes)}
        if len(tail) == 3 and tail[1] == "attachments" and tail[2].isdigit():
            found = feat.attachments.get(int(tail[2]))
            if found is None:
                raise RestError(404, "Unable to complete operation.", [f"Attachment {tail[2]} not found."])
            return Response(found.data, media_type=found.content_type,
                            headers={"Content-Disposition": f'inline; filename="{found.name}"'})
        raise RestError(400, "Invalid URL", ["Invalid URL"])

    # ------------------------------------------------------------------------------------ admin: webhooks

    def _dispatch_admin(self, method: str, rest: list[str], params: Mapping[str, str], user: str) -> Any:
        """`{admin}/WebHooks`, `WebHooks/create`, `WebHooks/<id>`, `WebHooks/<id>/edit`, `WebHooks/<id>/delete`."""
        if not rest or rest[0].lower() != "webhooks":
            raise RestError(400, "Invalid URL", ["Invalid URL"])
        tail = rest[1:]
        if not tail:
            return [self._webhook_json(reg) for reg in self._webhooks]
        if method != "POST" and tail[-1] in ("create", "edit", "delete"):
            raise RestError(400, "Unable to complete operation.", ["This operation is only supported via POST."])
        if tail == ["create"]:
            return self._create_webhook(params, user)
        reg = next((r for r in self._webhooks if tail[0].isdigit() and r.id == int(tail[0])), None)
        if reg is None:
            raise RestError(404, "Webhook not found.", [f"Webhook '{tail[0]}' does not exist."])
        if len(tail) == 1:
            return self._webhook_json(reg)
        if tail[1:] == ["edit"]:
            return self._edit_webhook(reg, params)
        if tail[1:] == ["delete"]:
            self._webhooks.remove(reg)
            return {"success": True}
        raise RestError(400, "Invalid URL", ["Invalid URL"])

    def _webhook_json(self, reg: WebhookRegistration) -> dict[str, Any]:
        # The list shape of the ArcGIS Online "Web Hooks (Feature Service)" resource.
        return {
            "name": reg.name, "owner": reg.owner, "id": reg.id, "globalId": reg.global_id,
            "tenantId": self.org_id, "serviceId": 560100, "active": reg.active, "hookUrl": reg.url,
            "serviceUrl": f"{self._public_base()}{self.service_path}", "signatureKey": reg.signature_key or "",
            "format": reg.payload_format, "contentType": reg.content_type, "serverGen": reg.server_gen,
            "createdTime": reg.created, "lastUpdatedTime": reg.modified,
            "changeTypes": sorted(reg.change_types), "scheduleInfo": reg.schedule_info or {},
        }

    def _webhook_settings(self, p: Mapping[str, str], current: WebhookRegistration | None) -> dict[str, Any]:
        """Validated create/edit parameters; on edit an absent parameter keeps its current value."""
        def given(name: str) -> bool:
            return name in p and p[name] != ""

        name = p["name"].strip() if given("name") else (current.name if current else "")
        if not name:
            raise _bad_request("'name' is required.")
        url = p["hookUrl"].strip() if given("hookUrl") else (current.url if current else "")
        if not url.lower().startswith(("https://", "http://")):
            raise _bad_request("'hookUrl' must be an http(s) URL.")
        if given("changeTypes"):
            raw = p["changeTypes"].strip()
            try:
                parsed = strict_loads(raw) if raw.startswith("[") else [t.strip() for t in raw.split(",")]
            except ValueError as exc:
                raise _bad_request("'changeTypes' must be a JSON array or a comma-separated list.") from exc
            types = frozenset(str(t) for t in parsed if str(t))
        else:
            types = current.change_types if current else frozenset({"*"})
        unknown = sorted(types - CHANGE_TYPES - {"All"})
        if not types or unknown:
            raise _bad_request(f"Invalid changeTypes {unknown or '[]'}.")
        content_type = p["contentType"] if given("contentType") else (
            current.content_type if current else "application/json")
        if content_type not in ("application/json", "application/x-www-form-urlencoded"):
            raise _bad_request("'contentType' must be application/json or application/x-www-form-urlencoded.")
        active = _bool(p, "active", current.active if current else False)
        key = p.get("signatureKey", current.signature_key if current else None)
        schedule: dict[str, Any] | None = current.schedule_info if current else None
        if given("scheduleInfo"):
            try:
                schedule = strict_loads(p["scheduleInfo"])
            except ValueError as exc:
                raise _bad_request("'scheduleInfo' must be a JSON object.") from exc
        for other in self._webhooks:
            if other is not current and other.url == url and other.expanded() & WebhookRegistration(
                    url, name, None, types, content_type, {}).expanded():
                raise _bad_request(f"The webhook '{other.name}' already sends overlapping events to this hookUrl.")
        return {"name": name, "url": url, "change_types": types, "content_type": content_type, "active": active,
                "signature_key": key or None, "schedule_info": schedule,
                "payload_format": p.get("payloadFormat") or (current.payload_format if current else "json")}

    def _create_webhook(self, p: Mapping[str, str], user: str) -> dict[str, Any]:
        # Webhooks need change tracking (they report serverGens) and a service that can be edited.
        if not self.change_tracking:
            raise RestError(400, "Unable to create webhook.", [
                "Webhooks require the Editing and ChangeTracking capabilities on the feature service."])
        if len(self._webhooks) >= MAX_WEBHOOKS:
            raise RestError(400, "Unable to create webhook.", [
                f"A maximum of {MAX_WEBHOOKS} webhooks can be created for a feature service."])
        settings = self._webhook_settings(p, None)
        reg = WebhookRegistration(settings["url"], settings["name"], settings["signature_key"],
                                  settings["change_types"], settings["content_type"], {}, owner=user,
                                  active=settings["active"], schedule_info=settings["schedule_info"],
                                  payload_format=settings["payload_format"])
        self._store_webhook(reg)
        return self._webhook_json(reg)

    def _edit_webhook(self, reg: WebhookRegistration, p: Mapping[str, str]) -> dict[str, Any]:
        settings = self._webhook_settings(p, reg)
        reg.name, reg.url, reg.change_types = settings["name"], settings["url"], settings["change_types"]
        reg.content_type, reg.active, reg.signature_key = (settings["content_type"], settings["active"],
                                                           settings["signature_key"])
        reg.schedule_info, reg.payload_format = settings["schedule_info"], settings["payload_format"]
        reg.modified = self.clock()
        return self._webhook_json(reg)

    # ------------------------------------------------------------------------------------ resources

    def _service_json(self) -> dict[str, Any]:
        layers = [lyr for lyr in self._layers.values() if not lyr.is_table]
        tables = [lyr for lyr in self._layers.values() if lyr.is_table]
        caps = "Create,Delete,Query,Update,Editing" + (",ChangeTracking" if self.change_tracking else "")
        out: dict[str, Any] = {
            "currentVersion": 11.3,
            "serviceItemId": "e2550f19c1c34f5d988080b214c47c02",
            "serviceDescription": "DOT directional signing program",
            "hasVersionedData": False,
            "supportsDisconnectedEditing": False,
            "hasStaticData": False,
            "maxRecordCount": max((lyr.max_record_count for lyr in self._layers.values()), default=2000),
            "supportedQueryFormats": "JSON",
            "capabilities": caps,
            "spatialReference": dict(WEB_MERCATOR),
            "allowGeometryUpdates": True,
            "units": "esriMeters",
            "syncEnabled": False,
            "supportsApplyEditsWithGlobalIds": True,
            "editorTrackingInfo": {"enableEditorTracking": True, "enableOwnershipAccessControl": False,
                                   "allowOthersToQuery": True, "allowOthersToUpdate": True,
                                   "allowOthersToDelete": True},
            "layers": [{"id": lyr.d.id, "name": lyr.d.name, "parentLayerId": -1, "defaultVisibility": True,
                        "subLayerIds": None, "minScale": 0, "maxScale": 0, "geometryType": lyr.d.geometry_type}
                       for lyr in layers],
            "tables": [{"id": lyr.d.id, "name": lyr.d.name} for lyr in tables],
        }
        if self.change_tracking:
            out["changeTrackingInfo"] = {
                "lastSyncDate": max((lyr.last_edit for lyr in self._layers.values()), default=0),
                "layerServerGens": [{"id": i, "minServerGen": self._min_gen, "serverGen": self._gen}
                                    for i in self._layers],
            }
            out["extractChangesCapabilities"] = {
                "supportsReturnIdsOnly": True, "supportsReturnExtentOnly": False,
                "supportsReturnAttachments": True, "supportsLayerQueries": False, "supportsGeometry": False,
                "supportsFeatureReturn": True, "supportsReturnHasGeometryUpdates": False,
                "supportsFieldsToCompare": False, "supportsServerGens": True,
                "supportsReturnDeletedFeatures": True,
            }
        return out

    def _layer_json(self, lyr: _Layer) -> dict[str, Any]:
        caps = "Create,Delete,Query,Update,Editing" + (",ChangeTracking" if self.change_tracking else "")
        out: dict[str, Any] = {
            "currentVersion": 11.3,
            "id": lyr.d.id,
            "name": lyr.d.name,
            "type": "Table" if lyr.is_table else "Feature Layer",
            "geometryType": lyr.d.geometry_type,
            "objectIdField": lyr.oid_field,
            "uniqueIdField": {"name": lyr.oid_field, "isSystemMaintained": True},
            "globalIdField": lyr.gid_field,
            "fields": [f.to_json() for f in lyr.fields],
            "maxRecordCount": lyr.max_record_count,
            "standardMaxRecordCount": lyr.max_record_count,
            "capabilities": caps,
            "editFieldsInfo": dict(EDIT_FIELDS),
            "editingInfo": {"lastEditDate": lyr.last_edit},
            "hasAttachments": lyr.d.has_attachments,
            "supportsApplyEditsWithGlobalIds": True,
            "supportedQueryFormats": "JSON",
            "advancedQueryCapabilities": {"supportsPagination": True, "supportsOrderBy": True,
                                          "supportsQueryWithResultType": False, "supportsReturningQueryExtent": False,
                                          "supportsQueryAttachments": lyr.d.has_attachments},
            "relationships": [],
        }
        if not lyr.is_table:
            out["extent"] = {"xmin": -20037508.34, "ymin": -20037508.34, "xmax": 20037508.34, "ymax": 20037508.34,
                             "spatialReference": dict(WEB_MERCATOR)}
        return out

    # ------------------------------------------------------------------------------------ query

    def _query(self, lyr: _Layer, p: Mapping[str, str]) -> dict[str, Any]:
        where = p.get("where", "").strip()
        ids = _int_list(p.get("objectIds", ""), "objectIds")
        if not where and ids is None:
            raise RestError(400, "Unable to complete operation.", ["Invalid or missing input parameters."])
        tree = WhereParser(where, lyr.by_lower).parse() if where else None
        rows = [f for oid, f in lyr.features.items()
                if (ids is None or oid in ids) and (tree is None or evaluate(tree, f.attrs) is True)]
        rows.sort(key=lambda f: f.attrs[lyr.oid_field])
        for name, desc in reversed(_order_by(p.get("orderByFields", ""), lyr)):
            rows.sort(key=_sort_key(name, _field_kind(lyr.by_lower[name.lower()])), reverse=desc)
        if _bool(p, "returnCountOnly"):
            return {"count": len(rows)}
        if _bool(p, "returnIdsOnly"):
            return {"objectIdFieldName": lyr.oid_field, "objectIds": [f.attrs[lyr.oid_field] for f in rows]}
        out_fields = _out_fields(p.get("outFields", ""), lyr)
        offset = _nonneg(p, "resultOffset", 0)
        count = min(_nonneg(p, "resultRecordCount", lyr.max_record_count) or lyr.max_record_count,
                    lyr.max_record_count)
        page = rows[offset:offset + count]
        out_wkid = _out_wkid(p)
        result: dict[str, Any] = {"objectIdFieldName": lyr.oid_field,
                                  "uniqueIdField": {"name": lyr.oid_field, "isSystemMaintained": True},
                                  "globalIdFieldName": lyr.gid_field}
        if not lyr.is_table:
            result["geometryType"] = lyr.d.geometry_type
            result["spatialReference"] = _sr_json(out_wkid)
        result["fields"] = [f.to_json() for f in out_fields]
        result["features"] = [self._render(lyr, f, out_fields, _bool(p, "returnGeometry", True), out_wkid)
                              for f in page]
        if offset + count < len(rows):
            result["exceededTransferLimit"] = True
        return result

    def _render(self, lyr: _Layer, feat: _Feature, out_fields: Sequence[FieldDef], geometry: bool,
                out_wkid: int) -> dict[str, Any]:
        attrs = {f.name: self._value_out(f, feat.attrs.get(f.name)) for f in out_fields}
        out: dict[str, Any] = {"attributes": attrs}
        if geometry and not lyr.is_table and feat.geometry is not None:
            x, y = feat.geometry
            if out_wkid == 4326:
                x, y = mercator_to_lonlat(x, y)
            out["geometry"] = {"x": x, "y": y}
        return out

    def _value_out(self, f: FieldDef, value: Any) -> Any:
        if f.type in (GUID, GLOBALID) and isinstance(value, str):
            return self._guid_out(value)
        return value

    def _guid_out(self, value: str) -> str:
        if self.guid_case == "lower":
            return value.lower()
        if self.guid_case == "mixed":  # like `{93BADD75-B2B7-497a-99F0-6E89B09C9C8E}` in Esri's own samples
            parts = value.strip("{}").split("-")
            parts[2] = parts[2].lower()
            return "{" + "-".join(parts) + "}"
        return value

    # ------------------------------------------------------------------------------------ edits

    def _apply_edits(self, lyr: _Layer, p: Mapping[str, str], user: str, changes: list[_Change]) -> dict[str, Any]:
        adds = _json_list(p, "adds")
        updates = _json_list(p, "updates")
        raw_deletes = p.get("deletes", "").strip()
        deletes: list[Any] = _json_list(p, "deletes") if raw_deletes.startswith("[") else \
            [d.strip() for d in raw_deletes.split(",") if d.strip()]
        in_sr = _wkid_of(p.get("inSR"))
        result = self._edit(lyr, adds, updates, deletes, use_gids=_bool(p, "useGlobalIds"),
                            rollback=_bool(p, "rollbackOnFailure", True), in_sr=in_sr, user=user, changes=changes)
        if _bool(p, "returnEditMoment"):
            result["editMoment"] = lyr.last_edit
        return result

    def _edit(self, lyr: _Layer, adds: list[Any], updates: list[Any], deletes: list[Any], *, use_gids: bool,
              rollback: bool, in_sr: int | None, user: str, changes: list[_Change]) -> dict[str, Any]:
        """Validate every edit, then apply the valid ones as one transaction (one serverGen, one EditDate)."""
        add_results: list[dict[str, Any]] = []
        update_results: list[dict[str, Any]] = []
        delete_results: list[dict[str, Any]] = []
        staged_adds: list[tuple[dict[str, Any], str, dict[str, Any], tuple[float, float] | None]] = []
        staged_updates: list[tuple[dict[str, Any], int, dict[str, Any], tuple[float, float] | None, bool]] = []
        staged_deletes: list[tuple[dict[str, Any], int]] = []
        new_gids: set[str] = set()
        touched: set[int] = set()

        for raw in adds:
            gid: str | None = None
            try:
                attrs_in, geometry = _feature_parts(raw)
                given = _get_ci(attrs_in, lyr.gid_field)
                if use_gids:
                    if given is None:
                        raise EditError(1020, "GlobalID is missing.")
                    if str(given).strip() in ("", "{}"):
                        raise EditError(1021, "GlobalID is empty.")
                    gid = canonical_guid(given)
                    if gid is None:
                        raise EditError(1000, f"Invalid GlobalID value {given!r}.")
                    if gid in lyr.by_gid or gid in new_gids:
                        raise EditError(1022, "Unique constraint violation error.")
                else:
                    gid = "{" + str(uuid.uuid4()).upper() + "}"
                values = self._validate_values(lyr, attrs_in, None)
                point = self._geometry_in(lyr, geometry, in_sr)
                new_gids.add(gid)
                res = {"objectId": -1, "uniqueId": -1, "globalId": gid, "success": True}
                staged_adds.append((res, gid, values, point))
            except EditError as err:
                res = {"objectId": -1, "uniqueId": -1, "globalId": gid, "success": False,
                       "error": {"code": err.code, "description": err.description}}
            add_results.append(res)

        for raw in updates:
            oid: int | None = None
            gid = None
            try:
                attrs_in, geometry = _feature_parts(raw)
                oid, gid = self._locate(lyr, attrs_in, use_gids, missing_code=1019)
                if oid in touched:
                    raise EditError(1000, "The same feature is updated twice in one request.")
                values = self._validate_values(lyr, attrs_in, lyr.features[oid].attrs)
                has_geometry = isinstance(raw, Mapping) and "geometry" in raw
                point = self._geometry_in(lyr, geometry, in_sr) if has_geometry else None
                touched.add(oid)
                res = {"objectId": oid, "uniqueId": oid, "globalId": gid, "success": True}
                staged_updates.append((res, oid, values, point, has_geometry))
            except EditError as err:
                res = {"objectId": oid if oid is not None else -1, "uniqueId": oid if oid is not None else -1,
                       "globalId": gid, "success": False, "error": {"code": err.code, "description": err.description}}
            update_results.append(res)

        for raw in deletes:
            oid = None
            gid = None
            try:
                ident = {lyr.gid_field if use_gids else lyr.oid_field: raw}
                oid, gid = self._locate(lyr, ident, use_gids, missing_code=1011)
                if oid in touched:
                    raise EditError(1000, "The same feature is edited twice in one request.")
                touched.add(oid)
                res = {"objectId": oid, "uniqueId": oid, "globalId": gid, "success": True}
                staged_deletes.append((res, oid))
            except EditError as err:
                res = {"objectId": oid if oid is not None else -1, "uniqueId": oid if oid is not None else -1,
                       "globalId": canonical_guid(raw) if use_gids else gid, "success": False,
                       "error": {"code": err.code, "description": err.description}}
            delete_results.append(res)

        failures = [r for r in (*add_results, *update_results, *delete_results) if not r["success"]]
        if rollback and failures:
            raise RestError(400, "Unable to complete operation.",
                            [f"{r['error']['description']} (error {r['error']['code']})" for r in failures])
        if staged_adds or staged_updates or staged_deletes:
            now = self.clock()
            before = self._gen
            self._gen += 1
            gen = self._gen
            events: set[str] = set()
            for res, gid, values, point in staged_adds:
                oid = lyr.next_oid
                lyr.next_oid += 1
                attrs: dict[str, Any] = {f.name: None for f in lyr.fields}
                attrs.update(values)
                attrs.update({lyr.oid_field: oid, lyr.gid_field: gid, "CreationDate": now, "Creator": user,
                              "EditDate": now, "Editor": user})
                lyr.features[oid] = _Feature(attrs, point, gen, gen)
                lyr.by_gid[gid] = oid
                res["objectId"] = res["uniqueId"] = oid
                events.add("FeaturesCreated")
            for _res, oid, values, point, has_geometry in staged_updates:
                feat = lyr.features[oid]
                feat.attrs.update(values)
                feat.attrs.update({"EditDate": now, "Editor": user})
                if has_geometry:
                    feat.geometry = point
                feat.updated_gen = gen
                events.add("FeaturesUpdated")
            for _res, oid in staged_deletes:
                feat = lyr.features.pop(oid)
                gid = feat.attrs[lyr.gid_field]
                del lyr.by_gid[gid]
                gone = dict(feat.attrs)
                gone.update({"EditDate": now, "Editor": user})
                lyr.tombstones.append(_Tombstone(oid, gid, gone, feat.created_gen, gen))
                events.add("FeaturesDeleted")
            lyr.last_edit = now
            changes.append(_Change(lyr.d.id, events, before, gen, now))
        for res in (*add_results, *update_results, *delete_results):
            if res.get("globalId"):
                res["globalId"] = self._guid_out(str(res["globalId"]))
        return {"addResults": add_results, "updateResults": update_results, "deleteResults": delete_results}

    def _locate(self, lyr: _Layer, attrs_in: Mapping[str, Any], use_gids: bool, *,
                missing_code: int) -> tuple[int, str | None]:
        if use_gids:
            given = _get_ci(attrs_in, lyr.gid_field)
            if given is None:
                raise EditError(1020, "GlobalID is missing.")
            gid = canonical_guid(given)
            if gid is None:
                raise EditError(1000, f"Invalid GlobalID value {given!r}.")
            oid = lyr.by_gid.get(gid)
            if oid is None:
                raise EditError(missing_code, "Object is missing.")
            return oid, gid
        given = _get_ci(attrs_in, lyr.oid_field)
        try:
            oid = int(given)
            if oid != given and not isinstance(given, str):
                raise ValueError("not a whole number")
        except (TypeError, ValueError, OverflowError) as exc:
            raise EditError(1000, f"Invalid {lyr.oid_field} value {given!r}.") from exc
        feat = lyr.features.get(oid)
        if feat is None:
            raise EditError(missing_code, "Object is missing.")
        return oid, feat.attrs[lyr.gid_field]

    def _validate_values(self, lyr: _Layer, attrs_in: Mapping[str, Any],
                         existing: Mapping[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in attrs_in.items():
            f = lyr.field(name)
            if f is None:
                raise EditError(1000, f"Field '{name}' does not exist in layer '{lyr.d.name}'.")
            if f.type in (OID, GLOBALID) or f.name in EDIT_FIELDS.values():
                continue  # server-maintained: ignored, like the service does
            if not f.editable:
                raise EditError(1023, f"Field '{f.name}' is not editable.")
            out[f.name] = _coerce(f, value)
        merged = {**(existing or {}), **out}
        for f in lyr.fields:
            if f.editable and not f.nullable and merged.get(f.name) is None:
                raise EditError(1001, f"Field '{f.name}' cannot be null.")
        return out

    def _geometry_in(self, lyr: _Layer, raw: Any, in_sr: int | None) -> tuple[float, float] | None:
        if lyr.is_table or raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise EditError(1015, "Geometry could not be set: not a geometry object.")
        x, y = raw.get("x"), raw.get("y")
        if x is None and y is None:
            return None
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (x, y)):
            raise EditError(1015, f"Geometry could not be set: invalid point x={x!r} y={y!r}.")
        wkid = _wkid_of(raw.get("spatialReference")) or in_sr or 102100
        fx, fy = float(x), float(y)  # type: ignore[arg-type]
        if wkid == 4326:
            if not (-180 <= fx <= 180 and -90 <= fy <= 90):
                raise EditError(1015, f"Geometry could not be set: ({fx}, {fy}) is outside WGS84.")
            return lonlat_to_mercator(fx, fy)
        if wkid in MERCATOR_WKIDS:
            return fx, fy
        raise EditError(1015, f"Geometry could not be set: spatial reference {wkid} is not supported.")

    # ------------------------------------------------------------------------------------ attachments

    @staticmethod
    def _require_attachments(lyr: _Layer) -> None:
        if not lyr.d.has_attachments:
            raise RestError(400, "Unable to complete operation.", ["Layer does not support attachments."])

    def _add_attachment(self, lyr: _Layer, oid: int, name: str, content_type: str, data: bytes, keywords: str,
                        changes: list[_Change], *, user: str | None = None) -> _Attachment:
        self._require_attachments(lyr)
        now = self.clock()
        before = self._gen
        self._gen += 1
        att = _Attachment(next(self._attachment_ids), "{" + str(uuid.uuid4()).upper() + "}", name, content_type,
                          data, keywords, self._gen)
        lyr.features[oid].attachments[att.id] = att
        changes.append(_Change(lyr.d.id, {"AttachmentsCreated"}, before, self._gen, now))
        return att

    def _delete_attachments(self, lyr: _Layer, oid: int, raw_ids: str, changes: list[_Change]) -> list[Any]:
        feat = lyr.features[oid]
        results: list[dict[str, Any]] = []
        ids: set[int] = _int_list(raw_ids, "attachmentIds") or set()
        before = self._gen
        deleted = False
        for aid in sorted(ids):
            att = feat.attachments.pop(aid, None)
            if att is None:
                results.append({"objectId": aid, "globalId": None, "success": False,
                                "error": {"code": 1011, "description": "Object is missing."}})
                continue
            if not deleted:
                self._gen += 1
                deleted = True
            lyr.attachment_tombstones.append((aid, feat.attrs[lyr.gid_field], self._gen))
            results.append({"objectId": aid, "globalId": self._guid_out(att.global_id), "success": True})
        if deleted:
            changes.append(_Change(lyr.d.id, {"AttachmentsDeleted"}, before, self._gen, self.clock()))
        return results

    def _attachment_info(self, lyr: _Layer, feat: _Feature, att: _Attachment) -> dict[str, Any]:
        return {"id": att.id, "globalId": self._guid_out(att.global_id),
                "parentGlobalId": self._guid_out(feat.attrs[lyr.gid_field]), "name": att.name,
                "contentType": att.content_type, "size": len(att.data), "keywords": att.keywords, "exifInfo": None}

    def _query_attachments(self, lyr: _Layer, p: Mapping[str, str]) -> dict[str, Any]:
        self._require_attachments(lyr)
        ids = _int_list(p.get("objectIds", ""), "objectIds")
        gids_raw = p.get("globalIds", "")
        gids = {canonical_guid(g.strip()) for g in gids_raw.split(",") if g.strip()} if gids_raw else None
        where = p.get("definitionExpression", "").strip()
        tree = WhereParser(where, lyr.by_lower).parse() if where else None
        if ids is None and gids is None and tree is None:
            raise RestError(400, "Unable to complete operation.", ["Invalid or missing input parameters."])
        groups = []
        for oid, feat in sorted(lyr.features.items()):
            if ids is not None and oid not in ids:
                continue
            if gids is not None and feat.attrs[lyr.gid_field] not in gids:
                continue
            if tree is not None and evaluate(tree, feat.attrs) is not True:
                continue
            if feat.attachments:
                groups.append({"parentObjectId": oid, "parentGlobalId": self._guid_out(feat.attrs[lyr.gid_field]),
                               "attachmentInfos": [self._attachment_info(lyr, feat, a)
                                                   for a in feat.attachments.values()]})
        return {"fields": [], "attachmentGroups": groups}

    # ------------------------------------------------------------------------------------ change tracking

    def _extract_changes(self, p: Mapping[str, str]) -> dict[str, Any]:
        if not self.change_tracking:
            raise RestError(400, "Unable to complete operation.", ["Change tracking is not enabled on this service."])
        if p.get("dataFormat", "json").lower() != "json":
            raise RestError(400, "Unable to complete operation.", ["Only dataFormat=json is supported here."])
        layer_ids = _layer_id_list(p.get("layers", ""))
        if layer_ids is None:
            layer_ids = sorted(self._layers)
        for lid in layer_ids:
            if lid not in self._layers:
                raise RestError(400, "Unable to complete operation.", [f"Invalid layer id {lid}."])
        gens: dict[int, tuple[int, int]] = {}
        if p.get("layerServerGens"):
            try:
                entries = strict_loads(p["layerServerGens"])
                for item in entries:
                    gens[int(item["id"])] = (int(item["serverGen"]), self._gen)
            except (ValueError, TypeError, KeyError) as exc:
                raise RestError(400, "Unable to complete operation.", ["Invalid layerServerGens."]) from exc
        elif p.get("serverGens"):
            try:
                low, high = (int(v) for v in strict_loads(p["serverGens"]))
            except (ValueError, TypeError) as exc:
                raise RestError(400, "Unable to complete operation.", ["Invalid serverGens."]) from exc
            gens = dict.fromkeys(layer_ids, (low, high))
        else:
            raise RestError(400, "Unable to complete operation.", ["'layerServerGens' or 'serverGens' is required."])
        ids_only = _bool(p, "returnIdsOnly")
        out_wkid = _out_wkid(p)
        edits = []
        for lid in layer_ids:
            lyr = self._layers[lid]
            low, high = gens.get(lid, (self._gen, self._gen))
            adds = [f for f in lyr.features.values() if low < f.created_gen <= high]
            updates = [f for f in lyr.features.values() if f.created_gen <= low < f.updated_gen <= high]
            gone = [t for t in lyr.tombstones if low < t.gen <= high and t.created_gen <= low]
            entry: dict[str, Any] = {"id": lid}
            if ids_only:
                entry["objectIds"] = {
                    "adds": [f.attrs[lyr.oid_field] for f in adds] if _bool(p, "returnInserts", True) else [],
                    "updates": [f.attrs[lyr.oid_field] for f in updates] if _bool(p, "returnUpdates", True) else [],
                    "deletes": [t.oid for t in gone] if _bool(p, "returnDeletes", True) else [],
                }
            else:
                features: dict[str, Any] = {
                    "adds": [self._render(lyr, f, lyr.fields, True, out_wkid) for f in adds]
                    if _bool(p, "returnInserts", True) else [],
                    "updates": [self._render(lyr, f, lyr.fields, True, out_wkid) for f in updates]
                    if _bool(p, "returnUpdates", True) else [],
                    "deleteIds": [t.oid for t in gone] if _bool(p, "returnDeletes", True) else [],
                }
                if _bool(p, "returnDeletedFeatures") and _bool(p, "returnDeletes", True):
                    features["deletes"] = [{"attributes": {f.name: self._value_out(f, t.attrs.get(f.name))
                                                           for f in lyr.fields}} for t in gone]
                entry["features"] = features
            if _bool(p, "returnAttachments") and lyr.d.has_attachments:
                entry["attachments"] = {
                    "adds": [self._attachment_info(lyr, f, a) for f in lyr.features.values()
                             for a in f.attachments.values() if low < a.gen <= high],
                    "updates": [],
                    "deleteIds": [aid for aid, _, gen in lyr.attachment_tombstones if low < gen <= high],
                }
            edits.append(entry)
        result = {
            "layerServerGens": [{"id": lid, "serverGen": gens.get(lid, (0, self._gen))[1]} for lid in layer_ids],
            "transportType": p.get("transportType", "esriTransportTypeUrl"),
            "responseType": "esriDataChangesResponseTypeEdits",
            "edits": edits,
        }
        if _bool(p, "async"):
            job = uuid.uuid4().hex
            self._jobs[job] = result
            return {"statusUrl": f"{self._public_base()}{self.service_path}/jobs/{job}"}
        return result

    def _job(self, job: str, *, result: bool) -> Any:
        if job not in self._jobs:
            raise RestError(404, "Unable to complete operation.", ["Job not found."])
        if result:
            return self._jobs[job]
        return {"status": "Completed", "responseType": "esriDataChangesResponseTypeEdits",
                "resultUrl": f"{self._public_base()}{self.service_path}/jobs/{job}/result"}

    # ------------------------------------------------------------------------------------ lookup

    def _layer(self, ref: str | int) -> _Layer:
        if isinstance(ref, int) or str(ref).isdigit():
            return self._layers[int(ref)]
        for lyr in self._layers.values():
            if lyr.d.name.lower() == str(ref).lower():
                return lyr
        raise KeyError(f"no layer {ref!r}; layers: {[lyr.d.name for lyr in self._layers.values()]}")


# ============================================================================================ helpers


def _get_ci(attrs: Mapping[str, Any], name: str) -> Any:
    for key, value in attrs.items():
        if key.lower() == name.lower():
            return value
    return None


def _feature_parts(raw: Any) -> tuple[dict[str, Any], Any]:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("attributes", {}), Mapping):
        raise EditError(1000, "Invalid feature: expected {\"attributes\": {...}, \"geometry\": {...}}.")
    return dict(raw.get("attributes") or {}), raw.get("geometry")


def _coerce(f: FieldDef, value: Any) -> Any:
    """Check a value against its field's type, length and coded domain; return it as stored."""
    if value is None:
        return None
    failed = EditError(1016, f"Setting of value for {f.name} failed.")
    kind = f.type
    if kind == STRING:
        if not isinstance(value, str):
            raise failed
        if f.length is not None and len(value) > f.length:
            raise EditError(1016, f"Setting of value for {f.name} failed: {len(value)} characters exceed the "
                                  f"field length {f.length}.")
        out: Any = value
    elif kind in (INTEGER, SMALLINT):
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                (isinstance(value, float) and not value.is_integer()):
            raise failed
        out = int(value)
        if kind == SMALLINT and not -32768 <= out <= 32767:
            raise failed
    elif kind in (DOUBLE, "esriFieldTypeSingle"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise failed
        out = value
    elif kind == DATE:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise failed
        out = int(value)
    elif kind == GUID:
        out = canonical_guid(value)
        if out is None:
            raise failed
    else:
        out = value
    # No domain check: a hosted layer stores a value outside its field's coded-value domain and answers success
    # (Esri/arcgis-python-api#818, AGOL edit_features = applyEdits; Esri technical article 000014410: domains are
    # checked by the editing client's validation, not enforced when the value is written). Clients must check.
    return out


def _bool(p: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = p.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in ("true", "1", "yes")


def _nonneg(p: Mapping[str, str], name: str, default: int) -> int:
    raw = p.get(name, "")
    if raw == "":
        return default
    if not raw.strip().isdigit():
        raise RestError(400, "Unable to complete operation.", [f"Invalid '{name}' parameter."])
    return int(raw)


def _int_list(raw: str, name: str) -> set[int] | None:
    raw = raw.strip()
    if not raw:
        return None
    if raw.startswith("["):
        with contextlib.suppress(ValueError):
            return {int(v) for v in strict_loads(raw)}
        raise RestError(400, "Unable to complete operation.", [f"Invalid '{name}' parameter."])
    parts = [v.strip() for v in raw.split(",") if v.strip()]
    if not all(v.isdigit() for v in parts):
        raise RestError(400, "Unable to complete operation.", [f"Invalid '{name}' parameter."])
    return {int(v) for v in parts}


def _layer_id_list(raw: str) -> list[int] | None:
    ids = _int_list(raw, "layers")
    return sorted(ids) if ids is not None else None


def _json_list(p: Mapping[str, str], name: str) -> list[Any]:
    raw = p.get(name, "").strip()
    if not raw:
        return []
    try:
        value = strict_loads(raw)
    except ValueError as exc:
        raise RestError(400, "Unable to complete operation.", [f"Invalid JSON in '{name}'."]) from exc
    if not isinstance(value, list):
        raise RestError(400, "Unable to complete operation.", [f"'{name}' must be a JSON array."])
    return value


def _out_wkid(p: Mapping[str, str]) -> int:
    wkid = _wkid_of(p.get("outSR")) or 102100
    if wkid != 4326 and wkid not in MERCATOR_WKIDS:
        raise RestError(400, "Unable to complete operation.", [f"Output spatial reference {wkid} is not supported."])
    return 4326 if wkid == 4326 else 102100


def _out_fields(raw: str, lyr: _Layer) -> list[FieldDef]:
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not names:
        return [lyr.by_lower[lyr.oid_field.lower()]]
    if "*" in names:
        return list(lyr.fields)
    out = []
    for name in names:
        f = lyr.field(name)
        if f is None:
            raise RestError(400, "Unable to complete operation.", [f"Invalid field: {name}"])
        out.append(f)
    return out


def _order_by(raw: str, lyr: _Layer) -> list[tuple[str, bool]]:
    out = []
    for part in (p.strip() for p in raw.split(",") if p.strip()):
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:\s+(ASC|DESC))?", part, re.IGNORECASE)
        if m is None or lyr.field(m.group(1)) is None:
            raise RestError(400, "Unable to complete operation.", [f"Invalid orderByFields: {part}"])
        out.append((lyr.field(m.group(1)).name, (m.group(2) or "ASC").upper() == "DESC"))  # type: ignore[union-attr]
    return out


def _sort_key(name: str, kind: str) -> Callable[[_Feature], tuple[bool, Any]]:
    def key(f: _Feature) -> tuple[bool, Any]:
        value = f.attrs.get(name)
        # NULLs sort first ascending, as SQL Server does.
        return (value is not None, _comparable(value, kind) if value is not None else 0)

    return key


def _request_token(params: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """The request's token: the `token` parameter, else a bearer in `X-Esri-Authorization` or `Authorization`."""
    token = params.get("token") or ""
    for header in ("x-esri-authorization", "authorization"):
        value = headers.get(header, "")
        if not token and value.lower().startswith("bearer "):
            token = value[7:].strip()
    return token
