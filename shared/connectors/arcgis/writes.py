"""Writes: applyEdits in batches and rounds, upserts by GlobalID or match, duplicates, attachments."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.connectors.arcgis.client import _WHERE_CHUNK, ArcGISServiceClient
from shared.connectors.arcgis.codecs import _wire_value, attachment_file_name, canonical_guid, where_literal
from shared.connectors.arcgis.errors import _edit_error_text
from shared.connectors.arcgis.schema import LayerInfo
from shared.core.errors import (
    AmbiguousWriteError,
    AuthError,
    MappingError,
    RejectedError,
    SyncError,
    ThrottledError,
    TransientError,
    ValidationError,
)
from shared.core.ports import ATTACHMENTS_KEY, GEOMETRY_KEY, WriteOp, WriteResult

log = logging.getLogger(__name__)

_MISSING_CODES = frozenset({1011, 1019})
"""Edit-result codes the service uses for "object is missing" (1011 per the code list, 1019 seen on updates)."""
_DUPLICATE_CODE = 1022


@dataclass
class _Pending:
    """One op of an applyEdits batch, prepared for the wire."""

    index: int
    op: WriteOp
    attributes: dict[str, Any]
    geometry: Any
    has_geometry: bool
    gid: str | None = None
    created: bool = False
    oid: int | None = None


class ArcGISWrites(ArcGISServiceClient):
    """RecordSink writes: applyEdits batches by GlobalID or match, and attachment uploads."""

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """applyEdits per layer in batches (one POST each, up to `max_concurrency` in flight), one result per op.

        upsert+key / update -> update by GlobalID; upsert+match -> one query per batch for the match values,
        then update the features found and add the rest with a client-made GlobalID (so a replay after a
        lost answer finds them); delete -> delete by GlobalID (already gone = success). Attachments are
        uploaded after their feature exists, skipping names already there.
        """
        results: dict[int, WriteResult] = {}
        by_table: dict[str, list[int]] = {}
        for index, op in enumerate(ops):
            by_table.setdefault(op.table, []).append(index)
        await asyncio.gather(*(self._write_table(table, [(i, ops[i]) for i in indexes], results)
                               for table, indexes in by_table.items()))
        out = [results.get(i) or WriteResult(op.op_id, False, error=TransientError("arcgis: no result for the op"))
               for i, op in enumerate(ops)]
        errors = [r.error for r in out if not r.ok]
        if out and len(errors) == len(out) and all(isinstance(e, AuthError | ThrottledError) for e in errors):
            raise errors[0]  # type: ignore[misc]  # the whole call failed: auth or throttling
        return out

    async def _write_table(self, table: str, items: list[tuple[int, WriteOp]], results: dict[int, WriteResult]) -> None:
        try:
            layer = await self.layer_info(table)
        except SyncError as exc:
            for index, op in items:
                results[index] = WriteResult(op.op_id, False, error=exc)
            return
        pending: list[_Pending] = []
        for index, op in items:
            try:
                pending.append(self._prepare(layer, index, op))
            except SyncError as exc:
                results[index] = WriteResult(op.op_id, False, key=op.key, error=exc)
        for round_ in _rounds(pending):
            batches = [round_[i:i + self.batch_size] for i in range(0, len(round_), self.batch_size)]
            await asyncio.gather(*(self._write_batch(layer, batch, results) for batch in batches))

    def _prepare(self, layer: LayerInfo, index: int, op: WriteOp) -> _Pending:
        if op.action not in ("upsert", "update", "delete"):
            raise ValidationError(f"arcgis: unknown write action {op.action!r}", reason="TARGET_REJECTED")
        if op.key is None and not op.match:
            raise ValidationError(f"arcgis: {op.action} on {layer.name} needs a key (GlobalID) or a match field",
                                  reason="TARGET_REJECTED")
        if op.key is not None and canonical_guid(op.key) is None:
            raise MappingError(f"arcgis: {op.key!r} is not a GlobalID ({layer.name}, op {op.op_id})")
        attributes: dict[str, Any] = {}
        geometry: Any = None
        has_geometry = False
        server = {n.lower() for n in layer.server_fields}
        for name, value in op.values.items():
            if name == GEOMETRY_KEY:
                geometry, has_geometry = value, not layer.is_table
                continue
            if name == ATTACHMENTS_KEY:
                continue
            f = layer.require(name)
            if f.name.lower() in server:
                continue  # server-maintained; the service would ignore it anyway
            attributes[f.name] = _wire_value(f, value, layer)
        for name, value in (op.match or {}).items():
            f = layer.require(name)
            attributes.setdefault(f.name, _wire_value(f, value, layer))  # adds must carry the match field
        if has_geometry and geometry is not None and (
                not isinstance(geometry, Mapping) or not {"x", "y"} <= set(geometry)):
            raise MappingError(f"arcgis: {layer.name}: geometry must be an ArcGIS point {{x, y, "
                               f"spatialReference}}, got {geometry!r}")
        return _Pending(index, op, attributes, geometry, has_geometry,
                        gid=canonical_guid(op.key) if op.key else None)

    async def _write_batch(self, layer: LayerInfo, batch: list[_Pending], results: dict[int, WriteResult]) -> None:
        async with self._write_slots:
            try:
                await self._apply_batch(layer, batch, results)
            except SyncError as exc:
                for p in batch:
                    if p.index not in results:
                        results[p.index] = WriteResult(p.op.op_id, False, key=p.gid, error=exc)

    async def _apply_batch(self, layer: LayerInfo, batch: list[_Pending], results: dict[int, WriteResult]) -> None:
        matched = await self._lookup_matches(layer, [p for p in batch if p.gid is None])
        adds: list[_Pending] = []
        updates: list[_Pending] = []
        deletes: list[_Pending] = []
        for p in batch:
            if p.gid is None:
                p.gid = matched.get(_match_identity(layer, p.op.match or {}))
            if p.op.action == "delete":
                if p.gid is None:
                    results[p.index] = WriteResult(p.op.op_id, True)  # nothing matches: already deleted
                else:
                    deletes.append(p)
            elif p.gid is not None:
                updates.append(p)
            elif p.op.action == "update":
                results[p.index] = WriteResult(p.op.op_id, False, error=RejectedError(
                    f"arcgis: {layer.name}: no feature matches {p.op.match} (object is missing); "
                    f"nothing to update (op {p.op.op_id})"))
            else:
                # Client-made GlobalID, derived from the match: the key is known even if the answer is lost
                # (replays find it), and two processes creating the same record at once pick the same GlobalID,
                # so the second add is refused as a duplicate (1022) and becomes an update, never a twin.
                p.gid, p.created = _globalid_for(layer, p.op.match), True
                adds.append(p)
        if adds or updates or deletes:
            await self._apply_edits(layer, adds, updates, deletes, results)
        for p in batch:
            if p.op.attachments and p.index in results and results[p.index].ok and p.op.action != "delete":
                try:
                    await self._upload_attachments(layer, p)
                except SyncError as exc:
                    results[p.index] = WriteResult(p.op.op_id, False, key=p.gid, error=exc)

    async def _lookup_matches(self, layer: LayerInfo, pending: list[_Pending]) -> dict[tuple[Any, ...], str]:
        """One query for every match of the batch: {match identity: GlobalID} of the features that exist."""
        matches = [p.op.match for p in pending if p.op.match]
        if not matches:
            return {}
        fields = sorted({layer.require(n).name for m in matches for n in m})
        single = len(fields) == 1 and all(len(m) == 1 for m in matches)
        found: dict[tuple[Any, ...], str] = {}
        for start in range(0, len(matches), _WHERE_CHUNK):
            chunk = matches[start:start + _WHERE_CHUNK]
            if single:
                f = layer.require(fields[0])
                literals = dict.fromkeys(where_literal(f, next(iter(m.values())), layer) for m in chunk)
                where = f"{f.name} IN ({', '.join(literals)})"
            else:
                where = " OR ".join(
                    "(" + " AND ".join(f"{layer.require(n).name} = {where_literal(layer.require(n), v, layer)}"
                                       for n, v in m.items()) + ")" for m in chunk)
            out_fields = ",".join([layer.object_id_field, layer.global_id_field, *fields])
            async for features, _ in self._query_pages(layer, where, out_fields=out_fields, geometry=False):
                for feat in features:
                    attrs = {k.lower(): v for k, v in (feat.get("attributes") or {}).items()}
                    gid = canonical_guid(attrs.get(layer.global_id_field.lower()))
                    if gid is None:
                        continue
                    for m in chunk:
                        ident = _match_identity(layer, m)
                        if all(_same(attrs.get(layer.require(n).name.lower()), v) for n, v in m.items()):
                            if ident in found and found[ident] != gid:
                                log.warning("arcgis: %s: several features match %s; updating the oldest (%s)",
                                            layer.name, m, found[ident])
                                continue
                            found[ident] = gid
                    oid = attrs.get(layer.object_id_field.lower())
                    if isinstance(oid, int):
                        self._remember_oid(layer, oid, gid)
        return found

    async def _apply_edits(self, layer: LayerInfo, adds: list[_Pending], updates: list[_Pending],
                           deletes: list[_Pending], results: dict[int, WriteResult]) -> None:
        form = {"f": "json", "useGlobalIds": "true", "rollbackOnFailure": "false"}
        if adds:
            form["adds"] = json.dumps([_feature_json(layer, p) for p in adds])
        if updates:
            form["updates"] = json.dumps([_feature_json(layer, p) for p in updates])
        if deletes:
            form["deletes"] = json.dumps([p.gid for p in deletes])
        what = (f"applyEdits on {layer.name} ({len(adds)} adds, {len(updates)} updates, "
                f"{len(deletes)} deletes)")
        body = await self._request("POST", f"{self._layer_url(layer)}/applyEdits", data=form, what=what, write=True)
        sections = (("addResults", adds, "add"), ("updateResults", updates, "update"),
                    ("deleteResults", deletes, "delete"))
        duplicates: list[_Pending] = []
        for key, items, verb in sections:
            answers = body.get(key) if isinstance(body, Mapping) else None
            answers = answers if isinstance(answers, list) else []
            if len(answers) != len(items):
                raise AmbiguousWriteError(f"arcgis: {what}: {len(answers)} {key} for {len(items)} edits; "
                                          f"the outcome is unknown and is re-checked on retry")
            for p, answer in zip(items, answers, strict=True):
                if isinstance(answer, Mapping) and answer.get("success") is True:
                    if isinstance(answer.get("objectId"), int) and answer["objectId"] >= 0:
                        p.oid = int(answer["objectId"])
                        self._remember_oid(layer, p.oid, p.gid or "")
                    results[p.index] = WriteResult(p.op.op_id, True, key=p.gid, created=p.created)
                    continue
                error = answer.get("error") if isinstance(answer, Mapping) else None
                code = error.get("code") if isinstance(error, Mapping) else None
                description = str(error.get("description") or "") if isinstance(error, Mapping) else ""
                missing = code in _MISSING_CODES or "object is missing" in description.lower()
                if verb == "delete" and missing:
                    results[p.index] = WriteResult(p.op.op_id, True, key=p.gid)  # already gone: the goal holds
                elif verb == "add" and code == _DUPLICATE_CODE:
                    duplicates.append(p)  # our GlobalID is already there: an earlier attempt landed
                else:
                    detail = (f"arcgis: {layer.name}: {verb} of feature {p.gid} (op {p.op.op_id}"
                              f"{f', match {p.op.match}' if p.op.match else ''}) rejected: error {code}: "
                              f"{description or 'no description'}")
                    if missing:
                        detail += " (object is missing: deleted in ArcGIS?)"
                    results[p.index] = WriteResult(p.op.op_id, False, key=p.gid, error=RejectedError(detail))
        if duplicates:
            present = await self.fetch(layer.name, [p.gid for p in duplicates if p.gid])
            for p in duplicates:
                if p.gid in present:
                    results[p.index] = WriteResult(p.op.op_id, True, key=p.gid, created=True)
                else:
                    results[p.index] = WriteResult(p.op.op_id, False, key=p.gid, error=RejectedError(
                        f"arcgis: {layer.name}: add of {p.gid} (op {p.op.op_id}) hit a unique constraint (1022)"))

    async def _upload_attachments(self, layer: LayerInfo, p: _Pending) -> None:
        names = [a.name for a in p.op.attachments]
        if not layer.has_attachments:
            raise RejectedError(f"arcgis: layer {layer.name} has attachments disabled; cannot attach {names} to "
                                f"{p.gid}: enable attachments or disable them in the flow")
        oid = p.oid if p.oid is not None else await self._oid_for(layer, p.gid or "")
        existing = {a.name for a in await self._attachment_refs(layer, oid)}
        for att in p.op.attachments:
            name = attachment_file_name(att)
            if name in existing:
                continue
            body = await self._request(
                "POST", f"{self._layer_url(layer)}/{oid}/addAttachment", data={"f": "json"},
                files={"attachment": (name, att.data, att.content_type)}, write=True,
                what=f"add attachment {name} to {layer.name} {p.gid}")
            outcome = body.get("addAttachmentResult") if isinstance(body, Mapping) else None
            if not isinstance(outcome, Mapping) or outcome.get("success") is not True:
                error = outcome.get("error") if isinstance(outcome, Mapping) else None
                raise RejectedError(f"arcgis: {layer.name} {p.gid}: attachment {name} ({att.content_type}, "
                                    f"{len(att.data)} bytes) rejected: {_edit_error_text(error)}")
            existing.add(name)


def _feature_json(layer: LayerInfo, p: _Pending) -> dict[str, Any]:
    feature: dict[str, Any] = {"attributes": {**p.attributes, layer.global_id_field: p.gid}}
    if p.has_geometry:
        feature["geometry"] = p.geometry
    return feature


_GLOBALID_NAMESPACE = uuid.UUID("6f1c7a52-3a0e-4c1b-9a51-5e2f0d9b7c11")
"""Namespace of the name-based (UUID v5) GlobalIDs Syncline gives the features it creates."""


def _globalid_for(layer: LayerInfo, match: Mapping[str, Any] | None) -> str:
    """A GlobalID that is a function of the layer and the record's match (random when there is no match)."""
    if not match:
        return "{" + str(uuid.uuid4()).upper() + "}"
    name = layer.name + "|" + "|".join(f"{k.lower()}={v}" for k, v in sorted(match.items()))
    return "{" + str(uuid.uuid5(_GLOBALID_NAMESPACE, name)).upper() + "}"


def _match_identity(layer: LayerInfo, match: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted((layer.require(n).name.lower(), _norm(v)) for n, v in match.items()))


def _norm(value: Any) -> Any:
    # The hosted data's collation is case-insensitive and GUIDs compare regardless of case and braces.
    if isinstance(value, str):
        return canonical_guid(value) or value.casefold()
    return value


def _same(stored: Any, wanted: Any) -> bool:
    return stored is not None and _norm(stored) == _norm(wanted)


def _rounds(pending: list[_Pending]) -> list[list[_Pending]]:
    """Split ops so one applyEdits never touches a record twice; later ops on a record go in later rounds."""
    rounds: list[list[_Pending]] = []
    seen: list[set[Any]] = []
    for p in pending:
        ident = ("key", p.gid) if p.gid else ("match", tuple(sorted((k.lower(), _norm(v))
                                                                   for k, v in (p.op.match or {}).items())))
        last = max((i for i, s in enumerate(seen) if ident in s), default=-1)
        while len(rounds) <= last + 1:
            rounds.append([])
            seen.append(set())
        rounds[last + 1].append(p)
        seen[last + 1].add(ident)
    return rounds
