"""Declarative schema of the SAP simulator's OData v2 services: what it validates against and serves as $metadata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

# Names follow SAP's published metadata of API_BUSINESS_PARTNER, API_SALES_ORDER_SRV, API_PRODUCT_SRV,
# API_SLSPRICINGCONDITIONRECORD_SRV and API_PRODUCT_AVAILABILITY_INFO_BASIC (api.sap.com); each entity type
# carries the subset of properties the simulator models. MaxLength values are the published ones (CHAR
# lengths of the underlying DDIC fields); Edm types are the ones the simulator has always served (see
# docs/simulators/sap.md for where they differ from the published metadata).

BP_SERVICE = "API_BUSINESS_PARTNER"
SO_SERVICE = "API_SALES_ORDER_SRV"
PRODUCT_SERVICE = "API_PRODUCT_SRV"
PRICING_SERVICE = "API_SLSPRICINGCONDITIONRECORD_SRV"
AVAILABILITY_SERVICE = "API_PRODUCT_AVAILY_INFO_BASIC"
"""Technical name of API_PRODUCT_AVAILABILITY_INFO_BASIC (service names are cut to 30 characters)."""
AVAILABILITY_FUNCTION = "DetermineAvailabilityAt"
SERVICES = (BP_SERVICE, SO_SERVICE, PRODUCT_SERVICE, PRICING_SERVICE, AVAILABILITY_SERVICE)

STRING, DT, DTO, TM, DEC, BOOL, GUID = ("Edm.String", "Edm.DateTime", "Edm.DateTimeOffset", "Edm.Time",
                                         "Edm.Decimal", "Edm.Boolean", "Edm.Guid")

EDMX_NS = "http://schemas.microsoft.com/ado/2007/06/edmx"
EDM_NS = "http://schemas.microsoft.com/ado/2008/09/edm"
METADATA_NS = "http://schemas.microsoft.com/ado/2007/08/dataservices/metadata"
DATA_NS = "http://schemas.microsoft.com/ado/2007/08/dataservices"
SAP_NS = "http://www.sap.com/Protocols/SAPData"


@dataclass(frozen=True)
class Prop:
    """One property of an entity type: Edm type, facets, and whether the backend maintains it (computed)."""

    name: str
    type: str = STRING
    max_length: int | None = None
    precision: int | None = None
    scale: int | None = None
    computed: bool = False
    """The backend maintains it (sap:creatable/updatable false): a client's value is ignored."""
    label: str = ""


@dataclass(frozen=True)
class Nav:
    """A navigation property: target entity set, cardinality and {child field: parent field}."""

    target: str
    many: bool
    link: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class EntityDef:
    """An entity set and its entity type."""

    service: str
    type_name: str
    keys: tuple[str, ...]
    props: tuple[Prop, ...]
    navs: Mapping[str, Nav] = field(default_factory=dict)
    etag: str | None = None
    """"stamp": W/"datetimeoffset'<change time>'"; "bp": W/"'<ETag property>'"; None: no concurrency token."""
    creatable: bool = True
    updatable: bool = True
    deletable: bool = False
    label: str = ""

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.props)

    @property
    def computed(self) -> frozenset[str]:
        """Fields the backend maintains; a client's value is ignored."""
        return frozenset(p.name for p in self.props if p.computed)

    def prop(self, name: str) -> Prop | None:
        return next((p for p in self.props if p.name == name), None)


def _s(name: str, length: int, *, computed: bool = False, label: str = "") -> Prop:
    return Prop(name, STRING, max_length=length, computed=computed, label=label)


def _d(name: str, kind: str = DT, *, computed: bool = False) -> Prop:
    return Prop(name, kind, precision=0 if kind in (DT, DTO, TM) else None, computed=computed)


def _n(name: str, precision: int, scale: int, *, computed: bool = False) -> Prop:
    return Prop(name, DEC, precision=precision, scale=scale, computed=computed)


def _b(name: str, *, computed: bool = False) -> Prop:
    return Prop(name, BOOL, computed=computed)


_BP = (
    _s("BusinessPartner", 10, label="Business Partner"), _s("Customer", 10, computed=True),
    _s("Supplier", 10, computed=True), _s("BusinessPartnerCategory", 1),
    _s("BusinessPartnerFullName", 81, computed=True), _s("BusinessPartnerGrouping", 4),
    _s("BusinessPartnerName", 81, computed=True), Prop("BusinessPartnerUUID", GUID, computed=True),
    _s("CorrespondenceLanguage", 2),
    _s("CreatedByUser", 12, computed=True), _d("CreationDate", computed=True), _d("CreationTime", TM, computed=True),
    _s("FirstName", 40), _s("LastName", 40), _s("Industry", 10), _d("LastChangeDate", computed=True),
    _d("LastChangeTime", TM, computed=True), _s("LastChangedByUser", 12, computed=True), _s("OrganizationBPName1", 40),
    _s("OrganizationBPName2", 40), _s("SearchTerm1", 20), _s("SearchTerm2", 20), _s("Language", 2),
    _b("BusinessPartnerIsBlocked"), _b("IsMarkedForArchiving"), _s("BusinessPartnerIDByExtSystem", 20),
    # Published as CHAR 26 (user + seconds); the simulator's ETag adds milliseconds so that two changes within one
    # second differ, so it declares no MaxLength rather than a false one.
    Prop("ETag", computed=True), _s("LegalForm", 2))
_ADDRESS = (
    _s("BusinessPartner", 10), _s("AddressID", 10), _d("ValidityStartDate"), _d("ValidityEndDate"), _s("CityName", 40),
    _s("Country", 3), _s("District", 40), _s("HouseNumber", 10), _s("PostalCode", 10), _s("Region", 3),
    _s("StreetName", 60), _s("Language", 2), _s("AddressTimeZone", 6), _s("POBox", 10))
_PHONE = (
    _s("AddressID", 10), _s("Person", 10), _s("OrdinalNumber", 3), _s("DestinationLocationCountry", 3),
    _b("IsDefaultPhoneNumber"), _s("PhoneNumber", 30), _s("PhoneNumberExtension", 10),
    _s("InternationalPhoneNumber", 30, computed=True), _s("PhoneNumberType", 1),
    _s("AddressCommunicationRemarkText", 50))
_EMAIL = (
    _s("AddressID", 10), _s("Person", 10), _s("OrdinalNumber", 3), _b("IsDefaultEmailAddress"), _s("EmailAddress", 241),
    _s("SearchEmailAddress", 20), _s("AddressCommunicationRemarkText", 50))
_ROLE = (_s("BusinessPartner", 10), _s("BusinessPartnerRole", 6), _d("ValidFrom", DTO), _d("ValidTo", DTO))
_CUSTOMER = (
    _s("Customer", 10), _s("CustomerAccountGroup", 4), _s("CustomerClassification", 2),
    _s("CustomerFullName", 220, computed=True), _s("CustomerName", 80), _b("DeletionIndicator"),
    _b("OrderIsBlockedForCustomer"), _s("Industry", 4), _d("CreationDate", computed=True),
    _s("CreatedByUser", 12, computed=True))
_SALES_AREA = (
    _s("Customer", 10), _s("SalesOrganization", 4), _s("DistributionChannel", 2), _s("Division", 2), _s("Currency", 5),
    _s("CustomerPaymentTerms", 4), _s("IncotermsClassification", 3), _s("IncotermsLocation1", 70),
    _s("ShippingCondition", 2), _s("SalesOffice", 4), _s("SalesGroup", 3), _s("CustomerPricingProcedure", 2),
    _s("CustomerAccountAssignmentGroup", 2), _s("CustomerGroup", 2), _s("SupplyingPlant", 4), _b("DeletionIndicator"),
    _b("OrderIsBlockedForCustomer"))
ORDER_STATUS = ("OverallSDProcessStatus", "OverallTotalDeliveryStatus", "OverallDeliveryStatus",
                "OverallOrdReltdBillgStatus", "TotalBlockStatus", "OverallSDDocumentRejectionSts",
                "TotalCreditCheckStatus")
_ORDER = (
    _s("SalesOrder", 10), _s("SalesOrderType", 4), _s("SalesOrganization", 4), _s("DistributionChannel", 2),
    _s("OrganizationDivision", 2), _s("SalesGroup", 3), _s("SalesOffice", 4), _s("SoldToParty", 10),
    _d("CreationDate", computed=True), _s("CreatedByUser", 12, computed=True), _d("LastChangeDate", computed=True),
    _d("LastChangeDateTime", DTO, computed=True), _s("PurchaseOrderByCustomer", 35), _s("CustomerPurchaseOrderType", 4),
    _d("CustomerPurchaseOrderDate"), _d("SalesOrderDate"), _n("TotalNetAmount", 16, 2, computed=True),
    _s("TransactionCurrency", 5), _d("RequestedDeliveryDate"), _s("ShippingCondition", 2),
    _b("CompleteDeliveryIsDefined"), _s("IncotermsClassification", 3), _s("IncotermsLocation1", 70),
    _s("CustomerPaymentTerms", 4), _d("PricingDate"), _s("HeaderBillingBlockReason", 2), _s("DeliveryBlockReason", 2),
    _s("ExternalDocumentID", 40), _s("SenderBusinessSystemName", 60),
    *(_s(name, 1, computed=True) for name in ORDER_STATUS))
ITEM_STATUS = ("SDProcessStatus", "DeliveryStatus", "OrderRelatedBillingStatus")
_ITEM = (
    _s("SalesOrder", 10), _s("SalesOrderItem", 6), _s("HigherLevelItem", 6), _s("SalesOrderItemCategory", 4),
    _s("SalesOrderItemText", 40), _s("PurchaseOrderByCustomer", 35), _s("PurchaseOrderByShipToParty", 35),
    _s("UnderlyingPurchaseOrderItem", 6), _s("ExternalItemID", 40, computed=True), _s("Material", 40),
    _s("MaterialByCustomer", 35), _n("RequestedQuantity", 15, 3), _s("RequestedQuantityUnit", 3),
    _n("ItemGrossWeight", 15, 3), _n("ItemNetWeight", 15, 3), _s("ItemWeightUnit", 3),
    _n("NetAmount", 16, 2, computed=True), _s("TransactionCurrency", 5), _s("MaterialGroup", 9),
    _s("ProductionPlant", 4), _s("StorageLocation", 4), _s("ShippingPoint", 4), _s("IncotermsClassification", 3),
    _s("CustomerPaymentTerms", 4), _s("SalesDocumentRjcnReason", 2), _s("ItemBillingBlockReason", 2),
    *(_s(name, 1, computed=True) for name in ITEM_STATUS))
_PRODUCT = (
    _s("Product", 40), _s("ProductType", 4), _s("CrossPlantStatus", 2), _d("CreationDate"), _s("CreatedByUser", 12),
    _d("LastChangeDate"), _s("LastChangedByUser", 12), _d("LastChangeDateTime", DTO), _b("IsMarkedForDeletion"),
    _s("ProductOldID", 40), _n("GrossWeight", 13, 3), _s("WeightUnit", 3), _n("NetWeight", 13, 3),
    _s("ProductGroup", 9), _s("BaseUnit", 3), _s("Division", 2), _s("ItemCategoryGroup", 4))
_PRODUCT_DESCRIPTION = (_s("Product", 40), _s("Language", 2), _s("ProductDescription", 40))
_PRODUCT_PLANT = (_s("Product", 40), _s("Plant", 4), _s("AvailabilityCheckType", 2), _s("MRPType", 2),
                  _s("ProcurementType", 1), _s("ProfitCenter", 10), _b("IsMarkedForDeletion"))
_CONDITION = (
    _s("ConditionRecord", 10), _s("ConditionSequentialNumber", 2), _s("ConditionTable", 3),
    _s("ConditionApplication", 2), _s("ConditionType", 4), _d("ConditionValidityEndDate"),
    _d("ConditionValidityStartDate"), _s("CreatedByUser", 12), _d("CreationDate"), _s("ConditionCalculationType", 3),
    _n("ConditionRateValue", 24, 2), _s("ConditionRateValueUnit", 5), _n("ConditionQuantity", 5, 0),
    _s("ConditionQuantityUnit", 3), _s("BaseUnit", 3), _b("ConditionIsDeleted"), _s("ConditionCurrency", 5))
_VALIDITY = (
    _s("ConditionRecord", 10), _d("ConditionValidityEndDate"), _d("ConditionValidityStartDate"),
    _s("ConditionApplication", 2), _s("ConditionType", 4), _s("ConditionReleaseStatus", 1), _s("SalesOrganization", 4),
    _s("DistributionChannel", 2), _s("Division", 2), _s("Customer", 10), _s("Material", 40), _s("MaterialGroup", 9),
    _s("Plant", 4))

ENTITIES: dict[str, EntityDef] = {
    "A_BusinessPartner": EntityDef(
        BP_SERVICE, "A_BusinessPartnerType", ("BusinessPartner",), _BP,
        {"to_BusinessPartnerAddress": Nav("A_BusinessPartnerAddress", True, (("BusinessPartner", "BusinessPartner"),)),
         "to_BusinessPartnerRole": Nav("A_BusinessPartnerRole", True, (("BusinessPartner", "BusinessPartner"),)),
         "to_Customer": Nav("A_Customer", False, (("Customer", "Customer"),))},
        etag="bp", label="Business Partner"),
    "A_BusinessPartnerAddress": EntityDef(
        BP_SERVICE, "A_BusinessPartnerAddressType", ("BusinessPartner", "AddressID"), _ADDRESS,
        {"to_PhoneNumber": Nav("A_AddressPhoneNumber", True, (("AddressID", "AddressID"),)),
         "to_EmailAddress": Nav("A_AddressEmailAddress", True, (("AddressID", "AddressID"),))},
        deletable=True, label="BP Address"),
    "A_AddressPhoneNumber": EntityDef(BP_SERVICE, "A_AddressPhoneNumberType", ("AddressID", "Person", "OrdinalNumber"),
                                      _PHONE, deletable=True, label="Phone Number"),
    "A_AddressEmailAddress": EntityDef(BP_SERVICE, "A_AddressEmailAddressType",
                                       ("AddressID", "Person", "OrdinalNumber"), _EMAIL, deletable=True,
                                       label="Email Address"),
    "A_BusinessPartnerRole": EntityDef(BP_SERVICE, "A_BusinessPartnerRoleType",
                                       ("BusinessPartner", "BusinessPartnerRole"), _ROLE, label="BP Role"),
    "A_Customer": EntityDef(
        BP_SERVICE, "A_CustomerType", ("Customer",), _CUSTOMER,
        {"to_CustomerSalesArea": Nav("A_CustomerSalesArea", True, (("Customer", "Customer"),))},
        creatable=False, label="Customer"),
    "A_CustomerSalesArea": EntityDef(BP_SERVICE, "A_CustomerSalesAreaType",
                                     ("Customer", "SalesOrganization", "DistributionChannel", "Division"),
                                     _SALES_AREA, label="Customer Sales Area"),
    "A_SalesOrder": EntityDef(
        SO_SERVICE, "A_SalesOrderType", ("SalesOrder",), _ORDER,
        {"to_Item": Nav("A_SalesOrderItem", True, (("SalesOrder", "SalesOrder"),))}, etag="stamp", deletable=True,
        label="Sales Order"),
    "A_SalesOrderItem": EntityDef(
        SO_SERVICE, "A_SalesOrderItemType", ("SalesOrder", "SalesOrderItem"), _ITEM, etag="stamp", deletable=True,
        label="Sales Order Item"),
    "A_Product": EntityDef(
        PRODUCT_SERVICE, "A_ProductType", ("Product",), _PRODUCT,
        {"to_Description": Nav("A_ProductDescription", True, (("Product", "Product"),)),
         "to_Plant": Nav("A_ProductPlant", True, (("Product", "Product"),))},
        creatable=False, updatable=False, label="Product"),
    "A_ProductDescription": EntityDef(PRODUCT_SERVICE, "A_ProductDescriptionType", ("Product", "Language"),
                                      _PRODUCT_DESCRIPTION, creatable=False, updatable=False,
                                      label="Product Description"),
    "A_ProductPlant": EntityDef(PRODUCT_SERVICE, "A_ProductPlantType", ("Product", "Plant"), _PRODUCT_PLANT,
                                creatable=False, updatable=False, label="Plant"),
    "A_SlsPrcgConditionRecord": EntityDef(
        PRICING_SERVICE, "A_SlsPrcgConditionRecordType", ("ConditionRecord",), _CONDITION,
        {"to_SlsPrcgCndnRecdValidity": Nav("A_SlsPrcgCndnRecdValidity", True,
                                           (("ConditionRecord", "ConditionRecord"),))},
        creatable=False, updatable=False, label="Condition Record"),
    "A_SlsPrcgCndnRecdValidity": EntityDef(
        PRICING_SERVICE, "A_SlsPrcgCndnRecdValidityType", ("ConditionRecord", "ConditionValidityEndDate"), _VALIDITY,
        {"to_SlsPrcgConditionRecord": Nav("A_SlsPrcgConditionRecord", False,
                                          (("ConditionRecord", "ConditionRecord"),))},
        creatable=False, updatable=False, label="Condition Validity"),
}


@dataclass(frozen=True)
class FunctionImport:
    """A function import (GET) returning one complex value."""

    name: str
    parameters: tuple[Prop, ...]
    returns: str
    """Complex type name (in the service's namespace)."""
    result: tuple[Prop, ...]
    optional: frozenset[str] = frozenset()


FUNCTION_IMPORTS: dict[str, tuple[FunctionImport, ...]] = {
    AVAILABILITY_SERVICE: (FunctionImport(
        AVAILABILITY_FUNCTION,
        (_s("SupplyingPlant", 4), _s("Material", 40), _s("ATPCheckingRule", 2), _d("RequestedUTCDateTime", DTO)),
        "AvailabilityRecord",
        (_d("PeriodStartUTCDateTime"), _s("PeriodStartTimeZone", 6), _d("PeriodEndUTCDateTime"),
         _s("PeriodEndTimeZone", 6), _n("AvailableQuantityInBaseUnit", 15, 3), _s("BaseUnit", 3)),
        optional=frozenset({"ATPCheckingRule"})),),
}

SERVICE_SETS: dict[str, list[str]] = {svc: sorted(n for n, e in ENTITIES.items() if e.service == svc)
                                      for svc in SERVICES}


def _types() -> tuple[dict[str, str], dict[str, int]]:
    """Edm type and decimal scale by property name: the simulator's value codecs are keyed by name, so one name
    must mean one type in every entity (checked here)."""
    types: dict[str, str] = {}
    scales: dict[str, int] = {}
    props = [p for e in ENTITIES.values() for p in e.props]
    props += [p for imports in FUNCTION_IMPORTS.values() for f in imports for p in (*f.parameters, *f.result)]
    for prop in props:
        if prop.type == STRING:
            continue
        if types.setdefault(prop.name, prop.type) != prop.type:
            raise ValueError(f"property {prop.name} has two types ({types[prop.name]} and {prop.type})")
        if prop.scale is not None:
            scales[prop.name] = prop.scale
    strings = {p.name for p in props if p.type == STRING}
    clash = strings & set(types)
    if clash:
        raise ValueError(f"properties typed both Edm.String and otherwise: {sorted(clash)}")
    return types, scales


TYPES, SCALES = _types()
MAX_LENGTHS: dict[tuple[str, str], int] = {(name, p.name): p.max_length for name, e in ENTITIES.items()
                                           for p in e.props if p.max_length is not None}
"""(entity set, property) -> MaxLength of an Edm.String property."""


# ============================================================================================ $metadata


def _prop_xml(prop: Prop, *, key: bool, entity: EntityDef | None) -> str:
    attrs = [f'Name="{prop.name}"', f'Type="{prop.type}"']
    if key:
        attrs.append('Nullable="false"')
    if prop.max_length is not None:
        attrs.append(f'MaxLength="{prop.max_length}"')
    if prop.precision is not None:
        attrs.append(f'Precision="{prop.precision}"')
    if prop.scale is not None:
        attrs.append(f'Scale="{prop.scale}"')
    if prop.label:
        attrs.append(f"sap:label={quoteattr(prop.label)}")
    if prop.type == DT:
        attrs.append('sap:display-format="Date"')
    if entity is not None:
        if prop.computed or not entity.creatable:
            attrs.append('sap:creatable="false"')
        if prop.computed or key or not entity.updatable:
            attrs.append('sap:updatable="false"')
    return f"<Property {' '.join(attrs)}/>"


def _association(entity_name: str, nav_name: str) -> str:
    return f"assoc_{entity_name}_{nav_name}"


def metadata(service: str) -> bytes:
    """The EDMX (OData v2, with sap: annotations) of one service, generated from `ENTITIES`."""
    sets = [(name, ENTITIES[name]) for name in SERVICE_SETS[service]]
    out = ['<?xml version="1.0" encoding="utf-8"?>',
           f'<edmx:Edmx Version="1.0" xmlns:edmx="{EDMX_NS}" xmlns:m="{METADATA_NS}" xmlns:sap="{SAP_NS}">',
           '<edmx:DataServices m:DataServiceVersion="2.0">',
           f'<Schema Namespace="{service}" xml:lang="en" sap:schema-version="1" xmlns="{EDM_NS}">']
    associations: list[str] = []
    association_sets: list[str] = []
    for name, entity in sets:
        out.append(f'<EntityType Name="{entity.type_name}" sap:label={quoteattr(entity.label or name)} '
                   'sap:content-version="1">')
        out.append("<Key>" + "".join(f'<PropertyRef Name="{k}"/>' for k in entity.keys) + "</Key>")
        out.extend(_prop_xml(p, key=p.name in entity.keys, entity=entity) for p in entity.props)
        for nav_name, nav in entity.navs.items():
            assoc = _association(name, nav_name)
            out.append(f'<NavigationProperty Name="{nav_name}" Relationship="{service}.{assoc}" '
                       f'FromRole="FromRole_{assoc}" ToRole="ToRole_{assoc}"/>')
            target = ENTITIES[nav.target]
            associations.append(
                f'<Association Name="{assoc}" sap:content-version="1">'
                f'<End Type="{service}.{entity.type_name}" Multiplicity="1" Role="FromRole_{assoc}"/>'
                f'<End Type="{service}.{target.type_name}" Multiplicity="{"*" if nav.many else "0..1"}" '
                f'Role="ToRole_{assoc}"/></Association>')
            association_sets.append(
                f'<AssociationSet Name="{assoc}_AssocSet" Association="{service}.{assoc}" sap:creatable="false" '
                'sap:updatable="false" sap:deletable="false" sap:content-version="1">'
                f'<End EntitySet="{name}" Role="FromRole_{assoc}"/><End EntitySet="{nav.target}" '
                f'Role="ToRole_{assoc}"/></AssociationSet>')
        out.append("</EntityType>")
    for function in FUNCTION_IMPORTS.get(service, ()):
        out.append(f'<ComplexType Name="{function.returns}">')
        out.extend(_prop_xml(p, key=False, entity=None) for p in function.result)
        out.append("</ComplexType>")
    out.extend(associations)
    out.append(f'<EntityContainer Name="{service}_Entities" m:IsDefaultEntityContainer="true" '
               'sap:supported-formats="atom json xlsx">')
    for name, entity in sets:
        flags = " ".join(f'sap:{flag}="{str(value).lower()}"' for flag, value in (
            ("creatable", entity.creatable), ("updatable", entity.updatable), ("deletable", entity.deletable)))
        out.append(f'<EntitySet Name="{name}" EntityType="{service}.{entity.type_name}" {flags} '
                   'sap:content-version="1"/>')
    out.extend(association_sets)
    for function in FUNCTION_IMPORTS.get(service, ()):
        out.append(f'<FunctionImport Name="{function.name}" ReturnType="{service}.{function.returns}" '
                   'm:HttpMethod="GET">')
        out.extend(f'<Parameter Name="{p.name}" Type="{p.type}" Mode="In"'
                   + (f' MaxLength="{p.max_length}"' if p.max_length else "")
                   + (' Nullable="true"' if p.name in function.optional else "") + "/>"
                   for p in function.parameters)
        out.append("</FunctionImport>")
    out.append("</EntityContainer>")
    out += [f'<atom:link rel="self" href="{escape(service)}/$metadata" xmlns:atom="http://www.w3.org/2005/Atom"/>',
            "</Schema>", "</edmx:DataServices>", "</edmx:Edmx>"]
    return "\n".join(out).encode()
