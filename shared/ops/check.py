"""The choice-domain drift check (`syncline check`, the daily check timer): live choice metadata vs the value maps."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, runtime_checkable

from shared.bootstrap import Services
from shared.connectors._choices import ChoiceDomain
from shared.core.errors import PermanentError, SyncError
from shared.core.ports import CheckpointConflictError, StateStore
from shared.mapping.engine import normalize
from shared.mapping.spec import FieldMap, FlowSet, FlowSpec

log = logging.getLogger("syncline.ops.check")

CHECK_LABELS = "check:labels"
"""Checkpoint: the labels seen by the last check, {"system|table|field|value": label} (label changes run to run)."""
CHECK_LAST = "check:last"
"""Checkpoint: the summary of the last check (what `syncline status` shows)."""

SKIPPED: Mapping[str, str] = {
    "sap": "no flow maps a SAP enumeration: the value-mapped SAP fields (sales org, channel, plant, unit, "
           "currency, payment terms, statuses) are Edm.String codes, with no domain in $metadata",
}
"""Systems the check does not read, with the reason the report gives."""

CONNECTORS = frozenset({"dataverse", "arcgis", "salesforce", "fno", "sap"})
"""The systems Syncline has connectors for (a name outside these is a typo)."""

Severity = Literal["error", "warning"]
Problem = Literal["unmapped", "missing", "inactive", "label_changed", "label_differs", "field_missing"]
_SEVERITY: Mapping[str, Severity] = {"unmapped": "error", "missing": "error", "inactive": "error",
                                     "field_missing": "error", "label_changed": "warning", "label_differs": "warning"}


@runtime_checkable
class ChoiceMetadataReader(Protocol):
    """A connector that reads a field's live choice domain (`connectors/<system>/metadata.py`)."""

    async def choice_domain(self, table: str, field: str) -> ChoiceDomain | None:
        """The domain of `field` of `table`; None when the field is not a choice; raises SyncError otherwise."""
        ...


@dataclass(frozen=True)
class FieldUse:
    """One flow reading or writing one field through a value map."""

    system: str
    table: str
    field: str
    value_map: str
    flow: str
    reads: bool
    """True: the flow reads the field (a value without a mapping dead-letters); False: it writes it."""
    scope: frozenset[Any] | None = None
    """A reading flow's `when: {field, in: [...]}` on this field: only these values ever reach its map."""


@dataclass(frozen=True)
class Finding:
    """One problem with one value (or a whole field) of one system's domain."""

    system: str
    table: str
    field: str
    value: Any
    problem: Problem
    detail: str
    flows: tuple[str, ...]
    label: str | None = None

    @property
    def severity(self) -> Severity:
        return _SEVERITY[self.problem]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flows": list(self.flows), "severity": self.severity}


@dataclass
class CheckReport:
    """What one check found, per system."""

    checked_at: str
    findings: list[Finding] = field(default_factory=list)
    systems: dict[str, dict[str, Any]] = field(default_factory=dict)
    """System -> {"status": "ok" | "unreachable" | "skipped" | "not configured", "fields": n, "error"/"reason"}."""
    unchecked: list[dict[str, Any]] = field(default_factory=list)
    """Value-mapped fields that are not choices in their system (free codes): nothing to compare."""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def unreachable(self) -> list[str]:
        return sorted(s for s, info in self.systems.items() if info["status"] == "unreachable")

    @property
    def exit_code(self) -> int:
        """1 when a value would fail (drift found, even if another system was down), 2 when a system could not be
        read (down, or asked for by name and not configured) and nothing else failed: the check is incomplete;
        0 when clean (warnings do not fail it)."""
        if self.errors:
            return 1
        incomplete = any(info["status"] in ("unreachable", "not configured") for info in self.systems.values())
        return 2 if incomplete else 0

    def to_dict(self) -> dict[str, Any]:
        return {"checked_at": self.checked_at, "exit_code": self.exit_code, "errors": len(self.errors),
                "warnings": len(self.warnings), "unreachable": self.unreachable, "systems": self.systems,
                "findings": [f.to_dict() for f in self.findings], "unchecked": self.unchecked}


# ---------------------------------------------------------------------------------------------- pure comparison


def _flows_of(flowset: FlowSet) -> Iterable[tuple[FlowSpec, list[FieldMap]]]:
    for flow in flowset.flows:
        yield flow, flow.fields
        if flow.lines is not None:
            yield flowset.line_flow(flow), flow.lines.fields


def field_uses(flowset: FlowSet) -> list[FieldUse]:
    """Every (system, table, field) a flow reads or writes through a value map, with the flow and the map."""
    uses: list[FieldUse] = []
    for flow, fields in _flows_of(flowset):
        scopes = {c.field: frozenset(normalize(v) for v in c.in_) for c in flow.when if c.in_ is not None}
        for fm in fields:
            if fm.transform != "choice" or fm.value_map is None:
                continue
            uses.append(FieldUse(flow.source.system, flow.source.table, fm.source, fm.value_map, flow.name, True,
                                 scopes.get(fm.source)))
            uses.append(FieldUse(flow.target.system, flow.target.table, fm.target, fm.value_map, flow.name, False))
    return uses


def _other(use: FieldUse, flowset: FlowSet) -> str:
    flow = next((f for f, _ in _flows_of(flowset) if f.name == use.flow), None)
    if flow is None:
        return ""
    return flow.target.system if use.reads else flow.source.system


def mapped_values(use: FieldUse, flowset: FlowSet) -> dict[Any, str | None]:
    """The values of `use.system` the map translates for this flow (normalized -> the map's label): a reading flow
    needs a partner value on the other side, a writing flow writes exactly the values that have one."""
    other = _other(use, flowset)
    return {normalize(e[use.system]): (str(e["label"]) if "label" in e else None)
            for e in flowset.value_maps.get(use.value_map, [])
            if use.system in e and (not other or other in e)}


def _same_label(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def label_key(system: str, table: str, field_name: str, value: Any) -> str:
    return f"{system}|{table}|{field_name}|{value}"


def compare(domain: ChoiceDomain, uses: Sequence[FieldUse], flowset: FlowSet,
            previous_labels: Mapping[str, str]) -> list[Finding]:
    """The findings of one field: every `uses` entry names the same (system, table, field).

    - unmapped (error): the system offers a value no reading flow maps (within the flow's `when` scope); the next
      record carrying it dead-letters with UNMAPPED_CHOICE. Values of a field only written are not a problem.
    - missing / inactive (error): a map translates to or from a value the system no longer has (or deactivated).
    - label_changed (warning): the system's label differs from the one the last check saw.
    - label_differs (warning): the map records a label, the system has labels of its own (not just the codes),
      and the two differ.
    """
    system, table, field_name = uses[0].system, uses[0].table, uses[0].field
    live = {normalize(v): (v, label) for v, label in domain.values.items()}
    inactive = {normalize(v) for v in domain.inactive}
    findings: list[Finding] = []
    per_use = [(use, mapped_values(use, flowset)) for use in uses]

    unmapped: dict[Any, list[str]] = defaultdict(list)
    for use, values in per_use:
        if not use.reads:
            continue
        for key in live:
            if key not in values and (use.scope is None or key in use.scope):
                unmapped[key].append(use.flow)
    for key, flows in unmapped.items():
        raw, label = live[key]
        findings.append(Finding(system, table, field_name, raw, "unmapped",
                                f"{domain.source} offers {raw!r} ({label}), which no value map of "
                                f"{', '.join(sorted(flows))} translates: the next record carrying it dead-letters "
                                "(UNMAPPED_CHOICE)", tuple(sorted(set(flows))), label))

    gone: dict[tuple[Any, Problem], list[str]] = defaultdict(list)
    maps_of: dict[Any, set[str]] = defaultdict(set)
    for use, values in per_use:
        for key in values:
            if key not in live:
                gone[(key, "inactive" if key in inactive else "missing")].append(use.flow)
                maps_of[key].add(use.value_map)
    for (key, problem), flows in gone.items():
        verb = "deactivated" if problem == "inactive" else "does not have"
        map_label = next((lab for _, values in per_use if (lab := values.get(key))), None)
        findings.append(Finding(system, table, field_name, key, problem,
                                f"value map {', '.join(sorted(maps_of[key]))} maps {key!r}, which {domain.source} "
                                f"{verb}{'' if problem == 'inactive' else ' (any more)'}: records with it fail",
                                tuple(sorted(set(flows))), map_label))

    all_flows = tuple(sorted({u.flow for u in uses}))
    map_labels = {k: lab for _, values in per_use for k, lab in values.items() if lab}
    for key, (raw, label) in live.items():
        before = previous_labels.get(label_key(system, table, field_name, key))
        if before is not None and before != label:
            findings.append(Finding(system, table, field_name, raw, "label_changed",
                                    f"label changed from {before!r} to {label!r} since the last check", all_flows,
                                    label))
            continue
        recorded = map_labels.get(key)
        if recorded and str(raw) != label and not _same_label(recorded, label):
            findings.append(Finding(system, table, field_name, raw, "label_differs",
                                    f"the value map calls it {recorded!r}, {system} labels it {label!r}", all_flows,
                                    label))
    return findings


# ---------------------------------------------------------------------------------------------- the check


def _group(uses: Iterable[FieldUse]) -> dict[str, dict[tuple[str, str], list[FieldUse]]]:
    out: dict[str, dict[tuple[str, str], list[FieldUse]]] = defaultdict(lambda: defaultdict(list))
    for use in uses:
        out[use.system][(use.table, use.field)].append(use)
    return out


async def _check_system(system: str, reader: ChoiceMetadataReader, fields: dict[tuple[str, str], list[FieldUse]],
                        flowset: FlowSet, previous: Mapping[str, str], report: CheckReport,
                        labels: dict[str, str], step: Callable[[int], None]) -> None:
    checked = 0
    refresh = getattr(reader, "refresh_metadata", None)
    if callable(refresh):
        refresh()  # a reader caching a large metadata document (F&O) reads it again for this check
    for (table, field_name), uses in sorted(fields.items()):
        flows = tuple(sorted({u.flow for u in uses}))
        try:
            domain = await reader.choice_domain(table, field_name)
        except PermanentError as exc:
            report.findings.append(Finding(system, table, field_name, None, "field_missing",
                                           f"cannot read its domain: {exc.detail}", flows))
            step(1)
            continue
        except SyncError as exc:
            # Retriable (down, throttled, auth): the rest of this system would fail alike.
            report.systems[system] = {"status": "unreachable", "fields": checked, "error": str(exc)}
            step(len(fields) - checked)
            return
        checked += 1
        step(1)
        if domain is None:
            report.unchecked.append({"system": system, "table": table, "field": field_name,
                                     "value_maps": sorted({u.value_map for u in uses}), "flows": list(flows)})
            continue
        report.findings.extend(compare(domain, uses, flowset, previous))
        for value, label in domain.values.items():
            labels[label_key(system, table, field_name, normalize(value))] = label
    report.systems[system] = {"status": "ok", "fields": checked}


async def _labels(state: StateStore) -> tuple[dict[str, str], str | None]:
    cp = await state.get_checkpoint(CHECK_LABELS)
    if cp is None:
        return {}, None
    try:
        value = json.loads(cp.value)
    except ValueError:
        value = {}
    return ({str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}), cp.etag


async def _put(state: StateStore, name: str, value: str) -> None:
    # Last writer wins: two checks at once store the same thing; one conflict is re-read and retried.
    for _ in range(3):
        cp = await state.get_checkpoint(name)
        try:
            await state.put_checkpoint(name, value, expected_etag=cp.etag if cp else None)
            return
        except CheckpointConflictError:
            continue


async def run_check(services: Services, *, systems: Iterable[str] | None = None, flows: Iterable[str] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Read the live domain of every value-mapped field of every flow and compare it with the maps.

    `systems` and `flows` restrict the check (default: every system a flow maps values for, every flow; a flow
    includes its lines). `progress` hears (done, total)
    fields. Systems are read concurrently; one that is down is reported unreachable and the others still checked.
    Stores the labels seen (`check:labels`) and the summary (`check:last`).
    """
    flowset = services.flowset
    uses = field_uses(flowset)
    if flows is not None:
        chosen = set(flows)
        missing = chosen - {f.name for f in flowset.flows}
        if missing:
            raise ValueError(f"unknown flow {', '.join(sorted(missing))}; see `syncline validate` for the flows")
        uses = [u for u in uses if u.flow.removesuffix(".lines") in chosen]
    grouped = _group(uses)
    wanted = set(systems) if systems is not None else set(grouped)
    unknown = wanted - set(flowset.systems) - CONNECTORS
    if unknown:
        raise ValueError(f"unknown system {', '.join(sorted(unknown))}; known: {', '.join(sorted(CONNECTORS))}")
    report = CheckReport(checked_at=datetime.now(UTC).isoformat(timespec="seconds"))
    for system in sorted(wanted - set(flowset.systems)):
        # Asked for by name, but its settings are empty: its flows are idle, nothing of it can be checked.
        report.systems[system] = {"status": "not configured", "fields": 0}
    previous, _ = await _labels(services.state)
    labels = dict(previous)
    total = sum(len(grouped[s]) for s in wanted if s in grouped)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    tasks = []
    for system in sorted(wanted):
        fields = grouped.get(system, {})
        if system in SKIPPED:
            report.systems[system] = {"status": "skipped", "fields": 0, "reason": SKIPPED[system]}
            step(len(fields))
            continue
        if not fields:
            continue
        reader: object = services.sinks.get(system)
        if not isinstance(reader, ChoiceMetadataReader):
            report.systems[system] = {"status": "not configured", "fields": 0}
            step(len(fields))
            continue
        tasks.append(_check_system(system, reader, fields, flowset, previous, report, labels, step))
    await asyncio.gather(*tasks)
    report.findings.sort(key=lambda f: (f.system, f.table, f.field, f.severity, str(f.value)))
    report.systems = dict(sorted(report.systems.items()))
    await _put(services.state, CHECK_LABELS, json.dumps(labels, sort_keys=True))
    await _put(services.state, CHECK_LAST, json.dumps(summary(report)))
    return report


def summary(report: CheckReport) -> dict[str, Any]:
    """The stored summary of a check (`check:last`): counts, systems and the first findings."""
    return {"checked_at": report.checked_at, "exit_code": report.exit_code, "errors": len(report.errors),
            "warnings": len(report.warnings), "unreachable": report.unreachable,
            "findings": [f"{f.severity} {f.system} {f.table}.{f.field} {f.value!r}: {f.problem}"
                         for f in report.findings[:20]]}


async def last_check(state: StateStore) -> dict[str, Any] | None:
    """The summary the last check stored, or None."""
    cp = await state.get_checkpoint(CHECK_LAST)
    if cp is None:
        return None
    try:
        value = json.loads(cp.value)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def log_report(report: CheckReport) -> None:
    """One log line per error (what the alert counts), one summary line."""
    for f in report.errors:
        log.error("choice drift: %s %s.%s value %r: %s (%s)", f.system, f.table, f.field, f.value, f.problem,
                  ", ".join(f.flows))
    for system in report.unreachable:
        log.warning("choice check: %s unreachable: %s", system, report.systems[system].get("error"))
    level = logging.ERROR if report.errors else logging.INFO
    log.log(level, "choice check: %d errors, %d warnings, unreachable: %s", len(report.errors),
            len(report.warnings), ", ".join(report.unreachable) or "none")

