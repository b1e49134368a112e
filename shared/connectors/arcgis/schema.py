"""What Syncline reads from a feature service's definitions: fields, layers, the service, layer names."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.core.errors import SpecError

_SERVICE_NAME_RE = re.compile(r"/services/([^/]+)/FeatureServer", re.IGNORECASE)
_NUMERIC_TYPES = frozenset({"esriFieldTypeOID", "esriFieldTypeInteger", "esriFieldTypeSmallInteger",
                            "esriFieldTypeDouble", "esriFieldTypeSingle", "esriFieldTypeBigInteger"})
_GUID_TYPES = frozenset({"esriFieldTypeGUID", "esriFieldTypeGlobalID"})


@dataclass(frozen=True)
class FieldInfo:
    """One field of a layer (from the layer resource)."""

    name: str
    type: str
    nullable: bool = True
    editable: bool = True
    length: int | None = None
    domain: Mapping[str, Any] | None = None

    @property
    def kind(self) -> str:
        """num, date, guid or str: how values of this field are written in a where clause."""
        if self.type in _NUMERIC_TYPES:
            return "num"
        if self.type == "esriFieldTypeDate":
            return "date"
        if self.type in _GUID_TYPES:
            return "guid"
        return "str"


@dataclass(frozen=True)
class LayerInfo:
    """What Syncline needs from a layer/table definition."""

    id: int
    name: str
    is_table: bool
    object_id_field: str
    global_id_field: str
    fields: Mapping[str, FieldInfo]
    """Lower-cased field name -> field."""
    max_record_count: int
    capabilities: frozenset[str]
    edit_fields: Mapping[str, str]
    has_attachments: bool
    supports_query_attachments: bool
    spatial_reference: Mapping[str, Any] | None

    def field(self, name: str) -> FieldInfo | None:
        return self.fields.get(name.lower())

    def require(self, name: str) -> FieldInfo:
        """The field called `name` (any case), or a SpecError naming the layer's fields."""
        found = self.field(name)
        if found is None:
            known = ", ".join(f.name for f in self.fields.values())
            raise SpecError(f"arcgis: field {name!r} does not exist in layer {self.name!r} (fields: {known}); "
                            f"fix the flow spec or the layer schema")
        return found

    @property
    def edit_date_field(self) -> str | None:
        return self.edit_fields.get("editDateField") or None

    @property
    def server_fields(self) -> frozenset[str]:
        """Fields the service maintains itself (never written by Syncline)."""
        return frozenset({self.object_id_field, self.global_id_field, *self.edit_fields.values()})


@dataclass(frozen=True)
class ServiceInfo:
    """What Syncline needs from the FeatureServer resource."""

    layer_ids: Mapping[str, int]
    """Lower-cased layer/table name -> id."""
    names: Mapping[int, str]
    change_tracking: bool
    spatial_reference: Mapping[str, Any] | None
    capabilities: frozenset[str] = frozenset()
    """The service's capabilities (Query, Editing, ChangeTracking, ...)."""


_LAYER_NAMES: dict[str, dict[int, str]] = {}
"""Process-wide layer names per service name, learnt by clients from service definitions; lets the pure
`parse_webhook` name the layer of a feature-service webhook (whose payload carries only its id)."""


def _service_name(service_url: str) -> str:
    m = _SERVICE_NAME_RE.search(service_url)
    return m.group(1).lower() if m else service_url.rstrip("/").lower()


# ============================================================================================ client
