"""The flow inventory: `docs/flows.md` rendered from the flow specs (pure rendering; `syncline docs` writes it)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from shared.core.errors import REASONS
from shared.mapping.spec import FieldMap, FlowSet, FlowSpec, LookupMap, Side

RUNBOOK = "operations.md"
"""The runbook, relative to docs/flows.md; each reason code has a `### CODE` entry (anchor: the code in lower case)."""

# How changes of a source reach a flow. Where this comes from:
# - WEBHOOKS: the intake handlers of shared/ops/intake.py (routes in shared/triggers/webhooks.py). Dataverse writes
#   its direct flows in the invocation and enqueues its queue flows; every other system's intake only enqueues
#   (handle_dataverse_webhook is the only caller of write_direct), so a direct flow is triggered by its webhook alone.
# - POLLS: shared/core/controller/polling.py polls the source table of every queue-mode flow through the source
#   system's ChangeSource (`changes_since` of shared/connectors/<system>/changes.py, registered in
#   shared/bootstrap.py); direct flows are never polled. tests/unit/test_inventory.py checks both tables against
#   the code.
WEBHOOKS: dict[str, str] = {
    "dataverse": "Dataverse webhook (`POST /api/webhooks/dataverse`, plugin step on the table)",
    "arcgis": "feature-service / Survey123 webhook (`POST /api/webhooks/arcgis`; a feature-service event makes the "
              "controller read the layer's changes)",
    "fno": "F&O business events (`POST /api/webhooks/fno`, record read back through OData)",
    "salesforce": "Salesforce Change Data Capture (`POST /api/webhooks/salesforce`, record read back)",
    "sap": "SAP Event Mesh events (`POST /api/webhooks/sap`, record read back through OData)",
}
POLLS: dict[str, str] = {
    "dataverse": "Dataverse change tracking (delta link)",
    "arcgis": "ArcGIS `extractChanges` (an `EditDate` cursor when change tracking is off)",
    "fno": "F&O OData on `ModifiedDateTime` (a full-scan comparison for entities without one)",
    "salesforce": "Salesforce SOQL on `SystemModstamp`",
    "sap": "SAP OData on `LastChangeDateTime` (a content hash for entities without one)",
}

# Dead-letter reasons (the DeadLetterReason a flow's message can end with; retriable codes never are one, they end
# as MAX_DELIVERY_EXCEEDED). The rule, from where the engine raises each code:
# - every flow: GENERIC (a spec or message problem, the target's refusal, a retriable failure that persisted);
# - MAPPING_FAILED: a field (header or line) with a transform other than copy/choice, or geometry
#   (shared/mapping/transforms.py raises MappingError);
# - UNMAPPED_CHOICE: a field (header or line) with a value map (shared/mapping/engine.py);
# - REQUIRED_FIELD_MISSING: a required field or geometry, a required lookup or one with key_part, a link or line
#   match_source (shared/mapping/engine.py, shared/core/engine/relations.py and documents.py), or Salesforce as the
#   target (its REQUIRED_FIELD_MISSING error code, shared/connectors/salesforce/errors.py);
# - PARENT_MISSING: a lookup (header or line: a line's missing product fails its whole document).
GENERIC_REASONS = ("SPEC_INVALID", "ENVELOPE_INVALID", "UNKNOWN_FLOW", "TARGET_REJECTED", "MAX_DELIVERY_EXCEEDED")


def spec_files(path: str | Path) -> list[Path]:
    """The spec files `load_flows` reads from `path`, in its order: the file itself, or a directory's *.yaml, *.yml."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml"))


def _cell(value: object) -> str:
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: object) -> str:
    return f"`{_cell(value)}`" if value not in (None, "") else "-"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _args(args: dict[str, object]) -> str:
    return ", ".join(f"{k}={_cell(v)}" for k, v in sorted(args.items())) or "-"


def trigger(flow: FlowSpec) -> str:
    """How changes of the flow's source arrive (see WEBHOOKS and POLLS)."""
    system = flow.source.system
    webhook = WEBHOOKS.get(system)
    poll = POLLS.get(system)
    if flow.mode == "direct":
        return f"webhook, written in the invocation: {webhook}" if webhook else "none (no intake for this system)"
    parts = ([f"webhook, queued: {webhook}"] if webhook else []) + (
        [f"poll by the controller each cycle: {poll}"] if poll else [])
    return "; ".join(parts) or "none (no intake for this system)"


def reasons(flow: FlowSpec) -> list[str]:
    """The dead-letter reasons `flow` can produce, in REASONS order (the rule is in the comment above)."""
    fields: list[FieldMap] = [*flow.fields, *(flow.lines.fields if flow.lines else [])]
    lookups: list[LookupMap] = [*flow.lookups, *(flow.lines.lookups if flow.lines else [])]
    found = set(GENERIC_REASONS)
    if flow.geometry is not None or any(fm.transform not in ("copy", "choice") for fm in fields):
        found.add("MAPPING_FAILED")
    if any(fm.value_map for fm in fields):
        found.add("UNMAPPED_CHOICE")
    if (any(fm.required for fm in fields) or (flow.geometry is not None and flow.geometry.required)
            or any(lk.required or lk.key_part is not None for lk in lookups) or flow.link.match_source
            or (flow.lines is not None and flow.lines.match_source) or flow.target.system == "salesforce"):
        found.add("REQUIRED_FIELD_MISSING")
    if lookups:
        found.add("PARENT_MISSING")
    return [code for code in REASONS if code in found]


def _anchor(name: str) -> str:
    """GitHub's heading anchor of a flow name (lower case; underscores are kept)."""
    return name.lower()


def _fields(fields: Sequence[FieldMap]) -> list[str]:
    return _table(["Source", "Target", "Transform", "Args", "Value map", "Owner", "Required"], [
        [_code(fm.source), _code(fm.target), fm.transform, _args(dict(fm.args)), _code(fm.value_map), fm.owner,
         "yes" if fm.required else "no"] for fm in fields])


def _lookups(lookups: Sequence[LookupMap]) -> list[str]:
    return _table(["Source", "Target", "Parent flow", "Bind (entity set)", "Required", "Ensure", "Key part"], [
        [_code(lk.source), _code(lk.target), f"[`{lk.parent_flow}`](#{_anchor(lk.parent_flow)})",
         _code(lk.bind_entity_set), "yes" if lk.required else "no", "yes" if lk.ensure else "no",
         "-" if lk.key_part is None else str(lk.key_part)] for lk in lookups])


def _defaults(defaults: dict[str, object]) -> list[str]:
    return _table(["Target field", "Value"], [[_code(k), _code(v)] for k, v in sorted(defaults.items())])


def _side(side: Side) -> str:
    return f"{side.system} {_code(side.table)} (key {_code(side.key_field)}, modified {_code(side.modified_field)})"


def _flow(flow: FlowSpec) -> list[str]:
    src, tgt, link = flow.source, flow.target, flow.link
    out = [f"### {flow.name}", ""]
    if flow.description:
        out += [flow.description, ""]
    link_parts = [f"target field {_code(link.target_field)}"]
    link_parts += [f"{name} {_code(value)}" for name, value in (
        ("write_back", link.write_back), ("match_source", link.match_source), ("origin_field", link.origin_field))
        if value]
    out += _table(["", ""], [
        ["Entity", _code(flow.entity)],
        ["Source", _side(src)],
        ["Target", _side(tgt)],
        ["Direction", f"{src.system} → {tgt.system}"],
        ["Mode", flow.mode],
        ["Trigger", _cell(trigger(flow))],
        ["Operations", ", ".join(flow.operations)],
        ["Scope (`when`)", "; ".join(_cell(c.describe()) for c in flow.when) or "every record"],
        ["Key strategy (link)", "; ".join(link_parts)],
        ["Batch size", str(flow.batch_size)],
    ])
    out += ["#### Fields", "", *_fields(flow.fields)]
    if flow.geometry is not None:
        geo = flow.geometry
        out += ["#### Geometry", "", *_table(["Transform", "Latitude", "Longitude", "wkid", "Owner", "Required"], [[
            geo.transform, _code(geo.latitude), _code(geo.longitude), str(geo.wkid), geo.owner,
            "yes" if geo.required else "no"]])]
    if flow.lookups:
        out += ["#### Lookups (parents)", "", *_lookups(flow.lookups)]
    if flow.lines is not None:
        ln = flow.lines
        out += ["#### Document lines", "", *_table(["", ""], [
            ["Source lines",
             f"{_code(ln.source_table)} (key {_code(ln.key_field)}, header in {_code(ln.parent_field)})"],
            ["Target lines", _code(ln.target_table)],
            ["Link field", _code(ln.link_field) + (f" (holds {_code(ln.match_source)})" if ln.match_source else "")],
            ["Copied from the header", ", ".join(f"{_code(k)} ← {_code(v)}" for k, v in ln.parent_fields.items())
             or "-"],
            ["Rollup field", _code(ln.rollup_field)],
        ]), "Line fields:", "", *_fields(ln.fields)]
        if ln.lookups:
            out += ["Line lookups:", "", *_lookups(ln.lookups)]
        if ln.defaults:
            out += ["Line defaults:", "", *_defaults(dict(ln.defaults))]
    if flow.attachments is not None:
        att = flow.attachments
        out += ["#### Attachments", "", *_table(["Enabled", "Max bytes", "Content types"], [[
            "yes" if att.enabled else "no", str(att.max_bytes), ", ".join(att.content_types)]])]
    if flow.defaults:
        out += ["#### Defaults (on create)", "", *_defaults(dict(flow.defaults))]
    out += ["#### Dead-letter reasons", ""]
    out += [f"- [`{code}`]({RUNBOOK}#{code.lower()}): {REASONS[code]}" for code in reasons(flow)]
    return [*out, ""]


def _value_maps(flowset: FlowSet) -> list[str]:
    out = ["### Value maps", ""]
    if not flowset.value_maps:
        return [*out, "None.", ""]
    for name, entries in flowset.value_maps.items():
        systems = [s for s in flowset.systems if any(s in e for e in entries)]
        systems += sorted({s for e in entries for s in e} - {"label", *systems})
        out += [f"#### `{name}`", "", *_table(["Label", *systems], [
            [_cell(e.get("label", "-")), *(_code(e.get(s)) for s in systems)] for e in entries])]
    return out


def _cascades(flowset: FlowSet) -> list[str]:
    out = ["### Cascades", ""]
    if not flowset.cascades:
        return [*out, "None.", ""]
    for c in flowset.cascades:
        out += [f"#### `{c.name}`", "", f"When a `{c.parent_entity}` reaches one of the values below, its open "
                f"`{c.child_entity}` children are set on both sides, unless already in an `unless` value.", ""]
        systems = sorted({*c.when, *c.child_parent_field, *c.set, *c.unless})
        out += _table(["System", "Parent when", "Child's parent field", "Set on the child", "Unless"], [[
            s,
            "; ".join(f"{_code(f)} in {_cell(list(v))}" for f, v in c.when.get(s, {}).items()) or "-",
            _code(c.child_parent_field.get(s)),
            "; ".join(f"{_code(f)} = {_code(v)}" for f, v in c.set.get(s, {}).items()) or "-",
            "; ".join(f"{_code(f)} in {_cell(list(v))}" for f, v in c.unless.get(s, {}).items()) or "-",
        ] for s in systems])
    return out


def render_inventory(specs: Sequence[tuple[str, FlowSet]]) -> str:
    """The Markdown of docs/flows.md for `(spec file name, flow set)` pairs, in the given order (deterministic)."""
    out = ["# Flow inventory", "",
           "<!-- Generated by `syncline docs` from the flow specs; do not edit: change flows/*.yaml and run it "
           "again. -->", "",
           "Every flow Syncline runs, from its spec: systems and tables, direction, mode, how changes arrive, fields "
           "with their transforms and owners, value maps, parents, document lines, cascades and the dead-letter "
           f"reasons each flow can produce, linked to their runbook entries in [{RUNBOOK}]({RUNBOOK}).", "",
           "**Mode**: `direct` flows are written in the webhook invocation (and queued when that cannot finish); "
           "`queue` flows are staged on the inbound queue and written by the controller (every 15 minutes). "
           "**Owner**: the system that masters a field (written by the other side only on create), or `shared` "
           "(last writer wins).", "",
           "## Overview", ""]
    rows = []
    for file, flowset in specs:
        for f in flowset.flows:
            rows.append([f"[{f.name}](#{_anchor(f.name)})", f"`{file}`", f"{f.source.system} {_code(f.source.table)}",
                         f"{f.target.system} {_code(f.target.table)}", f.mode])
    out += _table(["Flow", "Spec", "Source", "Target", "Mode"], rows)
    for file, flowset in specs:
        out += [f"## {flowset.name} (`{file}`)", ""]
        if flowset.description:
            out += [flowset.description, ""]
        out += [f"Systems: {', '.join(flowset.systems)}.", ""]
        for flow in flowset.flows:
            out += _flow(flow)
        out += _value_maps(flowset)
        out += _cascades(flowset)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def generate(path: str | Path) -> str:
    """Load the specs at `path` as `load_flows` does (validated together, grouped per file) and render them."""
    from shared.bootstrap import load_flows
    from shared.mapping.spec import load_spec

    load_flows(path)  # the merged set must be valid too (cross-file names), exactly as the runtime loads it
    return render_inventory([(f.name, load_spec(f)) for f in spec_files(path)])
