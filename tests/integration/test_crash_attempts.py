"""Killing the controller (`kill -9`) again and again mid-drain never dead-letters a good change: lost locks are
not failed attempts, so messages delivered more often than SYNCLINE_MAX_DELIVERY_COUNT still go through."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

from shared.ops import initial_load
from tests.integration.test_crash_recovery import controller_process

ATTEMPTS = 3
KILLS = 2 * ATTEMPTS


def watch_delivery_counts(state_dir: str) -> None:
    """Keep the highest delivery count any message reached: a completed message's row is deleted, and a message
    redelivered by the kills may well be completed by a later run before the count is read."""
    with sqlite3.connect(Path(state_dir) / "queue.db") as db:
        db.executescript("""
        CREATE TABLE IF NOT EXISTS test_deliveries (seq INTEGER PRIMARY KEY, max_count INTEGER NOT NULL);
        CREATE TRIGGER IF NOT EXISTS test_delivery_count AFTER UPDATE OF delivery_count ON queue_messages
        BEGIN
          INSERT INTO test_deliveries (seq, max_count) VALUES (NEW.seq, NEW.delivery_count)
          ON CONFLICT (seq) DO UPDATE SET max_count = max(max_count, excluded.max_count);
        END;
        """)


def highest_delivery_count(state_dir: str) -> int:
    with sqlite3.connect(Path(state_dir) / "queue.db") as db:
        return int(db.execute("SELECT COALESCE(MAX(max_count), 0) FROM test_deliveries").fetchone()[0])


async def test_repeated_kills_dead_letter_no_good_change(seeded, record_property):
    box, _summary, services = seeded
    await initial_load(services)
    signs = box.ag.all("SignAssets")
    expected = {}
    for i, feature in enumerate(signs[:24]):
        condition = ("FAIR", "POOR", "DAMAGED")[i % 3]
        box.ag.field_edit("SignAssets", feature["GlobalID"], {"CONDITION": condition}, user="crew1")
        expected[feature["DV_ID"]] = condition
    assert await services.controller.poll() >= 24
    await services.aclose()
    watch_delivery_counts(box.env["SYNCLINE_STATE_DIR"])

    env = {**os.environ, **box.env, "SYNCLINE_MAX_DELIVERY_COUNT": str(ATTEMPTS), "SYNCLINE_LOCK_SECONDS": "1",
           "SYNCLINE_BATCH_SIZE": "8", "DATAVERSE__BATCH_SIZE": "4"}
    box.dv.latency_ms = 150  # a batch of 8 takes two Dataverse round trips at least: the kill lands inside it
    for kill in range(KILLS):
        writes_before = box.dv.request_counts["batch"]
        proc = controller_process(env)
        deadline = time.monotonic() + 60
        while box.dv.request_counts["batch"] <= writes_before:
            assert proc.poll() is None, f"controller finished before kill {kill + 1}: {proc.stdout.read()!r}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"controller never started writing (kill {kill + 1})"
            await asyncio.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        await asyncio.sleep(1.2)  # the killed controller's locks expire
    highest = highest_delivery_count(box.env["SYNCLINE_STATE_DIR"])
    record_property("highest_delivery_count", highest)
    print(f"\nhighest delivery count after {KILLS} kills: {highest} (attempts: {ATTEMPTS})")

    box.dv.latency_ms = 0
    rerun = controller_process(env)
    _out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err.decode()[-2000:]

    codes = {"GOOD": 100000000, "FAIR": 100000001, "POOR": 100000002, "DAMAGED": 100000003}
    for dv_id, condition in expected.items():
        assert box.dv.get("dot_signassets", dv_id)["dot_condition"] == codes[condition]

    from shared.bootstrap import build_services
    from shared.settings import Settings

    check = build_services(Settings())
    try:
        depth = await check.queue.depth()
        assert (depth.active, depth.scheduled) == (0, 0)
        dead = await check.queue.peek_dead_letters()
        # Only the seed's two deliberately bad signs, for their own reasons; no good change ran out of attempts.
        assert all(m.dead_letter_reason != "MAX_DELIVERY_EXCEEDED" for m in dead), [
            (m.application_properties.get("key"), m.dead_letter_reason, m.delivery_count) for m in dead]
        assert {m.application_properties["flow"] for m in dead} <= {"sign_assets_to_field"}
    finally:
        await check.aclose()
    # ... although good messages were delivered more often than the attempts allow
    assert highest > ATTEMPTS, "the kills never redelivered one message more often than the attempts allow"
