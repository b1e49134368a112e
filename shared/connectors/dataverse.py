"""Dataverse (Dynamics 365 CE) Web API v9.2 connector: RecordSink + ChangeSource over async httpx, Entra ID auth."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast
from urllib.parse import quote, urlsplit

import httpx

from shared.connectors._http import RETRIABLE_STATUS, RetryPolicy, send_with_retry
from shared.connectors._odata import json_object, rebase_link
from shared.core.dates import is_wcf_date, iso_z, parse_iso, parse_wcf_date
from shared.core.errors import (
    AmbiguousWriteError,
    AuthError,
    EnvelopeError,
    RejectedError,
    RetriableError,
    SyncError,
    ThrottledError,
    TransientError,
)
from shared.core.ports import ATTACHMENTS_KEY, GEOMETRY_KEY, Attachment, Bind, SourceRecord, WriteOp, WriteResult
from shared.payloads import DataverseContext, DataverseEntity, bad_values, validate

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

    from shared.settings import DataverseSettings

log = logging.getLogger(__name__)

SYSTEM = "dataverse"
API_PATH = "/api/data/v9.2/"
MAX_BATCH_SIZE = 1000
"""Dataverse refuses a $batch with more than 1000 requests."""
MAX_PAGE_SIZE = 5000
ANNOTATION_MARKER = "syncline-source:"
"""Prefix of the line in a note's `notetext` naming the source attachment (makes re-sends idempotent)."""
_ANNOTATION_NAMESPACE = uuid.UUID("0b9b7f5e-3f5c-4c64-9a53-5d0c2f6c1a11")

_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LOOKUP_VALUE_RE = re.compile(r"^_(?P<name>[A-Za-z0-9_]+)_value$")
_ENTITY_ID_RE = re.compile(
    r"\((?P<id>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\)\s*$")
_URL_UNSAFE_KEY_CHARS = frozenset("/<>*%&:\\?+")
"""Characters Dataverse cannot take in an alternate-key value inside a URL (documented limitation)."""
LOOKUP_ATTRIBUTE_TYPES = frozenset({"Lookup", "Customer", "Owner"})
"""AttributeType values of columns read and filtered as `_x_value` (Customer and Owner are polymorphic)."""


# ============================================================================================ tokens


class TokenProvider(Protocol):
    """Source of bearer tokens for the Dataverse environment."""

    async def get_token(self, *, force_refresh: bool = False) -> str:
        """A valid access token; `force_refresh` bypasses every cache (after the API answered 401)."""
        ...


class AzureIdentityTokenProvider:
    """Wraps a sync azure-identity credential (ClientSecretCredential, DefaultAzureCredential...) for async use.

    Tokens are cached until `refresh_margin` seconds before expiry. `force_refresh` skips this cache *and*
    MSAL's: the request carries an `nbf` claims challenge (the same mechanism as a CAE challenge), which MSAL
    never answers from its cache.
    """

    def __init__(self, credential: TokenCredential, scope: str, *, refresh_margin: float = 300.0) -> None:
        self._credential = credential
        self._scope = scope
        self._refresh_margin = refresh_margin
        self._token: str | None = None
        self._expires_on = 0.0
        self._lock = asyncio.Lock()

    async def get_token(self, *, force_refresh: bool = False) -> str:
        async with self._lock:
            now = time.time()
            if not force_refresh and self._token is not None and self._expires_on - self._refresh_margin > now:
                return self._token
            claims = None
            if force_refresh:
                claims = json.dumps({"access_token": {"nbf": {"essential": True, "value": str(int(now))}}})
            try:
                access = await asyncio.to_thread(self._acquire, claims)
            except SyncError:
                raise
            except Exception as exc:
                raise _token_error(exc, self._scope) from exc
            token = str(access.token)
            self._token, self._expires_on = token, float(access.expires_on)
            return token

    def close(self) -> None:
        """Close the credential's HTTP session (its keep-alive connection to the token endpoint)."""
        closer = getattr(self._credential, "close", None)
        if callable(closer):
            closer()

    def _acquire(self, claims: str | None) -> Any:
        if claims is None:
            return self._credential.get_token(self._scope)
        try:
            return self._credential.get_token(self._scope, claims=claims)
        except TypeError:  # a credential without claims support: a plain fetch is the best we can do
            return self._credential.get_token(self._scope)


def _token_error(exc: BaseException, scope: str) -> SyncError:
    """Map an azure-identity failure: network problems are transient, rejected credentials are not."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ServiceRequestError | ServiceResponseError | OSError):
            return TransientError(f"{SYSTEM}: cannot reach the Entra ID token endpoint for scope {scope}: {cause}")
        cause = cause.__cause__
    message = str(getattr(exc, "message", None) or exc).strip()
    return AuthError(
        f"{SYSTEM}: Entra ID refused the token request for scope {scope}: {message} (check tenant id, client id, "
        "client secret and that the scope is '<org url>/.default')"
    )


def client_secret_token_provider(
    tenant_id: str,
    client_id: str,
    client_secret: str,
    scope: str,
    *,
    authority_host: str | None = None,
    ca_bundle: str | None = None,
) -> AzureIdentityTokenProvider:
    """Client-credentials provider over `azure.identity.ClientSecretCredential`.

    Args:
        tenant_id: Entra ID tenant (directory) id.
        client_id: Application (client) id of the app registration behind the Dataverse application user.
        client_secret: The secret *value*.
        scope: `https://<org>.crm.dynamics.com/.default`.
        authority_host: Custom authority (e.g. the simulator's https URL). MSAL accepts only https; instance
            discovery is disabled for a custom authority because login.microsoftonline.com cannot vouch for it.
        ca_bundle: PEM file to trust for the authority (azure-core `connection_verify`).
    """
    from azure.identity import ClientSecretCredential

    kwargs: dict[str, Any] = {}
    if authority_host is not None:
        kwargs["authority"] = authority_host
        kwargs["disable_instance_discovery"] = True
    if ca_bundle is not None:
        kwargs["connection_verify"] = ca_bundle
    credential = ClientSecretCredential(tenant_id, client_id, client_secret, **kwargs)
    return AzureIdentityTokenProvider(credential, scope)


def dataverse_token_provider(
    settings: DataverseSettings, *, ca_bundle: str | None = None
) -> AzureIdentityTokenProvider:
    """The composition root's provider: client secret when configured, else DefaultAzureCredential (managed id).

    The scope is `{settings.url}/.default`; `settings.authority_host` (the sandbox's https token endpoint) and
    `ca_bundle` (its test CA) are passed through for local runs.
    """
    scope = settings.url.rstrip("/") + "/.default"
    authority = settings.authority_host or None
    secret = settings.client_secret.get_secret_value()
    if secret:
        return client_secret_token_provider(settings.tenant_id, settings.client_id, secret, scope,
                                            authority_host=authority, ca_bundle=ca_bundle)
    from azure.identity import DefaultAzureCredential

    kwargs: dict[str, Any] = {}
    if authority is not None:
        kwargs["authority"] = authority
    if ca_bundle is not None:
        kwargs["connection_verify"] = ca_bundle
    if settings.client_id:
        kwargs["managed_identity_client_id"] = settings.client_id
    return AzureIdentityTokenProvider(DefaultAzureCredential(**kwargs), scope)


# ============================================================================================ helpers


@dataclass(frozen=True)
class TableInfo:
    """What the connector needs to know about a table (read once from EntityDefinitions)."""

    entity_set: str
    logical_name: str
    primary_id: str


def _is_guid(value: Any) -> bool:
    return isinstance(value, str) and bool(_GUID_RE.match(value))


def _ident(name: str, what: str) -> str:
    if not isinstance(name, str) or not _IDENT_RE.match(name):
        raise RejectedError(f"{SYSTEM}: {what} {name!r} is not a valid Dataverse name (letters, digits, '_')")
    return name


def _guid(value: Any, what: str) -> str:
    if isinstance(value, uuid.UUID):
        return str(value)
    if not _is_guid(value):
        raise RejectedError(f"{SYSTEM}: {what} must be a GUID, got {value!r}")
    return str(value).lower()


def _utc_text(value: datetime) -> str:
    return iso_z(value)


def _parse_datetime(value: Any) -> datetime | None:
    """ISO-8601 text as aware UTC; None when absent, malformed or out of range (the row keeps its raw value)."""
    return parse_iso(value)


def _jsonable(value: Any, column: str) -> Any:
    """Canonical value -> JSON for the Web API (dates as text, decimals as floats)."""
    if isinstance(value, datetime):
        return _utc_text(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise RejectedError(f"{SYSTEM}: column {column!r} has a non-finite number ({value})")
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _quote_text(value: str) -> str:
    """An OData string literal: single quotes doubled (never let a value close the literal)."""
    return "'" + value.replace("'", "''") + "'"


def _error_parts(body: bytes | str) -> tuple[str, str]:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return "", text.strip()[:500]
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        return str(err.get("code") or ""), str(err.get("message") or "").strip()
    return "", text.strip()[:500]


def _map_status(status: int, detail: str, headers: Mapping[str, str] | httpx.Headers) -> SyncError:
    """Map a failed HTTP status to the error tree (callers refine 404/504 by context)."""
    if status == 429:
        raw = headers.get("Retry-After")
        retry = None
        if raw is not None:
            try:
                retry = max(0.0, float(raw))
            except ValueError:
                retry = None
        return ThrottledError(detail, retry_after=retry)
    if status == 504:
        return AmbiguousWriteError(detail)
    if status in RETRIABLE_STATUS or status >= 500:
        return TransientError(detail)
    if status in (401, 403):
        return AuthError(detail)
    return RejectedError(detail)


def _rewrap(exc: RetriableError, context: str) -> RetriableError:
    detail = f"{context}: {exc.detail}"
    if isinstance(exc, ThrottledError):
        return ThrottledError(detail, retry_after=exc.retry_after)
    if isinstance(exc, AmbiguousWriteError):
        return AmbiguousWriteError(detail)
    return TransientError(detail)


@dataclass
class _PartResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    content_id: str | None


def _boundary(content_type: str) -> str | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.I)
    return m.group(1) if m else None


def _split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    delim = b"--" + boundary.encode()
    parts: list[tuple[dict[str, str], bytes]] = []
    for piece in body.split(delim)[1:]:
        if piece.startswith(b"--"):
            break
        piece = piece[2:] if piece.startswith(b"\r\n") else piece[1:] if piece.startswith(b"\n") else piece
        head, sep, content = piece.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = piece.partition(b"\n\n")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").splitlines():
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        if content.endswith(b"\r\n"):
            content = content[:-2]
        elif content.endswith(b"\n"):
            content = content[:-1]
        parts.append((headers, content))
    return parts


def _parse_http_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    lines = head.decode("latin-1").splitlines()
    m = re.match(r"^HTTP/\d\.\d\s+(\d{3})", lines[0].strip()) if lines else None
    if m is None:
        raise TransientError(f"{SYSTEM}: malformed $batch response part (no status line): {data[:120]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return int(m.group(1)), headers, body.strip(b"\r\n")


def parse_batch_response(body: bytes, content_type: str) -> list[list[_PartResponse]]:
    """Split a $batch response into one list of responses per top-level part (a change set or a request)."""
    boundary = _boundary(content_type)
    if boundary is None:
        raise TransientError(f"{SYSTEM}: $batch response has no multipart boundary ({content_type!r})")
    out: list[list[_PartResponse]] = []
    for headers, content in _split_multipart(body, boundary):
        ctype = headers.get("content-type", "")
        if ctype.lower().startswith("multipart/mixed"):
            inner = _boundary(ctype)
            if inner is None:
                raise TransientError(f"{SYSTEM}: $batch change set response has no boundary")
            group = []
            for inner_headers, inner_content in _split_multipart(content, inner):
                status, resp_headers, resp_body = _parse_http_response(inner_content)
                group.append(_PartResponse(status, resp_headers, resp_body, inner_headers.get("content-id")))
            out.append(group)
        else:
            status, resp_headers, resp_body = _parse_http_response(content)
            out.append([_PartResponse(status, resp_headers, resp_body, headers.get("content-id"))])
    return out


@dataclass
class _Prepared:
    index: int
    op: WriteOp
    info: TableInfo
    method: str
    url: str
    """Path + query from the host root (what goes on the request line inside the batch)."""
    headers: dict[str, str]
    body: bytes | None
    key_desc: str


# ============================================================================================ client


class DataverseClient:
    """Dataverse Web API v9.2 client implementing `RecordSink` and `ChangeSource` (canonical record values).

    Canonical values (`SourceRecord.values`): logical attribute names; lookups under the logical name holding
    the lowercase GUID (`_x_value` -> `x`); choices as int; decimals as float; dates "YYYY-MM-DD"; datetimes
    "YYYY-MM-DDTHH:MM:SSZ". `SourceRecord.key` is the lowercase primary GUID, `version` the @odata.etag.
    """

    system = SYSTEM

    def __init__(
        self,
        base_url: str,
        http: httpx.AsyncClient,
        token_provider: TokenProvider,
        *,
        batch_size: int = 500,
        policy: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass, safe as a default
        max_concurrency: int = 4,
        page_size: int = MAX_PAGE_SIZE,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE} (the Dataverse $batch limit)")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        parsed = urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be the org URL, e.g. https://org.crm.dynamics.com, got {base_url!r}")
        self.base_url = f"{parsed.scheme}://{parsed.netloc}"
        self.api_root = self.base_url + API_PATH
        self._http = http
        self._tokens = token_provider
        self.batch_size = batch_size
        self._policy = policy
        self._max_concurrency = max_concurrency
        self._page_size = page_size
        self._sleep = sleep
        self._tables: dict[str, TableInfo] = {}
        self._by_logical: dict[str, TableInfo] = {}
        self._lookup_columns: dict[str, frozenset[str]] = {}

    # ------------------------------------------------------------------------------------ HTTP core

    async def _send(
        self,
        method: str,
        url: str,
        *,
        what: str,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        write: bool = False,
    ) -> httpx.Response:
        """One logical call: bearer auth (one refresh-and-replay on 401) and short retries via send_with_retry.

        A write answered 504 is not retried here: it may have been applied (AmbiguousWriteError).
        """
        refreshed = False
        retriable = RETRIABLE_STATUS - {504} if write else RETRIABLE_STATUS
        while True:
            token = await self._tokens.get_token(force_refresh=refreshed)
            all_headers = {
                "Accept": "application/json",
                "OData-MaxVersion": "4.0",
                "OData-Version": "4.0",
                "Authorization": f"Bearer {token}",
            }
            if method == "GET":
                all_headers["If-None-Match"] = "null"
            if content is not None and "Content-Type" not in (headers or {}):
                all_headers["Content-Type"] = "application/json"
            all_headers.update(headers or {})

            async def attempt(h: dict[str, str] = all_headers) -> httpx.Response:
                return await self._http.request(method, url, params=params, content=content, headers=h)

            try:
                response = await send_with_retry(attempt, system=SYSTEM, policy=self._policy, sleep=self._sleep,
                                                  retriable_status=retriable)
            except RetriableError as exc:
                raise _rewrap(exc, f"{SYSTEM} {what}") from exc
            if response.status_code == 401:
                if refreshed:
                    challenge = response.headers.get("WWW-Authenticate", "")
                    raise AuthError(
                        f"{SYSTEM} {what}: HTTP 401 even after a token refresh ({challenge or 'no challenge'}); check "
                        "that the app registration is an application user of this environment with a security role"
                    )
                log.info("%s %s: HTTP 401, refreshing the token once and replaying", SYSTEM, what)
                refreshed = True
                continue
            if write and response.status_code == 504:
                code, message = _error_parts(response.content)
                raise AmbiguousWriteError(
                    f"{SYSTEM} {what}: HTTP 504 (the write may have been applied; replaying is safe because "
                    f"Syncline's writes are idempotent upserts) {code} {message}".strip()
                )
            return response

    def _raise_for(self, response: httpx.Response, what: str) -> None:
        if response.is_success:
            return
        code, message = _error_parts(response.content)
        detail = f"{SYSTEM} {what}: HTTP {response.status_code}{' ' + code if code else ''}: {message}"
        raise _map_status(response.status_code, detail, response.headers)

    async def _get_json(self, url: str, *, what: str, params: Mapping[str, str] | None = None,
                        prefer: str | None = None) -> dict[str, Any]:
        headers = {"Prefer": prefer} if prefer else None
        response = await self._send("GET", url, what=what, params=params, headers=headers)
        self._raise_for(response, what)
        return json_object(response, system=SYSTEM, what=what)

    def _follow(self, link: str) -> str:
        return rebase_link(link, base_url=self.base_url, path_prefix=API_PATH, system=SYSTEM, error=RejectedError)

    # ------------------------------------------------------------------------------------ metadata

    async def _table(self, entity_set: str) -> TableInfo:
        info = self._tables.get(entity_set)
        if info is not None:
            return info
        _ident(entity_set, "entity set")
        data = await self._get_json(
            self.api_root + "EntityDefinitions", what=f"metadata of {entity_set}",
            params={"$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
                    "$filter": f"EntitySetName eq {_quote_text(entity_set)}"},
        )
        rows = data.get("value") or []
        if not rows:
            raise RejectedError(f"{SYSTEM}: no table has the entity set name {entity_set!r} in this environment")
        return self._remember(rows[0])

    def _remember(self, row: Mapping[str, Any]) -> TableInfo:
        info = TableInfo(str(row["EntitySetName"]), str(row["LogicalName"]), str(row["PrimaryIdAttribute"]))
        self._tables[info.entity_set] = info
        self._by_logical[info.logical_name] = info
        return info

    async def lookup_columns(self, entity_set: str) -> frozenset[str]:
        """Logical names of a table's lookup columns (Lookup, Customer, Owner), read once from its attributes."""
        info = await self._table(entity_set)
        cached = self._lookup_columns.get(info.logical_name)
        if cached is not None:
            return cached
        what = f"attribute metadata of {info.logical_name}"
        data = await self._get_json(
            f"{self.api_root}EntityDefinitions(LogicalName={_quote_text(info.logical_name)})/Attributes", what=what,
            params={"$select": "LogicalName,AttributeType"})
        names = frozenset(str(a["LogicalName"]) for a in data.get("value") or []
                          if isinstance(a, dict) and a.get("AttributeType") in LOOKUP_ATTRIBUTE_TYPES)
        self._lookup_columns[info.logical_name] = names
        return names

    async def _filter_name(self, info: TableInfo, name: str, values: Sequence[Any]) -> str:
        """The property a filter on `name` uses: a lookup's logical name (what records and the engine use, e.g.
        salesorderid) becomes its `_x_value` property; anything else is already a property name."""
        if name == info.primary_id or _LOOKUP_VALUE_RE.match(name):
            return name
        items = [v for v in values if v is not None]
        if items and not all(isinstance(v, uuid.UUID) or _is_guid(v) for v in items):
            return name  # a lookup only holds GUIDs: no need to ask the metadata about other values
        return f"_{name}_value" if name in await self.lookup_columns(info.entity_set) else name

    async def entity_set_for(self, logical_name: str) -> str:
        """The entity set name of a table (EntityDefinitions, cached)."""
        info = self._by_logical.get(logical_name)
        if info is not None:
            return info.entity_set
        _ident(logical_name, "table logical name")
        url = f"{self.api_root}EntityDefinitions(LogicalName={_quote_text(logical_name)})"
        response = await self._send("GET", url, what=f"metadata of {logical_name}",
                                    params={"$select": "LogicalName,EntitySetName,PrimaryIdAttribute"})
        if response.status_code == 404:
            raise RejectedError(f"{SYSTEM}: no table with logical name {logical_name!r} in this environment")
        self._raise_for(response, f"metadata of {logical_name}")
        return self._remember(response.json()).entity_set

    async def logical_name_for(self, entity_set: str) -> str:
        """The logical name of the table behind an entity set (cached)."""
        return (await self._table(entity_set)).logical_name

    async def primary_id_for(self, entity_set: str) -> str:
        """The primary id column of the table behind an entity set (cached)."""
        return (await self._table(entity_set)).primary_id

    async def choice_options(self, logical_name: str, attribute: str) -> dict[int, str]:
        """Option value -> label of a choice column, read from live metadata (local or global option set)."""
        _ident(logical_name, "table logical name")
        _ident(attribute, "column name")
        url = (f"{self.api_root}EntityDefinitions(LogicalName={_quote_text(logical_name)})/Attributes(LogicalName="
               f"{_quote_text(attribute)})/Microsoft.Dynamics.CRM.PicklistAttributeMetadata")
        what = f"choice metadata of {logical_name}.{attribute}"
        response = await self._send("GET", url, what=what, params={
            "$select": "LogicalName", "$expand": "OptionSet($select=Options),GlobalOptionSet($select=Options)"})
        self._raise_for(response, what)
        data = response.json()
        option_set = data.get("OptionSet") or data.get("GlobalOptionSet") or {}
        out: dict[int, str] = {}
        for option in option_set.get("Options") or []:
            label = (option.get("Label") or {}).get("UserLocalizedLabel") or {}
            localized = (option.get("Label") or {}).get("LocalizedLabels") or [{}]
            out[int(option["Value"])] = str(label.get("Label") or localized[0].get("Label") or "")
        return out

    async def ping(self) -> None:
        """WhoAmI: proves the token, the URL and the application user (raises the mapped error otherwise)."""
        data = await self._get_json(self.api_root + "WhoAmI", what="WhoAmI")
        if not _is_guid(data.get("UserId")):
            raise TransientError(f"{SYSTEM} WhoAmI: unexpected response {data!r}")

    # ------------------------------------------------------------------------------------ records

    def _record(self, info: TableInfo, row: Mapping[str, Any]) -> SourceRecord:
        values: dict[str, Any] = {}
        for name, value in row.items():
            if "@" in name:
                continue  # @odata.etag and instance annotations are metadata, not columns
            m = _LOOKUP_VALUE_RE.match(name)
            if m is not None:
                values[m.group("name")] = value.lower() if isinstance(value, str) else value
            else:
                values[name] = value
        key = str(row.get(info.primary_id) or "").lower()
        if info.primary_id in values:
            values[info.primary_id] = key
        etag = row.get("@odata.etag")
        return SourceRecord(key=key, values=values, modified=_parse_datetime(row.get("modifiedon")),
                            version=str(etag) if etag is not None else None)

    def _filter_literal(self, info: TableInfo, field_name: str, value: Any) -> str:
        guid_field = field_name == info.primary_id or bool(_LOOKUP_VALUE_RE.match(field_name))
        if value is None:
            return "null"
        if guid_field or isinstance(value, uuid.UUID):
            return _guid(value, f"value of {field_name}")
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float | Decimal):
            number = float(value)
            if not math.isfinite(number):
                raise RejectedError(f"{SYSTEM}: cannot filter {field_name} on non-finite number {value}")
            return repr(number)
        if isinstance(value, datetime):
            return _utc_text(value)
        if isinstance(value, date):
            return value.isoformat()
        if isinstance(value, str):
            return _quote_text(value)
        raise RejectedError(f"{SYSTEM}: cannot filter {field_name} on a {type(value).__name__} value")

    def _in_literal(self, info: TableInfo, field_name: str, value: Any) -> str:
        # Microsoft.Dynamics.CRM.In/NotIn take every value as a string literal.
        guid_field = field_name == info.primary_id or bool(_LOOKUP_VALUE_RE.match(field_name))
        if guid_field:
            return _quote_text(_guid(value, f"value of {field_name}"))
        if isinstance(value, bool):
            return _quote_text("true" if value else "false")
        if isinstance(value, int | str):
            return _quote_text(str(value))
        raise RejectedError(f"{SYSTEM}: cannot use a {type(value).__name__} value in a list filter on {field_name}")

    def _any_of(self, info: TableInfo, field_name: str, values: Sequence[Any]) -> str:
        """A filter clause true when the field equals any of `values` (None meaning a null field)."""
        items = [v for v in values if v is not None]
        clauses: list[str] = []
        guid_field = field_name == info.primary_id or bool(_LOOKUP_VALUE_RE.match(field_name))
        # In takes its values as string literals: fine for text, whole numbers, choices and GUIDs; booleans,
        # decimals and dates keep their typed literals in an `or` chain instead.
        if items and all(guid_field or (isinstance(v, int | str) and not isinstance(v, bool)) for v in items):
            listed = ",".join(self._in_literal(info, field_name, v) for v in items)
            clauses.append(f"Microsoft.Dynamics.CRM.In(PropertyName='{field_name}',PropertyValues=[{listed}])")
        else:
            clauses += [f"{field_name} eq {self._filter_literal(info, field_name, v)}" for v in items]
        if len(items) < len(values):
            clauses.append(f"{field_name} eq null")
        return clauses[0] if len(clauses) == 1 else "(" + " or ".join(clauses) + ")"

    async def _query(self, info: TableInfo, params: Mapping[str, str] | None, what: str) -> list[SourceRecord]:
        records: list[SourceRecord] = []
        url: str | None = self.api_root + info.entity_set
        prefer = f"odata.maxpagesize={self._page_size}"
        while url is not None:
            data = await self._get_json(url, what=what, params=params, prefer=prefer)
            records.extend(self._record(info, row) for row in data.get("value") or [])
            link = data.get("@odata.nextLink")
            url, params = (self._follow(link), None) if link else (None, None)
        return records

    async def select(
        self,
        table: str,
        *,
        equals: Mapping[str, Any],
        not_in: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[SourceRecord]:
        """Records whose fields equal `equals` and are not in `not_in`; every value is escaped or validated.

        Field names are Web API property names (a lookup is `_x_value` and takes a GUID) or a lookup's logical
        name as records carry it (`salesorderid`, the polymorphic `customerid`), which the table's attribute
        metadata (read once) turns into `_x_value`. Strings are quoted with quotes doubled, GUID fields are
        validated and go unquoted, anything else unsupported is refused before a request is made. A list or
        tuple value in `equals` matches any of its values (`Microsoft.Dynamics.CRM.In`, or an `or` chain for
        values In cannot carry); an empty one matches nothing, so no request is made.
        """
        if any(isinstance(value, list | tuple) and not value for value in equals.values()):
            return []  # "any of nothing" matches nothing; not even the table's metadata is needed
        info = await self._table(table)
        clauses: list[str] = []
        for name, value in equals.items():
            _ident(name, "filter field")
            if isinstance(value, list | tuple):
                name = await self._filter_name(info, name, value)
                clauses.append(self._any_of(info, name, value))
            else:
                name = await self._filter_name(info, name, [value])
                clauses.append(f"{name} eq {self._filter_literal(info, name, value)}")
        for name, values in (not_in or {}).items():
            _ident(name, "filter field")
            if isinstance(values, str | bytes):
                raise RejectedError(f"{SYSTEM}: not_in[{name!r}] must be a list of values, not a string")
            items = [v for v in values if v is not None]
            if not items:
                continue
            name = await self._filter_name(info, name, items)
            listed = ",".join(self._in_literal(info, name, v) for v in items)
            # A null column is "not in" any list: say so explicitly rather than rely on SQL NOT IN semantics.
            clauses.append(f"(Microsoft.Dynamics.CRM.NotIn(PropertyName='{name}',PropertyValues=[{listed}]) or "
                           f"{name} eq null)")
        params = {"$filter": " and ".join(clauses)} if clauses else None
        return await self._query(info, params, f"select from {table}")

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        """Read records by primary key, 100 per query with Microsoft.Dynamics.CRM.In (missing keys are absent)."""
        info = await self._table(table)
        wanted = sorted({_guid(k, f"{table} key") for k in keys})
        if not wanted:
            return {}
        # 100 GUIDs make a ~4.3 KB URL, well inside the 32 KB limit of the Web API.
        chunks = [wanted[i:i + 100] for i in range(0, len(wanted), 100)]
        semaphore = asyncio.Semaphore(self._max_concurrency)

        async def one(chunk: list[str]) -> list[SourceRecord]:
            listed = ",".join(_quote_text(k) for k in chunk)
            params = {"$filter": f"Microsoft.Dynamics.CRM.In(PropertyName='{info.primary_id}',"
                                 f"PropertyValues=[{listed}])"}
            async with semaphore:
                return await self._query(info, params, f"fetch from {table}")

        out: dict[str, SourceRecord] = {}
        for records in await asyncio.gather(*(one(c) for c in chunks)):
            out.update((r.key, r) for r in records)
        return out

    # ------------------------------------------------------------------------------------ ChangeSource

    async def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        """Every record of a table, page by page (`Prefer: odata.maxpagesize`, nextLink followed verbatim)."""
        info = await self._table(table)
        url: str | None = self.api_root + info.entity_set
        while url is not None:
            data = await self._get_json(url, what=f"scan of {table}", prefer=f"odata.maxpagesize={self._page_size}")
            yield [self._record(info, row) for row in data.get("value") or []]
            link = data.get("@odata.nextLink")
            url = self._follow(link) if link else None

    async def changes_since(self, table: str, checkpoint: str | None) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """Change tracking: pages of changed records (deletes flagged), each with the checkpoint valid after it.

        `checkpoint=None` starts a full tracked read. The checkpoint is the URL to read next: a nextLink while
        a read is in progress, then the @odata.deltaLink (opaque; store it as-is).
        """
        info = await self._table(table)
        url = self._follow(checkpoint) if checkpoint else self.api_root + info.entity_set
        prefer = f"odata.track-changes,odata.maxpagesize={self._page_size}"
        while True:
            data = await self._get_json(url, what=f"changes of {table}", prefer=prefer)
            records: list[SourceRecord] = []
            for row in data.get("value") or []:
                context = str(row.get("@odata.context") or "")
                if context.endswith("/$deletedEntity") or ("id" in row and row.get("reason") == "deleted"):
                    records.append(SourceRecord(key=str(row["id"]).lower(), values={}, deleted=True))
                else:
                    records.append(self._record(info, row))
            next_link, delta_link = data.get("@odata.nextLink"), data.get("@odata.deltaLink")
            if next_link:
                yield records, str(next_link)
                url = self._follow(next_link)
                continue
            if not delta_link:
                raise TransientError(f"{SYSTEM} changes of {table}: response has neither @odata.nextLink nor "
                                     "@odata.deltaLink (is change tracking enabled on the table?)")
            yield records, str(delta_link)
            return

    async def fetch_attachment(self, table: str, key: str, attachment_id: str) -> bytes:
        """Download a note's (annotation's) document body; it must belong to record `key`."""
        record_key = _guid(key, f"{table} key")
        note_id = _guid(attachment_id, "attachment id")
        what = f"attachment {note_id} of {table}({record_key})"
        response = await self._send("GET", f"{self.api_root}annotations({note_id})", what=what,
                                    params={"$select": "documentbody,filename,_objectid_value"})
        if response.status_code == 404:
            raise RejectedError(f"{SYSTEM}: {what} does not exist")
        self._raise_for(response, what)
        data = response.json()
        owner = str(data.get("_objectid_value") or "").lower()
        if owner != record_key:
            raise RejectedError(f"{SYSTEM}: note {note_id} belongs to record {owner or 'none'}, not {record_key}")
        try:
            return base64.b64decode(data.get("documentbody") or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RejectedError(f"{SYSTEM}: {what} has an invalid base64 documentbody") from exc

    # ------------------------------------------------------------------------------------ RecordSink.write

    def _key_segment(self, op: WriteOp, info: TableInfo) -> tuple[str, str]:
        """`(guid)` or `(col='v',...)` for the op's record, plus a human-readable key for error details."""
        if op.key is not None:
            guid = _guid(op.key, f"{op.table} key")
            return f"({guid})", guid
        if not op.match:
            raise RejectedError(f"{SYSTEM}: {op.action} on {op.table} needs a key or a match (alternate key)")
        parts: list[str] = []
        for name, value in op.match.items():
            _ident(name, "alternate key column")
            raw: Any = value
            if raw is None:
                raise RejectedError(f"{SYSTEM}: alternate key column {name!r} of {op.table} has no value")
            if isinstance(raw, bool):
                literal = "true" if raw else "false"
            elif isinstance(raw, int | float):
                literal = str(raw)
            else:
                # Quote doubling keeps the value inside the literal; percent-encoding keeps the URL intact.
                literal = "'" + quote(str(raw).replace("'", "''"), safe="") + "'"
            parts.append(f"{name}={literal}")
        desc = ",".join(f"{k}={v!r}" for k, v in op.match.items())
        return "(" + ",".join(parts) + ")", desc

    def _prepare(self, index: int, op: WriteOp, info: TableInfo) -> _Prepared:
        segment, key_desc = self._key_segment(op, info)
        path = f"{API_PATH}{info.entity_set}{segment}"
        headers: dict[str, str] = {}
        if op.action == "delete":
            return _Prepared(index, op, info, "DELETE", path, headers, None, key_desc)
        if op.action not in ("upsert", "update"):
            raise RejectedError(f"{SYSTEM}: unknown write action {op.action!r}")
        body: dict[str, Any] = {}
        skip = {GEOMETRY_KEY, ATTACHMENTS_KEY, info.primary_id, *(op.match or {})}
        for name, value in op.values.items():
            if name in skip:
                continue  # key columns never go in the body of a write through that key
            _ident(name, "column")
            body[name] = _jsonable(value, name)
        for nav, bind in op.binds.items():
            _ident(nav, "navigation property")
            _ident(bind.entity_set, "entity set")
            body[f"{nav}@odata.bind"] = f"/{bind.entity_set}({_guid(bind.key, f'{nav} bind key')})"
        headers["Content-Type"] = "application/json; type=entry"
        headers["Prefer"] = "return=representation"
        if op.action == "update":
            headers["If-Match"] = "*"  # update only: never create a record that was deleted meanwhile
        return _Prepared(index, op, info, "PATCH", f"{path}?$select={info.primary_id}", headers,
                         json.dumps(body, separators=(",", ":")).encode(), key_desc)

    def _batch_body(self, items: Sequence[_Prepared], boundary: str) -> bytes:
        chunks: list[bytes] = []
        for n, item in enumerate(items, start=1):
            changeset = f"changeset_{uuid.uuid4().hex}"
            lines = [f"--{boundary}", f"Content-Type: multipart/mixed; boundary={changeset}", "",
                     f"--{changeset}", "Content-Type: application/http", "Content-Transfer-Encoding: binary",
                     f"Content-ID: {n}", "", f"{item.method} {item.url} HTTP/1.1"]
            lines += [f"{k}: {v}" for k, v in item.headers.items()]
            lines += [""]
            text = "\r\n".join(lines) + "\r\n"
            chunks.append(text.encode() + (item.body or b"") + f"\r\n--{changeset}--\r\n".encode())
        chunks.append(f"--{boundary}--\r\n".encode())
        return b"".join(chunks)

    def _result(self, item: _Prepared, part: _PartResponse) -> WriteResult:
        op, info = item.op, item.info
        where = f"{op.action} {op.table}({item.key_desc}) [op {op.op_id}]"
        if 200 <= part.status < 300:
            key: str | None = None
            if part.body:
                try:
                    data = json.loads(part.body)
                    key = data.get(info.primary_id) if isinstance(data, dict) else None
                except ValueError:
                    key = None
            if key is None:
                m = _ENTITY_ID_RE.search(part.headers.get("odata-entityid", ""))
                key = m.group("id") if m else op.key
            return WriteResult(op.op_id, True, key=key.lower() if key else None, created=part.status == 201)
        if op.action == "delete" and part.status == 404:
            return WriteResult(op.op_id, True, key=op.key)  # already gone: the delete's goal holds
        code, message = _error_parts(part.body)
        detail = f"{SYSTEM} {where}: HTTP {part.status}{' ' + code if code else ''}: {message}"
        error: SyncError = _map_status(part.status, detail, part.headers)
        if part.status == 404 and op.action == "update" and info.logical_name in message:
            error = RejectedError(f"{SYSTEM} {where}: record no longer exists in Dataverse ({message})")
        elif part.status == 404:
            error = RejectedError(f"{SYSTEM} {where}: a record it refers to does not exist ({message})")
        elif part.status == 412:
            error = RejectedError(f"{SYSTEM} {where}: precondition failed - another record already has these key "
                                  f"values or the record changed ({code}: {message})")
        return WriteResult(op.op_id, False, key=op.key, error=error)

    async def _send_batch(self, items: Sequence[_Prepared]) -> list[WriteResult]:
        boundary = f"batch_{uuid.uuid4()}"
        what = f"$batch of {len(items)} writes"
        response = await self._send(
            "POST", self.api_root + "$batch", what=what, content=self._batch_body(items, boundary), write=True,
            headers={"Content-Type": f'multipart/mixed; boundary="{boundary}"', "Prefer": "odata.continue-on-error"},
        )
        self._raise_for(response, what)
        groups = parse_batch_response(response.content, response.headers.get("Content-Type", ""))
        by_position: dict[int, _PartResponse] = {}
        for position, group in enumerate(groups, start=1):
            for part in group:
                cid = part.content_id
                slot = int(cid) if cid is not None and cid.isdigit() else position
                by_position[slot] = part
        results: list[WriteResult] = []
        for n, item in enumerate(items, start=1):
            found = by_position.get(n)
            if found is None:
                results.append(WriteResult(item.op.op_id, False, key=item.op.key, error=TransientError(
                    f"{SYSTEM} {what}: no response part for op {item.op.op_id} (Content-ID {n})")))
            else:
                results.append(self._result(item, found))
        return results

    async def _resolve_url_unsafe_key(self, op: WriteOp) -> WriteOp | WriteResult:
        """An alternate key that cannot travel in a URL: find the record by $filter and write it by GUID.

        Idempotent like the URL form: a replay finds the record created the first time, and the alternate-key
        index still refuses a concurrent duplicate (412).
        """
        match = dict(op.match or {})
        found = await self.select(op.table, equals=match)
        if len(found) > 1:
            return WriteResult(op.op_id, False, error=RejectedError(
                f"{SYSTEM} {op.action} {op.table} [op {op.op_id}]: {len(found)} records match {match}"))
        if not found:
            if op.action == "delete":
                return WriteResult(op.op_id, True)
            if op.action == "update":
                return WriteResult(op.op_id, False, error=RejectedError(
                    f"{SYSTEM} update {op.table}({match}) [op {op.op_id}]: record no longer exists in Dataverse"))
        key = found[0].key if found else str(uuid.uuid4())
        return WriteOp(op.op_id, op.action, op.table, key=key, match=None, values={**op.values, **match},
                       binds=op.binds, attachments=op.attachments, correlation_id=op.correlation_id)

    async def _write_batches(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        results: list[WriteResult | None] = [None] * len(ops)
        prepared: list[_Prepared] = []
        for index, op in enumerate(ops):
            try:
                info = await self._table(op.table)
                if op.key is None and any(isinstance(v, str) and _URL_UNSAFE_KEY_CHARS & set(v)
                                          for v in (op.match or {}).values()):
                    resolved = await self._resolve_url_unsafe_key(op)
                    if isinstance(resolved, WriteResult):
                        results[index] = resolved
                        continue
                    op = resolved
                prepared.append(self._prepare(index, op, info))
            except RejectedError as exc:
                results[index] = WriteResult(op.op_id, False, key=op.key, error=exc)
        chunks = [prepared[i:i + self.batch_size] for i in range(0, len(prepared), self.batch_size)]
        semaphore = asyncio.Semaphore(self._max_concurrency)

        async def run(chunk: list[_Prepared]) -> list[WriteResult]:
            async with semaphore:
                return await self._send_batch(chunk)

        outcomes = await asyncio.gather(*(run(c) for c in chunks), return_exceptions=True)
        for chunk, outcome in zip(chunks, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                # The caller re-queues the whole call; every op is an idempotent upsert/update/delete.
                raise outcome
            for item, result in zip(chunk, outcome, strict=True):
                results[item.index] = result
        return [r for r in results if r is not None]

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """Apply ops through `$batch` (one change set per op, continue-on-error); one result per op, in order.

        Attachments go in as notes after their record was written (idempotent: existing markers are skipped
        and each note has a deterministic id). A failing part fails only its op; a batch request that fails as
        a whole raises (throttling, transient, auth) so the caller re-queues.
        """
        if not ops:
            return []
        results = await self._write_batches(ops)
        pending = [i for i, op in enumerate(ops) if op.attachments and op.action != "delete" and results[i].ok]
        if pending:
            semaphore = asyncio.Semaphore(self._max_concurrency)

            async def attach(i: int) -> None:
                async with semaphore:
                    results[i] = await self._attach(ops[i], results[i])

            await asyncio.gather(*(attach(i) for i in pending))
        return results

    async def _attach(self, op: WriteOp, result: WriteResult) -> WriteResult:
        key = result.key
        if key is None:
            return WriteResult(op.op_id, False, key=None, created=result.created, error=RejectedError(
                f"{SYSTEM} {op.table} [op {op.op_id}]: record written but its key is unknown; attachments not sent"))
        info = await self._table(op.table)
        existing = await self._query(
            await self._table("annotations"),
            {"$select": "annotationid,notetext", "$filter": f"_objectid_value eq {key}"},
            f"notes of {op.table}({key})",
        )
        markers = {line.strip() for r in existing for line in str(r.values.get("notetext") or "").splitlines()}
        notes = [self._note_op(op, info, key, a) for a in op.attachments
                 if f"{ANNOTATION_MARKER}{a.source_id}" not in markers]
        if not notes:
            return result
        for note_result in await self._write_batches(notes):
            if note_result.ok:
                continue
            context = f"{SYSTEM} {op.table}({key}) [op {op.op_id}]: record written, but a note failed"
            error: SyncError
            if isinstance(note_result.error, RetriableError):
                error = _rewrap(note_result.error, context)
            else:
                error = RejectedError(f"{context}: {note_result.error.detail if note_result.error else 'no detail'}")
            return WriteResult(op.op_id, False, key=key, created=result.created, error=error)
        return result

    def _note_op(self, op: WriteOp, info: TableInfo, key: str, attachment: Attachment) -> WriteOp:
        note_id = uuid.uuid5(_ANNOTATION_NAMESPACE, f"{info.entity_set}:{key}:{attachment.source_id}")
        return WriteOp(
            op_id=f"{op.op_id}#note:{attachment.source_id}",
            action="upsert",
            table="annotations",
            key=str(note_id),
            values={
                "subject": attachment.name[:500],
                "notetext": f"{ANNOTATION_MARKER}{attachment.source_id}",
                "filename": attachment.name[:255],
                "mimetype": attachment.content_type,
                "documentbody": base64.b64encode(attachment.data).decode("ascii"),
            },
            binds={f"objectid_{info.logical_name}": Bind(info.entity_set, key)},
            correlation_id=op.correlation_id,
        )


# ============================================================================================ webhooks


@dataclass(frozen=True)
class DataverseWebhookChange:
    """One change delivered by a Dataverse webhook (a RemoteExecutionContext), in canonical form."""

    message_name: Literal["Create", "Update", "Delete"]
    entity: str
    """Logical name of the table (PrimaryEntityName)."""
    key: str
    record: SourceRecord
    """Canonical values: Target merged with the post-image (full state); for Delete the pre-image."""
    correlation_id: str
    operation_created_on: datetime
    depth: int
    initiating_user_id: str
    """The user who started the operation: Syncline's application user for its own writes (echo check)."""
    user_id: str | None = None
    shared_variables: dict[str, Any] = field(default_factory=dict)


def _kv(value: Any, where: str) -> dict[str, Any]:
    """DataContract `[{key, value}]` list -> dict."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, list):
        raise EnvelopeError(f"webhook body: {where} must be a list of {{key, value}} pairs, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for item in value:
        if not isinstance(item, Mapping) or "key" not in item:
            raise EnvelopeError(f"webhook body: {where} has an entry without a 'key': {item!r}"[:300])
        out[str(item["key"])] = item.get("value")
    return out


def _wcf_date(value: Any, where: str) -> datetime:
    moment = parse_wcf_date(value)
    if moment is None:
        raise EnvelopeError(f"webhook body: {where} is not a /Date(ms)/ value in range (years 1-9999): "
                            f"{value!r}"[:300])
    return moment


def _canonical(name: str, value: Any, where: str, date_only: Collection[str]) -> tuple[bool, Any]:
    """(keep, canonical value) for one DataContract attribute value."""
    if value is None:
        return True, None
    if isinstance(value, str):
        if value.startswith(("/Date(", "\\/Date(")):
            if not is_wcf_date(value):
                raise EnvelopeError(f"webhook body: {where} attribute {name!r} is not a /Date(ms)/ value: "
                                    f"{value!r}"[:300])
            moment = parse_wcf_date(value)
            if moment is None:
                # A well-formed date out of range (year 0, 99999) is this record's problem, not the body's: it
                # is kept raw, and a flow that maps the column dead-letters the record with the column named.
                return True, value
            return True, moment.date().isoformat() if name in date_only else _utc_text(moment)
        return True, value
    if isinstance(value, bool | int | float):
        return True, value
    if isinstance(value, Mapping):
        type_name = str(value.get("__type") or "").split(":", 1)[0]
        if type_name == "EntityReference" or (not type_name and "LogicalName" in value and "Id" in value):
            ref = value.get("Id")
            if not _is_guid(ref):
                raise EnvelopeError(f"webhook body: {where} attribute {name!r} has an EntityReference without a "
                                    f"GUID Id: {ref!r}")
            return True, str(ref).lower()
        if type_name in ("OptionSetValue", "Money", "BooleanManagedProperty") or (not type_name and "Value" in value):
            raw = value.get("Value")
            if type_name == "OptionSetValue":
                if isinstance(raw, bool) or not isinstance(raw, int):
                    raise EnvelopeError(f"webhook body: {where} attribute {name!r} OptionSetValue has no integer Value")
                return True, raw
            if type_name == "Money":
                if isinstance(raw, bool) or not isinstance(raw, int | float):
                    raise EnvelopeError(f"webhook body: {where} attribute {name!r} Money has no numeric Value")
                return True, float(raw)
            return True, raw
        if type_name == "OptionSetValueCollection":
            items = value.get("Values") or []
            codes = [v.get("Value") for v in items if isinstance(v, Mapping)] if isinstance(items, list) else None
            if codes is None or any(isinstance(c, bool) or not isinstance(c, int) for c in codes):
                raise EnvelopeError(f"webhook body: {where} attribute {name!r} OptionSetValueCollection must hold "
                                    "integer Values")
            return True, codes
        log.debug("webhook: skipping %s attribute %r of unsupported type %r", where, name, type_name)
        return False, None
    if isinstance(value, list):
        return True, value
    return False, None


def _entity_values(entity: Any, where: str, date_only: Collection[str], primary_id: str) -> dict[str, Any]:
    if not isinstance(entity, Mapping) or "Attributes" not in entity:
        raise EnvelopeError(f"webhook body: {where} is not an Entity (no Attributes)")
    validate(DataverseEntity, entity, f"webhook body: {where}")
    values: dict[str, Any] = {}
    for name, raw in _kv(entity.get("Attributes"), f"{where}.Attributes").items():
        keep, value = _canonical(name, raw, where, date_only)
        if keep:
            values[name] = value.lower() if name == primary_id and isinstance(value, str) else value
    return values


def _first_image(images: Any, where: str) -> Mapping[str, Any] | None:
    found = _kv(images, where)
    for image in found.values():
        if isinstance(image, Mapping):
            return image
    return None


def parse_remote_execution_context(
    body: Mapping[str, Any], *, date_only: Collection[str] = ()
) -> DataverseWebhookChange:
    """Parse a Dataverse webhook body (serialized RemoteExecutionContext) into a canonical change.

    Args:
        body: The decoded JSON body.
        date_only: Date-only columns; the wire carries them as midnight `/Date(ms)/` values like datetimes,
            so name them to get "YYYY-MM-DD" (as reads through the Web API give).

    Raises:
        EnvelopeError: naming what is wrong (missing MessageName, unknown message, no Target, bad date...).
    """
    if not isinstance(body, Mapping):
        raise EnvelopeError("webhook body is not a JSON object (expected a RemoteExecutionContext)")
    validate(DataverseContext, body, "webhook body")
    with bad_values("webhook body"):
        return _parse_context(body, date_only)


def _parse_context(body: Mapping[str, Any], date_only: Collection[str]) -> DataverseWebhookChange:
    message = body.get("MessageName")
    if not message:
        raise EnvelopeError("webhook body has no MessageName (is this a Dataverse RemoteExecutionContext?)")
    if message not in ("Create", "Update", "Delete"):
        raise EnvelopeError(f"webhook body has unknown MessageName {message!r}; only Create, Update and Delete are "
                            "synced (check the step registration)")
    entity = body.get("PrimaryEntityName")
    if not isinstance(entity, str) or not entity:
        raise EnvelopeError("webhook body has no PrimaryEntityName")
    primary_id = f"{entity}id"
    inputs = _kv(body.get("InputParameters"), "InputParameters")
    target = inputs.get("Target")
    if not isinstance(target, Mapping):
        raise EnvelopeError(f"webhook body ({message} of {entity}) has no Target in InputParameters")
    key_raw = body.get("PrimaryEntityId") or target.get("Id")
    if not _is_guid(key_raw):
        raise EnvelopeError(f"webhook body ({message} of {entity}) has no GUID PrimaryEntityId / Target.Id: "
                            f"{key_raw!r}")
    key = str(key_raw).lower()
    correlation_id = body.get("CorrelationId")
    if not isinstance(correlation_id, str) or not correlation_id:
        raise EnvelopeError(f"webhook body ({message} of {entity}) has no CorrelationId")
    initiating = body.get("InitiatingUserId")
    if not _is_guid(initiating):
        raise EnvelopeError(f"webhook body ({message} of {entity}) has no GUID InitiatingUserId: {initiating!r}")
    created_on = _wcf_date(body.get("OperationCreatedOn"), "OperationCreatedOn")
    depth = body.get("Depth", 1)
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise EnvelopeError(f"webhook body ({message} of {entity}): Depth must be an integer, got {depth!r}")

    pre = _first_image(body.get("PreEntityImages"), "PreEntityImages")
    post = _first_image(body.get("PostEntityImages"), "PostEntityImages")
    version: Any = None
    if message == "Delete":
        values = _entity_values(pre, "PreEntityImages", date_only, primary_id) if pre is not None else {}
        version = pre.get("RowVersion") if pre is not None else None
    else:
        values = _entity_values(target, "Target", date_only, primary_id)
        if post is not None:
            values.update(_entity_values(post, "PostEntityImages", date_only, primary_id))
            version = post.get("RowVersion")
        version = version or target.get("RowVersion")
    modified = _parse_datetime(values.get("modifiedon"))
    record = SourceRecord(key=key, values=values, modified=modified,
                          version=str(version) if version is not None else None, deleted=message == "Delete")
    user_id = body.get("UserId")
    return DataverseWebhookChange(
        message_name=cast(Literal["Create", "Update", "Delete"], message),
        entity=entity,
        key=key,
        record=record,
        correlation_id=correlation_id,
        operation_created_on=created_on,
        depth=depth,
        initiating_user_id=str(initiating).lower(),
        user_id=str(user_id).lower() if _is_guid(user_id) else None,
        shared_variables=_kv(body.get("SharedVariables"), "SharedVariables"),
    )


__all__ = [
    "ANNOTATION_MARKER", "AzureIdentityTokenProvider", "DataverseClient", "DataverseWebhookChange", "TableInfo",
    "TokenProvider", "client_secret_token_provider", "dataverse_token_provider", "parse_batch_response",
    "parse_remote_execution_context",
]
