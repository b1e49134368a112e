"""Links in Table Storage: both directions in one partition, replayed and diffed under ETags."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from azure.data.tables import TableTransactionError
from azure.data.tables.aio import TableClient

from shared.core.ports import Link
from shared.runtime.azure.tables.client import _LINK_RETRIES, TablesBase
from shared.runtime.azure.tables.keys import prefix_range, split_key, table_key
from shared.runtime.azure.tables.transactions import OpKind, TableOp, plan_transactions

_Row = tuple[str, str, str, str]
"""A link row: (entity, system, key, other_system); its value is the other key."""


@dataclass
class _Loaded:
    other_key: str
    etag: str


class LinkTables(TablesBase):
    """Links: one-to-one per (entity, system pair), a link and its reverse row in one transaction."""

    @staticmethod
    def _link_partition(entity: str, system: str, other_system: str) -> str:
        low, high = sorted((system, other_system))
        return table_key(entity, low, high)

    @classmethod
    def _link_address(cls, row: _Row) -> tuple[str, str]:
        entity, system, key, other_system = row
        return cls._link_partition(entity, system, other_system), table_key(system, key)

    async def get_links(self, entity: str, system: str, keys: Sequence[str], other_system: str) -> dict[str, str]:
        """Map each of `keys` (in `system`) to its linked key in `other_system`; unknown keys are absent."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        table = await self._table("links")
        partition = self._link_partition(entity, system, other_system)
        rows = {table_key(system, key): key for key in unique}
        found = await self._read_rows(table, partition, rows)
        return {rows[row_key]: str(row["other_key"]) for row_key, row in found.items()}

    async def put_links(self, links: Sequence[Link]) -> None:
        """Store links in both directions; re-putting a link is a no-op, re-linking a key replaces it."""
        if not links:
            return
        table = await self._table("links")
        rows = [row for link in links for row in self._link_rows(link)]
        if len(set(rows)) == len(rows):
            # Fast path for the common case, links between keys that have none yet: insert both rows of
            # each link, no reads. Under the one-to-one invariant, two missing rows mean that nothing points
            # at either key, so there is nothing to remove. A transaction that meets an existing row fails
            # whole (409) and only its links take the read-and-diff path.
            leftovers: list[Link] = []
            by_row = {row: link for link in links for row in self._link_rows(link)}
            groups = [
                [self._link_op("create", row, other_key) for row, other_key in self._link_rows(link).items()]
                for link in links
            ]

            async def fallback(chunk: Sequence[TableOp]) -> None:
                leftovers.extend(dict.fromkeys(by_row[self._link_row(op)] for op in chunk))

            await self._all_or_each(table, plan_transactions(groups), 409, fallback)
            if not leftovers:
                return
            # The engine re-puts the link of every record it updates: one read per link finds those that
            # are stored already (a -> b present means b -> a is too), and only the rest is replayed.
            forward = {
                self._link_address((link.entity, link.system_a, link.key_a, link.system_b)): link for link in leftovers
            }
            found = await self._read_many(table, forward)
            present = {link for address, link in forward.items() if address in found
                       and found[address]["other_key"] == link.key_b}
            # keep the caller's order: re-linking semantics are "in order, the last link wins"
            wanted = set(leftovers) - present
            links = [link for link in links if link in wanted]
            if not links:
                return
        await self._put_links_read_and_diff(table, links)

    async def _put_links_read_and_diff(self, table: TableClient, links: Sequence[Link]) -> None:
        """Read every row the links touch, replay them in memory, write the difference with conditions."""
        for attempt in range(_LINK_RETRIES):
            loaded = await self._load_link_rows(table, links)
            groups = self._plan_links(links, loaded)
            try:
                await self._submit(table, plan_transactions(groups))
                return
            except TableTransactionError as error:
                # 409 / 412 / 404: another writer changed a row between our read and our write; re-read.
                if error.status_code not in (404, 409, 412) or attempt == _LINK_RETRIES - 1:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))

    @staticmethod
    def _link_rows(link: Link) -> dict[_Row, str]:
        """The two rows of a link (one when a key is linked to itself), each with the key it points at."""
        return {
            (link.entity, link.system_a, link.key_a, link.system_b): link.key_b,
            (link.entity, link.system_b, link.key_b, link.system_a): link.key_a,
        }

    @classmethod
    def _link_op(cls, kind: OpKind, row: _Row, other_key: str | None, etag: str | None = None) -> TableOp:
        partition, row_key = cls._link_address(row)
        entity: dict[str, Any] = {"PartitionKey": partition, "RowKey": row_key}
        if other_key is not None:
            entity["other_key"] = other_key
        return TableOp(kind, entity, etag=etag)

    @staticmethod
    def _link_row(op: TableOp) -> _Row:
        """Invert `_link_op`: the row an operation writes."""
        entity, low, high = split_key(op.partition)
        system, key = split_key(op.row)
        return entity, system, key, high if system == low else low

    async def _load_link_rows(self, table: TableClient, links: Sequence[Link]) -> dict[_Row, _Loaded]:
        """The stored rows of every key of `links`, plus the rows of their current partners."""

        async def load(rows: Iterable[_Row]) -> dict[_Row, _Loaded]:
            wanted = {self._link_address(row): row for row in rows}
            found = await self._read_many(table, wanted)
            return {
                wanted[address]: _Loaded(str(entity["other_key"]), str(entity.metadata["etag"]))
                for address, entity in found.items()
            }

        first = {row for link in links for row in self._link_rows(link)}
        loaded = await load(first)
        # A partner's reverse row is what re-linking removes; under the one-to-one invariant it is the only
        # row that points at a key, so this second read replaces SQL's "DELETE ... WHERE other_key = ?".
        partners = {(row[0], row[3], got.other_key, row[1]) for row, got in loaded.items()} - first
        loaded.update(await load(partners))
        return loaded

    def _plan_links(self, links: Sequence[Link], loaded: Mapping[_Row, _Loaded]) -> list[list[TableOp]]:
        """Apply the links one by one to an in-memory copy, then diff it into groups of conditional ops."""
        model: dict[_Row, str] = {row: got.other_key for row, got in loaded.items()}
        # (entity, system, other_system, other_key) -> keys whose row points at other_key
        pointing: dict[tuple[str, str, str, str], set[str]] = {}
        for (entity, system, key, other_system), other_key in model.items():
            pointing.setdefault((entity, system, other_system, other_key), set()).add(key)

        parent: dict[_Row, _Row] = {}

        def find(row: _Row) -> _Row:
            parent.setdefault(row, row)
            while parent[row] != row:
                parent[row] = parent[parent[row]]
                row = parent[row]
            return row

        def set_row(row: _Row, other_key: str | None) -> None:
            entity, system, key, other_system = row
            old = model.pop(row, None)
            if old is not None:
                pointing[(entity, system, other_system, old)].discard(key)
            if other_key is not None:
                model[row] = other_key
                pointing.setdefault((entity, system, other_system, other_key), set()).add(key)

        for link in links:
            touched: list[_Row] = []
            for system, key, other_system, other_key in (
                (link.system_a, link.key_a, link.system_b, link.key_b),
                (link.system_b, link.key_b, link.system_a, link.key_a),
            ):
                # Same statements as SqliteStateStore.put_links: drop rows of `other_system` that point at
                # `key` from any key but `other_key`, then point `key` at `other_key`.
                stale = pointing.get((link.entity, other_system, system, key), set()) - {other_key}
                for stale_key in sorted(stale):
                    row = (link.entity, other_system, stale_key, system)
                    set_row(row, None)
                    touched.append(row)
                row = (link.entity, system, key, other_system)
                set_row(row, other_key)
                touched.append(row)
            for row in touched[1:]:
                parent[find(row)] = find(touched[0])

        groups: dict[_Row, list[TableOp]] = {}
        for row in sorted(set(model) | set(loaded)):
            before, after = loaded.get(row), model.get(row)
            if before is None and after is not None:
                op = self._link_op("create", row, after)
            elif before is not None and after is None:
                op = self._link_op("delete", row, None, before.etag)
            elif before is not None and after is not None and before.other_key != after:
                op = self._link_op("update", row, after, before.etag)
            else:
                continue
            groups.setdefault(find(row), []).append(op)
        return list(groups.values())

    async def count_links(self, entity: str | None = None) -> int:
        """How many links exist (each pair counted once), for one entity or all of them."""
        table = await self._table("links")
        query_filter: str | None = None
        parameters: dict[str, Any] = {}
        if entity is not None:
            query_filter = "PartitionKey ge @low and PartitionKey lt @high"
            parameters["low"], parameters["high"] = prefix_range(entity)
        count = 0
        async for row in self._query(table, query_filter, parameters, select=["PartitionKey", "RowKey"]):
            _, low, high = split_key(str(row["PartitionKey"]))
            # Both directions are stored; the row of the lower system picks exactly one of each pair (and,
            # as in SQL's `system < other_system`, a link within one system is not counted).
            if low < high and split_key(str(row["RowKey"]))[0] == low:
                count += 1
        return count

    async def iter_links(self, entity: str, system: str, other_system: str) -> list[tuple[str, str]]:
        """Every (key in `system`, key in `other_system`) pair of an entity, ordered by the first key."""
        table = await self._table("links")
        low, high = prefix_range(system)
        parameters = {"pk": self._link_partition(entity, system, other_system), "low": low, "high": high}
        query_filter = "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high"
        pairs = [
            (split_key(str(row["RowKey"]))[1], str(row["other_key"]))
            async for row in self._query(table, query_filter, parameters)
        ]
        return sorted(pairs)
