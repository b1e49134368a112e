"""Value codecs: column coercion, dates, money, comparable forms; attribute lists and query strings."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from sandbox.dataverse.protocol import ODataError, _cannot_convert
from sandbox.dataverse.schema import EDM, TableSchema

_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


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
