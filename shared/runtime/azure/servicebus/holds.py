"""What the queue holds: accepted sessions, messages under our lock, and the bookkeeping both sides of it share."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from azure.servicebus import ServiceBusReceivedMessage
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender
from azure.servicebus.aio.management import ServiceBusAdministrationClient
from azure.servicebus.exceptions import MessageAlreadySettled, MessageLockLostError, SessionLockLostError

from shared.core.envelope import ReceivedMessage
from shared.core.ports import LockLostError
from shared.runtime.azure.servicebus.wire import (
    DEFAULT_MAX_CONCURRENT_SESSIONS,
    DEFAULT_SESSION_BUCKETS,
    _own_session,
    _received,
)

_LOCK_LOST = (MessageLockLostError, SessionLockLostError, MessageAlreadySettled)


@dataclass(eq=False)
class _Held:
    """A message under our lock: the SDK object settles it, and only through the receiver it came from."""

    message: ServiceBusReceivedMessage
    receiver: ServiceBusReceiver
    dead: bool
    logical: str | None = None
    """The message's own session id (the record's), which may share its Service Bus session (its bucket)."""


@dataclass(eq=False)
class _Session:
    """An accepted session (a bucket): one receiver, reused across receives while it holds the session lock."""

    receiver: ServiceBusReceiver
    session_id: str
    outstanding: set[str] = field(default_factory=set)
    """Lock tokens handed out by `receive` and not settled yet."""
    pending: list[ServiceBusReceivedMessage] = field(default_factory=list)
    """Received from the broker but not handed out: behind a record still being worked, or past the budget."""
    drained: bool = False
    """Its last read brought fewer than asked: not read again; closed once nothing of it is outstanding."""
    released: list[str | None] = field(default_factory=list)
    """Record sessions of messages abandoned while others were outstanding: released when it closes (their
    records wait until then)."""
    renewed_at: float = field(default_factory=time.monotonic)
    """When its lock was last taken or renewed (monotonic), and how long the lock was then good for."""
    lock_span: float = 0.0


class _Holds:
    """The state of a `ServiceBusQueue`: its clients and links, held sessions and messages under our lock."""

    def __init__(
        self,
        client: ServiceBusClient,
        queue_name: str,
        *,
        session_client: ServiceBusClient | None = None,
        admin: ServiceBusAdministrationClient | None = None,
        max_delivery_count: int = 10,
        session_wait_seconds: float = 1.0,
        session_buckets: int = DEFAULT_SESSION_BUCKETS,
        max_concurrent_sessions: int = DEFAULT_MAX_CONCURRENT_SESSIONS,
    ) -> None:
        """Prefer `from_connection_string` / `from_namespace`; `session_client` set means sessions are on.

        `admin` serves `depth()`; without it `depth()` counts by browsing.
        """
        if max_delivery_count < 1:
            raise ValueError("max_delivery_count must be at least 1")
        if session_wait_seconds <= 0:
            raise ValueError("session_wait_seconds must be positive")
        if session_buckets < 0:
            raise ValueError("session_buckets must be 0 (one session per record) or more")
        if max_concurrent_sessions < 1:
            raise ValueError("max_concurrent_sessions must be at least 1")
        self.name = queue_name
        self.max_delivery_count = max_delivery_count
        self.sessions = session_client is not None
        self.session_buckets = session_buckets
        self.max_concurrent_sessions = max_concurrent_sessions
        self._client = client
        self._session_client = session_client
        self._admin = admin
        self._wait = session_wait_seconds
        self._sender: ServiceBusSender | None = None
        self._receiver: ServiceBusReceiver | None = None
        self._dead_receiver: ServiceBusReceiver | None = None
        self._held: dict[str, _Held] = {}
        self._sessions: dict[ServiceBusReceiver, _Session] = {}
        self._busy: Counter[str] = Counter()
        """Record sessions with messages handed out and unsettled (their later messages wait)."""
        self._probe = max_concurrent_sessions
        """Sessions to try to accept at once: halved when a round finds fewer free, doubled when it finds all."""
        self._batch_settlement: bool | None = None
        """Whether this SDK has the private management-link settlement `_settle_batch` uses (checked once)."""
        self._receive_lock = asyncio.Lock()
        # The SDK's sender is not safe for concurrent use (its link opening races): one send at a time.
        self._send_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    @staticmethod
    def _renewed(session: _Session, locked_until: datetime | None) -> None:
        session.renewed_at = time.monotonic()
        # Measured against our clock, so a skewed one shortens or lengthens it by the skew; half of it is the
        # margin. Unknown: 0, renewed at every receive as before.
        left = (locked_until - datetime.now(UTC)).total_seconds() if locked_until is not None else 0.0
        session.lock_span = max(left, 0.0)

    def _lose(self, session: _Session) -> None:
        """The session's lock is gone (or its link failed): forget what it delivered, and close it."""
        for token in session.outstanding:
            held = self._held.pop(token, None)
            if held is not None:
                self._unbusy(held.logical)
        session.outstanding.clear()
        session.pending.clear()
        self._close_session(session)

    def _close_session(self, session: _Session) -> None:
        """Detach: frees the session, and releases whatever it delivered that is not settled (pending too)."""
        if self._sessions.get(session.receiver) is session:
            del self._sessions[session.receiver]
            self._close_later(session.receiver)

    async def release_sessions(self) -> None:
        """Close the sessions with nothing outstanding (the end of a cycle): other processes may take them."""
        for session in [s for s in self._sessions.values() if not s.outstanding]:
            self._close_session(session)

    def _unbusy(self, key: str | None) -> None:
        if key is not None:
            self._busy[key] -= 1
            if self._busy[key] <= 0:
                del self._busy[key]

    def _close_later(self, handler: ServiceBusReceiver | ServiceBusSender) -> None:
        """Close in the background: the link detaches (releasing a session) at once, but the SDK then waits
        up to a second for its keep-alive loop; `close()` waits for these."""
        task = asyncio.create_task(handler.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _open(receiver: ServiceBusReceiver) -> ServiceBusReceiver:
        # A receiver's first receive_messages call would bound opening the link by its (short) wait.
        return await receiver.__aenter__()

    def _main_receiver(self) -> ServiceBusReceiver:
        if self._receiver is None:
            self._receiver = self._client.get_queue_receiver(self.name)
        return self._receiver

    def _hold(self, message: ServiceBusReceivedMessage, receiver: ServiceBusReceiver, *, dead: bool) -> ReceivedMessage:
        token = str(message.lock_token)
        locked_until = message.locked_until_utc
        session = self._sessions.get(receiver)
        key = _own_session(message) if session is not None else None
        self._held[token] = _Held(message, receiver, dead, key)
        if session is not None:
            session.outstanding.add(token)
            if key is not None:
                self._busy[key] += 1
            locked_until = receiver.session.locked_until_utc
        # the AMQP header counts previous attempts; the port counts this delivery too
        return _received(message, lock_token=token, delivery_count=(message.delivery_count or 0) + 1,
                         locked_until=locked_until)

    def _lookup(self, message: ReceivedMessage) -> _Held:
        held = self._held.get(message.lock_token)
        if held is None:
            raise LockLostError(
                f"lock lost for message {message.sequence_number} ({message.message_id}): it was settled already, "
                "or its lock was lost"
            )
        return held

    async def _settle(self, message: ReceivedMessage, settlement: Any) -> None:
        try:
            await settlement
        except _LOCK_LOST as exc:
            self._lost(message.lock_token, session_lost=isinstance(exc, SessionLockLostError))
            raise LockLostError(f"lock lost for message {message.sequence_number}: {exc}") from exc
        self._forget(message.lock_token)

    def _forget(self, token: str) -> None:
        """A settled message: its record's later messages may go; a drained session with nothing left closes."""
        held = self._held.pop(token, None)
        if held is None:
            return
        self._unbusy(held.logical)
        session = self._sessions.get(held.receiver)
        if session is None:
            return
        session.outstanding.discard(token)
        if not session.outstanding and (session.released or (
                session.drained and not session.pending and not _buffered(session.receiver))):
            self._close_session(session)

    def _lost(self, token: str, *, session_lost: bool) -> None:
        held = self._held.get(token)
        session = self._sessions.get(held.receiver) if held is not None else None
        if session_lost and session is not None:
            self._lose(session)  # every other message of that session lost its lock with it
        else:
            self._forget(token)


def _keep_late_arrivals(receiver: ServiceBusReceiver) -> None:
    """Have the SDK keep, for the next `receive_messages` call, what arrives on this link between calls.

    The credit of a call (our budget) stays open after it returns, and with no prefetch the SDK releases each
    message that arrives meanwhile: one settlement and one redelivery each, a delivery counted for nothing. That
    happens whenever a call's short wait for more ends while the event loop works a batch (the next batch is
    received during the work): 402 releases in the 10,000-record bench. So the receive context the SDK checks
    (private, azure-servicebus 7.15.0: `_receive_context`, `_handler._received_messages`) is left set between
    calls: such a message waits in the SDK's buffer, under its session's lock like our pending ones, and the next
    call of this session hands it out first (a session read short is read again while it holds some). What is
    still in the buffer when the session closes is released with it, as pending messages are. Without those
    attributes (another SDK release) nothing changes.
    """
    context = getattr(receiver, "_receive_context", None)
    if context is not None:
        context.set()


def _buffered(receiver: ServiceBusReceiver) -> int:
    """Messages the SDK holds for this receiver's next call (see `_keep_late_arrivals`); 0 when unknown."""
    buffered = getattr(getattr(receiver, "_handler", None), "_received_messages", None)
    return int(buffered.qsize()) if buffered is not None else 0
