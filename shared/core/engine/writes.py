"""Settling writes: links, snapshots and audit after a write, unknown-target marks, id write-back."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime

from shared.core.engine.base import _EngineBase
from shared.core.engine.isolation import _maybe_applied
from shared.core.engine.outcome import Outcome, _Parent, _Plan, _Work
from shared.core.engine.snapshots import (
    CASCADED,
    SEEN_MODIFIED,
    UNCONFIRMED,
    _latest,
    _seen_token,
    _written,
    forget_snapshots,
    snapshot_table,
)
from shared.core.errors import SyncError, TransientError
from shared.core.ports import LINES_KEY, AuditEntry, Link, Snapshot, WriteOp, WriteResult
from shared.mapping.engine import same, values_hash
from shared.mapping.spec import FlowSpec

log = logging.getLogger(__name__)


class _Writes(_EngineBase):
    """The engine's settling of a flow group's writes."""

    async def _settle(
        self,
        flow: FlowSpec,
        plans: list[_Plan],
        results: Mapping[str, WriteResult],
        work: _Work,
        outcomes: list[Outcome | None],
        before: Mapping[str, Snapshot | None],
    ) -> None:
        now = self.clock()
        src, tgt = flow.source, flow.target
        links: list[Link] = []
        snaps: list[Snapshot] = []
        audit: list[AuditEntry] = []
        writebacks: list[tuple[_Plan, WriteOp]] = []
        forget: list[str] = []
        forget_targets: list[str] = []
        parents: list[_Parent] = []
        refused: list[str | None] = []
        for plan in plans:
            env = plan.env
            result = results.get(plan.op.op_id)
            if result is None:
                result = WriteResult(plan.op.op_id, False, error=TransientError("the sink returned no result"))
            if not result.ok:
                outcomes[plan.index] = Outcome(env, "failed", error=result.error)
                if result.error is not None and not _maybe_applied(result.error):
                    refused.append(plan.target_key)
                continue
            key = result.key or plan.target_key
            if plan.op.action == "delete":
                outcomes[plan.index] = Outcome(env, "deleted", target_key=key)
                forget.append(env.source_key)
                if key:
                    forget_targets.append(key)
                audit.append(AuditEntry(now, env.correlation_id, flow.name, "deleted", tgt.system, tgt.table,
                                        key or "", f"deleted after {src.system} delete of {env.source_key}"))
                continue
            assert key is not None
            assert plan.mapped is not None
            if work.stored_links.get(env.source_key) != key:
                links.append(Link(flow.entity, src.system, env.source_key, tgt.system, key))
            prev_t = work.tgt_snaps.get(key)
            written = _written(plan.op)
            tvalues = {**(dict(prev_t.values) if prev_t else {}), **written}
            tvalues.pop(CASCADED, None)  # a new state: its cascades are not done yet
            tvalues.pop(UNCONFIRMED, None)  # acknowledged: the target holds what was just written
            tmod = _latest(prev_t.modified if prev_t else None, env.source_modified)
            tsnap = Snapshot(tgt.system, snapshot_table(tgt.table, flow.entity), key, tvalues, values_hash(tvalues),
                             tmod)
            prev_s = work.src_snaps.get(env.source_key)
            svalues = {**(dict(prev_s.values) if prev_s else {}), **self._projection(flow, env, work)}
            token = _seen_token(env)
            if token is not None and token > str(svalues.get(SEEN_MODIFIED) or ""):
                svalues[SEEN_MODIFIED] = token
            # An UNCONFIRMED mark stays: this flow wrote the source's fields, not what the reverse flow may have
            # left unacknowledged in the source record (the reverse flow's next write clears it).
            svalues.pop(CASCADED, None)
            ssnap = Snapshot(src.system, snapshot_table(src.table, flow.entity), env.source_key, svalues,
                             values_hash(svalues), _latest(prev_s.modified if prev_s else None, env.source_modified))
            snaps += [tsnap, ssnap]
            how = "created" if result.created else "updated"
            # the origin too: a direct write (webhook, initial load) has no `enqueued` entry that would tell it
            detail = f"{how} {tgt.system}:{tgt.table}:{key} (origin {env.origin})" + _fields_changed(written, prev_t)
            if plan.mapped.owned_by_target:
                detail += f"; left target-owned fields {sorted(plan.mapped.owned_by_target)}"
            audit.append(AuditEntry(now, env.correlation_id, flow.name, "written", tgt.system, tgt.table, key, detail))
            if plan.mapped.conflicts:
                audit.append(AuditEntry(
                    now, env.correlation_id, flow.name, "conflict_resolved", tgt.system, tgt.table, key,
                    f"{tgt.system} changed after this {src.system} change; kept target values of "
                    f"{sorted(plan.mapped.conflicts)} (last writer wins)"))
            outcomes[plan.index] = Outcome(env, "written", target_key=key, created=result.created)
            parents.append(_Parent(plan.index, env, [(src.system, env.source_key, env.payload),
                                                     (tgt.system, key, plan.op.values)], [ssnap, tsnap]))
            wb = flow.link.write_back
            if wb and not same(env.payload.get(wb), key):
                writebacks.append((plan, WriteOp(f"wb:{plan.op.op_id}", "update", src.table, key=env.source_key,
                                                 values={wb: key}, correlation_id=env.correlation_id)))
        if forget_targets:  # before the puts, as when each delete forgot its target at once
            await forget_snapshots(self.state, flow.entity, tgt.system, tgt.table, forget_targets, self._old_layout)
        if links:
            await self.state.put_links(links)
        if snaps:
            await self.state.put_snapshots(snaps)
        if forget:
            await forget_snapshots(self.state, flow.entity, src.system, src.table, forget, self._old_layout)
        if refused:
            await self._unmark(flow, before, refused)
        if writebacks:
            await self._write_back(flow, writebacks, outcomes, audit, now)
        if parents:
            await self._cascade(flow, parents, outcomes, audit, now)
        if audit:
            await self.state.append_audit(audit)

    async def _mark_unconfirmed(self, flow: FlowSpec, plans: Sequence[_Plan],
                                work: _Work) -> dict[str, Snapshot | None]:
        """Mark the targets of the updates about to be written as unknown; returns their snapshots before.

        A write may be applied without Syncline learning it (a 504 after apply, a timeout, a kill between the
        write and its answer). Until the target is written again with an answer, its next change is written,
        never skipped as an echo of the last in-sync state: otherwise a user who reverts the source to that
        state sees the revert (and any resubmission) dropped, and the target keeps the unacknowledged value.
        """
        tgt = flow.target
        before: dict[str, Snapshot | None] = {}
        marks: list[Snapshot] = []
        for plan in plans:
            key = plan.target_key
            if not key or plan.op.action == "delete" or key in before:
                continue  # a create that may have happened is found again by its match on retry
            prev = work.tgt_snaps.get(key)
            before[key] = prev
            values = dict(prev.values) if prev else {}
            # Only what would change (the read-back test needs no more); lines stay out, as no reverse flow reads
            # them and they are what makes a snapshot large.
            earlier = values.get(UNCONFIRMED)
            values[UNCONFIRMED] = {**(earlier if isinstance(earlier, Mapping) else {}),
                                   **{k: v for k, v in _written(plan.op).items()
                                      if k != LINES_KEY and not same(values.get(k), v)}}
            mark = Snapshot(tgt.system, snapshot_table(tgt.table, flow.entity), key, values, values_hash(values),
                            prev.modified if prev else None)
            work.tgt_snaps[key] = mark
            marks.append(mark)
        if marks:
            await self.state.put_snapshots(marks)  # no mark, no write: a failure here retries the changes
        return before

    async def _unmark(self, flow: FlowSpec, before: Mapping[str, Snapshot | None],
                      keys: Sequence[str | None]) -> None:
        """Put back the snapshots of targets whose write was refused before anything was applied (throttled,
        unauthorized, rejected): they hold what they held before the call."""
        tgt = flow.target
        restore = [snap for key in dict.fromkeys(keys) if key and (snap := before.get(key)) is not None]
        unknown_before = [key for key in dict.fromkeys(keys) if key and key in before and before[key] is None]
        try:
            if restore:
                await self.state.put_snapshots(restore)
            if unknown_before:
                await self.state.delete_snapshots(tgt.system, snapshot_table(tgt.table, flow.entity), unknown_before)
        except Exception as exc:  # the mark only costs a redundant write later; the write's own error is reported
            log.warning("flow %s: clearing %d unknown-target marks failed (%s)", flow.name,
                        len(restore) + len(unknown_before), type(exc).__name__)

    async def _write_back(
        self,
        flow: FlowSpec,
        writebacks: list[tuple[_Plan, WriteOp]],
        outcomes: list[Outcome | None],
        audit: list[AuditEntry],
        now: datetime,
    ) -> None:
        src = flow.source
        try:
            results = await self.sinks[src.system].write([op for _, op in writebacks])
        except SyncError as exc:
            results = [WriteResult(op.op_id, False, error=exc) for _, op in writebacks]
        by_op = {r.op_id: r for r in results}
        for plan, op in writebacks:
            res = by_op.get(op.op_id)
            if res is not None and res.ok:
                audit.append(AuditEntry(now, plan.env.correlation_id, flow.name, "id_propagated", src.system,
                                        src.table, plan.env.source_key, f"{op.values} written back to the source"))
                continue
            # The link is stored, so a retry is an idempotent update that also retries the write-back.
            error = res.error if res is not None and res.error else TransientError("write-back returned no result")
            current = outcomes[plan.index]
            outcomes[plan.index] = Outcome(
                plan.env, "failed", target_key=current.target_key if current else None,
                error=type(error)(f"record written, but writing the new id back to {src.system} failed: "
                                  f"{error.detail}", reason=error.reason) if isinstance(error, SyncError) else error,
            )

    async def _repair_write_backs(self, flow: FlowSpec, indexes: list[int], outcomes: list[Outcome | None]) -> None:
        # A crash between a create and its id write-back leaves a linked pair whose source lacks the id; the
        # redelivered change is then an echo, so the write-back is completed here instead.
        wb = flow.link.write_back
        if not wb:
            return
        todo: list[tuple[_Plan, WriteOp]] = []
        for i in indexes:
            o = outcomes[i]
            if o is None or o.status not in ("skipped_echo", "skipped_noop") or not o.target_key:
                continue
            if o.envelope.operation == "delete" or same(o.envelope.payload.get(wb), o.target_key):
                continue
            op = WriteOp(f"wb:{i}:{o.envelope.source_key}", "update", flow.source.table, key=o.envelope.source_key,
                         values={wb: o.target_key}, correlation_id=o.envelope.correlation_id)
            todo.append((_Plan(i, o.envelope, flow, o.target_key, op), op))
        if todo:
            audit: list[AuditEntry] = []
            await self._write_back(flow, todo, outcomes, audit, self.clock())
            await self.state.append_audit(audit)


FIELDS_NAMED = 12
"""At most this many changed field names in a `written` audit detail (the rest are counted)."""


def _fields_changed(written: Mapping[str, object], before: Snapshot | None) -> str:
    """"; fields a, b (+3 more)": the target fields whose value differs from the last snapshot (all on a first
    write), so a trace shows what a write changed without the ledger holding any value."""
    old = before.values if before is not None else {}
    names = sorted(k for k, v in written.items() if before is None or not same(old.get(k), v))
    if not names:
        return "; fields unchanged"
    more = f" (+{len(names) - FIELDS_NAMED} more)" if len(names) > FIELDS_NAMED else ""
    return f"; fields {', '.join(names[:FIELDS_NAMED])}{more}"
