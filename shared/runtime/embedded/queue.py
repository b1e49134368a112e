"""The embedded `InboundQueue`: Service Bus peek-lock semantics (sessions, DLQ, scheduling) on SQLite."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from shared.core.envelope import QueueMessage, ReceivedMessage, wire_text
from shared.core.ports import LockLostError, QueueDepth
from shared.runtime.common import MAX_DELIVERY_EXCEEDED, LockLostBatchError, to_utc
from shared.runtime.embedded.database import SqliteDatabase

_POLL_SECONDS = 0.05

# Times are integer microseconds since the epoch: compared on every receive, and integers compare and index
# without any formatting convention. `entity` is the Service Bus entity path, so that the dead-letter
# sub-queue (`<name>/$DeadLetterQueue`) and several named queues can share one file; moving a message to
# the DLQ is an update of that column and keeps its sequence number.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue_messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    entity TEXT NOT NULL,
    message_id TEXT NOT NULL,
    session_id TEXT,
    correlation_id TEXT,
    content_type TEXT NOT NULL,
    properties TEXT NOT NULL,
    body BLOB NOT NULL,
    enqueued_us INTEGER NOT NULL,
    visible_us INTEGER NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    lock_token TEXT,
    locked_until_us INTEGER,
    dead_letter_reason TEXT,
    dead_letter_description TEXT
);
CREATE INDEX IF NOT EXISTS queue_messages_by_entity ON queue_messages (entity, seq);
CREATE INDEX IF NOT EXISTS queue_messages_by_lock ON queue_messages (entity, locked_until_us)
    WHERE locked_until_us IS NOT NULL;
"""

# Deliverable main-queue messages in sequence order. A session with any message under a live lock is left
# out entirely, which is what keeps per-record order: nothing later in that session can overtake it.
_DELIVERABLE = """
SELECT seq, message_id, session_id, correlation_id, content_type, properties, body, enqueued_us,
       delivery_count, dead_letter_reason, dead_letter_description
FROM queue_messages
WHERE entity = :entity AND seq > :after AND visible_us <= :now
  AND (locked_until_us IS NULL OR locked_until_us <= :now)
  AND (session_id IS NULL OR session_id NOT IN (
      SELECT session_id FROM queue_messages
      WHERE entity = :entity AND locked_until_us > :now AND session_id IS NOT NULL))
ORDER BY seq LIMIT :limit
"""

_DEAD_LETTERS = """
SELECT seq, message_id, session_id, correlation_id, content_type, properties, body, enqueued_us,
       delivery_count, dead_letter_reason, dead_letter_description
FROM queue_messages
WHERE entity = :entity AND (:browse OR locked_until_us IS NULL OR locked_until_us <= :now)
ORDER BY seq LIMIT :limit
"""

_PEEK = """
SELECT seq, message_id, session_id, correlation_id, content_type, properties, body, enqueued_us,
       delivery_count, dead_letter_reason, dead_letter_description, visible_us
FROM queue_messages WHERE entity = :entity ORDER BY seq LIMIT :limit
"""

_LOCK = (
    "UPDATE queue_messages SET delivery_count = delivery_count + 1, lock_token = ?, locked_until_us = ?"
    " WHERE seq = ?"
)
_UNLOCK = "UPDATE queue_messages SET lock_token = NULL, locked_until_us = NULL WHERE seq = ?"
_MOVE_TO_DLQ = (
    "UPDATE queue_messages SET entity = ?, lock_token = NULL, locked_until_us = NULL,"
    " dead_letter_reason = ?, dead_letter_description = ? WHERE seq = ?"
)
_DELETE = "DELETE FROM queue_messages WHERE seq = ?"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _to_us(value: datetime) -> int:
    # timedelta floor division is exact, where float timestamps can be off by a microsecond
    return (to_utc(value) - _EPOCH) // _MICROSECOND


def _from_us(value: int) -> datetime:
    return _EPOCH + value * _MICROSECOND


class SqliteQueue:
    """`InboundQueue` on a local SQLite file, with Azure Service Bus semantics.

    Sequence numbers increase monotonically and are never reused. `receive` peek-locks messages in sequence
    order; a lock that expires counts as an abandon. A message whose next delivery would exceed
    `max_delivery_count` is moved to the dead-letter sub-queue (reason `MAX_DELIVERY_EXCEEDED`) when a
    receive reaches it, so `depth()` may count such a message as active until then. Sessions: while a
    message of a session is locked, later messages of that session are not delivered; one receive may
    return several messages of a session, in order. A scheduled message that is not due yet does not hold
    back later messages of its session (as on Service Bus). Messages are durable: after a crash their locks
    expire and they are delivered again; so are the messages of a receive whose caller was cancelled while
    the database call was under way.

    `clock` supplies "now" for locks and schedules (tests move it); `max_wait_seconds` waits in real time.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        name: str = "syncline-inbound",
        lock_duration_seconds: float = 60.0,
        max_delivery_count: int = 10,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if lock_duration_seconds <= 0:
            raise ValueError("lock_duration_seconds must be positive")
        if max_delivery_count < 1:
            raise ValueError("max_delivery_count must be at least 1")
        self.name = name
        self.dead_letter_name = f"{name}/$DeadLetterQueue"
        self.lock_duration = timedelta(seconds=lock_duration_seconds)
        self._lock_us = round(lock_duration_seconds * 1_000_000)
        self.max_delivery_count = max_delivery_count
        self._clock = clock or (lambda: datetime.now(UTC))
        self._db = SqliteDatabase(path, _SCHEMA)

    def _now_us(self) -> int:
        return _to_us(self._clock())

    def _check_lock(self, conn: sqlite3.Connection, message: ReceivedMessage, now: int) -> str:
        """Return the entity holding `message` if its lock is still ours, else raise `LockLostError`.

        Checking, then writing by sequence number is atomic: every call runs in a BEGIN IMMEDIATE
        transaction, which excludes every other writer of the file until it ends.
        """
        row = conn.execute(
            "SELECT entity, lock_token, locked_until_us FROM queue_messages WHERE seq = ?",
            (message.sequence_number,),
        ).fetchone()
        if row is not None and row[0] in (self.name, self.dead_letter_name):
            entity, token, until = row
            if token == message.lock_token and until is not None and until > now:
                return str(entity)
            if token == message.lock_token:
                why = f"its lock expired at {_from_us(until).isoformat()}"
            else:
                why = "its lock expired and it was released or delivered again (stale lock token)"
        else:
            why = "it was settled already"
        raise LockLostError(f"lock lost for message {message.sequence_number} ({message.message_id}): {why}")

    def _still_locked(
        self, conn: sqlite3.Connection, messages: Sequence[ReceivedMessage], now: int
    ) -> tuple[list[ReceivedMessage], list[ReceivedMessage]]:
        """(held, lost): `messages` split by `_check_lock`, each list in the order given."""
        held: list[ReceivedMessage] = []
        lost: list[ReceivedMessage] = []
        for message in messages:
            try:
                self._check_lock(conn, message, now)
            except LockLostError:
                lost.append(message)
            else:
                held.append(message)
        return held, lost

    # ------------------------------------------------------------------------------------------ send

    async def send(self, messages: Sequence[QueueMessage], *, scheduled_at: datetime | None = None) -> None:
        """Enqueue messages in one transaction, visible now or at `scheduled_at` (their enqueued time)."""
        if not messages:
            return
        now = self._now_us()
        visible = max(now, _to_us(scheduled_at)) if scheduled_at is not None else now
        rows = [
            (
                self.name,
                m.message_id,
                m.session_id,
                m.correlation_id,
                m.content_type,
                json.dumps(m.application_properties, separators=(",", ":")),
                m.body,
                visible,
                visible,
            )
            for m in messages
        ]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO queue_messages (entity, message_id, session_id, correlation_id, content_type,"
                " properties, body, enqueued_us, visible_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

        await self._db.write(work)

    # --------------------------------------------------------------------------------------- receive

    async def receive(self, max_messages: int, *, max_wait_seconds: float = 0.0) -> list[ReceivedMessage]:
        """Peek-lock up to `max_messages` deliverable messages in sequence order, waiting up to the limit."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_seconds
        while True:
            received = await self._db.write(lambda conn: self._receive(conn, max_messages))
            remaining = deadline - loop.time()
            if received or remaining <= 0:
                return received
            await asyncio.sleep(min(_POLL_SECONDS, remaining))

    def _receive(self, conn: sqlite3.Connection, max_messages: int) -> list[ReceivedMessage]:
        now = self._now_us()
        deliver: list[tuple[Any, ...]] = []
        exhausted: list[tuple[str, str, str, int]] = []
        after = 0
        # Pages, because messages moved to the DLQ on the way do not fill the batch.
        while len(deliver) < max_messages:
            limit = max_messages - len(deliver)
            params = {"entity": self.name, "after": after, "now": now, "limit": limit}
            rows = conn.execute(_DELIVERABLE, params).fetchall()
            for row in rows:
                delivered = row[8]
                if delivered >= self.max_delivery_count:
                    description = (
                        f"delivered {delivered} times; the max delivery count of {self.name!r} "
                        f"is {self.max_delivery_count}"
                    )
                    exhausted.append((self.dead_letter_name, MAX_DELIVERY_EXCEEDED, description, row[0]))
                else:
                    deliver.append(row)
            if len(rows) < limit:
                break
            after = rows[-1][0]
        conn.executemany(_MOVE_TO_DLQ, exhausted)
        return self._lock_rows(conn, deliver, now)

    def _lock_rows(
        self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]], now: int
    ) -> list[ReceivedMessage]:
        until = now + self._lock_us
        tokens = [str(uuid.uuid4()) for _ in rows]
        conn.executemany(_LOCK, [(token, until, row[0]) for token, row in zip(tokens, rows, strict=True)])
        return [
            _message(row, lock_token=token, delivery_count=row[8] + 1, locked_until=_from_us(until))
            for token, row in zip(tokens, rows, strict=True)
        ]

    # ------------------------------------------------------------------------------------ settlement

    async def complete(self, message: ReceivedMessage) -> None:
        """Remove the message (from the queue, or from the DLQ for a DLQ message); LockLostError if lost."""

        def work(conn: sqlite3.Connection) -> None:
            self._check_lock(conn, message, self._now_us())
            conn.execute(_DELETE, (message.sequence_number,))

        await self._db.write(work)

    async def abandon(self, message: ReceivedMessage) -> None:
        """Release the lock; the message is deliverable again at once (its delivery count already rose)."""

        def work(conn: sqlite3.Connection) -> None:
            self._check_lock(conn, message, self._now_us())
            conn.execute(_UNLOCK, (message.sequence_number,))

        await self._db.write(work)

    async def dead_letter(self, message: ReceivedMessage, *, reason: str, description: str) -> None:
        """Move the message, body and properties intact, to the DLQ with a reason and a description.

        A message received from the DLQ cannot be dead-lettered again (`ValueError`): complete or abandon it.
        """

        def work(conn: sqlite3.Connection) -> None:
            if self._check_lock(conn, message, self._now_us()) == self.dead_letter_name:
                raise ValueError(
                    f"message {message.sequence_number} is in the dead-letter sub-queue already; "
                    "complete or abandon it instead"
                )
            conn.execute(_MOVE_TO_DLQ, (self.dead_letter_name, wire_text(reason), wire_text(description),
                                        message.sequence_number))

        await self._db.write(work)

    async def renew_lock(self, message: ReceivedMessage) -> datetime:
        """Extend the lock by the lock duration from now; returns (and sets on `message`) the new expiry."""

        def work(conn: sqlite3.Connection) -> datetime:
            now = self._now_us()
            self._check_lock(conn, message, now)
            until = now + self._lock_us
            renew = "UPDATE queue_messages SET locked_until_us = ? WHERE seq = ?"
            conn.execute(renew, (until, message.sequence_number))
            return _from_us(until)

        locked_until = await self._db.write(work)
        message.locked_until = locked_until  # as the Service Bus SDK does on its message object
        return locked_until

    async def renew_many(self, messages: Sequence[ReceivedMessage]) -> None:
        """Renew a batch's locks in one transaction; lost locks are raised afterwards as `LockLostBatchError`."""

        def work(conn: sqlite3.Connection) -> tuple[list[ReceivedMessage], datetime]:
            now = self._now_us()
            until = now + self._lock_us
            kept, lost = self._still_locked(conn, messages, now)
            held = [(until, message.sequence_number) for message in kept]
            conn.executemany("UPDATE queue_messages SET locked_until_us = ? WHERE seq = ?", held)
            return lost, _from_us(until)

        if not messages:
            return
        lost, locked_until = await self._db.write(work)
        gone = {id(m) for m in lost}
        for message in messages:
            if id(message) not in gone:
                message.locked_until = locked_until
        if lost:
            raise LockLostBatchError(lost)

    async def complete_many(self, messages: Sequence[ReceivedMessage]) -> None:
        """Complete a batch in one transaction.

        Messages whose lock was lost are skipped while every other one is completed (and committed); then
        `LockLostBatchError` (a `LockLostError`) is raised with the lost ones in `lost`. Those will be
        redelivered, so the caller needs no more than to log them.
        """
        await self._settle_many(messages, _DELETE)

    async def abandon_many(self, messages: Sequence[ReceivedMessage]) -> None:
        """Abandon a batch in one transaction (e.g. on shutdown); lost locks as in `complete_many`."""
        await self._settle_many(messages, _UNLOCK)

    async def _settle_many(self, messages: Sequence[ReceivedMessage], statement: str) -> None:
        def work(conn: sqlite3.Connection) -> list[ReceivedMessage]:
            now = self._now_us()
            kept, lost = self._still_locked(conn, messages, now)
            conn.executemany(statement, [(message.sequence_number,) for message in kept])
            return lost

        # raised after the commit: the messages still held must stay settled
        lost = await self._db.write(work) if messages else []
        if lost:
            raise LockLostBatchError(lost)

    # ------------------------------------------------------------------------------------ dead letters

    async def peek_dead_letters(self, max_messages: int = 100) -> list[ReceivedMessage]:
        """Browse the DLQ in sequence order without locking (lock_token is "")."""

        def work(conn: sqlite3.Connection) -> list[ReceivedMessage]:
            params = {"entity": self.dead_letter_name, "browse": True, "now": 0, "limit": max_messages}
            rows = conn.execute(_DEAD_LETTERS, params)
            return [_message(row, lock_token="", delivery_count=row[8], locked_until=None) for row in rows]

        return await self._db.read(work) if max_messages > 0 else []

    async def peek_messages(self, max_messages: int = 100) -> list[ReceivedMessage]:
        """Browse the main queue in sequence order without locking (lock_token is ""); scheduled ones carry
        `scheduled_at`."""

        def work(conn: sqlite3.Connection) -> list[ReceivedMessage]:
            now = self._now_us()
            rows = conn.execute(_PEEK, {"entity": self.name, "limit": max_messages}).fetchall()
            peeked = []
            for row in rows:
                message = _message(row[:-1], lock_token="", delivery_count=row[8], locked_until=None)
                if row[-1] > now:
                    message = message.model_copy(update={"scheduled_at": _from_us(row[-1])})
                peeked.append(message)
            return peeked

        return await self._db.read(work) if max_messages > 0 else []

    async def receive_dead_letters(self, max_messages: int) -> list[ReceivedMessage]:
        """Peek-lock DLQ messages in sequence order; the DLQ never dead-letters, whatever the count."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")

        def work(conn: sqlite3.Connection) -> list[ReceivedMessage]:
            now = self._now_us()
            params = {"entity": self.dead_letter_name, "browse": False, "now": now, "limit": max_messages}
            return self._lock_rows(conn, conn.execute(_DEAD_LETTERS, params).fetchall(), now)

        return await self._db.write(work)

    # ------------------------------------------------------------------------------------------- misc

    async def depth(self) -> QueueDepth:
        """Active (visible or locked), scheduled (not due yet) and dead-lettered message counts."""

        def work(conn: sqlite3.Connection) -> QueueDepth:
            active, scheduled, dead = conn.execute(
                "SELECT COALESCE(SUM(entity = :main AND visible_us <= :now), 0),"
                " COALESCE(SUM(entity = :main AND visible_us > :now), 0), COALESCE(SUM(entity = :dlq), 0)"
                " FROM queue_messages WHERE entity IN (:main, :dlq)",
                {"main": self.name, "dlq": self.dead_letter_name, "now": self._now_us()},
            ).fetchone()
            return QueueDepth(active=int(active), scheduled=int(scheduled), dead_letter=int(dead))

        return await self._db.read(work)

    async def close(self) -> None:
        """Close the database; unsettled messages stay locked until their lock expires."""
        await self._db.close()


def _message(
    row: tuple[Any, ...], *, lock_token: str, delivery_count: int, locked_until: datetime | None
) -> ReceivedMessage:
    seq, message_id, session_id, correlation, content_type, properties, body, enqueued, _, reason, desc = row
    return ReceivedMessage(
        body=bytes(body),
        message_id=message_id,
        sequence_number=seq,
        lock_token=lock_token,
        delivery_count=delivery_count,
        enqueued_at=_from_us(enqueued),
        locked_until=locked_until,
        session_id=session_id,
        correlation_id=correlation,
        content_type=content_type,
        application_properties=json.loads(properties),
        dead_letter_reason=reason,
        dead_letter_description=desc,
    )
