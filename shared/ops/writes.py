"""Where an accepted change goes: a direct write to its target now, or the inbound queue; and the initial load."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.bootstrap import Services
from shared.core.controller import ENQUEUED, envelopes_for, split_duplicates, to_messages
from shared.core.controller.breakers import CLOSED_CACHE_SECONDS
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import AuthError, SyncError, TransientError
from shared.core.ports import AuditEntry

log = logging.getLogger(__name__)


@dataclass
class IntakeResult:
    """What a webhook invocation did, returned to the caller as JSON."""

    accepted: int = 0
    written: int = 0
    skipped: int = 0
    queued: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    correlation_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "written": self.written, "skipped": self.skipped,
                "queued": self.queued, "statuses": self.statuses, "correlation_id": self.correlation_id}


AUTH_RETRY_SECONDS = 120
"""Delay before the queue retries a direct write refused for credentials (time for a rotation to land)."""


async def enqueue_new(services: Services, envelopes: list[ChangeEnvelope], *,
                      delay_seconds: float = 0) -> list[ChangeEnvelope]:
    """Enqueue the envelopes whose change was never enqueued before; returns those sent.

    The message ids are remembered only once the messages are durably on the queue, so a failed send (or a
    crash before it) leaves nothing behind (a claim is not a remembered key) and the sender's retry goes
    through. Two deliveries racing past the check both enqueue: harmless, the engine finds the second one a no-op.
    """
    if not envelopes:
        return []
    known = await services.state.claim(ENQUEUED, [e.message_id() for e in envelopes])
    fresh, dropped = split_duplicates(envelopes, known, datetime.now(UTC))
    if fresh:
        await enqueue(services, fresh, delay_seconds=delay_seconds)
        await services.state.confirm(ENQUEUED, [e.message_id() for e in fresh])
    if dropped:
        await services.state.append_audit(dropped)
    return fresh


async def enqueue(services: Services, envelopes: list[ChangeEnvelope], *, delay_seconds: float = 0) -> None:
    """Put envelopes on the inbound queue (optionally scheduled) and audit it."""
    when = datetime.now(UTC) + timedelta(seconds=delay_seconds) if delay_seconds > 0 else None
    messages = await to_messages(services.flowset, services.state, envelopes)
    try:
        await services.queue.send(messages, scheduled_at=when)
    except Exception as exc:  # the queue is down: nothing was accepted, the sender must try again (503)
        log.error("the inbound queue refused %d message(s): %s", len(messages), type(exc).__name__, exc_info=exc)
        raise TransientError(f"the inbound queue is unavailable ({type(exc).__name__}); nothing was accepted, "
                             "send the change again") from exc
    now = datetime.now(UTC)
    await services.state.append_audit([
        AuditEntry(now, e.correlation_id, e.flow, "enqueued", e.source_system, e.source_table, e.source_key,
                   f"origin {e.origin}" + (f", due in {delay_seconds:.0f}s" if delay_seconds else ""))
        for e in envelopes])


async def write_direct(services: Services, envelopes: list[ChangeEnvelope], result: IntakeResult) -> None:
    """Outbound direct write with short inline retries; leftovers go to the queue (never lost).

    Whatever the failure (a target's refusal, our credentials refused after a refresh, even a fault of ours),
    the change ends up on the queue; only a queue that cannot take it makes the caller answer 503.
    """
    pending = envelopes
    statuses: Counter[str] = Counter()
    for attempt in range(services.settings.syncline_inline_retries + 1):
        pending = await _hold_for_breakers(services, pending, result, statuses)
        if not pending:
            break
        try:
            outcomes = await services.engine.process(pending)
        except Exception as exc:  # a fault of ours must not lose the change: the queue keeps it
            log.error("direct write failed unexpectedly (%s); the changes go to the queue", type(exc).__name__,
                      exc_info=exc)
            for env in pending:
                await enqueue(services, [env.model_copy(update={"origin": "resubmit"})], delay_seconds=30)
                result.queued += 1
                statuses["failed"] += 1
            break
        services.metrics.record_outcomes(outcomes, services.flowset)
        await services.controller.breakers.observe(outcomes, services.flowset)
        retry: list[ChangeEnvelope] = []
        for o in outcomes:
            statuses[o.status] += 1
            if o.status in ("written", "deleted"):
                result.written += 1
            elif o.status in ("skipped_echo", "skipped_noop"):
                result.skipped += 1
            elif o.status == "failed" and o.error is not None and o.error.retriable and \
                    not isinstance(o.error, AuthError) and attempt < services.settings.syncline_inline_retries:
                # Credentials refused after a refresh will not heal in a second: those wait on the queue instead.
                retry.append(o.envelope)
            else:
                env = o.envelope.model_copy(update={"origin": "resubmit"})
                delay = _queue_delay(o.status, o.error)
                # A breaker this outcome (or an earlier one) opened: the change waits for its probe.
                opened = [t for system in _systems(services, env)
                          if (t := services.controller.breakers.local_until(system)) is not None]
                if opened and o.status == "failed" and o.error is not None and o.error.retriable:
                    delay = max(delay, (max(opened) - datetime.now(UTC)).total_seconds())
                await enqueue(services, [env], delay_seconds=delay)
                result.queued += 1
        if not retry:
            break
        pending = retry
        await asyncio.sleep(0.2 * (attempt + 1))
    for name, count in statuses.items():
        result.statuses[name] = result.statuses.get(name, 0) + count
    services.metrics.record_api_call_totals(services.counter.snapshot())


async def _hold_for_breakers(services: Services, envelopes: list[ChangeEnvelope], result: IntakeResult,
                             statuses: Counter[str]) -> list[ChangeEnvelope]:
    """Changes whose flow calls a system with an open breaker go to the queue, scheduled for its probe time,
    without calling it; returns the others. (A probe that is due is taken here: see `Breakers.paused_until`.)"""
    systems = {s for e in envelopes for s in _systems(services, e)}
    until = {s: await services.controller.breakers.paused_until(s, max_age_seconds=CLOSED_CACHE_SECONDS)
             for s in sorted(systems)}
    keep: list[ChangeEnvelope] = []
    now = datetime.now(UTC)
    for env in envelopes:
        waits = [t for s in _systems(services, env) if (t := until[s]) is not None]
        if not waits:
            keep.append(env)
            continue
        delay = max((max(waits) - now).total_seconds(), 1.0)
        await enqueue(services, [env.model_copy(update={"origin": "resubmit"})], delay_seconds=delay)
        result.queued += 1
        statuses["held"] += 1
    return keep


def _systems(services: Services, env: ChangeEnvelope) -> tuple[str, ...]:
    try:
        flow = services.flowset.flow(env.flow)
    except SyncError:
        return ()  # the engine reports the unknown flow
    return (flow.target.system, flow.source.system)


def _queue_delay(status: str, error: SyncError | None) -> float:
    """When the queue should try a change the direct write left over.

    Deferred (parent pending) and permanent failures go now: the controller re-checks the parent or
    dead-letters with the reason. Transient failures wait a little; credentials refused even after a token
    refresh wait longer (a secret rotation or a consent takes minutes to land), then the controller tries
    again like any delivery, so only a sustained refusal dead-letters it (AUTH_FAILED, alarmed on).
    """
    if status != "failed" or error is None:
        return 0
    if isinstance(error, AuthError):
        return AUTH_RETRY_SECONDS
    return 30 if error.retriable else 0


async def initial_load(services: Services, *, progress: Callable[[str, int], None] | None = None) -> IntakeResult:
    """Push every record of the direct flows' source tables through the engine, parents first.

    This is the bulk form of the outbound direct write (first go-live, or after a long outage): the
    same engine, batched; anything that fails lands on the queue exactly like a webhook would.
    """
    result = IntakeResult()
    flows = sorted((f for f in services.flowset.flows if f.mode == "direct"), key=services.flowset.depth)
    for flow in flows:
        source = services.sources.get(flow.source.system)
        if source is None:
            continue
        async for page in source.scan(flow.source.table):
            envelopes = [e for e in envelopes_for(services.flowset, flow.source.system, flow.source.table, page,
                                                  origin="initial", mode="direct") if e.flow == flow.name]
            for start in range(0, len(envelopes), services.settings.syncline_batch_size):
                chunk = envelopes[start:start + services.settings.syncline_batch_size]
                result.accepted += len(chunk)
                await write_direct(services, chunk, result)
                if progress:
                    progress(flow.name, len(chunk))
    return result
