"""OData v4 $filter as F&O reads it: tokenizer, recursive-descent parser, case-insensitive evaluation."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sandbox.fno.odata import ODataError

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
_COMPARE = {"eq", "ne", "gt", "ge", "lt", "le"}


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    value: Any = None


def _parse_dt(text: str) -> datetime:
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def tokenize(text: str) -> list[_Tok]:
    """Tokens of a $filter expression (a syntax error is an ODataError 400)."""
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ODataError(400, f"Syntax error at position {pos} in '{text}'.")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind == "ws":
            continue
        raw = m.group(0)
        if kind in ("etype", "emember"):
            kind = "enum"
        if kind == "enum":
            out.append(_Tok("enum", raw, (m.group("etype"), m.group("emember"))))
        elif kind == "string":
            out.append(_Tok("string", raw, raw[1:-1].replace("''", "'")))
        elif kind == "datetime":
            out.append(_Tok("datetime", raw, _parse_dt(raw)))
        elif kind == "number":
            out.append(_Tok("number", raw, float(raw) if "." in raw else int(raw)))
        elif kind == "ident" and raw in ("true", "false", "null"):
            out.append(_Tok("literal", raw, {"true": True, "false": False, "null": None}[raw]))
        else:
            out.append(_Tok(kind, raw))
    return out


class FilterParser:
    """Recursive descent: or > and > not > comparison | (expr). Produces a tuple AST; never evaluates text."""

    def __init__(self, text: str, fields: Iterable[str], entity: str) -> None:
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.fields = set(fields)
        self.entity = entity

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise ODataError(400, f"Unexpected end of $filter '{self.text}'.")
        self.i += 1
        return tok

    def parse(self) -> tuple[Any, ...]:
        node = self.parse_or()
        if self.peek() is not None:
            raise ODataError(400, f"Syntax error: unexpected '{self.take().text}' in '{self.text}'.")
        return node

    def parse_or(self) -> tuple[Any, ...]:
        node = self.parse_and()
        while (tok := self.peek()) is not None and tok.kind == "ident" and tok.text == "or":
            self.take()
            node = ("or", node, self.parse_and())
        return node

    def parse_and(self) -> tuple[Any, ...]:
        node = self.parse_not()
        while (tok := self.peek()) is not None and tok.kind == "ident" and tok.text == "and":
            self.take()
            node = ("and", node, self.parse_not())
        return node

    def parse_not(self) -> tuple[Any, ...]:
        tok = self.peek()
        if tok is not None and tok.kind == "ident" and tok.text == "not":
            self.take()
            return ("not", self.parse_not())
        if tok is not None and tok.text == "(":
            self.take()
            node = self.parse_or()
            if self.take().text != ")":
                raise ODataError(400, f"Syntax error: ')' expected in '{self.text}'.")
            return node
        left = self.operand()
        op = self.take()
        if op.kind != "ident" or op.text not in _COMPARE:
            raise ODataError(400, f"Syntax error: comparison operator expected, got '{op.text}' in '{self.text}'.")
        return ("cmp", op.text, left, self.operand())

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
    if node[0] == "or":
        return evaluate(node[1], row) or evaluate(node[2], row)
    if node[0] == "and":
        return evaluate(node[1], row) and evaluate(node[2], row)
    if node[0] == "not":
        return not evaluate(node[1], row)
    _, op, left_node, right_node = node
    left, right = _value(left_node, row, right_node), _value(right_node, row, left_node)
    if op == "eq" and isinstance(left, str) and isinstance(right, str) and "*" in right:
        return re.fullmatch(".*".join(re.escape(p) for p in right.split("*")), left) is not None
    if op == "eq":
        return bool(left == right)
    if op == "ne":
        return bool(left != right)
    if left is None or right is None:
        return False
    try:
        return bool({"gt": left > right, "ge": left >= right, "lt": left < right, "le": left <= right}[op])
    except TypeError:
        return False
