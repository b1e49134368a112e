"""The Azure Service Bus `InboundQueue`: peek-lock, sessions, dead letters and schedules through azure-servicebus."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from azure.core.credentials_async import AsyncTokenCredential
from azure.servicebus import ServiceBusMessage, ServiceBusMessageState, ServiceBusReceivedMessage, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender
from azure.servicebus.aio.management import ServiceBusAdministrationClient
from azure.servicebus.exceptions import MessageSizeExceededError

from shared.core.envelope import QueueMessage, ReceivedMessage
from shared.core.ports import QueueDepth
from shared.runtime.azure.servicebus.receiving import _Receiving
from shared.runtime.azure.servicebus.settlement import _Settling
from shared.runtime.azure.servicebus.wire import (
    BUCKET_PREFIX,
    DEFAULT_MAX_CONCURRENT_SESSIONS,
    DEFAULT_SESSION_BUCKETS,
    SESSION_PROPERTY,
    SESSIONLESS_PREFIX,
    _aware,
    _received,
    session_bucket,
)

_PEEK_PAGE = 250

DepthSource = Literal["admin", "peek"]


class ServiceBusQueue(_Receiving, _Settling):
    """`InboundQueue` on an Azure Service Bus queue, through the async azure-servicebus client.

    Semantics are those of `SqliteQueue`, enforced by Service Bus itself: peek-lock deliveries in sequence
    order, delivery counts, `max_delivery_count` dead-lettering (its reason `MaxDeliveryCountExceeded` is read
    back as `MAX_DELIVERY_EXCEEDED`), scheduled messages and the dead-letter sub-queue. `max_delivery_count`
    and the lock duration are properties of the entity: `max_delivery_count` here only states what the queue
    was created with.

    Sessions (`sessions=True`, for a session-enabled queue; docs/sessions.md explains the choice). A message's
    own session id (the record's) is carried in the `SESSION_PROPERTY` application property, and its Service
    Bus session is a bucket, a stable hash of it (`session_bucket`, `session_buckets` of them), so one accept
    brings the messages of many records. A session-enabled queue refuses messages without a session id, so
    such a message gets a session of its own (`SESSIONLESS_PREFIX` + a random id) and reads back with
    `session_id=None`: like on the embedded queue it is ordered against nothing. `session_buckets=0` sends
    the shape of earlier releases, one Service Bus session per record; messages in that shape, or any other,
    are received alike, so a queue filled by an earlier release drains after an upgrade.

    `receive` reuses the sessions it holds (one receiver, one connection each) and accepts further ones
    (`NEXT_AVAILABLE_SESSION`) while fewer than `max_concurrent_sessions` are being read, until it has
    `max_messages` or none is offered within `session_wait_seconds`; the result is in sequence order. The
    port's ordering guarantee holds per record session: while a message of a record session is handed out
    and unsettled, no later message of it is handed out; such later messages are kept under this queue's
    session lock (pending) until it is settled. A bucket is only ever held by one receiver (Service Bus locks
    a session to one), so no other process gets a record's later messages either. Sessions with nothing
    outstanding stay open for the next `receive` (renewed then) until `release_sessions` or `close`.
    The lock of a session message is its session's lock: `renew_lock` renews the session, and with it every
    message the session delivered.

    `depth()` reads the queue's runtime properties through `ServiceBusAdministrationClient` (needs the
    Manage right). Against the development emulator or the test broker, which serve no
    management API, it browses (peeks) the queue and its dead-letter sub-queue and counts what it sees: exact
    but linear in the queue length, and on a session-enabled queue possible only where a non-session
    receiver may attach (the test broker allows it, Service Bus does not).
    """

    # ---------------------------------------------------------------------------------- construction

    @classmethod
    def from_connection_string(
        cls,
        conn_str: str,
        queue_name: str,
        *,
        max_delivery_count: int = 10,
        sessions: bool = False,
        session_wait_seconds: float = 1.0,
        depth_source: DepthSource | None = None,
        session_buckets: int = DEFAULT_SESSION_BUCKETS,
        max_concurrent_sessions: int = DEFAULT_MAX_CONCURRENT_SESSIONS,
    ) -> ServiceBusQueue:
        """Connect with a connection string; `UseDevelopmentEmulator=true` selects peek-based `depth()`."""
        emulator = "usedevelopmentemulator=true" in conn_str.replace(" ", "").lower()
        source = depth_source or ("peek" if emulator else "admin")
        admin = ServiceBusAdministrationClient.from_connection_string(conn_str) if source == "admin" else None
        return cls(
            ServiceBusClient.from_connection_string(conn_str),
            queue_name,
            # Accepting the next session fails with a timeout when none is free: that is an answer, not an
            # error to retry (the SDK would retry it three times, with back-off), so session receivers come
            # from a client without retries.
            session_client=ServiceBusClient.from_connection_string(conn_str, retry_total=0) if sessions else None,
            admin=admin,
            max_delivery_count=max_delivery_count,
            session_wait_seconds=session_wait_seconds,
            session_buckets=session_buckets,
            max_concurrent_sessions=max_concurrent_sessions,
        )

    @classmethod
    def from_namespace(
        cls,
        fully_qualified_namespace: str,
        credential: AsyncTokenCredential,
        queue_name: str,
        *,
        max_delivery_count: int = 10,
        sessions: bool = False,
        session_wait_seconds: float = 1.0,
        session_buckets: int = DEFAULT_SESSION_BUCKETS,
        max_concurrent_sessions: int = DEFAULT_MAX_CONCURRENT_SESSIONS,
    ) -> ServiceBusQueue:
        """Connect with an Entra ID identity (e.g. `azure.identity.aio.DefaultAzureCredential`)."""
        return cls(
            ServiceBusClient(fully_qualified_namespace, credential),
            queue_name,
            session_client=(
                ServiceBusClient(fully_qualified_namespace, credential, retry_total=0) if sessions else None
            ),
            admin=ServiceBusAdministrationClient(fully_qualified_namespace, credential),
            max_delivery_count=max_delivery_count,
            session_wait_seconds=session_wait_seconds,
            session_buckets=session_buckets,
            max_concurrent_sessions=max_concurrent_sessions,
        )

    # ------------------------------------------------------------------------------------------ send

    async def send(self, messages: Sequence[QueueMessage], *, scheduled_at: datetime | None = None) -> None:
        """Send in as few batches as fit, or schedule them all for `scheduled_at` (a past time: now)."""
        if not messages:
            return
        outgoing = [self._outgoing(m) for m in messages]
        async with self._send_lock:
            await self._send(outgoing, scheduled_at)

    async def _send(self, outgoing: list[ServiceBusMessage], scheduled_at: datetime | None) -> None:
        sender = await self._get_sender()
        if scheduled_at is not None:
            await sender.schedule_messages(outgoing, _aware(scheduled_at))
            return
        batch = await sender.create_message_batch()
        for message in outgoing:
            try:
                batch.add_message(message)
            except MessageSizeExceededError:
                if len(batch) == 0:
                    raise  # one message alone is over the entity's size limit
                await sender.send_messages(batch)
                batch = await sender.create_message_batch()
                batch.add_message(message)
        await sender.send_messages(batch)

    def _outgoing(self, message: QueueMessage) -> ServiceBusMessage:
        session_id = message.session_id
        if session_id is not None and session_id.startswith((SESSIONLESS_PREFIX, BUCKET_PREFIX)):
            raise ValueError(f"session ids starting with {SESSIONLESS_PREFIX!r} or {BUCKET_PREFIX!r} are reserved")
        properties: dict[str, Any] = dict(message.application_properties)
        if SESSION_PROPERTY in properties:
            raise ValueError(f"the application property {SESSION_PROPERTY!r} is reserved")
        if self.sessions and self.session_buckets and session_id is not None:
            properties[SESSION_PROPERTY] = session_id
            session_id = session_bucket(session_id, self.session_buckets)
        elif session_id is None and self.sessions:
            session_id = f"{SESSIONLESS_PREFIX}{uuid.uuid4().hex}"
        return ServiceBusMessage(
            message.body,
            message_id=message.message_id,
            session_id=session_id,
            correlation_id=message.correlation_id,
            content_type=message.content_type,
            application_properties=properties,  # type: ignore[arg-type]
        )

    async def _get_sender(self) -> ServiceBusSender:
        if self._sender is None:
            self._sender = self._client.get_queue_sender(self.name)
        return self._sender

    # ---------------------------------------------------------------------------------- dead letters

    async def peek_dead_letters(self, max_messages: int = 100) -> list[ReceivedMessage]:
        """Browse the DLQ in sequence order without locking (lock_token is "")."""
        if max_messages < 1:
            return []
        peeked = await self._peek(self._dead_letter_receiver(), max_messages)
        return [_received(m, lock_token="", delivery_count=m.delivery_count or 0, locked_until=None) for m in peeked]

    async def receive_dead_letters(self, max_messages: int) -> list[ReceivedMessage]:
        """Peek-lock DLQ messages in sequence order (the DLQ never dead-letters, whatever the count)."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        async with self._receive_lock:
            receiver = await self._open(self._dead_letter_receiver())
            got = await receiver.receive_messages(max_message_count=max_messages, max_wait_time=self._wait)
        return [self._hold(m, receiver, dead=True) for m in got]

    async def peek_messages(self, max_messages: int = 100) -> list[ReceivedMessage]:
        """Browse the main queue in sequence order without locking (lock_token is ""); scheduled ones carry
        `scheduled_at`. Browsed through the plain receiver, as `depth` does without the management API: the
        development emulator and the test broker allow it on a session-enabled queue, Service Bus refuses it
        (the SDK's error is raised; `syncline trace` then says it could not browse the queue)."""
        if max_messages < 1:
            return []
        peeked = await self._peek(self._main_receiver(), max_messages)
        found = []
        for m in peeked:
            message = _received(m, lock_token="", delivery_count=m.delivery_count or 0, locked_until=None)
            if m.state == ServiceBusMessageState.SCHEDULED and m.scheduled_enqueue_time_utc is not None:
                message = message.model_copy(update={"scheduled_at": m.scheduled_enqueue_time_utc})
            found.append(message)
        return found

    def _dead_letter_receiver(self) -> ServiceBusReceiver:
        if self._dead_receiver is None:
            self._dead_receiver = self._client.get_queue_receiver(self.name, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
        return self._dead_receiver

    @staticmethod
    async def _peek(receiver: ServiceBusReceiver, limit: int | None) -> list[ServiceBusReceivedMessage]:
        """Browse from the first message on (Service Bus pages peeks: keep asking until it has no more)."""
        found: list[ServiceBusReceivedMessage] = []
        start = 1  # 0 would mean "where this receiver's last peek ended"
        while limit is None or len(found) < limit:
            count = _PEEK_PAGE if limit is None else min(_PEEK_PAGE, limit - len(found))
            page = await receiver.peek_messages(max_message_count=count, sequence_number=start)
            if not page:
                break
            found.extend(page)
            start = (page[-1].sequence_number or 0) + 1
        return found

    # ------------------------------------------------------------------------------------------- misc

    async def depth(self) -> QueueDepth:
        """Active (incl. locked and deferred), scheduled and dead-lettered message counts."""
        if self._admin is not None:
            properties = await self._admin.get_queue_runtime_properties(self.name)
            return QueueDepth(
                active=properties.active_message_count or 0,
                scheduled=properties.scheduled_message_count or 0,
                dead_letter=properties.dead_letter_message_count or 0,
            )
        main, dead = await asyncio.gather(
            self._peek(self._main_receiver(), None), self._peek(self._dead_letter_receiver(), None)
        )
        scheduled = sum(1 for m in main if m.state == ServiceBusMessageState.SCHEDULED)
        return QueueDepth(active=len(main) - scheduled, scheduled=scheduled, dead_letter=len(dead))

    async def close(self) -> None:
        """Close every link and client; unsettled messages are released when their lock expires."""
        receivers = [s.receiver for s in self._sessions.values()]
        self._sessions.clear()
        self._busy.clear()
        self._held.clear()
        for handler in (*receivers, self._receiver, self._dead_receiver, self._sender):
            if handler is not None:
                self._close_later(handler)
        await asyncio.gather(*self._closing)
        for client in (self._session_client, self._client, self._admin):
            if client is not None:
                await client.close()

