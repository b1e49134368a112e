"""OData v2 $filter: tokenizer, recursive-descent parser to a tuple AST, evaluation on stored rows."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

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
_COMPARE = frozenset({"eq", "ne", "gt", "ge", "lt", "le"})


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    value: Any = None


def tokenize(text: str) -> list[_Tok]:
    """Tokens of an OData v2 $filter (a syntax error is a Gateway 400)."""
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{text}' (syntax error at position {pos})")
        pos = m.end()
        kind = m.lastgroup or ""
        raw = m.group(0)
        if kind == "ws":
            continue
        if m.group("typed"):
            tname, tval = m.group("tname"), m.group("tval")
            try:
                value: Any = (_parse_iso(tval) if tname in ("datetime", "datetimeoffset")
                              else _parse_time(tval) if tname == "time" else tval)
            except ValueError:
                raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid {tname} literal '{tval}' in filter '{text}'") from None
            out.append(_Tok("lit", raw, value))
        elif kind == "string":
            out.append(_Tok("lit", raw, raw[1:-1].replace("''", "'")))
        elif kind == "decimal":
            out.append(_Tok("lit", raw, Decimal(raw[:-1])))
        elif kind == "number":
            body = raw.rstrip("dDfFlL")
            out.append(_Tok("lit", raw, Decimal(body)))
        elif kind == "ident" and raw in ("true", "false", "null"):
            out.append(_Tok("lit", raw, {"true": True, "false": False, "null": None}[raw]))
        else:
            out.append(_Tok(kind, raw))
    return out


class FilterParser:
    """Recursive descent: or > and > not > comparison | (expr). Builds a tuple AST, never evaluates text."""

    def __init__(self, text: str, entity: str) -> None:
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.entity = entity
        self.fields = set(ENTITIES[entity].fields)

    def _peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _take(self) -> _Tok:
        tok = self._peek()
        if tok is None:
            raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{self.text}' (unexpected end)")
        self.i += 1
        return tok

    def _is(self, word: str) -> bool:
        tok = self._peek()
        return tok is not None and tok.kind == "ident" and tok.text == word

    def parse(self) -> tuple[Any, ...]:
        node = self._or()
        if self._peek() is not None:
            raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{self.text}' (unexpected "
                                               f"'{self._take().text}')")
        return node

    def _or(self) -> tuple[Any, ...]:
        node = self._and()
        while self._is("or"):
            self._take()
            node = ("or", node, self._and())
        return node

    def _and(self) -> tuple[Any, ...]:
        node = self._not()
        while self._is("and"):
            self._take()
            node = ("and", node, self._not())
        return node

    def _not(self) -> tuple[Any, ...]:
        if self._is("not"):
            self._take()
            return ("not", self._not())
        tok = self._peek()
        if tok is not None and tok.text == "(":
            self._take()
            node = self._or()
            if self._take().text != ")":
                raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{self.text}' (')' expected)")
            return node
        left = self._operand()
        op = self._take()
        if op.kind != "ident" or op.text not in _COMPARE:
            raise _bad("/IWBEP/CM_MGW_RT/021", f"Invalid filter expression: '{self.text}' (operator expected, "
                                               f"got '{op.text}')")
        return ("cmp", op.text, left, self._operand())

    def _operand(self) -> tuple[Any, ...]:
        tok = self._take()
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
    if node[0] == "or":
        return evaluate(node[1], row) or evaluate(node[2], row)
    if node[0] == "and":
        return evaluate(node[1], row) and evaluate(node[2], row)
    if node[0] == "not":
        return not evaluate(node[1], row)
    _, op, left_node, right_node = node
    name = left_node[1] if left_node[0] == "field" else right_node[1] if right_node[0] == "field" else None

    def value_of(n: tuple[Any, ...]) -> Any:
        return _comparable(name, row.get(n[1]) if n[0] == "field" else n[1])

    left, right = value_of(left_node), value_of(right_node)
    if isinstance(left, datetime) and isinstance(right, datetime):
        left, right = left.astimezone(UTC), right.astimezone(UTC)
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
