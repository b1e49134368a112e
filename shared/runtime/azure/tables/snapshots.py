"""Snapshots in Table Storage: one row per record, its JSON values spread over string properties."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from shared.core.ports import Snapshot
from shared.runtime.azure.tables.client import TablesBase, _plain_utc
from shared.runtime.azure.tables.keys import join_string, split_string, table_key
from shared.runtime.azure.tables.transactions import TableOp, plan_transactions
from shared.runtime.common import to_utc


class SnapshotTables(TablesBase):
    """Snapshots: the last values seen of each record, per (system, table)."""

    async def get_snapshots(self, system: str, table: str, keys: Sequence[str]) -> dict[str, Snapshot]:
        """Return the snapshots that exist for `keys`."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        client = await self._table("snapshots")
        partition = table_key(system, table)
        rows = {table_key(key): key for key in unique}
        found = await self._read_rows(client, partition, rows)
        result: dict[str, Snapshot] = {}
        for row_key, row in found.items():
            key = rows[row_key]
            modified = row.get("modified")
            result[key] = Snapshot(
                system=system,
                table=table,
                key=key,
                values=json.loads(join_string(row, "values")),
                hash=str(row["hash"]),
                modified=_plain_utc(modified) if isinstance(modified, datetime) else None,
            )
        return result

    async def put_snapshots(self, snapshots: Sequence[Snapshot]) -> None:
        """Insert or replace snapshots (values must be JSON-serialisable, as their hash already requires)."""
        latest: dict[tuple[str, str], TableOp] = {}
        for snap in snapshots:
            partition, row = table_key(snap.system, snap.table), table_key(snap.key)
            values = json.dumps(dict(snap.values), ensure_ascii=False, separators=(",", ":"))
            entity: dict[str, Any] = {
                "PartitionKey": partition,
                "RowKey": row,
                **split_string("values", values, what=f"snapshot {snap.system}/{snap.table}/{snap.key}"),
                "hash": snap.hash,
            }
            if snap.modified is not None:
                entity["modified"] = to_utc(snap.modified)
            # A batch may name a record twice: the last one wins, as with sequential SQL upserts.
            latest.pop((partition, row), None)
            latest[(partition, row)] = TableOp("upsert", entity)
        if latest:
            client = await self._table("snapshots")
            await self._submit(client, plan_transactions([op] for op in latest.values()), ordered=False)

    async def delete_snapshots(self, system: str, table: str, keys: Sequence[str]) -> None:
        """Forget snapshots (after a delete); unknown keys are ignored."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return
        client = await self._table("snapshots")
        partition = table_key(system, table)
        ops = [TableOp("delete", {"PartitionKey": partition, "RowKey": table_key(key)}) for key in unique]

        async def delete_each(chunk: Sequence[TableOp]) -> None:
            # delete_entity ignores a missing entity, which a transaction would reject as a whole
            await self._each(chunk, lambda op: client.delete_entity(op.partition, op.row))

        await self._all_or_each(client, plan_transactions([op] for op in ops), 404, delete_each)

    async def has_snapshots(self, system: str, table: str) -> bool:
        """Whether any snapshot of (`system`, `table`) exists: a query of one row of its partition."""
        client = await self._table("snapshots")
        parameters = {"pk": table_key(system, table)}
        rows = client.query_entities("PartitionKey eq @pk", parameters=parameters, results_per_page=1,
                                     select=["RowKey"])
        async with self._limit:
            async for _ in rows:
                return True
        return False
