"""Salesforce REST API v63.0 connector: RecordSink + ChangeSource on simple-salesforce (run in worker threads).

Auth is OAuth 2.0 client credentials against the org's My Domain; the API base URL is the token response's
`instance_url`. simple-salesforce is used in "direct" mode (token injected, no login call), so an expired
session (401 INVALID_SESSION_ID) is handled here: one re-authentication, then the call is replayed once.

Writes go through sObject Collections (<=200 records a call, allOrNone=false, one result per record) and,
for large upserts of one object, Bulk API 2.0 ingest jobs. Every request carries
`Sforce-Call-Options: client=<call_options_client>` so Syncline's own writes show up in Change Data Capture
events as `changeOrigin ...;client=<call_options_client>` and can be dropped as echoes (`parse_cdc_event`).
The daily request allocation (403 REQUEST_LIMIT_EXCEEDED) is never retried in-call: changes stay queued.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import requests
from simple_salesforce.api import Salesforce
from simple_salesforce.exceptions import SalesforceError, SalesforceExpiredSession

from shared.core.dates import from_epoch_ms, parse_iso
from shared.core.errors import (
    AmbiguousWriteError,
    AuthError,
    EnvelopeError,
    MappingError,
    RejectedError,
    SyncError,
    ThrottledError,
    TransientError,
)
from shared.core.ports import SourceRecord, WriteOp, WriteResult
from shared.payloads import SalesforceChangeEvent, bad_values, read_json, validate

log = logging.getLogger(__name__)

SYSTEM = "salesforce"
MAX_COLLECTION_SIZE = 200
"""sObject Collections accept at most 200 records per call."""
MAX_IN_VALUES = 200
"""Values per SOQL `IN (...)` list in `select`; more are split over several queries to keep the query URL short."""
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_ID_RE = re.compile(r"^[A-Za-z0-9]{15}([A-Za-z0-9]{3})?$")
_LIMIT_RE = re.compile(r"api-usage=(\d+)/(\d+)")
_SOQL_ESCAPES = {"\\": "\\\\", "'": "\\'", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
                 "\f": "\\f"}
_TERMINAL_JOB_STATES = frozenset({"JobComplete", "Failed", "Aborted"})


# ============================================================================================ SOQL


def soql_identifier(name: str) -> str:
    """Validate a field or sObject API name (optionally one relationship hop) for use in SOQL."""
    if not isinstance(name, str) or not _IDENT_RE.fullmatch(name):
        raise RejectedError(f"{SYSTEM}: {name!r} is not a valid Salesforce API name")
    return name


def soql_quote(value: Any) -> str:
    """Render a Python value as a SOQL literal; strings are quoted with every special character escaped.

    Strings escape backslash, both quotes and control characters (\\n \\r \\t \\b \\f) as SOQL requires, so a
    value can never end the literal early. None -> null, bools -> true/false, numbers as literals, datetimes as
    `YYYY-MM-DDThh:mm:ssZ` (UTC), dates as `YYYY-MM-DD`.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise MappingError(f"{SYSTEM}: {value!r} cannot be used in SOQL")
        return repr(value)
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, date):
        return value.isoformat()
    text = str(value)
    return "'" + "".join(_SOQL_ESCAPES.get(ch, ch) for ch in text) + "'"


def parse_sf_datetime(value: Any) -> datetime | None:
    """Parse `2024-05-01T10:00:00.000+0000` (REST), ISO forms and epoch milliseconds (CDC); None if not one in range."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return from_epoch_ms(value)  # None for NaN, inf and instants outside years 1-9999
    return parse_iso(value)


def _to_record(raw: Mapping[str, Any]) -> SourceRecord:
    values = {k: v for k, v in raw.items() if k != "attributes"}
    modified = parse_sf_datetime(values.get("SystemModstamp") or values.get("LastModifiedDate"))
    return SourceRecord(key=str(values.get("Id", "")), values=values, modified=modified,
                        version=str(values["SystemModstamp"]) if values.get("SystemModstamp") else None,
                        deleted=bool(values.get("IsDeleted", False)))


# ============================================================================================ CDC


@dataclass(frozen=True)
class SalesforceChange:
    """A Change Data Capture event relayed as JSON (Pub/Sub-shaped or CometD envelope)."""

    entity: str
    record_ids: list[str]
    change_type: str
    changed_fields: list[str]
    commit_timestamp: datetime | None
    transaction_key: str
    replay_id: int | None
    change_origin: str
    commit_user: str | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def is_own_write(self, client: str) -> bool:
        """True when the change was made by a request that sent `Sforce-Call-Options: client=<client>`."""
        for part in self.change_origin.split(";"):
            name, _, value = part.strip().partition("=")
            if name == "client" and value.strip().rstrip("/") == client:
                return True
        return False


def parse_cdc_event(body: Any) -> SalesforceChange:
    """Parse one CDC event (bytes, str or decoded JSON); malformed input raises EnvelopeError."""
    data = read_json(body, f"{SYSTEM}: CDC event") if isinstance(body, bytes | str) else body
    if not isinstance(data, dict):
        raise EnvelopeError(f"{SYSTEM}: CDC event must be a JSON object")
    validate(SalesforceChangeEvent, data, f"{SYSTEM}: CDC event")
    with bad_values(f"{SYSTEM}: CDC event"):
        return _checked_cdc_event(data)


def _checked_cdc_event(data: dict[str, Any]) -> SalesforceChange:
    replay: Any = data.get("replayId")
    if isinstance(data.get("data"), dict):  # CometD envelope
        inner = data["data"]
        payload = inner.get("payload")
        event = inner.get("event")
        replay = event.get("replayId") if isinstance(event, dict) else None
    else:
        payload = data.get("payload")
    if not isinstance(payload, dict) or not isinstance(payload.get("ChangeEventHeader"), dict):
        raise EnvelopeError(f"{SYSTEM}: CDC event has no payload.ChangeEventHeader")
    header = payload["ChangeEventHeader"]
    entity, ids, change_type = header.get("entityName"), header.get("recordIds"), header.get("changeType")
    if not isinstance(entity, str) or not entity:
        raise EnvelopeError(f"{SYSTEM}: CDC event header has no entityName")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise EnvelopeError(f"{SYSTEM}: CDC event header recordIds must be a list of ids")
    if not isinstance(change_type, str) or not change_type:
        raise EnvelopeError(f"{SYSTEM}: CDC event header has no changeType")
    changed = header.get("changedFields") or []
    if not isinstance(changed, list):
        raise EnvelopeError(f"{SYSTEM}: CDC event changedFields must be a list")
    if replay is not None and not isinstance(replay, int | str):
        raise EnvelopeError(f"{SYSTEM}: CDC replayId must be a number")
    try:
        replay_id = int(replay) if replay is not None else None
    except ValueError as exc:
        raise EnvelopeError(f"{SYSTEM}: CDC replayId {replay!r} is not a number") from exc
    values = {k: v for k, v in payload.items() if k != "ChangeEventHeader"}
    raw_commit = header.get("commitTimestamp")
    commit_timestamp = parse_sf_datetime(raw_commit)
    if commit_timestamp is None and raw_commit not in (None, ""):
        # The sender's own metadata, not record data: a value we cannot read refuses the event.
        raise EnvelopeError(f"{SYSTEM}: CDC event header commitTimestamp {str(raw_commit)[:40]!r} is not a date/time "
                            "in range (years 1-9999)")
    return SalesforceChange(
        entity=entity, record_ids=list(ids), change_type=change_type, changed_fields=[str(f) for f in changed],
        commit_timestamp=commit_timestamp,
        transaction_key=str(header.get("transactionKey") or ""), replay_id=replay_id,
        change_origin=str(header.get("changeOrigin") or ""), commit_user=header.get("commitUser"), values=values,
    )


# ============================================================================================ errors


def seconds_until_utc_midnight(now: datetime | None = None) -> float:
    moment = now or datetime.now(UTC)
    tomorrow = (moment + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - moment).total_seconds()


def _first_error(content: Any) -> tuple[str, str]:
    if isinstance(content, list) and content and isinstance(content[0], dict):
        first = content[0]
        return str(first.get("errorCode") or first.get("statusCode") or ""), str(first.get("message") or "")
    if isinstance(content, dict):
        return str(content.get("error") or content.get("errorCode") or ""), str(
            content.get("error_description") or content.get("message") or "")
    return "", str(content)[:300]


def _map_error(status: int, content: Any, what: str) -> SyncError:
    code, message = _first_error(content)
    text = f"{SYSTEM}: {what}: HTTP {status} {code}: {message}".rstrip(": ")
    if status == 403 and code == "REQUEST_LIMIT_EXCEEDED":
        return ThrottledError(
            f"{SYSTEM}: the org's API request allocation is spent ({message or code}); changes stay queued and "
            "are retried after the allocation recovers (rolling 24 h)", retry_after=seconds_until_utc_midnight())
    if status == 401:
        return AuthError(f"{text} (session still rejected after re-authenticating)")
    if status in (408, 429) or status >= 500:
        return TransientError(text)
    return RejectedError(text)


def _record_error(errors: Any, context: str) -> SyncError:
    code, message = "UNKNOWN_ERROR", "no error detail"
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        code = str(errors[0].get("statusCode") or errors[0].get("errorCode") or code)
        message = str(errors[0].get("message") or message)
    detail = f"{SYSTEM}: {context} rejected: {code}: {message}"
    return RejectedError(detail, reason="REQUIRED_FIELD_MISSING" if code == "REQUIRED_FIELD_MISSING" else None)


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    """Field values as Salesforce REST JSON: datetimes as ISO UTC, dates as YYYY-MM-DD, Decimals as numbers."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, datetime):
            moment = value if value.tzinfo else value.replace(tzinfo=UTC)
            value = moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
        elif isinstance(value, date):
            value = value.isoformat()
        elif isinstance(value, Decimal):
            value = float(value)
        out[name] = value
    return out


def _csv_cell(value: Any) -> str:
    if value is None:
        return "#N/A"  # Bulk API 2.0: set the field to null
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return soql_quote(value)
    return str(value)


# ============================================================================================ client


class SalesforceClient:
    """RecordSink + ChangeSource for one Salesforce org (simple-salesforce, calls run via asyncio.to_thread)."""

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
        self._sf: Salesforce | None = None
        self._lock = threading.Lock()
        self._fields: dict[str, list[str]] = {}
        self.instance_url: str | None = None
        self.api_usage: tuple[int, int] | None = None
        """(used, max) of the daily request allocation from the last response's Sforce-Limit-Info."""
        self.calls = 0
        self.token_fetches = 0

    # ------------------------------------------------------------------------------- auth + calls

    def _authenticate(self) -> Salesforce:
        url = f"{self.my_domain_url}/services/oauth2/token"
        try:
            response = self._session.post(
                url, data={"grant_type": "client_credentials", "client_id": self._client_id,
                           "client_secret": self._client_secret}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise TransientError(f"{SYSTEM}: cannot reach the token endpoint {url}: {exc}") from exc
        self.token_fetches += 1
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 500:
            raise TransientError(f"{SYSTEM}: token endpoint answered HTTP {response.status_code}")
        if response.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
            code, message = _first_error(body)
            raise AuthError(f"{SYSTEM}: token request refused ({code}: {message}); check the My Domain URL "
                            "(not login.salesforce.com), client id/secret and the app's client-credentials run-as user")
        instance_url = body.get("instance_url")
        if not isinstance(instance_url, str) or not instance_url:
            raise AuthError(f"{SYSTEM}: token response has no instance_url")
        sf = Salesforce(instance_url=instance_url, session_id=str(body["access_token"]), session=self._session,
                        version=self.version)
        sf.headers["Sforce-Call-Options"] = f"client={self.call_options_client}"
        self.instance_url = instance_url
        with self._lock:
            self._sf = sf
        return sf

    def _current(self) -> Salesforce:
        with self._lock:
            sf = self._sf
        return sf if sf is not None else self._authenticate()

    def _call(self, method: str, path: str, *, what: str, absolute: bool = False, **kwargs: Any) -> requests.Response:
        """One REST call (blocking). `path` is relative to /services/data/vXX.X/ unless `absolute` (a server path)."""
        sf = self._current()
        kwargs.setdefault("timeout", self.timeout)
        for attempt in (1, 2):
            url = f"https://{sf.sf_instance}{path}" if absolute else sf.base_url + path
            try:
                self.calls += 1
                response = sf._call_salesforce(method, url, name=what, **kwargs)
            except SalesforceExpiredSession as exc:
                if attempt == 1:
                    log.info("%s: session expired (INVALID_SESSION_ID), re-authenticating once", SYSTEM)
                    sf = self._authenticate()
                    continue
                raise _map_error(401, exc.content, what) from exc
            except SalesforceError as exc:
                raise _map_error(int(exc.status), exc.content, what) from exc
            except requests.Timeout as exc:
                if method in ("GET",):
                    raise TransientError(f"{SYSTEM}: {what}: request timed out") from exc
                raise AmbiguousWriteError(f"{SYSTEM}: {what}: request timed out; it may have been applied") from exc
            except requests.RequestException as exc:
                raise TransientError(f"{SYSTEM}: {what}: network error ({type(exc).__name__}: {exc})") from exc
            self._note_usage(response)
            return response
        raise AssertionError("unreachable")

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

    # ------------------------------------------------------------------------------- RecordSink

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        results: dict[int, WriteResult] = {}
        upserts: dict[tuple[str, str], list[int]] = {}
        updates: dict[str, list[int]] = {}
        creates: dict[str, list[int]] = {}
        deletes: list[int] = []
        for index, op in enumerate(ops):
            try:
                soql_identifier(op.table)
                for name in op.values:
                    soql_identifier(name)
                if op.action == "delete":
                    if not op.key or not _ID_RE.fullmatch(op.key):
                        raise RejectedError(f"{SYSTEM}: delete of {op.table} needs a Salesforce Id (got {op.key!r})")
                    deletes.append(index)
                elif op.key:
                    if not _ID_RE.fullmatch(op.key):
                        raise RejectedError(f"{SYSTEM}: {op.table} key {op.key!r} is not a Salesforce Id")
                    updates.setdefault(op.table, []).append(index)
                elif op.match:
                    if len(op.match) != 1:
                        raise RejectedError(f"{SYSTEM}: {op.table} upsert matches on exactly one External ID field, "
                                            f"got {sorted(op.match)}")
                    (ext_field,) = op.match
                    soql_identifier(ext_field)
                    if op.action == "update":
                        raise RejectedError(f"{SYSTEM}: update of {op.table} by {ext_field} needs the record Id")
                    upserts.setdefault((op.table, ext_field), []).append(index)
                else:
                    creates.setdefault(op.table, []).append(index)
            except SyncError as error:
                results[index] = WriteResult(op.op_id, ok=False, error=error)
        for (table, ext_field), indexes in upserts.items():
            if len(indexes) > self.bulk_threshold:
                results.update(await self._bulk_upsert(table, ext_field, [(i, ops[i]) for i in indexes]))
            else:
                for chunk in _chunks(indexes, self.collection_size):
                    results.update(await self._collection_upsert(table, ext_field, [(i, ops[i]) for i in chunk]))
        for table, indexes in updates.items():
            for chunk in _chunks(indexes, self.collection_size):
                results.update(await self._collection_write("PATCH", table, [(i, ops[i]) for i in chunk]))
        for table, indexes in creates.items():
            for chunk in _chunks(indexes, self.collection_size):
                results.update(await self._collection_write("POST", table, [(i, ops[i]) for i in chunk]))
        for chunk in _chunks(deletes, self.collection_size):
            results.update(await self._collection_delete([(i, ops[i]) for i in chunk]))
        return [results[i] for i in range(len(ops))]

    async def _collection_upsert(self, table: str, ext_field: str,
                                 items: list[tuple[int, WriteOp]]) -> dict[int, WriteResult]:
        records = []
        for _, op in items:
            assert op.match is not None
            records.append({"attributes": {"type": table}, **_jsonable(op.values), ext_field: op.match[ext_field]})
        body = await self._ajson("PATCH", f"composite/sobjects/{table}/{ext_field}",
                                 what=f"upsert {len(items)} {table} by {ext_field}",
                                 json={"allOrNone": False, "records": records})
        return self._per_record(body, items, lambda op: f"{table} {ext_field}={(op.match or {}).get(ext_field)}")

    async def _collection_write(self, method: str, table: str,
                                items: list[tuple[int, WriteOp]]) -> dict[int, WriteResult]:
        records = []
        for _, op in items:
            record: dict[str, Any] = {"attributes": {"type": table}, **_jsonable(op.values)}
            if method == "PATCH":
                record["Id"] = op.key
            records.append(record)
        verb = "update" if method == "PATCH" else "create"
        body = await self._ajson(method, "composite/sobjects", what=f"{verb} {len(items)} {table}",
                                 json={"allOrNone": False, "records": records})
        return self._per_record(body, items, lambda op: f"{table} {op.key or 'new record'}",
                                created=method == "POST")

    async def _collection_delete(self, items: list[tuple[int, WriteOp]]) -> dict[int, WriteResult]:
        ids = ",".join(quote(str(op.key)) for _, op in items)
        body = await self._ajson("DELETE", f"composite/sobjects?ids={ids}&allOrNone=false",
                                 what=f"delete {len(items)} records")
        return self._per_record(body, items, lambda op: f"{op.table} {op.key}")

    @staticmethod
    def _per_record(body: Any, items: list[tuple[int, WriteOp]], context: Callable[[WriteOp], str],
                    *, created: bool = False) -> dict[int, WriteResult]:
        if not isinstance(body, list) or len(body) != len(items):
            raise AmbiguousWriteError(f"{SYSTEM}: collections answer has {len(body) if isinstance(body, list) else 0}"
                                      f" results for {len(items)} records; re-check before retrying")
        out: dict[int, WriteResult] = {}
        for (index, op), result in zip(items, body, strict=True):
            if isinstance(result, dict) and result.get("success"):
                out[index] = WriteResult(op.op_id, ok=True, key=result.get("id"),
                                         created=bool(result.get("created", created)))
            else:
                errors = result.get("errors") if isinstance(result, dict) else None
                out[index] = WriteResult(op.op_id, ok=False, error=_record_error(errors, context(op)))
        return out

    async def _bulk_upsert(self, table: str, ext_field: str,
                           items: list[tuple[int, WriteOp]]) -> dict[int, WriteResult]:
        """Bulk API 2.0 ingest job (upsert by External ID); per-record results from the job's result CSVs."""
        columns: list[str] = [ext_field]
        for _, op in items:
            for name in op.values:
                if name not in columns:
                    columns.append(name)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        by_ext: dict[str, list[tuple[int, WriteOp]]] = {}
        for index, op in items:
            ext = str((op.match or {})[ext_field])
            by_ext.setdefault(ext, []).append((index, op))
            row = {**op.values, ext_field: ext}
            writer.writerow([_csv_cell(row[c]) if c in row else "" for c in columns])
        what = f"bulk upsert {len(items)} {table} by {ext_field}"
        job = await self._ajson("POST", "jobs/ingest", what=what, json={
            "object": table, "externalIdFieldName": ext_field, "contentType": "CSV", "operation": "upsert",
            "lineEnding": "LF"})
        job_id = str(job["id"])
        await asyncio.to_thread(self._call, "PUT", f"jobs/ingest/{job_id}/batches", what=what,
                                data=buffer.getvalue().encode("utf-8"),
                                headers={"Content-Type": "text/csv", "Accept": "application/json"})
        state = await self._ajson("PATCH", f"jobs/ingest/{job_id}", what=what, json={"state": "UploadComplete"})
        deadline = time.monotonic() + self.bulk_timeout
        while str((state or {}).get("state")) not in _TERMINAL_JOB_STATES:
            if time.monotonic() > deadline:
                raise AmbiguousWriteError(f"{SYSTEM}: {what}: job {job_id} still running after {self.bulk_timeout}s")
            await self._sleep(self.bulk_poll_interval)
            state = await self._ajson("GET", f"jobs/ingest/{job_id}", what=what)
        if state.get("state") != "JobComplete":
            raise TransientError(f"{SYSTEM}: {what}: job {job_id} ended {state.get('state')}: "
                                 f"{state.get('errorMessage', '')}")
        out: dict[int, WriteResult] = {}
        for kind in ("successfulResults", "failedResults"):
            response = await asyncio.to_thread(self._call, "GET", f"jobs/ingest/{job_id}/{kind}", what=what,
                                               headers={"Accept": "text/csv"})
            for row in csv.DictReader(io.StringIO(response.content.decode("utf-8"))):
                for index, op in by_ext.get(row.get(ext_field, ""), []):
                    if kind == "successfulResults":
                        out[index] = WriteResult(op.op_id, ok=True, key=row.get("sf__Id") or None,
                                                 created=row.get("sf__Created", "").lower() == "true")
                    else:
                        code, _, message = row.get("sf__Error", "").partition(":")
                        out[index] = WriteResult(op.op_id, ok=False, error=_record_error(
                            [{"statusCode": code, "message": message.rstrip(" -:")}],
                            f"{table} {ext_field}={row.get(ext_field)}"))
        for index, op in items:
            out.setdefault(index, WriteResult(op.op_id, ok=False, error=AmbiguousWriteError(
                f"{SYSTEM}: {what}: job {job_id} reported no result for this record; re-check before retrying")))
        return out

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
        for chunks in itertools.product(*(_chunks(literals, MAX_IN_VALUES) for _, literals in listed)):
            clauses = fixed + [_in_clause(name, chunk) for (name, _), chunk in zip(listed, chunks, strict=True)]
            where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
            async for page in self._query_pages(_soql(fields, table, where)):
                for record in page:
                    found.setdefault(record.key, record)
        return list(found.values())

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        wanted = [k for k in keys if _ID_RE.fullmatch(k)]
        out: dict[str, SourceRecord] = {}
        for chunk in _chunks(wanted, MAX_COLLECTION_SIZE):
            soql = _soql(await self._field_list(table), table, f" WHERE Id IN ({', '.join(map(soql_quote, chunk))})")
            async for page in self._query_pages(soql):
                for record in page:
                    out[record.key] = record
        by15 = {k[:15]: k for k in out}
        return {k: out.get(k) or out[by15[k[:15]]] for k in keys if k in out or k[:15] in by15}

    async def _field_list(self, table: str) -> list[str]:
        soql_identifier(table)
        if table not in self._fields:
            describe = await self._ajson("GET", f"sobjects/{table}/describe", what=f"describe {table}")
            names = [str(f["name"]) for f in (describe or {}).get("fields", []) if isinstance(f, dict)]
            self._fields[table] = [n for n in names if _IDENT_RE.fullmatch(n)] or ["Id"]
        return self._fields[table]

    async def _query_pages(self, soql: str) -> AsyncIterator[list[SourceRecord]]:
        body = await self._ajson("GET", "query/", what="SOQL query", params={"q": soql})
        while True:
            yield [_to_record(r) for r in body.get("records", [])]
            next_url = body.get("nextRecordsUrl")
            if body.get("done", True) or not next_url:
                return
            body = await self._ajson("GET", str(next_url), what="SOQL query (next page)", absolute=True)

    # ------------------------------------------------------------------------------- ChangeSource

    async def changes_since(self, table: str, checkpoint: str | None) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """SOQL poll on SystemModstamp (backfill; CDC keeps 72 h). The checkpoint is the last SystemModstamp seen."""
        since = parse_sf_datetime(checkpoint) if checkpoint else None
        if checkpoint and since is None:
            raise EnvelopeError(f"{SYSTEM}: checkpoint {checkpoint!r} is not a timestamp")
        # SOQL datetime literals have second precision: ask from the checkpoint's second, drop what was seen
        where = f" WHERE SystemModstamp >= {soql_quote(since)}" if since else ""
        soql = _soql(await self._field_list(table), table, where + " ORDER BY SystemModstamp ASC")
        current = checkpoint or ""
        async for page in self._query_pages(soql):
            fresh = [r for r in page if since is None or (r.modified is not None and r.modified > since)]
            if fresh:
                current = str(fresh[-1].values.get("SystemModstamp") or current)
                yield fresh, current

    async def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        soql = _soql(await self._field_list(table), table, " ORDER BY Id")
        async for page in self._query_pages(soql):
            yield page

    async def fetch_attachment(self, table: str, key: str, attachment_id: str) -> bytes:
        raise RejectedError(f"{SYSTEM}: attachments (ContentVersion) are not synced by this connector")


def _soql(fields: Sequence[str], table: str, tail: str) -> str:
    """SELECT statement from validated API names; `tail` is built only from identifiers and `soql_quote` literals."""
    names = ", ".join(soql_identifier(f) for f in fields)
    return f"SELECT {names} FROM {soql_identifier(table)}{tail}"  # noqa: S608 - identifiers validated, values quoted


def _in_clause(name: str, literals: Sequence[str]) -> str:
    """`name IN (...)` from rendered literals; null is matched with `= null` (IN lists hold values)."""
    values = [v for v in literals if v != "null"]
    if len(values) == len(literals):
        return f"{name} IN ({', '.join(values)})"
    if not values:
        return f"{name} = null"
    return f"({name} IN ({', '.join(values)}) OR {name} = null)"


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i: i + size]) for i in range(0, len(items), size)]
