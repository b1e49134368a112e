"""Protocol-faithful simulator of the Salesforce REST API v63.0 (Starlette ASGI; serve it over TLS).

Covers what Syncline uses: the client-credentials token endpoint on My Domain, sObject CRUD and upsert by
External ID (indexed), sObject Collections (create/update/upsert/delete with per-record results), SOQL queries
(a real subset parser) with `nextRecordsUrl` paging, Bulk API 2.0 ingest jobs, the daily request allocation with
`Sforce-Limit-Info`, expired sessions, and Change Data Capture events (Pub/Sub-shaped JSON). Opportunity and
Order lines roll up into the header (Amount, TotalAmount) in the line's transaction, as in the org. Seeds for the
lead-to-cash and Customer 360 flows are made as a UI user, so they emit change events like people editing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import sandbox.salesforce.schema as schema
from sandbox.salesforce.auth import TokenEndpoint
from sandbox.salesforce.bulk import BulkJobs
from sandbox.salesforce.composite import Composite
from sandbox.salesforce.faults import injected_answer
from sandbox.salesforce.model import (
    API_PREFIX,
    API_VERSION,
    API_VERSIONS,
    COLLECTION_LIMIT,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    RUN_AS_USER_ID,
    SCHEMAS,
    VERSION_NUMBERS,
    SalesforceFault,
    to_18,
)
from sandbox.salesforce.query import Queries
from shared.payloads import strict_loads


class SalesforceSimulator(TokenEndpoint, Composite, Queries, BulkJobs):
    """In-memory Salesforce org. Serve `sim.app` with `sandbox.server.RunningServer(app, ca=...)`."""

    def __init__(self, *, client_id: str = DEFAULT_CLIENT_ID, client_secret: str = DEFAULT_CLIENT_SECRET,
                 webhook_verify: Any = True) -> None:
        super().__init__(client_id=client_id, client_secret=client_secret, webhook_verify=webhook_verify)
        self.app = Starlette(routes=[
            Route("/services/oauth2/token", self._token, methods=["POST"]),
            Route("/services/data", self._versions, methods=["GET"]),
            Route("/services/data/", self._versions, methods=["GET"]),
            Route("/services/data/v{version}/{rest:path}", self._api,
                  methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
        ])

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
            if version not in VERSION_NUMBERS:
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
                return injected_answer(injected)
            try:
                data = _json_body(body, request.headers.get("content-type", ""))
                answer = self._dispatch(request.method, rest, dict(request.query_params), data, body, origin, client)
            except SalesforceFault as fault:
                status, content = fault.answer()
                answer = self._json(content, status)
            return answer if injected is None else injected_answer(injected)

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
                return 200, self.describe(obj, API_VERSION)
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

