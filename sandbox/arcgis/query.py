"""Reads of the simulated service: `query` (where, order, paging, outFields, outSR) and `queryAttachments`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from sandbox.arcgis.codecs import _bool, _field_kind, _int_list, _nonneg, _out_wkid, _sr_json, canonical_guid
from sandbox.arcgis.errors import RestError
from sandbox.arcgis.schema import FieldDef
from sandbox.arcgis.store import FeatureStore, _Feature, _Layer
from sandbox.arcgis.where import WhereParser, _comparable, evaluate


class SimQuery(FeatureStore):
    """`query` and `queryAttachments`: filter, order, page and render features."""

    def _query(self, lyr: _Layer, p: Mapping[str, str]) -> dict[str, Any]:
        where = p.get("where", "").strip()
        ids = _int_list(p.get("objectIds", ""), "objectIds")
        if not where and ids is None:
            raise RestError(400, "Unable to complete operation.", ["Invalid or missing input parameters."])
        tree = WhereParser(where, lyr.by_lower).parse() if where else None
        rows = [f for oid, f in lyr.features.items()
                if (ids is None or oid in ids) and (tree is None or evaluate(tree, f.attrs) is True)]
        rows.sort(key=lambda f: f.attrs[lyr.oid_field])
        for name, desc in reversed(_order_by(p.get("orderByFields", ""), lyr)):
            rows.sort(key=_sort_key(name, _field_kind(lyr.by_lower[name.lower()])), reverse=desc)
        if _bool(p, "returnCountOnly"):
            return {"count": len(rows)}
        if _bool(p, "returnIdsOnly"):
            return {"objectIdFieldName": lyr.oid_field, "objectIds": [f.attrs[lyr.oid_field] for f in rows]}
        out_fields = _out_fields(p.get("outFields", ""), lyr)
        offset = _nonneg(p, "resultOffset", 0)
        count = min(_nonneg(p, "resultRecordCount", lyr.max_record_count) or lyr.max_record_count,
                    lyr.max_record_count)
        page = rows[offset:offset + count]
        out_wkid = _out_wkid(p)
        result: dict[str, Any] = {"objectIdFieldName": lyr.oid_field,
                                  "uniqueIdField": {"name": lyr.oid_field, "isSystemMaintained": True},
                                  "globalIdFieldName": lyr.gid_field}
        if not lyr.is_table:
            result["geometryType"] = lyr.d.geometry_type
            result["spatialReference"] = _sr_json(out_wkid)
        result["fields"] = [f.to_json() for f in out_fields]
        result["features"] = [self._render(lyr, f, out_fields, _bool(p, "returnGeometry", True), out_wkid)
                              for f in page]
        if offset + count < len(rows):
            result["exceededTransferLimit"] = True
        return result

    def _query_attachments(self, lyr: _Layer, p: Mapping[str, str]) -> dict[str, Any]:
        self._require_attachments(lyr)
        ids = _int_list(p.get("objectIds", ""), "objectIds")
        gids_raw = p.get("globalIds", "")
        gids = {canonical_guid(g.strip()) for g in gids_raw.split(",") if g.strip()} if gids_raw else None
        where = p.get("definitionExpression", "").strip()
        tree = WhereParser(where, lyr.by_lower).parse() if where else None
        if ids is None and gids is None and tree is None:
            raise RestError(400, "Unable to complete operation.", ["Invalid or missing input parameters."])
        groups = []
        for oid, feat in sorted(lyr.features.items()):
            if ids is not None and oid not in ids:
                continue
            if gids is not None and feat.attrs[lyr.gid_field] not in gids:
                continue
            if tree is not None and evaluate(tree, feat.attrs) is not True:
                continue
            if feat.attachments:
                groups.append({"parentObjectId": oid, "parentGlobalId": self._guid_out(feat.attrs[lyr.gid_field]),
                               "attachmentInfos": [self._attachment_info(lyr, feat, a)
                                                   for a in feat.attachments.values()]})
        return {"fields": [], "attachmentGroups": groups}


def _out_fields(raw: str, lyr: _Layer) -> list[FieldDef]:
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not names:
        return [lyr.by_lower[lyr.oid_field.lower()]]
    if "*" in names:
        return list(lyr.fields)
    out = []
    for name in names:
        f = lyr.field(name)
        if f is None:
            raise RestError(400, "Unable to complete operation.", [f"Invalid field: {name}"])
        out.append(f)
    return out


def _order_by(raw: str, lyr: _Layer) -> list[tuple[str, bool]]:
    out = []
    for part in (p.strip() for p in raw.split(",") if p.strip()):
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:\s+(ASC|DESC))?", part, re.IGNORECASE)
        if m is None or lyr.field(m.group(1)) is None:
            raise RestError(400, "Unable to complete operation.", [f"Invalid orderByFields: {part}"])
        out.append((lyr.field(m.group(1)).name, (m.group(2) or "ASC").upper() == "DESC"))  # type: ignore[union-attr]
    return out


def _sort_key(name: str, kind: str) -> Callable[[_Feature], tuple[bool, Any]]:
    def key(f: _Feature) -> tuple[bool, Any]:
        value = f.attrs.get(name)
        # NULLs sort first ascending, as SQL Server does.
        return (value is not None, _comparable(value, kind) if value is not None else 0)

    return key
