"""In-memory fakes of the connector ports for unit tests of the pure core (they record what happened)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from shared.core.errors import RejectedError
from shared.core.ports import SourceRecord, WriteOp, WriteResult


class FakeSystem:
    """A RecordSink + ChangeSource over dicts. `fail_keys` makes writes to those source keys fail."""

    def __init__(self, system: str, *, key_style: str = "guid") -> None:
        self.system = system
        self.tables: dict[str, dict[str, dict[str, Any]]] = {}
        self.writes: list[WriteOp] = []
        self.write_calls = 0
        self.fail_match: dict[str, RejectedError] = {}
        self.attachments: dict[tuple[str, str], bytes] = {}
        self._key_style = key_style
        self._counter = itertools.count(1)

    def new_key(self) -> str:
        raw = str(uuid.uuid4())
        return "{" + raw.upper() + "}" if self._key_style == "globalid" else raw

    def put(self, table: str, key: str, values: dict[str, Any]) -> None:
        self.tables.setdefault(table, {})[key] = dict(values)

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        self.write_calls += 1
        results = []
        for op in ops:
            self.writes.append(op)
            rows = self.tables.setdefault(op.table, {})
            match_value = next(iter(op.match.values())) if op.match else None
            if match_value is not None and match_value in self.fail_match:
                results.append(WriteResult(op.op_id, False, error=self.fail_match[match_value]))
                continue
            if op.action == "delete":
                rows.pop(op.key or "", None)
                results.append(WriteResult(op.op_id, True, key=op.key))
                continue
            key = op.key
            created = False
            if key is None and op.match:
                field, value = next(iter(op.match.items()))
                key = next((k for k, r in rows.items() if r.get(field) == value), None)
                if key is None:
                    key, created = self.new_key(), True
                    rows[key] = {field: value}
            if key is None or (op.action == "update" and key not in rows):
                results.append(WriteResult(op.op_id, False, error=RejectedError(f"{op.table} {key} missing")))
                continue
            row = rows.setdefault(key, {})
            row.update(op.values)
            for nav, bind in op.binds.items():
                row[nav] = bind.key
            if op.lines is not None:
                # lines are upserted under the header by their match field, header fields copied on
                line_rows = self.tables.setdefault(op.lines.table, {})
                for item in op.lines.items:
                    field, value = next(iter(item.match.items()))
                    line_key = next((k for k, r in line_rows.items() if r.get(field) == value), None) or self.new_key()
                    line = line_rows.setdefault(line_key, {field: value, "@header": key})
                    line.update(item.values)
                    line.update({f: row.get(h, key) for f, h in op.lines.parent_fields.items()})
            results.append(WriteResult(op.op_id, True, key=key, created=created))
        return results

    async def select(self, table: str, *, equals: Mapping[str, Any],
                     not_in: Mapping[str, Sequence[Any]] | None = None) -> list[SourceRecord]:
        out = []
        for key, row in self.tables.get(table, {}).items():
            if all(row.get(f) in v if isinstance(v, list | tuple) else row.get(f) == v
                   for f, v in equals.items()) and not any(
                row.get(f) in vs for f, vs in (not_in or {}).items()
            ):
                out.append(SourceRecord(key, dict(row)))
        return out

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        rows = self.tables.get(table, {})
        return {k: SourceRecord(k, dict(rows[k])) for k in keys if k in rows}

    async def changes_since(self, table: str, checkpoint: str | None) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        rows = self.tables.get(table, {})
        yield [SourceRecord(k, dict(v)) for k, v in rows.items()], str(len(rows))

    async def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        yield [SourceRecord(k, dict(v)) for k, v in self.tables.get(table, {}).items()]

    async def fetch_attachment(self, table: str, key: str, attachment_id: str) -> bytes:
        return self.attachments[(key, attachment_id)]
