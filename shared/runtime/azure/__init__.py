"""The Azure runtime: Table Storage `StateStore` and Service Bus `InboundQueue`."""

from shared.runtime.azure.servicebus import ServiceBusQueue, session_bucket
from shared.runtime.azure.tables import (
    LEASE_PARTITIONS,
    TableRequestCounter,
    TableStateStore,
    azurite_connection_string,
    default_transport,
)

__all__ = [
    "LEASE_PARTITIONS",
    "ServiceBusQueue",
    "TableRequestCounter",
    "TableStateStore",
    "azurite_connection_string",
    "default_transport",
    "session_bucket",
]
