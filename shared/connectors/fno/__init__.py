"""Dynamics 365 Finance & Operations OData v4 connector: customers, products, sales orders, business events."""

from shared.connectors.fno.changes import (
    BUSINESS_EVENTS,
    LEGAL_ENTITY,
    STANDARD_EVENT_FIELDS,
    FinOpsBusinessEvent,
    parse_business_event,
    parse_business_events,
)
from shared.connectors.fno.codecs import (
    DATA_PATH,
    ENTITY_KEYS,
    ENUM_NAMESPACE,
    MAX_PAGE_SIZE,
    MODIFIED_FIELDS,
    SYSTEM,
    WRITE_EXCEPTION,
    FinOpsEnum,
    filter_literal,
    format_key,
    key_path,
    parse_key,
)
from shared.connectors.fno.connector import FinOpsClient

__all__ = [
    "BUSINESS_EVENTS",
    "DATA_PATH",
    "ENTITY_KEYS",
    "ENUM_NAMESPACE",
    "LEGAL_ENTITY",
    "MAX_PAGE_SIZE",
    "MODIFIED_FIELDS",
    "STANDARD_EVENT_FIELDS",
    "SYSTEM",
    "WRITE_EXCEPTION",
    "FinOpsBusinessEvent",
    "FinOpsClient",
    "FinOpsEnum",
    "filter_literal",
    "format_key",
    "key_path",
    "parse_business_event",
    "parse_business_events",
    "parse_key",
]
