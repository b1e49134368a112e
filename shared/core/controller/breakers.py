"""Circuit breakers per system, shared through the state store: a system that is down (or whose API allocation
is spent) is not called until one probe after its cool-down says it is back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from shared.core.breaker import (
    BREAKER_PREFIX,
    Breaker,
    BreakerPolicy,
    FailureCounter,
    closed,
    counts_against,
    opened,
    probing,
)
from shared.core.errors import EnvelopeError, MappingError, SpecError, SyncError, ThrottledError, ValidationError
from shared.core.observe import NoMetrics, SyncMetrics
from shared.core.ports import Checkpoint, CheckpointConflictError, StateStore

if TYPE_CHECKING:
    from shared.core.engine import Outcome
    from shared.mapping.spec import FlowSet

log = logging.getLogger(__name__)

PAUSE_PREFIX = "pause:"
"""The checkpoint of the pauses before breakers (`pause:<system>`, a UTC time): read once per process and system
by the controller's first cycle, and migrated into `breaker:<system>` when it still lies ahead."""

PAUSE_THRESHOLD_SECONDS = 60.0
"""Throttling advice at least this long (a spent daily API allocation) opens the breaker until then."""

PING_TIMEOUT_SECONDS = 10.0
SAME_ADVICE_SECONDS = 5.0
CLOSED_CACHE_SECONDS = 5.0
"""The webhook path trusts a closed breaker it read this recently (see `Breakers.paused_until`)."""
NOT_THE_SYSTEM = (SpecError, EnvelopeError, MappingError, ValidationError)
"""Failures decided before any call: they say nothing about the system's health."""


class Breakers:
    """Every system's breaker: read and moved by compare-and-set on `breaker:<system>`, counted in the process.

    A healthy system costs one checkpoint read per check (a batch, a webhook, a poll) and no write: failures are
    counted here and written only when they open the breaker; the probe and its outcome are the other writes.
    """

    def __init__(self, state: StateStore, *, clock: Callable[[], datetime], policy: BreakerPolicy | None = None,
                 metrics: SyncMetrics | None = None, sinks: Mapping[str, object] | None = None) -> None:
        self.state = state
        self.clock = clock
        self.policy = policy or BreakerPolicy()
        self.metrics: SyncMetrics = metrics or NoMetrics()
        self.sinks: Mapping[str, object] = sinks or {}
        """Systems whose sink has `ping()` are probed with it; the others by their first change."""
        self._counters: dict[str, FailureCounter] = {}
        self._known: dict[str, Breaker] = {}
        """The breaker of each system as this process last read or wrote it (for checks that must not read)."""
        self._probing: set[str] = set()
        """Systems whose half-open probe this process holds: its next outcome there closes or re-opens it."""
        self._legacy_checked: set[str] = set()
        self._read_at: dict[str, datetime] = {}
        """When this process last read each system's breaker (the webhook path's short trust in a closed one)."""

    async def get(self, system: str) -> Breaker:
        """The system's breaker as stored now (one read; never probes)."""
        return (await self._read(system))[0]

    async def _read(self, system: str) -> tuple[Breaker, Checkpoint | None]:
        point = await self.state.get_checkpoint(BREAKER_PREFIX + system)
        breaker = Breaker.from_json(point.value) if point is not None else Breaker()
        self._known[system] = breaker
        self._read_at[system] = self.clock()
        return breaker, point

    async def migrate_pauses(self, systems: Sequence[str]) -> None:
        """Turn the `pause:<system>` rows of earlier versions that still lie ahead into open breakers.

        Once per process and system, from the controller's cycle (never in the per-batch checks, which stay one
        read per system); the old rows are left as they are, and read by nothing else."""
        for system in systems:
            if system not in self._legacy_checked:
                self._legacy_checked.add(system)
                await self._migrate_pause(system)

    async def _migrate_pause(self, system: str) -> None:
        legacy = await self.state.get_checkpoint(PAUSE_PREFIX + system)
        try:
            until = datetime.fromisoformat(legacy.value) if legacy and legacy.value else None
        except ValueError:
            until = None
        if until is None or until <= self.clock():
            return
        breaker = opened(None, self.clock(), "API allocation spent (migrated pause)", 0, self.policy, until=until)
        with contextlib.suppress(CheckpointConflictError):  # a breaker stored meanwhile wins
            await self.state.put_checkpoint(BREAKER_PREFIX + system, breaker.to_json(), expected_etag=None)

    def local_until(self, system: str) -> datetime | None:
        """Until when `system` is not called, as this process last knew it (no state read)."""
        if system in self._probing:
            return None
        known = self._known.get(system)
        return known.blocked_until(self.clock()) if known is not None else None

    async def paused_until(self, system: str, *, max_age_seconds: float = 0.0) -> datetime | None:
        """THE question before calling `system`: None means "call it now"; otherwise not before the time returned.

        When the cool-down is over, the caller that wins the compare-and-set to half-open probes: with the
        system's ping when its sink has one (its answer closes or re-opens the breaker before this returns),
        else its own first call is the probe (report its outcome through `record` or `observe`).

        `max_age_seconds`: a breaker this process read as closed that recently is taken as still closed, without a
        read (the webhook path: one read per system every few seconds, not one per webhook; another instance's
        opening is seen that much later, and this instance's own at once)."""
        now = self.clock()
        seen = self._read_at.get(system)
        known = self._known.get(system)
        if max_age_seconds > 0 and seen is not None and known is not None and known.state == "closed" and \
                system not in self._probing and (now - seen).total_seconds() < max_age_seconds:
            return None
        breaker, point = await self._read(system)
        if system in self._probing:
            if breaker.state == "half_open" and breaker.probe_at is not None and breaker.probe_at > now:
                return None  # our probe (the first change) is under way
            self._probing.discard(system)  # our lease ran out without an outcome, or another instance moved it
        until = breaker.blocked_until(now)
        if until is not None or breaker.state == "closed":
            return until
        held = probing(breaker, now, self.policy)
        try:
            await self.state.put_checkpoint(BREAKER_PREFIX + system, held.to_json(),
                                            expected_etag=point.etag if point else None)
        except CheckpointConflictError:
            # Another instance took the probe (or moved the breaker): wait for its outcome.
            again, _ = await self._read(system)
            return again.blocked_until(self.clock()) or (held.probe_at if again.state != "closed" else None)
        self._known[system] = held
        self._probing.add(system)
        log.info("circuit breaker of %s half-open: probing after %s", system, breaker.cause or "a pause")
        self.metrics.record_breaker(system, "half_open")
        ping = getattr(self.sinks.get(system), "ping", None)
        if ping is None:
            return None
        try:
            await asyncio.wait_for(ping(), timeout=PING_TIMEOUT_SECONDS)
        except (SyncError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError) or counts_against(exc):
                return await self.trip(system, f"probe failed: {str(exc)[:200] or type(exc).__name__}")
        except Exception as exc:  # an unexpected fault of the probe is a failed probe, never a crash of the caller
            return await self.trip(system, f"probe failed: {type(exc).__name__}")
        await self._close(system, "probe ping answered")
        return None

    async def record(self, system: str, *, failed: bool, cause: str = "") -> None:
        """One call's outcome: counted in the process; opens, closes or re-opens the breaker when it must."""
        if system in self._probing:
            if failed:
                await self.trip(system, f"probe failed: {cause}")
            else:
                await self._close(system, "probe call succeeded")
            return
        counter = self._counters.setdefault(system, FailureCounter(self.policy))
        counter.policy = self.policy
        why = counter.record(self.clock(), failed=failed)
        if why is not None:
            await self.trip(system, f"{why}; last: {cause[:200]}", failures=counter.failures())

    async def observe(self, outcomes: Sequence[Outcome], flowset: FlowSet) -> None:
        """Count one engine batch against the systems it called: one call per system, as a write call is.

        A system that answered any change of the batch is up (the failures of the others are theirs: a record
        stuck behind a plug-in must dead-letter, not open the breaker for everyone); one whose every call failed
        retriably (outage, 5xx, timeout, throttling) counts one failure."""
        answered: set[str] = set()
        failed: dict[str, str] = {}
        for outcome in outcomes:
            try:
                flow = flowset.flow(outcome.envelope.flow)
            except SyncError:
                continue
            error = outcome.error
            if outcome.status in ("written", "deleted"):
                answered.add(flow.target.system)
            elif outcome.status == "failed" and error is not None:
                system = failing_system(flow.source.system, flow.target.system, error)
                if isinstance(error, ThrottledError) and (error.retry_after or 0) >= PAUSE_THRESHOLD_SECONDS:
                    # A spent allocation: open at once, until the system's own advice.
                    await self.trip(system, f"API allocation spent (retry after {error.retry_after:.0f}s)",
                                    until=self.clock() + timedelta(seconds=error.retry_after or 0))
                elif counts_against(error):
                    failed.setdefault(system, str(error))
                elif not error.retriable and not isinstance(error, NOT_THE_SYSTEM):
                    answered.add(flow.target.system)  # it answered: refusing a record is health
        for system in sorted(answered | set(failed)):
            await self.record(system, failed=system not in answered, cause=failed.get(system, ""))

    async def trip(self, system: str, cause: str, *, failures: int = 0, until: datetime | None = None) -> datetime:
        """Open the breaker (for the cool-down, or `until` the system's own advice); returns the probe time."""
        now = self.clock()

        def already(breaker: Breaker | None) -> bool:
            # Open already, at least as long (advice a few seconds apart is the same advice): nothing to write.
            return breaker is not None and breaker.state == "open" and breaker.probe_at is not None and \
                breaker.probe_at > now and system not in self._probing and \
                (until is None or breaker.probe_at >= until - timedelta(seconds=SAME_ADVICE_SECONDS))

        known = self._known.get(system)
        if already(known):
            assert known is not None
            assert known.probe_at is not None
            return known.probe_at  # this process opened it (or saw it open) moments ago: no read, no write
        for _ in range(3):
            breaker, point = await self._read(system)
            if already(breaker):
                assert breaker.probe_at is not None
                return breaker.probe_at  # another instance opened it already
            new = opened(breaker, now, cause, failures, self.policy, until=until)
            try:
                await self.state.put_checkpoint(BREAKER_PREFIX + system, new.to_json(),
                                                expected_etag=point.etag if point else None)
            except CheckpointConflictError:
                continue
            break
        else:
            return (await self.get(system)).probe_at or now
        assert new.probe_at is not None
        self._known[system] = new
        self._probing.discard(system)
        self._counters.pop(system, None)
        log.warning("circuit breaker of %s opened until %s: %s; its changes wait on the queue", system,
                    new.probe_at.isoformat(), cause)
        self.metrics.record_breaker(system, "open")
        return new.probe_at

    async def _close(self, system: str, cause: str) -> None:
        self._probing.discard(system)
        self._counters.pop(system, None)
        breaker, point = await self._read(system)
        if breaker.state == "closed":
            return
        new = closed(self.clock(), cause)
        try:
            await self.state.put_checkpoint(BREAKER_PREFIX + system, new.to_json(),
                                            expected_etag=point.etag if point else None)
        except CheckpointConflictError:
            await self._read(system)
            return  # moved meanwhile (re-opened by another instance's failure): that state stands
        self._known[system] = new
        log.info("circuit breaker of %s closed: %s", system, cause)
        self.metrics.record_breaker(system, "closed")

    async def close(self, system: str, cause: str = "closed by an operator") -> None:
        """Close the breaker now (an operator knows the system is back)."""
        await self._close(system, cause)

    async def snapshot(self, systems: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Each system's breaker for /api/health and `syncline status` (reads only; never probes)."""
        out: dict[str, dict[str, Any]] = {}
        for system in systems:
            b = await self.get(system)
            out[system] = {"state": b.state, "since": b.since.isoformat() if b.since else None,
                           "cause": b.cause, "failures": b.failures,
                           "probe_at": b.probe_at.isoformat() if b.probe_at and b.state != "closed" else None}
        return out


def failing_system(source: str, target: str, error: SyncError) -> str:
    """The system a failure came from: the one its detail names first (connectors prefix it), else the target."""
    detail = error.detail.lower()
    for system in (target, source):
        if detail.startswith(system.lower()):
            return system
    return target
