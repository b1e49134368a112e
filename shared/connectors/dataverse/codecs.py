"""Dataverse value codecs: names, GUIDs, JSON values, OData `$filter` literals and alternate-key URL segments."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from shared.connectors._odata import quote_text, v4_literal
from shared.core.dates import iso_z, parse_iso
from shared.core.errors import RejectedError
from shared.core.ports import WriteOp

SYSTEM = "dataverse"
API_PATH = "/api/data/v9.2/"
MAX_BATCH_SIZE = 1000
"""Dataverse refuses a $batch with more than 1000 requests."""
MAX_PAGE_SIZE = 5000

_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LOOKUP_VALUE_RE = re.compile(r"^_(?P<name>[A-Za-z0-9_]+)_value$")
ENTITY_ID_RE = re.compile(
    r"\((?P<id>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\)\s*$")
URL_UNSAFE_KEY_CHARS = frozenset("/<>*%&:\\?+")
"""Characters Dataverse cannot take in an alternate-key value inside a URL (documented limitation)."""
LOOKUP_ATTRIBUTE_TYPES = frozenset({"Lookup", "Customer", "Owner"})
"""AttributeType values of columns read and filtered as `_x_value` (Customer and Owner are polymorphic)."""


@dataclass(frozen=True)
class TableInfo:
    """What the connector needs to know about a table (read once from EntityDefinitions)."""

    entity_set: str
    logical_name: str
    primary_id: str


def is_guid(value: Any) -> bool:
    return isinstance(value, str) and bool(_GUID_RE.match(value))


def check_ident(name: str, what: str) -> str:
    if not isinstance(name, str) or not _IDENT_RE.match(name):
        raise RejectedError(f"{SYSTEM}: {what} {name!r} is not a valid Dataverse name (letters, digits, '_')")
    return name


def check_guid(value: Any, what: str) -> str:
    if isinstance(value, uuid.UUID):
        return str(value)
    if not is_guid(value):
        raise RejectedError(f"{SYSTEM}: {what} must be a GUID, got {value!r}")
    return str(value).lower()


def utc_text(value: datetime) -> str:
    return iso_z(value)


def parse_datetime(value: Any) -> datetime | None:
    """ISO-8601 text as aware UTC; None when absent, malformed or out of range (the row keeps its raw value)."""
    return parse_iso(value)


def jsonable(value: Any, column: str) -> Any:
    """Canonical value -> JSON for the Web API (dates as text, decimals as floats)."""
    if isinstance(value, datetime):
        return utc_text(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise RejectedError(f"{SYSTEM}: column {column!r} has a non-finite number ({value})")
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def filter_literal(info: TableInfo, field_name: str, value: Any) -> str:
    """The typed OData literal of `value` in `field eq <literal>` (GUID fields take unquoted GUIDs)."""
    guid_field = field_name == info.primary_id or bool(LOOKUP_VALUE_RE.match(field_name))
    if value is None:
        return "null"
    if guid_field or isinstance(value, uuid.UUID):
        return check_guid(value, f"value of {field_name}")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | Decimal):
        number = float(value)
        if not math.isfinite(number):
            raise RejectedError(f"{SYSTEM}: cannot filter {field_name} on non-finite number {value}")
        return repr(number)
    return v4_literal(value, field_name, system=SYSTEM)


def in_literal(info: TableInfo, field_name: str, value: Any) -> str:
    """The string literal of `value` inside a `Microsoft.Dynamics.CRM.In`/`NotIn` list."""
    # Microsoft.Dynamics.CRM.In/NotIn take every value as a string literal.
    guid_field = field_name == info.primary_id or bool(LOOKUP_VALUE_RE.match(field_name))
    if guid_field:
        return quote_text(check_guid(value, f"value of {field_name}"))
    if isinstance(value, bool):
        return quote_text("true" if value else "false")
    if isinstance(value, int | str):
        return quote_text(str(value))
    raise RejectedError(f"{SYSTEM}: cannot use a {type(value).__name__} value in a list filter on {field_name}")


def any_of(info: TableInfo, field_name: str, values: Sequence[Any]) -> str:
    """A filter clause true when the field equals any of `values` (None meaning a null field)."""
    items = [v for v in values if v is not None]
    clauses: list[str] = []
    guid_field = field_name == info.primary_id or bool(LOOKUP_VALUE_RE.match(field_name))
    # In takes its values as string literals: fine for text, whole numbers, choices and GUIDs; booleans,
    # decimals and dates keep their typed literals in an `or` chain instead.
    if items and all(guid_field or (isinstance(v, int | str) and not isinstance(v, bool)) for v in items):
        listed = ",".join(in_literal(info, field_name, v) for v in items)
        clauses.append(f"Microsoft.Dynamics.CRM.In(PropertyName='{field_name}',PropertyValues=[{listed}])")
    else:
        clauses += [f"{field_name} eq {filter_literal(info, field_name, v)}" for v in items]
    if len(items) < len(values):
        clauses.append(f"{field_name} eq null")
    return clauses[0] if len(clauses) == 1 else "(" + " or ".join(clauses) + ")"


def key_segment(op: WriteOp) -> tuple[str, str]:
    """`(guid)` or `(col='v',...)` for the op's record, plus a human-readable key for error details."""
    if op.key is not None:
        guid = check_guid(op.key, f"{op.table} key")
        return f"({guid})", guid
    if not op.match:
        raise RejectedError(f"{SYSTEM}: {op.action} on {op.table} needs a key or a match (alternate key)")
    parts: list[str] = []
    for name, value in op.match.items():
        check_ident(name, "alternate key column")
        raw: Any = value
        if raw is None:
            raise RejectedError(f"{SYSTEM}: alternate key column {name!r} of {op.table} has no value")
        if isinstance(raw, bool):
            literal = "true" if raw else "false"
        elif isinstance(raw, int | float):
            literal = str(raw)
        else:
            # Quote doubling keeps the value inside the literal; percent-encoding keeps the URL intact.
            literal = "'" + quote(str(raw).replace("'", "''"), safe="") + "'"
        parts.append(f"{name}={literal}")
    desc = ",".join(f"{k}={v!r}" for k, v in op.match.items())
    return "(" + ",".join(parts) + ")", desc
