"""Wire forms of values (dates, times, decimals), JSON answers, key literals and resource paths."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, time
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from starlette.responses import Response

from sandbox.sap.gateway import GatewayError, _bad
from sandbox.sap.schema import (
    BOOL,
    DEC,
    DT,
    DTO,
    ENTITIES,
    MAX_LENGTHS,
    SCALES,
    TM,
    TYPES,
)

_DATE_RE = re.compile(r"^/Date\((?P<ms>-?\d+)(?P<off>[+-]\d{4})?\)/$")
_TIME_RE = re.compile(r"^PT(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+)(?:\.\d+)?S)?$")


def _parse_iso(text: str) -> datetime:
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.strip()).replace("Z", "+00:00")
    value = datetime.fromisoformat(text)
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _parse_time(text: str) -> time:
    m = _TIME_RE.match(text)
    if m is None or text == "PT":
        raise ValueError(text)
    return time(int(m.group("h") or 0), int(m.group("m") or 0), int(m.group("s") or 0))


def to_wire(name: str, value: Any) -> Any:
    """A stored value as OData v2 JSON shows it."""
    kind = TYPES.get(name)
    if value is None:
        return None
    if kind in (DT, DTO) and isinstance(value, datetime):
        ms = int(value.timestamp() * 1000)
        return f"/Date({ms}+0000)/" if kind == DTO else f"/Date({ms})/"
    if kind == TM and isinstance(value, time):
        return f"PT{value.hour:02d}H{value.minute:02d}M{value.second:02d}S"
    return value


def _decimal_text(name: str, value: Decimal) -> str:
    return str(value.quantize(Decimal(1).scaleb(-SCALES.get(name, 3)), rounding=ROUND_HALF_UP))


def from_wire(entity: str, name: str, raw: Any) -> Any:
    """A client's JSON value as stored; a value of the wrong Edm type is a Gateway 400."""
    kind = TYPES.get(name)
    etype = ENTITIES[entity].type_name
    if raw is None:
        return None

    def wrong(expected: str) -> GatewayError:
        return _bad("/IWBEP/CM_MGW_RT/013", f"Invalid value '{raw}' for property '{name}' of type '{etype}': "
                                            f"{expected} expected", target=name)

    if kind in (DT, DTO):
        if not isinstance(raw, str):
            raise wrong("an Edm.DateTime string like '/Date(1767225600000)/'")
        m = _DATE_RE.match(raw)
        try:
            return datetime.fromtimestamp(int(m.group("ms")) / 1000, tz=UTC) if m else _parse_iso(raw)
        except ValueError:
            raise wrong("'/Date(ms)/' or ISO 8601") from None
    if kind == TM:
        try:
            return _parse_time(str(raw))
        except ValueError:
            raise wrong("an Edm.Time like 'PT14H30M00S'") from None
    if kind == DEC:
        # OData v2 JSON carries Edm.Decimal as a string; Gateway refuses a JSON number.
        if not isinstance(raw, str):
            raise wrong("Edm.Decimal as a JSON string (e.g. \"2\")")
        try:
            return _decimal_text(name, Decimal(raw))
        except InvalidOperation:
            raise wrong("a decimal number") from None
    if kind == BOOL:
        if not isinstance(raw, bool):
            raise wrong("true or false")
        return raw
    if not isinstance(raw, str):
        raise wrong("Edm.String")
    limit = MAX_LENGTHS.get((entity, name))
    if limit is not None and len(raw) > limit:
        # The Gateway checks a string against the property's MaxLength while reading the payload (SAP KBA
        # 3642265: "Property '&1' at offset '&2' has invalid value '&3'"), before the backend sees it.
        raise _bad("/IWBEP/CM_MGW_RT/013", f"Property '{name}' has invalid value '{raw}': longer than its "
                                           f"MaxLength {limit} in type '{etype}'", target=name)
    return raw


def _json_text(payload: Any) -> bytes:
    # Gateway writes dates as "\/Date(...)\/" (JSON's optional solidus escape); clients must decode JSON properly.
    text = json.dumps(payload, separators=(",", ":")).replace('"/Date(', '"\\/Date(').replace(')/"', ')\\/"')
    return text.encode()


def _json_response(payload: Any, status: int, headers: Mapping[str, str]) -> Response:
    return Response(_json_text(payload), status_code=status, headers=dict(headers), media_type="application/json")


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _key_literal(value: Any) -> str:
    if isinstance(value, datetime):
        return f"datetime'{value.strftime('%Y-%m-%dT%H:%M:%S')}'"
    return _literal(str(value))


def _select(query: Mapping[str, str]) -> list[str] | None:
    text = query.get("$select")
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _expand(query: Mapping[str, str]) -> set[str]:
    return {s.strip() for s in query.get("$expand", "").split(",") if s.strip()}


def _sort_key(entity: str, row: Mapping[str, Any]) -> tuple[Any, ...]:
    out: list[Any] = []
    for name in ENTITIES[entity].keys:
        value = str(row.get(name) or "")
        out.append((0, int(value), "") if value.isdigit() else (1, 0, value))
    return tuple(out)


_SEGMENT_RE = re.compile(r"^(?P<set>[A-Za-z_]\w*)(?P<pred>\(.*\))?(?:/(?P<nav>[A-Za-z_]\w*))?/?$")


def _parse_resource(rest: str) -> tuple[str, dict[str | None, str] | None, str | None]:
    """`A_SalesOrder('1')/to_Item` -> ("A_SalesOrder", {None: "1"}, "to_Item"); named keys keep their names."""
    m = _SEGMENT_RE.match(rest)
    if m is None:
        raise GatewayError(404, "/IWBEP/CM_MGW_RT/021", f"Resource not found for segment '{rest}'")
    pred = m.group("pred")
    if pred is None:
        return m.group("set"), None, m.group("nav")
    inner = pred[1:-1]
    key: dict[str | None, str] = {}
    pos = 0
    while pos < len(inner):
        name_m = re.match(r"([A-Za-z_]\w*)=", inner[pos:])
        name: str | None = None
        if name_m:
            name = name_m.group(1)
            pos += name_m.end()
        lit = re.match(r"'((?:[^']|'')*)'", inner[pos:])
        if lit is None:
            raise _bad("/IWBEP/CM_MGW_RT/020", f"Invalid key predicate '{pred}': string literals in quotes expected")
        key[name] = lit.group(1).replace("''", "'")
        pos += lit.end()
        if pos < len(inner):
            if inner[pos] != ",":
                raise _bad("/IWBEP/CM_MGW_RT/020", f"Invalid key predicate '{pred}'")
            pos += 1
    if None in key and len(key) > 1:
        raise _bad("/IWBEP/CM_MGW_RT/020", f"Invalid key predicate '{pred}'")
    return m.group("set"), key, m.group("nav")
