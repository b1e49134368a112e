"""Watching the run from outside Syncline: the queue's deliveries, locks and depth; webhook flushes and refusals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from typing import Any

from sandbox import demo
from sandbox.chaos.options import QUEUE, Figures


class QueueProbe:
    """Reads and nudges the queue from outside Syncline: delivery counts, locks, scheduled messages."""

    def __init__(self, box: demo.Sandbox, figures: Figures) -> None:
        self.box = box
        self.figures = figures
        self.path = box.workdir / "state" / "queue.db"
        self.what: dict[int, str] = {}
        """sequence number -> "flow key" of the messages seen, to name the most delivered ones."""
        if box.broker is not None:
            self._hook_broker()

    # The embedded queue keeps a delivery count per row and deletes the row on completion; a trigger keeps the
    # highest count of every message, exactly, whoever delivered it.
    def install(self) -> None:
        if self.box.broker is not None:
            return
        with sqlite3.connect(self.path, timeout=30) as conn:
            conn.executescript("""
            CREATE TABLE IF NOT EXISTS chaos_deliveries (seq INTEGER PRIMARY KEY, max_count INTEGER NOT NULL,
                                                         properties TEXT);
            CREATE TRIGGER IF NOT EXISTS chaos_delivery_count AFTER UPDATE OF delivery_count ON queue_messages
            BEGIN
              INSERT INTO chaos_deliveries (seq, max_count, properties)
              VALUES (NEW.seq, NEW.delivery_count, NEW.properties)
              ON CONFLICT (seq) DO UPDATE SET max_count = max(max_count, excluded.max_count);
            END;
            """)

    def _hook_broker(self) -> None:
        broker = self.box.broker
        deliveries = self.figures.deliveries

        def hook() -> None:
            queue = broker._broker.queues[QUEUE]
            original = queue.lock

            def lock(message: Any, consumer: Any, now: float) -> Any:
                token = original(message, consumer, now)
                seq = message.sequence_number
                deliveries[seq] = max(deliveries.get(seq, 0), message.delivery_count)
                self.what[seq] = f"session {message.session_id}"  # the broker keeps the message encoded
                return token

            queue.lock = lock

        broker._call(hook)

    def read_deliveries(self) -> dict[int, int]:
        if self.box.broker is None:
            with sqlite3.connect(self.path, timeout=30) as conn:
                rows = conn.execute("SELECT seq, max_count, properties FROM chaos_deliveries").fetchall()
            self.figures.deliveries = {int(s): int(c) for s, c, _ in rows}
            for s, _, props in rows:
                with contextlib.suppress(ValueError, TypeError):
                    p = json.loads(props)
                    # a change names its flow and record; a poll hint its system and table
                    self.what[int(s)] = (f"{p.get('flow') or p.get('kind', '?')} "
                                         f"{p.get('key') or p.get('system', '?') + ' ' + p.get('table', '?')}")
        return dict(self.figures.deliveries)

    def locked(self) -> int:
        """Messages under a lock right now (a kill with some is a kill mid-drain)."""
        if self.box.broker is not None:
            return int(self.box.broker._call(lambda: sum(
                1 for m in self.box.broker._broker.queues[QUEUE].active.values() if m.lock_token is not None)))
        now = int(time.time() * 1_000_000)
        with sqlite3.connect(self.path, timeout=30) as conn:
            return int(conn.execute("SELECT count(*) FROM queue_messages WHERE entity = ? AND locked_until_us > ?",
                                    (QUEUE, now)).fetchone()[0])

    def release(self) -> None:
        """Let time pass: the dead controller's locks expire and scheduled messages (parent waits) come due."""
        if self.box.broker is not None:
            self.box.broker.advance(3600)
            return
        now = int(time.time() * 1_000_000)
        with sqlite3.connect(self.path, timeout=30) as conn:
            conn.execute("UPDATE queue_messages SET locked_until_us = ? WHERE entity = ? AND locked_until_us > ?",
                         (now - 1, QUEUE, now))
            conn.execute("UPDATE queue_messages SET visible_us = ? WHERE entity = ? AND visible_us > ?",
                         (now - 1, QUEUE, now))

    def depth(self) -> tuple[int, int]:
        """(active, scheduled) main-queue messages."""
        if self.box.broker is not None:
            broker = self.box.broker

            def count() -> tuple[int, int]:
                queue = broker._broker.queues[QUEUE]
                now = broker.clock.now() if callable(getattr(broker.clock, "now", None)) else time.time()
                scheduled = sum(1 for m in queue.active.values() if m.visible_at > now)
                return len(queue.active) - scheduled, scheduled

            return broker._call(count)  # type: ignore[no-any-return]
        now = int(time.time() * 1_000_000)
        with sqlite3.connect(self.path, timeout=30) as conn:
            active, scheduled = conn.execute(
                "SELECT sum(visible_us <= ?), sum(visible_us > ?) FROM queue_messages WHERE entity = ?",
                (now, now, QUEUE)).fetchone()
        return int(active or 0), int(scheduled or 0)


# ------------------------------------------------------------------------------------------ webhooks


async def flush(box: demo.Sandbox, figures: Figures) -> None:
    """Wait until every simulator delivered what it queued; each sender retries as its real service does, and a
    delivery it gives up on is counted (the change may still arrive by a change-feed poll)."""
    for _ in range(3):  # deliveries cause writes that cause deliveries
        await box.dv.flush_webhooks(timeout=300)
        await box.ag.flush_webhooks(timeout=300)
        if box.fno is not None:
            await box.fno.flush_events(timeout=300)
        if box.sf is not None:
            try:
                await asyncio.to_thread(box.sf.flush_events, 300)
            except Exception as exc:  # the simulator stops its batch at the first refused event
                figures.refused["salesforce"] += 1
                figures.notes_once.add(f"salesforce CDC delivery refused: {type(exc).__name__}: {str(exc)[:120]}")
        if box.sap is not None:
            await box.sap.flush_events(timeout=300)


def refused_deliveries(box: demo.Sandbox, figures: Figures) -> dict[str, int]:
    """Webhook and event deliveries each simulator finally gave up on (after its own retries)."""
    out = {"dataverse": len(box.dv.webhook_failures),
           "arcgis": sum(1 for d in box.ag.webhook_deliveries if d.status is None or d.status >= 300)}
    if box.fno is not None:
        out["fno"] = len(box.fno.event_failures)
    if box.sap is not None:
        out["sap"] = len(box.sap.event_failures)
    if box.sf is not None:
        out["salesforce"] = figures.refused["salesforce"]
    return out
