"""Reconciliation: compares linked pairs through the flow maps, checks cascades; reports (and repairs) drift.

It reads page by page: a source page, the links of its keys, the linked target records of that page (one fetch),
then the target page by page for orphans, and each cascade's child pages with their parents. At most about two
pages of records are alive at once; the report keeps exact counts and the first `sample` keys of each category.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.core.engine import SyncEngine, cascade_pending, cascade_triggered, in_scope
from shared.core.errors import SyncError
from shared.core.ports import ATTACHMENTS_KEY, GEOMETRY_KEY, ChangeSource, SourceRecord, StateStore
from shared.mapping.engine import Mapper, same
from shared.mapping.spec import CascadeSpec, FlowSet, FlowSpec

log = logging.getLogger(__name__)

SAMPLE = 20
"""Keys kept per category in a report (the counts are exact)."""


@dataclass
class EntityDrift:
    """Drift of one entity (compared in the direction of one flow).

    The lists and dicts hold the first `sample` entries of their category; the `*_count` fields are exact.
    """

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
    sample: int = SAMPLE
    missing_count: int = 0
    orphan_count: int = 0
    field_drift_count: int = 0
    reverse_drift_count: int = 0
    excluded_count: int = 0
    cascade_incomplete_count: int = 0
    cascade_repaired_count: int = 0
    partial: bool = False
    """The comparison stopped early (an API budget was reached): the counts cover the pages read."""

    @property
    def drift(self) -> int:
        return self.missing_count + self.field_drift_count + self.reverse_drift_count + self.cascade_incomplete_count

    def add(self, category: str, key: str, detail: list[str] | None = None) -> None:
        """Count one entry of `category` and keep it if fewer than `sample` are kept."""
        setattr(self, _COUNTS[category], getattr(self, _COUNTS[category]) + 1)
        kept = getattr(self, category)
        if len(kept) < self.sample:
            if isinstance(kept, dict):
                kept[key] = detail or []
            else:
                kept.append(key)

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity, "flow": self.flow, "source_records": self.source_records,
            "target_records": self.target_records, "linked": self.linked, "drift": self.drift,
            "missing_in_target": self.missing_in_target[:SAMPLE], "orphans_in_target": self.orphans_in_target[:SAMPLE],
            "field_drift": dict(list(self.field_drift.items())[:SAMPLE]), "reverse_flow": self.reverse_flow,
            "reverse_field_drift": dict(list(self.reverse_field_drift.items())[:SAMPLE]),
            "excluded": self.excluded[:SAMPLE], "out_of_scope": self.out_of_scope,
            "cascade_incomplete": self.cascade_incomplete[:SAMPLE], "cascade_repaired": self.cascade_repaired_count,
            "counts": self.counts(), "partial": self.partial,
        }

    def counts(self) -> dict[str, int]:
        """The exact figures of this entity (what the stored report and the metrics keep)."""
        return {"source": self.source_records, "target": self.target_records, "linked": self.linked,
                "missing": self.missing_count, "orphaned": self.orphan_count,
                "drifted": self.field_drift_count + self.reverse_drift_count,
                "cascade_incomplete": self.cascade_incomplete_count, "cascade_repaired": self.cascade_repaired_count,
                "excluded": self.excluded_count, "out_of_scope": self.out_of_scope, "drift": self.drift}


_COUNTS = {"missing_in_target": "missing_count", "orphans_in_target": "orphan_count",
           "field_drift": "field_drift_count", "reverse_field_drift": "reverse_drift_count",
           "excluded": "excluded_count", "cascade_incomplete": "cascade_incomplete_count",
           "cascade_repaired": "cascade_repaired_count"}


@dataclass
class Reconciliation:
    """One reconciliation run: per-entity drift, whether it covered everything, and the calls it spent."""

    entities: list[EntityDrift] = field(default_factory=list)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    partial_reasons: list[str] = field(default_factory=list)
    """Why the run is partial: "<system>: API budget of N calls reached (M spent)", flows skipped."""
    calls: dict[str, int] = field(default_factory=dict)
    """HTTP requests spent per system."""
    enqueued: int = 0
    """Records re-enqueued from their owning side by a repair (new changes only: a repeat enqueues none)."""

    @property
    def partial(self) -> bool:
        return bool(self.partial_reasons)

    @property
    def total_drift(self) -> int:
        return sum(d.drift for d in self.entities)

    def summary(self) -> dict[str, Any]:
        """What is stored as the last reconciliation (counts only; small enough for any checkpoint)."""
        return {
            "when": (self.finished_at or self.started_at).isoformat(), "started_at": self.started_at.isoformat(),
            "status": "partial" if self.partial else "complete", "reasons": self.partial_reasons,
            "total_drift": self.total_drift, "calls": self.calls, "enqueued": self.enqueued,
            "flows": {d.flow: {"entity": d.entity, **d.counts()} for d in self.entities},
        }

    def as_dict(self) -> dict[str, Any]:
        """The full report: the summary plus every entity with its first keys per category."""
        return {**self.summary(), "entities": [d.as_dict() for d in self.entities]}


Resync = Callable[[FlowSpec, list[tuple[SourceRecord, str]]], Awaitable[int]]
"""Re-enqueues records of a flow's source (each with a token naming its drift); returns how many were new."""


class ApiBudget:
    """The HTTP requests reconciliation may spend per system, counted by the process's call counter (`calls`,
    running totals per system) or, without one, by the scans and fetches reconciliation makes itself."""

    def __init__(self, limits: Mapping[str, int] | None = None,
                 calls: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.limits = dict(limits or {})
        self._calls = calls
        self._start = dict(calls()) if calls is not None else {}
        self._own: Counter[str] = Counter()

    def note(self, system: str) -> None:
        """One scan page or fetch sent to `system`."""
        self._own[system] += 1

    def spent(self, system: str) -> int:
        if self._calls is None:
            return self._own[system]
        return self._calls().get(system, 0) - self._start.get(system, 0)

    def spent_all(self) -> dict[str, int]:
        systems = set(self._own) | (set(self._calls()) if self._calls is not None else set())
        return {s: n for s in sorted(systems) if (n := self.spent(s))}

    def check(self, *systems: str) -> None:
        """Raise `BudgetSpent` if any of `systems` has spent its share."""
        for system in systems:
            limit = self.limits.get(system)
            if limit is not None and self.spent(system) >= limit:
                raise BudgetSpent(system, limit, self.spent(system))


class BudgetSpent(Exception):
    """A system's reconciliation budget is spent: stop reading it."""

    def __init__(self, system: str, limit: int, spent: int) -> None:
        super().__init__(f"{system}: API budget of {limit} calls reached ({spent} spent)")
        self.system = system


class _Reader:
    """Pages and fetches through the budget; a page's records are dropped by the caller before the next."""

    def __init__(self, sources: Mapping[str, ChangeSource], budget: ApiBudget,
                 progress: Callable[[str, int], None] | None) -> None:
        self.sources = sources
        self.budget = budget
        self.progress = progress

    async def pages(self, system: str, table: str, label: str) -> AsyncIterator[list[SourceRecord]]:
        self.budget.check(system)
        it = self.sources[system].scan(table).__aiter__()
        try:
            while True:
                self.budget.check(system)
                try:
                    page = await it.__anext__()
                except StopAsyncIteration:
                    return
                self.budget.note(system)
                if self.progress is not None:
                    self.progress(label, len(page))
                yield page
                del page  # the caller is done with it: not alive while the next one is read
        finally:
            close = getattr(it, "aclose", None)
            if close is not None:
                await close()

    async def fetch(self, system: str, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        if not keys:
            return {}
        self.budget.check(system)
        self.budget.note(system)
        return await self.sources[system].fetch(table, list(dict.fromkeys(keys)))


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
    """The per-entity drift of `reconcile_report` (see there)."""
    return (await reconcile_report(flowset, sources, state, exclude=exclude, repair=repair, engine=engine)).entities


async def reconcile_report(
    flowset: FlowSet,
    sources: Mapping[str, ChangeSource],
    state: StateStore,
    *,
    exclude: Mapping[str, set[str]] | None = None,
    repair: bool = False,
    engine: SyncEngine | None = None,
    entities: Collection[str] | None = None,
    budget: ApiBudget | None = None,
    resync: Resync | None = None,
    progress: Callable[[str, int], None] | None = None,
    sample: int = SAMPLE,
) -> Reconciliation:
    """Read both sides of each entity page by page and compare every mapped field of every linked pair; then
    check that every parent in a cascade's triggering state has no child the cascade still has to set.

    `exclude` maps an entity to source keys that are known to be dead-lettered (reported, not drift).
    `repair=True` completes each half-applied cascade found, through `engine` (the same code path a sync
    takes), and reports those entries as repaired instead of drift; `resync` (if given) hears the drifted and
    missing records of each page with the flow that writes them, to re-enqueue them from their owning side.
    `entities` limits the run to those entities; `budget` stops reading a system once its share is spent
    (the report is then partial, with the reason); `progress` hears (what, records) per page read.
    """
    if repair and engine is None:
        raise ValueError("reconcile(repair=True) needs the engine that applies the repairs")
    budget = budget or ApiBudget()
    reader = _Reader(sources, budget, progress)
    mapper = Mapper(flowset)
    report = Reconciliation()
    spent: set[str] = set()
    for flow in _reference_flows(flowset):
        src, tgt = flow.source, flow.target
        if src.system not in sources or tgt.system not in sources:
            continue
        if entities is not None and flow.entity not in entities:
            continue
        reverse = _reverse_flow(flowset, flow)
        drift = EntityDrift(flow.entity, flow.name, reverse_flow=reverse.name if reverse else None, sample=sample)
        report.entities.append(drift)
        if spent & {src.system, tgt.system}:
            drift.partial = True
            report.partial_reasons.append(f"{flow.name}: not compared ({', '.join(sorted(spent))} budget spent)")
            continue
        try:
            await _compare_flow(reader, state, mapper, flow, reverse, drift, (exclude or {}).get(flow.entity, set()),
                                resync)
        except BudgetSpent as exc:
            drift.partial = True
            spent.add(exc.system)
            report.partial_reasons.append(f"{flow.name}: stopped, {exc}")
    for cascade in flowset.cascades:
        if entities is not None and cascade.parent_entity not in entities:
            continue
        try:
            await _check_cascade(flowset, reader, state, cascade, report, exclude or {}, repair, engine, sample,
                                 spent)
        except BudgetSpent as exc:
            spent.add(exc.system)
            report.partial_reasons.append(f"cascade {cascade.name}: stopped, {exc}")
    report.calls = budget.spent_all()
    report.finished_at = datetime.now(UTC)
    return report


async def _compare_flow(reader: _Reader, state: StateStore, mapper: Mapper, flow: FlowSpec,
                        reverse: FlowSpec | None, drift: EntityDrift, excluded: set[str],
                        resync: Resync | None) -> None:
    """Both passes of one entity: source pages against their linked targets, then target pages for orphans."""
    src, tgt = flow.source, flow.target
    moved = _owned_by_target(flow, reverse)
    async for page in reader.pages(src.system, src.table, f"{flow.entity}: {src.system}"):
        redo, redo_back = await _source_page(reader, state, mapper, flow, moved, drift, excluded, page)
        del page
        if resync is not None:
            if redo:
                await resync(flow, redo)
            if redo_back and reverse is not None:
                await resync(reverse, redo_back)
        del redo, redo_back
    async for page in reader.pages(tgt.system, tgt.table, f"{flow.entity}: {tgt.system}"):
        await _target_page(reader, state, flow, drift, excluded, page)
        del page


async def _source_page(
    reader: _Reader, state: StateStore, mapper: Mapper, flow: FlowSpec, moved: Mapping[str, str],
    drift: EntityDrift, excluded: set[str], page: list[SourceRecord],
) -> tuple[list[tuple[SourceRecord, str]], list[tuple[SourceRecord, str]]]:
    """Compare one source page with its linked targets; returns the records to re-enqueue (each with its drift),
    the source's and the targets' (for the reverse flow)."""
    src, tgt = flow.source, flow.target
    links = await state.get_links(flow.entity, src.system, [r.key for r in page], tgt.system)
    wanted = [links[r.key] for r in page if r.key in links and r.key not in excluded
              and all(in_scope(c, r.values) for c in flow.when)]
    targets = await reader.fetch(tgt.system, tgt.table, wanted)
    drift.source_records += len(page)  # once its targets are read: a page the budget cut short is not counted
    redo: list[tuple[SourceRecord, str]] = []
    redo_back: list[tuple[SourceRecord, str]] = []
    for record in page:
        key = record.key
        if key in excluded:
            drift.add("excluded", key)
            continue
        if not all(in_scope(c, record.values) for c in flow.when):
            drift.out_of_scope += 1
            continue
        tkey = links.get(key)
        target = targets.get(tkey) if tkey is not None else None
        if tkey is None or target is None:
            drift.add("missing_in_target", key)
            redo.append((record, f"missing {tkey}"))
            continue
        drift.linked += 1
        own: list[str] = []
        theirs: list[str] = []
        for name, expected, actual in _compare(mapper, flow, record, target):
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
            drift.add("field_drift", key, own)
            redo.append((record, f"{target.version or target.modified}|{own}"))
        if theirs:
            if tkey in excluded:
                drift.add("excluded", tkey)
            else:
                drift.add("reverse_field_drift", tkey, theirs)
                redo_back.append((target, f"{record.version or record.modified}|{theirs}"))
    return redo, redo_back


async def _target_page(reader: _Reader, state: StateStore, flow: FlowSpec, drift: EntityDrift,
                       excluded: set[str], page: list[SourceRecord]) -> None:
    """Orphans of one target page: no link back, or linked to a source record that is gone, excluded or out of
    scope (what the source pass does not pair)."""
    src, tgt = flow.source, flow.target
    back = await state.get_links(flow.entity, tgt.system, [r.key for r in page], src.system)
    found = await reader.fetch(src.system, src.table, [back[r.key] for r in page if r.key in back])
    drift.target_records += len(page)
    for record in page:
        skey = back.get(record.key)
        source = found.get(skey) if skey is not None else None
        if source is None or skey in excluded or not all(in_scope(c, source.values) for c in flow.when):
            drift.add("orphans_in_target", record.key)


async def _check_cascade(flowset: FlowSet, reader: _Reader, state: StateStore, cascade: CascadeSpec,
                         report: Reconciliation, exclude: Mapping[str, set[str]], repair: bool,
                         engine: SyncEngine | None, sample: int, spent: set[str]) -> None:
    # A dead-lettered parent is known and reported as such, like any excluded record (on both sides).
    dead = sorted(exclude.get(cascade.parent_entity, set()))
    known = {_bare(k) for k in dead}
    for a in cascade.when:
        for b in cascade.when:
            if a != b and dead:
                known |= {_bare(k) for k in (await state.get_links(cascade.parent_entity, a, dead, b)).values()}
    owner: EntityDrift | None = None
    for system in sorted(cascade.when):
        if system in spent:
            report.partial_reasons.append(f"cascade {cascade.name} {system}: not checked ({system} budget spent)")
            continue
        async for found in _half_applied(flowset, reader, cascade, system):
            for parent_key, children in found.items():
                if _bare(parent_key) in known:
                    continue
                if owner is None:
                    owner = next((d for d in report.entities if d.entity == cascade.parent_entity), None)
                    if owner is None:
                        owner = EntityDrift(cascade.parent_entity, f"cascade:{cascade.name}", sample=sample)
                        report.entities.append(owner)
                entries = [f"{cascade.name} {system}: parent {parent_key} child {c}" for c in children]
                if repair and engine is not None:
                    errors = await engine.complete_cascade(cascade.name, system, parent_key)
                    if not errors:
                        for e in entries:
                            owner.add("cascade_repaired", e)
                        continue
                    log.warning("reconcile: cascade %s of %s %s still incomplete after repair: %s", cascade.name,
                                system, parent_key, "; ".join(str(e) for e in errors[:5]))
                for e in entries:
                    owner.add("cascade_incomplete", e)


async def _half_applied(flowset: FlowSet, reader: _Reader, cascade: CascadeSpec,
                        system: str) -> AsyncIterator[dict[str, list[str]]]:
    """Per child page: parent key -> children the cascade should have set, for parents in a triggering state.

    Bounded by child pages: the pending children of a page name their parents, which one fetch reads.
    """
    parent_table = _table_of(flowset, cascade.parent_entity, system)
    child_table = _table_of(flowset, cascade.child_entity, system)
    link_field = cascade.child_parent_field.get(system)
    if parent_table is None or child_table is None or link_field is None or system not in reader.sources:
        return
    async for page in reader.pages(system, child_table, f"cascade {cascade.name}: {system}"):
        pending = [(c.key, str(p)) for c in page if (p := _field(c.values, link_field)) not in (None, "")
                   and cascade_pending(cascade, system, c.values)]
        del page
        if not pending:
            continue
        parents = await reader.fetch(system, parent_table, [p for _, p in pending])
        out: dict[str, list[str]] = {}
        for child, parent in sorted(pending):
            record = parents.get(parent)
            if record is not None and cascade_triggered(cascade, system, record.values):
                out.setdefault(record.key, []).append(child)
        del parents
        if out:
            yield out


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
