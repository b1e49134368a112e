"""Web API writes: create, update, delete, upsert by key, the bulk messages, and UI-style edits."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sandbox.dataverse.codecs import _coerce, _now_text
from sandbox.dataverse.metadata import BULK_MESSAGES, supports_bulk
from sandbox.dataverse.protocol import (
    API_PREFIX,
    NAMESPACE,
    SYSTEM_READONLY,
    ODataError,
    _ApiRequest,
    _ApiResponse,
    _bad_property,
    _Caller,
    _Event,
    _not_found,
    _prefer,
    _Txn,
)
from sandbox.dataverse.query import _SEGMENT_RE, _parse_key_predicate
from sandbox.dataverse.rows import Row
from sandbox.dataverse.schema import TableSchema
from sandbox.dataverse.state import _State
from shared.payloads import strict_loads


class _Writes(_State):
    """POST/PATCH/DELETE and the bound CreateMultiple/UpdateMultiple/UpsertMultiple actions.

    A part of `DataverseSimulator` (app.py), which holds the state these methods use.
    """

    def apply_change(
        self,
        entity_set: str,
        values: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        delete: bool = False,
        user_id: str | None = None,
    ) -> str:
        """Emulate a user editing in the D365 UI: create / update / delete one record and fire webhooks.

        `values` use logical names (lookups as logical name -> GUID) and are validated like API writes.
        """
        schema = self.schema[entity_set]
        caller = _Caller(user_id or self.office_user_id, str(uuid.uuid4()))
        txn = _Txn()
        with self._lock:
            if delete:
                if key is None or key.lower() not in self._tables[entity_set]:
                    raise _not_found(schema.logical_name, str(key))
                self._delete(schema, key.lower(), caller, txn)
                result = key.lower()
            else:
                vals: dict[str, Any] = {}
                lookup_types: dict[str, str] = {}
                for col, v in (values or {}).items():
                    if col not in schema.columns:
                        raise _bad_property(schema.logical_name, col)
                    if schema.columns[col] == "lookup":
                        vals[col] = None if v is None else str(v).lower()
                        if v is not None:
                            lookup_types[col] = self._target_logical(schema, col, {col: v})
                    elif col not in SYSTEM_READONLY and col not in schema.computed:
                        vals[col] = _coerce(schema, col, v)
                existing = self._tables[entity_set].get(key.lower()) if key else None
                if existing is None:
                    result = self._create(schema, vals, lookup_types, key, caller, txn)
                else:
                    self._update(schema, existing, vals, lookup_types, caller, txn)
                    result = existing.values[schema.primary_id]
        self._emit(txn.events)
        return result

    def _create(self, schema: TableSchema, values: dict[str, Any], lookup_types: dict[str, str],
                key: str | None, caller: _Caller, txn: _Txn) -> str:
        rows = self._tables[schema.entity_set]
        new_key = (key or values.get(schema.primary_id) or str(uuid.uuid4())).lower()
        if new_key in rows:
            raise ODataError(412, "0x80040237", "A record with matching key values already exists.")
        vals = {**schema.defaults, **values}
        vals[schema.primary_id] = new_key
        self._platform_fixups(schema, vals, lookup_types, written=values, creating=True)
        self._check_required(schema, vals)
        self._check_unique(schema, vals, None)
        self._check_registration(schema, vals)
        now = _now_text()
        version = self._next_version()
        vals.update({"createdon": now, "modifiedon": now, "createdby": caller.user_id, "modifiedby": caller.user_id,
                     "ownerid": caller.user_id, "versionnumber": version})
        lt = {**lookup_types, "createdby": "systemuser", "modifiedby": "systemuser", "ownerid": "systemuser"}
        self._put_row(schema, new_key, Row(vals, version, lt))
        txn.undo.append(lambda: self._put_row(schema, new_key, None))
        # Derived and defaulted columns travel in the Target like the platform's pre-operation additions do.
        derived = {c: vals[c] for c in (*schema.computed, *schema.defaults, *schema.autonumber, *schema.line_numbers)
                   if vals.get(c) is not None}
        target = {**values, **derived, schema.primary_id: new_key, "createdon": now, "modifiedon": now,
                  "createdby": caller.user_id, "modifiedby": caller.user_id, "ownerid": caller.user_id}
        txn.events.append(_Event("Create", schema.entity_set, new_key, target, dict(vals), None, dict(lt),
                                 caller.user_id, caller.correlation_id, datetime.now(UTC)))
        self._refresh_rollups(self._rollup_parents(schema, vals), caller, txn)
        return new_key

    def _update(self, schema: TableSchema, row: Row, values: dict[str, Any], lookup_types: dict[str, str],
                caller: _Caller, txn: _Txn) -> Row:
        before = row
        merged = {**row.values, **values}
        self._platform_fixups(schema, merged, lookup_types, written=values)
        self._check_required(schema, merged)
        key = row.values[schema.primary_id]
        self._check_unique(schema, merged, key)
        self._check_registration(schema, merged)
        now = _now_text()
        version = self._next_version()
        merged.update({"modifiedon": now, "modifiedby": caller.user_id, "versionnumber": version})
        new_row = Row(merged, version, {**row.lookup_types, **lookup_types, "modifiedby": "systemuser"})
        self._put_row(schema, key, new_row)
        txn.undo.append(lambda: self._put_row(schema, key, before))
        derived = {c: merged.get(c) for c in (*schema.computed, *(("statuscode",) if schema.status_by_state else ()))
                   if merged.get(c) != before.values.get(c)}
        target = {**values, **derived, schema.primary_id: key, "modifiedon": now, "modifiedby": caller.user_id}
        txn.events.append(_Event("Update", schema.entity_set, key, target, dict(merged), dict(before.values),
                                 dict(new_row.lookup_types), caller.user_id, caller.correlation_id, datetime.now(UTC)))
        # A line moved to another order changes both orders' totals.
        parents = self._rollup_parents(schema, before.values)
        parents += [p for p in self._rollup_parents(schema, merged) if p not in parents]
        self._refresh_rollups(parents, caller, txn)
        return new_row

    def _delete(self, schema: TableSchema, key: str, caller: _Caller, txn: _Txn, *, rollup: bool = True) -> None:
        row = self._tables[schema.entity_set][key]
        for rolled in schema.rollups.values():
            # The parental relationship cascades: an order's lines go with it (each a Delete of its own),
            # without recomputing the total of an order that is going away.
            child = self.schema[rolled.child_set]
            for child_key in sorted(self._children[rolled.child_set][rolled.child_lookup].get(key, ())):
                if child_key in self._tables[rolled.child_set]:
                    self._delete(child, child_key, caller, txn, rollup=False)
        self._put_row(schema, key, None)
        version = self._next_version()
        deleted = self._deleted[schema.entity_set]
        deleted.append((version, key))
        entry = deleted[-1]

        def undo() -> None:
            self._put_row(schema, key, row)
            if entry in deleted:
                deleted.remove(entry)

        txn.undo.append(undo)
        txn.events.append(_Event("Delete", schema.entity_set, key, {}, None, dict(row.values), dict(row.lookup_types),
                                 caller.user_id, caller.correlation_id, datetime.now(UTC)))
        if rollup:
            self._refresh_rollups(self._rollup_parents(schema, row.values), caller, txn)

    def _write_response(self, req: _ApiRequest, schema: TableSchema, row: Row, created: bool) -> _ApiResponse:
        key = row.values[schema.primary_id]
        entity_url = f"{req.base}{API_PREFIX}{schema.entity_set}({key})"
        etag = f'W/"{row.version}"'
        if _prefer(req.headers).get("return") == "representation":
            select = self._select(schema, req)
            body = {"@odata.context": f"{req.base}{API_PREFIX}$metadata#{schema.entity_set}/$entity",
                    **self._render(schema, row, select, False)}
            return self._json(201 if created else 200, body,
                              {"ETag": etag, "Preference-Applied": "return=representation"})
        return _ApiResponse(204, {"OData-Version": "4.0", "OData-EntityId": entity_url, "Location": entity_url,
                                  "ETag": etag})

    def _load_body(self, req: _ApiRequest) -> Any:
        try:
            return strict_loads(req.body or b"{}")
        except ValueError as exc:
            raise ODataError(400, "0x80060888", f"The request body is not valid JSON: {exc}") from exc

    def _post(self, req: _ApiRequest, schema: TableSchema, caller: _Caller, txn: _Txn) -> _ApiResponse:
        values, lookup_types = self._prepare(schema, self._load_body(req), req.base)
        key = self._create(schema, values, lookup_types, None, caller, txn)
        return self._write_response(req, schema, self._tables[schema.entity_set][key], True)

    def _patch(self, req: _ApiRequest, schema: TableSchema, key: str | dict[str, Any], caller: _Caller,
               txn: _Txn) -> _ApiResponse:
        row = self._find(schema, key)
        if_match = req.headers.get("if-match")
        if_none_match = req.headers.get("if-none-match")
        values, lookup_types = self._prepare(schema, self._load_body(req), req.base)
        if row is None:
            if if_match is not None:
                raise _not_found(schema.logical_name, self._key_text(key))
            # Upsert-create: URL key values seed the record, body values win (per the upsert doc).
            seed: dict[str, Any] = {}
            new_key: str | None = None
            if isinstance(key, str):
                new_key = key
            else:
                for col, v in key.items():
                    if col == schema.primary_id:
                        new_key = str(v).lower()
                    else:
                        seed[col] = _coerce(schema, col, v)
            created = self._create(schema, {**seed, **values}, lookup_types, new_key, caller, txn)
            return self._write_response(req, schema, self._tables[schema.entity_set][created], True)
        if if_none_match == "*":
            raise ODataError(412, "0x80040237", "A record with matching key values already exists.")
        if if_match not in (None, "*") and if_match != f'W/"{row.version}"':
            raise ODataError(412, "0x80060882", "The version of the existing record doesn't match the RowVersion "
                             "property provided.")
        # Key columns in the body of an update through that key are dropped (they cannot change via their own URL).
        if isinstance(key, dict):
            for col in key:
                values.pop(col, None)
        values.pop(schema.primary_id, None)
        updated = self._update(schema, row, values, lookup_types, caller, txn)
        return self._write_response(req, schema, updated, False)

    # ------------------------------------------------------------------------------------ bulk messages

    def _bound_action(self, req: _ApiRequest, schema: TableSchema, action: str, caller: _Caller,
                      txn: _Txn) -> _ApiResponse:
        """CreateMultiple / UpdateMultiple / UpsertMultiple bound to the entity set: `{"Targets": [...]}`, each
        target typed with `@odata.type`; one transaction (any refused target rolls every one back)."""
        if action not in BULK_MESSAGES:
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{NAMESPACE}.{action}'.")
        if req.method != "POST":
            raise ODataError(405, "0x80060888", f"The HTTP method '{req.method}' is not allowed on the action "
                             f"'{NAMESPACE}.{action}'.")
        if not supports_bulk(schema):
            raise ODataError(400, "0x80060888", f"The '{action}' method does not support entities of type "
                             f"'{schema.logical_name}'. MessageProcessorCache returned MessageProcessor.Empty.")
        body = self._load_body(req)
        if not isinstance(body, dict):
            raise ODataError(400, "0x80060888", "The request body must be a JSON object.")
        for name in body:
            if name != "Targets":
                raise ODataError(400, "0x80060888", f"The parameter '{name}' in the request payload is not a valid "
                                 f"parameter for the operation '{action}'.")
        targets = body.get("Targets")
        if not isinstance(targets, list) or not targets:
            raise ODataError(400, "0x80060888", f"The '{action}' operation needs a non-empty 'Targets' collection.")
        wanted = f"{NAMESPACE}.{schema.logical_name}"
        for i, target in enumerate(targets):
            if not isinstance(target, dict):
                raise ODataError(400, "0x80060888", f"Targets[{i}] must be a JSON object.")
            typ = target.get("@odata.type")
            if not isinstance(typ, str):
                # The parameter is a collection of the abstract crmbaseentity: an untyped item cannot be read.
                raise ODataError(400, "0x80060888", f"Targets[{i}] has no '@odata.type' annotation: every item of "
                                 f"the Targets parameter must name its type (expected '{wanted}').")
            if typ.lstrip("#") != wanted:
                raise ODataError(400, "0x80060888", f"Targets[{i}] is of type '{typ.lstrip('#')}': every record of "
                                 f"'{action}' on '{schema.entity_set}' must be of type '{wanted}'.")
        ids: list[str] = []
        for target in targets:
            if action == "CreateMultiple":
                values, lookup_types = self._prepare(schema, target, req.base)
                ids.append(self._create(schema, values, lookup_types, None, caller, txn))
            elif action == "UpdateMultiple":
                values, lookup_types = self._prepare(schema, target, req.base)
                pid = values.pop(schema.primary_id, None)
                row = self._find(schema, str(pid).lower()) if pid is not None else None
                if row is None:
                    raise _not_found(schema.logical_name, str(pid))
                self._update(schema, row, values, lookup_types, caller, txn)
            else:
                self._upsert_target(req, schema, target, caller, txn)
        if action == "CreateMultiple":
            return self._json(200, {"@odata.context": f"{req.base}{API_PREFIX}$metadata#{NAMESPACE}."
                                    "CreateMultipleResponse", "Ids": ids})
        return _ApiResponse(204, {"OData-Version": "4.0"})

    def _upsert_target(self, req: _ApiRequest, schema: TableSchema, target: Mapping[str, Any], caller: _Caller,
                       txn: _Txn) -> None:
        """One UpsertMultiple item: identified by `@odata.id` (a key URL, alternate keys allowed), else by its
        primary id or a complete alternate key in the body; created when no record matches."""
        values, lookup_types = self._prepare(schema, target, req.base)
        key: str | dict[str, Any] | None = None
        ref = target.get("@odata.id")
        if ref is not None:
            text = str(ref)
            text = text.split(API_PREFIX, 1)[1] if API_PREFIX in text else text.lstrip("/")
            m = _SEGMENT_RE.match(text)
            if m is None or m.group("name") != schema.entity_set or m.group("key") is None:
                raise ODataError(400, "0x80060888", f"The @odata.id '{ref}' does not identify a record of "
                                 f"'{schema.entity_set}'.")
            key = _parse_key_predicate(m.group("key"))
        elif values.get(schema.primary_id) is not None:
            key = str(values[schema.primary_id]).lower()
        else:
            cols = next((k for k in schema.alternate_keys if all(values.get(c) is not None for c in k)), None)
            if cols is not None:
                key = {c: values[c] for c in cols}
        row = self._find(schema, key) if key is not None else None
        if row is None:
            seed: dict[str, Any] = {}
            new_key: str | None = None
            if isinstance(key, str):
                new_key = key
            elif isinstance(key, dict):
                for col, v in key.items():
                    if col == schema.primary_id:
                        new_key = str(v).lower()
                    else:
                        seed[col] = _coerce(schema, col, v)
            self._create(schema, {**seed, **values}, lookup_types, new_key, caller, txn)
            return
        for col in key if isinstance(key, dict) else ():
            values.pop(col, None)
        values.pop(schema.primary_id, None)
        self._update(schema, row, values, lookup_types, caller, txn)

    def _delete_request(self, req: _ApiRequest, schema: TableSchema, key: str | dict[str, Any], caller: _Caller,
                        txn: _Txn) -> _ApiResponse:
        row = self._find(schema, key)
        if row is None:
            raise _not_found(schema.logical_name, self._key_text(key))
        if_match = req.headers.get("if-match")
        if if_match not in (None, "*") and if_match != f'W/"{row.version}"':
            raise ODataError(412, "0x80060882", "The version of the existing record doesn't match the RowVersion "
                             "property provided.")
        self._delete(schema, row.values[schema.primary_id], caller, txn)
        return _ApiResponse(204, {"OData-Version": "4.0"})
