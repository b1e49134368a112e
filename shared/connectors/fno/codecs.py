"""F&O OData v4 codecs: entity keys, $filter literals (enums included), dates and JSON values."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from shared.connectors._odata import quote_text, v4_literal
from shared.core.dates import iso_z, parse_iso
from shared.core.errors import RejectedError
from shared.core.ports import join_key, split_key

SYSTEM = "fno"
DATA_PATH = "/data/"
MAX_PAGE_SIZE = 10000
"""F&O server-driven paging returns at most 10,000 rows per page."""
ENUM_NAMESPACE = "Microsoft.Dynamics.DataEntities"
WRITE_EXCEPTION = "AxODataWriteException"

ENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "CustomersV3": ("dataAreaId", "CustomerAccount"),
    "ReleasedProductsV2": ("dataAreaId", "ItemNumber"),
    "SalesOrderHeadersV2": ("dataAreaId", "SalesOrderNumber"),
    "SalesOrderLines": ("dataAreaId", "InventoryLotId"),
}
"""Key fields per entity set, in canonical-key order."""

MODIFIED_FIELDS: dict[str, str] = {
    "CustomersV3": "ModifiedDateTime",
    "SalesOrderHeadersV2": "ModifiedDateTime",
}
"""Entities polled by modification time; the others are change-detected by full-scan comparison."""

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def format_key(entity: str, values: Mapping[str, Any]) -> str:
    """Canonical key of a row (or key dict): key field values in `ENTITY_KEYS` order joined by `|`."""
    fields = _key_fields(entity)
    return join_key([str(value) for _, value in _key_values(entity, values, f" (keys are {', '.join(fields)})")])


def parse_key(entity: str, key: str) -> dict[str, str]:
    """Inverse of `format_key`: {key field: value} in `ENTITY_KEYS` order; every field must be present."""
    fields = _key_fields(entity)
    try:
        parts = split_key(key)
    except ValueError:
        raise RejectedError(f"{SYSTEM}: {entity} key {key!r} has a dangling escape") from None
    if len(parts) != len(fields) or any(p == "" for p in parts):
        raise RejectedError(f"{SYSTEM}: {entity} key {key!r} must give {len(fields)} non-empty parts "
                            f"({'|'.join(fields)}), e.g. 'usmf|US-001'")
    return dict(zip(fields, parts, strict=True))


def _key_fields(entity: str) -> tuple[str, ...]:
    fields = ENTITY_KEYS.get(entity)
    if fields is None:
        raise RejectedError(f"{SYSTEM}: entity set {entity!r} has no key definition (known: "
                            f"{', '.join(sorted(ENTITY_KEYS))})")
    return fields


def _key_values(entity: str, values: Mapping[str, Any], why: str) -> list[tuple[str, Any]]:
    """(field, value) of every key field in `ENTITY_KEYS` order; a missing one is refused, `why` says more."""
    out = []
    for name in _key_fields(entity):
        value = values.get(name)
        if value is None or value == "":
            raise RejectedError(f"{SYSTEM}: {entity} key field {name!r} is missing{why}")
        out.append((name, value))
    return out


def key_path(entity: str, key: Mapping[str, Any]) -> str:
    """`CustomersV3(dataAreaId='usmf',CustomerAccount='US-001')`, every key field given, literals URL-encoded."""
    parts = []
    for name, value in _key_values(entity, key, "; F&O needs every key field"):
        literal = str(value) if isinstance(value, int) and not isinstance(value, bool) else quote_text(str(value))
        parts.append(f"{name}={quote(literal, safe=chr(39))}")
    return f"{entity}({','.join(parts)})"


@dataclass(frozen=True)
class FinOpsEnum:
    """An enum value for `$filter`: `FinOpsEnum("NoYes", "Yes")` -> `Microsoft.Dynamics.DataEntities.NoYes'Yes'`."""

    enum_type: str
    member: str


def _ident(name: str, what: str) -> str:
    if not isinstance(name, str) or not _IDENT_RE.match(name):
        raise RejectedError(f"{SYSTEM}: {what} {name!r} is not a valid F&O field name (letters, digits, '_')")
    return name


def _utc_text(value: datetime) -> str:
    return iso_z(value)


def filter_literal(value: Any, field_name: str = "value") -> str:
    """An escaped OData literal. `bool` is an F&O NoYes enum (F&O entities have no Edm.Boolean fields)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{ENUM_NAMESPACE}.NoYes'{'Yes' if value else 'No'}'"
    if isinstance(value, FinOpsEnum):
        _ident(value.enum_type, "enum type")
        _ident(value.member, "enum member")
        return f"{ENUM_NAMESPACE}.{value.enum_type}'{value.member}'"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | Decimal):
        if not math.isfinite(float(value)):
            raise RejectedError(f"{SYSTEM}: cannot filter {field_name} on non-finite number {value}")
        return str(value) if isinstance(value, Decimal) else repr(value)
    return v4_literal(value, field_name, system=SYSTEM)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return _utc_text(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, FinOpsEnum):
        return value.member
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return value


def _parse_datetime(value: Any) -> datetime | None:
    """ISO-8601 text (F&O sends 7 fraction digits) as aware UTC; None when absent, malformed or out of range.

    A row whose modified time cannot be read keeps its raw value and `modified=None`: it still syncs (or
    fails alone when a mapping needs the value), and never fails the page it came in.
    """
    return parse_iso(value)


def _same_value(current: Any, wanted: Any) -> bool:
    """Does F&O already hold `wanted`? Numbers compare by value (F&O returns 2 for 2.0), the rest as JSON."""
    wanted = _jsonable(wanted)
    numbers = (int, float)
    if isinstance(current, numbers) and isinstance(wanted, numbers) \
            and not isinstance(current, bool) and not isinstance(wanted, bool):
        return math.isclose(float(current), float(wanted), rel_tol=0.0, abs_tol=1e-9)
    return bool(current == wanted)


def _utc_text_precise(value: datetime) -> str:
    """ISO-8601 UTC with milliseconds (checkpoints must not lose sub-second ordering)."""
    return iso_z(value, millis=True)
