"""The HTTP conversation with SAP Gateway: auth, CSRF token and session cookies, retries, $batch, paging."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime, time
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx

from shared.connectors._http import RetryPolicy, request_with_retry
from shared.connectors._odata import json_object, rebase_link
from shared.connectors.sap.auth import SapAuth
from shared.connectors.sap.batch import _Answer, _query, _Req, decode_batch, encode_batch
from shared.connectors.sap.codecs import (
    SERVICE_PATH,
    SYSTEM,
    _entity,
    _parse_sap_datetime,
    _parse_sap_time,
    _plain_row,
    flatten_nested,
    format_key,
    key_path,
)
from shared.connectors.sap.errors import error_for
from shared.core.dates import utc
from shared.core.errors import AmbiguousWriteError, AuthError, SyncError, TransientError
from shared.core.ports import SourceRecord

log = logging.getLogger(__name__)

_RETRIABLE_READ = frozenset({408, 429, 500, 502, 503, 504})
_RETRIABLE_WRITE = frozenset({429, 503})
"""A write answered 429/503 was refused before processing; anything else may have run in the backend."""


class SapHttp:
    """The connection to one S/4HANA system: every request of the reads and writes goes through `_send`."""

    system = SYSTEM

    def __init__(
        self,
        base_url: str,
        auth: SapAuth,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        http: httpx.AsyncClient | None = None,
        verify: ssl.SSLContext | str | bool = True,
        sap_client: str | None = None,
        policy: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass, safe as a default
        page_size: int = 1000,
        max_concurrency: int = 4,
        system_time_zone: str = "UTC",
        timeout: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        batch_size: int = 100,
        availability_plants: str | Sequence[str] = "1710",
        price_sales_organization: str = "1710",
        price_distribution_channel: str = "10",
        atp_checking_rule: str = "A",
        product_language: str = "EN",
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1 (1 sends every request alone)")
        parsed = urlsplit(base_url.rstrip("/"))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be the S/4HANA host, e.g. https://my300000-api.s4hana.cloud.sap, got "
                             f"{base_url!r}")
        prefix = parsed.path.rstrip("/")
        if prefix.endswith(SERVICE_PATH.rstrip("/")):
            prefix = prefix[: -len(SERVICE_PATH.rstrip("/"))]
        self.origin = f"{parsed.scheme}://{parsed.netloc}"
        self.odata_root = self.origin + prefix + SERVICE_PATH
        self._path_prefix = prefix + SERVICE_PATH
        self._auth = auth
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(transport=transport, verify=verify, timeout=timeout,
                                               trust_env=False)
        self._sap_client = sap_client
        self._policy = policy
        self._page_size = page_size
        self._max_concurrency = max_concurrency
        self._tz = ZoneInfo(system_time_zone)
        self._sleep = sleep
        self.batch_size = batch_size
        """Changesets (or retrieve parts) per $batch; 1 sends every request on its own."""
        self.availability_plants = (availability_plants,) if isinstance(availability_plants, str) \
            else tuple(availability_plants)
        self.price_sales_organization = price_sales_organization
        self.price_distribution_channel = price_distribution_channel
        self.atp_checking_rule = atp_checking_rule
        self.product_language = product_language
        self._csrf: str | None = None
        self._csrf_lock = asyncio.Lock()
        self._cookies: dict[str, str] = {}
        self.csrf_fetches = 0
        """CSRF tokens fetched so far (a session needs one; an expired session one more)."""

    async def aclose(self) -> None:
        """Close the HTTP client when this connector created it."""
        if self._own_http:
            await self._http.aclose()

    def service_root(self, table: str) -> str:
        return f"{self.odata_root}{_entity(table).service}/"

    def _root_of(self, service: str) -> str:
        return f"{self.odata_root}{service}/"

    # ------------------------------------------------------------------------------------ HTTP core

    def _absorb_cookies(self, response: httpx.Response) -> None:
        for cookie in response.cookies.jar:
            if cookie.value is not None:
                self._cookies[cookie.name] = cookie.value

    async def _send(self, method: str, url: str, *, what: str, params: Mapping[str, str] | None = None,
                    body: Any = None, headers: Mapping[str, str] | None = None, write: bool = False,
                    create: bool = False, service_root: str | None = None, raw: bytes | None = None,
                    content_type: str | None = None, idempotent: bool | None = None) -> httpx.Response:
        """Auth (one refresh on 401), CSRF for writes (one re-fetch on 403 Required), short retries.

        Retried like a read unless `write` (`idempotent` overrides: a $batch of retrieve parts only is a read
        that needs the CSRF token of a write). A `create` that may have reached SAP (no answer after it was
        sent: read timeout, reset) is never resent: AmbiguousWriteError.
        """
        retriable = _RETRIABLE_READ if (not write if idempotent is None else idempotent) else _RETRIABLE_WRITE
        refreshed = False
        csrf_retried = False
        content = raw if raw is not None else json.dumps(body).encode() if body is not None else None
        query = dict(params or {})
        if self._sap_client and "sap-client=" not in url:
            query["sap-client"] = self._sap_client
        target = url + (("&" if "?" in url else "?") + _query(query) if query else "")
        while True:
            all_headers = {"Accept": "application/json",
                           "Authorization": await self._auth.authorization(self._http, force_refresh=refreshed)}
            token: str | None = None
            if write:
                token = await self._csrf_token(service_root or url, what=what)
                all_headers["x-csrf-token"] = token
            if content is not None:
                all_headers["Content-Type"] = content_type or "application/json"
            if self._cookies:
                all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self._cookies.items())
            all_headers.update(headers or {})

            response = await request_with_retry(self._http, method, target, what=what, system=SYSTEM,
                                                policy=self._policy, sleep=self._sleep, retriable_status=retriable,
                                                idempotent=not create, headers=all_headers, content=content)
            self._absorb_cookies(response)
            if response.status_code == 401 and self._auth.refreshable and not refreshed:
                log.info("%s %s: HTTP 401, refreshing the token once and replaying", SYSTEM, what)
                refreshed = True
                continue
            if response.status_code == 403 and write and \
                    response.headers.get("x-csrf-token", "").lower() == "required":
                if csrf_retried:
                    raise AuthError(f"{SYSTEM} {what}: CSRF token validation failed even with a freshly fetched "
                                    "token; check that the session cookies reach SAP (no proxy stripping them)")
                log.info("%s %s: CSRF token rejected (expired session), fetching a new one once", SYSTEM, what)
                csrf_retried = True
                await self._csrf_token(service_root or url, what=what, stale=token)
                continue
            return response

    async def _csrf_token(self, service_root: str, *, what: str, stale: str | None = None) -> str:
        async with self._csrf_lock:
            if self._csrf is not None and (stale is None or self._csrf != stale):
                return self._csrf
            # A rejected token means the session is gone: start a new one rather than resend its cookies.
            self._cookies.clear()
            response = await self._send("GET", service_root, what=f"CSRF token fetch for {what}",
                                        headers={"x-csrf-token": "Fetch"})
            token = str(response.headers.get("x-csrf-token") or "")
            if not response.is_success or not token or token.lower() == "required":
                if not response.is_success:
                    raise error_for(response, f"CSRF token fetch for {what}")
                raise AuthError(f"{SYSTEM} {what}: SAP returned no CSRF token for {service_root}")
            self._csrf = token
            self.csrf_fetches += 1
            return token

    async def _batch(self, root: str, items: Sequence[_Req | Sequence[_Req]], *, what: str) -> list[_Answer]:
        """POST one $batch to the service at `root` (CSRF and session as for any write); one answer per item."""
        boundary = f"batch_{uuid.uuid4()}"
        writes = any(not isinstance(item, _Req) for item in items)
        creates = any(r.method == "POST" for item in items if not isinstance(item, _Req) for r in item)
        response = await self._send("POST", root + "$batch", what=what, raw=encode_batch(items, boundary),
                                    content_type=f"multipart/mixed; boundary={boundary}", write=True,
                                    create=creates, service_root=root, idempotent=not writes,
                                    headers={"Accept": "multipart/mixed"})
        if response.status_code == 504 and writes:
            raise AmbiguousWriteError(f"{SYSTEM} {what}: HTTP 504 (some changesets may have been applied)")
        if response.status_code not in (200, 202):
            raise error_for(response, what, write=writes)
        return decode_batch(response, items, what)

    async def _get_json(self, url: str, *, what: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        response = await self._send("GET", url, what=what, params=params)
        if not response.is_success:
            raise error_for(response, what)
        return json_object(response, system=SYSTEM, what=what)

    async def _get_row(self, table: str, key: Mapping[str, str], *, what: str,
                       expand: str | None = None) -> dict[str, Any] | None:
        """One entity as SAP sends it (with `__metadata`), or None when it does not exist."""
        params = {"$expand": expand} if expand else {}
        url = self.service_root(table) + key_path(table, key)
        response = await self._send("GET", url, what=what, params=params)
        if response.status_code == 404:
            return None
        if not response.is_success:
            raise error_for(response, what)
        data = json_object(response, system=SYSTEM, what=what).get("d")
        if not isinstance(data, dict):
            raise TransientError(f"{SYSTEM} {what}: response has no 'd' object")
        return data

    def _follow(self, link: str) -> str:
        return rebase_link(link, base_url=self.origin, path_prefix=self._path_prefix, system=SYSTEM)

    @staticmethod
    def _collection(data: Mapping[str, Any], what: str) -> tuple[list[dict[str, Any]], str | None]:
        body = data.get("d")
        if isinstance(body, list):
            return [r for r in body if isinstance(r, dict)], None
        if isinstance(body, dict) and isinstance(body.get("results"), list):
            link = body.get("__next")
            return [r for r in body["results"] if isinstance(r, dict)], str(link) if link else None
        raise TransientError(f"{SYSTEM} {what}: response has no d.results")

    async def _raw_pages(self, table: str, params: Mapping[str, str] | None, what: str
                         ) -> AsyncIterator[list[dict[str, Any]]]:
        """Rows page by page: `$top`/`$skip` windows, `__next` followed inside each window."""
        definition = _entity(table)
        base = dict(params or {})
        base.setdefault("$orderby", ",".join(f"{k} asc" for k in definition.keys))
        if definition.expand and "$expand" not in base:
            base["$expand"] = definition.expand
        skip = 0
        while True:
            url: str | None = self.service_root(table) + table
            query: dict[str, str] | None = {**base, "$top": str(self._page_size), "$skip": str(skip)}
            count = 0
            while url is not None:
                rows, link = self._collection(await self._get_json(url, what=what, params=query), what)
                count += len(rows)
                yield rows
                url, query = (self._follow(link), None) if link else (None, None)
            if count < self._page_size:
                return
            skip += self._page_size

    async def _queries(self, table: str, filters: Sequence[str], *, what: str
                       ) -> list[list[dict[str, Any]] | SyncError]:
        """The rows of several filtered queries on one table: alone, or as retrieve parts of $batch calls.

        Each query is small (at most `_FETCH_CHUNK` keys), so it has no `$top`; a server page limit is
        followed through `__next` with plain GETs. A query answered with an error gives that error.
        """
        definition = _entity(table)

        def params(text: str) -> dict[str, str]:
            out = {"$filter": text, "$orderby": ",".join(f"{k} asc" for k in definition.keys)}
            if definition.expand:
                out["$expand"] = definition.expand
            return out

        results: list[list[dict[str, Any]] | SyncError] = []
        if self.batch_size <= 1 or len(filters) <= 1:
            for text in filters:
                rows: list[dict[str, Any]] = []
                async for page in self._raw_pages(table, {"$filter": text}, what):
                    rows.extend(page)
                results.append(rows)
            return results
        for start in range(0, len(filters), self.batch_size):
            chunk = filters[start:start + self.batch_size]
            items = [_Req("GET", f"{table}?{_query(params(t))}", what) for t in chunk]
            answers = await self._batch(self.service_root(table), items, what=f"{what} ($batch of {len(items)})")
            for answer in answers:
                part = answer.parts[0]
                if not answer.ok:
                    results.append(error_for(part.response(), what))
                    continue
                rows, link = self._collection(part.json(what), what)
                while link:
                    more, link = self._collection(await self._get_json(self._follow(link), what=what), what)
                    rows.extend(more)
                results.append(rows)
        return results

    def _record(self, table: str, row: Mapping[str, Any]) -> SourceRecord:
        meta = row.get("__metadata")
        etag = meta.get("etag") if isinstance(meta, dict) else None
        values = _plain_row(row)
        if _entity(table).flatten:
            values.update(flatten_nested(values))
        return SourceRecord(key=format_key(table, row), values=values, modified=self._modified(table, row),
                            version=str(etag) if etag is not None else None)

    def _local(self, day: Any, clock: Any) -> datetime | None:
        moment = _parse_sap_datetime(day)
        if moment is None:
            return None
        at = _parse_sap_time(clock) or time(0)
        return utc(datetime.combine(moment.date(), at, self._tz))  # None past 9999-12-31 in UTC

    def _modified(self, table: str, row: Mapping[str, Any]) -> datetime | None:
        kind = _entity(table).changes
        if kind == "order":
            return _parse_sap_datetime(row.get("LastChangeDateTime"))
        if kind == "partner":
            stamps = [s for s in (self._local(row.get("LastChangeDate"), row.get("LastChangeTime")),
                                  self._local(row.get("CreationDate"), row.get("CreationTime"))) if s is not None]
            return max(stamps) if stamps else None
        return None

    async def _pages(self, table: str, params: Mapping[str, str] | None, what: str
                     ) -> AsyncIterator[list[SourceRecord]]:
        async for rows in self._raw_pages(table, params, what):
            yield [self._record(table, r) for r in rows]
