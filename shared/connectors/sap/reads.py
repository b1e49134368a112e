"""SAP reads by filter, key and scan (ProductAvailability through its read model)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from shared.connectors.sap.codecs import (
    _FETCH_CHUNK,
    PRODUCT_AVAILABILITY,
    _entity,
    build_filter,
    filter_literal,
    parse_key,
)
from shared.connectors.sap.products import SapProducts
from shared.core.ports import SourceRecord


class SapReads(SapProducts):
    """`select`, `get`, `fetch` and `scan`."""

    async def select(self, table: str, *, equals: Mapping[str, Any],
                     not_in: Mapping[str, Sequence[Any]] | None = None) -> list[SourceRecord]:
        """Records matching escaped equality filters (lists are `or` chains), with the table's nested values."""
        if table == PRODUCT_AVAILABILITY:
            return await self._select_products(equals, not_in)
        text = build_filter(equals, not_in)
        return [r async for page in self._pages(table, {"$filter": text} if text else None, f"select from {table}")
                for r in page]

    async def get(self, table: str, key: str) -> SourceRecord | None:
        """One record by canonical key, with its nested values, or None."""
        if table == PRODUCT_AVAILABILITY:
            return (await self.fetch(table, [key])).get(key)
        row = await self._get_row(table, parse_key(table, key), what=f"read {table} {key}",
                                  expand=_entity(table).expand)
        return self._record(table, row) if row is not None else None

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        """Read records by canonical key (`or` chains of up to 40 keys per query); missing keys are absent."""
        wanted = list(dict.fromkeys(keys))
        if table == PRODUCT_AVAILABILITY:
            return await self._fetch_products(wanted)
        fields = _entity(table).keys
        found: dict[str, SourceRecord] = {}
        for start in range(0, len(wanted), _FETCH_CHUNK):
            chunk = [parse_key(table, k) for k in wanted[start:start + _FETCH_CHUNK]]
            clauses = [" and ".join(f"{f} eq {filter_literal(k[f], f)}" for f in fields) for k in chunk]
            text = " or ".join(f"({c})" if len(fields) > 1 else c for c in clauses)
            async for page in self._pages(table, {"$filter": text}, f"fetch from {table}"):
                found.update((r.key, r) for r in page)
        return found

    async def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        """Every record of a table, page by page."""
        if table == PRODUCT_AVAILABILITY:
            async for page in self._product_pages(None):
                yield page
            return
        async for page in self._pages(table, None, f"scan of {table}"):
            yield page
