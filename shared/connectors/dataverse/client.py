"""The Dataverse Web API conversation: bearer auth, retries, errors -> the error tree, metadata, paged queries."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from shared.connectors._http import RETRIABLE_STATUS, RetryPolicy, request_with_retry, retry_after_value
from shared.connectors._odata import json_object, not_in_values, quote_text, rebase_link
from shared.connectors.dataverse.auth import TokenProvider
from shared.connectors.dataverse.codecs import (
    API_PATH,
    LOOKUP_ATTRIBUTE_TYPES,
    LOOKUP_VALUE_RE,
    MAX_BATCH_SIZE,
    MAX_PAGE_SIZE,
    SYSTEM,
    TableInfo,
    any_of,
    check_guid,
    check_ident,
    filter_literal,
    in_literal,
    is_guid,
    parse_datetime,
)
from shared.core.errors import (
    AmbiguousWriteError,
    AuthError,
    RejectedError,
    SyncError,
    ThrottledError,
    TransientError,
)
from shared.core.ports import SourceRecord

# The package's name, as before the split: log filters and dashboards keep matching.
log = logging.getLogger("shared.connectors.dataverse")


def error_parts(body: bytes | str) -> tuple[str, str]:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return "", text.strip()[:500]
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        return str(err.get("code") or ""), str(err.get("message") or "").strip()
    return "", text.strip()[:500]


def map_status(status: int, detail: str, headers: Mapping[str, str] | httpx.Headers) -> SyncError:
    """Map a failed HTTP status to the error tree (callers refine 404/504 by context)."""
    if status == 429:
        return ThrottledError(detail, retry_after=retry_after_value(headers.get("Retry-After")))
    if status == 504:
        return AmbiguousWriteError(detail)
    if status in RETRIABLE_STATUS or status >= 500:
        return TransientError(detail)
    if status in (401, 403):
        return AuthError(detail)
    return RejectedError(detail)


class DataverseHttp:
    """The conversation with one environment: authenticated calls, table metadata (cached), paged queries."""

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
        """One logical call: bearer auth (one refresh-and-replay on 401) and short retries via request_with_retry.

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

            response = await request_with_retry(self._http, method, url, what=what, system=SYSTEM,
                                                policy=self._policy, sleep=self._sleep, retriable_status=retriable,
                                                headers=all_headers, params=params, content=content)
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
                code, message = error_parts(response.content)
                raise AmbiguousWriteError(
                    f"{SYSTEM} {what}: HTTP 504 (the write may have been applied; replaying is safe because "
                    f"Syncline's writes are idempotent upserts) {code} {message}".strip()
                )
            return response

    def _raise_for(self, response: httpx.Response, what: str) -> None:
        if response.is_success:
            return
        code, message = error_parts(response.content)
        detail = f"{SYSTEM} {what}: HTTP {response.status_code}{' ' + code if code else ''}: {message}"
        raise map_status(response.status_code, detail, response.headers)

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
        check_ident(entity_set, "entity set")
        data = await self._get_json(
            self.api_root + "EntityDefinitions", what=f"metadata of {entity_set}",
            params={"$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
                    "$filter": f"EntitySetName eq {quote_text(entity_set)}"},
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
            f"{self.api_root}EntityDefinitions(LogicalName={quote_text(info.logical_name)})/Attributes", what=what,
            params={"$select": "LogicalName,AttributeType"})
        names = frozenset(str(a["LogicalName"]) for a in data.get("value") or []
                          if isinstance(a, dict) and a.get("AttributeType") in LOOKUP_ATTRIBUTE_TYPES)
        self._lookup_columns[info.logical_name] = names
        return names

    async def _filter_name(self, info: TableInfo, name: str, values: Sequence[Any]) -> str:
        """The property a filter on `name` uses: a lookup's logical name (what records and the engine use, e.g.
        salesorderid) becomes its `_x_value` property; anything else is already a property name."""
        if name == info.primary_id or LOOKUP_VALUE_RE.match(name):
            return name
        items = [v for v in values if v is not None]
        if items and not all(isinstance(v, uuid.UUID) or is_guid(v) for v in items):
            return name  # a lookup only holds GUIDs: no need to ask the metadata about other values
        return f"_{name}_value" if name in await self.lookup_columns(info.entity_set) else name

    async def entity_set_for(self, logical_name: str) -> str:
        """The entity set name of a table (EntityDefinitions, cached)."""
        info = self._by_logical.get(logical_name)
        if info is not None:
            return info.entity_set
        check_ident(logical_name, "table logical name")
        url = f"{self.api_root}EntityDefinitions(LogicalName={quote_text(logical_name)})"
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
        check_ident(logical_name, "table logical name")
        check_ident(attribute, "column name")
        url = (f"{self.api_root}EntityDefinitions(LogicalName={quote_text(logical_name)})/Attributes(LogicalName="
               f"{quote_text(attribute)})/Microsoft.Dynamics.CRM.PicklistAttributeMetadata")
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
        if not is_guid(data.get("UserId")):
            raise TransientError(f"{SYSTEM} WhoAmI: unexpected response {data!r}")

    # ------------------------------------------------------------------------------------ records

    def _record(self, info: TableInfo, row: Mapping[str, Any]) -> SourceRecord:
        values: dict[str, Any] = {}
        for name, value in row.items():
            if "@" in name:
                continue  # @odata.etag and instance annotations are metadata, not columns
            m = LOOKUP_VALUE_RE.match(name)
            if m is not None:
                values[m.group("name")] = value.lower() if isinstance(value, str) else value
            else:
                values[name] = value
        key = str(row.get(info.primary_id) or "").lower()
        if info.primary_id in values:
            values[info.primary_id] = key
        etag = row.get("@odata.etag")
        return SourceRecord(key=key, values=values, modified=parse_datetime(row.get("modifiedon")),
                            version=str(etag) if etag is not None else None)

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
            check_ident(name, "filter field")
            if isinstance(value, list | tuple):
                name = await self._filter_name(info, name, value)
                clauses.append(any_of(info, name, value))
            else:
                name = await self._filter_name(info, name, [value])
                clauses.append(f"{name} eq {filter_literal(info, name, value)}")
        for name, values in (not_in or {}).items():
            items = not_in_values(name, values, system=SYSTEM, ident=check_ident)
            if not items:
                continue
            name = await self._filter_name(info, name, items)
            listed = ",".join(in_literal(info, name, v) for v in items)
            # A null column is "not in" any list: say so explicitly rather than rely on SQL NOT IN semantics.
            clauses.append(f"(Microsoft.Dynamics.CRM.NotIn(PropertyName='{name}',PropertyValues=[{listed}]) or "
                           f"{name} eq null)")
        params = {"$filter": " and ".join(clauses)} if clauses else None
        return await self._query(info, params, f"select from {table}")

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        """Read records by primary key, 100 per query with Microsoft.Dynamics.CRM.In (missing keys are absent)."""
        info = await self._table(table)
        wanted = sorted({check_guid(k, f"{table} key") for k in keys})
        if not wanted:
            return {}
        # 100 GUIDs make a ~4.3 KB URL, well inside the 32 KB limit of the Web API.
        chunks = [wanted[i:i + 100] for i in range(0, len(wanted), 100)]
        semaphore = asyncio.Semaphore(self._max_concurrency)

        async def one(chunk: list[str]) -> list[SourceRecord]:
            listed = ",".join(quote_text(k) for k in chunk)
            params = {"$filter": f"Microsoft.Dynamics.CRM.In(PropertyName='{info.primary_id}',"
                                 f"PropertyValues=[{listed}])"}
            async with semaphore:
                return await self._query(info, params, f"fetch from {table}")

        out: dict[str, SourceRecord] = {}
        for records in await asyncio.gather(*(one(c) for c in chunks)):
            out.update((r.key, r) for r in records)
        return out
