"""Salesforce writes: sObject Collections (<=200 a call, allOrNone=false) and Bulk API 2.0 upserts; per-record results.

Every request carries `Sforce-Call-Options: client=<call_options_client>` so Syncline's own writes show up in
Change Data Capture events as `changeOrigin ...;client=<call_options_client>` and can be dropped as echoes.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote

from shared.connectors._http import not_attempted
from shared.connectors.salesforce.client import SalesforceHttp
from shared.connectors.salesforce.codecs import ID_RE, SYSTEM, chunked, csv_cell, jsonable, soql_identifier
from shared.connectors.salesforce.errors import record_error
from shared.core.errors import AmbiguousWriteError, AuthError, RejectedError, SyncError, ThrottledError, TransientError
from shared.core.ports import WriteOp, WriteResult

log = logging.getLogger("shared.connectors.salesforce")

_TERMINAL_JOB_STATES = frozenset({"JobComplete", "Failed", "Aborted"})


class SalesforceWrites(SalesforceHttp):
    """`RecordSink.write`: ops grouped by kind into Collections or Bulk calls; one failed call fails only its ops."""

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
                    if not op.key or not ID_RE.fullmatch(op.key):
                        raise RejectedError(f"{SYSTEM}: delete of {op.table} needs a Salesforce Id (got {op.key!r})")
                    deletes.append(index)
                elif op.key:
                    if not ID_RE.fullmatch(op.key):
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
        calls: list[tuple[list[int], Callable[[list[tuple[int, WriteOp]]], Awaitable[dict[int, WriteResult]]]]] = []
        for (table, ext_field), indexes in upserts.items():
            if len(indexes) > self.bulk_threshold:
                calls.append((indexes, functools.partial(self._bulk_upsert, table, ext_field)))
            else:
                calls += [(chunk, functools.partial(self._collection_upsert, table, ext_field))
                          for chunk in chunked(indexes, self.collection_size)]
        for table, indexes in updates.items():
            calls += [(chunk, functools.partial(self._collection_write, "PATCH", table))
                      for chunk in chunked(indexes, self.collection_size)]
        for table, indexes in creates.items():
            calls += [(chunk, functools.partial(self._collection_write, "POST", table))
                      for chunk in chunked(indexes, self.collection_size)]
        calls += [(chunk, self._collection_delete) for chunk in chunked(deletes, self.collection_size)]
        halted: SyncError | None = None
        for indexes, call in calls:
            items = [(i, ops[i]) for i in indexes]
            if halted is not None:
                # The org refused the session or the allocation: the later calls wait for the retry untried.
                for i, op in items:
                    results[i] = WriteResult(op.op_id, ok=False, error=not_attempted(
                        halted, f"{SYSTEM}: {op.action} {op.table} (op {op.op_id}) was not attempted"))
                continue
            try:
                results.update(await call(items))
            except SyncError as exc:
                # One call's failure is its records' only: the records of the calls before it stay written.
                log.warning("%s: a write call of %d records failed: %s", SYSTEM, len(items), exc)
                for i, op in items:
                    results[i] = WriteResult(op.op_id, ok=False, error=exc)
                if isinstance(exc, AuthError | ThrottledError):
                    halted = exc
        return [results[i] for i in range(len(ops))]

    async def _collection_upsert(self, table: str, ext_field: str,
                                 items: list[tuple[int, WriteOp]]) -> dict[int, WriteResult]:
        records = []
        for _, op in items:
            assert op.match is not None
            records.append({"attributes": {"type": table}, **jsonable(op.values), ext_field: op.match[ext_field]})
        body = await self._ajson("PATCH", f"composite/sobjects/{table}/{ext_field}",
                                 what=f"upsert {len(items)} {table} by {ext_field}", idempotent=True,
                                 json={"allOrNone": False, "records": records})
        return self._per_record(body, items, lambda op: f"{table} {ext_field}={(op.match or {}).get(ext_field)}")

    async def _collection_write(self, method: str, table: str,
                                items: list[tuple[int, WriteOp]]) -> dict[int, WriteResult]:
        records = []
        for _, op in items:
            record: dict[str, Any] = {"attributes": {"type": table}, **jsonable(op.values)}
            if method == "PATCH":
                record["Id"] = op.key
            records.append(record)
        verb = "update" if method == "PATCH" else "create"
        body = await self._ajson(method, "composite/sobjects", what=f"{verb} {len(items)} {table}",
                                 idempotent=method == "PATCH",
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
                out[index] = WriteResult(op.op_id, ok=False, error=record_error(errors, context(op)))
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
            writer.writerow([csv_cell(row[c]) if c in row else "" for c in columns])
        what = f"bulk upsert {len(items)} {table} by {ext_field}"
        job = await self._ajson("POST", "jobs/ingest", what=what, json={
            "object": table, "externalIdFieldName": ext_field, "contentType": "CSV", "operation": "upsert",
            "lineEnding": "LF"})
        job_id = str(job["id"])
        await asyncio.to_thread(self._call, "PUT", f"jobs/ingest/{job_id}/batches", what=what,
                                data=buffer.getvalue().encode("utf-8"),
                                headers={"Content-Type": "text/csv", "Accept": "application/json"})
        state = await self._ajson("PATCH", f"jobs/ingest/{job_id}", what=what, json={"state": "UploadComplete"},
                                  idempotent=True)
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
                        out[index] = WriteResult(op.op_id, ok=False, error=record_error(
                            [{"statusCode": code, "message": message.rstrip(" -:")}],
                            f"{table} {ext_field}={row.get(ext_field)}"))
        for index, op in items:
            out.setdefault(index, WriteResult(op.op_id, ok=False, error=AmbiguousWriteError(
                f"{SYSTEM}: {what}: job {job_id} reported no result for this record; re-check before retrying")))
        return out
