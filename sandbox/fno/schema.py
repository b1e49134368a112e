"""The F&O simulator's data entities, declared once: request validation and the served `$metadata` come from here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from xml.sax.saxutils import quoteattr

NAMESPACE = "Microsoft.Dynamics.DataEntities"
CONTAINER = "Resources"
EXTENSION_FIELD = "SynclineSalesforceId"
"""The extension field a Syncline deployment adds to customers, order headers and lines (the Salesforce Id).
It is not part of the standard entities: the Syncline model must be deployed to the environment, or every write
that names it is refused like any unknown property."""

ENUMS: dict[str, tuple[str, ...]] = {
    "NoYes": ("No", "Yes"),
    "SalesStatus": ("None", "Backorder", "Delivered", "Invoiced", "Canceled"),
    "EcoResProductType": ("Item", "Service"),
    "CustVendorBlocked": ("No", "Invoice", "All", "Payment", "Requisition", "Never"),
}
"""Enum types the entities use (members in value order, 0, 1, ...); values travel as member names."""


@dataclass(frozen=True)
class Field:
    """One property: its Edm type (or an enum of ENUMS), length, and whether a deployed extension adds it."""

    name: str
    type: str
    """`Edm.String`, `Edm.Decimal`, `Edm.Int32`, `Edm.Int64`, `Edm.DateTimeOffset`, or an ENUMS name."""
    max_length: int | None = None
    extension: bool = False
    verified: bool = True
    """Name and type checked against Microsoft's published entity reference (False: the simulator's choice)."""

    @property
    def edm_type(self) -> str:
        return f"{NAMESPACE}.{self.type}" if self.type in ENUMS else self.type


@dataclass(frozen=True)
class Entity:
    """One public data entity: its entity set, entity type, keys and properties."""

    entity_set: str
    type_name: str
    table: str
    """The AOT entity (what write errors name, e.g. `CustCustomerV3Entity`)."""
    label: str
    keys: tuple[str, ...]
    fields: dict[str, Field] = field(default_factory=dict)

    @property
    def qualified_type(self) -> str:
        return f"{NAMESPACE}.{self.type_name}"

    def properties(self, *, extensions: bool) -> dict[str, Field]:
        """The properties an environment exposes (extension fields only when the extension is deployed)."""
        return {n: f for n, f in self.fields.items() if extensions or not f.extension}


def _s(name: str, length: int | None = None, *, ext: bool = False, verified: bool = True) -> Field:
    return Field(name, "Edm.String", length, extension=ext, verified=verified)


def _f(name: str, typ: str, *, verified: bool = True) -> Field:
    return Field(name, typ, verified=verified)


def _entity(entity_set: str, type_name: str, table: str, label: str, keys: tuple[str, ...],
            *fields: Field) -> Entity:
    return Entity(entity_set, type_name, table, label, keys, {f.name: f for f in fields})


_COMPANY = _s("dataAreaId", 4)
_SYNCLINE = _s(EXTENSION_FIELD, 18, ext=True)
_MODIFIED = _f("ModifiedDateTime", "Edm.DateTimeOffset", verified=False)

ENTITIES: dict[str, Entity] = {e.entity_set: e for e in (
    _entity("CustomersV3", "CustomerV3", "CustCustomerV3Entity", "Customers", ("dataAreaId", "CustomerAccount"),
            _COMPANY, _s("CustomerAccount", 20), _s("OrganizationName", 100), _s("CustomerGroupId", 10),
            _s("SalesCurrencyCode", 3), _f("CreditLimit", "Edm.Decimal"), _s("AddressCity", 60),
            _s("AddressState", 10), _s("AddressCountryRegionId", 10), _s("PrimaryContactEmail", 255),
            _f("OnHoldStatus", "CustVendorBlocked"), _f("IsCustomerOnHold", "NoYes", verified=False), _MODIFIED,
            _SYNCLINE),
    _entity("ReleasedProductsV2", "ReleasedProductV2", "EcoResReleasedProductV2Entity", "Released products",
            ("dataAreaId", "ItemNumber"),
            _COMPANY, _s("ItemNumber", 20), _s("ProductName", 60, verified=False), _s("SearchName", 20),
            _f("ProductType", "EcoResProductType"), _s("ItemModelGroupId", 10), _f("SalesPrice", "Edm.Decimal"),
            _f("IsPhantom", "NoYes", verified=False)),
    _entity("SalesOrderHeadersV2", "SalesOrderHeaderV2", "SalesOrderHeaderV2Entity", "Sales orders",
            ("dataAreaId", "SalesOrderNumber"),
            _COMPANY, _s("SalesOrderNumber", 20), _s("SalesOrderName", 100), _s("OrderingCustomerAccountNumber", 20),
            _s("InvoiceCustomerAccountNumber", 20), _f("SalesOrderStatus", "SalesStatus"), _s("CurrencyCode", 3),
            _s("CustomersOrderReference", 60, verified=False), _s("CustomerRequisitionNumber", 20),
            _f("RequestedShippingDate", "Edm.DateTimeOffset"), _f("RequestedReceiptDate", "Edm.DateTimeOffset"),
            _MODIFIED, _SYNCLINE),
    _entity("SalesOrderLines", "SalesOrderLine", "SalesOrderLineEntity", "Sales lines",
            ("dataAreaId", "InventoryLotId"),
            _COMPANY, _s("InventoryLotId", 20), _s("SalesOrderNumber", 20), _f("LineNumber", "Edm.Decimal"),
            _s("ItemNumber", 20), _f("OrderedSalesQuantity", "Edm.Decimal"), _f("SalesPrice", "Edm.Decimal"),
            _f("LineAmount", "Edm.Decimal"), _SYNCLINE),
    _entity("CustomerGroups", "CustomerGroup", "CustCustomerGroupEntity", "Customer groups",
            ("dataAreaId", "CustomerGroupId"),
            _COMPANY, _s("CustomerGroupId", 10), _s("Description", 60), _s("PaymentTermId", 10),
            _s("ClearingPeriodPaymentTermName", 10), _s("DefaultDimensionDisplayValue", 500),
            _s("CustomerAccountNumberSequence", 10), _f("IsSalesTaxIncludedInPrice", "NoYes"),
            _s("WriteOffReason", 10), _s("TaxGroupId", 10)),
)}
"""Entity set -> entity. Names and types follow Microsoft's published entity reference (the data entity pages and
the Common Data Model pages of CustCustomerV3Entity, EcoResReleasedProductV2Entity, SalesOrderHeaderV2Entity) and a
recorded CustomerGroups response; fields marked `verified=False` are the simulator's own choice."""


# ============================================================================================ validation


class SchemaViolation(Exception):
    """A request body that does not fit the entity type (the service answers 400)."""


def property_does_not_exist(entity: Entity, name: str) -> str:
    """ODataLib's message for a property the (closed) entity type does not declare."""
    return (f"The property '{name}' does not exist on type '{entity.qualified_type}'. Make sure to only use property "
            "names that are defined by the type or mark the type as open type.")


def could_not_find_property(entity: Entity, name: str) -> str:
    """ODataLib's message for an unknown property in `$select`, `$filter` or `$orderby`."""
    return f"Could not find a property named '{name}' on type '{entity.qualified_type}'."


def _is_datetime(value: str) -> bool:
    try:
        if len(value) == 10:
            date.fromisoformat(value)
        else:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def check_value(entity: Entity, f: Field, value: Any) -> None:
    """Raise SchemaViolation when a JSON value cannot be read as the property's type (null is left to F&O)."""
    if value is None:
        return
    typ = f.type
    if typ == "Edm.String":
        ok = isinstance(value, str)
    elif typ in ("Edm.Decimal", "Edm.Double"):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif typ in ("Edm.Int32", "Edm.Int64"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ == "Edm.DateTimeOffset":
        ok = isinstance(value, str) and _is_datetime(value)
    elif typ in ENUMS:
        if isinstance(value, str) and value not in ENUMS[typ]:
            raise SchemaViolation(f"The value '{value}' is not a valid member of the enum type "
                                  f"'{f.edm_type}'.")
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        shown = value if not isinstance(value, bool) else str(value).lower()
        if typ in ("Edm.String",) or typ in ENUMS:
            raise SchemaViolation(f"Cannot convert a primitive value to the expected type '{f.edm_type}'. See the "
                                  "inner exception for more details.")
        raise SchemaViolation(f"Cannot convert the literal '{shown}' to the expected type '{f.edm_type}'.")


def check_body(entity: Entity, body: Mapping[str, Any], *, extensions: bool) -> None:
    """Every property of a POST/PATCH body must be declared by the entity type and readable as its type."""
    props = entity.properties(extensions=extensions)
    for name, value in body.items():
        if "@" in name:
            continue  # instance annotations (@odata.type, @odata.etag) are not properties
        f = props.get(name)
        if f is None:
            raise SchemaViolation(property_does_not_exist(entity, name))
        check_value(entity, f, value)


# ============================================================================================ $metadata


def csdl(entities: Mapping[str, Entity], *, extensions: bool,
         enums: Mapping[str, Sequence[tuple[str, int]]] | None = None) -> str:
    """The OData v4 CSDL (`$metadata`) of the entities: entity types with keys and typed properties, the enum types,
    and one entity set per entity in the `Resources` container."""
    out = ['<?xml version="1.0" encoding="utf-8"?>',
           '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">',
           "<edmx:DataServices>",
           f'<Schema Namespace="{NAMESPACE}" xmlns="http://docs.oasis-open.org/odata/ns/edm">']
    for entity in entities.values():
        out.append(f"<EntityType Name={quoteattr(entity.type_name)}>")
        out.append("<Key>" + "".join(f"<PropertyRef Name={quoteattr(k)} />" for k in entity.keys) + "</Key>")
        for f in entity.properties(extensions=extensions).values():
            attrs = f"Name={quoteattr(f.name)} Type={quoteattr(f.edm_type)}"
            if f.name in entity.keys:
                attrs += ' Nullable="false"'
            if f.max_length is not None:
                attrs += f' MaxLength="{f.max_length}"'
            out.append(f"<Property {attrs} />")
        out.append("</EntityType>")
    declared = enums if enums is not None else {n: [(m, i) for i, m in enumerate(ms)] for n, ms in ENUMS.items()}
    for name, members in declared.items():
        out.append(f"<EnumType Name={quoteattr(name)}>")
        out.extend(f"<Member Name={quoteattr(m)} Value=\"{i}\" />" for m, i in members)
        out.append("</EnumType>")
    out.append(f"<EntityContainer Name={quoteattr(CONTAINER)}>")
    out.extend(f"<EntitySet Name={quoteattr(e.entity_set)} EntityType={quoteattr(e.qualified_type)} />"
               for e in entities.values())
    out.append("</EntityContainer>")
    out.append("</Schema>")
    out.append("</edmx:DataServices>")
    out.append("</edmx:Edmx>")
    return "\n".join(out)
