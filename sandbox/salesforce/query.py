"""SOQL queries against the store: name resolution, parent fields, ordering, `nextRecordsUrl` cursors."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import sandbox.salesforce.schema as schema
from sandbox.salesforce.model import API_PREFIX, QUERY_BATCH, SalesforceFault
from sandbox.salesforce.soql import norm, parse_soql, soql_error
from sandbox.salesforce.store import SalesforceStore


class Queries(SalesforceStore):
    """`GET query/?q=` and `query/<cursor>`; records presented as the REST API shows them."""

    @staticmethod
    def _present(sobject: str, rec: Mapping[str, Any], fields: Iterable[str],
                 paths: Mapping[str, tuple[str, str, str]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"attributes": {"type": sobject, "url": f"{API_PREFIX}sobjects/{sobject}/{rec['Id']}"}}
        for name in fields:
            if paths and name in paths:  # a parent field nests under the relationship, null when there is no parent
                lookup, parent, leaf = paths[name]
                relation, parent_id = name.partition(".")[0], rec.get(lookup)
                if not parent_id:
                    out[relation] = None
                    continue
                nested = out.get(relation) or {
                    "attributes": {"type": parent, "url": f"{API_PREFIX}sobjects/{parent}/{parent_id}"}}
                nested[leaf] = rec.get(name)
                out[relation] = nested
            else:
                out[name] = rec.get(name)
        return out

    def _query(self, soql: str) -> dict[str, Any]:
        def resolve(name: str, pos: int) -> str:
            found = schema.sobject(name)
            if found is None:
                raise soql_error(soql, pos, "INVALID_TYPE",
                                 f"sObject type '{name}' is not supported. If you are attempting to use a custom "
                                 "object, be sure to append the '__c' after the entity name. Please reference your "
                                 "WSDL or the describe call for the appropriate names.")
            return found.name

        # parent field path the query uses ("Account.Name") -> (lookup field, parent sObject, parent field)
        paths: dict[str, tuple[str, str, str]] = {}

        def column(sobject: str, name: str, pos: int) -> str:
            found = schema.BY_NAME[sobject].field(name)
            if found is None:
                raise soql_error(soql, pos, "INVALID_FIELD",
                                 f"No such column '{name}' on entity '{sobject}'. If you are attempting to use a "
                                 "custom field, be sure to append the '__c' after the custom field name. Please "
                                 "reference your WSDL or the describe call for the appropriate names.")
            return found.name

        def resolve_field(sobject: str, name: str, pos: int) -> str:
            if "." not in name:
                return column(sobject, name, pos)
            relation, _, leaf = name.partition(".")
            lookup = next((f for f in schema.BY_NAME[sobject].fields if f.reference_to and f.name.endswith("Id")
                           and f.name[:-2].lower() == relation.lower()), None)
            if lookup is None or lookup.reference_to is None or "." in leaf:
                raise soql_error(soql, pos, "INVALID_FIELD",
                                 f"Didn't understand relationship '{relation}' in field path. If you are attempting "
                                 "to use a custom relationship, be sure to append the '__r' after the custom "
                                 "relationship name. Please reference your WSDL or the describe call for the "
                                 "appropriate names.")
            target = column(lookup.reference_to, leaf, pos + len(relation) + 1)
            path = f"{lookup.name[:-2]}.{target}"
            paths[path] = (lookup.name, lookup.reference_to, target)
            return path

        parsed = parse_soql(soql, resolve, resolve_field)
        rows = self._candidates(parsed)
        if paths:  # parent fields (one level up), read from the parent record at query time
            rows = [{**r, **{path: (self.records[parent].get(str(r.get(lookup) or "")) or {}).get(leaf)
                             for path, (lookup, parent, leaf) in paths.items()}} for r in rows]
        if parsed.where is not None:
            rows = [r for r in rows if parsed.where(r)]
        if parsed.order is not None:
            name, desc = parsed.order
            rows.sort(key=lambda r: (r.get(name) is None, norm(r.get(name)) if r.get(name) is not None else 0),
                      reverse=desc)
        if parsed.limit is not None:
            rows = rows[: parsed.limit]
        presented = [self._present(parsed.sobject, r, parsed.fields, paths) for r in rows]
        cursor = "01g" + secrets.token_hex(8).upper()[:15]
        self._cursors[cursor] = presented
        return self._page(cursor, 0)

    def _query_more(self, token: str) -> dict[str, Any]:
        cursor, _, offset = token.rpartition("-")
        if cursor not in self._cursors or not offset.isdigit():
            raise SalesforceFault(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        return self._page(cursor, int(offset))

    def _page(self, cursor: str, offset: int) -> dict[str, Any]:
        rows = self._cursors[cursor]
        page = rows[offset: offset + QUERY_BATCH]
        done = offset + QUERY_BATCH >= len(rows)
        body: dict[str, Any] = {"totalSize": len(rows), "done": done, "records": page}
        if not done:
            body["nextRecordsUrl"] = f"{API_PREFIX}query/{cursor}-{offset + QUERY_BATCH}"
        else:
            self._cursors.pop(cursor, None)
        return body
