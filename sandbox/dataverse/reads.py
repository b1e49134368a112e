"""Web API reads: single records, collections with $filter/$select/$orderby/$top, paging, $count, delta."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote, urlencode

from sandbox.dataverse.codecs import _norm
from sandbox.dataverse.protocol import (
    API_PREFIX,
    MAX_COUNT,
    MAX_PAGE_SIZE,
    NAMESPACE,
    ODataError,
    _ApiRequest,
    _ApiResponse,
    _not_found,
    _prefer,
)
from sandbox.dataverse.query import _evaluate, _RowView, _sort_key, parse_filter
from sandbox.dataverse.rows import Row
from sandbox.dataverse.schema import TableSchema
from sandbox.dataverse.state import _State


class _Reads(_State):
    """GET on an entity set or a record: rendering, filtering (index fast path), pages and change tracking.

    A part of `DataverseSimulator` (app.py), which holds the state these methods use.
    """

    def _render(self, schema: TableSchema, row: Row, select: list[str] | None, annotate: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"@odata.etag": f'W/"{row.version}"'}
        for col, typ in schema.columns.items():
            name = schema.read_name(col)
            if select is not None and name not in select and col != schema.primary_id:
                continue
            if col in schema.unreadable:
                continue
            value = row.values.get(col)
            out[name] = value
            if annotate and value is not None:
                if typ == "choice":
                    label = schema.choices[col].options.get(value, str(value))
                    out[f"{name}@OData.Community.Display.V1.FormattedValue"] = label
                elif typ == "lookup":
                    target = row.lookup_types.get(col) or self._target_logical(schema, col, row.values)
                    out[f"{name}@Microsoft.Dynamics.CRM.lookuplogicalname"] = target
                    nav = next((n for n, t in schema.lookups[col].navs.items()
                                if t in self.schema and self.schema[t].logical_name == target), None)
                    if nav is not None:
                        out[f"{name}@Microsoft.Dynamics.CRM.associatednavigationproperty"] = nav
        return out

    def _select(self, schema: TableSchema, req: _ApiRequest) -> list[str] | None:
        raw = req.query.get("$select")
        if not raw:
            return None
        names = [n.strip() for n in raw.split(",") if n.strip()]
        valid = schema.read_types()
        for n in names:
            if n not in valid:
                raise ODataError(400, "0x80060888", f"Could not find a property named '{n}' on type "
                                 f"'Microsoft.Dynamics.CRM.{schema.logical_name}'.")
        return names

    def _get_one(self, req: _ApiRequest, schema: TableSchema, key: str | dict[str, Any]) -> _ApiResponse:
        row = self._find(schema, key)
        if row is None:
            raise _not_found(schema.logical_name, self._key_text(key))
        etag = f'W/"{row.version}"'
        if req.headers.get("if-none-match") == etag:
            return _ApiResponse(304, {"ETag": etag})
        select = self._select(schema, req)
        annotate = "odata.include-annotations" in _prefer(req.headers)
        body = {"@odata.context": f"{req.base}{API_PREFIX}$metadata#{schema.entity_set}/$entity",
                **self._render(schema, row, select, annotate)}
        return self._json(200, body, {"ETag": etag})

    def _query(self, req: _ApiRequest, schema: TableSchema) -> _ApiResponse:
        prefer = _prefer(req.headers)
        select = self._select(schema, req)
        annotate = "odata.include-annotations" in prefer
        tracking = "odata.track-changes" in prefer
        if "$expand" in req.query or "$apply" in req.query:
            raise ODataError(400, "0x80060888", "The simulator does not implement $expand / $apply.")
        page_size = MAX_PAGE_SIZE
        if "odata.maxpagesize" in prefer:
            try:
                page_size = max(1, min(MAX_PAGE_SIZE, int(prefer["odata.maxpagesize"])))
            except ValueError as exc:
                raise ODataError(400, "0x80060888", "Invalid value for odata.maxpagesize.") from exc
        cookie = self._parse_skiptoken(req.query.get("$skiptoken"))
        delta_token = req.query.get("$deltatoken")
        types = schema.read_types()
        ctx_select = f"({','.join(select)})" if select else ""
        context = f"{req.base}{API_PREFIX}$metadata#{schema.entity_set}{ctx_select}"
        headers: dict[str, str] = {}
        applied = []
        if "odata.maxpagesize" in prefer:
            applied.append(f"odata.maxpagesize={page_size}")

        if tracking or delta_token is not None:
            if any(k in req.query for k in ("$filter", "$orderby", "$top")):
                raise ODataError(400, "0x80060888", "$filter, $orderby, $top and $expand are not supported with "
                                 "change tracking (Prefer: odata.track-changes).")
            if not schema.change_tracking:
                raise ODataError(400, "0x80060888", f"Entity '{schema.logical_name}' is not enabled for change "
                                 "tracking.")
            applied.append("odata.track-changes")
            headers["Preference-Applied"] = ",".join(applied)
            return self._delta(req, schema, select, annotate, page_size, cookie, delta_token, context, headers)

        count = self._count_option(req)
        rows = self._filtered(req, schema, types)
        orderby = req.query.get("$orderby")
        if orderby:
            keys: list[tuple[str, bool]] = []
            for part in orderby.split(","):
                bits = part.split()
                if not bits or bits[0] not in types or len(bits) > 2 or (
                        len(bits) == 2 and bits[1] not in ("asc", "desc")):
                    raise ODataError(400, "0x80060888", f"Syntax error in $orderby '{orderby}'.")
                keys.append((bits[0], len(bits) == 2 and bits[1] == "desc"))
            rows.sort(key=lambda r: r.values[schema.primary_id])
            for name, desc in reversed(keys):
                col = name[1:-6] if name.startswith("_") and name.endswith("_value") else name
                typ = types[name]
                rows.sort(key=_sort_key(col, typ), reverse=desc)
        else:
            rows.sort(key=lambda r: r.values[schema.primary_id])
        total = len(rows)  # $count counts every matching row, whatever $top and paging return
        if "$top" in req.query and "odata.maxpagesize" not in prefer:
            try:
                rows = rows[: int(req.query["$top"])]
            except ValueError as exc:
                raise ODataError(400, "0x80060888", "Invalid $top.") from exc
        page_no = cookie["pagenumber"] if cookie else 1
        if cookie and cookie.get("last") and not orderby:
            start = next((i for i, r in enumerate(rows) if r.values[schema.primary_id] > cookie["last"]), len(rows))
        else:
            start = (page_no - 1) * page_size
        page = rows[start:start + page_size]
        body: dict[str, Any] = {"@odata.context": context}
        if count:
            body.update(self._count_annotations(total, req.headers))
        body["value"] = [self._render(schema, r, select, annotate) for r in page]
        if start + page_size < len(rows) and page:
            token = self._skiptoken(schema, page_no + 1, page, tracking=False, version=None)
            body["@odata.nextLink"] = self._link(req, schema, {"$skiptoken": token})
        if applied:
            headers["Preference-Applied"] = ",".join(applied)
        return self._json(200, body, headers)

    def _filtered(self, req: _ApiRequest, schema: TableSchema, types: Mapping[str, str]) -> list[Row]:
        rows = list(self._tables[schema.entity_set].values())
        if "$filter" in req.query:
            ast = parse_filter(req.query["$filter"], types, f"Microsoft.Dynamics.CRM.{schema.logical_name}")
            names = {schema.read_name(c): c for c in schema.columns}
            table = self._tables[schema.entity_set]
            # Equality, In and or-chains of them on the primary key, a lookup or an alternate-key column seek
            # the table's dict / column index for candidates (like an index seek); the filter is still evaluated
            # on each candidate, and the sort fixes the order, so the answer is exactly the scan's.
            candidates = self._filter_candidates(schema, ast, names, types)
            if candidates is not None:
                rows = [table[k] for k in candidates if k in table]
            rows = [r for r in rows if _evaluate(ast, _RowView(r.values, names), types)]
        return rows

    @staticmethod
    def _count_option(req: _ApiRequest) -> bool:
        raw = req.query.get("$count")
        if raw is None:
            return False
        if raw.lower() not in ("true", "false"):
            raise ODataError(400, "0x80060888", f"'{raw}' is not a valid count option.")
        return raw.lower() == "true"

    @staticmethod
    def _count_annotations(total: int, headers: Mapping[str, str]) -> dict[str, Any]:
        """`@odata.count`, at most 5000 whatever the page size (webapi/query/count-rows); the exact-or-more
        annotations only when `Prefer: odata.include-annotations` asks for them."""
        out: dict[str, Any] = {"@odata.count": min(total, MAX_COUNT)}
        m = re.search(r'odata\.include-annotations\s*=\s*(?:"([^"]*)"|([^,;\s]+))', headers.get("prefer", ""))
        patterns = [p.strip() for p in (m.group(1) or m.group(2)).split(",")] if m else []
        for name, value in (("totalrecordcount", min(total, MAX_COUNT)),
                            ("totalrecordcountlimitexceeded", total > MAX_COUNT)):
            if any(fnmatch.fnmatchcase(f"{NAMESPACE}.{name}", p) for p in patterns if p):
                out[f"@{NAMESPACE}.{name}"] = value
        return out

    def _count_only(self, req: _ApiRequest, schema: TableSchema) -> _ApiResponse:
        """`GET /{set}/$count`: the number of matching rows as plain text (at most 5000)."""
        total = min(len(self._filtered(req, schema, schema.read_types())), MAX_COUNT)
        return _ApiResponse(200, {"Content-Type": "text/plain", "OData-Version": "4.0"}, str(total).encode())

    def _filter_candidates(self, schema: TableSchema, ast: tuple[Any, ...], names: Mapping[str, str],
                           types: Mapping[str, str]) -> set[str] | None:
        """Primary keys of a superset of the rows `ast` matches, from the indexes; None = every row (a scan)."""
        kind = ast[0]
        if kind == "and":
            left = self._filter_candidates(schema, ast[1], names, types)
            right = self._filter_candidates(schema, ast[2], names, types)
            if left is None or right is None:
                return left if right is None else right
            return left & right
        if kind == "or":
            left = self._filter_candidates(schema, ast[1], names, types)
            if left is None:
                return None
            right = self._filter_candidates(schema, ast[2], names, types)
            return None if right is None else left | right
        if kind == "bool" and ast[1][0] == "in" and not ast[1][3]:
            # In matches no null column: its values are normalised already and never None.
            return self._index_probe(schema, ast[1][1], [v for v in ast[1][2] if v is not None], names)
        if kind == "cmp" and ast[1] == "eq":
            prop, lit = ast[2], ast[3]
            if prop[0] == "lit":
                prop, lit = lit, prop
            if prop[0] != "prop" or lit[0] != "lit":
                return None
            try:
                wanted = _norm(lit[1], types.get(prop[1]) or None)
            except (TypeError, ValueError, AttributeError):
                return None  # the scan reports it as it always did
            return self._index_probe(schema, prop[1], [wanted], names)
        return None

    def _index_probe(self, schema: TableSchema, prop: str, wanted: list[Any],
                     names: Mapping[str, str]) -> set[str] | None:
        col = names.get(prop, prop)
        if col == schema.primary_id:
            # Stored keys are lower-case: an ASCII value names at most the row stored under it.
            if all(isinstance(v, str) and v.isascii() for v in wanted):
                return set(wanted)
            return None
        index = self._column_index[schema.entity_set].get(col)
        return None if index is None else index.probe(wanted)

    def _delta(self, req: _ApiRequest, schema: TableSchema, select: list[str] | None, annotate: bool,
               page_size: int, cookie: dict[str, Any] | None, delta_token: str | None, context: str,
               headers: dict[str, str]) -> _ApiResponse:
        since: int | None = None
        if delta_token is not None:
            try:
                since = int(delta_token.split("!", 1)[0])
            except ValueError as exc:
                raise ODataError(400, "0x80060888", f"Invalid delta token '{delta_token}'.") from exc
        upper = cookie["version"] if cookie and cookie.get("version") else self._version
        entries: list[dict[str, Any]] = []
        rows = sorted(self._tables[schema.entity_set].values(), key=lambda r: (r.version, r.values[schema.primary_id]))
        for row in rows:
            if row.version <= upper and (since is None or row.version > since):
                entries.append(self._render(schema, row, select, annotate))
        if since is not None:
            for version, key in self._deleted[schema.entity_set]:
                if since < version <= upper:
                    entries.append({"@odata.context": f"{req.base}{API_PREFIX}$metadata#{schema.entity_set}/"
                                    "$deletedEntity", "id": key, "reason": "deleted"})
        page_no = cookie["pagenumber"] if cookie else 1
        start = (page_no - 1) * page_size
        page = entries[start:start + page_size]
        body: dict[str, Any] = {"@odata.context": context + ("/$delta" if since is not None else ""), "value": page}
        if start + page_size < len(entries):
            token = self._skiptoken(schema, page_no + 1, [], tracking=True, version=upper)
            extra = {"$skiptoken": token}
            if delta_token is not None:
                extra["$deltatoken"] = delta_token
            body["@odata.nextLink"] = self._link(req, schema, extra)
        else:
            stamp = datetime.now(UTC).strftime("%m/%d/%Y %H:%M:%S")
            body["@odata.deltaLink"] = self._link(req, schema, {"$deltatoken": f"{upper}!{stamp}"})
        return self._json(200, body, headers)

    def _link(self, req: _ApiRequest, schema: TableSchema, extra: Mapping[str, str]) -> str:
        params = {k: v for k, v in req.query.items() if k not in ("$skiptoken", "$deltatoken")}
        params.update(extra)
        return f"{req.base}{API_PREFIX}{schema.entity_set}?{urlencode(params, quote_via=quote, safe='$,()')}"

    def _skiptoken(self, schema: TableSchema, page_no: int, page: list[Row], *, tracking: bool,
                   version: int | None) -> str:
        # Shape of the real paging cookie: <cookie pagenumber=".." pagingcookie="<cookie page=..>...</cookie>" ...>
        inner = f'<cookie page="{page_no - 1}"'
        if version is not None:
            inner += f' trackingversion="{version}"'
        inner += ">"
        if page:
            first, last = page[0].values[schema.primary_id], page[-1].values[schema.primary_id]
            inner += f'<{schema.primary_id} last="{{{last}}}" first="{{{first}}}" />'
        inner += "</cookie>"
        paging = quote(quote(inner, safe=""), safe="")
        return f'<cookie pagenumber="{page_no}" pagingcookie="{paging}" istracking="{tracking}" />'

    @staticmethod
    def _parse_skiptoken(token: str | None) -> dict[str, Any] | None:
        if token is None:
            return None
        m = re.match(r'^<cookie pagenumber="(\d+)" pagingcookie="([^"]*)" istracking="(True|False)" />$', token)
        if not m:
            raise ODataError(400, "0x80060888", f"Invalid $skiptoken '{token}'.")
        inner = unquote(unquote(m.group(2)))
        last = re.search(r'last="\{([0-9a-f-]{36})\}"', inner)
        version = re.search(r'trackingversion="(\d+)"', inner)
        return {"pagenumber": int(m.group(1)), "last": last.group(1) if last else None,
                "version": int(version.group(1)) if version else None}
