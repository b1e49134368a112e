"""Polling change feeds into the queue, and the daily pruning of the dedup keys enqueuing leaves."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from shared.core.breaker import counts_against
from shared.core.controller.base import _ControllerBase
from shared.core.controller.breakers import PAUSE_THRESHOLD_SECONDS
from shared.core.controller.enqueue import drop_duplicates, envelopes_for, remember_enqueued, to_messages
from shared.core.errors import SyncError, ThrottledError
from shared.core.ports import AuditEntry, ChangeSource, CheckpointConflictError

log = logging.getLogger(__name__)

HOUSEKEEPING = "controller:housekeeping"
"""Checkpoint: when dedup keys were last pruned (once a day)."""

DEDUP_RETENTION = timedelta(days=14)
"""Dedup keys older than this are dropped: change streams redeliver within 72 h and retries end within days."""


class _Polling(_ControllerBase):
    """The controller's polling of change feeds and its housekeeping."""

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
            until = await self.paused_until(system)
            if until is not None:
                log.info("poll of %s %s skipped: its circuit breaker is open until %s", system, table,
                         until.isoformat())
                self._current_report.paused[system] = until.isoformat()
                continue
            try:
                total += await self._poll_table(system, table, source)
            except ThrottledError as exc:
                if (exc.retry_after or 0) >= PAUSE_THRESHOLD_SECONDS:
                    # The allocation is spent: opening the breaker keeps the remaining polls and drains off it.
                    await self._pause(system, exc.retry_after or 0, self._current_report)
                    continue
                self._poll_failed(system, table, exc)
                await self.breakers.record(system, failed=True, cause=str(exc))
            except SyncError as exc:
                self._poll_failed(system, table, exc)
                if counts_against(exc):
                    await self.breakers.record(system, failed=True, cause=str(exc))
            else:
                await self.breakers.record(system, failed=False)
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
                               "origin poll (change feed)") for e in envelopes])
            total += len(envelopes)
            try:
                etag = (await self.state.put_checkpoint(name, next_checkpoint, expected_etag=etag)).etag
            except CheckpointConflictError:
                log.warning("checkpoint %s moved by another controller; stopping this poll", name)
                break
            if self.progress:
                self.progress("poll", len(envelopes))
        return total

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
