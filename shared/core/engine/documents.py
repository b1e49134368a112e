"""Documents: a header's lines read from the source and mapped with it, and its attachments."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from shared.core.engine.base import _EngineBase
from shared.core.engine.isolation import isolate, with_detail
from shared.core.engine.outcome import _Work
from shared.core.engine.rules import _blank, _sortable
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import SyncError, TransientError, ValidationError
from shared.core.observe import correlated
from shared.core.ports import (
    ATTACHMENTS_KEY,
    LINES_KEY,
    Attachment,
    AttachmentRef,
    Lines,
    LineWrite,
    Snapshot,
    SourceRecord,
)
from shared.mapping.spec import FlowSpec

log = logging.getLogger(__name__)

LINE_QUERY_KEYS = 100
"""Headers whose lines are read in one source query (keeps the IN list / or-chain inside URL limits)."""


def _attachment_ref(raw: Any) -> AttachmentRef:
    if isinstance(raw, AttachmentRef):
        return raw
    if not isinstance(raw, Mapping):
        raise ValidationError(f"attachment entry must be an object, got {raw!r}")
    return AttachmentRef(str(raw.get("id")), str(raw.get("name") or raw.get("id")),
                         str(raw.get("content_type") or raw.get("contentType") or "application/octet-stream"),
                         int(raw.get("size") or 0))


def _new_attachments(env: ChangeEnvelope, snap: Snapshot | None) -> bool:
    refs = env.payload.get(ATTACHMENTS_KEY) or []
    done = {str(a.get("id")) for a in (snap.values.get(ATTACHMENTS_KEY) or [])} if snap else set()
    return any(str(_attachment_ref(r).id) not in done for r in refs)


class _Documents(_EngineBase):
    """The engine's reading and mapping of document lines and attachments."""

    async def _read_lines(self, flow: FlowSpec, envs: Sequence[ChangeEnvelope],
                          errors: dict[str, SyncError]) -> dict[str, list[SourceRecord]]:
        # Lines are read when their header syncs, so a document is always written whole and in one piece.
        assert flow.lines is not None
        source = self.sinks.get(flow.source.system)  # select() is on the sink port (cascades use it too)
        if source is None:
            raise TransientError(f"no {flow.source.system} connector configured to read {flow.lines.source_table}")
        out: dict[str, list[SourceRecord]] = {e.source_key: [] for e in envs}
        keys = list(out)
        lines = flow.lines

        async def read(chunk: list[str]) -> list[SourceRecord]:
            return await source.select(lines.source_table, equals={lines.parent_field: chunk})

        for start in range(0, len(keys), LINE_QUERY_KEYS):
            rows, failed = await isolate(read, keys[start:start + LINE_QUERY_KEYS])
            for key, exc in failed.items():
                errors[key] = with_detail(exc, f"flow {flow.name} record {key}: its lines could not be read from "
                                           f"{flow.source.system} {lines.source_table}: {exc.detail}")
            for row in rows:
                parent = str(row.values.get(flow.lines.parent_field) or "")
                if parent in out:
                    out[parent].append(row)
        order_by = flow.lines.match_source
        for rows in out.values():
            # The source's own line order where it has one (line numbers), so target items follow it.
            rows.sort(key=lambda r: (_sortable(r.values.get(order_by)) if order_by else (0, ""), r.key))
        return out

    def _line_projection(self, flow: FlowSpec, work: _Work, source_key: str) -> list[dict[str, Any]]:
        line_flow = self._line_flows[flow.name]
        return [{"key": r.key, **self.mapper.project(line_flow, r.values)} for r in work.lines.get(source_key, [])]

    def _projection(self, flow: FlowSpec, env: ChangeEnvelope, work: _Work) -> dict[str, Any]:
        projection = self.mapper.project(flow, env.payload)
        if flow.lines is not None:
            projection[LINES_KEY] = self._line_projection(flow, work, env.source_key)
        return projection

    def _map_lines(self, flow: FlowSpec, env: ChangeEnvelope, work: _Work) -> Lines:
        assert flow.lines is not None
        line_flow = self._line_flows[flow.name]
        items: list[LineWrite] = []
        for row in work.lines.get(env.source_key, []):
            record = f"{line_flow.source.system}:{line_flow.source.table}:{row.key} (line of {env.source_key})"
            mapped = self.mapper.map_values(line_flow, row.values, is_create=True, target_newer=False, record=record)
            # A line's missing parent (its product) defers or dead-letters the whole document: never half an order.
            self._resolve_lookups(line_flow, row.key, row.values, work.line_parents, mapped.values, is_create=True,
                                  waits=env.waits)
            match_value = row.key
            if flow.lines.match_source is not None:
                raw = row.values.get(flow.lines.match_source)
                if _blank(raw):
                    raise ValidationError(
                        f"flow {flow.name} record {env.source_key}: line {row.key} has no "
                        f"{flow.lines.match_source}, the value that finds it in {flow.target.system}; fill it in, "
                        "then replay.")
                match_value = str(raw)
            values = {**flow.lines.defaults, **mapped.values}
            items.append(LineWrite(row.key, values, {flow.lines.link_field: match_value}))
        return Lines(flow.lines.target_table, dict(flow.lines.parent_fields), items)

    async def _attachments(self, flow: FlowSpec, env: ChangeEnvelope, snap: Snapshot | None) -> list[Attachment]:
        if flow.attachments is None or not flow.attachments.enabled:
            return []
        refs = [_attachment_ref(a) for a in env.payload.get(ATTACHMENTS_KEY) or []]
        done = {str(a.get("id")) for a in (snap.values.get(ATTACHMENTS_KEY) or [])} if snap else set()
        source = self.sources.get(flow.source.system)
        out: list[Attachment] = []
        for ref in refs:
            if ref.id in done or ref.content_type not in flow.attachments.content_types:
                continue
            if ref.size > flow.attachments.max_bytes:
                with correlated([env.correlation_id]):
                    log.warning("flow %s: attachment %s of %s is %d bytes, over the %d limit; not copied",
                                flow.name, ref.id, env.source_key, ref.size, flow.attachments.max_bytes)
                continue
            if source is None:
                raise TransientError(f"no {flow.source.system} source configured to read attachments")
            data = await source.fetch_attachment(flow.source.table, env.source_key, ref.id)
            out.append(Attachment(ref.name, ref.content_type, data, source_id=ref.id))
        return out
