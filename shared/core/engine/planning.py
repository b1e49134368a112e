"""Write planning: a change becomes a write, or an echo / no-op skip, before anything is sent."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shared.core.engine.base import _EngineBase
from shared.core.engine.documents import _new_attachments
from shared.core.engine.outcome import Outcome, _Plan, _Work
from shared.core.engine.rules import in_scope
from shared.core.engine.snapshots import SEEN_MODIFIED, UNCONFIRMED, _covers, _seen_token
from shared.core.envelope import ChangeEnvelope
from shared.core.ports import LINES_KEY, Lines, WriteOp
from shared.mapping.engine import same
from shared.mapping.spec import FlowSpec

ECHO_DETAIL = "equal to the last in-sync state (Syncline's own write or no mapped change)"

UNACKNOWLEDGED_DETAIL = "equal to Syncline's own write that was never acknowledged (read back: it was applied)"

HOLDS_DETAIL = "target already holds these values"

_IN_SYNC = frozenset({ECHO_DETAIL, HOLDS_DETAIL})
"""Skips that mean "both sides already hold this change": the only ones whose cascades are re-checked."""


class _Planning(_EngineBase):
    """The engine's planning of one change: skip it, or the write that applies it."""

    def _collapse(
        self, envelopes: Sequence[ChangeEnvelope], indexes: list[int], outcomes: list[Outcome | None]
    ) -> list[int]:
        # Payloads carry full record state, so only the newest change of a record in a batch is written.
        last: dict[str, int] = {}
        repairs: set[str] = set()
        for i in indexes:
            key = envelopes[i].source_key
            # A reconciliation repair must not be dropped for an ordinary copy of the same record (a poll of the
            # same version would be skipped as an echo, and the drift it repairs would stay). The controller
            # reads a repair's record afresh, so it is as new as any other change of the record in the batch.
            if envelopes[i].origin == "reconcile":
                repairs.add(key)
                last[key] = i
            elif key not in repairs:
                last[key] = i
        keep = set(last.values())
        for i in indexes:
            if i not in keep:
                outcomes[i] = Outcome(envelopes[i], "skipped_noop", detail="superseded by a later change in the batch")
        return [i for i in indexes if i in keep]

    async def _plan(self, flow: FlowSpec, index: int, env: ChangeEnvelope, work: _Work) -> _Plan | Outcome:
        src, tgt = flow.source, flow.target
        target_key = work.links.get(env.source_key)
        op_id = f"{index}:{env.source_key}"
        if env.operation == "delete":
            if "delete" not in flow.operations:
                return Outcome(env, "skipped_noop", detail=f"flow {flow.name} does not propagate deletes")
            if target_key is None:
                return Outcome(env, "skipped_noop", detail="deleted before it was ever synced")
            op = WriteOp(op_id, "delete", tgt.table, key=target_key, correlation_id=env.correlation_id)
            return _Plan(index, env, flow, target_key, op)
        is_create = target_key is None
        unmet = [c.describe() for c in flow.when if not in_scope(c, env.payload)]
        if unmet:
            return Outcome(env, "skipped_noop", target_key=target_key,
                           detail=f"out of scope of flow {flow.name} (needs {'; '.join(unmet)})")
        wanted = "create" if is_create else "update"
        if wanted not in flow.operations:
            # The target key goes with it: a create-only flow's failed id write-back is repaired from here.
            return Outcome(env, "skipped_noop", target_key=target_key,
                           detail=f"flow {flow.name} does not sync {wanted}s from {src.system}")
        projection = self._projection(flow, env, work)
        snap = work.src_snaps.get(env.source_key)
        seen = snap.values.get(SEEN_MODIFIED) if snap is not None else None
        token = _seen_token(env)
        if seen and token is not None and token < str(seen):
            # A retried or scheduled copy of an older change: the newer state of this record already synced.
            return Outcome(env, "skipped_noop", target_key=target_key,
                           detail=f"older than the last synced change of this record ({seen})")
        tsnap = work.tgt_snaps.get(target_key) if target_key else None
        # After an unacknowledged write the target may hold anything: no echo, no "already holds" until rewritten.
        # A reconciliation repair found the target differing from what the snapshots say it holds: write it.
        unknown = (tsnap is not None and UNCONFIRMED in tsnap.values) or env.origin == "reconcile"
        if not is_create and snap is not None and not unknown and _covers(snap.values, projection):
            return Outcome(env, "skipped_echo", target_key=target_key, detail=ECHO_DETAIL)
        # The reverse flow's unanswered write, read back from this record: Syncline's own values, never a change
        # to copy back over a newer state of this flow's target (a revert made there meanwhile). The mark stays
        # until the reverse flow writes the record again.
        pending = snap.values.get(UNCONFIRMED) if snap is not None and not is_create else None
        echoed: set[str] = set()
        if snap is not None and isinstance(pending, Mapping):
            if not unknown and _covers({**snap.values, **pending}, projection):
                return Outcome(env, "skipped_echo", target_key=target_key, detail=UNACKNOWLEDGED_DETAIL)
            echoed = {k for k, v in pending.items()
                      if k in projection and same(projection[k], v) and not same(snap.values.get(k), v)}
        target_newer = bool(
            tsnap is not None and tsnap.modified is not None and env.source_modified is not None
            and tsnap.modified > env.source_modified
        )
        mapped = self.mapper.map_values(flow, env.payload, is_create=is_create, target_newer=target_newer,
                                        record=f"{src.system}:{src.table}:{env.source_key}")
        for fm in flow.fields:
            if fm.source in echoed:
                mapped.values.pop(fm.target, None)
        binds = self._resolve_lookups(flow, env.source_key, env.payload, work.parents, mapped.values,
                                      is_create=is_create, waits=env.waits)
        lines: Lines | None = None
        compare: dict[str, Any] = dict(mapped.values)
        if flow.lines is not None:
            lines = self._map_lines(flow, env, work)
            compare[LINES_KEY] = [{"key": i.source_key, **i.values} for i in lines.items]
        if (tsnap is not None and not unknown and not binds and _covers(tsnap.values, compare)
                and not _new_attachments(env, snap)):
            return Outcome(env, "skipped_noop", target_key=target_key, detail=HOLDS_DETAIL)
        attachments = await self._attachments(flow, env, snap)
        values = {**flow.defaults, **mapped.values} if is_create else mapped.values
        op = WriteOp(
            op_id,
            "upsert",
            tgt.table,
            key=target_key,
            match=None if target_key else {flow.link.target_field: self._match_value(flow, env)},
            values=values,
            binds=binds,
            attachments=attachments,
            correlation_id=env.correlation_id,
            lines=lines,
        )
        return _Plan(index, env, flow, target_key, op, mapped=mapped, is_create=is_create)
