"""Failed-attempt counters and record leases in Table Storage, both under ETags."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableTransactionError, UpdateMode

from shared.runtime.azure.tables.client import _LINK_RETRIES, TablesBase, _plain_utc, _settle
from shared.runtime.azure.tables.keys import table_key
from shared.runtime.azure.tables.transactions import TableOp, plan_transactions

_FAILURE_ROW = "count"


class LeaseTables(TablesBase):
    """Failed attempts (one row per message id) and leases (a few partitions, taken and released under ETags)."""

    async def record_failures(self, keys: Sequence[str]) -> dict[str, int]:
        """Count one more failed attempt of each of `keys` (a row per key, raised with optimistic concurrency)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        table = await self._table("failures")

        async def raise_one(key: str) -> int:
            partition = table_key(key)
            for _ in range(_LINK_RETRIES * 4):
                stamp = _plain_utc(datetime.now(UTC))
                try:
                    row = await table.get_entity(partition, _FAILURE_ROW)
                except ResourceNotFoundError:
                    entity = {"PartitionKey": partition, "RowKey": _FAILURE_ROW, "count": 1, "updated_at": stamp}
                    try:
                        await table.create_entity(entity)
                    except ResourceExistsError:
                        continue  # raised concurrently: read again
                    return 1
                count = int(row["count"]) + 1
                entity = {"PartitionKey": partition, "RowKey": _FAILURE_ROW, "count": count, "updated_at": stamp}
                try:
                    await table.update_entity(entity, mode=UpdateMode.REPLACE, etag=row.metadata["etag"],
                                              match_condition=MatchConditions.IfNotModified)
                except (ResourceModifiedError, ResourceNotFoundError):
                    continue
                return count
            raise RuntimeError(f"the failure count of {key!r} kept changing under concurrent writers")

        counts = await self._each(unique, raise_one)
        return dict(zip(unique, counts, strict=True))

    async def clear_failures(self, keys: Sequence[str]) -> None:
        """Forget the failed attempts of `keys`; unknown keys are ignored."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return
        table = await self._table("failures")
        # delete_entity ignores a missing entity: one request per key, concurrently
        await self._each(unique, lambda key: table.delete_entity(table_key(key), _FAILURE_ROW))

    async def forget_failures(self, before: datetime) -> int:
        """Drop failure counts last raised before `before` (a filtered scan, run daily by the controller)."""
        table = await self._table("failures")
        rows = [(str(e["PartitionKey"]), str(e["RowKey"]))
                async for e in self._query(table, "updated_at lt @cutoff", {"cutoff": _plain_utc(before)},
                                           select=["PartitionKey", "RowKey"])]
        await self._each(rows, lambda row: table.delete_entity(row[0], row[1]))
        return len(rows)

    def _lease_address(self, key: str) -> tuple[str, str]:
        # A few partitions, so that a batch's leases go in entity group transactions (100 per request).
        row = table_key(key)
        return f"lease{zlib.crc32(row.encode('utf-8', 'surrogatepass')) % self._lease_partitions:02d}", row

    async def acquire_leases(self, keys: Sequence[str], owner: str, ttl_seconds: float) -> set[str]:
        """Take or extend the leases of `keys` for `owner`; returns the keys it holds afterwards.

        The common cases cost one transaction per 100 keys: an insert of a free lease, or an ETag-conditional
        replace of one this store wrote for `owner`. A transaction that meets a taken, expired or concurrently
        changed lease fails whole, and only its keys go key by key: insert (409 when taken), else read and,
        when ours or expired, replace under the read ETag (412 when someone was faster: read again).
        """
        unique = list(dict.fromkeys(keys))
        if not unique:
            return set()
        table = await self._table("leases")
        now = datetime.now(UTC)
        expires = _plain_utc(now + timedelta(seconds=ttl_seconds))
        by_row = {self._lease_address(key)[1]: key for key in unique}
        held: set[str] = set()

        def entity(key: str) -> dict[str, Any]:
            partition, row = self._lease_address(key)
            return {"PartitionKey": partition, "RowKey": row, "owner": owner, "expires": expires}

        ops = []
        for key in unique:
            known = self._lease_etags.get((self._lease_address(key)[1], owner))
            ops.append(TableOp("update", entity(key), known) if known else TableOp("create", entity(key)))

        async def one(key: str) -> None:
            partition, row = self._lease_address(key)
            for _ in range(_LINK_RETRIES):
                try:
                    written = await table.create_entity(entity(key))
                except ResourceExistsError:
                    pass
                else:
                    self._lease_etags[(row, owner)] = str(written["etag"])
                    held.add(key)
                    return
                try:
                    current = await table.get_entity(partition, row)
                except ResourceNotFoundError:
                    continue  # released meanwhile: insert again
                if current.get("owner") != owner and _plain_utc(current["expires"]) > now:
                    self._lease_etags.pop((row, owner), None)
                    return  # held elsewhere
                try:
                    written = await table.update_entity(entity(key), mode=UpdateMode.REPLACE,
                                                        etag=current.metadata["etag"],
                                                        match_condition=MatchConditions.IfNotModified)
                except (ResourceModifiedError, ResourceNotFoundError):
                    continue
                self._lease_etags[(row, owner)] = str(written["etag"])
                held.add(key)
                return

        async def run(chunk: Sequence[TableOp]) -> None:
            try:
                async with self._limit:
                    results = await table.submit_transaction([op.to_sdk() for op in chunk])
            except (TableTransactionError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                await self._each([by_row[op.row] for op in chunk], one)
                return
            for op, result in zip(chunk, results, strict=True):
                self._lease_etags[(op.row, owner)] = str(result["etag"])
                held.add(by_row[op.row])

        await _settle(run(chunk) for chunk in plan_transactions([op] for op in ops))
        return held

    async def release_leases(self, keys: Sequence[str], owner: str) -> None:
        """Release the leases of `keys` that `owner` holds: deletes under the ETag of the lease as last written,
        in transactions of 100 (a lease that expired and was taken over since has another ETag: left alone)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return
        table = await self._table("leases")
        by_row = {self._lease_address(key)[1]: key for key in unique}

        async def one(key: str) -> None:
            partition, row = self._lease_address(key)
            etag = self._lease_etags.pop((row, owner), None)
            if etag is None:
                try:
                    current = await table.get_entity(partition, row)
                except ResourceNotFoundError:
                    return
                if current.get("owner") != owner:
                    return
                etag = str(current.metadata["etag"])
            with contextlib.suppress(ResourceModifiedError, ResourceNotFoundError):
                await table.delete_entity(partition, row, etag=etag, match_condition=MatchConditions.IfNotModified)

        known = [TableOp("delete", dict(zip(("PartitionKey", "RowKey"), self._lease_address(key), strict=True)),
                         self._lease_etags[(self._lease_address(key)[1], owner)])
                 for key in unique if (self._lease_address(key)[1], owner) in self._lease_etags]
        unknown = [key for key in unique if (self._lease_address(key)[1], owner) not in self._lease_etags]

        async def run(chunk: Sequence[TableOp]) -> None:
            try:
                async with self._limit:
                    await table.submit_transaction([op.to_sdk() for op in chunk])
            except (TableTransactionError, ResourceModifiedError, ResourceNotFoundError):
                await self._each([by_row[op.row] for op in chunk], one)
                return
            for op in chunk:
                self._lease_etags.pop((op.row, owner), None)

        await _settle([*(run(chunk) for chunk in plan_transactions([op] for op in known)),
                       *(one(key) for key in unknown)])
