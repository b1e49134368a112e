"""The simulated org's constants, derived schema maps, id format, timestamps and the fault every layer answers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sandbox.salesforce.schema as schema

API_VERSION = "63.0"
API_PREFIX = f"/services/data/v{API_VERSION}/"
QUERY_BATCH = 2000
COLLECTION_LIMIT = 200
COMPOSITE_LIMIT = 25
COMPOSITE_QUERY_LIMIT = 5


def _release(version: int) -> str:
    """Release name of an API version: 63.0 is Spring '25, one version back is one season back."""
    back = 63 - version
    season, year = [("Spring", 25), ("Winter", 25), ("Summer", 24)][back % 3]
    return f"{season} '{year - back // 3}"


API_VERSIONS = [(f"{v}.0", _release(v)) for v in range(31, 64)]
"""`GET /services/data/`: every version is served, all with v63.0's behaviour."""
VERSION_NUMBERS = frozenset(v for v, _ in API_VERSIONS)

DEFAULT_CLIENT_ID = "3MVG9sim.Syncline.Connected.App"
DEFAULT_CLIENT_SECRET = "sim-sf-secret-0123456789ABCDEF"  # a fixed test secret
ORG_ID = "00D5g00000SyncAAA"
RUN_AS_USER_ID = "0055g00000SyncAAA"
UI_USER_ID = "0055g00000OfficAAA"

KEY_PREFIX = {o.name: o.key_prefix for o in schema.SOBJECTS}
SYSTEM_FIELDS = schema.SYSTEM_NAMES
SCHEMAS: dict[str, dict[str, str]] = {o.name: dict(schema.field_types(o)) for o in schema.SOBJECTS}
"""sObject -> field -> describe type, from `sandbox.salesforce.schema` (the one place the org's schema is declared)."""
EXTERNAL_IDS: dict[str, frozenset[str]] = {o.name: frozenset(f.name for f in o.fields if f.external_id)
                                           for o in schema.SOBJECTS}
REQUIRED: dict[str, tuple[str, ...]] = {o.name: tuple(f.name for f in o.fields if f.required) for o in schema.SOBJECTS}
REFERENCES: dict[str, str] = {f.name: f.reference_to for o in schema.SOBJECTS for f in o.fields if f.reference_to}
"""Lookup field -> the sObject it points to (the same on every object that has it)."""
CALCULATED: dict[str, frozenset[str]] = {o.name: frozenset(f.name for f in o.fields if f.calculated)
                                         for o in schema.SOBJECTS}
"""Formula / roll-up fields: computed by the org, refused on create and update."""
CREATE_ONLY: dict[str, frozenset[str]] = {
    o.name: frozenset(f.name for f in o.fields if f.createable and not f.updateable) for o in schema.SOBJECTS}
"""A line belongs to its header and product for life (master-detail; the price book entry is fixed)."""
ROLLUPS: dict[str, tuple[str, str, str]] = {"OpportunityLineItem": ("OpportunityId", "Opportunity", "Amount"),
                                           "OrderItem": ("OrderId", "Order", "TotalAmount")}
"""Line sObject -> (field holding the header id, header sObject, header field summing the lines' TotalPrice)."""
ORDER_STATUSES = ("Draft", "Activated")
UI_ORIGIN = "com/salesforce/ui"

SF_ID_RE = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")


def to_18(id15: str) -> str:
    """Salesforce's case-safe 18-character id: three checksum characters from the capital letters."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
    suffix = ""
    for chunk in (id15[0:5], id15[5:10], id15[10:15]):
        bits = sum(1 << i for i, ch in enumerate(chunk) if "A" <= ch <= "Z")
        suffix += alphabet[bits]
    return id15 + suffix


def sf_datetime(moment: datetime) -> str:
    """Salesforce's REST datetime format: `2024-05-01T10:00:00.000+0000`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


class SalesforceFault(Exception):
    """An error answered as Salesforce's JSON error array."""

    def __init__(self, status: int, code: str, message: str, fields: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, list(fields or [])

    def answer(self) -> tuple[int, Any]:
        """(HTTP status, JSON body): the error array, or the matching record URLs of a 300."""
        return (300, self.fields) if self.status == 300 else (self.status, self.body())

    def body(self) -> list[dict[str, Any]]:
        item: dict[str, Any] = {"message": self.message, "errorCode": self.code}
        if self.fields:
            item["fields"] = self.fields
        return [item]

    def record_error(self) -> dict[str, Any]:
        """The same error inside a per-record result (collections use `statusCode`)."""
        return {"statusCode": self.code, "message": self.message, "fields": self.fields}


@dataclass
class BulkJob:
    id: str
    sobject: str
    operation: str
    external_id: str | None
    state: str = "Open"
    csv: str = ""
    success: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    client: str | None = None
    origin: str = ""


def sobject_of(record_id: str) -> str:
    return next((name for name, prefix in KEY_PREFIX.items() if record_id.startswith(prefix)), "sObject")

