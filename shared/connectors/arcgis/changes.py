"""The change feed: extractChanges polls by serverGen, the first read, the EditDate fallback -> records."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from shared.connectors.arcgis.client import ArcGISServiceClient, _exceeded
from shared.connectors.arcgis.codecs import _timestamp_literal, canonical_guid, epoch_ms_to_datetime
from shared.connectors.arcgis.schema import LayerInfo
from shared.core.errors import EnvelopeError, SpecError, TransientError
from shared.core.ports import SourceRecord

log = logging.getLogger(__name__)

_CHECKPOINT_EDITDATE = "editdate:"
_CHECKPOINT_SCAN = "scan:"


class ArcGISChanges(ArcGISServiceClient):
    """ChangeSource: extractChanges by serverGen, the first keyset scan, the EditDate fallback."""

    # ------------------------------------------------------------------------------------ ChangeSource

    async def changes_since(self, table: str, checkpoint: str | None) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """Pages of changed records since `checkpoint` (cursor forms: `ArcGISFeatureServiceClient`'s docstring)."""
        layer = await self.layer_info(table)
        svc = await self.service_info()
        text = (checkpoint or "").strip()
        pages: AsyncIterator[tuple[list[SourceRecord], str]]
        if not svc.change_tracking:
            text = _own_cursor(layer, text, _CHECKPOINT_EDITDATE, "an EditDate cursor", "disabled")
            pages = self._edit_date_changes(layer, text)
        elif text.isdigit():
            pages = self._extract_changes(layer, int(text))
        else:
            pages = self._initial_read(layer, _own_cursor(layer, text, _CHECKPOINT_SCAN, "a serverGen", "enabled"))
        async for page in pages:
            yield page

    async def _initial_read(self, layer: LayerInfo, checkpoint: str) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """First read of a change-tracked layer: keyset scan by objectId, then changes since the scan began."""
        if checkpoint.startswith(_CHECKPOINT_SCAN):
            _, gen_text, oid_text = checkpoint.split(":", 2)
            start_gen, last_oid = int(gen_text), int(oid_text)
        else:
            start_gen, last_oid = await self._current_server_gen(layer), -1
        oid_field = layer.object_id_field
        while True:
            where = f"{oid_field} > {last_oid}"
            body = await self._keyset_page(layer, where, f"{oid_field} ASC", what=f"initial read of {layer.name}")
            features = body.get("features") or []
            sr = body.get("spatialReference") or layer.spatial_reference
            records = [self._record(layer, feat, sr) for feat in features]
            if not records:
                break
            await self._with_attachments(layer, records)
            last_oid = max(int(r.values[oid_field]) for r in records)
            more = _exceeded(body)
            yield records, f"{_CHECKPOINT_SCAN}{start_gen}:{last_oid}" if more else str(start_gen)
            if not more:
                return
        async for page in self._extract_changes(layer, start_gen):
            yield page

    async def _keyset_page(self, layer: LayerInfo, where: str, order_by: str, *, what: str) -> Any:
        """One page of a keyset read (the where clause moves, no resultOffset): up to a page of rows."""
        form = {"f": "json", "where": where, "outFields": "*", "orderByFields": order_by,
                "returnGeometry": "false" if layer.is_table else "true",
                "resultRecordCount": str(self._page_size(layer))}
        if self.out_sr:
            form["outSR"] = str(self.out_sr)
        return await self._request("POST", f"{self._layer_url(layer)}/query", data=form, what=what)

    async def _current_server_gen(self, layer: LayerInfo) -> int:
        body = await self._request("GET", self.service_url, params={"f": "json"},
                                   what="read the service's change tracking info")
        info = body.get("changeTrackingInfo") if isinstance(body, Mapping) else None
        for entry in (info or {}).get("layerServerGens") or []:
            if entry.get("id") == layer.id and isinstance(entry.get("serverGen"), int):
                return int(entry["serverGen"])
        return 0

    async def _extract_changes(self, layer: LayerInfo, since: int) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        form = {
            "f": "json", "layers": json.dumps([layer.id]),
            "layerServerGens": json.dumps([{"id": layer.id, "serverGen": since}]),
            "returnInserts": "true", "returnUpdates": "true", "returnDeletes": "true",
            "returnDeletedFeatures": "true", "returnIdsOnly": "false",
            "returnAttachments": "true" if layer.has_attachments else "false",
            "dataFormat": "json", "transportType": "esriTransportTypeEmbedded", "async": "false",
        }
        if self.out_sr:
            form["outSR"] = str(self.out_sr)
        what = f"extractChanges for {layer.name} since serverGen {since}"
        body = await self._request("POST", f"{self.service_url}/extractChanges", data=form, what=what)
        if isinstance(body, Mapping) and isinstance(body.get("statusUrl"), str):
            body = await self._await_job(str(body["statusUrl"]), what)
        new_gen = next((int(g["serverGen"]) for g in body.get("layerServerGens") or []
                        if g.get("id") == layer.id and isinstance(g.get("serverGen"), int)), None)
        if new_gen is None:
            raise TransientError(f"arcgis: {what}: the answer has no serverGen for layer {layer.id}")
        entry: Mapping[str, Any] = next((e for e in body.get("edits") or [] if e.get("id") == layer.id), {})
        features = entry.get("features") or {}
        sr = entry.get("spatialReference") or layer.spatial_reference
        records = [self._record(layer, f, sr) for f in [*(features.get("adds") or []),
                                                         *(features.get("updates") or [])]]
        records.extend(self._deleted(layer, features))
        seen = {r.key for r in records}
        # Attachment-only changes (a photo added later) surface as an update of the parent feature.
        parents = [canonical_guid(a.get("parentGlobalId")) for a in
                   [*((entry.get("attachments") or {}).get("adds") or []),
                    *((entry.get("attachments") or {}).get("updates") or [])]]
        extra = [g for g in dict.fromkeys(p for p in parents if p) if g not in seen]
        if extra:
            records.extend((await self.fetch(layer.name, extra)).values())
        await self._with_attachments(layer, [r for r in records if not r.attachments])
        size = self._page_size(layer)
        if not records:
            if new_gen != since:
                yield [], str(new_gen)
            return
        for start in range(0, len(records), size):
            last = start + size >= len(records)
            # Only the last page moves the cursor: a crash mid-way re-reads the whole window.
            yield records[start:start + size], str(new_gen) if last else str(since)

    def _deleted(self, layer: LayerInfo, features: Mapping[str, Any]) -> list[SourceRecord]:
        out: list[SourceRecord] = []
        described: set[Any] = set()
        edit_field = layer.edit_date_field
        for feat in features.get("deletes") or []:
            attrs = {k.lower(): v for k, v in (feat.get("attributes") or {}).items()}
            gid = canonical_guid(attrs.get(layer.global_id_field.lower()))
            if gid is None:
                continue
            described.add(attrs.get(layer.object_id_field.lower()))
            described.add(gid)
            edited = attrs.get(edit_field.lower()) if edit_field else None
            out.append(SourceRecord(gid, {layer.global_id_field: gid}, epoch_ms_to_datetime(edited)
                                    if isinstance(edited, int) else None, None, deleted=True))
        known = self._gids_by_oid.get(layer.id, {})
        for ident in features.get("deleteIds") or []:
            if ident in described:
                continue
            gid = canonical_guid(ident) if isinstance(ident, str) else known.get(ident) if isinstance(ident, int) \
                else None
            if gid is None:
                log.warning("arcgis: %s: deleted objectId %s cannot be mapped to a GlobalID (the service did not "
                            "return deleted features); reconciliation will catch it", layer.name, ident)
                continue
            if gid not in described:
                out.append(SourceRecord(gid, {layer.global_id_field: gid}, None, None, deleted=True))
        return out

    async def _await_job(self, status_url: str, what: str, timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            status = await self._request("GET", status_url, params={"f": "json"}, what=f"{what} (job status)")
            state = str(status.get("status") or "").lower()
            if state in ("completed", "esrijobsucceeded") and status.get("resultUrl"):
                return await self._request("GET", str(status["resultUrl"]), params={"f": "json"},
                                           what=f"{what} (job result)")
            if state in ("failed", "esrijobfailed"):
                raise TransientError(f"arcgis: {what}: the asynchronous job failed: {status}")
            if time.monotonic() > deadline:
                raise TransientError(f"arcgis: {what}: the asynchronous job did not finish in {timeout:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _edit_date_changes(self, layer: LayerInfo,
                                 checkpoint: str) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """Editor-tracking fallback: keyset pages ordered by (EditDate, objectId) from the last watermark."""
        ed = layer.edit_date_field
        if not ed:
            raise SpecError(f"arcgis: layer {layer.name} has neither ChangeTracking nor editor tracking (EditDate); "
                            f"enable 'Keep track of changes' or editor tracking on the layer")
        oid_field = layer.object_id_field
        since, emitted = _parse_edit_date_checkpoint(checkpoint)
        watermark, boundary = since, set(emitted)
        cursor: tuple[int | None, int] | None = None
        last_yielded = checkpoint
        while True:
            if cursor is None:
                where = f"{ed} >= {_timestamp_literal(since)}" if since is not None else "1=1"
            elif cursor[0] is None:
                where = f"({ed} IS NULL AND {oid_field} > {cursor[1]}) OR {ed} IS NOT NULL"
            else:
                stamp = _timestamp_literal(cursor[0])
                where = f"({ed} = {stamp} AND {oid_field} > {cursor[1]}) OR {ed} > {stamp}"
            body = await self._keyset_page(layer, where, f"{ed} ASC, {oid_field} ASC",
                                           what=f"read {layer.name} edited since {since}")
            features = body.get("features") or []
            sr = body.get("spatialReference") or layer.spatial_reference
            records: list[SourceRecord] = []
            for feat in features:
                record = self._record(layer, feat, sr)
                edited, oid = record.values.get(ed), int(record.values[oid_field])
                cursor = (edited if isinstance(edited, int) else None, oid)
                if isinstance(edited, int) and edited == since and oid in emitted:
                    continue  # emitted by the previous read (same millisecond as its watermark)
                records.append(record)
                if isinstance(edited, int):
                    if watermark is None or edited > watermark:
                        watermark, boundary = edited, {oid}
                    elif edited == watermark:
                        boundary.add(oid)
            if not features:
                return
            await self._with_attachments(layer, records)
            position = _edit_date_checkpoint(watermark, boundary)
            if records or position != last_yielded:  # a page of already-sent rows moves nothing
                yield records, position
                last_yielded = position
            if not _exceeded(body):
                return


def _parse_edit_date_checkpoint(text: str) -> tuple[int | None, frozenset[int]]:
    if not text.startswith(_CHECKPOINT_EDITDATE):
        return None, frozenset()
    _, ms, oids = [*text.split(":", 2), "", ""][:3]
    try:
        return (int(ms) if ms else None), frozenset(int(o) for o in oids.split(",") if o)
    except ValueError as exc:
        raise EnvelopeError(f"arcgis: malformed EditDate checkpoint {text!r}") from exc


def _edit_date_checkpoint(watermark: int | None, boundary: Iterable[int]) -> str:
    if watermark is None:
        return _CHECKPOINT_EDITDATE
    return f"{_CHECKPOINT_EDITDATE}{watermark}:{','.join(str(o) for o in sorted(boundary))}"


# ============================================================================================ webhooks


def _own_cursor(layer: LayerInfo, text: str, prefix: str, what: str, toggled: str) -> str:
    """`text` when it is a cursor of the layer's current mode, else "" (read from the start) with a warning."""
    if text and not text.startswith(prefix):
        log.warning("arcgis: %s: checkpoint %r is not %s (change tracking was %s since?); reading the layer "
                    "from the start", layer.name, text, what, toggled)
        return ""
    return text
