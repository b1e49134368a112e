"""Reads: collections ($filter, $orderby, paging, $expand), public row forms, URIs, ETags, ATP."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlencode

from sandbox.sap.codecs import _decimal_text, _expand, _key_literal, _select, _sort_key, to_wire
from sandbox.sap.filters import FilterParser, _any_of, _comparable, evaluate, tokenize
from sandbox.sap.gateway import IF_MATCH_REQUIRED, SERVICE_PREFIX, GatewayError, _bad
from sandbox.sap.rows import _candidates
from sandbox.sap.schema import (
    AVAILABILITY_FUNCTION,
    AVAILABILITY_SERVICE,
    ENTITIES,
)
from sandbox.sap.store import SapStore
from shared.payloads import strict_loads


class SapQueries(SapStore):
    """Answers to GET requests, and the request-body checks writes share."""

    def _availability(self, query: Mapping[str, str]) -> tuple[int, dict[str, str], Any]:
        """DetermineAvailabilityAt: the unrestricted stock of a material in a plant (no demand is netted)."""
        params: dict[str, Any] = {}
        for name in ("SupplyingPlant", "Material", "ATPCheckingRule", "RequestedUTCDateTime"):
            raw = query.get(name)
            if raw is None:
                if name == "ATPCheckingRule":
                    continue
                raise _bad("/IWBEP/CM_MGW_RT/009", f"Function import parameter '{name}' is missing", name)
            toks = tokenize(raw)
            if len(toks) != 1 or toks[0].kind != "lit":
                raise _bad("/IWBEP/CM_MGW_RT/010", f"Invalid value {raw!r} for function import parameter '{name}'",
                           name)
            params[name] = toks[0].value
        material_no, plant = str(params["Material"]), str(params["SupplyingPlant"])
        requested = params["RequestedUTCDateTime"]
        if not isinstance(requested, datetime):
            raise _bad("/IWBEP/CM_MGW_RT/010", "RequestedUTCDateTime must be a datetimeoffset'...' literal",
                       "RequestedUTCDateTime")
        material = self.customizing.materials.get(material_no)
        if material is None:
            raise _bad("M3/305", f"Material {material_no} does not exist", "Material")
        if plant not in self.customizing.plants:
            raise _bad("M3/300", f"Plant {plant} does not exist", "SupplyingPlant")
        if plant not in material.plants:
            raise _bad("M3/351", f"Material {material_no} is not maintained in plant {plant}", "SupplyingPlant")
        quantity = self.stock.get((material_no, plant), Decimal(0))
        record = {"__metadata": {"type": f"{AVAILABILITY_SERVICE}.AvailabilityRecord"},
                  "PeriodStartUTCDateTime": to_wire("PeriodStartUTCDateTime", requested),
                  "PeriodStartTimeZone": "UTC",
                  "PeriodEndUTCDateTime": to_wire("PeriodEndUTCDateTime", datetime(9999, 12, 31, tzinfo=UTC)),
                  "PeriodEndTimeZone": "UTC",
                  "AvailableQuantityInBaseUnit": _decimal_text("AvailableQuantityInBaseUnit", quantity),
                  "BaseUnit": material.base_unit}
        return 200, {}, {"d": {AVAILABILITY_FUNCTION: record}}

    # ------------------------------------------------------------------------------------ reads

    def _collection(self, entity: str, rows: list[dict[str, Any]] | None, query: Mapping[str, str], base: str,
                    rest: str) -> tuple[int, dict[str, str], Any]:
        """A collection answer; `rows` None means the whole entity set (whose indexes a $filter may use)."""
        table = self._rows[entity]
        if query.get("$filter"):
            node = FilterParser(query["$filter"], entity).parse()
            if rows is None:
                # Equality filters (one field's or-chain, with and) seek the field's index for candidates; the
                # filter is still evaluated on each, in the set's order, so the answer is exactly the scan's.
                keys = _candidates(node, table)
                rows = table.in_order(keys) if keys is not None else list(table.values())
            chain = _any_of(node)
            if chain is not None:
                # "F eq a or F eq b or ...": a set look-up per row instead of walking the chain.
                name, values = chain
                rows = [r for r in rows if _comparable(name, r.get(name)) in values]
            else:
                rows = [r for r in rows if evaluate(node, r)]
        elif rows is None:
            rows = list(table.values())
        rows = sorted(rows, key=lambda r: _sort_key(entity, r))
        fields = ENTITIES[entity].fields
        for part in reversed([p.strip() for p in query.get("$orderby", "").split(",") if p.strip()]):
            name, _, direction = part.partition(" ")
            if name not in fields:
                raise _bad("/IWBEP/CM_MGW_RT/022", f"Property '{name}' not found in type "
                                                   f"'{ENTITIES[entity].type_name}'")

            def order(r: dict[str, Any], n: str = name) -> tuple[bool, Any]:
                value = _comparable(n, r.get(n))
                return value is not None, value if value is not None else ""

            rows.sort(key=order, reverse=direction.strip().lower() == "desc")
        try:
            top = int(query["$top"]) if "$top" in query else None
            skip = int(query.get("$skip", "0"))
            token = int(query.get("$skiptoken", "0"))
        except ValueError:
            raise _bad("/IWBEP/CM_MGW_RT/021", "Invalid value for $top, $skip or $skiptoken") from None
        total = len(rows)
        rows = rows[skip:]
        if top is not None:
            rows = rows[:top]
        page = rows[token:token + self.page_size]
        select, expand = _select(query), _expand(query)
        payload: dict[str, Any] = {"results": [self._public(entity, r, base, select, expand) for r in page]}
        if query.get("$inlinecount") == "allpages":
            payload["__count"] = str(total)
        if token + self.page_size < len(rows):
            params = [(k, v) for k, v in query.items() if k != "$skiptoken"] + \
                     [("$skiptoken", str(token + self.page_size))]
            payload["__next"] = f"{base}{SERVICE_PREFIX}{ENTITIES[entity].service}/{rest}?" + \
                urlencode(params, quote_via=quote, safe="$,'()")
        return 200, {}, {"d": payload}

    def _public(self, entity: str, row: Mapping[str, Any], base: str, select: list[str] | None,
                expand: set[str]) -> dict[str, Any]:
        definition = ENTITIES[entity]
        uri = self._uri(entity, row, base)
        meta: dict[str, Any] = {"id": uri, "uri": uri, "type": f"{definition.service}.{definition.type_name}"}
        etag = self._etag(entity, row)
        if etag:
            meta["etag"] = etag
        out: dict[str, Any] = {"__metadata": meta}
        for name in definition.fields:
            if select is None or name in select or name in definition.keys:
                out[name] = to_wire(name, row.get(name))
        for nav_name, nav in definition.navs.items():
            if select is not None and nav_name not in select and not any(e.split("/")[0] == nav_name for e in expand):
                continue
            if any(e.split("/")[0] == nav_name for e in expand):
                deeper = {e.split("/", 1)[1] for e in expand if e.startswith(nav_name + "/")}
                children = self._children(entity, row, nav_name)
                if nav.many:
                    out[nav_name] = {"results": [self._public(nav.target, c, base, None, deeper) for c in children]}
                else:
                    out[nav_name] = self._public(nav.target, children[0], base, None, deeper) if children else None
            else:
                out[nav_name] = {"__deferred": {"uri": f"{uri}/{nav_name}"}}
        return out

    def _uri(self, entity: str, row: Mapping[str, Any], base: str) -> str:
        definition = ENTITIES[entity]
        keys = definition.keys
        if len(keys) == 1:
            predicate = _key_literal(row[keys[0]])
        else:
            predicate = ",".join(f"{k}={_key_literal(row[k])}" for k in keys)
        return f"{base}{SERVICE_PREFIX}{definition.service}/{entity}({quote(predicate, safe=chr(39) + ',=')})"

    def _location(self, entity: str, row: Mapping[str, Any], base: str) -> dict[str, str]:
        headers = {"location": self._uri(entity, row, base)}
        etag = self._etag(entity, row)
        if etag:
            headers["etag"] = etag
        return headers

    @staticmethod
    def _etag(entity: str, row: Mapping[str, Any]) -> str | None:
        kind = ENTITIES[entity].etag
        if kind == "bp":
            return f"W/\"'{row.get('ETag') or ''}'\""
        if kind == "stamp":
            stamp = row.get("LastChangeDateTime") if entity == "A_SalesOrder" else row.get("_stamp")
            if not isinstance(stamp, datetime):
                return None
            text = stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond:06d}0Z"
            return f"W/\"datetimeoffset'{quote(text, safe='')}'\""
        return None

    def _check_if_match(self, entity: str, row: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        wanted = headers.get("if-match")
        current = self._etag(entity, row)
        if wanted is None:
            if entity in IF_MATCH_REQUIRED:
                raise GatewayError(428, "/IWBEP/CM_MGW_RT/019", f"Precondition required: send If-Match with the ETag "
                                                                f"of {entity} read before the change")
            return
        if wanted != "*" and current is not None and wanted != current:
            raise GatewayError(412, "/IWBEP/CM_MGW_RT/020", f"Precondition failed: {entity} was changed since it was "
                                                            f"read (ETag {current} does not match {wanted})")

    @staticmethod
    def _json(body: bytes, entity: str) -> dict[str, Any]:
        try:
            data = strict_loads(body or b"{}")
        except ValueError:
            raise _bad("/IWBEP/CM_MGW_RT/013", "Malformed request body: the JSON cannot be parsed") from None
        if not isinstance(data, dict):
            raise _bad("/IWBEP/CM_MGW_RT/013", f"Malformed request body: a JSON object of {entity} expected")
        return {k: v for k, v in data.items() if k != "__metadata"}
