"""Protocol-faithful simulator of SAP S/4HANA's OData v2 services (see sandbox/sap/app.py for what it serves)."""

from sandbox.faults import DROP
from sandbox.sap.app import SapSimulator
from sandbox.sap.gateway import (
    PARTNER_CHANGED,
    PARTNER_CREATED,
    SALES_ORDER_CHANGED,
    SALES_ORDER_CREATED,
    SERVICE_PREFIX,
    SESSION_COOKIE,
    TOKEN_PATH,
    GatewayError,
)
from sandbox.sap.seed import BAD_ORDER, BAD_PARTNER_CURRENCY, BAD_PARTNER_NO_NAME, seed_sap

__all__ = [
    "BAD_ORDER",
    "BAD_PARTNER_CURRENCY",
    "BAD_PARTNER_NO_NAME",
    "DROP",
    "PARTNER_CHANGED",
    "PARTNER_CREATED",
    "SALES_ORDER_CHANGED",
    "SALES_ORDER_CREATED",
    "SERVICE_PREFIX",
    "SESSION_COOKIE",
    "TOKEN_PATH",
    "GatewayError",
    "SapSimulator",
    "seed_sap",
]
