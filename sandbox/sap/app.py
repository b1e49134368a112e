"""The SAP simulator's HTTP API: routes, request handling, fault knobs, dispatch to reads and writes.

Protocol-faithful simulator of SAP S/4HANA OData v2 (business partners, sales orders, products, prices, ATP).

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
- Schema: `sandbox.sap.schema` declares every entity set, property (Edm type, MaxLength, precision/scale,
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
import threading
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox.faults import DROP, Dropped, FaultKnobs
from sandbox.sap.atom import _atom, _Count, _negotiate, _xml_error
from sandbox.sap.auth import SapAuth
from sandbox.sap.batch import SapBatch
from sandbox.sap.codecs import _json_response
from sandbox.sap.gateway import SERVICE_PREFIX, TOKEN_PATH, GatewayError
from sandbox.sap.rows import _Rows
from sandbox.sap.schema import (
    ENTITIES,
    SERVICE_SETS,
    metadata,
)
from sandbox.sap.state import Customizing, _Session
from sandbox.webhook_delivery import Deliverer


class SapSimulator(SapAuth, SapBatch):
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
        self.faults = FaultKnobs()
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

    @property
    def request_count(self) -> int:
        """OData API requests received (token endpoint calls excluded)."""
        return self.request_counts["api"]

    async def _api(self, request: Request) -> Response:
        lost = self.faults.take(request.method.upper(), request.url.path, after_apply=True)
        response = await self._serve(request)
        if lost is None:
            return response
        if lost.status == DROP:
            return Dropped()
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
            fault = self.faults.take(method, path, after_apply=False)
            if fault is not None and fault.status == DROP:
                return Dropped()
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
