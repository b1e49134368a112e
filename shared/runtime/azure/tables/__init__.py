"""The Azure Table Storage `StateStore`: one table per kind of state, keys escaped, writes in transactions."""

from shared.runtime.azure.tables.audit import audit_keys
from shared.runtime.azure.tables.client import DEFAULT_CONCURRENCY, LEASE_PARTITIONS, QUERY_PAGE
from shared.runtime.azure.tables.connection import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    azurite_connection_string,
    default_transport,
)
from shared.runtime.azure.tables.keys import (
    ESCAPE,
    MAX_KEY_UNITS,
    MAX_STRING_UNITS,
    PART_UNITS,
    SEPARATOR,
    escape_key,
    join_string,
    prefix_range,
    split_key,
    split_string,
    table_key,
    unescape_key,
)
from shared.runtime.azure.tables.requests import TableRequestCounter
from shared.runtime.azure.tables.store import TableStateStore
from shared.runtime.azure.tables.transactions import (
    MAX_TRANSACTION_BYTES,
    MAX_TRANSACTION_OPS,
    TableOp,
    plan_transactions,
)

__all__ = [
    "AZURITE_ACCOUNT",
    "AZURITE_KEY",
    "DEFAULT_CONCURRENCY",
    "ESCAPE",
    "LEASE_PARTITIONS",
    "MAX_KEY_UNITS",
    "MAX_STRING_UNITS",
    "MAX_TRANSACTION_BYTES",
    "MAX_TRANSACTION_OPS",
    "PART_UNITS",
    "QUERY_PAGE",
    "SEPARATOR",
    "TableOp",
    "TableRequestCounter",
    "TableStateStore",
    "audit_keys",
    "azurite_connection_string",
    "default_transport",
    "escape_key",
    "join_string",
    "plan_transactions",
    "prefix_range",
    "split_key",
    "split_string",
    "table_key",
    "unescape_key",
]
