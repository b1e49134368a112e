"""The AMQP 1.0 side of the test broker: what the azure-servicebus SDK sends and expects, on python-qpid-proton.

One proton `Container` runs in a daemon thread and owns every entity; other threads reach it only through
`BrokerHandle`, whose calls are marshalled onto that thread. Wire conventions follow Service Bus:

* SASL ANONYMOUS, then a claims-based-security `put-token` on `$cbs` (any token is accepted);
* entity links addressed by URI (`amqps://host:port/<queue>`, `.../<queue>/$DeadLetterQueue`); a receive link
  carrying a `com.microsoft:session-filter` accepts a session (a null filter value: the next available one,
  waiting up to the link's `com.microsoft:timeout`), and is attached with the session id and its
  `com.microsoft:locked-until-utc`;
* batches (message format 0x80013700): each `data` section of the envelope is a whole encoded message;
* deliveries carry the lock token as their tag (`uuid.UUID(bytes_le=tag)`), the header `delivery-count`
  (previous attempts) and the `x-opt-*` annotations; peek-lock links settle in mode `second`, so every
  outcome is echoed back: accepted = complete, modified = abandon (`undeliverable-here`: defer),
  rejected with `com.microsoft:dead-letter` = dead-letter (echoed without the error, which would mean
  failure), released = not processed; a lost lock is echoed as rejected with `message-lock-lost` /
  `session-lock-lost`;
* `<entity>/$management` request/response operations, status in the `statusCode` application property;
  `update-disposition` settles many lock tokens in one request, link-received ones too (as the SDKs' fallbacks
  use it), each of them still locked and, for a session message, of the request's `session-id`; one that is
  not fails the request with 410 and the condition of the lost lock. All or nothing: nothing is applied then
  (the service documents no partial outcome; the adapter does not rely on either, docs/sessions.md).

Latency (`start_broker(latency_ms=...)`, `BrokerHandle.latency_ms`, or `SYNCLINE_EMULATOR_LATENCY_MS`; 0 by
default): every operation a client waits for is answered that much later, as a cloud round trip would be, without
holding up other clients: a link attach (a session accept included), a transfer in (a send, a batch counting
once; a CBS put-token; a management request), a flow (a receive: deliveries wait for it), a settlement echo and a
detach echo. `BrokerHandle.operations()` counts them by kind (connections are counted, not delayed).

Deviations from Service Bus, on purpose: the clock can be moved forward (`BrokerHandle.advance`), so that
tests of lock expiry and schedules need not sleep; a receive link without a session filter on a session
entity is accepted but never delivers (Service Bus refuses it; the Python SDK opens its receive link even
to peek, and browsing a session entity is what such a link is good for here). A batch is recognised by its
body rather than by its message format, which proton's Python binding does not expose.
Not implemented: topics and subscriptions, transactions, auto-forwarding, duplicate detection, partitions,
message size limits, authorisation (every token is accepted).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar
from urllib.parse import urlsplit

from proton import (
    Array,
    Condition,
    Data,
    DataException,
    Delivery,
    Described,
    Endpoint,
    Event,
    Handler,
    Link,
    Message,
    Receiver,
    Sender,
    Terminus,
    int32,
    symbol,
    timestamp,
)
from proton.reactor import ApplicationEvent, Container, EventInjector

from sandbox.latency_proxy import check_latency, latency_from_environment
from tests.sbbroker.entities import (
    Consumer,
    LockLost,
    Queue,
    QueueSettings,
    StoredMessage,
)

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")

DEAD_LETTER_SUFFIX = "/$deadletterqueue"
MANAGEMENT_SUFFIX = "/$management"
SESSION_FILTER = symbol("com.microsoft:session-filter")
SESSION_LOCKED_UNTIL = symbol("com.microsoft:locked-until-utc")
LINK_TIMEOUT = symbol("com.microsoft:timeout")
DEAD_LETTER_CONDITION = "com.microsoft:dead-letter"
_DATA_SECTION = 0x75
_SECTION_CODES = range(0x70, 0x79)  # header .. footer: the descriptors an encoded message consists of
_DOTNET_EPOCH_TICKS = 621355968000000000  # .NET ticks at 1970-01-01, as the session lock time is sent
_TICK_SECONDS = 0.02
_CREDIT = 100
_DEFAULT_SESSION_WAIT = 65.0  # what Service Bus waits for a session when the client names no timeout


class BrokerClock:
    """Wall-clock time plus an offset that tests move forward; the broker's only notion of "now"."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


class _Consumer(Consumer):
    """A receive link (our sender) on an entity, once attached; `pending_until` while it waits for a session."""

    def __init__(self, queue: Queue, link: Sender, *, dead: bool, wants_session: bool, session_id: str | None,
                 pending_until: float) -> None:
        super().__init__(dead=dead, link_name=link.name)
        self.queue = queue
        self.link = link
        self.wants_session = wants_session
        self.requested_session = session_id
        self.pending_until = pending_until
        self.attached = False
        self.ready_at = 0.0
        """Monotonic time before which nothing is delivered: a flow's round trip under latency."""


def _ms(seconds: float) -> timestamp:
    return timestamp(round(seconds * 1000))


def _entity_path(address: str | None) -> str:
    """`amqps://host:port/q/$DeadLetterQueue` -> `q/$deadletterqueue` (Service Bus names ignore case)."""
    if not address:
        return ""
    path = urlsplit(address).path if "://" in address else address
    return path.strip("/").lower()


def split_messages(raw: bytes) -> list[Message]:
    """Decode a transfer: one message, or each message of a batch envelope.

    A batch's body is a series of `data` sections that each hold a complete encoded message; proton's
    `Message` keeps one body section only, so the sections are read from the raw bytes here.
    """
    bodies: list[bytes] = []
    data = Data()
    rest = raw
    while rest:
        data.clear()
        consumed = data.decode(rest)
        data.rewind()
        data.next()
        value = data.get_object()
        if isinstance(value, Described) and value.descriptor == _DATA_SECTION:
            bodies.append(bytes(value.value))  # copied: the decoder reuses its buffer
        rest = rest[consumed:]
    if bodies and all(_is_encoded_message(body) for body in bodies):
        messages = []
        for body in bodies:
            message = Message()
            message.decode(body)
            messages.append(message)
        return messages
    message = Message()
    message.decode(raw)
    return [message]


def _is_encoded_message(raw: bytes) -> bool:
    # An encoded message starts with a section descriptor: 0x00, then smallulong 0x53 with a section code
    return len(raw) > 3 and raw[0] == 0x00 and raw[1] == 0x53 and raw[2] in _SECTION_CODES


class _DelayTimer(Handler):
    """Wakes the broker when its oldest delayed operation is due (the broker's own timer is its 20 ms tick)."""

    def __init__(self, broker: _Broker) -> None:
        super().__init__()
        self.broker = broker

    def on_timer_task(self, event: Event) -> None:
        self.broker.run_due()


class _Broker(Handler):
    """The proton event handler: every callback runs on the broker thread."""

    def __init__(self, clock: BrokerClock, latency_seconds: float = 0.0) -> None:
        super().__init__()
        self.clock = clock
        self.latency = latency_seconds
        self.operations: Counter[str] = Counter()
        # One constant delay makes due times non-decreasing: a FIFO keeps operations in arrival order (a send
        # and the settlement after it never swap), which a heap of equal deadlines would not promise.
        self.delayed: deque[tuple[float, Callable[[], None]]] = deque()
        self.delay_timer = _DelayTimer(self)
        self.container: Any = None
        self.queues: dict[str, Queue] = {}
        self.consumers: list[_Consumer] = []
        self.calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self.injector = EventInjector()
        self.acceptor: Any = None
        self.connections: list[Any] = []

    # ---------------------------------------------------------------------------------- cross-thread

    def on_reactor_init(self, event: Event) -> None:
        self.container = event.container
        event.container.selectable(self.injector)
        event.container.schedule(_TICK_SECONDS, self)

    def on_sb_call(self, event: Event) -> None:
        while not self.calls.empty():
            call, future = self.calls.get()
            try:
                future.set_result(call())
            except Exception as exc:  # handed to the calling thread
                future.set_exception(exc)
        self.pump()

    def on_timer_task(self, event: Event) -> None:
        self.pump()
        event.container.schedule(_TICK_SECONDS, self)

    # -------------------------------------------------------------------------------------- latency

    def later(self, operation: str, action: Callable[[], None]) -> None:
        """Count one operation and perform `action` (its answer) one latency from now; at once without one."""
        self.operations[operation] += 1
        if self.latency <= 0:
            action()
            return
        due = time.monotonic() + self.latency
        if not self.delayed:
            self.container.schedule(self.latency, self.delay_timer)
        self.delayed.append((due, action))

    def run_due(self) -> None:
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            _, action = self.delayed.popleft()
            try:
                action()
            except Exception:  # one client's vanished link must not stop the others' answers
                _LOG.exception("a delayed broker operation failed")
        if self.delayed:
            self.container.schedule(max(self.delayed[0][0] - now, 0.0), self.delay_timer)
        self.pump()

    # ---------------------------------------------------------------------------------- connections

    def on_connection_bound(self, event: Event) -> None:
        # The acceptor binds a bare server transport: SASL must be switched on here, or the SDK's SASL
        # header is refused.
        sasl = event.transport.sasl()
        sasl.allowed_mechs("ANONYMOUS")
        self.connections.append(event.connection)
        self.operations["connect"] += 1

    def on_connection_remote_open(self, event: Event) -> None:
        if event.connection.state & Endpoint.LOCAL_UNINIT:
            event.connection.container = "syncline-test-broker"
            event.connection.open()

    def on_session_remote_open(self, event: Event) -> None:
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.open()

    def on_connection_remote_close(self, event: Event) -> None:
        self._drop_links(event.connection)
        event.connection.close()

    def on_session_remote_close(self, event: Event) -> None:
        event.session.close()

    def on_transport_closed(self, event: Event) -> None:
        if event.connection is not None:
            self._drop_links(event.connection)
            if event.connection in self.connections:
                self.connections.remove(event.connection)

    def _drop_links(self, connection: Any) -> None:
        now = self.clock.now()
        for consumer in [c for c in self.consumers if c.link.connection == connection]:
            self._forget(consumer, now)

    # ---------------------------------------------------------------------------------------- links

    def on_link_remote_open(self, event: Event) -> None:
        link = event.link
        if link.state & Endpoint.LOCAL_UNINIT:
            self.later("attach", lambda: self._attach(link))

    def _attach(self, link: Link) -> None:
        if not link.state & Endpoint.LOCAL_UNINIT or link.state & Endpoint.REMOTE_CLOSED:
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        if isinstance(link, Receiver):  # the client sends: to $cbs, a management node or an entity
            path = _entity_path(link.remote_target.address).removesuffix(MANAGEMENT_SUFFIX)
            if path != "$cbs" and self._queue_of(path) is None:
                self._refuse(link, "amqp:not-found", f"the messaging entity {path!r} could not be found")
                return
            link.open()
            link.flow(_CREDIT)
            return
        path = _entity_path(link.remote_source.address)
        if path == "$cbs" or path.endswith(MANAGEMENT_SUFFIX):
            link.open()  # a reply link
            return
        found = self._queue_of(path)
        if found is None:
            self._refuse(link, "amqp:not-found", f"the messaging entity {path!r} could not be found")
            return
        entity, dead = found
        filters = self._source_filters(link)
        wants_session = SESSION_FILTER in filters
        if wants_session and (dead or not entity.settings.requires_session):
            self._refuse(link, "amqp:not-allowed", f"{path!r} is not a session-enabled entity")
            return
        timeout = (link.remote_properties or {}).get(LINK_TIMEOUT)
        wait = int(timeout) / 1000 if timeout is not None else _DEFAULT_SESSION_WAIT
        consumer = _Consumer(entity, link, dead=dead, wants_session=wants_session,
                             session_id=filters.get(SESSION_FILTER), pending_until=time.monotonic() + wait)
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.sb_consumer = consumer
        self.consumers.append(consumer)
        if not wants_session:
            consumer.attached = True
            link.open()
        else:
            self._try_accept_session(consumer)

    @staticmethod
    def _source_filters(link: Link) -> dict[Any, Any]:
        data = link.remote_source.filter
        data.rewind()
        if not data.next():
            return {}
        value = data.get_object()
        return dict(value) if isinstance(value, dict) else {}

    @staticmethod
    def _refuse(link: Link, condition: str, description: str) -> None:
        # as Service Bus does: an attach without a source or target, then a detach with the error (an attach
        # that looked successful would let the SDK report the link as open before it reads the detach)
        link.source.type = Terminus.UNSPECIFIED
        link.target.type = Terminus.UNSPECIFIED
        link.open()
        link.condition = _error(condition, description)
        link.close()

    def _try_accept_session(self, consumer: _Consumer) -> None:
        """Attach a session receiver once it holds a session, or fail it when its wait is over."""
        link = consumer.link
        try:
            lock = consumer.queue.accept_session(consumer.requested_session, consumer, self.clock.now())
        except LockLost as lost:
            self.consumers.remove(consumer)
            self._refuse(link, lost.condition, lost.description)
            return
        if lock is None:
            if time.monotonic() >= consumer.pending_until:
                self.consumers.remove(consumer)
                self._refuse(link, "com.microsoft:timeout", "no session was available within the timeout")
            return
        link.source.filter.clear()
        link.source.filter.put_dict({SESSION_FILTER: lock.session_id})
        ticks = round(lock.locked_until * 10_000_000) + _DOTNET_EPOCH_TICKS
        link.properties = {SESSION_LOCKED_UNTIL: ticks}
        consumer.attached = True
        link.open()

    def on_link_remote_close(self, event: Event) -> None:
        link = event.link
        consumer = getattr(link, "sb_consumer", None)
        if consumer is not None:
            self._forget(consumer, self.clock.now())
        self.later("detach", lambda: None if link.state & Endpoint.LOCAL_CLOSED else link.close())

    on_link_remote_detach = on_link_remote_close

    def _forget(self, consumer: _Consumer, now: float) -> None:
        if consumer in self.consumers:
            self.consumers.remove(consumer)
            consumer.queue.release_consumer(consumer, now)

    def on_link_flow(self, event: Event) -> None:
        consumer = getattr(event.link, "sb_consumer", None)
        if consumer is None:
            return
        if self.latency > 0:
            # a receive: what its credit brings arrives one round trip later
            consumer.ready_at = time.monotonic() + self.latency
            self.later("receive", lambda: self._feed(consumer, self.clock.now()))
        else:
            self.operations["receive"] += 1
            self._feed(consumer, self.clock.now())

    # ------------------------------------------------------------------------------------ deliveries

    def pump(self) -> None:
        """Resolve waiting session receivers and deliver whatever became deliverable (time moves on)."""
        now = self.clock.now()
        for consumer in list(self.consumers):
            if not consumer.attached:
                self._try_accept_session(consumer)
            elif consumer in self.consumers:
                self._feed(consumer, now)

    def _feed(self, consumer: _Consumer, now: float) -> None:
        link = consumer.link
        if not consumer.attached or link.state & Endpoint.LOCAL_CLOSED or consumer.ready_at > time.monotonic():
            return
        while link.credit > 0:
            message = consumer.queue.next_for(consumer, now)
            if message is None:
                break
            token = consumer.queue.lock(message, consumer, now)
            delivery = link.delivery(token.bytes_le)
            delivery.sb_token = token
            link.send(self._encode(consumer.queue, message, now, received=True))
            link.advance()
        if link.drain_mode and link.credit > 0:
            link.drained()

    def _encode(self, entity: Queue, stored: StoredMessage, now: float, *, received: bool) -> bytes:
        """The message as delivered: the client's encoding plus the broker's header and annotations."""
        message = Message()
        message.decode(stored.raw)
        # header delivery-count is the number of *previous* attempts; a receive just made one more
        message.delivery_count = stored.delivery_count - 1 if received else stored.delivery_count
        annotations = dict(message.annotations or {})
        annotations[symbol("x-opt-sequence-number")] = stored.sequence_number
        annotations[symbol("x-opt-enqueued-time")] = _ms(stored.enqueued_at)
        state = 1 if stored.deferred else 2 if stored.visible_at > now else 0
        annotations[symbol("x-opt-message-state")] = int32(state)
        if stored.lock_token is not None:
            annotations[symbol("x-opt-locked-until")] = _ms(stored.locked_until)
        message.annotations = annotations
        if stored.dead_letter is not None:
            properties = dict(message.properties or {})
            properties["DeadLetterReason"], properties["DeadLetterErrorDescription"] = stored.dead_letter
            message.properties = properties
        return message.encode()

    def on_delivery(self, event: Event) -> None:
        delivery = event.delivery
        if isinstance(event.link, Receiver):
            if delivery.readable and not delivery.partial:
                self._incoming(event.link, delivery)
        elif delivery.updated:
            self._settlement(event.link, delivery)

    def _incoming(self, link: Receiver, delivery: Delivery) -> None:
        chunks = []
        while (chunk := link.recv(1 << 16)) is not None and chunk:
            chunks.append(chunk)
        link.advance()
        if link.credit < _CREDIT // 2:
            link.flow(_CREDIT - link.credit)
        path = _entity_path(link.remote_target.address)
        try:
            messages = split_messages(b"".join(chunks))
        except (ValueError, KeyError, DataException) as exc:  # undecodable: refused, not the broker's end
            problem = exc  # `exc` is unbound after the handler; the delayed answer needs it
            self.later("send", lambda: self._answer(delivery, problem))
            return
        if path == "$cbs":
            operation = "cbs"
        elif path.endswith(MANAGEMENT_SUFFIX):
            operation = "management:" + str((messages[0].properties or {}).get("operation", "")).split(":")[-1]
        else:
            operation = "send"
        self.later(operation, lambda: self._apply_incoming(link, delivery, path, messages))

    def _apply_incoming(self, link: Receiver, delivery: Delivery, path: str, messages: list[Message]) -> None:
        try:
            if path == "$cbs":
                self._reply(link, messages[0], {"status-code": int32(202), "status-description": "Accepted"})
            elif path.endswith(MANAGEMENT_SUFFIX):
                self._management(link, path[: -len(MANAGEMENT_SUFFIX)], messages[0])
            else:
                self._enqueue(path, messages)
        except (ValueError, KeyError) as exc:
            self._answer(delivery, exc)
            return
        self._answer(delivery, None)

    def _answer(self, delivery: Delivery, problem: Exception | None) -> None:
        if problem is None:
            delivery.update(Delivery.ACCEPTED)
        else:
            delivery.local.condition = _error("com.microsoft:argument-error", str(problem))
            delivery.update(Delivery.REJECTED)
        delivery.settle()
        self.pump()

    def _enqueue(self, path: str, messages: list[Message]) -> list[int]:
        found = self._queue_of(path)
        if found is None or found[1]:
            raise ValueError(f"cannot send to {path!r}")
        entity = found[0]
        now = self.clock.now()
        numbers = []
        for message in messages:
            scheduled = (message.annotations or {}).get(symbol("x-opt-scheduled-enqueue-time"))
            at = _seconds(scheduled) if scheduled is not None else None
            ttl = message.ttl or None
            stored = entity.enqueue(message.encode(), session_id=message.group_id or None, ttl=ttl, now=now,
                                    scheduled_at=at)
            numbers.append(stored.sequence_number)
        return numbers

    def _settlement(self, link: Link, delivery: Delivery) -> None:
        """The client settled one of our deliveries: apply it, then echo the outcome (settle mode second)."""
        consumer: _Consumer | None = getattr(link, "sb_consumer", None)
        token: uuid.UUID | None = getattr(delivery, "sb_token", None)
        if consumer is None or token is None:  # a management or CBS reply: nothing to apply
            if delivery.settled:
                delivery.settle()
            return
        if delivery.local_state or getattr(delivery, "sb_settling", False):  # settled by us, or about to be
            return
        remote = delivery.remote
        outcome = {
            Delivery.ACCEPTED: "complete",
            Delivery.REJECTED: "dead-letter",
            Delivery.RELEASED: "release",
            Delivery.MODIFIED: "defer" if remote.undeliverable else "abandon",
        }.get(delivery.remote_state)
        if outcome is None:
            return
        reason = description = ""
        if outcome == "dead-letter" and remote.condition is not None:
            info = {str(k): v for k, v in dict(remote.condition.info or {}).items()}
            reason = str(info.get("DeadLetterReason") or "")
            description = str(info.get("DeadLetterErrorDescription") or remote.condition.description or "")
        delivery.sb_settling = True
        self.later("settle", lambda: self._apply_settlement(consumer, delivery, token, outcome, reason, description))

    def _apply_settlement(self, consumer: _Consumer, delivery: Delivery, token: uuid.UUID, outcome: str,
                          reason: str, description: str) -> None:
        remote = delivery.remote
        try:
            consumer.queue.settle(token, outcome, self.clock.now(), reason=reason, description=description)
        except (LockLost, ValueError) as exc:
            condition = exc.condition if isinstance(exc, LockLost) else "com.microsoft:argument-error"
            delivery.local.condition = _error(condition, str(exc))
            delivery.update(Delivery.REJECTED)
        else:
            if delivery.remote_state == Delivery.MODIFIED:
                delivery.local.failed = remote.failed
                delivery.local.undeliverable = remote.undeliverable
            delivery.update(delivery.remote_state)
        delivery.settle()
        self.pump()

    # ------------------------------------------------------------------------------------ management

    def _management(self, link: Receiver, path: str, request: Message) -> None:
        properties = request.properties or {}
        operation = str(properties.get("operation", ""))
        body = request.body if isinstance(request.body, dict) else {}
        found = self._queue_of(path)
        status, reply, error = 200, None, None
        handler = _OPERATIONS.get(operation)
        if found is None:
            status, error = 404, ("amqp:not-found", f"the messaging entity {path!r} could not be found")
        elif handler is None:
            status, error = 501, ("amqp:not-implemented", f"{operation!r} is not supported by the test broker")
        else:
            try:
                status, reply = handler(self, found[0], found[1], body, properties)
            except LockLost as lost:
                status, error = 410, (lost.condition, lost.description)
            except (KeyError, ValueError, TypeError) as exc:
                status, error = 400, ("com.microsoft:argument-error", f"{operation}: {exc!r}")
        application = {"statusCode": int32(status), "statusDescription": error[1] if error else "OK"}
        if error:
            application["errorCondition"] = symbol(error[0])
        self._reply(link, request, application, reply)

    def _reply(self, link: Link, request: Message, application: dict[str, Any], body: Any = None) -> None:
        """Answer on the client's receive link of the same node and connection (request/response pattern)."""
        node = _entity_path(request.reply_to) or _entity_path(link.remote_target.address)
        mask = Endpoint.LOCAL_ACTIVE | Endpoint.REMOTE_ACTIVE
        candidate = link.connection.link_head(mask)
        while candidate is not None:
            if isinstance(candidate, Sender) and _entity_path(candidate.remote_source.address) == node:
                candidate.send(Message(body=body, properties=application, correlation_id=request.id))
                return
            candidate = candidate.next(mask)
        _LOG.warning("no reply link for %s on this connection", node)

    def _messages_reply(self, entity: Queue, stored: list[StoredMessage], *, lock: bool) -> tuple[int, Any]:
        if not stored:
            return 204, None
        now = self.clock.now()
        items = []
        for message in stored:
            item: dict[str, Any] = {"message": self._encode(entity, message, now, received=lock)}
            if lock:
                item["lock-token"] = message.lock_token
            items.append(item)
        return 200, {"messages": items}

    def _op_peek(self, entity: Queue, dead: bool, body: dict[str, Any], _: Mapping[str, Any]) -> tuple[int, Any]:
        entity.tick(self.clock.now())
        found = entity.peek(dead=dead, from_sequence_number=int(body["from-sequence-number"]),
                            count=int(body["message-count"]), session_id=body.get("session-id"))
        return self._messages_reply(entity, found, lock=False)

    def _op_renew_lock(self, entity: Queue, _: bool, body: dict[str, Any], __: Mapping[str, Any]) -> tuple[int, Any]:
        now = self.clock.now()
        return 200, {"expirations": [_ms(entity.renew(token, now)) for token in _tokens(body)]}

    def _op_update_disposition(
        self, entity: Queue, _: bool, body: dict[str, Any], __: Mapping[str, Any]
    ) -> tuple[int, Any]:
        outcome = {"completed": "complete", "abandoned": "abandon", "defered": "defer",
                   "suspended": "dead-letter"}[str(body["disposition-status"])]
        now = self.clock.now()
        tokens = _tokens(body)
        if len(set(tokens)) < len(tokens):
            raise ValueError("a lock token is named twice")
        session_id = body.get("session-id")
        for token in tokens:  # all or nothing: every token is checked before any is applied
            message = entity.held_in_session(token, str(session_id) if session_id is not None else None, now)
            if outcome == "dead-letter" and message.dead_letter is not None:
                raise ValueError("a message in the dead-letter sub-queue cannot be dead-lettered again")
        for token in tokens:
            entity.settle(token, outcome, now, reason=str(body.get("deadletter-reason") or ""),
                          description=str(body.get("deadletter-description") or ""))
        return 200, None

    def _op_schedule(self, entity: Queue, dead: bool, body: dict[str, Any], _: Mapping[str, Any]) -> tuple[int, Any]:
        if dead:
            raise ValueError("cannot schedule into a dead-letter sub-queue")
        messages = [m for item in body["messages"] for m in split_messages(bytes(item["message"]))]
        return 200, {"sequence-numbers": self._enqueue(entity.name, messages)}

    def _op_cancel_scheduled(
        self, entity: Queue, _: bool, body: dict[str, Any], __: Mapping[str, Any]
    ) -> tuple[int, Any]:
        entity.cancel_scheduled(_numbers(body), self.clock.now())
        return 200, None

    def _op_receive_by_sequence_number(
        self, entity: Queue, dead: bool, body: dict[str, Any], properties: Mapping[str, Any]
    ) -> tuple[int, Any]:
        if dead:
            raise ValueError("deferred messages live in the main queue")
        now = self.clock.now()
        entity.tick(now)
        holder = self._associated(properties) or Consumer()
        return self._messages_reply(entity, entity.receive_deferred(_numbers(body), holder, now), lock=True)

    def _op_renew_session_lock(
        self, entity: Queue, _: bool, body: dict[str, Any], __: Mapping[str, Any]
    ) -> tuple[int, Any]:
        return 200, {"expiration": _ms(entity.renew_session(str(body["session-id"]), self.clock.now()))}

    def _op_get_session_state(
        self, entity: Queue, _: bool, body: dict[str, Any], __: Mapping[str, Any]
    ) -> tuple[int, Any]:
        session_id = str(body["session-id"])
        entity.session_lock(session_id, self.clock.now())
        return 200, {"session-state": entity.session_states.get(session_id)}

    def _op_set_session_state(
        self, entity: Queue, _: bool, body: dict[str, Any], __: Mapping[str, Any]
    ) -> tuple[int, Any]:
        session_id = str(body["session-id"])
        entity.session_lock(session_id, self.clock.now())
        state = body.get("session-state")
        if state is None:
            entity.session_states.pop(session_id, None)
        else:
            entity.session_states[session_id] = bytes(state)
        return 200, None

    def _associated(self, properties: Mapping[str, Any]) -> _Consumer | None:
        name = properties.get("associated-link-name")
        return next((c for c in self.consumers if name and c.link_name == name), None)

    # ------------------------------------------------------------------------------------------ misc

    def _queue_of(self, path: str) -> tuple[Queue, bool] | None:
        """The queue an entity path names, and whether it is the dead-letter sub-queue."""
        dead = path.endswith(DEAD_LETTER_SUFFIX)
        entity = self.queues.get(path[: -len(DEAD_LETTER_SUFFIX)] if dead else path)
        return (entity, dead) if entity is not None else None

    def shutdown(self, container: Container) -> None:
        if self.acceptor is not None:
            self.acceptor.close()
        for connection in list(self.connections):
            connection.close()
        self.injector.close()
        container.stop()


_Operation = Callable[[_Broker, Queue, bool, dict[str, Any], Mapping[str, Any]], tuple[int, Any]]
_OPERATIONS: dict[str, _Operation] = {
    "com.microsoft:peek-message": _Broker._op_peek,
    "com.microsoft:renew-lock": _Broker._op_renew_lock,
    "com.microsoft:update-disposition": _Broker._op_update_disposition,
    "com.microsoft:schedule-message": _Broker._op_schedule,
    "com.microsoft:cancel-scheduled-message": _Broker._op_cancel_scheduled,
    "com.microsoft:receive-by-sequence-number": _Broker._op_receive_by_sequence_number,
    "com.microsoft:renew-session-lock": _Broker._op_renew_session_lock,
    "com.microsoft:get-session-state": _Broker._op_get_session_state,
    "com.microsoft:set-session-state": _Broker._op_set_session_state,
}


def _error(condition: str, description: str) -> Condition:
    # The SDK's sender reads an error as a full (condition, description, info) triple and fails on a shorter
    # one; proton leaves out an empty info map, so it carries a tracking id (as Service Bus errors do).
    return Condition(symbol(condition), description, {symbol("com.microsoft:tracking-id"): uuid.uuid4().hex})


def _tokens(body: Mapping[str, Any]) -> list[uuid.UUID]:
    value = body["lock-tokens"]
    return [uuid.UUID(str(t)) for t in (value.elements if isinstance(value, Array) else value)]


def _numbers(body: Mapping[str, Any]) -> list[int]:
    value = body["sequence-numbers"]
    return [int(n) for n in (value.elements if isinstance(value, Array) else value)]


def _seconds(value: Any) -> float:
    return int(value) / 1000  # an AMQP timestamp: milliseconds since the epoch


class BrokerHandle:
    """A running broker: its connection string, entity set-up, clock and shutdown (usable from any thread)."""

    def __init__(self, broker: _Broker, container: Container, thread: threading.Thread, port: int) -> None:
        self._broker = broker
        self._container = container
        self._thread = thread
        self.host = "127.0.0.1"
        self.port = port
        self.clock = broker.clock

    @property
    def connection_string(self) -> str:
        return (
            f"Endpoint=sb://{self.host}:{self.port};SharedAccessKeyName=x;SharedAccessKey=y;"
            "UseDevelopmentEmulator=true"
        )

    def _call(self, call: Callable[[], _T], timeout: float = 10.0) -> _T:
        if not self._thread.is_alive():
            raise RuntimeError("the test broker is not running")
        future: Future[_T] = Future()
        self._broker.calls.put((call, future))
        self._broker.injector.trigger(ApplicationEvent("sb_call"))
        return future.result(timeout)

    def create_queue(self, name: str, **settings: Any) -> None:
        """Create (or replace) a queue; settings are `QueueSettings` fields."""
        entity = Queue(name.lower(), QueueSettings(**settings))
        self._call(lambda: self._broker.queues.__setitem__(entity.name, entity))

    @property
    def latency_ms(self) -> float:
        """Milliseconds added to each operation (see the module docstring); settable while running."""
        return self._broker.latency * 1000

    @latency_ms.setter
    def latency_ms(self, value: float) -> None:
        seconds = check_latency(value) / 1000

        def set_latency() -> None:
            self._broker.latency = seconds
        self._call(set_latency)

    def operations(self) -> dict[str, int]:
        """Operations served so far, by kind (`send`, `receive`, `settle`, `attach`, `management:<op>`, ...)."""
        return self._call(lambda: dict(self._broker.operations))

    def advance(self, seconds: float) -> None:
        """Move the broker's clock forward: locks expire and schedules come due without waiting."""
        def move() -> None:
            self.clock.offset += seconds
        self._call(move)

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection and the listener, and end the broker thread (idempotent)."""
        if self._thread.is_alive():
            future: Future[None] = Future()
            self._broker.calls.put((lambda: self._broker.shutdown(self._container), future))
            self._broker.injector.trigger(ApplicationEvent("sb_call"))
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the test broker did not stop within {timeout} s")


def start_broker(queues: Mapping[str, Mapping[str, Any]] | None = None, *, host: str = "127.0.0.1",
                 latency_ms: float | None = None) -> BrokerHandle:
    """Start a broker on `host` and a free port, with `queues` ({name: QueueSettings fields}) created.

    `latency_ms` is added to every operation; None reads `SYNCLINE_EMULATOR_LATENCY_MS` (unset: none)."""
    latency = latency_from_environment() if latency_ms is None else check_latency(latency_ms)
    broker = _Broker(BrokerClock(), latency / 1000)
    for name, settings in (queues or {}).items():
        broker.queues[name.lower()] = Queue(name.lower(), QueueSettings(**settings))
    container = Container(broker)
    port = _listen(container, broker, host)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        started.set()
        try:
            container.run()
        except BaseException as exc:  # reported by stop(); the thread must not die silently
            failure.append(exc)
            _LOG.exception("test broker crashed")

    thread = threading.Thread(target=run, name=f"sbbroker-{port}", daemon=True)
    thread.start()
    started.wait(5)
    handle = BrokerHandle(broker, container, thread, port)
    handle._call(lambda: None)  # the reactor is up and serving
    return handle


def _listen(container: Container, broker: _Broker, host: str) -> int:
    """Listen on a free port: ask the OS for one, then bind it (retrying if another process got it first)."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
        try:
            broker.acceptor = container.listen(f"{host}:{port}")
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port on {host}")
