"""Parking: changes for a system whose circuit breaker is open wait on the queue, scheduled for its probe time."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

from shared.core.controller.base import _ControllerBase
from shared.core.controller.breakers import failing_system
from shared.core.controller.enqueue import to_messages
from shared.core.controller.report import CycleReport
from shared.core.envelope import ChangeEnvelope, ReceivedMessage
from shared.core.errors import SyncError


class _Breakers(_ControllerBase):
    """The controller's use of the breakers: changes for a system that may not be called wait, scheduled."""

    async def paused_until(self, system: str) -> datetime | None:
        """When `system` may be called again, or None if it may be called now (see `Breakers.paused_until`)."""
        return await self.breakers.paused_until(system)

    async def _pause(self, system: str, seconds: float, report: CycleReport) -> datetime:
        """A spent allocation (long throttling advice): the breaker opens at once, until the advised time."""
        until = await self.breakers.trip(system, f"API allocation spent (retry after {seconds:.0f}s)",
                                         until=self.clock() + timedelta(seconds=seconds))
        report.paused[system] = until.isoformat()
        return until

    def _throttled_system(self, env: ChangeEnvelope, error: SyncError) -> str:
        flow = self.flowset.flow(env.flow)
        return failing_system(flow.source.system, flow.target.system, error)

    async def _hold_paused(self, parsed: list[tuple[ReceivedMessage, ChangeEnvelope]], report: CycleReport,
                           statuses: Counter[str], to_complete: list[ReceivedMessage], *, local: bool = False,
                           ) -> list[tuple[ReceivedMessage, ChangeEnvelope]]:
        """Park changes whose flow calls a system that may not be called (target, or source for lines and id
        write-back), scheduled for its probe time: completed and sent again, no failed attempt counted.

        `local`: decide by what this process knows already (between the flow groups of a batch), without reads."""
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
                    pauses[system] = (self.breakers.local_until(system) if local
                                      else await self.paused_until(system))
                found = pauses[system]
                if found is not None:
                    until = found if until is None else max(until, found)
                    report.paused[system] = found.isoformat()
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
