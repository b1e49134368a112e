"""Pauses: a system whose API allocation is spent is not called, and its changes wait on the queue."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta

from shared.core.controller.base import _ControllerBase
from shared.core.controller.enqueue import to_messages
from shared.core.controller.report import CycleReport
from shared.core.envelope import ChangeEnvelope, ReceivedMessage
from shared.core.errors import SyncError, ThrottledError
from shared.core.ports import CheckpointConflictError

log = logging.getLogger(__name__)

PAUSE_PREFIX = "pause:"
"""Checkpoint `pause:<system>` holds the UTC time until which Syncline must not call that system."""

PAUSE_THRESHOLD_SECONDS = 60.0
"""Throttling advice at least this long (a spent daily API allocation) pauses the system instead of retrying."""


class _Pauses(_ControllerBase):
    """The controller's pauses of throttled systems."""

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
