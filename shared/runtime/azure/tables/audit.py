"""The audit ledger in Table Storage: append-only rows keyed to read newest first, and a per-record index."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

from shared.core.ports import AuditDecision, AuditEntry
from shared.runtime.azure.tables.client import TablesBase, _plain_utc
from shared.runtime.azure.tables.keys import _utf8, escape_key, join_string, split_string, table_key
from shared.runtime.azure.tables.transactions import TableOp, plan_transactions
from shared.runtime.common import to_utc

_MAX_TICKS = 3_155_378_975_999_999_999  # .NET DateTime.MaxValue.Ticks: inverted ticks stay positive
_EPOCH_0001 = datetime(1, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MAX_SEQUENCE = 10**19 - 1


_sequence_lock = threading.Lock()
_last_sequence = 0


def _next_sequence(count: int) -> int:
    """First of `count` strictly increasing numbers (nanosecond clock, never repeating within a process)."""
    global _last_sequence
    with _sequence_lock:
        first = max(_last_sequence + 1, time.time_ns())
        _last_sequence = first + count - 1
        return first


def audit_keys(at: datetime, sequence: int) -> tuple[str, str]:
    """(PartitionKey, RowKey) of an audit entry: both count down, so a plain scan reads newest first."""
    at = to_utc(at)
    day: date = at.date()
    partition = f"{99_999_999 - int(day.strftime('%Y%m%d')):08d}_{day.isoformat()}"
    ticks = (at - _EPOCH_0001) // _MICROSECOND * 10  # .NET ticks are 100 ns
    row = f"{_MAX_TICKS - ticks:019d}_{_MAX_SEQUENCE - sequence:019d}_{uuid.uuid4().hex[:12]}"
    return partition, row


def audit_index_keys(system: str, key: str, row: str) -> tuple[str, str] | None:
    """(PartitionKey, RowKey) of an entry's copy in the `auditkeys` index: one partition per system, rows
    `{escaped key}|{the ledger RowKey}`, so one record's entries are one range query, newest first.

    None when the key is too long for a RowKey once escaped: that entry is in the ledger but not in the index.
    """
    try:
        return table_key("audit", system), table_key(key, row)
    except ValueError:
        return None


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(
        at=_plain_utc(row["at"]),
        correlation_id=str(row["correlation_id"]),
        flow=str(row["flow"]),
        decision=cast(AuditDecision, row["decision"]),
        system=str(row["system"]),
        table=str(row["table"]),
        key=str(row["key"]),
        detail=join_string(row, "detail"),
        reason=str(row["reason"]) if row.get("reason") is not None else None,
    )


class AuditTables(TablesBase):
    """The audit ledger: appends, newest-first reads, and reads of one record's entries through the index."""

    async def append_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Append decisions to the ledger (there is no API to change or remove them)."""
        if not entries:
            return
        table = await self._table("audit")
        first = _next_sequence(len(entries))
        ops: list[TableOp] = []
        index_ops: list[TableOp] = []
        for number, entry in enumerate(entries):
            partition, row = audit_keys(entry.at, first + number)
            entity: dict[str, Any] = {
                "PartitionKey": partition,
                "RowKey": row,
                "at": to_utc(entry.at),
                "correlation_id": entry.correlation_id,
                "flow": entry.flow,
                "decision": entry.decision,
                "system": entry.system,
                "table": entry.table,
                "key": entry.key,
                # free text of any length (an error body, say): spread over parts like snapshot values
                **split_string("detail", entry.detail, what=f"the audit detail of {entry.key!r}"),
            }
            if entry.reason is not None:
                entity["reason"] = entry.reason
            ops.append(TableOp("create", entity))
            index = audit_index_keys(entry.system, entry.key, row)
            if index is not None:
                index_ops.append(TableOp("create", {**entity, "PartitionKey": index[0], "RowKey": index[1]}))
        # The index copies go in transactions of their own partitions (one per system): a batch of n entries
        # about one or two systems costs about 2·n/100 transactions instead of n/100.
        await asyncio.gather(
            self._submit(table, plan_transactions([op] for op in ops), ordered=False),
            self._submit(await self._table("auditkeys"), plan_transactions([op] for op in index_ops), ordered=False),
        )

    async def read_audit_for(self, system: str, keys: Sequence[str], *, limit: int = 100) -> list[AuditEntry]:
        """The entries about records `keys` of `system`, newest first, at most `limit`: one range query per key
        in the index partition of `system` (entries appended before the index existed are not found)."""
        unique = list(dict.fromkeys(keys))  # escaped in the keys, so even a lone surrogate can be asked for
        if limit <= 0 or not unique:
            return []
        table = await self._table("auditkeys")
        partition = table_key("audit", system)

        async def one(key: str) -> list[tuple[str, AuditEntry]]:
            prefix = escape_key(key) + "|"
            # "}" follows "|" and escape_key emits neither: [prefix, prefix-with-"}") is exactly this key's rows
            parameters = {"pk": partition, "lo": prefix, "hi": escape_key(key) + "}"}
            found: list[tuple[str, AuditEntry]] = []
            async for row in self._query(table, "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                                         parameters, page=min(limit, 1000)):
                found.append((str(row["RowKey"])[len(prefix):], _entry(row)))
                if len(found) >= limit:
                    break
            return found

        per_key = await self._each(unique, one)
        # the ledger RowKey after the prefix counts down (inverted ticks, inverted sequence): ascending is newest first
        merged = sorted((item for items in per_key for item in items), key=lambda item: item[0])
        return [entry for _, entry in merged[:limit]]

    async def read_audit(
        self, *, limit: int = 100, correlation_id: str | None = None, decision: str | None = None
    ) -> list[AuditEntry]:
        """Newest first (by `at`, then by append order for equal times), optionally filtered."""
        if limit <= 0:
            return []
        table = await self._table("audit")
        conditions: list[str] = []
        parameters: dict[str, Any] = {}
        if correlation_id is not None and _utf8(correlation_id):
            conditions.append("correlation_id eq @correlation_id")
            parameters["correlation_id"] = correlation_id
        if decision is not None:
            conditions.append("decision eq @decision")
            parameters["decision"] = decision
        query_filter = " and ".join(conditions) or None
        found: list[AuditEntry] = []
        async for row in self._query(table, query_filter, parameters, page=min(limit, 1000)):
            if correlation_id is not None and str(row["correlation_id"]) != correlation_id:
                continue  # one with a lone surrogate cannot travel in the URL's $filter: matched here instead
            found.append(_entry(row))
            if len(found) >= limit:
                break
        return found
