"""OData v4 $filter as F&O reads it: literals, the parser on the shared grammar (sandbox.odata), evaluation."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sandbox.fno.odata import ODataError
from sandbox.odata import DescentParser, Tok, compare, scan, walk

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<enum>Microsoft\.Dynamics\.DataEntities\.(?P<etype>[A-Za-z_]\w*)'(?P<emember>[A-Za-z_]\w*)')
  | (?P<string>'(?:[^']|'')*')
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<paren>[()])
  | (?P<punct>[,=])
  | (?P<ident>[A-Za-z_]\w*)
""", re.VERBOSE)


def _parse_dt(text: str) -> datetime:
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def tokenize(text: str) -> list[Tok]:
    """Tokens of a $filter expression (a syntax error is an ODataError 400)."""
    out: list[Tok] = []
    for m in scan(_TOKEN_RE, text, lambda pos: ODataError(400, f"Syntax error at position {pos} in '{text}'.")):
        kind = m.lastgroup or ""
        raw = m.group(0)
        if kind in ("etype", "emember"):
            kind = "enum"
        if kind == "enum":
            out.append(Tok("enum", raw, (m.group("etype"), m.group("emember"))))
        elif kind == "string":
            out.append(Tok("string", raw, raw[1:-1].replace("''", "'")))
        elif kind == "datetime":
            out.append(Tok("datetime", raw, _parse_dt(raw)))
        elif kind == "number":
            out.append(Tok("number", raw, float(raw) if "." in raw else int(raw)))
        elif kind == "ident" and raw in ("true", "false", "null"):
            out.append(Tok("literal", raw, {"true": True, "false": False, "null": None}[raw]))
        else:
            out.append(Tok(kind, raw))
    return out


class FilterParser(DescentParser):
    """The shared grammar with F&O's literals (enums, untyped datetimes), the entity's fields and error texts."""

    def __init__(self, text: str, fields: Iterable[str], entity: str) -> None:
        super().__init__(text, tokenize(text))
        self.fields = set(fields)
        self.entity = entity

    def error(self, what: str, tok: Tok | None) -> Exception:
        text = tok.text if tok else ""
        return ODataError(400, {
            "end": f"Unexpected end of $filter '{self.text}'.",
            "unexpected": f"Syntax error: unexpected '{text}' in '{self.text}'.",
            "paren": f"Syntax error: ')' expected in '{self.text}'.",
            "operator": f"Syntax error: comparison operator expected, got '{text}' in '{self.text}'.",
        }[what])

    def operand(self) -> tuple[Any, ...]:
        tok = self.take()
        if tok.kind == "ident":
            if tok.text not in self.fields:
                raise ODataError(400, f"Could not find a property named '{tok.text}' on type "
                                      f"'Microsoft.Dynamics.DataEntities.{self.entity}'.")
            return ("field", tok.text)
        if tok.kind in ("string", "number", "datetime", "literal", "enum"):
            return ("lit", tok.kind, tok.value)
        raise ODataError(400, f"Syntax error: operand expected, got '{tok.text}' in '{self.text}'.")


def _value(node: tuple[Any, ...], row: Mapping[str, Any], other: tuple[Any, ...]) -> Any:
    if node[0] == "field":
        value = row.get(node[1])
        if other[0] == "lit" and other[1] == "datetime" and isinstance(value, str):
            return _parse_dt(value)
        return value.lower() if isinstance(value, str) else value
    kind, value = node[1], node[2]
    if kind == "enum":
        return str(value[1]).lower()
    return value.lower() if isinstance(value, str) else value


def evaluate(node: tuple[Any, ...], row: Mapping[str, Any]) -> bool:
    """Evaluate a parsed filter against a row (strings compare case-insensitively, like SQL Server)."""
    return walk(node, row, _compare)


def _compare(node: tuple[Any, ...], row: Mapping[str, Any]) -> bool:
    _, op, left_node, right_node = node
    left, right = _value(left_node, row, right_node), _value(right_node, row, left_node)
    if op == "eq" and isinstance(left, str) and isinstance(right, str) and "*" in right:
        return re.fullmatch(".*".join(re.escape(p) for p in right.split("*")), left) is not None
    return compare(op, left, right)
