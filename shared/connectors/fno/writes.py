"""F&O writes: locate, PATCH or POST (no upsert in F&O), document lines, lost create answers."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from shared.connectors._http import not_attempted
from shared.connectors.fno.client import FinOpsHttp
from shared.connectors.fno.codecs import (
    SYSTEM,
    _ident,
    _jsonable,
    _key_fields,
    _same_value,
    format_key,
    key_path,
    parse_key,
)
from shared.connectors.fno.errors import _error_for, _with_detail
from shared.core.errors import AmbiguousWriteError, AuthError, RejectedError, SyncError, ThrottledError
from shared.core.ports import LineWrite, SourceRecord, WriteOp, WriteResult

log = logging.getLogger(__name__)

_AMBIGUOUS_CREATE = frozenset({502, 504})


class FinOpsWrites(FinOpsHttp):
    """`write` (RecordSink)."""

    async def _locate(self, op: WriteOp) -> tuple[dict[str, str] | None, SourceRecord | None]:
        """(key fields, current record) of the op's target; key None when a `match` finds nothing."""
        fields = _key_fields(op.table)
        if op.key:
            key = parse_key(op.table, op.key)
            return key, await self.get(op.table, key)
        if not op.match:
            raise RejectedError(f"{SYSTEM}: op {op.op_id} on {op.table} has neither key nor match")
        if all(op.match.get(f) for f in fields):
            key = {f: str(op.match[f]) for f in fields}
            return key, await self.get(op.table, key)
        found = await self.select(op.table, equals=op.match)
        if len(found) > 1:
            raise RejectedError(f"{SYSTEM}: match {op.match} finds {len(found)} {op.table} records "
                                f"({', '.join(r.key for r in found[:5])}); add dataAreaId or a key field")
        if not found:
            return None, None
        return parse_key(op.table, found[0].key), found[0]

    async def _write_one(self, op: WriteOp, *, retried: bool = False) -> WriteResult:
        what = f"{op.action} {op.table} (op {op.op_id})"
        key, current = await self._locate(op)
        fields = _key_fields(op.table)
        if op.action == "delete":
            if key is None or current is None:
                return WriteResult(op.op_id, True, key=format_key(op.table, key) if key else None)
            path = key_path(op.table, key)
            response = await self._send("DELETE", self.data_root + path, what=what, headers={"If-Match": "*"},
                                        write=True)
            if response.status_code not in (200, 204, 404):
                raise _error_for(response, what)
            return WriteResult(op.op_id, True, key=format_key(op.table, key))
        values = {k: v for k, v in op.values.items() if k not in fields}
        if current is not None and key is not None:
            path = key_path(op.table, key)
            response = await self._send("PATCH", self.data_root + path, what=what, body=values,
                                        headers={"If-Match": "*"}, write=True)
            if not response.is_success:
                raise _error_for(response, what)
            return await self._finish(op, {**current.values, **values, **key}, created=False)
        if op.action == "update":
            raise RejectedError(f"{SYSTEM} {what}: the record does not exist (F&O has no upsert; use 'upsert')")
        body: dict[str, Any] = {**(op.match or {}), **op.values, **(key or {})}
        try:
            response = await self._post(op.table, body, what)
        except AmbiguousWriteError as exc:
            # The create may have been applied: find it again (by key or match) before anything is resent.
            _, found = await self._locate(op)
            if found is None:
                raise AmbiguousWriteError(f"{exc.detail}; it is not found (yet) by {op.key or op.match}, so it is "
                                          "looked up again on the retry before any new create") from exc
            log.info("%s %s: the create's answer was lost but F&O has the record (%s)", SYSTEM, what, found.key)
            return await self._finish(op, found.values, created=True, has_lines=True)
        if not response.is_success:
            error = _error_for(response, what)
            if isinstance(error, RejectedError) and "already exists" in error.detail and not retried:
                # A concurrent or replayed create won the race: the record is there now, so update it.
                return await self._write_one(op, retried=True)
            raise error
        try:
            created = response.json()
        except ValueError:
            created = body
        return await self._finish(op, created if isinstance(created, dict) else body, created=True)

    async def _post(self, table: str, body: Mapping[str, Any], what: str) -> httpx.Response:
        """POST a create; AmbiguousWriteError when it may have been applied without our knowing (no answer after
        it was sent, 502 or 504), so the caller looks the record up instead of creating it again."""
        response = await self._send("POST", self.data_root + table, what=what, body=body, write=True)
        if response.status_code in _AMBIGUOUS_CREATE:
            raise AmbiguousWriteError(f"{SYSTEM} {what}: HTTP {response.status_code} after the create was sent; it "
                                      "may have been applied")
        return response

    async def _finish(self, op: WriteOp, header: Mapping[str, Any], *, created: bool,
                      has_lines: bool | None = None) -> WriteResult:
        """The op's result once its record is written: then its lines, if it has any.

        `has_lines` False: the header was just created by this call, so it has no lines to read first.
        """
        key = format_key(op.table, header)
        if op.lines is None:
            return WriteResult(op.op_id, True, key=key, created=created)
        try:
            error = await self._write_lines(op, key, header, created=not has_lines if has_lines is not None
                                            else created)
        except SyncError as exc:
            error = _with_detail(exc, f"{SYSTEM}: {op.table} {key} is written, but its lines could not be: "
                                      f"{exc.detail}")
        if error is not None:
            log.warning("%s: op %s: %s", SYSTEM, op.op_id, error)
            # The header key goes back with the failure so the retry (found again by `match`) adds only the
            # missing lines.
            return WriteResult(op.op_id, False, key=key, created=created, error=error)
        return WriteResult(op.op_id, True, key=key, created=created)

    async def _write_lines(self, op: WriteOp, header_key: str, header: Mapping[str, Any], *,
                           created: bool) -> SyncError | None:
        """Make every line of `op.lines` exist once under the header; the failed lines' errors, combined."""
        lines = op.lines
        assert lines is not None
        _key_fields(lines.table)
        _ident(lines.table, "entity set")
        parent: dict[str, Any] = {}
        for line_field, header_field in lines.parent_fields.items():
            value = header.get(header_field)
            if value is None or value == "":
                raise RejectedError(f"{SYSTEM}: {op.table} {header_key} has no {header_field} to copy onto its "
                                    f"{lines.table}.{line_field}")
            parent[_ident(line_field, "line field")] = value
        if not parent:
            raise RejectedError(f"{SYSTEM}: op {op.op_id}: lines of {lines.table} need parent_fields to tie them "
                                f"to {op.table} {header_key}")
        # A header created by this very op has no lines yet; otherwise one query reads them all, and every
        # item is matched locally (no query per line).
        existing = [] if created else await self.select(lines.table, equals=parent)
        failures: list[SyncError] = []
        for n, item in enumerate(lines.items):
            try:
                await self._write_line(lines.table, item, parent, existing, op.op_id)
            except (AuthError, ThrottledError) as exc:
                # A system condition, not this line's: the remaining lines wait for the retry too.
                failures.append(exc)
                left = len(lines.items) - n - 1
                if left:
                    failures.append(_with_detail(exc, f"{left} more lines not attempted"))
                break
            except SyncError as exc:
                failures.append(exc)
        if not failures:
            return None
        # A permanent failure decides the outcome: retrying cannot fix it, and the operator needs its reason.
        # Then a system condition (auth, throttling), so the caller waits for the system as a whole.
        first = next((e for e in failures if not e.retriable),
                     next((e for e in failures if isinstance(e, AuthError | ThrottledError)), failures[0]))
        return _with_detail(first, f"{SYSTEM}: {op.table} {header_key} is written, but {len(failures)} of "
                                   f"{len(lines.items)} {lines.table} lines failed (a retry adds only the "
                                   "missing ones): " + "; ".join(e.detail for e in failures))

    async def _write_line(self, table: str, item: LineWrite, parent: Mapping[str, Any],
                          existing: list[SourceRecord], op_id: str) -> None:
        """Create the line, or PATCH the one its `match` finds (only the fields that differ); `existing` learns
        the created line, so an item repeated in the same op is not created twice."""
        what = f"{table} line for source line {item.source_key} (op {op_id})"
        if not item.match:
            raise RejectedError(f"{SYSTEM} {what}: the line has no match field, so a replay would duplicate it")
        found = [r for r in existing if all(str(r.values.get(f, "")) == str(v) for f, v in item.match.items())]
        if len(found) > 1:
            raise RejectedError(f"{SYSTEM} {what}: {len(found)} lines already match {item.match} "
                                f"({', '.join(r.key for r in found[:5])}); remove the duplicates in F&O")
        if found:
            line = found[0]
            wanted = {k: v for k, v in {**item.values, **item.match}.items() if k not in _key_fields(table)}
            changes = {k: v for k, v in wanted.items() if not _same_value(line.values.get(k), v)}
            if not changes:
                return
            path = key_path(table, parse_key(table, line.key))
            response = await self._send("PATCH", self.data_root + path, what=f"update {what}", body=changes,
                                        headers={"If-Match": "*"}, write=True)
            if not response.is_success:
                raise _error_for(response, f"update {what}")
            line.values.update({k: _jsonable(v) for k, v in changes.items()})
            return
        body = {**item.values, **item.match, **parent}
        try:
            response = await self._post(table, body, f"create {what}")
        except AmbiguousWriteError as exc:
            # The line may have been added: look it up by its match before it could be added a second time.
            found = await self.select(table, equals={**parent, **item.match})
            if not found:
                raise AmbiguousWriteError(f"{exc.detail}; not found (yet) by {item.match}, so it is looked up "
                                          "again on the retry before any new create") from exc
            log.info("%s create %s: the answer was lost but F&O has the line (%s)", SYSTEM, what, found[0].key)
            existing.append(found[0])
            return
        if not response.is_success:
            raise _error_for(response, f"create {what}")
        try:
            row = response.json()
        except ValueError:
            row = None
        values = row if isinstance(row, dict) else {k: _jsonable(v) for k, v in body.items()}
        try:
            existing.append(self._record(table, values))
        except RejectedError:
            existing.append(SourceRecord(key="", values=dict(values)))

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """Apply ops with bounded concurrency (ops on the same record run in order); one result per op.

        Every failure fails only its own op. Auth failures and throttling that outlived the in-call retries are
        conditions of F&O, not of a record: the ops not started yet are not attempted (failed with the same
        retriable kind and a text saying so), and the ops already written keep their results.
        """
        semaphore = asyncio.Semaphore(self._max_concurrency)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, op in enumerate(ops):
            ident = op.key or json.dumps(op.match or {}, sort_keys=True, default=str) or op.op_id
            groups.setdefault((op.table, ident), []).append(i)
        results: list[WriteResult | None] = [None] * len(ops)
        halted: list[SyncError] = []

        async def run(indexes: list[int]) -> None:
            for i in indexes:
                op = ops[i]
                async with semaphore:
                    if halted:
                        results[i] = WriteResult(op.op_id, False, key=op.key, error=not_attempted(
                            halted[0], f"{SYSTEM}: {op.action} {op.table} (op {op.op_id}) was not attempted"))
                        continue
                    try:
                        results[i] = result = await self._write_one(op)
                        if isinstance(result.error, AuthError | ThrottledError):
                            halted.append(result.error)
                    except SyncError as exc:
                        if isinstance(exc, AuthError | ThrottledError):
                            halted.append(exc)
                        log.warning("%s: op %s failed: %s", SYSTEM, op.op_id, exc)
                        results[i] = WriteResult(op.op_id, False, key=op.key, error=exc)

        await asyncio.gather(*(run(ix) for ix in groups.values()))
        return [r for r in results if r is not None]
