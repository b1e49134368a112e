"""SAP writes: locate, plan, send alone or as $batch changesets, settle lost answers and stale ETags."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Sequence
from typing import Any

from shared.connectors._http import not_attempted
from shared.connectors._odata import json_object
from shared.connectors.sap.batch import _Part, _Req
from shared.connectors.sap.client import SapHttp
from shared.connectors.sap.codecs import (
    _FETCH_CHUNK,
    SYSTEM,
    WRITABLE,
    _entity,
    build_filter,
    filter_literal,
    format_key,
    parse_key,
)
from shared.connectors.sap.errors import error_for
from shared.connectors.sap.plans import _Plan, _plan, _writable
from shared.core.errors import AmbiguousWriteError, AuthError, RejectedError, SyncError, ThrottledError, TransientError
from shared.core.ports import WriteOp, WriteResult

log = logging.getLogger(__name__)


class _StaleError(Exception):
    """A request of a plan was answered 412: the target changed since it was read."""


class SapWrites(SapHttp):
    """`write` (RecordSink)."""

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """Apply ops; one result per op, in order (see "Writes" and "$batch" in `sap/connector.py`).

        Every failure fails only its own op. Auth failures and throttling that outlived the in-call retries are
        SAP's conditions, not a record's: the ops still unsent are not attempted (failed with the same retriable
        kind and a text saying so), and the ops already written keep their results.
        """
        results: list[WriteResult | None] = [None] * len(ops)
        by_service: dict[str, list[int]] = {}
        alone: list[int] = []
        for i, op in enumerate(ops):
            if self.batch_size > 1 and op.table in WRITABLE:
                by_service.setdefault(_entity(op.table).service, []).append(i)
            else:
                alone.append(i)
        jobs: list[Awaitable[None]] = []
        for indexes in by_service.values():
            if len(indexes) > 1:
                jobs.append(self._write_batched(ops, indexes, results))
            else:
                alone += indexes
        if alone:
            jobs.append(self._write_alone(ops, sorted(alone), results))
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        halted: SyncError | None = None
        for outcome in outcomes:
            if isinstance(outcome, AuthError | ThrottledError):
                halted = halted or outcome
            elif isinstance(outcome, BaseException):
                raise outcome
        if halted is not None:
            for i, op in enumerate(ops):
                if results[i] is None:
                    results[i] = WriteResult(op.op_id, False, key=op.key, error=not_attempted(
                        halted, f"{SYSTEM}: {op.action} {op.table} (op {op.op_id}) was not attempted"))
        return [r for r in results if r is not None]

    @staticmethod
    def _groups(ops: Sequence[WriteOp], indexes: Sequence[int]) -> list[list[int]]:
        """Ops on the same record, in order (they must not run concurrently or share one read)."""
        groups: dict[tuple[str, str], list[int]] = {}
        for i in indexes:
            op = ops[i]
            ident = op.key or json.dumps(op.match or {}, sort_keys=True, default=str) or op.op_id
            groups.setdefault((op.table, ident), []).append(i)
        return list(groups.values())

    @staticmethod
    def _failed(op: WriteOp, exc: SyncError) -> WriteResult:
        log.warning("%s: op %s failed: %s", SYSTEM, op.op_id, exc)
        return WriteResult(op.op_id, False, key=op.key, error=exc)

    async def _write_alone(self, ops: Sequence[WriteOp], indexes: Sequence[int],
                           results: list[WriteResult | None]) -> None:
        """Every request on its own, ops with bounded concurrency (ops on the same record in order)."""
        semaphore = asyncio.Semaphore(self._max_concurrency)
        halted: list[SyncError] = []

        async def run(group: list[int]) -> None:
            for i in group:
                op = ops[i]
                async with semaphore:
                    if halted:
                        return  # left without a result: `write` reports it not attempted
                    try:
                        results[i] = await self._write_one(op)
                    except (AuthError, ThrottledError) as exc:
                        results[i] = self._failed(op, exc)
                        halted.append(exc)
                        raise
                    except SyncError as exc:
                        results[i] = self._failed(op, exc)

        outcomes = await asyncio.gather(*(run(g) for g in self._groups(ops, indexes)), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _write_batched(self, ops: Sequence[WriteOp], indexes: Sequence[int],
                             results: list[WriteResult | None]) -> None:
        """Ops of one service: batched look-ups, then one changeset per op in $batch calls of `batch_size`."""
        groups = self._groups(ops, indexes)
        rounds = max(len(g) for g in groups)
        for number in range(rounds):
            # The n-th op of every record in one round: a later op on a record plans from a fresh read.
            todo = [g[number] for g in groups if len(g) > number]
            await self._batch_round(ops, todo, results)

    async def _batch_round(self, ops: Sequence[WriteOp], indexes: Sequence[int],
                           results: list[WriteResult | None]) -> None:
        try:
            located = await self._locate_many([ops[i] for i in indexes])
        except (AuthError, ThrottledError) as exc:
            for i in indexes:
                results[i] = self._failed(ops[i], exc)
            raise
        except SyncError as exc:
            for i in indexes:
                results[i] = self._failed(ops[i], exc)
            return
        planned: list[tuple[int, _Plan]] = []
        again: list[int] = []
        for i, found in zip(indexes, located, strict=True):
            op = ops[i]
            if isinstance(found, SyncError):
                results[i] = self._failed(op, found)
                continue
            try:
                plan = _plan(op, found)
            except SyncError as exc:
                results[i] = self._failed(op, exc)
                continue
            if plan.incomplete:
                again.append(i)
            elif not plan.requests:
                results[i] = WriteResult(op.op_id, True, key=plan.key)
            else:
                planned.append((i, plan))
        root = self.service_root(ops[indexes[0]].table)
        semaphore = asyncio.Semaphore(self._max_concurrency)

        async def send(chunk: list[tuple[int, _Plan]]) -> None:
            async with semaphore:
                what = f"$batch of {len(chunk)} {ops[chunk[0][0]].table} changesets"
                try:
                    answers = await self._batch(root, [p.requests for _, p in chunk], what=what)
                except AmbiguousWriteError as exc:
                    await self._settle_lost(ops, chunk, exc, results)
                    return
                except (AuthError, ThrottledError) as exc:
                    for i, _ in chunk:
                        results[i] = self._failed(ops[i], exc)
                    raise
                except SyncError as exc:
                    for i, _ in chunk:
                        results[i] = self._failed(ops[i], exc)
                    return
            for (i, plan), answer in zip(chunk, answers, strict=True):
                op = ops[i]
                if answer.ok:
                    results[i] = self._planned_result(op, plan, answer.parts[0])
                    continue
                part = answer.parts[0]
                if part.status == 412:
                    log.info("%s %s: ETag is stale (changed in SAP meanwhile), redoing it on its own", SYSTEM,
                             plan.what)
                    again.append(i)
                elif plan.delete and part.status == 404:
                    results[i] = WriteResult(op.op_id, True, key=plan.key)
                else:
                    results[i] = self._failed(op, error_for(part.response(), plan.what, write=True))

        chunks = [planned[s:s + self.batch_size] for s in range(0, len(planned), self.batch_size)]
        outcomes = await asyncio.gather(*(send(c) for c in chunks), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if again:
            await self._write_alone(ops, sorted(again), results)

    def _planned_result(self, op: WriteOp, plan: _Plan, first: _Part) -> WriteResult:
        if not plan.create:
            return WriteResult(op.op_id, True, key=plan.key)
        created = first.json(plan.what).get("d")
        if not isinstance(created, dict):
            return self._failed(op, AmbiguousWriteError(f"{SYSTEM} {plan.what}: HTTP {first.status} without the "
                                                        "created entity"))
        return WriteResult(op.op_id, True, key=format_key(op.table, created), created=True)

    async def _settle_lost(self, ops: Sequence[WriteOp], chunk: Sequence[tuple[int, _Plan]],
                           exc: AmbiguousWriteError, results: list[WriteResult | None]) -> None:
        """A $batch whose answer was lost: creates found by their match did happen; the rest stays ambiguous."""
        creates = [(i, p) for i, p in chunk if p.create and ops[i].match]
        found = await self._locate_many([WriteOp(ops[i].op_id, "upsert", ops[i].table, match=ops[i].match)
                                         for i, _ in creates]) if creates else []
        made = {i: row for (i, _), row in zip(creates, found, strict=True) if isinstance(row, dict)}
        for i, _ in chunk:
            op = ops[i]
            if i in made:
                log.info("%s op %s: the $batch answer was lost but SAP has the record", SYSTEM, op.op_id)
                results[i] = WriteResult(op.op_id, True, key=format_key(op.table, made[i]), created=True)
            else:
                results[i] = self._failed(op, exc)

    async def _locate_many(self, ops: Sequence[WriteOp]) -> list[dict[str, Any] | SyncError | None]:
        """Each op's target as SAP sends it (or None), read with one filtered query per 40 ops.

        Several queries go to SAP as retrieve parts of one $batch (`batch_size` parts per call).
        """
        out: list[dict[str, Any] | SyncError | None] = [None] * len(ops)
        buckets: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for n, op in enumerate(ops):
            if op.key:
                buckets.setdefault((op.table, ()), []).append(n)
            elif op.match:
                buckets.setdefault((op.table, tuple(sorted(op.match))), []).append(n)
            else:
                out[n] = RejectedError(f"{SYSTEM}: op {op.op_id} on {op.table} has neither key nor match")
        plans: dict[str, list[tuple[str, list[int]]]] = {}
        for (table, fields), members in buckets.items():
            for start in range(0, len(members), _FETCH_CHUNK):
                chunk = members[start:start + _FETCH_CHUNK]
                try:
                    if not fields:
                        keys = [parse_key(table, str(ops[n].key)) for n in chunk]
                        names = _entity(table).keys
                    else:
                        keys = [{f: str((ops[n].match or {})[f]) for f in fields} for n in chunk]
                        names = fields
                except SyncError as exc:
                    for n in chunk:
                        out[n] = exc
                    continue
                clauses = list(dict.fromkeys(" and ".join(f"{f} eq {filter_literal(k[f], f)}" for f in names)
                                             for k in keys))
                text = " or ".join(f"({c})" if len(names) > 1 else c for c in clauses)
                plans.setdefault(table, []).append((text, chunk))
        for table, queries in plans.items():
            answers = await self._queries(table, [q for q, _ in queries], what=f"find {table} records")
            for (_, chunk), rows in zip(queries, answers, strict=True):
                for n in chunk:
                    out[n] = rows if isinstance(rows, SyncError) else self._pick(ops[n], rows)
        return out

    @staticmethod
    def _pick(op: WriteOp, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | SyncError | None:
        if op.key:
            return next((r for r in rows if format_key(op.table, r) == op.key), None)
        match = op.match or {}
        found = [r for r in rows if all(str(r.get(f) if r.get(f) is not None else "") == str(v)
                                        for f, v in match.items())]
        if len(found) > 1:
            numbers = ", ".join(format_key(op.table, r) for r in found[:5])
            return RejectedError(f"{SYSTEM}: match {match} finds {len(found)} {op.table} records ({numbers}); "
                                 "make the match field unique in SAP or give the key")
        return found[0] if found else None

    # ------------------------------------------------------------------------------------ one op alone

    async def _write_one(self, op: WriteOp) -> WriteResult:
        return await self._apply(op, await self._locate(op))

    async def _locate(self, op: WriteOp) -> dict[str, Any] | None:
        """The op's target as SAP sends it (nested values expanded), or None."""
        _writable(op)
        if op.key:
            return await self._get_row(op.table, parse_key(op.table, op.key), what=f"read {op.table} {op.key}",
                                       expand=_entity(op.table).expand)
        if not op.match:
            raise RejectedError(f"{SYSTEM}: op {op.op_id} on {op.table} has neither key nor match")
        found: list[dict[str, Any]] = []
        params = {"$filter": build_filter(op.match)}
        async for rows in self._raw_pages(op.table, params, f"find {op.table} by {', '.join(op.match)}"):
            found.extend(rows)
        picked = self._pick(WriteOp(op.op_id, op.action, op.table, match=op.match), found)
        if isinstance(picked, SyncError):
            raise picked
        return picked

    async def _apply(self, op: WriteOp, current: dict[str, Any] | None) -> WriteResult:
        """Plan, send request by request; a 412 re-reads and re-plans once, an incomplete plan re-reads."""
        stale = False
        for _ in range(4):
            plan = _plan(op, current)
            if plan.create:
                return await self._create(op, plan)
            try:
                for req in plan.requests:
                    await self._run(plan.table, req)
            except _StaleError:
                if stale:
                    raise TransientError(f"{SYSTEM} {plan.what}: {plan.table} {plan.key} changed in SAP again "
                                         "between read and update (HTTP 412 twice); retrying later") from None
                stale = True
                log.info("%s %s: ETag is stale (changed in SAP meanwhile), re-reading and retrying once", SYSTEM,
                         plan.what)
                current = await self._reread(plan)
                continue
            if plan.delete or not plan.incomplete:
                return WriteResult(op.op_id, True, key=plan.key)
            current = await self._reread(plan)
        raise TransientError(f"{SYSTEM} {op.table} write (op {op.op_id}): SAP did not settle after several rounds "
                             "of changes; retrying later")

    async def _reread(self, plan: _Plan) -> dict[str, Any]:
        assert plan.key is not None
        fresh = await self._get_row(plan.table, parse_key(plan.table, plan.key), what=f"re-read for {plan.what}",
                                    expand=_entity(plan.table).expand)
        if fresh is None:
            raise RejectedError(f"SAP rejected {plan.what}: {plan.table} {plan.key} was deleted in SAP while it was "
                                "being updated")
        return fresh

    async def _run(self, table: str, req: _Req) -> None:
        root = self.service_root(table)
        headers = {"If-Match": req.etag} if req.etag is not None else None
        response = await self._send(req.method, root + req.path, what=req.what, body=req.body, headers=headers,
                                    write=True, create=req.method == "POST", service_root=root)
        if response.status_code == 412:
            raise _StaleError(req.what)
        if req.method == "DELETE" and response.status_code == 404:
            return
        if not response.is_success:
            raise error_for(response, req.what, write=True)

    async def _create(self, op: WriteOp, plan: _Plan) -> WriteResult:
        root = self.service_root(op.table)
        req = plan.requests[0]
        try:
            response = await self._send("POST", root + req.path, what=req.what, body=req.body, write=True,
                                        create=True, service_root=root)
            if response.status_code == 504:
                raise error_for(response, req.what, write=True)
        except AmbiguousWriteError:
            if not op.match:
                raise
            found = await self._locate(WriteOp(op.op_id, op.action, op.table, match=op.match))
            if found is None:
                raise
            log.info("%s %s: the create's answer was lost but SAP has the record (%s)", SYSTEM, req.what,
                     format_key(op.table, found))
            return WriteResult(op.op_id, True, key=format_key(op.table, found), created=True)
        if not response.is_success:
            raise error_for(response, req.what, write=True)
        created = json_object(response, system=SYSTEM, what=req.what).get("d")
        if not isinstance(created, dict):
            raise AmbiguousWriteError(f"{SYSTEM} {req.what}: HTTP {response.status_code} without the created entity")
        return WriteResult(op.op_id, True, key=format_key(op.table, created), created=True)
