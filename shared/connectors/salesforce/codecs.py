"""Salesforce value codecs: API names, SOQL literals (every special character escaped), dates, JSON and CSV."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from shared.core.dates import from_epoch_ms, parse_iso
from shared.core.errors import MappingError, RejectedError
from shared.core.ports import SourceRecord

SYSTEM = "salesforce"
MAX_COLLECTION_SIZE = 200
"""sObject Collections accept at most 200 records per call."""
MAX_IN_VALUES = 200
"""Values per SOQL `IN (...)` list in `select`; more are split over several queries to keep the query URL short."""
IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
ID_RE = re.compile(r"^[A-Za-z0-9]{15}([A-Za-z0-9]{3})?$")
_SOQL_ESCAPES = {"\\": "\\\\", "'": "\\'", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
                 "\f": "\\f"}


def soql_identifier(name: str) -> str:
    """Validate a field or sObject API name (optionally one relationship hop) for use in SOQL."""
    if not isinstance(name, str) or not IDENT_RE.fullmatch(name):
        raise RejectedError(f"{SYSTEM}: {name!r} is not a valid Salesforce API name")
    return name


def soql_quote(value: Any) -> str:
    """Render a Python value as a SOQL literal; strings are quoted with every special character escaped.

    Strings escape backslash, both quotes and control characters (\\n \\r \\t \\b \\f) as SOQL requires, so a
    value can never end the literal early. None -> null, bools -> true/false, numbers as literals, datetimes as
    `YYYY-MM-DDThh:mm:ssZ` (UTC), dates as `YYYY-MM-DD`.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise MappingError(f"{SYSTEM}: {value!r} cannot be used in SOQL")
        return repr(value)
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, date):
        return value.isoformat()
    text = str(value)
    return "'" + "".join(_SOQL_ESCAPES.get(ch, ch) for ch in text) + "'"


def parse_sf_datetime(value: Any) -> datetime | None:
    """Parse `2024-05-01T10:00:00.000+0000` (REST), ISO forms and epoch milliseconds (CDC); None if not one in range."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return from_epoch_ms(value)  # None for NaN, inf and instants outside years 1-9999
    return parse_iso(value)


def to_record(raw: Mapping[str, Any]) -> SourceRecord:
    values = {k: v for k, v in raw.items() if k != "attributes"}
    modified = parse_sf_datetime(values.get("SystemModstamp") or values.get("LastModifiedDate"))
    return SourceRecord(key=str(values.get("Id", "")), values=values, modified=modified,
                        version=str(values["SystemModstamp"]) if values.get("SystemModstamp") else None,
                        deleted=bool(values.get("IsDeleted", False)))


def jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    """Field values as Salesforce REST JSON: datetimes as ISO UTC, dates as YYYY-MM-DD, Decimals as numbers."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, datetime):
            moment = value if value.tzinfo else value.replace(tzinfo=UTC)
            value = moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
        elif isinstance(value, date):
            value = value.isoformat()
        elif isinstance(value, Decimal):
            value = float(value)
        out[name] = value
    return out


def csv_cell(value: Any) -> str:
    if value is None:
        return "#N/A"  # Bulk API 2.0: set the field to null
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return soql_quote(value)
    return str(value)


def soql_select(fields: Sequence[str], table: str, tail: str) -> str:
    """SELECT statement from validated API names; `tail` is built only from identifiers and `soql_quote` literals."""
    names = ", ".join(soql_identifier(f) for f in fields)
    return f"SELECT {names} FROM {soql_identifier(table)}{tail}"  # noqa: S608 - identifiers validated, values quoted


def in_clause(name: str, literals: Sequence[str]) -> str:
    """`name IN (...)` from rendered literals; null is matched with `= null` (IN lists hold values)."""
    values = [v for v in literals if v != "null"]
    if len(values) == len(literals):
        return f"{name} IN ({', '.join(values)})"
    if not values:
        return f"{name} = null"
    return f"({name} IN ({', '.join(values)}) OR {name} = null)"


def chunked(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i: i + size]) for i in range(0, len(items), size)]

