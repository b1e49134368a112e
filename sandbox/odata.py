"""What the OData simulators (SAP, F&O, Dataverse) share: the $filter grammar's skeleton, comparisons, the
buckets of equality indexes, the change clock; `scan` (a regex tokenizer) serves ArcGIS's where clauses too.

Each simulator keeps its own literals, operands and error wording (they differ by protocol version and
product); only the parts that are the same logic live here."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

COMPARE = frozenset({"eq", "ne", "gt", "ge", "lt", "le"})

Node = tuple[Any, ...]
K = TypeVar("K")


@dataclass(frozen=True)
class Tok:
    kind: str
    text: str
    value: Any = None


def scan(pattern: re.Pattern[str], text: str, error: Callable[[int], Exception]) -> Iterator[re.Match[str]]:
    """The matches of `pattern` that cover `text`, whitespace (group `ws`) skipped; `error(position)` is raised
    where nothing matches."""
    pos = 0
    while pos < len(text):
        m = pattern.match(text, pos)
        if m is None:
            raise error(pos)
        pos = m.end()
        if m.lastgroup == "ws":
            continue
        yield m


class DescentParser:
    """Recursive descent over tokens: or > and > not > comparison | (expr), to a tuple AST; never evaluates text.

    A subclass reads operands (`operand`) and words its protocol's errors (`error`): "end" (no token left),
    "unexpected" (a token after the expression), "paren" (')' expected), "operator" (comparison expected)."""

    def __init__(self, text: str, toks: list[Tok]) -> None:
        self.text = text
        self.toks = toks
        self.i = 0

    def operand(self) -> Node:
        raise NotImplementedError

    def error(self, what: str, tok: Tok | None) -> Exception:
        raise NotImplementedError

    def peek(self) -> Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> Tok:
        tok = self.peek()
        if tok is None:
            raise self.error("end", None)
        self.i += 1
        return tok

    def is_word(self, word: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.kind == "ident" and tok.text == word

    def parse(self) -> Node:
        node = self.parse_or()
        if self.peek() is not None:
            raise self.error("unexpected", self.take())
        return node

    def parse_or(self) -> Node:
        return self._chain("or", self.parse_and)

    def parse_and(self) -> Node:
        return self._chain("and", self.parse_not)

    def _chain(self, word: str, inner: Callable[[], Node]) -> Node:
        node = inner()
        while self.is_word(word):
            self.take()
            node = (word, node, inner())
        return node

    def parse_not(self) -> Node:
        if self.is_word("not"):
            self.take()
            return ("not", self.parse_not())
        tok = self.peek()
        if tok is not None and tok.text == "(":
            self.take()
            node = self.parse_or()
            if self.take().text != ")":
                raise self.error("paren", None)
            return node
        left = self.operand()
        op = self.take()
        if op.kind != "ident" or op.text not in COMPARE:
            raise self.error("operator", op)
        return ("cmp", op.text, left, self.operand())


def walk(node: Node, row: Mapping[str, Any], leaf: Callable[[Node, Mapping[str, Any]], bool]) -> bool:
    """Evaluate a parsed filter on a row: `or`, `and`, `not` here, comparisons by `leaf`."""
    if node[0] == "or":
        return walk(node[1], row, leaf) or walk(node[2], row, leaf)
    if node[0] == "and":
        return walk(node[1], row, leaf) and walk(node[2], row, leaf)
    if node[0] == "not":
        return not walk(node[1], row, leaf)
    return leaf(node, row)


def compare(op: str, left: Any, right: Any) -> bool:
    """One comparison of two values: `null` is only equal (or not) to something, never ordered; values of
    types that do not order compare false."""
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


def unfile(buckets: dict[Any, set[K]], value: Any, key: K) -> None:
    """Take `key` out of the bucket of `value` in an equality index, dropping the bucket once empty."""
    bucket = buckets.get(value)
    if bucket is not None:
        bucket.discard(key)
        if not bucket:
            del buckets[value]


def next_stamp(last: datetime) -> datetime:
    """Now (UTC) to the millisecond, and strictly after `last`: two changes never share a change stamp."""
    now = datetime.now(UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    if now <= last:
        now = last + timedelta(milliseconds=1)
    return now
