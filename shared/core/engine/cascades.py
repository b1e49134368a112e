"""Cascades: a parent's state sets its children on both sides, re-checked until complete."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from shared.core.engine.base import _EngineBase
from shared.core.engine.isolation import with_detail
from shared.core.engine.outcome import Outcome, _Parent, _Work
from shared.core.engine.planning import _IN_SYNC
from shared.core.engine.snapshots import CASCADED, _latest, read_snapshots, snapshot_table
from shared.core.errors import SyncError, TransientError, ValidationError
from shared.core.observe import correlated
from shared.core.ports import AuditEntry, Snapshot, SourceRecord, WriteOp
from shared.mapping.engine import normalize, same, values_hash
from shared.mapping.spec import CascadeSpec, FlowSpec

log = logging.getLogger(__name__)


def cascade_triggered(cascade: CascadeSpec, system: str, values: Mapping[str, Any]) -> bool:
    """Whether a parent with these values (on `system`) is in a state that triggers the cascade."""
    rules = cascade.when.get(system, {})
    return any(
        name in values and normalize(values[name]) in {normalize(v) for v in allowed}
        for name, allowed in rules.items()
    )


_triggers = cascade_triggered


def cascade_pending(cascade: CascadeSpec, system: str, values: Mapping[str, Any]) -> bool:
    """Whether a child with these values (on `system`) is one the cascade still has to set (what its select finds)."""
    unless = cascade.unless.get(system)
    if unless:
        return not any(normalize(values.get(f)) in {normalize(v) for v in vs} for f, vs in unless.items())
    return any(not same(values.get(f), v) for f, v in cascade.set.get(system, {}).items())


class _Cascades(_EngineBase):
    """The engine's cascades from parents to children."""

    async def _cascade(self, flow: FlowSpec, parents: Sequence[_Parent], outcomes: list[Outcome | None],
                       audit: list[AuditEntry], now: datetime) -> None:
        """Run every cascade a parent's state triggers, on both sides; a cascade left incomplete fails the parent.

        The parent's message then comes back (retried, or dead-lettered for a permanent child failure and
        replayed), finds the parent in sync, and `_recheck_cascades` finishes the cascade: the select skips
        children already in a final state, so a re-run only writes what is still open.
        """
        cascades = [c for c in self.flowset.cascades if c.parent_entity == flow.entity]
        if not cascades:
            return
        marks: list[Snapshot] = []
        for parent in parents:
            errors: list[SyncError] = []
            ran = False
            for cascade in cascades:
                for system, parent_key, values in parent.sides:
                    if _triggers(cascade, system, values):
                        ran = True
                        errors += await self._cascade_side(
                            cascade, system, parent_key, correlation_id=parent.env.correlation_id,
                            modified=parent.env.source_modified, flow_name=flow.name, audit=audit, now=now)
            if errors:
                error = next((e for e in errors if e.retriable), errors[0])
                current = outcomes[parent.index]
                with correlated([parent.env.correlation_id]):
                    log.warning("flow %s: cascade of %s incomplete (%d failures); it is retried with the parent: %s",
                                flow.name, parent.env.source_key, len(errors), error)
                outcomes[parent.index] = Outcome(
                    parent.env, "failed", target_key=current.target_key if current else None,
                    error=with_detail(error, f"record {parent.env.source_key} itself is synced, but its cascade is "
                                         f"incomplete ({len(errors)} failed): {error.detail}"))
            elif ran:
                marks += [Snapshot(s.system, s.table, s.key, {**s.values, CASCADED: True},
                                   values_hash({**s.values, CASCADED: True}), s.modified) for s in parent.snaps]
        if marks:
            await self.state.put_snapshots(marks)

    async def _recheck_cascades(self, flow: FlowSpec, indexes: list[int], outcomes: list[Outcome | None],
                                work: _Work) -> None:
        """Finish cascades of parents already in sync (a redelivery after a crash or a failed child write).

        Only a parent in a triggering state whose snapshot lacks the completion mark is checked, so echoes of
        long-closed parents cost nothing.
        """
        if not any(c.parent_entity == flow.entity for c in self.flowset.cascades):
            return
        src, tgt = flow.source, flow.target
        parents: list[_Parent] = []
        for i in indexes:
            o = outcomes[i]
            if (o is None or o.status not in ("skipped_echo", "skipped_noop") or o.detail not in _IN_SYNC
                    or not o.target_key or o.envelope.operation == "delete"):
                continue
            ssnap = work.src_snaps.get(o.envelope.source_key)
            tsnap = work.tgt_snaps.get(o.target_key)
            if ssnap is not None and ssnap.values.get(CASCADED):
                continue
            sides: list[tuple[str, str, Mapping[str, Any]]] = [(src.system, o.envelope.source_key, o.envelope.payload)]
            if tsnap is not None:
                sides.append((tgt.system, o.target_key, tsnap.values))
            parents.append(_Parent(i, o.envelope, sides, [s for s in (ssnap, tsnap) if s is not None]))
        if parents:
            audit: list[AuditEntry] = []
            await self._cascade(flow, parents, outcomes, audit, self.clock())
            if audit:
                await self.state.append_audit(audit)

    async def complete_cascade(self, cascade_name: str, system: str, parent_key: str) -> list[SyncError]:
        """Apply one cascade to one parent's children on one system (reconciliation's repair of a half-applied
        cascade) through the same code path as a sync; returns the child writes that failed."""
        cascade = next((c for c in self.flowset.cascades if c.name == cascade_name), None)
        if cascade is None:
            raise ValidationError(f"no cascade named {cascade_name!r} in flow set {self.flowset.name}")
        flow_name = next((f.name for f in self.flowset.flows if f.entity == cascade.parent_entity), cascade.name)
        audit: list[AuditEntry] = []
        errors = await self._cascade_side(cascade, system, parent_key, correlation_id=f"reconcile:{cascade.name}",
                                          modified=None, flow_name=flow_name, audit=audit, now=self.clock())
        if audit:
            await self.state.append_audit(audit)
        return errors

    async def _cascade_side(self, cascade: CascadeSpec, system: str, parent_key: str, *, correlation_id: str,
                            modified: datetime | None, flow_name: str, audit: list[AuditEntry],
                            now: datetime) -> list[SyncError]:
        """Set the parent's open children on one system; returns one error per child left unset."""
        table = self._table_of(cascade.child_entity, system)
        if table is None or system not in cascade.child_parent_field or system not in cascade.set:
            return []
        sink = self.sinks[system]
        values = dict(cascade.set[system])
        where = f"cascade {cascade.name} on {system} {table} (parent {parent_key})"
        try:
            children = await sink.select(table, equals={cascade.child_parent_field[system]: parent_key},
                                         not_in=cascade.unless.get(system))
            if not children:
                return []
            ops = [WriteOp(f"cascade:{c.key}", "update", table, key=c.key, values=values,
                           correlation_id=correlation_id) for c in children]
            by_op = {r.op_id: r for r in await sink.write(ops)}
        except SyncError as exc:
            return [with_detail(exc, f"{where}: {exc.detail}")]
        errors: list[SyncError] = []
        done: list[SourceRecord] = []
        for child, op in zip(children, ops, strict=True):
            res = by_op.get(op.op_id)
            if res is not None and res.ok:
                done.append(child)
                continue
            error = res.error if res is not None and res.error else TransientError("the sink returned no result")
            errors.append(with_detail(error, f"{where}: child {child.key}: {error.detail}"))
            with correlated([correlation_id]):
                log.warning("cascade %s: %s %s failed: %s", cascade.name, system, child.key, error)
        prev = await read_snapshots(self.state, cascade.child_entity, system, table, [c.key for c in done],
                                    self._old_layout)
        snaps = []
        for child in done:
            merged = {**(dict(prev[child.key].values) if child.key in prev else {}), **values}
            before = prev[child.key].modified if child.key in prev else None
            snaps.append(Snapshot(system, snapshot_table(table, cascade.child_entity), child.key, merged,
                                  values_hash(merged), _latest(before, modified)))
            audit.append(AuditEntry(now, correlation_id, flow_name, "cascaded", system, table, child.key,
                                    f"{cascade.name}: parent {parent_key} closed; set {values}"))
        if done:  # the parent's side of it too, so a trace of the parent finds it by the parent's key
            named = ", ".join(c.key for c in done[:5]) + (f" (+{len(done) - 5} more)" if len(done) > 5 else "")
            audit.append(AuditEntry(now, correlation_id, flow_name, "cascade_triggered", system,
                                    self._table_of(cascade.parent_entity, system) or "", parent_key,
                                    f"{cascade.name}: set {values} on {len(done)} child(ren) in {table}: {named}"))
        if snaps:
            await self.state.put_snapshots(snaps)
        return errors

    def _table_of(self, entity: str, system: str) -> str | None:
        for f in self.flowset.flows:
            if f.entity != entity:
                continue
            if f.source.system == system:
                return f.source.table
            if f.target.system == system:
                return f.target.table
        return None
