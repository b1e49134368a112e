"""The Salesforce simulator's org schema: every sObject, field, type and rule it validates and `describe`s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Standard field names, types, labels and lengths follow the Object Reference for the Salesforce Platform
# (developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/, pages
# sforce_api_objects_account.htm, _contact, _opportunity, _product2, _order, _orderitem, _opportunitylineitem).
# Custom fields (`__c`) are this project's org: External IDs for the Dynamics 365 keys and a few picklists.

SOAP_TYPES = {"id": "tns:ID", "reference": "tns:ID", "string": "xsd:string", "picklist": "xsd:string",
              "textarea": "xsd:string", "phone": "xsd:string", "url": "xsd:string", "email": "xsd:string",
              "currency": "xsd:double", "double": "xsd:double", "int": "xsd:int", "boolean": "xsd:boolean",
              "date": "xsd:date", "datetime": "xsd:dateTime"}
TEXT_TYPES = frozenset({"string", "picklist", "textarea", "phone", "url", "email"})
NUMBER_TYPES = frozenset({"currency", "double", "int"})


@dataclass(frozen=True)
class SfField:
    """One field as `describe` reports it; the simulator validates writes and SOQL against it."""

    name: str
    type: str
    label: str
    length: int = 0
    required: bool = False
    """Not nillable on create (REQUIRED_FIELD_MISSING when absent or blank)."""
    createable: bool = True
    updateable: bool = True
    external_id: bool = False
    calculated: bool = False
    reference_to: str | None = None
    picklist: tuple[str, ...] = ()
    restricted: bool = False
    """A restricted picklist refuses values outside `picklist` (INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST)."""
    precision: int = 0
    scale: int = 0

    @property
    def custom(self) -> bool:
        return self.name.endswith("__c")

    def describe(self) -> dict[str, Any]:
        relationship = self.name[:-2] if self.type == "reference" and self.name.endswith("Id") else None
        return {
            "name": self.name, "label": self.label, "type": self.type, "soapType": SOAP_TYPES[self.type],
            "length": self.length, "precision": self.precision, "scale": self.scale, "byteLength": self.length * 3,
            "digits": 9 if self.type == "int" else 0, "nillable": not self.required and self.name != "Id",
            "createable": self.createable, "updateable": self.updateable, "externalId": self.external_id,
            "idLookup": self.external_id or self.name == "Id", "unique": False, "calculated": self.calculated,
            "custom": self.custom, "defaultedOnCreate": self.name in _DEFAULTED, "filterable": True,
            "sortable": self.type != "textarea", "groupable": self.type not in ("double", "currency", "textarea"),
            "referenceTo": [self.reference_to] if self.reference_to else [],
            "relationshipName": relationship,
            "picklistValues": [{"active": True, "defaultValue": False, "label": v, "validFor": None, "value": v}
                               for v in self.picklist],
            "restrictedPicklist": self.restricted,
        }


@dataclass(frozen=True)
class SObjectDef:
    """One sObject: its key prefix, labels and fields (the system fields are added by `fields_with_system`)."""

    name: str
    label: str
    label_plural: str
    key_prefix: str
    fields: tuple[SfField, ...]
    rules: tuple[str, ...] = field(default=())
    """Behaviour beyond the fields, for the docs (validation rules, roll-ups)."""

    def field(self, name: str) -> SfField | None:
        """The field named `name`, in any case (API names are case-insensitive), system fields included."""
        return _BY_LOWER[self.name].get(name.lower())


_DEFAULTED = frozenset({"Id", "CreatedDate", "LastModifiedDate", "SystemModstamp", "IsDeleted", "CreatedById",
                        "LastModifiedById", "OwnerId", "CurrencyIsoCode"})
SYSTEM: tuple[SfField, ...] = (
    SfField("Id", "id", "Record ID", 18, createable=False, updateable=False),
    SfField("IsDeleted", "boolean", "Deleted", createable=False, updateable=False),
    SfField("CreatedDate", "datetime", "Created Date", createable=False, updateable=False),
    SfField("LastModifiedDate", "datetime", "Last Modified Date", createable=False, updateable=False),
    SfField("SystemModstamp", "datetime", "System Modstamp", createable=False, updateable=False),
)
SYSTEM_NAMES = tuple(f.name for f in SYSTEM)

CURRENCIES = ("USD", "EUR", "GBP", "CHF", "JPY")
LEGAL_ENTITIES = ("US01", "DE01", "BR01")
ACCOUNT_TYPES = ("Prospect", "Customer - Direct", "Customer - Channel", "Channel Partner / Reseller",
                 "Installation Partner", "Technology Partner", "Other")
INDUSTRIES = ("Agriculture", "Construction", "Energy", "Engineering", "Manufacturing", "Transportation", "Utilities",
              "Other")
STAGES = ("Prospecting", "Qualification", "Needs Analysis", "Value Proposition", "Id. Decision Makers",
          "Perception Analysis", "Proposal/Price Quote", "Negotiation/Review", "Closed Won", "Closed Lost")
FULFILLMENT = ("Open", "Shipped", "Invoiced", "Cancelled")
PAYMENT_TERMS = ("Net 30", "2% 10 Net 30", "Net 45", "Net 60", "Net 90")


def _text(name: str, label: str, length: int = 255, **kw: Any) -> SfField:
    return SfField(name, "string", label, length, **kw)


def _ext(name: str, label: str) -> SfField:
    return SfField(name, "string", label, 255, external_id=True)


def _money(name: str, label: str, **kw: Any) -> SfField:
    return SfField(name, "currency", label, precision=18, scale=2, **kw)


def _pick(name: str, label: str, values: Sequence[str], *, restricted: bool = False, **kw: Any) -> SfField:
    return SfField(name, "picklist", label, 255, picklist=tuple(values), restricted=restricted, **kw)


def _ref(name: str, label: str, target: str, **kw: Any) -> SfField:
    return SfField(name, "reference", label, 18, reference_to=target, **kw)


_CURRENCY = _pick("CurrencyIsoCode", "Currency ISO Code", CURRENCIES)
# custom picklists made in Setup are restricted by default ("Restrict picklist to the values defined")
_LEGAL_ENTITY = _pick("Legal_Entity__c", "Legal Entity", LEGAL_ENTITIES, restricted=True)
_FULFILLMENT = _pick("Fulfillment_Status__c", "Fulfillment Status", FULFILLMENT, restricted=True)

SOBJECTS: tuple[SObjectDef, ...] = (
    SObjectDef("Account", "Account", "Accounts", "001", (
        _text("Name", "Account Name", required=True),
        _text("AccountNumber", "Account Number", 40),
        _pick("Type", "Account Type", ACCOUNT_TYPES),
        _pick("Industry", "Industry", INDUSTRIES),
        SfField("BillingStreet", "textarea", "Billing Street", 255),
        _text("BillingCity", "Billing City", 40),
        _text("BillingPostalCode", "Billing Zip/Postal Code", 20),
        _text("BillingCountry", "Billing Country", 80),
        SfField("Phone", "phone", "Account Phone", 40),
        SfField("Website", "url", "Website", 255),
        _money("AnnualRevenue", "Annual Revenue"),
        SfField("NumberOfEmployees", "int", "Employees", precision=8),
        _ext("Dynamics_Account__c", "Dynamics Account"),
        _CURRENCY,
        _LEGAL_ENTITY,
        _money("Credit_Limit__c", "Credit Limit"),
        _pick("Payment_Terms__c", "Payment Terms", PAYMENT_TERMS, restricted=True),
        _ext("Dynamics_CRM_Id__c", "Dynamics CRM Id"),
    )),
    SObjectDef("Contact", "Contact", "Contacts", "003", (
        _text("FirstName", "First Name", 40),
        _text("LastName", "Last Name", 80, required=True),
        SfField("Email", "email", "Email", 80),
        SfField("Phone", "phone", "Business Phone", 40),
        _text("Title", "Title", 128),
        _text("MailingCity", "Mailing City", 40),
        _ref("AccountId", "Account ID", "Account"),
        _ext("Dynamics_Contact__c", "Dynamics Contact"),
        _ext("Dynamics_CRM_Id__c", "Dynamics CRM Id"),
    )),
    SObjectDef("Product2", "Product", "Products", "01t", (
        _text("Name", "Product Name", required=True),
        _text("ProductCode", "Product Code"),
        _pick("Family", "Product Family", ("Presses", "Conveyors", "Spares", "None")),
        SfField("IsActive", "boolean", "Active"),
        _ext("Dynamics_Item__c", "Dynamics Item"),
    )),
    SObjectDef("Opportunity", "Opportunity", "Opportunities", "006", (
        _text("Name", "Name", 120, required=True),
        _pick("StageName", "Stage", STAGES, required=True),
        SfField("CloseDate", "date", "Close Date", required=True),
        _money("Amount", "Amount"),
        _ref("AccountId", "Account ID", "Account"),
        _ext("Dynamics_Opportunity__c", "Dynamics Opportunity"),
        _LEGAL_ENTITY,
        _CURRENCY,
        _ext("Dynamics_Sales_Order__c", "Dynamics Sales Order"),
        _FULFILLMENT,
    ), rules=("Amount is the sum of the line items' TotalPrice (roll-up, in the line's transaction).",)),
    SObjectDef("OpportunityLineItem", "Opportunity Product", "Opportunity Product", "00k", (
        _ref("OpportunityId", "Opportunity ID", "Opportunity", required=True, updateable=False),
        _ref("Product2Id", "Product ID", "Product2", updateable=False),
        SfField("Quantity", "double", "Quantity", precision=12, scale=2, required=True),
        _money("UnitPrice", "Sales Price"),
        _money("TotalPrice", "Total Price", createable=False, updateable=False, calculated=True),
        _text("Dynamics_Line__c", "Dynamics Line"),
    ), rules=("TotalPrice = Quantity x UnitPrice (formula, refused on writes).",)),
    SObjectDef("Order", "Order", "Orders", "801", (
        _ref("AccountId", "Account ID", "Account", required=True),
        _ref("OpportunityId", "Opportunity ID", "Opportunity"),
        _pick("Status", "Status", ("Draft", "Activated"), restricted=True, required=True),
        SfField("EffectiveDate", "date", "Order Start Date", required=True),
        _CURRENCY,
        _LEGAL_ENTITY,
        _text("OrderReferenceNumber", "Order Reference Number", 80),
        _money("TotalAmount", "Order Amount", createable=False, updateable=False, calculated=True),
        _ext("Dynamics_Sales_Order__c", "Dynamics Sales Order"),
        _FULFILLMENT,
    ), rules=("Activated only once it has order products (FIELD_CUSTOM_VALIDATION_EXCEPTION).",
              "Order products of an activated order cannot change (FIELD_INTEGRITY_EXCEPTION).")),
    SObjectDef("OrderItem", "Order Product", "Order Products", "802", (
        _ref("OrderId", "Order ID", "Order", required=True, updateable=False),
        _ref("Product2Id", "Product ID", "Product2", updateable=False),
        SfField("Quantity", "double", "Quantity", precision=12, scale=2, required=True),
        _money("UnitPrice", "Unit Price", required=True),
        _money("TotalPrice", "Total Price", createable=False, updateable=False, calculated=True),
        _text("Dynamics_Line__c", "Dynamics Line"),
    )),
)

BY_NAME: dict[str, SObjectDef] = {o.name: o for o in SOBJECTS}
BY_LOWER: dict[str, SObjectDef] = {o.name.lower(): o for o in SOBJECTS}
_BY_LOWER: dict[str, dict[str, SfField]] = {o.name: {f.name.lower(): f for f in (*SYSTEM, *o.fields)}
                                             for o in SOBJECTS}


def sobject(name: str) -> SObjectDef | None:
    """The sObject called `name` in any case, or None."""
    return BY_LOWER.get(name.lower())


def describe(obj: SObjectDef, version: str) -> dict[str, Any]:
    """`GET /sobjects/<name>/describe` (a subset of the Describe SObject Result's keys, the ones clients read)."""
    base = f"/services/data/v{version}/sobjects/{obj.name}"
    return {
        "name": obj.name, "label": obj.label, "labelPlural": obj.label_plural, "keyPrefix": obj.key_prefix,
        "custom": False, "createable": True, "updateable": True, "deletable": True, "queryable": True,
        "retrieveable": True, "searchable": True, "layoutable": True, "undeletable": True, "replicateable": True,
        "triggerable": True, "feedEnabled": False, "mergeable": obj.name in ("Account", "Contact"),
        "fields": [f.describe() for f in (*SYSTEM, *obj.fields)],
        "childRelationships": [], "recordTypeInfos": [], "supportedScopes": [],
        "urls": {"sobject": base, "describe": f"{base}/describe", "rowTemplate": f"{base}/{{ID}}"},
    }


def global_entry(obj: SObjectDef, version: str) -> dict[str, Any]:
    """One entry of `GET /sobjects/` (Describe Global) and the `objectDescribe` of `GET /sobjects/<name>`."""
    base = f"/services/data/v{version}/sobjects/{obj.name}"
    return {"name": obj.name, "label": obj.label, "labelPlural": obj.label_plural, "keyPrefix": obj.key_prefix,
            "custom": False, "createable": True, "updateable": True, "deletable": True, "queryable": True,
            "retrieveable": True, "searchable": True, "layoutable": True, "replicateable": True,
            "triggerable": True, "urls": {"sobject": base, "describe": f"{base}/describe",
                                          "rowTemplate": f"{base}/{{ID}}"}}


def field_types(obj: SObjectDef) -> Mapping[str, str]:
    """Writable-or-calculated field name -> describe type (the system fields left out)."""
    return {f.name: f.type for f in obj.fields}
