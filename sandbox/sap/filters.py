"""OData v2 $filter: literals, the parser on the shared grammar (sandbox.odata), evaluation on stored rows."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from sandbox.odata import DescentParser, Tok, compare, scan, walk
from sandbox.sap.codecs import _parse_iso, _parse_time
from sandbox.sap.gateway import _bad
from sandbox.sap.schema import (
    DEC,
    ENTITIES,
    TYPES,
)

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<typed>(?P<tname>datetimeoffset|datetime|time|guid)'(?P<tval>[^']*)')
  | (?P<string>'(?:[^']|'')*')
  | (?P<decimal>-?\d+(?:\.\d+)?[mM])
  | (?P<number>-?\d+(?:\.\d+)?(?:[dDfFlL])?)
  | (?P<paren>[()])
  | (?P<ident>[A-Za-z_]\w*)
""", re.VERBOSE)
def tokenize(text: str) -> list[Tok]:
    """Tokens of an OData v2 $filter (a syntax error is a Gateway 400)."""
    out: list[Tok] = []

    def syntax_error(pos: int) -> Exception:
        return _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{text}' (syntax error at position {pos})")

    for m in scan(_TOKEN_RE, text, syntax_error):
        kind = m.lastgroup or ""
        raw = m.group(0)
        if m.group("typed"):
            tname, tval = m.group("tname"), m.group("tval")
            try:
                value: Any = (_parse_iso(tval) if tname in ("datetime", "datetimeoffset")
                              else _parse_time(tval) if tname == "time" else tval)
            except ValueError:
                raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid {tname} literal '{tval}' in filter '{text}'") from None
            out.append(Tok("lit", raw, value))
        elif kind == "string":
            out.append(Tok("lit", raw, raw[1:-1].replace("''", "'")))
        elif kind == "decimal":
            out.append(Tok("lit", raw, Decimal(raw[:-1])))
        elif kind == "number":
            body = raw.rstrip("dDfFlL")
            out.append(Tok("lit", raw, Decimal(body)))
        elif kind == "ident" and raw in ("true", "false", "null"):
            out.append(Tok("lit", raw, {"true": True, "false": False, "null": None}[raw]))
        else:
            out.append(Tok(kind, raw))
    return out


_SYNTAX = {"end": "unexpected end", "paren": "')' expected"}


class FilterParser(DescentParser):
    """The shared grammar with OData v2 literals, the entity's properties and the Gateway's error texts."""

    def __init__(self, text: str, entity: str) -> None:
        super().__init__(text, tokenize(text))
        self.entity = entity
        self.fields = set(ENTITIES[entity].fields)

    def error(self, what: str, tok: Tok | None) -> Exception:
        if what == "unexpected":
            detail = f"unexpected '{tok.text if tok else ''}'"
        elif what == "operator":
            detail = f"operator expected, got '{tok.text if tok else ''}'"
        else:
            detail = _SYNTAX[what]
        return _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{self.text}' ({detail})")

    def operand(self) -> tuple[Any, ...]:
        tok = self.take()
        if tok.kind == "ident":
            if tok.text not in self.fields:
                raise _bad("/IWBEP/CM_MGW_RT/022", f"Property '{tok.text}' not found in type "
                                                   f"'{ENTITIES[self.entity].type_name}'")
            return ("field", tok.text)
        if tok.kind == "lit":
            return ("lit", tok.value)
        raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{self.text}' (operand expected, "
                                           f"got '{tok.text}')")


def _comparable(name: str | None, value: Any) -> Any:
    if value is None:
        return None
    kind = TYPES.get(name or "")
    if kind == DEC or isinstance(value, Decimal):
        try:
            return Decimal(str(value))
        except InvalidOperation:
            return str(value)
    return value


def _any_of(node: tuple[Any, ...]) -> tuple[str, set[Any]] | None:
    """(field, values) when the filter is `F eq v1 or F eq v2 ...` on one field (no nulls), else None."""
    if node[0] == "or":
        left, right = _any_of(node[1]), _any_of(node[2])
        if left is None or right is None or left[0] != right[0]:
            return None
        return left[0], left[1] | right[1]
    if node[0] != "cmp" or node[1] != "eq":
        return None
    sides = {node[2][0]: node[2][1], node[3][0]: node[3][1]}
    if set(sides) != {"field", "lit"} or sides["lit"] is None or isinstance(sides["lit"], datetime):
        return None
    name = str(sides["field"])
    try:
        return name, {_comparable(name, sides["lit"])}
    except TypeError:
        return None


def evaluate(node: tuple[Any, ...], row: Mapping[str, Any]) -> bool:
    """Evaluate a parsed filter on a stored row (ABAP compares strings case-sensitively)."""
    return walk(node, row, _compare)


def _compare(node: tuple[Any, ...], row: Mapping[str, Any]) -> bool:
    _, op, left_node, right_node = node
    name = left_node[1] if left_node[0] == "field" else right_node[1] if right_node[0] == "field" else None

    def value_of(n: tuple[Any, ...]) -> Any:
        return _comparable(name, row.get(n[1]) if n[0] == "field" else n[1])

    left, right = value_of(left_node), value_of(right_node)
    if isinstance(left, datetime) and isinstance(right, datetime):
        left, right = left.astimezone(UTC), right.astimezone(UTC)
    return compare(op, left, right)
