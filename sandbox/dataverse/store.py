"""The record store: rows with their key and column indexes kept in step, versions, child links, rollups."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from sandbox.dataverse.codecs import _coerce, _decimal, _money, _norm, _now_text
from sandbox.dataverse.protocol import ODataError, _Caller, _Txn
from sandbox.dataverse.rows import Row, _ColumnIndex
from sandbox.dataverse.schema import Rollup, TableSchema
from sandbox.dataverse.state import _State


class _Store(_State):
    """Tables of rows with their indexes, and the direct helpers tests and seeds use (no validation).

    A part of `DataverseSimulator` (app.py), which holds the state these methods use.
    """

    def insert(self, entity_set: str, values: Mapping[str, Any]) -> str:
        """Store a record as-is (no business validation, no webhook): lookups as logical name -> GUID. Returns
        the id. Every column must be one the table declares (seeds cannot invent columns the org lacks).

        What the platform derives is filled in all the same (a contact's full name, an order's number and
        total, a line's number and amount), and a parent whose total changes gets a new version.
        """
        return self.insert_many(entity_set, [values])[0]

    def insert_many(self, entity_set: str, rows: Iterable[Mapping[str, Any]]) -> list[str]:
        """`insert` for many records of one table at once (bulk seeds): one lock, one timestamp, and each
        parent's rollup recomputed once at the end instead of once per child. Returns the ids in order."""
        schema = self.schema[entity_set]
        now = _now_text()
        derives = self._derives(schema)
        parents: dict[tuple[str, str], TableSchema] = {}
        keys: list[str] = []
        with self._lock:
            for values in rows:
                unknown = sorted(set(values) - set(schema.columns))
                if unknown:
                    raise ValueError(f"{entity_set}: {', '.join(unknown)} not declared by the table schema")
                vals = dict(values)
                key = str(vals.get(schema.primary_id) or uuid.uuid4()).lower()
                vals[schema.primary_id] = key
                vals.setdefault("createdon", now)
                vals.setdefault("modifiedon", vals["createdon"])
                vals.setdefault("createdby", self.office_user_id)
                vals.setdefault("modifiedby", vals["createdby"])
                vals.setdefault("ownerid", vals["createdby"])
                lookup_types = {c: self._target_logical(schema, c, vals) for c in schema.lookups if vals.get(c)}
                if derives:
                    self._platform_fixups(schema, vals, lookup_types, creating=True)
                version = self._next_version()
                vals["versionnumber"] = version
                self._put_row(schema, key, Row(vals, version, lookup_types))
                for parent, parent_key in self._rollup_parents(schema, vals):
                    parents[(parent.entity_set, parent_key)] = parent
                keys.append(key)
            for (_, parent_key), parent in parents.items():
                self._refresh_rollup_directly(parent, parent_key, now)
        return keys

    def get(self, entity_set: str, key: str) -> dict[str, Any] | None:
        """A copy of a record's stored values (logical names), or None."""
        with self._lock:
            row = self._tables[entity_set].get(key.lower())
            return dict(row.values) if row else None

    def all(self, entity_set: str) -> list[dict[str, Any]]:
        """Copies of every record of an entity set."""
        with self._lock:
            return [dict(r.values) for r in self._tables[entity_set].values()]

    def _find(self, schema: TableSchema, key: str | dict[str, Any]) -> Row | None:
        rows = self._tables[schema.entity_set]
        if isinstance(key, str):
            return rows.get(key)
        if set(key) == {schema.primary_id} and isinstance(key[schema.primary_id], str):
            return rows.get(key[schema.primary_id].lower())
        cols = tuple(sorted(key))
        if cols not in [tuple(sorted(k)) for k in schema.alternate_keys]:
            raise ODataError(
                400, "0x80060888",
                f"The key in the request URI is not valid for resource 'Microsoft.Dynamics.CRM.{schema.logical_name}'. "
                "Ensure that the names and number of key properties match the declared or alternate key properties "
                f"for the resource 'Microsoft.Dynamics.CRM.{schema.logical_name}'.")
        declared = next(k for k in schema.alternate_keys if tuple(sorted(k)) == cols)
        wanted = tuple(_norm(_coerce(schema, c, key[c]), schema.columns[c]) for c in declared)
        pk = self._key_index[schema.entity_set][declared].get(wanted)
        return rows.get(pk) if pk is not None else None

    @staticmethod
    def _key_text(key: str | dict[str, Any]) -> str:
        if isinstance(key, str):
            return key
        return ",".join(f"{k}:{v}" for k, v in key.items())

    def _empty_index(self) -> dict[str, dict[tuple[str, ...], dict[tuple[Any, ...], str]]]:
        return {s: {cols: {} for cols in t.alternate_keys} for s, t in self.schema.items()}

    def _empty_column_index(self) -> dict[str, dict[str, _ColumnIndex]]:
        """entity set -> an equality index per lookup and alternate-key column (`$filter` fast path)."""
        out: dict[str, dict[str, _ColumnIndex]] = {}
        for entity_set, table in self.schema.items():
            cols = set(table.lookups) | {c for key in table.alternate_keys for c in key}
            cols.discard(table.primary_id)
            out[entity_set] = {c: _ColumnIndex(table.columns[c]) for c in sorted(cols) if c in table.columns}
        return out

    def _index_entries(self, schema: TableSchema, values: Mapping[str, Any]) -> list[tuple[tuple[str, ...],
                                                                                          tuple[Any, ...]]]:
        out = []
        for cols in schema.alternate_keys:
            raw = [values.get(c) for c in cols]
            if all(v is not None for v in raw):  # alternate-key indexes ignore rows with null key values
                out.append((cols, tuple(_norm(v, schema.columns[c]) for v, c in zip(raw, cols, strict=True))))
        return out

    def _put_row(self, schema: TableSchema, key: str, row: Row | None) -> None:
        """Store (or remove, row=None) a record, keeping the alternate-key index in step."""
        rows = self._tables[schema.entity_set]
        index = self._key_index[schema.entity_set]
        children = self._children.get(schema.entity_set)
        column_index = self._column_index[schema.entity_set]
        old = rows.get(key)
        if old is not None:
            for col, col_index in column_index.items():
                col_index.discard(key, old.values.get(col))
            for cols, normed in self._index_entries(schema, old.values):
                if index[cols].get(normed) == key:
                    del index[cols][normed]
            for col, by_parent in (children or {}).items():
                parent = str(old.values.get(col) or "").lower()
                if parent and parent in by_parent:
                    by_parent[parent].discard(key)
                    if not by_parent[parent]:
                        del by_parent[parent]
        if row is None:
            rows.pop(key, None)
            return
        rows[key] = row
        for col, col_index in column_index.items():
            col_index.add(key, row.values.get(col))
        for cols, normed in self._index_entries(schema, row.values):
            index[cols][normed] = key
        for col, by_parent in (children or {}).items():
            parent = str(row.values.get(col) or "").lower()
            if parent:
                by_parent.setdefault(parent, set()).add(key)

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    # ---- parent/child bookkeeping: line numbers and rollups need a record's children without a table scan

    def _collect_child_links(self) -> dict[str, tuple[str, ...]]:
        """child entity set -> its lookup columns whose children are indexed (rollups and line numbering)."""
        links: dict[str, set[str]] = {}
        for table in self.schema.values():
            for rollup in table.rollups.values():
                links.setdefault(rollup.child_set, set()).add(rollup.child_lookup)
            for parent_col in table.line_numbers.values():
                links.setdefault(table.entity_set, set()).add(parent_col)
        return {s: tuple(sorted(cols)) for s, cols in links.items() if s in self.schema}

    def _empty_children(self) -> dict[str, dict[str, dict[str, set[str]]]]:
        return {s: {c: {} for c in cols} for s, cols in self._child_links.items()}

    def _rollup_value(self, rollup: Rollup, parent: str) -> float:
        rows = self._tables.get(rollup.child_set, {})
        keys = self._children.get(rollup.child_set, {}).get(rollup.child_lookup, {}).get(parent, ())
        total = sum((_decimal(rows[k].values.get(rollup.child_column)) for k in keys if k in rows), Decimal(0))
        return _money(total)

    def _rollup_parents(self, schema: TableSchema, values: Mapping[str, Any] | None) -> list[tuple[TableSchema, str]]:
        """(parent table, parent key) of every rollup a record of `schema` with `values` contributes to."""
        if values is None:
            return []
        out: list[tuple[TableSchema, str]] = []
        for parent, child_lookup in self._rollup_links.get(schema.entity_set, ()):
            key = values.get(child_lookup)
            if key and (parent, str(key).lower()) not in out:
                out.append((parent, str(key).lower()))
        return out

    def _refresh_rollups(self, parents: Iterable[tuple[TableSchema, str]], caller: _Caller, txn: _Txn) -> None:
        """Recompute the parents' rollups; a changed total is an Update of the parent (new version, webhook)."""
        for parent, key in parents:
            row = self._tables[parent.entity_set].get(key)
            if row is None:
                continue
            if any(self._rollup_value(r, key) != row.values.get(c) for c, r in parent.rollups.items()):
                self._update(parent, row, {}, {}, caller, txn)

    def _refresh_rollup_directly(self, parent: TableSchema, key: str, now: str) -> None:
        """`_refresh_rollups` for the direct helpers: the parent's total and version change, no webhook fires."""
        row = self._tables[parent.entity_set].get(key)
        if row is None:
            return
        totals = {c: self._rollup_value(r, key) for c, r in parent.rollups.items()}
        if all(row.values.get(c) == v for c, v in totals.items()):
            return
        version = self._next_version()
        merged = {**row.values, **totals, "modifiedon": now, "versionnumber": version}
        self._put_row(parent, key, Row(merged, version, dict(row.lookup_types)))
