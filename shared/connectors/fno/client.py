"""The HTTP conversation with F&O's /data endpoint: bearer token, retries, paging, filtered and keyed reads."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from shared.connectors._http import RetryPolicy, request_with_retry
from shared.connectors._odata import json_object, not_in_clauses, rebase_link
from shared.connectors.dataverse import TokenProvider
from shared.connectors.fno.codecs import (
    DATA_PATH,
    MAX_PAGE_SIZE,
    MODIFIED_FIELDS,
    SYSTEM,
    _ident,
    _jsonable,
    _key_fields,
    _parse_datetime,
    filter_literal,
    format_key,
    key_path,
    parse_key,
)
from shared.connectors.fno.errors import _error_for
from shared.core.errors import AuthError, RejectedError
from shared.core.ports import SourceRecord

log = logging.getLogger(__name__)

_RETRIABLE_READ = frozenset({408, 429, 500, 502, 503, 504})
_RETRIABLE_WRITE = frozenset({408, 429, 502, 503})
"""A write answered 500 may be a validation failure (not worth retrying); 504 may have been applied."""
_RETRIABLE_CREATE = frozenset({408, 429, 503})
"""A create is resent only when F&O refused it unprocessed: a 502 or 504 may come after it was applied."""


class FinOpsHttp:
    """The connection to one F&O environment, and its reads (see `FinOpsClient`).

    `SourceRecord.values` are the entity's fields as F&O returns them (enums as member names); `version` is the
    `@odata.etag`; `modified` the `ModifiedDateTime` when the entity has it.
    """

    system = SYSTEM

    def __init__(
        self,
        environment_url: str,
        http: httpx.AsyncClient,
        token_provider: TokenProvider,
        *,
        policy: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass, safe as a default
        max_concurrency: int = 4,
        page_size: int = MAX_PAGE_SIZE,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        parsed = urlsplit(environment_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("environment_url must be the environment URL, e.g. "
                             f"https://contoso.operations.dynamics.com, got {environment_url!r}")
        self.base_url = f"{parsed.scheme}://{parsed.netloc}"
        self.data_root = self.base_url + DATA_PATH
        self._http = http
        self._tokens = token_provider
        self._policy = policy
        self._max_concurrency = max_concurrency
        self._page_size = page_size
        self._sleep = sleep

    # ------------------------------------------------------------------------------------ HTTP core

    async def _send(self, method: str, url: str, *, what: str, params: Mapping[str, str] | None = None,
                    body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None,
                    write: bool = False) -> httpx.Response:
        """Bearer auth (one refresh-and-replay on 401) and short retries honouring Retry-After.

        A POST (a create: F&O has no idempotent create) is never resent once it may have reached F&O; it raises
        AmbiguousWriteError instead (see `_post`).
        """
        create = method == "POST"
        retriable = _RETRIABLE_CREATE if create else _RETRIABLE_WRITE if write else _RETRIABLE_READ
        refreshed = False
        content = json.dumps({k: _jsonable(v) for k, v in body.items()}).encode() if body is not None else None
        while True:
            token = await self._tokens.get_token(force_refresh=refreshed)
            all_headers = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0",
                           "Authorization": f"Bearer {token}"}
            if content is not None:
                all_headers["Content-Type"] = "application/json"
            all_headers.update(headers or {})

            response = await request_with_retry(self._http, method, url, what=what, system=SYSTEM,
                                                policy=self._policy, sleep=self._sleep, retriable_status=retriable,
                                                idempotent=not create, headers=all_headers, params=params,
                                                content=content)
            if response.status_code == 401:
                if refreshed:
                    raise AuthError(f"{SYSTEM} {what}: HTTP 401 even after a token refresh "
                                    f"({response.headers.get('WWW-Authenticate') or 'no challenge'}); check that the "
                                    "app is registered in F&O 'Microsoft Entra applications' with a user")
                log.info("%s %s: HTTP 401, refreshing the token once and replaying", SYSTEM, what)
                refreshed = True
                continue
            return response

    async def _get_json(self, url: str, *, what: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        response = await self._send("GET", url, what=what, params=params,
                                    headers={"Prefer": f"odata.maxpagesize={self._page_size}"})
        if not response.is_success:
            raise _error_for(response, what)
        return json_object(response, system=SYSTEM, what=what)

    def _follow(self, link: str) -> str:
        return rebase_link(link, base_url=self.base_url, path_prefix=DATA_PATH, system=SYSTEM)

    def _record(self, entity: str, row: Mapping[str, Any]) -> SourceRecord:
        values = {k: v for k, v in row.items() if "@" not in k}
        etag = row.get("@odata.etag")
        modified_field = MODIFIED_FIELDS.get(entity)
        return SourceRecord(key=format_key(entity, values), values=values,
                            modified=_parse_datetime(values.get(modified_field)) if modified_field else None,
                            version=str(etag) if etag is not None else None)

    async def _pages(self, entity: str, params: Mapping[str, str] | None, what: str
                     ) -> AsyncIterator[list[SourceRecord]]:
        _key_fields(entity)
        _ident(entity, "entity set")
        url: str | None = self.data_root + entity
        query: dict[str, str] | None = {"cross-company": "true", **(params or {})}
        while url is not None:
            data = await self._get_json(url, what=what, params=query)
            yield [self._record(entity, row) for row in data.get("value") or []]
            link = data.get("@odata.nextLink")
            url, query = (self._follow(str(link)), None) if link else (None, None)

    async def _query(self, entity: str, params: Mapping[str, str] | None, what: str) -> list[SourceRecord]:
        return [r async for page in self._pages(entity, params, what) for r in page]

    @staticmethod
    def build_filter(equals: Mapping[str, Any], not_in: Mapping[str, Sequence[Any]] | None = None) -> str:
        """The `$filter` for `select`. F&O supports neither `in` nor `has`: a list in `equals` becomes
        `(F eq 'a' or F eq 'b')`, a `not_in` list `(F ne 'a' and F ne 'b')`."""
        clauses: list[str] = []
        for name, value in equals.items():
            _ident(name, "filter field")
            if isinstance(value, list | tuple):
                literals = list(dict.fromkeys(filter_literal(v, name) for v in value))
                if not literals:
                    raise RejectedError(f"{SYSTEM}: equals[{name!r}] is an empty list (nothing can match)")
                clauses.append("(" + " or ".join(f"{name} eq {literal}" for literal in literals) + ")")
            else:
                clauses.append(f"{name} eq {filter_literal(value, name)}")
        clauses += not_in_clauses(not_in, system=SYSTEM, ident=_ident, literal=filter_literal)
        return " and ".join(clauses)

    async def select(self, table: str, *, equals: Mapping[str, Any],
                     not_in: Mapping[str, Sequence[Any]] | None = None) -> list[SourceRecord]:
        """Records (across companies, or one when `equals` has `dataAreaId`) matching escaped equality filters;
        a list value matches any of its values, an empty list nothing (answered without a request)."""
        if any(isinstance(v, list | tuple) and not v for v in equals.values()):
            return []
        text = self.build_filter(equals, not_in)
        return await self._query(table, {"$filter": text} if text else None, f"select from {table}")

    async def get(self, table: str, key: Mapping[str, Any]) -> SourceRecord | None:
        """One record by its full key, or None."""
        path = key_path(table, key)
        response = await self._send("GET", self.data_root + path, what=f"read {path}",
                                    params={"cross-company": "true"})
        if response.status_code == 404:
            return None
        if not response.is_success:
            raise _error_for(response, f"read {path}")
        return self._record(table, response.json())

    FETCH_CHUNK = 25
    """Keys per `$filter` of `fetch`: `(F eq 'a' or F eq 'b' ...)` stays well inside F&O's URL length."""

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        """Read records by canonical key; missing keys are absent.

        Keys of one legal entity are read `FETCH_CHUNK` at a time with one escaped `$filter` each (bounded
        concurrency): a reconciliation page or a batch's refresh costs one request per 25 records, not one each.
        """
        wanted = {k: parse_key(table, k) for k in dict.fromkeys(keys)}
        fields = _key_fields(table)
        semaphore = asyncio.Semaphore(self._max_concurrency)
        if len(fields) != 2 or fields[0] != "dataAreaId":
            async def one(key: dict[str, str]) -> SourceRecord | None:
                async with semaphore:
                    return await self.get(table, key)

            found = await asyncio.gather(*(one(k) for k in wanted.values()))
            return {r.key: r for r in found if r is not None}
        by_area: dict[str, list[str]] = {}
        for key in wanted.values():
            by_area.setdefault(key["dataAreaId"], []).append(key[fields[1]])

        async def chunk(area: str, values: list[str]) -> list[SourceRecord]:
            async with semaphore:
                return await self.select(table, equals={"dataAreaId": area, fields[1]: values})

        pages = await asyncio.gather(*(chunk(area, values[i:i + self.FETCH_CHUNK])
                                       for area, values in by_area.items()
                                       for i in range(0, len(values), self.FETCH_CHUNK)))
        return {r.key: r for page in pages for r in page}
