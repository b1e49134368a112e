"""Contract-suite builders for the embedded (SQLite) queue and state adapters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from shared.core.ports import InboundQueue
from shared.runtime.embedded import SqliteQueue, SqliteStateStore
from tests.contract.adapters import QUEUE_BUILDERS, STATE_BUILDERS, opened_states


@asynccontextmanager
async def embedded_queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    from tests.contract.conftest import FakeClock, QueueHarness

    opened: list[InboundQueue] = []

    async def make(*, lock_duration_seconds: float = 30.0, max_delivery_count: int = 3) -> QueueHarness:
        clock = FakeClock()
        queue = SqliteQueue(tmp_path / f"queue-{len(opened)}.db", lock_duration_seconds=lock_duration_seconds,
                            max_delivery_count=max_delivery_count, clock=clock)
        opened.append(queue)

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        return QueueHarness(queue, lock_duration_seconds, clock, advance)

    try:
        yield make
    finally:
        for queue in opened:
            await queue.close()


@asynccontextmanager
async def embedded_state(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    async with opened_states(lambda: SqliteStateStore(tmp_path / "state.db")) as make:
        yield make


QUEUE_BUILDERS["embedded"] = embedded_queue
STATE_BUILDERS["embedded"] = embedded_state
