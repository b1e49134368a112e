"""The controller's cycle: poll, drain the queue batch by batch through the engine, settle, report the cycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from shared.core.breaker import BreakerPolicy
from shared.core.controller.breakers import Breakers
from shared.core.controller.enqueue import POLL_HINT
from shared.core.controller.locks import MAX_HELD, _Locks
from shared.core.controller.parking import _Breakers
from shared.core.controller.polling import _Polling
from shared.core.controller.report import LAST_CYCLE, CycleReport
from shared.core.controller.settlement import BUSY_RETRY_SECONDS, _Settlement
from shared.core.engine import Outcome, SyncEngine, isolate, with_detail
from shared.core.envelope import ChangeEnvelope, ReceivedMessage
from shared.core.errors import EnvelopeError, SyncError, TransientError
from shared.core.observe import NoMetrics, SyncMetrics, correlated
from shared.core.ports import (
    ATTACHMENTS_KEY,
    AuditEntry,
    ChangeSource,
    CheckpointConflictError,
    InboundQueue,
    SourceRecord,
    StateStore,
)
from shared.mapping.spec import FlowSet

log = logging.getLogger(__name__)

STALE_ROUNDS = 3
"""Receives in a row that bring only changes tried already this cycle (lost locks) before the drain stops."""


class Controller(_Polling, _Breakers, _Settlement, _Locks):
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
        metrics: SyncMetrics | None = None,
        api_calls: Callable[[], Mapping[str, int]] | None = None,
        max_attempts: int | None = None,
        busy_retry_seconds: float = BUSY_RETRY_SECONDS,
        max_held: int = MAX_HELD,
        breaker_policy: BreakerPolicy | None = None,
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
        self.metrics = metrics or NoMetrics()
        self.api_calls = api_calls
        self.max_attempts = max_attempts or queue.max_delivery_count
        """Failed attempts (SYNCLINE_MAX_DELIVERY_COUNT) before a change is dead-lettered; the queue's own max
        delivery count is a higher backstop, so locks lost to crashed processes never dead-letter a change."""
        self.busy_retry_seconds = busy_retry_seconds
        self.max_held = max_held
        # The breakers read the controller's clock when they run (tests and the demo move it).
        self.breakers = Breakers(state, clock=lambda: self.clock(), policy=breaker_policy, metrics=self.metrics,
                                 sinks=engine.sinks)
        """Each system's circuit breaker (`paused_until` is the one question before calling a system)."""
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

    async def run_cycle(self, *, poll: bool = True, max_messages: int | None = None) -> CycleReport:
        """Poll (backfill) and drain once; the report is stored for /api/health."""
        started = time.monotonic()
        report = CycleReport(started_at=self.clock().isoformat())
        self._current_report = report
        try:
            await self.breakers.migrate_pauses(sorted({s for f in self.flowset.flows
                                                      for s in (f.source.system, f.target.system)}))
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
                # A breaker opened by an earlier group of this batch holds this group's changes too.
                group = await self._hold_paused(group, report, statuses, to_complete, local=True)
                outcomes = await self.engine.process([env for _, env in group]) if group else []
                self.metrics.record_outcomes(outcomes, self.flowset)
                await self.breakers.observe(outcomes, self.flowset)
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

    async def _refresh_replays(
        self, parsed: list[tuple[ReceivedMessage, ChangeEnvelope]]
    ) -> tuple[list[tuple[ReceivedMessage, ChangeEnvelope]], list[tuple[ReceivedMessage, ChangeEnvelope, SyncError]]]:
        """Replayed, resubmitted and repair changes are applied with the source record as it is now.

        A replay follows an operator's fix; a resubmission (a deferred or failed direct write) may have been
        overtaken by newer edits meanwhile — writing the current state keeps a late copy from undoing them.
        The message body stays as evidence; only the payload used for this attempt is fresh.
        Returns the changes to process and, apart, those whose record could not be read (with the error):
        a key the source refuses fails its own messages only, never the batch.
        """
        wanted: dict[tuple[str, str], set[str]] = {}
        for _, env in parsed:
            if env.origin in ("replay", "resubmit", "reconcile") and env.operation != "delete" \
                    and env.source_system in self.sources:
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

    async def _store_report(self, report: CycleReport) -> None:
        current = await self.state.get_checkpoint(LAST_CYCLE)
        try:
            await self.state.put_checkpoint(LAST_CYCLE, json.dumps(asdict(report)),
                                            expected_etag=current.etag if current else None)
        except CheckpointConflictError:
            log.info("another controller stored its cycle report concurrently")
