"""A local AMQP 1.0 broker with Azure Service Bus semantics, for running the real azure-servicebus SDK in tests."""

from tests.sbbroker.broker import BrokerHandle, start_broker
from tests.sbbroker.entities import MAX_DELIVERY_COUNT_EXCEEDED, QueueSettings

__all__ = ["MAX_DELIVERY_COUNT_EXCEEDED", "BrokerHandle", "QueueSettings", "start_broker"]
