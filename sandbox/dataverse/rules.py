"""Business rules of writes: binds, required and unique columns, registrations, derived columns."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from sandbox.dataverse.codecs import _coerce, _csv, _decimal, _money, _norm
from sandbox.dataverse.platform import (
    AUTH_HTTP_HEADER,
    AUTH_HTTP_QUERY_STRING,
    AUTH_WEBHOOK_KEY,
    CONTRACT_WEBHOOK,
    IMAGE_MESSAGE_PROPERTY,
    IMAGE_POST,
    IMAGE_PRE,
    parse_settings,
)
from sandbox.dataverse.protocol import (
    API_PREFIX,
    SYSTEM_READONLY,
    ODataError,
    _bad_property,
    _cannot_convert,
    _not_found,
)
from sandbox.dataverse.query import _SEGMENT_RE, _parse_key_predicate
from sandbox.dataverse.rows import Row
from sandbox.dataverse.schema import TableSchema
from sandbox.dataverse.state import _State

AUTONUMBER_SEED = 1001
"""The first `{SEQNUM}` an auto-number column hands out."""
AUTONUMBER_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
"""`{RANDSTRING}` characters (no 0/O or 1/I lookalikes)."""


class _Rules(_State):
    """What a write must satisfy and what the platform derives on it (names, numbers, states).

    A part of `DataverseSimulator` (app.py), which holds the state these methods use.
    """

    def _target_logical(self, schema: TableSchema, col: str, values: Mapping[str, Any]) -> str:
        if col in ("createdby", "modifiedby", "ownerid"):
            return "systemuser"
        if col == "objectid" and values.get("objecttypecode"):
            return str(values["objecttypecode"])
        targets = list(schema.lookups[col].navs.values())
        if len(targets) > 1:
            # A polymorphic lookup given as a bare GUID (direct helpers): the table holding that GUID decides.
            guid = str(values.get(col) or "").lower()
            held = next((t for t in targets if guid in self._tables.get(t, {})), None)
            if held is not None:
                return self.schema[held].logical_name
        target_set = targets[0]
        return self.schema[target_set].logical_name if target_set in self.schema else target_set

    def _resolve_bind(self, schema: TableSchema, nav: str, ref: Any, base: str) -> tuple[str, str | None, str]:
        """`nav@odata.bind` -> (lookup column, target GUID or None, target logical name)."""
        navs = schema.nav_index()
        if nav not in navs:
            raise ODataError(
                400, "0x80060888",
                f"An undeclared property '{nav}' which only has property annotations in the payload but no property "
                "value was found in the payload. In OData, only declared navigation properties and declared named "
                "streams can be represented as properties without values.")
        col, target_set = navs[nav]
        target_schema = self.schema.get(target_set)
        if target_schema is None:
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{target_set}'.")
        if ref is None:
            return col, None, target_schema.logical_name
        if not isinstance(ref, str):
            raise _cannot_convert(ref, "Edm.String")
        text = ref
        for prefix in (base + API_PREFIX, API_PREFIX, "/"):
            if text.startswith(prefix):
                text = text[len(prefix):]
                break
        m = _SEGMENT_RE.match(unquote(text))
        if m is None or m.group("key") is None:
            raise ODataError(400, "0x80060888", f"The URI '{ref}' in the '{nav}@odata.bind' annotation is not valid.")
        if m.group("name") != target_set:
            raise ODataError(400, "0x80060888", f"The entity set '{m.group('name')}' is not valid for the navigation "
                             f"property '{nav}' (expected '{target_set}').")
        key = _parse_key_predicate(m.group("key"))
        row = self._find(target_schema, key)
        if row is None:
            raise _not_found(target_schema.logical_name, self._key_text(key))
        return col, row.values[target_schema.primary_id], target_schema.logical_name

    def _prepare(self, schema: TableSchema, body: Any, base: str) -> tuple[dict[str, Any], dict[str, str]]:
        if not isinstance(body, dict):
            raise ODataError(400, "0x80060888", "The request body must be a JSON object.")
        values: dict[str, Any] = {}
        lookup_types: dict[str, str] = {}
        for name, value in body.items():
            if name.startswith("@odata."):
                continue
            if name.endswith("@odata.bind"):
                col, guid, target = self._resolve_bind(schema, name[: -len("@odata.bind")], value, base)
                values[col] = guid
                if guid is not None:
                    lookup_types[col] = target
                continue
            if "@" in name:
                continue
            if name.startswith("_") and name.endswith("_value") and name[1:-6] in schema.lookups:
                raise ODataError(400, "0x80060888", "CRM do not support direct update of Entity Reference "
                                 "properties, Use Navigation properties instead.")
            typ = schema.columns.get(name)
            if typ is None or typ == "lookup":
                raise _bad_property(schema.logical_name, name)
            if name in SYSTEM_READONLY or name in schema.computed:
                continue  # the platform ignores writes to system-managed columns
            values[name] = _coerce(schema, name, value)
        return values, lookup_types

    def _check_required(self, schema: TableSchema, values: Mapping[str, Any]) -> None:
        for col in sorted(schema.required):
            if values.get(col) in (None, ""):
                raise ODataError(400, "0x80044331", f"A validation error occurred. The value for the required "
                                 f"attribute '{col}' of '{schema.logical_name}' is missing.")

    def _check_unique(self, schema: TableSchema, values: Mapping[str, Any], own_key: str | None) -> None:
        for cols in schema.alternate_keys:
            wanted = [values.get(c) for c in cols]
            if any(v is None for v in wanted):
                continue  # alternate-key indexes ignore rows with null key values
            normed = tuple(_norm(v, schema.columns[c]) for v, c in zip(wanted, cols, strict=True))
            holder = self._key_index[schema.entity_set][cols].get(normed)
            if holder is not None and holder != own_key:
                raise ODataError(
                    412, "0x80040237",
                    f"A record that has the attribute values {', '.join(str(v) for v in wanted)} already exists. "
                    f"The entity key {schema.logical_name}_{'_'.join(cols)}_key requires that this set of "
                    "attributes contains unique values. Select unique values and try again.")

    def _check_registration(self, schema: TableSchema, values: Mapping[str, Any]) -> None:
        """The platform's checks on webhook registrations (service endpoints, steps and their images)."""
        def invalid(message: str) -> ODataError:
            return ODataError(400, "0x80040203", message)

        if schema.entity_set == "serviceendpoints" and values.get("contract") == CONTRACT_WEBHOOK:
            url = str(values.get("url") or "")
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
                raise invalid(f"A webhook needs an absolute http(s) url, got '{url}'.")
            auth = values.get("authtype")
            if auth not in (AUTH_WEBHOOK_KEY, AUTH_HTTP_HEADER, AUTH_HTTP_QUERY_STRING):
                raise invalid("A webhook's authtype must be WebhookKey (4), HttpHeader (5) or HttpQueryString (6).")
            if not values.get("authvalue"):
                raise invalid("A webhook needs an authvalue.")
            if auth != AUTH_WEBHOOK_KEY:
                try:
                    if not parse_settings(str(values["authvalue"])):
                        raise ValueError("no <setting> elements")
                except ValueError as exc:
                    raise invalid(f"The authvalue of an HttpHeader / HttpQueryString webhook must be "
                                  f"<settings><setting name=\"...\" value=\"...\" /></settings>: {exc}") from exc
        elif schema.entity_set == "sdkmessageprocessingsteps":
            filter_row = self._tables["sdkmessagefilters"].get(str(values.get("sdkmessagefilterid") or ""))
            if filter_row is not None and filter_row.values.get("sdkmessageid") != values.get("sdkmessageid"):
                raise invalid("The message filter (sdkmessagefilterid) belongs to a different message.")
            if values.get("mode") == 1 and values.get("stage") != 40:
                raise invalid("An asynchronous step must be registered in the post-operation stage (40).")
            table = self._filter_table(filter_row)
            for name in _csv(values.get("filteringattributes")):
                if table is not None and name not in table.columns:
                    raise invalid(f"filteringattributes: '{name}' is not an attribute of '{table.logical_name}'.")
        elif schema.entity_set == "sdkmessageprocessingstepimages":
            step = self._tables["sdkmessageprocessingsteps"].get(str(values.get("sdkmessageprocessingstepid")))
            if step is None:
                return
            message_row = self._tables["sdkmessages"].get(str(step.values.get("sdkmessageid")))
            message = str(message_row.values.get("name")) if message_row else ""
            wanted = IMAGE_MESSAGE_PROPERTY.get(message)
            if wanted and str(values.get("messagepropertyname") or "").lower() != wanted.lower():
                raise invalid(f"An image of a {message} step must use messagepropertyname '{wanted}'.")
            if message == "Create" and values.get("imagetype") != IMAGE_POST:
                raise invalid("A Create step can only have a PostImage.")
            if message == "Delete" and values.get("imagetype") != IMAGE_PRE:
                raise invalid("A Delete step can only have a PreImage.")
            table = self._filter_table(self._tables["sdkmessagefilters"].get(
                str(step.values.get("sdkmessagefilterid") or "")))
            for name in _csv(values.get("attributes")):
                if table is not None and name not in table.columns:
                    raise invalid(f"Image attribute '{name}' is not an attribute of '{table.logical_name}'.")

    def _filter_table(self, filter_row: Row | None) -> TableSchema | None:
        if filter_row is None:
            return None
        logical = filter_row.values.get("primaryobjecttypecode")
        return next((t for t in self.schema.values() if t.logical_name == logical), None)

    @staticmethod
    def _derives(schema: TableSchema) -> bool:
        return schema.logical_name == "contact" or bool(
            schema.autonumber or schema.line_numbers or schema.amounts or schema.rollups or schema.status_by_state)

    def _platform_fixups(self, schema: TableSchema, values: dict[str, Any], lookup_types: Mapping[str, str], *,
                         written: Mapping[str, Any] | None = None, creating: bool = False) -> None:
        """Columns the platform derives on every write (note type and size, a contact's full name, auto-numbers,
        line numbers, amounts, rollups, the status that goes with a state).

        `values` is the whole record after the write; `written` what the request itself set (None = all of it).
        """
        if schema.logical_name == "contact":
            # The org's default full name format is "First Last"; a missing part is left out.
            parts = [values.get("firstname"), values.get("lastname")]
            values["fullname"] = " ".join(p for p in parts if p) or None
            return
        if creating:
            for col, fmt in schema.autonumber.items():
                if values.get(col) in (None, ""):
                    values[col] = self._next_autonumber(schema, col, fmt)
            for col, parent_col in schema.line_numbers.items():
                parent = str(values.get(parent_col) or "").lower()
                if values.get(col) is None and parent:
                    siblings = self._children[schema.entity_set][parent_col].get(parent, ())
                    rows = self._tables[schema.entity_set]
                    numbers = [rows[k].values.get(col) or 0 for k in siblings if k in rows]
                    values[col] = max(numbers, default=0) + 1
        for col, (a, b) in schema.amounts.items():
            values[col] = _money(_decimal(values.get(a)) * _decimal(values.get(b)))
        for col, rollup in schema.rollups.items():
            values[col] = self._rollup_value(rollup, str(values.get(schema.primary_id) or "").lower())
        if schema.status_by_state:
            self._state_fixups(schema, values, values if written is None else written)
        if schema.logical_name != "annotation":
            return
        if "objectid" in lookup_types:
            values["objecttypecode"] = lookup_types["objectid"]
        body = values.get("documentbody")
        if body is not None:
            try:
                values["filesize"] = len(base64.b64decode(body, validate=True))
            except ValueError as exc:
                raise ODataError(400, "0x80044331", "A validation error occurred. documentbody is not valid "
                                 "base64.") from exc
            values["isdocument"] = True

    @staticmethod
    def _state_fixups(schema: TableSchema, values: dict[str, Any], written: Mapping[str, Any]) -> None:
        """statecode/statuscode travel as a pair: a state alone gets its default status; a status must fit."""
        state = values.get("statecode")
        if not isinstance(state, int):
            return
        allowed = schema.status_by_state.get(state)
        if allowed is None:
            return
        if "statecode" in written and written.get("statuscode") is None:
            values["statuscode"] = allowed[0]
        elif values.get("statuscode") not in allowed:
            state_label = schema.choices["statecode"].options.get(state, str(state))
            raise ODataError(400, "0x80040203", f"{values.get('statuscode')} is not a valid status code for state "
                             f"code {state_label} on {schema.logical_name} with Id {values.get(schema.primary_id)}.")

    def _next_autonumber(self, schema: TableSchema, col: str, fmt: str) -> str:
        """The next value of an auto-number column: `{SEQNUM:n}` counts up per column, `{RANDSTRING:n}` is random."""
        seq = self._autonumbers.get((schema.entity_set, col), AUTONUMBER_SEED - 1) + 1
        self._autonumbers[(schema.entity_set, col)] = seq

        def token(m: re.Match[str]) -> str:
            kind, width = m.group(1), int(m.group(2))
            if kind == "SEQNUM":
                return f"{seq:0{width}d}"
            return "".join(self._autonumber_rng.choice(AUTONUMBER_CHARS) for _ in range(width))

        return re.sub(r"\{(SEQNUM|RANDSTRING):(\d+)\}", token, fmt)
