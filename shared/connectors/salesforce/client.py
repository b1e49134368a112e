"""The Salesforce REST conversation: session, retries, errors -> the error tree, describe, paged SOQL queries.

Retries: reads, upserts by External ID and updates by Id (idempotent: a replay finds what the first attempt
wrote) are retried in-call on 408/429/5xx, timeouts and resets, with back-off (Retry-After wins), a bounded
number of attempts (`RetryPolicy`). Creates and deletes are resent only when they never left (connect
failures) or were refused unprocessed (429, 503); a timeout, a reset after sending, 502 or 504 is an
AmbiguousWriteError (the engine's retry finds the record by its match before anything is created again).
The daily request allocation (403 REQUEST_LIMIT_EXCEEDED) is never retried in-call: changes stay queued.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import requests
from simple_salesforce.api import Salesforce
from urllib3.exceptions import NewConnectionError

from shared.connectors._http import RetryPolicy, retry_after_value
from shared.connectors.salesforce.auth import open_session, request_token
from shared.connectors.salesforce.codecs import (
    ID_RE,
    IDENT_RE,
    MAX_COLLECTION_SIZE,
    MAX_IN_VALUES,
    SYSTEM,
    chunked,
    in_clause,
    soql_identifier,
    soql_quote,
    soql_select,
    to_record,
)
from shared.connectors.salesforce.errors import first_error, map_error
from shared.core.errors import AmbiguousWriteError, RejectedError, TransientError
from shared.core.ports import SourceRecord

# The package's name, as before the split: log filters and dashboards keep matching.
log = logging.getLogger("shared.connectors.salesforce")

_LIMIT_RE = re.compile(r"api-usage=(\d+)/(\d+)")
_RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REFUSED_STATUS = frozenset({429, 503})
"""Statuses that mean "refused before processing": the only ones after which a create is resent."""
_AMBIGUOUS_STATUS = frozenset({502, 504})


def _content(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _retry_after(response: requests.Response) -> float | None:
    return retry_after_value(response.headers.get("Retry-After"))


def _unsent(exc: requests.RequestException) -> bool:
    """Whether the request surely never reached Salesforce (connect timeout or refused connection)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(exc, requests.ConnectionError) and isinstance(reason, NewConnectionError)


class SalesforceHttp:
    """The conversation with one org: authenticated REST calls with bounded retries, describes, SOQL reads."""

    system = SYSTEM

    def __init__(
        self,
        my_domain_url: str,
        client_id: str,
        client_secret: str,
        *,
        session: requests.Session,
        version: str = "63.0",
        collection_size: int = MAX_COLLECTION_SIZE,
        bulk_threshold: int = 2000,
        call_options_client: str = "syncline",
        bulk_poll_interval: float = 1.0,
        bulk_timeout: float = 600.0,
        timeout: float = 60.0,
        sleep: Callable[[float], Any] = asyncio.sleep,
        policy: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass, safe as a default
        blocking_sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 1 <= collection_size <= MAX_COLLECTION_SIZE:
            raise ValueError(f"collection_size must be within 1..{MAX_COLLECTION_SIZE}")
        self.my_domain_url = my_domain_url.rstrip("/")
        self._client_id, self._client_secret = client_id, client_secret
        self._session = session
        self.version = version
        self.collection_size = collection_size
        self.bulk_threshold = bulk_threshold
        self.call_options_client = call_options_client
        self.bulk_poll_interval, self.bulk_timeout, self.timeout = bulk_poll_interval, bulk_timeout, timeout
        self._sleep = sleep
        self._policy = policy
        self._blocking_sleep = blocking_sleep
        """Back-off between in-call attempts: calls run in worker threads, so this one blocks."""
        self._sf: Salesforce | None = None
        self._lock = threading.Lock()
        self._fields: dict[str, list[str]] = {}
        self.instance_url: str | None = None
        self.api_usage: tuple[int, int] | None = None
        """(used, max) of the daily request allocation from the last response's Sforce-Limit-Info."""
        self.calls = 0
        self.token_fetches = 0

    def _authenticate(self) -> Salesforce:
        response = request_token(self._session, self.my_domain_url, self._client_id, self._client_secret,
                                 self.timeout)
        self.token_fetches += 1
        sf, self.instance_url = open_session(response, self._session, version=self.version,
                                             call_options_client=self.call_options_client)
        with self._lock:
            self._sf = sf
        return sf

    def _current(self) -> Salesforce:
        with self._lock:
            sf = self._sf
        return sf if sf is not None else self._authenticate()

    def _call(self, method: str, path: str, *, what: str, absolute: bool = False, idempotent: bool | None = None,
              **kwargs: Any) -> requests.Response:
        """One REST call (blocking). `path` is relative to /services/data/vXX.X/ unless `absolute` (a server path).

        `idempotent` (default: GET only) says whether a replay is harmless; see "Retries" in the module docstring.
        """
        safe = method == "GET" if idempotent is None else idempotent
        retriable = _RETRIABLE_STATUS if safe else _REFUSED_STATUS
        sf = self._current()
        kwargs.setdefault("timeout", self.timeout)
        extra_headers = kwargs.pop("headers", None) or {}
        reauthenticated = False
        attempt = 0
        while True:
            attempt += 1
            url = f"https://{sf.sf_instance}{path}" if absolute else sf.base_url + path
            last = attempt >= self._policy.max_attempts
            try:
                self.calls += 1
                response = self._session.request(method, url, headers={**sf.headers, **extra_headers}, **kwargs)
            except requests.RequestException as exc:
                unsent = _unsent(exc)
                if not safe and not unsent:
                    raise AmbiguousWriteError(f"{SYSTEM}: {what}: no answer after the request was sent "
                                              f"({type(exc).__name__}); it may have been applied") from exc
                kind = "request timed out" if isinstance(exc, requests.Timeout) else \
                    f"network error ({type(exc).__name__}: {exc})"
                if last:
                    raise TransientError(f"{SYSTEM}: {what}: {kind} ({attempt} attempts)") from exc
                delay = self._policy.backoff(attempt)
                log.info("%s %s: %s, retrying in %.2fs (attempt %d/%d)", SYSTEM, what, kind, delay, attempt,
                         self._policy.max_attempts)
                self._blocking_sleep(delay)
                continue
            status = response.status_code
            if status < 300:
                self._note_usage(response)
                return response
            content = _content(response)
            if status == 401:
                if not reauthenticated:
                    log.info("%s: session expired (INVALID_SESSION_ID), re-authenticating once", SYSTEM)
                    reauthenticated = True
                    attempt -= 1  # a refused session is not a failed attempt: nothing was processed
                    sf = self._authenticate()
                    continue
                raise map_error(401, content, what)
            wait = _retry_after(response)
            if status in retriable:
                if not last and (wait is None or wait <= self._policy.max_retry_after):
                    delay = wait if wait is not None else self._policy.backoff(attempt)
                    log.info("%s %s: HTTP %s, retrying in %.2fs (attempt %d/%d)", SYSTEM, what, status, delay,
                             attempt, self._policy.max_attempts)
                    self._blocking_sleep(delay)
                    continue
            elif not safe and status in _AMBIGUOUS_STATUS:
                code, message = first_error(content)
                raise AmbiguousWriteError(f"{SYSTEM}: {what}: HTTP {status} {code} {message}".rstrip() +
                                          "; it may have been applied")
            raise map_error(status, content, what, retry_after=wait)

    def _note_usage(self, response: requests.Response) -> None:
        match = _LIMIT_RE.search(response.headers.get("Sforce-Limit-Info", ""))
        if match:
            self.api_usage = (int(match.group(1)), int(match.group(2)))

    def _json(self, method: str, path: str, *, what: str, **kwargs: Any) -> Any:
        response = self._call(method, path, what=what, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise TransientError(f"{SYSTEM}: {what}: response is not JSON") from exc

    async def _ajson(self, method: str, path: str, *, what: str, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self._json, method, path, what=what, **kwargs)

    async def _field_list(self, table: str) -> list[str]:
        soql_identifier(table)
        if table not in self._fields:
            describe = await self._ajson("GET", f"sobjects/{table}/describe", what=f"describe {table}")
            names = [str(f["name"]) for f in (describe or {}).get("fields", []) if isinstance(f, dict)]
            self._fields[table] = [n for n in names if IDENT_RE.fullmatch(n)] or ["Id"]
        return self._fields[table]

    async def _query_pages(self, soql: str) -> AsyncIterator[list[SourceRecord]]:
        body = await self._ajson("GET", "query/", what="SOQL query", params={"q": soql})
        while True:
            yield [to_record(r) for r in body.get("records", [])]
            next_url = body.get("nextRecordsUrl")
            if body.get("done", True) or not next_url:
                return
            body = await self._ajson("GET", str(next_url), what="SOQL query (next page)", absolute=True)

    async def select(self, table: str, *, equals: Mapping[str, Any],
                     not_in: Mapping[str, Sequence[Any]] | None = None) -> list[SourceRecord]:
        """Records whose fields equal `equals` and are not in `not_in`; every value is rendered by `soql_quote`.

        A list, tuple or set value in `equals` means `IN`: an empty one matches nothing (no call is made), and more
        than 200 values are split over several queries (the SOQL text stays short) whose results are merged.
        """
        fixed: list[str] = []
        listed: list[tuple[str, list[str]]] = []
        for name, value in equals.items():
            soql_identifier(name)
            if isinstance(value, list | tuple | set | frozenset):
                literals = list(dict.fromkeys(soql_quote(v) for v in value))
                if not literals:
                    return []
                listed.append((name, literals))
            else:
                fixed.append(f"{name} = {soql_quote(value)}")
        for name, values in (not_in or {}).items():
            soql_identifier(name)
            if isinstance(values, str | bytes):
                raise RejectedError(f"{SYSTEM}: not_in[{name!r}] must be a list of values, not a string")
            if values:
                fixed.append(f"{name} NOT IN ({', '.join(soql_quote(v) for v in values)})")
        fields = await self._field_list(table)
        found: dict[str, SourceRecord] = {}
        for chunks in itertools.product(*(chunked(literals, MAX_IN_VALUES) for _, literals in listed)):
            clauses = fixed + [in_clause(name, chunk) for (name, _), chunk in zip(listed, chunks, strict=True)]
            where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
            async for page in self._query_pages(soql_select(fields, table, where)):
                for record in page:
                    found.setdefault(record.key, record)
        return list(found.values())

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        wanted = [k for k in keys if ID_RE.fullmatch(k)]
        out: dict[str, SourceRecord] = {}
        for chunk in chunked(wanted, MAX_COLLECTION_SIZE):
            soql = soql_select(await self._field_list(table), table,
                               f" WHERE Id IN ({', '.join(map(soql_quote, chunk))})")
            async for page in self._query_pages(soql):
                for record in page:
                    out[record.key] = record
        by15 = {k[:15]: k for k in out}
        return {k: out.get(k) or out[by15[k[:15]]] for k in keys if k in out or k[:15] in by15}
