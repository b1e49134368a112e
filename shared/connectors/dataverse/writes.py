"""Dataverse writes: ops -> `$batch` change sets, per-op results, URL-unsafe alternate keys, attachments as notes."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Sequence
from typing import Any

from shared.connectors._http import rewrap
from shared.connectors.dataverse.batch import PartResponse, PreparedWrite, batch_body, parse_batch_response
from shared.connectors.dataverse.client import DataverseHttp, error_parts, map_status
from shared.connectors.dataverse.codecs import (
    API_PATH,
    ENTITY_ID_RE,
    SYSTEM,
    URL_UNSAFE_KEY_CHARS,
    TableInfo,
    check_guid,
    check_ident,
    jsonable,
    key_segment,
)
from shared.core.errors import RejectedError, RetriableError, SyncError, TransientError
from shared.core.ports import ATTACHMENTS_KEY, GEOMETRY_KEY, Attachment, Bind, WriteOp, WriteResult

ANNOTATION_MARKER = "syncline-source:"
"""Prefix of the line in a note's `notetext` naming the source attachment (makes re-sends idempotent)."""
_ANNOTATION_NAMESPACE = uuid.UUID("0b9b7f5e-3f5c-4c64-9a53-5d0c2f6c1a11")


class DataverseWrites(DataverseHttp):
    """`RecordSink.write`: batches of idempotent upserts, updates and deletes, then the attachments."""

    def _prepare(self, index: int, op: WriteOp, info: TableInfo) -> PreparedWrite:
        segment, key_desc = key_segment(op)
        path = f"{API_PATH}{info.entity_set}{segment}"
        headers: dict[str, str] = {}
        if op.action == "delete":
            return PreparedWrite(index, op, info, "DELETE", path, headers, None, key_desc)
        if op.action not in ("upsert", "update"):
            raise RejectedError(f"{SYSTEM}: unknown write action {op.action!r}")
        body: dict[str, Any] = {}
        skip = {GEOMETRY_KEY, ATTACHMENTS_KEY, info.primary_id, *(op.match or {})}
        for name, value in op.values.items():
            if name in skip:
                continue  # key columns never go in the body of a write through that key
            check_ident(name, "column")
            body[name] = jsonable(value, name)
        for nav, bind in op.binds.items():
            check_ident(nav, "navigation property")
            check_ident(bind.entity_set, "entity set")
            body[f"{nav}@odata.bind"] = f"/{bind.entity_set}({check_guid(bind.key, f'{nav} bind key')})"
        headers["Content-Type"] = "application/json; type=entry"
        headers["Prefer"] = "return=representation"
        if op.action == "update":
            headers["If-Match"] = "*"  # update only: never create a record that was deleted meanwhile
        return PreparedWrite(index, op, info, "PATCH", f"{path}?$select={info.primary_id}", headers,
                         json.dumps(body, separators=(",", ":")).encode(), key_desc)


    def _result(self, item: PreparedWrite, part: PartResponse) -> WriteResult:
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
                m = ENTITY_ID_RE.search(part.headers.get("odata-entityid", ""))
                key = m.group("id") if m else op.key
            return WriteResult(op.op_id, True, key=key.lower() if key else None, created=part.status == 201)
        if op.action == "delete" and part.status == 404:
            return WriteResult(op.op_id, True, key=op.key)  # already gone: the delete's goal holds
        code, message = error_parts(part.body)
        detail = f"{SYSTEM} {where}: HTTP {part.status}{' ' + code if code else ''}: {message}"
        error: SyncError = map_status(part.status, detail, part.headers)
        if part.status == 404 and op.action == "update" and info.logical_name in message:
            error = RejectedError(f"{SYSTEM} {where}: record no longer exists in Dataverse ({message})")
        elif part.status == 404:
            error = RejectedError(f"{SYSTEM} {where}: a record it refers to does not exist ({message})")
        elif part.status == 412:
            error = RejectedError(f"{SYSTEM} {where}: precondition failed - another record already has these key "
                                  f"values or the record changed ({code}: {message})")
        return WriteResult(op.op_id, False, key=op.key, error=error)

    async def _send_batch(self, items: Sequence[PreparedWrite]) -> list[WriteResult]:
        boundary = f"batch_{uuid.uuid4()}"
        what = f"$batch of {len(items)} writes"
        response = await self._send(
            "POST", self.api_root + "$batch", what=what, content=batch_body(items, boundary), write=True,
            headers={"Content-Type": f'multipart/mixed; boundary="{boundary}"', "Prefer": "odata.continue-on-error"},
        )
        self._raise_for(response, what)
        groups = parse_batch_response(response.content, response.headers.get("Content-Type", ""))
        by_position: dict[int, PartResponse] = {}
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
        prepared: list[PreparedWrite] = []
        for index, op in enumerate(ops):
            try:
                info = await self._table(op.table)
                if op.key is None and any(isinstance(v, str) and URL_UNSAFE_KEY_CHARS & set(v)
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

        async def run(chunk: list[PreparedWrite]) -> list[WriteResult]:
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
                error = rewrap(note_result.error, context)
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
