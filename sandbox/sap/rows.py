"""Entity-set storage: rows that report in-place changes, per-field equality indexes, filter seeks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sandbox.odata import unfile
from sandbox.sap.filters import _comparable

_ODD = object()
"""The bucket of a value an index cannot hold (unhashable): such a row is a candidate for every probe."""


class _FieldIndex:
    """Equality index of one field of one entity set: comparable value (`_comparable`, as `evaluate` compares)
    -> row keys. It only narrows the rows a filter is evaluated on, never decides a match by itself."""

    __slots__ = ("buckets", "field", "odd", "of")

    def __init__(self, field_name: str) -> None:
        self.field = field_name
        self.buckets: dict[Any, set[tuple[str, ...]]] = {}
        self.odd: set[tuple[str, ...]] = set()
        self.of: dict[tuple[str, ...], Any] = {}
        """key -> the bucket it sits in (`_ODD` for `odd`)."""

    def put(self, key: tuple[str, ...], row: Mapping[str, Any]) -> None:
        try:
            value = _comparable(self.field, row.get(self.field))
            hash(value)
        except TypeError:
            value = _ODD
        if key in self.of:
            old = self.of[key]
            if old is not _ODD and value is not _ODD and old == value:
                return  # equal values share a bucket
            self._drop(key, old)
        self.of[key] = value
        if value is _ODD:
            self.odd.add(key)
        else:
            self.buckets.setdefault(value, set()).add(key)

    def remove(self, key: tuple[str, ...]) -> None:
        if key in self.of:
            self._drop(key, self.of.pop(key))

    def _drop(self, key: tuple[str, ...], value: Any) -> None:
        if value is _ODD:
            self.odd.discard(key)
            return
        unfile(self.buckets, value, key)

    def probe(self, value: Any) -> set[tuple[str, ...]] | None:
        """Keys of the rows whose field may equal `value` (comparable form); None if it cannot be looked up."""
        try:
            bucket = self.buckets.get(value)
        except TypeError:
            return None
        return self.odd | bucket if bucket else set(self.odd)


class _Row(dict[str, Any]):
    """A stored row that tells the entity set holding it when it changes in place (`row.update(...)`,
    `row[f] = v`), so that the set's field indexes stay in step with every write."""

    __slots__ = ("_holder",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._holder: tuple[_Rows, tuple[str, ...]] | None = None

    def _changed(self) -> None:
        holder = getattr(self, "_holder", None)
        if holder is not None:
            holder[0].reindex(holder[1], self)

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        self._changed()

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self._changed()

    def __ior__(self, other: Any) -> _Row:  # type: ignore[override,misc]
        super().update(other)
        self._changed()
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def setdefault(self, name: str, default: Any = None) -> Any:
        value = super().setdefault(name, default)
        self._changed()
        return value

    def pop(self, *args: Any) -> Any:
        value = super().pop(*args)
        self._changed()
        return value

    def popitem(self) -> tuple[str, Any]:
        item = super().popitem()
        self._changed()
        return item

    def clear(self) -> None:
        super().clear()
        self._changed()


class _Rows(dict[tuple[str, ...], dict[str, Any]]):
    """The rows of one entity set by key, indexed by the first key field: every navigation links a child to
    its parent through the child's first key field (SalesOrder of an item, AddressID of a phone number).

    Equality filters (`F eq 'a' or F eq 'b' ...`) are answered from a per-field index, built on the first such
    filter on the field and kept in step with every write after: rows stored, replaced and deleted here, and
    `_Row`s changed in place. A row that is not a `_Row` (or is held by another set) cannot report changes, so it
    is `loose`: a candidate for every filter."""

    def __init__(self, rows: Mapping[tuple[str, ...], dict[str, Any]] | None = None) -> None:
        super().__init__()
        self._by_first: dict[str, dict[tuple[str, ...], None]] = {}
        self._seq: dict[tuple[str, ...], int] = {}
        """key -> its position in the set (a dict's insertion order: an indexed answer is ordered as a scan)."""
        self._next_seq = 0
        self._indexes: dict[str, _FieldIndex] = {}
        self._loose: set[tuple[str, ...]] = set()
        for key, row in (rows or {}).items():
            self[key] = row if isinstance(row, _Row) else _Row(row)  # copies (a snapshot): nobody else holds them

    def __setitem__(self, key: tuple[str, ...], row: dict[str, Any]) -> None:
        old = self.get(key)
        if old is None:
            self._by_first.setdefault(key[0], {})[key] = None
            self._seq[key] = self._next_seq
            self._next_seq += 1
        elif old is not row:
            self._release(key, old)
        super().__setitem__(key, row)
        holder = getattr(row, "_holder", None) if isinstance(row, _Row) else None
        if isinstance(row, _Row) and (holder is None or (holder[0] is self and holder[1] == key)):
            row._holder = (self, key)
            self._loose.discard(key)
        else:
            self._loose.add(key)
        for index in self._indexes.values():
            index.put(key, row)

    def __delitem__(self, key: tuple[str, ...]) -> None:
        row = self[key]
        super().__delitem__(key)
        self._by_first.get(key[0], {}).pop(key, None)
        self._seq.pop(key, None)
        self._release(key, row)
        self._loose.discard(key)
        for index in self._indexes.values():
            index.remove(key)

    def _release(self, key: tuple[str, ...], row: dict[str, Any]) -> None:
        holder = getattr(row, "_holder", None) if isinstance(row, _Row) else None
        if holder is not None and holder[0] is self and holder[1] == key:
            row._holder = None  # type: ignore[attr-defined]

    def reindex(self, key: tuple[str, ...], row: dict[str, Any]) -> None:
        """A held row changed in place: move it in every field index."""
        if self._indexes and self.get(key) is row:
            for index in self._indexes.values():
                index.put(key, row)

    def with_first(self, value: str) -> list[dict[str, Any]]:
        return [self[k] for k in self._by_first.get(value, ())]

    def equal_to(self, name: str, value: Any) -> set[tuple[str, ...]] | None:
        """Keys of the rows whose `name` may equal `value` (comparable form), from the field's index (built now
        if this is the first look-up of `name`); None when the index cannot answer."""
        index = self._indexes.get(name)
        if index is None:
            index = self._indexes[name] = _FieldIndex(name)
            for key, row in self.items():
                index.put(key, row)
        return index.probe(value)

    def in_order(self, keys: Iterable[tuple[str, ...]]) -> list[dict[str, Any]]:
        """The rows of `keys`, and every loose row, in the set's own order (what `values()` would give)."""
        wanted = [k for k in set(keys) | self._loose if k in self._seq]
        wanted.sort(key=self._seq.__getitem__)
        return [self[k] for k in wanted]


def _candidates(node: tuple[Any, ...], table: _Rows) -> set[tuple[str, ...]] | None:
    """Keys of a superset of the rows a parsed filter matches, from field indexes; None = every row (a scan).
    Equality with a literal (not a datetime, which `evaluate` compares in UTC) seeks the field's index; `and`
    narrows to either side, `or` needs both; anything else is a scan."""
    kind = node[0]
    if kind == "and":
        left, right = _candidates(node[1], table), _candidates(node[2], table)
        if left is None or right is None:
            return left if right is None else right
        return left & right
    if kind == "or":
        left = _candidates(node[1], table)
        if left is None:
            return None
        right = _candidates(node[2], table)
        return None if right is None else left | right
    if kind != "cmp" or node[1] != "eq":
        return None
    prop, lit = node[2], node[3]
    if prop[0] == "lit":
        prop, lit = lit, prop
    if prop[0] != "field" or lit[0] != "lit" or isinstance(lit[1], datetime):
        return None
    try:
        value = _comparable(prop[1], lit[1])
    except TypeError:
        return None
    return table.equal_to(prop[1], value)


def _blank(fields: Iterable[str]) -> dict[str, Any]:
    return _Row(dict.fromkeys(fields))
