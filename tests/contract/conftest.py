"""Fixtures that run the contract suites against every adapter of the queue and state ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import pytest

from shared.core.ports import InboundQueue, StateStore


class FakeClock:
    """A clock that only moves when told to, so lock expiry and schedules need no sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class QueueHarness:
    """A queue under test plus the means to move its time (a fake clock here, real waiting on a broker)."""

    queue: InboundQueue
    lock_duration_seconds: float
    now: Callable[[], datetime]
    advance: Callable[[float], Awaitable[None]]


class QueueFactory(Protocol):
    """Makes a fresh, empty queue with the given entity settings."""

    def __call__(
        self, *, lock_duration_seconds: float = ..., max_delivery_count: int = ...
    ) -> Awaitable[QueueHarness]: ...


StateFactory = Callable[[], Awaitable[StateStore]]
"""Each call opens one more client on the same, initially empty, backing store of the test."""


# Each adapter set registers a builder in tests/contract/adapters/ (one module per backend); a builder
# returns None when its backend is not available here, and its params are then skipped with the reason.
from tests.contract.adapters import QUEUE_BUILDERS, STATE_BUILDERS  # noqa: E402


@pytest.fixture(params=sorted(QUEUE_BUILDERS), ids=sorted(QUEUE_BUILDERS))
async def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueFactory]:
    builder = QUEUE_BUILDERS[request.param]
    async with builder(request, tmp_path) as make:
        yield make


@pytest.fixture(params=sorted(STATE_BUILDERS), ids=sorted(STATE_BUILDERS))
async def state_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateFactory]:
    builder = STATE_BUILDERS[request.param]
    async with builder(request, tmp_path) as make:
        yield make
