"""OData basics every F&O module shares: paths, limits, event ids, sequences, the error and its shapes."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sandbox.fno.schema import (
    ENTITIES,
    EXTENSION_FIELD,
)

DATA_PREFIX = "/data/"
DEFAULT_COMPANY = "usmf"
MAX_PAGE_SIZE = 10000
ENUM_NAMESPACE = "Microsoft.Dynamics.DataEntities."
WRITE_EXCEPTION = "Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException"
THROTTLE_MESSAGE = "Number of requests exeeded the limit of {limit} over the time window of {window} seconds."

ENTITY_KEYS: dict[str, tuple[str, ...]] = {e.entity_set: e.keys for e in ENTITIES.values()}
TABLE_NAMES = {e.entity_set: (e.table, e.label) for e in ENTITIES.values()}
MODIFIED = {"CustomersV3", "SalesOrderHeadersV2"}
"""Entities carrying `ModifiedDateTime` (set by the simulator on every write)."""
CUSTOMER_EVENT = "CustCustomerChangedBusinessEvent"
SALES_STATUS_EVENT = "SalesOrderStatusChangedBusinessEvent"
PACKING_SLIP_EVENT = "SalesPackingSlipPostedBusinessEvent"
"""Sent by `ship_order` (packing slip posted: the order is delivered)."""
INVOICE_EVENT = "SalesInvoicePostedBusinessEvent"
"""Sent by `invoice_order`; its contract (InvoiceAccount, InvoiceId, SalesOrderId, ...) is the one in Microsoft's
business events developer documentation."""

STRING_DEFAULTS: dict[str, tuple[str, ...]] = {
    "CustomersV3": (EXTENSION_FIELD,),
    "SalesOrderHeadersV2": (EXTENSION_FIELD, "CustomersOrderReference"),
    "SalesOrderLines": (EXTENSION_FIELD,),
}
"""String fields every row returns, "" when never set (F&O string columns are never null)."""
NUMBER_SEQUENCES: dict[str, tuple[str, str]] = {
    "CustomersV3": ("CustomerAccount", "{prefix}-C{n:05d}"),
    "SalesOrderHeadersV2": ("SalesOrderNumber", "{n:06d}"),
    "SalesOrderLines": ("InventoryLotId", "{n:06d}"),
}
"""Key field F&O fills from the company's number sequence when a create leaves it empty, and its format."""
CURRENCIES: dict[str, str] = {
    "USD": "US dollar", "EUR": "Euro", "GBP": "Pound sterling", "CHF": "Swiss franc", "JPY": "Japanese yen",
    "XAU": "Gold (troy ounce)",
}


class ODataError(Exception):
    """An OData error response (status + F&O error body)."""

    def __init__(self, status: int, message: str, *, inner: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.inner = dict(inner) if inner else None
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": "", "message": self.message}
        if self.inner is not None:
            err["innererror"] = self.inner
        return {"error": err}


def write_failed(entity: str, infolog: str) -> ODataError:
    """The HTTP 500 + AxODataWriteException shape F&O answers validation failures with."""
    table = TABLE_NAMES.get(entity, (entity, entity))[0]
    return ODataError(500, "An error has occurred.", inner={
        "message": f"Write failed for table row of type '{table}'. Infolog: {infolog}",
        "type": WRITE_EXCEPTION,
        "stacktrace": "   at Microsoft.Dynamics.Platform.Integration.Services.OData.Update.UpdateProcessor."
                      "CreateEntity_Save(...)"})


def _wcf_date(value: datetime) -> str:
    """Dates in business event payloads are serialized the WCF way, `/Date(<ms since epoch>)/`."""
    return f"/Date({int(value.timestamp() * 1000)})/"


def _line_amount(row: Mapping[str, Any]) -> float:
    qty, price = row.get("OrderedSalesQuantity"), row.get("SalesPrice")
    if isinstance(qty, bool) or isinstance(price, bool) or not isinstance(qty, int | float) \
            or not isinstance(price, int | float):
        return 0.0
    return round(float(qty) * float(price), 2)
