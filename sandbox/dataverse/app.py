"""Protocol-faithful simulator of the Dataverse Web API v9.2 and its Entra ID token endpoint (Starlette ASGI)."""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox.dataverse.auth import _EntraId
from sandbox.dataverse.batch import _Batch
from sandbox.dataverse.knobs import Faults, ServiceProtection
from sandbox.dataverse.metadata import _EntityDefinitions, csdl
from sandbox.dataverse.platform import SDK_MESSAGES, WebhookFailure, WebhookRegistration, system_schema
from sandbox.dataverse.protocol import (
    API_PREFIX,
    APP_USER_ID,
    BUSINESS_UNIT_ID,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TENANT_ID,
    NAMESPACE,
    OFFICE_USER_ID,
    ORGANIZATION_ID,
    URL_UNSAFE_KEY_CHARS,
    ODataError,
    _ApiRequest,
    _ApiResponse,
    _Caller,
    _error_response,
    _Event,
    _json_body,
    _Txn,
)
from sandbox.dataverse.query import _SEGMENT_RE, _parse_key_predicate, _split_segments
from sandbox.dataverse.reads import _Reads
from sandbox.dataverse.rows import Row, _ColumnIndex
from sandbox.dataverse.rules import _Rules
from sandbox.dataverse.schema import TableSchema, default_schema
from sandbox.dataverse.store import _Store
from sandbox.dataverse.webhooks import _Webhooks
from sandbox.dataverse.writes import _Writes
from sandbox.faults import CountdownFault
from sandbox.webhook_delivery import Deliverer


class DataverseSimulator(_Store, _Rules, _EntraId, _Webhooks, _Reads, _Writes, _Batch, _EntityDefinitions):
    """In-memory Dataverse environment with the Web API, Entra ID token endpoint, webhooks and fault knobs.

    Serve `.app` with `sandbox.server.RunningServer(sim.app, ca=TestCA...)` (TLS is needed for MSAL); the
    org URL and the token authority are then both `server.url`.

    Webhooks come from two places: the `register_webhook` helper (every message of the chosen tables, full
    row images), and registrations made through the Web API like in a real org: a `serviceendpoints` row
    (contract 8) plus enabled `sdkmessageprocessingsteps` bound to a message, a table's message filter and
    that endpoint. Those deliver to the endpoint's URL with its auth applied (HttpHeader settings as
    headers, WebhookKey as `?code=`, HttpQueryString settings as query parameters), honour the Update
    step's `filteringattributes`, and carry the step's images with only their `attributes`.

    The class is assembled from one part per concern (store, rules, auth, webhooks, reads, writes, $batch,
    EntityDefinitions; each a `_State` subclass in its own module); here live the state, routes and request entry.
    """

    def __init__(
        self,
        schema: Mapping[str, TableSchema] | None = None,
        *,
        tenant_id: str = DEFAULT_TENANT_ID,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        app_user_id: str = APP_USER_ID,
        office_user_id: str = OFFICE_USER_ID,
        org_url: str | None = None,
        token_lifetime_seconds: int = 3599,
        latency_ms: float = 0.0,
        webhook_verify: Any = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.schema: dict[str, TableSchema] = dict(schema if schema is not None else default_schema())
        for entity_set, system_table in system_schema().items():
            self.schema.setdefault(entity_set, system_table)
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.app_user_id = app_user_id
        self.office_user_id = office_user_id
        self.org_url = org_url.rstrip("/") if org_url else None
        """Resource of the token scope (`{org_url}/.default`); None = the URL the simulator is served on."""
        self.token_lifetime_seconds = token_lifetime_seconds
        self.latency_ms = latency_ms
        self.clock = clock
        self.limits = ServiceProtection()
        self.faults = Faults(self._expire_tokens)
        self.request_counts: Counter[str] = Counter()
        self.status_counts: Counter[int] = Counter()
        self.webhook_failures: list[WebhookFailure] = []
        self.webhooks_delivered = 0
        self._apps: dict[str, tuple[str, str]] = {client_id: (client_secret, app_user_id)}
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.RLock()
        self.global_option_sets: dict[str, dict[int, str]] = {}
        """Global choices by name (`GlobalOptionSetDefinitions`); tests add them."""
        self._tables: dict[str, dict[str, Row]] = {s: {} for s in self.schema}
        self._key_index: dict[str, dict[tuple[str, ...], dict[tuple[Any, ...], str]]] = self._empty_index()
        self._column_index: dict[str, dict[str, _ColumnIndex]] = self._empty_column_index()
        self._deleted: dict[str, list[tuple[int, str]]] = {s: [] for s in self.schema}
        self._child_links = self._collect_child_links()
        self._rollup_links: dict[str, list[tuple[TableSchema, str]]] = {}
        for table in self.schema.values():
            for rollup in table.rollups.values():
                self._rollup_links.setdefault(rollup.child_set, []).append((table, rollup.child_lookup))
        self._children = self._empty_children()
        self._autonumbers: dict[tuple[str, str], int] = {}
        self._autonumber_rng = random.Random(ORGANIZATION_ID)
        self._version = 1000
        self._window: deque[float] = deque()
        self._in_flight = 0
        self._webhooks: list[WebhookRegistration] = []
        self._webhook_verify = webhook_verify
        self._deliveries = Deliverer("dataverse-sim-webhooks", verify=webhook_verify, timeout=60.0)
        self._seed_platform()
        self.app = Starlette(routes=[
            Route("/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration, methods=["GET"]),
            Route("/{tenant}/oauth2/v2.0/token", self._token, methods=["POST"]),
            Route("/api/data/v9.2/{rest:path}", self._api,
                  methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
        ])

    # ------------------------------------------------------------------------------------ counters

    @property
    def request_count(self) -> int:
        """Web API requests received (a $batch counts once; token endpoint calls are not included)."""
        return self.request_counts["api"]

    @property
    def in_flight(self) -> int:
        """Web API requests being processed right now (counts against the concurrency limit)."""
        return self._in_flight

    def reset(self) -> None:
        """Forget records, registrations, faults, limits, webhooks and counters (issued tokens stay valid)."""
        with self._lock:
            self._tables = {s: {} for s in self.schema}
            self._key_index = self._empty_index()
            self._column_index = self._empty_column_index()
            self._deleted = {s: [] for s in self.schema}
            self._children = self._empty_children()
            self._autonumbers.clear()
            self._autonumber_rng = random.Random(ORGANIZATION_ID)
            self._window.clear()
            self._seed_platform()
        self.faults.clear()
        self.limits = ServiceProtection()
        self.latency_ms = 0.0
        self.request_counts.clear()
        self.status_counts.clear()
        self._webhooks.clear()
        self.webhook_failures.clear()
        self.webhooks_delivered = 0

    def _seed_platform(self) -> None:
        """Preload `sdkmessages` (Create/Update/Delete) and one `sdkmessagefilter` per message and data table."""
        for message in SDK_MESSAGES:
            message_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdkmessage:{message}"))
            self.insert("sdkmessages", {"sdkmessageid": message_id, "name": message, "categoryname": message})
            for table in self.schema.values():
                if table.system:
                    continue
                self.insert("sdkmessagefilters", {
                    "sdkmessagefilterid": str(uuid.uuid5(uuid.NAMESPACE_URL,
                                                         f"sdkmessagefilter:{table.logical_name}:{message}")),
                    "primaryobjecttypecode": table.logical_name, "secondaryobjecttypecode": "none",
                    "iscustomprocessingstepallowed": True, "sdkmessageid": message_id})

    def registrations(self) -> dict[str, list[dict[str, Any]]]:
        """Copies of the webhook registration rows: endpoints, steps and images (for before/after comparisons)."""
        with self._lock:
            return {s: sorted((dict(r.values) for r in self._tables[s].values()),
                              key=lambda v: str(v.get(self.schema[s].primary_id)))
                    for s in ("serviceendpoints", "sdkmessageprocessingsteps", "sdkmessageprocessingstepimages")}

    # ------------------------------------------------------------------------------------ direct helpers

    def add_application(self, client_id: str, client_secret: str, *, user_id: str | None = None) -> str:
        """Register another app registration + application user; returns its systemuserid."""
        uid = user_id or str(uuid.uuid4())
        self._apps[client_id] = (client_secret, uid)
        return uid

    def table(self, entity_set: str) -> TableSchema:
        """The schema of an entity set (KeyError if unknown)."""
        return self.schema[entity_set]

    # ------------------------------------------------------------------------------------ HTTP entry

    async def _api(self, request: Request) -> Response:
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        full = unquote(raw_path.decode("latin-1"))
        path = full[len(API_PREFIX):] if full.startswith(API_PREFIX) else full.lstrip("/")
        headers = {k.lower(): v for k, v in request.headers.items()}
        query = dict(parse_qsl(request.url.query, keep_blank_values=True))
        req = _ApiRequest(request.method, path, query, headers, await request.body(),
                          str(request.base_url).rstrip("/"))
        resp = await self._handle(req)
        return Response(resp.body, status_code=resp.status, headers=resp.headers)

    async def _handle(self, req: _ApiRequest) -> _ApiResponse:
        """Everything an outer Web API request goes through: auth, limits, faults, latency, dispatch."""
        self.request_counts["api"] += 1
        resp = await self._handle_outer(req)
        self.status_counts[resp.status] += 1
        return resp

    async def _handle_outer(self, req: _ApiRequest) -> _ApiResponse:
        user_id = self._authenticate(req.headers)
        if user_id is None:
            self.request_counts["401"] += 1
            resource = self.org_url or req.base
            return _ApiResponse(401, {
                "WWW-Authenticate": f'Bearer error=invalid_token, error_description="Error during token '
                                    f'validation!", authorization_uri=https://login.microsoftonline.com/'
                                    f'{self.tenant_id}/oauth2/authorize, resource_id={resource}'})
        throttled = self._check_limits()
        if throttled is not None:
            self.request_counts["429"] += 1
            return _error_response(throttled)
        self._in_flight += 1
        try:
            path_for_faults = API_PREFIX + req.path
            slow = self.faults._take(self.faults._timeouts, path_for_faults)
            if slow is not None:
                await asyncio.sleep(slow.seconds)
            fault = self.faults._take(self.faults._fail, path_for_faults)
            if fault is not None:
                return self._fault_response(fault)
            if self.latency_ms:
                await asyncio.sleep(self.latency_ms / 1000)
            caller = _Caller(user_id, req.headers.get("x-ms-correlation-request-id") or str(uuid.uuid4()))
            events: list[_Event] = []
            if req.path == "$batch" and req.method == "POST":
                self.request_counts["batch"] += 1
                resp = self._batch(req, caller, events)
            else:
                txn = _Txn()
                resp = self._dispatch_safely(req, caller, txn)
                events.extend(txn.events)
            self._emit(events)
            if req.method in ("POST", "PATCH", "PUT", "DELETE"):
                ambiguous = self.faults._take(self.faults._ambiguous, path_for_faults)
                if ambiguous is not None:
                    return _error_response(ODataError(504, "0x80040216", "The request timed out at the gateway "
                                                      "(the operation may have completed)."))
            return resp
        finally:
            self._in_flight -= 1

    def _check_limits(self) -> ODataError | None:
        limits = self.limits
        if limits.max_concurrent is not None and self._in_flight >= limits.max_concurrent:
            return ODataError(429, "0x80072326",
                              f"Number of concurrent requests exceeded the limit of {limits.max_concurrent}.",
                              {"Retry-After": str(math.ceil(limits.concurrency_retry_after))})
        if limits.max_requests is not None:
            now = self.clock()
            with self._lock:
                while self._window and self._window[0] <= now - limits.window_seconds:
                    self._window.popleft()
                if len(self._window) >= limits.max_requests:
                    wait = max(1, math.ceil(self._window[0] + limits.window_seconds - now))
                    return ODataError(
                        429, "0x80072322",
                        f"Number of requests exceeded the limit of {limits.max_requests} over time window of "
                        f"{int(limits.window_seconds)} seconds.", {"Retry-After": str(wait)})
                self._window.append(now)
        return None

    def _fault_response(self, fault: CountdownFault) -> _ApiResponse:
        status = fault.status
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        if status == 429:
            err = ODataError(429, "0x80072322", "Number of requests exceeded the limit of 6000 over time window of "
                             "300 seconds.", headers)
        elif status == 401:
            return _ApiResponse(401, {"WWW-Authenticate": "Bearer error=invalid_token", **headers})
        elif status >= 500:
            message = {503: "Service Unavailable", 504: "The request timed out at the gateway.",
                       502: "Bad Gateway"}.get(status, "An unexpected error occurred.")
            err = ODataError(status, "0x80040216", message, headers)
        else:
            err = ODataError(status, "0x80040265", f"Simulated failure (HTTP {status}).", headers)
        return _error_response(err)

    def _dispatch_safely(self, req: _ApiRequest, caller: _Caller, txn: _Txn) -> _ApiResponse:
        try:
            with self._lock:
                return self._dispatch(req, caller, txn)
        except ODataError as err:
            txn.rollback()
            return _error_response(err)

    # ------------------------------------------------------------------------------------ routing

    def _dispatch(self, req: _ApiRequest, caller: _Caller, txn: _Txn) -> _ApiResponse:
        segments = _split_segments(req.path)
        if not segments:
            raise ODataError(404, "0x8006088a", "Resource not found for the segment ''.")
        head = _SEGMENT_RE.match(segments[0])
        if head is None:
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{segments[0]}'.")
        name, key_text = head.group("name"), head.group("key")
        if name == "$metadata" and key_text is None and len(segments) == 1:
            if req.method != "GET":
                raise ODataError(405, "0x80060888", f"The HTTP method '{req.method}' is not allowed on $metadata.")
            self.request_counts["metadata"] += 1
            return _ApiResponse(200, {"Content-Type": "application/xml", "OData-Version": "4.0"},
                                csdl(self.schema).encode())
        if name == "WhoAmI":
            self.request_counts["whoami"] += 1
            return self._json(200, {"@odata.context": f"{req.base}{API_PREFIX}$metadata#Microsoft.Dynamics.CRM."
                                    "WhoAmIResponse", "BusinessUnitId": BUSINESS_UNIT_ID,
                                    "UserId": caller.user_id, "OrganizationId": ORGANIZATION_ID})
        if name == "EntityDefinitions":
            self.request_counts["metadata"] += 1
            return self._metadata(req, key_text, segments[1:])
        if name == "GlobalOptionSetDefinitions":
            self.request_counts["metadata"] += 1
            return self._global_option_set(req, key_text, segments[1:])
        schema = self.schema.get(name)
        if schema is None:
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{name}'.")
        if len(segments) == 2 and key_text is None and segments[1] == "$count" and req.method == "GET":
            self.request_counts["collection"] += 1
            return self._count_only(req, schema)
        if len(segments) == 2 and key_text is None and segments[1].startswith(f"{NAMESPACE}."):
            self.request_counts["write"] += 1
            return self._bound_action(req, schema, segments[1][len(NAMESPACE) + 1:], caller, txn)
        if len(segments) > 1:
            raise ODataError(400, "0x80060888", "The simulator supports only entity set and single record URLs.")
        if key_text is None:
            if req.method == "GET":
                self.request_counts["collection"] += 1
                return self._query(req, schema)
            if req.method == "POST":
                self.request_counts["write"] += 1
                return self._post(req, schema, caller, txn)
            raise ODataError(405, "0x80060888", f"The HTTP method '{req.method}' is not allowed on a collection.")
        key = _parse_key_predicate(key_text)
        if isinstance(key, dict) and any(isinstance(v, str) and set(v) & URL_UNSAFE_KEY_CHARS for v in key.values()):
            # IIS/ASP.NET refuse these characters in a path even percent-encoded (documented for alternate keys).
            raise ODataError(400, "0x80060888", "A potentially dangerous Request.Path value was detected from the "
                             "client. Alternate key values used in a URL cannot contain / < > * % & : \\ ? +")
        if req.method == "GET":
            self.request_counts["record"] += 1
            return self._get_one(req, schema, key)
        if req.method == "PATCH":
            self.request_counts["write"] += 1
            return self._patch(req, schema, key, caller, txn)
        if req.method == "DELETE":
            self.request_counts["write"] += 1
            return self._delete_request(req, schema, key, caller, txn)
        raise ODataError(405, "0x80060888", f"The HTTP method '{req.method}' is not supported by the simulator.")

    def _json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> _ApiResponse:
        return _ApiResponse(status, {"Content-Type": "application/json; odata.metadata=minimal",
                                     "OData-Version": "4.0", **(headers or {})}, _json_body(obj))
