"""Routing one OData request on a resource path (entity set, key, navigation, $count, function) to reads and writes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sandbox.sap.atom import _Count
from sandbox.sap.codecs import _expand, _parse_resource, _select
from sandbox.sap.gateway import READ_ONLY, GatewayError, _bad
from sandbox.sap.queries import SapQueries
from sandbox.sap.rules import SapRules
from sandbox.sap.schema import (
    ENTITIES,
    FUNCTION_IMPORTS,
    SERVICE_SETS,
)


class SapResources(SapQueries, SapRules):
    """The request router below $batch and the HTTP layer."""

    def _dispatch(self, service: str, method: str, rest: str, query: dict[str, str], headers: Mapping[str, str],
                  body: bytes, base: str) -> tuple[int, dict[str, str], Any]:
        if rest.rstrip("/").endswith("/$count"):
            # GET <collection>/$count: the number of entities the collection addresses after $filter, as text/plain
            # (MS-ODATA 2.2.7.2.10 RetrieveCount; $top, $skip and paging do not cut it here).
            if method not in ("GET", "HEAD"):
                raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", "$count is read with GET")
            inner = rest.rstrip("/")[:-len("/$count")]
            counting = {k: v for k, v in query.items() if k == "$filter"} | {"$inlinecount": "allpages", "$top": "0"}
            _, _, payload = self._dispatch(service, "GET", inner, counting, headers, b"", base)
            data = payload.get("d") if isinstance(payload, dict) else None
            if not isinstance(data, dict) or "results" not in data:
                return 200, {}, _Count(0 if data is None else 1)
            return 200, {}, _Count(int(data["__count"]))
        if rest.strip("/") == "":
            if method not in ("GET", "HEAD"):
                raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", "Method not allowed on the service document")
            return 200, {}, {"d": {"EntitySets": SERVICE_SETS[service]}}
        if rest.strip("/") in {f.name for f in FUNCTION_IMPORTS.get(service, ())}:
            if method != "GET":
                raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Function import {rest} is called with GET")
            return self._availability(query)
        entity, raw_key, nav = _parse_resource(rest)
        if entity not in ENTITIES or ENTITIES[entity].service != service:
            raise GatewayError(404, "/IWBEP/CM_MGW_RT/021", f"Resource not found for segment '{entity}'")
        definition = ENTITIES[entity]
        if entity in READ_ONLY and method not in ("GET", "HEAD"):
            raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Method '{entity.upper()}_{method}' not implemented in "
                                                            "data provider class (read-only in this simulator)")
        ktuple: tuple[str, ...] | None = None
        if raw_key is not None:
            named = {k: v for k, v in raw_key.items() if k is not None}
            if None in raw_key and len(definition.keys) == 1:
                named = {definition.keys[0]: raw_key[None]}
            if set(named) != set(definition.keys):
                raise _bad("/IWBEP/CM_MGW_RT/020", f"The key predicate of '{entity}' must give "
                                                   f"{', '.join(definition.keys)}")
            ktuple = tuple(named[k] for k in definition.keys)
        row = self._rows[entity].get(ktuple) if ktuple is not None else None
        if ktuple is not None and row is None:
            # As in SAP's published API_PRODUCT_SRV error sample: 404 /IWBEP/CM_MGW_RT/020 "Resource not found for
            # segment 'A_ProductType'" (the entity type's name).
            raise GatewayError(404, "/IWBEP/CM_MGW_RT/020" if entity != "A_SalesOrder" else "V1/302",
                               f"Resource not found for segment '{definition.type_name}'" if entity != "A_SalesOrder"
                               else f"SD document {ktuple[0]} is not in the database or has been archived")
        if nav is not None:
            if row is None or nav not in definition.navs:
                raise GatewayError(404, "/IWBEP/CM_MGW_RT/021", f"Resource not found for segment '{nav}'")
            target = definition.navs[nav]
            if method == "POST" and target.many:
                values = self._json(body, target.target)
                created = self._create_child(entity, row, nav, values)
                return 201, self._location(target.target, created, base), {
                    "d": self._public(target.target, created, base, None, set())}
            if method != "GET":
                raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Method {method} not allowed on '{nav}'")
            children = self._children(entity, row, nav)
            if target.many:
                return self._collection(target.target, children, query, base, rest)
            return 200, {}, {"d": self._public(target.target, children[0], base, _select(query), _expand(query))
                             if children else None}
        if row is not None:
            assert ktuple is not None
            if method in ("GET", "HEAD"):
                etag = self._etag(entity, row)
                return 200, {"etag": etag} if etag else {}, {
                    "d": self._public(entity, row, base, _select(query), _expand(query))}
            self._check_if_match(entity, row, headers)
            if method == "DELETE":
                self._delete(entity, ktuple, row)
                return 204, {}, None
            if method in ("PATCH", "MERGE", "PUT"):
                self._update(entity, row, self._json(body, entity))
                etag = self._etag(entity, row)
                return 204, {"etag": etag} if etag else {}, None
            raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Method {method} not allowed on an entity")
        if method == "POST":
            values = self._json(body, entity)
            if entity == "A_SalesOrder":
                created = self._create_order(values)
            elif entity == "A_BusinessPartner":
                created = self._create_partner(values)
            else:
                raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Create {entity} through its parent's navigation "
                                                                "property")
            return 201, self._location(entity, created, base), {
                "d": self._public(entity, created, base, None, set(definition.navs))}
        if method != "GET":
            raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Method {method} not allowed on an entity set")
        return self._collection(entity, None, query, base, rest)
