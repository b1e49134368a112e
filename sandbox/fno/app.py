"""The F&O simulator's HTTP API: /data routes, Entra tokens, throttling, fault knobs, dispatch.

Protocol-faithful simulator of Dynamics 365 F&O OData v4 (`/data`), its Entra ID token endpoint and business events.

Serve `.app` with `sandbox.server.RunningServer(sim.app, ca=TestCA...)` (MSAL needs an https authority); the
environment URL and the token authority are then both `server.url` (token scope `{server.url}/.default`). The
Entra ID endpoints are those of `DataverseSimulator`, reused by composition."""

from __future__ import annotations

import math
import queue
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.dataverse import DataverseSimulator
from sandbox.faults import DROP, SLOW, Dropped
from sandbox.fno.filters import FilterParser, evaluate, tokenize
from sandbox.fno.odata import (
    CURRENCIES,
    DATA_PREFIX,
    DEFAULT_COMPANY,
    ENTITY_KEYS,
    MAX_PAGE_SIZE,
    NUMBER_SEQUENCES,
    TABLE_NAMES,
    THROTTLE_MESSAGE,
    ODataError,
    _line_amount,
    write_failed,
)
from sandbox.fno.schema import (
    ENTITIES,
    ENUMS,
    Entity,
    could_not_find_property,
    csdl,
)
from sandbox.fno.state import FnoFaults, Throttling, _Delivery
from sandbox.fno.store import FnoStore


def _fault_response(status: int) -> Response:
    if status == DROP:
        return Dropped()
    return JSONResponse({"error": {"code": "", "message": "An error has occurred."}}, status_code=status)


class FinOpsSimulator(FnoStore):
    """In-memory F&O environment: OData /data entities, Entra ID tokens, throttling, faults, business events."""

    def __init__(self, *, page_size: int = MAX_PAGE_SIZE, latency_ms: float = 0.0, event_verify: Any = True,
                 clock: Callable[[], float] = time.monotonic, event_retry_delay: float = 1.0,
                 extensions: bool = True) -> None:
        self.entities: dict[str, Entity] = dict(ENTITIES)
        self.enums: dict[str, list[tuple[str, int]]] = {n: list(zip(ms, range(len(ms)), strict=True))
                                                        for n, ms in ENUMS.items()}
        self.extensions = extensions
        self.entra = DataverseSimulator(schema={})
        self.tenant_id, self.client_id, self.client_secret = (self.entra.tenant_id, self.entra.client_id,
                                                              self.entra.client_secret)
        self.page_size = page_size
        self.latency_ms = latency_ms
        self.clock = clock
        self.throttling = Throttling()
        self.faults = FnoFaults(self)
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

    @property
    def request_count(self) -> int:
        """OData API requests received (token endpoint calls excluded)."""
        return self.request_counts["api"]

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
        fault = self.faults.take(request.method, raw_path)
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
            return Response(csdl(self.entities, extensions=self.extensions, enums=self.enums),
                            media_type="application/xml", headers={"OData-Version": "4.0"})
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
                self._change(entity, row, changes)
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
