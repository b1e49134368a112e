"""Service Bus entity semantics for the test broker: queues, dead-letter sub-queues, locks, schedules, sessions."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"
"""The `DeadLetterReason` Service Bus gives a message that ran out of delivery attempts."""

MESSAGE_LOCK_LOST = "com.microsoft:message-lock-lost"
SESSION_LOCK_LOST = "com.microsoft:session-lock-lost"
SESSION_CANNOT_BE_LOCKED = "com.microsoft:session-cannot-be-locked"

Outcome = Literal["complete", "abandon", "dead-letter", "defer", "release"]


@dataclass(frozen=True)
class QueueSettings:
    """The entity properties a test chooses (the subset of Service Bus queue properties the broker honours)."""

    lock_duration: float = 60.0
    max_delivery_count: int = 10
    requires_session: bool = False
    default_message_ttl: float | None = None
    """Seconds; expired messages are dropped (Service Bus's default: no dead-lettering on expiration)."""


class LockLost(Exception):
    """A settlement or renewal named a lock that expired, was released, or never existed."""

    def __init__(self, condition: str, description: str) -> None:
        super().__init__(description)
        self.condition = condition
        self.description = description


class Consumer:
    """Whoever may hold locks: a receive link, or a management client receiving deferred messages.

    `dead` selects the dead-letter sub-queue; `session` is the session lock a session receiver holds.
    """

    def __init__(self, *, dead: bool = False, link_name: str = "") -> None:
        self.dead = dead
        self.link_name = link_name
        self.session: SessionLock | None = None


@dataclass(eq=False)
class SessionLock:
    session_id: str
    holder: Consumer
    locked_until: float
    lost: bool = False


@dataclass(eq=False)
class StoredMessage:
    """A message as the client encoded it (`raw`), plus what the broker knows about it."""

    sequence_number: int
    raw: bytes
    session_id: str | None
    enqueued_at: float
    visible_at: float
    """The scheduled enqueue time; equal to `enqueued_at` for a message sent for now."""
    expires_at: float | None
    delivery_count: int = 0
    deferred: bool = False
    lock_token: uuid.UUID | None = None
    locked_until: float = 0.0
    holder: Consumer | None = None
    dead_letter: tuple[str, str] | None = None
    """(DeadLetterReason, DeadLetterErrorDescription) once the message is in the dead-letter sub-queue."""


@dataclass
class Queue:
    """A queue and its dead-letter sub-queue, which share one sequence-number space (a DLQ keeps numbers)."""

    name: str
    settings: QueueSettings
    active: dict[int, StoredMessage] = field(default_factory=dict)
    dead: dict[int, StoredMessage] = field(default_factory=dict)
    sessions: dict[str, SessionLock] = field(default_factory=dict)
    """Sessions locked right now, by session id."""
    session_states: dict[str, bytes] = field(default_factory=dict)
    _locks: dict[uuid.UUID, StoredMessage] = field(default_factory=dict)
    _expired_sessions: dict[uuid.UUID, str] = field(default_factory=dict)
    """Lock tokens of messages released because their session's lock expired: settling one is refused as a
    lost session lock (as Service Bus answers), not as a lost message lock."""
    _last_sequence_number: int = 0
    _by_session: dict[str | None, dict[int, StoredMessage]] = field(default_factory=dict)
    """`active` per session id, in sequence order: a session receiver's next message, or the next available session,
    is found without scanning (and sorting) the whole queue at every delivery, which made a backlog of thousands
    cost the broker thread (and the test process, through the GIL) quadratic time."""
    _expiring: set[int] = field(default_factory=set)
    """Sequence numbers of active messages with a time to live (the only ones `tick` must look at)."""

    # ------------------------------------------------------------------------------------------ enqueue

    def enqueue(
        self, raw: bytes, *, session_id: str | None, ttl: float | None, now: float, scheduled_at: float | None
    ) -> StoredMessage:
        if self.settings.requires_session and not session_id:
            raise ValueError(
                f"queue {self.name!r} requires sessions: a message without a SessionId cannot be sent to it"
            )
        self._last_sequence_number += 1
        visible = max(now, scheduled_at) if scheduled_at is not None else now
        ttl = ttl if ttl is not None else self.settings.default_message_ttl
        message = StoredMessage(
            self._last_sequence_number, raw, session_id, enqueued_at=visible, visible_at=visible,
            expires_at=visible + ttl if ttl is not None else None,
        )
        # sequence numbers only grow, so `active` (and each `_by_session` entry) stays in sequence order
        self.active[message.sequence_number] = message
        self._by_session.setdefault(session_id, {})[message.sequence_number] = message
        if message.expires_at is not None:
            self._expiring.add(message.sequence_number)
        return message

    def cancel_scheduled(self, sequence_numbers: Iterable[int], now: float) -> None:
        for number in sequence_numbers:
            message = self.active.get(number)
            if message is not None and message.visible_at > now:
                self._remove_active(number)

    # ------------------------------------------------------------------------------------------- time

    def tick(self, now: float) -> None:
        """Apply what the passing of time does: expired session and message locks, expired messages."""
        for lock in [lock for lock in self.sessions.values() if lock.locked_until <= now]:
            self._lose_session(lock, now)
        for message in [m for m in self._locks.values() if m.holder is not None and m.holder.session is None]:
            if message.locked_until <= now:
                self._release(message, now, counted=True)
        for number in list(self._expiring):
            message = self.active[number]
            if message.expires_at is not None and message.expires_at <= now and message.lock_token is None:
                self._remove_active(number)

    # -------------------------------------------------------------------------------------- deliveries

    def next_for(self, consumer: Consumer, now: float) -> StoredMessage | None:
        """The message to deliver next to `consumer`, in sequence order, or None."""
        self.tick(now)
        if consumer.dead:
            return next((m for m in self._ordered(self.dead) if m.lock_token is None), None)
        if self.settings.requires_session:
            lock = consumer.session
            if lock is None or lock.lost:
                return None  # a non-session link on a session entity only browses (see broker.py)
            return next(self._deliverable(now, self._by_session.get(lock.session_id, {})), None)
        return next(self._deliverable(now), None)

    def lock(self, message: StoredMessage, consumer: Consumer, now: float) -> uuid.UUID:
        message.delivery_count += 1
        message.lock_token = uuid.uuid4()
        message.holder = consumer
        message.locked_until = consumer.session.locked_until if consumer.session else now + self.lock_duration
        self._locks[message.lock_token] = message
        return message.lock_token

    @property
    def lock_duration(self) -> float:
        return self.settings.lock_duration

    def settle(
        self, token: uuid.UUID, outcome: Outcome, now: float, *, reason: str = "", description: str = ""
    ) -> None:
        """Apply a settlement; `LockLost` when the lock is not held any more (nothing changes then)."""
        message = self.held(token, now)
        if outcome == "complete":
            self._unlock(message)
            if message.dead_letter:
                self.dead.pop(message.sequence_number, None)
            else:
                self._remove_active(message.sequence_number)
        elif outcome == "dead-letter":
            if message.dead_letter is not None:
                raise ValueError("a message in the dead-letter sub-queue cannot be dead-lettered again")
            self._unlock(message)
            self._move_to_dead_letter(message, reason, description)
        elif outcome == "defer":
            self._unlock(message)
            message.deferred = message.dead_letter is None
        else:
            self._release(message, now, counted=outcome == "abandon")

    def held(self, token: uuid.UUID, now: float) -> StoredMessage:
        """The message locked under `token`, if that lock is still valid; else `LockLost`."""
        self.tick(now)
        message = self._locks.get(token)
        if message is None and token in self._expired_sessions:
            raise LockLost(SESSION_LOCK_LOST, f"the session lock of {self._expired_sessions[token]!r} was lost")
        if message is None or message.holder is None:
            raise LockLost(MESSAGE_LOCK_LOST, f"the lock {token} was lost: unknown, released or settled")
        session = message.holder.session
        if session is not None and self.sessions.get(session.session_id) is not session:
            raise LockLost(SESSION_LOCK_LOST, f"the session lock of {session.session_id!r} was lost")
        return message

    def held_in_session(self, token: uuid.UUID, session_id: str | None, now: float) -> StoredMessage:
        """`held`, for a settlement through the management node: a message received under a session lock is
        settled there only with that session's `session-id` (which the SDKs send); another session's token, or
        one without the session, is refused as a lost lock."""
        message = self.held(token, now)
        lock = message.holder.session if message.holder is not None else None
        if lock is not None and session_id != lock.session_id:
            raise LockLost(MESSAGE_LOCK_LOST, f"the lock {token} is held by session {lock.session_id!r}, "
                                              f"not {session_id!r}")
        return message

    def renew(self, token: uuid.UUID, now: float) -> float:
        message = self.held(token, now)
        if message.holder is not None and message.holder.session is not None:
            raise LockLost(MESSAGE_LOCK_LOST, "the lock of a session message is its session's: renew the session")
        message.locked_until = now + self.lock_duration
        return message.locked_until

    def release_consumer(self, consumer: Consumer, now: float) -> None:
        """The consumer went away: its locks count as abandoned, its session is free again."""
        for message in [m for m in self._locks.values() if m.holder is consumer]:
            self._release(message, now, counted=True)
        if consumer.session is not None and self.sessions.get(consumer.session.session_id) is consumer.session:
            del self.sessions[consumer.session.session_id]
        consumer.session = None

    def receive_deferred(self, sequence_numbers: Iterable[int], consumer: Consumer, now: float) -> list[StoredMessage]:
        """Lock deferred messages by sequence number (the only way to get a deferred message back)."""
        found = []
        for number in sequence_numbers:
            message = self.active.get(number)
            if message is None or not message.deferred or message.lock_token is not None:
                raise KeyError(number)
            found.append(message)
        for message in found:
            self.lock(message, consumer, now)
        return found

    # ----------------------------------------------------------------------------------------- browse

    def peek(self, *, dead: bool, from_sequence_number: int, count: int, session_id: str | None) -> list[StoredMessage]:
        """Browse without locking: active, locked, scheduled and deferred messages alike, in sequence order."""
        return [
            m for m in self._ordered(self.dead if dead else self.active)
            if m.sequence_number >= from_sequence_number and (session_id is None or m.session_id == session_id)
        ][:count]

    # --------------------------------------------------------------------------------------- sessions

    def accept_session(self, requested: str | None, consumer: Consumer, now: float) -> SessionLock | None:
        """Lock `requested`, or the available session whose next message is oldest; None if there is none.

        A session is available when it has a deliverable message and nobody holds its lock. A named session
        can be accepted even when it is empty; `LockLost(SESSION_CANNOT_BE_LOCKED)` if someone else holds it.
        """
        self.tick(now)
        if requested is None:
            oldest: StoredMessage | None = None
            for session_id, messages in self._by_session.items():
                if not session_id or session_id in self.sessions:
                    continue
                first = next(self._deliverable(now, messages), None)
                if first is not None and (oldest is None or first.sequence_number < oldest.sequence_number):
                    oldest = first
            if oldest is None:
                return None
            requested = oldest.session_id
            assert requested is not None
        elif requested in self.sessions:
            raise LockLost(SESSION_CANNOT_BE_LOCKED, f"the session {requested!r} is locked by another receiver")
        lock = SessionLock(requested, consumer, now + self.lock_duration)
        self.sessions[requested] = lock
        consumer.session = lock
        return lock

    def session_lock(self, session_id: str, now: float) -> SessionLock:
        self.tick(now)
        lock = self.sessions.get(session_id)
        if lock is None:
            raise LockLost(SESSION_LOCK_LOST, f"the session lock of {session_id!r} was lost")
        return lock

    def renew_session(self, session_id: str, now: float) -> float:
        lock = self.session_lock(session_id, now)
        lock.locked_until = now + self.lock_duration
        for message in self._locks.values():
            if message.holder is lock.holder:
                message.locked_until = lock.locked_until
        return lock.locked_until

    # -------------------------------------------------------------------------------------- internals

    @staticmethod
    def _ordered(messages: dict[int, StoredMessage]) -> list[StoredMessage]:
        # a dead-lettered message keeps its number, so the DLQ's insertion order is not its sequence order
        return [messages[n] for n in sorted(messages)]

    def _deliverable(self, now: float, messages: dict[int, StoredMessage] | None = None) -> Iterator[StoredMessage]:
        """Deliverable messages of `messages` (default: the whole queue), in sequence order (their insertion order)."""
        for message in (self.active if messages is None else messages).values():
            if message.visible_at <= now and not message.deferred and message.lock_token is None:
                yield message

    def _remove_active(self, number: int) -> None:
        message = self.active.pop(number, None)
        if message is None:
            return
        self._expiring.discard(number)
        messages = self._by_session.get(message.session_id)
        if messages is not None:
            messages.pop(number, None)
            if not messages:
                del self._by_session[message.session_id]

    def _unlock(self, message: StoredMessage) -> None:
        if message.lock_token is not None:
            self._locks.pop(message.lock_token, None)
        message.lock_token = None
        message.holder = None
        message.locked_until = 0.0

    def _release(self, message: StoredMessage, now: float, *, counted: bool) -> None:
        """Unlock for redelivery. `counted=False` (AMQP `released`) undoes the delivery's count.

        Service Bus moves a message that used up its delivery attempts to the DLQ when it is released, not
        at the next receive; the DLQ itself never dead-letters.
        """
        self._unlock(message)
        if not counted:
            message.delivery_count -= 1
        if message.dead_letter is None and message.delivery_count >= self.settings.max_delivery_count:
            description = (
                f"Message could not be consumed after {self.settings.max_delivery_count} delivery attempts."
            )
            self._move_to_dead_letter(message, MAX_DELIVERY_COUNT_EXCEEDED, description)

    def _move_to_dead_letter(self, message: StoredMessage, reason: str, description: str) -> None:
        self._remove_active(message.sequence_number)
        message.dead_letter = (reason, description)
        message.deferred = False
        self.dead[message.sequence_number] = message

    def _lose_session(self, lock: SessionLock, now: float) -> None:
        lock.lost = True
        del self.sessions[lock.session_id]
        for message in [m for m in self._locks.values() if m.holder is lock.holder]:
            if message.lock_token is not None:
                self._expired_sessions[message.lock_token] = lock.session_id
            self._release(message, now, counted=True)
