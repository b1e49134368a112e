"""Declarative flow specs: pydantic models (extra="forbid") and the YAML loader with precise error messages."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as PydanticValidationError

from shared.core.errors import SpecError

Scalar = str | int | float | bool
OperationName = Literal["create", "update", "delete"]
ALL_OPERATIONS: tuple[OperationName, ...] = ("create", "update", "delete")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Side(_Strict):
    """One end of a flow: a system and a table (Dataverse entity set or ArcGIS layer/table name)."""

    system: str
    table: str
    key_field: str
    """Primary key field (Dataverse GUID column, ArcGIS GlobalID field)."""
    modified_field: str | None = None
    """Field holding the record's last modification time (Dataverse modifiedon, ArcGIS EditDate)."""


class LinkSpec(_Strict):
    """How the two records of a pair find each other without the cross-reference (idempotent re-creates)."""

    target_field: str
    """Target field that holds the source key (ArcGIS field with the Dataverse GUID, or a Dataverse
    alternate-key column with the ArcGIS GlobalID)."""
    write_back: str | None = None
    """Source field that receives the target's key after a create (identifier propagation)."""
    match_source: str | None = None
    """Source field whose value `target_field` holds, when the target field is too short for the source key
    (an SAP field of 20 or 35 characters cannot hold a 36-character Dataverse GUID). Default: the source key."""
    origin_field: str | None = None
    """Source field holding the target key of the record this source record was created from (the reverse
    flow's `target_field`, e.g. F&O `SynclineSalesforceId` on a customer made from a Salesforce Account). A source
    record that carries it is linked to that record instead of creating another, even when the reverse flow's
    answer was lost and its link never stored. Only for a field that always names a record of the target table."""


class FieldMap(_Strict):
    """One field: source -> target through a named transform."""

    source: str
    target: str
    transform: str = "copy"
    value_map: str | None = None
    """Name of a value map (for the `choice` transform)."""
    args: dict[str, Scalar] = Field(default_factory=dict)
    required: bool = False
    owner: str = "shared"
    """Which system masters the field: a system name, or "shared" (last writer wins)."""


class GeometryMap(_Strict):
    """How geometry crosses: latitude/longitude columns <-> ArcGIS point."""

    transform: Literal["latlon_to_point", "point_to_latlon"]
    latitude: str
    longitude: str
    wkid: int = 102100
    """Spatial reference of the ArcGIS side (102100 Web Mercator or 4326 WGS84)."""
    required: bool = False
    owner: str = "shared"


class LookupMap(_Strict):
    """A relationship: the child's source field names its parent; the target gets the parent's target key."""

    source: str
    """Source field with the parent's key in the source system."""
    target: str
    """Target field (ArcGIS) or single-valued navigation property (Dataverse, bound with @odata.bind)."""
    parent_flow: str
    """The flow that syncs the parent in the same direction (its entity is the xref namespace)."""
    bind_entity_set: str | None = None
    """Dataverse only: entity set of the parent, which makes this an @odata.bind lookup."""
    required: bool = True
    ensure: bool = False
    """When the parent was never synced, read it from the source and sync it through its flow first (a
    missing SAP business partner or F&O customer is created before the order) instead of waiting for it."""
    key_part: int | None = Field(default=None, ge=0)
    """For composite parent keys (F&O `company|number`): which `|`-separated part goes into the target
    field (0 = dataAreaId, 1 = the number). None writes the whole key."""


class Condition(_Strict):
    """A scope rule on the source record: the flow only syncs records that satisfy all of its conditions."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    field: str
    in_: list[Scalar] | None = Field(default=None, alias="in")
    """The field's value must be one of these."""
    present: bool | None = None
    """True: the field must hold a value; False: it must be empty."""

    @model_validator(mode="after")
    def _one_rule(self) -> Condition:
        if (self.in_ is None) == (self.present is None):
            raise ValueError(f"condition on {self.field!r} needs exactly one of 'in' or 'present'")
        if self.in_ is not None and not self.in_:
            raise ValueError(f"condition on {self.field!r}: 'in' needs at least one value")
        return self

    def describe(self) -> str:
        if self.in_ is not None:
            return f"{self.field} in {list(self.in_)}"
        return f"{self.field} {'is set' if self.present else 'is empty'}"


class AttachmentSpec(_Strict):
    """Attachments (e.g. inspection photos) copied with the record."""

    enabled: bool = True
    max_bytes: int = 10 * 1024 * 1024
    content_types: list[str] = Field(default_factory=lambda: ["image/jpeg", "image/png"])


class LinesSpec(_Strict):
    """Document lines read with their header and written with it (sales order lines; SAP deep insert)."""

    source_table: str
    """Source table of the lines (Salesforce OpportunityLineItem, Dataverse salesorderdetails)."""
    parent_field: str
    """Source line field holding the header's source key (OpportunityId)."""
    key_field: str = "Id"
    """Source line primary key."""
    target_table: str
    """Target entity set of the lines (F&O SalesOrderLines) or navigation property (SAP to_Item)."""
    parent_fields: dict[str, str] = Field(default_factory=dict)
    """{target line field: target header field} copied from the written header (order number, company)."""
    link_field: str
    """Target line field that holds the source line key, so re-writes find the line instead of adding one."""
    match_source: str | None = None
    """Source line field whose value `link_field` holds instead of the line key (e.g. a line number)."""
    rollup_field: str | None = None
    """Header field the source recomputes when a line changes (Dataverse totalamount, Salesforce Amount):
    webhook registrations watch it, so a line change re-syncs its document."""
    fields: list[FieldMap]
    lookups: list[LookupMap] = Field(default_factory=list)
    defaults: dict[str, Scalar] = Field(default_factory=dict)
    """Fixed target values every line carries (codes the target requires and the source does not have)."""


class FlowSpec(_Strict):
    """One direction of one entity: what is read, how it is translated and where it is written."""

    name: str
    entity: str
    """Business entity shared by both directions (the cross-reference and snapshot namespace)."""
    description: str = ""
    source: Side
    target: Side
    mode: Literal["direct", "queue"]
    """direct: outbound write in the webhook invocation; queue: staged on the inbound queue."""
    operations: list[OperationName] = Field(default_factory=lambda: list(ALL_OPERATIONS))
    when: list[Condition] = Field(default_factory=list)
    """Scope: only source records meeting every condition are synced (e.g. closed-won opportunities)."""
    link: LinkSpec
    fields: list[FieldMap]
    geometry: GeometryMap | None = None
    lookups: list[LookupMap] = Field(default_factory=list)
    attachments: AttachmentSpec | None = None
    lines: LinesSpec | None = None
    defaults: dict[str, Scalar] = Field(default_factory=dict)
    """Fixed target values written when the flow creates a record (e.g. SAP BusinessPartnerCategory "2")."""
    batch_size: int = Field(default=500, ge=1, le=1000)

    @model_validator(mode="after")
    def _distinct(self) -> FlowSpec:
        seen: set[str] = set()
        for fm in self.fields:
            if fm.target in seen:
                raise ValueError(f"target field {fm.target!r} is mapped twice")
            seen.add(fm.target)
        if self.source.system == self.target.system:
            raise ValueError("source and target must be different systems")
        return self


class CascadeSpec(_Strict):
    """When a parent reaches one of `when` values, its open children are set to `set` on both sides."""

    name: str
    parent_entity: str
    child_entity: str
    when: dict[str, dict[str, list[Scalar]]]
    """Per system: {parent field: values that trigger the cascade}."""
    child_parent_field: dict[str, str]
    """Per system: the child field holding the parent's key."""
    set: dict[str, dict[str, Scalar]]
    """Per system: {child field: value} to write."""
    unless: dict[str, dict[str, list[Scalar]]] = Field(default_factory=dict)
    """Per system: children already in one of these values are left alone."""


ValueMapEntry = dict[str, Scalar]


class FlowSet(_Strict):
    """A spec file: value maps, flows and cascades of one integration."""

    spec_version: Literal[1]
    name: str
    description: str = ""
    systems: list[str]
    value_maps: dict[str, list[ValueMapEntry]] = Field(default_factory=dict)
    flows: list[FlowSpec]
    cascades: list[CascadeSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> FlowSet:
        names = [f.name for f in self.flows]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate flow names: {sorted(dupes)}")
        by_name = {f.name: f for f in self.flows}
        entities = {f.entity for f in self.flows}
        for flow in self.flows:
            for side in (flow.source, flow.target):
                if side.system not in self.systems:
                    raise ValueError(f"flow {flow.name!r}: system {side.system!r} is not listed in systems")
            allowed_owners = {"shared", flow.source.system, flow.target.system}
            line_fields = flow.lines.fields if flow.lines is not None else []
            line_lookups = flow.lines.lookups if flow.lines is not None else []
            for fm in [*flow.fields, *line_fields]:
                if fm.owner not in allowed_owners:
                    raise ValueError(
                        f"flow {flow.name!r} field {fm.source!r}: owner {fm.owner!r} must be one of "
                        f"{sorted(allowed_owners)}"
                    )
                if fm.value_map is not None and fm.value_map not in self.value_maps:
                    raise ValueError(f"flow {flow.name!r} field {fm.source!r}: unknown value_map {fm.value_map!r}")
            for lk in [*flow.lookups, *line_lookups]:
                parent = by_name.get(lk.parent_flow)
                if parent is None:
                    raise ValueError(f"flow {flow.name!r} lookup {lk.source!r}: unknown parent_flow {lk.parent_flow!r}")
                # Links are stored both ways, so a parent synced in the other direction (products mastered by
                # F&O, referenced by Salesforce order lines) resolves as well; only the two systems must agree.
                if lk.ensure and parent.source.system != flow.source.system:
                    raise ValueError(
                        f"flow {flow.name!r} lookup {lk.source!r}: ensure needs a parent_flow that runs in the same "
                        f"direction ({lk.parent_flow!r} does not)"
                    )
                if {parent.source.system, parent.target.system} != {flow.source.system, flow.target.system}:
                    raise ValueError(
                        f"flow {flow.name!r} lookup {lk.source!r}: parent_flow {lk.parent_flow!r} must connect the "
                        "same two systems"
                    )
        for name, entries in self.value_maps.items():
            for system in {s for e in entries for s in e if s != "label"}:
                values = [e[system] for e in entries if system in e]
                if len(values) != len(set(values)):
                    raise ValueError(f"value map {name!r}: duplicate {system} values make it ambiguous")
        for cascade in self.cascades:
            for ent in (cascade.parent_entity, cascade.child_entity):
                if ent not in entities:
                    raise ValueError(f"cascade {cascade.name!r}: unknown entity {ent!r}")
        self._check_ownership_agrees()
        self._check_acyclic(by_name)
        return self

    def _check_ownership_agrees(self) -> None:
        # Both directions of an entity must agree on who masters a field, or the sides would fight.
        owners: dict[tuple[str, str, str], str] = {}
        for flow in self.flows:
            for fm in flow.fields:
                for system, field_name in ((flow.source.system, fm.source), (flow.target.system, fm.target)):
                    key = (flow.entity, system, field_name)
                    if key in owners and owners[key] != fm.owner:
                        raise ValueError(
                            f"entity {flow.entity!r}: {system} field {field_name!r} is owned by {owners[key]!r} in "
                            f"one flow and by {fm.owner!r} in flow {flow.name!r}"
                        )
                    owners[key] = fm.owner

    def _check_acyclic(self, by_name: dict[str, FlowSpec]) -> None:
        # Depth-first search with an explicit path: a flow met again on the current path is a cycle, a flow
        # reached twice by different paths (a diamond: inspection -> sign, inspection -> work order -> sign) is not.
        done: set[str] = set()

        def visit(name: str, path: list[str]) -> None:
            if name in path:
                raise ValueError(f"lookup cycle through flows {[*path[path.index(name):], name]}")
            if name in done:
                return
            for lk in by_name[name].lookups:
                visit(lk.parent_flow, [*path, name])
            done.add(name)

        for flow in self.flows:
            visit(flow.name, [])

    def restricted_to(self, systems: set[str]) -> FlowSet:
        """The flows (and cascades) whose systems are all in `systems`: a deployment connected to only some
        systems runs only the flows it can complete."""
        flows = [f for f in self.flows if {f.source.system, f.target.system} <= systems]
        entities = {f.entity for f in flows}
        cascades = [c for c in self.cascades if {c.parent_entity, c.child_entity} <= entities]
        if len(flows) == len(self.flows) and len(cascades) == len(self.cascades):
            return self
        return self.model_copy(update={"flows": flows, "cascades": cascades,
                                       "systems": [s for s in self.systems if s in systems]})

    def line_flow(self, flow: FlowSpec) -> FlowSpec:
        """The lines of `flow` as a flow of their own (for mapping and lookups); `flow` must have `lines`."""
        assert flow.lines is not None
        lines = flow.lines
        return FlowSpec(
            name=f"{flow.name}.lines", entity=f"{flow.entity}.lines",
            source=Side(system=flow.source.system, table=lines.source_table, key_field=lines.key_field),
            target=Side(system=flow.target.system, table=lines.target_table, key_field=lines.link_field),
            mode=flow.mode, operations=["create", "update"], link=LinkSpec(target_field=lines.link_field),
            fields=lines.fields, lookups=lines.lookups,
        )

    def flow(self, name: str) -> FlowSpec:
        """The flow called `name`; raises `SpecError(UNKNOWN_FLOW)` if absent."""
        for f in self.flows:
            if f.name == name:
                return f
        raise SpecError(f"no flow named {name!r} in spec {self.name!r}", reason="UNKNOWN_FLOW")

    def flows_from(self, system: str, table: str) -> list[FlowSpec]:
        """Flows whose source is this system and table."""
        return [f for f in self.flows if f.source.system == system and f.source.table == table]

    def depth(self, flow: FlowSpec) -> int:
        """Number of ancestor levels (0 for a flow without lookups): parents are processed first.

        Only parents synced in the same direction count; one synced the other way is never in the same batch.
        """
        parents = [p for lk in flow.lookups
                   if (p := self.flow(lk.parent_flow)).source.system == flow.source.system]
        return 0 if not parents else 1 + max(self.depth(p) for p in parents)

    def reverse_of(self, flow: FlowSpec) -> FlowSpec | None:
        """The flow of the same entity running the other way, if any."""
        for f in self.flows:
            reverse = f.source.system == flow.target.system and f.target.system == flow.source.system
            if f.entity == flow.entity and reverse:
                return f
        return None


def _format_loc(loc: Iterable[int | str], data: Any) -> str:
    # Turn ("flows", 3, "fields", 2, "transform") into "flows[3] (sign_assets_in).fields[2].transform".
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            label = ""
            if isinstance(node, list) and 0 <= item < len(node) and isinstance(node[item], dict):
                name = node[item].get("name") or node[item].get("source")
                label = f" ({name})" if name else ""
            parts.append(f"[{item}]{label}")
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
        else:
            parts.append(f".{item}" if parts else str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "<root>"


def parse_spec(text: str, *, source: str = "<string>") -> FlowSet:
    """Parse and validate spec text; every problem is a `SpecError` naming the file and the path in it."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a flow spec must be a YAML mapping at the top level")
    try:
        flowset = FlowSet.model_validate(data)
    except PydanticValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = _format_loc(err["loc"], data)
            problems.append(f"{source}: {loc}: {err['msg']}")
        raise SpecError("\n".join(problems)) from exc
    from shared.mapping.transforms import TRANSFORMS  # late: transforms import the spec types

    for flow in flowset.flows:
        groups = [("fields", flow.fields)] + ([("lines.fields", flow.lines.fields)] if flow.lines else [])
        for where, fields in groups:
            for i, fm in enumerate(fields):
                if fm.transform not in TRANSFORMS:
                    raise SpecError(
                        f"{source}: flows ({flow.name}).{where}[{i}] ({fm.source}).transform: unknown transform "
                        f"{fm.transform!r}; known: {', '.join(sorted(TRANSFORMS))}"
                    )
                if fm.transform == "choice" and fm.value_map is None:
                    raise SpecError(f"{source}: flows ({flow.name}).{where}[{i}] ({fm.source}): choice needs value_map")
    return flowset


def load_spec(path: str | Path) -> FlowSet:
    """Load one spec file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{p}: cannot read flow spec: {exc.strerror or exc}") from exc
    return parse_spec(text, source=str(p))
