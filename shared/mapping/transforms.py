"""Registry of named, pure value transforms (no eval): units, dates, text, numbers, choices and geometry."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from shared.core.dates import from_epoch_ms, iso_z, parse_iso, to_epoch_ms
from shared.core.errors import MappingError

Scalar = str | int | float | bool
Transform = Callable[[Any, Mapping[str, Scalar]], Any]

FEET_PER_METER = 3.280839895013123
EARTH_RADIUS = 6378137.0  # WGS84 semi-major axis used by Web Mercator (EPSG:3857)
MAX_MERCATOR_LAT = 85.05112877980659

TRANSFORMS: dict[str, Transform] = {}


def transform(name: str) -> Callable[[Transform], Transform]:
    """Register a transform under `name` (spec files refer to it by that name)."""

    def register(fn: Transform) -> Transform:
        if name in TRANSFORMS:
            raise ValueError(f"transform {name!r} registered twice")
        TRANSFORMS[name] = fn
        return fn

    return register


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MappingError(f"{what}: expected a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except ValueError as exc:
        raise MappingError(f"{what}: {value!r} is not a number") from exc
    if not math.isfinite(number):
        raise MappingError(f"{what}: {value!r} is not a finite number")
    return number


@transform("copy")
def copy_value(value: Any, args: Mapping[str, Scalar]) -> Any:
    return value


@transform("upper")
def upper(value: Any, args: Mapping[str, Scalar]) -> Any:
    return value.upper() if isinstance(value, str) else value


@transform("lower")
def lower(value: Any, args: Mapping[str, Scalar]) -> Any:
    return value.lower() if isinstance(value, str) else value


@transform("strip")
def strip(value: Any, args: Mapping[str, Scalar]) -> Any:
    return value.strip() if isinstance(value, str) else value


@transform("truncate")
def truncate(value: Any, args: Mapping[str, Scalar]) -> Any:
    length = int(args.get("length", 255))
    return value[:length] if isinstance(value, str) else value


@transform("integer")
def integer(value: Any, args: Mapping[str, Scalar]) -> Any:
    if value is None:
        return None
    number = _number(value, "integer")
    if number != int(number):
        raise MappingError(f"integer: {value!r} has a fractional part")
    return int(number)


@transform("round")
def round_number(value: Any, args: Mapping[str, Scalar]) -> Any:
    if value is None:
        return None
    return round(_number(value, "round"), int(args.get("digits", 0)))


@transform("feet_to_meters")
def feet_to_meters(value: Any, args: Mapping[str, Scalar]) -> Any:
    if value is None:
        return None
    return round(_number(value, "feet_to_meters") / FEET_PER_METER, int(args.get("digits", 3)))


@transform("meters_to_feet")
def meters_to_feet(value: Any, args: Mapping[str, Scalar]) -> Any:
    if value is None:
        return None
    return round(_number(value, "meters_to_feet") * FEET_PER_METER, int(args.get("digits", 2)))


def _parse_datetime(value: str, what: str) -> datetime:
    parsed = parse_iso(value.strip())
    if parsed is None:
        raise MappingError(f"{what}: value {value!r} is not an ISO-8601 date/time in range (years 1-9999)")
    return parsed


def _epoch_ms(value: Any, what: str) -> datetime:
    # Integers go through as they are: a float of a large ms value would lose the last milliseconds.
    exact = isinstance(value, int) and not isinstance(value, bool)
    moment = from_epoch_ms(value if exact else _number(value, what))
    if moment is None:
        raise MappingError(f"{what}: value {value!r} is not a date in range (epoch milliseconds of years 1-9999)")
    return moment


@transform("date_to_epoch_ms")
def date_to_epoch_ms(value: Any, args: Mapping[str, Scalar]) -> Any:
    """'YYYY-MM-DD' (a date-only column) -> midnight UTC in epoch ms (ArcGIS date field)."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise MappingError(f"date_to_epoch_ms: expected 'YYYY-MM-DD', got {value!r}")
    day = parse_iso(value.strip()[:10])
    if day is None:
        raise MappingError(f"date_to_epoch_ms: value {value!r} is not a date in range (YYYY-MM-DD, years 1-9999)")
    return to_epoch_ms(day)


@transform("epoch_ms_to_date")
def epoch_ms_to_date(value: Any, args: Mapping[str, Scalar]) -> Any:
    if value in (None, ""):
        return None
    return _epoch_ms(value, "epoch_ms_to_date").date().isoformat()


@transform("datetime_to_epoch_ms")
def datetime_to_epoch_ms(value: Any, args: Mapping[str, Scalar]) -> Any:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise MappingError(f"datetime_to_epoch_ms: expected an ISO-8601 string, got {value!r}")
    return to_epoch_ms(_parse_datetime(value, "datetime_to_epoch_ms"))


@transform("epoch_ms_to_datetime")
def epoch_ms_to_datetime(value: Any, args: Mapping[str, Scalar]) -> Any:
    if value in (None, ""):
        return None
    return iso_z(_epoch_ms(value, "epoch_ms_to_datetime"))


@transform("choice")
def choice(value: Any, args: Mapping[str, Scalar]) -> Any:
    # Translation itself needs the spec's value map; the engine resolves it (see mapping.engine).
    raise MappingError("choice transform must be applied by the mapping engine with a value map")


# ------------------------------------------------------------------------------------------- geometry


def lonlat_to_web_mercator(lon: float, lat: float) -> tuple[float, float]:
    """WGS84 degrees -> Web Mercator metres (EPSG:3857 / wkid 102100)."""
    if not -180.0 <= lon <= 180.0 or not -90.0 <= lat <= 90.0:
        raise MappingError(f"coordinates out of range: longitude {lon}, latitude {lat}")
    lat = max(-MAX_MERCATOR_LAT, min(MAX_MERCATOR_LAT, lat))
    x = math.radians(lon) * EARTH_RADIUS
    y = math.log(math.tan(math.pi / 4 + math.radians(lat) / 2)) * EARTH_RADIUS
    return x, y


def web_mercator_to_lonlat(x: float, y: float) -> tuple[float, float]:
    """Web Mercator metres -> WGS84 degrees."""
    lon = math.degrees(x / EARTH_RADIUS)
    lat = math.degrees(2 * math.atan(math.exp(y / EARTH_RADIUS)) - math.pi / 2)
    return lon, lat


def point_from_latlon(lat: Any, lon: Any, wkid: int) -> dict[str, Any] | None:
    """Latitude/longitude columns -> an ArcGIS point geometry in `wkid` (4326 or 102100/3857)."""
    if lat in (None, "") and lon in (None, ""):
        return None
    if lat in (None, "") or lon in (None, ""):
        raise MappingError(f"geometry: latitude {lat!r} and longitude {lon!r} must both be set")
    flat, flon = _number(lat, "latitude"), _number(lon, "longitude")
    if wkid == 4326:
        if not -180.0 <= flon <= 180.0 or not -90.0 <= flat <= 90.0:
            raise MappingError(f"coordinates out of range: longitude {flon}, latitude {flat}")
        return {"x": round(flon, 8), "y": round(flat, 8), "spatialReference": {"wkid": 4326}}
    if wkid in (102100, 3857):
        x, y = lonlat_to_web_mercator(flon, flat)
        return {"x": round(x, 3), "y": round(y, 3), "spatialReference": {"wkid": 102100, "latestWkid": 3857}}
    raise MappingError(f"geometry: unsupported spatial reference wkid {wkid}")


def latlon_from_point(geometry: Any) -> tuple[float, float] | None:
    """An ArcGIS point geometry (4326 or 102100) -> (latitude, longitude) rounded to 7 places (~1 cm)."""
    if geometry is None:
        return None
    if not isinstance(geometry, Mapping) or "x" not in geometry or "y" not in geometry:
        raise MappingError(f"geometry: expected a point with x and y, got {geometry!r}")
    x, y = _number(geometry["x"], "geometry.x"), _number(geometry["y"], "geometry.y")
    sr = geometry.get("spatialReference") or {}
    wkid = sr.get("latestWkid") or sr.get("wkid") or 102100
    if wkid == 4326:
        lon, lat = x, y
    elif wkid in (102100, 3857, 102113):
        lon, lat = web_mercator_to_lonlat(x, y)
    else:
        raise MappingError(f"geometry: unsupported spatial reference wkid {wkid}")
    return round(lat, 7), round(lon, 7)
