"""What every part of the controller shares: its configuration and the bookkeeping of the cycle under way."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from shared.core.controller.report import CycleReport
from shared.core.engine import SyncEngine
from shared.core.envelope import ChangeEnvelope, ReceivedMessage
from shared.core.errors import SyncError
from shared.core.observe import SyncMetrics
from shared.core.ports import AuditEntry, ChangeSource, InboundQueue, StateStore
from shared.mapping.spec import FlowSet

if TYPE_CHECKING:
    from shared.core.controller.breakers import Breakers


class _ControllerBase:
    """The controller's state (set by `Controller.__init__`); each concern of the controller is a mixin over it."""

    flowset: FlowSet
    engine: SyncEngine
    queue: InboundQueue
    state: StateStore
    sources: Mapping[str, ChangeSource]
    batch_size: int
    lock_renew_seconds: float
    clock: Callable[[], datetime]
    parent_wait_seconds: float
    progress: Callable[[str, int], None] | None
    metrics: SyncMetrics
    api_calls: Callable[[], Mapping[str, int]] | None
    max_attempts: int
    busy_retry_seconds: float
    max_held: int
    breakers: Breakers
    _held: list[ReceivedMessage]
    _in_flight: list[ReceivedMessage]
    _prefetched: list[ReceivedMessage]
    _clear_after_complete: list[str]
    _audit: list[AuditEntry]
    _seen: set[int]
    _settled: set[int]
    _cleared: list[str]
    _current_report: CycleReport

    if TYPE_CHECKING:
        # Implemented by the mixin of each concern; declared here so the others can call them.
        async def paused_until(self, system: str) -> datetime | None: ...

        async def _pause(self, system: str, seconds: float, report: CycleReport) -> datetime: ...

        def _throttled_system(self, env: ChangeEnvelope, error: SyncError) -> str: ...

        async def _reschedule(self, env: ChangeEnvelope, at: datetime) -> None: ...

        async def _settle_quietly(self, fn: Callable[..., Any], msg: ReceivedMessage, **kwargs: Any) -> bool: ...
