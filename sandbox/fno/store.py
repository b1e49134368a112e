"""The F&O data: rows, defaults, number sequences, order fulfilment, and the write validation."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sandbox.fno.events import FnoEvents
from sandbox.fno.filters import _parse_dt
from sandbox.fno.odata import (
    DEFAULT_COMPANY,
    ENTITY_KEYS,
    INVOICE_EVENT,
    MODIFIED,
    NUMBER_SEQUENCES,
    PACKING_SLIP_EVENT,
    STRING_DEFAULTS,
    TABLE_NAMES,
    ODataError,
    _line_amount,
    _wcf_date,
    write_failed,
)
from sandbox.fno.schema import (
    SchemaViolation,
    check_body,
)
from sandbox.odata import next_stamp
from shared.payloads import strict_loads


class FnoStore(FnoEvents):
    """Entity rows by key, what F&O fills in and checks on writes, and the knobs tests use."""

    @property
    def extensions(self) -> bool:
        """Whether Syncline's extension (the `SynclineSalesforceId` fields) is deployed to the environment."""
        return self._extensions

    @extensions.setter
    def extensions(self, deployed: bool) -> None:
        self._extensions = deployed
        self._fields: dict[str, set[str]] = {
            name: set(e.properties(extensions=deployed)) for name, e in self.entities.items()}
        """Entity set -> its declared properties (from the schema; $select/$filter/$orderby and writes use them)."""

    def _now_text(self) -> str:
        self._last_modified = next_stamp(self._last_modified)
        return self._last_modified.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def _etag(self) -> str:
        self._row_version += self._rng.randint(1, 40)
        return 'W/"' + base64.b64encode(f"'1,{self._row_version}'".encode()).decode() + '"'

    def insert(self, entity: str, values: Mapping[str, Any], *, emit: bool = False) -> dict[str, Any]:
        """Add a row directly (seeding; no business validation, but F&O's defaults are filled in, and every field
        must be one the entity declares); `emit` posts the business event like a UI create."""
        with self._lock:
            check_body(self.entities[entity], values, extensions=self.extensions)
            row = dict(values)
            row.setdefault("dataAreaId", DEFAULT_COMPANY)
            row["dataAreaId"] = str(row["dataAreaId"]).lower()
            self._fill_defaults(entity, row)
            if entity in MODIFIED:
                row["ModifiedDateTime"] = self._now_text()
            row["@odata.etag"] = self._etag()
            self._tables[entity][self._key_of(entity, row)] = row
            if emit:
                self._emit(entity, row, None)
            return dict(row)

    def get(self, entity: str, *key: str) -> dict[str, Any] | None:
        """A row by key values (dataAreaId first), or None."""
        with self._lock:
            row = self._tables[entity].get(tuple(k.lower() for k in key))
            return dict(row) if row else None

    def all(self, entity: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._tables[entity].values()]

    def apply_change(self, entity: str, key: tuple[str, ...], values: Mapping[str, Any]) -> dict[str, Any]:
        """An edit made in the F&O UI: updates the row and posts its business event (declared fields only)."""
        with self._lock:
            check_body(self.entities[entity], values, extensions=self.extensions)
            row = self._tables[entity][tuple(k.lower() for k in key)]
            self._change(entity, row, values)
            return dict(row)

    def _change(self, entity: str, row: dict[str, Any], values: Mapping[str, Any]) -> None:
        """Write changes into a stored row as F&O does: modified stamp, new ETag, business event."""
        before = dict(row)
        row.update(values)
        if entity in MODIFIED:
            row["ModifiedDateTime"] = self._now_text()
        row["@odata.etag"] = self._etag()
        self._emit(entity, row, before)

    def _key_of(self, entity: str, row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(str(row.get(k, "")).lower() for k in ENTITY_KEYS[entity])

    def _row(self, entity: str, company: Any, value: Any) -> dict[str, Any] | None:
        """The row of a two-part key (dataAreaId, id) entity; F&O keys compare case-insensitively."""
        return self._tables[entity].get((str(company).lower(), str(value).lower()))

    def _order_lines(self, company: str, number: str) -> list[dict[str, Any]]:
        return [r for r in self._tables["SalesOrderLines"].values()
                if r["dataAreaId"] == company and str(r.get("SalesOrderNumber", "")).lower() == number.lower()]

    def _next_number(self, entity: str, company: str) -> str:
        """The next free number of the company's sequence (numbers taken by hand or by seeding are skipped)."""
        field, pattern = NUMBER_SEQUENCES[entity]
        while True:
            self._sequences[(entity, company)] += 1
            value = pattern.format(prefix=company[:2].upper(), n=self._sequences[(entity, company)])
            if self._key_of(entity, {"dataAreaId": company, field: value}) not in self._tables[entity]:
                return value

    def _fill_defaults(self, entity: str, row: dict[str, Any]) -> None:
        """What F&O fills in on create (and what seeded rows would have had)."""
        for name in STRING_DEFAULTS.get(entity, ()):
            if name in self._fields[entity] and row.get(name) is None:
                row[name] = ""
        company = row["dataAreaId"]
        if entity == "SalesOrderHeadersV2":
            row["SalesOrderStatus"] = row.get("SalesOrderStatus") or "Backorder"
            ordering = row.get("OrderingCustomerAccountNumber")
            if ordering and not row.get("InvoiceCustomerAccountNumber"):
                row["InvoiceCustomerAccountNumber"] = ordering
            customer = self._row("CustomersV3", company, ordering) if ordering else None
            if customer is not None and not row.get("CurrencyCode"):
                row["CurrencyCode"] = customer.get("SalesCurrencyCode", "")
        elif entity == "SalesOrderLines":
            if row.get("OrderedSalesQuantity") is None:
                row["OrderedSalesQuantity"] = 1.0  # the item's default sales quantity
            item = self._row("ReleasedProductsV2", company, row.get("ItemNumber"))
            if row.get("SalesPrice") is None:
                row["SalesPrice"] = float(item.get("SalesPrice") or 0.0) if item else 0.0
            if not row.get("LineNumber") and row.get("SalesOrderNumber"):
                numbers = [r.get("LineNumber") or 0 for r in self._order_lines(company, str(row["SalesOrderNumber"]))]
                row["LineNumber"] = max((int(n) for n in numbers if isinstance(n, int | float)), default=0) + 1
            if row.get("LineAmount") is None:
                row["LineAmount"] = _line_amount(row)

    # ------------------------------------------------------------------------------------ fulfilment

    def ship_order(self, company: str, number: str) -> dict[str, Any]:
        """Post the packing slip of an open order (the warehouse delivered it): SalesOrderStatus `Delivered`,
        business event `PACKING_SLIP_EVENT` with SalesOrderId, PackingSlipId, DeliveryDate, CustomerAccount."""
        with self._lock:
            row = self._fulfillable(company, number, ("Backorder",), "deliver")
            slip = f"PS-{self._next_document(row['dataAreaId'], 'packing slip'):06d}"
            self._set_status(row, "Delivered")
            self._post_event(PACKING_SLIP_EVENT, row["dataAreaId"], {
                "SalesOrderId": row["SalesOrderNumber"], "PackingSlipId": slip,
                "DeliveryDate": _wcf_date(datetime.now(UTC)),
                "CustomerAccount": row.get("OrderingCustomerAccountNumber", "")})
            return dict(row)

    def invoice_order(self, company: str, number: str) -> dict[str, Any]:
        """Post the invoice of an open or delivered order: SalesOrderStatus `Invoiced`, business event
        `INVOICE_EVENT` with the documented contract (InvoiceAccount, InvoiceId, SalesOrderId, InvoiceDate,
        InvoiceDueDate, InvoiceAmountInAccountingCurrency, InvoiceTaxAmount)."""
        with self._lock:
            row = self._fulfillable(company, number, ("Backorder", "Delivered"), "invoice")
            lines = self._order_lines(row["dataAreaId"], row["SalesOrderNumber"])
            amount = round(sum(float(r.get("LineAmount") or 0.0) for r in lines), 2)
            invoice = f"CIV-{self._next_document(row['dataAreaId'], 'invoice'):06d}"
            today = datetime.now(UTC)
            self._set_status(row, "Invoiced")
            self._post_event(INVOICE_EVENT, row["dataAreaId"], {
                "InvoiceAccount": row.get("InvoiceCustomerAccountNumber") or row.get("OrderingCustomerAccountNumber"),
                "InvoiceId": invoice, "SalesOrderId": row["SalesOrderNumber"], "InvoiceDate": _wcf_date(today),
                "InvoiceDueDate": _wcf_date(today + timedelta(days=30)),
                "InvoiceAmountInAccountingCurrency": amount, "InvoiceTaxAmount": 0.0})
            return dict(row)

    def _fulfillable(self, company: str, number: str, states: tuple[str, ...], verb: str) -> dict[str, Any]:
        row = self._row("SalesOrderHeadersV2", company, number)
        if row is None:
            raise KeyError(f"sales order {company}|{number} does not exist")
        if row.get("SalesOrderStatus") not in states:
            raise ValueError(f"cannot {verb} sales order {company}|{number}: it is {row.get('SalesOrderStatus')}")
        if not self._order_lines(row["dataAreaId"], row["SalesOrderNumber"]):
            raise ValueError(f"cannot {verb} sales order {company}|{number}: it has no lines")
        return row

    def _next_document(self, company: str, kind: str) -> int:
        self._documents[(kind, company)] += 1
        return self._documents[(kind, company)]

    def _set_status(self, row: dict[str, Any], status: str) -> None:
        row["SalesOrderStatus"] = status
        row["ModifiedDateTime"] = self._now_text()
        row["@odata.etag"] = self._etag()

    def _check_body(self, entity: str, body: Mapping[str, Any]) -> None:
        """ODataLib reads the body against the entity type before F&O sees it: an undeclared property (a typo, an
        extension that is not deployed) or a value of the wrong type is a 400, and nothing is written."""
        try:
            check_body(self.entities[entity], body, extensions=self.extensions)
        except SchemaViolation as exc:
            raise ODataError(400, "An error has occurred.", inner={
                "message": str(exc), "type": "Microsoft.OData.ODataException", "stacktrace": ""}) from exc

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        try:
            data = strict_loads(body or b"{}")
        except ValueError as exc:
            raise ODataError(400, "The request body is not valid JSON.") from exc
        if not isinstance(data, dict):
            raise ODataError(400, "The request body must be a JSON object.")
        return {k: v for k, v in data.items() if "@" not in k}

    def _validate(self, entity: str, row: Mapping[str, Any], *, creating: bool) -> None:
        """F&O's validateField / validateWrite: mandatory fields on create, relations, ranges."""
        table = TABLE_NAMES[entity][0] if entity in TABLE_NAMES else entity
        company = str(row["dataAreaId"]).lower()

        def mandatory(name: str, label: str) -> None:
            if creating and (row.get(name) is None or row.get(name) == ""):
                raise write_failed(entity, f"Error: Field '{label}' must be filled in.")

        def related(name: str, label: str, other: str, other_label: str) -> None:
            value = row.get(name)
            if value is None or value == "":
                return
            if other == "Currency":
                found = str(value).upper() in self.currencies
            else:
                found = self._row(other, company, value) is not None
            if not found:
                raise write_failed(entity, f"Warning: The value '{value}' in field '{label}' is not found in the "
                                           f"related table '{other_label}'.; Warning: validateField failed on field "
                                           f"'{table}.{name}'.")

        if entity == "CustomersV3":
            mandatory("CustomerGroupId", "Customer group")
            related("CustomerGroupId", "Customer group", "CustomerGroups", "Customer groups")
            related("SalesCurrencyCode", "Currency", "Currency", "Currency")
        elif entity == "SalesOrderHeadersV2":
            mandatory("OrderingCustomerAccountNumber", "Customer account")
            account = row.get("OrderingCustomerAccountNumber")
            if account and self._row("CustomersV3", company, account) is None:
                raise write_failed(entity, f"Warning: Customer {account} does not exist.")
            related("InvoiceCustomerAccountNumber", "Invoice account", "CustomersV3", "Customers")
            related("CurrencyCode", "Currency", "Currency", "Currency")
            shipping = row.get("RequestedShippingDate")
            if shipping not in (None, "") and not _is_date(shipping):
                raise ODataError(400, f"Cannot convert the literal '{shipping}' to the expected type "
                                      "'Edm.DateTimeOffset'.")
        elif entity == "SalesOrderLines":
            mandatory("SalesOrderNumber", "Sales order")
            mandatory("ItemNumber", "Item number")
            related("SalesOrderNumber", "Sales order", "SalesOrderHeadersV2", "Sales orders")
            related("ItemNumber", "Item number", "ReleasedProductsV2", "Released products")
            qty = row.get("OrderedSalesQuantity")
            if isinstance(qty, bool) or not isinstance(qty, int | float) or not qty > 0:
                raise write_failed(entity, f"Error: The quantity {qty} is not valid: the ordered quantity must be "
                                           "greater than zero.; Warning: validateField failed on field "
                                           f"'{table}.OrderedSalesQuantity'.")

    # ------------------------------------------------------------------ drift (as a developer's deployment causes it)

    def add_enum_member(self, enum: str, member: str) -> None:
        """Add a member to an enum type (an extension deployed): `$metadata` lists it, next value after the last."""
        with self._lock:
            members = self.enums[enum]
            if all(m != member for m, _ in members):
                members.append((member, max((v for _, v in members), default=-1) + 1))

    def remove_enum_member(self, enum: str, member: str) -> None:
        """Remove a member from an enum type as `$metadata` shows it."""
        with self._lock:
            members = self.enums[enum]
            if all(m != member for m, _ in members):
                raise KeyError(f"enum {enum} has no member {member!r}")
            members[:] = [(m, v) for m, v in members if m != member]


def _is_date(value: Any) -> bool:
    """A date (`2026-11-02`) or a date-time with offset, as OData accepts for F&O date fields."""
    if not isinstance(value, str):
        return False
    try:
        if len(value) == 10:
            date.fromisoformat(value)
        else:
            _parse_dt(value)
    except ValueError:
        return False
    return True
