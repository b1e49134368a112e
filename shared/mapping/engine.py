"""The mapping engine: translates a source payload into target values under a flow's rules (pure)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.core.errors import MappingError, ValidationError
from shared.core.ports import ATTACHMENTS_KEY, GEOMETRY_KEY
from shared.mapping.spec import FieldMap, FlowSet, FlowSpec
from shared.mapping.transforms import TRANSFORMS, latlon_from_point, point_from_latlon


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def normalize(value: Any) -> Any:
    """Canonical form for comparisons: floats rounded (1e-6), GUID-like braces/case folded, dicts sorted."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        rounded = round(value, 6)
        return int(rounded) if rounded.is_integer() else rounded
    if isinstance(value, str):
        stripped = value.strip("{}")
        if len(stripped) == 36 and stripped.count("-") == 4:
            return stripped.lower()
        return value
    if isinstance(value, Mapping):
        if "x" in value and "y" in value:
            # Point geometry: where the spatial reference sits differs between reads and writes.
            return {"x": normalize(value["x"]), "y": normalize(value["y"])}
        return {str(k): normalize(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [normalize(v) for v in value]
    return value


def values_hash(values: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `values` (the per-record "last written" hash)."""
    canonical = json.dumps(normalize(dict(values)), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def same(a: Any, b: Any) -> bool:
    """Value equality under `normalize`."""
    return bool(normalize(a) == normalize(b))


@dataclass
class MappedValues:
    """Target values for one record, plus what was left out and why."""

    values: dict[str, Any] = field(default_factory=dict)
    owned_by_target: list[str] = field(default_factory=list)
    """Target fields skipped because the target system masters them (updates only)."""
    conflicts: list[str] = field(default_factory=list)
    """Shared target fields skipped because the target changed more recently (last writer wins)."""


class Mapper:
    """Applies a flow's field maps, value maps, geometry and ownership rules to one payload."""

    def __init__(self, flowset: FlowSet) -> None:
        self.flowset = flowset
        self._value_index: dict[tuple[str, str, str], dict[Any, Any]] = {}
        for name, entries in flowset.value_maps.items():
            systems = {s for e in entries for s in e if s != "label"}
            for src in systems:
                for dst in systems - {src}:
                    self._value_index[(name, src, dst)] = {
                        normalize(e[src]): e[dst] for e in entries if src in e and dst in e
                    }

    def source_fields(self, flow: FlowSpec) -> list[str]:
        """Every source field the flow reads (fields, lookups, geometry) — the echo/snapshot projection."""
        names = [fm.source for fm in flow.fields] + [lk.source for lk in flow.lookups]
        if flow.geometry is not None:
            if flow.geometry.transform == "latlon_to_point":
                names += [flow.geometry.latitude, flow.geometry.longitude]
            else:
                names.append(GEOMETRY_KEY)
        if flow.attachments is not None and flow.attachments.enabled:
            names.append(ATTACHMENTS_KEY)
        return names

    def project(self, flow: FlowSpec, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The payload restricted to the flow's source fields that are present."""
        return {name: payload[name] for name in self.source_fields(flow) if name in payload}

    def translate_choice(self, flow: FlowSpec, fm: FieldMap, value: Any) -> Any:
        """Option-set value <-> coded value through the named value map; unmapped -> UNMAPPED_CHOICE."""
        if _empty(value):
            return None
        assert fm.value_map is not None
        table = self._value_index.get((fm.value_map, flow.source.system, flow.target.system), {})
        key = normalize(value)
        if key not in table:
            known = ", ".join(str(k) for k in table)
            raise MappingError(
                f"flow {flow.name}: {flow.source.system} field {fm.source} has value {value!r}, which value map "
                f"{fm.value_map!r} does not translate to {flow.target.system} (known: {known}). Add the value to "
                f"value_maps.{fm.value_map} in the flow spec (and to the target's domain), then replay the message.",
                reason="UNMAPPED_CHOICE",
            )
        return table[key]

    def map_values(
        self,
        flow: FlowSpec,
        payload: Mapping[str, Any],
        *,
        is_create: bool,
        target_newer: bool,
        record: str = "",
    ) -> MappedValues:
        """Translate `payload` for `flow`.

        Ownership first: on an update, fields the target system masters are not written (on a create
        they seed the new record). Then last writer wins: when the target changed after this source
        change, shared fields are left as the target has them.
        """
        out = MappedValues()
        where = f"flow {flow.name} record {record}".strip()
        for fm in flow.fields:
            present = fm.source in payload
            value = payload.get(fm.source)
            if fm.required and (_empty(value) if (present or is_create) else False):
                raise ValidationError(
                    f"{where}: required field {flow.source.system}.{fm.source} (-> {fm.target}) is empty. Fill it "
                    f"in {flow.source.system}; the corrected record syncs on its next change, or replay this message."
                )
            if not present:
                continue
            if fm.owner == flow.target.system and not is_create:
                out.owned_by_target.append(fm.target)
                continue
            if fm.owner == "shared" and target_newer and not is_create:
                out.conflicts.append(fm.target)
                continue
            try:
                if fm.transform == "choice":
                    mapped = self.translate_choice(flow, fm, value)
                else:
                    mapped = TRANSFORMS[fm.transform](value, fm.args)
            except MappingError as exc:
                if exc.reason == "UNMAPPED_CHOICE":
                    raise
                raise MappingError(f"{where}: field {fm.source}: {exc.detail}") from exc
            except Exception as exc:  # any transform failure is this record's, never the batch's
                raise _unexpected(where, fm.source, value, exc) from exc
            out.values[fm.target] = mapped
        geo = flow.geometry
        if geo is not None:
            skip = (geo.owner == flow.target.system and not is_create) or (
                geo.owner == "shared" and target_newer and not is_create
            )
            field_name = f"{geo.latitude}/{geo.longitude}" if geo.transform == "latlon_to_point" else GEOMETRY_KEY
            try:
                if geo.transform == "latlon_to_point":
                    present = geo.latitude in payload or geo.longitude in payload
                    if present and not skip:
                        out.values[GEOMETRY_KEY] = point_from_latlon(
                            payload.get(geo.latitude), payload.get(geo.longitude), geo.wkid
                        )
                else:
                    present = GEOMETRY_KEY in payload
                    if present and not skip:
                        latlon = latlon_from_point(payload.get(GEOMETRY_KEY))
                        out.values[geo.latitude] = latlon[0] if latlon else None
                        out.values[geo.longitude] = latlon[1] if latlon else None
            except MappingError as exc:
                raise MappingError(f"{where}: field {field_name}: {exc.detail}") from exc
            except Exception as exc:  # as for fields: this record fails, not the batch
                shown = (payload.get(geo.latitude), payload.get(geo.longitude)) if geo.transform == "latlon_to_point" \
                    else payload.get(GEOMETRY_KEY)
                raise _unexpected(where, field_name, shown, exc) from exc
            if geo.required and (is_create or present) and _geometry_missing(geo.transform, out.values, payload, geo):
                raise ValidationError(f"{where}: required geometry is missing (no location on the source record)")
            if skip and present:
                (out.conflicts if geo.owner == "shared" else out.owned_by_target).append("geometry")
        return out


def _unexpected(where: str, field_name: str, value: Any, exc: Exception) -> MappingError:
    """A transform's unforeseen exception (OverflowError, TypeError, ...) as this record's MappingError."""
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return MappingError(f"{where}: field {field_name}: value {shown} cannot be translated "
                        f"({type(exc).__name__}: {exc})")


def _geometry_missing(transform: str, values: Mapping[str, Any], payload: Mapping[str, Any], geo: Any) -> bool:
    if transform == "latlon_to_point":
        return _empty(payload.get(geo.latitude)) or _empty(payload.get(geo.longitude))
    return payload.get(GEOMETRY_KEY) is None
