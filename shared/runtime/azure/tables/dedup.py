"""Dedup keys in Table Storage: remember, claim and confirm with insert-wins rows."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.runtime.azure.tables.client import _LINK_RETRIES, TablesBase, _plain_utc
from shared.runtime.azure.tables.keys import table_key
from shared.runtime.azure.tables.transactions import TableOp, plan_transactions

_CLAIMED = "claimed"
"""Dedup row property: the key is only claimed (`claim`), not remembered."""


class DedupTables(TablesBase):
    """Dedup keys: `create_entity` is the atomic first-one-wins."""

    @staticmethod
    def _dedup_rows(namespace: str, keys: Sequence[str], *, claimed: bool) -> tuple[dict[str, str], list[TableOp]]:
        """Row key -> dedup key, and one insert per distinct key (a claim when `claimed`)."""
        partition = table_key(namespace)
        stamp = _plain_utc(datetime.now(UTC))
        by_row = {table_key(key): key for key in dict.fromkeys(keys)}
        extra = {_CLAIMED: True} if claimed else {}
        ops = [TableOp("create", {"PartitionKey": partition, "RowKey": row, "remembered_at": stamp, **extra})
               for row in by_row]
        return by_row, ops

    async def remember(self, namespace: str, keys: Sequence[str]) -> set[str]:
        """Record dedup keys; return the subset that had already been remembered before this call."""
        by_row, ops = self._dedup_rows(namespace, keys, claimed=False)
        if not ops:
            return set()
        table = await self._table("dedup")
        seen: set[str] = set()

        async def create_each(chunk: Sequence[TableOp]) -> None:
            # Insert is the atomic "first one wins": whoever gets 409 saw the key before (or concurrently), unless
            # the row is only a claim: then this call remembers it (replace under the claim's ETag).
            async def create(op: TableOp) -> None:
                for _ in range(_LINK_RETRIES):
                    try:
                        await table.create_entity(op.entity)
                        return
                    except ResourceExistsError:
                        pass
                    try:
                        current = await table.get_entity(op.partition, op.row)
                    except ResourceNotFoundError:
                        continue  # forgotten meanwhile: insert again
                    if not current.get(_CLAIMED):
                        seen.add(by_row[op.row])
                        return
                    try:
                        await table.update_entity(op.entity, mode=UpdateMode.REPLACE, etag=current.metadata["etag"],
                                                  match_condition=MatchConditions.IfNotModified)
                        return
                    except (ResourceModifiedError, ResourceNotFoundError):
                        continue  # remembered or forgotten concurrently: look again
                raise RuntimeError(f"dedup key {by_row[op.row]!r} kept changing under concurrent writers")

            await self._each(chunk, create)

        # The common case, all keys new, is one transaction per 100 keys; a chunk with a known key fails
        # as a whole (409) and is redone key by key.
        await self._all_or_each(table, plan_transactions([op] for op in ops), 409, create_each)
        return seen

    async def seen(self, namespace: str, keys: Sequence[str]) -> set[str]:
        """The subset of `keys` remembered in `namespace` (concurrent point reads; read-only)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return set()
        table = await self._table("dedup")
        partition = table_key(namespace)
        addresses = {(partition, table_key(key)): key for key in unique}
        found = await self._read_many(table, addresses)
        return {addresses[address] for address, row in found.items() if not row.get(_CLAIMED)}

    async def claim(self, namespace: str, keys: Sequence[str]) -> set[str]:
        """The subset of `keys` remembered in `namespace`, leaving a claim on the others where it costs nothing.

        Keys that are all new (the common case) cost one insert transaction per 100, not a read each. A
        transaction that meets an existing row (remembered, or claimed by an earlier call) fails whole and its
        keys are read instead: remembered ones are reported, claims are not.
        """
        by_row, ops = self._dedup_rows(namespace, keys, claimed=True)
        if not ops:
            return set()
        table = await self._table("dedup")
        remembered: set[str] = set()

        async def read_each(chunk: Sequence[TableOp]) -> None:
            # The keys of this chunk stay unclaimed: a claim only makes the check cheaper, it is never needed.
            found = await self._read_many(table, [(op.partition, op.row) for op in chunk])
            remembered.update(by_row[row] for (_, row), entity in found.items() if not entity.get(_CLAIMED))

        await self._all_or_each(table, plan_transactions([op] for op in ops), 409, read_each)
        return remembered

    async def confirm(self, namespace: str, keys: Sequence[str]) -> None:
        """Remember `keys` (claimed or not): blind upserts, one transaction per 100 keys."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return
        table = await self._table("dedup")
        partition = table_key(namespace)
        stamp = _plain_utc(datetime.now(UTC))
        ops = [TableOp("upsert", {"PartitionKey": partition, "RowKey": table_key(key), "remembered_at": stamp})
               for key in unique]
        await self._submit(table, plan_transactions([op] for op in ops), ordered=False)

    async def forget_remembered(self, before: datetime) -> int:
        """Drop dedup keys remembered before `before` (retention); returns how many were dropped.

        A filtered scan of the dedup table (run daily by the controller), then deletes grouped by partition.
        """
        table = await self._table("dedup")
        ops = [TableOp("delete", {"PartitionKey": e["PartitionKey"], "RowKey": e["RowKey"]})
               async for e in self._query(table, "remembered_at lt @cutoff", {"cutoff": _plain_utc(before)},
                                          select=["PartitionKey", "RowKey"])]
        if not ops:
            return 0

        async def delete_each(chunk: Sequence[TableOp]) -> None:
            await self._each(chunk, lambda op: table.delete_entity(op.partition, op.row))

        await self._all_or_each(table, plan_transactions([op] for op in ops), 404, delete_each)
        return len(ops)
