"""Table schemas: the declarative tables (columns, choices, lookups, keys, rollups) and the flows' orgs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sandbox.dataverse.protocol import SYSTEM_READONLY

FLOWS_FILE = Path(__file__).resolve().parents[2] / "flows" / "dot-signs.yaml"
CRM_FLOWS_FILE = Path(__file__).resolve().parents[2] / "flows" / "customer-360.yaml"
SAP_FLOWS_FILE = Path(__file__).resolve().parents[2] / "flows" / "sap.yaml"


EDM = {
    "guid": "Edm.Guid", "string": "Edm.String", "memo": "Edm.String", "int": "Edm.Int32",
    "decimal": "Edm.Decimal", "money": "Edm.Decimal", "float": "Edm.Double", "bool": "Edm.Boolean",
    "date": "Edm.Date", "datetime": "Edm.DateTimeOffset", "choice": "Edm.Int32", "lookup": "Edm.Guid",
}
"""Column type -> the Edm type of its Web API property."""


@dataclass(frozen=True)
class ChoiceColumn:
    """A local choice (picklist) column: option value -> label."""

    options: dict[int, str]
    option_set_name: str = ""
    is_global: bool = False
    """The column uses the global choice `option_set_name` (its `options` dict is that global set's)."""


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
