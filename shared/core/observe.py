"""The core's observability port: the metrics it reports and the correlation id of the change in hand."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shared.core.controller.report import CycleReport
    from shared.core.engine.outcome import Outcome
    from shared.mapping.spec import FlowSet

_correlation_id: ContextVar[str | None] = ContextVar("syncline_correlation_id", default=None)


def current_correlation_id() -> str | None:
    """The correlation id of the change being processed in this task, if exactly one applies."""
    return _correlation_id.get()


@contextlib.contextmanager
def correlated(ids: Iterable[str | None]) -> Iterator[str | None]:
    """Scope the correlation id for logs and outbound requests when every change in scope shares one.

    A batch mixing several changes has no single id: the outer scope (if any) is kept rather than
    attributing every line to one arbitrary change.
    """
    distinct = {i for i in ids if i}
    if len(distinct) != 1:
        yield _correlation_id.get()
        return
    (cid,) = distinct
    token = _correlation_id.set(cid)
    try:
        yield cid
    finally:
        _correlation_id.reset(token)


class SyncMetrics(Protocol):
    """What the controller and the intake report; the telemetry adapter exports it, the default drops it."""

    def record_outcomes(self, outcomes: Sequence[Outcome], flowset: FlowSet) -> None:
        """Records synced per flow/direction and failures per reason of one engine batch."""
        ...

    def record_failures(self, reasons: Mapping[str, int]) -> None:
        """Failures by reason code that are not engine outcomes (an unparseable message)."""
        ...

    def record_cycle(self, report: CycleReport, dead_letter_depth: int | None) -> None:
        """A finished controller cycle and the dead-letter depth after it."""
        ...

    def record_api_call_totals(self, totals: Mapping[str, int]) -> None:
        """Running per-system HTTP request totals; the implementation records their increase."""
        ...

    def record_drift(self, flow: str, count: int) -> None:
        """The drift one reconciliation found in one flow (0 once repaired): what the drift alert watches."""
        ...

    def record_breaker(self, system: str, state: str) -> None:
        """A system's circuit breaker moved to `state` ("open", "half_open", "closed")."""
        ...


class NoMetrics:
    """The metrics of a core built without telemetry: every recording is dropped."""

    def record_outcomes(self, outcomes: Sequence[Outcome], flowset: FlowSet) -> None:
        return None

    def record_failures(self, reasons: Mapping[str, int]) -> None:
        return None

    def record_cycle(self, report: CycleReport, dead_letter_depth: int | None) -> None:
        return None

    def record_api_call_totals(self, totals: Mapping[str, int]) -> None:
        return None

    def record_drift(self, flow: str, count: int) -> None:
        return None

    def record_breaker(self, system: str, state: str) -> None:
        return None
