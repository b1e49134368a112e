"""Our messages on the wire: reserved session ids and properties, session buckets, SDK messages as `ReceivedMessage`."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from azure.servicebus import ServiceBusReceivedMessage

from shared.core.envelope import ReceivedMessage
from shared.runtime.common import MAX_DELIVERY_EXCEEDED

SESSIONLESS_PREFIX = "syncline-sessionless:"
"""Session ids that stand for "no session" on a session-enabled queue (the one-session-per-record shape)."""
BUCKET_PREFIX = "syncline-bucket:"
"""Service Bus session ids of buckets: `syncline-bucket:<buckets>:<n>` (see `session_bucket`)."""
SESSION_PROPERTY = "syncline-session"
"""Application property that carries a bucketed message's own session id (its record's) on the wire."""
DEFAULT_SESSION_BUCKETS = 64
DEFAULT_MAX_CONCURRENT_SESSIONS = 8

_SERVICE_BUS_REASONS = {"MaxDeliveryCountExceeded": MAX_DELIVERY_EXCEEDED}
"""Dead-letter reasons Service Bus itself gives, as the `InboundQueue` port names them."""
_DEAD_LETTER_PROPERTIES = {"DeadLetterReason", "DeadLetterErrorDescription"}


def session_bucket(key: str, buckets: int) -> str:
    """The Service Bus session (bucket) of `key`: a stable hash, the same in every process and release."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return f"{BUCKET_PREFIX}{buckets}:{int.from_bytes(digest, 'big') % buckets}"


def _own_session(message: ServiceBusReceivedMessage) -> str | None:
    """The session id the message was sent with (its record's): from the property when it was bucketed."""
    for key, value in (message.application_properties or {}).items():
        if _text(key) == SESSION_PROPERTY:
            return _text(value)
    session_id = message.session_id
    if session_id is not None and session_id.startswith((SESSIONLESS_PREFIX, BUCKET_PREFIX)):
        return None
    return session_id


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _property(value: Any) -> str | int | float | bool:
    if isinstance(value, bytes | bytearray):
        return value.decode()
    if isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _received(
    message: ServiceBusReceivedMessage, *, lock_token: str, delivery_count: int, locked_until: datetime | None
) -> ReceivedMessage:
    properties = {
        _text(k): _property(v) for k, v in (message.application_properties or {}).items()
        if _text(k) not in _DEAD_LETTER_PROPERTIES  # Service Bus keeps the dead-letter reason there
    }
    properties.pop(SESSION_PROPERTY, None)
    session_id = _own_session(message)
    reason = message.dead_letter_reason
    body = message.body
    fields: dict[str, Any] = {}
    if message.content_type is not None:
        fields["content_type"] = message.content_type
    return ReceivedMessage(
        body=body if isinstance(body, bytes) else b"".join(body),
        message_id=str(message.message_id),
        sequence_number=message.sequence_number or 0,
        lock_token=lock_token,
        delivery_count=delivery_count,
        enqueued_at=message.enqueued_time_utc or datetime.now(UTC),
        locked_until=locked_until,
        session_id=session_id,
        correlation_id=message.correlation_id,
        application_properties=properties,
        dead_letter_reason=_SERVICE_BUS_REASONS.get(reason, reason) if reason is not None else None,
        dead_letter_description=message.dead_letter_error_description,
        **fields,
    )
