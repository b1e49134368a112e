"""Protocol-faithful simulator of the Dataverse Web API v9.2 and its Entra ID token endpoint (Starlette ASGI)."""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import functools
import json
import math
import random
import re
import secrets
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import httpx
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.dataverse_schema import BULK_MESSAGES, EDM, csdl, entity_metadata_id, key_metadata, supports_bulk
from sandbox.webhook_delivery import Deliverer
from shared.payloads import strict_loads

API_PREFIX = "/api/data/v9.2/"
NAMESPACE = "Microsoft.Dynamics.CRM"
MAX_COUNT = 5000
"""`$count` counts at most this many rows (beyond it: 5000 and `totalrecordcountlimitexceeded`)."""
XRM_CONTRACTS = "http://schemas.microsoft.com/xrm/2011/Contracts"
MAX_BATCH_REQUESTS = 1000
MAX_PAGE_SIZE = 5000

DEFAULT_TENANT_ID = "9b1c3f0e-5d2a-4e7b-8c61-0f4a2d9e7b31"
DEFAULT_CLIENT_ID = "5f0e8a4c-2b1d-4c3e-9a7f-6d8b0c1e2f3a"
DEFAULT_CLIENT_SECRET = "sim-secret-Syncline~0123456789"  # a fixed test secret
APP_USER_ID = "2a6f1d4e-8b3c-4f5a-9e7d-1c0b2a3d4e5f"
"""systemuserid of the application user behind the default client (Syncline's own writes)."""
OFFICE_USER_ID = "7c3e9b1a-4d2f-4a6e-8b5c-0d1e2f3a4b5c"
"""systemuserid of the 'office user' used by `apply_change` (edits made in the D365 UI)."""
ORGANIZATION_ID = "4ef5b371-e89e-e711-8122-000d3aa2331c"
BUSINESS_UNIT_ID = "e2b9dd85-e89e-e711-8122-000d3aa2331c"

_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
FLOWS_FILE = Path(__file__).resolve().parent.parent / "flows" / "dot-signs.yaml"
CRM_FLOWS_FILE = Path(__file__).resolve().parent.parent / "flows" / "customer-360.yaml"
SAP_FLOWS_FILE = Path(__file__).resolve().parent.parent / "flows" / "sap.yaml"
STANDARD_TABLES = frozenset({"annotation", "account", "contact", "product", "salesorder", "salesorderdetail"})
"""Out-of-the-box tables (EntityDefinitions IsCustomEntity false); the rest of the data tables are custom."""

ATTRIBUTE_TYPES = {
    "guid": "Uniqueidentifier", "string": "String", "memo": "Memo", "int": "Integer", "decimal": "Decimal",
    "money": "Money", "float": "Double", "bool": "Boolean", "date": "DateTime", "datetime": "DateTime",
    "choice": "Picklist", "lookup": "Lookup",
}
URL_UNSAFE_KEY_CHARS = frozenset("/<>*%&:\\?+")
SYSTEM_READONLY = frozenset({"createdon", "modifiedon", "createdby", "modifiedby", "ownerid", "versionnumber"})
AUTONUMBER_SEED = 1001
"""The first `{SEQNUM}` an auto-number column hands out."""
AUTONUMBER_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
"""`{RANDSTRING}` characters (no 0/O or 1/I lookalikes)."""


# ============================================================================================ errors


class ODataError(Exception):
    """An error the Web API answers with `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _not_found(logical: str, key: str) -> ODataError:
    return ODataError(404, "0x80040217", f"{logical} With Id = {key} Does Not Exist")


def _bad_property(logical: str, name: str) -> ODataError:
    return ODataError(
        400, "0x80060888",
        f"The property '{name}' does not exist on type 'Microsoft.Dynamics.CRM.{logical}'. Make sure to only use "
        "property names that are defined by the type.",
    )


def _cannot_convert(value: Any, edm: str) -> ODataError:
    return ODataError(400, "0x80060888", f"Cannot convert the literal '{value}' to the expected type '{edm}'.")


# ============================================================================================ schema


@dataclass(frozen=True)
class ChoiceColumn:
    """A local choice (picklist) column: option value -> label."""

    options: dict[int, str]
    option_set_name: str = ""


@dataclass(frozen=True)
class LookupColumn:
    """A lookup column: single-valued navigation property name(s) -> target entity set (several = polymorphic)."""

    navs: dict[str, str]


@dataclass(frozen=True)
class Rollup:
    """A money column the platform keeps equal to the sum of a child table's column (e.g. an order's total)."""

    child_set: str
    child_lookup: str
    """The child's lookup column pointing at the parent."""
    child_column: str


@dataclass
class TableSchema:
    """One table: names, typed columns, alternate keys, lookups, choices and required columns."""

    entity_set: str
    logical_name: str
    primary_id: str
    primary_name: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    """logical name -> type: guid string memo int decimal money float bool date datetime choice lookup."""
    alternate_keys: list[tuple[str, ...]] = field(default_factory=list)
    lookups: dict[str, LookupColumn] = field(default_factory=dict)
    choices: dict[str, ChoiceColumn] = field(default_factory=dict)
    required: frozenset[str] = frozenset()
    max_length: dict[str, int] = field(default_factory=dict)
    computed: frozenset[str] = frozenset()
    """Columns the platform fills in (ignored when written)."""
    change_tracking: bool = True
    system: bool = False
    """A platform table (webhook registrations, SDK messages): never a source of webhook events."""
    unreadable: frozenset[str] = frozenset()
    """Write-only columns (IsValidForRead false, e.g. serviceendpoint.authvalue): never returned by reads."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Values the platform sets on create when the request leaves them out."""
    autonumber: dict[str, str] = field(default_factory=dict)
    """string column -> AutoNumberFormat (`{SEQNUM:n}`, `{RANDSTRING:n}`): filled on create when left empty."""
    line_numbers: dict[str, str] = field(default_factory=dict)
    """int column -> parent lookup column: numbered 1, 2, 3... within the parent on create when left empty."""
    amounts: dict[str, tuple[str, str]] = field(default_factory=dict)
    """money column -> (a, b): the platform keeps it at a * b, rounded to cents (a missing factor counts as 0)."""
    rollups: dict[str, Rollup] = field(default_factory=dict)
    """money column -> the sum of a child column over the records whose lookup points here."""
    status_by_state: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """statecode -> its valid statuscode values; the first is what a statecode change alone sets."""

    def __post_init__(self) -> None:
        cols = {self.primary_id: "guid"}
        cols.update(self.columns)
        for name in self.lookups:
            cols[name] = "lookup"
        for name in self.choices:
            cols[name] = "choice"
        cols.update({"createdon": "datetime", "modifiedon": "datetime", "versionnumber": "int"})
        self.columns = cols
        for sys_lookup in ("createdby", "modifiedby", "ownerid"):
            self.lookups.setdefault(sys_lookup, LookupColumn({sys_lookup: "systemusers"}))
            self.columns[sys_lookup] = "lookup"

    def read_name(self, column: str) -> str:
        """The Web API property name of a column (`_x_value` for lookups)."""
        return f"_{column}_value" if self.columns.get(column) == "lookup" else column

    def read_types(self) -> dict[str, str]:
        """Web API property name -> column type."""
        return {self.read_name(c): t for c, t in self.columns.items()}

    def nav_index(self) -> dict[str, tuple[str, str]]:
        """Navigation property -> (lookup column, target entity set)."""
        out: dict[str, tuple[str, str]] = {}
        for col, lk in self.lookups.items():
            if col in SYSTEM_READONLY:
                continue
            for nav, target in lk.navs.items():
                out[nav] = (col, target)
        return out


def _option_value(value: Any) -> int | None:
    """A value map's Dataverse side as a choice option value, or None when it is text (e.g. a currency code)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def _flow_choices(flows_file: Path) -> dict[tuple[str, str], ChoiceColumn]:
    """(entity set, column) -> choice options, read from the value maps of the flow spec (single source of truth).

    Header fields and document lines (`lines.fields` on `lines.source_table` / `target_table`) both count. A
    value map whose Dataverse side is text (ISO currency codes) belongs to a text column, not a choice.
    """
    data = yaml.safe_load(flows_file.read_text(encoding="utf-8"))
    value_maps: dict[str, list[dict[str, Any]]] = data.get("value_maps", {})
    out: dict[tuple[str, str], ChoiceColumn] = {}
    for flow in data.get("flows", []):
        parts = [(flow["source"], flow["target"], flow.get("fields", []))]
        lines = flow.get("lines")
        if lines:
            parts.append(({"system": flow["source"]["system"], "table": lines["source_table"]},
                          {"system": flow["target"]["system"], "table": lines["target_table"]},
                          lines.get("fields", [])))
        for source, target, fields in parts:
            for side, column_key in ((source, "source"), (target, "target")):
                if side["system"] != "dataverse":
                    continue
                for fm in fields:
                    if fm.get("transform") != "choice":
                        continue
                    entries = value_maps[fm["value_map"]]
                    values = [_option_value(e["dataverse"]) for e in entries]
                    if any(v is None for v in values):
                        continue
                    options = {v: str(e["label"]) for v, e in zip(values, entries, strict=True) if v is not None}
                    out[(side["table"], fm[column_key])] = ChoiceColumn(options, option_set_name=fm["value_map"])
    return out


def dot_schema(flows_file: Path = FLOWS_FILE) -> dict[str, TableSchema]:
    """The DOT sign-program tables of flows/dot-signs.yaml, keyed by entity set (choices from its value maps)."""
    choices = _flow_choices(flows_file)

    def ch(entity_set: str, *cols: str) -> dict[str, ChoiceColumn]:
        return {c: choices[(entity_set, c)] for c in cols}

    geo = {"dot_latitude": "float", "dot_longitude": "float"}
    gid_key = ("dot_arcgisglobalid",)
    tables = [
        TableSchema(
            "dot_signassets", "dot_signasset", "dot_signassetid", "dot_name",
            columns={"dot_name": "string", "dot_assettag": "string", "dot_mutcdcode": "string",
                     "dot_route": "string", "dot_milepost": "decimal", "dot_mountheightft": "decimal",
                     "dot_installdate": "date", "dot_retroreflectivity": "decimal",
                     "dot_lastinspectedon": "datetime", **geo, "dot_arcgisglobalid": "string"},
            alternate_keys=[("dot_assettag",), gid_key],
            choices=ch("dot_signassets", "dot_signtype", "dot_condition"),
            required=frozenset({"dot_assettag", "dot_mutcdcode", "dot_signtype"}),
            max_length={"dot_name": 200, "dot_assettag": 20, "dot_mutcdcode": 20, "dot_route": 50,
                        "dot_arcgisglobalid": 50},
        ),
        TableSchema(
            "dot_workorders", "dot_workorder", "dot_workorderid", "dot_name",
            columns={"dot_name": "string", "dot_description": "memo", "dot_duedate": "date",
                     "dot_completionnotes": "memo", **geo, "dot_arcgisglobalid": "string"},
            alternate_keys=[gid_key],
            lookups={"dot_signassetid": LookupColumn({"dot_SignAssetId": "dot_signassets"})},
            choices=ch("dot_workorders", "dot_worktype", "dot_priority", "dot_status"),
            required=frozenset({"dot_name", "dot_worktype", "dot_status"}),
            max_length={"dot_name": 100, "dot_description": 2000, "dot_completionnotes": 4000,
                        "dot_arcgisglobalid": 50},
        ),
        TableSchema(
            "dot_workordertasks", "dot_workordertask", "dot_workordertaskid", "dot_name",
            columns={"dot_name": "string", "dot_sequence": "int", "dot_arcgisglobalid": "string"},
            alternate_keys=[gid_key],
            lookups={"dot_workorderid": LookupColumn({"dot_WorkOrderId": "dot_workorders"})},
            choices=ch("dot_workordertasks", "dot_tasktype", "dot_status"),
            required=frozenset({"dot_name", "dot_tasktype", "dot_status"}),
            max_length={"dot_name": 100, "dot_arcgisglobalid": 50},
        ),
        TableSchema(
            "dot_fieldassignments", "dot_fieldassignment", "dot_fieldassignmentid", "dot_name",
            columns={"dot_name": "string", "dot_crew": "string", "dot_scheduledstart": "datetime",
                     "dot_declinedcomment": "memo", **geo, "dot_arcgisglobalid": "string"},
            alternate_keys=[gid_key],
            lookups={"dot_workorderid": LookupColumn({"dot_WorkOrderId": "dot_workorders"})},
            choices=ch("dot_fieldassignments", "dot_priority", "dot_status"),
            required=frozenset({"dot_name", "dot_crew", "dot_status"}),
            max_length={"dot_name": 200, "dot_crew": 20, "dot_declinedcomment": 2000, "dot_arcgisglobalid": 50},
        ),
        TableSchema(
            "dot_inspections", "dot_inspection", "dot_inspectionid", "dot_name",
            columns={"dot_name": "string", "dot_inspectedon": "datetime", "dot_inspector": "string",
                     "dot_retroreflectivity": "decimal", "dot_notes": "memo", **geo,
                     "dot_arcgisglobalid": "string"},
            alternate_keys=[gid_key],
            lookups={"dot_signassetid": LookupColumn({"dot_SignAssetId": "dot_signassets"})},
            choices=ch("dot_inspections", "dot_condition"),
            required=frozenset({"dot_inspectedon", "dot_inspector", "dot_condition"}),
            max_length={"dot_name": 200, "dot_inspector": 100, "dot_notes": 2000, "dot_arcgisglobalid": 50},
        ),
        TableSchema(
            "annotations", "annotation", "annotationid", "subject",
            columns={"subject": "string", "notetext": "memo", "filename": "string", "mimetype": "string",
                     "documentbody": "memo", "filesize": "int", "isdocument": "bool", "objecttypecode": "string"},
            lookups={"objectid": LookupColumn({
                "objectid_dot_inspection": "dot_inspections", "objectid_dot_signasset": "dot_signassets",
                "objectid_dot_workorder": "dot_workorders",
            })},
            max_length={"subject": 500, "notetext": 100000, "filename": 255, "mimetype": 256},
            computed=frozenset({"filesize", "isdocument", "objecttypecode"}),
        ),
    ]
    return {t.entity_set: t for t in tables}


# The platform's own options of account.customertypecode ("Relationship Type"). The flow spec maps only the
# types it syncs; the others stay valid so accounts outside the flows' scope (`when`) can exist.
ACCOUNT_CUSTOMER_TYPES = {1: "Competitor", 2: "Consultant", 3: "Customer", 4: "Investor", 5: "Partner",
                          6: "Influencer", 7: "Press", 8: "Prospect", 9: "Reseller", 10: "Supplier", 11: "Vendor",
                          12: "Other"}


ACCOUNT_ADDRESS = {"address1_line1": "string", "address1_city": "string", "address1_postalcode": "string",
                   "address1_country": "string"}
ACCOUNT_LENGTHS = {"name": 160, "telephone1": 50, "address1_line1": 250, "address1_city": 80,
                   "address1_postalcode": 20, "address1_country": 80}
"""The platform's lengths of the account columns several specs share (merged tables must agree on them)."""


def crm_schema(flows_file: Path = CRM_FLOWS_FILE) -> dict[str, TableSchema]:
    """The Dynamics 365 Sales tables of flows/customer-360.yaml (accounts, contacts), keyed by entity set.

    Choices come from the spec's value maps (their labels win); customertypecode also keeps the platform's
    other relationship types. syn_salesforceid is the custom column holding the Salesforce id (alternate key).
    """
    choices = _flow_choices(flows_file)
    customer_type = choices[("accounts", "customertypecode")]
    customer_type = ChoiceColumn({**ACCOUNT_CUSTOMER_TYPES, **customer_type.options}, customer_type.option_set_name)
    sf_key = ("syn_salesforceid",)
    tables = [
        TableSchema(
            "accounts", "account", "accountid", "name",
            columns={"name": "string", "telephone1": "string", "websiteurl": "string", **ACCOUNT_ADDRESS,
                     "revenue": "money", "creditlimit": "money", "syn_salesforceid": "string"},
            alternate_keys=[sf_key],
            choices={"customertypecode": customer_type,
                     "paymenttermscode": choices[("accounts", "paymenttermscode")]},
            required=frozenset({"name"}),
            max_length={**ACCOUNT_LENGTHS, "websiteurl": 200, "syn_salesforceid": 18},
        ),
        TableSchema(
            "contacts", "contact", "contactid", "fullname",
            columns={"firstname": "string", "lastname": "string", "fullname": "string", "emailaddress1": "string",
                     "telephone1": "string", "jobtitle": "string", "address1_city": "string",
                     "syn_salesforceid": "string"},
            alternate_keys=[sf_key],
            # parentcustomerid is a Customer lookup: an account or a contact, one typed navigation property each.
            lookups={"parentcustomerid": LookupColumn({"parentcustomerid_account": "accounts",
                                                       "parentcustomerid_contact": "contacts"})},
            required=frozenset({"lastname"}),
            max_length={"firstname": 50, "lastname": 50, "fullname": 160, "emailaddress1": 100, "telephone1": 50,
                        "jobtitle": 100, "address1_city": 80, "syn_salesforceid": 18},
            computed=frozenset({"fullname"}),
        ),
    ]
    return {t.entity_set: t for t in tables}


SALESORDER_STATES = {0: "Active", 1: "Submitted", 2: "Canceled", 3: "Fulfilled", 4: "Invoiced"}
SALESORDER_STATUSES = {1: "New", 2: "Pending", 3: "In Progress", 4: "No Money", 100001: "Complete",
                       100002: "Partial", 100003: "Invoiced"}
SALESORDER_STATUS_BY_STATE = {0: (1, 2), 1: (3,), 2: (4,), 3: (100001, 100002), 4: (100003,)}
"""salesorder statecode -> its statuscode values (the platform's defaults first)."""
SAP_UNMAPPED_OPTIONS: dict[tuple[str, str], dict[int, str]] = {
    ("salesorders", "syn_salesorg"): {100000001: "Pumps Canada (1810)"},
    ("salesorderdetails", "syn_plant"): {100000002: "Monterrey (1730)"},
    ("salesorderdetails", "syn_unit"): {100000003: "Box"},
}
"""Options the org has that flows/sap.yaml does not map: records using them dead-letter (UNMAPPED_CHOICE)."""
ORDER_NUMBER_FORMAT = "ORD-{SEQNUM:5}-{RANDSTRING:4}"


def sap_schema(flows_file: Path = SAP_FLOWS_FILE) -> dict[str, TableSchema]:
    """The Dynamics 365 Sales tables of flows/sap.yaml (accounts, products, orders, order lines) by entity set.

    Choices come from the spec's value maps plus `SAP_UNMAPPED_OPTIONS`; text-valued maps (currency codes)
    are text columns. `accounts` holds only what the SAP flows use: `merge_schemas` joins it with another
    spec's accounts. Orders get an auto-numbered ordernumber, a statecode/statuscode pair, and a totalamount
    rolled up from their lines' extendedamount (quantity * priceperunit); lines are numbered per order.
    """
    choices = _flow_choices(flows_file)

    def ch(entity_set: str, *cols: str) -> dict[str, ChoiceColumn]:
        out = {}
        for col in cols:
            mapped = choices[(entity_set, col)]
            extra = SAP_UNMAPPED_OPTIONS.get((entity_set, col), {})
            out[col] = ChoiceColumn({**mapped.options, **extra}, mapped.option_set_name)
        return out

    tables = [
        TableSchema(
            "accounts", "account", "accountid", "name",
            columns={"name": "string", "accountnumber": "string", "telephone1": "string", **ACCOUNT_ADDRESS,
                     "creditonhold": "bool", "syn_currencycode": "string", "syn_sapbusinesspartner": "string"},
            alternate_keys=[("syn_sapbusinesspartner",)],
            choices=ch("accounts", "paymenttermscode"),
            required=frozenset({"name"}),
            max_length={**ACCOUNT_LENGTHS, "accountnumber": 20, "syn_currencycode": 3,
                        "syn_sapbusinesspartner": 10},
        ),
        TableSchema(
            "products", "product", "productid", "name",
            columns={"name": "string", "productnumber": "string", "price": "money", "quantityonhand": "decimal",
                     "syn_sapmaterial": "string"},
            alternate_keys=[("syn_sapmaterial",)],
            required=frozenset({"name", "productnumber"}),
            max_length={"name": 100, "productnumber": 100, "syn_sapmaterial": 40},
        ),
        TableSchema(
            "salesorders", "salesorder", "salesorderid", "name",
            columns={"name": "string", "ordernumber": "string", "requestdeliveryby": "date", "totalamount": "money",
                     "syn_currencycode": "string", "syn_sapsalesorder": "string"},
            alternate_keys=[("syn_sapsalesorder",)],
            # customerid is a Customer lookup: an account or a contact, one typed navigation property each.
            lookups={"customerid": LookupColumn({"customerid_account": "accounts",
                                                 "customerid_contact": "contacts"})},
            choices={"statecode": ChoiceColumn(dict(SALESORDER_STATES), "salesorder_statecode"),
                     "statuscode": ChoiceColumn(dict(SALESORDER_STATUSES), "salesorder_statuscode"),
                     **ch("salesorders", "syn_salesorg", "syn_distributionchannel", "syn_deliverystatus",
                          "syn_goodsissuestatus", "syn_billingstatus")},
            required=frozenset({"name", "customerid"}),
            max_length={"name": 300, "ordernumber": 100, "syn_currencycode": 3, "syn_sapsalesorder": 10},
            computed=frozenset({"totalamount"}),
            defaults={"statecode": 0, "statuscode": 1},
            autonumber={"ordernumber": ORDER_NUMBER_FORMAT},
            rollups={"totalamount": Rollup("salesorderdetails", "salesorderid", "extendedamount")},
            status_by_state=dict(SALESORDER_STATUS_BY_STATE),
        ),
        TableSchema(
            "salesorderdetails", "salesorderdetail", "salesorderdetailid", "productdescription",
            columns={"productdescription": "string", "quantity": "decimal", "priceperunit": "money",
                     "extendedamount": "money", "lineitemnumber": "int"},
            lookups={"salesorderid": LookupColumn({"salesorderid": "salesorders"}),
                     "productid": LookupColumn({"productid": "products"})},
            choices=ch("salesorderdetails", "syn_unit", "syn_plant"),
            required=frozenset({"salesorderid", "quantity"}),
            max_length={"productdescription": 500},
            computed=frozenset({"extendedamount"}),
            line_numbers={"lineitemnumber": "salesorderid"},
            amounts={"extendedamount": ("quantity", "priceperunit")},
        ),
    ]
    return {t.entity_set: t for t in tables}


def _merge_table(a: TableSchema, b: TableSchema) -> TableSchema:
    """One table described by two specs: the union of their columns, keys, lookups and choices.

    Both must agree where they overlap (names, column types, option labels, lengths): a disagreement means
    two specs assume different orgs, which the simulator refuses rather than picking one.
    """
    where = f"table {a.entity_set}"
    if (a.logical_name, a.primary_id, a.primary_name) != (b.logical_name, b.primary_id, b.primary_name):
        raise ValueError(f"{where}: the specs disagree on its names")

    def union(x: Mapping[Any, Any], y: Mapping[Any, Any], what: str) -> dict[Any, Any]:
        for k in x.keys() & y.keys():
            if x[k] != y[k]:
                raise ValueError(f"{where}: the specs disagree on {what} {k!r} ({x[k]!r} vs {y[k]!r})")
        return {**x, **y}

    choices = {}
    for col in {**a.choices, **b.choices}:
        if col in a.choices and col in b.choices:
            options = union(a.choices[col].options, b.choices[col].options, f"the options of {col}")
            choices[col] = ChoiceColumn(options, a.choices[col].option_set_name)
        else:
            choices[col] = a.choices.get(col) or b.choices[col]
    if a.change_tracking != b.change_tracking or a.system != b.system:
        raise ValueError(f"{where}: the specs disagree on change tracking")
    return TableSchema(
        a.entity_set, a.logical_name, a.primary_id, a.primary_name,
        columns=union({c: t for c, t in a.columns.items() if c not in a.choices},
                      {c: t for c, t in b.columns.items() if c not in b.choices}, "the type of"),
        alternate_keys=a.alternate_keys + [k for k in b.alternate_keys if k not in a.alternate_keys],
        lookups=union(a.lookups, b.lookups, "the lookup"),
        choices=choices,
        required=a.required | b.required,
        max_length=union(a.max_length, b.max_length, "the length of"),
        computed=a.computed | b.computed,
        change_tracking=a.change_tracking,
        system=a.system,
        unreadable=a.unreadable | b.unreadable,
        defaults=union(a.defaults, b.defaults, "the default of"),
        autonumber=union(a.autonumber, b.autonumber, "the auto-number of"),
        line_numbers=union(a.line_numbers, b.line_numbers, "the line numbering of"),
        amounts=union(a.amounts, b.amounts, "the amount of"),
        rollups=union(a.rollups, b.rollups, "the rollup of"),
        status_by_state=union(a.status_by_state, b.status_by_state, "the statuses of state"),
    )


def merge_schemas(*schemas: Mapping[str, TableSchema]) -> dict[str, TableSchema]:
    """Several specs' tables as one org: a table more than one of them declares is merged (`_merge_table`)."""
    out: dict[str, TableSchema] = {}
    for schema in schemas:
        for entity_set, table in schema.items():
            out[entity_set] = _merge_table(out[entity_set], table) if entity_set in out else table
    return out


def default_schema() -> dict[str, TableSchema]:
    """What a simulator serves unless told otherwise: the DOT tables and the Dynamics 365 Sales tables of the
    Customer 360 and SAP specs (their accounts merged into one table)."""
    return merge_schemas(dot_schema(), crm_schema(), sap_schema())


SDK_MESSAGES = ("Create", "Update", "Delete")
"""The SDK messages the simulator knows (and preloads in `sdkmessages`)."""
CONTRACT_WEBHOOK = 8
AUTH_WEBHOOK_KEY, AUTH_HTTP_HEADER, AUTH_HTTP_QUERY_STRING = 4, 5, 6
IMAGE_PRE, IMAGE_POST, IMAGE_BOTH = 0, 1, 2
IMAGE_MESSAGE_PROPERTY = {"Create": "Id", "Update": "Target", "Delete": "Target"}
"""The request property an image is taken from, per message (what the Plug-in Registration tool sets)."""


def _choices(name: str, options: Mapping[int, str]) -> ChoiceColumn:
    return ChoiceColumn(dict(options), option_set_name=name)


def system_schema() -> dict[str, TableSchema]:
    """The platform tables behind webhook registration: service endpoints, SDK messages, filters, steps, images."""
    tables = [
        TableSchema(
            "serviceendpoints", "serviceendpoint", "serviceendpointid", "name",
            columns={"name": "string", "description": "memo", "url": "string", "authvalue": "string",
                     "namespaceaddress": "string", "path": "string", "solutionnamespace": "string"},
            choices={
                "contract": _choices("serviceendpoint_contract", {
                    1: "OneWay", 2: "Queue", 3: "Rest", 4: "TwoWay", 5: "Topic", 6: "Queue (Persistent)",
                    7: "Event Hub", 8: "Webhook", 9: "Event Grid", 10: "Managed Data Lake", 11: "Container Storage"}),
                "authtype": _choices("serviceendpoint_authtype", {
                    1: "ACS", 2: "SAS Key", 3: "SAS Token", 4: "Webhook Key", 5: "Http Header", 6: "Http Query String",
                    7: "Connection String", 8: "Access Key"}),
                "connectionmode": _choices("serviceendpoint_connectionmode", {1: "Normal", 2: "Federated"}),
                "messageformat": _choices("serviceendpoint_messageformat", {1: ".NETBinary", 2: "JSON", 3: "XML"}),
                "userclaim": _choices("serviceendpoint_userclaim", {1: "None", 2: "UserId"}),
            },
            required=frozenset({"name", "contract"}),
            max_length={"name": 256, "description": 2000, "url": 2000, "authvalue": 2048},
            change_tracking=False, system=True, unreadable=frozenset({"authvalue"}),
            defaults={"connectionmode": 1, "messageformat": 2, "userclaim": 1},
        ),
        TableSchema(
            "sdkmessages", "sdkmessage", "sdkmessageid", "name",
            columns={"name": "string", "categoryname": "string"},
            required=frozenset({"name"}), max_length={"name": 256},
            change_tracking=False, system=True,
        ),
        TableSchema(
            "sdkmessagefilters", "sdkmessagefilter", "sdkmessagefilterid", "name",
            columns={"name": "string", "primaryobjecttypecode": "string", "secondaryobjecttypecode": "string",
                     "iscustomprocessingstepallowed": "bool"},
            lookups={"sdkmessageid": LookupColumn({"sdkmessageid": "sdkmessages"})},
            required=frozenset({"sdkmessageid", "primaryobjecttypecode"}),
            change_tracking=False, system=True,
        ),
        TableSchema(
            "sdkmessageprocessingsteps", "sdkmessageprocessingstep", "sdkmessageprocessingstepid", "name",
            columns={"name": "string", "description": "memo", "rank": "int", "asyncautodelete": "bool",
                     "filteringattributes": "memo", "configuration": "memo"},
            lookups={"sdkmessageid": LookupColumn({"sdkmessageid": "sdkmessages"}),
                     "sdkmessagefilterid": LookupColumn({"sdkmessagefilterid": "sdkmessagefilters"}),
                     "eventhandler": LookupColumn({"eventhandler_serviceendpoint": "serviceendpoints"})},
            choices={
                "mode": _choices("sdkmessageprocessingstep_mode", {0: "Synchronous", 1: "Asynchronous"}),
                "stage": _choices("sdkmessageprocessingstep_stage", {
                    10: "Initial Pre-operation (For internal use only)", 20: "Pre-operation",
                    30: "Main Operation (For internal use only)", 40: "Post-operation"}),
                "supporteddeployment": _choices("sdkmessageprocessingstep_supporteddeployment", {
                    0: "Server Only", 1: "Microsoft Dynamics 365 Client for Outlook Only", 2: "Both"}),
                "statecode": _choices("sdkmessageprocessingstep_statecode", {0: "Enabled", 1: "Disabled"}),
                "statuscode": _choices("sdkmessageprocessingstep_statuscode", {1: "Enabled", 2: "Disabled"}),
            },
            required=frozenset({"name", "mode", "stage", "rank", "sdkmessageid", "eventhandler"}),
            max_length={"name": 256, "description": 256, "filteringattributes": 100000},
            change_tracking=False, system=True,
            defaults={"rank": 1, "asyncautodelete": False, "supporteddeployment": 0, "statecode": 0, "statuscode": 1},
        ),
        TableSchema(
            "sdkmessageprocessingstepimages", "sdkmessageprocessingstepimage", "sdkmessageprocessingstepimageid",
            "name",
            columns={"name": "string", "description": "memo", "entityalias": "string",
                     "messagepropertyname": "string", "attributes": "memo", "relatedattributename": "string"},
            lookups={"sdkmessageprocessingstepid": LookupColumn(
                {"sdkmessageprocessingstepid": "sdkmessageprocessingsteps"})},
            choices={"imagetype": _choices("sdkmessageprocessingstepimage_imagetype",
                                           {IMAGE_PRE: "PreImage", IMAGE_POST: "PostImage", IMAGE_BOTH: "Both"})},
            required=frozenset({"name", "entityalias", "imagetype", "messagepropertyname",
                                "sdkmessageprocessingstepid"}),
            max_length={"name": 256, "entityalias": 256, "messagepropertyname": 256, "attributes": 100000},
            change_tracking=False, system=True,
        ),
    ]
    return {t.entity_set: t for t in tables}


def parse_settings(authvalue: str) -> list[tuple[str, str]]:
    """`<settings><setting name="k" value="v" /></settings>` (HttpHeader / HttpQueryString auth) -> pairs."""
    try:
        root = ET.fromstring(authvalue)
    except ET.ParseError as exc:
        raise ValueError(f"authvalue is not a <settings> document: {exc}") from exc
    if root.tag != "settings":
        raise ValueError("authvalue must be a <settings> document")
    pairs = []
    for node in root.findall("setting"):
        name = node.get("name")
        if not name:
            raise ValueError("every <setting> needs a name")
        pairs.append((name, node.get("value") or ""))
    return pairs


def _csv(value: Any) -> list[str]:
    """A comma-separated attribute list (step filtering attributes, image attributes) -> names."""
    return [n.strip() for n in str(value or "").split(",") if n.strip()]


def _with_query(url: str, pairs: Iterable[tuple[str, str]]) -> str:
    """`url` with the given query parameters set (replacing any of the same name)."""
    parts = urlsplit(url)
    extra = list(pairs)
    names = {k for k, _ in extra}
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in names] + extra
    return parts._replace(query=urlencode(query)).geturl()


# ============================================================================================ values


def _utc_text(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_text() -> str:
    return _utc_text(datetime.now(UTC))


def _parse_datetime(text: str) -> datetime:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt


def _decimal(value: Any) -> Decimal:
    """A stored number as an exact decimal (repr keeps 19.99 as 19.99); a missing value counts as 0."""
    if value is None or isinstance(value, bool):
        return Decimal(0)
    return Decimal(repr(float(value)))


def _money(value: Decimal) -> float:
    """A computed amount, rounded half-up to cents like the platform's currency precision (2)."""
    return float(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def _coerce(schema: TableSchema, column: str, value: Any) -> Any:
    """Validate a written value against the column type; returns the stored form."""
    typ = schema.columns[column]
    edm = EDM[typ]
    if value is None:
        return None
    if typ in ("string", "memo"):
        if not isinstance(value, str):
            raise _cannot_convert(value, edm)
        limit = schema.max_length.get(column)
        if limit is not None and len(value) > limit:
            raise ODataError(
                400, "0x80044331",
                f"A validation error occurred.  The length of the '{column}' attribute of the '{schema.logical_name}' "
                f"entity exceeded the maximum allowed length of '{limit}'.",
            )
        return value or None  # Dataverse stores empty text as null
    if typ in ("int", "choice"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _cannot_convert(value, edm)
        if typ == "choice":
            options = schema.choices[column].options
            if value not in options:
                accepted = ",".join(str(v) for v in sorted(options))
                raise ODataError(
                    400, "0x8004431A",
                    f"A validation error occurred. The value {value} of '{column}' on record of type "
                    f"'{schema.logical_name}' is outside the valid range. Accepted Values: {accepted}",
                )
        return value
    if typ in ("decimal", "money", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _cannot_convert(value, edm)
        return float(value)
    if typ == "bool":
        if not isinstance(value, bool):
            raise _cannot_convert(value, edm)
        return value
    if typ == "date":
        if not isinstance(value, str) or not _DATE_RE.match(value):
            raise _cannot_convert(value, edm)
        try:
            date.fromisoformat(value)
        except ValueError as exc:
            raise _cannot_convert(value, edm) from exc
        return value
    if typ == "datetime":
        if not isinstance(value, str):
            raise _cannot_convert(value, edm)
        try:
            return _utc_text(_parse_datetime(value))
        except ValueError as exc:
            raise _cannot_convert(value, edm) from exc
    if typ == "guid":
        if not isinstance(value, str) or not _GUID_RE.match(value):
            raise _cannot_convert(value, edm)
        return value.lower()
    raise _cannot_convert(value, edm)


# ============================================================================================ OData text


def _split_segments(path: str) -> list[str]:
    """Split a decoded resource path on '/', ignoring slashes inside quoted literals."""
    segments: list[str] = []
    buf: list[str] = []
    in_quote = False
    for ch in path:
        if ch == "'":
            in_quote = not in_quote
        if ch == "/" and not in_quote:
            segments.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    segments.append("".join(buf))
    return [s for s in segments if s != ""]


_SEGMENT_RE = re.compile(r"^(?P<name>[A-Za-z_$][\w.$]*)(?:\((?P<key>.*)\))?$", re.S)


def _parse_key_predicate(text: str) -> str | dict[str, Any]:
    """`guid` -> guid; `a='x',b=3` -> {a: 'x', b: 3}. Raises ODataError on bad syntax."""
    text = text.strip()
    if _GUID_RE.match(text):
        return text.lower()
    tokens = _tokenize(text)
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        if (i + 2 >= len(tokens) or tokens[i].kind != "ident" or tokens[i + 1].text != "="
                or tokens[i + 2].kind not in ("string", "number", "guid", "keyword")):
            raise ODataError(400, "0x80060888", f"Bad Request - Error in query syntax: key '({text})'.")
        out[tokens[i].text] = tokens[i + 2].value
        i += 3
        if i < len(tokens):
            if tokens[i].text != ",":
                raise ODataError(400, "0x80060888", f"Bad Request - Error in query syntax: key '({text})'.")
            i += 1
    if not out:
        raise ODataError(400, "0x80060888", f"Bad Request - Error in query syntax: key '({text})'.")
    return out


@dataclass
class _Tok:
    kind: str  # string number guid datetime date ident keyword punct
    text: str
    value: Any
    pos: int


_TOKEN_RE = re.compile(
    r"""
     (?P<ws>\s+)
    |(?P<string>'(?:[^']|'')*')
    |(?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![\w-]))
    |(?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))
    |(?P<date>\d{4}-\d{2}-\d{2}(?![\w:]))
    |(?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w.]))
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    |(?P<punct>[()\[\],=])
    """,
    re.X,
)
_KEYWORDS = {"null": None, "true": True, "false": False}


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            raise ODataError(400, "0x80060888", f"Syntax error at position {pos} in '{text}'.")
        kind = m.lastgroup or ""
        raw = m.group()
        pos = m.end()
        if kind == "ws":
            continue
        value: Any = raw
        if kind == "string":
            value = raw[1:-1].replace("''", "'")
        elif kind == "number":
            value = float(raw) if any(c in raw for c in ".eE") else int(raw)
        elif kind == "guid":
            value = raw.lower()
        elif kind == "ident" and raw in _KEYWORDS:
            kind, value = "keyword", _KEYWORDS[raw]
        toks.append(_Tok(kind, raw, value, m.start()))
    return toks


# ---- filter AST: tuples; evaluated against a dict of Web API property values


_CMP_OPS = {"eq", "ne", "gt", "ge", "lt", "le"}
_STRING_FUNCS = {"contains", "startswith", "endswith"}
_IN_FUNCS = {"Microsoft.Dynamics.CRM.In": False, "Microsoft.Dynamics.CRM.NotIn": True}


class _FilterParser:
    """Recursive-descent parser for the $filter subset Syncline and demos use (never eval)."""

    def __init__(self, text: str, prop_types: Mapping[str, str], type_name: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.prop_types = prop_types
        self.type_name = type_name

    def error(self, tok: _Tok | None = None) -> ODataError:
        pos = tok.pos if tok else len(self.text)
        return ODataError(400, "0x80060888", f"Syntax error at position {pos} in '{self.text}'.")

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, text: str | None = None) -> _Tok:
        tok = self.peek()
        if tok is None or (text is not None and tok.text != text):
            raise self.error(tok)
        self.i += 1
        return tok

    def parse(self) -> tuple[Any, ...]:
        node = self.parse_or()
        if self.peek() is not None:
            raise self.error(self.peek())
        return node

    def parse_or(self) -> tuple[Any, ...]:
        node = self.parse_and()
        while (tok := self.peek()) is not None and tok.text == "or":
            self.i += 1
            node = ("or", node, self.parse_and())
        return node

    def parse_and(self) -> tuple[Any, ...]:
        node = self.parse_unary()
        while (tok := self.peek()) is not None and tok.text == "and":
            self.i += 1
            node = ("and", node, self.parse_unary())
        return node

    def parse_unary(self) -> tuple[Any, ...]:
        tok = self.peek()
        if tok is not None and tok.text == "not":
            self.i += 1
            return ("not", self.parse_unary())
        if tok is not None and tok.text == "(":
            self.i += 1
            node = self.parse_or()
            self.take(")")
            return node
        left = self.parse_operand()
        if left[0] == "bool":
            return left
        op = self.peek()
        if op is None or op.text not in _CMP_OPS:
            raise self.error(op)
        self.i += 1
        right = self.parse_operand()
        if right[0] == "bool":
            raise self.error(op)
        self.check_types(left, right, op.text)
        return ("cmp", op.text, left, right)

    def parse_operand(self) -> tuple[Any, ...]:
        tok = self.take()
        if tok.kind == "ident":
            nxt = self.peek()
            if nxt is not None and nxt.text == "(":
                return self.parse_function(tok)
            if tok.text in ("and", "or", "not") or tok.text in _CMP_OPS:
                raise self.error(tok)
            if tok.text not in self.prop_types:
                raise ODataError(400, "0x80060888",
                                 f"Could not find a property named '{tok.text}' on type '{self.type_name}'.")
            return ("prop", tok.text)
        if tok.kind in ("string", "number", "guid", "keyword"):
            return ("lit", tok.value, tok.kind)
        if tok.kind in ("date", "datetime"):
            return ("lit", tok.text, tok.kind)
        raise self.error(tok)

    def parse_function(self, name_tok: _Tok) -> tuple[Any, ...]:
        name = name_tok.text
        self.take("(")
        if name in _STRING_FUNCS:
            prop = self.parse_operand()
            self.take(",")
            lit = self.parse_operand()
            self.take(")")
            if prop[0] != "prop" or lit[0] != "lit" or lit[2] != "string":
                raise self.error(name_tok)
            return ("bool", ("strfunc", name, prop[1], lit[1]))
        if name in _IN_FUNCS:
            args: dict[str, Any] = {}
            while True:
                key = self.take()
                self.take("=")
                if key.text == "PropertyName":
                    args["PropertyName"] = self.take().value
                elif key.text == "PropertyValues":
                    self.take("[")
                    values: list[Any] = []
                    while (tok := self.peek()) is not None and tok.text != "]":
                        if tok.kind not in ("string", "number", "guid"):
                            raise self.error(tok)
                        values.append(tok.value)
                        self.i += 1
                        if (sep := self.peek()) is not None and sep.text == ",":
                            self.i += 1
                    self.take("]")
                    args["PropertyValues"] = values
                else:
                    raise self.error(key)
                if (sep := self.peek()) is not None and sep.text == ",":
                    self.i += 1
                    continue
                self.take(")")
                break
            prop_name = args.get("PropertyName")
            if not isinstance(prop_name, str) or "PropertyValues" not in args:
                raise self.error(name_tok)
            if prop_name not in self.prop_types:
                raise ODataError(400, "0x80060888",
                                 f"Could not find a property named '{prop_name}' on type '{self.type_name}'.")
            typ = self.prop_types[prop_name]
            wanted: set[Any] = set()
            for raw in args["PropertyValues"]:
                if typ in ("int", "choice") and isinstance(raw, str) and re.fullmatch(r"-?\d+", raw):
                    raw = int(raw)
                try:
                    wanted.add(_norm(raw, typ))
                except ValueError as exc:
                    raise ODataError(400, "0x80060888", f"Cannot convert the literal '{raw}' to the expected type "
                                     f"'{EDM.get(typ, 'Edm.String')}'.") from exc
            return ("bool", ("in", prop_name, frozenset(wanted), _IN_FUNCS[name]))
        raise ODataError(400, "0x80060888", f"An unknown function with name '{name}' was found. This may also be a "
                         "function import or a key lookup on a navigation property, which is not allowed.")

    def check_types(self, left: tuple[Any, ...], right: tuple[Any, ...], op: str) -> None:
        def edm(node: tuple[Any, ...]) -> str | None:
            if node[0] == "prop":
                return EDM.get(self.prop_types[node[1]], "Edm.String")
            kind = node[2]
            if kind == "keyword":
                return None if node[1] is None else "Edm.Boolean"
            return {"string": "Edm.String", "guid": "Edm.Guid", "date": "Edm.Date",
                    "datetime": "Edm.DateTimeOffset"}.get(kind) or (
                "Edm.Int32" if isinstance(node[1], int) else "Edm.Double")

        a, b = edm(left), edm(right)
        if a is None or b is None:
            return
        numeric = {"Edm.Int32", "Edm.Double", "Edm.Decimal"}
        if a == b or (a in numeric and b in numeric) or {a, b} == {"Edm.Date", "Edm.DateTimeOffset"}:
            return
        kind = {"eq": "Equal", "ne": "NotEqual", "gt": "GreaterThan", "ge": "GreaterThanOrEqual",
                "lt": "LessThan", "le": "LessThanOrEqual"}[op]
        raise ODataError(400, "0x80060888", f"A binary operator with incompatible types was detected. Found operand "
                         f"types '{a}' and '{b}' for operator kind '{kind}'.")


def _norm(value: Any, typ: str | None) -> Any:
    """Comparable form: strings case-insensitive (Dataverse collation), dates as date/datetime objects."""
    if value is None:
        return None
    if typ == "datetime" and isinstance(value, str):
        return _parse_datetime(value)
    if typ == "date" and isinstance(value, str):
        return date.fromisoformat(value[:10])
    if isinstance(value, str):
        return value.casefold()
    return value


def _evaluate(node: tuple[Any, ...], row: Mapping[str, Any] | _RowView, types: Mapping[str, str]) -> bool:
    kind = node[0]
    if kind == "or":
        return _evaluate(node[1], row, types) or _evaluate(node[2], row, types)
    if kind == "and":
        return _evaluate(node[1], row, types) and _evaluate(node[2], row, types)
    if kind == "not":
        return not _evaluate(node[1], row, types)
    if kind == "bool":
        inner = node[1]
        if inner[0] == "strfunc":
            value = row.get(inner[2])
            if not isinstance(value, str):
                return False
            v, needle = value.casefold(), str(inner[3]).casefold()
            return {"contains": needle in v, "startswith": v.startswith(needle),
                    "endswith": v.endswith(needle)}[inner[1]]
        _, prop, wanted, negate = inner
        current = _norm(row.get(prop), types.get(prop))
        hit = current is not None and current in wanted
        return bool(hit != negate)
    if kind == "cmp":
        _, op, left, right = node
        ltype = types.get(left[1]) if left[0] == "prop" else (right[0] == "prop" and types.get(right[1])) or None
        rtype = types.get(right[1]) if right[0] == "prop" else ltype

        def val(n: tuple[Any, ...], typ: str | None) -> Any:
            return _norm(row.get(n[1]) if n[0] == "prop" else n[1], typ or None)

        a, b = val(left, ltype), val(right, rtype)
        if op == "eq":
            return bool(a == b)
        if op == "ne":
            return bool(a != b)
        if a is None or b is None:
            return False
        try:
            return bool({"gt": a > b, "ge": a >= b, "lt": a < b, "le": a <= b}[op])
        except TypeError:
            return False
    raise ValueError(f"bad filter node {kind}")


def _sort_key(col: str, typ: str) -> Callable[[Row], tuple[bool, Any]]:
    def key(row: Row) -> tuple[bool, Any]:
        value = row.values.get(col)
        return (value is not None, _norm(value, typ) if value is not None else 0)

    return key


def parse_filter(text: str, prop_types: Mapping[str, str], type_name: str) -> tuple[Any, ...]:
    """Parse `$filter` text into an AST (raises ODataError 400 on anything unknown)."""
    return _FilterParser(text, prop_types, type_name).parse()


# ============================================================================================ runtime pieces


@dataclass
class Row:
    """A stored record: values keyed by logical column name (lookups hold the target GUID)."""

    values: dict[str, Any]
    version: int
    lookup_types: dict[str, str] = field(default_factory=dict)
    """lookup column -> target logical name (needed for polymorphic lookups and EntityReferences)."""


class _RowView:
    """Read a stored row by Web API property name (`_x_value` -> x) without rendering it."""

    __slots__ = ("names", "values")

    def __init__(self, values: Mapping[str, Any], names: Mapping[str, str]) -> None:
        self.values = values
        self.names = names

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(self.names.get(name, name), default)


class _ColumnIndex:
    """Equality index of one column of one table: normalised value (`_norm`, as `$filter` compares) -> primary
    keys. A null or missing value is bucketed under None; a row whose value cannot be normalised or hashed sits
    in `odd`, a candidate for every probe. The fast path only narrows the rows the filter is evaluated on."""

    __slots__ = ("buckets", "odd", "typ")

    def __init__(self, typ: str) -> None:
        self.typ = typ
        self.buckets: dict[Any, set[str]] = {}
        self.odd: set[str] = set()

    def _bucket_of(self, value: Any) -> tuple[bool, Any]:
        try:
            normed = _norm(value, self.typ)
            hash(normed)
        except (TypeError, ValueError, AttributeError):
            return False, None
        return True, normed

    def add(self, key: str, value: Any) -> None:
        ok, normed = self._bucket_of(value)
        if ok:
            self.buckets.setdefault(normed, set()).add(key)
        else:
            self.odd.add(key)

    def discard(self, key: str, value: Any) -> None:
        ok, normed = self._bucket_of(value)
        if not ok:
            self.odd.discard(key)
            return
        bucket = self.buckets.get(normed)
        if bucket is not None:
            bucket.discard(key)
            if not bucket:
                del self.buckets[normed]

    def probe(self, wanted: Iterable[Any]) -> set[str] | None:
        """Keys whose value may equal one of `wanted` (already normalised); None if a value cannot be looked up."""
        out = set(self.odd)
        for value in wanted:
            try:
                bucket = self.buckets.get(value)
            except TypeError:
                return None
            if bucket:
                out |= bucket
        return out


@dataclass
class WebhookRegistration:
    """A registered service endpoint (webhook)."""

    url: str
    headers: dict[str, str]
    tables: set[str] | None


@dataclass
class WebhookFailure:
    """A webhook that was not accepted (after the one retry the service makes on 502/503/504)."""

    url: str
    message_name: str
    entity: str
    key: str
    status: int | None
    error: str


@dataclass
class ServiceProtection:
    """Service protection limits (per user): request budget per sliding window and a concurrency budget."""

    max_requests: int | None = None
    window_seconds: float = 300.0
    max_concurrent: int | None = None
    concurrency_retry_after: float = 1.0


@dataclass
class _Fault:
    remaining: int
    status: int = 0
    path_contains: str | None = None
    retry_after: float | None = None
    seconds: float = 0.0


class Faults:
    """Fault knobs for tests: failures, slow responses, applied-then-504 writes, token expiry."""

    def __init__(self, sim: DataverseSimulator) -> None:
        self._sim = sim
        self._lock = threading.Lock()
        self._fail: list[_Fault] = []
        self._timeouts: list[_Fault] = []
        self._ambiguous: list[_Fault] = []

    def fail_next(self, n: int, status: int, path_contains: str | None = None,
                  retry_after: float | None = None) -> None:
        """Answer the next `n` API requests (whose path contains `path_contains`) with `status`."""
        with self._lock:
            self._fail.append(_Fault(n, status, path_contains, retry_after))

    def timeout_next(self, n: int, seconds: float, path_contains: str | None = None) -> None:
        """Delay the next `n` API requests by `seconds` before they are processed."""
        with self._lock:
            self._timeouts.append(_Fault(n, path_contains=path_contains, seconds=seconds))

    def apply_then_504(self, n: int, path_contains: str | None = None) -> None:
        """Apply the next `n` write requests (POST/PATCH/DELETE, $batch), then answer 504 Gateway Timeout."""
        with self._lock:
            self._ambiguous.append(_Fault(n, 504, path_contains))

    def expire_tokens(self) -> None:
        """Make every access token issued so far invalid (the next API call gets 401)."""
        self._sim._expire_tokens()

    def clear(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._fail.clear()
            self._timeouts.clear()
            self._ambiguous.clear()

    def _take(self, bucket: list[_Fault], path: str) -> _Fault | None:
        with self._lock:
            for fault in bucket:
                if fault.remaining > 0 and (fault.path_contains is None or fault.path_contains in path):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        bucket.remove(fault)
                    return fault
        return None

    def _take_part(self, bucket: list[_Fault], path: str) -> _Fault | None:
        # Inside a $batch only faults aimed at a path apply (unscoped ones hit the outer request).
        with self._lock:
            for fault in bucket:
                if fault.remaining > 0 and fault.path_contains is not None and fault.path_contains in path:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        bucket.remove(fault)
                    return fault
        return None


@dataclass
class _ApiRequest:
    method: str
    path: str
    """Decoded resource path after /api/data/v9.2/."""
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    base: str


@dataclass
class _ApiResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class _Event:
    message: str
    entity_set: str
    key: str
    target: dict[str, Any]
    post: dict[str, Any] | None
    pre: dict[str, Any] | None
    lookup_types: dict[str, str]
    user_id: str
    correlation_id: str
    at: datetime


@dataclass
class _Txn:
    undo: list[Callable[[], None]] = field(default_factory=list)
    events: list[_Event] = field(default_factory=list)

    def rollback(self) -> None:
        for action in reversed(self.undo):
            action()
        self.undo.clear()
        self.events.clear()


@dataclass
class _Caller:
    user_id: str
    correlation_id: str


def _prefer(headers: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in headers.get("prefer", "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, value = part.partition("=")
        out[name.strip().lower()] = value.strip().strip('"')
    return out


def _json_body(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error_response(err: ODataError) -> _ApiResponse:
    headers = {"Content-Type": "application/json; odata.metadata=minimal", "OData-Version": "4.0", **err.headers}
    return _ApiResponse(err.status, headers, _json_body({"error": {"code": err.code, "message": err.message}}))


_REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            412: "Precondition Failed", 413: "Payload Too Large", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


# ============================================================================================ simulator


class DataverseSimulator:
    """In-memory Dataverse environment with the Web API, Entra ID token endpoint, webhooks and fault knobs.

    Serve `.app` with `sandbox.server.RunningServer(sim.app, ca=TestCA...)` (TLS is needed for MSAL); the
    org URL and the token authority are then both `server.url`.

    Webhooks come from two places: the `register_webhook` helper (every message of the chosen tables, full
    row images), and registrations made through the Web API like in a real org: a `serviceendpoints` row
    (contract 8) plus enabled `sdkmessageprocessingsteps` bound to a message, a table's message filter and
    that endpoint. Those deliver to the endpoint's URL with its auth applied (HttpHeader settings as
    headers, WebhookKey as `?code=`, HttpQueryString settings as query parameters), honour the Update
    step's `filteringattributes`, and carry the step's images with only their `attributes`.
    """

    def __init__(
        self,
        schema: Mapping[str, TableSchema] | None = None,
        *,
        tenant_id: str = DEFAULT_TENANT_ID,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        app_user_id: str = APP_USER_ID,
        office_user_id: str = OFFICE_USER_ID,
        org_url: str | None = None,
        token_lifetime_seconds: int = 3599,
        latency_ms: float = 0.0,
        webhook_verify: Any = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.schema: dict[str, TableSchema] = dict(schema if schema is not None else default_schema())
        for entity_set, system_table in system_schema().items():
            self.schema.setdefault(entity_set, system_table)
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.app_user_id = app_user_id
        self.office_user_id = office_user_id
        self.org_url = org_url.rstrip("/") if org_url else None
        """Resource of the token scope (`{org_url}/.default`); None = the URL the simulator is served on."""
        self.token_lifetime_seconds = token_lifetime_seconds
        self.latency_ms = latency_ms
        self.clock = clock
        self.limits = ServiceProtection()
        self.faults = Faults(self)
        self.request_counts: Counter[str] = Counter()
        self.status_counts: Counter[int] = Counter()
        self.webhook_failures: list[WebhookFailure] = []
        self.webhooks_delivered = 0
        self._apps: dict[str, tuple[str, str]] = {client_id: (client_secret, app_user_id)}
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.RLock()
        self._tables: dict[str, dict[str, Row]] = {s: {} for s in self.schema}
        self._key_index: dict[str, dict[tuple[str, ...], dict[tuple[Any, ...], str]]] = self._empty_index()
        self._column_index: dict[str, dict[str, _ColumnIndex]] = self._empty_column_index()
        self._deleted: dict[str, list[tuple[int, str]]] = {s: [] for s in self.schema}
        self._child_links = self._collect_child_links()
        self._rollup_links: dict[str, list[tuple[TableSchema, str]]] = {}
        for table in self.schema.values():
            for rollup in table.rollups.values():
                self._rollup_links.setdefault(rollup.child_set, []).append((table, rollup.child_lookup))
        self._children = self._empty_children()
        self._autonumbers: dict[tuple[str, str], int] = {}
        self._autonumber_rng = random.Random(ORGANIZATION_ID)
        self._version = 1000
        self._window: deque[float] = deque()
        self._in_flight = 0
        self._webhooks: list[WebhookRegistration] = []
        self._webhook_verify = webhook_verify
        self._deliveries = Deliverer("dataverse-sim-webhooks", verify=webhook_verify, timeout=60.0)
        self._seed_platform()
        self.app = Starlette(routes=[
            Route("/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration, methods=["GET"]),
            Route("/{tenant}/oauth2/v2.0/token", self._token, methods=["POST"]),
            Route("/api/data/v9.2/{rest:path}", self._api,
                  methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
        ])

    # ------------------------------------------------------------------------------------ counters

    @property
    def request_count(self) -> int:
        """Web API requests received (a $batch counts once; token endpoint calls are not included)."""
        return self.request_counts["api"]

    @property
    def in_flight(self) -> int:
        """Web API requests being processed right now (counts against the concurrency limit)."""
        return self._in_flight

    def reset(self) -> None:
        """Forget records, registrations, faults, limits, webhooks and counters (issued tokens stay valid)."""
        with self._lock:
            self._tables = {s: {} for s in self.schema}
            self._key_index = self._empty_index()
            self._column_index = self._empty_column_index()
            self._deleted = {s: [] for s in self.schema}
            self._children = self._empty_children()
            self._autonumbers.clear()
            self._autonumber_rng = random.Random(ORGANIZATION_ID)
            self._window.clear()
            self._seed_platform()
        self.faults.clear()
        self.limits = ServiceProtection()
        self.latency_ms = 0.0
        self.request_counts.clear()
        self.status_counts.clear()
        self._webhooks.clear()
        self.webhook_failures.clear()
        self.webhooks_delivered = 0

    def _seed_platform(self) -> None:
        """Preload `sdkmessages` (Create/Update/Delete) and one `sdkmessagefilter` per message and data table."""
        for message in SDK_MESSAGES:
            message_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdkmessage:{message}"))
            self.insert("sdkmessages", {"sdkmessageid": message_id, "name": message, "categoryname": message})
            for table in self.schema.values():
                if table.system:
                    continue
                self.insert("sdkmessagefilters", {
                    "sdkmessagefilterid": str(uuid.uuid5(uuid.NAMESPACE_URL,
                                                         f"sdkmessagefilter:{table.logical_name}:{message}")),
                    "primaryobjecttypecode": table.logical_name, "secondaryobjecttypecode": "none",
                    "iscustomprocessingstepallowed": True, "sdkmessageid": message_id})

    def registrations(self) -> dict[str, list[dict[str, Any]]]:
        """Copies of the webhook registration rows: endpoints, steps and images (for before/after comparisons)."""
        with self._lock:
            return {s: sorted((dict(r.values) for r in self._tables[s].values()),
                              key=lambda v: str(v.get(self.schema[s].primary_id)))
                    for s in ("serviceendpoints", "sdkmessageprocessingsteps", "sdkmessageprocessingstepimages")}

    # ------------------------------------------------------------------------------------ direct helpers

    def add_application(self, client_id: str, client_secret: str, *, user_id: str | None = None) -> str:
        """Register another app registration + application user; returns its systemuserid."""
        uid = user_id or str(uuid.uuid4())
        self._apps[client_id] = (client_secret, uid)
        return uid

    def table(self, entity_set: str) -> TableSchema:
        """The schema of an entity set (KeyError if unknown)."""
        return self.schema[entity_set]

    def insert(self, entity_set: str, values: Mapping[str, Any]) -> str:
        """Store a record as-is (no business validation, no webhook): lookups as logical name -> GUID. Returns
        the id. Every column must be one the table declares (seeds cannot invent columns the org lacks).

        What the platform derives is filled in all the same (a contact's full name, an order's number and
        total, a line's number and amount), and a parent whose total changes gets a new version.
        """
        return self.insert_many(entity_set, [values])[0]

    def insert_many(self, entity_set: str, rows: Iterable[Mapping[str, Any]]) -> list[str]:
        """`insert` for many records of one table at once (bulk seeds): one lock, one timestamp, and each
        parent's rollup recomputed once at the end instead of once per child. Returns the ids in order."""
        schema = self.schema[entity_set]
        now = _now_text()
        derives = self._derives(schema)
        parents: dict[tuple[str, str], TableSchema] = {}
        keys: list[str] = []
        with self._lock:
            for values in rows:
                unknown = sorted(set(values) - set(schema.columns))
                if unknown:
                    raise ValueError(f"{entity_set}: {', '.join(unknown)} not declared by the table schema")
                vals = dict(values)
                key = str(vals.get(schema.primary_id) or uuid.uuid4()).lower()
                vals[schema.primary_id] = key
                vals.setdefault("createdon", now)
                vals.setdefault("modifiedon", vals["createdon"])
                vals.setdefault("createdby", self.office_user_id)
                vals.setdefault("modifiedby", vals["createdby"])
                vals.setdefault("ownerid", vals["createdby"])
                lookup_types = {c: self._target_logical(schema, c, vals) for c in schema.lookups if vals.get(c)}
                if derives:
                    self._platform_fixups(schema, vals, lookup_types, creating=True)
                version = self._next_version()
                vals["versionnumber"] = version
                self._put_row(schema, key, Row(vals, version, lookup_types))
                for parent, parent_key in self._rollup_parents(schema, vals):
                    parents[(parent.entity_set, parent_key)] = parent
                keys.append(key)
            for (_, parent_key), parent in parents.items():
                self._refresh_rollup_directly(parent, parent_key, now)
        return keys

    def get(self, entity_set: str, key: str) -> dict[str, Any] | None:
        """A copy of a record's stored values (logical names), or None."""
        with self._lock:
            row = self._tables[entity_set].get(key.lower())
            return dict(row.values) if row else None

    def all(self, entity_set: str) -> list[dict[str, Any]]:
        """Copies of every record of an entity set."""
        with self._lock:
            return [dict(r.values) for r in self._tables[entity_set].values()]

    def apply_change(
        self,
        entity_set: str,
        values: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        delete: bool = False,
        user_id: str | None = None,
    ) -> str:
        """Emulate a user editing in the D365 UI: create / update / delete one record and fire webhooks.

        `values` use logical names (lookups as logical name -> GUID) and are validated like API writes.
        """
        schema = self.schema[entity_set]
        caller = _Caller(user_id or self.office_user_id, str(uuid.uuid4()))
        txn = _Txn()
        with self._lock:
            if delete:
                if key is None or key.lower() not in self._tables[entity_set]:
                    raise _not_found(schema.logical_name, str(key))
                self._delete(schema, key.lower(), caller, txn)
                result = key.lower()
            else:
                vals: dict[str, Any] = {}
                lookup_types: dict[str, str] = {}
                for col, v in (values or {}).items():
                    if col not in schema.columns:
                        raise _bad_property(schema.logical_name, col)
                    if schema.columns[col] == "lookup":
                        vals[col] = None if v is None else str(v).lower()
                        if v is not None:
                            lookup_types[col] = self._target_logical(schema, col, {col: v})
                    elif col not in SYSTEM_READONLY and col not in schema.computed:
                        vals[col] = _coerce(schema, col, v)
                existing = self._tables[entity_set].get(key.lower()) if key else None
                if existing is None:
                    result = self._create(schema, vals, lookup_types, key, caller, txn)
                else:
                    self._update(schema, existing, vals, lookup_types, caller, txn)
                    result = existing.values[schema.primary_id]
        self._emit(txn.events)
        return result

    # ------------------------------------------------------------------------------------ webhooks

    def register_webhook(self, url: str, *, headers: Mapping[str, str] | None = None,
                         tables: set[str] | None = None) -> None:
        """Register a service endpoint for Create/Update/Delete of `tables` (entity sets or logical names)."""
        self._webhooks.append(WebhookRegistration(url, dict(headers or {}), set(tables) if tables else None))

    async def flush_webhooks(self, timeout: float = 10.0) -> None:
        """Wait until every queued webhook delivery has finished (delivered or failed)."""
        await self._deliveries.flush(timeout)

    def close(self) -> None:
        """Stop the webhook delivery thread."""
        self._deliveries.close()

    def _emit(self, events: Iterable[_Event]) -> None:
        for event in events:
            schema = self.schema[event.entity_set]
            if schema.system:
                continue  # registering a webhook is not itself an event anybody can subscribe to
            targets = [(reg, self._remote_execution_context(event)) for reg in self._webhooks
                       if reg.tables is None or {event.entity_set, schema.logical_name} & reg.tables]
            targets += self._registered_targets(event)
            for reg, body in targets:
                self._deliveries.submit(functools.partial(self._deliver, reg=reg, event=event, body=body))

    def _registered_targets(self, event: _Event) -> list[tuple[WebhookRegistration, bytes]]:
        """Deliveries of the enabled steps registered (through the Web API) for this message and table."""
        schema = self.schema[event.entity_set]
        out: list[tuple[WebhookRegistration, bytes]] = []
        with self._lock:
            message = next((r for r in self._tables["sdkmessages"].values()
                            if r.values.get("name") == event.message), None)
            if message is None:
                return out
            message_id = message.values["sdkmessageid"]
            steps = sorted((r.values for r in self._tables["sdkmessageprocessingsteps"].values()
                            if r.values.get("sdkmessageid") == message_id and r.values.get("statecode") == 0),
                           key=lambda v: (v.get("rank") or 0, str(v.get("name"))))
            for step in steps:
                filter_row = self._tables["sdkmessagefilters"].get(str(step.get("sdkmessagefilterid") or ""))
                if filter_row is None or filter_row.values.get("primaryobjecttypecode") != schema.logical_name:
                    continue
                endpoint = self._tables["serviceendpoints"].get(str(step.get("eventhandler") or ""))
                if endpoint is None or endpoint.values.get("contract") != CONTRACT_WEBHOOK:
                    continue
                filtering = set(_csv(step.get("filteringattributes")))
                if event.message == "Update" and filtering and not filtering & set(event.target):
                    continue  # none of the step's filtering attributes is in the update
                pre: list[tuple[str, dict[str, Any]]] = []
                post: list[tuple[str, dict[str, Any]]] = []
                for image in self._tables["sdkmessageprocessingstepimages"].values():
                    img = image.values
                    if img.get("sdkmessageprocessingstepid") != step["sdkmessageprocessingstepid"]:
                        continue
                    wanted = set(_csv(img.get("attributes")))

                    def pick(values: Mapping[str, Any], wanted: set[str] = wanted) -> dict[str, Any]:
                        # No attribute list means every attribute, as in the Plug-in Registration tool.
                        return {k: v for k, v in values.items() if not wanted or k in wanted}

                    alias = str(img.get("entityalias") or "Image")
                    if img.get("imagetype") in (IMAGE_PRE, IMAGE_BOTH) and event.pre is not None:
                        pre.append((alias, pick(event.pre)))
                    if img.get("imagetype") in (IMAGE_POST, IMAGE_BOTH) and event.post is not None:
                        post.append((alias, pick(event.post)))
                body = self._remote_execution_context(event, step_id=step["sdkmessageprocessingstepid"],
                                                      mode=int(step.get("mode") or 0), pre_images=pre,
                                                      post_images=post)
                out.append((self._endpoint_target(endpoint.values), body))
        return out

    @staticmethod
    def _endpoint_target(endpoint: Mapping[str, Any]) -> WebhookRegistration:
        """Where and how a webhook service endpoint is called: its URL with the auth applied."""
        url, auth, value = str(endpoint["url"]), endpoint.get("authtype"), str(endpoint.get("authvalue") or "")
        if auth == AUTH_HTTP_HEADER:
            return WebhookRegistration(url, dict(parse_settings(value)), None)
        if auth == AUTH_WEBHOOK_KEY:
            return WebhookRegistration(_with_query(url, [("code", value)]), {}, None)
        if auth == AUTH_HTTP_QUERY_STRING:
            return WebhookRegistration(_with_query(url, parse_settings(value)), {}, None)
        return WebhookRegistration(url, {}, None)

    async def _deliver(self, client: httpx.AsyncClient, reg: WebhookRegistration, event: _Event,
                       body: bytes) -> None:
        headers = {
            "Content-Type": "application/json",
            "x-ms-dynamics-organization": self._org_host(),
            "x-ms-dynamics-entity-name": self.schema[event.entity_set].logical_name,
            "x-ms-dynamics-request-name": event.message,
            "x-ms-correlation-request-id": event.correlation_id,
            **reg.headers,
        }
        status: int | None = None
        error = ""
        for attempt in (1, 2):
            try:
                resp = await client.post(reg.url, content=body, headers=headers)
                status = resp.status_code
                error = "" if resp.is_success else resp.text[:500]
            except httpx.HTTPError as exc:
                status, error = None, f"{type(exc).__name__}: {exc}"
                break
            # The real service retries once, and only on 502/503/504.
            if status in (502, 503, 504) and attempt == 1:
                continue
            break
        if status is not None and 200 <= status < 300:
            self.webhooks_delivered += 1
        else:
            self.webhook_failures.append(WebhookFailure(
                reg.url, event.message, self.schema[event.entity_set].logical_name, event.key, status, error))

    def _org_host(self) -> str:
        return urlsplit(self.org_url).netloc if self.org_url else "syncline-sim.crm.dynamics.com"

    def _remote_execution_context(self, event: _Event, *, step_id: str | None = None, mode: int = 1,
                                  pre_images: list[tuple[str, dict[str, Any]]] | None = None,
                                  post_images: list[tuple[str, dict[str, Any]]] | None = None) -> bytes:
        """Serialise an event as Microsoft.Xrm.Sdk.RemoteExecutionContext JSON (DataContract style, `\\/`).

        Without `step_id` (the `register_webhook` helper) the images are the full row before/after under
        PreImage/PostImage; a registered step passes its own images (alias, filtered attributes).
        """
        schema = self.schema[event.entity_set]
        target: dict[str, Any]
        if event.message == "Delete":
            target = {"__type": f"EntityReference:{XRM_CONTRACTS}", "Id": event.key, "KeyAttributes": [],
                      "LogicalName": schema.logical_name, "Name": None, "RowVersion": None}
        else:
            target = {"__type": f"Entity:{XRM_CONTRACTS}",
                      **self._entity_contract(schema, event.key, event.target, event.lookup_types)}

        def image(name: str, values: dict[str, Any] | None) -> list[dict[str, Any]]:
            if values is None:
                return []
            return [{"key": name, "value": self._entity_contract(schema, event.key, values, event.lookup_types)}]

        def images(given: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
            return [{"key": alias, "value": self._entity_contract(schema, event.key, values, event.lookup_types)}
                    for alias, values in given]

        ms = int(event.at.timestamp() * 1000)
        context = {
            "BusinessUnitId": BUSINESS_UNIT_ID,
            "CorrelationId": event.correlation_id,
            "Depth": 1,
            "InitiatingUserId": event.user_id,
            "InputParameters": [{"key": "Target", "value": target}],
            "IsExecutingOffline": False,
            "IsInTransaction": False,
            "IsOfflinePlayback": False,
            "IsolationMode": 1,
            "MessageName": event.message,
            "Mode": mode,
            "OperationCreatedOn": f"/Date({ms})/",
            "OperationId": str(uuid.uuid4()),
            "OrganizationId": ORGANIZATION_ID,
            "OrganizationName": self._org_host().split(".")[0],
            "OutputParameters": ([{"key": "id", "value": event.key}] if event.message == "Create" else []),
            "OwningExtension": {"Id": step_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"step:{schema.logical_name}")),
                                "KeyAttributes": [], "LogicalName": "sdkmessageprocessingstep", "Name": None,
                                "RowVersion": None},
            "ParentContext": None,
            "PostEntityImages": images(post_images) if post_images is not None else image("PostImage", event.post),
            "PreEntityImages": images(pre_images) if pre_images is not None else image("PreImage", event.pre),
            "PrimaryEntityId": event.key,
            "PrimaryEntityName": schema.logical_name,
            "RequestId": None,
            "SecondaryEntityName": "none",
            "SharedVariables": [],
            "Stage": 40,
            "UserId": event.user_id,
        }
        # DataContractJsonSerializer escapes every '/' as '\/' ("\/Date(...)\/", "http:\/\/...").
        return json.dumps(context).replace("/", "\\/").encode()

    def _entity_contract(self, schema: TableSchema, key: str, values: Mapping[str, Any],
                         lookup_types: Mapping[str, str]) -> dict[str, Any]:
        attrs: list[dict[str, Any]] = []
        formatted: list[dict[str, Any]] = []
        version = values.get("versionnumber")
        for col, v in values.items():
            typ = schema.columns.get(col)
            if typ is None or col == "versionnumber":
                continue
            out: Any = v
            if v is not None:
                if typ == "lookup":
                    target = lookup_types.get(col) or self._target_logical(schema, col, values)
                    out = {"__type": f"EntityReference:{XRM_CONTRACTS}", "Id": v, "KeyAttributes": [],
                           "LogicalName": target, "Name": None, "RowVersion": None}
                elif typ == "choice":
                    out = {"__type": f"OptionSetValue:{XRM_CONTRACTS}", "Value": v}
                    formatted.append({"key": col, "value": schema.choices[col].options.get(v, str(v))})
                elif typ == "money":
                    out = {"__type": f"Money:{XRM_CONTRACTS}", "Value": v}
                elif typ == "datetime":
                    out = f"/Date({int(_parse_datetime(v).timestamp() * 1000)})/"
                elif typ == "date":
                    midnight = datetime.fromisoformat(v).replace(tzinfo=UTC)
                    out = f"/Date({int(midnight.timestamp() * 1000)})/"
            attrs.append({"key": col, "value": out})
        return {"Attributes": attrs, "EntityState": None, "FormattedValues": formatted, "Id": key,
                "KeyAttributes": [], "LogicalName": schema.logical_name, "RelatedEntities": [],
                "RowVersion": str(version) if version is not None else None}

    # ------------------------------------------------------------------------------------ Entra ID

    def _expire_tokens(self) -> None:
        with self._lock:
            for token, (client, _exp) in list(self._tokens.items()):
                self._tokens[token] = (client, 0.0)

    async def _openid_configuration(self, request: Request) -> Response:
        self.request_counts["openid"] += 1
        tenant = request.path_params["tenant"]
        if tenant not in (self.tenant_id, "organizations", "common"):
            return JSONResponse(self._aad_error("invalid_tenant", 90002, f"Tenant '{tenant}' not found. Check to "
                                "make sure you have the correct tenant ID and are signing into the correct cloud."),
                                status_code=400)
        base = str(request.base_url).rstrip("/")
        root = f"{base}/{self.tenant_id}"
        return JSONResponse({
            "token_endpoint": f"{root}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{base}/{self.tenant_id}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{root}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "nonce", "tid", "ver"],
            "kerberos_endpoint": f"{root}/kerberos",
            "tenant_region_scope": "NA",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        })

    def _aad_error(self, error: str, code: int, description: str) -> dict[str, Any]:
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return {"error": error,
                "error_description": f"AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {corr} "
                                     f"Timestamp: {stamp}",
                "error_codes": [code], "timestamp": stamp, "trace_id": trace, "correlation_id": corr}

    async def _token(self, request: Request) -> Response:
        self.request_counts["token"] += 1
        tenant = request.path_params["tenant"]
        form = dict(parse_qsl((await request.body()).decode()))
        if tenant != self.tenant_id:
            return JSONResponse(self._aad_error("invalid_request", 90002, f"Tenant '{tenant}' not found."),
                                status_code=400)
        if form.get("grant_type") != "client_credentials":
            return JSONResponse(self._aad_error("unsupported_grant_type", 70003,
                                "The app requested an unsupported grant type ."), status_code=400)
        client_id = form.get("client_id", "")
        app = self._apps.get(client_id)
        if app is None:
            return JSONResponse(self._aad_error(
                "unauthorized_client", 700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can "
                "happen if the application has not been installed by the administrator of the tenant."),
                status_code=400)
        if not secrets.compare_digest(form.get("client_secret", ""), app[0]):
            return JSONResponse(self._aad_error(
                "invalid_client", 7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret "
                f"value, not the client secret ID, for a secret added to app '{client_id}'."), status_code=401)
        resource = (self.org_url or str(request.base_url)).rstrip("/").lower()
        scope = form.get("scope", "").strip()
        if not scope.endswith("/.default"):
            return JSONResponse(self._aad_error(
                "invalid_scope", 1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows must have a scope value "
                "with /.default suffixed to the resource identifier (application ID URI)."), status_code=400)
        if scope[: -len("/.default")].rstrip("/").lower() != resource:
            return JSONResponse(self._aad_error(
                "invalid_scope", 70011,
                f"The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."),
                status_code=400)
        now = int(time.time())
        claims = {"aud": resource, "iss": f"https://sts.windows.net/{self.tenant_id}/", "iat": now, "nbf": now,
                  "exp": now + self.token_lifetime_seconds, "appid": client_id, "oid": app[1],
                  "tid": self.tenant_id, "idtyp": "app", "jti": secrets.token_hex(8)}

        def b64(obj: Any) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

        token = ".".join([b64({"typ": "JWT", "alg": "RS256", "kid": "sim"}), b64(claims),
                          base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()])
        with self._lock:
            self._tokens[token] = (client_id, time.time() + self.token_lifetime_seconds)
        return JSONResponse({"token_type": "Bearer", "expires_in": self.token_lifetime_seconds,
                             "ext_expires_in": self.token_lifetime_seconds, "access_token": token})

    def _authenticate(self, headers: Mapping[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return None
        with self._lock:
            entry = self._tokens.get(auth[7:])
        if entry is None or entry[1] <= time.time():
            return None
        return self._apps[entry[0]][1]

    # ------------------------------------------------------------------------------------ HTTP entry

    async def _api(self, request: Request) -> Response:
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        full = unquote(raw_path.decode("latin-1"))
        path = full[len(API_PREFIX):] if full.startswith(API_PREFIX) else full.lstrip("/")
        headers = {k.lower(): v for k, v in request.headers.items()}
        query = dict(parse_qsl(request.url.query, keep_blank_values=True))
        req = _ApiRequest(request.method, path, query, headers, await request.body(),
                          str(request.base_url).rstrip("/"))
        resp = await self._handle(req)
        return Response(resp.body, status_code=resp.status, headers=resp.headers)

    async def _handle(self, req: _ApiRequest) -> _ApiResponse:
        """Everything an outer Web API request goes through: auth, limits, faults, latency, dispatch."""
        self.request_counts["api"] += 1
        resp = await self._handle_outer(req)
        self.status_counts[resp.status] += 1
        return resp

    async def _handle_outer(self, req: _ApiRequest) -> _ApiResponse:
        user_id = self._authenticate(req.headers)
        if user_id is None:
            self.request_counts["401"] += 1
            resource = self.org_url or req.base
            return _ApiResponse(401, {
                "WWW-Authenticate": f'Bearer error=invalid_token, error_description="Error during token '
                                    f'validation!", authorization_uri=https://login.microsoftonline.com/'
                                    f'{self.tenant_id}/oauth2/authorize, resource_id={resource}'})
        throttled = self._check_limits()
        if throttled is not None:
            self.request_counts["429"] += 1
            return _error_response(throttled)
        self._in_flight += 1
        try:
            path_for_faults = API_PREFIX + req.path
            slow = self.faults._take(self.faults._timeouts, path_for_faults)
            if slow is not None:
                await asyncio.sleep(slow.seconds)
            fault = self.faults._take(self.faults._fail, path_for_faults)
            if fault is not None:
                return self._fault_response(fault)
            if self.latency_ms:
                await asyncio.sleep(self.latency_ms / 1000)
            caller = _Caller(user_id, req.headers.get("x-ms-correlation-request-id") or str(uuid.uuid4()))
            events: list[_Event] = []
            if req.path == "$batch" and req.method == "POST":
                self.request_counts["batch"] += 1
                resp = self._batch(req, caller, events)
            else:
                txn = _Txn()
                resp = self._dispatch_safely(req, caller, txn)
                events.extend(txn.events)
            self._emit(events)
            if req.method in ("POST", "PATCH", "PUT", "DELETE"):
                ambiguous = self.faults._take(self.faults._ambiguous, path_for_faults)
                if ambiguous is not None:
                    return _error_response(ODataError(504, "0x80040216", "The request timed out at the gateway "
                                                      "(the operation may have completed)."))
            return resp
        finally:
            self._in_flight -= 1

    def _check_limits(self) -> ODataError | None:
        limits = self.limits
        if limits.max_concurrent is not None and self._in_flight >= limits.max_concurrent:
            return ODataError(429, "0x80072326",
                              f"Number of concurrent requests exceeded the limit of {limits.max_concurrent}.",
                              {"Retry-After": str(math.ceil(limits.concurrency_retry_after))})
        if limits.max_requests is not None:
            now = self.clock()
            with self._lock:
                while self._window and self._window[0] <= now - limits.window_seconds:
                    self._window.popleft()
                if len(self._window) >= limits.max_requests:
                    wait = max(1, math.ceil(self._window[0] + limits.window_seconds - now))
                    return ODataError(
                        429, "0x80072322",
                        f"Number of requests exceeded the limit of {limits.max_requests} over time window of "
                        f"{int(limits.window_seconds)} seconds.", {"Retry-After": str(wait)})
                self._window.append(now)
        return None

    def _fault_response(self, fault: _Fault) -> _ApiResponse:
        status = fault.status
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        if status == 429:
            err = ODataError(429, "0x80072322", "Number of requests exceeded the limit of 6000 over time window of "
                             "300 seconds.", headers)
        elif status == 401:
            return _ApiResponse(401, {"WWW-Authenticate": "Bearer error=invalid_token", **headers})
        elif status >= 500:
            message = {503: "Service Unavailable", 504: "The request timed out at the gateway.",
                       502: "Bad Gateway"}.get(status, "An unexpected error occurred.")
            err = ODataError(status, "0x80040216", message, headers)
        else:
            err = ODataError(status, "0x80040265", f"Simulated failure (HTTP {status}).", headers)
        return _error_response(err)

    def _dispatch_safely(self, req: _ApiRequest, caller: _Caller, txn: _Txn) -> _ApiResponse:
        try:
            with self._lock:
                return self._dispatch(req, caller, txn)
        except ODataError as err:
            txn.rollback()
            return _error_response(err)

    # ------------------------------------------------------------------------------------ routing

    def _dispatch(self, req: _ApiRequest, caller: _Caller, txn: _Txn) -> _ApiResponse:
        segments = _split_segments(req.path)
        if not segments:
            raise ODataError(404, "0x8006088a", "Resource not found for the segment ''.")
        head = _SEGMENT_RE.match(segments[0])
        if head is None:
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{segments[0]}'.")
        name, key_text = head.group("name"), head.group("key")
        if name == "$metadata" and key_text is None and len(segments) == 1:
            if req.method != "GET":
                raise ODataError(405, "0x80060888", f"The HTTP method '{req.method}' is not allowed on $metadata.")
            self.request_counts["metadata"] += 1
            return _ApiResponse(200, {"Content-Type": "application/xml", "OData-Version": "4.0"},
                                csdl(self.schema).encode())
        if name == "WhoAmI":
            self.request_counts["whoami"] += 1
            return self._json(200, {"@odata.context": f"{req.base}{API_PREFIX}$metadata#Microsoft.Dynamics.CRM."
                                    "WhoAmIResponse", "BusinessUnitId": BUSINESS_UNIT_ID,
                                    "UserId": caller.user_id, "OrganizationId": ORGANIZATION_ID})
        if name == "EntityDefinitions":
            self.request_counts["metadata"] += 1
            return self._metadata(req, key_text, segments[1:])
        schema = self.schema.get(name)
        if schema is None:
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{name}'.")
        if len(segments) == 2 and key_text is None and segments[1] == "$count" and req.method == "GET":
            self.request_counts["collection"] += 1
            return self._count_only(req, schema)
        if len(segments) == 2 and key_text is None and segments[1].startswith(f"{NAMESPACE}."):
            self.request_counts["write"] += 1
            return self._bound_action(req, schema, segments[1][len(NAMESPACE) + 1:], caller, txn)
        if len(segments) > 1:
            raise ODataError(400, "0x80060888", "The simulator supports only entity set and single record URLs.")
        if key_text is None:
            if req.method == "GET":
                self.request_counts["collection"] += 1
                return self._query(req, schema)
            if req.method == "POST":
                self.request_counts["write"] += 1
                return self._post(req, schema, caller, txn)
            raise ODataError(405, "0x80060888", f"The HTTP method '{req.method}' is not allowed on a collection.")
        key = _parse_key_predicate(key_text)
        if isinstance(key, dict) and any(isinstance(v, str) and set(v) & URL_UNSAFE_KEY_CHARS for v in key.values()):
            # IIS/ASP.NET refuse these characters in a path even percent-encoded (documented for alternate keys).
            raise ODataError(400, "0x80060888", "A potentially dangerous Request.Path value was detected from the "
                             "client. Alternate key values used in a URL cannot contain / < > * % & : \\ ? +")
        if req.method == "GET":
            self.request_counts["record"] += 1
            return self._get_one(req, schema, key)
        if req.method == "PATCH":
            self.request_counts["write"] += 1
            return self._patch(req, schema, key, caller, txn)
        if req.method == "DELETE":
            self.request_counts["write"] += 1
            return self._delete_request(req, schema, key, caller, txn)
        raise ODataError(405, "0x80060888", f"The HTTP method '{req.method}' is not supported by the simulator.")

    def _json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> _ApiResponse:
        return _ApiResponse(status, {"Content-Type": "application/json; odata.metadata=minimal",
                                     "OData-Version": "4.0", **(headers or {})}, _json_body(obj))

    # ------------------------------------------------------------------------------------ reads

    def _render(self, schema: TableSchema, row: Row, select: list[str] | None, annotate: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"@odata.etag": f'W/"{row.version}"'}
        for col, typ in schema.columns.items():
            name = schema.read_name(col)
            if select is not None and name not in select and col != schema.primary_id:
                continue
            if col in schema.unreadable:
                continue
            value = row.values.get(col)
            out[name] = value
            if annotate and value is not None:
                if typ == "choice":
                    label = schema.choices[col].options.get(value, str(value))
                    out[f"{name}@OData.Community.Display.V1.FormattedValue"] = label
                elif typ == "lookup":
                    target = row.lookup_types.get(col) or self._target_logical(schema, col, row.values)
                    out[f"{name}@Microsoft.Dynamics.CRM.lookuplogicalname"] = target
                    nav = next((n for n, t in schema.lookups[col].navs.items()
                                if t in self.schema and self.schema[t].logical_name == target), None)
                    if nav is not None:
                        out[f"{name}@Microsoft.Dynamics.CRM.associatednavigationproperty"] = nav
        return out

    def _select(self, schema: TableSchema, req: _ApiRequest) -> list[str] | None:
        raw = req.query.get("$select")
        if not raw:
            return None
        names = [n.strip() for n in raw.split(",") if n.strip()]
        valid = schema.read_types()
        for n in names:
            if n not in valid:
                raise ODataError(400, "0x80060888", f"Could not find a property named '{n}' on type "
                                 f"'Microsoft.Dynamics.CRM.{schema.logical_name}'.")
        return names

    def _find(self, schema: TableSchema, key: str | dict[str, Any]) -> Row | None:
        rows = self._tables[schema.entity_set]
        if isinstance(key, str):
            return rows.get(key)
        if set(key) == {schema.primary_id} and isinstance(key[schema.primary_id], str):
            return rows.get(key[schema.primary_id].lower())
        cols = tuple(sorted(key))
        if cols not in [tuple(sorted(k)) for k in schema.alternate_keys]:
            raise ODataError(
                400, "0x80060888",
                f"The key in the request URI is not valid for resource 'Microsoft.Dynamics.CRM.{schema.logical_name}'. "
                "Ensure that the names and number of key properties match the declared or alternate key properties "
                f"for the resource 'Microsoft.Dynamics.CRM.{schema.logical_name}'.")
        declared = next(k for k in schema.alternate_keys if tuple(sorted(k)) == cols)
        wanted = tuple(_norm(_coerce(schema, c, key[c]), schema.columns[c]) for c in declared)
        pk = self._key_index[schema.entity_set][declared].get(wanted)
        return rows.get(pk) if pk is not None else None

    @staticmethod
    def _key_text(key: str | dict[str, Any]) -> str:
        if isinstance(key, str):
            return key
        return ",".join(f"{k}:{v}" for k, v in key.items())

    def _get_one(self, req: _ApiRequest, schema: TableSchema, key: str | dict[str, Any]) -> _ApiResponse:
        row = self._find(schema, key)
        if row is None:
            raise _not_found(schema.logical_name, self._key_text(key))
        etag = f'W/"{row.version}"'
        if req.headers.get("if-none-match") == etag:
            return _ApiResponse(304, {"ETag": etag})
        select = self._select(schema, req)
        annotate = "odata.include-annotations" in _prefer(req.headers)
        body = {"@odata.context": f"{req.base}{API_PREFIX}$metadata#{schema.entity_set}/$entity",
                **self._render(schema, row, select, annotate)}
        return self._json(200, body, {"ETag": etag})

    def _query(self, req: _ApiRequest, schema: TableSchema) -> _ApiResponse:
        prefer = _prefer(req.headers)
        select = self._select(schema, req)
        annotate = "odata.include-annotations" in prefer
        tracking = "odata.track-changes" in prefer
        if "$expand" in req.query or "$apply" in req.query:
            raise ODataError(400, "0x80060888", "The simulator does not implement $expand / $apply.")
        page_size = MAX_PAGE_SIZE
        if "odata.maxpagesize" in prefer:
            try:
                page_size = max(1, min(MAX_PAGE_SIZE, int(prefer["odata.maxpagesize"])))
            except ValueError as exc:
                raise ODataError(400, "0x80060888", "Invalid value for odata.maxpagesize.") from exc
        cookie = self._parse_skiptoken(req.query.get("$skiptoken"))
        delta_token = req.query.get("$deltatoken")
        types = schema.read_types()
        ctx_select = f"({','.join(select)})" if select else ""
        context = f"{req.base}{API_PREFIX}$metadata#{schema.entity_set}{ctx_select}"
        headers: dict[str, str] = {}
        applied = []
        if "odata.maxpagesize" in prefer:
            applied.append(f"odata.maxpagesize={page_size}")

        if tracking or delta_token is not None:
            if any(k in req.query for k in ("$filter", "$orderby", "$top")):
                raise ODataError(400, "0x80060888", "$filter, $orderby, $top and $expand are not supported with "
                                 "change tracking (Prefer: odata.track-changes).")
            if not schema.change_tracking:
                raise ODataError(400, "0x80060888", f"Entity '{schema.logical_name}' is not enabled for change "
                                 "tracking.")
            applied.append("odata.track-changes")
            headers["Preference-Applied"] = ",".join(applied)
            return self._delta(req, schema, select, annotate, page_size, cookie, delta_token, context, headers)

        count = self._count_option(req)
        rows = self._filtered(req, schema, types)
        orderby = req.query.get("$orderby")
        if orderby:
            keys: list[tuple[str, bool]] = []
            for part in orderby.split(","):
                bits = part.split()
                if not bits or bits[0] not in types or len(bits) > 2 or (
                        len(bits) == 2 and bits[1] not in ("asc", "desc")):
                    raise ODataError(400, "0x80060888", f"Syntax error in $orderby '{orderby}'.")
                keys.append((bits[0], len(bits) == 2 and bits[1] == "desc"))
            rows.sort(key=lambda r: r.values[schema.primary_id])
            for name, desc in reversed(keys):
                col = name[1:-6] if name.startswith("_") and name.endswith("_value") else name
                typ = types[name]
                rows.sort(key=_sort_key(col, typ), reverse=desc)
        else:
            rows.sort(key=lambda r: r.values[schema.primary_id])
        total = len(rows)  # $count counts every matching row, whatever $top and paging return
        if "$top" in req.query and "odata.maxpagesize" not in prefer:
            try:
                rows = rows[: int(req.query["$top"])]
            except ValueError as exc:
                raise ODataError(400, "0x80060888", "Invalid $top.") from exc
        page_no = cookie["pagenumber"] if cookie else 1
        if cookie and cookie.get("last") and not orderby:
            start = next((i for i, r in enumerate(rows) if r.values[schema.primary_id] > cookie["last"]), len(rows))
        else:
            start = (page_no - 1) * page_size
        page = rows[start:start + page_size]
        body: dict[str, Any] = {"@odata.context": context}
        if count:
            body.update(self._count_annotations(total, req.headers))
        body["value"] = [self._render(schema, r, select, annotate) for r in page]
        if start + page_size < len(rows) and page:
            token = self._skiptoken(schema, page_no + 1, page, tracking=False, version=None)
            body["@odata.nextLink"] = self._link(req, schema, {"$skiptoken": token})
        if applied:
            headers["Preference-Applied"] = ",".join(applied)
        return self._json(200, body, headers)

    def _filtered(self, req: _ApiRequest, schema: TableSchema, types: Mapping[str, str]) -> list[Row]:
        rows = list(self._tables[schema.entity_set].values())
        if "$filter" in req.query:
            ast = parse_filter(req.query["$filter"], types, f"Microsoft.Dynamics.CRM.{schema.logical_name}")
            names = {schema.read_name(c): c for c in schema.columns}
            table = self._tables[schema.entity_set]
            # Equality, In and or-chains of them on the primary key, a lookup or an alternate-key column seek
            # the table's dict / column index for candidates (like an index seek); the filter is still evaluated
            # on each candidate, and the sort fixes the order, so the answer is exactly the scan's.
            candidates = self._filter_candidates(schema, ast, names, types)
            if candidates is not None:
                rows = [table[k] for k in candidates if k in table]
            rows = [r for r in rows if _evaluate(ast, _RowView(r.values, names), types)]
        return rows

    @staticmethod
    def _count_option(req: _ApiRequest) -> bool:
        raw = req.query.get("$count")
        if raw is None:
            return False
        if raw.lower() not in ("true", "false"):
            raise ODataError(400, "0x80060888", f"'{raw}' is not a valid count option.")
        return raw.lower() == "true"

    @staticmethod
    def _count_annotations(total: int, headers: Mapping[str, str]) -> dict[str, Any]:
        """`@odata.count`, at most 5000 whatever the page size (webapi/query/count-rows); the exact-or-more
        annotations only when `Prefer: odata.include-annotations` asks for them."""
        out: dict[str, Any] = {"@odata.count": min(total, MAX_COUNT)}
        m = re.search(r'odata\.include-annotations\s*=\s*(?:"([^"]*)"|([^,;\s]+))', headers.get("prefer", ""))
        patterns = [p.strip() for p in (m.group(1) or m.group(2)).split(",")] if m else []
        for name, value in (("totalrecordcount", min(total, MAX_COUNT)),
                            ("totalrecordcountlimitexceeded", total > MAX_COUNT)):
            if any(fnmatch.fnmatchcase(f"{NAMESPACE}.{name}", p) for p in patterns if p):
                out[f"@{NAMESPACE}.{name}"] = value
        return out

    def _count_only(self, req: _ApiRequest, schema: TableSchema) -> _ApiResponse:
        """`GET /{set}/$count`: the number of matching rows as plain text (at most 5000)."""
        total = min(len(self._filtered(req, schema, schema.read_types())), MAX_COUNT)
        return _ApiResponse(200, {"Content-Type": "text/plain", "OData-Version": "4.0"}, str(total).encode())

    def _filter_candidates(self, schema: TableSchema, ast: tuple[Any, ...], names: Mapping[str, str],
                           types: Mapping[str, str]) -> set[str] | None:
        """Primary keys of a superset of the rows `ast` matches, from the indexes; None = every row (a scan)."""
        kind = ast[0]
        if kind == "and":
            left = self._filter_candidates(schema, ast[1], names, types)
            right = self._filter_candidates(schema, ast[2], names, types)
            if left is None or right is None:
                return left if right is None else right
            return left & right
        if kind == "or":
            left = self._filter_candidates(schema, ast[1], names, types)
            if left is None:
                return None
            right = self._filter_candidates(schema, ast[2], names, types)
            return None if right is None else left | right
        if kind == "bool" and ast[1][0] == "in" and not ast[1][3]:
            # In matches no null column: its values are normalised already and never None.
            return self._index_probe(schema, ast[1][1], [v for v in ast[1][2] if v is not None], names)
        if kind == "cmp" and ast[1] == "eq":
            prop, lit = ast[2], ast[3]
            if prop[0] == "lit":
                prop, lit = lit, prop
            if prop[0] != "prop" or lit[0] != "lit":
                return None
            try:
                wanted = _norm(lit[1], types.get(prop[1]) or None)
            except (TypeError, ValueError, AttributeError):
                return None  # the scan reports it as it always did
            return self._index_probe(schema, prop[1], [wanted], names)
        return None

    def _index_probe(self, schema: TableSchema, prop: str, wanted: list[Any],
                     names: Mapping[str, str]) -> set[str] | None:
        col = names.get(prop, prop)
        if col == schema.primary_id:
            # Stored keys are lower-case: an ASCII value names at most the row stored under it.
            if all(isinstance(v, str) and v.isascii() for v in wanted):
                return set(wanted)
            return None
        index = self._column_index[schema.entity_set].get(col)
        return None if index is None else index.probe(wanted)

    def _delta(self, req: _ApiRequest, schema: TableSchema, select: list[str] | None, annotate: bool,
               page_size: int, cookie: dict[str, Any] | None, delta_token: str | None, context: str,
               headers: dict[str, str]) -> _ApiResponse:
        since: int | None = None
        if delta_token is not None:
            try:
                since = int(delta_token.split("!", 1)[0])
            except ValueError as exc:
                raise ODataError(400, "0x80060888", f"Invalid delta token '{delta_token}'.") from exc
        upper = cookie["version"] if cookie and cookie.get("version") else self._version
        entries: list[dict[str, Any]] = []
        rows = sorted(self._tables[schema.entity_set].values(), key=lambda r: (r.version, r.values[schema.primary_id]))
        for row in rows:
            if row.version <= upper and (since is None or row.version > since):
                entries.append(self._render(schema, row, select, annotate))
        if since is not None:
            for version, key in self._deleted[schema.entity_set]:
                if since < version <= upper:
                    entries.append({"@odata.context": f"{req.base}{API_PREFIX}$metadata#{schema.entity_set}/"
                                    "$deletedEntity", "id": key, "reason": "deleted"})
        page_no = cookie["pagenumber"] if cookie else 1
        start = (page_no - 1) * page_size
        page = entries[start:start + page_size]
        body: dict[str, Any] = {"@odata.context": context + ("/$delta" if since is not None else ""), "value": page}
        if start + page_size < len(entries):
            token = self._skiptoken(schema, page_no + 1, [], tracking=True, version=upper)
            extra = {"$skiptoken": token}
            if delta_token is not None:
                extra["$deltatoken"] = delta_token
            body["@odata.nextLink"] = self._link(req, schema, extra)
        else:
            stamp = datetime.now(UTC).strftime("%m/%d/%Y %H:%M:%S")
            body["@odata.deltaLink"] = self._link(req, schema, {"$deltatoken": f"{upper}!{stamp}"})
        return self._json(200, body, headers)

    def _link(self, req: _ApiRequest, schema: TableSchema, extra: Mapping[str, str]) -> str:
        params = {k: v for k, v in req.query.items() if k not in ("$skiptoken", "$deltatoken")}
        params.update(extra)
        return f"{req.base}{API_PREFIX}{schema.entity_set}?{urlencode(params, quote_via=quote, safe='$,()')}"

    def _skiptoken(self, schema: TableSchema, page_no: int, page: list[Row], *, tracking: bool,
                   version: int | None) -> str:
        # Shape of the real paging cookie: <cookie pagenumber=".." pagingcookie="<cookie page=..>...</cookie>" ...>
        inner = f'<cookie page="{page_no - 1}"'
        if version is not None:
            inner += f' trackingversion="{version}"'
        inner += ">"
        if page:
            first, last = page[0].values[schema.primary_id], page[-1].values[schema.primary_id]
            inner += f'<{schema.primary_id} last="{{{last}}}" first="{{{first}}}" />'
        inner += "</cookie>"
        paging = quote(quote(inner, safe=""), safe="")
        return f'<cookie pagenumber="{page_no}" pagingcookie="{paging}" istracking="{tracking}" />'

    @staticmethod
    def _parse_skiptoken(token: str | None) -> dict[str, Any] | None:
        if token is None:
            return None
        m = re.match(r'^<cookie pagenumber="(\d+)" pagingcookie="([^"]*)" istracking="(True|False)" />$', token)
        if not m:
            raise ODataError(400, "0x80060888", f"Invalid $skiptoken '{token}'.")
        inner = unquote(unquote(m.group(2)))
        last = re.search(r'last="\{([0-9a-f-]{36})\}"', inner)
        version = re.search(r'trackingversion="(\d+)"', inner)
        return {"pagenumber": int(m.group(1)), "last": last.group(1) if last else None,
                "version": int(version.group(1)) if version else None}

    # ------------------------------------------------------------------------------------ metadata

    def _entity_metadata(self, schema: TableSchema) -> dict[str, Any]:
        return {"LogicalName": schema.logical_name, "EntitySetName": schema.entity_set,
                "SchemaName": schema.logical_name, "PrimaryIdAttribute": schema.primary_id,
                "PrimaryNameAttribute": schema.primary_name,
                "MetadataId": entity_metadata_id(schema.logical_name),
                "ChangeTrackingEnabled": schema.change_tracking,
                "IsCustomEntity": schema.logical_name not in STANDARD_TABLES and not schema.system}

    def _attribute_metadata(self, schema: TableSchema, col: str) -> dict[str, Any]:
        typ = schema.columns[col]
        attribute_type = ATTRIBUTE_TYPES[typ]
        if typ == "lookup" and col == "ownerid":
            attribute_type = "Owner"
        elif typ == "lookup" and sorted(schema.lookups[col].navs.values()) == ["accounts", "contacts"]:
            attribute_type = "Customer"  # parentcustomerid, customerid: the platform's Customer type
        out: dict[str, Any] = {
            "LogicalName": col, "SchemaName": col, "AttributeType": attribute_type,
            "AttributeTypeName": {"Value": f"{attribute_type}Type"},
            "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"attr:{schema.logical_name}.{col}")),
            "IsPrimaryId": col == schema.primary_id,
            "RequiredLevel": {"Value": "ApplicationRequired" if col in schema.required else "None"},
        }
        if typ == "string":
            out["AutoNumberFormat"] = schema.autonumber.get(col)
            if col in schema.max_length:
                out["MaxLength"] = schema.max_length[col]
        if typ in ("date", "datetime"):
            out["Format"] = "DateOnly" if typ == "date" else "DateAndTime"
            out["DateTimeBehavior"] = {"Value": "DateOnly" if typ == "date" else "UserLocal"}
        if typ == "lookup":
            out["Targets"] = [self.schema[t].logical_name if t in self.schema else t[:-1]
                              for t in schema.lookups[col].navs.values()]
        return out

    def _keys_metadata(self, req: _ApiRequest, schema: TableSchema, key_text: str | None) -> _ApiResponse:
        """`EntityDefinitions(...)/Keys` (the table's alternate keys) and `.../Keys(<MetadataId>)`."""
        context = f"{req.base}{API_PREFIX}$metadata#EntityDefinitions({entity_metadata_id(schema.logical_name)})/Keys"
        keys = [key_metadata(schema, cols) for cols in schema.alternate_keys]
        if key_text is None:
            return self._json(200, {"@odata.context": context, "value": keys})
        wanted = _parse_key_predicate(key_text)
        found = next((k for k in keys if (isinstance(wanted, str) and k["MetadataId"] == wanted)
                      or (isinstance(wanted, dict) and k["LogicalName"] == wanted.get("LogicalName"))), None)
        if found is None:
            raise ODataError(404, "0x80040217", f"Could not find key '{key_text}' on entity "
                             f"'{schema.logical_name}'.")
        return self._json(200, {"@odata.context": f"{context}/$entity", **found})

    def _picklist_metadata(self, schema: TableSchema, col: str) -> dict[str, Any]:
        choice = schema.choices[col]

        def label(text: str, value: int) -> dict[str, Any]:
            lid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"label:{schema.logical_name}.{col}.{value}"))
            loc = {"Label": text, "LanguageCode": 1033, "IsManaged": False, "MetadataId": lid, "HasChanged": None}
            return {"LocalizedLabels": [loc], "UserLocalizedLabel": loc}

        options: list[dict[str, Any]] = [{"Value": v, "Label": label(t, v), "Description": {"LocalizedLabels": [],
                                                                       "UserLocalizedLabel": None},
                    "Color": None, "IsManaged": False, "MetadataId": None, "HasChanged": None}
                   for v, t in sorted(choice.options.items())]
        return {
            "@odata.context": "$metadata#EntityDefinitions('" + schema.logical_name + "')/Attributes/"
                              "Microsoft.Dynamics.CRM.PicklistAttributeMetadata(LogicalName,OptionSet,GlobalOptionSet)"
                              "/$entity",
            "LogicalName": col,
            "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"attr:{schema.logical_name}.{col}")),
            "OptionSet": {"Options": options, "IsGlobal": False,
                          "Name": f"{schema.logical_name}_{col}", "OptionSetType": "Picklist",
                          "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"os:{schema.logical_name}.{col}"))},
            "GlobalOptionSet": None,
        }

    def _metadata(self, req: _ApiRequest, key_text: str | None, rest: list[str]) -> _ApiResponse:
        if req.method != "GET":
            raise ODataError(405, "0x80060888", "Only GET is supported on metadata by the simulator.")
        by_logical = {s.logical_name: s for s in self.schema.values()}
        if key_text is None:
            if rest:
                raise ODataError(400, "0x80060888", "Bad metadata URL.")
            entities = [self._entity_metadata(s) for s in self.schema.values()]
            if "$filter" in req.query:
                types = {"LogicalName": "string", "EntitySetName": "string", "SchemaName": "string",
                         "PrimaryIdAttribute": "string", "PrimaryNameAttribute": "string",
                         "MetadataId": "guid", "ChangeTrackingEnabled": "bool", "IsCustomEntity": "bool"}
                ast = parse_filter(req.query["$filter"], types, "Microsoft.Dynamics.CRM.EntityMetadata")
                entities = [e for e in entities if _evaluate(ast, e, types)]
            return self._json(200, {"@odata.context": f"{req.base}{API_PREFIX}$metadata#EntityDefinitions",
                                    "value": entities})
        key = _parse_key_predicate(key_text)
        if isinstance(key, str):
            # EntityDefinitions(<MetadataId>): the primary key of the metadata entity set.
            schema = next((s for s in self.schema.values() if entity_metadata_id(s.logical_name) == key), None)
            if schema is None:
                raise ODataError(404, "0x80040217", f"Could not find entity with id '{key}'.")
        else:
            name = key.get("LogicalName")
            if set(key) != {"LogicalName"}:
                raise ODataError(400, "0x80060888", "The key in the request URI is not valid for resource "
                                 "'Microsoft.Dynamics.CRM.EntityMetadata'.")
            schema = by_logical.get(str(name))
            if schema is None:
                raise ODataError(404, "0x80040217", f"Could not find entity with name '{name}'.")
        if not rest:
            return self._json(200, {"@odata.context": f"{req.base}{API_PREFIX}$metadata#EntityDefinitions/$entity",
                                    **self._entity_metadata(schema)})
        keys = _SEGMENT_RE.match(rest[0])
        if keys is not None and keys.group("name") == "Keys" and len(rest) == 1:
            return self._keys_metadata(req, schema, keys.group("key"))
        attr = _SEGMENT_RE.match(rest[0])
        if attr is None or attr.group("name") != "Attributes":
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{rest[0]}'.")
        cast = rest[1] if len(rest) > 1 else None
        if cast not in (None, "Microsoft.Dynamics.CRM.PicklistAttributeMetadata") or len(rest) > 2:
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{cast}'.")
        if attr.group("key") is None:
            cols = [c for c in schema.columns if cast is None or schema.columns[c] == "choice"]
            render = self._picklist_metadata if cast else self._attribute_metadata
            return self._json(200, {"value": [render(schema, c) for c in cols]})
        akey = _parse_key_predicate(attr.group("key"))
        col = akey.get("LogicalName") if isinstance(akey, dict) else None
        if not isinstance(col, str) or col not in schema.columns:
            raise ODataError(404, "0x80040217", f"Could not find attribute with name '{col}' on entity "
                             f"'{schema.logical_name}'.")
        if cast is None:
            return self._json(200, self._attribute_metadata(schema, col))
        if schema.columns[col] != "choice":
            raise ODataError(400, "0x80060888", f"The attribute '{col}' is of type "
                             f"'{ATTRIBUTE_TYPES[schema.columns[col]]}AttributeMetadata' and cannot be cast to "
                             "'PicklistAttributeMetadata'.")
        return self._json(200, self._picklist_metadata(schema, col))

    # ------------------------------------------------------------------------------------ writes

    def _empty_index(self) -> dict[str, dict[tuple[str, ...], dict[tuple[Any, ...], str]]]:
        return {s: {cols: {} for cols in t.alternate_keys} for s, t in self.schema.items()}

    def _empty_column_index(self) -> dict[str, dict[str, _ColumnIndex]]:
        """entity set -> an equality index per lookup and alternate-key column (`$filter` fast path)."""
        out: dict[str, dict[str, _ColumnIndex]] = {}
        for entity_set, table in self.schema.items():
            cols = set(table.lookups) | {c for key in table.alternate_keys for c in key}
            cols.discard(table.primary_id)
            out[entity_set] = {c: _ColumnIndex(table.columns[c]) for c in sorted(cols) if c in table.columns}
        return out

    def _index_entries(self, schema: TableSchema, values: Mapping[str, Any]) -> list[tuple[tuple[str, ...],
                                                                                          tuple[Any, ...]]]:
        out = []
        for cols in schema.alternate_keys:
            raw = [values.get(c) for c in cols]
            if all(v is not None for v in raw):  # alternate-key indexes ignore rows with null key values
                out.append((cols, tuple(_norm(v, schema.columns[c]) for v, c in zip(raw, cols, strict=True))))
        return out

    def _put_row(self, schema: TableSchema, key: str, row: Row | None) -> None:
        """Store (or remove, row=None) a record, keeping the alternate-key index in step."""
        rows = self._tables[schema.entity_set]
        index = self._key_index[schema.entity_set]
        children = self._children.get(schema.entity_set)
        column_index = self._column_index[schema.entity_set]
        old = rows.get(key)
        if old is not None:
            for col, col_index in column_index.items():
                col_index.discard(key, old.values.get(col))
            for cols, normed in self._index_entries(schema, old.values):
                if index[cols].get(normed) == key:
                    del index[cols][normed]
            for col, by_parent in (children or {}).items():
                parent = str(old.values.get(col) or "").lower()
                if parent and parent in by_parent:
                    by_parent[parent].discard(key)
                    if not by_parent[parent]:
                        del by_parent[parent]
        if row is None:
            rows.pop(key, None)
            return
        rows[key] = row
        for col, col_index in column_index.items():
            col_index.add(key, row.values.get(col))
        for cols, normed in self._index_entries(schema, row.values):
            index[cols][normed] = key
        for col, by_parent in (children or {}).items():
            parent = str(row.values.get(col) or "").lower()
            if parent:
                by_parent.setdefault(parent, set()).add(key)

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    def _target_logical(self, schema: TableSchema, col: str, values: Mapping[str, Any]) -> str:
        if col in ("createdby", "modifiedby", "ownerid"):
            return "systemuser"
        if col == "objectid" and values.get("objecttypecode"):
            return str(values["objecttypecode"])
        targets = list(schema.lookups[col].navs.values())
        if len(targets) > 1:
            # A polymorphic lookup given as a bare GUID (direct helpers): the table holding that GUID decides.
            guid = str(values.get(col) or "").lower()
            held = next((t for t in targets if guid in self._tables.get(t, {})), None)
            if held is not None:
                return self.schema[held].logical_name
        target_set = targets[0]
        return self.schema[target_set].logical_name if target_set in self.schema else target_set

    def _resolve_bind(self, schema: TableSchema, nav: str, ref: Any, base: str) -> tuple[str, str | None, str]:
        """`nav@odata.bind` -> (lookup column, target GUID or None, target logical name)."""
        navs = schema.nav_index()
        if nav not in navs:
            raise ODataError(
                400, "0x80060888",
                f"An undeclared property '{nav}' which only has property annotations in the payload but no property "
                "value was found in the payload. In OData, only declared navigation properties and declared named "
                "streams can be represented as properties without values.")
        col, target_set = navs[nav]
        target_schema = self.schema.get(target_set)
        if target_schema is None:
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{target_set}'.")
        if ref is None:
            return col, None, target_schema.logical_name
        if not isinstance(ref, str):
            raise _cannot_convert(ref, "Edm.String")
        text = ref
        for prefix in (base + API_PREFIX, API_PREFIX, "/"):
            if text.startswith(prefix):
                text = text[len(prefix):]
                break
        m = _SEGMENT_RE.match(unquote(text))
        if m is None or m.group("key") is None:
            raise ODataError(400, "0x80060888", f"The URI '{ref}' in the '{nav}@odata.bind' annotation is not valid.")
        if m.group("name") != target_set:
            raise ODataError(400, "0x80060888", f"The entity set '{m.group('name')}' is not valid for the navigation "
                             f"property '{nav}' (expected '{target_set}').")
        key = _parse_key_predicate(m.group("key"))
        row = self._find(target_schema, key)
        if row is None:
            raise _not_found(target_schema.logical_name, self._key_text(key))
        return col, row.values[target_schema.primary_id], target_schema.logical_name

    def _prepare(self, schema: TableSchema, body: Any, base: str) -> tuple[dict[str, Any], dict[str, str]]:
        if not isinstance(body, dict):
            raise ODataError(400, "0x80060888", "The request body must be a JSON object.")
        values: dict[str, Any] = {}
        lookup_types: dict[str, str] = {}
        for name, value in body.items():
            if name.startswith("@odata."):
                continue
            if name.endswith("@odata.bind"):
                col, guid, target = self._resolve_bind(schema, name[: -len("@odata.bind")], value, base)
                values[col] = guid
                if guid is not None:
                    lookup_types[col] = target
                continue
            if "@" in name:
                continue
            if name.startswith("_") and name.endswith("_value") and name[1:-6] in schema.lookups:
                raise ODataError(400, "0x80060888", "CRM do not support direct update of Entity Reference "
                                 "properties, Use Navigation properties instead.")
            typ = schema.columns.get(name)
            if typ is None or typ == "lookup":
                raise _bad_property(schema.logical_name, name)
            if name in SYSTEM_READONLY or name in schema.computed:
                continue  # the platform ignores writes to system-managed columns
            values[name] = _coerce(schema, name, value)
        return values, lookup_types

    def _check_required(self, schema: TableSchema, values: Mapping[str, Any]) -> None:
        for col in sorted(schema.required):
            if values.get(col) in (None, ""):
                raise ODataError(400, "0x80044331", f"A validation error occurred. The value for the required "
                                 f"attribute '{col}' of '{schema.logical_name}' is missing.")

    def _check_unique(self, schema: TableSchema, values: Mapping[str, Any], own_key: str | None) -> None:
        for cols in schema.alternate_keys:
            wanted = [values.get(c) for c in cols]
            if any(v is None for v in wanted):
                continue  # alternate-key indexes ignore rows with null key values
            normed = tuple(_norm(v, schema.columns[c]) for v, c in zip(wanted, cols, strict=True))
            holder = self._key_index[schema.entity_set][cols].get(normed)
            if holder is not None and holder != own_key:
                raise ODataError(
                    412, "0x80040237",
                    f"A record that has the attribute values {', '.join(str(v) for v in wanted)} already exists. "
                    f"The entity key {schema.logical_name}_{'_'.join(cols)}_key requires that this set of "
                    "attributes contains unique values. Select unique values and try again.")

    def _check_registration(self, schema: TableSchema, values: Mapping[str, Any]) -> None:
        """The platform's checks on webhook registrations (service endpoints, steps and their images)."""
        def invalid(message: str) -> ODataError:
            return ODataError(400, "0x80040203", message)

        if schema.entity_set == "serviceendpoints" and values.get("contract") == CONTRACT_WEBHOOK:
            url = str(values.get("url") or "")
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
                raise invalid(f"A webhook needs an absolute http(s) url, got '{url}'.")
            auth = values.get("authtype")
            if auth not in (AUTH_WEBHOOK_KEY, AUTH_HTTP_HEADER, AUTH_HTTP_QUERY_STRING):
                raise invalid("A webhook's authtype must be WebhookKey (4), HttpHeader (5) or HttpQueryString (6).")
            if not values.get("authvalue"):
                raise invalid("A webhook needs an authvalue.")
            if auth != AUTH_WEBHOOK_KEY:
                try:
                    if not parse_settings(str(values["authvalue"])):
                        raise ValueError("no <setting> elements")
                except ValueError as exc:
                    raise invalid(f"The authvalue of an HttpHeader / HttpQueryString webhook must be "
                                  f"<settings><setting name=\"...\" value=\"...\" /></settings>: {exc}") from exc
        elif schema.entity_set == "sdkmessageprocessingsteps":
            filter_row = self._tables["sdkmessagefilters"].get(str(values.get("sdkmessagefilterid") or ""))
            if filter_row is not None and filter_row.values.get("sdkmessageid") != values.get("sdkmessageid"):
                raise invalid("The message filter (sdkmessagefilterid) belongs to a different message.")
            if values.get("mode") == 1 and values.get("stage") != 40:
                raise invalid("An asynchronous step must be registered in the post-operation stage (40).")
            table = self._filter_table(filter_row)
            for name in _csv(values.get("filteringattributes")):
                if table is not None and name not in table.columns:
                    raise invalid(f"filteringattributes: '{name}' is not an attribute of '{table.logical_name}'.")
        elif schema.entity_set == "sdkmessageprocessingstepimages":
            step = self._tables["sdkmessageprocessingsteps"].get(str(values.get("sdkmessageprocessingstepid")))
            if step is None:
                return
            message_row = self._tables["sdkmessages"].get(str(step.values.get("sdkmessageid")))
            message = str(message_row.values.get("name")) if message_row else ""
            wanted = IMAGE_MESSAGE_PROPERTY.get(message)
            if wanted and str(values.get("messagepropertyname") or "").lower() != wanted.lower():
                raise invalid(f"An image of a {message} step must use messagepropertyname '{wanted}'.")
            if message == "Create" and values.get("imagetype") != IMAGE_POST:
                raise invalid("A Create step can only have a PostImage.")
            if message == "Delete" and values.get("imagetype") != IMAGE_PRE:
                raise invalid("A Delete step can only have a PreImage.")
            table = self._filter_table(self._tables["sdkmessagefilters"].get(
                str(step.values.get("sdkmessagefilterid") or "")))
            for name in _csv(values.get("attributes")):
                if table is not None and name not in table.columns:
                    raise invalid(f"Image attribute '{name}' is not an attribute of '{table.logical_name}'.")

    def _filter_table(self, filter_row: Row | None) -> TableSchema | None:
        if filter_row is None:
            return None
        logical = filter_row.values.get("primaryobjecttypecode")
        return next((t for t in self.schema.values() if t.logical_name == logical), None)

    @staticmethod
    def _derives(schema: TableSchema) -> bool:
        return schema.logical_name == "contact" or bool(
            schema.autonumber or schema.line_numbers or schema.amounts or schema.rollups or schema.status_by_state)

    def _platform_fixups(self, schema: TableSchema, values: dict[str, Any], lookup_types: Mapping[str, str], *,
                         written: Mapping[str, Any] | None = None, creating: bool = False) -> None:
        """Columns the platform derives on every write (note type and size, a contact's full name, auto-numbers,
        line numbers, amounts, rollups, the status that goes with a state).

        `values` is the whole record after the write; `written` what the request itself set (None = all of it).
        """
        if schema.logical_name == "contact":
            # The org's default full name format is "First Last"; a missing part is left out.
            parts = [values.get("firstname"), values.get("lastname")]
            values["fullname"] = " ".join(p for p in parts if p) or None
            return
        if creating:
            for col, fmt in schema.autonumber.items():
                if values.get(col) in (None, ""):
                    values[col] = self._next_autonumber(schema, col, fmt)
            for col, parent_col in schema.line_numbers.items():
                parent = str(values.get(parent_col) or "").lower()
                if values.get(col) is None and parent:
                    siblings = self._children[schema.entity_set][parent_col].get(parent, ())
                    rows = self._tables[schema.entity_set]
                    numbers = [rows[k].values.get(col) or 0 for k in siblings if k in rows]
                    values[col] = max(numbers, default=0) + 1
        for col, (a, b) in schema.amounts.items():
            values[col] = _money(_decimal(values.get(a)) * _decimal(values.get(b)))
        for col, rollup in schema.rollups.items():
            values[col] = self._rollup_value(rollup, str(values.get(schema.primary_id) or "").lower())
        if schema.status_by_state:
            self._state_fixups(schema, values, values if written is None else written)
        if schema.logical_name != "annotation":
            return
        if "objectid" in lookup_types:
            values["objecttypecode"] = lookup_types["objectid"]
        body = values.get("documentbody")
        if body is not None:
            try:
                values["filesize"] = len(base64.b64decode(body, validate=True))
            except ValueError as exc:
                raise ODataError(400, "0x80044331", "A validation error occurred. documentbody is not valid "
                                 "base64.") from exc
            values["isdocument"] = True

    @staticmethod
    def _state_fixups(schema: TableSchema, values: dict[str, Any], written: Mapping[str, Any]) -> None:
        """statecode/statuscode travel as a pair: a state alone gets its default status; a status must fit."""
        state = values.get("statecode")
        if not isinstance(state, int):
            return
        allowed = schema.status_by_state.get(state)
        if allowed is None:
            return
        if "statecode" in written and written.get("statuscode") is None:
            values["statuscode"] = allowed[0]
        elif values.get("statuscode") not in allowed:
            state_label = schema.choices["statecode"].options.get(state, str(state))
            raise ODataError(400, "0x80040203", f"{values.get('statuscode')} is not a valid status code for state "
                             f"code {state_label} on {schema.logical_name} with Id {values.get(schema.primary_id)}.")

    def _next_autonumber(self, schema: TableSchema, col: str, fmt: str) -> str:
        """The next value of an auto-number column: `{SEQNUM:n}` counts up per column, `{RANDSTRING:n}` is random."""
        seq = self._autonumbers.get((schema.entity_set, col), AUTONUMBER_SEED - 1) + 1
        self._autonumbers[(schema.entity_set, col)] = seq

        def token(m: re.Match[str]) -> str:
            kind, width = m.group(1), int(m.group(2))
            if kind == "SEQNUM":
                return f"{seq:0{width}d}"
            return "".join(self._autonumber_rng.choice(AUTONUMBER_CHARS) for _ in range(width))

        return re.sub(r"\{(SEQNUM|RANDSTRING):(\d+)\}", token, fmt)

    # ---- parent/child bookkeeping: line numbers and rollups need a record's children without a table scan

    def _collect_child_links(self) -> dict[str, tuple[str, ...]]:
        """child entity set -> its lookup columns whose children are indexed (rollups and line numbering)."""
        links: dict[str, set[str]] = {}
        for table in self.schema.values():
            for rollup in table.rollups.values():
                links.setdefault(rollup.child_set, set()).add(rollup.child_lookup)
            for parent_col in table.line_numbers.values():
                links.setdefault(table.entity_set, set()).add(parent_col)
        return {s: tuple(sorted(cols)) for s, cols in links.items() if s in self.schema}

    def _empty_children(self) -> dict[str, dict[str, dict[str, set[str]]]]:
        return {s: {c: {} for c in cols} for s, cols in self._child_links.items()}

    def _rollup_value(self, rollup: Rollup, parent: str) -> float:
        rows = self._tables.get(rollup.child_set, {})
        keys = self._children.get(rollup.child_set, {}).get(rollup.child_lookup, {}).get(parent, ())
        total = sum((_decimal(rows[k].values.get(rollup.child_column)) for k in keys if k in rows), Decimal(0))
        return _money(total)

    def _rollup_parents(self, schema: TableSchema, values: Mapping[str, Any] | None) -> list[tuple[TableSchema, str]]:
        """(parent table, parent key) of every rollup a record of `schema` with `values` contributes to."""
        if values is None:
            return []
        out: list[tuple[TableSchema, str]] = []
        for parent, child_lookup in self._rollup_links.get(schema.entity_set, ()):
            key = values.get(child_lookup)
            if key and (parent, str(key).lower()) not in out:
                out.append((parent, str(key).lower()))
        return out

    def _refresh_rollups(self, parents: Iterable[tuple[TableSchema, str]], caller: _Caller, txn: _Txn) -> None:
        """Recompute the parents' rollups; a changed total is an Update of the parent (new version, webhook)."""
        for parent, key in parents:
            row = self._tables[parent.entity_set].get(key)
            if row is None:
                continue
            if any(self._rollup_value(r, key) != row.values.get(c) for c, r in parent.rollups.items()):
                self._update(parent, row, {}, {}, caller, txn)

    def _refresh_rollup_directly(self, parent: TableSchema, key: str, now: str) -> None:
        """`_refresh_rollups` for the direct helpers: the parent's total and version change, no webhook fires."""
        row = self._tables[parent.entity_set].get(key)
        if row is None:
            return
        totals = {c: self._rollup_value(r, key) for c, r in parent.rollups.items()}
        if all(row.values.get(c) == v for c, v in totals.items()):
            return
        version = self._next_version()
        merged = {**row.values, **totals, "modifiedon": now, "versionnumber": version}
        self._put_row(parent, key, Row(merged, version, dict(row.lookup_types)))

    def _create(self, schema: TableSchema, values: dict[str, Any], lookup_types: dict[str, str],
                key: str | None, caller: _Caller, txn: _Txn) -> str:
        rows = self._tables[schema.entity_set]
        new_key = (key or values.get(schema.primary_id) or str(uuid.uuid4())).lower()
        if new_key in rows:
            raise ODataError(412, "0x80040237", "A record with matching key values already exists.")
        vals = {**schema.defaults, **values}
        vals[schema.primary_id] = new_key
        self._platform_fixups(schema, vals, lookup_types, written=values, creating=True)
        self._check_required(schema, vals)
        self._check_unique(schema, vals, None)
        self._check_registration(schema, vals)
        now = _now_text()
        version = self._next_version()
        vals.update({"createdon": now, "modifiedon": now, "createdby": caller.user_id, "modifiedby": caller.user_id,
                     "ownerid": caller.user_id, "versionnumber": version})
        lt = {**lookup_types, "createdby": "systemuser", "modifiedby": "systemuser", "ownerid": "systemuser"}
        self._put_row(schema, new_key, Row(vals, version, lt))
        txn.undo.append(lambda: self._put_row(schema, new_key, None))
        # Derived and defaulted columns travel in the Target like the platform's pre-operation additions do.
        derived = {c: vals[c] for c in (*schema.computed, *schema.defaults, *schema.autonumber, *schema.line_numbers)
                   if vals.get(c) is not None}
        target = {**values, **derived, schema.primary_id: new_key, "createdon": now, "modifiedon": now,
                  "createdby": caller.user_id, "modifiedby": caller.user_id, "ownerid": caller.user_id}
        txn.events.append(_Event("Create", schema.entity_set, new_key, target, dict(vals), None, dict(lt),
                                 caller.user_id, caller.correlation_id, datetime.now(UTC)))
        self._refresh_rollups(self._rollup_parents(schema, vals), caller, txn)
        return new_key

    def _update(self, schema: TableSchema, row: Row, values: dict[str, Any], lookup_types: dict[str, str],
                caller: _Caller, txn: _Txn) -> Row:
        before = row
        merged = {**row.values, **values}
        self._platform_fixups(schema, merged, lookup_types, written=values)
        self._check_required(schema, merged)
        key = row.values[schema.primary_id]
        self._check_unique(schema, merged, key)
        self._check_registration(schema, merged)
        now = _now_text()
        version = self._next_version()
        merged.update({"modifiedon": now, "modifiedby": caller.user_id, "versionnumber": version})
        new_row = Row(merged, version, {**row.lookup_types, **lookup_types, "modifiedby": "systemuser"})
        self._put_row(schema, key, new_row)
        txn.undo.append(lambda: self._put_row(schema, key, before))
        derived = {c: merged.get(c) for c in (*schema.computed, *(("statuscode",) if schema.status_by_state else ()))
                   if merged.get(c) != before.values.get(c)}
        target = {**values, **derived, schema.primary_id: key, "modifiedon": now, "modifiedby": caller.user_id}
        txn.events.append(_Event("Update", schema.entity_set, key, target, dict(merged), dict(before.values),
                                 dict(new_row.lookup_types), caller.user_id, caller.correlation_id, datetime.now(UTC)))
        # A line moved to another order changes both orders' totals.
        parents = self._rollup_parents(schema, before.values)
        parents += [p for p in self._rollup_parents(schema, merged) if p not in parents]
        self._refresh_rollups(parents, caller, txn)
        return new_row

    def _delete(self, schema: TableSchema, key: str, caller: _Caller, txn: _Txn, *, rollup: bool = True) -> None:
        row = self._tables[schema.entity_set][key]
        for rolled in schema.rollups.values():
            # The parental relationship cascades: an order's lines go with it (each a Delete of its own),
            # without recomputing the total of an order that is going away.
            child = self.schema[rolled.child_set]
            for child_key in sorted(self._children[rolled.child_set][rolled.child_lookup].get(key, ())):
                if child_key in self._tables[rolled.child_set]:
                    self._delete(child, child_key, caller, txn, rollup=False)
        self._put_row(schema, key, None)
        version = self._next_version()
        deleted = self._deleted[schema.entity_set]
        deleted.append((version, key))
        entry = deleted[-1]

        def undo() -> None:
            self._put_row(schema, key, row)
            if entry in deleted:
                deleted.remove(entry)

        txn.undo.append(undo)
        txn.events.append(_Event("Delete", schema.entity_set, key, {}, None, dict(row.values), dict(row.lookup_types),
                                 caller.user_id, caller.correlation_id, datetime.now(UTC)))
        if rollup:
            self._refresh_rollups(self._rollup_parents(schema, row.values), caller, txn)

    def _write_response(self, req: _ApiRequest, schema: TableSchema, row: Row, created: bool) -> _ApiResponse:
        key = row.values[schema.primary_id]
        entity_url = f"{req.base}{API_PREFIX}{schema.entity_set}({key})"
        etag = f'W/"{row.version}"'
        if _prefer(req.headers).get("return") == "representation":
            select = self._select(schema, req)
            body = {"@odata.context": f"{req.base}{API_PREFIX}$metadata#{schema.entity_set}/$entity",
                    **self._render(schema, row, select, False)}
            return self._json(201 if created else 200, body,
                              {"ETag": etag, "Preference-Applied": "return=representation"})
        return _ApiResponse(204, {"OData-Version": "4.0", "OData-EntityId": entity_url, "Location": entity_url,
                                  "ETag": etag})

    def _load_body(self, req: _ApiRequest) -> Any:
        try:
            return strict_loads(req.body or b"{}")
        except ValueError as exc:
            raise ODataError(400, "0x80060888", f"The request body is not valid JSON: {exc}") from exc

    def _post(self, req: _ApiRequest, schema: TableSchema, caller: _Caller, txn: _Txn) -> _ApiResponse:
        values, lookup_types = self._prepare(schema, self._load_body(req), req.base)
        key = self._create(schema, values, lookup_types, None, caller, txn)
        return self._write_response(req, schema, self._tables[schema.entity_set][key], True)

    def _patch(self, req: _ApiRequest, schema: TableSchema, key: str | dict[str, Any], caller: _Caller,
               txn: _Txn) -> _ApiResponse:
        row = self._find(schema, key)
        if_match = req.headers.get("if-match")
        if_none_match = req.headers.get("if-none-match")
        values, lookup_types = self._prepare(schema, self._load_body(req), req.base)
        if row is None:
            if if_match is not None:
                raise _not_found(schema.logical_name, self._key_text(key))
            # Upsert-create: URL key values seed the record, body values win (per the upsert doc).
            seed: dict[str, Any] = {}
            new_key: str | None = None
            if isinstance(key, str):
                new_key = key
            else:
                for col, v in key.items():
                    if col == schema.primary_id:
                        new_key = str(v).lower()
                    else:
                        seed[col] = _coerce(schema, col, v)
            created = self._create(schema, {**seed, **values}, lookup_types, new_key, caller, txn)
            return self._write_response(req, schema, self._tables[schema.entity_set][created], True)
        if if_none_match == "*":
            raise ODataError(412, "0x80040237", "A record with matching key values already exists.")
        if if_match not in (None, "*") and if_match != f'W/"{row.version}"':
            raise ODataError(412, "0x80060882", "The version of the existing record doesn't match the RowVersion "
                             "property provided.")
        # Key columns in the body of an update through that key are dropped (they cannot change via their own URL).
        if isinstance(key, dict):
            for col in key:
                values.pop(col, None)
        values.pop(schema.primary_id, None)
        updated = self._update(schema, row, values, lookup_types, caller, txn)
        return self._write_response(req, schema, updated, False)

    # ------------------------------------------------------------------------------------ bulk messages

    def _bound_action(self, req: _ApiRequest, schema: TableSchema, action: str, caller: _Caller,
                      txn: _Txn) -> _ApiResponse:
        """CreateMultiple / UpdateMultiple / UpsertMultiple bound to the entity set: `{"Targets": [...]}`, each
        target typed with `@odata.type`; one transaction (any refused target rolls every one back)."""
        if action not in BULK_MESSAGES:
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{NAMESPACE}.{action}'.")
        if req.method != "POST":
            raise ODataError(405, "0x80060888", f"The HTTP method '{req.method}' is not allowed on the action "
                             f"'{NAMESPACE}.{action}'.")
        if not supports_bulk(schema):
            raise ODataError(400, "0x80060888", f"The '{action}' method does not support entities of type "
                             f"'{schema.logical_name}'. MessageProcessorCache returned MessageProcessor.Empty.")
        body = self._load_body(req)
        if not isinstance(body, dict):
            raise ODataError(400, "0x80060888", "The request body must be a JSON object.")
        for name in body:
            if name != "Targets":
                raise ODataError(400, "0x80060888", f"The parameter '{name}' in the request payload is not a valid "
                                 f"parameter for the operation '{action}'.")
        targets = body.get("Targets")
        if not isinstance(targets, list) or not targets:
            raise ODataError(400, "0x80060888", f"The '{action}' operation needs a non-empty 'Targets' collection.")
        wanted = f"{NAMESPACE}.{schema.logical_name}"
        for i, target in enumerate(targets):
            if not isinstance(target, dict):
                raise ODataError(400, "0x80060888", f"Targets[{i}] must be a JSON object.")
            typ = target.get("@odata.type")
            if not isinstance(typ, str):
                # The parameter is a collection of the abstract crmbaseentity: an untyped item cannot be read.
                raise ODataError(400, "0x80060888", f"Targets[{i}] has no '@odata.type' annotation: every item of "
                                 f"the Targets parameter must name its type (expected '{wanted}').")
            if typ.lstrip("#") != wanted:
                raise ODataError(400, "0x80060888", f"Targets[{i}] is of type '{typ.lstrip('#')}': every record of "
                                 f"'{action}' on '{schema.entity_set}' must be of type '{wanted}'.")
        ids: list[str] = []
        for target in targets:
            if action == "CreateMultiple":
                values, lookup_types = self._prepare(schema, target, req.base)
                ids.append(self._create(schema, values, lookup_types, None, caller, txn))
            elif action == "UpdateMultiple":
                values, lookup_types = self._prepare(schema, target, req.base)
                pid = values.pop(schema.primary_id, None)
                row = self._find(schema, str(pid).lower()) if pid is not None else None
                if row is None:
                    raise _not_found(schema.logical_name, str(pid))
                self._update(schema, row, values, lookup_types, caller, txn)
            else:
                self._upsert_target(req, schema, target, caller, txn)
        if action == "CreateMultiple":
            return self._json(200, {"@odata.context": f"{req.base}{API_PREFIX}$metadata#{NAMESPACE}."
                                    "CreateMultipleResponse", "Ids": ids})
        return _ApiResponse(204, {"OData-Version": "4.0"})

    def _upsert_target(self, req: _ApiRequest, schema: TableSchema, target: Mapping[str, Any], caller: _Caller,
                       txn: _Txn) -> None:
        """One UpsertMultiple item: identified by `@odata.id` (a key URL, alternate keys allowed), else by its
        primary id or a complete alternate key in the body; created when no record matches."""
        values, lookup_types = self._prepare(schema, target, req.base)
        key: str | dict[str, Any] | None = None
        ref = target.get("@odata.id")
        if ref is not None:
            text = str(ref)
            text = text.split(API_PREFIX, 1)[1] if API_PREFIX in text else text.lstrip("/")
            m = _SEGMENT_RE.match(text)
            if m is None or m.group("name") != schema.entity_set or m.group("key") is None:
                raise ODataError(400, "0x80060888", f"The @odata.id '{ref}' does not identify a record of "
                                 f"'{schema.entity_set}'.")
            key = _parse_key_predicate(m.group("key"))
        elif values.get(schema.primary_id) is not None:
            key = str(values[schema.primary_id]).lower()
        else:
            cols = next((k for k in schema.alternate_keys if all(values.get(c) is not None for c in k)), None)
            if cols is not None:
                key = {c: values[c] for c in cols}
        row = self._find(schema, key) if key is not None else None
        if row is None:
            seed: dict[str, Any] = {}
            new_key: str | None = None
            if isinstance(key, str):
                new_key = key
            elif isinstance(key, dict):
                for col, v in key.items():
                    if col == schema.primary_id:
                        new_key = str(v).lower()
                    else:
                        seed[col] = _coerce(schema, col, v)
            self._create(schema, {**seed, **values}, lookup_types, new_key, caller, txn)
            return
        for col in key if isinstance(key, dict) else ():
            values.pop(col, None)
        values.pop(schema.primary_id, None)
        self._update(schema, row, values, lookup_types, caller, txn)

    def _delete_request(self, req: _ApiRequest, schema: TableSchema, key: str | dict[str, Any], caller: _Caller,
                        txn: _Txn) -> _ApiResponse:
        row = self._find(schema, key)
        if row is None:
            raise _not_found(schema.logical_name, self._key_text(key))
        if_match = req.headers.get("if-match")
        if if_match not in (None, "*") and if_match != f'W/"{row.version}"':
            raise ODataError(412, "0x80060882", "The version of the existing record doesn't match the RowVersion "
                             "property provided.")
        self._delete(schema, row.values[schema.primary_id], caller, txn)
        return _ApiResponse(204, {"OData-Version": "4.0"})

    # ------------------------------------------------------------------------------------ $batch

    def _batch(self, req: _ApiRequest, caller: _Caller, events: list[_Event]) -> _ApiResponse:
        ctype = req.headers.get("content-type", "")
        boundary = _boundary(ctype)
        if not ctype.lower().startswith("multipart/mixed") or boundary is None:
            return _error_response(ODataError(400, "0x80060888", "The content type of the $batch request must be "
                                              "multipart/mixed with a boundary."))
        try:
            parts = _split_multipart(req.body, boundary)
            items: list[tuple[bool, list[tuple[dict[str, str], bytes]]]] = []
            total = 0
            for headers, body in parts:
                inner_ct = headers.get("content-type", "")
                if inner_ct.lower().startswith("multipart/mixed"):
                    cs_boundary = _boundary(inner_ct)
                    if cs_boundary is None:
                        raise ODataError(400, "0x80060888", "A change set is missing its boundary.")
                    cs_parts = _split_multipart(body, cs_boundary)
                    total += len(cs_parts)
                    items.append((True, cs_parts))
                else:
                    total += 1
                    items.append((False, [(headers, body)]))
        except ODataError as err:
            return _error_response(err)
        if total > MAX_BATCH_REQUESTS:
            return _error_response(ODataError(
                400, "0x8006088a", f"The number of requests in the batch ({total}) exceeds the maximum of "
                f"{MAX_BATCH_REQUESTS}. A $batch request can contain up to {MAX_BATCH_REQUESTS} requests."))
        self.request_counts["batch_op"] += total
        continue_on_error = "odata.continue-on-error" in _prefer(req.headers)
        out_boundary = f"batchresponse_{uuid.uuid4()}"
        chunks: list[bytes] = []
        failed = False
        for is_changeset, item_parts in items:
            txn = _Txn()
            refs: dict[str, str] = {}
            responses: list[bytes] = []
            error_part: bytes | None = None
            for headers, body in item_parts:
                status, text = self._batch_part(req, headers, body, caller, txn, refs, in_changeset=is_changeset)
                part = _part_bytes(text, headers.get("content-id"))
                if status >= 400:
                    txn.rollback()
                    error_part = part
                    break
                responses.append(part)
            failed = error_part is not None
            if error_part is not None:
                # A failed change set answers with the single failing response (OData 4.0 section 11.7.4).
                chunks.append(error_part)
            elif not is_changeset:
                events.extend(txn.events)
                chunks.extend(responses)
            else:
                events.extend(txn.events)
                cs_boundary = f"changesetresponse_{uuid.uuid4()}"
                inner = b"".join(f"--{cs_boundary}\r\n".encode() + r for r in responses)
                inner += f"--{cs_boundary}--\r\n".encode()
                chunks.append(f"Content-Type: multipart/mixed; boundary={cs_boundary}\r\n\r\n".encode() + inner)
            if failed and not continue_on_error:
                break
        payload_bytes = b"".join(f"--{out_boundary}\r\n".encode() + c for c in chunks)
        payload_bytes += f"--{out_boundary}--\r\n".encode()
        status = 400 if failed and not continue_on_error else 200
        return _ApiResponse(status, {"Content-Type": f"multipart/mixed; boundary={out_boundary}",
                                     "OData-Version": "4.0"}, payload_bytes)

    def _batch_part(self, outer: _ApiRequest, headers: Mapping[str, str], body: bytes, caller: _Caller, txn: _Txn,
                    refs: dict[str, str], *, in_changeset: bool) -> tuple[int, bytes]:
        """Run one embedded request; the caller commits (emits txn.events) or rolls back."""
        try:
            request_line, part_headers, part_body = _parse_http_message(body)
            method, _, rest = request_line.partition(" ")
            url = rest.rsplit(" ", 1)[0] if rest.endswith(("HTTP/1.1", "HTTP/1.0")) else rest
            method = method.upper()
            if in_changeset and method == "GET":
                raise ODataError(400, "0x80060888", "GET requests are not allowed inside a change set.")
            for ref, target in refs.items():
                if url == ref or url.startswith(ref + "/"):
                    url = target + url[len(ref):]
            if url.startswith("$"):
                raise ODataError(400, "0x80060888", f"Content-ID Reference: '{url.split('/')[0]}' does not exist in "
                                 "the batch context.")
            split = urlsplit(url)
            path = split.path
            if path.startswith(API_PREFIX):
                path = path[len(API_PREFIX):]
            elif path.startswith("/"):
                raise ODataError(400, "0x80060888", f"The URL '{url}' is not a Web API v9.2 URL.")
            text_body = part_body.decode("utf-8") if part_body else ""
            for ref, target in refs.items():
                text_body = text_body.replace(f'"{ref}"', json.dumps(target))
            sub = _ApiRequest(method, unquote(path), dict(parse_qsl(split.query, keep_blank_values=True)),
                              {k.lower(): v for k, v in part_headers.items()}, text_body.encode(), outer.base)
            fault = self.faults._take_part(self.faults._fail, API_PREFIX + sub.path)
            if fault is not None:
                resp = self._fault_response(fault)
            else:
                try:
                    with self._lock:
                        resp = self._dispatch(sub, caller, txn)
                except ODataError as err:
                    resp = _error_response(err)
            cid = headers.get("content-id")
            if cid and resp.status < 400:
                entity = resp.headers.get("OData-EntityId") or self._entity_url_from_body(outer, sub, resp)
                if entity:
                    refs[f"${cid}"] = entity
        except ODataError as err:
            resp = _error_response(err)
        return resp.status, _http_response_bytes(resp)

    def _entity_url_from_body(self, outer: _ApiRequest, sub: _ApiRequest, resp: _ApiResponse) -> str | None:
        if not resp.body or sub.method not in ("POST", "PATCH"):
            return None
        head = _SEGMENT_RE.match(_split_segments(sub.path)[0]) if sub.path else None
        if head is None or head.group("name") not in self.schema:
            return None
        schema = self.schema[head.group("name")]
        try:
            key = json.loads(resp.body)[schema.primary_id]
        except (ValueError, KeyError):
            return None
        return f"{outer.base}{API_PREFIX}{schema.entity_set}({key})"


# ============================================================================================ multipart


def _boundary(content_type: str) -> str | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.I)
    return m.group(1) if m else None


def _split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart body into (headers, content) parts; tolerant of CRLF or LF line ends."""
    delim = b"--" + boundary.encode()
    pieces = body.split(delim)
    parts: list[tuple[dict[str, str], bytes]] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        piece = piece[2:] if piece.startswith(b"\r\n") else piece[1:] if piece.startswith(b"\n") else piece
        head, sep, content = piece.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = piece.partition(b"\n\n")
        if not sep:
            raise ODataError(400, "0x80060888", "A $batch part has no blank line after its headers.")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").splitlines():
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if content.endswith(b"\r\n"):
            content = content[:-2]
        elif content.endswith(b"\n"):
            content = content[:-1]
        parts.append((headers, content))
    return parts


def _parse_http_message(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """`METHOD url HTTP/1.1` + headers + blank line + body (an embedded request or response)."""
    text = data
    head, sep, body = text.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = text.partition(b"\n\n")
    lines = head.decode("utf-8").splitlines()
    if not lines:
        raise ODataError(400, "0x80060888", "A $batch part has no request line.")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip()] = v.strip()
    return lines[0].strip(), headers, body.strip(b"\r\n")


def _http_response_bytes(resp: _ApiResponse) -> bytes:
    lines = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Unknown')}"]
    lines += [f"{k}: {v}" for k, v in resp.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + resp.body


def _part_bytes(http_message: bytes, content_id: str | None) -> bytes:
    head = "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
    if content_id:
        head += f"Content-ID: {content_id}\r\n"
    return (head + "\r\n").encode() + http_message + b"\r\n"


__all__ = [
    "APP_USER_ID", "DEFAULT_CLIENT_ID", "DEFAULT_CLIENT_SECRET", "DEFAULT_TENANT_ID", "OFFICE_USER_ID",
    "ChoiceColumn", "DataverseSimulator", "Faults", "LookupColumn", "ODataError", "Rollup", "Row",
    "ServiceProtection", "TableSchema", "WebhookFailure", "WebhookRegistration", "crm_schema", "default_schema",
    "dot_schema", "merge_schemas", "parse_filter", "sap_schema",
]
