"""Relations: parents' target keys bound into children, and parents never synced ensured first."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from shared.core.engine.base import _EngineBase
from shared.core.engine.isolation import isolate, with_detail
from shared.core.engine.outcome import Outcome, _Work
from shared.core.engine.rules import _blank, _canonical_key
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import ParentMissingError, ParentPendingError, RecordBusyError, SyncError, ValidationError
from shared.core.ports import Bind, ChangeSource, SourceRecord
from shared.core.ports import split_key as key_parts
from shared.mapping.spec import FlowSpec

log = logging.getLogger(__name__)


class _Relations(_EngineBase):
    """The engine's binding of children to their parents' target records."""

    async def _parent_links(self, flow: FlowSpec, payloads: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
        parents: dict[str, dict[str, str]] = {}
        src, tgt = flow.source, flow.target
        asks: list[tuple[str, Awaitable[dict[str, str]]]] = []
        for lk in flow.lookups:
            parent = self.flowset.flow(lk.parent_flow)
            parent_keys = sorted({str(p[lk.source]) for p in payloads if not _blank(p.get(lk.source))})
            parent_keys = [_canonical_key(src.system, k) for k in parent_keys]
            asks.append((lk.source, self.state.get_links(parent.entity, src.system, parent_keys, tgt.system)))
        for field_name, found in zip([f for f, _ in asks], await asyncio.gather(*(a for _, a in asks)), strict=True):
            parents.setdefault(field_name, {}).update(found)
        return parents

    async def _ensure_parents(self, flow: FlowSpec, envs: Sequence[ChangeEnvelope], work: _Work) -> None:
        """Sync parents that were never synced (read from the source now), so children need not wait for a
        change of the parent that may never come. A parent that fails keeps its children deferred as usual.
        Each parent is held (locked and leased) while it is ensured, as its own change would hold it."""
        src = flow.source
        for lk in flow.lookups:
            if not lk.ensure:
                continue
            known = work.parents.get(lk.source, {})
            missing = sorted({_canonical_key(src.system, str(e.payload[lk.source])) for e in envs
                              if e.operation != "delete" and not _blank(e.payload.get(lk.source))} - set(known))
            if not missing:
                continue
            parent = self.flowset.flow(lk.parent_flow)
            source = self.sources.get(parent.source.system)
            if source is None:
                continue
            async with self._parents_locked(parent, missing) as (mine, busy):
                await self._ensure_locked(flow, lk.source, parent, source, envs, work, mine, busy)
            work.parents.update(await self._parent_links(flow, [e.payload for e in envs]))

    async def _ensure_locked(self, flow: FlowSpec, field_name: str, parent: FlowSpec, source: ChangeSource,
                             envs: Sequence[ChangeEnvelope], work: _Work, mine: list[str], busy: set[str]) -> None:
        """Sync the parents `mine` (locked and leased by this call) that are still unlinked; children of the
        parents in `busy` (another call or process is writing them) are busy too, and retried shortly."""
        src = flow.source
        table = parent.source.table
        for e in envs:
            value = e.payload.get(field_name)
            if e.operation != "delete" and not _blank(value) and _canonical_key(src.system, str(value)) in busy \
                    and e.source_key not in work.read_errors:
                work.read_errors[e.source_key] = RecordBusyError(
                    f"flow {flow.name} record {e.source_key}: its parent {value} ({parent.source.system} {table}) "
                    "is being written by another process; retried shortly")
        # Find before create, under the lock: the parent may have been synced since this batch loaded its links.
        linked = await self.state.get_links(parent.entity, src.system, mine, flow.target.system) if mine else {}
        work.parents.setdefault(field_name, {}).update(linked)
        missing = [k for k in mine if k not in linked]
        if missing:

            async def read(chunk: list[str]) -> list[SourceRecord]:
                return list((await source.fetch(table, chunk)).values())

            found, failed = await isolate(read, missing)
            records = {r.key: r for r in found}
            for e in envs:
                value = e.payload.get(field_name)
                exc = failed.get(_canonical_key(src.system, str(value))) if not _blank(value) else None
                if exc is not None and e.source_key not in work.read_errors:
                    work.read_errors[e.source_key] = with_detail(
                        exc, f"flow {flow.name} record {e.source_key}: its parent {value} could not be read from "
                             f"{parent.source.system} {table}: {exc.detail}")
        else:
            records = {}
        correlation = next((e.correlation_id for e in envs), None)
        parent_envs = [ChangeEnvelope(
            flow=parent.name, operation="upsert", source_system=parent.source.system,
            source_table=parent.source.table, source_key=r.key, source_version=r.version,
            source_modified=r.modified, payload=dict(r.values), origin="resubmit",
            **({"correlation_id": correlation} if correlation else {}),
        ) for r in records.values()]
        if not parent_envs:
            return
        outcomes: list[Outcome | None] = [None] * len(parent_envs)
        try:
            await self._process_flow(parent, parent_envs, list(range(len(parent_envs))), outcomes)
        except SyncError as exc:
            # The parents stay unsynced, so their children wait (deferred) as for any parent not there yet.
            log.warning("flow %s: parents could not be synced first: %s", flow.name, exc)
        audit = [self._audit_for(o) for o in outcomes if o is not None and o.status in ("failed", "deferred")]
        if audit:
            await self.state.append_audit(audit)
        for o in outcomes:
            if o is not None and o.status == "failed":
                log.warning("flow %s: parent %s could not be synced first: %s", flow.name,
                            o.envelope.source_key, o.error)

    @staticmethod
    def _match_value(flow: FlowSpec, env: ChangeEnvelope) -> str:
        name = flow.link.match_source
        if name is None:
            return env.source_key
        value = env.payload.get(name)
        if _blank(value):
            raise ValidationError(
                f"flow {flow.name} record {env.source_key}: {flow.source.system}.{name} is empty, but it is the value "
                f"that finds this record in {flow.target.system} ({flow.link.target_field}). Fill it in, then replay.")
        return str(value)

    def _resolve_lookups(self, flow: FlowSpec, source_key: str, payload: Mapping[str, Any],
                         parents: Mapping[str, Mapping[str, str]], values: dict[str, Any], *, is_create: bool,
                         waits: int) -> dict[str, Bind]:
        """Put each relationship's target key into `values` (or a bind); a parent not synced yet defers."""
        src = flow.source
        binds: dict[str, Bind] = {}
        for lk in flow.lookups:
            parent_src_key = payload.get(lk.source)
            if _blank(parent_src_key):
                if lk.required and (is_create or lk.source in payload):
                    raise ValidationError(
                        f"flow {flow.name} record {source_key}: required relationship {lk.source} is empty; link "
                        f"the record to its parent in {src.system}, then replay."
                    )
                if lk.source in payload and lk.bind_entity_set is None:
                    values[lk.target] = None
                continue
            parent_key = parents.get(lk.source, {}).get(_canonical_key(src.system, str(parent_src_key)))
            if parent_key is None:
                if waits >= self.max_parent_waits:
                    raise ParentMissingError(
                        f"flow {flow.name} record {source_key}: parent {parent_src_key} (flow {lk.parent_flow}) "
                        f"was never synced after {waits} waits. Sync or fix the parent, then replay this message."
                    )
                raise ParentPendingError(
                    f"flow {flow.name} record {source_key}: waiting for parent {parent_src_key} "
                    f"(flow {lk.parent_flow}) to be synced first"
                )
            if lk.key_part is not None:
                try:
                    parts = key_parts(parent_key)
                except ValueError:
                    parts = []  # a malformed stored key has no usable part: reported just below
                if lk.key_part >= len(parts):
                    raise ValidationError(
                        f"flow {flow.name} record {source_key}: parent key {parent_key!r} has no part "
                        f"{lk.key_part} (lookup {lk.source}); fix key_part in the flow spec.")
                parent_key = parts[lk.key_part]
            if lk.bind_entity_set is not None:
                binds[lk.target] = Bind(lk.bind_entity_set, parent_key)
            else:
                values[lk.target] = parent_key
        return binds
