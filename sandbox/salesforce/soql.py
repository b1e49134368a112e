"""The SOQL subset the org answers: tokenizer, parser and the row predicates it compiles to (no store access)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sandbox.salesforce.model import SalesforceFault

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2}))"
    r"|(?P<date>\d{4}-\d{2}-\d{2})|(?P<num>-?\d+(?:\.\d+)?)|(?P<op><=|>=|!=|<>|=|<|>)|(?P<punct>[(),])"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_.]*))",
)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", '"': '"', "'": "'", "\\": "\\",
            "_": "\\_", "%": "\\%"}


def _unescape(raw: str) -> str:
    out, i = [], 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\":
            if i + 1 >= len(raw) or raw[i + 1] not in _ESCAPES:
                raise SalesforceFault(400, "MALFORMED_QUERY", f"Invalid string literal: bad escape in '{raw}'")
            out.append(_ESCAPES[raw[i + 1]])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _parse_dt(text: str) -> datetime:
    text = text.replace("Z", "+00:00")
    if re.search(r"[+-]\d{4}$", text):
        text = text[:-2] + ":" + text[-2:]
    return datetime.fromisoformat(text)


@dataclass
class _Tok:
    kind: str
    value: Any
    text: str
    pos: int = 0


def _tokenize(soql: str) -> list[_Tok]:
    tokens, pos = [], 0
    while pos < len(soql):
        if soql[pos:].strip() == "":
            break
        match = _TOKEN_RE.match(soql, pos)
        if not match or match.end() == pos:
            raise SalesforceFault(400, "MALFORMED_QUERY", f"unexpected token at: {soql[pos:pos + 20]!r}")
        kind = match.lastgroup or ""
        text = match.group(kind)
        value: Any = text
        if kind == "str":
            value = _unescape(text[1:-1])
        elif kind == "dt":
            value = _parse_dt(text)
        elif kind == "num":
            value = float(text) if "." in text else int(text)
        tokens.append(_Tok(kind, value, text, match.start(kind)))
        pos = match.end()
    return tokens


Predicate = Callable[[Mapping[str, Any]], bool]
Hint = tuple[str, tuple[Any, ...]]
"""`Field = v` / `Field IN (v, ...)` the whole WHERE clause requires: a match has one of the values."""


@dataclass
class Soql:
    fields: list[str]
    sobject: str
    where: Predicate | None
    order: tuple[str, bool] | None
    limit: int | None
    hints: list[Hint] = field(default_factory=list)


Resolver = Callable[[str, str, int], str]
"""(sObject, field name as written, its offset in the query) -> the field's API name, or a SalesforceFault."""


def soql_error(soql: str, pos: int, code: str, text: str) -> SalesforceFault:
    """A SOQL error the way the org reports it: the query line, a caret under the token, `ERROR at Row:r:Column:c`."""
    row = soql.count("\n", 0, pos) + 1
    line_start = soql.rfind("\n", 0, pos) + 1
    line_end = soql.find("\n", pos)
    line = soql[line_start: len(soql) if line_end < 0 else line_end]
    column = pos - line_start + 1
    return SalesforceFault(400, code, f"\n{line}\n{' ' * (column - 1)}^\nERROR at Row:{row}:Column:{column}\n{text}")


class _SoqlParser:
    def __init__(self, soql: str, resolve: Callable[[str, int], str] | None = None,
                 resolve_field: Resolver | None = None) -> None:
        self.soql = soql
        self.tokens = _tokenize(soql)
        self.pos = 0
        self.resolve_sobject = resolve or (lambda name, _pos: name)
        self.resolve_field = resolve_field or (lambda _sobject, name, _pos: name)
        self.sobject = ""

    def _peek(self) -> _Tok | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _kw(self, word: str) -> bool:
        tok = self._peek()
        if tok is not None and tok.kind == "word" and tok.text.upper() == word:
            self.pos += 1
            return True
        return False

    def _punct(self, text: str) -> bool:
        tok = self._peek()
        if tok is not None and tok.kind == "punct" and tok.text == text:
            self.pos += 1
            return True
        return False

    def _expect(self, kind: str, text: str | None = None) -> _Tok:
        tok = self._peek()
        if tok is None or tok.kind != kind or (text is not None and tok.text.upper() != text):
            got = tok.text if tok else "end of query"
            raise SalesforceFault(400, "MALFORMED_QUERY", f"unexpected token: '{got}'")
        self.pos += 1
        return tok

    def _field(self) -> str:
        tok = self._expect("word")
        return self.resolve_field(self.sobject, tok.text, tok.pos)

    def parse(self) -> Soql:
        self._expect("word", "SELECT")
        selected = [self._expect("word")]
        while self._punct(","):
            selected.append(self._expect("word"))
        self._expect("word", "FROM")
        entity = self._expect("word")
        self.sobject = sobject = self.resolve_sobject(entity.text, entity.pos)
        fields = [self.resolve_field(sobject, t.text, t.pos) for t in selected]
        where, hints = self._or() if self._kw("WHERE") else (None, [])
        order = None
        if self._kw("ORDER"):
            self._expect("word", "BY")
            name = self._field()
            desc = self._kw("DESC")
            if not desc:
                self._kw("ASC")
            order = (name, desc)
        limit = int(self._expect("num").value) if self._kw("LIMIT") else None
        tok = self._peek()
        if tok is not None:
            raise SalesforceFault(400, "MALFORMED_QUERY", f"unexpected token: '{tok.text}'")
        return Soql(fields, sobject, where, order, limit, hints)

    def _or(self) -> tuple[Predicate, list[Hint]]:
        left, hints = self._and()
        while self._kw("OR"):
            right, _ = self._and()
            left = (lambda a, b: lambda r: a(r) or b(r))(left, right)
            hints = []  # a disjunction constrains no single field
        return left, hints

    def _and(self) -> tuple[Predicate, list[Hint]]:
        left, hint = self._atom()
        hints = [hint] if hint else []
        while self._kw("AND"):
            right, hint = self._atom()
            left = (lambda a, b: lambda r: a(r) and b(r))(left, right)
            hints += [hint] if hint else []
        return left, hints

    def _literal(self) -> Any:
        tok = self._peek()
        if tok is None:
            raise SalesforceFault(400, "MALFORMED_QUERY", "unexpected end of query")
        self.pos += 1
        if tok.kind in ("str", "num", "dt"):
            return tok.value
        if tok.kind == "date":
            return tok.text
        if tok.kind == "word" and tok.text.lower() in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[tok.text.lower()]
        raise SalesforceFault(400, "MALFORMED_QUERY", f"unexpected token: '{tok.text}'")

    def _atom(self) -> tuple[Predicate, Hint | None]:
        if self._kw("NOT"):
            inner, _ = self._atom()
            return (lambda r: not inner(r)), None
        if self._punct("("):
            grouped, _ = self._or()
            self._expect("punct", ")")
            return grouped, None
        name = self._field()
        negate = self._kw("NOT")
        if self._kw("IN"):
            self._expect("punct", "(")
            values = [self._literal()]
            while self._punct(","):
                values.append(self._literal())
            self._expect("punct", ")")
            return (lambda r: _cmp_eq_any(r.get(name), values) != negate), (None if negate else (name, tuple(values)))
        if negate:
            raise SalesforceFault(400, "MALFORMED_QUERY", "NOT must be followed by IN")
        if self._kw("LIKE"):
            pattern = self._literal()
            regex = _like_regex(str(pattern))
            return (lambda r: r.get(name) is not None and regex.fullmatch(str(r.get(name))) is not None), None
        op = self._expect("op").text
        value = self._literal()
        return (lambda r: _compare(r.get(name), op, value)), ((name, (value,)) if op == "=" else None)


def norm(value: Any) -> Any:
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}T.*", value):
        try:
            return _parse_dt(value)
        except ValueError:
            return value
    return value


def _cmp_eq_any(actual: Any, values: Sequence[Any]) -> bool:
    return any(_compare(actual, "=", v) for v in values)


def _compare(actual: Any, op: str, value: Any) -> bool:
    a, b = norm(actual), norm(value)
    if isinstance(a, str) and isinstance(b, str) and op in ("=", "!=", "<>"):
        a, b = a.lower(), b.lower()  # SOQL string equality is case-insensitive
    if op == "=":
        return bool(a == b)
    if op in ("!=", "<>"):
        return bool(a != b)
    if a is None or b is None:
        return False
    try:
        return bool({"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op])
    except TypeError:
        return False


def _like_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return re.compile("".join(out), re.IGNORECASE | re.DOTALL)


def parse_soql(soql: str, resolve: Callable[[str, int], str] | None = None,
               resolve_field: Resolver | None = None) -> Soql:
    """Parse a SOQL query; with resolvers, the sObject and field names are checked and made canonical."""
    return _SoqlParser(soql, resolve, resolve_field).parse()
