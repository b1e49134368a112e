"""Reconciliation: compares linked pairs through the flow maps, checks cascades; reports (and repairs) drift."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.core.engine import SyncEngine, cascade_pending, cascade_triggered, in_scope
from shared.core.errors import SyncError
from shared.core.ports import ATTACHMENTS_KEY, GEOMETRY_KEY, ChangeSource, SourceRecord, StateStore
from shared.mapping.engine import Mapper, same
from shared.mapping.spec import CascadeSpec, FlowSet, FlowSpec

log = logging.getLogger(__name__)


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
    """source key -> fields whose values differ (fields this flow writes: the source's own and shared ones)."""
    reverse_flow: str | None = None
    """The flow of the other direction, which writes the fields this flow's target system owns."""
    reverse_field_drift: dict[str, list[str]] = field(default_factory=dict)
    """target key -> fields the target system owns whose values differ: drift of `reverse_flow` (the target
    record is the one to replay), never of `flow`, which does not write them on an update."""
    excluded: list[str] = field(default_factory=list)
    """Source keys left out on purpose (dead-lettered records)."""
    out_of_scope: int = 0
    """Source records the flow's `when` conditions leave out (not drift)."""
    cascade_incomplete: list[str] = field(default_factory=list)
    """Half-applied cascades: "<cascade> <system>: parent <key> child <key>" for each child a parent in a
    triggering state should have set (it still is what the cascade's select finds)."""
    cascade_repaired: list[str] = field(default_factory=list)
    """Entries of `cascade_incomplete` that `repair=True` completed through the engine (no longer drift)."""

    @property
    def drift(self) -> int:
        return (len(self.missing_in_target) + len(self.field_drift) + len(self.reverse_field_drift)
                + len(self.cascade_incomplete))

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity, "flow": self.flow, "source_records": self.source_records,
            "target_records": self.target_records, "linked": self.linked, "drift": self.drift,
            "missing_in_target": self.missing_in_target[:20], "orphans_in_target": self.orphans_in_target[:20],
            "field_drift": dict(list(self.field_drift.items())[:20]), "reverse_flow": self.reverse_flow,
            "reverse_field_drift": dict(list(self.reverse_field_drift.items())[:20]), "excluded": self.excluded,
            "out_of_scope": self.out_of_scope, "cascade_incomplete": self.cascade_incomplete[:20],
            "cascade_repaired": len(self.cascade_repaired),
        }


class _Scans:
    """Each table read once per reconciliation (the cascade check reads tables the pair check read already)."""

    def __init__(self, sources: Mapping[str, ChangeSource]) -> None:
        self.sources = sources
        self._rows: dict[tuple[str, str], dict[str, SourceRecord]] = {}

    async def rows(self, system: str, table: str) -> dict[str, SourceRecord]:
        if (system, table) not in self._rows:
            out: dict[str, SourceRecord] = {}
            async for page in self.sources[system].scan(table):
                out.update({r.key: r for r in page})
            self._rows[(system, table)] = out
        return self._rows[(system, table)]


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
    repair: bool = False,
    engine: SyncEngine | None = None,
) -> list[EntityDrift]:
    """Scan both sides of each entity and compare every mapped field of every linked pair; then check that
    every parent in a cascade's triggering state has no child the cascade still has to set, on each side.

    `exclude` maps an entity to source keys that are known to be dead-lettered (reported, not drift).
    `repair=True` completes each half-applied cascade found, through `engine` (the same code path a sync
    takes), and reports those entries as repaired instead of drift.
    """
    if repair and engine is None:
        raise ValueError("reconcile(repair=True) needs the engine that applies the repairs")
    mapper = Mapper(flowset)
    scans = _Scans(sources)
    report: list[EntityDrift] = []
    for flow in _reference_flows(flowset):
        src, tgt = flow.source, flow.target
        if src.system not in sources or tgt.system not in sources:
            continue
        reverse = _reverse_flow(flowset, flow)
        drift = EntityDrift(flow.entity, flow.name, reverse_flow=reverse.name if reverse else None)
        moved = _owned_by_target(flow, reverse)
        sources_rows = await scans.rows(src.system, src.table)
        target_rows = await scans.rows(tgt.system, tgt.table)
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
            own: list[str] = []
            theirs: list[str] = []
            for name, expected, actual in _compare(mapper, flow, record, target_rows[tkey]):
                if name in moved:
                    # The target's system owns it: its value is the one expected on the source side.
                    theirs.append(f"{moved[name]}: expected {actual!r} ({tgt.system} {name}), "
                                  f"found {record.values.get(moved[name])!r}")
                elif name.startswith("<"):
                    own.append(name)
                else:
                    own.append(f"{name}: expected {expected!r}, found {actual!r}" if name != "geometry"
                               else "geometry")
            if own:
                drift.field_drift[key] = own
            if theirs:
                if tkey in excluded:
                    drift.excluded.append(tkey)
                else:
                    drift.reverse_field_drift[tkey] = theirs
        drift.orphans_in_target = sorted(set(target_rows) - linked_targets)
        report.append(drift)
    for cascade in flowset.cascades:
        # A dead-lettered parent is known and reported as such, like any excluded record (on both sides).
        dead = sorted((exclude or {}).get(cascade.parent_entity, set()))
        known = {_bare(k) for k in dead}
        for a in cascade.when:
            for b in cascade.when:
                if a != b and dead:
                    known |= {_bare(k) for k in (await state.get_links(cascade.parent_entity, a, dead, b)).values()}
        found = {where: children for where, children in (await _half_applied(flowset, scans, cascade)).items()
                 if _bare(where[1]) not in known}
        if not found:
            continue
        owner = next((d for d in report if d.entity == cascade.parent_entity), None)
        if owner is None:
            owner = EntityDrift(cascade.parent_entity, f"cascade:{cascade.name}")
            report.append(owner)
        for (system, parent_key), children in found.items():
            entries = [f"{cascade.name} {system}: parent {parent_key} child {c}" for c in children]
            if repair and engine is not None:
                errors = await engine.complete_cascade(cascade.name, system, parent_key)
                if not errors:
                    owner.cascade_repaired += entries
                    continue
                log.warning("reconcile: cascade %s of %s %s still incomplete after repair: %s", cascade.name,
                            system, parent_key, "; ".join(str(e) for e in errors[:5]))
            owner.cascade_incomplete += entries
    return report


async def _half_applied(flowset: FlowSet, scans: _Scans, cascade: CascadeSpec) -> dict[tuple[str, str], list[str]]:
    """(system, parent key) -> children the cascade should have set, for parents in a triggering state."""
    out: dict[tuple[str, str], list[str]] = {}
    for system in sorted(cascade.when):
        parent_table = _table_of(flowset, cascade.parent_entity, system)
        child_table = _table_of(flowset, cascade.child_entity, system)
        link_field = cascade.child_parent_field.get(system)
        if parent_table is None or child_table is None or link_field is None or system not in scans.sources:
            continue
        triggered = {_bare(k): k for k, r in (await scans.rows(system, parent_table)).items()
                     if cascade_triggered(cascade, system, r.values)}
        if not triggered:
            continue
        for key, child in sorted((await scans.rows(system, child_table)).items()):
            parent = _field(child.values, link_field)
            if parent in (None, "") or _bare(str(parent)) not in triggered:
                continue
            if cascade_pending(cascade, system, child.values):
                out.setdefault((system, triggered[_bare(str(parent))]), []).append(key)
    return out


def _field(values: Mapping[str, Any], name: str) -> Any:
    """A field's value; a Dataverse lookup is queried as `_<name>_value` but read under its logical name."""
    if name in values:
        return values[name]
    if name.startswith("_") and name.endswith("_value"):
        return values.get(name[1:-len("_value")])
    return None


def _table_of(flowset: FlowSet, entity: str, system: str) -> str | None:
    for flow in flowset.flows:
        if flow.entity == entity:
            for side in (flow.source, flow.target):
                if side.system == system:
                    return side.table
    return None


def _bare(key: str) -> str:
    """A key compared across representations (ArcGIS braces GUIDs in upper case, Dataverse does not)."""
    return key.strip().strip("{}").lower()


def _reverse_flow(flowset: FlowSet, flow: FlowSpec) -> FlowSpec | None:
    """The flow that syncs the same entity the other way round and writes updates, if there is one."""
    return next((f for f in flowset.flows if f.entity == flow.entity and f.source.system == flow.target.system
                 and f.target.system == flow.source.system and "update" in f.operations), None)


def _owned_by_target(flow: FlowSpec, reverse: FlowSpec | None) -> dict[str, str]:
    """Target field -> source field, for the fields the target system owns that the reverse flow writes back."""
    if reverse is None:
        return {}
    back = {(fm.source, fm.target) for fm in reverse.fields}
    return {fm.target: fm.source for fm in flow.fields
            if fm.owner == flow.target.system and (fm.target, fm.source) in back}


def _compare(mapper: Mapper, flow: FlowSpec, source: SourceRecord,
             target: SourceRecord) -> list[tuple[str, Any, Any]]:
    """(target field, value mapped from the source, value the target holds) for each field that differs."""
    try:
        mapped = mapper.map_values(flow, source.values, is_create=True, target_newer=False)
    except SyncError as exc:
        return [(f"<unmappable: {exc.reason}>", None, None)]
    differing: list[tuple[str, Any, Any]] = []
    for name, value in mapped.values.items():
        if name == ATTACHMENTS_KEY:
            continue
        actual = target.values.get(name)
        if name == GEOMETRY_KEY:
            if not _near(value, actual):
                differing.append(("geometry", value, actual))
        elif not same(value, actual):
            differing.append((name, value, actual))
    return differing


def _near(expected: Any, actual: Any, tolerance: float = 0.01) -> bool:
    if expected is None or actual is None:
        return expected is None and actual is None
    try:
        return abs(float(expected["x"]) - float(actual["x"])) <= tolerance and \
            abs(float(expected["y"]) - float(actual["y"])) <= tolerance
    except (KeyError, TypeError, ValueError):
        return False
