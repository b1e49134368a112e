"""The simulated service's state: layers, features, tombstones, attachments, and the base they share."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sandbox.arcgis.codecs import mercator_to_lonlat
from sandbox.arcgis.errors import RestError
from sandbox.arcgis.schema import DATE, GLOBALID, GUID, OID, FieldDef, LayerDef, _text

EDIT_FIELDS = {"creationDateField": "CreationDate", "creatorField": "Creator",
               "editDateField": "EditDate", "editorField": "Editor"}


@dataclass
class _Attachment:
    id: int
    global_id: str
    name: str
    content_type: str
    data: bytes
    keywords: str
    gen: int


@dataclass
class _Feature:
    attrs: dict[str, Any]
    geometry: tuple[float, float] | None
    """Stored in Web Mercator (102100), the layer's spatial reference."""
    created_gen: int
    updated_gen: int
    attachments: dict[int, _Attachment] = field(default_factory=dict)


@dataclass
class _Tombstone:
    oid: int
    global_id: str
    attrs: dict[str, Any]
    created_gen: int
    gen: int


@dataclass
class _Change:
    """What one edit operation changed in one layer (drives webhooks)."""

    layer_id: int
    events: set[str]
    gen_before: int
    gen_after: int
    at: int


class _Layer:
    def __init__(self, d: LayerDef, max_record_count: int) -> None:
        self.d = d
        self.max_record_count = max_record_count
        self.fields: list[FieldDef] = [
            FieldDef(d.object_id_field, OID, nullable=False, editable=False),
            *d.fields,
            FieldDef(d.global_id_field, GLOBALID, length=38, nullable=False, editable=False),
            FieldDef("CreationDate", DATE, length=8, editable=False),
            _text("Creator", 128, editable=False),
            FieldDef("EditDate", DATE, length=8, editable=False),
            _text("Editor", 128, editable=False),
        ]
        self.by_lower = {f.name.lower(): f for f in self.fields}
        self.type_id_field: str | None = None
        self.types: list[dict[str, Any]] = []
        """Subtypes (`types[]` of the layer resource: id, name, domains per field); none unless a test adds them."""
        self.features: dict[int, _Feature] = {}
        self.by_gid: dict[str, int] = {}
        self.tombstones: list[_Tombstone] = []
        self.attachment_tombstones: list[tuple[int, str, int]] = []
        """(attachment id, parent GlobalID, serverGen)."""
        self.next_oid = 1
        self.last_edit = 0

    @property
    def oid_field(self) -> str:
        return self.d.object_id_field

    @property
    def gid_field(self) -> str:
        return self.d.global_id_field

    @property
    def is_table(self) -> bool:
        return self.d.geometry_type is None

    def field(self, name: str) -> FieldDef | None:
        return self.by_lower.get(name.lower())


class FeatureStore:
    """The in-memory service state the simulator's parts share: layers, serverGen, the lock, GUID output."""

    _lock: threading.RLock
    _layers: dict[int, _Layer]
    _gen: int
    clock: Callable[[], int]
    guid_case: str
    service_path: str
    base_url: str | None
    _seen_base: str | None

    def _public_base(self) -> str:
        return self.base_url or self._seen_base or "https://services.arcgis.com"

    def _render(self, lyr: _Layer, feat: _Feature, out_fields: Sequence[FieldDef], geometry: bool,
                out_wkid: int) -> dict[str, Any]:
        attrs = {f.name: self._value_out(f, feat.attrs.get(f.name)) for f in out_fields}
        out: dict[str, Any] = {"attributes": attrs}
        if geometry and not lyr.is_table and feat.geometry is not None:
            x, y = feat.geometry
            if out_wkid == 4326:
                x, y = mercator_to_lonlat(x, y)
            out["geometry"] = {"x": x, "y": y}
        return out

    def _value_out(self, f: FieldDef, value: Any) -> Any:
        if f.type in (GUID, GLOBALID) and isinstance(value, str):
            return self._guid_out(value)
        return value

    def _guid_out(self, value: str) -> str:
        if self.guid_case == "lower":
            return value.lower()
        if self.guid_case == "mixed":  # like `{93BADD75-B2B7-497a-99F0-6E89B09C9C8E}` in Esri's own samples
            parts = value.strip("{}").split("-")
            parts[2] = parts[2].lower()
            return "{" + "-".join(parts) + "}"
        return value

    @staticmethod
    def _require_attachments(lyr: _Layer) -> None:
        if not lyr.d.has_attachments:
            raise RestError(400, "Unable to complete operation.", ["Layer does not support attachments."])

    def _attachment_info(self, lyr: _Layer, feat: _Feature, att: _Attachment) -> dict[str, Any]:
        return {"id": att.id, "globalId": self._guid_out(att.global_id),
                "parentGlobalId": self._guid_out(feat.attrs[lyr.gid_field]), "name": att.name,
                "contentType": att.content_type, "size": len(att.data), "keywords": att.keywords, "exifInfo": None}

    def _layer(self, ref: str | int) -> _Layer:
        if isinstance(ref, int) or str(ref).isdigit():
            return self._layers[int(ref)]
        for lyr in self._layers.values():
            if lyr.d.name.lower() == str(ref).lower():
                return lyr
        raise KeyError(f"no layer {ref!r}; layers: {[lyr.d.name for lyr in self._layers.values()]}")

    # ------------------------------------------------------------------ drift (as an admin would cause it)

    def _set_codes(self, layer: str | int, field: str, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
                   ) -> None:
        with self._lock:
            lyr = self._layer(layer)
            f = lyr.field(field)
            if f is None or f.codes() is None or f.domain is None:
                raise KeyError(f"{lyr.d.name}.{field} has no coded-value domain")
            domain = {**f.domain, "codedValues": change([dict(c) for c in f.domain["codedValues"]])}
            new = replace(f, domain=domain)
            lyr.fields = [new if x is f else x for x in lyr.fields]
            lyr.by_lower[new.name.lower()] = new

    def set_coded_value(self, layer: str | int, field: str, code: Any, name: str) -> None:
        """Add a code to a field's coded-value domain, or rename one (updateDefinition in the portal): edits accept
        it from now on and the layer resource shows it."""
        def change(codes: list[dict[str, Any]]) -> list[dict[str, Any]]:
            if any(c["code"] == code for c in codes):
                return [{**c, "name": name} if c["code"] == code else c for c in codes]
            return [*codes, {"name": name, "code": code}]

        self._set_codes(layer, field, change)

    def remove_coded_value(self, layer: str | int, field: str, code: Any) -> None:
        """Remove a code from a field's coded-value domain."""
        def change(codes: list[dict[str, Any]]) -> list[dict[str, Any]]:
            if not any(c["code"] == code for c in codes):
                raise KeyError(f"{layer}.{field} has no code {code!r}")
            return [c for c in codes if c["code"] != code]

        self._set_codes(layer, field, change)

    def set_subtypes(self, layer: str | int, type_id_field: str | None, types: list[dict[str, Any]]) -> None:
        """Give a layer subtypes: `type_id_field` and `types` ([{id, name, domains: {field: domain}}]) as the layer
        resource lists them (a subtype may narrow a field to a coded-value domain of its own)."""
        with self._lock:
            lyr = self._layer(layer)
            lyr.type_id_field = type_id_field
            lyr.types = [dict(t) for t in types]
