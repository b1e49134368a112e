"""The controller: polls change feeds into the queue, drains the queue through the engine, settles every message."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.core.engine import Outcome, SyncEngine, isolate, read_snapshots, with_detail
from shared.core.envelope import ChangeEnvelope, Origin, QueueMessage, ReceivedMessage
from shared.core.errors import EnvelopeError, RecordBusyError, SyncError, ThrottledError, TransientError
from shared.core.ports import (
    ATTACHMENTS_KEY,
    AuditEntry,
    ChangeSource,
    CheckpointConflictError,
    InboundQueue,
    LockLostError,
    SourceRecord,
    StateStore,
)
from shared.mapping.spec import FlowSet
from shared.telemetry import Metrics, correlated

log = logging.getLogger(__name__)

LAST_CYCLE = "controller:last_cycle"
ENQUEUED = "enqueued"
"""Dedup namespace of enqueued changes' message ids (the poll path and the webhook intake share it)."""
POLL_HINT = "poll-hint"
PAUSE_PREFIX = "pause:"
"""Checkpoint `pause:<system>` holds the UTC time until which Syncline must not call that system."""
HOUSEKEEPING = "controller:housekeeping"
"""Checkpoint: when dedup keys were last pruned (once a day)."""
DEDUP_RETENTION = timedelta(days=14)
"""Dedup keys older than this are dropped: change streams redeliver within 72 h and retries end within days."""
BUSY_RETRY_SECONDS = 5.0
"""A change whose record another process is writing (RECORD_BUSY) is tried again this much later."""
PAUSE_THRESHOLD_SECONDS = 60.0
"""Throttling advice at least this long (a spent daily API allocation) pauses the system instead of retrying."""
"""Application property `kind` of a queue message that asks the controller to read a change feed."""
MAX_HELD = 500
"""Failed changes a cycle holds (locked) until it ends; past that it ends early. On Service Bus each keeps its
session (bucket) held, and its record's later messages waiting (docs/sessions.md)."""
STALE_ROUNDS = 3
"""Receives in a row that bring only changes tried already this cycle (lost locks) before the drain stops."""


def envelopes_for(
    flowset: FlowSet,
    system: str,
    table: str,
    records: Iterable[SourceRecord],
    *,
    origin: Origin,
    mode: str | None = None,
    operation: str | None = None,
    correlation_id: str | None = None,
) -> list[ChangeEnvelope]:
    """One envelope per (record, flow reading that table), optionally only flows of one mode."""
    flows = [f for f in flowset.flows_from(system, table) if mode is None or f.mode == mode]
    out: list[ChangeEnvelope] = []
    for record in records:
        payload = dict(record.values)
        if record.attachments:
            payload[ATTACHMENTS_KEY] = [asdict(a) for a in record.attachments]
        for flow in flows:
            op = "delete" if record.deleted else (operation or "upsert")
            kwargs: dict[str, Any] = {}
            if correlation_id:
                kwargs["correlation_id"] = correlation_id
            out.append(ChangeEnvelope(
                flow=flow.name, operation=op,
                source_system=system, source_table=table, source_key=record.key,
                source_version=record.version, source_modified=record.modified,
                payload=payload, origin=origin, **kwargs,
            ))
    return out


async def drop_duplicates(
    state: StateStore, envelopes: Sequence[ChangeEnvelope], now: datetime
) -> list[ChangeEnvelope]:
    """Keep envelopes whose message id was never enqueued before (a webhook and a poll can report one change).

    Message ids are derived from the record, operation and source version, so the same change seen twice
    has the same id; a later change of the record has a new version and passes. The lookup remembers nothing
    (a claim, which costs Table Storage one insert per 100 new keys where a read costs one per key, is not a
    remembered key): the caller calls `remember_enqueued` once the messages are durably on the queue, so a failed
    send (or a crash before it) leaves no key behind that would drop the change when it is read again.
    """
    if not envelopes:
        return []
    seen = await state.claim(ENQUEUED, [e.message_id() for e in envelopes])
    fresh: list[ChangeEnvelope] = []
    batch_ids: set[str] = set()
    dropped: list[AuditEntry] = []
    for env in envelopes:
        mid = env.message_id()
        if mid in seen or mid in batch_ids:
            dropped.append(AuditEntry(now, env.correlation_id, env.flow, "duplicate_dropped", env.source_system,
                                      env.source_table, env.source_key, f"change already enqueued as {mid}"))
            continue
        batch_ids.add(mid)
        fresh.append(env)
    if dropped:
        await state.append_audit(dropped)
    return fresh


async def remember_enqueued(state: StateStore, envelopes: Sequence[ChangeEnvelope]) -> None:
    """Record the message ids of envelopes now durably on the queue (see `drop_duplicates`)."""
    if envelopes:
        await state.confirm(ENQUEUED, [e.message_id() for e in envelopes])


async def to_messages(flowset: FlowSet, state: StateStore, envelopes: Sequence[ChangeEnvelope]) -> list[QueueMessage]:
    """Queue messages whose session id is the record's root parent, so a parent is processed before its
    children and one family's changes keep their order (Service Bus sessions).

    The chain is walked through each flow's first lookup, reading the parents' lookup values from the
    snapshots Syncline keeps; a parent it has never seen ends the walk (that parent is the session).
    """
    out: list[QueueMessage] = []
    cache: dict[tuple[str, str, str], dict[str, Any]] = {}
    for env in envelopes:
        root = env.record_id
        try:
            flow = flowset.flow(env.flow)
        except SyncError:
            out.append(env.to_message())
            continue
        payload: Mapping[str, Any] = env.payload
        for _ in range(8):  # specs are acyclic (validated); the bound is a guard, not a rule
            if not flow.lookups:
                break
            lookup = flow.lookups[0]
            parent_key = payload.get(lookup.source)
            if parent_key in (None, ""):
                break
            flow = flowset.flow(lookup.parent_flow)
            root = f"{env.source_system}:{flow.source.table}:{parent_key}"
            if not flow.lookups:
                break  # the parent has no parent: its snapshot would not be read further
            where = (env.source_system, flow.source.table, str(parent_key))
            if where not in cache:
                snaps = await read_snapshots(state, flow.entity, *where[:2], [where[2]])
                cache[where] = dict(snaps[where[2]].values) if where[2] in snaps else {}
            payload = cache[where]
        out.append(env.to_message(session_id=root))
    return out


@dataclass
class CycleReport:
    """What one controller cycle did (also stored as the health endpoint's "last cycle")."""

    started_at: str
    finished_at: str = ""
    duration_seconds: float = 0.0
    outcome: str = "running"
    polled: int = 0
    received: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    dead_lettered: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    deferred: int = 0
    paused: dict[str, str] = field(default_factory=dict)
    """System -> UTC time until which it is not called (its changes wait on the queue, scheduled)."""
    held: int = 0
    """Messages rescheduled unprocessed because a system they need is paused."""
    error: str | None = None
    poll_errors: list[str] = field(default_factory=list)
    """Change feeds that could not be read this cycle (the others were read and the queue drained)."""


class Controller:
    """Runs one sync cycle: backfill poll -> enqueue, then drain -> engine -> settle."""

    def __init__(
        self,
        flowset: FlowSet,
        *,
        engine: SyncEngine,
        queue: InboundQueue,
        state: StateStore,
        sources: Mapping[str, ChangeSource],
        batch_size: int = 500,
        lock_renew_seconds: float = 20.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        parent_wait_seconds: float = 60.0,
        progress: Callable[[str, int], None] | None = None,
        metrics: Metrics | None = None,
        api_calls: Callable[[], Mapping[str, int]] | None = None,
        max_attempts: int | None = None,
        busy_retry_seconds: float = BUSY_RETRY_SECONDS,
        max_held: int = MAX_HELD,
    ) -> None:
        self.flowset = flowset
        self.engine = engine
        self.queue = queue
        self.state = state
        self.sources = sources
        self.batch_size = batch_size
        self.lock_renew_seconds = lock_renew_seconds
        self.clock = clock
        self.parent_wait_seconds = parent_wait_seconds
        self.progress = progress
        self.metrics = metrics or Metrics()
        self.api_calls = api_calls
        self.max_attempts = max_attempts or queue.max_delivery_count
        """Failed attempts (SYNCLINE_MAX_DELIVERY_COUNT) before a change is dead-lettered; the queue's own max
        delivery count is a higher backstop, so locks lost to crashed processes never dead-letter a change."""
        self.busy_retry_seconds = busy_retry_seconds
        self.max_held = max_held
        self._held: list[ReceivedMessage] = []
        """Messages of changes that failed in this cycle: kept locked until it ends, then abandoned."""
        self._in_flight: list[ReceivedMessage] = []
        """Messages of the batch being worked that are not settled yet (their locks are renewed)."""
        self._prefetched: list[ReceivedMessage] = []
        """The next batch, received while the current one is worked (their locks are renewed too)."""
        self._clear_after_complete: list[str] = []
        """Message ids with failed attempts on record whose messages are being completed."""
        self._audit: list[AuditEntry] = []
        self._seen: set[int] = set()
        """Sequence numbers received in the cycle under way and not settled for good (in flight, held, or whose lock
        was lost): one coming back in the same cycle is held, not tried again."""
        self._settled: set[int] = set()
        """Sequence numbers of the batch's messages settled for good (completed or dead-lettered): the drain
        forgets them, so what it remembers per cycle is bounded by what is in flight or held, not the backlog."""
        self._cleared: list[str] = []
        """Per-message ledger entries and failure counts to clear (dead letters, replays), stored per flow group in
        one call each (`_flush`) rather than one call per message."""
        self._current_report = CycleReport(started_at="")
        """The report of the cycle in progress (poll pauses are recorded on it)."""
        """Running HTTP request totals per system (the composition root's CallCounter), for the api_calls metric."""

    # -------------------------------------------------------------------------------- the cycle

    async def run_cycle(self, *, poll: bool = True, max_messages: int | None = None) -> CycleReport:
        """Poll (backfill) and drain once; the report is stored for /api/health."""
        started = time.monotonic()
        report = CycleReport(started_at=self.clock().isoformat())
        self._current_report = report
        try:
            if poll:
                report.polled = await self.poll()
            await self.drain(report, max_messages=max_messages)
            await self._housekeeping()
            report.outcome = "ok"
            if report.poll_errors:
                report.outcome, report.error = "failed", "; ".join(report.poll_errors)
        except SyncError as exc:
            report.outcome, report.error = "failed", str(exc)
            log.error("controller cycle failed: %s", exc)
        except Exception as exc:
            # Storage or SDK failure: locked messages simply expire and are redelivered; record and re-raise.
            report.outcome, report.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("controller cycle crashed: %s", report.error)
            raise
        finally:
            report.duration_seconds = round(time.monotonic() - started, 3)
            report.finished_at = self.clock().isoformat()
            await self._store_report(report)
            await self._record_cycle_metrics(report)
        return report

    async def _record_cycle_metrics(self, report: CycleReport) -> None:
        dead: int | None = None
        try:
            dead = (await asyncio.wait_for(self.queue.depth(), timeout=10)).dead_letter
        except Exception as exc:  # a metric must never fail the cycle (or hide why it failed)
            log.warning("dead-letter depth unavailable for metrics: %s", type(exc).__name__)
        self.metrics.record_cycle(report, dead)
        if self.api_calls is not None:
            self.metrics.record_api_call_totals(self.api_calls())

    async def poll(self, only: set[tuple[str, str]] | None = None) -> int:
        """Read each queue-mode source table's change feed since its checkpoint and enqueue the changes.

        The checkpoint moves only after the page's messages are on the queue (compare-and-set, so two
        controllers can never move it backwards); a crash in between re-reads the page, and the
        envelopes' deterministic message ids plus echo suppression make that harmless.
        """
        total = 0
        tables = sorted({(f.source.system, f.source.table) for f in self.flowset.flows if f.mode == "queue"})
        for system, table in tables:
            if only is not None and (system, table) not in only:
                continue
            source = self.sources.get(system)
            if source is None:
                continue
            if await self.paused_until(system) is not None:
                log.info("poll of %s %s skipped: %s is paused", system, table, system)
                continue
            try:
                total += await self._poll_table(system, table, source)
            except ThrottledError as exc:
                if (exc.retry_after or 0) >= PAUSE_THRESHOLD_SECONDS:
                    # The allocation is spent: pausing keeps the remaining polls and drains off this system.
                    await self._pause(system, exc.retry_after or 0, self._current_report)
                    continue
                self._poll_failed(system, table, exc)
            except SyncError as exc:
                self._poll_failed(system, table, exc)
        return total

    def _poll_failed(self, system: str, table: str, exc: SyncError) -> None:
        # One unreadable feed (down, throttled, credentials refused, renamed) must not stop the other feeds or the
        # drain: its checkpoint did not move, so the next cycle reads the same changes again.
        log.error("poll of %s %s failed: %s", system, table, exc)
        self._current_report.poll_errors.append(f"{system} {table}: {exc}")

    async def _poll_table(self, system: str, table: str, source: ChangeSource) -> int:
        total = 0
        name = f"poll:{system}:{table}"
        current = await self.state.get_checkpoint(name)
        etag = current.etag if current else None
        async for records, next_checkpoint in source.changes_since(table, current.value if current else None):
            envelopes = envelopes_for(self.flowset, system, table, records, origin="poll", mode="queue")
            envelopes = await drop_duplicates(self.state, envelopes, self.clock())
            if envelopes:
                await self.queue.send(await to_messages(self.flowset, self.state, envelopes))
                await remember_enqueued(self.state, envelopes)
                await self.state.append_audit([
                    AuditEntry(self.clock(), e.correlation_id, e.flow, "enqueued", system, table, e.source_key,
                               "change feed backfill") for e in envelopes])
            total += len(envelopes)
            try:
                etag = (await self.state.put_checkpoint(name, next_checkpoint, expected_etag=etag)).etag
            except CheckpointConflictError:
                log.warning("checkpoint %s moved by another controller; stopping this poll", name)
                break
            if self.progress:
                self.progress("poll", len(envelopes))
        return total

    async def drain(self, report: CycleReport | None = None, *, max_messages: int | None = None) -> CycleReport:
        """Receive in batches until the queue has nothing more for this cycle.

        A change that fails is not abandoned at once: its lock is kept (and renewed) until the cycle ends, then
        released. So it is not received again in the same cycle (which would spend a delivery for nothing), the
        batches behind it are all received and worked (no head-of-line blocking), and its delivery count rises
        once per cycle, as its failed attempts do. Holding the lock also holds its session on Service Bus, so a
        later change of the same record or family never overtakes it. (Rescheduling a fresh copy instead would
        reset the delivery count but let later changes of the record overtake it, and a late upsert could
        resurrect a record deleted meanwhile.) At most `max_held` failed messages are held: past that the cycle
        ends early, and the queue's remaining messages wait for the next one.
        """
        report = report or CycleReport(started_at=self.clock().isoformat())
        seen: set[int] = set()
        self._seen = seen
        statuses: Counter[str] = Counter(report.statuses)
        dead: Counter[str] = Counter(report.dead_lettered)
        self._held, self._in_flight, self._prefetched = [], [], []
        renewer = asyncio.create_task(self._renew_locks(
            lambda: [*self._in_flight, *self._prefetched, *self._held]))
        stale_rounds = 0
        prefetch: asyncio.Task[list[ReceivedMessage]] | None = None
        try:
            batch = await self._receive_next(report, max_messages)
            while batch:
                fresh = [m for m in batch if m.sequence_number not in seen]
                # Tried already in this cycle and its lock was lost meanwhile: hold it too. Abandoning it now would
                # spend a delivery, and it would only come straight back.
                self._held.extend(m for m in batch if m.sequence_number in seen)
                if not fresh:
                    stale_rounds += 1
                    if stale_rounds >= STALE_ROUNDS:
                        break
                    batch = await self._receive_next(report, max_messages)
                    continue
                stale_rounds = 0
                seen.update(m.sequence_number for m in fresh)
                report.received += len(fresh)
                # The next batch is received while this one is worked (the queue hands out nothing more of a record
                # with a change in flight, so it holds no later change of this batch's records): a round trip to
                # the broker per batch overlaps the work instead of adding to it. Its locks are renewed meanwhile.
                if len(self._held) >= self.max_held:
                    self._warn_hold_full(len(self._held))
                else:
                    prefetch = asyncio.create_task(self._receive_next(report, max_messages, renew=True))
                self._settled.clear()
                await self._process_batch(fresh, report, statuses, dead)
                seen -= self._settled  # settled messages never come back: a cycle's memory does not grow with them
                self._settled.clear()
                if self.progress:
                    self.progress("drain", len(fresh))
                if prefetch is None:
                    break
                batch, prefetch = await prefetch, None
                self._prefetched = []
                if len(self._held) >= self.max_held:
                    # Received ahead, before this batch's failures filled the cycle's hold: released unworked (a
                    # delivery, not a failed attempt), to come back next cycle.
                    self._warn_hold_full(len(self._held))
                    self._held.extend(batch)
                    break
        finally:
            if prefetch is not None:  # the cycle failed while the next batch was being received: release it
                prefetch.cancel()
                with contextlib.suppress(BaseException):
                    self._held.extend(await prefetch)
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            held, self._held, self._in_flight, self._prefetched = self._held, [], [], []
            await self._release(held)
            await self._release_sessions()
        report.statuses, report.dead_lettered = dict(statuses), dict(dead)
        return report

    @staticmethod
    def _warn_hold_full(held: int) -> None:
        log.warning("%d failed changes held until the end of the cycle (the most allowed); the rest of the queue "
                    "waits for the next cycle", held)

    async def _receive_next(self, report: CycleReport, max_messages: int | None, *,
                            renew: bool = False) -> list[ReceivedMessage]:
        """The next batch (empty once the cycle's `max_messages` are received); `renew`: received ahead, its locks
        are renewed until it is worked."""
        want = self.batch_size if max_messages is None else min(self.batch_size, max_messages - report.received)
        if want <= 0:
            return []
        batch = await self.queue.receive(want)
        if renew:
            self._prefetched = list(batch)
        return batch

    async def _release(self, held: Sequence[ReceivedMessage]) -> None:
        """Abandon the messages held to the end of the cycle (their next delivery is their next attempt)."""
        if not held:
            return
        many = getattr(self.queue, "abandon_many", None)
        try:
            if many is not None:
                await many(held)
                return
            for m in held:
                await self._settle_quietly(self.queue.abandon, m)
        except LockLostError as exc:
            log.warning("locks lost before release (the messages will be redelivered): %s", exc)
        except Exception as exc:  # never hide why the cycle ended (this runs in drain's finally)
            log.warning("releasing %d failed changes failed (%s: %s); they come back when their locks expire",
                        len(held), type(exc).__name__, exc)

    async def _release_sessions(self) -> None:
        """Let other processes take the sessions this cycle held open for its next receive (Service Bus)."""
        release = getattr(self.queue, "release_sessions", None)
        if release is None:
            return
        try:
            await release()
        except Exception as exc:  # never hide why the cycle ended; their locks expire anyway
            log.warning("releasing the held sessions failed (%s: %s)", type(exc).__name__, exc)

    # ------------------------------------------------------------------------------- internals

    async def _process_batch(self, messages: Sequence[ReceivedMessage], report: CycleReport,
                             statuses: Counter[str], dead: Counter[str]) -> None:
        self._in_flight = list(messages)  # their locks are renewed until they are settled
        try:
            await self._work_batch(messages, report, statuses, dead)
        finally:
            self._in_flight = []
            try:
                await self._flush()
            except Exception as exc:  # never hide why the batch failed
                log.warning("storing %d ledger entries of settled messages failed (%s: %s)", len(self._audit),
                            type(exc).__name__, exc)
                self._audit, self._cleared = [], []

    async def _work_batch(self, messages: Sequence[ReceivedMessage], report: CycleReport,
                          statuses: Counter[str], dead: Counter[str]) -> None:
        parsed: list[tuple[ReceivedMessage, ChangeEnvelope]] = []
        hints: list[ReceivedMessage] = []
        for msg in messages:
            if msg.application_properties.get("kind") == POLL_HINT:
                hints.append(msg)
                continue
            try:
                parsed.append((msg, ChangeEnvelope.from_body(msg.body)))
            except EnvelopeError as exc:
                with correlated([msg.correlation_id]):
                    await self._dead_letter(msg, exc, None)
                dead[exc.reason] += 1
                statuses["failed"] += 1
                self.metrics.record_failures({exc.reason: 1})
        if hints:
            # A feature-service webhook only says "something changed": read the change feed for it now.
            wanted = {(str(m.application_properties.get("system")), str(m.application_properties.get("table")))
                      for m in hints}
            await self.poll(only=wanted)
            await self._complete(hints)
            statuses["poll_hint"] += len(hints)
        held: list[ReceivedMessage] = []
        parsed = await self._hold_paused(parsed, report, statuses, held)
        await self._complete(held)
        if not parsed:
            return
        to_complete: list[ReceivedMessage] = []
        # Each flow group is settled as soon as the engine is done with it (parents' flows first, as the engine
        # orders them): a crash later in the batch leaves only the changes not yet worked to come back.
        self._in_flight = [m for m, _ in parsed]
        # The batch's records are leased once for all its flow groups (a transaction per lease partition to take
        # them and one to release them, where each group would pay that again). Leases only: a webhook of this
        # process that wants one of them is told it is busy rather than waiting for the whole batch.
        async with self.engine.hold([env for _, env in parsed], wait=False):
            for received in self._flow_groups(parsed):
                # Replays and resubmissions are read as their group comes, not as the batch came: a parent's
                # cascade earlier in this batch may have changed them (a deferred task it closed in Dataverse
                # would otherwise be created open in ArcGIS, after the cascade found nothing there to close).
                group, unreadable = await self._refresh_replays(received)
                failed = [(msg, Outcome(env, "failed", error=error)) for msg, env, error in unreadable]
                if failed:
                    self.metrics.record_outcomes([o for _, o in failed], self.flowset)
                for msg, outcome in failed:
                    # Its current record could not be read: it fails alone (retried, or dead-lettered with the reason).
                    with correlated([outcome.envelope.correlation_id]):
                        await self._settle(msg, outcome.envelope, outcome, report, statuses, dead, to_complete)
                outcomes = await self.engine.process([env for _, env in group]) if group else []
                self.metrics.record_outcomes(outcomes, self.flowset)
                by_env = {id(o.envelope): o for o in outcomes}
                for msg, env in group:
                    with correlated([env.correlation_id]):
                        await self._settle(msg, env, by_env[id(env)], report, statuses, dead, to_complete)
                await self._complete(to_complete)
                to_complete = []
                done = {id(m) for m, _ in received}
                self._in_flight = [m for m in self._in_flight if id(m) not in done]

    def _flow_groups(self, parsed: list[tuple[ReceivedMessage, ChangeEnvelope]],
                     ) -> list[list[tuple[ReceivedMessage, ChangeEnvelope]]]:
        """The batch's changes per flow, parents' flows first (unknown flows first: the engine fails them)."""
        by_flow: dict[str, list[tuple[ReceivedMessage, ChangeEnvelope]]] = {}
        for msg, env in parsed:
            by_flow.setdefault(env.flow, []).append((msg, env))

        def depth(name: str) -> int:
            try:
                return self.flowset.depth(self.flowset.flow(name))
            except SyncError:
                return -1

        return [by_flow[name] for name in sorted(by_flow, key=depth)]

    async def _settle(self, msg: ReceivedMessage, env: ChangeEnvelope, outcome: Outcome, report: CycleReport,
                      statuses: Counter[str], dead: Counter[str], to_complete: list[ReceivedMessage]) -> None:
        """Settle one message by its outcome (inside the change's correlation scope, for its log lines)."""
        statuses[outcome.status] += 1
        # Only a redelivered message can have failed attempts on record; they end with it. (A busy or held
        # change's copy keeps the message id, and with it the count: not cleared then.)
        if outcome.status != "failed" and msg.delivery_count > 1:
            self._clear_after_complete.append(msg.message_id)
        if outcome.status == "deferred":
            await self._defer(env)
            report.deferred += 1
            to_complete.append(msg)
        elif outcome.status == "failed":
            assert outcome.error is not None
            error = outcome.error
            if isinstance(error, ThrottledError) and (error.retry_after or 0) >= PAUSE_THRESHOLD_SECONDS:
                # A spent allocation: retrying burns deliveries for hours. Pause the system, park the change.
                until = await self._pause(self._throttled_system(env, error), error.retry_after or 0, report)
                await self._reschedule(env, until)
                report.held += 1
                to_complete.append(msg)
            elif isinstance(error, RecordBusyError):
                # Not a failure of the change: another process holds the record. A fresh copy comes back
                # shortly (and is applied with the record as it is then); no attempt is spent.
                await self._reschedule(env, self.clock() + timedelta(seconds=self.busy_retry_seconds))
                report.retried += 1
                to_complete.append(msg)
            elif outcome.error.retriable:
                if await self._retry(msg, env, outcome):
                    dead["MAX_DELIVERY_EXCEEDED"] += 1
                else:
                    report.retried += 1
            else:
                await self._dead_letter(msg, outcome.error, env)
                dead[outcome.error.reason] += 1
        else:
            if env.origin == "replay":
                self._audit.append(AuditEntry(
                    self.clock(), env.correlation_id, env.flow, "replayed", env.source_system,
                    env.source_table, env.source_key, f"replayed message {msg.message_id}: {outcome.status}"))
            to_complete.append(msg)

    async def _housekeeping(self) -> None:
        """Once a day: drop dedup keys past their retention, so the dedup table does not grow for ever."""
        now = self.clock()
        point = await self.state.get_checkpoint(HOUSEKEEPING)
        try:
            last = datetime.fromisoformat(point.value) if point and point.value else None
        except ValueError:
            last = None
        if last is not None and now - last < timedelta(days=1):
            return
        try:
            await self.state.put_checkpoint(HOUSEKEEPING, now.isoformat(), expected_etag=point.etag if point else None)
        except CheckpointConflictError:
            return  # another controller does it
        dropped = await self.state.forget_remembered(now - DEDUP_RETENTION)
        log.info("housekeeping: %d dedup keys older than %s dropped", dropped, DEDUP_RETENTION)
        # Counts of messages that ended without a settle by us (the queue's backstop, a lost completion).
        stale = await self.state.forget_failures(now - DEDUP_RETENTION)
        log.info("housekeeping: %d failed-attempt counts older than %s dropped", stale, DEDUP_RETENTION)

    # ------------------------------------------------------------------------------ pauses

    async def paused_until(self, system: str) -> datetime | None:
        """When `system` may be called again, or None if it is not paused."""
        point = await self.state.get_checkpoint(PAUSE_PREFIX + system)
        if point is None or not point.value:
            return None
        try:
            until = datetime.fromisoformat(point.value)
        except ValueError:
            return None
        return until if until > self.clock() else None

    async def _pause(self, system: str, seconds: float, report: CycleReport) -> datetime:
        until = self.clock() + timedelta(seconds=seconds)
        current = await self.state.get_checkpoint(PAUSE_PREFIX + system)
        try:
            await self.state.put_checkpoint(PAUSE_PREFIX + system, until.isoformat(),
                                            expected_etag=current.etag if current else None)
        except CheckpointConflictError:
            log.info("pause of %s stored concurrently by another controller", system)
        report.paused[system] = until.isoformat()
        log.warning("%s paused until %s (API allocation spent); its changes stay queued", system, until.isoformat())
        return until

    def _throttled_system(self, env: ChangeEnvelope, error: ThrottledError) -> str:
        flow = self.flowset.flow(env.flow)
        for system in (flow.target.system, flow.source.system):
            if error.detail.lower().startswith(system.lower()):
                return system
        return flow.target.system

    async def _hold_paused(self, parsed: list[tuple[ReceivedMessage, ChangeEnvelope]], report: CycleReport,
                           statuses: Counter[str], to_complete: list[ReceivedMessage],
                           ) -> list[tuple[ReceivedMessage, ChangeEnvelope]]:
        """Park changes whose flow calls a paused system (target, or source for lines and id write-back)."""
        pauses: dict[str, datetime | None] = {}
        keep: list[tuple[ReceivedMessage, ChangeEnvelope]] = []
        for msg, env in parsed:
            try:
                flow = self.flowset.flow(env.flow)
            except SyncError:
                keep.append((msg, env))  # the engine reports the unknown flow
                continue
            until: datetime | None = None
            for system in (flow.target.system, flow.source.system):
                if system not in pauses:
                    pauses[system] = await self.paused_until(system)
                if pauses[system] is not None:
                    until = pauses[system]
                    report.paused[system] = until.isoformat() if until else ""
            if until is None:
                keep.append((msg, env))
                continue
            await self._reschedule(env, until)
            report.held += 1
            statuses["held"] += 1
            to_complete.append(msg)
        return keep

    async def _reschedule(self, env: ChangeEnvelope, at: datetime) -> None:
        # A resubmission is applied with the record as it is then (see _refresh_replays): nothing goes stale.
        later = env.model_copy(update={"origin": "resubmit"})
        await self.queue.send(await to_messages(self.flowset, self.state, [later]), scheduled_at=at)

    async def _refresh_replays(
        self, parsed: list[tuple[ReceivedMessage, ChangeEnvelope]]
    ) -> tuple[list[tuple[ReceivedMessage, ChangeEnvelope]], list[tuple[ReceivedMessage, ChangeEnvelope, SyncError]]]:
        """Replayed and resubmitted changes are applied with the source record as it is now.

        A replay follows an operator's fix; a resubmission (a deferred or failed direct write) may have been
        overtaken by newer edits meanwhile — writing the current state keeps a late copy from undoing them.
        The message body stays as evidence; only the payload used for this attempt is fresh.
        Returns the changes to process and, apart, those whose record could not be read (with the error):
        a key the source refuses fails its own messages only, never the batch.
        """
        wanted: dict[tuple[str, str], set[str]] = {}
        for _, env in parsed:
            if env.origin in ("replay", "resubmit") and env.operation != "delete" and env.source_system in self.sources:
                wanted.setdefault((env.source_system, env.source_table), set()).add(env.source_key)
        if not wanted:
            return parsed, []
        fresh: dict[tuple[str, str, str], SourceRecord] = {}
        errors: dict[tuple[str, str, str], SyncError] = {}
        for (system, table), keys in wanted.items():
            fetch = getattr(self.sinks_for_refresh(system), "fetch", None)
            if fetch is None:
                continue

            async def read(chunk: list[str], fetch: Any = fetch, system: str = system,
                           table: str = table) -> list[SourceRecord]:
                try:
                    return list((await fetch(table, chunk)).values())
                except SyncError:
                    raise
                except Exception as unexpected:
                    # Not a failure the connector knows: retried (and logged in full), never a wedged batch.
                    log.exception("reading %d current %s %s records failed unexpectedly", len(chunk), system, table)
                    raise TransientError(f"reading current {system} {table} records failed: "
                                         f"{type(unexpected).__name__}: {str(unexpected)[:300]}") from unexpected

            records, failed = await isolate(read, sorted(keys))
            for found in records:
                fresh[(system, table, found.key)] = found
            for key, exc in failed.items():
                errors[(system, table, key)] = exc if exc.retriable else with_detail(
                    exc, f"the current {system} {table} record {key} could not be read: {exc.detail}")
        out = []
        unreadable = []
        for msg, env in parsed:
            where = (env.source_system, env.source_table, env.source_key)
            if where in errors and where not in fresh:
                unreadable.append((msg, env, errors[where]))
                continue
            record = fresh.get(where)
            if record is not None:
                payload = dict(record.values)
                if record.attachments:
                    payload[ATTACHMENTS_KEY] = [asdict(a) for a in record.attachments]
                env = env.model_copy(update={"payload": payload, "source_modified": record.modified or
                                             env.source_modified, "source_version": record.version})
            out.append((msg, env))
        return out, unreadable

    def sinks_for_refresh(self, system: str) -> object:
        """The system's reader of current records (its sink, which can fetch by key)."""
        return self.engine.sinks.get(system)

    async def _complete(self, messages: list[ReceivedMessage]) -> None:
        await self._complete_messages(messages)
        settled = {m.message_id for m in messages}
        clear = [mid for mid in self._clear_after_complete if mid in settled]
        if clear:
            self._clear_after_complete = [mid for mid in self._clear_after_complete if mid not in settled]
            self._cleared += clear
        await self._flush()

    async def _flush(self) -> None:
        """Store the ledger entries and clear the failure counts of the messages settled so far (one call each)."""
        audit, cleared = self._audit, self._cleared
        self._audit, self._cleared = [], []
        if cleared:
            await self.state.clear_failures(cleared)
        if audit:
            await self.state.append_audit(audit)

    async def _complete_messages(self, messages: list[ReceivedMessage]) -> None:
        many = getattr(self.queue, "complete_many", None)
        if many is not None and messages:
            try:
                await many(messages)
            except LockLostError as exc:
                log.warning("locks lost before completion (the messages will be redelivered): %s", exc)
                # A batch settlement names the lost ones (the rest were settled); otherwise assume none was.
                lost = {id(m) for m in getattr(exc, "lost", messages)}
                self._settled.update(m.sequence_number for m in messages if id(m) not in lost)
            else:
                self._settled.update(m.sequence_number for m in messages)
            return
        for m in messages:
            if await self._settle_quietly(self.queue.complete, m):
                self._settled.add(m.sequence_number)

    async def _retry(self, msg: ReceivedMessage, env: ChangeEnvelope, outcome: Outcome) -> bool:
        """Abandon for another attempt, or dead-letter once the attempts are spent (returns True then)."""
        error = outcome.error
        assert error is not None
        # Failed attempts, not deliveries: a delivery whose lock a crashed process lost is no failure.
        attempts = (await self.state.record_failures([msg.message_id])).get(msg.message_id, 1)
        if attempts >= self.max_attempts:
            await self._dead_letter(msg, error, env, exhausted=True, attempts=attempts)
            return True
        if isinstance(error, ThrottledError) and error.retry_after and error.retry_after > 1:
            log.info("flow %s key %s throttled; retry after %ss", env.flow, env.source_key, error.retry_after)
        self._held.append(msg)  # released when the cycle ends (see drain)
        return False

    async def _defer(self, env: ChangeEnvelope) -> None:
        waited = env.model_copy(update={"waits": env.waits + 1, "origin": "resubmit"})
        delay = self.parent_wait_seconds * min(env.waits + 1, 15)
        await self.queue.send(await to_messages(self.flowset, self.state, [waited]),
                              scheduled_at=self.clock() + timedelta(seconds=delay))

    async def _dead_letter(self, msg: ReceivedMessage, error: SyncError, env: ChangeEnvelope | None,
                           *, exhausted: bool = False, attempts: int | None = None) -> None:
        reason = "MAX_DELIVERY_EXCEEDED" if exhausted else error.reason
        description = error.detail if not exhausted else (
            f"failed {attempts or msg.delivery_count} attempts (SYNCLINE_MAX_DELIVERY_COUNT is "
            f"{self.max_attempts}) in {msg.delivery_count} deliveries; last error {error.reason}: {error.detail}")
        settled = await self._settle_quietly(self.queue.dead_letter, msg, reason=reason,
                                             description=description[:4000])
        if settled:
            self._settled.add(msg.sequence_number)
        if settled and (exhausted or msg.delivery_count > 1):
            self._cleared.append(msg.message_id)
        self._audit.append(AuditEntry(
            self.clock(), env.correlation_id if env else (msg.correlation_id or msg.message_id),
            env.flow if env else str(msg.application_properties.get("flow", "?")), "dead_lettered",
            env.source_system if env else "?", env.source_table if env else "?",
            env.source_key if env else msg.message_id, description[:1000], reason))
        log.warning("dead-lettered message %s (%s): %s", msg.message_id, reason, description)

    async def _settle_quietly(self, fn: Callable[..., Any], msg: ReceivedMessage, **kwargs: Any) -> bool:
        """Settle; a lost lock is logged (the message comes back) and reported as False."""
        try:
            await fn(msg, **kwargs)
        except LockLostError:
            log.warning("lock lost on message %s; it will be delivered again", msg.message_id)
            return False
        return True

    async def _renew_locks(self, current: Callable[[], Sequence[ReceivedMessage]]) -> None:
        """Keep the locks (Service Bus: their sessions' locks) of the messages the cycle holds: the batch being
        worked and the failed changes held to its end."""
        many = getattr(self.queue, "renew_many", None)
        while True:
            await asyncio.sleep(self.lock_renew_seconds)
            messages = list(current())
            if not messages:
                continue
            try:
                if many is not None:
                    with contextlib.suppress(LockLostError):
                        await many(messages)
                    continue
                for m in messages:
                    with contextlib.suppress(LockLostError):
                        await self.queue.renew_lock(m)
            except Exception as exc:  # a failed round must not end the renewals (or fail the batch)
                log.warning("lock renewal failed (%s: %s); trying again in %ss", type(exc).__name__, exc,
                            self.lock_renew_seconds)

    async def _store_report(self, report: CycleReport) -> None:
        current = await self.state.get_checkpoint(LAST_CYCLE)
        try:
            await self.state.put_checkpoint(LAST_CYCLE, json.dumps(asdict(report)),
                                            expected_etag=current.etag if current else None)
        except CheckpointConflictError:
            log.info("another controller stored its cycle report concurrently")
