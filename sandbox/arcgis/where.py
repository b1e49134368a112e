"""The where-clause grammar of the simulated service: tokenizer, parser and three-valued evaluator."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sandbox.arcgis.codecs import _field_kind, canonical_guid
from sandbox.arcgis.errors import RestError
from sandbox.arcgis.schema import FieldDef
from sandbox.odata import scan

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^']|'')*')
  | (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><>|!=|<=|>=|=|<|>)
  | (?P<punct>[(),])
  | (?P<minus>-)
""", re.VERBOSE)
_KEYWORDS = frozenset({"AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "BETWEEN", "TIMESTAMP", "DATE", "ESCAPE"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TS_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?)?$")


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    return [_Tok(m.lastgroup or "", m.group(), m.start()) for m in scan(
        _TOKEN_RE, text, lambda pos: _invalid_query(f"unexpected character {text[pos]!r} at position {pos}"))]


def _invalid_query(why: str) -> RestError:
    # The service says no more than this; the reason is kept for whoever debugs the simulator.
    return RestError(400, "Unable to complete operation.", ["Unable to perform query. Please check your parameters.",
                                                            f"Invalid query: {why}"])


class WhereParser:
    """A small SQL-92 subset (the standardized-queries grammar), parsed into a tuple tree: never eval'd.

    Grammar: or := and (OR and)* ; and := not (AND not)* ; not := NOT not | '(' or ')' | predicate ;
    predicate := operand (cmp operand | [NOT] IN (literals) | IS [NOT] NULL | [NOT] LIKE 'pattern'
    | [NOT] BETWEEN operand AND operand) ; operand := field | number | 'string' | TIMESTAMP '...' | DATE '...'.
    """

    def __init__(self, text: str, fields: Mapping[str, FieldDef]) -> None:
        self.text = text
        self.fields = fields
        self.toks = _tokenize(text)
        self.i = 0

    def parse(self) -> tuple[Any, ...]:
        if not self.toks:
            raise _invalid_query("empty where clause")
        node = self._or()
        if self.i != len(self.toks):
            raise _invalid_query(f"unexpected {self.toks[self.i].text!r} at position {self.toks[self.i].pos}")
        return node

    def _peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _kw(self, word: str) -> bool:
        tok = self._peek()
        if tok is not None and tok.kind == "name" and tok.text.upper() == word:
            self.i += 1
            return True
        return False

    def _expect(self, text: str) -> None:
        tok = self._peek()
        if tok is None or tok.text.upper() != text:
            raise _invalid_query(f"expected {text!r} at position {tok.pos if tok else len(self.text)}")
        self.i += 1

    def _or(self) -> tuple[Any, ...]:
        node = self._and()
        while self._kw("OR"):
            node = ("or", node, self._and())
        return node

    def _and(self) -> tuple[Any, ...]:
        node = self._not()
        while self._kw("AND"):
            node = ("and", node, self._not())
        return node

    def _not(self) -> tuple[Any, ...]:
        if self._kw("NOT"):
            return ("not", self._not())
        tok = self._peek()
        if tok is not None and tok.text == "(":
            self.i += 1
            node = self._or()
            self._expect(")")
            return node
        return self._predicate()

    def _predicate(self) -> tuple[Any, ...]:
        left = self._operand()
        tok = self._peek()
        if tok is None:
            raise _invalid_query("incomplete predicate")
        if tok.kind == "op":
            self.i += 1
            right = self._operand()
            self._check(left, right)
            return ("cmp", "<>" if tok.text == "!=" else tok.text, left, right)
        negated = self._kw("NOT")
        if self._kw("IN"):
            self._expect("(")
            items = [self._operand()]
            while self._peek() is not None and self._peek().text == ",":  # type: ignore[union-attr]
                self.i += 1
                items.append(self._operand())
            self._expect(")")
            for item in items:
                if item[0] != "lit":
                    raise _invalid_query("IN lists take literals only")
                self._check(left, item)
            return ("in", left, items, negated)
        if self._kw("LIKE"):
            pattern = self._operand()
            if pattern[0] != "lit" or pattern[2] != "str" or self._kind(left) != "str":
                raise _invalid_query("LIKE compares a text field with a string pattern")
            # Values compare casefolded (hosted data's case-insensitive collation), so the pattern must be too.
            regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern[1].casefold())
            return ("like", left, re.compile(f"^{regex}$", re.DOTALL), negated)
        if self._kw("BETWEEN"):
            low = self._operand()
            self._expect("AND")
            high = self._operand()
            self._check(left, low)
            self._check(left, high)
            return ("between", left, low, high, negated)
        if not negated and self._kw("IS"):
            is_not = self._kw("NOT")
            self._expect("NULL")
            return ("null", left, is_not)
        raise _invalid_query(f"unexpected {tok.text!r} at position {tok.pos}")

    def _operand(self) -> tuple[Any, ...]:
        tok = self._peek()
        if tok is None:
            raise _invalid_query("missing operand")
        self.i += 1
        if tok.kind == "minus":
            nxt = self._peek()
            if nxt is None or nxt.kind != "num":
                raise _invalid_query(f"unexpected '-' at position {tok.pos}")
            self.i += 1
            return ("lit", -float(nxt.text), "num")
        if tok.kind == "num":
            return ("lit", float(tok.text), "num")
        if tok.kind == "str":
            return ("lit", tok.text[1:-1].replace("''", "'"), "str")
        if tok.kind == "name":
            word = tok.text.upper()
            if word in ("TIMESTAMP", "DATE"):
                lit = self._peek()
                if lit is None or lit.kind != "str":
                    raise _invalid_query(f"{word} needs a quoted literal")
                self.i += 1
                return ("lit", _timestamp_ms(lit.text[1:-1]), "date")
            if word in _KEYWORDS:
                raise _invalid_query(f"unexpected keyword {tok.text} at position {tok.pos}")
            nxt = self._peek()
            if nxt is not None and nxt.text == "(":
                raise _invalid_query(f"function {tok.text}() is not supported")
            f = self.fields.get(tok.text.lower())
            if f is None:
                raise _invalid_query(f"Invalid field: {tok.text}")
            return ("field", f)
        raise _invalid_query(f"unexpected {tok.text!r} at position {tok.pos}")

    @staticmethod
    def _kind(node: tuple[Any, ...]) -> str:
        return _field_kind(node[1]) if node[0] == "field" else str(node[2])

    def _check(self, left: tuple[Any, ...], right: tuple[Any, ...]) -> None:
        a, b = self._kind(left), self._kind(right)
        if "guid" in (a, b):
            other = right if a == "guid" else left
            if self._kind(other) not in ("guid", "str"):
                raise _invalid_query("a GUID compares with a string")
            if other[0] == "lit" and canonical_guid(other[1]) is None:
                raise _invalid_query(f"Conversion failed when converting {other[1]!r} to uniqueidentifier")
            return
        if a != b:
            raise _invalid_query(f"cannot compare {a} with {b}")


def _timestamp_ms(text: str) -> int:
    m = _TS_RE.match(text.strip())
    if m is None:
        raise _invalid_query(f"invalid date/time literal {text!r}")
    y, mo, d, hh, mi, ss, frac = m.groups()
    try:
        moment = datetime(int(y), int(mo), int(d), int(hh or 0), int(mi or 0), int(ss or 0),
                          int((frac or "0").ljust(6, "0")), tzinfo=UTC)
    except ValueError as exc:
        raise _invalid_query(f"invalid date/time literal {text!r}") from exc
    return (moment - _EPOCH) // timedelta(milliseconds=1)  # exact: no float rounding of milliseconds


def _comparable(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "str":
        return str(value).casefold()  # hosted data uses a case-insensitive collation
    if kind == "guid":
        return canonical_guid(value) or str(value).upper()
    return value


def evaluate(node: tuple[Any, ...], attrs: Mapping[str, Any]) -> bool | None:
    """Three-valued SQL logic: True, False or None (unknown)."""
    tag = node[0]
    if tag == "or":
        a, b = evaluate(node[1], attrs), evaluate(node[2], attrs)
        return True if True in (a, b) else None if None in (a, b) else False
    if tag == "and":
        a, b = evaluate(node[1], attrs), evaluate(node[2], attrs)
        return False if False in (a, b) else None if None in (a, b) else True
    if tag == "not":
        v = evaluate(node[1], attrs)
        return None if v is None else not v
    if tag == "cmp":
        kind = _pair_kind(node[2], node[3])
        left, right = _operand_value(node[2], attrs, kind), _operand_value(node[3], attrs, kind)
        if left is None or right is None:
            return None
        return bool(_COMPARE[node[1]](left, right))
    if tag == "in":
        kind = _pair_kind(node[1], node[2][0])
        value = _operand_value(node[1], attrs, kind)
        if value is None:
            return None
        found = any(value == _operand_value(item, attrs, kind) for item in node[2])
        return not found if node[3] else found
    if tag == "null":
        is_null = _operand_value(node[1], attrs, "num") is None
        return not is_null if node[2] else is_null
    if tag == "like":
        value = _operand_value(node[1], attrs, "str")
        if value is None:
            return None
        matched = node[2].match(value) is not None
        return not matched if node[3] else matched
    if tag == "between":
        kind = _pair_kind(node[1], node[2])
        value = _operand_value(node[1], attrs, kind)
        low, high = _operand_value(node[2], attrs, kind), _operand_value(node[3], attrs, kind)
        if value is None or low is None or high is None:
            return None
        inside: bool = low <= value <= high
        return not inside if node[4] else inside
    raise AssertionError(f"unknown node {tag}")


_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq, "<>": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def _pair_kind(a: tuple[Any, ...], b: tuple[Any, ...]) -> str:
    kinds = {WhereParser._kind(a), WhereParser._kind(b)}
    return "guid" if "guid" in kinds else kinds.pop()


def _operand_value(node: tuple[Any, ...], attrs: Mapping[str, Any], kind: str) -> Any:
    if node[0] == "field":
        value = attrs.get(node[1].name)
        if kind == "str" and value is not None and _field_kind(node[1]) == "guid":
            kind = "guid"
        return _comparable(value, kind)
    return _comparable(node[1], kind)
