"""The sync engine: turns change envelopes into governed writes (order, echo, conflicts, ids, cascades, audit)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from shared.core.engine.cascades import _Cascades
from shared.core.engine.documents import _Documents
from shared.core.engine.holds import _LEASED, LEASE_SECONDS, _Holds
from shared.core.engine.isolation import _maybe_applied
from shared.core.engine.outcome import Outcome, Status, _Plan, _Work
from shared.core.engine.planning import _Planning
from shared.core.engine.relations import _Relations
from shared.core.engine.rules import _canonical_key
from shared.core.engine.snapshots import OldLayout, read_snapshots
from shared.core.engine.writes import _Writes
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import ParentPendingError, RecordBusyError, SyncError, TransientError
from shared.core.observe import correlated
from shared.core.ports import ChangeSource, RecordSink, StateStore
from shared.mapping.engine import Mapper
from shared.mapping.spec import FlowSet, FlowSpec

log = logging.getLogger(__name__)


class SyncEngine(_Holds, _Relations, _Documents, _Planning, _Writes, _Cascades):
    """Processes batches of change envelopes against the configured systems.

    Parents are processed before children (flows ordered by lookup depth), a child whose parent has no
    target id yet is deferred, changes equal to the last in-sync state are dropped as echoes, ownership
    and last-writer-wins decide conflicts, new target ids are written back to the source, cascades run
    on both sides, and every decision lands in the audit ledger.
    """

    def __init__(
        self,
        flowset: FlowSet,
        *,
        sinks: Mapping[str, RecordSink],
        state: StateStore,
        sources: Mapping[str, ChangeSource] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_parent_waits: int = 48,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.flowset = flowset
        self.mapper = Mapper(flowset)
        self.sinks = sinks
        self.sources = sources or {}
        self.state = state
        self.clock = clock
        self.max_parent_waits = max_parent_waits
        self.lease_seconds = lease_seconds
        self._locks: dict[str, asyncio.Lock] = {}
        self._line_flows = {f.name: flowset.line_flow(f) for f in flowset.flows if f.lines is not None}
        """Each document flow's lines as a flow of their own, built once (not per record)."""
        self._lock_users: Counter[str] = Counter()
        self._old_layout = OldLayout()

    async def process(self, envelopes: Sequence[ChangeEnvelope]) -> list[Outcome]:
        """Process a batch; returns one outcome per envelope, in input order.

        Concurrent calls in one process (parallel webhook invocations) never work on the same record at the
        same time: each call holds the locks of its records, taken in a fixed order. Across processes (a
        webhook and the controller, scaled-out instances) each call leases its records in the state store,
        in one round trip per batch; a record leased elsewhere is not touched and comes back `failed` with a
        `RecordBusyError` (RECORD_BUSY, retriable), so the caller retries it shortly. Records an enclosing
        `hold` holds are not locked or leased again.
        """
        async with self.hold(envelopes):
            held = _LEASED.get()
            mine = [e for e in envelopes if e.record_id in held]
            done = await self._process(mine) if mine else []
        if len(mine) == len(envelopes):
            return done
        busy = [Outcome(e, "failed", error=RecordBusyError(
            f"{e.record_id} is being written by another process (a webhook or another instance); retried shortly"))
            for e in envelopes if e.record_id not in held]
        await self.state.append_audit([self._audit_for(o) for o in busy])
        by_env = {id(o.envelope): o for o in (*done, *busy)}
        return [by_env[id(e)] for e in envelopes]

    async def _process(self, envelopes: Sequence[ChangeEnvelope]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(envelopes)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, env in enumerate(envelopes):
            try:
                self.flowset.flow(env.flow)
            except SyncError as exc:
                outcomes[i] = Outcome(env, "failed", error=exc)
                continue
            groups[env.flow].append(i)
        ordered = sorted(groups, key=lambda name: self.flowset.depth(self.flowset.flow(name)))
        for name in ordered:
            flow = self.flowset.flow(name)
            indexes = self._collapse(envelopes, groups[name], outcomes)
            # One change (a webhook's) has one correlation id for its logs and requests; a mixed batch has none.
            with correlated(envelopes[i].correlation_id for i in indexes):
                try:
                    await self._process_flow(flow, envelopes, indexes, outcomes)
                except SyncError as exc:
                    # A whole-call failure (auth, throttling beyond the in-call budget): every pending change
                    # of this flow keeps its message and is retried or dead-lettered as a unit.
                    for i in indexes:
                        if outcomes[i] is None:
                            outcomes[i] = Outcome(envelopes[i], "failed", error=exc)
                except Exception as exc:
                    # A bug or an unforeseen failure: this flow's changes are retried (and dead-lettered when it
                    # persists), the other flows of the batch go on. Outcomes already reached are not trusted
                    # (their links or snapshots may be unstored), and a retry of a synced change is an echo.
                    log.exception("flow %s: unexpected %s while processing %d changes (%s); they will be retried",
                                  name, type(exc).__name__, len(indexes),
                                  ", ".join(envelopes[i].correlation_id for i in indexes[:20]))
                    error = TransientError(f"unexpected {type(exc).__name__} while processing flow {name}: "
                                           f"{str(exc)[:500]}")
                    for i in indexes:
                        current = outcomes[i]
                        if current is None or current.status != "failed":
                            outcomes[i] = Outcome(envelopes[i], "failed", error=error)
        audit = [self._audit_for(o) for o in outcomes if o is not None and o.status in ("failed", "deferred")]
        if audit:
            await self.state.append_audit(audit)
        return [o for o in outcomes if o is not None]

    async def _load(self, flow: FlowSpec, envs: Sequence[ChangeEnvelope]) -> _Work:
        work = _Work()
        keys = [e.source_key for e in envs]
        src, tgt = flow.source, flow.target
        # What needs no link is read at once, side by side: each is a round trip (or several) to the state store.
        links, work.src_snaps, work.parents = await asyncio.gather(
            self.state.get_links(flow.entity, src.system, keys, tgt.system),
            read_snapshots(self.state, flow.entity, src.system, src.table, keys, self._old_layout),
            self._parent_links(flow, [e.payload for e in envs]),
        )
        work.links = links
        work.stored_links = dict(work.links)
        # A source record that names its target record (a written-back id, or the id of the record it was made
        # from) is linked to it even when the link was never stored (an ambiguous create, a crash before it).
        named_by = [f for f in (flow.link.write_back, flow.link.origin_field) if f]
        for env in envs:
            known = next((v for f in named_by if isinstance(v := env.payload.get(f), str) and v.strip()), None)
            if env.source_key not in work.links and known is not None:
                work.links[env.source_key] = _canonical_key(tgt.system, known)
        work.tgt_snaps = await read_snapshots(self.state, flow.entity, tgt.system, tgt.table,
                                              sorted(set(work.links.values())), self._old_layout)
        if flow.lines is not None:
            work.lines = await self._read_lines(flow, [e for e in envs if e.operation != "delete"], work.read_errors)
            line_flow = self._line_flows[flow.name]
            work.line_parents = await self._parent_links(
                line_flow, [r.values for rows in work.lines.values() for r in rows])
        return work

    async def _process_flow(
        self,
        flow: FlowSpec,
        envelopes: Sequence[ChangeEnvelope],
        indexes: list[int],
        outcomes: list[Outcome | None],
    ) -> None:
        envs = [envelopes[i] for i in indexes]
        work = await self._load(flow, envs)
        if any(lk.ensure for lk in flow.lookups):
            await self._ensure_parents(flow, envs, work)
        plans: list[_Plan] = []
        for i in indexes:
            env = envelopes[i]
            if env.source_key in work.read_errors:
                outcomes[i] = Outcome(env, "failed", error=work.read_errors[env.source_key])
                continue
            try:
                plan_or_outcome = await self._plan(flow, i, env, work)
            except SyncError as exc:
                status: Status = "deferred" if isinstance(exc, ParentPendingError) else "failed"
                outcomes[i] = Outcome(env, status, error=exc)
                continue
            if isinstance(plan_or_outcome, Outcome):
                outcomes[i] = plan_or_outcome
            else:
                plans.append(plan_or_outcome)
        if plans:
            # Write-ahead: a crash between the target applying a write and Syncline storing the answer must leave
            # the target unknown too, so the mark is stored before the call and undone only when nothing landed.
            before = await self._mark_unconfirmed(flow, plans, work)
            try:
                results = await self.sinks[flow.target.system].write([p.op for p in plans])
            except SyncError as exc:
                if not _maybe_applied(exc):
                    await self._unmark(flow, before, [p.target_key for p in plans])
                raise
            await self._settle(flow, plans, {r.op_id: r for r in results}, work, outcomes, before)
        skipped = [o for i in indexes
                   if (o := outcomes[i]) is not None and o.status in ("skipped_echo", "skipped_noop")]
        await self._repair_write_backs(flow, indexes, outcomes)
        await self._recheck_cascades(flow, indexes, outcomes, work)
        await self._record_skips(flow, skipped)
