"""Stored records: a row (values, version, lookup targets) and the per-column equality index of `$filter`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sandbox.dataverse.codecs import _norm
from sandbox.odata import unfile


@dataclass
class Row:
    """A stored record: values keyed by logical column name (lookups hold the target GUID)."""

    values: dict[str, Any]
    version: int
    lookup_types: dict[str, str] = field(default_factory=dict)
    """lookup column -> target logical name (needed for polymorphic lookups and EntityReferences)."""


class _ColumnIndex:
    """Equality index of one column of one table: normalised value (`_norm`, as `$filter` compares) -> primary
    keys. A null or missing value is bucketed under None; a row whose value cannot be normalised or hashed sits
    in `odd`, a candidate for every probe. The fast path only narrows the rows the filter is evaluated on."""

    __slots__ = ("buckets", "odd", "typ")

    def __init__(self, typ: str) -> None:
        self.typ = typ
        self.buckets: dict[Any, set[str]] = {}
        self.odd: set[str] = set()

    def _bucket_of(self, value: Any) -> tuple[bool, Any]:
        try:
            normed = _norm(value, self.typ)
            hash(normed)
        except (TypeError, ValueError, AttributeError):
            return False, None
        return True, normed

    def add(self, key: str, value: Any) -> None:
        ok, normed = self._bucket_of(value)
        if ok:
            self.buckets.setdefault(normed, set()).add(key)
        else:
            self.odd.add(key)

    def discard(self, key: str, value: Any) -> None:
        ok, normed = self._bucket_of(value)
        if not ok:
            self.odd.discard(key)
            return
        unfile(self.buckets, normed, key)

    def probe(self, wanted: Iterable[Any]) -> set[str] | None:
        """Keys whose value may equal one of `wanted` (already normalised); None if a value cannot be looked up."""
        out = set(self.odd)
        for value in wanted:
            try:
                bucket = self.buckets.get(value)
            except TypeError:
                return None
            if bucket:
                out |= bucket
        return out
