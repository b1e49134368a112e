"""Protocol-faithful simulator of Dynamics 365 F&O's OData v4 /data API (see sandbox/fno/app.py for what it serves)."""

from sandbox.faults import DROP
from sandbox.fno.app import FinOpsSimulator
from sandbox.fno.filters import FilterParser, evaluate
from sandbox.fno.odata import (
    CUSTOMER_EVENT,
    DATA_PREFIX,
    INVOICE_EVENT,
    PACKING_SLIP_EVENT,
    SALES_STATUS_EVENT,
    ODataError,
)
from sandbox.fno.seed import UNMAPPED_CURRENCY, seed_fno

__all__ = [
    "CUSTOMER_EVENT",
    "DATA_PREFIX",
    "DROP",
    "INVOICE_EVENT",
    "PACKING_SLIP_EVENT",
    "SALES_STATUS_EVENT",
    "UNMAPPED_CURRENCY",
    "FilterParser",
    "FinOpsSimulator",
    "ODataError",
    "evaluate",
    "seed_fno",
]
