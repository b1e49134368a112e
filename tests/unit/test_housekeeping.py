"""The controller prunes dedup keys past their retention once a day (the dedup table must not grow for ever)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from shared.core.controller import DEDUP_RETENTION, HOUSEKEEPING, Controller
from shared.core.engine import SyncEngine
from shared.mapping.spec import load_spec
from shared.runtime.embedded import SqliteQueue, SqliteStateStore

SPEC = load_spec(Path(__file__).resolve().parents[2] / "flows" / "dot-signs.yaml")


async def test_dedup_keys_older_than_the_retention_are_dropped_once_a_day(tmp_path):
    now = [datetime.now(UTC)]
    state = SqliteStateStore(":memory:")
    queue = SqliteQueue(tmp_path / "queue.db", name="inbound", clock=lambda: now[0])
    controller = Controller(SPEC, engine=SyncEngine(SPEC, sinks={}, state=state), queue=queue, state=state,
                            sources={}, clock=lambda: now[0])
    try:
        await state.remember("enqueued", ["m-1"])
        first = await controller.run_cycle()
        assert first.outcome == "ok"
        assert await state.remember("enqueued", ["m-1"]) == {"m-1"}  # within the retention: kept

        now[0] += DEDUP_RETENTION + timedelta(days=1)
        await state.remember("enqueued", ["m-2"])  # remembered "today" in real time, i.e. long before now[0]
        await controller.run_cycle()
        assert await state.remember("enqueued", ["m-1", "m-2"]) == set()  # both past the retention: dropped
        marked = await state.get_checkpoint(HOUSEKEEPING)
        assert marked is not None
        assert datetime.fromisoformat(marked.value) == now[0]

        # the same day again: no second pruning
        await state.remember("enqueued", ["m-3"])
        now[0] += timedelta(hours=2)
        await controller.run_cycle()
        assert await state.remember("enqueued", ["m-3"]) == {"m-3"}
    finally:
        await state.close()


async def test_failed_attempt_counts_past_the_retention_are_dropped_with_the_dedup_keys(tmp_path):
    now = [datetime.now(UTC)]
    state = SqliteStateStore(":memory:")
    queue = SqliteQueue(tmp_path / "queue.db", name="inbound", clock=lambda: now[0])
    controller = Controller(SPEC, engine=SyncEngine(SPEC, sinks={}, state=state), queue=queue, state=state,
                            sources={}, clock=lambda: now[0])
    try:
        # a message the queue's backstop dead-lettered itself: nobody settled it, so its count stayed behind
        await state.record_failures(["orphan"])
        await controller.run_cycle()
        assert await state.record_failures(["orphan"]) == {"orphan": 2}  # within the retention: kept

        now[0] += DEDUP_RETENTION + timedelta(days=1)
        await controller.run_cycle()
        assert await state.record_failures(["orphan"]) == {"orphan": 1}  # dropped, counting starts afresh
    finally:
        await queue.close()
        await state.close()
