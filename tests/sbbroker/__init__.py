"""A local AMQP 1.0 broker with Azure Service Bus semantics, for running the real azure-servicebus SDK in tests."""

from sandbox.latency_proxy import LATENCY_VARIABLE, latency_from_environment
from tests.sbbroker.broker import BrokerHandle, start_broker
from tests.sbbroker.entities import MAX_DELIVERY_COUNT_EXCEEDED, QueueSettings

__all__ = [
    "LATENCY_VARIABLE", "MAX_DELIVERY_COUNT_EXCEEDED", "BrokerHandle", "QueueSettings", "latency_from_environment",
    "start_broker",
]
