"""ArcGIS values on the wire: GUIDs, epoch-millisecond dates, where-clause literals, geometry, attachment names."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from shared.connectors.arcgis.schema import FieldInfo, LayerInfo
from shared.core.dates import from_epoch_ms
from shared.core.errors import MappingError
from shared.core.ports import Attachment, AttachmentRef

SYSTEM = "arcgis"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_GUID_RE = re.compile(r"^\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?$")


def canonical_guid(value: Any) -> str | None:
    """A GlobalID/GUID as Syncline keeps it, `{XXXXXXXX-XXXX-...}` upper case; None if `value` is not a GUID."""
    if not isinstance(value, str):
        return None
    m = _GUID_RE.match(value.strip())
    return "{" + m.group(1).upper() + "}" if m else None


def epoch_ms_to_datetime(ms: int | float) -> datetime | None:
    """ArcGIS date (epoch milliseconds, UTC) -> aware datetime, without float rounding; None if out of range.

    A feature whose edit date is out of range keeps its raw value and `modified=None`: its page still reads.
    """
    return from_epoch_ms(int(ms) if isinstance(ms, float) and math.isfinite(ms) else ms)


def _datetime_to_ms(value: datetime | date) -> int:
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return (aware - _EPOCH) // timedelta(milliseconds=1)
    return (datetime(value.year, value.month, value.day, tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)


def _timestamp_literal(ms: int) -> str:
    moment = epoch_ms_to_datetime(ms)
    if moment is None:
        raise MappingError(f"arcgis: {ms} is not a date in range (epoch milliseconds of years 1-9999)")
    return f"TIMESTAMP '{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d}'"


def where_literal(f: FieldInfo, value: Any, layer: LayerInfo) -> str:
    """A where-clause literal for `value` compared with field `f`: escaped, typed, never raw text."""
    where = f"{layer.name}.{f.name}"
    kind = f.kind
    if kind == "num":
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float) and math.isfinite(value):
            return repr(value)
        raise MappingError(f"arcgis: {where} is numeric; {value!r} cannot be used in a query")
    if kind == "date":
        if isinstance(value, datetime | date):
            return _timestamp_literal(_datetime_to_ms(value))
        if isinstance(value, int) and not isinstance(value, bool):
            return _timestamp_literal(value)
        raise MappingError(f"arcgis: {where} is a date; {value!r} is neither a datetime nor epoch ms")
    if kind == "guid":
        guid = canonical_guid(value)
        if guid is None:
            raise MappingError(f"arcgis: {where} holds GUIDs; {value!r} is not a GUID")
        return f"'{guid}'"
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise MappingError(f"arcgis: {where} is text; {value!r} cannot be used in a query")
    text = str(value)
    if "\x00" in text:
        raise MappingError(f"arcgis: {where}: a NUL character cannot be used in a query")
    return "'" + text.replace("'", "''") + "'"


def repr_guid(guid: str) -> str:
    """A canonical GUID as a where-clause literal."""
    return f"'{guid}'"


def attachment_file_name(att: Attachment) -> str:
    """`<source_id>__<name>`: the source id in the uploaded name makes re-sending an attachment idempotent."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", str(att.source_id))[:64]
    name = re.sub(r"[\\/:*?\"<>|\x00-\x1f]", "_", att.name).strip() or "attachment"
    return name if name.startswith(f"{prefix}__") else f"{prefix}__{name}"


def _canonical_value(f: FieldInfo | None, value: Any) -> Any:
    if f is None or value is None:
        return value
    if f.kind == "guid":
        return canonical_guid(value) or value
    if f.kind == "date" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _geometry_value(geometry: Any, sr: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(geometry, Mapping):
        return None
    x, y = geometry.get("x"), geometry.get("y")
    if not isinstance(x, int | float) or not isinstance(y, int | float) or math.isnan(x) or math.isnan(y):
        return None  # null / empty point ("NaN" from some servers)
    ref = geometry.get("spatialReference") or sr or {}
    return {"x": float(x), "y": float(y), "spatialReference": dict(ref)}


def _wire_value(f: FieldInfo, value: Any, layer: LayerInfo) -> Any:
    """A canonical value as applyEdits wants it (dates in epoch ms, GUIDs braced upper case)."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        raise MappingError(f"arcgis: {layer.name}.{f.name}: {value!r} is not a number ArcGIS can store")
    if f.kind == "date":
        if isinstance(value, datetime | date):
            return _datetime_to_ms(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
        raise MappingError(f"arcgis: {layer.name}.{f.name} is a date: expected epoch ms or a datetime, "
                           f"got {value!r}")
    if f.kind == "guid":
        guid = canonical_guid(value)
        if guid is None:
            raise MappingError(f"arcgis: {layer.name}.{f.name} holds GUIDs: {value!r} is not one")
        return guid
    _check_domain(f, value, layer)
    return value


def _check_domain(f: FieldInfo, value: Any, layer: LayerInfo) -> None:
    """Refuse a value outside the field's coded-value domain: the hosted layer itself would store it as is.

    applyEdits does not enforce domains (Esri/arcgis-python-api#818; Esri technical article 000014410), so a
    wrong code would reach every map and form as an unlabelled value; here it dead-letters with the field named.
    """
    if not f.domain or f.domain.get("type") != "codedValue":
        return
    codes = [c.get("code") for c in f.domain.get("codedValues") or [] if isinstance(c, Mapping)]
    if any(value == code and isinstance(value, str) == isinstance(code, str) for code in codes):
        return
    shown = ", ".join(repr(c) for c in codes[:12]) + (", ..." if len(codes) > 12 else "")
    raise MappingError(f"arcgis: {layer.name}.{f.name}: {value!r} is not a code of the field's domain "
                       f"'{f.domain.get('name')}' ({shown}); the layer would store it unlabelled: map it in the "
                       "flow's value_maps")


def _attachment_ref(info: Mapping[str, Any]) -> AttachmentRef:
    return AttachmentRef(str(info.get("id")), str(info.get("name") or info.get("id")),
                         str(info.get("contentType") or "application/octet-stream"), int(info.get("size") or 0))


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
