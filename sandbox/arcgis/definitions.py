"""The admin API of a hosted layer: its definition, `addToDefinition` and `updateDefinition` of fields and domains."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from sandbox.arcgis.errors import RestError
from sandbox.arcgis.schema import DATE, DOUBLE, GLOBALID, GUID, INTEGER, OID, SMALLINT, STRING, FieldDef
from sandbox.arcgis.store import EDIT_FIELDS, FeatureStore, _Layer
from shared.payloads import strict_loads

# Shapes after the ArcGIS REST API "Add To Definition (Feature Layer)" and "Update Definition (Feature Layer)"
# (developers.arcgis.com/rest/services-reference/online/add-to-definition-feature-layer-.htm,
# .../update-definition-feature-layer-.htm): POST `<admin layer>/addToDefinition` or `/updateDefinition` with the
# JSON in the parameter of the same name; success `{"success": true}`, failure HTTP 200
# `{"error": {"code": 400, "message": ..., "details": [...]}}` whose documented detail is "Unable to add feature
# service layer definition." / "Unable to update feature service layer definition.". The specific reason in the
# details (unknown field, duplicate name, codes of the wrong type) is the simulator's wording [I].
ADD_FAILED = "Unable to add feature service layer definition."
UPDATE_FAILED = "Unable to update feature service layer definition."
ADDABLE_TYPES = frozenset({STRING, SMALLINT, INTEGER, DOUBLE, DATE, GUID, "esriFieldTypeSingle"})
"""Field types addToDefinition accepts here (what the simulator can store and query)."""
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_INT_RANGE = {SMALLINT: (-32768, 32767), INTEGER: (-(2**31), 2**31 - 1)}
_UPDATABLE_KEYS = frozenset({"name", "type", "alias", "domain"})
"""What updateDefinition may say about an existing field here: its alias and its domain (type only unchanged)."""


class SimDefinitions(FeatureStore):
    """`<admin>/<layer>` (the definition with `adminLayerInfo`), `refresh`, `addToDefinition`, `updateDefinition`."""

    service_name: str

    def _layer_json(self, lyr: _Layer) -> dict[str, Any]:  # provided by the simulator class
        raise NotImplementedError

    def _service_json(self) -> dict[str, Any]:  # provided by the simulator class
        raise NotImplementedError

    def _admin_service_json(self) -> dict[str, Any]:
        return {**self._service_json(), "adminServiceInfo": {"name": self.service_name, "type": "FeatureServer",
                                                             "status": "Started"}}

    def _dispatch_admin_layer(self, method: str, rest: list[str], params: Mapping[str, str]) -> Any:
        lyr = self._layers.get(int(rest[0]))
        if lyr is None:
            raise RestError(400, "Invalid URL", ["Invalid URL"])
        tail = rest[1:]
        if not tail:
            info: dict[str, Any] = {"tableName": f"{lyr.d.name}_{lyr.d.id}"}
            if not lyr.is_table:
                info["geometryField"] = {"name": "Shape", "srid": 102100}
            return {**self._layer_json(lyr), "adminLayerInfo": info}
        if len(tail) != 1 or tail[0] not in ("refresh", "addToDefinition", "updateDefinition"):
            raise RestError(400, "Invalid URL", ["Invalid URL"])
        if method != "POST":
            raise RestError(400, "Unable to complete operation.", ["This operation is only supported via POST."])
        if tail[0] == "refresh":
            return {"success": True}
        failed = ADD_FAILED if tail[0] == "addToDefinition" else UPDATE_FAILED
        if params.get("async", "false").strip().lower() == "true":
            raise RestError(400, failed, ["Asynchronous definition changes are not simulated (async=false)."])
        definition = _definition(params, tail[0], failed)
        if tail[0] == "addToDefinition":
            self._add_fields(lyr, definition["fields"])
        else:
            self._update_fields(lyr, definition["fields"])
        return {"success": True}

    def _add_fields(self, lyr: _Layer, raw_fields: list[Any]) -> None:
        new: list[FieldDef] = []
        seen = {f.name.lower() for f in lyr.fields}
        for raw in raw_fields:
            if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
                raise RestError(400, ADD_FAILED, ["Each field needs a 'name'."])
            name = raw["name"]
            if not _NAME_RE.match(name):
                raise RestError(400, ADD_FAILED, [f"Invalid field name '{name}'."])
            if name.lower() in seen:
                raise RestError(400, ADD_FAILED, [f"Field '{name}' already exists in layer '{lyr.d.name}'."])
            kind = raw.get("type")
            if kind not in ADDABLE_TYPES:
                raise RestError(400, ADD_FAILED, [f"Field '{name}': field type {kind!r} cannot be added."])
            length = raw.get("length")
            if kind == STRING:
                length = 256 if length is None else length
                if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= 2**31 - 1:
                    raise RestError(400, ADD_FAILED, [f"Field '{name}': invalid length {length!r}."])
            elif kind in (DATE, GUID):
                length = 8 if kind == DATE else 38
            else:
                length = None
            field = FieldDef(name, str(kind), alias=_alias(raw, name, ADD_FAILED), length=length,
                             nullable=_flag(raw, "nullable", name, ADD_FAILED),
                             editable=_flag(raw, "editable", name, ADD_FAILED))
            if raw.get("domain") is not None:
                field = dataclasses.replace(field, domain=_domain(field, raw["domain"], ADD_FAILED))
            seen.add(name.lower())
            new.append(field)
        # All or nothing: nothing is added when one field is refused.
        lyr.fields.extend(new)
        lyr.by_lower.update({f.name.lower(): f for f in new})

    def _update_fields(self, lyr: _Layer, raw_fields: list[Any]) -> None:
        changed: dict[str, FieldDef] = {}
        for raw in raw_fields:
            if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
                raise RestError(400, UPDATE_FAILED, ["Each field needs a 'name'."])
            current = changed.get(raw["name"].lower()) or lyr.field(raw["name"])
            if current is None:
                raise RestError(400, UPDATE_FAILED, [f"Field '{raw['name']}' does not exist in layer "
                                                     f"'{lyr.d.name}'."])
            unknown = sorted(set(raw) - _UPDATABLE_KEYS)
            if unknown:
                raise RestError(400, UPDATE_FAILED, [f"Field '{current.name}': cannot update {', '.join(unknown)}."])
            if raw.get("type", current.type) != current.type:
                raise RestError(400, UPDATE_FAILED, [f"Field '{current.name}': the field type cannot be changed."])
            updated = current
            if "alias" in raw:
                updated = dataclasses.replace(updated, alias=_alias(raw, current.name, UPDATE_FAILED))
            if "domain" in raw:
                domain = None if raw["domain"] is None else _domain(current, raw["domain"], UPDATE_FAILED)
                updated = dataclasses.replace(updated, domain=domain)
            changed[current.name.lower()] = updated
        lyr.fields[:] = [changed.get(f.name.lower(), f) for f in lyr.fields]
        lyr.by_lower.update(changed)


def _definition(params: Mapping[str, str], op: str, failed: str) -> dict[str, Any]:
    raw = params.get(op, "").strip()
    if not raw:
        raise RestError(400, failed, [f"'{op}' parameter is required."])
    try:
        value = strict_loads(raw)
    except ValueError:
        raise RestError(400, failed, [f"Invalid JSON in '{op}'."]) from None
    if not isinstance(value, dict):
        raise RestError(400, failed, [f"'{op}' must be a JSON object."])
    others = sorted(set(value) - {"fields"})
    if others:
        # The service takes far more (indexes, drawingInfo, ...); the simulator models fields and their domains.
        raise RestError(400, failed, [f"Definition property not supported by the simulator: {', '.join(others)}."])
    if not isinstance(value.get("fields"), list) or not value["fields"]:
        raise RestError(400, failed, ["'fields' must be a non-empty array."])
    return value


def _alias(raw: Mapping[str, Any], name: str, failed: str) -> str:
    alias = raw.get("alias", name)
    if not isinstance(alias, str):
        raise RestError(400, failed, [f"Field '{name}': alias must be a string."])
    return alias


def _flag(raw: Mapping[str, Any], key: str, name: str, failed: str) -> bool:
    value = raw.get(key, True)
    if not isinstance(value, bool):
        raise RestError(400, failed, [f"Field '{name}': {key} must be true or false."])
    return value


def _domain(field: FieldDef, raw: Any, failed: str) -> dict[str, Any]:
    """A coded-value or range domain checked against the field it is set on (its type, length, uniqueness)."""
    if field.type in (OID, GLOBALID, GUID, DATE) or field.name in EDIT_FIELDS.values():
        raise RestError(400, failed, [f"Field '{field.name}' of type {field.type} cannot have a domain."])
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise RestError(400, failed, [f"Field '{field.name}': a domain needs a type and a name."])
    if raw.get("type") == "range":
        rng = raw.get("range")
        if field.type == STRING or not isinstance(rng, list) or len(rng) != 2 or \
                not all(_is_number(v) for v in rng) or rng[0] > rng[1]:
            raise RestError(400, failed, [f"Field '{field.name}': invalid range domain."])
        return {"type": "range", "name": raw["name"], "range": list(rng)}
    if raw.get("type") != "codedValue" or not isinstance(raw.get("codedValues"), list) or not raw["codedValues"]:
        raise RestError(400, failed, [f"Field '{field.name}': a domain is codedValue with codedValues or range."])
    values: list[dict[str, Any]] = []
    codes: set[Any] = set()
    for entry in raw["codedValues"]:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or "code" not in entry:
            raise RestError(400, failed, [f"Field '{field.name}': each coded value needs a name and a code."])
        code = entry["code"]
        if not _fits(field, code):
            raise RestError(400, failed, [f"Field '{field.name}' of type {field.type}: code {code!r} does not match "
                                          "the field type."])
        if code in codes:
            raise RestError(400, failed, [f"Field '{field.name}': duplicate code {code!r}."])
        codes.add(code)
        values.append({"name": entry["name"], "code": code})
    return {"type": "codedValue", "name": raw["name"], "codedValues": values,
            "mergePolicy": raw.get("mergePolicy", "esriMPTDefaultValue"),
            "splitPolicy": raw.get("splitPolicy", "esriSPTDefaultValue")}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fits(field: FieldDef, code: Any) -> bool:
    if field.type == STRING:
        return isinstance(code, str) and (field.length is None or len(code) <= field.length)
    if field.type in _INT_RANGE:
        low, high = _INT_RANGE[field.type]
        return isinstance(code, int) and not isinstance(code, bool) and low <= code <= high
    return _is_number(code)
