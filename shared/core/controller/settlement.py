"""Settling messages by their outcomes: complete, retry, defer, reschedule or dead-letter, with the ledger."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from shared.core.breaker import counts_against
from shared.core.controller.base import _ControllerBase
from shared.core.controller.breakers import PAUSE_THRESHOLD_SECONDS
from shared.core.controller.enqueue import to_messages
from shared.core.controller.report import CycleReport
from shared.core.engine import Outcome
from shared.core.envelope import ChangeEnvelope, ReceivedMessage
from shared.core.errors import RecordBusyError, SyncError, ThrottledError
from shared.core.ports import AuditEntry, LockLostError

log = logging.getLogger(__name__)

BUSY_RETRY_SECONDS = 5.0
"""A change whose record another process is writing (RECORD_BUSY) is tried again this much later."""


class _Settlement(_ControllerBase):
    """The controller's settling of messages and its ledger of them."""

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
            elif (probe_at := self._breaker_until(env, error)) is not None:
                # Its system's breaker is open (this failure may have opened it): the change waits for the probe,
                # scheduled, with no failed attempt counted; an outage never dead-letters a change.
                report.paused.setdefault(self._throttled_system(env, error), probe_at.isoformat())
                await self._reschedule(env, probe_at)
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

    def _breaker_until(self, env: ChangeEnvelope, error: SyncError) -> datetime | None:
        """The probe time of the open breaker of the system a retriable failure came from (None: not open)."""
        if not counts_against(error):
            return None
        try:
            system = self._throttled_system(env, error)
        except SyncError:
            return None
        return self.breakers.local_until(system)

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
        # A repair stays a repair: its origin is what makes the engine write past the snapshots that say in sync.
        waited = env.model_copy(update={"waits": env.waits + 1,
                                        "origin": "reconcile" if env.origin == "reconcile" else "resubmit"})
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

    async def _settle_quietly(self, fn: Callable[..., Any], msg: ReceivedMessage, **kwargs: Any) -> bool:
        """Settle; a lost lock is logged (the message comes back) and reported as False."""
        try:
            await fn(msg, **kwargs)
        except LockLostError:
            log.warning("lock lost on message %s; it will be delivered again", msg.message_id)
            return False
        return True
