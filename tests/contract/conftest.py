"""Fixtures that run the contract suites against every adapter of the queue and state ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import pytest

from shared.core.ports import InboundQueue, StateStore
from shared.runtime.sqlite_queue import SqliteQueue
from shared.runtime.sqlite_state import SqliteStateStore


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


# To add an adapter (Service Bus, Table Storage): add a param whose branch builds it, e.g. skipped unless
# its connection settings are present, and give it an `advance` that really waits.
@pytest.fixture(params=["embedded"], ids=["embedded"])
async def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueFactory]:
    opened: list[InboundQueue] = []

    async def make(*, lock_duration_seconds: float = 30.0, max_delivery_count: int = 3) -> QueueHarness:
        assert request.param == "embedded"
        clock = FakeClock()
        queue = SqliteQueue(
            tmp_path / f"queue-{len(opened)}.db",
            lock_duration_seconds=lock_duration_seconds,
            max_delivery_count=max_delivery_count,
            clock=clock,
        )
        opened.append(queue)

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        return QueueHarness(queue, lock_duration_seconds, clock, advance)

    yield make
    for queue in opened:
        await queue.close()


@pytest.fixture(params=["embedded"], ids=["embedded"])
async def state_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateFactory]:
    opened: list[StateStore] = []

    async def make() -> StateStore:
        assert request.param == "embedded"
        store = SqliteStateStore(tmp_path / "state.db")
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()
