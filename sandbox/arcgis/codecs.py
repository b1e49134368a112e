"""Values on the simulated wire: Web Mercator geometry, GUIDs, field types, request parameters."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from typing import Any

from sandbox.arcgis.errors import EditError, RestError
from sandbox.arcgis.schema import _NUMERIC, DATE, DOUBLE, GLOBALID, GUID, INTEGER, SMALLINT, STRING, FieldDef
from shared.payloads import strict_loads

EARTH_RADIUS = 6378137.0
MAX_MERCATOR_LAT = 85.0511287798
WEB_MERCATOR = {"wkid": 102100, "latestWkid": 3857}
WGS84 = {"wkid": 4326, "latestWkid": 4326}
MERCATOR_WKIDS = frozenset({102100, 3857, 102113, 900913})
_GUID_RE = re.compile(r"^\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?$")


def lonlat_to_mercator(lon: float, lat: float) -> tuple[float, float]:
    """WGS84 degrees -> Web Mercator metres (latitude clamped to the projection's limit)."""
    lat = max(-MAX_MERCATOR_LAT, min(MAX_MERCATOR_LAT, lat))
    x = EARTH_RADIUS * math.radians(lon)
    y = EARTH_RADIUS * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))
    return x, y


def mercator_to_lonlat(x: float, y: float) -> tuple[float, float]:
    """Web Mercator metres -> WGS84 degrees."""
    lon = math.degrees(x / EARTH_RADIUS)
    lat = math.degrees(2 * math.atan(math.exp(y / EARTH_RADIUS)) - math.pi / 2)
    return lon, lat


def _wkid_of(raw: Any) -> int | None:
    """A spatial reference given as a number, '4326', or {"wkid": ...} / {"latestWkid": ...}."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, Mapping):
        value = raw.get("wkid") or raw.get("latestWkid")
        return int(value) if isinstance(value, int | float | str) and str(value).isdigit() else None
    text = str(raw).strip()
    if text.startswith("{"):
        try:
            return _wkid_of(strict_loads(text))
        except ValueError:
            return None
    return int(text) if text.isdigit() else None


def _sr_json(wkid: int) -> dict[str, int]:
    return dict(WGS84) if wkid == 4326 else dict(WEB_MERCATOR)


# ============================================================================================ values


def canonical_guid(value: Any) -> str | None:
    """'{XXXXXXXX-...}' upper case, from a GUID with or without braces in any case; None if not a GUID."""
    if not isinstance(value, str):
        return None
    m = _GUID_RE.match(value.strip())
    return "{" + m.group(1).upper() + "}" if m else None


def _field_kind(f: FieldDef) -> str:
    if f.type in _NUMERIC:
        return "num"
    if f.type == DATE:
        return "date"
    if f.type in (GUID, GLOBALID):
        return "guid"
    return "str"


def _get_ci(attrs: Mapping[str, Any], name: str) -> Any:
    for key, value in attrs.items():
        if key.lower() == name.lower():
            return value
    return None


def _feature_parts(raw: Any) -> tuple[dict[str, Any], Any]:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("attributes", {}), Mapping):
        raise EditError(1000, "Invalid feature: expected {\"attributes\": {...}, \"geometry\": {...}}.")
    return dict(raw.get("attributes") or {}), raw.get("geometry")


def _coerce(f: FieldDef, value: Any) -> Any:
    """Check a value against its field's type, length and coded domain; return it as stored."""
    if value is None:
        return None
    failed = EditError(1016, f"Setting of value for {f.name} failed.")
    kind = f.type
    if kind == STRING:
        if not isinstance(value, str):
            raise failed
        if f.length is not None and len(value) > f.length:
            raise EditError(1016, f"Setting of value for {f.name} failed: {len(value)} characters exceed the "
                                  f"field length {f.length}.")
        out: Any = value
    elif kind in (INTEGER, SMALLINT):
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                (isinstance(value, float) and not value.is_integer()):
            raise failed
        out = int(value)
        if kind == SMALLINT and not -32768 <= out <= 32767:
            raise failed
    elif kind in (DOUBLE, "esriFieldTypeSingle"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise failed
        out = value
    elif kind == DATE:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise failed
        out = int(value)
    elif kind == GUID:
        out = canonical_guid(value)
        if out is None:
            raise failed
    else:
        out = value
    # No domain check: a hosted layer stores a value outside its field's coded-value domain and answers success
    # (Esri/arcgis-python-api#818, AGOL edit_features = applyEdits; Esri technical article 000014410: domains are
    # checked by the editing client's validation, not enforced when the value is written). Clients must check.
    return out


def _bool(p: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = p.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in ("true", "1", "yes")


def _nonneg(p: Mapping[str, str], name: str, default: int) -> int:
    raw = p.get(name, "")
    if raw == "":
        return default
    if not raw.strip().isdigit():
        raise RestError(400, "Unable to complete operation.", [f"Invalid '{name}' parameter."])
    return int(raw)


def _int_list(raw: str, name: str) -> set[int] | None:
    raw = raw.strip()
    if not raw:
        return None
    if raw.startswith("["):
        with contextlib.suppress(ValueError):
            return {int(v) for v in strict_loads(raw)}
        raise RestError(400, "Unable to complete operation.", [f"Invalid '{name}' parameter."])
    parts = [v.strip() for v in raw.split(",") if v.strip()]
    if not all(v.isdigit() for v in parts):
        raise RestError(400, "Unable to complete operation.", [f"Invalid '{name}' parameter."])
    return {int(v) for v in parts}


def _layer_id_list(raw: str) -> list[int] | None:
    ids = _int_list(raw, "layers")
    return sorted(ids) if ids is not None else None


def _json_list(p: Mapping[str, str], name: str) -> list[Any]:
    raw = p.get(name, "").strip()
    if not raw:
        return []
    try:
        value = strict_loads(raw)
    except ValueError as exc:
        raise RestError(400, "Unable to complete operation.", [f"Invalid JSON in '{name}'."]) from exc
    if not isinstance(value, list):
        raise RestError(400, "Unable to complete operation.", [f"'{name}' must be a JSON array."])
    return value


def _out_wkid(p: Mapping[str, str]) -> int:
    wkid = _wkid_of(p.get("outSR")) or 102100
    if wkid != 4326 and wkid not in MERCATOR_WKIDS:
        raise RestError(400, "Unable to complete operation.", [f"Output spatial reference {wkid} is not supported."])
    return 4326 if wkid == 4326 else 102100
