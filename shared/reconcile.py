"""Reconciliation: compares both sides of every linked record pair through the flow maps and reports drift."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.core.engine import in_scope
from shared.core.errors import SyncError
from shared.core.ports import ATTACHMENTS_KEY, GEOMETRY_KEY, ChangeSource, SourceRecord, StateStore
from shared.mapping.engine import Mapper, same
from shared.mapping.spec import FlowSet, FlowSpec


@dataclass
class EntityDrift:
    """Drift of one entity (compared in the direction of one flow)."""

    entity: str
    flow: str
    source_records: int = 0
    target_records: int = 0
    linked: int = 0
    missing_in_target: list[str] = field(default_factory=list)
    orphans_in_target: list[str] = field(default_factory=list)
    field_drift: dict[str, list[str]] = field(default_factory=dict)
    """source key -> fields whose values differ."""
    excluded: list[str] = field(default_factory=list)
    """Source keys left out on purpose (dead-lettered records)."""
    out_of_scope: int = 0
    """Source records the flow's `when` conditions leave out (not drift)."""

    @property
    def drift(self) -> int:
        return len(self.missing_in_target) + len(self.field_drift)

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity, "flow": self.flow, "source_records": self.source_records,
            "target_records": self.target_records, "linked": self.linked, "drift": self.drift,
            "missing_in_target": self.missing_in_target[:20], "orphans_in_target": self.orphans_in_target[:20],
            "field_drift": dict(list(self.field_drift.items())[:20]), "excluded": self.excluded,
            "out_of_scope": self.out_of_scope,
        }


async def _all(source: ChangeSource, table: str) -> dict[str, SourceRecord]:
    out: dict[str, SourceRecord] = {}
    async for page in source.scan(table):
        out.update({r.key: r for r in page})
    return out


def _reference_flows(flowset: FlowSet) -> list[FlowSpec]:
    # One comparison per entity: prefer the direction that creates records (the master side).
    chosen: dict[str, FlowSpec] = {}
    for flow in flowset.flows:
        current = chosen.get(flow.entity)
        if current is None or ("create" in flow.operations and "create" not in current.operations):
            chosen[flow.entity] = flow
    return sorted(chosen.values(), key=flowset.depth)


async def reconcile(
    flowset: FlowSet,
    sources: Mapping[str, ChangeSource],
    state: StateStore,
    *,
    exclude: Mapping[str, set[str]] | None = None,
) -> list[EntityDrift]:
    """Scan both sides of each entity and compare every mapped field of every linked pair.

    `exclude` maps an entity to source keys that are known to be dead-lettered (reported, not drift).
    """
    mapper = Mapper(flowset)
    report: list[EntityDrift] = []
    for flow in _reference_flows(flowset):
        src, tgt = flow.source, flow.target
        if src.system not in sources or tgt.system not in sources:
            continue
        drift = EntityDrift(flow.entity, flow.name)
        sources_rows = await _all(sources[src.system], src.table)
        target_rows = await _all(sources[tgt.system], tgt.table)
        drift.source_records, drift.target_records = len(sources_rows), len(target_rows)
        links = await state.get_links(flow.entity, src.system, list(sources_rows), tgt.system)
        excluded = (exclude or {}).get(flow.entity, set())
        linked_targets = set()
        for key, record in sources_rows.items():
            if key in excluded:
                drift.excluded.append(key)
                continue
            if not all(in_scope(c, record.values) for c in flow.when):
                drift.out_of_scope += 1
                continue
            tkey = links.get(key)
            if tkey is None or tkey not in target_rows:
                drift.missing_in_target.append(key)
                continue
            linked_targets.add(tkey)
            drift.linked += 1
            differing = _compare(mapper, flow, record, target_rows[tkey])
            if differing:
                drift.field_drift[key] = differing
        drift.orphans_in_target = sorted(set(target_rows) - linked_targets)
        report.append(drift)
    return report


def _compare(mapper: Mapper, flow: FlowSpec, source: SourceRecord, target: SourceRecord) -> list[str]:
    try:
        mapped = mapper.map_values(flow, source.values, is_create=True, target_newer=False)
    except SyncError as exc:
        return [f"<unmappable: {exc.reason}>"]
    differing = []
    for name, value in mapped.values.items():
        if name == ATTACHMENTS_KEY:
            continue
        actual = target.values.get(name)
        if name == GEOMETRY_KEY:
            if not _near(value, actual):
                differing.append("geometry")
        elif not same(value, actual):
            differing.append(f"{name}: expected {value!r}, found {actual!r}")
    return differing


def _near(expected: Any, actual: Any, tolerance: float = 0.01) -> bool:
    if expected is None or actual is None:
        return expected is None and actual is None
    try:
        return abs(float(expected["x"]) - float(actual["x"])) <= tolerance and \
            abs(float(expected["y"]) - float(actual["y"])) <= tolerance
    except (KeyError, TypeError, ValueError):
        return False
