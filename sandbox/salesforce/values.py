"""Field values as the org checks them on a write (JSON type, length, restricted picklist) and reads them from CSV."""

from __future__ import annotations

import json
import re
from typing import Any

import sandbox.salesforce.schema as schema
from sandbox.salesforce.model import SCHEMAS, SalesforceFault


def ext_key(value: Any) -> str | None:
    """Index key of an External ID value: matching is case-insensitive, and a blank value matches nothing."""
    return None if value in (None, "") else str(value).lower()


def as_number(name: str, value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        raise SalesforceFault(400, "INVALID_TYPE_ON_FIELD_IN_RECORD",
                              f"{name}: value not of required type: {value}", [name]) from None


def _json_type_error(f: schema.SfField, value: Any) -> SalesforceFault:
    kind = {"currency": "double", "int": "int", "double": "double", "boolean": "boolean", "date": "date",
            "datetime": "datetime"}.get(f.type, "String")
    token = "VALUE_STRING" if isinstance(value, str) else "START_OBJECT" if isinstance(value, dict) else \
        "START_ARRAY" if isinstance(value, list) else "VALUE_TRUE" if value is True else \
        "VALUE_FALSE" if value is False else "VALUE_NUMBER"
    return SalesforceFault(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of {kind} from {token} value "
                           f"{value} or request may be missing a required field", [f.name])


def check_value(f: schema.SfField, value: Any) -> None:
    """A value as the org checks it on a write: JSON type, text length, restricted picklist."""
    if value is None:
        return
    if isinstance(value, dict | list):
        raise _json_type_error(f, value)
    if f.type in schema.TEXT_TYPES or f.type in ("id", "reference"):
        text = value if isinstance(value, str) else json.dumps(value)
        if f.length and len(text) > f.length:
            raise SalesforceFault(400, "STRING_TOO_LONG", f"{f.label}: data value too large: {text[:80]} "
                                  f"(max length={f.length})", [f.name])
        if f.restricted and text not in f.picklist:
            raise SalesforceFault(400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                                  f"{f.label}: bad value for restricted picklist field: {text}", [f.name])
    elif f.type in schema.NUMBER_TYPES:
        if isinstance(value, bool):
            raise _json_type_error(f, value)
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                raise _json_type_error(f, value) from None
    else:
        bad_bool = f.type == "boolean" and not isinstance(value, bool)
        bad_date = f.type == "date" and not (isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value))
        if bad_bool or bad_date:
            raise _json_type_error(f, value)


def csv_value(sobject: str, name: str, value: str) -> Any:
    kind = SCHEMAS.get(sobject, {}).get(name)
    if kind == "boolean":
        return value.lower() == "true"
    if kind in ("currency", "double", "int"):
        try:
            return int(value) if kind == "int" else float(value)
        except ValueError:
            return value
    return value

