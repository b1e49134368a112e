"""The report of one controller cycle (the health endpoint's "last cycle")."""

from __future__ import annotations

from dataclasses import dataclass, field

LAST_CYCLE = "controller:last_cycle"


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
