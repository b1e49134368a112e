"""Total date/time codecs: every parse gives an aware UTC datetime within `datetime`'s range, or None."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, time, timedelta
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
#: Epoch milliseconds of 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z, the range a datetime holds.
MIN_EPOCH_MS = (datetime.min.replace(tzinfo=UTC) - EPOCH) // _MS
MAX_EPOCH_MS = (datetime.max.replace(tzinfo=UTC) - EPOCH) // _MS

# `/Date(ms)/`, `/Date(ms+hhmm)/` and their JSON-escaped `\/Date(...)\/` forms (WCF / OData v2). The ms are
# UTC whatever the offset says (the offset only tells the reader's local zone), as in .NET's serializer.
_WCF_DATE_RE = re.compile(r"^\\?/Date\((?P<ms>[+-]?\d{1,30})(?P<offset>[+-]\d{4})?\)\\?/$")
_OFFSET_NO_COLON_RE = re.compile(r"([+-]\d{2})(\d{2})$")
_LONG_FRACTION_RE = re.compile(r"(\.\d{6})\d+")
# The ISO-8601 shapes the systems send: a date, optionally a time, optionally a fraction and an offset.
_ISO_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:[Zz]|[+-]\d{2}(?::?\d{2})?)?)?$"
)


def utc(moment: datetime) -> datetime | None:
    """`moment` in UTC (naive = UTC already); None when the shift by its offset leaves datetime's range."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def from_epoch_ms(value: Any) -> datetime | None:
    """Epoch milliseconds (int, finite float, or integer text) as an aware UTC datetime, exactly for ints.

    None for anything else: bools, NaN/inf, text that is not an integer, and instants outside year 1..9999.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d{1,30}", text):
            return None
        value = int(text)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
    elif not isinstance(value, int):
        return None
    if not MIN_EPOCH_MS <= value <= MAX_EPOCH_MS:
        return None
    try:
        return EPOCH + timedelta(milliseconds=value)
    except (OverflowError, ValueError):
        return None  # a float within a fraction of a millisecond of the edge rounds past it


def to_epoch_ms(moment: datetime) -> int:
    """An aware (or naive = UTC) datetime as whole epoch milliseconds, without float rounding."""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return (aware - EPOCH) // _MS


def parse_wcf_date(value: Any) -> datetime | None:
    """`/Date(ms)/` or `/Date(ms+hhmm)/` (also JSON-escaped) as an aware UTC datetime; None if not one in range."""
    m = _WCF_DATE_RE.match(value) if isinstance(value, str) else None
    return from_epoch_ms(int(m.group("ms"))) if m else None


def is_wcf_date(value: Any) -> bool:
    """Whether `value` has the `/Date(...)/` shape, in range or not."""
    return isinstance(value, str) and _WCF_DATE_RE.match(value) is not None


def parse_iso(value: Any) -> datetime | None:
    """ISO-8601 date or date-time text as an aware UTC datetime; a value without an offset is UTC.

    Accepts `Z`, `+hh:mm` and `+hhmm` (Salesforce) offsets and fractions of any length (F&O sends seven
    digits; the seventh is dropped). None for anything else, including dates out of year 1..9999 before
    or after the shift to UTC.
    """
    if not isinstance(value, str) or not _ISO_RE.match(value):
        return None
    text = value.replace(",", ".")
    if text[-1] in "Zz":
        text = text[:-1] + "+00:00"
    elif ("T" in text or " " in text) and re.search(r"[+-]\d{4}$", text):
        text = _OFFSET_NO_COLON_RE.sub(r"\1:\2", text)
    text = _LONG_FRACTION_RE.sub(r"\1", text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return utc(parsed)


def iso_z(moment: datetime, *, millis: bool = False) -> str:
    """`YYYY-MM-DDTHH:MM:SSZ` (or `.fffZ`) in UTC; four-digit years always (strftime drops zeros below 1000)."""
    aware = utc(moment)
    if aware is None:
        raise ValueError(f"{moment!r} is out of range in UTC")
    text = aware.replace(tzinfo=None).isoformat(timespec="milliseconds" if millis else "seconds")
    return text + "Z"


def parse_duration_time(value: Any) -> time | None:
    """OData v2 `PT12H30M00S` (Edm.Time) or `12:30:00` as a time of day; None if not one (e.g. `PT25H`)."""
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"PT(?:(\d{1,2})H)?(?:(\d{1,2})M)?(?:(\d{1,2})(?:\.\d+)?S)?", value)
    if m is None or value == "PT":
        m = re.fullmatch(r"(\d{2}):(\d{2}):(\d{2})", value)
        if m is None:
            return None
    try:
        return time(int(m.group(1) or 0), int(m.group(2) or 0), int(m.group(3) or 0))
    except ValueError:
        return None
