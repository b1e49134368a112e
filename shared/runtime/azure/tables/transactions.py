"""Entity group transactions: one operation (`TableOp`) and the planner that cuts batches into legal transactions."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final, Literal

from azure.core import MatchConditions
from azure.data.tables import UpdateMode

#: Operations per entity group transaction (service limit).
MAX_TRANSACTION_OPS: Final = 100
#: Estimated payload per transaction: the service caps a batch at 4 MiB; the margin covers multipart framing.
MAX_TRANSACTION_BYTES: Final = 3 * 1024 * 1024


OpKind = Literal["create", "upsert", "update", "delete"]


@dataclass(frozen=True)
class TableOp:
    """One operation of an entity group transaction; `etag` makes an update or delete conditional."""

    kind: OpKind
    entity: Mapping[str, Any]
    etag: str | None = None

    @property
    def partition(self) -> str:
        return str(self.entity["PartitionKey"])

    @property
    def row(self) -> str:
        return str(self.entity["RowKey"])

    @cached_property
    def size(self) -> int:
        """Upper bound of the operation's bytes in a batch body: its ASCII-escaped JSON plus the part headers."""
        return 1024 + len(json.dumps({name: str(value) for name, value in self.entity.items()}))

    def to_sdk(self) -> tuple[str, Mapping[str, Any], dict[str, Any]]:
        """The (operation, entity, kwargs) tuple of `TableClient.submit_transaction`."""
        kwargs: dict[str, Any] = {}
        if self.kind in ("upsert", "update"):
            kwargs["mode"] = UpdateMode.REPLACE
        if self.etag is not None:
            kwargs["etag"] = self.etag
            kwargs["match_condition"] = MatchConditions.IfNotModified
        return self.kind, self.entity, kwargs


def plan_transactions(
    groups: Iterable[Sequence[TableOp]],
    *,
    max_ops: int = MAX_TRANSACTION_OPS,
    max_bytes: int = MAX_TRANSACTION_BYTES,
) -> list[list[TableOp]]:
    """Pack operations into transactions of one partition, at most `max_ops` operations and `max_bytes`.

    A group (operations that belong together, such as both rows of one link) is kept in one transaction
    whenever it fits in one; only a group larger than a transaction is split. A transaction never names
    the same row twice (the service rejects that with InvalidDuplicateRow). The order of operations within
    a partition is kept; transactions come partition by partition in order of first appearance, and the
    transactions of one partition must be submitted one after the other.
    """
    if max_ops < 1 or max_bytes < 1:
        raise ValueError("a transaction must allow at least one operation and one byte")
    planned: dict[str, list[list[TableOp]]] = {}
    open_rows: dict[str, set[str]] = {}
    open_bytes: dict[str, int] = {}

    def fits_alone(ops: Sequence[TableOp]) -> bool:
        return (
            len(ops) <= max_ops
            and sum(op.size for op in ops) <= max_bytes
            and len({op.row for op in ops}) == len(ops)
        )

    def fits(partition: str, ops: Sequence[TableOp]) -> bool:
        chunk = planned[partition][-1]
        return (
            len(chunk) + len(ops) <= max_ops
            and open_bytes[partition] + sum(op.size for op in ops) <= max_bytes
            and not {op.row for op in ops} & open_rows[partition]
        )

    def start(partition: str) -> None:
        planned.setdefault(partition, []).append([])
        open_rows[partition] = set()
        open_bytes[partition] = 0

    def add(partition: str, op: TableOp) -> None:
        if planned[partition][-1] and not fits(partition, [op]):
            start(partition)
        planned[partition][-1].append(op)
        open_rows[partition].add(op.row)
        open_bytes[partition] += op.size

    for group in groups:
        if not group:
            continue
        partitions = {op.partition for op in group}
        if len(partitions) != 1:
            raise ValueError(f"a transaction group must stay within one partition, got {sorted(partitions)}")
        partition = group[0].partition
        if partition not in planned:
            start(partition)
        if fits_alone(group):
            if not fits(partition, group):
                start(partition)
            for op in group:
                add(partition, op)
        else:
            # Larger than any one transaction: keep the order, cut wherever a limit would be broken.
            for op in group:
                add(partition, op)
    return [chunk for chunks in planned.values() for chunk in chunks if chunk]

