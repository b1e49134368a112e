"""Named transforms: units, dates, geometry round trips and their error reasons."""

from __future__ import annotations

import pytest

from shared.core.errors import MappingError
from shared.mapping.transforms import (
    TRANSFORMS,
    latlon_from_point,
    lonlat_to_web_mercator,
    point_from_latlon,
    web_mercator_to_lonlat,
)


def t(name, value, **args):
    return TRANSFORMS[name](value, args)


def test_units_round_trip():
    assert t("feet_to_meters", 10) == pytest.approx(3.048)
    assert t("meters_to_feet", 3.048) == pytest.approx(10.0)
    assert t("feet_to_meters", None) is None


def test_dates():
    ms = t("date_to_epoch_ms", "2024-02-29")
    assert ms == 1709164800000
    assert t("epoch_ms_to_date", ms) == "2024-02-29"
    assert t("datetime_to_epoch_ms", "2026-11-23T10:15:00Z") == 1795428900000
    assert t("epoch_ms_to_datetime", 1795428900000) == "2026-11-23T10:15:00Z"
    with pytest.raises(MappingError, match="not a date"):
        t("date_to_epoch_ms", "23/11/2026")


def test_numbers_reject_garbage():
    with pytest.raises(MappingError, match="not a number"):
        t("round", "abc", digits=1)
    with pytest.raises(MappingError, match="fractional"):
        t("integer", 2.5)
    with pytest.raises(MappingError, match="finite"):
        t("round", float("nan"))


def test_web_mercator_round_trip_is_centimetre_exact():
    x, y = lonlat_to_web_mercator(-77.0365, 38.8977)
    lon, lat = web_mercator_to_lonlat(x, y)
    assert (lon, lat) == (pytest.approx(-77.0365, abs=1e-9), pytest.approx(38.8977, abs=1e-9))
    point = point_from_latlon(38.8977, -77.0365, 102100)
    assert point is not None
    assert latlon_from_point(point) == (pytest.approx(38.8977, abs=1e-7), pytest.approx(-77.0365, abs=1e-7))
    wgs84 = point_from_latlon(38.8977, -77.0365, 4326)
    assert wgs84 == {"x": -77.0365, "y": 38.8977, "spatialReference": {"wkid": 4326}}


def test_bad_geometry_is_a_mapping_error():
    with pytest.raises(MappingError, match="both be set"):
        point_from_latlon(38.0, None, 102100)
    with pytest.raises(MappingError, match="out of range"):
        point_from_latlon(95.0, 10.0, 102100)
    with pytest.raises(MappingError, match="unsupported spatial reference"):
        latlon_from_point({"x": 1, "y": 2, "spatialReference": {"wkid": 2927}})
