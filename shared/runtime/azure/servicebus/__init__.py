"""The Azure Service Bus `InboundQueue`: sessions in buckets, batched settlement, dead letters."""

from shared.runtime.azure.servicebus.queue import DepthSource, ServiceBusQueue
from shared.runtime.azure.servicebus.settlement import BATCH_SETTLEMENT_CHECKED, SETTLE_BATCH
from shared.runtime.azure.servicebus.wire import (
    BUCKET_PREFIX,
    DEFAULT_MAX_CONCURRENT_SESSIONS,
    DEFAULT_SESSION_BUCKETS,
    SESSION_PROPERTY,
    SESSIONLESS_PREFIX,
    session_bucket,
)

__all__ = [
    "BATCH_SETTLEMENT_CHECKED",
    "BUCKET_PREFIX",
    "DEFAULT_MAX_CONCURRENT_SESSIONS",
    "DEFAULT_SESSION_BUCKETS",
    "SESSIONLESS_PREFIX",
    "SESSION_PROPERTY",
    "SETTLE_BATCH",
    "DepthSource",
    "ServiceBusQueue",
    "session_bucket",
]
