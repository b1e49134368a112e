"""Writes of the simulated service: `applyEdits` validation and transactions, attachment adds and deletes."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from sandbox.arcgis.codecs import (
    MERCATOR_WKIDS,
    _bool,
    _coerce,
    _feature_parts,
    _get_ci,
    _int_list,
    _json_list,
    _wkid_of,
    canonical_guid,
    lonlat_to_mercator,
)
from sandbox.arcgis.errors import EditError, RestError
from sandbox.arcgis.schema import GLOBALID, OID
from sandbox.arcgis.store import EDIT_FIELDS, FeatureStore, _Attachment, _Change, _Feature, _Layer, _Tombstone


class SimEdits(FeatureStore):
    """`applyEdits` as one transaction per call, and attachment adds and deletes."""

    _attachment_ids: Iterator[int]

    def _apply_edits(self, lyr: _Layer, p: Mapping[str, str], user: str, changes: list[_Change]) -> dict[str, Any]:
        adds = _json_list(p, "adds")
        updates = _json_list(p, "updates")
        raw_deletes = p.get("deletes", "").strip()
        deletes: list[Any] = _json_list(p, "deletes") if raw_deletes.startswith("[") else \
            [d.strip() for d in raw_deletes.split(",") if d.strip()]
        in_sr = _wkid_of(p.get("inSR"))
        result = self._edit(lyr, adds, updates, deletes, use_gids=_bool(p, "useGlobalIds"),
                            rollback=_bool(p, "rollbackOnFailure", True), in_sr=in_sr, user=user, changes=changes)
        if _bool(p, "returnEditMoment"):
            result["editMoment"] = lyr.last_edit
        return result

    def _edit(self, lyr: _Layer, adds: list[Any], updates: list[Any], deletes: list[Any], *, use_gids: bool,
              rollback: bool, in_sr: int | None, user: str, changes: list[_Change]) -> dict[str, Any]:
        """Validate every edit, then apply the valid ones as one transaction (one serverGen, one EditDate)."""
        add_results: list[dict[str, Any]] = []
        update_results: list[dict[str, Any]] = []
        delete_results: list[dict[str, Any]] = []
        staged_adds: list[tuple[dict[str, Any], str, dict[str, Any], tuple[float, float] | None]] = []
        staged_updates: list[tuple[dict[str, Any], int, dict[str, Any], tuple[float, float] | None, bool]] = []
        staged_deletes: list[tuple[dict[str, Any], int]] = []
        new_gids: set[str] = set()
        touched: set[int] = set()

        for raw in adds:
            gid: str | None = None
            try:
                attrs_in, geometry = _feature_parts(raw)
                given = _get_ci(attrs_in, lyr.gid_field)
                if use_gids:
                    if given is None:
                        raise EditError(1020, "GlobalID is missing.")
                    if str(given).strip() in ("", "{}"):
                        raise EditError(1021, "GlobalID is empty.")
                    gid = canonical_guid(given)
                    if gid is None:
                        raise EditError(1000, f"Invalid GlobalID value {given!r}.")
                    if gid in lyr.by_gid or gid in new_gids:
                        raise EditError(1022, "Unique constraint violation error.")
                else:
                    gid = "{" + str(uuid.uuid4()).upper() + "}"
                values = self._validate_values(lyr, attrs_in, None)
                point = self._geometry_in(lyr, geometry, in_sr)
                new_gids.add(gid)
                res = {"objectId": -1, "uniqueId": -1, "globalId": gid, "success": True}
                staged_adds.append((res, gid, values, point))
            except EditError as err:
                res = {"objectId": -1, "uniqueId": -1, "globalId": gid, "success": False,
                       "error": {"code": err.code, "description": err.description}}
            add_results.append(res)

        for raw in updates:
            oid: int | None = None
            gid = None
            try:
                attrs_in, geometry = _feature_parts(raw)
                oid, gid = self._locate(lyr, attrs_in, use_gids, missing_code=1019)
                if oid in touched:
                    raise EditError(1000, "The same feature is updated twice in one request.")
                values = self._validate_values(lyr, attrs_in, lyr.features[oid].attrs)
                has_geometry = isinstance(raw, Mapping) and "geometry" in raw
                point = self._geometry_in(lyr, geometry, in_sr) if has_geometry else None
                touched.add(oid)
                res = {"objectId": oid, "uniqueId": oid, "globalId": gid, "success": True}
                staged_updates.append((res, oid, values, point, has_geometry))
            except EditError as err:
                res = {"objectId": oid if oid is not None else -1, "uniqueId": oid if oid is not None else -1,
                       "globalId": gid, "success": False, "error": {"code": err.code, "description": err.description}}
            update_results.append(res)

        for raw in deletes:
            oid = None
            gid = None
            try:
                ident = {lyr.gid_field if use_gids else lyr.oid_field: raw}
                oid, gid = self._locate(lyr, ident, use_gids, missing_code=1011)
                if oid in touched:
                    raise EditError(1000, "The same feature is edited twice in one request.")
                touched.add(oid)
                res = {"objectId": oid, "uniqueId": oid, "globalId": gid, "success": True}
                staged_deletes.append((res, oid))
            except EditError as err:
                res = {"objectId": oid if oid is not None else -1, "uniqueId": oid if oid is not None else -1,
                       "globalId": canonical_guid(raw) if use_gids else gid, "success": False,
                       "error": {"code": err.code, "description": err.description}}
            delete_results.append(res)

        failures = [r for r in (*add_results, *update_results, *delete_results) if not r["success"]]
        if rollback and failures:
            raise RestError(400, "Unable to complete operation.",
                            [f"{r['error']['description']} (error {r['error']['code']})" for r in failures])
        if staged_adds or staged_updates or staged_deletes:
            now = self.clock()
            before = self._gen
            self._gen += 1
            gen = self._gen
            events: set[str] = set()
            for res, gid, values, point in staged_adds:
                oid = lyr.next_oid
                lyr.next_oid += 1
                attrs: dict[str, Any] = {f.name: None for f in lyr.fields}
                attrs.update(values)
                attrs.update({lyr.oid_field: oid, lyr.gid_field: gid, "CreationDate": now, "Creator": user,
                              "EditDate": now, "Editor": user})
                lyr.features[oid] = _Feature(attrs, point, gen, gen)
                lyr.by_gid[gid] = oid
                res["objectId"] = res["uniqueId"] = oid
                events.add("FeaturesCreated")
            for _res, oid, values, point, has_geometry in staged_updates:
                feat = lyr.features[oid]
                feat.attrs.update(values)
                feat.attrs.update({"EditDate": now, "Editor": user})
                if has_geometry:
                    feat.geometry = point
                feat.updated_gen = gen
                events.add("FeaturesUpdated")
            for _res, oid in staged_deletes:
                feat = lyr.features.pop(oid)
                gid = feat.attrs[lyr.gid_field]
                del lyr.by_gid[gid]
                gone = dict(feat.attrs)
                gone.update({"EditDate": now, "Editor": user})
                lyr.tombstones.append(_Tombstone(oid, gid, gone, feat.created_gen, gen))
                events.add("FeaturesDeleted")
            lyr.last_edit = now
            changes.append(_Change(lyr.d.id, events, before, gen, now))
        for res in (*add_results, *update_results, *delete_results):
            if res.get("globalId"):
                res["globalId"] = self._guid_out(str(res["globalId"]))
        return {"addResults": add_results, "updateResults": update_results, "deleteResults": delete_results}

    def _locate(self, lyr: _Layer, attrs_in: Mapping[str, Any], use_gids: bool, *,
                missing_code: int) -> tuple[int, str | None]:
        if use_gids:
            given = _get_ci(attrs_in, lyr.gid_field)
            if given is None:
                raise EditError(1020, "GlobalID is missing.")
            gid = canonical_guid(given)
            if gid is None:
                raise EditError(1000, f"Invalid GlobalID value {given!r}.")
            oid = lyr.by_gid.get(gid)
            if oid is None:
                raise EditError(missing_code, "Object is missing.")
            return oid, gid
        given = _get_ci(attrs_in, lyr.oid_field)
        try:
            oid = int(given)
            if oid != given and not isinstance(given, str):
                raise ValueError("not a whole number")
        except (TypeError, ValueError, OverflowError) as exc:
            raise EditError(1000, f"Invalid {lyr.oid_field} value {given!r}.") from exc
        feat = lyr.features.get(oid)
        if feat is None:
            raise EditError(missing_code, "Object is missing.")
        return oid, feat.attrs[lyr.gid_field]

    def _validate_values(self, lyr: _Layer, attrs_in: Mapping[str, Any],
                         existing: Mapping[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in attrs_in.items():
            f = lyr.field(name)
            if f is None:
                raise EditError(1000, f"Field '{name}' does not exist in layer '{lyr.d.name}'.")
            if f.type in (OID, GLOBALID) or f.name in EDIT_FIELDS.values():
                continue  # server-maintained: ignored, like the service does
            if not f.editable:
                raise EditError(1023, f"Field '{f.name}' is not editable.")
            out[f.name] = _coerce(f, value)
        merged = {**(existing or {}), **out}
        for f in lyr.fields:
            if f.editable and not f.nullable and merged.get(f.name) is None:
                raise EditError(1001, f"Field '{f.name}' cannot be null.")
        return out

    def _geometry_in(self, lyr: _Layer, raw: Any, in_sr: int | None) -> tuple[float, float] | None:
        if lyr.is_table or raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise EditError(1015, "Geometry could not be set: not a geometry object.")
        x, y = raw.get("x"), raw.get("y")
        if x is None and y is None:
            return None
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (x, y)):
            raise EditError(1015, f"Geometry could not be set: invalid point x={x!r} y={y!r}.")
        wkid = _wkid_of(raw.get("spatialReference")) or in_sr or 102100
        fx, fy = float(x), float(y)  # type: ignore[arg-type]
        if wkid == 4326:
            if not (-180 <= fx <= 180 and -90 <= fy <= 90):
                raise EditError(1015, f"Geometry could not be set: ({fx}, {fy}) is outside WGS84.")
            return lonlat_to_mercator(fx, fy)
        if wkid in MERCATOR_WKIDS:
            return fx, fy
        raise EditError(1015, f"Geometry could not be set: spatial reference {wkid} is not supported.")

    # ------------------------------------------------------------------------------------ attachments

    def _add_attachment(self, lyr: _Layer, oid: int, name: str, content_type: str, data: bytes, keywords: str,
                        changes: list[_Change], *, user: str | None = None) -> _Attachment:
        self._require_attachments(lyr)
        now = self.clock()
        before = self._gen
        self._gen += 1
        att = _Attachment(next(self._attachment_ids), "{" + str(uuid.uuid4()).upper() + "}", name, content_type,
                          data, keywords, self._gen)
        lyr.features[oid].attachments[att.id] = att
        changes.append(_Change(lyr.d.id, {"AttachmentsCreated"}, before, self._gen, now))
        return att

    def _delete_attachments(self, lyr: _Layer, oid: int, raw_ids: str, changes: list[_Change]) -> list[Any]:
        feat = lyr.features[oid]
        results: list[dict[str, Any]] = []
        ids: set[int] = _int_list(raw_ids, "attachmentIds") or set()
        before = self._gen
        deleted = False
        for aid in sorted(ids):
            att = feat.attachments.pop(aid, None)
            if att is None:
                results.append({"objectId": aid, "globalId": None, "success": False,
                                "error": {"code": 1011, "description": "Object is missing."}})
                continue
            if not deleted:
                self._gen += 1
                deleted = True
            lyr.attachment_tombstones.append((aid, feat.attrs[lyr.gid_field], self._gen))
            results.append({"objectId": aid, "globalId": self._guid_out(att.global_id), "success": True})
        if deleted:
            changes.append(_Change(lyr.d.id, {"AttachmentsDeleted"}, before, self._gen, self.clock()))
        return results
