"""The sync engine: turns change envelopes into governed writes (order, echo, conflicts, ids, cascades, audit)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from shared.core.envelope import ChangeEnvelope
from shared.core.errors import (
    AuthError,
    ParentMissingError,
    ParentPendingError,
    PermanentError,
    RecordBusyError,
    RetriableError,
    SyncError,
    ThrottledError,
    TransientError,
    ValidationError,
)
from shared.core.ports import (
    ATTACHMENTS_KEY,
    LINES_KEY,
    Attachment,
    AttachmentRef,
    AuditEntry,
    Bind,
    ChangeSource,
    Lines,
    LineWrite,
    Link,
    RecordSink,
    Snapshot,
    SourceRecord,
    StateStore,
    WriteOp,
    WriteResult,
)
from shared.core.ports import split_key as key_parts  # re-exported: the engine's name for it
from shared.mapping.engine import MappedValues, Mapper, normalize, same, values_hash
from shared.mapping.spec import CascadeSpec, Condition, FlowSet, FlowSpec
from shared.telemetry import correlated

log = logging.getLogger(__name__)
T = TypeVar("T")

SEEN_MODIFIED = "@seen_modified"
"""Snapshot key: modified time of the newest change that came *from* this record's own system."""

CASCADED = "@cascaded"
"""Snapshot key: set once every cascade the record's current state triggers has completed (cleared on a write)."""

UNCONFIRMED = "@unconfirmed"
"""Snapshot key: a write to this record may have been applied without an acknowledgement (a 504, a timeout, a
kill before the answer was stored), so what it holds is unknown until that flow writes it again. The value maps
the fields the write would change to what it carried: the record holds either those or the snapshot's values."""

ECHO_DETAIL = "equal to the last in-sync state (Syncline's own write or no mapped change)"
UNACKNOWLEDGED_DETAIL = "equal to Syncline's own write that was never acknowledged (read back: it was applied)"
HOLDS_DETAIL = "target already holds these values"
_IN_SYNC = frozenset({ECHO_DETAIL, HOLDS_DETAIL})
"""Skips that mean "both sides already hold this change": the only ones whose cascades are re-checked."""

LEASE_SECONDS = 60.0
"""How long a record lease lasts without renewal: a crashed holder blocks its records at most this long."""

PARENT_LOCK_WAIT_SECONDS = 10.0
"""How long ensuring a parent waits for another call of this process that is writing it (then the child is busy)."""

_LEASED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("syncline_leased", default=frozenset())
"""Record ids the current `process` call holds (locked and leased), so ensuring a parent never waits for itself."""

OLD_LAYOUT_RECHECK_SECONDS = 600.0
"""How long the per-record snapshot layout of earlier versions, once found empty for a table, is taken to stay empty
(nothing writes it any more; probed again now and then for instances of an earlier version still running)."""

LINE_QUERY_KEYS = 100
"""Headers whose lines are read in one source query (keeps the IN list / or-chain inside URL limits)."""

Status = Literal["written", "skipped_echo", "skipped_noop", "deferred", "failed", "deleted"]


@dataclass
class Outcome:
    """What happened to one envelope."""

    envelope: ChangeEnvelope
    status: Status
    target_key: str | None = None
    created: bool = False
    error: SyncError | None = None
    detail: str = ""


@dataclass
class _Plan:
    index: int
    env: ChangeEnvelope
    flow: FlowSpec
    target_key: str | None
    op: WriteOp
    mapped: MappedValues | None = None
    is_create: bool = False


@dataclass
class _Parent:
    """A parent record whose cascades are due: its key and values per side, and its snapshots to mark done."""

    index: int
    env: ChangeEnvelope
    sides: list[tuple[str, str, Mapping[str, Any]]]
    snaps: list[Snapshot]


@dataclass
class _Work:
    """Everything one flow group of a batch loads once from state."""

    links: dict[str, str] = field(default_factory=dict)
    stored_links: dict[str, str] = field(default_factory=dict)
    """The links read from state (`links` adds those a record names itself): re-putting one is a no-op, skipped."""
    src_snaps: dict[str, Snapshot] = field(default_factory=dict)
    tgt_snaps: dict[str, Snapshot] = field(default_factory=dict)
    parents: dict[str, dict[str, str]] = field(default_factory=dict)
    lines: dict[str, list[SourceRecord]] = field(default_factory=dict)
    """Header source key -> its document lines, read from the source in one query per 100 headers."""
    line_parents: dict[str, dict[str, str]] = field(default_factory=dict)
    read_errors: dict[str, SyncError] = field(default_factory=dict)
    """Source key -> why something it needs (its lines, its parent) could not be read: it fails alone."""


class SyncEngine:
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

    # ------------------------------------------------------------------------------------ public

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

    @contextlib.asynccontextmanager
    async def hold(self, envelopes: Sequence[ChangeEnvelope], *, wait: bool = True) -> AsyncIterator[None]:
        """Hold the records of `envelopes` (this process's locks and the cross-process leases) for the block.

        `process` calls inside it (in the same task) neither lock nor lease those records again, so a caller that
        processes a batch flow group by flow group takes and releases the batch's leases once, not per group.
        A record leased elsewhere is not held (its lock is let go at once): `process` tries it again and reports
        it busy. With `wait=False` only the leases are taken: another call of this process that wants one of the
        records finds it busy at once instead of waiting for the whole block (a webhook behind a long batch).
        """
        own = _LEASED.get()
        keys = sorted({e.record_id for e in envelopes} - own)
        if not keys:
            yield
            return
        locks = {k: self._locks.setdefault(k, asyncio.Lock()) for k in keys} if wait else {}
        self._lock_users.update(list(locks))
        locked: list[str] = []
        try:
            for k, lock in locks.items():  # in key order, so two calls never wait for each other crosswise
                await lock.acquire()
                locked.append(k)
            owner = uuid.uuid4().hex
            held = await self.state.acquire_leases(keys, owner, self.lease_seconds)
            for k in reversed([k for k in locked if k not in held]):
                locks[k].release()
            locked = [k for k in locked if k in held]
            renewer = asyncio.create_task(self._renew_leases(sorted(held), owner))
            token = _LEASED.set(own | frozenset(held))
            try:
                yield
            finally:
                _LEASED.reset(token)
                await self._end_leases(renewer, held, owner, "record")
        finally:
            for k in reversed(locked):
                locks[k].release()
            self._lock_users.subtract(list(locks))
            for k in locks:
                if self._lock_users[k] <= 0:
                    del self._lock_users[k]
                    self._locks.pop(k, None)

    async def _end_leases(
        self, renewer: asyncio.Task[None] | None, keys: Collection[str], owner: str, kind: str
    ) -> None:
        """Stop renewing and release the leases; a failed release is logged (they expire by themselves, and the
        outcomes stand)."""
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        if keys:
            try:
                await self.state.release_leases(sorted(keys), owner)
            except Exception as exc:
                log.warning("releasing %d %s leases failed (%s); they expire in %ss",
                            len(keys), kind, type(exc).__name__, self.lease_seconds)

    async def _renew_leases(self, keys: list[str], owner: str) -> None:
        """Extend the batch's leases while it runs (a batch may outlast one lease period)."""
        while keys:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                kept = await self.state.acquire_leases(keys, owner, self.lease_seconds)
            except Exception as exc:  # the next round tries again; the lease is still valid for a while
                log.warning("renewing %d record leases failed: %s", len(keys), type(exc).__name__)
                continue
            if len(kept) < len(keys):
                log.warning("%d record leases expired and were taken over during a long batch",
                            len(keys) - len(kept))
                keys = sorted(kept)

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

    # ---------------------------------------------------------------------------------- internals

    def _collapse(
        self, envelopes: Sequence[ChangeEnvelope], indexes: list[int], outcomes: list[Outcome | None]
    ) -> list[int]:
        # Payloads carry full record state, so only the newest change of a record in a batch is written.
        last: dict[str, int] = {}
        for i in indexes:
            last[envelopes[i].source_key] = i
        keep = set(last.values())
        for i in indexes:
            if i not in keep:
                outcomes[i] = Outcome(envelopes[i], "skipped_noop", detail="superseded by a later change in the batch")
        return [i for i in indexes if i in keep]

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

    async def _parent_links(self, flow: FlowSpec, payloads: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
        parents: dict[str, dict[str, str]] = {}
        src, tgt = flow.source, flow.target
        asks: list[tuple[str, Awaitable[dict[str, str]]]] = []
        for lk in flow.lookups:
            parent = self.flowset.flow(lk.parent_flow)
            parent_keys = sorted({str(p[lk.source]) for p in payloads if not _blank(p.get(lk.source))})
            parent_keys = [_canonical_key(src.system, k) for k in parent_keys]
            asks.append((lk.source, self.state.get_links(parent.entity, src.system, parent_keys, tgt.system)))
        for field_name, found in zip([f for f, _ in asks], await asyncio.gather(*(a for _, a in asks)), strict=True):
            parents.setdefault(field_name, {}).update(found)
        return parents

    async def _ensure_parents(self, flow: FlowSpec, envs: Sequence[ChangeEnvelope], work: _Work) -> None:
        """Sync parents that were never synced (read from the source now), so children need not wait for a
        change of the parent that may never come. A parent that fails keeps its children deferred as usual.
        Each parent is held (locked and leased) while it is ensured, as its own change would hold it."""
        src = flow.source
        for lk in flow.lookups:
            if not lk.ensure:
                continue
            known = work.parents.get(lk.source, {})
            missing = sorted({_canonical_key(src.system, str(e.payload[lk.source])) for e in envs
                              if e.operation != "delete" and not _blank(e.payload.get(lk.source))} - set(known))
            if not missing:
                continue
            parent = self.flowset.flow(lk.parent_flow)
            source = self.sources.get(parent.source.system)
            if source is None:
                continue
            async with self._parents_locked(parent, missing) as (mine, busy):
                await self._ensure_locked(flow, lk.source, parent, source, envs, work, mine, busy)
            work.parents.update(await self._parent_links(flow, [e.payload for e in envs]))

    async def _ensure_locked(self, flow: FlowSpec, field_name: str, parent: FlowSpec, source: ChangeSource,
                             envs: Sequence[ChangeEnvelope], work: _Work, mine: list[str], busy: set[str]) -> None:
        """Sync the parents `mine` (locked and leased by this call) that are still unlinked; children of the
        parents in `busy` (another call or process is writing them) are busy too, and retried shortly."""
        src = flow.source
        table = parent.source.table
        for e in envs:
            value = e.payload.get(field_name)
            if e.operation != "delete" and not _blank(value) and _canonical_key(src.system, str(value)) in busy \
                    and e.source_key not in work.read_errors:
                work.read_errors[e.source_key] = RecordBusyError(
                    f"flow {flow.name} record {e.source_key}: its parent {value} ({parent.source.system} {table}) "
                    "is being written by another process; retried shortly")
        # Find before create, under the lock: the parent may have been synced since this batch loaded its links.
        linked = await self.state.get_links(parent.entity, src.system, mine, flow.target.system) if mine else {}
        work.parents.setdefault(field_name, {}).update(linked)
        missing = [k for k in mine if k not in linked]
        if missing:

            async def read(chunk: list[str]) -> list[SourceRecord]:
                return list((await source.fetch(table, chunk)).values())

            found, failed = await isolate(read, missing)
            records = {r.key: r for r in found}
            for e in envs:
                value = e.payload.get(field_name)
                exc = failed.get(_canonical_key(src.system, str(value))) if not _blank(value) else None
                if exc is not None and e.source_key not in work.read_errors:
                    work.read_errors[e.source_key] = with_detail(
                        exc, f"flow {flow.name} record {e.source_key}: its parent {value} could not be read from "
                             f"{parent.source.system} {table}: {exc.detail}")
        else:
            records = {}
        correlation = next((e.correlation_id for e in envs), None)
        parent_envs = [ChangeEnvelope(
            flow=parent.name, operation="upsert", source_system=parent.source.system,
            source_table=parent.source.table, source_key=r.key, source_version=r.version,
            source_modified=r.modified, payload=dict(r.values), origin="resubmit",
            **({"correlation_id": correlation} if correlation else {}),
        ) for r in records.values()]
        if not parent_envs:
            return
        outcomes: list[Outcome | None] = [None] * len(parent_envs)
        try:
            await self._process_flow(parent, parent_envs, list(range(len(parent_envs))), outcomes)
        except SyncError as exc:
            # The parents stay unsynced, so their children wait (deferred) as for any parent not there yet.
            log.warning("flow %s: parents could not be synced first: %s", flow.name, exc)
        audit = [self._audit_for(o) for o in outcomes if o is not None and o.status in ("failed", "deferred")]
        if audit:
            await self.state.append_audit(audit)
        for o in outcomes:
            if o is not None and o.status == "failed":
                log.warning("flow %s: parent %s could not be synced first: %s", flow.name,
                            o.envelope.source_key, o.error)

    @contextlib.asynccontextmanager
    async def _parents_locked(self, parent: FlowSpec, keys: Sequence[str],
                              ) -> AsyncIterator[tuple[list[str], set[str]]]:
        """Hold parent records as `process` holds its own: this process's lock (waiting a little for another call
        of this process) and the cross-process lease (never waiting). Yields the keys held and the keys busy.

        Without it an ensured parent and the parent's own change (a webhook, another instance, the same batch
        elsewhere) could both find no target record and both create one: twin SAP business partners.
        """
        ids = {k: f"{parent.source.system}:{parent.source.table}:{k}" for k in keys}
        own = _LEASED.get()
        wanted = sorted(k for k in keys if ids[k] not in own)
        locks: list[tuple[str, asyncio.Lock]] = []
        busy: set[str] = set()
        self._lock_users.update(ids[k] for k in wanted)
        owner = uuid.uuid4().hex
        leased: set[str] = set()
        renewer: asyncio.Task[None] | None = None
        try:
            deadline = asyncio.get_running_loop().time() + PARENT_LOCK_WAIT_SECONDS
            for k in wanted:  # in key order, as `process` takes its locks
                lock = self._locks.setdefault(ids[k], asyncio.Lock())
                try:
                    async with asyncio.timeout(max(0.0, deadline - asyncio.get_running_loop().time())):
                        await lock.acquire()
                except TimeoutError:
                    busy.add(k)
                    continue
                locks.append((k, lock))
            if locks:
                leased = await self.state.acquire_leases([ids[k] for k, _ in locks], owner, self.lease_seconds)
                busy.update(k for k, _ in locks if ids[k] not in leased)
                renewer = asyncio.create_task(self._renew_leases(sorted(leased), owner))
            yield [k for k in keys if k not in busy], busy
        finally:
            await self._end_leases(renewer, leased, owner, "parent")
            for _, lock in reversed(locks):
                lock.release()
            for k in wanted:
                self._lock_users[ids[k]] -= 1
                if self._lock_users[ids[k]] <= 0:
                    del self._lock_users[ids[k]]
                    self._locks.pop(ids[k], None)

    async def _read_lines(self, flow: FlowSpec, envs: Sequence[ChangeEnvelope],
                          errors: dict[str, SyncError]) -> dict[str, list[SourceRecord]]:
        # Lines are read when their header syncs, so a document is always written whole and in one piece.
        assert flow.lines is not None
        source = self.sinks.get(flow.source.system)  # select() is on the sink port (cascades use it too)
        if source is None:
            raise TransientError(f"no {flow.source.system} connector configured to read {flow.lines.source_table}")
        out: dict[str, list[SourceRecord]] = {e.source_key: [] for e in envs}
        keys = list(out)
        lines = flow.lines

        async def read(chunk: list[str]) -> list[SourceRecord]:
            return await source.select(lines.source_table, equals={lines.parent_field: chunk})

        for start in range(0, len(keys), LINE_QUERY_KEYS):
            rows, failed = await isolate(read, keys[start:start + LINE_QUERY_KEYS])
            for key, exc in failed.items():
                errors[key] = with_detail(exc, f"flow {flow.name} record {key}: its lines could not be read from "
                                           f"{flow.source.system} {lines.source_table}: {exc.detail}")
            for row in rows:
                parent = str(row.values.get(flow.lines.parent_field) or "")
                if parent in out:
                    out[parent].append(row)
        order_by = flow.lines.match_source
        for rows in out.values():
            # The source's own line order where it has one (line numbers), so target items follow it.
            rows.sort(key=lambda r: (_sortable(r.values.get(order_by)) if order_by else (0, ""), r.key))
        return out

    def _line_projection(self, flow: FlowSpec, work: _Work, source_key: str) -> list[dict[str, Any]]:
        line_flow = self._line_flows[flow.name]
        return [{"key": r.key, **self.mapper.project(line_flow, r.values)} for r in work.lines.get(source_key, [])]

    def _projection(self, flow: FlowSpec, env: ChangeEnvelope, work: _Work) -> dict[str, Any]:
        projection = self.mapper.project(flow, env.payload)
        if flow.lines is not None:
            projection[LINES_KEY] = self._line_projection(flow, work, env.source_key)
        return projection

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
        unknown = tsnap is not None and UNCONFIRMED in tsnap.values
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

    @staticmethod
    def _match_value(flow: FlowSpec, env: ChangeEnvelope) -> str:
        name = flow.link.match_source
        if name is None:
            return env.source_key
        value = env.payload.get(name)
        if _blank(value):
            raise ValidationError(
                f"flow {flow.name} record {env.source_key}: {flow.source.system}.{name} is empty, but it is the value "
                f"that finds this record in {flow.target.system} ({flow.link.target_field}). Fill it in, then replay.")
        return str(value)

    def _resolve_lookups(self, flow: FlowSpec, source_key: str, payload: Mapping[str, Any],
                         parents: Mapping[str, Mapping[str, str]], values: dict[str, Any], *, is_create: bool,
                         waits: int) -> dict[str, Bind]:
        """Put each relationship's target key into `values` (or a bind); a parent not synced yet defers."""
        src = flow.source
        binds: dict[str, Bind] = {}
        for lk in flow.lookups:
            parent_src_key = payload.get(lk.source)
            if _blank(parent_src_key):
                if lk.required and (is_create or lk.source in payload):
                    raise ValidationError(
                        f"flow {flow.name} record {source_key}: required relationship {lk.source} is empty; link "
                        f"the record to its parent in {src.system}, then replay."
                    )
                if lk.source in payload and lk.bind_entity_set is None:
                    values[lk.target] = None
                continue
            parent_key = parents.get(lk.source, {}).get(_canonical_key(src.system, str(parent_src_key)))
            if parent_key is None:
                if waits >= self.max_parent_waits:
                    raise ParentMissingError(
                        f"flow {flow.name} record {source_key}: parent {parent_src_key} (flow {lk.parent_flow}) "
                        f"was never synced after {waits} waits. Sync or fix the parent, then replay this message."
                    )
                raise ParentPendingError(
                    f"flow {flow.name} record {source_key}: waiting for parent {parent_src_key} "
                    f"(flow {lk.parent_flow}) to be synced first"
                )
            if lk.key_part is not None:
                try:
                    parts = key_parts(parent_key)
                except ValueError:
                    parts = []  # a malformed stored key has no usable part: reported just below
                if lk.key_part >= len(parts):
                    raise ValidationError(
                        f"flow {flow.name} record {source_key}: parent key {parent_key!r} has no part "
                        f"{lk.key_part} (lookup {lk.source}); fix key_part in the flow spec.")
                parent_key = parts[lk.key_part]
            if lk.bind_entity_set is not None:
                binds[lk.target] = Bind(lk.bind_entity_set, parent_key)
            else:
                values[lk.target] = parent_key
        return binds

    def _map_lines(self, flow: FlowSpec, env: ChangeEnvelope, work: _Work) -> Lines:
        assert flow.lines is not None
        line_flow = self._line_flows[flow.name]
        items: list[LineWrite] = []
        for row in work.lines.get(env.source_key, []):
            record = f"{line_flow.source.system}:{line_flow.source.table}:{row.key} (line of {env.source_key})"
            mapped = self.mapper.map_values(line_flow, row.values, is_create=True, target_newer=False, record=record)
            # A line's missing parent (its product) defers or dead-letters the whole document: never half an order.
            self._resolve_lookups(line_flow, row.key, row.values, work.line_parents, mapped.values, is_create=True,
                                  waits=env.waits)
            match_value = row.key
            if flow.lines.match_source is not None:
                raw = row.values.get(flow.lines.match_source)
                if _blank(raw):
                    raise ValidationError(
                        f"flow {flow.name} record {env.source_key}: line {row.key} has no "
                        f"{flow.lines.match_source}, the value that finds it in {flow.target.system}; fill it in, "
                        "then replay.")
                match_value = str(raw)
            values = {**flow.lines.defaults, **mapped.values}
            items.append(LineWrite(row.key, values, {flow.lines.link_field: match_value}))
        return Lines(flow.lines.target_table, dict(flow.lines.parent_fields), items)

    async def _attachments(self, flow: FlowSpec, env: ChangeEnvelope, snap: Snapshot | None) -> list[Attachment]:
        if flow.attachments is None or not flow.attachments.enabled:
            return []
        refs = [_attachment_ref(a) for a in env.payload.get(ATTACHMENTS_KEY) or []]
        done = {str(a.get("id")) for a in (snap.values.get(ATTACHMENTS_KEY) or [])} if snap else set()
        source = self.sources.get(flow.source.system)
        out: list[Attachment] = []
        for ref in refs:
            if ref.id in done or ref.content_type not in flow.attachments.content_types:
                continue
            if ref.size > flow.attachments.max_bytes:
                with correlated([env.correlation_id]):
                    log.warning("flow %s: attachment %s of %s is %d bytes, over the %d limit; not copied",
                                flow.name, ref.id, env.source_key, ref.size, flow.attachments.max_bytes)
                continue
            if source is None:
                raise TransientError(f"no {flow.source.system} source configured to read attachments")
            data = await source.fetch_attachment(flow.source.table, env.source_key, ref.id)
            out.append(Attachment(ref.name, ref.content_type, data, source_id=ref.id))
        return out

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
            tvalues = {**(dict(prev_t.values) if prev_t else {}), **_written(plan.op)}
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
            detail = f"{how} {tgt.system}:{tgt.table}:{key}"
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

    async def _record_skips(self, flow: FlowSpec, outcomes: Sequence[Outcome]) -> None:
        audit = [self._audit_for(o) for o in outcomes if o.status in ("skipped_echo", "skipped_noop")]
        if audit:
            await self.state.append_audit(audit)

    def _audit_for(self, outcome: Outcome) -> AuditEntry:
        env = outcome.envelope
        decision = {
            "skipped_echo": "skipped_echo",
            "skipped_noop": "skipped_noop",
            "deferred": "deferred",
            "failed": "retry_scheduled" if outcome.error is not None and outcome.error.retriable else "dead_lettered",
        }.get(outcome.status, "written")
        detail = outcome.error.detail if outcome.error is not None else outcome.detail
        return AuditEntry(
            self.clock(), env.correlation_id, env.flow, decision,  # type: ignore[arg-type]
            env.source_system, env.source_table, env.source_key, detail,
            outcome.error.reason if outcome.error is not None else None,
        )


class OldLayout:
    """Which system tables hold no snapshot in the per-record layout of earlier versions: one probe per table and
    `OLD_LAYOUT_RECHECK_SECONDS`, where a batch would otherwise probe (or read every missing key) each time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._empty_until: dict[tuple[str, str], float] = {}

    async def holds(self, state: StateStore, system: str, table: str) -> bool:
        """Whether (`system`, `table`) may hold snapshots in the old layout."""
        now = self._clock()
        if self._empty_until.get((system, table), now) > now:
            return False
        if await state.has_snapshots(system, table):
            self._empty_until.pop((system, table), None)
            return True
        self._empty_until[(system, table)] = now + OLD_LAYOUT_RECHECK_SECONDS
        return False


def snapshot_table(table: str, entity: str) -> str:
    """Where a record's snapshot is kept for one entity (one pair of flows): per entity, not per record.

    A value one entity's flow wrote is an echo for that entity's reverse flow only. A record in two entities
    (a Salesforce Account that is an F&O customer and a Customer 360 account) has one snapshot for each, so a
    change that arrives through one entity's flow still continues through the other's.
    """
    return f"{table}@{entity}"


async def read_snapshots(state: StateStore, entity: str, system: str, table: str,
                         keys: Sequence[str], layout: OldLayout | None = None) -> dict[str, Snapshot]:
    """The records' snapshots for `entity`; a record with none yet is read from the per-record snapshot that
    earlier versions kept (returned as the entity's, so the next write stores it in the new place)."""
    found = await state.get_snapshots(system, snapshot_table(table, entity), keys)
    missing = [k for k in keys if k not in found]
    # Nothing writes the old layout any more: once it is empty (or was never used), one probe replaces a read per key.
    if missing and await _old_layout_holds(state, system, table, layout):
        for key, old in (await state.get_snapshots(system, table, missing)).items():
            found[key] = Snapshot(system, snapshot_table(table, entity), key, old.values, old.hash, old.modified)
    return found


async def _old_layout_holds(state: StateStore, system: str, table: str, layout: OldLayout | None) -> bool:
    if layout is None:
        return await state.has_snapshots(system, table)
    return await layout.holds(state, system, table)


async def forget_snapshots(state: StateStore, entity: str, system: str, table: str, keys: Sequence[str],
                           layout: OldLayout | None = None) -> None:
    """Forget deleted records' snapshots for `entity`, and the per-record ones of earlier versions (a key reused
    later must not inherit them)."""
    await state.delete_snapshots(system, snapshot_table(table, entity), keys)
    if keys and await _old_layout_holds(state, system, table, layout):
        await state.delete_snapshots(system, table, keys)


def _written(op: WriteOp) -> dict[str, Any]:
    """What a target record holds once `op` is applied, in its snapshot's terms (values, bound keys, lines)."""
    values = dict(op.values)
    for nav, bind in op.binds.items():
        values[nav] = bind.key
    if op.lines is not None:
        values[LINES_KEY] = [{"key": i.source_key, **i.values} for i in op.lines.items]
    return values


def _maybe_applied(error: SyncError) -> bool:
    """Whether a failed write may still have been applied (sent, then no or a failed answer).

    Throttling and authentication are refused before anything is applied; a permanent rejection is the
    target refusing the record. Everything else (504, timeouts, dropped connections, 5xx) may have landed.
    """
    return isinstance(error, RetriableError) and not isinstance(error, ThrottledError | AuthError)


async def isolate(read: Callable[[list[str]], Awaitable[Sequence[T]]], keys: list[str],
                  ) -> tuple[list[T], dict[str, SyncError]]:
    """Read `keys` in one call; when that fails, split the keys until the bad ones stand alone.

    One malformed or refused key must not fail every record of a batch: the others are read, and each key
    that still fails on its own gets its error. A retriable failure of both halves is the system's, not a
    key's: the split stops there (a struggling system gets three calls, not one per key), and throttling
    is never split.
    """
    if not keys:
        return [], {}
    try:
        return list(await read(keys)), {}
    except SyncError as exc:
        return await _split(read, keys, exc)


async def _split(read: Callable[[list[str]], Awaitable[Sequence[T]]], keys: list[str],
                 error: SyncError) -> tuple[list[T], dict[str, SyncError]]:
    if len(keys) == 1 or isinstance(error, ThrottledError):
        return [], dict.fromkeys(keys, error)
    mid = len(keys) // 2
    parts = [keys[:mid], keys[mid:]]
    tried: list[tuple[list[T], SyncError | None]] = []
    for part in parts:
        try:
            tried.append((list(await read(part)), None))
        except SyncError as exc:
            tried.append(([], exc))
    if error.retriable and all(e is not None and e.retriable for _, e in tried):
        return [], dict.fromkeys(keys, error)
    rows: list[T] = []
    failed: dict[str, SyncError] = {}
    for part, (got, part_error) in zip(parts, tried, strict=True):
        if part_error is None:
            rows += got
            continue
        more, bad = await _split(read, part, part_error)
        rows += more
        failed.update(bad)
    return rows, failed


def with_detail(error: SyncError, detail: str) -> SyncError:
    """The same kind of failure (class, reason, throttling advice) with a detail that names what failed."""
    if isinstance(error, ThrottledError):
        return ThrottledError(detail, retry_after=error.retry_after, reason=error.reason)
    try:
        return type(error)(detail, reason=error.reason)
    except TypeError:  # a subclass with its own constructor: keep the retry semantics, lose only the class
        return (TransientError if error.retriable else PermanentError)(detail, reason=error.reason)


def _sortable(value: Any) -> tuple[int, Any]:
    """Numbers before text, each in its own order (a mix of int and str never compares)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    return (1, "" if value is None else str(value))


def in_scope(condition: Condition, payload: Mapping[str, Any]) -> bool:
    """Whether a record satisfies one scope condition of a flow (an absent field is empty)."""
    value = payload.get(condition.field)
    if condition.present is not None:
        return _blank(value) != condition.present
    return normalize(value) in {normalize(v) for v in condition.in_ or ()}


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _canonical_key(system: str, key: str) -> str:
    """Keys as the connectors emit them: ArcGIS GlobalIDs braced upper case, Dataverse GUIDs lower case."""
    text = key.strip()
    bare = text.strip("{}")
    if len(bare) == 36 and bare.count("-") == 4:
        return "{" + bare.upper() + "}" if system == "arcgis" else bare.lower()
    return text


def _covers(snapshot: Mapping[str, Any], projection: Mapping[str, Any]) -> bool:
    # A field absent from the snapshot is empty there (Dataverse images omit null columns).
    return all(same(snapshot.get(k), v) for k, v in projection.items())


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _attachment_ref(raw: Any) -> AttachmentRef:
    if isinstance(raw, AttachmentRef):
        return raw
    if not isinstance(raw, Mapping):
        raise ValidationError(f"attachment entry must be an object, got {raw!r}")
    return AttachmentRef(str(raw.get("id")), str(raw.get("name") or raw.get("id")),
                         str(raw.get("content_type") or raw.get("contentType") or "application/octet-stream"),
                         int(raw.get("size") or 0))


def _new_attachments(env: ChangeEnvelope, snap: Snapshot | None) -> bool:
    refs = env.payload.get(ATTACHMENTS_KEY) or []
    done = {str(a.get("id")) for a in (snap.values.get(ATTACHMENTS_KEY) or [])} if snap else set()
    return any(str(_attachment_ref(r).id) not in done for r in refs)


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


def _seen_token(env: ChangeEnvelope) -> str | None:
    """Orderable "when" of a change: modified time, then the source's row version as a tie-breaker.

    Dataverse's modifiedon has one-second resolution, so two edits in one second are ordered by version.
    """
    if env.source_modified is None:
        return None
    digits = "".join(ch for ch in (env.source_version or "") if ch.isdigit())
    return f"{_iso(env.source_modified)}|{digits.zfill(20) if digits else ''}"


def _iso(moment: datetime) -> str:
    """UTC ISO-8601 text, so comparisons of stored times are plain string comparisons."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat()
