"""Date codecs and date transforms: any text or number gives a datetime in range or the documented error."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.core.dates import (
    MAX_EPOCH_MS,
    MIN_EPOCH_MS,
    from_epoch_ms,
    iso_z,
    parse_duration_time,
    parse_iso,
    parse_wcf_date,
    to_epoch_ms,
)
from shared.core.errors import MappingError
from shared.mapping.transforms import TRANSFORMS

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DATE_TRANSFORMS = ("date_to_epoch_ms", "epoch_ms_to_date", "datetime_to_epoch_ms", "epoch_ms_to_datetime")

# Text shaped like the dates systems send, with every part allowed out of range (year 0, 99999, month 13,
# offsets that push the instant past year 1 or 9999), plus arbitrary text.
_iso_like = st.builds(
    lambda y, mo, d, h, mi, s, frac, off: f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}{off}",
    st.integers(0, 99999), st.integers(0, 13), st.integers(0, 32), st.integers(0, 25), st.integers(0, 61),
    st.integers(0, 61), st.sampled_from(["", ".1", ".123", ".1234567", ".000000000001"]),
    st.sampled_from(["", "Z", "+00:00", "+0000", "+01:00", "-01:00", "+14:00", "-1400", "+99:99", "+05"]),
)
_wcf_like = st.builds(lambda ms, off: f"/Date({ms}{off})/", st.integers(-(10**20), 10**20),
                      st.sampled_from(["", "+0000", "-0700", "+9999"]))
_texts = st.one_of(_iso_like, _wcf_like, st.text(max_size=40),
                   st.sampled_from(["", "not a date", "0000-01-01", "99999-01-01", "/Date(99999999999999999)/",
                                    "/Date(-99999999999999999)/", "\ud800", "2026-13-01", "PT25H", "PT99M",
                                    "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"]))
_numbers = st.one_of(st.integers(min_value=-(10**40), max_value=10**40), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([1e30, -1e30, MAX_EPOCH_MS, MAX_EPOCH_MS + 1, MIN_EPOCH_MS, MIN_EPOCH_MS - 1]))
_anything = st.one_of(_texts, _numbers, st.none(), st.booleans(), st.lists(st.integers(), max_size=2),
                      st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _in_range_utc(moment: Any) -> bool:
    return isinstance(moment, datetime) and moment.tzinfo is not None and moment.utcoffset() == timedelta(0)


# --------------------------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("value", [
    "0000-01-01", "99999-01-01T00:00:00Z", "2026-13-01", "not a date", "", "\ud800", "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00", 20260101, None,
])
def test_parse_iso_gives_none_for_what_is_not_an_iso_date_in_range(value: Any) -> None:
    assert parse_iso(value) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-01-01T00:00:00.000+0000", datetime(2026, 1, 1, tzinfo=UTC)),  # Salesforce REST
    ("2023-10-16T15:42:46.3440655Z", datetime(2023, 10, 16, 15, 42, 46, 344065, tzinfo=UTC)),  # F&O, 7 digits
    ("2026-01-01T01:00:00+01:00", datetime(2026, 1, 1, tzinfo=UTC)),
    ("2026-01-01", datetime(2026, 1, 1, tzinfo=UTC)),
    ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
    ("9999-12-31T23:59:59Z", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
])
def test_parse_iso_reads_every_system_s_forms_as_utc(text: str, expected: datetime) -> None:
    assert parse_iso(text) == expected
    assert _in_range_utc(parse_iso(text))


@pytest.mark.parametrize("value", [
    MAX_EPOCH_MS + 1, MIN_EPOCH_MS - 1, 99999999999999999, -99999999999999999, 1e30, -1e30, float("nan"),
    float("inf"), True, "12x", "", None, [1],
])
def test_from_epoch_ms_gives_none_out_of_range(value: Any) -> None:
    assert from_epoch_ms(value) is None


def test_epoch_ms_edges_and_exactness() -> None:
    assert from_epoch_ms(MIN_EPOCH_MS) == datetime(1, 1, 1, tzinfo=UTC)
    assert from_epoch_ms(MAX_EPOCH_MS) == datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    assert from_epoch_ms(1795428900123) == datetime(2026, 11, 23, 10, 15, 0, 123000, tzinfo=UTC)
    assert from_epoch_ms("1795428900123") == datetime(2026, 11, 23, 10, 15, 0, 123000, tzinfo=UTC)
    assert to_epoch_ms(datetime(2026, 11, 23, 10, 15, 0, 123000, tzinfo=UTC)) == 1795428900123


@pytest.mark.parametrize(("text", "expected"), [
    ("/Date(1697470966000)/", datetime(2023, 10, 16, 15, 42, 46, tzinfo=UTC)),
    ("/Date(1506409448000-0700)/", datetime(2017, 9, 26, 7, 4, 8, tzinfo=UTC)),
    ("\\/Date(0+0000)\\/", datetime(1970, 1, 1, tzinfo=UTC)),
    ("/Date(99999999999999999)/", None),
    ("/Date(-99999999999999999)/", None),
    ("/Date(" + "9" * 5000 + ")/", None),  # int() of 5,000 digits would raise
    ("/Date(soon)/", None),
])
def test_parse_wcf_date(text: str, expected: datetime | None) -> None:
    assert parse_wcf_date(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("PT12H30M00S", time(12, 30)), ("PT00H00M05S", time(0, 0, 5)), ("14:30:05", time(14, 30, 5)),
    ("PT25H", None), ("PT12H99M", None), ("PT", None), ("25:00:00", None), ("PT123456789012345678901H", None),
])
def test_parse_duration_time(text: str, expected: time | None) -> None:
    assert parse_duration_time(text) == expected


def test_iso_z_keeps_four_digit_years() -> None:
    assert iso_z(datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01T00:00:00Z"
    assert iso_z(datetime(2026, 1, 5, 14, 30, 5, 123456, tzinfo=UTC), millis=True) == "2026-01-05T14:30:05.123Z"


@PROPERTY
@given(_anything)
def test_every_codec_gives_a_utc_datetime_in_range_or_none(value: Any) -> None:
    for codec in (parse_iso, from_epoch_ms, parse_wcf_date):
        result = codec(value)
        assert result is None or _in_range_utc(result), (codec.__name__, value, result)
        if result is not None:
            assert iso_z(result).endswith("Z")  # and it can be written back
    assert parse_duration_time(value) is None or isinstance(parse_duration_time(value), time)


# ----------------------------------------------------------------------------------------- transforms


def t(name: str, value: Any) -> Any:
    return TRANSFORMS[name](value, {})


@pytest.mark.parametrize(("name", "value"), [
    ("date_to_epoch_ms", "0000-01-01"),
    ("date_to_epoch_ms", "99999-01-01"),
    ("date_to_epoch_ms", "/Date(99999999999999999)/"),
    ("date_to_epoch_ms", "not a date"),
    ("datetime_to_epoch_ms", "0001-01-01T00:00:00+01:00"),  # OverflowError before: year 0 once in UTC
    ("datetime_to_epoch_ms", "9999-12-31T23:30:00-01:00"),  # OverflowError before: year 10000 in UTC
    ("datetime_to_epoch_ms", "99999-01-01T00:00:00Z"),
    ("datetime_to_epoch_ms", "\ud800"),
    ("epoch_ms_to_date", 99999999999999999),
    ("epoch_ms_to_date", 1e30),
    ("epoch_ms_to_date", "not a date"),
    ("epoch_ms_to_datetime", -1e30),
    ("epoch_ms_to_datetime", float("nan")),
    ("epoch_ms_to_datetime", MAX_EPOCH_MS + 1),
])
def test_date_transforms_refuse_out_of_range_values_with_a_mapping_error(name: str, value: Any) -> None:
    with pytest.raises(MappingError) as err:
        t(name, value)
    assert err.value.reason == "MAPPING_FAILED"
    assert name in err.value.detail
    assert "not" in err.value.detail
    assert repr(value)[:20] in err.value.detail


def test_date_transforms_at_the_edges_of_the_range() -> None:
    assert t("epoch_ms_to_datetime", MIN_EPOCH_MS) == "0001-01-01T00:00:00Z"  # was "1-01-01T00:00:00Z"
    assert t("epoch_ms_to_date", MAX_EPOCH_MS) == "9999-12-31"
    assert t("datetime_to_epoch_ms", "0001-01-01T00:00:00Z") == MIN_EPOCH_MS
    assert t("date_to_epoch_ms", "9999-12-31") == MAX_EPOCH_MS - 86_399_999
    assert t("datetime_to_epoch_ms", "2026-01-01T00:00:00.000+0000") == 1767225600000


@PROPERTY
@given(_anything)
def test_date_transforms_return_a_value_or_raise_a_mapping_error_only(value: Any) -> None:
    for name in DATE_TRANSFORMS:
        try:
            result = t(name, value)
        except MappingError:
            continue
        if value in (None, ""):
            assert result is None
        elif name.endswith("epoch_ms"):
            assert isinstance(result, int)
            assert MIN_EPOCH_MS <= result <= MAX_EPOCH_MS
        else:
            assert isinstance(result, str)
            assert parse_iso(result) is not None
