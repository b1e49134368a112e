"""OData text: URL segments, key predicates, and `$filter` (tokenizer, typed parser, evaluator, sort keys)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sandbox.dataverse.codecs import _GUID_RE, _norm
from sandbox.dataverse.protocol import ODataError
from sandbox.dataverse.rows import Row
from sandbox.dataverse.schema import EDM
from sandbox.odata import compare


def _split_segments(path: str) -> list[str]:
    """Split a decoded resource path on '/', ignoring slashes inside quoted literals."""
    segments: list[str] = []
    buf: list[str] = []
    in_quote = False
    for ch in path:
        if ch == "'":
            in_quote = not in_quote
        if ch == "/" and not in_quote:
            segments.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    segments.append("".join(buf))
    return [s for s in segments if s != ""]


_SEGMENT_RE = re.compile(r"^(?P<name>[A-Za-z_$][\w.$]*)(?:\((?P<key>.*)\))?$", re.S)


def _parse_key_predicate(text: str) -> str | dict[str, Any]:
    """`guid` -> guid; `a='x',b=3` -> {a: 'x', b: 3}. Raises ODataError on bad syntax."""
    text = text.strip()
    if _GUID_RE.match(text):
        return text.lower()
    tokens = _tokenize(text)
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        if (i + 2 >= len(tokens) or tokens[i].kind != "ident" or tokens[i + 1].text != "="
                or tokens[i + 2].kind not in ("string", "number", "guid", "keyword")):
            raise ODataError(400, "0x80060888", f"Bad Request - Error in query syntax: key '({text})'.")
        out[tokens[i].text] = tokens[i + 2].value
        i += 3
        if i < len(tokens):
            if tokens[i].text != ",":
                raise ODataError(400, "0x80060888", f"Bad Request - Error in query syntax: key '({text})'.")
            i += 1
    if not out:
        raise ODataError(400, "0x80060888", f"Bad Request - Error in query syntax: key '({text})'.")
    return out


@dataclass
class _Tok:
    kind: str  # string number guid datetime date ident keyword punct
    text: str
    value: Any
    pos: int


_TOKEN_RE = re.compile(
    r"""
     (?P<ws>\s+)
    |(?P<string>'(?:[^']|'')*')
    |(?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![\w-]))
    |(?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))
    |(?P<date>\d{4}-\d{2}-\d{2}(?![\w:]))
    |(?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w.]))
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    |(?P<punct>[()\[\],=])
    """,
    re.X,
)
_KEYWORDS = {"null": None, "true": True, "false": False}


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            raise ODataError(400, "0x80060888", f"Syntax error at position {pos} in '{text}'.")
        kind = m.lastgroup or ""
        raw = m.group()
        pos = m.end()
        if kind == "ws":
            continue
        value: Any = raw
        if kind == "string":
            value = raw[1:-1].replace("''", "'")
        elif kind == "number":
            value = float(raw) if any(c in raw for c in ".eE") else int(raw)
        elif kind == "guid":
            value = raw.lower()
        elif kind == "ident" and raw in _KEYWORDS:
            kind, value = "keyword", _KEYWORDS[raw]
        toks.append(_Tok(kind, raw, value, m.start()))
    return toks


# ---- filter AST: tuples; evaluated against a dict of Web API property values


_CMP_OPS = {"eq", "ne", "gt", "ge", "lt", "le"}
_STRING_FUNCS = {"contains", "startswith", "endswith"}
_IN_FUNCS = {"Microsoft.Dynamics.CRM.In": False, "Microsoft.Dynamics.CRM.NotIn": True}


class _FilterParser:
    """Recursive-descent parser for the $filter subset Syncline and demos use (never eval)."""

    def __init__(self, text: str, prop_types: Mapping[str, str], type_name: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.prop_types = prop_types
        self.type_name = type_name

    def error(self, tok: _Tok | None = None) -> ODataError:
        pos = tok.pos if tok else len(self.text)
        return ODataError(400, "0x80060888", f"Syntax error at position {pos} in '{self.text}'.")

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, text: str | None = None) -> _Tok:
        tok = self.peek()
        if tok is None or (text is not None and tok.text != text):
            raise self.error(tok)
        self.i += 1
        return tok

    def parse(self) -> tuple[Any, ...]:
        node = self.parse_or()
        if self.peek() is not None:
            raise self.error(self.peek())
        return node

    def parse_or(self) -> tuple[Any, ...]:
        return self._left_assoc("or", self.parse_and)

    def parse_and(self) -> tuple[Any, ...]:
        return self._left_assoc("and", self.parse_unary)

    def _left_assoc(self, word: str, operand: Callable[[], tuple[Any, ...]]) -> tuple[Any, ...]:
        """`operand (word operand)*` folded to the left: `a or b or c` is `(a or b) or c`."""
        node = operand()
        while (tok := self.peek()) is not None and tok.text == word:
            self.i += 1
            node = (word, node, operand())
        return node

    def parse_unary(self) -> tuple[Any, ...]:
        tok = self.peek()
        if tok is not None and tok.text == "not":
            self.i += 1
            return ("not", self.parse_unary())
        if tok is not None and tok.text == "(":
            self.i += 1
            node = self.parse_or()
            self.take(")")
            return node
        left = self.parse_operand()
        if left[0] == "bool":
            return left
        op = self.peek()
        if op is None or op.text not in _CMP_OPS:
            raise self.error(op)
        self.i += 1
        right = self.parse_operand()
        if right[0] == "bool":
            raise self.error(op)
        self.check_types(left, right, op.text)
        return ("cmp", op.text, left, right)

    def parse_operand(self) -> tuple[Any, ...]:
        tok = self.take()
        if tok.kind == "ident":
            nxt = self.peek()
            if nxt is not None and nxt.text == "(":
                return self.parse_function(tok)
            if tok.text in ("and", "or", "not") or tok.text in _CMP_OPS:
                raise self.error(tok)
            if tok.text not in self.prop_types:
                raise ODataError(400, "0x80060888",
                                 f"Could not find a property named '{tok.text}' on type '{self.type_name}'.")
            return ("prop", tok.text)
        if tok.kind in ("string", "number", "guid", "keyword"):
            return ("lit", tok.value, tok.kind)
        if tok.kind in ("date", "datetime"):
            return ("lit", tok.text, tok.kind)
        raise self.error(tok)

    def parse_function(self, name_tok: _Tok) -> tuple[Any, ...]:
        name = name_tok.text
        self.take("(")
        if name in _STRING_FUNCS:
            prop = self.parse_operand()
            self.take(",")
            lit = self.parse_operand()
            self.take(")")
            if prop[0] != "prop" or lit[0] != "lit" or lit[2] != "string":
                raise self.error(name_tok)
            return ("bool", ("strfunc", name, prop[1], lit[1]))
        if name in _IN_FUNCS:
            args: dict[str, Any] = {}
            while True:
                key = self.take()
                self.take("=")
                if key.text == "PropertyName":
                    args["PropertyName"] = self.take().value
                elif key.text == "PropertyValues":
                    self.take("[")
                    values: list[Any] = []
                    while (tok := self.peek()) is not None and tok.text != "]":
                        if tok.kind not in ("string", "number", "guid"):
                            raise self.error(tok)
                        values.append(tok.value)
                        self.i += 1
                        if (sep := self.peek()) is not None and sep.text == ",":
                            self.i += 1
                    self.take("]")
                    args["PropertyValues"] = values
                else:
                    raise self.error(key)
                if (sep := self.peek()) is not None and sep.text == ",":
                    self.i += 1
                    continue
                self.take(")")
                break
            prop_name = args.get("PropertyName")
            if not isinstance(prop_name, str) or "PropertyValues" not in args:
                raise self.error(name_tok)
            if prop_name not in self.prop_types:
                raise ODataError(400, "0x80060888",
                                 f"Could not find a property named '{prop_name}' on type '{self.type_name}'.")
            typ = self.prop_types[prop_name]
            wanted: set[Any] = set()
            for raw in args["PropertyValues"]:
                if typ in ("int", "choice") and isinstance(raw, str) and re.fullmatch(r"-?\d+", raw):
                    raw = int(raw)
                try:
                    wanted.add(_norm(raw, typ))
                except ValueError as exc:
                    raise ODataError(400, "0x80060888", f"Cannot convert the literal '{raw}' to the expected type "
                                     f"'{EDM.get(typ, 'Edm.String')}'.") from exc
            return ("bool", ("in", prop_name, frozenset(wanted), _IN_FUNCS[name]))
        raise ODataError(400, "0x80060888", f"An unknown function with name '{name}' was found. This may also be a "
                         "function import or a key lookup on a navigation property, which is not allowed.")

    def check_types(self, left: tuple[Any, ...], right: tuple[Any, ...], op: str) -> None:
        def edm(node: tuple[Any, ...]) -> str | None:
            if node[0] == "prop":
                return EDM.get(self.prop_types[node[1]], "Edm.String")
            kind = node[2]
            if kind == "keyword":
                return None if node[1] is None else "Edm.Boolean"
            return {"string": "Edm.String", "guid": "Edm.Guid", "date": "Edm.Date",
                    "datetime": "Edm.DateTimeOffset"}.get(kind) or (
                "Edm.Int32" if isinstance(node[1], int) else "Edm.Double")

        a, b = edm(left), edm(right)
        if a is None or b is None:
            return
        numeric = {"Edm.Int32", "Edm.Double", "Edm.Decimal"}
        if a == b or (a in numeric and b in numeric) or {a, b} == {"Edm.Date", "Edm.DateTimeOffset"}:
            return
        kind = {"eq": "Equal", "ne": "NotEqual", "gt": "GreaterThan", "ge": "GreaterThanOrEqual",
                "lt": "LessThan", "le": "LessThanOrEqual"}[op]
        raise ODataError(400, "0x80060888", f"A binary operator with incompatible types was detected. Found operand "
                         f"types '{a}' and '{b}' for operator kind '{kind}'.")


def _evaluate(node: tuple[Any, ...], row: Mapping[str, Any] | _RowView, types: Mapping[str, str]) -> bool:
    kind = node[0]
    if kind == "or":
        return _evaluate(node[1], row, types) or _evaluate(node[2], row, types)
    if kind == "and":
        return _evaluate(node[1], row, types) and _evaluate(node[2], row, types)
    if kind == "not":
        return not _evaluate(node[1], row, types)
    if kind == "bool":
        inner = node[1]
        if inner[0] == "strfunc":
            value = row.get(inner[2])
            if not isinstance(value, str):
                return False
            v, needle = value.casefold(), str(inner[3]).casefold()
            return {"contains": needle in v, "startswith": v.startswith(needle),
                    "endswith": v.endswith(needle)}[inner[1]]
        _, prop, wanted, negate = inner
        current = _norm(row.get(prop), types.get(prop))
        hit = current is not None and current in wanted
        return bool(hit != negate)
    if kind == "cmp":
        _, op, left, right = node
        ltype = types.get(left[1]) if left[0] == "prop" else (right[0] == "prop" and types.get(right[1])) or None
        rtype = types.get(right[1]) if right[0] == "prop" else ltype

        def val(n: tuple[Any, ...], typ: str | None) -> Any:
            return _norm(row.get(n[1]) if n[0] == "prop" else n[1], typ or None)

        return compare(op, val(left, ltype), val(right, rtype))
    raise ValueError(f"bad filter node {kind}")


def _sort_key(col: str, typ: str) -> Callable[[Row], tuple[bool, Any]]:
    def key(row: Row) -> tuple[bool, Any]:
        value = row.values.get(col)
        return (value is not None, _norm(value, typ) if value is not None else 0)

    return key


def parse_filter(text: str, prop_types: Mapping[str, str], type_name: str) -> tuple[Any, ...]:
    """Parse `$filter` text into an AST (raises ODataError 400 on anything unknown)."""
    return _FilterParser(text, prop_types, type_name).parse()


class _RowView:
    """Read a stored row by Web API property name (`_x_value` -> x) without rendering it."""

    __slots__ = ("names", "values")

    def __init__(self, values: Mapping[str, Any], names: Mapping[str, str]) -> None:
        self.values = values
        self.names = names

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(self.names.get(name, name), default)
