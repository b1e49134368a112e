"""The ArcGIS simulator's hosted feature service schema: layers, fields, types and coded-value domains."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Field JSON follows the ArcGIS REST API "Layer (Feature Service)" resource (`fields`: name, type, alias, sqlType,
# nullable, editable, domain, defaultValue, length) and "Domain objects" (codedValue: name + codedValues[{name, code}])
# (developers.arcgis.com/rest/services-reference/enterprise/layer-feature-service/, .../domain-objects/).

OID = "esriFieldTypeOID"
GLOBALID = "esriFieldTypeGlobalID"
GUID = "esriFieldTypeGUID"
STRING = "esriFieldTypeString"
INTEGER = "esriFieldTypeInteger"
SMALLINT = "esriFieldTypeSmallInteger"
DOUBLE = "esriFieldTypeDouble"
DATE = "esriFieldTypeDate"
_NUMERIC = frozenset({OID, INTEGER, SMALLINT, DOUBLE, "esriFieldTypeSingle", "esriFieldTypeBigInteger"})
_SQL_TYPES = {OID: "sqlTypeInteger", GLOBALID: "sqlTypeGUID", GUID: "sqlTypeGUID", STRING: "sqlTypeNVarchar",
              INTEGER: "sqlTypeInteger", SMALLINT: "sqlTypeSmallInt", DOUBLE: "sqlTypeFloat", DATE: "sqlTypeOther"}


@dataclass(frozen=True)
class FieldDef:
    """One field of a layer, as the layer resource describes it."""

    name: str
    type: str
    alias: str = ""
    length: int | None = None
    nullable: bool = True
    editable: bool = True
    domain: Mapping[str, Any] | None = None

    def codes(self) -> list[Any] | None:
        """The codes of a coded-value domain, or None."""
        if self.domain and self.domain.get("type") == "codedValue":
            return [c["code"] for c in self.domain["codedValues"]]
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "type": self.type, "alias": self.alias or self.name,
            "sqlType": _SQL_TYPES.get(self.type, "sqlTypeOther"), "nullable": self.nullable,
            "editable": self.editable, "domain": dict(self.domain) if self.domain else None, "defaultValue": None,
        }
        if self.length is not None:
            out["length"] = self.length
        return out


@dataclass
class LayerDef:
    """A layer (point geometry) or table (`geometry_type=None`) of the hosted service; system fields are added."""

    id: int
    name: str
    geometry_type: str | None
    fields: list[FieldDef]
    has_attachments: bool = False
    object_id_field: str = "OBJECTID"
    global_id_field: str = "GlobalID"


def coded_domain(name: str, pairs: Sequence[tuple[Any, str]]) -> dict[str, Any]:
    """A coded-value domain from (code, name) pairs."""
    return {"type": "codedValue", "name": name, "codedValues": [{"name": n, "code": c} for c, n in pairs],
            "mergePolicy": "esriMPTDefaultValue", "splitPolicy": "esriSPTDefaultValue"}


def _text(name: str, length: int = 255, **kw: Any) -> FieldDef:
    return FieldDef(name, STRING, length=length, **kw)


def dot_layers() -> list[LayerDef]:
    """The DOT signing service of flows/dot-signs.yaml: four point layers and one table."""
    condition = coded_domain("SignCondition", [("GOOD", "Good"), ("FAIR", "Fair"), ("POOR", "Poor"),
                                               ("DAMAGED", "Damaged"), ("MISSING", "Missing")])
    dv_id = _text("DV_ID", 38, alias="Dataverse ID")
    point = "esriGeometryPoint"
    return [
        LayerDef(0, "SignAssets", point, [
            _text("ASSET_TAG", 50, alias="Asset tag", nullable=False),
            _text("MUTCD_CODE", 20, alias="MUTCD code"),
            _text("SIGN_TYPE", 3, alias="Sign type", domain=coded_domain("SignType", [
                ("REG", "Regulatory"), ("WRN", "Warning"), ("GDE", "Guide"), ("DIR", "Directional"),
                ("RTM", "Route marker")])),
            _text("CONDITION", 10, alias="Condition", domain=condition),
            _text("ROUTE", 50, alias="Route"),
            FieldDef("MILEPOST", DOUBLE, alias="Milepost"),
            FieldDef("MOUNT_HEIGHT_M", DOUBLE, alias="Mount height (m)"),
            FieldDef("INSTALL_DATE", DATE, alias="Install date", length=8),
            FieldDef("RETRO_READING", DOUBLE, alias="Retroreflectivity"),
            FieldDef("LAST_INSPECTED", DATE, alias="Last inspected", length=8),
            dv_id,
        ], has_attachments=True),
        LayerDef(1, "WorkOrders", point, [
            _text("WO_NUMBER", 30, alias="Work order", nullable=False),
            FieldDef("ASSET_GUID", GUID, alias="Sign asset", length=38),
            _text("WORK_TYPE", 10, alias="Work type", domain=coded_domain("WorkType", [
                ("INSTALL", "Install"), ("REPLACE", "Replace"), ("REPAIR", "Repair"), ("REMOVE", "Remove"),
                ("INSPECT", "Inspect")])),
            FieldDef("PRIORITY", SMALLINT, alias="Priority", domain=coded_domain("WorkPriority", [
                (1, "Low"), (2, "Normal"), (3, "High"), (4, "Emergency")])),
            _text("STATUS", 20, alias="Status", domain=coded_domain("WorkOrderStatus", [
                ("OPEN", "Open"), ("IN_PROGRESS", "In progress"), ("COMPLETED", "Completed"),
                ("CLOSED", "Closed"), ("CANCELLED", "Cancelled")])),
            _text("DESCRIPTION", 1000, alias="Description"),
            FieldDef("DUE_DATE", DATE, alias="Due date", length=8),
            _text("COMPLETION_NOTES", 2000, alias="Completion notes"),
            dv_id,
        ]),
        LayerDef(2, "WorkOrderTasks", None, [
            _text("TASK_NAME", 100, alias="Task", nullable=False),
            FieldDef("WO_GUID", GUID, alias="Work order", length=38),
            FieldDef("SEQ", INTEGER, alias="Sequence"),
            _text("TASK_TYPE", 10, alias="Task type", domain=coded_domain("TaskType", [
                ("REMOVE", "Remove old sign"), ("POST", "Install post"), ("MOUNT", "Mount sign"),
                ("VERIFY", "Verify"), ("CLEAN", "Clean")])),
            _text("STATUS", 12, alias="Status", domain=coded_domain("TaskStatus", [
                ("OPEN", "Open"), ("DONE", "Done"), ("CANCELLED", "Cancelled"), ("CLOSED", "Closed")])),
            dv_id,
        ]),
        # Workforce-like assignments: lower-case field names and integer status codes, as Workforce has them.
        LayerDef(3, "Assignments", point, [
            _text("description", 4000, alias="Description"),
            FieldDef("status", INTEGER, alias="Status", domain=coded_domain("AssignmentStatus", [
                (0, "Unassigned"), (1, "Assigned"), (2, "In Progress"), (3, "Completed"), (4, "Declined"),
                (5, "Paused"), (6, "Canceled")])),
            _text("workerid", 50, alias="Worker"),
            FieldDef("duedate", DATE, alias="Due date", length=8),
            FieldDef("priority", INTEGER, alias="Priority"),
            _text("declinedcomment", 4000, alias="Declined comment"),
            FieldDef("WO_GUID", GUID, alias="Work order", length=38),
            dv_id,
        ]),
        LayerDef(4, "Inspections", point, [
            FieldDef("INSPECTION_DATE", DATE, alias="Inspection date", length=8),
            _text("INSPECTOR", 100, alias="Inspector"),
            _text("CONDITION", 10, alias="Condition", domain=condition),
            FieldDef("RETRO_READING", DOUBLE, alias="Retroreflectivity"),
            _text("NOTES", 2000, alias="Notes"),
            FieldDef("ASSET_GUID", GUID, alias="Sign asset", length=38),
            dv_id,
        ], has_attachments=True),
    ]
