"""The Web API's wire pieces every module shares: limits, ids, the OData error, request, response, transaction."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

API_PREFIX = "/api/data/v9.2/"
NAMESPACE = "Microsoft.Dynamics.CRM"
MAX_COUNT = 5000
"""`$count` counts at most this many rows (beyond it: 5000 and `totalrecordcountlimitexceeded`)."""
XRM_CONTRACTS = "http://schemas.microsoft.com/xrm/2011/Contracts"
MAX_BATCH_REQUESTS = 1000
MAX_PAGE_SIZE = 5000

DEFAULT_TENANT_ID = "9b1c3f0e-5d2a-4e7b-8c61-0f4a2d9e7b31"
DEFAULT_CLIENT_ID = "5f0e8a4c-2b1d-4c3e-9a7f-6d8b0c1e2f3a"
DEFAULT_CLIENT_SECRET = "sim-secret-Syncline~0123456789"  # a fixed test secret
APP_USER_ID = "2a6f1d4e-8b3c-4f5a-9e7d-1c0b2a3d4e5f"
"""systemuserid of the application user behind the default client (Syncline's own writes)."""
OFFICE_USER_ID = "7c3e9b1a-4d2f-4a6e-8b5c-0d1e2f3a4b5c"
"""systemuserid of the 'office user' used by `apply_change` (edits made in the D365 UI)."""
ORGANIZATION_ID = "4ef5b371-e89e-e711-8122-000d3aa2331c"
BUSINESS_UNIT_ID = "e2b9dd85-e89e-e711-8122-000d3aa2331c"

URL_UNSAFE_KEY_CHARS = frozenset("/<>*%&:\\?+")
SYSTEM_READONLY = frozenset({"createdon", "modifiedon", "createdby", "modifiedby", "ownerid", "versionnumber"})


class ODataError(Exception):
    """An error the Web API answers with `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _not_found(logical: str, key: str) -> ODataError:
    return ODataError(404, "0x80040217", f"{logical} With Id = {key} Does Not Exist")


def _bad_property(logical: str, name: str) -> ODataError:
    return ODataError(
        400, "0x80060888",
        f"The property '{name}' does not exist on type 'Microsoft.Dynamics.CRM.{logical}'. Make sure to only use "
        "property names that are defined by the type.",
    )


def _cannot_convert(value: Any, edm: str) -> ODataError:
    return ODataError(400, "0x80060888", f"Cannot convert the literal '{value}' to the expected type '{edm}'.")


@dataclass
class _ApiRequest:
    method: str
    path: str
    """Decoded resource path after /api/data/v9.2/."""
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    base: str


@dataclass
class _ApiResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class _Event:
    message: str
    entity_set: str
    key: str
    target: dict[str, Any]
    post: dict[str, Any] | None
    pre: dict[str, Any] | None
    lookup_types: dict[str, str]
    user_id: str
    correlation_id: str
    at: datetime


@dataclass
class _Txn:
    undo: list[Callable[[], None]] = field(default_factory=list)
    events: list[_Event] = field(default_factory=list)

    def rollback(self) -> None:
        for action in reversed(self.undo):
            action()
        self.undo.clear()
        self.events.clear()


@dataclass
class _Caller:
    user_id: str
    correlation_id: str


def _prefer(headers: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in headers.get("prefer", "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, value = part.partition("=")
        out[name.strip().lower()] = value.strip().strip('"')
    return out


def _json_body(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error_response(err: ODataError) -> _ApiResponse:
    headers = {"Content-Type": "application/json; odata.metadata=minimal", "OData-Version": "4.0", **err.headers}
    return _ApiResponse(err.status, headers, _json_body({"error": {"code": err.code, "message": err.message}}))


_REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            412: "Precondition Failed", 413: "Payload Too Large", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
